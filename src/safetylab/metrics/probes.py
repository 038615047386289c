"""Linear probes per layer, with held-out groups and control tasks.

A *probe* is a linear classifier trained to read a property (being evaluated, forbidden
vs look-alike, which hazard) from a layer's activations: here scikit-learn's
``LogisticRegression`` behind a ``StandardScaler`` (:func:`linear_probe`), one per layer.

Three things keep its accuracy honest:

* **Held-out groups.** Train and test never share a group -- a prompt template, a cue
  phrasing, a hazard -- so the probe must generalise past the surface it was fitted on
  (``GroupKFold``, :func:`group_splits`, or an explicit train/test partition,
  :func:`holdout_split`). Accuracy and log-loss are pooled over the test folds.
* **Control tasks** (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control
  Tasks"): every group of a chosen grouping gets one random label drawn from the task's
  label distribution (:func:`control_labels`); the same probe, trained and tested on the
  same splits, shows how much of the accuracy memorising group identity alone would
  give. *Selectivity* = task accuracy - control accuracy. The control's grouping must be
  shared across the folds (e.g. split by template, control per cue phrasing), so the
  probe sees every control group in training, as Hewitt & Liang's control sees every
  word type. With the held-out groups themselves an unseen group's random label cannot
  be learnt at all, and the control measures only how unbalanced the folds are (on a
  few groups, often far below chance).
* **Difference of means** (:func:`mean_difference`): the class-mean difference of a
  binary property, the direction activation steering adds (Turner et al. 2023; Rimsky
  et al. 2024) and refusal-direction ablation removes (Arditi et al. 2024), beside the
  probe's own direction (:func:`probe_direction`).
* **A direction removed before probing** (:func:`project_out`): a probe for one property
  can score well by reading another that travels with it (a safety-trained model's
  decision to refuse travels with "this is a hazard"). Projecting that property's
  direction out of the activations first leaves the probe only what lies elsewhere.
* **Per-item predictions** (:func:`held_out_predictions`): correctness and log-loss of
  every test sample, so that an interval can be clustered over what replicates (hazards,
  templates) and two models probed on the same samples can be paired item by item.

All functions take arrays and an ``np.random.Generator`` where they draw; shapes are
``(n_samples, n_layers, d_model)`` activations and ``(n_samples,)`` labels and groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

Split = tuple[np.ndarray, np.ndarray]
"""(train indices, test indices), as scikit-learn's ``cv=`` iterables give them."""


def linear_probe(C: float = 1.0, max_iter: int = 500) -> Pipeline:
    """A standardise-then-logistic-regression probe (an unfitted scikit-learn estimator).

    Args:
        C: inverse L2 strength of ``LogisticRegression`` (smaller: simpler probe).
        max_iter: lbfgs iterations.
    """
    return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(C=C, max_iter=max_iter))])


def _check(x: np.ndarray, y: np.ndarray, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)  # float32 probabilities trip log_loss's sum check
    if x.ndim != ndim:
        shape = "(n_samples, n_layers, d_model)" if ndim == 3 else "(n_samples, d_model)"
        raise ValueError(f"activations must be {shape}, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},) to match activations {x.shape}, got {y.shape}")
    if np.unique(y).size < 2:
        raise ValueError(f"the probe target has one class ({np.unique(y).tolist()}); a probe needs at least two")
    return x, y


def group_splits(groups: Sequence[Any] | np.ndarray, n_splits: int = 5) -> list[Split]:
    """``GroupKFold`` splits: every group's samples are all in one test fold.

    Raises:
        ValueError: fewer distinct groups than ``n_splits`` (or than 2).
    """
    g = np.asarray(groups)
    n_groups = np.unique(g).size
    k = min(n_splits, n_groups)
    if k < 2:
        raise ValueError(f"held-out groups need at least 2 distinct groups, got {n_groups}")
    return [(tr, te) for tr, te in GroupKFold(n_splits=k).split(np.zeros(g.size), groups=g)]


def holdout_split(train: Sequence[bool] | np.ndarray) -> list[Split]:
    """One explicit split: samples with ``train`` True are fitted, the rest tested."""
    t = np.asarray(train, dtype=bool)
    if t.all() or not t.any():
        raise ValueError("a held-out split needs samples on both sides; train marks all or none")
    return [(np.flatnonzero(t), np.flatnonzero(~t))]


