"""Intervals and tests used by every study's verdict. Pure functions; floats out.

The verdict protocol (``DESIGN.md``, "How a study decides") asks for intervals over the
unit that replicates: training seeds, prompts clustered by hazard or template, or both.
:func:`clustered_mean_interval` is the one workhorse: a Student-t interval whose standard
error is cluster-robust over one grouping (CR1, Liang & Zeger 1986) or two crossed ones
(seeds x hazards: Cameron, Gelbach & Miller 2011, V = V_seed + V_hazard - V_both), with the
degrees of freedom of the scarcer grouping (G - 1), so that 3 seeds give t(2) and not a
normal quantile. A percentile bootstrap over 3-5 seeds covers far below its nominal level
(issue "Verdicts that can fail": 73% at n = 3), which is why the seed-level intervals here
are t intervals.

Bounded quantities (rates, fractions) are clipped to their range, and an interval whose
spread estimate is exactly 0 is not reported as zero-width: callers pass a floor on the
standard error that the data cannot go below (e.g. the binomial sampling error of each
seed's rate, :func:`rate_se_floor`), or get ``nan`` bounds ("undecided").

References: Wilson (1927) score interval; Clopper & Pearson (1934) exact interval;
Agresti & Coull (1998) adjusted proportions; Efron & Tibshirani (1993) bootstrap;
Holm (1979) step-down correction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as _st


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, in [0, 1]. ``(nan, nan)`` if n = 0."""
    _check_counts(successes, n)
    if n == 0:
        return (math.nan, math.nan)
    z = float(_st.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) binomial interval; conservative, valid for any n."""
    _check_counts(successes, n)
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else float(_st.beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(_st.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return (lo, hi)


Bounds = tuple[float, float] | None


def _clip(lo: float, hi: float, bounds: Bounds) -> tuple[float, float]:
    if bounds is None:
        return lo, hi
    return max(bounds[0], lo), min(bounds[1], hi)


def t_interval(
    estimate: float, se: float, df: float, confidence: float = 0.95, *, bounds: Bounds = None
) -> tuple[float, float, float]:
    """``estimate ± t(df) · se``, clipped to ``bounds``. ``nan`` bounds when se is 0 or not finite."""
    if not (math.isfinite(estimate) and math.isfinite(se)) or se <= 0 or not df >= 1:
        return (float(estimate), math.nan, math.nan)
    t = float(_st.t.ppf(0.5 + confidence / 2, df))
    lo, hi = _clip(estimate - t * se, estimate + t * se, bounds)
    return (float(estimate), float(lo), float(hi))


def mean_t_interval(
    values: Sequence[float], confidence: float = 0.95, *, bounds: Bounds = None, se_floor: float = 0.0
) -> tuple[float, float, float]:
    """Mean and Student-t interval over independent units. Returns ``(mean, lo, hi)``.

    Args:
        values: one number per independent unit (e.g. per training seed).
        confidence: two-sided level.
        bounds: the quantity's range, e.g. ``(0, 1)`` for a mean of fractions; the
            interval is clipped to it.
        se_floor: the standard error is at least this (a spread of exactly 0 among a few
            units is chance, not certainty); with 0 and no spread the bounds are ``nan``.

    A single value gives ``nan`` bounds.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    if x.size == 1:
        return (m, math.nan, math.nan)
    se = max(float(x.std(ddof=1) / math.sqrt(x.size)), se_floor)
    return t_interval(m, se, x.size - 1, confidence, bounds=bounds)


def rate_se_floor(successes: Sequence[int] | np.ndarray, trials: Sequence[int] | np.ndarray) -> float:
    """Standard error of a mean of per-unit rates that no sample can go below.

    Each unit's rate ``k/m`` has binomial sampling variance; with the Agresti–Coull
    adjustment ``p~ = (k + 2) / (m + 4)`` it is positive even at 0/m and m/m. The mean
    over ``n`` units has at least ``mean(p~(1 - p~) / (m + 4)) / n`` variance.
    """
    k = np.asarray(successes, dtype=float)
    m = np.asarray(trials, dtype=float)
    if k.size == 0:
        return 0.0
    p = (k + 2) / (m + 4)
    return float(math.sqrt(float(np.mean(p * (1 - p) / (m + 4))) / k.size))


def _cluster_var(e: np.ndarray, groups: np.ndarray, n_total: int) -> tuple[float, int]:
    """CR1 variance of a mean from residuals ``e`` summed within ``groups``."""
    labels, inv = np.unique(groups, return_inverse=True)
    g = labels.size
    if g < 2:
        return (math.nan, g)
    sums = np.bincount(inv, weights=e, minlength=g)
    return (float(g / (g - 1) * np.sum(sums**2) / n_total**2), g)


