"""Representation similarity measures: pure functions on paired activations.

Every measure takes ``x`` of shape ``(n_samples, d1)`` and ``y`` of shape
``(n_samples, d2)`` whose rows are the same inputs, and returns a Python ``float``.
The name says whether it is a similarity (1 = same) or a distance (0 = same).
``MEASURES`` registers them by name with one signature ``fn(x, y) -> float``
(the approach of platonic-rep's ``SUPPORTED_METRICS``), so sweeps loop over names.

Linear measures (linear CKA, debiased linear CKA, Procrustes, CCA family) work in
feature space: they form ``d × d`` products, never an ``n × n`` Gram matrix, so
50,000 × 1,024 activations fit in memory. Kernel/neighbour measures (RBF CKA, RSA,
mutual k-NN) are inherently O(n²) and say so.

References:
    Kornblith et al. (2019) "Similarity of Neural Network Representations Revisited" (CKA).
    Song et al. (2012) JMLR 13 "Feature Selection via Dependence Maximization", Thm 2 (unbiased HSIC).
    Nguyen, Raghu & Kornblith (2021) "Do Wide and Deep Networks Learn the Same Things?" (debiased CKA).
    Williams et al. (2021) "Generalized Shape Metrics on Neural Representations" (Procrustes).
    Raghu et al. (2017) "SVCCA"; Morcos et al. (2018) "Insights on representational similarity... (PWCCA)".
    Kriegeskorte et al. (2008) "Representational similarity analysis" (RSA).
    Huh et al. (2024) "The Platonic Representation Hypothesis", Sec. 2 (mutual k-NN alignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from scipy import stats as _st
from scipy.spatial.distance import pdist

__all__ = [
    "MEASURES",
    "Measure",
    "canonical_correlations",
    "check_paired",
    "cca_similarity",
    "cka_from_gram",
    "compare",
    "debiased_linear_cka",
    "knn_from_neighbours",
    "knn_neighbours",
    "linear_cka",
    "mutual_knn_alignment",
    "procrustes_distance",
    "pwcca_similarity",
    "rbf_cka",
    "rdm_ranks",
    "rsa_from_ranks",
    "rsa_spearman",
    "svcca_similarity",
]


def check_paired(
    x: np.ndarray,
    y: np.ndarray,
    *,
    min_samples: int = 2,
    k: int | None = None,
    measure: str = "this measure",
    names: tuple[str, str] = ("x", "y"),
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of activation matrices and return them as float64 2-D arrays.

    Args:
        x: ``(n_samples, d1)`` activations (a 1-D array is read as one feature).
        y: ``(n_samples, d2)`` activations; row ``i`` is the same input as ``x[i]``.
        min_samples: fewest rows the measure needs.
        k: a neighbour count to check against ``n_samples`` (``k <= n_samples - 1``).
        measure: name used in messages.
        names: argument names used in messages.

    Raises:
        ValueError: naming the argument, for non-2-D input, unequal sample counts,
            NaN/inf values, too few samples, or ``k`` not in ``1..n_samples-1``.
    """
    out = []
    for arr, name in ((x, names[0]), (y, names[1])):
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D (n_samples, n_features) array, got shape {a.shape}; "
                f"reshape it, e.g. {name}.reshape(len({name}), -1)"
            )
        if a.shape[1] == 0:
            raise ValueError(f"{name} has shape {a.shape}: no features; pass at least one column")
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.argwhere(bad)[0, 0])
            raise ValueError(
                f"{name} contains {int(bad.sum())} NaN/inf value(s) (first in row {row}); "
                f"drop or impute those samples in both {names[0]} and {names[1]}"
            )
        out.append(a)
    a, b = out
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} has {a.shape[0]} samples but {names[1]} has {b.shape[0]} "
            f"(shapes {a.shape} vs {b.shape}); rows must be the same inputs in the same order"
        )
    n = a.shape[0]
    if n < min_samples:
        raise ValueError(
            f"{measure} needs at least {min_samples} samples, got n_samples={n} in "
            f"{names[0]} and {names[1]}; pass more inputs"
        )
    if k is not None and not 1 <= k <= n - 1:
        raise ValueError(f"k={k} but n_samples={n}; {measure} needs 1 <= k <= n_samples - 1 = {n - 1}")
    return a, b


