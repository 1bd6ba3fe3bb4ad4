"""`plan` and the first lines of `run`: work, time and memory per stage before any work; partial stages."""
import functools

import zoo
from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.orchestration.planning import Plan, StageEstimate, count_images


# Every stage small and the report beside the run; each test adds its maximize section.
write_config = functools.partial(
    zoo.write_config, name="plan", report_out="report", embed={"methods": ["tsne"], "of": ["images"]},
    cluster={"bootstrap": 2}, probe={"probes": ["grayscale"], "bootstrap": 100}, report={"explorer": False})


def test_plan_prints_every_stage_with_time_and_memory_and_cuts_over_budget(tmp_path, capsys):
    zoo.image_folder(tmp_path / "images", per_class=4)
    model = zoo.save(zoo.sequential(), tmp_path / "model", "keras")
    path = write_config(tmp_path, model, tmp_path / "images", maximize={"units": "all", "steps": 5000,
                                                                        "max_seconds": None})
    assert main(["plan", str(path), "--budget", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 12 images, 3 layers")
    for stage in ("extract", "embed", "cluster", "probe", "maximize", "report", "total"):
        assert f"  {stage} " in out
    assert "5000 steps" in out and "over the budget of 0.01 min" in out
    assert "maximize: maximize.units: top:2" in out, "the most expensive stage says what to cut"
    assert not (tmp_path / "run").exists(), "planning does no work and writes nothing"


def test_the_plan_times_the_model_in_the_configured_precision(tmp_path):
    from pipeline.config import load_config
    from pipeline.orchestration.planning import plan_run

    zoo.image_folder(tmp_path / "images", per_class=2)
    model = zoo.save(zoo.sequential(), tmp_path / "model", "keras")
    for precision in ("float32", "mixed_float16"):
        path = write_config(tmp_path, model, tmp_path / "images", compute={"precision": precision})
        plan = plan_run(load_config(path), ["extract"])
        assert plan.header[0].startswith("plan: 6 images")
        assert (" in mixed_float16:" in plan.header[0]) is (precision == "mixed_float16"), plan.header[0]


def test_run_starts_with_the_plan_and_a_time_budget_leaves_maximize_partial(tmp_path, capsys):
    zoo.image_folder(tmp_path / "images", per_class=4)
    model = zoo.save(zoo.sequential(), tmp_path / "model", "keras")
    path = write_config(tmp_path, model, tmp_path / "images",
                        maximize={"units": "all", "steps": 4, "max_seconds": 1e-6, "classes": False})
    assert main(["run", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.index("plan: 12 images") < err.index("extract: running")
    assert "time budget (maximize.max_seconds) reached" in err
    assert main(["status", str(tmp_path / "run")]) == 0
    status = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "partial  (0 of " in status["maximize"] and "rendered)" in status["maximize"]
    assert "done" in status["report"]
    # a rerun with room renders the rest, and the stage is done
    path = write_config(tmp_path, model, tmp_path / "images",
                        maximize={"units": "all", "steps": 4, "max_seconds": None, "classes": False})
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(" done " in line for line in lines), lines


def test_over_budget_lines_name_the_costliest_stages_keys():
    plan = Plan(["plan: test"], [StageEstimate("extract", "a", 10, 1e9, ["data.limit: N"]),
                                 StageEstimate("maximize", "b", 7200, 2e9, ["maximize.units: top:2"])], 60)
    lines = plan.lines()
    total = next(line for line in lines if line.startswith("  total"))
    assert "2.0 h" in total and "1.9 GB peak" in total
    over = lines.index(next(line for line in lines if line.startswith("  over the budget of 60 min")))
    assert lines[over + 1] == "    maximize: maximize.units: top:2", "the costliest stage comes first"


def test_image_count_honours_limit_without_decoding(tmp_path):
    zoo.image_folder(tmp_path / "images", per_class=4)
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")

    data = DataConfig(images=str(tmp_path / "images"))
    n, classes = count_images(data)
    assert classes >= 2 and n == 4 * classes + 1
    data.limit = 5
    assert count_images(data)[0] == 5


def test_a_budget_sizes_batches_so_the_last_one_fits_and_then_stops():
    import time

    from pipeline.stages.maximize import Budget, _batches

    budget = Budget(100.0, first=4)
    batches = _batches(list(range(50)), 16, budget)
    first, size = next(batches)
    assert first == [0, 1, 2, 3] and size == 4, "nothing measured yet: a small first batch"
    budget.record(4, 20.0)                       # 5 s per image
    budget.deadline = time.monotonic() + 42.0    # 42 s left: 8 images fit
    assert len(next(batches)[0]) == 8
    budget.deadline = time.monotonic() + 3.0     # less than one image
    assert next(batches) == ([], 0)
    no_budget = list(_batches(list(range(50)), 16, Budget(None)))
    assert [len(b) for b, _ in no_budget] == [13, 13, 13, 11] and {s for _, s in no_budget} == {13}


def test_layers_render_in_an_order_spread_over_depth():
    from pipeline.stages.maximize import spread_indices

    order = spread_indices(16)
    assert sorted(order) == list(range(16))
    assert order[:3] == [15, 0, 8], "deepest, first, middle"
    assert max(order[:5]) - min(order[:5]) == 15 and len({i // 4 for i in order[:5]}) == 4, "quarters next"


def test_class_images_are_planned_per_model_output_not_per_data_class(tmp_path, capsys):
    """A 10-output head analysed on 3 folders of images renders 10 class images: the plan says so."""
    zoo.image_folder(tmp_path / "images", per_class=2)
    model = zoo.save(zoo.sequential(classes=10), tmp_path / "model", "keras")
    path = write_config(tmp_path, model, tmp_path / "images", maximize={"units": [0], "max_seconds": None})
    assert main(["plan", str(path)]) == 0
    assert "10 classes)" in capsys.readouterr().out
