"""Similarity measures, tested by their properties and against scipy/sklearn."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.cross_decomposition import CCA
from sklearn.neighbors import NearestNeighbors

from safetylab.metrics.similarity import (
    MEASURES,
    canonical_correlations,
    check_paired,
    cka_from_gram,
    compare,
    debiased_linear_cka,
    linear_cka,
    mutual_knn_alignment,
    procrustes_distance,
    rbf_cka,
    rsa_spearman,
)

ALL = sorted(MEASURES)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12))
    y = np.tanh(x @ rng.normal(size=(12, 8))) + 0.3 * rng.normal(size=(120, 8))
    return x, y


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("name", ALL)
def test_identical_inputs_give_the_identical_value(name, pair):
    x, _ = pair
    m = MEASURES[name]
    v = m(x, x.copy())
    assert isinstance(v, float)
    assert v == pytest.approx(m.identical_value, abs=1e-9)


@pytest.mark.parametrize("name", [n for n in ALL if n != "pwcca"])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(name, pair):
    x, y = pair
    m = MEASURES[name]
    base = m(x, y)
    moved = m(3.7 * x @ _orthogonal(x.shape[1], 1), 0.2 * y @ _orthogonal(y.shape[1], 2))
    assert moved == pytest.approx(base, abs=1e-9)


def test_pwcca_invariances_are_the_documented_ones(pair):
    x, y = pair
    base = MEASURES["pwcca"](x, y)
    perm = np.random.default_rng(1).permutation(x.shape[1])
    signs = np.where(np.arange(x.shape[1]) % 2, -1.0, 1.0)
    a = np.random.default_rng(2).normal(size=(y.shape[1], y.shape[1]))
    assert MEASURES["pwcca"](3.7 * x[:, perm] * signs, y @ a) == pytest.approx(base, abs=1e-9)
    # weights come from x's neurons, so a general rotation of x changes the value
    assert abs(MEASURES["pwcca"](x @ _orthogonal(x.shape[1], 1), y) - base) > 1e-4


@pytest.mark.parametrize("name", ALL)
def test_values_lie_in_the_documented_range_and_differ_from_identical(name, pair):
    x, y = pair
    m = MEASURES[name]
    v = m(x, y)
    lo, hi = m.value_range
    assert lo - 1e-12 <= v <= hi + 1e-12
    assert abs(v - m.identical_value) > 1e-3  # a genuinely different pair is not scored as identical


@pytest.mark.parametrize("name", ["cca", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes", "rbf_cka", "rsa"])
def test_translation_invariance(name, pair):
    x, y = pair
    assert MEASURES[name](x + 5.0, y - 2.0) == pytest.approx(MEASURES[name](x, y), abs=1e-9)


def test_cca_invariant_to_any_invertible_map_but_cka_is_not(pair):
    x, y = pair
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 12)) + 3 * np.diag(rng.uniform(0.1, 5, size=12))  # invertible, far from orthogonal
    assert np.linalg.cond(a) > 5
    assert MEASURES["cca"](x @ a, y) == pytest.approx(MEASURES["cca"](x, y), abs=1e-9)
    assert MEASURES["cca"](x, x @ a) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ a) < 0.99  # CKA is only orthogonal-invariant


def test_worked_example_total_and_difference_is_a_rotation():
    # math and reading scores; [total, difference] = scores @ [[1, 1], [1, -1]] is a scaled rotation
    scores = np.array([[90, 60], [70, 80], [50, 55], [85, 95], [60, 40]], dtype=float)
    derived = scores @ np.array([[1.0, 1.0], [1.0, -1.0]])
    assert linear_cka(scores, derived) == pytest.approx(1.0, abs=1e-12)
    assert procrustes_distance(scores, derived) == pytest.approx(0.0, abs=1e-6)


def _textbook_hsic(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _textbook_unbiased_hsic(k, l):
    # Song et al. (2012), Theorem 2, written with explicit loops over the formula's terms
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def test_linear_cka_matches_textbook_gram_hsic():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 7)), rng.normal(size=(30, 5))
    y[:, :3] += x[:, :3]
    k, l = x @ x.T, y @ y.T
    expected = _textbook_hsic(k, l) / np.sqrt(_textbook_hsic(k, k) * _textbook_hsic(l, l))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert cka_from_gram(k, l) == pytest.approx(expected, rel=1e-10)


def test_debiased_cka_matches_textbook_unbiased_hsic():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 9))
    y[:, :2] += 2 * x[:, :2]
    k, l = x @ x.T, y @ y.T  # uncentred: the unbiased estimator is translation invariant
    expected = _textbook_unbiased_hsic(k, l) / np.sqrt(_textbook_unbiased_hsic(k, k) * _textbook_unbiased_hsic(l, l))
    assert debiased_linear_cka(x, y) == pytest.approx(expected, rel=1e-9)
    assert cka_from_gram(k, l, debiased=True) == pytest.approx(expected, rel=1e-9)


def test_debiased_cka_near_zero_for_independent_features_where_biased_is_not():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(100, 500)), rng.normal(size=(100, 500))  # d >> n
    assert abs(debiased_linear_cka(x, y)) < 0.03
    assert linear_cka(x, y) > 0.5  # the bias debiasing removes


def test_rbf_cka_matches_explicit_kernel():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    y[:, 0] += x[:, 0] ** 2

    def gram(a, frac):
        d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
        sigma = frac * np.median(d[np.triu_indices(len(a), 1)])
        return np.exp(-(d**2) / (2 * sigma**2))

    k, l = gram(x, 0.5), gram(y, 0.5)
    expected = _textbook_hsic(k, l) / np.sqrt(_textbook_hsic(k, k) * _textbook_hsic(l, l))
    assert rbf_cka(x, y, bandwidth_fraction=0.5) == pytest.approx(expected, rel=1e-9)


def test_canonical_correlations_match_sklearn_cca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = x @ rng.normal(size=(4, 3)) + rng.normal(size=(300, 3))
    a, b = CCA(n_components=3, max_iter=5000, tol=1e-10).fit(x, y).transform(x, y)
    sk = [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(3)]
    np.testing.assert_allclose(canonical_correlations(x, y), sk, atol=1e-5)


def test_procrustes_matches_scipy_orthogonal_procrustes(pair):
    x, y = pair
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    y_pad = np.hstack([yc, np.zeros((len(yc), xc.shape[1] - yc.shape[1]))])
    r, _ = orthogonal_procrustes(y_pad, xc)
    assert procrustes_distance(x, y) == pytest.approx(np.linalg.norm(xc - y_pad @ r), abs=1e-9)


def test_rsa_matches_scipy_spearman(pair):
    x, y = pair
    assert rsa_spearman(x, y) == pytest.approx(spearmanr(pdist(x), pdist(y)).statistic, abs=1e-12)


def test_mutual_knn_matches_sklearn_neighbours(pair):
    x, y = pair
    k = 7

    def nbrs(a):
        idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(a).kneighbors(a, return_distance=False)
        return [set(row[row != i][:k]) for i, row in enumerate(idx)]

    nx, ny = nbrs(x), nbrs(y)
    expected = np.mean([len(a & b) / k for a, b in zip(nx, ny)])
    assert mutual_knn_alignment(x, y, k=k) == pytest.approx(expected)


@pytest.mark.parametrize("name", [n for n in ALL if MEASURES[n].prepare is not None])
def test_prepared_halves_give_the_pairwise_value_bit_for_bit(name, pair):
    x, y = pair
    m = MEASURES[name]
    assert {"rsa", "mutual_knn"} <= {n for n in ALL if MEASURES[n].prepare is not None}
    assert m.combine(m.prepare(x), m.prepare(y)) == m(x, y)
    assert m.combine(m.prepare(y), m.prepare(x)) == m(y, x)
    with pytest.raises(ValueError, match=r"same inputs"):
        m.combine(m.prepare(x), m.prepare(y[:-1]))
    bad = x.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/inf value\(s\) \(first in row 3\)"):
        m.prepare(bad)


def test_a_dead_representation_fails_when_prepared_as_it_does_pairwise(pair):
    x, _ = pair
    dead = np.ones_like(x)  # every RDM entry equal: Spearman is undefined
    for call in (lambda: rsa_spearman(x, dead), lambda: MEASURES["rsa"].prepare(dead)):
        with pytest.raises(ValueError, match="all pairwise distances are equal"):
            call()


@pytest.mark.parametrize("name", ["linear_cka", "debiased_cka", "procrustes", "cca", "svcca", "pwcca"])
def test_linear_measures_never_build_n_by_n(name):
    n, d = 20_000, 16  # an n×n float64 matrix would need 3.2 GB
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    tracemalloc.start()
    MEASURES[name](x, y)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert MEASURES[name].linear
    assert peak < 40e6, f"{name} peaked at {peak / 1e6:.0f} MB"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ALL)
def test_mismatched_sample_counts_name_both_arguments(name, pair):
    x, y = pair
    with pytest.raises(ValueError, match=r"x has 120 samples but y has 119"):
        MEASURES[name](x, y[:-1])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_rejected_with_the_argument_named(name, bad, pair):
    x, y = pair
    y = y.copy()
    y[5, 2] = bad
    with pytest.raises(ValueError, match=r"^y contains 1 NaN/inf value\(s\) \(first in row 5\)"):
        MEASURES[name](x, y)


def test_too_few_samples_for_a_measure():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match=r"debiased_linear_cka needs at least 4 samples, got n_samples=3"):
        debiased_linear_cka(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)))
    with pytest.raises(ValueError, match=r"needs more samples than features \(n_samples > 20\), got n_samples=15"):
        MEASURES["cca"](rng.normal(size=(15, 20)), rng.normal(size=(15, 3)))


def test_k_larger_than_n():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(5, 3))
    with pytest.raises(ValueError, match=r"k=10 but n_samples=5"):
        mutual_knn_alignment(x, x, k=10)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"x must be a 2-D"):
        check_paired(np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"unknown similarity measure\(s\) \['cka2'\]"):
        compare(np.eye(3), np.eye(3), ["cka2"])
    with pytest.raises(ValueError, match=r"constant"):
        linear_cka(np.ones((10, 3)), np.random.default_rng(0).normal(size=(10, 3)))


def test_registry_documents_every_measure():
    for name, m in MEASURES.items():
        assert m.kind in ("similarity", "distance"), name
        assert m.value_range[0] < m.value_range[1]
        assert m.value_range[0] <= m.identical_value <= m.value_range[1]
        assert m.fn.__doc__ and ("similarity" in m.fn.__doc__.lower() or "distance" in m.fn.__doc__.lower())
    assert MEASURES["procrustes"].as_similarity(0.0) == 1.0
