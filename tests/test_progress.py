import io

import pytest

from pipeline.progress import PlainProgress, duration, eta, progress


class FakeClock:
    def __init__(self, step=0.0):
        self.now, self.step = 1000.0, step

    def __call__(self):
        self.now += self.step
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)


def lines(stream):
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("step", [0.001, 0.1, 1.0, 30.0])
def test_plain_mode_writes_few_lines_for_many_updates(step):
    out, clock = Stream(tty=False), FakeClock(step)
    with progress(total=10_000, desc="extract", unit="img", file=out, clock=clock) as bar:
        for _ in range(10_000):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    # >= 10 s apart, at 10 % steps or when a tenth of the elapsed time passed (83 h here: about 70 lines)
    assert 1 <= len(lines(out)) <= 100, len(lines(out))
    assert lines(out)[-1].startswith("extract: 10000/10000 img done in ")


def test_unknown_total_still_few_lines():
    out = Stream(tty=False)
    bar = progress(desc="x", unit="it", file=out, clock=FakeClock(1.0))
    for _ in range(10_000):
        bar.update()
    bar.close()
    assert len(lines(out)) <= 100
    assert lines(out)[-1] == "x: 10000 it done in 2 h 46 min"


def test_final_line_has_total_and_elapsed_time():
    out, clock = Stream(tty=False), FakeClock()
    bar = progress(total=53, desc="cluster", unit="layers", file=out, clock=clock)
    clock.now += 13 * 60 + 20
    bar.update(53)
    bar.close()
    bar.close()  # once only
    assert lines(out) == ["cluster: 53/53 layers done in 13 min 20 s"]


def test_stopped_early_says_so():
    out, clock = Stream(tty=False), FakeClock()
    bar = progress(total=100, desc="maximize", unit="img", file=out, clock=clock)
    clock.now += 5
    bar.update(4)
    bar.close()
    assert lines(out)[-1] == "maximize: stopped at 4/100 img after 5 s"


def test_eta_for_a_linear_run():
    out, clock = Stream(tty=False), FakeClock()
    bar = progress(total=53, desc="cluster", unit="layers", file=out, clock=clock)
    for _ in range(12):  # 12 layers at 15.8 s each: 3 min 10 s; 41 left: about 10 min 48 s
        clock.now += 190 / 12
        bar.update(1)
    assert lines(out) and all(", about " in line and line.endswith(" left") for line in lines(out))
    assert bar.line(clock.now) == "cluster: 12/53 layers, 3 min 10 s elapsed, about 11 min left"
    bar.set_postfix_str("conv2d_3")
    assert bar.line(clock.now).startswith("cluster: 12/53 layers (conv2d_3), ")


def test_eta_counts_only_this_runs_rate_after_a_resume():
    clock = FakeClock()
    bar = PlainProgress(total=100, initial=50, desc="extract", unit="img", file=Stream(False), clock=clock)
    clock.now += 10
    bar.update(10)  # 10 images in 10 s; 40 left
    assert bar.line(clock.now) == "extract: 60/100 img, 10 s elapsed, about 40 s left"


def test_iterating_advances_and_closes():
    out = Stream(tty=False)
    seen = list(progress(["a", "b", "c"], desc="report", unit="pages", file=out, clock=FakeClock(1.0)))
    assert seen == ["a", "b", "c"]
    assert lines(out)[-1].startswith("report: 3/3 pages done in ")


def test_tty_decision_comes_from_the_streams_isatty():
    from tqdm import tqdm

    tty, log = Stream(tty=True), Stream(tty=False)
    bar = progress(total=3, desc="embed", unit="maps", file=tty)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "embed" in tty.getvalue()
    assert isinstance(progress(total=3, file=log), PlainProgress)
    assert isinstance(progress(total=3, file=io.StringIO()), PlainProgress)  # isatty() False


def test_default_stream_is_stderr_at_call_time(capsys):
    with progress(total=2, desc="probe", unit="img") as bar:
        bar.update(2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [line for line in captured.err.splitlines() if line.startswith("probe: ")]
    assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize("value, kind", [("plain", PlainProgress), ("bar", "tqdm"), ("off", PlainProgress)])
def test_environment_variable_overrides(monkeypatch, value, kind):
    from tqdm import tqdm

    monkeypatch.setenv("PIPELINE_PROGRESS", value)
    out = Stream(tty=value == "plain")
    bar = progress(total=2, desc="d", file=out, clock=FakeClock(100.0))
    assert isinstance(bar, tqdm if kind == "tqdm" else kind)
    bar.update(1)
    bar.update(1)
    bar.close()
    if value == "off":
        assert out.getvalue() == ""


def test_durations():
    assert duration(0) == "0 s"
    assert duration(45.4) == "45 s"
    assert duration(190) == "3 min 10 s"
    assert duration(600) == "10 min"
    assert duration(3600 + 5 * 60 + 3) == "1 h 5 min"
    assert eta(0.2) == "1 s"
    assert eta(40) == "40 s"
    assert eta(10 * 60 + 20) == "10 min"
    assert eta(80 * 60) == "1 h 20 min"
