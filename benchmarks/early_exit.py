"""Benchmark: the early-exit sweep the essay's way vs safetylab's way.

The essay's way: batch 1, every layer after the exit replaced by identity, Transformers'
``generate`` once per prompt per depth. safetylab's way: prompts left-padded into
batches, KV-cached greedy decoding once per depth (or all depths in one mixed-depth
batch with ``--mixed``), plus the all-depth first-token readout in one forward pass.
Both ways are checked token for token (any prompt where padding changes a token is
listed), and the last line is ``speedup: <ratio>x``.

Usage::

    python benchmarks/early_exit.py                      # quick sft organism, CPU
    python benchmarks/early_exit.py --essay-prompts 0    # essay's way on every prompt
    python benchmarks/early_exit.py --random-arch mistral-7b --device cuda --dtype bfloat16

With ``--essay-prompts N`` (default 40) the essay's way runs on the first N prompts at
every depth and its time is extrapolated linearly to all prompts (its cost is the same
for every prompt up to length; the issue's own H200 figure was extrapolated too).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def organism_setup(args: argparse.Namespace) -> tuple[Any, list[list[int]], list[int], int, str]:
    from pathlib import Path

    from safetylab.lm import encode_prompts, eos_ids, load_causal_lm, pad_id
    from safetylab.organisms import World, get_organism

    given = Path(args.organism).is_dir()
    path = Path(args.organism) if given else get_organism(args.organism, scale=args.scale, quiet=False)
    lm = load_causal_lm(path, device=args.device, dtype=args.dtype)
    world = World.from_organism(path)
    n_harmful = args.n_prompts - args.n_prompts // 5  # the essay's 200 harmful : 50 benign
    reqs = world.eval_requests("forbidden", n=n_harmful) + world.eval_requests("benign", n=args.n_prompts - n_harmful)
    prompts = encode_prompts(lm.tokenizer, [r.text for r in reqs])
    return lm.model, prompts, eos_ids(lm.model, lm.tokenizer), pad_id(lm.model, lm.tokenizer), f"organism {path}" if given else f"organism {args.organism} ({args.scale}) at {path}"


def random_setup(args: argparse.Namespace) -> tuple[Any, list[list[int]], list[int], int, str]:
    import transformers as tf

    shapes = {
        # Mistral-7B-v0.3 shape (random weights: nothing is downloaded).
        "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32768, head_dim=128, sliding_window=None,
                           rope_theta=1e6),
        "mistral-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=32768, head_dim=32, sliding_window=None),
    }
    cfg = tf.MistralConfig(**shapes[args.random_arch], max_position_embeddings=4096)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 64, (args.n_prompts,), generator=g)
    prompts = [torch.randint(10, cfg.vocab_size, (int(n),), generator=g).tolist() for n in lengths]
    # Random weights never choose a particular EOS: every row generates max_new_tokens, as in the issue.
    return model, prompts, [], 0, f"random {args.random_arch} ({args.dtype or 'float32'})"


def main(argv: list[str] | None = None) -> int:
    from safetylab.lm.generate import DECODERS, choose_decoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--organism", default="sft", help="organism variant or folder (default sft)")
    p.add_argument("--scale", default="quick", help="organism scale (default quick)")
    p.add_argument("--random-arch", choices=["mistral-7b", "mistral-tiny"], default=None,
                   help="use a random-weight model of this shape instead of an organism")
    p.add_argument("--n-prompts", type=int, default=250, help="prompts (essay: 200 harmful + 50 benign)")
    p.add_argument("--depths", type=int, nargs="*", default=None, help="layers kept (default 7 evenly spread)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--essay-prompts", type=int, default=40,
                   help="prompts run the essay's way (0 = all); its time is extrapolated to all prompts")
    p.add_argument("--mixed", action="store_true", help="also time the mixed-depth single batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="safetylab's per-depth decoder (auto: the static decoder where it supports the model)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetylab.lm import empty_readout, find_decoder_stack, first_token_readout, generate_at_depths, identity_patched
    from safetylab.lm.truncate import evenly_spread_depths

    model, prompts, eos, pad, what = (random_setup if args.random_arch else organism_setup)(args)
    n_layers = find_decoder_stack(model).n_layers
    depths = args.depths or evenly_spread_depths(n_layers, 7)
    print(f"model: {what}, {n_layers} layers; device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"sweep: {len(prompts)} prompts x depths {depths} x <= {args.max_new_tokens} new tokens")

    # --- safetylab's way (warm-up on a few prompts first: lazy init, kernel selection).
    from safetylab.lm.decode import unsupported

    stack, longest = find_decoder_stack(model), max(map(len, prompts)) + args.max_new_tokens
    fast = choose_decoder(model, stack, args.decoder, longest)  # what generate_at_depths will use
    why_not = unsupported(model, stack, longest) if fast is None and args.decoder == "auto" else None
    print("decoder: " + ("transformers" if fast is None else "static" + (" with CUDA graphs" if fast.graphs else ""))
          + (f" (static unsupported: {why_not})" if why_not else ""))
    generate_at_depths(model, prompts[:4], depths[:1], max_new_tokens=2, eos=eos, pad=pad, decoder=args.decoder)
    timings: dict[str, float] = {}
    _sync(args.device)
    t0 = time.perf_counter()
    readout = empty_readout(len(prompts), n_layers)
    ours = generate_at_depths(model, prompts, depths, max_new_tokens=args.max_new_tokens, eos=eos, pad=pad,
                              batch_size=args.batch_size, readout=readout, decoder=args.decoder)
    _sync(args.device)
    timings["batched per depth + readout"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = first_token_readout(model, prompts, pad=pad, batch_size=args.batch_size)
    _sync(args.device)
    timings["(readout alone, 1 pass)"] = time.perf_counter() - t0
    readout_agrees = bool((alone.top_token == readout.top_token).all())
    mixed = None
    if args.mixed:
        t0 = time.perf_counter()
        mixed = generate_at_depths(model, prompts, depths, max_new_tokens=args.max_new_tokens, eos=eos, pad=pad,
                                   batch_size=args.batch_size * len(depths), mixed=True)
        _sync(args.device)
        timings["mixed-depth single batch"] = time.perf_counter() - t0
    ours_total = timings["batched per depth + readout"]

    # --- the essay's way on a subset, extrapolated.
    n_essay = len(prompts) if args.essay_prompts <= 0 else min(args.essay_prompts, len(prompts))
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    gen_kwargs["eos_token_id"] = eos if eos else None
    if not eos:
        gen_kwargs["min_new_tokens"] = args.max_new_tokens
    mismatches: list[str] = []
    differing: list[tuple[int, int, int, list[int]]] = []  # (depth, prompt, first differing token, essay's tokens)
    n_compared = 0
    _sync(args.device)
    t0 = time.perf_counter()
    # An evenly spaced subset, so harmful and benign prompts (short refusals, long answers) both count.
    subset = sorted({round(j * (len(prompts) - 1) / max(n_essay - 1, 1)) for j in range(n_essay)})
    for k in depths:
        with identity_patched(model, k):
            for i in subset:
                ids = torch.tensor([prompts[i]], device=args.device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs)[0, ids.shape[1]:].tolist()
                if eos:
                    stop = next((j for j, t in enumerate(out) if t in eos), None)
                    out = out[: stop + 1] if stop is not None else out
                n_compared += 1
                if out != ours[k][i]:
                    j = next((j for j, (a, b) in enumerate(zip(out, ours[k][i])) if a != b), min(len(out), len(ours[k][i])))
                    differing.append((k, i, j, out))
                if mixed is not None and mixed[k][i] != ours[k][i]:
                    mismatches.append(f"depth {k}, prompt {i}: mixed-depth batch differs from per-depth batch")
    _sync(args.device)
    essay_measured = time.perf_counter() - t0
    # Outside the timing: how close to a tie was each first difference, by the essay's own logits?
    margins: list[float] = []
    spreads: list[float] = []
    for k, i, j, out in differing:
        line = (f"depth {k}, prompt {i} (length {len(prompts[i])}): first difference at new token {j}: "
                f"essay {out[j:j + 3]} vs batched {ours[k][i][j:j + 3]}")
        if j < min(len(out), len(ours[k][i])):
            with identity_patched(model, k), torch.no_grad():
                logits = model(torch.tensor([prompts[i] + out[:j]], device=args.device)).logits[0, -1].float()
            margins.append(float(logits[out[j]] - logits[ours[k][i][j]]))
            spreads.append(float(logits.std()))
            line += f"; the essay's logit margin there {margins[-1]:.3g} (logits' spread {spreads[-1]:.3g})"
        mismatches.append(line)
    n_essay = len(subset)
    essay_total = essay_measured * len(prompts) / n_essay

    print()
    print(f"{'way':<40} {'seconds':>10}")
    extra = "" if n_essay == len(prompts) else f" (measured {essay_measured:.1f} s on {n_essay} prompts, extrapolated)"
    print(f"{'essay: batch 1, identity layers, generate':<40} {essay_total:>10.2f}{extra}")
    for name, s in timings.items():
        print(f"{'safetylab: ' + name:<40} {s:>10.2f}")
    print(f"all-depth readout from the sweep's prefill equals a separate readout pass: {readout_agrees}")
    print()
    if mismatches:
        print(f"greedy outputs: {len(mismatches)} of {n_compared} (prompt, depth) pairs differ "
              f"(padding/batching changed a token):")
        for line in mismatches[:20]:
            print("  " + line)
        if margins:
            near = max(margins) < 0.05 * min(spreads)
            print(f"  largest margin of the essay's token over the batched one at a first difference: {max(margins):.3g}"
                  + (" (all near ties, where batching's rounding decides)" if near else
                     " (not all near ties: a margin that large points to a decoding difference, not rounding)"))
    else:
        print(f"greedy outputs: identical on all {n_compared} (prompt, depth) pairs compared")
    best = min(ours_total, timings.get("mixed-depth single batch", float("inf")) + timings["(readout alone, 1 pass)"])
    print(f"speedup: {essay_total / best:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
