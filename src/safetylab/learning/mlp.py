"""The one MLP every learning rule trains, its saved initialisation, and the loop that trains it.

``MLP(sizes)`` is ``Linear → ReLU → … → Linear`` (e.g. 784→256→128→10, the essay's
network). :func:`make_init` draws the initial weights from a seeded generator
(PyTorch's default ``Linear`` scheme, U(±1/√fan_in), but with an explicit
generator so the draw does not depend on global RNG state); :func:`save_init` /
:func:`load_init` store it as safetensors so that every rule starts from the very
same file. :func:`fit` is the training loop every rule shares: a rule supplies only the step
that writes its (pseudo-)gradient into ``.grad``; minibatch order, Adam, loss bookkeeping and the
``on_step`` checkpoints are the loop's, so two rules differ in their update and nothing else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["MLP", "StepFn", "batches", "ensure_init", "fit", "load_init", "make_init", "n_batches", "save_init"]


class MLP(nn.Module):
    """Fully connected ReLU network; ``sizes = (n_in, h1, ..., n_out)``."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 3 or min(sizes) < 1:
            raise ValueError(f"sizes={sizes} must list input, at least one hidden and an output width, all >= 1")
        self.sizes = sizes
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def n_hidden(self) -> int:
        return len(self.layers) - 1

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-activations ``z_l`` and activations ``a_l`` (``a_0 = x``; last ``z`` = logits)."""
        acts, pres = [x], []
        for i, layer in enumerate(self.layers):
            z = layer(acts[-1])
            pres.append(z)
            if i < len(self.layers) - 1:
                acts.append(torch.relu(z))
        return pres, acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0][-1]  # (batch, n_out) logits

    @torch.no_grad()
    def hidden(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Post-ReLU activations of each hidden layer, ``[(n, h1), (n, h2), ...]``."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return [a.numpy() for a in self.forward_all(xt)[1][1:]]

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Argmax labels, ``(n,)``."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return self(xt).argmax(dim=1).numpy()


def make_init(sizes: Sequence[int], seed: int) -> MLP:
    """A freshly initialised MLP; weights and biases ~ U(±1/√fan_in) from ``seed``."""
    model = MLP(sizes)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in model.layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)
    return model


def save_init(model: MLP, path: str | Path) -> Path:
    """Save weights as safetensors, with the layer sizes in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"sizes": json.dumps(list(model.sizes))})
    tmp.replace(path)  # atomic: parallel workers never read half a file
    return path


def load_init(path: str | Path) -> MLP:
    """Load an MLP saved by :func:`save_init`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ValueError(f"initialisation file {path} does not exist; create it with save_init(make_init(sizes, seed), path)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "sizes" not in meta:
        raise ValueError(f"{path} has no 'sizes' metadata; it was not written by safetylab.learning.save_init")
    model = MLP(json.loads(meta["sizes"]))
    model.load_state_dict(load_file(str(path)))
    return model


def ensure_init(folder: str | Path, sizes: Sequence[int], seed: int) -> Path:
    """Path of the saved initialisation for ``(sizes, seed)``, written once if missing."""
    name = "init_" + "-".join(str(s) for s in sizes) + f"_seed{seed}.safetensors"
    path = Path(folder) / name
    if not path.exists():
        save_init(make_init(sizes, seed), path)
    return path


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of one shuffled epoch (the last batch may be smaller)."""
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def n_batches(n: int, batch_size: int) -> int:
    """Minibatches per epoch of :func:`batches` (the last one may be smaller)."""
    return -(-n // batch_size)


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(x, dtype=np.float32)), torch.as_tensor(np.asarray(y, dtype=np.int64))


StepFn = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], float]
"""A rule's update on one minibatch: ``step(x, y, rng) -> loss``. Writes the rule's gradient (or
pseudo-gradient: the direction Adam should descend) into ``.grad`` of the trained parameters and
returns the minibatch loss (any scalar the rule minimises); ``rng`` is the loop's generator, for a
rule's own randomness drawn in data order (forward-forward's negative labels)."""


def fit(
    model: MLP,
    data: Any,
    step: StepFn,
    hp: Any,
    *,
    rng: np.random.Generator,
    params: Iterable[torch.nn.Parameter] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train ``model`` in place with ``step``'s gradients and Adam (Kingma & Ba 2015).

    The schedule comes from ``hp``: with an ``epochs`` field, every epoch visits the training set
    once in shuffled minibatches of ``hp.batch_size`` (:func:`batches`) and the loss is logged per
    epoch (mean over examples); with a ``steps`` field, each step draws ``hp.batch_size`` examples
    without replacement and the loss is logged per step (evolution strategies). Before each step
    the gradients are cleared; after it Adam (learning rate ``hp.lr``) moves ``params`` (default:
    every parameter of ``model``) and ``on_step(step, total_steps)`` sees the current weights.

    Args:
        model: the network, trained in place.
        data: a :class:`safetylab.data.VisionData` (``x_train`` (n, d), ``y_train`` (n,)).
        step: the rule's update, see :data:`StepFn`.
        hp: the rule's hyperparameters (``lr``, ``batch_size`` and ``epochs`` or ``steps``).
        rng: fixes the data order (and whatever ``step`` draws from it).
        params: the parameters Adam updates (forward-forward: the hidden layers only).
        on_step: called after every update, step counting from 1.

    Returns:
        ``{"loss": [...]}``, per epoch or per step.
    """
    x, y = to_tensors(data.x_train, data.y_train)
    params = list(model.parameters() if params is None else params)
    opt = torch.optim.Adam(params, lr=hp.lr)
    by_steps = "steps" in type(hp).model_fields
    n = len(y)
    total_steps = hp.steps if by_steps else hp.epochs * n_batches(n, hp.batch_size)
    losses: list[float] = []
    done = 0

    def update(idx: np.ndarray | torch.Tensor) -> float:
        nonlocal done
        opt.zero_grad()
        loss = float(step(x[idx], y[idx], rng))
        opt.step()
        done += 1
        if on_step is not None:
            on_step(done, total_steps)
        return loss

    if by_steps:
        for _ in range(hp.steps):
            losses.append(update(torch.as_tensor(rng.choice(n, size=min(hp.batch_size, n), replace=False))))
    else:
        for _ in range(hp.epochs):
            total = sum(update(idx) * len(idx) for idx in batches(n, hp.batch_size, rng))
            losses.append(total / n)
    return {"loss": losses}
