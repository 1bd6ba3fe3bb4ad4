"""A bad-input corpus: what an attacker or a careless user does, and what the pipeline must do.

Every case ends in exit 0 or a one-line ``error:``; no traceback, nothing written outside the
run and report folders, no file of the user's changed or lost.
"""
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import zoo
from zoo import run_cli
from pipeline import load_run
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.storage.rundir import LOCK, hold, locked


def one_line_error(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    return len(lines) >= 1 and lines[-1].startswith("error:") and "Traceback" not in stderr


def snapshot(folder):
    """Every file under ``folder`` with its bytes: compare before/after to prove nothing changed."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    zoo.image_folder(root / "images", per_class=3)
    model = zoo.save(zoo.sequential(), root / "model", "keras")
    return root, model


# The report beside the run, so a test can check that nothing was written anywhere else.
write_config = functools.partial(zoo.write_config, name="hostile", report_out="report")


# --------------------------------------------------------------------------- trust is never inherited


def lambda_model(path):
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    return zoo.save(keras.Model(inp, out), path, "keras")


def test_trust_given_once_is_not_read_back_from_the_run_directory(tmp_path, setup, capsys):
    root, _ = setup
    model = lambda_model(tmp_path / "lam")
    run = tmp_path / "run"
    assert main(["run", "--model", model, "--images", str(root / "images"), "--out", str(run),
                 "--only", "extract", "--trust-model"]) == 0
    assert load_run(run).manifest["config"]["trust_model"] is True  # recorded, for the record only
    capsys.readouterr()

    # Someone else (or the same user, later) reruns from the folder: the Lambda model is refused.
    assert main(["extract", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    assert "Lambda layer 'double'" in err and "--trust-model" in err
    assert main(["extract", str(run), "--force", "--trust-model"]) == 0


# --------------------------------------------------------------------------- one writer per run directory


def test_a_second_writer_is_refused_naming_the_holder_and_status_still_works(tmp_path, setup, capsys):
    root, model = setup
    path = write_config(tmp_path, model, root / "images")
    assert main(["run", str(path), "--only", "extract"]) == 0
    capsys.readouterr()
    with hold(tmp_path / "run"):
        result = run_cli("run", str(path), "--force", "--only", "extract")
        assert result.returncode == 2 and one_line_error(result.stderr), result.stderr
        assert f"in use by process {os.getpid()}" in result.stderr
        assert main(["status", str(tmp_path / "run")]) == 0
        out = capsys.readouterr().out
        assert f"in use by process {os.getpid()}" in out and "extract   done" in out
    assert not locked(tmp_path / "run")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pipeline.storage.rundir import hold
        with hold({str(run)!r}):
            print("held", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert locked(run)
        with pytest.raises(UserError, match=f"in use by process {child.pid}"):
            with hold(run):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run / LOCK).exists() and not locked(run)  # the kernel dropped the flock with the process
    with hold(run):
        pass


def test_two_runs_at_once_one_wins_and_the_store_is_complete(tmp_path, setup):
    root, model = setup
    path = write_config(tmp_path, model, root / "images", extract={"batch_size": 2, "chunk_rows": 2})
    procs = [zoo.start_cli("run", path, "--only", "extract", stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # Both may succeed one after the other (the second then finds it up to date); never both at once.
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert one_line_error(err) and "in use by process" in err
    run = load_run(tmp_path / "run")
    assert run.manifest["stages"]["extract"]["status"] == "done"
    assert len(run.dataset) == 9
    for layer in run.layer_names:
        assert run.activations(layer)[:].shape[0] == 9
    assert not list((tmp_path / "run").rglob("*.partial"))


# --------------------------------------------------------------------------- other people's folders


def users_folder(folder):
    """A folder of the user's own work, with names the pipeline also uses."""
    (folder / "probes").mkdir(parents=True)
    (folder / "probes" / "notes.txt").write_text("my notes")
    (folder / "activations.zarr").mkdir()
    (folder / "activations.zarr" / "thesis.tex").write_text("\\begin{document}")
    (folder / "skipped.csv").write_text("mine\n")
    return snapshot(folder)


def test_out_pointing_at_a_users_folder_is_refused_and_nothing_changes(tmp_path, setup, capsys):
    root, model = setup
    before = users_folder(tmp_path / "work")
    assert main(["run", "--model", model, "--images", str(root / "images"), "--out", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "not written by this tool" in err, err
    assert snapshot(tmp_path / "work") == before
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["activations.zarr", "probes", "skipped.csv"]


def test_an_empty_folder_is_fine_as_out(tmp_path, setup, capsys):
    root, model = setup
    (tmp_path / "empty").mkdir()
    assert main(["run", "--model", model, "--images", str(root / "images"), "--out", str(tmp_path / "empty"),
                 "--only", "extract"]) == 0


def test_report_out_never_deletes_a_users_partial_folder(tmp_path, setup, capsys):
    root, model = setup
    path = write_config(tmp_path, model, root / "images", report={"out": str(tmp_path / "docs")})
    assert main(["run", str(path), "--only", "extract"]) == 0
    assert main(["cluster", str(path)]) == 0
    (tmp_path / "docs.partial").mkdir()
    (tmp_path / "docs.partial" / "draft.md").write_text("my draft")
    capsys.readouterr()
    assert main(["report", str(path)]) == 2
    assert "docs.partial exists and was not made by this tool" in capsys.readouterr().err
    assert (tmp_path / "docs.partial" / "draft.md").read_text() == "my draft"
    assert not (tmp_path / "docs").exists()

    (tmp_path / "docs.partial" / "draft.md").unlink()
    (tmp_path / "docs.partial").rmdir()
    assert main(["report", str(path)]) == 0
    assert (tmp_path / "docs" / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".docs", "docs"))) == ["docs"]


def test_export_out_refuses_a_users_folder(tmp_path, setup, capsys):
    root, model = setup
    path = write_config(tmp_path, model, root / "images")
    assert main(["run", str(path), "--only", "extract"]) == 0
    before = users_folder(tmp_path / "mine")
    layer = load_run(tmp_path / "run").layer_names[0]
    capsys.readouterr()
    assert main(["export", "projector", str(tmp_path / "run"), "--layer", layer, "--out", str(tmp_path / "mine")]) == 2
    assert "not written by `pipeline export`" in capsys.readouterr().err
    assert snapshot(tmp_path / "mine") == before
    assert main(["export", "projector", str(tmp_path / "run"), "--layer", layer, "--out", str(tmp_path / "proj")]) == 0
    assert main(["export", "projector", str(tmp_path / "run"), "--layer", layer, "--out", str(tmp_path / "proj")]) == 0
    assert (tmp_path / "proj" / "tensors.tsv").exists()


# --------------------------------------------------------------------------- random configs (property-based)

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.config import Config, load_config, make_config, parse_scale  # noqa: E402

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "all", "1/0", "nan", "-1", "top:0", "top:-3", "1e9", "../..", "/"]),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3))


