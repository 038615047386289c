"""Find the decoder-layer stack of a causal LM, and read logits out of any layer.

Hugging Face models keep their decoder layers in an ``nn.ModuleList`` whose path
differs by family: ``model.layers`` (Llama, Mistral, Qwen2, Gemma, Phi),
``transformer.h`` (GPT-2), ``gpt_neox.layers`` (GPT-NeoX), ``model.decoder.layers``
(OPT). :func:`find_decoder_stack` tries these known paths and otherwise fails with a
message that names the model class and the ``--layers-attr`` escape hatch.

The "logit lens" readout (nostalgebraist 2020; used for early exit by CALM, Schuster
et al. 2022, and LayerSkip, Elhoushi et al. 2024) applies the model's own final norm
and LM head to an intermediate hidden state: exactly what the model would output if
it stopped after that layer. :func:`readout_logits` does that for any stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dotted paths (from the *ForCausalLM object) of the decoder-layer list, in the order tried.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3 (text), Phi, Phi-3, OLMo, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "language_model.model.layers",
    "transformer.layers",
    "transformer.blocks",  # MPT
    "decoder.layers",
    "layers",
)

# Attribute names of the final norm on the module that holds the layer list.
KNOWN_NORM_ATTRS: tuple[str, ...] = (
    "norm",  # Llama family
    "ln_f",  # GPT-2
    "final_layer_norm",  # GPT-NeoX, OPT
    "final_layernorm",  # Phi
    "final_norm",
    "norm_f",
)


@dataclass(frozen=True)
class DecoderStack:
    """Where a model's decoder layers live, and how to turn a hidden state into logits.

    Attributes:
        model: the causal LM (a stock Hugging Face object, not wrapped).
        owner: the module that holds the layer list as attribute ``attr``.
        attr: attribute name of the ``nn.ModuleList`` on ``owner``.
        path: dotted path of the list from ``model`` (e.g. ``"model.layers"``).
        final_norm: the norm the model applies after its last layer (``None`` if the
            model has none, e.g. OPT-350m).
    """

    model: nn.Module
    owner: nn.Module
    attr: str
    path: str
    final_norm: nn.Module | None

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attr)

    @property
    def n_layers(self) -> int:
        """Number of decoder layers in the (untruncated) model."""
        return len(self.layers)


def _get_path(root: nn.Module, path: str) -> object | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_stack(model: nn.Module, layers_attr: str | None = None) -> DecoderStack:
    """Locate the decoder-layer list of ``model``.

    Args:
        model: a causal LM (``AutoModelForCausalLM`` output or a custom ``nn.Module``).
        layers_attr: dotted path of the layer list from ``model`` (e.g.
            ``"backbone.blocks"``); overrides the known paths.

    Returns:
        The stack, with its final norm when one is found next to the layer list.

    Raises:
        ValueError: no ``nn.ModuleList`` of layers at ``layers_attr`` or any known path;
            the message names the model class and ``--layers-attr``.
    """
    cls = type(model).__name__
    paths = (layers_attr,) if layers_attr else KNOWN_LAYER_PATHS
    for path in paths:
        obj = _get_path(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            owner_path, _, attr = path.rpartition(".")
            owner = _get_path(model, owner_path) if owner_path else model
            assert isinstance(owner, nn.Module)
            norm = None
            for name in KNOWN_NORM_ATTRS:
                candidate = getattr(owner, name, None)
                if isinstance(candidate, nn.Module):
                    norm = candidate
                    break
            return DecoderStack(model=model, owner=owner, attr=attr, path=path, final_norm=norm)
    if layers_attr:
        obj = _get_path(model, layers_attr)
        what = "nothing" if obj is None else f"a {type(obj).__name__}"
        raise ValueError(
            f"layers_attr='{layers_attr}' on {cls} points to {what}, not a non-empty "
            f"nn.ModuleList of decoder layers; pass --layers-attr with the dotted path of "
            f"the layer list (print(model) shows it)"
        )
    raise ValueError(
        f"cannot find the decoder layers of {cls} (tried {', '.join(KNOWN_LAYER_PATHS)}); "
        f"pass --layers-attr with the dotted path of its nn.ModuleList of layers, "
        f"e.g. --layers-attr model.layers (print(model) shows it)"
    )


def readout_logits(stack: DecoderStack, hidden: torch.Tensor) -> torch.Tensor:
    """Logits the model would emit if its residual stream ended at ``hidden``.

    Applies the final norm, OPT's ``project_out`` where present, the LM head, and
    Gemma-2-style final logit soft-capping where configured — the same path the
    model's own forward takes after its last layer.

    Args:
        stack: from :func:`find_decoder_stack`.
        hidden: (..., d_model) residual-stream states (a layer's output).

    Returns:
        (..., vocab) logits, float32.
    """
    h = hidden
    if stack.final_norm is not None:
        h = stack.final_norm(h)
    project_out = getattr(stack.owner, "project_out", None)
    if isinstance(project_out, nn.Module):
        h = project_out(h)
    head = stack.model.get_output_embeddings() if hasattr(stack.model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(stack.model).__name__} has no output embeddings (LM head); "
            f"load it with AutoModelForCausalLM"
        )
    logits = head(h).float()
    cap = getattr(getattr(stack.model, "config", None), "final_logit_softcapping", None)
    if cap:
        # Gemma 2: logits = cap * tanh(logits / cap) (Gemma Team 2024, sec. 2).
        logits = cap * torch.tanh(logits / cap)
    return logits


def layer_hidden(output: object) -> torch.Tensor:
    """The hidden state in a decoder layer's output (a tensor, or a tuple's first item
    in older/remote-code layers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "hidden_states", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a decoder layer output of type {type(output).__name__}")
