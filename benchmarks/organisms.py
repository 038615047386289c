"""Organism training speed: tokens/second and (projected or measured) training times.

Usage::

    python benchmarks/organisms.py                 # quick scale, 2 threads, short runs, projected times
    python benchmarks/organisms.py --full          # train the full quick base + variants, measured times
    python benchmarks/organisms.py --scale tiny --full

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

from safetylab.organisms.cache import get_organism  # noqa: E402
from safetylab.organisms.train import VARIANTS, organism_config, train_organism  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="quick", choices=["tiny", "quick", "paper"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (target: 2 cores)")
    ap.add_argument("--probe-steps", type=int, default=40, help="steps timed per stage when not --full")
    ap.add_argument("--full", action="store_true", help="train every stage fully (measured, not projected)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated stages")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        # A trained base is needed to fine-tune variants from; with --full it is the real one.
        base_steps = None if args.full else {"base_train": {"steps": args.probe_steps}}
        t0 = time.perf_counter()
        base = get_organism("base", args.scale, cache_dir=cache, overrides=base_steps)
        meta = json.loads((base / "organism.json").read_text())
        full_steps = organism_config("base", args.scale).base_train.steps
        rows.append(_row("base", meta["training"], full_steps, time.perf_counter() - t0))
        for v in variants:
            if v == "base":
                continue
            cfg = organism_config(v, args.scale)
            if args.full:
                t1 = time.perf_counter()
                p = get_organism(v, args.scale, cache_dir=cache)
                m = json.loads((p / "organism.json").read_text())
                rows.append(_row(v, m["training"], cfg.variant_train.steps, time.perf_counter() - t1))
            else:
                probe = cfg.model_copy(update={"variant_train": cfg.variant_train.model_copy(
                    update={"steps": args.probe_steps})})
                res = train_organism(probe, base_path=base)
                tr = {"seconds": res.seconds, "tokens": res.tokens, "steps": args.probe_steps,
                      "tokens_per_s": res.tokens / res.seconds}
                rows.append(_row(v, tr, cfg.variant_train.steps, None))
    mode = "measured" if args.full else f"projected from {args.probe_steps} steps"
    print(f"organism training speed, scale={args.scale}, torch threads={args.threads} ({mode})")
    print(f"{'stage':14s} {'tokens/s':>10s} {'s/step':>8s} {'steps':>6s} {'train min':>10s}")
    for r in rows:
        print(f"{r['stage']:14s} {r['tokens_per_s']:10.0f} {r['s_per_step']:8.3f} {r['steps']:6d} "
              f"{r['train_minutes']:10.2f}")
    if args.json:
        print(json.dumps({"scale": args.scale, "threads": args.threads, "mode": mode, "rows": rows}))


def _row(stage: str, training: dict, full_steps: int, wall: float | None) -> dict:
    s_per_step = training["seconds"] / training["steps"]
    return {
        "stage": stage,
        "tokens_per_s": training["tokens_per_s"] if "tokens_per_s" in training else training["tokens"] / training["seconds"],
        "s_per_step": s_per_step,
        "steps": full_steps,
        "train_minutes": s_per_step * full_steps / 60,
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
