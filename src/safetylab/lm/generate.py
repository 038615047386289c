"""Batched greedy generation at chosen depths, and an all-depth first-token readout.

The essay generated one prompt at a time per depth with ``model.generate``. Here
prompts of similar length are left-padded into batches and decoded greedily with a KV
cache (one forward per new token for the whole batch); positions come from the
attention mask, so a padded row sees exactly the positions it would alone. Depths are
swept with :func:`safetylab.lm.truncate.truncated` (one batch per depth) or, with
``mixed=True``, all depths in one batch through
:func:`~safetylab.lm.truncate.depth_sorted_batch` (rows past their exit depth pass later
layers through unchanged; each layer computes only the rows that reach it).

:func:`first_token_readout` reads every depth's first-token distribution from one
full-depth forward: the truncated model's first-token logits at depth k are the final
norm and LM head applied to layer k's output at the last prompt position (the logit
lens), so one pass gives all depths exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from safetylab.lm.decode import StaticDecoder, collect_steps, model_attention_kernels, unsupported
from safetylab.lm.layers import find_decoder_stack, layer_hidden, readout_logits
from safetylab.lm.truncate import ExitGate, check_depth, depth_sorted_batch, truncated


def encode_prompts(tokenizer: Any, texts: Sequence[str], *, chat: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt, as a user turn of the chat template when there is one.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: user messages.
        chat: use the chat template (default: when the tokenizer has one).

    Returns:
        One list of token ids per prompt, ending where the assistant's reply starts.
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    out: list[list[int]] = []
    for text in texts:
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            out.append([int(i) for i in ids])
        else:
            out.append([int(i) for i in tokenizer(text)["input_ids"]])
    if any(len(ids) == 0 for ids in out):
        raise ValueError("a prompt encoded to zero tokens; remove empty prompts")
    return out


def eos_ids(model: nn.Module, tokenizer: Any | None = None) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return sorted(ids)


def pad_id(model: nn.Module, tokenizer: Any | None = None) -> int:
    """The pad id (tokenizer's, else the generation config's, else the first EOS)."""
    for source in (getattr(tokenizer, "pad_token_id", None), getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if source is not None:
            return int(source)
    eos = eos_ids(model, tokenizer)
    return eos[0] if eos else 0


def _forward_kwargs(model: nn.Module) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _left_pad(batch: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (less padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _select_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only ``rows`` of every layer of a KV cache (in place)."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(rows)  # index_select on the batch dim of every layer
        return
    for layer in getattr(cache, "layers", []):  # pragma: no cover - older cache classes
        layer.batch_select_indices(rows)


@torch.inference_mode()
def _greedy_batch(
    model: nn.Module,
    batch: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: Iterable[int],
    pad: int,
    compact: bool = True,
    start: tuple[Any, torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy decoding of one left-padded batch with a KV cache.

    ``start`` = (cache holding the prompt, first new token per row) skips the prefill
    (see :func:`_shared_prefill`).

    With ``compact``, rows that have emitted EOS are dropped from the batch and the
    cache once a quarter of the remaining rows are done, so a batch costs what its
    unfinished rows cost (short refusals next to long answers). Rows never interact, so
    dropping some leaves the others' tokens unchanged.
    """
    device = next(model.parameters()).device
    cache_kw, has_keep = _forward_kwargs(model)
    ids, mask = _left_pad(batch, pad, device)
    # Positions as if each row were alone: 0 at its first real token (HF generate does the same).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(sorted(set(eos)) or [-1], device=device)
    rows = torch.arange(len(batch), device=device)  # original index of each row still in the batch
    finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, next token) per step
    cache = None if start is None else start[0]
    step_ids, step_pos = ids, positions
    # On a GPU, reading "finished" forces a host sync; do it every 8 steps there.
    check_every = 8 if device.type == "cuda" else 1
    for step in range(max_new_tokens):
        if step == 0 and start is not None:
            nxt = start[1]
        else:
            kwargs: dict[str, Any] = {cache_kw: cache, "use_cache": True}
            if has_keep:
                kwargs["logits_to_keep"] = 1
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **kwargs)
            cache = getattr(out, cache_kw, None)
            if cache is None:
                cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)  # (rows,)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        steps.append((rows, nxt))
        finished = finished | torch.isin(nxt, eos_t)
        if step % check_every == check_every - 1:
            n_done = int(finished.sum())
            if n_done == len(finished):
                break
            if compact and n_done * 4 >= len(finished):
                keep = (~finished).nonzero().squeeze(1)
                _select_rows(cache, keep)
                rows, nxt, finished = rows[keep], nxt[keep], finished[keep]
                mask, step_pos = mask[keep], step_pos[keep]
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return collect_steps(steps, len(batch), list(eos))


