"""The Dask engine gives the local engine's arrays and tables, bit for bit, even when a worker dies.

Two-process clusters, one thread per worker, as the tool starts them; each worker imports
TensorFlow (about 8 s) the first time it extracts.
"""
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr

import zoo
from pipeline.cli import main
from pipeline.config import make_config
from pipeline.errors import UserError

TABLES = ["dataset.parquet", "skipped.csv", "clusters.parquet", "cluster_summary.parquet", "layers.parquet",
          "embeddings/images.parquet", "embeddings/neurons.parquet", "embeddings/quality.parquet"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask")
    zoo.image_folder(tmp / "images", per_class=40, size=48)  # 120 images: above embed.max_fit = 100
    return tmp, zoo.save(zoo.slow_model(), tmp / "m", "keras")  # a kill lands while shards still run


def write_config(tmp, model, name, **extra):
    """``<name>.yaml`` for run ``tmp/<name>``: 4-image shards, a small t-SNE fit, a short bootstrap."""
    return zoo.write_config(tmp, model, tmp / "images", out=name, file=f"{name}.yaml",
                            **{"extract": {"batch_size": 4, "chunk_rows": 4, "spatial_samples": 2},
                               "embed": {"methods": ["tsne"], "max_fit": 100, "pca": 8},
                               "cluster": {"bootstrap": 4}, **extra})


@pytest.fixture(scope="module")
def local_run(assets):
    """The reference: every analysed stage on the local engine."""
    tmp, model = assets
    config = write_config(tmp, model, "local")
    for stage in ("extract", "embed", "cluster"):
        assert main(["run", str(config), "--only", stage]) == 0
    return tmp / "local"


@pytest.fixture(scope="module")
def cluster():
    """A 2-process LocalCluster that the tests join with --scheduler (and may kill workers of)."""
    from distributed import Client, LocalCluster

    from pipeline.engines.cluster import WORKER_ENV

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, env=dict(WORKER_ENV),
                      dashboard_address=None) as cl, Client(cl) as client:
        yield cl, client


def array_keys(group, prefix=""):
    keys = []
    for name, member in group.members():
        keys += array_keys(member, f"{prefix}{name}/") if isinstance(member, zarr.Group) else [prefix + name]
    return sorted(keys)


def assert_same_arrays(a, b):
    ga, gb = (zarr.open_group(str(run / "activations.zarr"), mode="r") for run in (a, b))
    keys = array_keys(ga)
    assert keys == array_keys(gb) and "logits" in keys and "thumbnails" in keys
    for key in keys:
        x, y = ga[key], gb[key]
        assert x.chunks == y.chunks, key
        x, y = x[:], y[:]
        assert x.dtype == y.dtype and np.array_equal(x, y), key
    assert dict(ga.attrs) == dict(gb.attrs)


def assert_same_tables(a, b, names=TABLES):
    for name in names:
        read = (lambda p: pd.read_csv(p, keep_default_na=False)) if name.endswith(".csv") else pd.read_parquet
        x, y = read(a / name), read(b / name)
        if name == "dataset.parquet":
            assert len(x) == 120
        assert x.equals(y), name


# --------------------------------------------------------------------------- engine = same results


def test_workers_flag_starts_a_cluster_whose_arrays_are_the_local_ones(assets, local_run):
    tmp, model = assets
    config = write_config(tmp, model, "workers")
    assert main(["run", str(config), "--only", "extract", "--workers", "2"]) == 0
    assert_same_arrays(local_run, tmp / "workers")
    assert not (tmp / "workers" / "extract.shards").exists()
    assert not (tmp / "workers" / "extract.progress.json").exists()


def test_every_dask_stage_gives_the_local_tables(assets, local_run, cluster):
    tmp, model = assets
    _, client = cluster
    config = write_config(tmp, model, "joined", engine="dask", scheduler=client.scheduler.address)
    for stage in ("extract", "embed", "cluster"):  # embed places 20 of 120 images on the workers
        assert main(["run", str(config), "--only", stage]) == 0
    assert_same_arrays(local_run, tmp / "joined")
    assert_same_tables(local_run, tmp / "joined")


