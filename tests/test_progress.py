"""The one progress helper of the long jobs (jobs/progress.py): lines in logs, tqdm on a terminal."""
import io

from jobs.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_few_seconds_with_rate_and_eta():
    clock, log = Clock(), io.StringIO()
    with Progress(1000, unit="rows", label="scoring", every_s=10, stream=log, clock=clock) as progress:
        for _ in range(9):  # 100 rows a second, 9 seconds: no line yet
            clock.now += 1
            progress.update(100)
        assert log.getvalue() == ""
        clock.now += 1
        progress.update(100)  # 10 s: the first line
        clock.now += 1
        progress.update(50)
    lines = log.getvalue().splitlines()
    assert lines[0] == "scoring: 1000/1000 rows (100%)  100 rows/s  ETA 0s"
    assert lines[1] == "scoring: 1050/1000 rows (105%)  95.5 rows/s  ETA 0s"  # the closing line: the last count


def test_eta_is_what_is_left_at_the_rate_so_far():
    clock, log = Clock(), io.StringIO()
    progress = Progress(10_000, unit="images", every_s=5, stream=log, clock=clock)
    clock.now += 5
    progress.update(1000)
    assert log.getvalue() == "1000/10000 images (10%)  200 images/s  ETA 45s\n"
    progress = Progress(None, unit="runs", stream=io.StringIO(), clock=clock)
    progress.update(3)
    assert progress.line().startswith("3 runs  ") and "ETA" not in progress.line()  # an unknown total


def test_quiet_prints_nothing():
    clock, log = Clock(), io.StringIO()
    with Progress(10, quiet=True, every_s=0, stream=log, clock=clock) as progress:
        clock.now += 1
        progress.update(5)
    assert log.getvalue() == ""
    terminal = Terminal()
    with Progress(10, quiet=True, stream=terminal) as progress:
        progress.update(5)
    assert terminal.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    terminal = Terminal()
    with Progress(10, unit="rows", label="scoring", stream=terminal) as progress:
        progress.update(4)
        progress.update(6)
    assert "scoring" in terminal.getvalue() and "10/10" in terminal.getvalue()
    assert "\r" in terminal.getvalue()  # redrawn in place, not a line per update


def test_durations_read_easily():
    assert [format_seconds(s) for s in (7.2, 185, 7380)] == ["7s", "3m05s", "2h03m"]


def test_a_line_per_step_when_asked_and_no_repeat_at_the_end():
    clock, log = Clock(), io.StringIO()
    with Progress(2, unit="runs", label="eval", every_s=0, stream=log, clock=clock) as progress:
        for _ in range(2):
            clock.now += 60
            progress.update()
    assert log.getvalue().splitlines() == ["eval: 1/2 runs (50%)  0.0167 runs/s  ETA 1m00s",
                                           "eval: 2/2 runs (100%)  0.0167 runs/s  ETA 0s"]