def _center(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=0, keepdims=True)


# --------------------------------------------------------------------------- CKA


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA similarity (biased HSIC), in [0, 1]; 1 = equal up to rotation and scale.

    Uses the feature-space identity ``HSIC(XXᵀ, YYᵀ) ∝ ‖YᵀX‖_F²`` for centred X, Y
    (Kornblith et al. 2019, Eq. 4), so memory is O((d1 + d2)²), never O(n²).
    Invariant to orthogonal maps and isotropic scaling of either input; not to
    arbitrary invertible maps.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
    """
    x, y = check_paired(x, y, min_samples=2, measure="linear_cka")
    x, y = _center(x), _center(y)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    nx = np.linalg.norm(x.T @ x, "fro")
    ny = np.linalg.norm(y.T @ y, "fro")
    if nx == 0.0 or ny == 0.0:
        raise ValueError("linear_cka is undefined when x or y is constant over samples; drop constant inputs")
    return float(cross / (nx * ny))


def _unbiased_hsic_linear(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012, Thm 2) for linear kernels, in feature space.

    With K = XXᵀ, L = YYᵀ and K̃, L̃ their zero-diagonal versions, HSIC_u =
    [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1] / (n(n-3)).
    Each term is expanded so that only d×d products and n-vectors appear.
    """
    n = x.shape[0]
    kd = np.einsum("ij,ij->i", x, x)  # diag(K), (n,)
    ld = np.einsum("ij,ij->i", y, y)  # diag(L), (n,)
    tr_kl = np.linalg.norm(y.T @ x, "fro") ** 2 - float(kd @ ld)  # tr(K̃L̃)
    k1 = x @ x.sum(axis=0) - kd  # K̃1, (n,)
    l1 = y @ y.sum(axis=0) - ld  # L̃1, (n,)
    term2 = k1.sum() * l1.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * float(k1 @ l1)
    return float((tr_kl + term2 - term3) / (n * (n - 3)))


