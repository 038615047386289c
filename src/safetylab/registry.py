"""Study registry: name -> module (below the run loop, executors, reports and `threats`, which
import it; studies never do). Modules are imported lazily so that
``safetylab list`` stays fast and a study's heavy imports load only when it runs."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os

from pydantic import ValidationError

from safetylab.errors import UserError, pydantic_one_line
from safetylab.study import Study

# Order is the order of ``safetylab reproduce`` and ``safetylab list``.
REGISTRY: dict[str, str] = {
    "shield": "safetylab.studies.shield",
    "learning-rules": "safetylab.studies.learning_rules",
    "similarity-blindness": "safetylab.studies.similarity_blindness",
    "early-exit": "safetylab.studies.early_exit",
    "eval-awareness": "safetylab.studies.eval_awareness",
    "rare-failure": "safetylab.studies.rare_failure",
    "jailbreak-transfer": "safetylab.studies.jailbreak_transfer",
    "stability": "safetylab.studies.stability",
    "elicitation": "safetylab.studies.elicitation",
    "threat-model": "safetylab.studies.threat_model",
}


def _registry() -> dict[str, str]:
    """Built-in studies, then your own: any installed package can add studies under the
    entry-point group ``safetylab.studies`` (name = "pkg.module"), and
    ``SAFETYLAB_STUDIES="name=pkg.module,..."`` adds them for one shell (worker
    processes inherit it, so pools and local Ray see the same registry)."""
    reg = dict(REGISTRY)
    for ep in importlib.metadata.entry_points(group="safetylab.studies"):
        reg.setdefault(ep.name, ep.value)
    for item in filter(None, (x.strip() for x in os.environ.get("SAFETYLAB_STUDIES", "").split(","))):
        if "=" not in item:
            raise UserError(f"SAFETYLAB_STUDIES entry '{item}' must be name=module.path")
        name, mod = item.split("=", 1)
        reg[name.strip()] = mod.strip()
    return reg


def available() -> list[str]:
    """Registered studies whose module is present in this install."""
    out = []
    for name, mod in _registry().items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # its parent package is not installed
            found = False
        if found:
            out.append(name)
    return out


def get_study(name: str) -> Study:
    names = available()
    if name not in names:
        raise UserError(f"unknown study '{name}'; choose one of: {', '.join(names)} (see 'safetylab list')")
    try:
        module = importlib.import_module(_registry()[name])
    except ValidationError as exc:  # e.g. a THREAT_MODEL naming a tier, population or asset the taxonomy lacks
        raise UserError(pydantic_one_line(exc, where=f"study '{name}' ({_registry()[name]})")) from None
    return module.STUDY
