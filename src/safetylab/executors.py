"""Where units run: in this process, a local process pool, or a Ray cluster.

Every executor yields ``(index, record)`` pairs as units finish; the runner writes
them to ``results.jsonl`` in unit order. Units are deterministic given their key,
so all executors give the same records (timing aside) for the same ``--workers``
(torch's CPU kernels may round differently with a different thread count). Each
unit becomes a record through :func:`safetylab.results.execute_unit`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Iterator

from safetylab.errors import UserError
from safetylab.progress import bar
from safetylab.results import execute_unit
from safetylab.study import Context, Study, StudyConfig, Unit, torch_threads

Record = dict[str, Any]


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _run_in_worker(study_name: str, config_json: str, unit: Unit, ctx: Context, index: int, threads: int) -> Record:
    """Entry point inside a worker process: re-import the study by name (modules,
    not closures, cross process boundaries) and run one unit."""
    from safetylab.registry import get_study

    study = get_study(study_name)
    config = study.config_cls.model_validate_json(config_json)
    # torch's threads and the BLAS/OpenMP pools numpy and scikit-learn use: a worker that
    # left BLAS at one thread per core would oversubscribe the cores the other workers use.
    with torch_threads(study.unit_threads or threads):
        return execute_unit(study, config, unit, ctx, index)


class SerialExecutor:
    """Units one after another in this process (``--workers 1``): progress bars inside
    units are shown, each unit is a stage of its own (a line in the display, or its start
    and end in a log), and nothing is pickled."""

    def map_units(self, study: Study, config: StudyConfig, todo: list[tuple[int, Unit]], ctx: Context) -> Iterator[tuple[int, Record]]:
        for index, unit in todo:
            with torch_threads(study.unit_threads), bar(f"{study.name} unit {unit.key}", None, quiet=ctx.quiet):
                record = execute_unit(study, config, unit, ctx, index)
            yield index, record

    def close(self) -> None:
        pass


class LocalPoolExecutor:
    """A pool of ``workers`` spawned processes, each with cores/workers torch threads."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.threads = _threads_per_worker(workers)
        # spawn, not fork: forking a process that has started torch's thread pool can deadlock.
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))

    def map_units(self, study: Study, config: StudyConfig, todo: list[tuple[int, Unit]], ctx: Context) -> Iterator[tuple[int, Record]]:
        cfg = config.model_dump_json()
        futures = {
            self._pool.submit(_run_in_worker, study.name, cfg, unit, ctx, index, self.threads): index
            for index, unit in todo
        }
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for fut in done:
                yield futures[fut], fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Units as Ray tasks. With no ``address`` a local Ray is started with ``workers`` CPUs."""

    def __init__(self, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(
                "Ray executor requires optional dependencies. Install with: pip install 'safetylab[ray]'"
            ) from None
        self._ray = ray
        self.workers = workers
        self.threads = _threads_per_worker(workers)
        self._started_here = not ray.is_initialized()
        if self._started_here:
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = workers
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise UserError(f"cannot reach a Ray cluster at {address}: {exc}; check --address") from None
        self._remote = ray.remote(num_cpus=1)(_run_in_worker)

    def map_units(self, study: Study, config: StudyConfig, todo: list[tuple[int, Unit]], ctx: Context) -> Iterator[tuple[int, Record]]:
        ray = self._ray
        cfg = config.model_dump_json()
        refs = {self._remote.remote(study.name, cfg, unit, ctx, index, self.threads): index for index, unit in todo}
        remaining = list(refs)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)

    def close(self) -> None:
        if self._started_here:
            self._ray.shutdown()


def make_executor(kind: str, *, workers: int = 1, address: str | None = None):
    if kind == "ray":
        return RayExecutor(workers, address)
    if kind == "local":
        return SerialExecutor() if workers == 1 else LocalPoolExecutor(workers)
    raise UserError(f"unknown executor '{kind}'; use local or ray")