def section_of(model_cls):
    keys = list(model_cls.model_fields) + ["bogus_key"]
    return st.dictionaries(st.sampled_from(keys), ANY_VALUE, max_size=4)


RANDOM_CONFIG = st.fixed_dictionaries(
    {"model": st.just("m.keras"), "data": st.fixed_dictionaries({"images": st.just("imgs")}).flatmap(
        lambda d: section_of(Config.model_fields["data"].annotation).map(lambda extra: {**d, **extra}))},
    optional={name: (section_of(f.annotation) if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")
                     else ANY_VALUE)
              for name, f in Config.model_fields.items() if name not in ("model", "data")})


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(RANDOM_CONFIG)
def test_any_config_is_accepted_within_bounds_or_refused_in_one_line(raw):
    try:
        cfg = make_config(raw)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # Whatever is accepted is safe to run: bounded sizes, valid seeds, a usable pixel scale.
    assert 0 <= cfg.seed < 2**32
    assert 1 <= cfg.extract.batch_size <= 8192 and cfg.extract.chunk_rows <= 1 << 20
    assert cfg.data.limit is None or cfg.data.limit >= 1
    assert cfg.cluster.n_clusters == "auto" or cfg.cluster.n_clusters >= 2
    assert cfg.maximize.size <= 8192 and cfg.maximize.batch_size <= 4096
    assert cfg.data.size == "auto" or all(1 <= s <= 8192 for s in cfg.data.size)
    a, b = parse_scale(cfg.data.scale)
    assert a != 0 and abs(a) < float("inf") and abs(b) < float("inf")
    assert "/" not in cfg.name and cfg.name not in (".", "..")


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_yaml_text_is_a_config_or_a_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except UserError as exc:
        assert "\n" not in str(exc).strip()


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: m\xff.keras\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(path)


