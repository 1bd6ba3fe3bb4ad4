"""The run directory's catalog (pipeline/storage/catalog.py): every artifact named once, read and
written by name, and the stages declaring what they make."""
import re
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from pipeline.config import STAGES
from pipeline.errors import UserError
from pipeline.stages import all_stages
from pipeline.storage import catalog
from pipeline.storage.catalog import ARTIFACTS, Catalog
from pipeline.storage.store import RunStore

PACKAGE = Path(pipeline.__file__).parent


def test_only_the_catalog_spells_an_artifact_path():
    """A path like "dataset.parquet" written out anywhere else would drift from the catalog."""
    # Bare words ("probes") and a model's file name ("model.keras", also the demo's cached model) are
    # too common to tell apart from other uses.
    spelled = {a.path for a in ARTIFACTS if ("." in a.path or "/" in a.path) and a.kind != "file"}
    found = []
    for source in PACKAGE.rglob("*.py"):
        if source.name == "catalog.py" and source.parent.name == "storage":
            continue
        for line_no, line in enumerate(source.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for literal in re.findall(r"[\"']([^\"']+)[\"']", code):
                if literal in spelled:
                    found.append(f"{source.relative_to(PACKAGE)}:{line_no}: {literal}")
    assert found == []


def test_every_stage_declares_catalog_outputs_that_it_makes():
    stages = all_stages()
    assert [s.name for s in stages] == list(STAGES)
    for stage in stages:
        assert stage.outputs, stage.name
        for name in stage.outputs:
            assert catalog.artifact(name).stage == stage.name, (stage.name, name)


def test_every_artifact_is_made_by_a_known_stage_or_the_runner():
    # compare: its registry; remedy: the files it adds to a remedied model's run directory
    assert {a.stage for a in ARTIFACTS} <= set(STAGES) | {"runner", "compare", "remedy"}
    assert len({a.name for a in ARTIFACTS}) == len(ARTIFACTS)
    assert len({a.path for a in ARTIFACTS}) == len(ARTIFACTS)


def test_tables_json_and_folders_round_trip_by_name(tmp_path):
    cat = Catalog(RunStore(tmp_path))
    table = pd.DataFrame({"layer": ["conv1", "conv1"], "cluster": [0, 1]})
    cat.write("cluster_summary", table)
    cat.write("manifest", {"stages": {"cluster": {"status": "done", "summary": {"layers": 1}}}})
    cat.write("probe_images", {"examples.png": b"\x89PNG", "index.parquet": b"x"})

    pd.testing.assert_frame_equal(cat.read("cluster_summary"), table)
    assert (tmp_path / "cluster_summary.parquet").exists()
    assert cat.summary("cluster") == {"layers": 1}
    assert cat.summary("embed") == {}
    assert (tmp_path / "probes" / "examples.png").read_bytes() == b"\x89PNG"
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    cat.write("probe_images", {"examples.png": b"new"})  # a folder is replaced whole
    assert sorted(p.name for p in (tmp_path / "probes").iterdir()) == ["examples.png"]
    assert cat.read("clusters") is None


def test_a_missing_artifact_names_the_stage_to_run(tmp_path):
    cat = Catalog(RunStore(tmp_path))
    with pytest.raises(UserError, match=r"no clusters.parquet yet: run the cluster stage first"):
        cat.require("clusters")


def test_load_run_offers_every_table_of_the_catalog(tmp_path):
    cat = Catalog(RunStore(tmp_path))
    cat.write("manifest", {"stages": {}})
    cat.write("probe_clusters", pd.DataFrame({"layer": ["a"], "cluster": [0], "probe": ["hue"]}))
    run = pipeline.load_run(tmp_path)
    for name in catalog.TABLES:
        getattr(run, name)  # every table is an attribute (None until its stage ran)
    assert run.probe_clusters["probe"].tolist() == ["hue"]
    assert run.clusters is None


def test_stages_and_analysis_never_touch_files_themselves():
    """Stages receive and return data; streaming ones write through ctx.store / ctx.catalog only."""
    forbidden = re.compile(r"(?<![\w.])open\(|\.write_text\(|\.mkdir\(|zarr\.open|os\.replace|shutil\."
                           r"|(?<!store)(?<!catalog)\.write_bytes\(|\.to_parquet\((?!index|buf)")
    found = []
    for package in ("stages", "analysis", "shortcuts"):
        for source in (PACKAGE / package).rglob("*.py"):
            for line_no, line in enumerate(source.read_text().splitlines(), 1):
                if forbidden.search(line.split("#", 1)[0]):
                    found.append(f"{source.relative_to(PACKAGE)}:{line_no}: {line.strip()}")
    assert found == []
