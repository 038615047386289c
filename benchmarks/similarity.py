"""Benchmark: linear CKA in feature space vs the naive n×n Gram-matrix form.

Run: ``PYTHONPATH=src python benchmarks/similarity.py [--n 10000] [--d 1024]``.

The feature-space form (``safetylab.metrics.similarity.linear_cka``) needs
O(n·d + d²) memory; the naive form builds two n×n Gram matrices and their
centred copies, O(n²) — 3.2 GB of float64 at n = 10,000, and 80 GB at n = 50,000,
where only the feature-space form fits in memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from safetylab.metrics.similarity import linear_cka


def naive_gram_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook CKA: HSIC(K, L) = tr(KHLH)/(n−1)² with K = XXᵀ, L = YYᵀ (builds n×n matrices)."""
    k = x @ x.T  # (n, n)
    l = y @ y.T  # (n, n)

    def centre(g: np.ndarray) -> np.ndarray:
        return g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()

    kc, lc = centre(k), centre(l)
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples")
    parser.add_argument("--d", type=int, default=1024, help="features per representation")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d))
    y = x @ rng.normal(size=(args.d, args.d)) * 0.1 + rng.normal(size=(args.n, args.d))

    def best(fn) -> tuple[float, float]:
        times, value = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            value = fn(x, y)
            times.append(time.perf_counter() - t0)
        return min(times), value

    t_fast, v_fast = best(linear_cka)
    t_naive, v_naive = best(naive_gram_linear_cka)
    gram_gb = 4 * args.n**2 * 8 / 1e9
    feat_mb = (3 * args.d**2 + 2 * args.n * args.d) * 8 / 1e6  # d×d products + centred copies
    print(f"linear CKA, n={args.n}, d={args.d} (float64, best of {args.repeats})")
    print(f"  feature space : {t_fast:8.3f} s   value {v_fast:.6f}   extra memory ~{feat_mb:.0f} MB (d×d products, centred copies)")
    print(f"  naive Gram    : {t_naive:8.3f} s   value {v_naive:.6f}   extra memory ~{gram_gb:.1f} GB (n×n matrices)")
    print(f"  speed-up {t_naive / t_fast:.1f}×, |difference| = {abs(v_fast - v_naive):.2e}")


if __name__ == "__main__":
    main()