@dataclass
class Prefill:
    """A full-depth forward over one left-padded batch."""

    cache: Any
    """Transformers' ``DynamicCache`` holding every layer's prompt keys/values."""
    hidden: torch.Tensor
    """(batch, n_layers, d_model): each layer's output at the last prompt position."""
    mask: torch.Tensor
    """(batch, width) left-padding mask."""


@torch.inference_mode()
def _shared_prefill(model: nn.Module, stack: Any, batch: Sequence[Sequence[int]], pad: int) -> Prefill | None:
    """One full-depth prefill that serves every exit depth.

    The prompt's keys/values at layers < k do not depend on the exit depth k, and the
    depth-k model's first new token is the readout of layer k at the last prompt
    position. So one full-depth forward gives each depth its prompt cache (the first k
    layers) and its first token.

    Returns:
        The prefill, or ``None`` when the cache is not a plain per-layer dynamic cache
        (then each depth prefills).
    """
    device = next(model.parameters()).device
    cache_kw, has_keep = _forward_kwargs(model)
    ids, mask = _left_pad(batch, pad, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    captured: list[torch.Tensor | None] = [None] * stack.n_layers

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[i] = layer_hidden(output)[:, -1]

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(stack.layers)]
    try:
        kwargs: dict[str, Any] = {"use_cache": True}
        if has_keep:
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    finally:
        for h in handles:
            h.remove()
    cache = getattr(out, cache_kw, None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    # A sliding-window layer qualifies while it still holds the whole prompt.
    plain = ("DynamicLayer", "DynamicSlidingWindowLayer")
    if (layers is None or len(layers) != stack.n_layers
            or any(type(l).__name__ not in plain or l.keys.shape[-2] != ids.shape[1] for l in layers)):
        return None
    return Prefill(cache=cache, hidden=torch.stack(captured, dim=1), mask=mask)


@torch.inference_mode()
def _first_token(stack: Any, prefill: Prefill, k: int) -> torch.Tensor:
    """The depth-k model's first new token: layer k's readout at the last prompt position."""
    return readout_logits(stack, prefill.hidden[:, k - 1]).argmax(-1)


@torch.inference_mode()
def _depth_start(stack: Any, prefill: Prefill, k: int) -> tuple[Any, torch.Tensor]:
    """The depth-k model's prompt cache and first token, cut from a full-depth prefill."""
    from transformers import DynamicCache

    # The cache's tensors are shared, not copied: decoding only ever concatenates onto them.
    kv = [(layer.keys, layer.values) for layer in prefill.cache.layers[:k]]
    return DynamicCache(kv), _first_token(stack, prefill, k)


DECODERS: tuple[str, ...] = ("auto", "static", "hf")
"""``auto``: the static decoder where it supports the model, else Transformers' forward."""


def choose_decoder(model: nn.Module, stack: Any, decoder: str, max_positions: int) -> StaticDecoder | None:
    """The :class:`~safetylab.lm.decode.StaticDecoder` that ``decoder`` asks for, or ``None``
    for Transformers' forward (``hf``, or ``auto`` on a model the static decoder does not run).

    Raises:
        ValueError: an unknown name, or ``static`` on a model it does not run.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}; use one of {', '.join(DECODERS)}")
    if decoder == "hf":
        return None
    reason = unsupported(model, stack, max_positions)
    if reason is None:
        return StaticDecoder(model, stack)
    if decoder == "static":
        raise ValueError(f"decoder='static' cannot run {type(model).__name__}: {reason}; use decoder='auto' or 'hf'")
    return None


@model_attention_kernels
def greedy_generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: Iterable[int],
    pad: int,
    batch_size: int = 256,
) -> list[list[int]]:
    """Greedy continuations of every prompt (batched, left-padded, KV-cached).

    Runs the model as it is: wrap in :func:`~safetylab.lm.truncate.truncated` or an
    :class:`~safetylab.lm.truncate.ExitGate` to generate from an early exit.

    Args:
        model: a causal LM in eval mode.
        prompt_ids: token ids per prompt (non-empty).
        max_new_tokens: tokens to generate at most per prompt.
        eos: ids that end a continuation (kept as its last token).
        pad: id used for left padding (masked out).
        batch_size: prompts per forward.

    Returns:
        New token ids per prompt, in input order; each ends at the first EOS if any.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) == 0:
        raise ValueError("no prompts to generate from; pass at least one prompt")
    eos = list(eos)
    out: list[list[int] | None] = [None] * len(prompt_ids)
    for idx in _batches(prompt_ids, batch_size):
        rows = _greedy_batch(model, [prompt_ids[i] for i in idx], max_new_tokens=max_new_tokens, eos=eos, pad=pad)
        for i, r in zip(idx, rows):
            out[i] = r
    return out  # type: ignore[return-value]