def test_a_batch_size_larger_than_the_dataset_is_not_padded_up_to(tmp_path, setup, monkeypatch):
    """``extract.batch_size: 8192`` with 9 images runs one batch of 9, not 8192 rows of padding."""
    import pipeline.extraction.plan as extract  # where the extract stage builds its forward pass

    root, model = setup
    seen = []

    def recording(*args, **kwargs):
        forward = make_forward(*args, **kwargs)

        def run(pixels, *rest):
            seen.append(len(pixels))
            return forward(pixels, *rest)
        return run

    make_forward = extract.make_forward
    monkeypatch.setattr(extract, "make_forward", recording)
    path = write_config(tmp_path, model, root / "images", extract={"batch_size": 8192})
    assert main(["run", str(path), "--only", "extract"]) == 0
    assert set(seen) == {9}  # every call holds the 9 images (compute.xla auto times the forward once first)
    assert load_run(tmp_path / "run").activations(load_run(tmp_path / "run").layer_names[0])[:].shape[0] == 9


# --------------------------------------------------------------------------- the corpus: bad data, end to end

import zipfile  # noqa: E402

import numpy as np  # noqa: E402
from numpy.lib import format as npy  # noqa: E402
from PIL import Image  # noqa: E402


def crafted_npz(path, shape, dtype="|u1", data=b"", extra=None):
    """An ``.npz`` whose ``x`` header declares ``shape`` (whatever the data really holds)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            npy.write_array_header_1_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
            member.write(data)
        for name, array in (extra or {}).items():
            with archive.open(f"{name}.npy", "w") as member:
                npy.write_array(member, np.asarray(array))
    return path


def pngs(folder, n, colour=(90, 120, 200)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 20), tuple((c + 17 * i) % 256 for c in colour)).save(folder / f"{i}.png")


def case_npz_bomb(user):
    """656 KB-style file declaring one 15000×15000×3 image."""
    return {"npz": str(crafted_npz(user / "bomb.npz", (1, 15000, 15000, 3), data=bytes(4096)))}


def case_npz_terabytes(user):
    return {"npz": str(crafted_npz(user / "tb.npz", (30_000_000_000, 10, 10, 1), data=bytes(1000)))}


def case_npz_sparse_labels(user):
    x = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    np.savez(user / "sparse.npz", x=x, y=np.array([0, 1, 3000000] * 3))
    return {"npz": str(user / "sparse.npz")}


def case_non_utf8_name(user):
    for name in ("a", "b"):
        pngs(user / "imgs" / name, 3)
    Image.new("RGB", (20, 20)).save(os.fsdecode(bytes(user / "imgs" / "a") + b"/bad\xff.png"))
    return {"images": str(user / "imgs")}


def case_empty_class_folder(user):
    pngs(user / "imgs" / "a", 3)
    (user / "imgs" / "b").mkdir()
    pngs(user / "imgs" / "c", 3, colour=(10, 200, 40))
    return {"images": str(user / "imgs")}


def case_symlinks_out_and_to_root(user):
    pngs(user / "imgs" / "a", 3)
    pngs(user / "private", 2, colour=(250, 0, 0))
    (user / "imgs" / "b").symlink_to(user / "private", target_is_directory=True)
    (user / "imgs" / "root").symlink_to("/", target_is_directory=True)
    (user / "imgs" / "a" / "secret.png").symlink_to(user / "private" / "0.png")
    return {"images": str(user / "imgs")}


# Each case and how it must end: 2 = refused in one line before any work, 0 = analysed with the bad
# parts recorded in skipped.csv (the reason given) and a report that builds.
CORPUS = {case_npz_bomb: (2, "possible decompression bomb"), case_npz_terabytes: (2, "TiB"),
          case_npz_sparse_labels: (0, None), case_non_utf8_name: (0, "file name is not valid UTF-8"),
          case_empty_class_folder: (0, None), case_symlinks_out_and_to_root: (0, "symlink leads outside the image folder")}


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.__name__[5:])
def test_bad_data_ends_in_a_report_or_one_line_and_touches_nothing_of_the_user(tmp_path, setup, capsys, case):
    _, model = setup
    user = tmp_path / "user"
    user.mkdir()
    data = case(user)
    before = snapshot(user)
    path = write_config(tmp_path, model, None, data=data, layers=["conv_a", "conv_b"])
    codes = []
    for stage in ("extract", "cluster", "report"):
        codes.append(main([stage, str(path)]))
        if codes[-1]:
            break
    err = capsys.readouterr().err
    code, reason = CORPUS[case]
    assert codes[-1] == code and "internal error" not in err and "Traceback" not in err, err
    if code == 2:
        assert [l for l in err.splitlines() if l.startswith("error:")] == [err.strip().splitlines()[-1]]
        assert reason in err
    elif reason:
        assert reason in " ".join(load_run(tmp_path / "run").skipped["reason"])
    assert snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) in (["c.yaml", "user"], ["c.yaml", "report", "run", "user"],
                                                         ["c.yaml", "run", "user"])
    if codes[-1] == 0:
        run = load_run(tmp_path / "run")
        used = " ".join(run.dataset["path"].astype(str))
        assert "private" not in used and "secret" not in used  # nothing from outside the folder
        size = sum(p.stat().st_size for p in (tmp_path / "report").rglob("*") if p.is_file())
        assert size < 5e6


# --------------------------------------------------------------------------- random .npz headers (property-based)

NPZ_DTYPES = ["|u1", "|u1", "<f4", "<f8", "<i8", "|b1", ">u2", "<c8", "<U3", "|V8", "|O", "<M8[s]"]


@st.composite
def npz_files(draw):
    if draw(st.booleans()):  # a plausible image stack: (N, H, W[, C]) with small sizes
        shape = tuple(draw(st.tuples(st.integers(0, 6), st.integers(1, 12), st.integers(1, 12))))
        shape += tuple(draw(st.sampled_from([(), (1,), (3,), (4,), (2,)])))
    else:
        dims = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**45)),
                                    min_size=dims, max_size=dims)))
    y = draw(st.one_of(st.none(), st.lists(st.integers(-3, 2**40), min_size=0, max_size=12)))
    dtype = draw(st.sampled_from(NPZ_DTYPES))
    declared = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    if declared <= 20000 and draw(st.booleans()):  # half the small ones are honest files
        return shape, dtype, draw(st.binary(min_size=declared, max_size=declared)), y
    return shape, dtype, draw(st.binary(max_size=3000)), y


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(npz_files())
def test_any_npz_header_is_used_or_refused_in_one_line_with_flat_memory(tmp_path_factory, spec):
    import tracemalloc

    from pipeline.config import DataConfig
    from pipeline.inputs.dataset import build_dataset, pixel_loader

    shape, dtype, data, y = spec
    extra = {} if y is None else {"y": np.array(y, dtype=np.int64)}
    path = crafted_npz(tmp_path_factory.mktemp("npz") / "x.npz", shape, dtype, data, extra)
    cfg = DataConfig(npz=str(path))
    tracemalloc.start()
    try:
        dataset, _, _ = build_dataset(cfg, (8, 8), 3, seed=0)
        load = pixel_loader(cfg, dataset, (8, 8), 3)
        for start in range(0, len(dataset), 4):
            assert load(np.arange(start, min(start + 4, len(dataset)))).shape[1:] == (8, 8, 3)
        event("used")
    except UserError as exc:
        event("refused")
        assert str(exc) and "\n" not in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 32 << 20  # whatever the header declares, memory follows the file, not the claim


# --------------------------------------------------------------------------- the corpus: hostile models


def model_writing_a_file(user):
    """A SavedModel whose forward pass writes the images it sees to a file of the attacker's choice."""
    import tensorflow as tf

    module = tf.Module()
    target = str(user / "loot.txt")

    def forward(x):
        tf.io.write_file(target, tf.strings.as_string(tf.reduce_sum(x)))
        return tf.reduce_mean(x, axis=[1, 2])

    module.forward = tf.function(forward, input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
    tf.saved_model.save(module, str(user / "sm"), signatures=module.forward)
    return str(user / "sm"), "WriteFile"


def keras_file_from_another_package(user, setup_model):
    """A .keras file whose layer claims a module that merely starts with 'keras'."""
    import json

    src, dst = zipfile.ZipFile(setup_model), zipfile.ZipFile(user / "evil.keras", "w")
    with src, dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][0]["module"] = "kerasevil.layers"
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return str(user / "evil.keras"), "kerasevil.layers"


@pytest.mark.parametrize("make", [model_writing_a_file, keras_file_from_another_package],
                         ids=["savedmodel_writes_files", "module_prefix"])
def test_hostile_models_are_refused_before_anything_runs_or_is_written(tmp_path, setup, capsys, make):
    root, model = setup
    user = tmp_path / "user"
    user.mkdir()
    path, named = make(user) if make is model_writing_a_file else make(user, model)
    before = snapshot(user)
    for argv in (["layers", path], ["run", "--model", path, "--images", str(root / "images"),
                                   "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and named in err and "--trust-model" in err, err
    assert snapshot(user) == before and not (user / "loot.txt").exists()
    assert not (tmp_path / "run").exists()