def clustered_mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    seeds: Sequence[Any] | np.ndarray | None = None,
    clusters: Sequence[Any] | np.ndarray | None = None,
    confidence: float = 0.95,
    bounds: Bounds = None,
    se_floor: float = 0.0,
) -> dict[str, Any]:
    """Mean of per-observation values with a cluster-robust Student-t interval.

    Args:
        values: (n,) one value per observation (e.g. per prompt and seed: 1 = unsafe).
        seeds: (n,) the training seed of each observation, or None.
        clusters: (n,) the prompt cluster (hazard, template) of each observation, or None.
        confidence: two-sided level.
        bounds: the quantity's range; the interval is clipped to it.
        se_floor: lower bound on the standard error (see :func:`rate_se_floor`).

    Returns:
        ``{"estimate", "lo", "hi", "se", "df", "n_seeds", "n_clusters", "method"}``. With
        both groupings the variance is two-way cluster-robust (Cameron, Gelbach & Miller
        2011: V_seed + V_cluster - V_both, never below the larger of the two one-way
        variances) and df = min(G_seed, G_cluster) - 1; with one grouping, CR1 with G - 1
        df; with neither, the iid t interval.
    """
    y = np.asarray(values, dtype=float)
    n = y.size
    out: dict[str, Any] = {"estimate": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan, "df": 0,
                           "n_seeds": 0, "n_clusters": 0, "method": ""}
    if n == 0:
        return out
    est = float(y.mean())
    e = y - est
    parts, dfs, names = [], [], []
    g_s = g_c = 0
    if seeds is not None:
        v_s, g_s = _cluster_var(e, np.asarray(seeds), n)
        parts.append(v_s)
        dfs.append(g_s - 1)
        names.append(f"{g_s} seeds")
    if clusters is not None:
        v_c, g_c = _cluster_var(e, np.asarray(clusters), n)
        parts.append(v_c)
        dfs.append(g_c - 1)
        names.append(f"{g_c} prompt clusters")
    if not parts:
        var = float(y.var(ddof=1) / n) if n > 1 else math.nan
        df = n - 1
        method = f"Student t over {n} independent units"
    elif len(parts) == 1 or parts[0] <= 1e-30:
        # One grouping -- or seeds whose means agree exactly (e.g. seeds fine-tuned from one base
        # that give the same outputs by construction): the seeds then carry no variance of their
        # own, and the clusters alone set the interval.
        var, df = parts[-1], dfs[-1]
        method = f"cluster-robust (CR1) t over {names[-1]}, df {df}" + (
            f" (the {names[0]} agree exactly)" if len(parts) == 2 else "")
    else:
        both = np.char.add(np.char.add(np.asarray(seeds).astype(str), "\x1f"), np.asarray(clusters).astype(str))
        v_b, _ = _cluster_var(e, both, n)
        var = max(parts[0] + parts[1] - (v_b if math.isfinite(v_b) else 0.0), parts[0], parts[1])
        # df of the scarcer grouping (Cameron, Gelbach & Miller 2011). Welch–Satterthwaite df
        # were tried and cover only ~91% with 3 seeds: 2 df cannot tell a small seed
        # component from an unlucky draw.
        df = min(dfs)
        method = f"two-way cluster-robust t over {names[0]} x {names[1]}, df {df}"
    se = math.sqrt(var) if math.isfinite(var) and var > 0 else 0.0
    if se_floor > se:
        # The groups vary less than sampling alone would make them: the floor (a binomial
        # standard error over all n observations) sets the width, with its own df.
        se, df = se_floor, max(df, n - 1)
        method += "; standard error at its binomial floor"
    est_, lo, hi = t_interval(est, se, df, confidence, bounds=bounds)
    if bounds is not None:
        method += f"; clipped to [{bounds[0]:g}, {bounds[1]:g}]"
    out.update(estimate=est_, lo=lo, hi=hi, se=se, df=df, n_seeds=g_s, n_clusters=g_c, method=method)
    return out


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values (family-wise error control, any dependence)."""
    p = np.asarray(pvalues, dtype=float)
    k = p.size
    order = np.argsort(p)
    adj = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def t_pvalue_greater(estimate: float, se: float, df: float, threshold: float) -> float:
    """One-sided p-value of H0: true value <= threshold against 'greater' (t(df))."""
    if not (math.isfinite(estimate) and math.isfinite(se)) or se <= 0 or not df >= 1:
        return math.nan
    return float(_st.t.sf((estimate - threshold) / se, df))


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    rng: np.random.Generator | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap over the first axis. Returns ``(estimate, lo, hi)``.

    Deterministic: with ``rng=None`` a fixed generator (seed 0) is used, so a report
    re-rendered from the same raw results gives the same interval.
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0:
        return (math.nan, math.nan, math.nan)
    est = float(statistic(x))
    if x.shape[0] == 1:
        return (est, math.nan, math.nan)
    rng = rng if rng is not None else np.random.default_rng(0)
    idx = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    boots = np.array([float(statistic(x[i])) for i in idx])
    alpha = 1 - confidence
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return (est, float(lo), float(hi))


def paired_difference_interval(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, rng: np.random.Generator | None = None
) -> tuple[float, float, float]:
    """Bootstrap interval of mean(a - b) over paired units (e.g. the same seeds)."""
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples need equal shapes, got a={xa.shape}, b={xb.shape}")
    return bootstrap_interval(xa - xb, confidence=confidence, rng=rng)


def format_interval(est: float | None, lo: float | None, hi: float | None, digits: int = 2) -> str:
    """'0.82 [0.71, 0.90]'; missing parts as '–'."""

    def f(v: float | None) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    return f"{f(est)} [{f(lo)}, {f(hi)}]"