@model_attention_kernels
def generate_at_depths(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    depths: Sequence[int],
    *,
    max_new_tokens: int,
    eos: Iterable[int],
    pad: int,
    batch_size: int = 256,
    mixed: bool = False,
    layers_attr: str | None = None,
    readout: "LayerReadout | None" = None,
    token_sets: Mapping[str, Sequence[int]] | None = None,
    decoder: str = "auto",
) -> dict[int, list[list[int]]]:
    """Greedy continuations of every prompt from each early-exit depth.

    The per-depth sweep prefills each batch once at full depth and cuts every depth's
    prompt cache and first token from it (:func:`_shared_prefill`); pass ``readout``
    (from :func:`empty_readout`) to fill in the all-depth first-token readout from that
    same forward pass.

    Args:
        model: a causal LM in eval mode.
        prompt_ids: token ids per prompt.
        depths: numbers of decoder layers that run (1..n_layers).
        max_new_tokens, eos, pad, batch_size: as in :func:`greedy_generate`.
        mixed: put all (prompt, depth) rows in shared batches, each row exiting at its
            own depth (:func:`~safetylab.lm.truncate.depth_sorted_batch`: layer l runs only
            on the rows that reach it), instead of one truncated sweep per depth.
        layers_attr: dotted path of the layer list when it is not a known one.
        decoder: per-depth sweep only. ``static`` decodes with
            :class:`~safetylab.lm.decode.StaticDecoder` (Llama, Mistral, Qwen2: static KV
            cache, CUDA graphs on a GPU); ``hf`` with Transformers' forward; ``auto`` (default)
            uses the static decoder where it supports the model.

    Returns:
        ``{depth: continuations in prompt order}``.
    """
    stack = find_decoder_stack(model, layers_attr)
    for k in depths:
        check_depth(k, stack.n_layers, type(model).__name__)
    eos = list(eos)
    if readout is not None and mixed:
        readout_full = first_token_readout(model, prompt_ids, pad=pad, token_sets=token_sets,
                                           batch_size=batch_size, layers_attr=layers_attr)
        readout.top_token[:] = readout_full.top_token
        readout.mass.update(readout_full.mass)
    if not mixed:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) == 0:
            raise ValueError("no prompts to generate from; pass at least one prompt")
        result: dict[int, list[list[int]]] = {k: [[] for _ in prompt_ids] for k in depths}
        fast = choose_decoder(model, stack, decoder, max(len(p) for p in prompt_ids) + max_new_tokens)
        for idx in _batches(prompt_ids, batch_size):
            batch = [prompt_ids[i] for i in idx]
            prefill = _shared_prefill(model, stack, batch, pad)
            if readout is not None:
                if prefill is None:
                    part = first_token_readout(model, batch, pad=pad, token_sets=token_sets, batch_size=len(batch),
                                               layers_attr=layers_attr)
                    top, mass = part.top_token, part.mass
                else:
                    top, mass = _readout_stats(stack, prefill.hidden, token_sets)
                readout.top_token[idx] = top
                for name in mass:
                    readout.mass[name][idx] = mass[name]
            if fast is not None and prefill is not None:
                state = fast.start(prefill.cache, prefill.mask, max_new_tokens)
                prefill.cache = None  # its keys/values now live in the static buffers
                for k in depths:
                    rows = fast.decode(state, k, _first_token(stack, prefill, k), max_new_tokens=max_new_tokens,
                                       eos=eos, pad=pad)
                    for i, r in zip(idx, rows):
                        result[k][i] = r
                continue
            for k in depths:
                start = _depth_start(stack, prefill, k) if prefill is not None else None
                with truncated(model, k, stack=stack):
                    rows = _greedy_batch(model, batch, max_new_tokens=max_new_tokens, eos=eos, pad=pad, start=start)
                for i, r in zip(idx, rows):
                    result[k][i] = r
        return result
    rows = [(k, i) for k in depths for i in range(len(prompt_ids))]
    flat_prompts = [prompt_ids[i] for _, i in rows]
    flat: list[list[int] | None] = [None] * len(rows)
    for idx in _batches(flat_prompts, batch_size):
        idx = sorted(idx, key=lambda j: -rows[j][0])  # deepest first: layer l runs on a prefix of rows
        exit_layers = torch.tensor([rows[j][0] for j in idx])
        with depth_sorted_batch(model, exit_layers, stack=stack):
            # No compaction: each layer caches a fixed prefix of the depth-sorted rows.
            out = _greedy_batch(model, [flat_prompts[j] for j in idx], max_new_tokens=max_new_tokens, eos=eos,
                                pad=pad, compact=False)
        for j, r in zip(idx, out):
            flat[j] = r
    result = {k: [] for k in depths}
    for (k, _), r in zip(rows, flat):
        result[k].append(r)
    return result


