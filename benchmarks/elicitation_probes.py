"""Elicitation probes: seconds to read 2,000 probe requests at every layer and fit all probes of one organism.

Reads the residual stream after every decoder layer at the last prompt token for the
elicitation study's probe set -- ``--n`` requests (half hazard requests, half look-alikes
with the same template) plus one next-step prompt per hazard request -- and fits every
probe the study fits for one organism: the refusal direction per layer (difference of
means), the next-step knowledge probe with it projected out (fitted on covered hazards,
scored item by item on held-out hazards), the same held-out probe with the
direction kept, and the forbidden-vs-look-alike probe with the direction kept and removed.

Usage::

    python benchmarks/elicitation_probes.py                    # quick base seed 0, 2,000 requests, paper probe settings
    python benchmarks/elicitation_probes.py --variant sft --threads 1 --n 1000

Target (issue 17): activations of 2,000 prompts at every layer and all probes of one
organism in under a minute on 2 CPU cores. Numbers depend on what else the machine runs:
report ``uptime`` beside them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetylab.lm import load_causal_lm, pad_id, read_residual  # noqa: E402
from safetylab.organisms import World, get_organism  # noqa: E402
from safetylab.studies.elicitation import STUDY, _ids, probe_all, probe_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="base")
    ap.add_argument("--scale", default="quick", choices=["tiny", "quick", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2000, help="probe requests (plus n/2 next-step prompts)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (one is fastest for these sizes)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    path = get_organism(args.variant, args.scale, seed=args.seed, base_seed=0)
    lm = load_causal_lm(path)
    config = STUDY.resolve_config("paper", {"organism_scale": args.scale, "n_probe": args.n})
    ps = probe_set(World.from_organism(path), config)
    with threadpool_limits(limits=args.threads):
        t = time.perf_counter()
        acts = read_residual(lm.model, _ids(lm.tokenizer, ps, np.arange(len(ps["text"]))),
                             pad=pad_id(lm.model, lm.tokenizer), batch_size=config.batch_size)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        probes = probe_all(acts, ps, config)
        probe_s = time.perf_counter() - t
    print(f"{args.variant} ({args.scale}, seed {args.seed}), {args.threads} thread(s): {acts.shape[0]} prompts x "
          f"{acts.shape[1]} layers read in {read_s:.1f} s; all probes in {probe_s:.1f} s; "
          f"total {read_s + probe_s:.1f} s")
    k = probes["knowledge"]["heldout"]
    print("next-step log-loss on held-out hazards (refusal direction removed), by layer:",
          np.round(np.mean(k["log_loss"], axis=1), 3).tolist())


if __name__ == "__main__":
    main()
