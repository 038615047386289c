"""Early exit: run only the first k decoder layers, then the final norm and LM head.

Three scoped mechanisms (each a context manager that restores the model in ``finally``,
even when the body raises):

* :func:`truncated` — the fast one: swaps the decoder-layer ``nn.ModuleList`` for one
  holding only its first k layers and sets ``config.num_hidden_layers = k`` (Llama-family
  forwards iterate ``self.layers[: config.num_hidden_layers]``; the KV cache is sized
  from the config). Layers after the exit cost nothing.
* :func:`identity_patched` — the essay's way: every layer after the exit point is
  replaced by an identity module, so the residual stream passes through unchanged.
  Equal to :func:`truncated` (tested); kept as the reference and for the benchmark.
* :class:`ExitGate` — per-row and per-token exits inside one full-depth forward: a row
  past its exit layer passes each later layer through unchanged (its output is replaced
  by its input). ``static`` gives every row its own depth (a mixed-depth batch);
  ``confidence`` is CALM's per-token exit (Schuster et al. 2022, "Confident Adaptive
  Language Modeling", sec. 3.5 softmax response): a token leaves at the first layer
  whose readout has top-1 minus top-2 probability >= threshold. As in CALM (sec. 3.4,
  state propagation) an exited token's hidden state is copied to the skipped layers,
  whose keys/values later tokens attend to.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from torch import nn

from safetylab.lm.layers import DecoderStack, find_decoder_stack, layer_hidden, readout_logits


def check_depth(n_layers_kept: int, n_layers: int, model_name: str = "the model") -> None:
    """Raise ValueError unless ``1 <= n_layers_kept <= n_layers``."""
    if isinstance(n_layers_kept, bool) or not isinstance(n_layers_kept, int):
        raise ValueError(f"depth must be an integer number of layers, got {n_layers_kept!r}")
    if not 1 <= n_layers_kept <= n_layers:
        raise ValueError(
            f"depth={n_layers_kept} but {model_name} has {n_layers} decoder layers; use 1..{n_layers} "
            f"(depth = number of layers that run before the final norm and LM head)"
        )


def evenly_spread_depths(n_layers: int, n_depths: int = 7) -> list[int]:
    """``n_depths`` exit depths evenly spread over 1..n_layers, full depth included.

    Depth i of n_depths is ``round(n_layers * i / n_depths)`` (at least 1); duplicates
    (when n_depths > n_layers) collapse. For 8 layers and 7 depths: [1, 2, 3, 5, 6, 7, 8].
    """
    if n_layers < 1 or n_depths < 1:
        raise ValueError(f"need n_layers >= 1 and n_depths >= 1, got {n_layers} and {n_depths}")
    return sorted({max(1, round(n_layers * i / n_depths)) for i in range(1, n_depths + 1)})


def _decoder_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def _stack(model: nn.Module, layers_attr: str | None, stack: DecoderStack | None) -> DecoderStack:
    return stack if stack is not None else find_decoder_stack(model, layers_attr)


@contextmanager
def truncated(
    model: nn.Module,
    n_layers_kept: int,
    *,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """Run only the first ``n_layers_kept`` decoder layers inside the block.

    The final norm and LM head still apply (they sit outside the layer list). Works
    with the KV cache: the model builds a cache of ``n_layers_kept`` layers.

    Args:
        model: a causal LM.
        n_layers_kept: layers that run, 1..n_layers (n_layers = no-op).
        layers_attr: dotted path of the layer list when it is not a known one.
        stack: a stack already found for ``model`` (skips the search).

    Yields:
        The model's :class:`DecoderStack` (its ``layers`` are the kept ones inside).

    Raises:
        ValueError: depth out of range, or the layer list cannot be found.
    """
    st = _stack(model, layers_attr, stack)
    full = st.layers
    n_layers = len(full)
    check_depth(n_layers_kept, n_layers, type(model).__name__)
    config = _decoder_config(model)
    # Patch the config only when it agrees with the layer list (custom models may not).
    patch_config = config is not None and getattr(config, "num_hidden_layers", None) == n_layers
    # Attribute assignment on nn.Module registers the new list as the submodule.
    setattr(st.owner, st.attr, nn.ModuleList(list(full)[:n_layers_kept]))
    try:
        if patch_config:
            config.num_hidden_layers = n_layers_kept
        yield st
    finally:
        setattr(st.owner, st.attr, full)
        if patch_config:
            config.num_hidden_layers = n_layers


class PassThrough(nn.Module):
    """A decoder layer replaced by identity: returns its input hidden state."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def identity_patched(
    model: nn.Module,
    n_layers_kept: int,
    *,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """The essay's truncation: layers ``n_layers_kept..n-1`` become identity modules.

    Assumes decoder layers return their hidden state as a tensor (Transformers >= 5).

    Yields:
        The model's :class:`DecoderStack`.
    """
    st = _stack(model, layers_attr, stack)
    layers = st.layers
    check_depth(n_layers_kept, len(layers), type(model).__name__)
    removed = {i: layers[i] for i in range(n_layers_kept, len(layers))}
    try:
        for i in removed:
            layers[i] = PassThrough()
        yield st
    finally:
        for i, layer in removed.items():
            layers[i] = layer


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise TypeError("cannot find the input hidden state of a decoder layer")
    return h


