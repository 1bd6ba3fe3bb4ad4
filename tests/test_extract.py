"""The extract stage on the model shapes users bring, in every file format they save."""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

import zoo
from pipeline import load_run
from pipeline.cli import main

FORMATS = ["keras", "h5", "savedmodel"]


# Batches of 5 over the 12-image folder: the last batch is a short one.
write_config = functools.partial(zoo.write_config, name="t", file="config.yaml", extract={"batch_size": 5})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    zoo.image_folder(root, per_class=4, size=20)
    return root


def load_pixels(paths):
    from pipeline.inputs.images import load_images

    x, _, _ = load_images(paths, (16, 16), 3)
    return x.astype("float32") / 255


def reference_outputs(model, paths, layer):
    """What the layer gives on the same pixels, computed with plain Keras."""
    import keras

    x = load_pixels(paths)
    if layer == "block/inner_conv":
        sub = model.get_layer("block")
        stem = keras.Model(model.inputs, model.get_layer("stem").output)(x)
        return np.asarray(keras.Model(sub.inputs, sub.get_layer("inner_conv").output)(stem))
    return np.asarray(keras.Model(model.inputs, model.get_layer(layer).output)(x))


PROBED = {"sequential": "conv_b", "branched": "left", "nested": "block/inner_conv",
          "batchnorm": "conv_a", "depthwise": "dw"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_every_architecture_and_format_extracts(tmp_path, folder, arch, fmt):
    model = zoo.randomize_batchnorm(zoo.ARCHITECTURES[arch]())
    path = zoo.save(model, tmp_path / arch, fmt)
    config = write_config(tmp_path, path, folder)

    assert main(["run", str(config), "--only", "extract"]) == 0

    run = load_run(tmp_path / "run")
    assert len(run.dataset) == 12 and set(run.dataset.class_name) == {"a", "b", "c"}
    assert run.logits().shape == (12, 3)
    layer = PROBED[arch]
    assert layer in run.layer_names
    expected = reference_outputs(model, run.dataset.path.tolist(), layer).mean(axis=(1, 2))
    np.testing.assert_allclose(run.activations(layer, "mean")[:], expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_runs_in_inference_mode(tmp_path, folder):
    model = zoo.randomize_batchnorm(zoo.batchnorm())
    config = write_config(tmp_path, zoo.save(model, tmp_path / "bn", "keras"), folder, layers=["bn"])
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    # Training-mode BatchNorm would normalise each batch to mean beta; inference uses the moving stats.
    expected = reference_outputs(model, run.dataset.path.tolist(), "bn").mean(axis=(1, 2))
    np.testing.assert_allclose(run.activations("bn")[:], expected, rtol=1e-4, atol=1e-5)


def test_auto_layers_are_conv_and_dense_and_logits_are_pre_softmax(tmp_path, folder):
    model = zoo.sequential()
    config = write_config(tmp_path, zoo.save(model, tmp_path / "m", "keras"), folder)
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    assert run.layer_names == ["conv_a", "conv_b", "out"]
    probs = np.asarray(model(load_pixels(run.dataset.path.tolist())))
    logits = run.logits()[:]
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, probs, rtol=1e-4, atol=1e-6)
    assert not np.allclose(logits.sum(1), 1.0)


def test_spatial_samples_and_float16(tmp_path, folder):
    model = zoo.sequential()
    config = write_config(tmp_path, zoo.save(model, tmp_path / "m", "keras"), folder,
                          extract={"batch_size": 5, "spatial_samples": 3, "dtype": "float16"})
    assert main(["run", str(config), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    spatial = run.activations("conv_a", "spatial")
    pos = run.activations("conv_a", "spatial_pos")[:]
    assert spatial.shape == (12, 3, 4) and spatial.dtype == np.float16
    assert pos.min() >= 0 and pos.max() < 14
    assert run.activations("conv_a", "mean").dtype == np.float16


def test_npz_input_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(7, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["cat", "dog"]))
    zoo.write_config(tmp_path, zoo.save(zoo.sequential(), tmp_path / "m", "keras"), npz=tmp_path / "d.npz",
                     extract={"batch_size": 3})
    assert main(["run", str(tmp_path / "c.yaml"), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    assert run.dataset.class_name.tolist() == ["cat", "dog", "cat", "dog", "cat", "dog", "dog"]
    assert run.activations("conv_a").shape == (7, 4)


def test_limit_takes_a_seeded_stratified_sample(tmp_path, folder):
    model_path = zoo.save(zoo.sequential(), tmp_path / "m", "keras")
    config = write_config(tmp_path, model_path, folder, data={"images": str(folder), "limit": 6})
    assert main(["run", str(config), "--only", "extract"]) == 0
    first = load_run(tmp_path / "run").dataset
    assert first.class_name.value_counts().to_dict() == {"a": 2, "b": 2, "c": 2}
    assert main(["run", str(config), "--only", "extract", "--force"]) == 0
    assert load_run(tmp_path / "run").dataset.path.tolist() == first.path.tolist()


def test_nan_outputs_are_reported_per_layer(tmp_path, folder, capsys):
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inp)
    x = keras.layers.Conv2D(2, 3, name="broken")(x)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    kernel, bias = model.get_layer("broken").get_weights()
    kernel[0, 0, 0, 1] = np.nan  # a diverged training run leaves weights like this
    model.get_layer("broken").set_weights([kernel, bias])
    config = write_config(tmp_path, zoo.save(model, tmp_path / "nan", "keras"), folder,
                          layers=["conv", "broken"])
    assert main(["run", str(config), "--only", "extract"]) == 0
    err = capsys.readouterr().err
    assert "layer broken produced" in err and "NaN/Inf" in err
    run = load_run(tmp_path / "run")
    assert run.arrays.attrs["nonfinite"]["broken"] > 0
    assert run.arrays.attrs["nonfinite"]["conv"] == 0


# --------------------------------------------------------------------------- the batch loop


def test_the_loop_reports_every_step_to_an_observer_and_nothing_without_one(tmp_path, folder):
    """``observe`` sees each batch loaded, run and each chunk group written and recorded, in order."""
    from pipeline.extraction.loop import observe

    config = write_config(tmp_path, zoo.save(zoo.sequential(), tmp_path / "m", "keras"), folder,
                          extract={"batch_size": 5, "chunk_rows": 10})  # 12 images: batches 5+5+2, groups 10+2
    events = []
    with observe(events.append):
        assert main(["run", str(config), "--only", "extract"]) == 0
    steps = [e.step for e in events]
    assert steps[0] == "start" and steps[-1] == "loop"
    forwards = sorted((e for e in events if e.step == "forward"), key=lambda e: e.start)
    assert [e.rows for e in forwards] == [5, 5, 2]  # started in order (two may run at once: finish in any)
    assert {e.thread.split("_")[0] for e in forwards} == {"extract-device"}
    assert all(forwards[0].end <= e.start for e in forwards[1:])  # the first call (the trace) runs alone
    assert [e.rows for e in events if e.step == "load"] == [5, 5, 2]
    assert [(e.group, e.rows) for e in events if e.step == "write"] == [(0, 10), (1, 2)]
    assert [e.group for e in events if e.step == "record"] == [0, 1]
    loop = events[-1]
    assert all(loop.start <= e.start <= e.end <= loop.end for e in events)
    assert {e.thread.split("_")[0] for e in events if e.step in ("write", "record")} == {"extract-writer"}
    assert all(e.cpu > 0 for e in events)
    assert main(["run", str(config), "--only", "extract", "--force"]) == 0  # outside: no more events
    assert len(events) == len(steps)


def test_two_batches_run_at_once_after_the_first_and_groups_are_written_in_order(tmp_path):
    """On a CPU the loop keeps two forward calls in flight; what is stored is what one at a time stores."""
    import threading
    import time

    import zarr

    from pipeline.extraction.loop import BatchRunner, ChunkWriter, stream_groups
    from pipeline.extraction.plan import inflight

    assert inflight() == 2  # no GPU here

    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    groups = [(0, 8), (8, 16), (16, 23)]  # chunk groups of two batches of 4 (the last: 4 + 3)
    lock, state = threading.Lock(), {"now": 0, "most": 0, "calls": 0}

    def forward(pixels, positions, valid):
        with lock:
            state["calls"] += 1
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02)  # long enough for the next batch to be started meanwhile
        with lock:
            state["now"] -= 1
        return {"a": pixels[:valid] * 2}, {"a": 0}

    stored = {}
    for k in (1, 2):
        state["most"] = state["calls"] = 0
        root = zarr.open_group(str(tmp_path / f"inflight{k}"), mode="w")
        recorded = []
        writer = ChunkWriter(root, lambda g, bad: recorded.append(g), n=len(x), rows=8)
        runner = BatchRunner(forward, 4, inflight=k)
        stream_groups(runner, lambda rows: x[rows], groups, [0, 1, 2], len(x), 4, writer)
        assert state["most"] == k and state["calls"] == 6 and recorded == [0, 1, 2]
        stored[k] = root["a"][:]
    np.testing.assert_array_equal(stored[1], x * 2)
    np.testing.assert_array_equal(stored[2], stored[1])


def test_an_error_in_a_forward_call_stops_the_loop_and_records_only_finished_groups(tmp_path):
    import zarr

    from pipeline.extraction.loop import BatchRunner, ChunkWriter, stream_groups

    x = np.zeros((16, 2), np.float32)

    def forward(pixels, positions, valid):
        if pixels[0, 0] < 0:
            raise RuntimeError("boom")
        return {"a": pixels[:valid]}, {}

    x[12:] = -1  # the fourth batch (second group) fails
    recorded = []
    writer = ChunkWriter(zarr.open_group(str(tmp_path / "z"), mode="w"), lambda g, bad: recorded.append(g), 16, 8)
    with pytest.raises(RuntimeError, match="boom"):
        stream_groups(BatchRunner(forward, 4, inflight=2), lambda rows: x[rows], [(0, 8), (8, 16)], [0, 1], 16, 4,
                      writer)
    assert recorded == [0]
    assert not [t for t in threading_names() if t.startswith(("extract-device", "extract-loader"))]


def threading_names():
    import threading

    return [t.name for t in threading.enumerate()]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX feature")
def test_the_writer_compresses_at_the_lowest_priority_and_the_device_thread_keeps_its_own(tmp_path):
    """Compression runs on the CPU time TensorFlow leaves idle: the writer's threads are niced, the caller is not."""
    import threading

    import zarr

    from pipeline.extraction.loop import WRITER_NICE, ChunkWriter

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before, seen = niceness(), {}
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    writer = ChunkWriter(root, lambda group, bad: seen.setdefault("record", niceness()), n=8, rows=4)
    writer.stores.submit(lambda: seen.setdefault("store", niceness())).result()
    writer.submit(0, 0, {"x": [np.ones((4, 3), np.float32)]}, {})
    writer.close()
    assert WRITER_NICE == 19 and seen == {"record": 19, "store": 19}
    assert niceness() == before   # the calling (device) thread is untouched
    np.testing.assert_array_equal(root["x"][:4], 1)


def test_a_groups_largest_arrays_are_written_first(tmp_path):
    """The longest write starts first, so it does not run alone at the end of the group."""
    import zarr

    from pipeline.extraction.loop import ChunkWriter

    started = []
    writer = ChunkWriter(zarr.open_group(str(tmp_path / "a.zarr"), mode="w"), lambda group, bad: None, n=4, rows=4)
    sizes = {"small": 2, "thumbnails": 300, "medium": 40, "tiny": 1}
    writer.puts = {key: (lambda start, value, key=key: started.append(key)) for key in sizes}
    writer.stores.shutdown()
    writer.stores = ThreadPoolExecutor(1)  # one store thread: the start order is the order of submission
    writer.submit(0, 0, {key: [np.zeros((4, width), np.float32)] for key, width in sizes.items()}, {})
    writer.close()
    assert started == ["thumbnails", "medium", "small", "tiny"]


@pytest.mark.parametrize("shape,split,large", [((3, 28, 28, 128), True, False), ((3, 56, 56, 24), True, False),
                                               ((3, 7, 7, 2048), False, False), ((3, 112, 112, 8), False, True),
                                               ((2, 60, 57, 3), False, True), ((3, 16, 16, 64), False, False),
                                               ((3, 5), False, False), ((3, None, None, 256), False, False)])
def test_maps_reduce_by_the_fastest_measured_kernels_to_the_same_values(shape, split, large):
    """Mean and max over H and W: split into H then W, or a matrix product and a max-pool for large
    maps, only inside the measured bounds; the same numbers as numpy whichever way."""
    import tensorflow as tf

    from pipeline.extraction.forward import large_map, spatial_max, spatial_mean, two_stage

    assert two_stage(shape) is split and large_map(shape) is large
    if None in shape or len(shape) != 4:
        return
    y = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for kernels in (True, False):  # False: one reduction, as the XLA-compiled summaries
        np.testing.assert_allclose(spatial_mean(tf.constant(y), kernels), y.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(spatial_max(tf.constant(y), kernels), y.max(axis=(1, 2)))


def test_large_maps_of_unknown_batch_and_channels_reduce_inside_a_graph():
    import tensorflow as tf

    from pipeline.extraction.forward import spatial_max, spatial_mean

    @tf.function(input_signature=[tf.TensorSpec((None, 64, 64, None), tf.float32)])
    def summary(y):
        return spatial_mean(y), spatial_max(y)

    y = np.random.default_rng(1).standard_normal((2, 64, 64, 5)).astype(np.float32)
    mean, top = summary(tf.constant(y))
    np.testing.assert_allclose(mean, y.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(top, y.max(axis=(1, 2)))


@pytest.mark.parametrize("key,dtype,row_shape", [("layer/mean", "float32", (7,)), ("layer/mean", "float16", (3, 5)),
                                                 ("layer/mean", "uint8", (4, 4, 3)), ("layer/mean", "int32", (2, 2)),
                                                 ("thumbnails", "uint8", (4, 4, 3)), ("thumbnails", "float32", (7,))])
def test_chunks_written_directly_are_the_bytes_zarr_writes(tmp_path, key, dtype, row_shape):
    """The writer's direct chunk files equal zarr's own, whole chunks and the padded last one,
    compressed (activations) or not (thumbnails)."""
    import zarr

    from pipeline.storage.arrays import chunk_files, create_array

    n, rows = 10, 4  # chunks of 4, 4 and 2 rows
    value = np.random.default_rng(0).integers(0, 100, (n, *row_shape)).astype(dtype)
    stores = {}
    for how in ("zarr", "direct"):
        root = zarr.open_group(str(tmp_path / how), mode="w")
        array = create_array(root, key, (n, *row_shape), rows, dtype)
        if how == "zarr":
            for start in range(0, n, rows):
                array.with_config({"write_empty_chunks": True})[start:start + rows] = value[start:start + rows]
        else:
            put = chunk_files(array)
            put(0, value[:8])
            put(8, value[8:])
        stores[how] = root
    files = sorted(p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr" / key).rglob("*") if p.is_file())
    assert len(files) == 4  # zarr.json and three chunks
    for f in files:
        assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    first = (tmp_path / "direct" / key / "c").joinpath(*["0"] * value.ndim).read_bytes()
    assert (first == value[:rows].tobytes()) == (key == "thumbnails")  # thumbnails: the raw bytes
    assert np.array_equal(stores["direct"][key][:], value)
    assert not list((tmp_path / "direct").rglob("*.partial"))


def test_arrays_of_another_layout_are_written_through_zarr(tmp_path):
    import zarr

    from pipeline.storage.arrays import chunk_files

    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    gzip = root.create_array("a", shape=(8, 2), chunks=(4, 2), dtype="float32",
                             compressors=zarr.codecs.GzipCodec())
    assert chunk_files(gzip) is None
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    assert chunk_files(memory.create_array("a", shape=(8, 2), chunks=(4, 2), dtype="float32")) is None
    with pytest.raises(ValueError, match="chunk boundary"):
        chunk_files(root.create_array("b", shape=(8, 2), chunks=(4, 2), dtype="float32",
                                      compressors=zarr.codecs.ZstdCodec(level=1)))(2, np.zeros((2, 2), "float32"))
