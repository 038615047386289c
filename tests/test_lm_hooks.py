"""Residual-stream reading, steering and directional ablation through forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_fixtures import EOS, one_thread, prompts, sharpened  # noqa: F401 (fixtures)
from safetylab.errors import UserError
from safetylab.lm import direction_ablation, find_decoder_stack, greedy_generate, read_residual, steering

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


def _alone(model, prompt, layer, position):
    """The reference: Transformers' own hidden states of one unpadded prompt."""
    with torch.no_grad():
        hs = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    h = hs[layer + 1][0]  # (seq, d_model); hidden_states[0] is the embeddings
    return (h[-1] if position == "last" else h.mean(0)).numpy()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("position", ["last", "mean"])
def test_read_matches_hidden_states_of_each_prompt_alone(arch, position, prompts):
    model = sharpened(arch, n_layers=3)
    acts = read_residual(model, prompts, pad=0, position=position, batch_size=3)
    assert acts.shape == (len(prompts), 3, model.config.hidden_size) and acts.dtype == np.float32
    for i, p in enumerate(prompts):
        for layer in (0, 1):  # the last layer's hidden_states entry has the final norm applied
            np.testing.assert_allclose(acts[i, layer], _alone(model, p, layer, position), rtol=1e-4, atol=1e-4)
    some = read_residual(model, prompts, pad=0, layers=[2, 0], position=position, batch_size=3)
    np.testing.assert_array_equal(some, acts[:, [2, 0]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steering_adds_the_vector_at_its_layer_and_leaves_earlier_ones(arch, prompts):
    model = sharpened(arch, n_layers=3)
    d = model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    plain = read_residual(model, prompts, pad=0, position="mean")
    with steering(model, {1: v}, strength=-2.5):
        steered = read_residual(model, prompts, pad=0, position="mean")
    np.testing.assert_allclose(steered[:, 0], plain[:, 0], atol=1e-6)
    # Every position moves by exactly -2.5 v, so the mean over positions does too.
    np.testing.assert_allclose(steered[:, 1] - plain[:, 1], np.broadcast_to(-2.5 * v.numpy(), plain[:, 1].shape),
                               atol=1e-4)
    assert np.abs(steered[:, 2] - plain[:, 2]).max() > 1e-3
    after = read_residual(model, prompts, pad=0, position="mean")
    np.testing.assert_array_equal(after, plain)  # hooks gone


def _naive_greedy(model, prompt, n):
    """No cache, no batch: the full sequence through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == EOS:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_steering_reaches_generated_tokens_through_the_kv_cache(arch, prompts):
    model = sharpened(arch, n_layers=3)
    v = 3.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = greedy_generate(model, prompts, max_new_tokens=6, eos=[EOS], pad=0)
    with steering(model, {0: v, 2: -v}, strength=1.0):
        steered = greedy_generate(model, prompts, max_new_tokens=6, eos=[EOS], pad=0, batch_size=3)
        reference = [_naive_greedy(model, p, 6) for p in prompts]
    assert steered == reference
    assert steered != plain


def test_direction_ablation_removes_the_direction_everywhere(prompts):
    model = sharpened("llama", n_layers=3)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    u = u / u.norm()
    before = read_residual(model, prompts, pad=0, position="mean") @ u.numpy()
    with direction_ablation(model, u * 7.0):
        after = read_residual(model, prompts, pad=0, position="mean") @ u.numpy()
    assert np.abs(before).max() > 1e-2
    assert np.abs(after).max() < 1e-4
    with direction_ablation(model, {1: u}, include_input=False):
        partial = read_residual(model, prompts, pad=0, position="mean") @ u.numpy()
    np.testing.assert_allclose(partial[:, 0], before[:, 0], atol=1e-5)
    assert np.abs(partial[:, 1]).max() < 1e-4


def test_hooks_are_removed_when_the_body_raises(prompts):
    model = sharpened("llama", n_layers=2)
    stack = find_decoder_stack(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, {0: torch.ones(model.config.hidden_size)}, strength=1.0):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in stack.layers)


@pytest.mark.parametrize("call, match", [
    (lambda m, p: read_residual(m, p, pad=0, layers=[3]), r"layer=3 but LlamaForCausalLM has 3 decoder layers; use 0\.\.2"),
    (lambda m, p: read_residual(m, p, pad=0, layers=[-1]), "use 0..2"),
    (lambda m, p: read_residual(m, p, pad=0, position="first"), "position='first'"),
    (lambda m, p: read_residual(m, [], pad=0), "no prompts"),
    (lambda m, p: steering(m, {0: np.ones(32)}, strength=float("nan")).__enter__(), "not finite"),
    (lambda m, p: steering(m, {0: np.ones(32)}, strength=float("inf")).__enter__(), "not finite"),
    (lambda m, p: steering(m, {7: np.ones(32)}).__enter__(), "layer=7"),
    (lambda m, p: steering(m, {0: np.ones(5)}).__enter__(), "width 32"),
    (lambda m, p: direction_ablation(m, np.zeros(32)).__enter__(), "zero vector"),
])
def test_bad_input_is_one_line_user_error(call, match, prompts):
    model = sharpened("llama", n_layers=3)
    with pytest.raises(UserError, match=match) as exc:
        call(model, prompts)
    assert "\n" not in str(exc.value)
