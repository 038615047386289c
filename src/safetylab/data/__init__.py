"""Datasets that studies train on: bundled or generated locally, or read from local files.

``load_dataset(name, path=None)`` is the one entry point studies use:

* ``"digits"`` — scikit-learn's 8×8 digits (no download);
* ``"mnist1d"`` — MNIST-1D generated on the fly (no download);
* ``"mnist"`` — real MNIST from a local ``path`` (IDX files, ``.npz`` or a Hugging Face
  dataset folder). Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safetylab.data.vision import VisionData, load_digits, load_mnist, make_mnist1d, read_idx

DATASETS = ("digits", "mnist1d", "mnist")

__all__ = ["DATASETS", "VisionData", "load_dataset", "load_digits", "load_mnist", "make_mnist1d", "read_idx"]


def load_dataset(name: str, path: str | Path | None = None, *, seed: int = 0) -> VisionData:
    """Load a dataset by name.

    Args:
        name: one of ``DATASETS``.
        path: local file/folder, required for ``"mnist"``.
        seed: seeds the split (digits) or the generator (MNIST-1D).

    Raises:
        ValueError: for an unknown name, or ``"mnist"`` without a path.
    """
    rng = np.random.default_rng(seed)
    if name == "digits":
        return load_digits(rng=rng)
    if name == "mnist1d":
        return make_mnist1d(rng=rng)
    if name == "mnist":
        if path is None:
            raise ValueError("dataset 'mnist' needs a local path (IDX folder, .npz, or HF dataset folder); tests and quick runs use 'digits'")
        return load_mnist(path)
    raise ValueError(f"unknown dataset '{name}'; choose one of {DATASETS}")
