"""Study registry: name -> module. Modules are imported lazily so that
``safetylab list`` stays fast and a study's heavy imports load only when it runs."""

from __future__ import annotations

import importlib

from safetylab.errors import UserError
from safetylab.study import Study

# Order is the order of ``safetylab reproduce`` and ``safetylab list``.
REGISTRY: dict[str, str] = {
    "shield": "safetylab.studies.shield",
    "learning-rules": "safetylab.studies.learning_rules",
    "similarity-blindness": "safetylab.studies.similarity_blindness",
    "early-exit": "safetylab.studies.early_exit",
}


def available() -> list[str]:
    """Registered studies whose module is present in this install."""
    out = []
    for name, mod in REGISTRY.items():
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out


def get_study(name: str) -> Study:
    names = available()
    if name not in names:
        raise UserError(f"unknown study '{name}'; choose one of: {', '.join(names)} (see 'safetylab list')")
    module = importlib.import_module(REGISTRY[name])
    return module.STUDY
