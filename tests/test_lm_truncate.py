"""Truncation to k layers equals a model built with only its first k layers."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from safetylab.lm import ExitGate, depth_sorted_batch, find_decoder_stack, generate_confident, identity_patched, readout_logits, softmax_response, truncated
from safetylab.lm.tiny import ARCHITECTURES, tiny_causal_lm
from safetylab.study import torch_threads

N_LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    # OpenMP spin-waiting makes them ~100x slower.
    with torch_threads(1):
        yield


def reference_model(model: torch.nn.Module, k: int) -> torch.nn.Module:
    """A fresh model of the same family built with k layers, holding the same weights."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:k]
    ref = tf.AutoModelForCausalLM.from_config(cfg).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected  # the dropped layers' weights
    return ref


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 99, (2, 6), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_truncated_equals_model_with_first_k_layers(arch: str, ids: torch.Tensor) -> None:
    model = tiny_causal_lm(arch, N_LAYERS)
    with torch.no_grad():
        before = model(ids).logits
        for k in (1, 2):
            ref = reference_model(model, k)
            want = ref(ids).logits
            want_gen = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            with truncated(model, k) as stack:
                assert len(stack.layers) == k
                torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
                # KV-cached generation: every new token comes from the truncated model.
                assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), want_gen)
            with identity_patched(model, k):
                torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
        # Untouched afterwards: same layers, same config, same outputs.
        assert find_decoder_stack(model).n_layers == N_LAYERS
        assert model.config.num_hidden_layers == N_LAYERS
        assert torch.equal(model(ids).logits, before)


def test_restored_even_when_the_body_raises(ids: torch.Tensor) -> None:
    model = tiny_causal_lm("llama", N_LAYERS)
    layers = list(find_decoder_stack(model).layers)
    with torch.no_grad():
        before = model(ids).logits
        for ctx in (truncated, identity_patched):
            with pytest.raises(RuntimeError, match="boom"):
                with ctx(model, 1):
                    raise RuntimeError("boom")
            assert list(find_decoder_stack(model).layers) == layers
            assert model.config.num_hidden_layers == N_LAYERS
            assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("depth", [0, N_LAYERS + 1, -1])
def test_depth_out_of_range_names_the_valid_range(depth: int) -> None:
    model = tiny_causal_lm("llama", N_LAYERS)
    with pytest.raises(ValueError, match=rf"depth={depth} but LlamaForCausalLM has {N_LAYERS} decoder layers; use 1..{N_LAYERS}"):
        with truncated(model, depth):
            pass
    assert find_decoder_stack(model).n_layers == N_LAYERS


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_mixed_depth_gate_equals_per_row_truncation(arch: str, ids: torch.Tensor) -> None:
    model = tiny_causal_lm(arch, N_LAYERS)
    batch = ids.repeat(N_LAYERS, 1)  # rows: every prompt at every depth
    depths = torch.arange(1, N_LAYERS + 1).repeat_interleave(ids.shape[0])
    with torch.no_grad():
        with ExitGate(model, "static", exit_layers=depths):
            mixed = model(batch).logits
        for k in range(1, N_LAYERS + 1):
            with truncated(model, k):
                want = model(ids).logits
            torch.testing.assert_close(mixed[depths == k], want, rtol=0, atol=1e-5)
        assert not any(layer._forward_hooks for layer in find_decoder_stack(model).layers)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_depth_sorted_batch_equals_per_depth_truncation(arch: str, ids: torch.Tensor) -> None:
    """Layer l runs only on the rows that reach it; results equal one truncated model per depth,
    also through KV-cached generation."""
    model = tiny_causal_lm(arch, N_LAYERS)
    depths = torch.tensor([3, 3, 2, 2, 1, 1])  # deepest first
    batch = ids.repeat(N_LAYERS, 1)
    with torch.no_grad():
        with depth_sorted_batch(model, depths):
            mixed = model(batch).logits
            mixed_gen = model.generate(batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for k in range(1, N_LAYERS + 1):
            with truncated(model, k):
                torch.testing.assert_close(mixed[depths == k], model(ids).logits, rtol=0, atol=1e-5)
                want = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert torch.equal(mixed_gen[depths == k], want)
    stack = find_decoder_stack(model)
    assert stack.n_layers == N_LAYERS and not any(l._forward_pre_hooks for l in stack.layers)
    with pytest.raises(ValueError, match="deepest first"):
        with depth_sorted_batch(model, torch.tensor([1, 3])):
            pass


def test_confidence_exit_picks_first_confident_layer(ids: torch.Tensor) -> None:
    """CALM exit of the first new token = first layer whose readout has top1-top2 >= threshold,
    checked against Transformers' own output_hidden_states."""
    model = tiny_causal_lm("llama", 4)
    with torch.no_grad():
        for module in model.modules():  # sharpen the random readout so confidences spread out
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(8)
        stack = find_decoder_stack(model)
        hs = model(ids, output_hidden_states=True).hidden_states  # embeddings, layer 1..n (last normed)
        conf, top = [], []
        for k in range(1, 5):
            h = hs[k][:, -1]
            logits = model.get_output_embeddings()(h) if k == 4 else readout_logits(stack, h)
            conf.append(softmax_response(logits))
            top.append(logits.argmax(-1))
        conf_t, top_t = torch.stack(conf, 1), torch.stack(top, 1)  # (batch, n_layers)
    threshold = float(conf_t[:, :3].median())
    out = generate_confident(model, ids.tolist(), threshold, max_new_tokens=3, eos=[], pad=0)
    for b in range(ids.shape[0]):
        confident = (conf_t[b, :3] >= threshold).nonzero()
        want_layer = int(confident[0]) + 1 if len(confident) else 4
        assert out.layers_used[b][0] == want_layer
        assert out.tokens[b][0] == int(top_t[b, want_layer - 1])
    # Threshold 0 exits every token after layer 1: the depth-1 model's output.
    low = generate_confident(model, ids.tolist(), 0.0, max_new_tokens=3, eos=[], pad=0)
    with truncated(model, 1):
        want = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert low.tokens == want.tolist()
    assert all(u == [1, 1, 1] for u in low.layers_used)