def _replace_hidden(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in a layer output of type {type(output).__name__}")


def softmax_response(logits: torch.Tensor) -> torch.Tensor:
    """CALM's confidence (Schuster et al. 2022, eq. 5): top-1 minus top-2 probability.

    Args:
        logits: (..., vocab).

    Returns:
        (...) confidence in [0, 1].
    """
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class ExitGate:
    """Per-row (static) or per-token (confidence) exits inside full-depth forwards.

    Use as a context manager around forwards of the *untruncated* model::

        with ExitGate(model, mode="static", exit_layers=torch.tensor([2, 4, 8])):
            model(input_ids, ...)        # row b runs layers 0..exit_layers[b]-1

        with ExitGate(model, mode="confidence", threshold=0.9) as gate:
            model(input_ids, ...)        # last position exits where confident
        gate.step_exit_layers            # [(batch,) layers used, one per forward]

    In ``static`` mode every position of row ``b`` exits after ``exit_layers[b]`` layers.
    In ``confidence`` mode only the last position of each forward (the token being
    predicted) exits early; earlier positions (the prompt, in a prefill) run all layers,
    as CALM runs its encoder in full and exits only while decoding.

    Args:
        model: a causal LM.
        mode: ``"static"`` or ``"confidence"``.
        exit_layers: (batch,) layers each row runs, 1..n_layers (static mode).
        threshold: softmax-response threshold in [0, 1] (confidence mode).
        layers_attr: dotted path of the layer list when it is not a known one.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Literal["static", "confidence"],
        *,
        exit_layers: torch.Tensor | None = None,
        threshold: float | None = None,
        layers_attr: str | None = None,
        stack: DecoderStack | None = None,
    ) -> None:
        self.stack = _stack(model, layers_attr, stack)
        self.n_layers = self.stack.n_layers
        self.mode = mode
        if mode == "static":
            if exit_layers is None:
                raise ValueError("ExitGate(mode='static') needs exit_layers, a (batch,) tensor of depths")
            for k in exit_layers.tolist():
                check_depth(int(k), self.n_layers, type(model).__name__)
            self.exit_layers = exit_layers.long()
        elif mode == "confidence":
            if threshold is None or not 0.0 <= threshold <= 1.0:
                raise ValueError(f"ExitGate(mode='confidence') needs threshold in [0, 1], got {threshold!r}")
            self.threshold = float(threshold)
        else:
            raise ValueError(f"mode must be 'static' or 'confidence', got {mode!r}")
        self.step_exit_layers: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._exited: torch.Tensor | None = None
        self._used: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            h_in = _hidden_in(args, kwargs)
            h_out = layer_hidden(output)
            if self.mode == "static":
                keep = (self.exit_layers.to(h_out.device) > index).view(-1, *([1] * (h_out.dim() - 1)))
                return _replace_hidden(output, torch.where(keep, h_out, h_in))
            # confidence mode: gate only the last position.
            batch = h_out.shape[0]
            if index == 0 or self._exited is None or self._exited.shape[0] != batch:
                self._exited = torch.zeros(batch, dtype=torch.bool, device=h_out.device)
                self._used = torch.full((batch,), self.n_layers, dtype=torch.long, device=h_out.device)
            last = torch.where(self._exited[:, None], h_in[:, -1], h_out[:, -1])
            new = h_out.clone()
            new[:, -1] = last
            if index < self.n_layers - 1:
                conf = softmax_response(readout_logits(self.stack, last))
                newly = (~self._exited) & (conf >= self.threshold)
                self._used = torch.where(newly, torch.full_like(self._used, index + 1), self._used)
                self._exited = self._exited | newly
            else:
                self.step_exit_layers.append(self._used.detach().cpu())
            return _replace_hidden(output, new)

        return hook

    def __enter__(self) -> "ExitGate":
        try:
            for i, layer in enumerate(self.stack.layers):
                self._handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _cut_rows(x: Any, batch: int, rows: int) -> Any:
    """``x`` restricted to its first ``rows`` batch rows: tensors of rank >= 2 whose first
    dimension is the batch (hidden states, 4-D attention masks, position ids, rotary
    cos/sin), recursively inside tuples/lists; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x[:rows] if x.dim() >= 2 and x.shape[0] == batch else x
    if isinstance(x, tuple):
        return tuple(_cut_rows(v, batch, rows) for v in x)
    if isinstance(x, list):
        return [_cut_rows(v, batch, rows) for v in x]
    return x


@contextmanager
def depth_sorted_batch(
    model: nn.Module,
    exit_layers: torch.Tensor,
    *,
    layers_attr: str | None = None,
    stack: DecoderStack | None = None,
) -> Iterator[DecoderStack]:
    """A mixed-depth batch that computes each layer only for the rows that reach it.

    Rows must be sorted by exit depth, deepest first. Layer ``l`` then runs on the first
    ``m_l`` rows (those with ``exit_layers > l``); the other rows pass it unchanged. The
    batch costs what one truncated batch per depth would (the same FLOPs) in a single
    forward per decoding step (far fewer kernel launches and Python calls). With a KV
    cache each layer caches exactly its ``m_l`` rows, the same rows at every step.
    Layers past the deepest exit do not run at all (:func:`truncated`).

    Args:
        model: a causal LM.
        exit_layers: (batch,) layers each row runs, non-increasing, each in 1..n_layers.
        layers_attr: dotted path of the layer list when it is not a known one.
        stack: a stack already found for ``model``.

    Yields:
        The model's :class:`DecoderStack`.
    """
    st = _stack(model, layers_attr, stack)
    depths = [int(k) for k in exit_layers.tolist()]
    for k in depths:
        check_depth(k, st.n_layers, type(model).__name__)
    if any(a < b for a, b in zip(depths, depths[1:])):
        raise ValueError("depth_sorted_batch needs rows sorted by exit depth, deepest first; "
                         "sort the batch or use ExitGate(mode='static')")
    batch = len(depths)
    # rows_at[l] = rows that run layer l (a prefix, since depths are sorted descending).
    rows_at = [sum(1 for k in depths if k > layer) for layer in range(depths[0])]
    saved: dict[int, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            rows = rows_at[index]
            if rows == batch:
                return None
            saved[index] = _hidden_in(args, kwargs)
            return _cut_rows(args, batch, rows), {k: _cut_rows(v, batch, rows) for k, v in kwargs.items()}

        return hook

    def post_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if index not in saved:
                return None
            full = saved.pop(index)
            h = layer_hidden(output)
            return _replace_hidden(output, torch.cat([h, full[h.shape[0]:]], dim=0))

        return hook

    with truncated(model, depths[0], stack=st) as kept:
        handles = []
        try:
            for i, layer in enumerate(kept.layers):
                handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
            yield kept
        finally:
            for h in handles:
                h.remove()
            saved.clear()
