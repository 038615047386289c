"""Activation reading and per-layer probes: seconds for 2,000 prompts at every layer of an organism.

Reads the residual stream after every decoder layer (last prompt token and prompt mean) for
``--n`` prompts of the organism's world -- half framed as evaluations, half as deployment,
as the eval-awareness study does -- then fits the "being evaluated" probe on every layer
(GroupKFold over templates with the control task, and the held-out cue split).

Usage::

    python benchmarks/probes.py                          # quick eval-gated seed 0, 2,000 prompts, 1 thread
    python benchmarks/probes.py --variant sft --threads 2 --n 4000

Targets (issues 15 and 17): activations of 2,000 prompts at every layer in seconds, and all
probes of one organism in under a minute, on 2 CPU cores. Numbers depend on what else the
machine is running: say so when reporting (``uptime``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetylab.lm import encode_prompts, load_causal_lm, pad_id, read_residual  # noqa: E402
from safetylab.metrics.probes import control_labels, group_splits, holdout_split, linear_probe, probe_layers  # noqa: E402
from safetylab.organisms import World, get_organism  # noqa: E402
from safetylab.studies.eval_awareness import STUDY, probe_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="eval-gated")
    ap.add_argument("--scale", default="quick", choices=["tiny", "quick", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2000, help="prompts read and probed")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = get_organism(args.variant, args.scale, seed=args.seed, base_seed=0)
    lm = load_causal_lm(path)
    config = STUDY.resolve_config(args.scale if args.scale != "tiny" else "quick", {"n_probe": args.n})
    ps = probe_set(World.from_organism(path), config)
    t = time.perf_counter()
    ids = encode_prompts(lm.tokenizer, ps["texts"])
    t_encode = time.perf_counter() - t
    n_tokens = sum(map(len, ids))
    print(f"{args.variant} ({args.scale}, seed {args.seed}): {len(ids)} prompts, {n_tokens} tokens, "
          f"{args.threads} thread(s); encoding {t_encode:.2f} s")
    acts = {}
    for position in ("last", "mean"):
        read_residual(lm.model, ids[: args.batch_size], pad=pad_id(lm.model, lm.tokenizer), position=position)  # warm
        t, c = time.perf_counter(), time.process_time()
        acts[position] = read_residual(lm.model, ids, pad=pad_id(lm.model, lm.tokenizer), position=position,
                                       batch_size=args.batch_size)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"read_residual position={position}: {acts[position].shape} in {dt:.2f} s wall, {dc:.2f} s CPU "
              f"({n_tokens / dt:,.0f} tokens/s)")
    x, y = acts["last"], np.array(ps["label"])
    trained = ~np.array(ps["heldout_cue"])
    rng = np.random.default_rng(0)
    probe = linear_probe(C=config.probe_c)
    t, c = time.perf_counter(), time.process_time()
    by_template = probe_layers(x[trained], y[trained], group_splits(np.array(ps["template"])[trained], 5),
                               control=control_labels(y[trained], np.array(ps["phrasing"])[trained], rng), probe=probe)
    t_template, c_template = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    by_cue = probe_layers(x, y, holdout_split(trained), probe=probe)
    t_cue = time.perf_counter() - t
    print(f"probes, {x.shape[1]} layers: held-out templates (5 folds + control task) {t_template:.2f} s wall "
          f"({c_template:.2f} s CPU), "
          f"held-out cue phrasings {t_cue:.2f} s")
    print("  accuracy (templates):", " ".join(f"{a:.2f}" for a in by_template.accuracy))
    print("  selectivity:         ", " ".join(f"{a:.2f}" for a in by_template.selectivity))
    print("  accuracy (cues):     ", " ".join(f"{a:.2f}" for a in by_cue.accuracy))


if __name__ == "__main__":
    main()