def debiased_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA similarity (unbiased HSIC), ≈ 0 for independent features.

    The biased estimator of :func:`linear_cka` is inflated when d ≫ n (two
    independent random matrices give CKA near 1); the unbiased HSIC estimator of
    Song et al. (2012) removes that bias (Nguyen et al. 2021, Sec. 3). Range:
    at most 1 (exactly 1 for identical inputs), can be slightly negative. Needs
    n ≥ 4. Feature-space computation; never builds an n×n matrix.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
    """
    x, y = check_paired(x, y, min_samples=4, measure="debiased_linear_cka")
    x, y = _center(x), _center(y)  # HSIC_u is translation invariant; centring aids precision
    hxy = _unbiased_hsic_linear(x, y)
    hxx = _unbiased_hsic_linear(x, x)
    hyy = _unbiased_hsic_linear(y, y)
    if hxx <= 0.0 or hyy <= 0.0:
        raise ValueError(
            "debiased_linear_cka: self-HSIC is not positive (constant or near-degenerate input); "
            "pass more samples or non-constant features"
        )
    return float(hxy / np.sqrt(hxx * hyy))


def cka_from_gram(k: np.ndarray, l: np.ndarray, *, debiased: bool = False) -> float:
    """CKA from two ``(n, n)`` Gram matrices (the textbook O(n²) form).

    Biased: ``HSIC = tr(KHLH)/(n-1)²`` with ``H = I − 11ᵀ/n``. Debiased: the
    unbiased HSIC of Song et al. (2012). Used by :func:`rbf_cka`; linear measures
    use the feature-space forms instead.

    Args:
        k: ``(n, n)`` symmetric kernel matrix of the first representation.
        l: ``(n, n)`` kernel matrix of the second, same inputs in the same order.
        debiased: use the unbiased HSIC estimator.
    """
    k = np.asarray(k, dtype=np.float64)
    l = np.asarray(l, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"k and l must be square Gram matrices of one shape, got {k.shape} and {l.shape}")
    if not (np.isfinite(k).all() and np.isfinite(l).all()):
        raise ValueError("k or l contains NaN/inf; check the activations the kernels came from")

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        n = a.shape[0]
        if debiased:
            a = a.copy()
            b = b.copy()
            np.fill_diagonal(a, 0.0)
            np.fill_diagonal(b, 0.0)
            return float(
                (np.sum(a * b) + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * a.sum(0) @ b.sum(0))
                / (n * (n - 3))
            )
        ac = a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()  # HKH
        return float(np.sum(ac * b))  # tr(HKH L); the 1/(n-1)² cancels in CKA

    n_min = 4 if debiased else 2
    if k.shape[0] < n_min:
        raise ValueError(f"cka_from_gram needs at least {n_min} samples, got {k.shape[0]}")
    kl, kk, ll = hsic(k, l), hsic(k, k), hsic(l, l)
    if kk <= 0.0 or ll <= 0.0:
        raise ValueError("cka_from_gram: a Gram matrix has no variance (constant representation)")
    return float(kl / np.sqrt(kk * ll))


def _rbf_gram(a: np.ndarray, bandwidth_fraction: float) -> np.ndarray:
    sq = np.einsum("ij,ij->i", a, a)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)  # (n, n) squared distances
    iu = np.triu_indices_from(d2, k=1)
    med = float(np.median(np.sqrt(d2[iu])))
    if med == 0.0:
        raise ValueError("rbf_cka: median pairwise distance is 0 (most inputs identical); use linear_cka")
    sigma = bandwidth_fraction * med  # Kornblith et al. 2019, Sec. 4: σ as a fraction of the median distance
    return np.exp(-d2 / (2.0 * sigma**2))


def rbf_cka(x: np.ndarray, y: np.ndarray, *, bandwidth_fraction: float = 0.8) -> float:
    """RBF-kernel CKA similarity, in [0, 1]; 1 for identical inputs.

    The Gaussian bandwidth is ``bandwidth_fraction`` × the median pairwise distance
    of each representation separately (Kornblith et al. 2019 use 0.2–0.8 of the
    median; 0.8 is our default). O(n²) memory: subsample large n.
    Invariant to orthogonal maps and (because the bandwidth follows the median)
    isotropic scaling.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
        bandwidth_fraction: σ as a fraction of the median distance, > 0.
    """
    if not bandwidth_fraction > 0:
        raise ValueError(f"bandwidth_fraction={bandwidth_fraction} must be > 0 (e.g. 0.8)")
    x, y = check_paired(x, y, min_samples=3, measure="rbf_cka")
    return cka_from_gram(_rbf_gram(x, bandwidth_fraction), _rbf_gram(y, bandwidth_fraction))


# --------------------------------------------------------------------------- Procrustes


def procrustes_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Orthogonal Procrustes distance, in [0, √2]; 0 = equal up to rotation and scale.

    ``min_Q ‖X̂ − ŶQ‖_F`` over orthogonal Q, where X̂, Ŷ are centred and scaled to
    unit Frobenius norm (Williams et al. 2021, Eq. 4, the Euclidean form; the
    angular form is ``arccos`` of the nuclear norm). Equals
    ``sqrt(2 − 2‖X̂ᵀŶ‖_*)``. Unequal widths are handled as zero-padding.
    Feature-space (d1 × d2 SVD).

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
    """
    x, y = check_paired(x, y, min_samples=2, measure="procrustes_distance")
    x, y = _center(x), _center(y)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0.0 or ny == 0.0:
        raise ValueError("procrustes_distance is undefined for a constant representation; drop constant inputs")
    nuclear = np.linalg.svd((x / nx).T @ (y / ny), compute_uv=False).sum()
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * nuclear)))


# --------------------------------------------------------------------------- CCA family


