"""Functional comparisons: agreement, stitching, ablation profiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.linear_model import LogisticRegression

from safetylab.metrics.functional import (
    ablation_profile,
    fit_stitch,
    linear_readout,
    pca_directions,
    prediction_agreement,
    profile_similarity,
    stitching_accuracy,
)


def test_prediction_agreement_accepts_labels_and_logits():
    a = np.array([0, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 2]] * 5.0
    assert prediction_agreement(a, logits) == 0.75
    with pytest.raises(ValueError, match=r"pred_a has 4 inputs but pred_b has 3"):
        prediction_agreement(a, a[:3])
    with pytest.raises(ValueError, match=r"pred_b contains NaN/inf"):
        prediction_agreement(a, np.full((4, 3), np.nan))


@pytest.fixture(scope="module")
def task():
    """A linearly decodable 4-class task with a fitted sklearn readout on 10-d features."""
    rng = np.random.default_rng(0)
    n, d = 600, 10
    h = rng.normal(size=(n, d))
    y = (h[:, 0] > 0).astype(int) * 2 + (h[:, 1] > 0).astype(int)
    clf = LogisticRegression(max_iter=2000).fit(h[:400], y[:400])
    return h, y, linear_readout(clf.coef_, clf.intercept_)


def test_stitching_a_rotated_copy_keeps_accuracy_and_noise_does_not(task):
    h, y, readout = task
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
    h_a = h @ q  # A is a rotated copy of B's layer
    own = float(np.mean(readout(h[400:]).argmax(1) == y[400:]))
    stitch = fit_stitch(h_a[:400], h[:400])
    assert stitching_accuracy(stitch, h_a[400:], readout, y[400:]) == pytest.approx(own, abs=1e-9)
    noise = np.random.default_rng(2).normal(size=h.shape)  # A carries nothing about B's layer
    bad = fit_stitch(noise[:400], h[:400])
    assert stitching_accuracy(bad, noise[400:], readout, y[400:]) < 0.45
    with pytest.raises(ValueError, match="h_a has 400 samples but h_b has 399"):
        fit_stitch(h_a[:400], h[:399])


def test_ablation_profile_finds_the_units_the_readout_uses(task):
    h, y, readout = task
    profile = ablation_profile(h, readout, y)
    assert profile.shape == (10,)
    assert profile[0] > 0.2 and profile[1] > 0.2  # the label is built from units 0 and 1
    assert np.all(np.abs(profile[2:]) < 0.05)
    # directions are normalised and the result matches unit ablation
    np.testing.assert_allclose(ablation_profile(h, readout, y, directions=3 * np.eye(10)), profile)
    with pytest.raises(ValueError, match=r"directions must have shape \(k, 10\)"):
        ablation_profile(h, readout, y, directions=np.eye(3))


def test_pca_directions_sorted_by_variance():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(500, 3)) * np.array([5.0, 1.0, 0.1])
    dirs, var = pca_directions(h)
    assert np.all(np.diff(var) <= 0)
    assert abs(dirs[0, 0]) > 0.99 and abs(dirs[2, 2]) > 0.99


def test_profile_similarity_is_pearson_with_documented_degenerate_cases():
    a, b = np.array([0.1, 0.5, 0.0, 0.3]), np.array([0.2, 0.4, 0.1, 0.1])
    assert profile_similarity(a, b) == pytest.approx(pearsonr(a, b).statistic)
    assert profile_similarity(np.zeros(4), np.zeros(4)) == 1.0
    assert profile_similarity(np.zeros(4), np.full(4, 0.1)) == 0.0
    assert profile_similarity(np.zeros(4), b) == 0.0
    with pytest.raises(ValueError, match="profile_a has 4 entries but profile_b has 3"):
        profile_similarity(a, b[:3])
