"""Benchmark: relative error against model evaluations for each rare-event estimator.

The problem is the analytic toy of :mod:`safetylab.metrics.rare_events` at ``p = 1e-6``
(a far half-space of ``N(0, I_d)``, default ``d = 5``): its exact p is known, so the
relative error of each estimator is measured, not estimated -- the root mean square of
``p_hat / p - 1`` over independent repeats at each budget. Plain Monte Carlo's relative
error is analytic, ``sqrt((1 - p) / (n p))``; it needs ``(1 - p) / (p 0.2^2)`` draws
(25 million at 1e-6) for 20%, far beyond what is worth simulating, so its row is the
formula beside a measured check at the largest budget. Importance sampling (defensive
mean-shift mixture) and adaptive multilevel splitting (a Student t over independent runs) are
run at growing budgets until their relative error is at most 20%.

The last line is ``speedup: <ratio>x``: Monte Carlo's evaluations for 20% relative error
over the fewest evaluations at which importance sampling or splitting reached it.

Usage::

    python benchmarks/rare_events.py                 # p = 1e-6, d = 5, 40 repeats per budget
    python benchmarks/rare_events.py --p 1e-9 --dim 20 --repeats 20
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from safetylab.metrics.rare_events import (
    ESTIMATORS, SPLITTING_RUNS, GaussianHalfSpace, mc_evaluations_for_relative_error,
)

TARGET = 0.2


def relative_rmse(name: str, problem: GaussianHalfSpace, budget: int, repeats: int, seed: int) -> tuple[float, float, int]:
    """Root-mean-square relative error, interval coverage and mean evaluations at ``budget``."""
    errs, cover, evals = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats):
            e = ESTIMATORS[name](problem, budget, np.random.default_rng([seed, r, budget]))
            errs.append(e.estimate / problem.p - 1.0)
            cover += e.covers(problem.p)
            evals += e.n_evaluations
    return float(np.sqrt(np.mean(np.square(errs)))), cover / repeats, evals // repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=float, default=1e-6, help="failure probability of the toy")
    ap.add_argument("--dim", type=int, default=5, help="dimension of the Gaussian half-space")
    ap.add_argument("--repeats", type=int, default=40, help="independent runs per budget")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    problem = GaussianHalfSpace.at_probability(args.p, args.dim, np.random.default_rng(args.seed))
    mc_need = mc_evaluations_for_relative_error(problem.p, TARGET)
    print(f"toy: N(0, I_{args.dim}) half-space, p = {problem.p:.3g}; {args.repeats} repeats per budget")
    print(f"{'estimator':<20} {'evaluations':>12} {'rel. error':>10} {'coverage':>9} {'seconds':>8}")
    for n in (10**5, 10**6, int(mc_need)):
        print(f"{'monte-carlo (formula)':<20} {n:>12,} {math.sqrt((1 - problem.p) / (n * problem.p)):>10.3f} {'':>9} {'':>8}")
    t = time.perf_counter()
    rmse, cov, ev = relative_rmse("monte-carlo", problem, 10**5, min(args.repeats, 10), args.seed)
    print(f"{'monte-carlo (run)':<20} {ev:>12,} {rmse:>10.3f} {cov:>9.2f} {time.perf_counter() - t:>8.1f}")
    reached: dict[str, int] = {}
    # Splitting needs about 20 particles x (1 + 15 ln(1/p)) evaluations per run, and runs SPLITTING_RUNS of them
    # (its interval is a Student t over the runs).
    start = {"importance-sampling": 100,
             "splitting": int(SPLITTING_RUNS * 20 * (1 + 15 * math.log(1 / problem.p)))}
    for name in ("importance-sampling", "splitting"):
        budget = start[name]
        while budget <= 10**6:
            t = time.perf_counter()
            rmse, cov, ev = relative_rmse(name, problem, budget, args.repeats, args.seed)
            print(f"{name:<20} {ev:>12,} {rmse:>10.3f} {cov:>9.2f} {time.perf_counter() - t:>8.1f}")
            if rmse <= TARGET:
                reached[name] = ev
                break
            budget = int(budget * 2)
    for name, ev in reached.items():
        print(f"{name}: {TARGET:.0%} relative error at {ev:,} evaluations vs Monte Carlo's {mc_need:,.0f} "
              f"({mc_need / ev:,.0f}x fewer)")
    if not reached:
        print("speedup: 0x (neither importance sampling nor splitting reached 20% relative error)")
        return
    print(f"speedup: {mc_need / min(reached.values()):.0f}x")


if __name__ == "__main__":
    main()