def control_labels(y: Sequence[Any] | np.ndarray, groups: Sequence[Any] | np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang control task: one random label per group, drawn from the label distribution.

    Args:
        y: (n,) task labels (their empirical frequencies are the draw's probabilities).
        groups: (n,) the grouping whose identity the control labels follow (e.g. cue phrasing).
        rng: source of the draw.

    Returns:
        (n,) labels, constant within each group, independent of the task.
    """
    y, g = np.asarray(y), np.asarray(groups)
    classes, counts = np.unique(y, return_counts=True)
    names, inverse = np.unique(g, return_inverse=True)
    drawn = rng.choice(classes, size=names.size, p=counts / counts.sum())
    return drawn[inverse]


@dataclass(frozen=True)
class ProbeCurve:
    """Held-out probe scores per layer (lists over the layers probed, in order)."""

    accuracy: list[float]
    """Pooled test accuracy of the task, in [0, 1]."""
    log_loss: list[float]
    """Pooled test log-loss of the task (nats; 0 is perfect, ln 2 is a coin for two classes)."""
    control_accuracy: list[float] | None
    """Pooled test accuracy of the control task (None when no control was run)."""
    selectivity: list[float] | None
    """accuracy - control_accuracy (Hewitt & Liang 2019), in [-1, 1]."""
    chance: float
    """Accuracy of always guessing the majority test label (the floor to compare with)."""
    n_test: int
    """Test predictions pooled per layer (each sample once under a partition of folds)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _held_out_scores(x: np.ndarray, y: np.ndarray, splits: Sequence[Split], probe: Pipeline,
                     classes: np.ndarray) -> tuple[float, float]:
    """Pooled accuracy and log-loss of ``probe`` over ``splits`` on one layer's (n, d) activations."""
    correct, losses, n = 0, 0.0, 0
    for train, test in splits:
        if np.unique(y[train]).size < 2:
            raise ValueError("a training fold has one class; use fewer folds or groups that mix the classes")
        fitted = clone(probe).fit(x[train], y[train])
        proba = np.zeros((test.size, classes.size))
        proba[:, np.searchsorted(classes, fitted.classes_)] = fitted.predict_proba(x[test])
        correct += int(np.sum(classes[proba.argmax(1)] == y[test]))
        losses += float(log_loss(y[test], proba, labels=classes)) * test.size
        n += test.size
    return correct / n, losses / n


def probe_layers(
    activations: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    splits: Iterable[Split],
    *,
    control: Sequence[Any] | np.ndarray | None = None,
    probe: Pipeline | None = None,
) -> ProbeCurve:
    """Held-out accuracy and log-loss of one linear probe per layer, with its control task.

    Args:
        activations: (n_samples, n_layers, d_model), e.g. from
            :func:`safetylab.lm.hooks.read_residual`.
        labels: (n_samples,) the property to read (two or more classes).
        splits: (train, test) index pairs, e.g. :func:`group_splits` or :func:`holdout_split`.
        control: (n_samples,) control-task labels (:func:`control_labels`), or None.
        probe: the estimator (default :func:`linear_probe`); cloned for every fit.

    Returns:
        The per-layer curve; the control task uses the same splits and probe.

    Raises:
        ValueError: shapes that disagree, one class, or a training fold with one class.
    """
    x, y = _check(activations, labels)
    splits = [(np.asarray(tr), np.asarray(te)) for tr, te in splits]
    if not splits:
        raise ValueError("no splits given; pass group_splits(...) or holdout_split(...)")
    probe = probe if probe is not None else linear_probe()
    classes = np.unique(y)
    c = None if control is None else np.asarray(control)
    acc, loss, ctrl = [], [], []
    for layer in range(x.shape[1]):
        a, l = _held_out_scores(x[:, layer], y, splits, probe, classes)
        acc.append(a)
        loss.append(l)
        if c is not None:
            ctrl.append(_held_out_scores(x[:, layer], c, splits, probe, np.unique(c))[0]
                        if np.unique(c).size > 1 else float("nan"))
    test = np.concatenate([te for _, te in splits])
    _, counts = np.unique(y[test], return_counts=True)
    return ProbeCurve(
        accuracy=acc, log_loss=loss,
        control_accuracy=ctrl if c is not None else None,
        selectivity=[a - b for a, b in zip(acc, ctrl)] if c is not None else None,
        chance=float(counts.max() / counts.sum()), n_test=int(test.size),
    )


def mean_difference(activations: np.ndarray, labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Class-mean difference ``mean(x | y = 1) - mean(x | y = 0)`` of a binary property.

    Args:
        activations: (n_samples, ..., d_model), e.g. (n, n_layers, d_model).
        labels: (n_samples,) with exactly two classes; the larger sorts as 1 (True > False).

    Returns:
        (..., d_model) float64, e.g. one direction per layer.
    """
    x, y = np.asarray(activations, dtype=float), np.asarray(labels)
    classes = np.unique(y)
    if classes.size != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"a difference of means needs (n,) labels with two classes, got classes "
                         f"{classes.tolist()} for activations {x.shape}")
    return x[y == classes[1]].mean(0) - x[y == classes[0]].mean(0)


def probe_direction(fitted: Pipeline) -> np.ndarray:
    """The direction a fitted binary probe reads, in raw activation space.

    The logistic regression scores ``w . (x - mu) / sigma``, so the raw-space weight is
    ``w / sigma`` (a (d_model,) float64 vector; larger scores mean the larger class).
    """
    w = fitted.named_steps["logreg"].coef_
    if w.shape[0] != 1:
        raise ValueError(f"probe_direction needs a binary probe; this one has {w.shape[0]} classes")
    return w[0] / fitted.named_steps["scale"].scale_


def probe_directions(activations: np.ndarray, labels: Sequence[Any] | np.ndarray,
                     probe: Pipeline | None = None) -> np.ndarray:
    """:func:`probe_direction` of a probe fitted on every sample, per layer: (n_layers, d_model)."""
    x, y = _check(activations, labels)
    probe = probe if probe is not None else linear_probe()
    return np.stack([probe_direction(clone(probe).fit(x[:, layer], y)) for layer in range(x.shape[1])])


def project_out(activations: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Remove one direction per layer: ``x - (x . u) u`` with ``u`` the unit direction.

    Args:
        activations: (n_samples, n_layers, d_model).
        directions: (n_layers, d_model), any norm (e.g. :func:`mean_difference` per layer);
            a zero row leaves its layer unchanged.

    Returns:
        (n_samples, n_layers, d_model) float64 whose component along each layer's direction is 0.
    """
    x, d = np.asarray(activations, dtype=np.float64), np.asarray(directions, dtype=np.float64)
    if x.ndim != 3 or d.shape != x.shape[1:]:
        raise ValueError(f"directions must be (n_layers, d_model) = {x.shape[1:]} for activations {x.shape}, "
                         f"got {d.shape}")
    norms = np.linalg.norm(d, axis=-1, keepdims=True)
    u = np.divide(d, norms, out=np.zeros_like(d), where=norms > 0)  # (n_layers, d_model)
    return x - np.einsum("nld,ld->nl", x, u)[..., None] * u[None]


@dataclass(frozen=True)
class ProbeItems:
    """Held-out predictions of one probe per layer, item by item (every test sample once)."""

    test: list[int]
    """Indices of the test samples, in the order of the columns below."""
    correct: list[list[bool]]
    """(n_layers, n_test): the probe's top class is the true label."""
    log_loss: list[list[float]]
    """(n_layers, n_test): ``-ln p(true label)`` in nats, p clipped below at ``eps``."""
    chance: float
    """Accuracy of always guessing the majority test label."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_predictions(
    activations: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    splits: Iterable[Split],
    *,
    probe: Pipeline | None = None,
    eps: float = 1e-4,
) -> ProbeItems:
    """Every test sample's correctness and log-loss under one linear probe per layer.

    Labels of a test sample that no training fold contains get probability 0 (then ``eps``):
    a probe cannot name a class it never saw, and its loss says so.

    Args:
        activations: (n_samples, n_layers, d_model).
        labels: (n_samples,) two or more classes.
        splits: (train, test) pairs whose test sides do not overlap.
        probe: the estimator (default :func:`linear_probe`); cloned for every fit.
        eps: floor on a predicted probability (a log-loss of at most ``-ln eps`` nats).

    Raises:
        ValueError: shapes that disagree, one class, a training fold with one class, or test
            sides that overlap.
    """
    x, y = _check(activations, labels)
    splits = [(np.asarray(tr), np.asarray(te)) for tr, te in splits]
    test = np.concatenate([te for _, te in splits]) if splits else np.zeros(0, int)
    if test.size == 0 or np.unique(test).size != test.size:
        raise ValueError("held-out predictions need test sides that are non-empty and do not overlap")
    probe = probe if probe is not None else linear_probe()
    correct = np.zeros((x.shape[1], test.size), dtype=bool)
    loss = np.zeros((x.shape[1], test.size))
    for layer in range(x.shape[1]):
        col = 0
        for train, te in splits:
            if np.unique(y[train]).size < 2:
                raise ValueError("a training fold has one class; use fewer folds or groups that mix the classes")
            fitted = clone(probe).fit(x[train][:, layer], y[train])
            proba = fitted.predict_proba(x[te][:, layer])  # (n_test_fold, n_classes_seen)
            seen = list(fitted.classes_)
            p_true = np.array([proba[k, seen.index(t)] if t in seen else 0.0 for k, t in enumerate(y[te])])
            correct[layer, col:col + te.size] = fitted.classes_[proba.argmax(1)] == y[te]
            loss[layer, col:col + te.size] = -np.log(np.maximum(p_true, eps))
            col += te.size
    _, counts = np.unique(y[test], return_counts=True)
    return ProbeItems(test=test.tolist(), correct=correct.tolist(), log_loss=loss.round(5).tolist(),
                      chance=float(counts.max() / counts.sum()))
