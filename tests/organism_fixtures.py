"""Tiny organisms shared by the organism tests: trained once per test session.

Imported by ``tests/test_organisms_*.py`` (not a conftest, so other areas' fixtures are
untouched). Training uses one torch thread: tiny models gain nothing from more, and on
an oversubscribed machine two spinning OpenMP threads are many times slower.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from safetylab.organisms import get_organism

TINY_N_EVAL = 60


@functools.cache
def tiny_cache_dir() -> Path:
    """This test session's organism cache: the one ``conftest.py`` made for every xdist worker
    (``$SAFETYLAB_TEST_TINY_CACHE``), else a fresh one for this process, removed when it exits."""
    if shared := os.environ.get("SAFETYLAB_TEST_TINY_CACHE"):
        return Path(shared)
    path = Path(tempfile.mkdtemp(prefix="safetylab-tiny-organisms-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_organism(variant: str) -> Path:
    """Train (once per process) and return the tiny organism of ``variant``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return get_organism(variant, "tiny", cache_dir=tiny_cache_dir(), seed=0)
    finally:
        torch.set_num_threads(old)


@functools.cache
def tiny_eval(variant: str) -> dict:
    """Graded metrics of a tiny organism on held-out templates (cached per process)."""
    from safetylab.organisms.evaluate import evaluate_organism

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_organism(tiny_organism(variant), n=TINY_N_EVAL)["metrics"]
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Every organism test runs torch on one thread (import this fixture by name)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_tiny_study(study, overrides: dict, tmp: Path):
    """``(config, ctx, records, analysis)`` of ``study`` at quick scale with ``overrides``, on this
    session's tiny organisms: prepare, every unit in order, then the analysis (one torch thread)."""
    import json

    from safetylab.study import Context, torch_threads

    (tmp / "cache").mkdir()
    (tmp / "cache" / "organisms").symlink_to(tiny_cache_dir(), target_is_directory=True)
    with torch_threads(1):
        config = study.resolve_config("quick", overrides)
        ctx = Context(run_dir=tmp, seed=0, cache_dir=tmp / "cache")
        study.prepare(config, ctx)
        records = []
        for unit in study.units(config):
            result = study.run_unit(config, unit, ctx)
            records.append({"key": unit.key, "params": unit.params, "result": json.loads(json.dumps(result))})
    return config, ctx, records, study.analyze(config, records)
