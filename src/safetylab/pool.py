"""One process pool for jobs that wait on each other: organisms on their bases, studies on their organisms.

:func:`run_graph` starts each job as soon as every job it needs has finished, the highest ``rank`` first
among those ready, on ``workers`` spawned processes. ``safetylab reproduce`` puts training and studies in
one such pool: a study whose organisms are cached (or that needs none) fills a core that training would
leave idle, instead of every study waiting for the last organism.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """A call to run in a worker process: ``fn(*args)`` (both picklable: ``fn`` a module-level function)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    needs: frozenset[Hashable] = field(default_factory=frozenset)
    """Keys of the jobs that must finish first (keys that are not jobs here count as done)."""
    rank: tuple[Any, ...] = ()
    """Among ready jobs, the higher rank starts first."""


def run_graph(jobs: dict[Hashable, Job], workers: int,
              on_done: Callable[[Hashable, Any], None] | None = None,
              on_error: Callable[[Hashable, BaseException, int], None] | None = None) -> dict[Hashable, Any]:
    """Run every job once, each after the jobs it needs, ``workers`` at a time.

    When a job raises, no further job starts; the ones already running finish (their work is not lost,
    and ``on_done`` still hears of each), and then the first error is raised.

    Args:
        jobs: the jobs by key.
        workers: processes at a time (at least 1).
        on_done: called in this process with (key, result) as each job finishes.
        on_error: called at once with (key, error, jobs still running) when a job raises, before the wait.

    Returns:
        Each job's result by key.

    Raises:
        ValueError: some jobs can never start (they need each other).
        The first error a job raised.
    """
    waiting = {k: j.needs & jobs.keys() for k, j in jobs.items()}
    blocked = _unreachable(waiting)
    if blocked:
        raise ValueError(f"jobs that need each other can never start: {sorted(map(str, blocked))}")
    results: dict[Hashable, Any] = {}
    todo = dict(jobs)
    running: dict[cf.Future[Any], Hashable] = {}
    error: BaseException | None = None
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        while (todo and error is None) or running:
            if error is None:
                unfinished = todo.keys() | set(running.values())
                ready = sorted((k for k in todo if not waiting[k] & unfinished), key=lambda k: todo[k].rank,
                               reverse=True)
                for k in ready[: max(1, workers) - len(running)]:
                    job = todo.pop(k)
                    running[pool.submit(job.fn, *job.args)] = k
            try:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            except BaseException:  # Ctrl-C while waiting: leave now (the workers got the signal too)
                for f in running:
                    f.cancel()
                raise
            for f in done:
                k = running.pop(f)
                exc = f.exception()
                if exc is not None:
                    if on_error is not None:
                        on_error(k, exc, len(running))
                    error = error or exc
                    continue
                results[k] = f.result()
                if on_done is not None:
                    on_done(k, results[k])
    if error is not None:
        raise error
    return results


def _unreachable(waiting: dict[Hashable, set[Hashable]]) -> set[Hashable]:
    """The keys that never become ready: those on or behind a cycle of needs."""
    done: set[Hashable] = set()
    while True:
        ready = {k for k, needs in waiting.items() if k not in done and needs <= done}
        if not ready:
            return set(waiting) - done
        done |= ready
