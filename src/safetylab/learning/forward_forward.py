"""The forward-forward algorithm: two forward passes, a local goodness objective per layer.

Hinton (2022), "The Forward-Forward Algorithm: Some Preliminary Investigations",
Sec. 3.3 (supervised FF). The label is written into the input (the first
``n_classes`` features are replaced by a one-hot code, as Hinton does with the
first 10 MNIST pixels). Each hidden layer is trained on its own to make its
*goodness* ``g = mean_j a_j²`` high for positive data (true label) and low for
negative data (a random wrong label):

    L_l = softplus(−(g_pos − θ)) + softplus(g_neg − θ)

The input to each next layer is the previous activity normalised to unit length
per example (so only its direction is passed on), and gradients never cross
layers. Classification: the label whose embedding gives the largest goodness
summed over hidden layers. The shared MLP's output layer is then fitted as a
softmax readout of the (normalised) last hidden layer under a neutral label
(0.1 everywhere), Hinton's "one pass" alternative; :func:`hidden` reports
activity under that neutral label.

Accuracy bar: with the default :class:`Hyperparams`, the shared MLP 64→64→32→10 on
scikit-learn digits reaches **≥ 0.80** test accuracy by goodness (tested).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from safetylab.data import VisionData
from safetylab.learning.mlp import MLP, batches, fit, to_tensors

ACCURACY_BAR_DIGITS = 0.80


class Hyperparams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-2, gt=0)
    """Adam learning rate for every layer's local loss."""
    threshold: float = Field(2.0, gt=0)
    """Goodness threshold θ."""
    readout_epochs: int = Field(20, ge=0)
    """Epochs of the softmax readout fitted on top (0 = leave the output layer at its init)."""


def embed_label(x: torch.Tensor, labels: torch.Tensor | float, n_classes: int) -> torch.Tensor:
    """Replace the first ``n_classes`` features by a one-hot label (or a constant, for neutral)."""
    out = x.clone()
    if isinstance(labels, float):
        out[:, :n_classes] = labels
    else:
        out[:, :n_classes] = torch.nn.functional.one_hot(labels, n_classes).to(x.dtype)
    return out


def _layer_inputs(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Activities ``[a_1, ..., a_{L-1}]``, each layer fed the unit-normalised previous one."""
    acts, h = [], x
    for layer in model.layers[:-1]:
        a = torch.relu(layer(h))
        acts.append(a)
        h = a / (a.norm(dim=1, keepdim=True) + 1e-8)  # pass on direction only (Hinton 2022, Sec. 2.1)
    return acts


def _goodness(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).mean(dim=1)


def train(
    model: MLP,
    data: VisionData,
    *,
    seed: int,
    hp: Hyperparams | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train ``model`` in place; ``seed`` fixes data order and negative labels.

    ``on_step(step, total_steps)`` is called after every update of the hidden layers (step
    counts from 1; the softmax readout is fitted after the last one), with ``model``
    holding the current weights.
    """
    hp = hp or Hyperparams()
    n_classes = model.sizes[-1]
    if model.sizes[0] < n_classes:
        raise ValueError(f"forward-forward embeds the label in the first {n_classes} inputs; input width {model.sizes[0]} is too small")
    rng = np.random.default_rng(seed)

    def step(xb: torch.Tensor, yb: torch.Tensor, rng: np.random.Generator) -> float:
        wrong = (yb + torch.as_tensor(rng.integers(1, n_classes, size=len(yb)))) % n_classes  # negative labels
        h_pos, h_neg = embed_label(xb, yb, n_classes), embed_label(xb, wrong, n_classes)
        loss = torch.zeros(())
        for layer in model.layers[:-1]:
            a_pos, a_neg = torch.relu(layer(h_pos)), torch.relu(layer(h_neg))
            loss = loss + (
                torch.nn.functional.softplus(hp.threshold - _goodness(a_pos))
                + torch.nn.functional.softplus(_goodness(a_neg) - hp.threshold)
            ).mean()
            # detach: each layer learns from its own objective only (no backward pass across layers)
            h_pos = (a_pos / (a_pos.norm(dim=1, keepdim=True) + 1e-8)).detach()
            h_neg = (a_neg / (a_neg.norm(dim=1, keepdim=True) + 1e-8)).detach()
        loss.backward()
        return float(loss.detach())

    hidden_params = [p for layer in model.layers[:-1] for p in layer.parameters()]
    log = fit(model, data, step, hp, rng=rng, params=hidden_params, on_step=on_step)
    x, y = to_tensors(data.x_train, data.y_train)
    _fit_readout(model, x, y, hp, rng)
    return log


def _fit_readout(model: MLP, x: torch.Tensor, y: torch.Tensor, hp: Hyperparams, rng: np.random.Generator) -> None:
    with torch.no_grad():
        a = _layer_inputs(model, embed_label(x, 0.1, model.sizes[-1]))[-1]
        feats = a / (a.norm(dim=1, keepdim=True) + 1e-8)
    out = model.layers[-1]
    opt = torch.optim.Adam(out.parameters(), lr=1e-2)
    for _ in range(hp.readout_epochs):
        for idx in batches(len(y), hp.batch_size, rng):
            loss = torch.nn.functional.cross_entropy(out(feats[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def predict(model: MLP, x: np.ndarray) -> np.ndarray:
    """Label with the highest goodness summed over hidden layers, ``(n,)``."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    n_classes = model.sizes[-1]
    scores = torch.stack(
        [
            sum(_goodness(a) for a in _layer_inputs(model, embed_label(xt, torch.full((len(xt),), c), n_classes)))
            for c in range(n_classes)
        ],
        dim=1,
    )  # (n, n_classes)
    return scores.argmax(dim=1).numpy()


@torch.no_grad()
def hidden(model: MLP, x: np.ndarray) -> list[np.ndarray]:
    """Hidden activity under the neutral label (0.1 in every label slot)."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return [a.numpy() for a in _layer_inputs(model, embed_label(xt, 0.1, model.sizes[-1]))]
