"""Progress for the whole package: rich bars on a terminal, plain lines in a log.

:func:`bar` is the one entry point; every stage that takes a while (training an organism,
a run's units, one unit) opens one.

On a terminal (stderr is a TTY) there is one display at a time: a bar opened while another
is on screen becomes one more line of that display (a unit's inner progress under the
run's units bar) and is removed when it ends.

In a log (stderr redirected to a file or a pipe) nothing is drawn; instead each stage
writes one plain line when it starts and one when it ends, and while any stage is open
one line about every :data:`LOG_INTERVAL_S` seconds gives every open stage's count,
elapsed time and an estimate of what is left. When only stdout goes to a log
(``make demo > demo.log``) and the command has asked for it (:func:`log_to_stdout`, which
``run``/``reproduce``/``organism train`` do unless they print JSON), the bars stay on the
terminal and the same plain lines go to the log::

    [12:00:03] training base: started (3000 steps)
    [12:01:03] training base: 1210/3000 (40%), 1m00s elapsed, ~1m29s left
    [12:02:32] training base: done 3000/3000 in 2m29s
"""

from __future__ import annotations

import datetime as _dt
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_INTERVAL_S = 60.0
"""Seconds between status lines in a log (the first comes one interval after a stage starts)."""

_console = Console(stderr=True)
_on_screen: list[Progress] = []  # the display bars are added to, when one is live
_screen_streams: list[Any] = []  # the plain-line stream of each live display (None: none)
_stdout_log = False


def log_to_stdout(enabled: bool = True) -> None:
    """Also write plain progress lines to stdout when stdout is not a terminal (a log).
    Commands that print JSON on stdout leave this off."""
    global _stdout_log
    _stdout_log = enabled


def _plain_stream() -> Any:
    """Where plain progress lines go: stderr when it is a log, else stdout when it is a log
    and the command asked for it, else nowhere."""
    if not _console.is_terminal:
        return _console.file
    out = sys.stdout
    if _stdout_log and out is not None and not (hasattr(out, "isatty") and out.isatty()):
        return out
    return None


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
        quiet: bool = False, unit: str = "steps") -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(n=1)``.

    Args:
        description: the bar's label (and the stage's name in a log).
        total: steps to completion (``None``: unknown, an indeterminate bar).
        transient: on a terminal, remove the bar when done (else it stays, showing its
            final state). In a log every stage writes its start and end lines.
        quiet: draw and write nothing (``advance`` does nothing).
        unit: what ``total`` counts, named in a log's start line.
    """
    if quiet:
        yield lambda n=1: None
        return
    # Inside a live display rich swaps sys.stdout for a proxy: nested bars use the log stream
    # the outermost one found.
    stream = _plain_stream() if not _on_screen else _screen_streams[-1]
    if not _console.is_terminal:
        with _log.stage(description, total, stream, unit) as advance:
            yield advance
        return
    with (_log.stage(description, total, stream, unit) if stream is not None else _no_log()) as log_advance:
        if _on_screen:
            display = _on_screen[-1]
            task = display.add_task(description, total=total)
            try:
                yield lambda n=1: (display.advance(task, n), log_advance(n))
            finally:
                display.remove_task(task)
            return
        display = make_progress(transient=transient)
        task = display.add_task(description, total=total)
        display.start()
        _on_screen.append(display)
        _screen_streams.append(stream)
        try:
            yield lambda n=1: (display.advance(task, n), log_advance(n))
        finally:
            _on_screen.pop()
            _screen_streams.pop()
            display.stop()


@contextmanager
def _no_log() -> Iterator[Callable[..., None]]:
    yield lambda n=1: None


# --------------------------------------------------------------------------- logs


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``1h05m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(x: float) -> str:
    """A count as written in a log: ``3``, ``1210``, or one decimal for fractional progress."""
    return f"{round(x, 1):g}"


@dataclass
class _Stage:
    description: str
    total: float | None
    stream: Any = None
    """Where this stage's lines go."""
    started: float = field(default_factory=time.monotonic)
    completed: float = 0.0

    def status(self, now: float) -> str:
        """``units 3/8 (38%), 2m10s elapsed, ~3m37s left``; the estimate assumes the
        remaining steps take as long as the finished ones did on average."""
        elapsed = now - self.started
        parts = [self.description]
        if self.total:
            parts[0] += f" {_count(self.completed)}/{_count(self.total)} ({self.completed / self.total:.0%})"
        text = f"{parts[0]}, {format_duration(elapsed)} elapsed"
        if self.total and 0 < self.completed < self.total:
            text += f", ~{format_duration(elapsed * (self.total - self.completed) / self.completed)} left"
        return text


class _LogLines:
    """Open stages as a stack; a daemon thread writes the status line while any is open."""

    def __init__(self) -> None:
        self._stages: list[_Stage] = []
        self._lock = threading.Lock()
        self._last_line = 0.0
        self._ticker: threading.Thread | None = None  # alive while a stage is open, and briefly after
        self._wake = threading.Event()  # a new stage wakes a sleeping ticker (its interval may differ)

    def _write(self, text: str, stream: Any) -> None:
        # Called with the lock held. Plain text, no wrapping: a log line stays one line.
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        stream.write(f"[{stamp}] {text}\n")
        stream.flush()
        self._last_line = time.monotonic()

    @contextmanager
    def stage(self, description: str, total: float | None, stream: Any,
              unit: str = "steps") -> Iterator[Callable[..., None]]:
        stage = _Stage(description, total, stream)
        with self._lock:
            self._stages.append(stage)
            self._write(f"{description}: started" + (f" ({_count(total)} {unit})" if total else ""), stream)
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="safetylab-progress", daemon=True)
                self._ticker.start()
            else:
                self._wake.set()

        def advance(n: float = 1) -> None:
            stage.completed += n

        ok = False
        try:
            yield advance
            ok = True
        finally:
            with self._lock:
                self._stages.remove(stage)
                took = format_duration(time.monotonic() - stage.started)
                count = f" {_count(stage.completed)}/{_count(stage.total)}" if stage.total else ""
                self._write(f"{description}: done{count} in {took}" if ok else
                            f"{description}: stopped{' at' + count if count else ''} after {took}", stream)

    def _tick(self) -> None:
        while True:
            # Wake often enough to keep to the interval, rarely enough to cost nothing.
            self._wake.wait(min(5.0, LOG_INTERVAL_S / 4))
            self._wake.clear()
            with self._lock:
                if not self._stages:
                    self._ticker = None  # under the lock: the next stage starts a new one
                    return
                now = time.monotonic()
                if now - self._last_line >= LOG_INTERVAL_S:
                    self._write(" › ".join(s.status(now) for s in self._stages), self._stages[0].stream)


_log = _LogLines()
