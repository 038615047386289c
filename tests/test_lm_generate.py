"""Batched, left-padded, KV-cached greedy generation equals batch-1 ``generate``;
the one-pass readout equals each truncated model's first token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safetylab.lm import (
    empty_readout,
    encode_prompts,
    first_token_readout,
    generate_at_depths,
    greedy_generate,
    truncated,
)
from safetylab.lm.tiny import tiny_causal_lm

from lm_fixtures import EOS, essay_way, one_thread, prompts, sharpened  # noqa: F401  (fixtures)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("mixed", [False, True])
def test_batched_generation_matches_batch_one_generate(arch: str, mixed: bool, prompts: list[list[int]]) -> None:
    model = sharpened(arch)
    got = generate_at_depths(model, prompts, [1, 2, 3], max_new_tokens=6, eos=[EOS], pad=0, batch_size=5, mixed=mixed)
    for depth in (1, 2, 3):
        want = [essay_way(model, p, depth, 6) for p in prompts]
        assert got[depth] == want, f"{arch} depth {depth}"
    # The sweep leaves the model whole.
    assert model.config.num_hidden_layers == 3


def test_generation_stops_at_eos_and_keeps_order(prompts: list[list[int]]) -> None:
    model = sharpened("llama")
    free = greedy_generate(model, prompts, max_new_tokens=12, eos=[], pad=0, batch_size=3)
    assert all(len(t) == 12 for t in free)
    # Use the most frequent generated token as EOS so that several rows stop early.
    stop = max(range(99), key=lambda t: sum(row.count(t) for row in free))
    out = greedy_generate(model, prompts, max_new_tokens=12, eos=[stop], pad=0, batch_size=3)
    alone = [greedy_generate(model, [p], max_new_tokens=12, eos=[stop], pad=0)[0] for p in prompts]
    assert out == alone
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else 12
        assert row == full[:cut]  # stops right after the first EOS, kept as last token
    assert sum(len(r) < 12 for r in out) >= 2


def test_readout_equals_each_truncated_models_first_token(prompts: list[list[int]]) -> None:
    model = sharpened("llama", 4)
    sets = {"low": list(range(3, 30))}
    ro = first_token_readout(model, prompts, pad=0, token_sets=sets, batch_size=3)
    assert ro.top_token.shape == (len(prompts), 4)
    for k in range(1, 5):
        with truncated(model, k), torch.no_grad():
            for i, p in enumerate(prompts):
                probs = model(torch.tensor([p])).logits[0, -1].softmax(-1)
                assert ro.top_token[i, k - 1] == int(probs.argmax())
                assert ro.mass["low"][i, k - 1] == pytest.approx(float(probs[3:30].sum()), abs=1e-5)


def test_sweep_fills_the_readout_from_its_own_prefill(prompts: list[list[int]]) -> None:
    model = sharpened("llama", 4)
    sets = {"low": list(range(3, 30))}
    alone = first_token_readout(model, prompts, pad=0, token_sets=sets, batch_size=3)
    for mixed in (False, True):
        ro = empty_readout(len(prompts), 4, sets)
        generate_at_depths(model, prompts, [1, 4], max_new_tokens=2, eos=[EOS], pad=0, batch_size=3,
                           mixed=mixed, readout=ro, token_sets=sets)
        assert (ro.top_token == alone.top_token).all()
        np.testing.assert_allclose(ro.mass["low"], alone.mass["low"], atol=1e-6)


def test_encode_prompts_uses_the_chat_template() -> None:
    from safetylab.organisms.tokenizer import build_tokenizer

    tok = build_tokenizer(["hello", "world"])
    ids = encode_prompts(tok, ["hello world"])
    assert tok.convert_ids_to_tokens(ids[0]) == ["<bos>", "<user>", "hello", "world", "<assistant>"]
    assert encode_prompts(tok, ["hello"], chat=False) == [tok("hello")["input_ids"]]


def test_bad_generation_arguments() -> None:
    model = tiny_causal_lm("llama", 2)
    with pytest.raises(ValueError, match="no prompts"):
        greedy_generate(model, [], max_new_tokens=3, eos=[EOS], pad=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, [[5]], max_new_tokens=0, eos=[EOS], pad=0)
    with pytest.raises(ValueError, match=r"depth=3 but LlamaForCausalLM has 2 decoder layers; use 1..2"):
        generate_at_depths(model, [[5]], [1, 3], max_new_tokens=2, eos=[EOS], pad=0)