def test_row_blocks_merge_partial_statistics_into_the_sequential_result(tmp_path, cluster):
    """Many blocks per pass (17 rows each): merged in row order, bit for bit the local stream."""
    from pipeline.engines.cluster import RowBlocks
    from pipeline.analysis.layerstats import cka_matrix
    from pipeline.analysis.neurons import (NeuronClusterer, bootstrap_stability, cluster_summary,
                                  correlation_streaming, unit_summary)
    from pipeline.storage.arrays import chunker

    _, client = cluster
    rng = np.random.default_rng(0)
    n, labels = 150, rng.integers(-1, 3, 150)
    base = rng.gamma(2.0, size=(n, 3))
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    a = root.create_array("a", shape=(n, 12), chunks=(40, 12), dtype="float32")
    a[:] = np.repeat(base, 4, axis=1) * rng.uniform(0.5, 2, 12) + rng.normal(0, 0.1, (n, 12))
    a[5, 11] = np.nan  # a dead unit
    b = root.create_array("b", shape=(n, 5), chunks=(40, 5), dtype="float32")
    b[:] = base[:, :1] @ rng.normal(size=(1, 5)) + rng.normal(0, 0.5, (n, 5))
    local, remote = chunker(a, rows=17), RowBlocks(client, a, rows=17)

    corr, stats = correlation_streaming(local)
    corr_d, stats_d = correlation_streaming(remote)
    assert np.array_equal(corr, corr_d, equal_nan=True)
    assert all(np.array_equal(stats[k], stats_d[k], equal_nan=True) for k in stats)
    assert unit_summary(local, labels, top_k=5).equals(unit_summary(remote, labels, top_k=5))
    clusterer = NeuronClusterer(n_clusters=3, random_state=0).fit(corr)
    assert cluster_summary(local, corr, clusterer.labels_, stats, image_labels=labels).equals(
        cluster_summary(remote, corr, clusterer.labels_, stats, image_labels=labels))
    s1 = bootstrap_stability(local, clusterer, n, n_boot=5, random_state=0, max_bytes=2 * 8 * 12 * 12)
    s2 = bootstrap_stability(remote, clusterer, n, n_boot=5, random_state=0)
    assert np.array_equal(s1.jaccard, s2.jaccard) and np.array_equal(s1.ari, s2.ari)
    assert np.array_equal(cka_matrix(chunker([a, b], rows=17)), cka_matrix(RowBlocks(client, [a, b], rows=17)))


def test_partial_accumulators_merge_exactly():
    """The merges the Dask engine relies on, without Dask: per-chunk states merged in order."""
    from pipeline.analysis.layerstats import StreamingCKA
    from pipeline.analysis.neurons import StreamingMoments, _TopK

    rng = np.random.default_rng(1)
    x = rng.normal(5, 2, (97, 6)).astype(np.float32)
    x[:, 2] = np.round(x[:, 2])  # ties for the top-k
    x[40, 1] = np.inf
    parts = np.array_split(np.arange(97), 5)
    seq, merged = StreamingMoments(), StreamingMoments()
    top_seq, top_merged = _TopK(4), _TopK(4)
    for rows in parts:
        seq.partial_fit(x[rows])
        merged.merge(StreamingMoments().partial_fit(x[rows]))
        top_seq.update(x[rows].astype(np.float64), rows[0])
        part = _TopK(4)
        part.update(x[rows].astype(np.float64), rows[0])
        top_merged.merge(part)
    assert np.array_equal(seq.correlation(), merged.correlation(), equal_nan=True)
    assert all(np.array_equal(v, merged.summary()[k], equal_nan=True) for k, v in seq.summary().items())
    assert top_seq.indices() == top_merged.indices()

    y = [x[:, :3].astype(np.float64), x[:, 3:] ** 2]
    cka_seq, first = StreamingCKA(), StreamingCKA().partial_fit([a[parts[0]] for a in y])
    cka_merged = StreamingCKA().merge(first)
    for rows in parts:
        cka_seq.partial_fit([a[rows] for a in y])
    for rows in parts[1:]:
        cka_merged.merge(first.empty_like().partial_fit([a[rows] for a in y]))
    assert np.array_equal(cka_seq.cka(), cka_merged.cka(), equal_nan=True)
    with pytest.raises(ValueError, match="same layer widths and shift"):
        cka_merged.merge(StreamingCKA().partial_fit([a[parts[1]] for a in y]))


# --------------------------------------------------------------------------- config and flags


