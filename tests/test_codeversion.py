"""A stage's code version covers every module it imports: an edited helper makes its results stale.

The list is computed from the static import graph (function-level imports included), never kept
by hand, so a stage cannot be marked done after the code it ran on changed.
"""
import textwrap
import uuid

import pytest

from pipeline.codeversion import code_version, imported_modules
from pipeline.config import make_config
from pipeline.orchestration.runner import Runner, Stage


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package: ``stage`` imports ``helper`` inside a function, ``helper`` imports
    ``deep``; ``unrelated`` is imported by nobody; ``pages`` is a sub-package with a template."""
    name = f"fakepkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / name
    (root / "pages" / "templates").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": f"""
            def run(ctx):
                from {name} import helper
                return {{"value": helper.compute()}}
            """,
        "helper.py": f"""
            from {name}.deep import FACTOR
            import {name}.pages.render

            def compute():
                return 2 * FACTOR
            """,
        "deep.py": "FACTOR = 21\n",
        "unrelated.py": "X = 1\n",
        "pages/__init__.py": "",
        "pages/render.py": "TEMPLATE = 'page.html'\n",
        "pages/templates/page.html": "<p>{{ x }}</p>\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return name, root


def test_editing_a_module_imported_inside_a_function_changes_the_version(package):
    name, root = package
    before = code_version(f"{name}.stage")
    (root / "deep.py").write_text("FACTOR = 22\n")  # two imports away, reached through a function body
    assert code_version(f"{name}.stage") != before


def test_editing_a_template_of_an_imported_package_changes_the_version(package):
    name, root = package
    before = code_version(f"{name}.stage")
    (root / "pages" / "templates" / "page.html").write_text("<p>{{ x }}!</p>\n")
    assert code_version(f"{name}.stage") != before


def test_editing_a_module_nobody_imports_changes_nothing(package):
    name, root = package
    before = code_version(f"{name}.stage")
    (root / "unrelated.py").write_text("X = 2\n")
    assert code_version(f"{name}.stage") == before
    assert imported_modules(f"{name}.stage") == {name, f"{name}.stage", f"{name}.helper", f"{name}.deep",
                                                 f"{name}.pages", f"{name}.pages.render"}


def test_a_finished_stage_becomes_stale_when_a_module_it_imports_changes(package, tmp_path):
    import importlib

    name, root = package
    stage_module = importlib.import_module(f"{name}.stage")
    stage = Stage(name="fake", deps=(), params=lambda cfg: {}, outputs=(), run=stage_module.run)
    cfg = make_config({"model": "m.keras", "data": {"images": "imgs"}, "out": str(tmp_path / "run")})
    runner = Runner(cfg, [stage])
    runner.run()
    assert runner.state(stage)[0] == "done"
    (root / "deep.py").write_text("FACTOR = 23\n")
    status, reason = runner.state(stage)
    assert status == "stale" and reason.startswith("code version changed")


@pytest.mark.parametrize("stage, needed", [
    # Modules the old hand-written lists left out (issue 14): editing them left stale results "done".
    ("pipeline.stages.report", {"pipeline.report.values", "pipeline.report"}),
    ("pipeline.stages.probe", {"pipeline.extraction.plan", "pipeline.storage.arrays", "pipeline.shortcuts.probes",
                               "pipeline.shortcuts.verdicts"}),
    ("pipeline.stages.maximize", {"pipeline.storage.arrays", "pipeline.inputs.models", "pipeline.maximize.render",
                                  "pipeline.maximize.objectives"}),
    ("pipeline.stages.extract", {"pipeline.inputs.images", "pipeline.inputs.dataset", "pipeline.inputs.savedmodel",
                                 "pipeline.inputs.graphscan", "pipeline.engines.dask_extract", "pipeline.extraction.loop"}),
])
def test_every_stage_covers_the_modules_it_runs(stage, needed):
    assert needed <= imported_modules(stage)
