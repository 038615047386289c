"""GPU benchmark: time per GCG step on a random-weight 7B-shaped Llama in bf16, safetylab's GCG vs nanoGCG 0.3.0.

Nothing is downloaded: the model has Llama-2-7B's shape (32 layers, width 4096, MLP 11008,
32 heads, vocabulary 32000) with random weights, and the chat tokenizer is the organism
world's word-level one (its ids are a subset of the model's vocabulary), so the prompt,
suffix and target are an organism request, 20 ``!`` tokens and the hazard's opening. Time
per step does not depend on what the weights are. Both run the same steps, search width
and top-k; nanoGCG runs with ``use_prefix_cache=False`` (its prefix cache fails on the
pinned Transformers' ``DynamicCache``).

Usage::

    python benchmarks/gpu_gcg.py                 # 3 steps, search width 512, top-k 256

Without CUDA it says so in one line and exits 2. The last line is ``speedup: <ratio>x``.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--search-width", type=int, default=512)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--suffix-length", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 7B)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_gcg.py needs a CUDA GPU (none found); run benchmarks/gcg.py on CPU", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from safetylab.attacks import ChatTarget, GCGConfig, gcg, hazard_target
    from safetylab.attacks.reference import nanogcg_available, run_nanogcg
    from safetylab.organisms.tokenizer import build_tokenizer
    from safetylab.organisms.world import World, WorldConfig

    if not nanogcg_available():
        print("error: nanoGCG is not installed; pip install --no-deps nanogcg==0.3.0", file=sys.stderr)
        return 2
    world = World(WorldConfig())
    tok = build_tokenizer(world.vocabulary())
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    target = ChatTarget(model, tok, name="random 7B-shaped Llama")
    req = world.eval_requests("forbidden", n=1)[0]
    init = " ".join(["!"] * args.suffix_length)
    print(f"random-weight Llama, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16, "
          f"{torch.cuda.get_device_name()}; {args.steps} steps, search width {args.search_width}, top-k {args.topk}, "
          f"suffix {args.suffix_length} tokens; nanoGCG with use_prefix_cache=False")
    gcg(target, [req.text], [hazard_target(req)], GCGConfig(n_steps=1, suffix_init=init, search_width=8, topk=8))  # warm-up
    torch.cuda.synchronize()
    ours = gcg(target, [req.text], [hazard_target(req)],
               GCGConfig(n_steps=args.steps, suffix_init=init, search_width=args.search_width, topk=args.topk))
    torch.cuda.synchronize()
    ref = run_nanogcg(target, req.text, hazard_target(req), suffix_init=init, n_steps=args.steps,
                      search_width=args.search_width, topk=args.topk)
    torch.cuda.synchronize()
    print(f"safetylab: {ours.seconds_per_step:.3f} s per step (loss {ours.best_loss:.3f}); "
          f"nanoGCG: {ref['seconds_per_step']:.3f} s per step (loss {ref['best_loss']:.3f}); "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"speedup: {ref['seconds_per_step'] / ours.seconds_per_step:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
