"""Direct feedback alignment: the output error goes straight to every hidden layer.

Nøkland (2016), "Direct Feedback Alignment Provides Learning in Deep Neural
Networks", NeurIPS. Each hidden layer l receives ``e B_l`` through its own fixed
random matrix ``B_l`` of shape ``(n_out, h_l)`` (drawn once from ``seed``):

    e   = softmax(z_L) − onehot(y)
    δ_l = (e B_l) ⊙ relu'(z_l)          (Nøkland Eq. 3)
    ΔW_l ∝ −δ_lᵀ a_{l-1};  the output layer uses e itself.

Accuracy bar: with the default :class:`Hyperparams`, the shared MLP 64→64→32→10 on
scikit-learn digits reaches **≥ 0.90** test accuracy (tested).
"""

from __future__ import annotations

import math

from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from safetylab.data import VisionData
from safetylab.learning.mlp import MLP, fit

ACCURACY_BAR_DIGITS = 0.90


class Hyperparams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate applied to the DFA updates."""


def feedback_matrices(model: MLP, seed: int) -> list[torch.Tensor]:
    """Fixed random ``B_l`` of shape ``(n_out, h_l)`` for each hidden layer, U(±1/√n_out)."""
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    n_out = model.sizes[-1]
    bound = 1.0 / math.sqrt(n_out)
    return [torch.rand((n_out, h), generator=gen) * 2 * bound - bound for h in model.sizes[1:-1]]


@torch.no_grad()
def dfa_gradients(model: MLP, feedback: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Write DFA pseudo-gradients into ``.grad``; return the batch loss."""
    pres, acts = model.forward_all(x)
    loss = float(torch.nn.functional.cross_entropy(pres[-1], y))
    e = torch.softmax(pres[-1], dim=1)
    e[torch.arange(len(y)), y] -= 1.0
    e /= len(y)  # (batch, n_out)
    for l, layer in enumerate(model.layers):
        delta = e if l == len(model.layers) - 1 else (e @ feedback[l]) * (pres[l] > 0)
        layer.weight.grad = delta.T @ acts[l]
        layer.bias.grad = delta.sum(0)
    return loss


def train(
    model: MLP,
    data: VisionData,
    *,
    seed: int,
    hp: Hyperparams | None = None,
    feedback_seed: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train ``model`` in place; ``seed`` fixes the data order (and the feedback matrices
    unless ``feedback_seed`` is given: the fixed random ``B`` are part of the network's
    initialisation, so a study that varies only the data order fixes them).

    ``on_step(step, total_steps)`` is called after every update (step counts from 1), with
    ``model`` holding the current weights.
    """
    hp = hp or Hyperparams()
    feedback = feedback_matrices(model, seed if feedback_seed is None else feedback_seed)

    def step(xb: torch.Tensor, yb: torch.Tensor, rng: np.random.Generator) -> float:
        return dfa_gradients(model, feedback, xb, yb)

    return fit(model, data, step, hp, rng=np.random.default_rng(seed), on_step=on_step)


def predict(model: MLP, x: np.ndarray) -> np.ndarray:
    return model.predict(x)


def hidden(model: MLP, x: np.ndarray) -> list[np.ndarray]:
    return model.hidden(x)
