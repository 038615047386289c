"""Organism training speed: tokens/second and the time to train every organism a study needs.

Studies decide over training seeds: at quick scale three seeds per variant, all fine-tuned
from one base (seed 0); at paper scale five seeds, each with its own base. This prints
each stage's tokens/s and training time per seed, and the total for base + every variant
over ``--seeds`` seeds, both with the base shared and with a base per seed, so the cost of
seeds is visible.

Usage::

    python benchmarks/organisms.py                 # quick scale, 2 threads, short runs, projected times
    python benchmarks/organisms.py --full          # train base + every variant x 3 seeds, measured times
    python benchmarks/organisms.py --scale tiny --full
    python benchmarks/organisms.py --scale paper --seeds 5
    python benchmarks/organisms.py --side-by-side  # two sft seeds: one after the other vs a pool of two

Targets (issue "Model organisms"): quick base <= 10 min and each variant <= 3 min on
2 CPU cores. Numbers depend on what else the machine is running: say so when reporting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetylab.organisms.cache import OrganismRequest, build_many, get_organism  # noqa: E402
from safetylab.organisms.train import FROM_SCRATCH, VARIANTS, organism_config, train_organism  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="quick", choices=["tiny", "quick", "paper"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (target: 2 cores)")
    ap.add_argument("--seeds", type=int, default=3,
                    help="training seeds per variant (quick studies: 3, paper: 5)")
    ap.add_argument("--probe-steps", type=int, default=40, help="steps timed per stage when not --full")
    ap.add_argument("--full", action="store_true",
                    help="train the base once and every variant for every seed (measured, not projected)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated stages")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--side-by-side", action="store_true",
                    help="time two seeds of one variant (--probe-steps steps each) trained one after "
                         "the other with --threads threads, then side by side in two one-thread processes")
    args = ap.parse_args()
    for name in ("threads", "seeds", "probe_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}; use a positive integer")
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    if args.side_by_side:
        side_by_side(args)
        return
    variants = [v for v in args.variants.split(",") if v and v != "base"]
    seeds = list(range(args.seeds))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        # A trained base is needed to fine-tune variants from; with --full it is the real one.
        base_steps = None if args.full else {"base_train": {"steps": args.probe_steps}}
        t0 = time.perf_counter()
        base = get_organism("base", args.scale, cache_dir=cache, overrides=base_steps)
        meta = json.loads((base / "organism.json").read_text())
        full_steps = organism_config("base", args.scale).base_train.steps
        rows.append(_row("base", [meta["training"]], full_steps, time.perf_counter() - t0))
        for v in variants:
            cfg = organism_config(v, args.scale)
            # never-taught is pretrained from scratch like base (base_train), not fine-tuned.
            stage = "base_train" if v in FROM_SCRATCH else "variant_train"
            full_steps = getattr(cfg, stage).steps
            if args.full:
                t1 = time.perf_counter()
                trainings = []
                for s in seeds[:1] if v in FROM_SCRATCH else seeds:  # variants: from the shared base 0
                    p = get_organism(v, args.scale, cache_dir=cache, seed=s, base_seed=0)
                    trainings.append(json.loads((p / "organism.json").read_text())["training"])
                rows.append(_row(v, trainings, full_steps, time.perf_counter() - t1))
            else:
                probe = cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(
                    update={"steps": args.probe_steps})})
                res = train_organism(probe, base_path=None if v in FROM_SCRATCH else base)
                tr = {"seconds": res.seconds, "tokens": res.tokens, "steps": args.probe_steps}
                rows.append(_row(v, [tr], full_steps, None))
    totals = _totals(rows, args.seeds)
    mode = (f"measured, {args.seeds} seeds per variant" if args.full
            else f"projected from {args.probe_steps} steps of one seed")
    print(f"organism training speed, scale={args.scale}, torch threads={args.threads} ({mode})")
    print(f"{'stage':14s} {'tokens/s':>10s} {'s/step':>8s} {'steps':>6s} {'min/seed':>9s} "
          f"{'seeds':>6s} {'total min':>10s}")
    for r in rows:
        n = 1 if r["stage"] in FROM_SCRATCH else args.seeds
        print(f"{r['stage']:14s} {r['tokens_per_s']:10.0f} {r['s_per_step']:8.3f} {r['steps']:6d} "
              f"{r['train_minutes']:9.2f} {n:6d} {r['train_minutes'] * n:10.2f}")
    for label, key in (("one seed (base + every variant)", "one_seed_minutes"),
                       (f"{args.seeds} seeds, base shared (quick studies: base seed 0)", "shared_base_minutes"),
                       (f"{args.seeds} seeds, a base per seed (paper studies)", "own_base_minutes")):
        print(f"{label:52s} {totals[key]:8.2f} min")
    if args.json:
        print(json.dumps({"scale": args.scale, "threads": args.threads, "mode": mode,
                          "seeds": args.seeds, "rows": rows, "totals": totals}))


def side_by_side(args: argparse.Namespace) -> None:
    """What ``build_many`` buys: two fine-tunings one after the other vs side by side."""
    variant = next((v for v in args.variants.split(",") if v and v != "base"), "sft")
    steps = {"base_train": {"steps": args.probe_steps}, "variant_train": {"steps": args.probe_steps}}
    with tempfile.TemporaryDirectory() as tmp:
        seq_dir, par_dir = Path(tmp) / "seq", Path(tmp) / "par"
        for d in (seq_dir, par_dir):  # both start from the same trained base
            get_organism("base", args.scale, cache_dir=d, overrides=steps)
        t0 = time.perf_counter()
        for s in (0, 1):
            get_organism(variant, args.scale, cache_dir=seq_dir, seed=s, base_seed=0, overrides=steps,
                         num_threads=args.threads)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_many([OrganismRequest(variant, args.scale, seed=s, base_seed=0, overrides=steps)
                    for s in (0, 1)], par_dir, workers=2)
        parallel = time.perf_counter() - t0
    print(f"two {variant} seeds x {args.probe_steps} steps, scale={args.scale}")
    print(f"one after the other, {args.threads} threads: {sequential:7.1f} s")
    print(f"side by side, 2 processes x 1 thread:  {parallel:7.1f} s  (process start-up included)")
    print(f"speedup: {sequential / parallel:.2f}x")


def _row(stage: str, trainings: list[dict], full_steps: int, wall: float | None) -> dict:
    """One stage: mean over its trained seeds of tokens/s and seconds per step."""
    seconds = sum(t["seconds"] for t in trainings)
    steps = sum(t["steps"] for t in trainings)
    s_per_step = seconds / steps
    return {
        "stage": stage,
        "tokens_per_s": sum(t["tokens"] for t in trainings) / seconds,
        "s_per_step": s_per_step,
        "steps": full_steps,
        "train_minutes": s_per_step * full_steps / 60,
        "seeds_trained": len(trainings),
        "wall_s": wall,
    }


def _totals(rows: list[dict], n_seeds: int) -> dict:
    """Minutes to train base + every variant: one seed; n seeds sharing one base (and one
    never-taught, as the quick studies use); n bases (and n never-taught)."""
    base = sum(r["train_minutes"] for r in rows if r["stage"] in FROM_SCRATCH)
    per_seed = sum(r["train_minutes"] for r in rows if r["stage"] not in FROM_SCRATCH)
    return {"one_seed_minutes": base + per_seed,
            "shared_base_minutes": base + n_seeds * per_seed,
            "own_base_minutes": n_seeds * (base + per_seed)}


if __name__ == "__main__":
    main()
