"""Reply log-likelihoods (the coherence judge for real models) against an unbatched forward pass."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safetylab.lm.score import coherence_threshold, response_logprobs


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _reference(model, prompt, reply):
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    per_token = logp[torch.arange(len(targets)), targets]
    return float(per_token[len(prompt) - 1:].mean())


def test_batched_left_padded_scores_equal_single_sequence_scores(tiny_llama):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3]]
    replies = [[20, 21, 22, 23], [24], [], [30, 31]]
    got = response_logprobs(tiny_llama, prompts, replies, pad=0, batch_size=3)
    assert got[2] is None  # an empty reply has no likelihood
    for g, p, r in zip(got, prompts, replies):
        if r:
            assert g == pytest.approx(_reference(tiny_llama, p, r), abs=1e-5)
            assert g <= 0


def test_likely_replies_score_higher(tiny_llama):
    prompt = [5, 6, 7]
    with torch.no_grad():
        greedy = [int(tiny_llama(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())]
    worst = [int(tiny_llama(input_ids=torch.tensor([prompt])).logits[0, -1].argmin())]
    s_good, s_bad = response_logprobs(tiny_llama, [prompt, prompt], [greedy, worst], pad=0)
    assert s_good > s_bad


def test_coherence_threshold_is_a_quantile():
    scores = [-1.0, -2.0, -3.0, None, -4.0, -5.0]
    assert coherence_threshold(scores, 0.5) == -3.0
    assert coherence_threshold([None], 0.05) == -math.inf
    with pytest.raises(ValueError, match="one reply per prompt"):
        response_logprobs(None, [[1]], [], pad=0)
