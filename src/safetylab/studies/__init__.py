"""The built-in studies, one module each. The registry (name -> module) lives in
:mod:`safetylab.registry`, below the run loop, executors and reports, so that nothing imports
upward into this package; the names below stay importable from here for older code."""

from safetylab.registry import REGISTRY, available, get_study

__all__ = ["REGISTRY", "available", "get_study"]
