"""Rich progress bars, one style for the whole package, one display at a time.

:func:`bar` is the one entry point. A bar opened while another is on screen becomes one
more line of that display (a unit's inner progress under the run's units bar) and is
removed when it ends. Transient bars are not drawn when stderr is not a terminal, so
logs get the run's summary lines, not blank lines where bars were.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)
_on_screen: list[Progress] = []  # the display bars are added to, when one is live


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=transient,
    )


@contextmanager
def bar(description: str, total: float | None, *, transient: bool = True,
        quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(n=1)``.

    Args:
        description: the bar's label.
        total: steps to completion (``None``: unknown, an indeterminate bar).
        transient: remove the bar when done (else it stays, showing its final state).
        quiet: draw nothing (``advance`` does nothing).
    """
    if quiet or (transient and not _on_screen and not _console.is_terminal):
        yield lambda n=1: None
        return
    if _on_screen:
        display = _on_screen[-1]
        task = display.add_task(description, total=total)
        try:
            yield lambda n=1: display.advance(task, n)
        finally:
            display.remove_task(task)
        return
    display = make_progress(transient=transient)
    task = display.add_task(description, total=total)
    display.start()
    _on_screen.append(display)
    try:
        yield lambda n=1: display.advance(task, n)
    finally:
        _on_screen.pop()
        display.stop()