@dataclass
class ConfidentGeneration:
    """Greedy continuations under CALM-style per-token exit."""

    tokens: list[list[int]]
    """New token ids per prompt (ends at the first EOS if any)."""
    layers_used: list[list[int]]
    """Decoder layers each new token ran through (1..n_layers), aligned with ``tokens``."""
    n_layers: int = 0


@model_attention_kernels
def generate_confident(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    threshold: float,
    *,
    max_new_tokens: int,
    eos: Iterable[int],
    pad: int,
    batch_size: int = 256,
    layers_attr: str | None = None,
) -> ConfidentGeneration:
    """Greedy generation where each new token exits at its first confident layer.

    See :class:`~safetylab.lm.truncate.ExitGate` (mode ``confidence``): the token's
    readout confidence is CALM's softmax response (top-1 minus top-2 probability).

    Returns:
        Tokens and, per token, the number of layers it used (compute = mean / n_layers).
    """
    stack = find_decoder_stack(model, layers_attr)
    eos = list(eos)
    tokens: list[list[int] | None] = [None] * len(prompt_ids)
    used: list[list[int] | None] = [None] * len(prompt_ids)
    for idx in _batches(prompt_ids, batch_size):
        with ExitGate(model, "confidence", threshold=threshold, stack=stack) as gate:
            # No compaction: the gate records one (batch,) row of exit layers per step.
            out = _greedy_batch(model, [prompt_ids[i] for i in idx], max_new_tokens=max_new_tokens, eos=eos,
                                pad=pad, compact=False)
        steps = torch.stack(gate.step_exit_layers, dim=1).tolist()  # (batch, steps)
        for j, i in enumerate(idx):
            tokens[i] = out[j]
            used[i] = [int(x) for x in steps[j][: len(out[j])]]
    return ConfidentGeneration(tokens=tokens, layers_used=used, n_layers=stack.n_layers)  # type: ignore[arg-type]


