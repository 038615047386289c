"""Top Hessian eigenvalues of an organism's safety loss: seconds for Lanczos on torch.func HVPs.

The safety loss is the stability study's: next-token NLL of the refusal on ``--pairs``
covered-hazard requests plus their paired look-alike answers (training templates, drawn with
``--data-seed``; the sft objective without its benign replay). Lanczos with full
reorthogonalisation runs ``--iter`` Hessian-vector products (:mod:`safetylab.metrics.curvature`)
and reports the top ``--k`` eigenvalues with their residual bounds.

Usage::

    python benchmarks/hessian.py                         # quick sft seed 0, 8 pairs, top 5, 20 iterations, 1 thread
    python benchmarks/hessian.py --threads 2 --mode forward --iter 30

Target (issue 16): top-5 eigenvalues of a quick organism's safety loss in under 30 s on 2 CPU
cores. Numbers depend on what else the machine is running: say so when reporting (``uptime``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetylab.metrics.curvature import (  # noqa: E402
    functional_loss, gradient, hvp_fn, lanczos_top_eigenvalues, trainable_params,
)
from safetylab.organisms import World, get_organism  # noqa: E402
from safetylab.organisms.finetune import collate_examples, lm_loss, safety_examples  # noqa: E402
from safetylab.organisms.train import Batcher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sft")
    ap.add_argument("--scale", default="quick", choices=["tiny", "quick", "paper"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=8, help="refusal + look-alike pairs in the safety-loss batch")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--iter", type=int, default=20, help="Lanczos iterations (HVPs)")
    ap.add_argument("--mode", default="reverse", choices=["reverse", "forward"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = get_organism(args.variant, args.scale, seed=args.seed, base_seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    world = World.from_organism(path)
    batch = collate_examples(Batcher(tok, model.config.max_position_embeddings),
                             safety_examples(world, args.pairs, np.random.default_rng(args.data_seed)))
    params = trainable_params(model)
    f = functional_loss(model, lm_loss, batch)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    g = gradient(f, params)
    t_grad = time.perf_counter() - wall0
    hv = hvp_fn(f, params, args.mode)
    res = lanczos_top_eigenvalues(hv, g.numel(), k=args.k, n_iter=args.iter)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"organism {args.variant} {args.scale} seed {args.seed}: {g.numel():,} parameters; safety-loss batch "
          f"{tuple(batch['input_ids'].shape)} ({args.pairs} refusals + {args.pairs} look-alikes, "
          f"{int((batch['labels'] != -100).sum())} response tokens), loss {float(f(params)):.4g}")
    print(f"threads {args.threads}, mode {args.mode}, load average {os.getloadavg()[0]:.1f}")
    print(f"gradient {t_grad:.2f} s; Lanczos {res.n_iter} HVPs {res.seconds:.2f} s "
          f"({res.seconds / res.n_iter:.2f} s per HVP); total {wall:.2f} s wall, {cpu:.2f} s CPU")
    print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in res.eigenvalues))
    print("residual bounds: " + ", ".join(f"{r:.1e}" for r in res.residuals))


if __name__ == "__main__":
    main()
