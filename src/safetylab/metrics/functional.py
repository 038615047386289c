"""Functional comparisons of two networks: what they compute, not how their layers look.

Geometric measures (``metrics.similarity``) ask whether two layers have the same
shape; these ask whether the networks behave the same:

* :func:`prediction_agreement` — fraction of inputs on which the predicted labels match;
* :func:`fit_stitch` / :func:`stitching_accuracy` — a linear map from network A's layer
  into network B's layer, followed by B's own remainder (Lenc & Vedaldi 2015;
  Bansal et al. 2021 "Revisiting Model Stitching"); we fit the map by ridge
  regression onto B's activations ("direct matching", Csiszárik et al. 2021), which
  needs no gradients through B;
* :func:`ablation_profile` / :func:`profile_similarity` — the accuracy drop when each
  unit or direction is mean-ablated, compared across networks by Pearson correlation.

A network's *remainder* is any callable ``(n, d) activations -> (n, n_classes)`` logits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.linear_model import Ridge

from safetylab.metrics.similarity import check_paired

Remainder = Callable[[np.ndarray], np.ndarray]
"""The rest of a network after a layer: ``(n, d)`` activations → ``(n, n_classes)`` logits."""

__all__ = [
    "Remainder",
    "ablation_profile",
    "accuracy",
    "fit_stitch",
    "linear_readout",
    "pca_directions",
    "prediction_agreement",
    "profile_similarity",
    "stitching_accuracy",
]


def _labels(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN/inf logits; check the network's outputs")
        return a.argmax(axis=1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be (n,) labels or (n, n_classes) logits, got shape {a.shape}")
    return a


def prediction_agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of inputs on which two networks predict the same label, in [0, 1].

    Args:
        pred_a: ``(n,)`` predicted labels or ``(n, n_classes)`` logits of network A.
        pred_b: the same for network B, on the same inputs in the same order.
    """
    a, b = _labels(pred_a, "pred_a"), _labels(pred_b, "pred_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"pred_a has {a.shape[0]} inputs but pred_b has {b.shape[0]}; pass predictions on the same inputs")
    if a.shape[0] == 0:
        raise ValueError("prediction_agreement needs at least one input, got 0")
    return float(np.mean(a == b))


def accuracy(logits_or_labels: np.ndarray, labels: np.ndarray) -> float:
    """Fraction correct, in [0, 1]."""
    return prediction_agreement(logits_or_labels, labels)


def linear_readout(weight: np.ndarray, bias: np.ndarray) -> Remainder:
    """A remainder that is one affine layer: ``h @ weight.T + bias`` (torch ``Linear`` layout)."""
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)

    def remainder(h: np.ndarray) -> np.ndarray:
        return np.asarray(h, dtype=np.float64) @ w.T + b

    return remainder


