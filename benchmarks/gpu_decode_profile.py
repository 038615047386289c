"""Where the static decoder's time goes in the 7B-shaped early-exit sweep (GPU diagnostic).

Prints, for the sweep of ``benchmarks/early_exit.py --random-arch mistral-7b``:

1. the whole sweep, cold (as the benchmark times it) and warm, broken down into
   prefill, cache set-up, graph captures, the decode loops and token collection;
2. the same with RMSNorm modules instead of the fused norm, and with cuDNN attention
   allowed (first time and again: its per-shape graph builds);
3. one decode step's time per depth, replayed from its graph, against the step's
   matrix-product FLOPs (fused and unfused projections);
4. the kernels of one eager full-depth step (torch.profiler), by GPU time;

Usage (from the repository root, on a GPU machine)::

    PYTHONPATH=src python3 benchmarks/gpu_decode_profile.py
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


@torch.inference_mode()  # as the sweep runs
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-arch", default="mistral-7b", choices=["mistral-7b", "mistral-tiny"])
    p.add_argument("--n-prompts", type=int, default=250)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-sweeps", action="store_true", help="only sections 3-4")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, "gpu_decode_profile.py: no CUDA device here; run it on a GPU machine, or pass --device cpu "
                  "(with --random-arch mistral-tiny) to try it\n")

    import early_exit as bench

    from safetylab.lm import decode as decode_mod
    from safetylab.lm import generate as gen
    from safetylab.lm.layers import find_decoder_stack
    from safetylab.lm.truncate import evenly_spread_depths

    cuda = args.device.startswith("cuda")

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = now()
    model, prompts, eos, pad, what = bench.random_setup(argparse.Namespace(
        random_arch=args.random_arch, n_prompts=args.n_prompts, device=args.device, dtype=args.dtype))
    stack = find_decoder_stack(model)
    depths = evenly_spread_depths(stack.n_layers, 7)
    print(f"model {what}: built in {now() - t0:.1f} s; depths {depths}", flush=True)
    kw = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad=pad, batch_size=256)

    # 1-2. sweeps, each broken down by synchronising timers around its pieces
    def sweep(label: str) -> None:
        spent: dict[str, float] = defaultdict(float)
        pieces = [(gen, "_shared_prefill", "prefill (full depth, hooks)"), (gen, "_readout_stats", "readout stats"),
                  (gen, "_first_token", "first tokens"), (decode_mod.StaticDecoder, "start", "static cache set-up"),
                  (decode_mod.StaticDecoder, "_capture", "graph captures"), (decode_mod, "collect_steps", "collect tokens"),
                  (decode_mod.StaticDecoder, "decode", "decode (all of it)")]
        saved = []
        for owner, attr, name in pieces:
            inner = getattr(owner, attr)
            saved.append((owner, attr, inner))

            def wrapper(*a, _inner=inner, _name=name, **k):
                t = now()
                try:
                    return _inner(*a, **k)
                finally:
                    spent[_name] += now() - t

            setattr(owner, attr, wrapper)
        try:
            t0 = now()
            readout = gen.empty_readout(len(prompts), stack.n_layers)
            gen.generate_at_depths(model, prompts, depths, readout=readout, **kw)
            total = now() - t0
        finally:
            for owner, attr, inner in saved:
                setattr(owner, attr, inner)
        loop = spent["decode (all of it)"] - spent["graph captures"] - spent["collect tokens"]
        parts = ", ".join(f"{name.split(' (')[0]} {s:.3f}" for name, s in spent.items() if name != "decode (all of it)")
        print(f"sweep, {label}: {total:.2f} s = {parts}, decode loops {loop:.3f} "
              f"({1e3 * loop / (len(depths) * (args.max_new_tokens - 1)):.2f} ms a step)", flush=True)

    gen.generate_at_depths(model, prompts[:4], depths[:1], max_new_tokens=2, eos=eos, pad=pad)  # as the benchmark
    if not args.skip_sweeps:
        sweep("cold (as the benchmark times it)")
        sweep("warm")
        real = gen.StaticDecoder
        gen.StaticDecoder = functools.partial(real, fused_norm=False)
        sweep("warm, RMSNorm modules instead of fused")
        gen.StaticDecoder = real
        kernels = decode_mod.attention_kernels
        decode_mod.attention_kernels = lambda device: contextlib.nullcontext()
        sweep("cuDNN attention allowed, first time")
        sweep("cuDNN attention allowed, again")
        decode_mod.attention_kernels = kernels

    # 3. one step per depth, replayed from its graph (attention kernels as decode() picks them)
    kernels_ctx = contextlib.ExitStack()
    kernels_ctx.enter_context(decode_mod.attention_kernels(torch.device(args.device)))
    batch = prompts[:256]
    prefill = gen._shared_prefill(model, stack, batch, pad)
    cfg = model.config
    per_layer = 2 * (cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
                     + cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    n = len(batch)

    def first_step(state, k):
        """The buffers of depth k's first decode step, as StaticDecoder.decode sets them up."""
        valid = torch.zeros((n, state.keys[0].shape[2]), dtype=torch.bool, device=args.device)
        valid[:, : state.width] = state.prompt_mask
        column = torch.full((1,), state.width, dtype=torch.long, device=args.device)
        return gen._first_token(stack, prefill, k), state.lengths.clone(), column, valid

    for fuse in (False, True):
        if not cuda:
            break
        dec = decode_mod.StaticDecoder(model, stack, fuse=fuse)
        state = dec.start(prefill.cache, prefill.mask, args.max_new_tokens)
        print(f"\none step from its graph, fuse={fuse} (batch {n}):")
        sum_ms = 0.0
        for k in depths:
            tokens, positions, column, valid = first_step(state, k)
            graph, _ = dec._capture(k, tokens, positions, column, state.keys, state.values, valid)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            sum_ms += ms
            flops = n * (k * per_layer + head)
            print(f"  depth {k:2d}: {ms:6.2f} ms  ({flops / ms / 1e9:6.0f} TFLOP/s of matrix products)")
            del graph
        print(f"  x {args.max_new_tokens - 1} steps each: {sum_ms * (args.max_new_tokens - 1) / 1e3:.2f} s", flush=True)
        del dec, state

    # 4. kernels of one eager full-depth step
    dec = decode_mod.StaticDecoder(model, stack)
    state = dec.start(prefill.cache, prefill.mask, args.max_new_tokens)
    k = stack.n_layers
    tokens, positions, column, valid = first_step(state, k)
    n_cols = state.keys[0].shape[2]
    for _ in range(2):
        dec._step(k, tokens, positions, column, state.keys, state.values, valid, n_cols)
    now()
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        dec._step(k, tokens, positions, column, state.keys, state.values, valid, n_cols)
        now()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"\none eager step at depth {k}, by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"GPU kernels in the step: {len(events)}; their summed time {sum(e.device_time for e in events) / 1e3:.2f} ms")

    kernels_ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
