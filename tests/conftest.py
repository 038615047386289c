"""Suite-wide set-up that must hold the same with or without pytest-xdist workers.

``make test`` runs the suite on two workers (``-n 2 --dist loadfile``: a module's fixtures
stay in one process). Two things would otherwise go wrong across workers:

- The tiny organisms (``organism_fixtures.tiny_organism``) would be trained once per worker.
  The controller makes one cache folder before the workers start and names it in
  ``$SAFETYLAB_TEST_TINY_CACHE``; the workers inherit it, and the cache's per-entry file lock
  makes the first worker to need an organism train it while the other waits. The controller
  removes the folder when the session ends.
- Each worker's torch would spin one thread per core, so two workers oversubscribe the machine
  (tiny models on spinning OpenMP threads run many times slower): a worker takes its share.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

TINY_CACHE_ENV = "SAFETYLAB_TEST_TINY_CACHE"
_OWNED = pytest.StashKey[str]()  # the folder this process made, and so removes


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if os.environ.get("PYTEST_XDIST_WORKER") and workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(workers)))
        return
    if os.environ.get(TINY_CACHE_ENV):  # set by the caller: theirs to keep
        return
    path = tempfile.mkdtemp(prefix="safetylab-tiny-organisms-")
    os.environ[TINY_CACHE_ENV] = path
    config.stash[_OWNED] = path


def pytest_unconfigure(config) -> None:
    path = config.stash.get(_OWNED, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(TINY_CACHE_ENV, None)
