"""Read and steer the residual stream of any Hugging Face decoder through forward hooks.

One site per decoder layer, named as in TransformerLens (``blocks.{l}.hook_resid_post``):
``layers.{i}.resid_post`` is the output of decoder layer ``i`` (0-based), the residual
stream after ``i + 1`` layers. It is Transformers' ``output_hidden_states[i + 1]`` except
at the last layer, where Transformers returns the stream after the final norm. The layer
list is found by :func:`~safetylab.lm.layers.find_decoder_stack` (Llama, Mistral, Qwen,
Gemma, GPT-2, GPT-NeoX, OPT, ...), so the same code reads and steers every family.

* :func:`read_residual` -- activations of many prompts at every layer in one forward per
  batch: the last prompt token (where the reply starts) or the mean over the prompt's
  tokens. A hook reduces each layer's output as it is made, so a batch never holds more
  than one layer's full (batch, seq, d_model) state.
* :func:`steering` -- activation addition (Turner et al. 2023, "Activation Addition";
  Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition"): ``h + a v``
  at chosen layers and every position, prompt and generated tokens alike (with a KV cache
  each decode step's new token passes the hook).
* :func:`direction_ablation` -- directional ablation (Arditi et al. 2024, "Refusal in
  Language Models Is Mediated by a Single Direction"): ``h - (h . u) u`` for a unit
  direction ``u`` at every layer's output and, optionally, at the input of the first layer
  (the embeddings), so no layer ever writes or reads the direction.

All three are scoped (STYLE 13): hooks are removed in ``finally`` even when the body
raises. Hooks act on the layers' own forwards, so they apply to Transformers' forward
(:func:`~safetylab.lm.generate.greedy_generate`, ``model.generate``), not to the static
decoder of :mod:`safetylab.lm.decode`, which runs the layers' weights without calling them.
Bad input -- a layer the model does not have, a strength that is not finite, a vector of
the wrong width -- is a :class:`~safetylab.errors.UserError` whose one line names the fix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from safetylab.errors import UserError
from safetylab.lm.decode import model_attention_kernels
from safetylab.lm.generate import _batches, _forward_kwargs, _left_pad
from safetylab.lm.layers import DecoderStack, find_decoder_stack, layer_hidden
from safetylab.lm.truncate import _decoder_config, _replace_hidden

Position = Literal["last", "mean"]
POSITIONS: tuple[str, ...] = ("last", "mean")
SITE = "layers.{i}.resid_post"
"""Name of the hook site after decoder layer ``i`` (0-based)."""

Vector = torch.Tensor | np.ndarray | Sequence[float]


def check_layers(layers: Sequence[int] | None, n_layers: int, model_name: str = "the model") -> list[int]:
    """The 0-based layer indices to hook (``None``: every layer), checked against ``n_layers``.

    Raises:
        UserError: an index that is not an integer in ``0..n_layers-1``.
    """
    if layers is None:
        return list(range(n_layers))
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n_layers:
            raise UserError(f"layer={i!r} but {model_name} has {n_layers} decoder layers; use 0..{n_layers - 1} "
                            f"(0-based index of the layer whose output is read or steered)")
        out.append(int(i))
    return out


def check_strength(strength: float) -> float:
    """``strength`` as a float; UserError when it is not a finite number."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"steering strength {strength!r} is not a number; pass a finite float such as 2.0") from None
    if not math.isfinite(value):
        raise UserError(f"steering strength {strength!r} is not finite; pass a finite float such as 2.0")
    return value


def _hidden_size(stack: DecoderStack) -> int | None:
    config = _decoder_config(stack.model)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _as_vector(v: Vector, stack: DecoderStack, what: str) -> torch.Tensor:
    """A (d_model,) float tensor on the model's device; UserError on a wrong shape or a non-finite entry."""
    t = torch.as_tensor(np.asarray(v, dtype=np.float32) if not isinstance(v, torch.Tensor) else v)
    d = _hidden_size(stack)
    if t.ndim != 1 or (d is not None and t.shape[0] != d):
        raise UserError(f"{what} has shape {tuple(t.shape)} but {type(stack.model).__name__}'s residual stream "
                        f"has width {d}; pass one vector of {d} numbers per layer")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{what} has non-finite entries; pass a finite vector")
    p = next(stack.model.parameters())
    return t.to(device=p.device, dtype=p.dtype)


