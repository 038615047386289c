"""The one MLP every learning rule trains, and its saved initialisation.

``MLP(sizes)`` is ``Linear → ReLU → … → Linear`` (e.g. 784→256→128→10, the essay's
network). :func:`make_init` draws the initial weights from a seeded generator
(PyTorch's default ``Linear`` scheme, U(±1/√fan_in), but with an explicit
generator so the draw does not depend on global RNG state); :func:`save_init` /
:func:`load_init` store it as safetensors so that every rule starts from the very
same file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["MLP", "batches", "ensure_init", "load_init", "make_init", "n_batches", "save_init"]


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
