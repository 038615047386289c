"""A lean greedy decoder for Llama-family models: static KV cache, one graph per depth.

Transformers' eager forward spends much of a decode step outside arithmetic: mask
building, cache bookkeeping, dozens of small launches per layer, and a dynamic cache
that is copied at every step. On an H200 the 7B-shaped sweep (250 prompts, 7 depths,
64 tokens: 448 batched steps) took 15.6-17.5 s through it, about 35 ms a step, where a
step's matrix products at the chip's measured bf16 rate take about 2.6 ms on average
over the depths. :class:`StaticDecoder` runs the same computation from the model's own
weights and modules with nothing else:

* the KV cache is preallocated (prompt width + new tokens) and written in place;
* grouped-query attention reads the shared keys once: the query heads of a group are
  laid out as that group's query rows (no repeated keys or values);
* on CPU the q/k/v and gate/up projections are fused into one matrix product each,
  and in float32 attention is two batched products (faster there than SDPA for one
  query row);
* on CUDA each depth's decode step is captured once as a CUDA graph and replayed, so a
  step costs one launch (the buffers it reads are fixed; only their contents change);
  RMSNorm is one fused kernel, and attention avoids cuDNN (:func:`attention_kernels`).

Measured on one H200 (2026-11-26, ``benchmarks/gpu_early_exit.sh``, random
Mistral-7B-shaped weights in bf16): the sweep took 3.5 s with this decoder and 9.9 s
through Transformers' forward on the same machine; ``benchmarks/gpu_decode_profile.py``
says where the time goes (matrix products are about 60% of a decode step).

It supports the families whose decoder layer is exactly Llama's (Llama, Mistral,
Qwen2: RMSNorm, rotary attention with grouped keys, gated MLP); :func:`unsupported`
says why any other model is not, and :func:`~safetylab.lm.generate.generate_at_depths`
then uses Transformers' forward. Norms, activations and the rotary tables come from the
model's own modules, so their numerics are the model's (on CUDA, RMSNorm runs as one
fused kernel: the same formula, only the order of its sum differs); the decoder is
tested token for token against Transformers (``tests/test_lm_decode.py``).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from safetylab.lm.layers import DecoderStack

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
"""``config.model_type`` values whose decoder layer :class:`StaticDecoder` reproduces."""

FUSE_MAX_BYTES = 1 << 30
"""Largest size of the weight copies that fusing makes by default (a 7B model's would take 9 GB)."""

# Rotary variants whose frequencies do not depend on the sequence length (a table of
# cos/sin per position is then exact).
_FIXED_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(model: nn.Module, stack: DecoderStack, max_positions: int = 0) -> str | None:
    """Why :class:`StaticDecoder` cannot run ``model``, or ``None`` when it can.

    Args:
        model: a causal LM.
        stack: its decoder stack.
        max_positions: the longest sequence (prompt + new tokens) it will decode.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if stack.path != "model.layers" or stack.final_norm is None:
        return f"decoder layers at {stack.path!r}, not the family's model.layers"
    owner = stack.owner
    if not isinstance(getattr(owner, "embed_tokens", None), nn.Embedding):
        return "no embed_tokens embedding next to the layers"
    rotary = getattr(owner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) not in _FIXED_ROPE:
        return f"rotary type {getattr(rotary, 'rope_type', None)!r} depends on sequence length"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return "the LM head is not a plain linear layer"
    for i, layer in enumerate(stack.layers):
        if not type(layer).__module__.startswith("transformers.models."):
            return f"layer {i} is a {type(layer).__name__} from {type(layer).__module__}, not Transformers' own"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(p) is not nn.Linear for p in parts):  # quantised or adapter-wrapped layers
            return f"layer {i} has projections that are not plain nn.Linear (quantised or wrapped)"
    window = sliding_window(model, stack)
    if window is not None and max_positions > window:
        return f"its attention window of {window} positions is shorter than the {max_positions} decoded"
    return None


def sliding_window(model: nn.Module, stack: DecoderStack) -> int | None:
    """The narrowest sliding attention window of any layer (``None``: full attention).

    Below the window, sliding-window attention equals full attention; the decoder only
    runs sequences that fit in it.
    """
    config = model.config
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in stack.layers]
    if getattr(config, "model_type", None) == "mistral":  # Mistral reads it from the config
        windows.append(getattr(config, "sliding_window", None))
    windows = [w for w in windows if w]
    return min(windows) if windows else None


@dataclass
class _Layer:
    ln1: nn.Module
    ln2: nn.Module
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # one fused (weight, bias) or q, k, v
    o: nn.Linear
    gate_up: list[tuple[torch.Tensor, torch.Tensor | None]]  # one fused or gate, up
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _pieces(linears: Sequence[nn.Linear], fuse: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if not fuse:
        return [(m.weight, m.bias) for m in linears]
    weight = torch.cat([m.weight for m in linears])
    has_bias = [m.bias is not None for m in linears]
    if not any(has_bias):
        return [(weight, None)]
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    return [(weight, bias)]


def _project(x: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor | None]], sizes: list[int]) -> list[torch.Tensor]:
    if len(pieces) == 1:
        return list(F.linear(x, *pieces[0]).split(sizes, dim=-1))
    return [F.linear(x, w, b) for w, b in pieces]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, bit for bit Transformers' ``x * cos + rotate_half(x) * sin``.

    ``rotate_half(x) = cat(-x2, x1)``; here ``roll(x) = cat(x2, x1)`` times ``sin`` with
    its first half negated: ``x2 * -s == -x2 * s`` exactly, one kernel fewer.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm in one fused kernel: ``weight * (x * rsqrt(mean(x^2) + eps))``.

    Transformers' module normalises in float32, rounds to the input's dtype, then scales
    by the weight in that dtype; ``F.rms_norm`` without a weight normalises in float32
    and rounds once, so the only difference is the summation order of ``mean(x^2)``.
    """
    return norm.weight * F.rms_norm(x, (x.shape[-1],), None, norm.variance_epsilon)


def attention_kernels(device: torch.device) -> Any:
    """On CUDA: a context that keeps cuDNN's attention out of SDPA's choice.

    cuDNN builds an execution graph for every new attention shape (each batch's prompt
    width, each decode shape). In the 7B-shaped sweep on an H200 those builds took about
    1.0 s in the prefill and 0.65 s in the graph captures, a third of the whole sweep,
    and they recur for every batch of a new width. Flash and memory-efficient attention
    need no build and were as fast on the decode step (78 vs 74 us a layer). Elsewhere:
    no change.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def model_attention_kernels(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn(model, ...)`` under :func:`attention_kernels` for the model's device."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with attention_kernels(next(model.parameters()).device):
            return fn(model, *args, **kwargs)

    return wrapper


def collect_steps(steps: Sequence[tuple[torch.Tensor, torch.Tensor]], n_rows: int, eos: Sequence[int]
                  ) -> list[list[int]]:
    """Per-row token lists from per-step (row indices, tokens), cut after each row's first EOS."""
    eos_set = set(eos)
    result: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    for step_rows, toks in steps:
        for r, t in zip(step_rows.tolist(), toks.tolist()):
            if not done[r]:
                result[r].append(int(t))
                done[r] = t in eos_set
    return result


@dataclass
class DecodeState:
    """One left-padded batch's static buffers, shared by every exit depth.

    The prompt's keys/values fill columns ``[0, width)``; a depth's decode writes its
    new tokens' keys/values from column ``width`` on, so the next depth starts from the
    same prompt cache without copying it.
    """

    keys: list[torch.Tensor]  # per layer (batch, kv_heads, width + new - 1, head_dim)
    values: list[torch.Tensor]
    prompt_mask: torch.Tensor  # (batch, width) bool: real (not padding) prompt tokens
    lengths: torch.Tensor  # (batch,) long: prompt length of each row
    width: int


class StaticDecoder:
    """Greedy decoding from the first k layers of a Llama-family model.

    Args:
        model: the causal LM (in eval mode; its weights are used in place).
        stack: its decoder stack (from :func:`~safetylab.lm.layers.find_decoder_stack`).
        fuse: fuse q/k/v and gate/up into one matrix each (copies those weights);
            default on CPU for models whose copies take at most :data:`FUSE_MAX_BYTES`
            (small models, where a decode step is a handful of small products).
        graphs: capture each depth's decode step as a CUDA graph (default on CUDA).
        fused_norm: RMSNorm as one fused kernel (:func:`_rms_norm`) instead of the
            module's eight small ones (default on CUDA, where it made the 7B-shaped
            sweep 0.4 s faster on an H200, 3.55 vs 3.95 s; the module's own numerics on CPU).

    Raises:
        ValueError: the model is not one this decoder reproduces (see :func:`unsupported`).
    """

    def __init__(self, model: nn.Module, stack: DecoderStack, *, fuse: bool | None = None,
                 graphs: bool | None = None, fused_norm: bool | None = None) -> None:
        reason = unsupported(model, stack)
        if reason:
            raise ValueError(f"the static decoder cannot run {type(model).__name__}: {reason}; use decoder='hf'")
        self.device = next(model.parameters()).device
        if fuse is None:
            fused_bytes = sum(m.weight.numel() * m.weight.element_size() for l in stack.layers
                              for m in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj,
                                        l.mlp.gate_proj, l.mlp.up_proj))
            fuse = self.device.type == "cpu" and fused_bytes <= FUSE_MAX_BYTES
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if fused_norm is None:
            norms = [n for l in stack.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
            fused_norm = self.device.type == "cuda" and all(hasattr(n, "variance_epsilon") for n in [*norms, stack.final_norm])
        self.fused_norm = fused_norm
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        owner = stack.owner
        self.embed: nn.Embedding = owner.embed_tokens
        self.rotary: nn.Module = owner.rotary_emb
        self.norm: nn.Module = stack.final_norm  # type: ignore[assignment]
        self.head: nn.Linear = model.get_output_embeddings()
        first = stack.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.kv_heads = stack.layers[0].self_attn.k_proj.out_features // self.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.group = self.heads // self.kv_heads
        self.sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.layers = [
            _Layer(ln1=l.input_layernorm, ln2=l.post_attention_layernorm,
                   qkv=_pieces([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], fuse),
                   o=l.self_attn.o_proj, gate_up=_pieces([l.mlp.gate_proj, l.mlp.up_proj], fuse),
                   down=l.mlp.down_proj, act=l.mlp.act_fn, scaling=float(l.self_attn.scaling))
            for l in stack.layers
        ]
        self.inter = stack.layers[0].mlp.gate_proj.out_features
        self.window = sliding_window(model, stack)
        # On CPU, two batched products beat SDPA's kernel for one query row per head (about 2x).
        # Only in float32: in half precision SDPA keeps the scores in float32, as Transformers does.
        self.explicit_attention = self.device.type == "cpu" and self.embed.weight.dtype == torch.float32
        self._cos = self._signed_sin = torch.empty(0)

    # -- setup ---------------------------------------------------------------------

    def _rope_tables(self, n_positions: int) -> None:
        if self._cos.shape[0] >= n_positions:
            return
        positions = torch.arange(n_positions, device=self.device)[None]
        probe = torch.empty(0, device=self.device, dtype=self.embed.weight.dtype)
        cos, sin = self.rotary(probe, positions)  # (1, positions, head_dim), the model's own tables
        half = sin.shape[-1] // 2
        self._cos, self._signed_sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)

    @torch.inference_mode()
    def start(self, prompt_cache: Any, mask: torch.Tensor, max_new_tokens: int) -> DecodeState:
        """Static buffers for one batch from a full-depth prefill's Transformers cache.

        Args:
            prompt_cache: the ``DynamicCache`` of a full-depth forward over the batch.
            mask: (batch, width) left-padding mask of that forward.
            max_new_tokens: tokens each depth will generate at most.
        """
        width = mask.shape[1]
        columns = width + max_new_tokens - 1  # the last new token is never fed back
        if self.device.type == "cuda":  # aligned mask rows for the GPU's attention kernels
            columns = -(-columns // 16) * 16  # (the spare columns stay masked)
        lengths = mask.sum(-1)
        longest = int(lengths.max()) + max_new_tokens
        if self.window is not None and longest > self.window:
            raise ValueError(f"sequences of {longest} positions exceed the model's attention window of "
                             f"{self.window}; use decoder='hf'")
        self._rope_tables(longest)
        keys, values = [], []
        for layer in prompt_cache.layers[: len(self.layers)]:
            # Zeros, not empty: a graph's step attends every column, and a masked column
            # still enters the arithmetic (recycled memory read as NaN would poison it).
            k = layer.keys.new_zeros((*layer.keys.shape[:2], columns, self.head_dim))
            v = layer.values.new_zeros((*layer.values.shape[:2], columns, self.head_dim))
            k[:, :, :width] = layer.keys
            v[:, :, :width] = layer.values
            keys.append(k)
            values.append(v)
        return DecodeState(keys=keys, values=values, prompt_mask=mask.bool(), lengths=lengths, width=width)

    # -- one decode step -----------------------------------------------------------

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(norm, x) if self.fused_norm else norm(x)

    def _step(self, depth: int, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
              keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, n_cols: int) -> torch.Tensor:
        """Next token of every row (greedy): the argmax of :meth:`_logits`."""
        return self._logits(depth, tokens, positions, column, keys, values, valid, n_cols).argmax(-1)

    def _logits(self, depth: int, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, n_cols: int
                ) -> torch.Tensor:
        """Next-token logits of every row after feeding ``tokens`` at ``positions``.

        Writes this token's keys/values at ``column`` (a (1,) tensor) of the first
        ``depth`` layers and marks the column valid; attends over columns ``[0, n_cols)``.
        """
        b = tokens.shape[0]
        h = self.embed(tokens)  # (b, d)
        cos, sin = self._cos[positions][:, None], self._signed_sin[positions][:, None]  # (b, 1, head_dim)
        valid.index_fill_(1, column, True)
        # Additive mask, built once per step for every layer: padding and future columns get -inf.
        mask = torch.zeros((b, 1, 1, n_cols), dtype=h.dtype, device=h.device)
        mask.masked_fill_(~valid[:, None, None, :n_cols], float("-inf"))
        for i in range(depth):
            layer = self.layers[i]
            x = self._norm(layer.ln1, h)
            q, k, v = _project(x, layer.qkv, self.sizes)
            q = q.view(b, self.heads, self.head_dim)
            k = k.view(b, self.kv_heads, self.head_dim)
            q = _rotate(q, cos, sin)
            k = _rotate(k, cos, sin)
            keys[i].index_copy_(2, column, k[:, :, None])
            values[i].index_copy_(2, column, v.view(b, self.kv_heads, 1, self.head_dim))
            # The `group` query heads sharing a key head are that head's query rows.
            q = q.view(b, self.kv_heads, self.group, self.head_dim)
            kc, vc = keys[i][:, :, :n_cols], values[i][:, :, :n_cols]
            if self.explicit_attention:
                scores = torch.matmul(q, kc.transpose(-1, -2)).mul_(layer.scaling).add_(mask)
                a = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), vc)
            else:
                a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=layer.scaling)
            h = h + layer.o(a.reshape(b, self.heads * self.head_dim))
            x = self._norm(layer.ln2, h)
            g, u = _project(x, layer.gate_up, [self.inter, self.inter])
            h = h + layer.down(layer.act(g) * u)
        return self.head(self._norm(self.norm, h))

    # -- decoding ------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, state: DecodeState, depth: int, first: torch.Tensor, *, max_new_tokens: int,
               eos: Sequence[int], pad: int, compact: bool = True) -> list[list[int]]:
        """Greedy continuations of the batch from the first ``depth`` layers.

        Args:
            state: from :meth:`start`.
            depth: layers that run (1..n_layers).
            first: (batch,) the depth's first new token (its readout of the prefill).
            max_new_tokens, eos, pad: as in :func:`~safetylab.lm.generate.greedy_generate`.
            compact: without graphs, drop finished rows once a quarter of those left are
                done (rows never interact, so the others' tokens are unchanged).

        Returns:
            New token ids per row; each ends at its first EOS if any.
        """
        device = self.device
        n = first.shape[0]
        eos_t = torch.tensor(sorted(set(eos)) or [-1], device=device)
        valid = torch.zeros((n, state.keys[0].shape[2]), dtype=torch.bool, device=device)
        valid[:, : state.width] = state.prompt_mask
        tokens = first.clone()
        positions = state.lengths.clone()
        column = torch.full((1,), state.width, dtype=torch.long, device=device)
        keys, values = list(state.keys), list(state.values)
        finished = torch.isin(tokens, eos_t)
        rows = torch.arange(n, device=device)
        steps: list[tuple[torch.Tensor, torch.Tensor]] = [(rows, tokens.clone())]
        on_gpu = device.type == "cuda"
        # On a GPU the eager step attends every column too, so it equals the graph's step
        # exactly (kernels round differently for other key lengths); on CPU it attends
        # only the columns written so far.
        all_columns = keys[0].shape[2] if on_gpu else None
        graph = None
        with torch.cuda.device(device) if on_gpu else nullcontext(), attention_kernels(device):  # the model's GPU
            if self.graphs and max_new_tokens > 1:
                graph = self._capture(depth, tokens, positions, column, keys, values, valid)
            check_every = 8 if on_gpu else 1  # reading `finished` waits for the GPU
            for step in range(1, max_new_tokens):
                if graph is not None:
                    graph[0].replay()
                    nxt = graph[1]
                else:
                    nxt = self._step(depth, tokens, positions, column, keys, values, valid,
                                     all_columns or state.width + step)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                steps.append((rows, nxt))
                finished |= torch.isin(nxt, eos_t)
                tokens.copy_(nxt)
                positions += 1
                column += 1
                if step % check_every == 0 or step == max_new_tokens - 1:
                    n_done = int(finished.sum())
                    if n_done == len(finished):
                        break
                    if graph is None and compact and n_done * 4 >= len(finished):
                        keep = (~finished).nonzero().squeeze(1)
                        keys = [k.index_select(0, keep) for k in keys]
                        values = [v.index_select(0, keep) for v in values]
                        rows, tokens, positions = rows[keep], tokens[keep], positions[keep]
                        valid, finished = valid[keep], finished[keep]
            del graph
        return collect_steps(steps, n, eos)

    def _capture(self, depth: int, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
                 keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor
                 ) -> tuple[Any, torch.Tensor] | None:
        """A replayable graph of one decode step at ``depth`` over these buffers, and its output.

        The step reads only buffer contents (token, position, column, cache, mask), never
        Python numbers that change between steps, and attends over every column (future
        ones are masked), so one capture serves every step. On failure, warns and
        decodes eagerly from then on.
        """
        n_cols = keys[0].shape[2]

        def body() -> torch.Tensor:
            return self._step(depth, tokens, positions, column, keys, values, valid, n_cols)

        try:
            return self._record(body)
        except RuntimeError as exc:  # pragma: no cover - needs a GPU
            warnings.warn(f"CUDA graph capture failed ({exc}); decoding without graphs", RuntimeWarning,
                          stacklevel=3)
            self.graphs = False
            return None

    def _record(self, body: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:  # pragma: no cover - GPU
        """Capture ``body`` as a CUDA graph; returns (graph, its output tensor).

        Warm-up and capture run the step on the current token and column; the first
        replay writes the same keys/values there again.
        """
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS workspaces, kernel choice) outside the graph
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        return graph, out
