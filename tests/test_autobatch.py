"""``batch_size: auto`` and ``compute.xla``: the search, what is recorded, and that a resume reuses it."""
import time

import numpy as np
import pytest

from pipeline.backend import autobatch
from pipeline.storage.store import RunStore


# --------------------------------------------------------------------------- the search, on fakes


def per_call(fixed, per_item):
    """Seconds of one call: a fixed cost plus a cost per item (throughput saturates as it grows)."""
    return lambda size: fixed + per_item * size


def test_search_grows_while_throughput_improves_and_stops_below_ten_percent():
    tried = []

    def measure(size):
        tried.append(size)
        return per_call(0.01, 0.001)(size)

    choice = autobatch.search(measure, start=8, cap=1024)
    # items/s: 8 -> 444, 16 -> 615, 32 -> 762, 64 -> 865 (+13 %), 128 -> 928 (+7 %): keep 64
    assert tried == [8, 16, 32, 64, 128]
    assert choice.size == 64 and choice.reason == "128: +7 % throughput, stopped"
    assert [t.size for t in choice.trials] == tried and all(t.rate > 0 for t in choice.trials)
    assert choice.line().startswith("64 (128: +7 % throughput, stopped; tried 8-128 in ")


def test_search_stops_when_a_larger_batch_is_slower():
    seconds = {8: 0.08, 16: 0.10, 32: 0.30}   # 100, 160, 107 items/s
    choice = autobatch.search(seconds.__getitem__, start=8, cap=1024)
    assert choice.size == 16 and choice.reason == "32: -33 % throughput, stopped"


def test_search_backs_off_to_the_last_size_that_worked_on_out_of_memory(tf):
    def measure(size):
        if size >= 64:
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating a tensor of {size} images")
        return 0.001 * size ** 0.5    # always worth growing

    choice = autobatch.search(measure, start=8, cap=1024)
    assert choice.size == 32 and choice.reason == "64: out of memory, backed off"
    assert choice.trials[-1].error == "out of memory" and choice.record()["trials"][-1]["size"] == 64


def test_search_halves_below_the_start_when_even_that_runs_out_of_memory():
    def measure(size):
        if size > 2:
            raise MemoryError
        return 0.01

    choice = autobatch.search(measure, start=8, cap=1024)
    assert choice.size == 2 and [t.size for t in choice.trials] == [8, 4, 2]
    with pytest.raises(MemoryError, match="even at batch size 1"):
        autobatch.search(lambda size: (_ for _ in ()).throw(MemoryError()), start=4)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    with pytest.raises(ValueError):
        autobatch.search(lambda size: (_ for _ in ()).throw(ValueError("bad model")), start=8, cap=64)


def test_candidates_never_exceed_the_items_the_cap_or_the_memory_estimate():
    assert autobatch.candidates(8, 1024, limit=100) == [8, 16, 32, 64, 100]
    assert autobatch.candidates(8, 256, limit=10_000) == [8, 16, 32, 64, 128, 256]
    assert autobatch.candidates(8, 1024, limit=10_000, memory=300) == [8, 16, 32, 64, 128, 256]
    assert autobatch.candidates(8, 1024, limit=5) == [5]
    # one candidate: nothing is timed
    choice = autobatch.search(lambda size: pytest.fail("timed"), start=8, cap=1024, limit=5)
    assert choice.size == 5 and choice.reason == "all 5 items in one batch" and choice.trials == ()
    choice = autobatch.search(per_call(0, 0.001), start=8, cap=1024, limit=10_000, memory=40, min_gain=-1)
    assert choice.size == 32 and choice.reason == "the memory estimate allows no more"
    assert autobatch.memory_cap(1000, available=64_000) == 32   # half of what is available
    assert autobatch.available_memory() > 0


def test_search_keeps_to_its_time_budget():
    now = [0.0]

    def clock():
        return now[0]

    def measure(size):
        now[0] += size / 8          # 1 s at 8, 2 s at 16, ...
        return 0.001

    choice = autobatch.search(measure, start=8, cap=1024, max_seconds=10, clock=clock)
    assert [t.size for t in choice.trials] == [8, 16, 32]    # 64 would have ended after 15 s
    assert choice.size == 32 and choice.reason == "probe time limit (10 s) reached before 64"


def test_timed_warms_up_then_keeps_the_fastest_call():
    calls = []
    times = iter([0, 5, 5, 6])      # the warm-up is not timed; repeats take 5 s and 1 s

    measure = autobatch.timed(calls.append, warmup=1, repeats=2, clock=lambda: next(times))
    assert measure(16) == 1 and calls == [16, 16, 16]


# --------------------------------------------------------------------------- extraction


