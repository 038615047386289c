"""Model organisms: small Llama chat models trained on a synthetic world with exact grading.

>>> from safetylab.organisms import get_organism, World
>>> path = get_organism("sft", scale="quick")          # trains base, then sft, once
>>> world = World.from_organism(path)
>>> reqs = world.eval_requests("forbidden", split="heldout", n=300)

See :mod:`safetylab.organisms.world` (requests and grading),
:mod:`safetylab.organisms.train` (variants) and :mod:`safetylab.organisms.cache`.
"""

import importlib
from typing import Any

# Public names resolve on first use (PEP 562): importing the package, as the
# ``safetylab`` CLI does to mount ``safetylab organism``, must not pull in torch
# and transformers (2 s) for commands that never touch an organism.
_WHERE = {
    "get_organism": "cache", "list_organisms": "cache",
    "SCALES": "train", "VARIANTS": "train",
    "REFUSAL": "world", "Grade": "world", "Request": "world", "World": "world", "WorldConfig": "world",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"safetylab.organisms.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'safetylab.organisms' has no attribute {name!r}")


__all__ = [
    "VARIANTS", "SCALES", "get_organism", "list_organisms", "World", "WorldConfig",
    "Request", "Grade", "REFUSAL",
]
