"""Model organisms: small Llama chat models trained on a synthetic world with exact grading.

>>> from safetylab.organisms import get_organism, World
>>> path = get_organism("sft", scale="quick")          # trains base, then sft, once
>>> world = World.from_organism(path)
>>> reqs = world.eval_requests("forbidden", split="heldout", n=300)

See :mod:`safetylab.organisms.world` (requests and grading),
:mod:`safetylab.organisms.train` (variants) and :mod:`safetylab.organisms.cache`.
"""

from safetylab.organisms.cache import get_organism, list_organisms
from safetylab.organisms.train import SCALES, VARIANTS
from safetylab.organisms.world import REFUSAL, Grade, Request, World, WorldConfig

__all__ = [
    "VARIANTS", "SCALES", "get_organism", "list_organisms", "World", "WorldConfig",
    "Request", "Grade", "REFUSAL",
]
