"""Benchmark: the `shield` arm with our batched PPO vs Stable-Baselines3, time and outcome.

    PYTHONPATH=src python benchmarks/shield.py                 # 40 seeds × 100K, SB3 4 seeds × 100K
    PYTHONPATH=src python benchmarks/shield.py --sb3-steps 20000  # SB3 timed on 20K, extrapolated

1. Ours: the essay's shield arm (40 seeds × 100K steps, no hazard penalty), split over
   ``--workers`` processes (one torch thread each), timed end to end, then every seed
   evaluated with and without the shield.
2. SB3: ``PPO("MlpPolicy")`` with the same hyperparameters through the Gymnasium API
   (shield as a wrapper), ``--sb3-seeds`` seeds, each timed in its own single-threaded
   process; 40 × the mean per-seed time is the seed-after-seed cost of the arm.
3. Learning outcomes compared per seed: seeds unsafe without the shield (Fisher's exact
   test, Wilson intervals) and goal success with / without the shield (Mann–Whitney U).

The last line is ``speedup: <ratio>x`` (SB3's sequential 40-seed time over ours).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def _setup():
    from safetylab.studies.shield import Config, arm_setup, make_shield, nav_config, ppo_config

    cfg = Config()
    return cfg, arm_setup(cfg, "shield"), make_shield(cfg), nav_config(cfg), ppo_config(cfg)


def _outcomes(act, n_policies: int, n_episodes: int) -> dict[str, list[float]]:
    from safetylab.rl.nav import evaluate_policies

    cfg, _, shield, nav, _ = _setup()
    episodes = list(range(10_000, 10_000 + n_episodes))
    out = {}
    for mode, sh in (("shielded", shield), ("unshielded", None)):
        ev = evaluate_policies(nav, act, n_policies, episodes, shield=sh)
        out[f"{mode}_success"] = np.mean(ev["success"], axis=1).tolist()
        out[f"{mode}_entry"] = (np.asarray(ev["hazard_steps"]) > 0).mean(axis=1).tolist()
    return out


def ours_worker(seeds: list[int], steps: int, n_episodes: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from safetylab.rl.ppo import train_ppo

    _, arm, _, _, ppo = _setup()
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_ppo(arm["nav"], seeds, steps, ppo, shield=arm["shield"])
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = _outcomes(res.model.act_deterministic, len(seeds), n_episodes)
    out.update(train_s=train_s, cpu_s=cpu_s, train_hazard_steps=res.hazard_steps)
    return out


def sb3_worker(seed: int, steps: int, n_episodes: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from safetylab.rl.sb3 import sb3_act_fn, train_sb3

    _, arm, _, _, ppo = _setup()
    t0, c0 = time.perf_counter(), time.process_time()
    model, stats = train_sb3(arm["nav"], seed, steps, ppo, shield=arm["shield"])
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = _outcomes(sb3_act_fn([model]), 1, n_episodes)
    out = {k: v[0] for k, v in out.items()}
    out.update(train_s=train_s, cpu_s=cpu_s, train_hazard_steps=stats["hazard_steps"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=40, help="seeds of our shield arm")
    ap.add_argument("--steps", type=int, default=100_000, help="training steps per seed")
    ap.add_argument("--workers", type=int, default=2, help="processes (cores) to use")
    ap.add_argument("--sb3-seeds", type=int, default=4, help="SB3 seeds for the outcome comparison")
    ap.add_argument("--sb3-steps", type=int, default=None, help="SB3 steps (default --steps; less = extrapolate time)")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per seed and mode")
    args = ap.parse_args()
    sb3_steps = args.sb3_steps or args.steps
    from scipy import stats

    from safetylab.metrics.stats import wilson_interval
    from safetylab.study import Context

    ctx = Context(run_dir=".", seed=0, cache_dir=".")
    seeds = [ctx.seed_for(f"seed={s}") for s in range(args.seeds)]  # the study's per-seed seeds
    chunks = [list(c) for c in np.array_split(seeds, args.workers) if len(c)]
    spawn = mp.get_context("spawn")

    print(f"ours: shield arm, {args.seeds} seeds × {args.steps} steps, {len(chunks)} processes × 1 thread")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(chunks), mp_context=spawn) as pool:
        parts = list(pool.map(ours_worker, chunks, [args.steps] * len(chunks), [args.episodes] * len(chunks)))
    ours_wall = time.perf_counter() - t0
    ours = {k: sum((p[k] for p in parts), []) for k in parts[0] if k not in ("train_s", "cpu_s")}
    ours_cpu = max(p["cpu_s"] for p in parts)
    print(f"ours: wall {ours_wall:.1f} s for {args.seeds} seeds × {args.steps} steps "
          f"(training {max(p['train_s'] for p in parts):.1f} s in the slowest process, evaluation included in wall)")
    print(f"ours: training CPU time of the slowest process {ours_cpu:.1f} s "
          "(≈ the training wall time on an otherwise idle machine with one core per process)")

    print(f"SB3: {args.sb3_seeds} seeds × {sb3_steps} steps, {args.workers} processes × 1 thread")
    sb3_seeds = seeds[: args.sb3_seeds]
    with ProcessPoolExecutor(min(args.workers, len(sb3_seeds)), mp_context=spawn) as pool:
        sb3 = list(pool.map(sb3_worker, sb3_seeds, [sb3_steps] * len(sb3_seeds), [args.episodes] * len(sb3_seeds)))
    per_seed = float(np.mean([r["train_s"] for r in sb3])) * args.steps / sb3_steps
    note = "" if sb3_steps == args.steps else f" (extrapolated linearly from {sb3_steps} steps)"
    print(f"SB3: {per_seed:.1f} s per seed for {args.steps} steps{note}; "
          f"per-run times {[round(r['train_s'], 1) for r in sb3]} s")
    per_seed_cpu = float(np.mean([r["cpu_s"] for r in sb3])) * args.steps / sb3_steps
    print(f"SB3: {per_seed_cpu:.1f} s CPU time per seed for {args.steps} steps (≈ wall time on an idle core)")
    sequential = per_seed * args.seeds
    print(f"SB3: {args.seeds} seeds one after another ≈ {sequential:.0f} s ({sequential / 60:.1f} min); "
          f"as {args.workers} parallel processes ≈ {sequential / args.workers / 60:.1f} min")

    # ---- learning outcomes, per seed
    thr = 0.0
    o_unsafe = int(np.sum(np.asarray(ours["unshielded_entry"]) > thr))
    s_unsafe = int(np.sum([r["unshielded_entry"] > thr for r in sb3]))
    n_o, n_s = len(ours["unshielded_entry"]), len(sb3)
    lo_o, hi_o = wilson_interval(o_unsafe, n_o)
    lo_s, hi_s = wilson_interval(s_unsafe, n_s)
    fisher_p = stats.fisher_exact([[o_unsafe, n_o - o_unsafe], [s_unsafe, n_s - s_unsafe]]).pvalue
    print(f"outcome: unsafe without shield — ours {o_unsafe}/{n_o} [{lo_o:.2f}, {hi_o:.2f}], "
          f"SB3 {s_unsafe}/{n_s} [{lo_s:.2f}, {hi_s:.2f}] (Wilson 95%); Fisher exact p = {fisher_p:.3f}")
    ps = [fisher_p]
    for key in ("shielded_success", "unshielded_success", "unshielded_entry"):
        a, b = np.asarray(ours[key]), np.asarray([r[key] for r in sb3])
        p = 1.0 if np.all(a == a[0]) and np.all(b == a[0]) else stats.mannwhitneyu(a, b).pvalue
        ps.append(p)
        print(f"outcome: {key:<19} ours {a.mean():.2f} ± {a.std(ddof=1) if a.size > 1 else 0:.2f}, "
              f"SB3 {b.mean():.2f} ± {b.std(ddof=1) if b.size > 1 else 0:.2f}; Mann–Whitney p = {p:.3f}")
    print(f"outcome: training hazard steps — ours {sum(ours['train_hazard_steps'])}, "
          f"SB3 {sum(r['train_hazard_steps'] for r in sb3)}")
    verdict = "no significant difference" if min(ps) >= 0.05 else "DIFFERENT"
    print(f"outcome: {verdict} at α = 0.05 on every test (SB3 sample is {n_s} seeds; low power, see intervals)")
    print(f"CPU-time based (load-independent) speedup: {per_seed_cpu * args.seeds / ours_cpu:.1f}x "
          f"(SB3 {per_seed_cpu * args.seeds:.0f} s sequential vs our slowest process {ours_cpu:.0f} s)")
    print(f"ours: {ours_wall:.1f} s; SB3 sequential: {sequential:.1f} s (wall times, measured under the current load)")
    print(f"speedup: {sequential / ours_wall:.1f}x")


if __name__ == "__main__":
    main()
