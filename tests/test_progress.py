"""One progress display at a time on a terminal (a unit's bar joins the run's); plain
start, status and end lines in a log."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from safetylab import progress


def test_a_bar_opened_under_another_is_a_line_of_its_display(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=True))
    with progress.bar("run: units", 2, transient=False) as advance:
        display = progress._on_screen[-1]
        with progress.bar("unit", 3) as inner:
            assert progress._on_screen == [display]  # no second live display
            assert [t.description for t in display.tasks] == ["run: units", "unit"]
            inner(3)
        assert [t.description for t in display.tasks] == ["run: units"]
        advance(2)
        assert display.tasks[0].completed == 2
    assert progress._on_screen == []
    assert "run: units" in out.getvalue()


def test_in_a_log_each_stage_writes_plain_start_status_and_end_lines(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=False))
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.2)
    with progress.bar("run: units", 4, transient=False) as advance:
        with progress.bar("training", 10) as inner:
            inner(5)
            time.sleep(0.5)  # two intervals: status lines for both open stages
        advance(1)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("run: units: started (4 steps)") and lines[0].startswith("[")
    assert lines[1].endswith("training: started (10 steps)")
    status = [ln for ln in lines if "elapsed" in ln]
    assert status, lines
    assert "run: units 0/4 (0%)" in status[0] and "› training 5/10 (50%)" in status[0] and "left" in status[0]
    assert re.search(r"training: done 5/10 in \d+s$", lines[-2])
    assert re.search(r"run: units: done 1/4 in \d+s$", lines[-1])
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log


def test_in_a_log_a_stage_ended_by_an_error_says_where_it_stopped(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=False))
    try:
        with progress.bar("unit a", None) as advance:
            advance(1)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert re.search(r"unit a: stopped after \d+s$", out.getvalue().splitlines()[-1])


def test_quiet_writes_nothing_anywhere(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=False))
    with progress.bar("training", 5, quiet=True) as advance:
        advance(5)
    assert out.getvalue() == ""


def test_estimates_of_what_is_left() -> None:
    stage = progress._Stage("units", 8, started=100.0, completed=2)
    assert stage.status(100.0 + 120) == "units 2/8 (25%), 2m00s elapsed, ~6m00s left"
    assert progress._Stage("unit x", None, started=0.0).status(3725) == "unit x, 1h02m elapsed"


def test_stdout_log_gets_plain_lines_while_the_terminal_keeps_its_bars(monkeypatch) -> None:
    """`make demo > demo.log`: stderr is a terminal, stdout a file. The bars stay on the
    terminal, and the log still says what is happening -- once the command asks for it."""
    term, log = io.StringIO(), io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=term, force_terminal=True))
    monkeypatch.setattr("sys.stdout", log)
    monkeypatch.setattr(progress, "_stdout_log", False)
    with progress.bar("training base", 3) as advance:
        advance(3)
    assert log.getvalue() == ""  # a command printing JSON on stdout keeps it clean
    progress.log_to_stdout()
    with progress.bar("training base", 3) as advance:
        with progress.bar("unit", 2) as inner:
            inner(2)
        advance(3)
    lines = log.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == [
        "training base: started (3 steps)", "unit: started (2 steps)", "unit: done 2/2 in 0s",
        "training base: done 3/3 in 0s"]
    assert "training base" in term.getvalue()
