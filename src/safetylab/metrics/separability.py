"""Class separability of activations: the Fisher ratio of two classes.

The Fisher criterion (Fisher 1936) of a direction ``w`` is the squared distance between the
class means along ``w`` over the pooled within-class variance along it,
``(w . (mu_1 - mu_0))^2 / (w' S_w w)``. Its maximum over all directions, reached at the LDA
direction ``w = S_w^{-1} (mu_1 - mu_0)``, is the squared Mahalanobis distance between the
means, ``delta' S_w^{-1} delta`` (the squared d' of signal detection). It is invariant to any
invertible linear map of the activations, so it compares the separability of two models'
representations however their coordinates differ. With fewer samples than dimensions the
within-class covariance is estimated with Ledoit & Wolf (2004) shrinkage, which keeps it
invertible and the ratio finite.

It is an in-sample quantity: the best direction is fitted on the samples it is scored on, so
with n not far above d it reads higher than the population value (two classes of 125 samples
in 128 dimensions read far higher than 1,000 samples of the same classes). Compare
representations on the same prompts, never values measured on different sample sizes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.covariance import LedoitWolf


def fisher_ratio(x: np.ndarray, y: Sequence[Any] | np.ndarray) -> float:
    """Maximal Fisher ratio of two classes (squared Mahalanobis distance of their means), >= 0.

    0: the class means coincide; 1: the classes sit one pooled standard deviation apart along
    the best direction; larger is more separable.

    Args:
        x: (n_samples, d) activations.
        y: (n_samples,) labels with exactly two classes (each with at least 2 samples).

    Raises:
        ValueError: shapes that disagree, or not two classes of 2+ samples.
    """
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"fisher_ratio needs (n, d) activations and (n,) labels, got {x.shape} and {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size != 2 or counts.min() < 2:
        raise ValueError(f"fisher_ratio needs two classes of at least 2 samples, got classes {classes.tolist()} "
                         f"with counts {counts.tolist()}")
    a, b = x[labels == classes[1]], x[labels == classes[0]]
    delta = a.mean(0) - b.mean(0)
    within = np.concatenate([a - a.mean(0), b - b.mean(0)])  # pooled within-class residuals
    cov = LedoitWolf(assume_centered=True).fit(within).covariance_
    return float(max(delta @ np.linalg.solve(cov, delta), 0.0))
