"""Feedback alignment: errors travel backwards through fixed random matrices.

Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback weights
support error backpropagation for deep learning", Nat. Commun. 7:13276. The
backward pass is backprop's with ``W_{l+1}ᵀ`` replaced by a fixed random ``B_{l+1}``
(drawn once from ``seed``, same scale as the forward init):

    δ_L = softmax(z_L) − onehot(y)
    δ_l = (δ_{l+1} B_{l+1}) ⊙ relu'(z_l)
    ΔW_l ∝ −δ_lᵀ a_{l-1}

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
    """Adam learning rate applied to the feedback-alignment updates."""


def feedback_matrices(model: MLP, seed: int) -> list[torch.Tensor]:
    """Fixed random ``B_l`` with the shape of ``W_l`` for l = 2..L, U(±1/√fan_in)."""
    gen = torch.Generator().manual_seed(int(seed) + 7919)  # offset: independent of the init draw
    out = []
    for layer in model.layers[1:]:
        bound = 1.0 / math.sqrt(layer.in_features)
        out.append(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
    return out


@torch.no_grad()
def fa_gradients(model: MLP, feedback: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Write feedback-alignment pseudo-gradients into ``.grad``; return the batch loss."""
    pres, acts = model.forward_all(x)
    probs = torch.softmax(pres[-1], dim=1)
    loss = float(torch.nn.functional.cross_entropy(pres[-1], y))
    delta = probs.clone()
    delta[torch.arange(len(y)), y] -= 1.0
    delta /= len(y)  # (batch, n_out): dLoss/dz_L for mean cross-entropy
    for l in range(len(model.layers) - 1, -1, -1):
        layer = model.layers[l]
        layer.weight.grad = delta.T @ acts[l]
        layer.bias.grad = delta.sum(0)
        if l > 0:
            delta = (delta @ feedback[l - 1]) * (pres[l - 1] > 0)  # B instead of Wᵀ (Lillicrap et al. Eq. 2)
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
        return fa_gradients(model, feedback, xb, yb)

    return fit(model, data, step, hp, rng=np.random.default_rng(seed), on_step=on_step)


def predict(model: MLP, x: np.ndarray) -> np.ndarray:
    return model.predict(x)


def hidden(model: MLP, x: np.ndarray) -> list[np.ndarray]:
    return model.hidden(x)