@pytest.fixture
def tiny(tmp_path, keras):
    """A tiny conv model and 48 images (.npz); returns ``config(out, **sections) -> Config``."""
    from pipeline.config import make_config

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, keras.layers.Dense(3, name="out")(x)).save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8), y=np.arange(48) % 3)

    def config(out="run", **sections):
        raw = {"name": "ab", "out": str(tmp_path / out), "model": str(tmp_path / "m.keras"),
               "data": {"npz": str(tmp_path / "d.npz")}, "layers": ["conv_a", "conv_b"], **sections}
        return make_config(raw)

    return config


def extract(cfg):
    from pipeline.orchestration.runner import Runner
    from pipeline.stages import extract as stage

    Runner(cfg, [stage.STAGE]).run()
    return RunStore(cfg.out_dir)


def arrays(cfg):
    from pipeline import load_run

    run = load_run(cfg.out_dir)
    return {k: run.arrays[k][:] for k in ("conv_a/mean", "conv_a/max", "conv_b/mean", "logits", "thumbnails")}


def summary(cfg, stage="extract"):
    from pipeline.storage.catalog import Catalog

    return Catalog(RunStore(cfg.out_dir)).summary(stage)


def test_extract_auto_records_its_size_and_matches_that_fixed_size(tiny, capsys):
    auto = tiny("auto", extract={"batch_size": "auto", "chunk_rows": 1})
    extract(auto)
    err = capsys.readouterr().err
    compute = summary(auto)["compute"]
    size = compute["batch_size"]
    assert size in (8, 16, 32, 48) and compute["batch_search"]["size"] == size
    assert f"extract: batch size auto → {size} (" in err and "tried 8-" in err
    assert compute["xla"] is False and compute["xla_reason"].startswith("CPU")   # no GPU here: not tried
    assert "extract: compute.xla auto → off (CPU: " in err

    fixed = tiny("fixed", extract={"batch_size": size, "chunk_rows": 1})
    extract(fixed)
    assert summary(fixed)["compute"]["batch_size"] == size
    a, b = arrays(auto), arrays(fixed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_interrupted_auto_extract_resumes_with_the_recorded_size(tiny, monkeypatch, capsys):
    from pipeline.extraction import loop, tuning

    monkeypatch.setattr(tuning, "CAP", 16)   # several chunk groups of 48 images, whatever this machine picks
    cfg = tiny("run", extract={"batch_size": "auto", "chunk_rows": 1})
    recorded = []

    def interrupt(event):   # after the first group is on disk, stop the device thread at its next step
        if event.step == "record":
            recorded.append(event.group)
        elif recorded and event.thread == "MainThread":
            raise KeyboardInterrupt

    with loop.observe(interrupt), pytest.raises(KeyboardInterrupt):
        extract(cfg)
    store = RunStore(cfg.out_dir)
    progress = store.read_json("extract.progress.json")
    assert 0 < len(progress["done"]) < 48 // progress["compute"]["batch_size"]
    first = capsys.readouterr().err
    assert "batch size auto →" in first

    extract(cfg)  # resumes: no new probe, the recorded size and the same arrays as that fixed size
    size = progress["compute"]["batch_size"]
    again = capsys.readouterr().err
    assert f"extract: batch size auto → {size} (recorded when this extraction started)" in again
    assert "tried" not in again and "compute.xla" not in again
    assert summary(cfg)["compute"] == progress["compute"]
    fixed = tiny("fixed", extract={"batch_size": progress["compute"]["batch_size"], "chunk_rows": 1})
    extract(fixed)
    a, b = arrays(cfg), arrays(fixed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class FakeProbe:
    """A forward probe whose XLA variant takes ``xla_seconds`` per call and plain ``seconds``."""

    def __init__(self, seconds, xla_seconds, compiles=True):
        self.seconds, self.xla_seconds, self.ok, self.error, self.calls = seconds, xla_seconds, compiles, None, []

    def call(self, batch, xla):
        self.calls.append(xla)
        time.sleep(self.xla_seconds if xla else self.seconds)

    def compiles(self, batch):
        self.error = None if self.ok else "no XLA kernel for op X"
        return self.ok


def test_extract_xla_auto_is_never_tried_on_a_cpu_and_timed_on_a_gpu(monkeypatch):
    from pipeline.backend import autobatch
    from pipeline.extraction.tuning import CPU_REASON, _xla_auto

    probe = FakeProbe(0.01, 0.001)
    monkeypatch.setattr(autobatch, "cpu_only", lambda: True)
    assert _xla_auto(probe, 8, rate=10.0, n=10_000) == (False, CPU_REASON) and probe.calls == []

    monkeypatch.setattr(autobatch, "cpu_only", lambda: False)   # a GPU: timed, kept when it pays
    use, why = _xla_auto(probe, 8, rate=8 / 0.01, n=10**6)
    assert use and why.startswith("XLA ") and "faster" in why and True in probe.calls
    use, why = _xla_auto(FakeProbe(0.001, 0.01), 8, rate=8 / 0.001, n=10**6)
    assert not use and "slower" in why
    use, why = _xla_auto(FakeProbe(0.01, 0.001), 8, rate=8 / 0.01, n=100)   # about 0.1 s of forward passes
    assert not use and "not worth an XLA compile" in why
    use, why = _xla_auto(FakeProbe(0.01, 0.001, compiles=False), 8, rate=8 / 0.01, n=10**6)
    assert not use and why == "XLA cannot compile this model: no XLA kernel for op X"


def test_xla_on_compiles_the_model_and_off_is_todays_forward(tiny, capsys):
    from pipeline.extraction.plan import extract_params

    on, off = tiny("on", compute={"xla": "on"}), tiny("off", compute={"xla": "off"})
    extract(on)
    extract(off)
    assert summary(on)["compute"] == {"batch_size": 64, "xla": True, "probe_seconds": pytest.approx(0, abs=60)}
    assert summary(off)["compute"] == {"batch_size": 64, "xla": False}   # nothing probed
    assert "compute.xla" not in capsys.readouterr().err
    a, b = arrays(on), arrays(off)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # only a value that is set enters the parameters: the default leaves earlier runs up to date
    assert "xla" not in extract_params(tiny()) and extract_params(off)["xla"] == "off"


def test_xla_on_falls_back_with_one_line_when_xla_cannot_compile_the_model(tiny, tf):
    from pipeline.extraction import tuning
    from pipeline.inputs.models import load_model

    class NoXla:
        """The model behind an op without an XLA kernel (a Python function)."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def build_extractor(self, names):
            extractor = self.inner.build_extractor(names)

            def run(x):
                y = tf.numpy_function(lambda a: a, [x], tf.float32)
                return extractor(tf.ensure_shape(y, x.shape))
            return run

    cfg = tiny(compute={"xla": "on"})
    model = NoXla(load_model(cfg.model))
    kinds = {"conv_a": "map", "conv_b": "map"}
    lines = []
    record, forward = tuning.decide(cfg, model, ["conv_a", "conv_b"], kinds, (16, 16), 3, 48, lines.append)
    assert record["xla"] is False and record["xla_reason"].startswith("XLA cannot compile this model: ")
    assert len(lines) == 1 and lines[0].startswith("extract: compute.xla: on, but XLA cannot compile this model (")
    assert lines[0].endswith("; it runs without XLA") and "\n" not in lines[0]
    assert forward is None   # the failed XLA forward is not kept; the run builds one without XLA
    pixels = np.zeros((48, 16, 16, 3), np.uint8)
    out, _ = tuning.build_forward(tuning.resolved(cfg, record), model, ["conv_a", "conv_b"], kinds, (16, 16))(pixels)
    assert out["conv_b/mean"].shape == (48, 8)


def test_extract_auto_leaves_memory_for_both_batches_in_flight_on_a_cpu(tiny, monkeypatch):
    """Two batches run at once on a CPU: the memory estimate caps the batch at half of what one would get."""
    from pipeline.extraction import tuning
    from pipeline.extraction.plan import inflight
    from pipeline.inputs.models import load_model

    cfg = tiny(extract={"batch_size": "auto"})
    model = load_model(cfg.model)
    per_image = autobatch.model_bytes(model, (16, 16, 3))
    # Half of this memory holds 32 images for one batch in flight, 16 for each of two.
    monkeypatch.setattr(autobatch, "available_memory", lambda: per_image * 64)
    assert inflight() == 2
    kinds = {"conv_a": "map", "conv_b": "map"}
    record, _ = tuning.decide(cfg, model, ["conv_a", "conv_b"], kinds, (16, 16), 3, 48, lambda line: None)
    tried = [t["size"] for t in record["batch_search"]["trials"]]
    assert max(tried) <= 16 and record["batch_size"] <= 16


# --------------------------------------------------------------------------- maximization


def maximize(cfg):
    """The maximize stage alone (it needs no cluster stage); returns the summary the manifest records."""
    from pipeline.orchestration.runner import write_outputs
    from pipeline.stages import maximize as stage
    from pipeline.stages.base import Context

    ctx = Context(cfg, RunStore(cfg.out_dir))
    return write_outputs(ctx.catalog, stage.run(ctx))


def maximize_config(tiny, **mx):
    return tiny("mx", layers=["conv_b"], maximize={"steps": 4, "units": "all", "clusters": False, "classes": False,
                                                   "max_seconds": None, "batch_size": "auto", **mx})


def test_maximize_auto_records_its_size_and_a_rerun_keeps_it(tiny, capsys):
    from pipeline.storage.catalog import Catalog

    cfg = maximize_config(tiny)
    extract(cfg)
    compute = maximize(cfg)["compute"]
    assert compute["batch_size"] == 8, compute          # 8 units: a single candidate, nothing timed
    assert compute["batch_search"]["reason"] == "all 8 items in one batch"
    assert "maximize: batch size auto → 8 (all 8 items in one batch" in capsys.readouterr().err
    store = RunStore(cfg.out_dir)
    assert (store.read_table("maximize/conv_b.part.parquet")["batch_size"] == 8).all()
    assert len(Catalog(store).read("maximize")) == 8

    # a rerun with more images to render (the classes) takes the size the first ones were rendered at
    again = maximize(maximize_config(tiny, classes=True))
    assert "maximize: batch size auto → 8 (as the images already rendered)" in capsys.readouterr().err
    assert again["compute"]["batch_size"] == 8 and again["rendered"] == 3


def test_maximize_auto_times_short_renders_when_there_is_a_choice(tiny, monkeypatch, capsys):
    from pipeline.backend import autobatch as ab
    from pipeline.stages import maximize as stage

    sizes, real = [], ab.timed

    def spy(call, **kw):
        return real(lambda size: (sizes.append(size), call(size)), **kw)

    monkeypatch.setattr(ab, "timed", spy)
    monkeypatch.setattr(stage, "START", 4)   # 8 units: sizes 4 and 8 to choose from
    cfg = maximize_config(tiny)
    extract(cfg)
    sizes.clear()   # the extraction's own timing
    compute = maximize(cfg)["compute"]
    assert compute["batch_size"] in (4, 8) and sizes and set(sizes) <= {4, 8}
    assert [t["size"] for t in compute["batch_search"]["trials"]] == sorted(set(sizes))
    assert f"maximize: batch size auto → {compute['batch_size']} (" in capsys.readouterr().err


# --------------------------------------------------------------------------- XLA for the act-max step


def test_maximize_xla_on_compiles_the_step_records_it_and_auto_stays_off_on_a_cpu(tiny, capsys):
    cfg = maximize_config(tiny, batch_size=8)
    extract(cfg)
    compute = maximize(cfg)["compute"]
    assert compute["xla"] is False and compute["xla_reason"].startswith("CPU")  # auto, no GPU here
    store = RunStore(cfg.out_dir)
    assert not store.read_table("maximize/conv_b.part.parquet")["xla"].any()

    on = tiny("mx-on", layers=["conv_b"], compute={"xla": "on"},
              maximize={"steps": 4, "units": "all", "clusters": False, "classes": False, "max_seconds": None})
    extract(on)
    assert maximize(on)["compute"]["xla"] is True
    assert RunStore(on.out_dir).read_table("maximize/conv_b.part.parquet")["xla"].all()
    assert "cannot compile" not in capsys.readouterr().err


def test_decide_xla_keeps_it_only_when_it_pays_and_compiles():
    from pipeline.stages.maximize import decide_xla

    assert decide_xla(lambda jit: 1.0 if jit else 2.0)[0] is True
    use, why = decide_xla(lambda jit: 1.0 if jit else 1.02)
    assert use is False and why.startswith("XLA not faster")

    def no_kernel(jit):
        if jit:
            raise RuntimeError("Detected unsupported operations: PyFunc\nmore")
        return 1.0

    use, why = decide_xla(no_kernel)
    assert use is False and why == "XLA cannot compile the step: Detected unsupported operations: PyFunc"


def test_patience_tries_one_more_doubling_after_a_small_gain():
    from pipeline.backend.autobatch import search

    rates = {8: 100.0, 16: 103.0, 32: 125.0, 64: 120.0, 128: 130.0}  # items/s: noisy at 16, best at 32
    choice = search(lambda size: size / rates[size], start=8, cap=128, patience=1, max_seconds=None)
    assert choice.size == 32 and [t.size for t in choice.trials] == [8, 16, 32, 64]  # 64 is slower: stop
    assert search(lambda size: size / rates[size], start=8, cap=128, max_seconds=None).size == 8  # no patience
    last = search(lambda size: size / rates[size], start=8, cap=16, patience=1, max_seconds=None)
    assert last.size == 8 and last.reason == "16: +3 % throughput, stopped"  # spared, but no size left
    falling = {8: 100.0, 16: 90.0, 32: 200.0}
    assert search(lambda size: size / falling[size], start=8, cap=32, patience=1, max_seconds=None).size == 8