@dataclass
class LayerReadout:
    """First-token readout at every depth from one forward pass."""

    top_token: np.ndarray
    """(n_prompts, n_layers) int: argmax token at depth k = index k-1."""
    mass: dict[str, np.ndarray] = field(default_factory=dict)
    """name -> (n_prompts, n_layers) probability of the next token being in that set."""


def empty_readout(n_prompts: int, n_layers: int, token_sets: Mapping[str, Sequence[int]] | None = None) -> LayerReadout:
    """A readout to be filled by :func:`generate_at_depths` (``readout=``)."""
    return LayerReadout(top_token=np.zeros((n_prompts, n_layers), dtype=np.int64),
                        mass={name: np.zeros((n_prompts, n_layers)) for name in (token_sets or {})})


@torch.inference_mode()
def _readout_stats(stack: Any, hidden: torch.Tensor, token_sets: Mapping[str, Sequence[int]] | None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Argmax token and set probabilities from (batch, n_layers, d_model) hidden states."""
    logits = readout_logits(stack, hidden)  # (batch, n_layers, vocab)
    probs = torch.softmax(logits, dim=-1)
    mass = {}
    for name, ids in (token_sets or {}).items():
        ids_t = torch.tensor(sorted(set(ids)), dtype=torch.long, device=probs.device)
        mass[name] = probs[..., ids_t].sum(-1).cpu().numpy()
    return logits.argmax(-1).cpu().numpy(), mass


@torch.inference_mode()
@model_attention_kernels
def first_token_readout(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad: int,
    token_sets: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 256,
    layers_attr: str | None = None,
) -> LayerReadout:
    """Next-token distribution after each prompt at every depth, in one full-depth pass.

    Captures every decoder layer's output at the last prompt position with forward hooks
    (what ``output_hidden_states`` returns, without keeping every position) and applies
    the final norm and LM head to it (:func:`~safetylab.lm.layers.readout_logits`). Depth
    k's readout equals the first-token logits of the model truncated to k layers (tested
    against both the truncated model and Transformers' ``output_hidden_states``).

    Args:
        model: a causal LM in eval mode (untruncated).
        prompt_ids: token ids per prompt.
        pad: id used for left padding.
        token_sets: named sets of token ids whose total probability to report (e.g. the
            first tokens of refusals).
        batch_size: prompts per forward.
        layers_attr: dotted path of the layer list when it is not a known one.

    Returns:
        Argmax token and set probabilities per prompt and depth.
    """
    stack = find_decoder_stack(model, layers_attr)
    n_layers = stack.n_layers
    sets = {name: torch.tensor(sorted(set(ids)), dtype=torch.long) for name, ids in (token_sets or {}).items()}
    device = next(model.parameters()).device
    top = np.zeros((len(prompt_ids), n_layers), dtype=np.int64)
    mass = {name: np.zeros((len(prompt_ids), n_layers)) for name in sets}
    for idx in _batches(prompt_ids, batch_size):
        captured: list[torch.Tensor | None] = [None] * n_layers

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                captured[i] = layer_hidden(output)[:, -1]  # (batch, d_model)

            return hook

        handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(stack.layers)]
        try:
            ids, mask = _left_pad([prompt_ids[i] for i in idx], pad, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            _, has_keep = _forward_kwargs(model)
            extra = {"logits_to_keep": 1} if has_keep else {}
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        finally:
            for h in handles:
                h.remove()
        hidden = torch.stack(captured, dim=1)  # (batch, n_layers, d_model)
        top[idx], part = _readout_stats(stack, hidden, token_sets)
        for name in mass:
            mass[name][idx] = part[name]
    return LayerReadout(top_token=top, mass=mass)
