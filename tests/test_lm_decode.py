"""The static decoder reproduces Transformers token for token (and logit for logit) on
every family it claims, falls back where it does not, and its graph protocol (one
captured step replayed over changing buffers) gives the same tokens as eager decoding."""

from __future__ import annotations

import pytest
import torch

from safetylab.lm import find_decoder_stack, generate_at_depths, truncated
from safetylab.lm.decode import StaticDecoder, unsupported
from safetylab.lm.generate import _shared_prefill
from safetylab.lm.tiny import tiny_causal_lm

from lm_fixtures import EOS, essay_way, frequent_token, one_thread, prompts, sharpened  # noqa: F401  (fixtures)

FAMILIES = ["llama", "mistral", "qwen2"]  # tiny configs use grouped keys: 4 query heads, 2 key heads


@pytest.mark.parametrize("arch", FAMILIES)
def test_static_decoder_matches_batch_one_generate(arch: str, prompts: list[list[int]]) -> None:
    model = sharpened(arch)
    stop = frequent_token(model, prompts, 2)
    got = generate_at_depths(model, prompts, [1, 2, 3], max_new_tokens=8, eos=[stop], pad=0, batch_size=5,
                             decoder="static")
    assert sum(len(r) < 8 for k in got for r in got[k]) >= 3  # EOS stops are exercised
    for depth in (1, 2, 3):
        assert got[depth] == [essay_way(model, p, depth, 8, stop) for p in prompts], f"{arch} depth {depth}"
    hf = generate_at_depths(model, prompts, [1, 2, 3], max_new_tokens=8, eos=[stop], pad=0, batch_size=5,
                            decoder="hf")
    assert hf == got