def _orthonormal_basis(a: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of a centred matrix, dropping numerically null directions.

    Returns ``(u, s, vt)`` with ``u`` an ``(n, r)`` orthonormal basis of the column space.
    """
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    keep = s > rtol * (s[0] if s.size else 0.0)
    return u[:, keep], s[keep], vt[keep]


def _cca_min_samples(x: np.ndarray, y: np.ndarray, measure: str, names=("x", "y")) -> None:
    d = max(x.shape[1], y.shape[1])
    if x.shape[0] <= d:
        raise ValueError(
            f"{measure} needs more samples than features (n_samples > {d}), got n_samples={x.shape[0]}; "
            f"with n <= d every canonical correlation is trivially 1. Pass more inputs or use svcca_similarity"
        )


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of two centred views, descending, length ``min(rank x, rank y)``.

    Computed as the singular values of ``Q_xᵀQ_y`` with Q orthonormal bases of the
    centred column spaces (Björck & Golub 1973) — numerically stable, no inverses.
    Needs ``n_samples > max(d1, d2)``.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
    """
    x, y = check_paired(x, y, min_samples=3, measure="canonical_correlations")
    _cca_min_samples(x, y, "canonical_correlations")
    qx, _, _ = _orthonormal_basis(_center(x))
    qy, _, _ = _orthonormal_basis(_center(y))
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        raise ValueError("canonical_correlations: x or y is constant over samples; drop constant inputs")
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    return np.clip(rho, 0.0, 1.0)


def cca_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Mean canonical correlation ρ̄ (Raghu et al. 2017), a similarity in [0, 1].

    Invariant to any invertible linear map of either input: 1 when y = xA for
    invertible A. Needs n_samples > max(d1, d2).

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
    """
    return float(np.mean(canonical_correlations(x, y)))


def _svd_reduce(a: np.ndarray, variance_kept: float) -> np.ndarray:
    u, s, _ = _orthonormal_basis(_center(a))
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(frac, variance_kept - 1e-12) + 1)  # fewest directions keeping the fraction
    return u[:, :k] * s[:k]


def svcca_similarity(x: np.ndarray, y: np.ndarray, *, variance_kept: float = 0.99) -> float:
    """SVCCA similarity (Raghu et al. 2017), in [0, 1].

    Each representation is first reduced to the top singular directions that keep
    ``variance_kept`` of its variance (the paper keeps 99%), then the mean canonical
    correlation is taken. Invariant to orthogonal maps and isotropic scaling (the
    SVD step is not invariant to general invertible maps).

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
        variance_kept: fraction of variance kept by the SVD step, in (0, 1].
    """
    if not 0.0 < variance_kept <= 1.0:
        raise ValueError(f"variance_kept={variance_kept} must be in (0, 1], e.g. 0.99")
    x, y = check_paired(x, y, min_samples=3, measure="svcca_similarity")
    xr, yr = _svd_reduce(x, variance_kept), _svd_reduce(y, variance_kept)
    _cca_min_samples(xr, yr, "svcca_similarity")
    return cca_similarity(xr, yr)


def pwcca_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Projection-weighted CCA (Morcos et al. 2018), a similarity in [0, 1].

    Canonical correlations weighted by how much of ``x``'s neurons each canonical
    variate accounts for: ``α_i ∝ Σ_j |⟨h_i, x_j⟩|`` with ``h_i`` the i-th canonical
    variate of x and ``x_j`` its j-th (centred) neuron. Asymmetric: weights come from
    ``x``. Invariant to any invertible linear map of ``y``, isotropic scaling of
    ``x``, and permutations and sign flips of ``x``'s neurons — but not to general
    rotations of ``x``, because the weights sum absolute values over neurons.
    Needs n > max(d1, d2).

    Args:
        x: ``(n_samples, d1)`` activations whose canonical variates set the weights.
        y: ``(n_samples, d2)`` activations.
    """
    x, y = check_paired(x, y, min_samples=3, measure="pwcca_similarity")
    _cca_min_samples(x, y, "pwcca_similarity")
    xc, yc = _center(x), _center(y)
    qx, _, _ = _orthonormal_basis(xc)
    qy, _, _ = _orthonormal_basis(yc)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        raise ValueError("pwcca_similarity: x or y is constant over samples; drop constant inputs")
    u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ u[:, : rho.size]  # (n, r) canonical variates of x, unit norm
    alpha = np.abs(h.T @ xc).sum(axis=1)  # Morcos et al. 2018, Eq. (2) before normalisation
    alpha = alpha / alpha.sum()
    return float(np.clip(alpha @ np.clip(rho, 0.0, 1.0), 0.0, 1.0))


# --------------------------------------------------------------------------- RSA, k-NN


def rsa_spearman(x: np.ndarray, y: np.ndarray, *, rdm_metric: str = "euclidean") -> float:
    """RSA similarity: Spearman correlation of the two dissimilarity matrices, in [-1, 1].

    RDMs are the condensed pairwise ``rdm_metric`` distances (Kriegeskorte et al.
    2008); we default to Euclidean, which keeps the measure invariant to orthogonal
    maps (1 − Pearson across features, also common, is not). Rank correlation makes
    it invariant to isotropic scaling. O(n²) memory.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
        rdm_metric: any ``scipy.spatial.distance.pdist`` metric name.
    """
    x, y = check_paired(x, y, min_samples=3, measure="rsa_spearman")
    return rsa_from_ranks(_rdm_ranks(x, rdm_metric), _rdm_ranks(y, rdm_metric))


def rdm_ranks(x: np.ndarray, *, rdm_metric: str = "euclidean") -> np.ndarray:
    """One representation's half of :func:`rsa_spearman`: the ranks of its condensed RDM.

    Comparing many pairs that share representations (every rule against every other), rank
    each once and correlate with :func:`rsa_from_ranks`; the value is the pairwise call's, bit for bit.
    """
    return _rdm_ranks(check_paired(x, x, min_samples=3, measure="rsa_spearman")[0], rdm_metric)


def _rdm_ranks(x: np.ndarray, rdm_metric: str) -> np.ndarray:
    d = pdist(x, metric=rdm_metric)
    if not np.isfinite(d).all():
        raise ValueError(f"rsa_spearman: rdm_metric='{rdm_metric}' gave NaN distances (e.g. constant rows); use 'euclidean'")
    r = _st.rankdata(d)
    if r.std() == 0.0:
        raise ValueError("rsa_spearman is undefined when all pairwise distances are equal; pass varied inputs")
    return r


def rsa_from_ranks(rx: np.ndarray, ry: np.ndarray) -> float:
    """:func:`rsa_spearman` from two :func:`rdm_ranks` of representations of the same inputs."""
    if rx.shape != ry.shape:
        raise ValueError(f"rsa_spearman: RDMs of {rx.size} and {ry.size} pairs; rank representations of the same inputs")
    return float(np.corrcoef(rx, ry)[0, 1])


def _knn_indices(a: np.ndarray, k: int) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    a = a / np.maximum(norms, 1e-12)  # Huh et al. 2024 compare unit-normalised features
    sim = a @ a.T  # (n, n) cosine similarity
    np.fill_diagonal(sim, -np.inf)  # a point is not its own neighbour
    return np.argpartition(sim, -k, axis=1)[:, -k:]  # the k most similar, in no particular order


def mutual_knn_alignment(x: np.ndarray, y: np.ndarray, *, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024), a similarity in [0, 1].

    For each input, the fraction of its k nearest neighbours (cosine similarity of
    unit-normalised features, self excluded) shared between the two
    representations, averaged over inputs. Invariant to orthogonal maps and
    isotropic scaling. O(n²) memory.

    Args:
        x: ``(n_samples, d1)`` activations; rows paired with ``y``.
        y: ``(n_samples, d2)`` activations.
        k: neighbours per input, ``1 <= k <= n_samples - 1`` (Huh et al. use 10).
    """
    x, y = check_paired(x, y, min_samples=2, k=k, measure="mutual_knn_alignment")
    return knn_from_neighbours(_knn_indices(x, k), _knn_indices(y, k))


def knn_neighbours(x: np.ndarray, *, k: int = 10) -> np.ndarray:
    """One representation's half of :func:`mutual_knn_alignment`: each input's ``k`` nearest
    neighbours, ``(n_samples, k)``; combine two with :func:`knn_from_neighbours`."""
    return _knn_indices(check_paired(x, x, min_samples=2, k=k, measure="mutual_knn_alignment")[0], k)


def knn_from_neighbours(nx: np.ndarray, ny: np.ndarray) -> float:
    """:func:`mutual_knn_alignment` from two :func:`knn_neighbours` of representations of the same inputs."""
    if nx.shape != ny.shape:
        raise ValueError(f"mutual_knn_alignment: neighbour lists of shape {nx.shape} and {ny.shape}; "
                         "use the same inputs and k for both")
    n, k = nx.shape
    hits = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)[:, None]
    hits[rows, nx] = True
    overlap = hits[rows, ny].sum(axis=1)
    return float(np.mean(overlap / k))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Measure:
    """A registered measure: ``fn(x, y) -> float`` and what its numbers mean."""

    fn: Callable[[np.ndarray, np.ndarray], float]
    kind: Literal["similarity", "distance"]
    """Similarity: larger = more alike (1 = same). Distance: smaller = more alike (0 = same)."""
    value_range: tuple[float, float]
    """Closed range of the value."""
    identical_value: float
    """The value for two identical representations."""
    invariant_to: str
    """Maps of either input that leave the value unchanged."""
    linear: bool
    """Feature-space computation (no n×n matrix)."""
    prepare: Callable[[np.ndarray], object] | None = None
    """Optional: the part of ``fn`` that reads one input alone (an RDM's ranks, neighbour lists)..."""
    combine: Callable[[object, object], float] | None = None
    """...and the rest: ``combine(prepare(x), prepare(y)) == fn(x, y)`` exactly. Callers comparing
    many pairs over few representations prepare each representation once."""

    def __call__(self, x: np.ndarray, y: np.ndarray) -> float:
        return self.fn(x, y)

    def as_similarity(self, value: float) -> float:
        """Map a value onto "1 = same": distances d in [0, D] become 1 − d/D."""
        if self.kind == "similarity":
            return value
        return 1.0 - value / self.value_range[1]


_ORTHO_SCALE = "orthogonal maps, isotropic scaling, translation"
MEASURES: dict[str, Measure] = {
    "linear_cka": Measure(linear_cka, "similarity", (0.0, 1.0), 1.0, _ORTHO_SCALE, True),
    "debiased_cka": Measure(debiased_linear_cka, "similarity", (-1.0, 1.0), 1.0, _ORTHO_SCALE, True),
    "rbf_cka": Measure(rbf_cka, "similarity", (0.0, 1.0), 1.0, _ORTHO_SCALE, False),
    "procrustes": Measure(procrustes_distance, "distance", (0.0, float(np.sqrt(2.0))), 0.0, _ORTHO_SCALE, True),
    "cca": Measure(cca_similarity, "similarity", (0.0, 1.0), 1.0, "any invertible linear map, translation", True),
    "svcca": Measure(svcca_similarity, "similarity", (0.0, 1.0), 1.0, _ORTHO_SCALE, True),
    "pwcca": Measure(
        pwcca_similarity, "similarity", (0.0, 1.0), 1.0,
        "invertible linear maps of y; isotropic scaling, neuron permutations and sign flips of x; translation", True,
    ),
    "rsa": Measure(rsa_spearman, "similarity", (-1.0, 1.0), 1.0, _ORTHO_SCALE + ", any monotone rescaling of distances", False,
                   prepare=rdm_ranks, combine=rsa_from_ranks),  # type: ignore[arg-type]
    "mutual_knn": Measure(mutual_knn_alignment, "similarity", (0.0, 1.0), 1.0, "orthogonal maps, isotropic scaling", False,
                          prepare=knn_neighbours, combine=knn_from_neighbours),  # type: ignore[arg-type]
}
"""Every measure by name; each is ``fn(x, y) -> float`` with default hyperparameters."""


def compare(x: np.ndarray, y: np.ndarray, names: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """All (or the named) registered measures on one pair, ``{name: value}``.

    Raises:
        ValueError: for an unknown name (listing the valid ones) or bad input.
    """
    names = list(MEASURES) if names is None else list(names)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise ValueError(f"unknown similarity measure(s) {unknown}; choose from {sorted(MEASURES)}")
    check_paired(x, y, measure="compare")
    return {n: MEASURES[n](x, y) for n in names}
