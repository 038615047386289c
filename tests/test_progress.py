"""One progress display at a time: a unit's bar joins the run's, and transient bars stay
out of logs."""

from __future__ import annotations

import io

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


def test_transient_bars_draw_nothing_into_a_log(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=out, force_terminal=False))
    with progress.bar("training", 5) as advance:
        advance(5)
    assert out.getvalue() == ""
    with progress.bar("units", 1, transient=False) as advance:  # a lasting bar still prints its final state
        advance(1)
    assert "units" in out.getvalue() and "1/1" in out.getvalue()