# --------------------------------------------------------------------------- editing
@contextmanager
def residual_edit(
    model: nn.Module,
    edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]],
    *,
    input_edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """Replace ``layers.{i}.resid_post`` by ``edits[i](h)`` inside the block.

    Args:
        model: a causal LM.
        edits: 0-based layer index -> function of the layer's output hidden state
            (batch, seq, d_model) returning one of the same shape.
        input_edit: also edit the input of the first decoder layer (the embeddings).
        layers_attr: dotted path of the layer list when it is not a known one.
        stack: a stack already found for ``model`` (skips the search).

    Yields:
        The model's :class:`~safetylab.lm.layers.DecoderStack`.

    Raises:
        UserError: a layer index the model does not have.
    """
    st = stack if stack is not None else find_decoder_stack(model, layers_attr)
    check_layers(list(edits), st.n_layers, type(model).__name__)

    def make_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return _replace_hidden(output, fn(layer_hidden(output)))

        return hook

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        assert input_edit is not None
        if args and isinstance(args[0], torch.Tensor):
            return (input_edit(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": input_edit(kwargs["hidden_states"])}
        raise TypeError(f"cannot find the hidden state among the inputs of {type(module).__name__}")

    handles = []
    try:
        for i, fn in edits.items():
            handles.append(st.layers[int(i)].register_forward_hook(make_hook(fn)))
        if input_edit is not None:
            handles.append(st.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield st
    finally:
        for h in handles:
            h.remove()


@contextmanager
def steering(
    model: nn.Module,
    vectors: Mapping[int, Vector],
    strength: float = 1.0,
    *,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """Add ``strength * vectors[i]`` to ``layers.{i}.resid_post`` at every position.

    Args:
        model: a causal LM.
        vectors: 0-based layer index -> (d_model,) steering vector (e.g. a difference of
            class means, :func:`safetylab.metrics.probes.mean_difference`). A negative
            ``strength`` subtracts it.
        strength: multiplier ``a`` (finite).

    Raises:
        UserError: a layer the model does not have, a non-finite strength, a vector of the
            wrong width or with non-finite entries.
    """
    st = stack if stack is not None else find_decoder_stack(model, layers_attr)
    a = check_strength(strength)
    check_layers(list(vectors), st.n_layers, type(model).__name__)
    added = {int(i): a * _as_vector(v, st, f"steering vector for layer {i}") for i, v in vectors.items()}

    def adder(v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda h: h + v

    with residual_edit(model, {i: adder(v) for i, v in added.items()}, stack=st):
        yield st


@contextmanager
def direction_ablation(
    model: nn.Module,
    direction: Vector | Mapping[int, Vector],
    *,
    layers: Sequence[int] | None = None,
    include_input: bool = True,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """Project a direction out of the residual stream: ``h - (h . u) u``, ``u`` unit.

    Args:
        model: a causal LM.
        direction: one (d_model,) direction for every layer, or layer index -> direction.
        layers: 0-based layers whose output is projected (default: every layer; with a
            mapping, its keys).
        include_input: also project the input of the first layer (the embeddings), as
            Arditi et al. (2024) do, so the direction is absent from every layer's input
            (with one direction per layer, the lowest layer's).

    Raises:
        UserError: a layer the model does not have, a zero, non-finite or wrong-width direction.
    """
    st = stack if stack is not None else find_decoder_stack(model, layers_attr)
    if isinstance(direction, Mapping):
        per_layer = dict(direction)
        if layers is not None:
            per_layer = {i: per_layer[i] for i in layers if i in per_layer}
        shared = None
    else:
        shared = direction
        per_layer = {i: direction for i in check_layers(layers, st.n_layers, type(model).__name__)}
    check_layers(list(per_layer), st.n_layers, type(model).__name__)

    def unit(v: Vector, what: str) -> torch.Tensor:
        t = _as_vector(v, st, what)
        norm = float(t.float().norm())
        if norm == 0.0:
            raise UserError(f"{what} is the zero vector; there is no direction to ablate")
        return t / norm

    def projector(u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda h: h - (h @ u)[..., None] * u

    edits = {int(i): projector(unit(v, f"ablated direction for layer {i}")) for i, v in per_layer.items()}
    # The embeddings lose the shared direction, or with one per layer the lowest layer's.
    first = shared if shared is not None else (per_layer[min(per_layer)] if per_layer else None)
    input_edit = projector(unit(first, "ablated direction")) if include_input and first is not None else None
    with residual_edit(model, edits, input_edit=input_edit, stack=st):
        yield st


# Attribute names, on a decoder layer, of the blocks that write to the residual stream: the
# attention block and the MLP (OPT has no MLP module: its last linear map, fc2, is the write).
ATTENTION_ATTRS: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
MLP_ATTRS: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "fc2")


def residual_writers(stack: DecoderStack) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every block that adds to the residual stream, layer by layer:
    ``layers.{i}.attn`` and ``layers.{i}.mlp``.

    Raises:
        UserError: a layer with no attention or no MLP block under a known name.
    """
    out = []
    for i, layer in enumerate(stack.layers):
        for kind, names in (("attn", ATTENTION_ATTRS), ("mlp", MLP_ATTRS)):
            module = next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)
            if module is None:
                raise UserError(f"layer {i} of {type(stack.model).__name__} has no {kind} block under a known name "
                                f"({', '.join(names)}); ablate layer outputs with direction_ablation instead")
            out.append((f"layers.{i}.{kind}", module))
    return out


@contextmanager
def write_ablation(
    model: nn.Module,
    direction: Vector,
    *,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """Arditi et al. (2024) directional ablation: project the unit direction ``u`` out of every
    write to the residual stream -- the embeddings and the output of every attention block and
    MLP -- so that ``h . u = 0`` at every layer's input, mid-layer stream and output, at every
    position (prompt and generated tokens alike).

    Args:
        model: a causal LM.
        direction: one (d_model,) direction (any norm; it is normalised).

    Raises:
        UserError: a zero, non-finite or wrong-width direction, or a layer whose attention or MLP
            block is not found (:func:`residual_writers`).
    """
    st = stack if stack is not None else find_decoder_stack(model, layers_attr)
    u = _as_vector(direction, st, "ablated direction")
    norm = float(u.float().norm())
    if norm == 0.0:
        raise UserError("ablated direction is the zero vector; there is no direction to ablate")
    u = u / norm

    def project(h: torch.Tensor) -> torch.Tensor:
        return h - (h @ u)[..., None] * u

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _replace_hidden(output, project(layer_hidden(output)))

    writers = residual_writers(st)
    handles = []
    try:
        with residual_edit(model, {}, input_edit=project, stack=st):
            for _, module in writers:
                handles.append(module.register_forward_hook(hook))
            yield st
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- reading
@torch.inference_mode()
@model_attention_kernels
def read_residual(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad: int,
    layers: Sequence[int] | None = None,
    position: Position = "last",
    batch_size: int = 256,
    layers_attr: str | None = None,
) -> np.ndarray:
    """Residual-stream activations of every prompt at the chosen layers.

    Prompts are left-padded in batches of similar length, with positions counted from each
    row's first real token (so a padded row sees exactly what it would alone), and the
    model runs once per batch without a KV cache; edits active around the call (e.g.
    :func:`steering`) are read as the model sees them.

    Args:
        model: a causal LM in eval mode.
        prompt_ids: token ids per prompt (e.g. :func:`~safetylab.lm.generate.encode_prompts`).
        pad: id used for left padding (masked out).
        layers: 0-based layers to read (default: every layer).
        position: ``last`` -- the last prompt token, where the reply is decided; ``mean`` --
            the mean over the prompt's tokens (padding excluded).
        batch_size: prompts per forward.
        layers_attr: dotted path of the layer list when it is not a known one.

    Returns:
        (n_prompts, n_layers_read, d_model) float32, in prompt order; ``[:, j]`` is
        ``layers.{layers[j]}.resid_post``.

    Raises:
        UserError: a layer the model does not have, an unknown position, no prompts.
    """
    stack = find_decoder_stack(model, layers_attr)
    read = check_layers(layers, stack.n_layers, type(model).__name__)
    if position not in POSITIONS:
        raise UserError(f"position={position!r}; use 'last' (last prompt token) or 'mean' (mean over prompt tokens)")
    if len(prompt_ids) == 0:
        raise UserError("no prompts to read activations from; pass at least one prompt")
    device = next(model.parameters()).device
    _, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    out: np.ndarray | None = None
    for idx in _batches(prompt_ids, batch_size):
        ids, mask = _left_pad([prompt_ids[i] for i in idx], pad, device)
        weights = (mask / mask.sum(-1, keepdim=True))[..., None]  # (batch, width, 1)
        captured: list[torch.Tensor | None] = [None] * len(read)

        def make_hook(j: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                h = layer_hidden(output)  # (batch, width, d_model)
                captured[j] = h[:, -1] if position == "last" else (h * weights.to(h.dtype)).sum(1)

            return hook

        handles = [stack.layers[i].register_forward_hook(make_hook(j)) for j, i in enumerate(read)]
        try:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        finally:
            for h in handles:
                h.remove()
        batch = torch.stack(captured, dim=1).float().cpu().numpy()  # (batch, n_read, d_model)
        if out is None:
            out = np.empty((len(prompt_ids), len(read), batch.shape[-1]), dtype=np.float32)
        out[idx] = batch
    assert out is not None
    return out