def test_half_precision_follows_transformers(prompts: list[list[int]]) -> None:
    """In bfloat16 the static decoder rounds where Transformers does (attention scores stay
    in float32), so batched outputs agree; batch-1 generate differs from both on near-ties.
    Rounding the scores to bfloat16 instead made about a fifth of the rows differ."""
    many = prompts * 4
    for arch in FAMILIES:
        model = sharpened(arch).to(torch.bfloat16)
        static = generate_at_depths(model, many, [1, 2, 3], max_new_tokens=12, eos=[EOS], pad=0, decoder="static")
        hf = generate_at_depths(model, many, [1, 2, 3], max_new_tokens=12, eos=[EOS], pad=0, decoder="hf")
        same = sum(a == b for k in static for a, b in zip(static[k], hf[k]))
        assert same >= 0.95 * 3 * len(many), f"{arch}: {same} of {3 * len(many)} rows agree"


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("fuse", [False, True])
def test_decode_step_logits_equal_the_truncated_models(arch: str, fuse: bool, prompts: list[list[int]]) -> None:
    model = tiny_causal_lm(arch, 3, seed=2)  # unsharpened: logits compared directly
    stack = find_decoder_stack(model)
    dec = StaticDecoder(model, stack, fuse=fuse)
    prefill = _shared_prefill(model, stack, prompts, pad=0)
    state = dec.start(prefill.cache, prefill.mask, max_new_tokens=3)
    n = len(prompts)
    fed = torch.tensor([7, 11, 13, 17, 19, 23, 29, 31])[:n]
    valid = torch.zeros((n, state.keys[0].shape[2]), dtype=torch.bool)
    valid[:, : state.width] = state.prompt_mask
    column = torch.tensor([state.width])
    with torch.inference_mode():
        got = dec._logits(2, fed, state.lengths.clone(), column, list(state.keys), list(state.values), valid,
                          state.width + 1)
    with truncated(model, 2), torch.no_grad():
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p + [int(fed[i])]])).logits[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_for_bit_transformers(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import rotate_half

    from safetylab.lm.decode import _rotate

    model = tiny_causal_lm("llama", 1).to(dtype)
    dec = StaticDecoder(model, find_decoder_stack(model))
    dec._rope_tables(40)
    positions = torch.tensor([0, 3, 17, 39])
    x = torch.randn(4, 5, dec.head_dim, dtype=dtype) * 3
    cos, sin = model.model.rotary_emb(x, positions[None])
    want = x * cos[0][:, None] + rotate_half(x) * sin[0][:, None]
    got = _rotate(x, dec._cos[positions][:, None], dec._signed_sin[positions][:, None])
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_norm_follows_the_models_norm(arch: str, prompts: list[list[int]]) -> None:
    """The fused RMSNorm (the default on CUDA) is the family's formula: weight placement and
    epsilon as the module's, so tokens equal Transformers' and values agree to float rounding."""
    from safetylab.lm.decode import _rms_norm

    model = sharpened(arch)
    stack = find_decoder_stack(model)
    norm = stack.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
        x = torch.randn(6, norm.weight.numel()) * 5
        torch.testing.assert_close(_rms_norm(norm, x), norm(x), rtol=1e-6, atol=1e-6)
        xb = x.to(torch.bfloat16)
        normb = type(norm)(norm.weight.numel(), eps=norm.variance_epsilon).to(torch.bfloat16)
        normb.weight.copy_(norm.weight)
        assert (_rms_norm(normb, xb) != normb(xb)).float().mean() < 0.02  # the same roundings, bar a rare last bit
    dec = StaticDecoder(model, stack, fused_norm=True)
    assert dec.fused_norm and not StaticDecoder(model, stack).fused_norm  # on CPU, the module by default
    prefill = _shared_prefill(model, stack, prompts, pad=0)
    for depth in (1, 3):
        first = model.get_output_embeddings()(stack.final_norm(prefill.hidden[:, depth - 1])).argmax(-1)
        got = dec.decode(dec.start(prefill.cache, prefill.mask, 8), depth, first, max_new_tokens=8, eos=[EOS], pad=0)
        assert got == [essay_way(model, p, depth, 8) for p in prompts], f"{arch} depth {depth}"


def test_replayed_step_gives_the_eager_tokens(monkeypatch: pytest.MonkeyPatch, prompts: list[list[int]]) -> None:
    """The CUDA-graph protocol on CPU: capture one step's computation once, then replay
    it every step while only the buffers' contents change (what a CUDA graph does)."""
    model = sharpened("mistral")
    stack = find_decoder_stack(model)
    eager = StaticDecoder(model, stack)
    replayed = StaticDecoder(model, stack)
    replayed.graphs = True
    captures: list[int] = []

    class Replay:
        def __init__(self, body):
            self.body, self.out = body, body()

        def replay(self) -> None:
            self.out.copy_(self.body())

    def record(body):
        captures.append(1)
        graph = Replay(body)
        return graph, graph.out

    monkeypatch.setattr(replayed, "_record", record)
    prefill = _shared_prefill(model, stack, prompts, pad=0)
    # A replayed step attends every column, written or not: the spare ones must hold finite
    # numbers (masked -inf plus a recycled NaN is NaN), so they start as zeros.
    spare = replayed.start(prefill.cache, prefill.mask, 9)
    assert all(bool((k[:, :, spare.width:] == 0).all()) for k in spare.keys + spare.values)
    for depth in (1, 3):
        first = model.get_output_embeddings()(stack.final_norm(prefill.hidden[:, depth - 1])).argmax(-1)
        want = eager.decode(eager.start(prefill.cache, prefill.mask, 9), depth, first, max_new_tokens=9, eos=[EOS],
                            pad=0)
        got = replayed.decode(replayed.start(prefill.cache, prefill.mask, 9), depth, first, max_new_tokens=9,
                              eos=[EOS], pad=0)
        assert got == want
        assert want == [essay_way(model, p, depth, 9) for p in prompts]
    assert len(captures) == 2  # one capture per depth, every other step replayed


def test_large_models_are_not_fused_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusing copies q/k/v and gate/up; for a 7B model on CPU that is 9 GB more memory."""
    from safetylab.lm import decode

    model = tiny_causal_lm("llama", 2)
    stack = find_decoder_stack(model)
    assert len(StaticDecoder(model, stack).layers[0].qkv) == 1  # tiny: fused
    monkeypatch.setattr(decode, "FUSE_MAX_BYTES", 1000)
    dec = StaticDecoder(model, stack)
    assert len(dec.layers[0].qkv) == 3 and dec.layers[0].qkv[0][0] is model.model.layers[0].self_attn.q_proj.weight


def test_compaction_leaves_tokens_unchanged(prompts: list[list[int]]) -> None:
    model = sharpened("llama")
    stop = frequent_token(model, prompts, 2)
    stack = find_decoder_stack(model)
    dec = StaticDecoder(model, stack)
    prefill = _shared_prefill(model, stack, prompts, pad=0)
    first = model.get_output_embeddings()(stack.final_norm(prefill.hidden[:, 1])).argmax(-1)
    state = dec.start(prefill.cache, prefill.mask, 12)
    runs = [dec.decode(state, 2, first, max_new_tokens=12, eos=[stop], pad=0, compact=c) for c in (True, False)]
    assert runs[0] == runs[1]
    assert sum(len(r) < 12 for r in runs[0]) >= 2  # rows finished early and were dropped


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "opt"])
def test_other_families_fall_back_to_transformers(arch: str, prompts: list[list[int]]) -> None:
    model = sharpened(arch, 2)
    stack = find_decoder_stack(model)
    assert unsupported(model, stack) is not None
    got = generate_at_depths(model, prompts, [1], max_new_tokens=5, eos=[EOS], pad=0)  # auto
    assert got[1] == [essay_way(model, p, 1, 5) for p in prompts]
    with pytest.raises(ValueError, match=r"decoder='static' cannot run .*; use decoder='auto' or 'hf'"):
        generate_at_depths(model, prompts, [1], max_new_tokens=5, eos=[EOS], pad=0, decoder="static")


def test_a_window_shorter_than_the_sequence_falls_back(prompts: list[list[int]]) -> None:
    model = sharpened("mistral")
    model.config.sliding_window = 12  # prompts up to 9 tokens + 8 new ones do not fit
    stack = find_decoder_stack(model)
    assert "attention window of 12" in unsupported(model, stack, 17)
    assert unsupported(model, stack, 12) is None
    got = generate_at_depths(model, prompts, [2], max_new_tokens=8, eos=[EOS], pad=0)
    assert got[2] == [essay_way(model, p, 2, 8) for p in prompts]
    with pytest.raises(ValueError, match="attention window of 12"):
        generate_at_depths(model, prompts, [2], max_new_tokens=8, eos=[EOS], pad=0, decoder="static")


def test_unknown_decoder_name(prompts: list[list[int]]) -> None:
    model = tiny_causal_lm("llama", 2)
    with pytest.raises(ValueError, match=r"decoder='fast'; use one of auto, static, hf"):
        generate_at_depths(model, prompts, [1], max_new_tokens=2, eos=[EOS], pad=0, decoder="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager_decoding(dtype: torch.dtype, prompts: list[list[int]]) -> None:  # pragma: no cover
    model = sharpened("mistral").to("cuda", dtype)
    stack = find_decoder_stack(model)
    prefill = _shared_prefill(model, stack, prompts * 4, pad=0)
    first = model.get_output_embeddings()(stack.final_norm(prefill.hidden[:, 2])).argmax(-1)
    runs = []
    from safetylab.lm.decode import attention_kernels

    with attention_kernels(torch.device("cuda")):  # no per-shape cuDNN graph builds
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    for graphs in (False, True):
        dec = StaticDecoder(model, stack, graphs=graphs)
        assert dec.fused_norm
        runs.append(dec.decode(dec.start(prefill.cache, prefill.mask, 10), 3, first, max_new_tokens=10,
                               eos=[EOS], pad=0))
        assert dec.graphs == graphs  # capture did not fail over to eager
    assert runs[0] == runs[1]  # the eager GPU step attends every column too: same kernels, same tokens
    if dtype == torch.float32:
        assert runs[1] == [essay_way(model, p, 3, 10) for p in prompts * 4]