def fit_stitch(h_a: np.ndarray, h_b: np.ndarray, *, alpha: float = 1e-3) -> Ridge:
    """Fit a linear stitching map A's layer → B's layer by ridge regression.

    Args:
        h_a: ``(n, d_a)`` activations of network A on the fitting inputs.
        h_b: ``(n, d_b)`` activations of network B on the same inputs.
        alpha: ridge penalty (sklearn ``Ridge(alpha)``), ≥ 0.

    Returns:
        A fitted ``sklearn.linear_model.Ridge``; ``.predict(h_a)`` gives stitched B activations.
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0 (ridge penalty)")
    h_a, h_b = check_paired(h_a, h_b, min_samples=2, measure="fit_stitch", names=("h_a", "h_b"))
    return Ridge(alpha=alpha).fit(h_a, h_b)


def stitching_accuracy(
    stitch: Ridge,
    h_a: np.ndarray,
    remainder_b: Remainder,
    labels: np.ndarray,
) -> float:
    """Accuracy of network B's remainder fed A's stitched activations, in [0, 1].

    Compare with B's own accuracy: a stitch that keeps B's accuracy means A's layer
    carries what B's remainder reads, in a linearly compatible form.

    Args:
        stitch: a map fitted by :func:`fit_stitch`.
        h_a: ``(n, d_a)`` activations of A on evaluation inputs (not those used to fit).
        remainder_b: B's remainder, activations → logits.
        labels: ``(n,)`` true labels (or B's own predictions, to measure fidelity).
    """
    labels = np.asarray(labels)
    h_a, _ = check_paired(h_a, labels.reshape(len(labels), -1).astype(float), measure="stitching_accuracy", names=("h_a", "labels"))
    return accuracy(remainder_b(stitch.predict(h_a)), labels)


def pca_directions(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal directions of ``h``, by decreasing variance.

    Returns:
        ``(directions, variances)``: ``(d, d)`` rows are unit directions; ``(d,)`` variances.
    """
    h, _ = check_paired(h, h, min_samples=2, measure="pca_directions", names=("h", "h"))
    hc = h - h.mean(axis=0)
    _, s, vt = np.linalg.svd(hc, full_matrices=True)
    var = np.zeros(h.shape[1])
    var[: s.size] = s**2 / (h.shape[0] - 1)
    return vt, var


def ablation_profile(
    h: np.ndarray,
    remainder: Remainder,
    labels: np.ndarray,
    directions: np.ndarray | None = None,
) -> np.ndarray:
    """Accuracy drop when each unit (or direction) is mean-ablated, one value per direction.

    Mean ablation replaces the component of ``h`` along a unit direction ``u`` by its
    mean over the inputs: ``h' = h − ((h − μ)·u) uᵀ``. With ``directions=None`` the
    directions are the coordinate axes (single units).

    Args:
        h: ``(n, d)`` activations at the layer.
        remainder: the network after the layer, activations → logits.
        labels: ``(n,)`` labels to score against (true labels, or the unablated
            network's own predictions to measure how much each direction matters).
        directions: ``(k, d)`` directions to ablate (normalised here), or None.

    Returns:
        ``(k,)`` array: accuracy(intact) − accuracy(ablated), in [-1, 1].
    """
    labels = np.asarray(labels)
    h, _ = check_paired(h, labels.reshape(len(labels), -1).astype(float), measure="ablation_profile", names=("h", "labels"))
    dirs = np.eye(h.shape[1]) if directions is None else np.asarray(directions, dtype=np.float64)
    if dirs.ndim != 2 or dirs.shape[1] != h.shape[1]:
        raise ValueError(f"directions must have shape (k, {h.shape[1]}) to match h, got {dirs.shape}")
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("directions contains a zero vector; every direction must be non-zero")
    dirs = dirs / norms
    base = accuracy(remainder(h), labels)
    hc = h - h.mean(axis=0)
    drops = np.empty(dirs.shape[0])
    for i, u in enumerate(dirs):
        ablated = h - np.outer(hc @ u, u)
        drops[i] = base - accuracy(remainder(ablated), labels)
    return drops


def profile_similarity(profile_a: np.ndarray, profile_b: np.ndarray) -> float:
    """Pearson correlation of two ablation profiles, in [-1, 1].

    Degenerate cases, where Pearson is undefined: two constant profiles give 1.0 if
    they are equal (within 1e-12) and 0.0 otherwise; one constant profile gives 0.0
    (the networks do not depend on the same directions).

    Args:
        profile_a: ``(k,)`` accuracy drops of network A, per direction.
        profile_b: ``(k,)`` drops of network B for the corresponding directions.
    """
    a = np.asarray(profile_a, dtype=np.float64).ravel()
    b = np.asarray(profile_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"profile_a has {a.size} entries but profile_b has {b.size}; ablate matching directions")
    if a.size < 2:
        raise ValueError(f"profile_similarity needs at least 2 directions, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("profile_a or profile_b contains NaN/inf")
    sa, sb = a.std(), b.std()
    if sa == 0.0 and sb == 0.0:
        return 1.0 if np.allclose(a, b, atol=1e-12, rtol=0) else 0.0
    if sa == 0.0 or sb == 0.0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
