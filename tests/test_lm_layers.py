"""Decoder-layer discovery across architectures, the readout, and model loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safetylab.lm import find_decoder_stack, load_causal_lm, readout_logits, source_kind, truncated
from safetylab.lm.tiny import ARCHITECTURES, tiny_causal_lm
from safetylab.study import torch_threads

EXPECTED_PATHS = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gemma": "model.layers",
    "phi": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_layers_and_last_layer_readout_equals_model_logits(arch: str) -> None:
    model = tiny_causal_lm(arch, 3)
    stack = find_decoder_stack(model)
    assert stack.path == EXPECTED_PATHS[arch]
    assert stack.n_layers == 3
    assert stack.final_norm is not None
    captured = {}
    handle = stack.layers[-1].register_forward_hook(lambda m, a, out: captured.update(h=out))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(ids).logits
        handle.remove()
        torch.testing.assert_close(readout_logits(stack, captured["h"]), logits, rtol=0, atol=1e-5)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CustomLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_layers_attr_escape_hatch() -> None:
    model = CustomLM()
    with pytest.raises(ValueError, match=r"CustomLM.*--layers-attr"):
        find_decoder_stack(model)
    stack = find_decoder_stack(model, layers_attr="backbone.blocks")
    assert stack.n_layers == 3 and stack.owner is model.backbone
    x = torch.randn(2, 4)
    with torch.no_grad(), truncated(model, 1, layers_attr="backbone.blocks"):
        got = model(x)
    want = model.backbone.head(model.backbone.blocks[0](x))
    torch.testing.assert_close(got, want)
    assert len(model.backbone.blocks) == 3
    with pytest.raises(ValueError, match=r"layers_attr='backbone.head' on CustomLM points to a Linear.*--layers-attr"):
        find_decoder_stack(model, layers_attr="backbone.head")
    with pytest.raises(ValueError, match=r"layers_attr='nope' on CustomLM points to nothing"):
        find_decoder_stack(model, layers_attr="nope")


def test_load_local_folder_round_trip(tmp_path) -> None:
    from safetylab.organisms.tokenizer import build_tokenizer

    model = tiny_causal_lm("llama", 2)
    tok = build_tokenizer([f"w{i}" for i in range(80)])
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    assert source_kind(folder) == "local"
    lm = load_causal_lm(folder)
    assert lm.kind == "local" and lm.organism_path is None
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id is not None
    ids = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)
    assert not lm.model.training


def test_load_refuses_pickle_weights_and_bad_sources(tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny_causal_lm("llama", 1).config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle-based weights.*safetensors"):
        load_causal_lm(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(empty)
    with pytest.raises(ValueError, match="neither an existing folder nor a hub id"):
        load_causal_lm(tmp_path / "missing" / "model")
    # Hub ids are recognised without touching the network.
    assert source_kind("mistralai/Mistral-7B-Instruct-v0.3") == "hub"
    assert source_kind("gpt2") == "hub"
