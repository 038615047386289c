"""Linear probes per layer against synthetic activations whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from safetylab.metrics.probes import (
    control_labels,
    group_splits,
    holdout_split,
    linear_probe,
    mean_difference,
    probe_direction,
    probe_directions,
    probe_layers,
)

N, LAYERS, D = 480, 5, 12


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def planted(rng, layer=3, strength=1.5, group_spread=0.0, n_groups=24):
    """Gaussian activations; at ``layer`` the label adds ``strength * u``; each group has its own offset."""
    y = rng.integers(0, 2, N)
    groups = rng.integers(0, n_groups, N)
    x = rng.normal(size=(N, LAYERS, D))
    x += group_spread * rng.normal(size=(n_groups, 1, D))[groups]
    u = rng.normal(size=D)
    u /= np.linalg.norm(u)
    x[:, layer] += strength * (2 * y[:, None] - 1) * u
    return x, y, groups, u


def test_planted_direction_is_found_at_its_layer():
    rng = np.random.default_rng(0)
    x, y, groups, u = planted(rng)
    phrasing = rng.integers(0, 10, N)  # a second grouping, shared across the folds
    curve = probe_layers(x, y, group_splits(groups, 4), control=control_labels(y, phrasing, rng))
    assert int(np.argmax(curve.accuracy)) == 3
    assert curve.accuracy[3] > 0.9 and curve.log_loss[3] < 0.35
    assert max(curve.accuracy[:3] + curve.accuracy[4:]) < 0.62
    assert curve.selectivity[3] > 0.3  # the activations do not encode the phrasing: control at chance
    assert curve.n_test == N and 0.45 < curve.chance < 0.6
    assert _cos(mean_difference(x, y)[3], u) > 0.95
    assert _cos(probe_directions(x, y)[3], u) > 0.9


def test_selectivity_is_zero_on_label_free_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, LAYERS, D))
    y = rng.integers(0, 2, N)
    groups, phrasing = rng.integers(0, 24, N), rng.integers(0, 10, N)
    curve = probe_layers(x, y, group_splits(groups, 4), control=control_labels(y, phrasing, rng))
    assert max(abs(a - 0.5) for a in curve.accuracy) < 0.1
    assert max(abs(s) for s in curve.selectivity) < 0.12
    assert min(curve.log_loss) > 0.65  # no better than a coin (ln 2 = 0.69)


def test_control_task_exposes_memorised_groups():
    """Labels that follow the group and activations that only encode group identity: a probe
    tested on seen groups reads the task as well as random per-group labels (selectivity ~ 0);
    a shared planted direction is read far better than the control (selectivity high)."""
    rng = np.random.default_rng(2)
    n_groups = 8
    groups = rng.integers(0, n_groups, N)
    y = (groups % 2).astype(int)  # the label is a property of the group (like a cue phrasing's family)
    x = rng.normal(size=(N, LAYERS, D)) + 3.0 * rng.normal(size=(n_groups, 1, D))[groups]
    other = rng.integers(0, 10, N)  # e.g. the template: split by it, so every group is seen in training
    control = control_labels(y, groups, np.random.default_rng(0))
    while np.unique(control).size < 2:
        control = control_labels(y, groups, rng)
    lexical = probe_layers(x, y, group_splits(other, 5), control=control)
    assert min(lexical.accuracy) > 0.95 and min(lexical.control_accuracy) > 0.95
    assert max(abs(s) for s in lexical.selectivity) < 0.05
    x2 = rng.normal(size=(N, LAYERS, D))
    u = rng.normal(size=D)
    x2[:, 2] += 1.5 * (2 * y[:, None] - 1) * u / np.linalg.norm(u)
    shared = probe_layers(x2, y, group_splits(other, 5), control=control)
    assert shared.accuracy[2] > 0.9 and shared.selectivity[2] > 0.25


def test_holdout_split_and_multiclass():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, N)
    centres = 2.0 * rng.normal(size=(3, D))
    x = rng.normal(size=(N, 2, D))
    x[:, 1] += centres[y]
    train = rng.random(N) < 0.7
    curve = probe_layers(x, y, holdout_split(train))
    assert curve.control_accuracy is None and curve.selectivity is None
    assert curve.accuracy[1] > 0.9 and curve.accuracy[0] < 0.5
    assert curve.n_test == int((~train).sum())
    d = curve.to_dict()
    assert set(d) == {"accuracy", "log_loss", "control_accuracy", "selectivity", "chance", "n_test"}


def test_probe_is_a_scikit_learn_estimator():
    probe = linear_probe(C=0.5)
    assert clone(probe).get_params()["logreg__C"] == 0.5
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, D))
    y = (x[:, 0] > 0).astype(int)
    w = probe_direction(clone(probe).fit(x, y))
    assert w.shape == (D,) and np.argmax(np.abs(w)) == 0 and w[0] > 0


def test_bad_input_names_the_problem():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 2, 4))
    with pytest.raises(ValueError, match="one class"):
        probe_layers(x, np.zeros(40), holdout_split(np.arange(40) < 20))
    with pytest.raises(ValueError, match="labels must be"):
        probe_layers(x, np.zeros(39), holdout_split(np.arange(40) < 20))
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        group_splits(np.zeros(40), 5)
    with pytest.raises(ValueError, match="both sides"):
        holdout_split(np.ones(40, bool))
    with pytest.raises(ValueError, match="training fold has one class"):
        probe_layers(x, np.r_[np.zeros(20), np.ones(20)], holdout_split(np.arange(40) < 20))
    with pytest.raises(ValueError, match="two classes"):
        mean_difference(x, np.arange(40) % 3)


def test_project_out_removes_exactly_the_direction_a_confounded_probe_reads():
    """A label that is readable only along one direction (as 'forbidden' is along the refusal
    direction of a model that refuses) is at chance once that direction is projected out, while a
    label planted elsewhere survives untouched."""
    from safetylab.metrics.probes import project_out

    rng = np.random.default_rng(3)
    x, y, groups, u = planted(rng, layer=2, strength=2.0)
    directions = np.zeros((LAYERS, D))
    directions[2] = 5.0 * u  # any norm
    clean = project_out(x, directions)
    assert np.abs(clean[:, 2] @ u).max() < 1e-9
    np.testing.assert_array_equal(clean[:, [0, 1, 3, 4]], x[:, [0, 1, 3, 4]])  # zero rows leave layers alone
    splits = group_splits(groups, 4)
    before = probe_layers(x, y, splits).accuracy[2]
    after = probe_layers(clean, y, splits).accuracy[2]
    assert before > 0.85 and abs(after - 0.5) < 0.08
    with pytest.raises(ValueError, match="directions must be"):
        project_out(x, directions[:3])


def test_held_out_predictions_pool_to_the_curve_and_price_unseen_classes():
    from safetylab.metrics.probes import held_out_predictions

    rng = np.random.default_rng(4)
    x, y, groups, _ = planted(rng, layer=1, strength=1.5)
    splits = group_splits(groups, 4)
    items = held_out_predictions(x, y, splits)
    curve = probe_layers(x, y, splits)
    assert sorted(items.test) == list(range(N))
    correct, loss = np.asarray(items.correct), np.asarray(items.log_loss)
    assert correct.shape == loss.shape == (LAYERS, N)
    np.testing.assert_allclose(correct.mean(1), curve.accuracy)
    np.testing.assert_allclose(loss.mean(1), curve.log_loss, atol=1e-4)
    # A test class the training side never saw gets probability 0: the loss is the floor's -ln(eps).
    y3 = np.where(np.arange(N) < 40, 2, y)
    split = holdout_split(np.arange(N) >= 40)
    unseen = held_out_predictions(x, y3, split, eps=1e-3)
    assert not np.asarray(unseen.correct).any() and np.allclose(unseen.log_loss, -np.log(1e-3))
    with pytest.raises(ValueError, match="do not overlap"):
        held_out_predictions(x, y, [split[0], split[0]])
