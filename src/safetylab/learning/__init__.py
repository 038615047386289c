"""Learning rules that train one shared MLP (``learning.mlp``) from one saved initialisation.

Each rule is one module with ``Hyperparams`` (defaults tuned for scikit-learn digits),
``train(model, data, *, seed, hp=None, on_step=None) -> {"loss": [...]}`` (in place; ``on_step(step,
total_steps)`` is called after every update, for checkpoints),
``predict(model, x) -> labels``, ``hidden(model, x) -> [per-layer activations]`` and
``ACCURACY_BAR_DIGITS``, the test accuracy its docstring promises on digits.
``RULES`` maps names to modules.
"""

from __future__ import annotations

from types import ModuleType

from safetylab.learning import (
    backprop,
    direct_feedback_alignment,
    evolution_strategies,
    feedback_alignment,
    forward_forward,
    predictive_coding,
)
from safetylab.learning.mlp import MLP, ensure_init, load_init, make_init, save_init

RULES: dict[str, ModuleType] = {
    "backprop": backprop,
    "feedback_alignment": feedback_alignment,
    "direct_feedback_alignment": direct_feedback_alignment,
    "evolution_strategies": evolution_strategies,
    "forward_forward": forward_forward,
    "predictive_coding": predictive_coding,
}
"""Learning rules by name."""

__all__ = ["MLP", "RULES", "ensure_init", "get_rule", "load_init", "make_init", "save_init"]


def get_rule(name: str) -> ModuleType:
    """The rule module called ``name``; ValueError listing valid names otherwise."""
    if name not in RULES:
        raise ValueError(f"unknown learning rule '{name}'; choose from {list(RULES)}")
    return RULES[name]