def test_engine_keys_are_checked():
    base = {"model": "m.keras", "data": {"images": "x"}}
    assert make_config({**base, "engine": "dask", "workers": 2}).workers == 2
    with pytest.raises(UserError, match="config key 'workers' needs engine: dask"):
        make_config({**base, "workers": 2})
    with pytest.raises(UserError, match="'workers' and 'scheduler' exclude each other"):
        make_config({**base, "engine": "dask", "workers": 2, "scheduler": "tcp://h:8786"})
    with pytest.raises(UserError, match="unknown config key 'worker' \\(did you mean 'workers'\\?\\)"):
        make_config({**base, "worker": 2})
    with pytest.raises(UserError, match="config key 'engine'"):
        make_config({**base, "engine": "spark"})


def test_engine_flags_override_the_config(tmp_path):
    from pipeline.cli import _config_from, _parser

    config = zoo.write_config(tmp_path, "m.keras", "x", out=None, engine="dask", workers=3)

    def cfg(*flags):
        return _config_from(_parser().parse_args(["cluster", str(config), *flags]))

    assert (cfg().engine, cfg().workers) == ("dask", 3)
    assert (cfg("--engine", "local").engine, cfg("--engine", "local").workers) == ("local", None)
    joined = cfg("--scheduler", "tcp://10.0.0.1:8786")
    assert (joined.engine, joined.scheduler, joined.workers) == ("dask", "tcp://10.0.0.1:8786", None)
    assert cfg("--workers", "2").workers == 2
    with pytest.raises(UserError, match="--scheduler and --workers exclude each other"):
        cfg("--workers", "2", "--scheduler", "tcp://h:1")


def test_an_unreachable_scheduler_is_one_clear_error(capsys, assets):
    import dask

    tmp, model = assets
    config = write_config(tmp, model, "nowhere")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["run", str(config), "--only", "extract", "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "error: cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err


# --------------------------------------------------------------------------- failures


def shards_done(run_dir):
    folder = run_dir / "extract.shards"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def test_a_killed_client_resumes_without_redoing_finished_shards(assets, local_run, cluster):
    tmp, model = assets
    _, client = cluster
    config = write_config(tmp, model, "resumed", engine="dask", scheduler=client.scheduler.address,
                          extract={"batch_size": 4, "chunk_rows": 4, "spatial_samples": 2})
    run_dir = tmp / "resumed"
    proc = zoo.start_cli("run", config, "--only", "extract", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and shards_done(run_dir) < 3 and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    done = shards_done(run_dir)
    assert 3 <= done < 30, f"{done} shards done when the client was killed"
    time.sleep(1.0)  # shards already running finish and write their markers
    partial = run_dir / "activations.zarr.partial" / "c1" / "mean"
    stamps = {p.relative_to(partial): p.stat().st_mtime_ns for p in partial.rglob("*") if p.is_file()
              and p.name != "zarr.json"}

    assert main(["run", str(config), "--only", "extract"]) == 0
    published = run_dir / "activations.zarr" / "c1" / "mean"
    kept = [name for name, t in stamps.items() if (published / name).stat().st_mtime_ns == t]
    assert len(kept) >= done, "finished shards were rewritten"
    assert_same_arrays(local_run, run_dir)


def test_killing_a_worker_mid_run_still_gives_the_local_arrays(assets, local_run, cluster):
    tmp, model = assets
    _, client = cluster
    config = write_config(tmp, model, "killed", engine="dask", scheduler=client.scheduler.address,
                          extract={"batch_size": 4, "chunk_rows": 4, "spatial_samples": 2})
    run_dir = tmp / "killed"
    pids = client.run(os.getpid)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(code=main(["run", str(config), "--only", "extract"])))
    thread.start()
    deadline = time.time() + 120
    busy = {}
    while thread.is_alive() and time.time() < deadline:
        busy = {w: tasks for w, tasks in client.processing().items() if tasks}
        if shards_done(run_dir) >= 2 and busy:
            break
        time.sleep(0.005)
    assert busy and thread.is_alive(), "the run ended before a worker could be killed"
    victim = next(iter(busy))
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = shards_done(run_dir)
    thread.join(300)
    assert outcome.get("code") == 0
    assert killed_at < 30, "the kill came after every chunk group was done"
    assert not psutil.pid_exists(pids[victim])
    assert_same_arrays(local_run, run_dir)
