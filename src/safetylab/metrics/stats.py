"""Intervals and tests used by every study's verdict. Pure functions; floats out.

References: Wilson (1927) score interval; Clopper & Pearson (1934) exact interval;
Efron & Tibshirani (1993) percentile bootstrap.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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


def mean_t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval. Returns ``(mean, lo, hi)``; a single value gives nan bounds."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    if x.size == 1:
        return (m, math.nan, math.nan)
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    if se == 0.0:
        return (m, m, m)
    t = float(_st.t.ppf(0.5 + confidence / 2, x.size - 1))
    return (m, m - t * se, m + t * se)


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
