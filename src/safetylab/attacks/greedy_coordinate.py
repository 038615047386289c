"""Greedy coordinate gradient (GCG): an adversarial suffix that makes chat models begin a target response.

Zou, Wang, Carlini, Nasr, Kolter & Fredrikson (2023), "Universal and Transferable
Adversarial Attacks on Aligned Language Models", Algorithm 1 (one prompt) and 2 (universal,
several prompts and models); the reference implementation used for comparison is nanoGCG
0.3.0 (GraySwanAI), whose defaults and buffer semantics are kept.

One step, for a suffix ``x`` of L tokens and objective ``J(x)`` = mean over prompts and
models of the target cross-entropy:

1. **Gradient**: ``J`` is differentiated w.r.t. the one-hot matrix ``e_x`` (L x V) by running
   the model on ``e_x @ W_embed``; ``-grad[i, v]`` ranks how much swapping position i to token
   v is expected to lower the loss (a first-order estimate).
2. **Candidates**: ``search_width`` copies of ``x``, each with ``n_replace`` random positions
   set to one of the ``topk`` best tokens there; tokens that are special, non-printable or
   not self-encoding are never proposed, and a candidate whose text does not re-encode to
   its ids is dropped (the "filter for tokens that do not round-trip"). Duplicates are scored once.
3. **Exact scoring**: every candidate's loss in batched forward passes that start from the
   prompt prefix's KV cache (computed once per prompt) and produce logits only where the
   target is predicted.
4. **Buffer**: the best candidate enters a buffer of the ``buffer_size`` best suffixes seen
   (0: nanoGCG's default, the step's best replaces the current suffix), and the next step
   starts from the buffer's best.

Options: early stop once greedy decoding emits every target exactly (every prompt, every
model); **progressive** multi-prompt GCG (Zou et al. 2023, Algorithm 2: "incrementally
adding new prompts"): the objective starts with the first request and the next one joins
only once the suffix makes greedy decoding emit every target in the objective, so the
suffix is not pulled toward all requests at once before it works on any; the adaptive
attack against perplexity filters adds ``perplexity_weight`` x the suffix's mean negative
log-likelihood under the first model (Jain et al. 2023, "Baseline Defenses for Adversarial
Attacks Against Aligned Language Models", section 4.1, adaptive attack; computed in the same
forward passes).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from safetylab.attacks.target import ChatTarget, PromptParts
from safetylab.errors import UserError


@dataclass(frozen=True)
class GCGConfig:
    """GCG settings. Defaults are the paper's (Zou et al. 2023: 20-token suffix of ``!``,
    top-k 256, 512 candidates per step, 500 steps) with nanoGCG's one-token swaps."""

    n_steps: int = 500
    """Optimisation steps at most."""
    suffix_length: int = 20
    """Tokens in the suffix (used when ``suffix_init`` is None)."""
    suffix_init: str | None = None
    """Initial suffix text (None: ``suffix_length`` copies of ``!``, or of the first allowed token)."""
    search_width: int = 512
    """Candidate suffixes scored per step."""
    topk: int = 256
    """Tokens per position the candidates are drawn from (by gradient rank)."""
    n_replace: int = 1
    """Positions changed per candidate."""
    buffer_size: int = 0
    """Best suffixes kept; 0 = the step's best candidate always replaces the current suffix (nanoGCG)."""
    batch_size: int | None = None
    """Candidates per forward pass (None: the whole search width at once)."""
    early_stop: bool = False
    """Stop once greedy decoding emits every target exactly for the best candidate."""
    stop_loss: float | None = None
    """Also stop once the objective falls below this."""
    perplexity_weight: float = 0.0
    """Weight of the suffix's mean NLL under the first model (0: the plain, non-adaptive GCG)."""
    progressive: bool = False
    """Zou et al.'s Algorithm 2: optimise over the first request, add the next once every target in the
    objective is emitted exactly (False: every request from the first step)."""
    allow_non_ascii: bool = False
    """Allow tokens whose text is not printable ASCII."""
    filter_ids: bool = True
    """Drop candidates whose decoded text does not re-encode to the same ids."""
    seed: int = 0
    """Seed of the candidate sampling."""
    select: str = "loss"
    """Which step's suffix is returned: ``loss``, the lowest objective (Zou et al., nanoGCG); ``targets``, the one
    that makes greedy decoding emit the most targets exactly, ties to the lower objective (what an attacker keeps
    when success, not loss, is the goal). The search itself is the same either way."""

    def check(self) -> None:
        """Raise :class:`UserError` (one line, naming the fix) on settings GCG cannot run."""
        if self.suffix_init is None and self.suffix_length < 1:
            raise UserError(f"suffix_length={self.suffix_length}: a suffix needs at least one token; use 1 or more "
                            "(the paper uses 20)")
        if self.suffix_init is not None and not self.suffix_init.strip():
            raise UserError("suffix_init is empty: a suffix needs at least one token; give some text or leave it unset")
        for name in ("n_steps", "search_width", "topk", "n_replace"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: the attack budget must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size}: use a positive number of candidates per pass, or None")
        if self.buffer_size < 0 or self.perplexity_weight < 0:
            raise UserError("buffer_size and perplexity_weight must be >= 0")
        if self.select not in ("loss", "targets"):
            raise UserError(f"select={self.select!r}: use 'loss' (the lowest objective) or 'targets' (the most "
                            "targets emitted exactly)")


@dataclass
class GCGResult:
    """What one GCG run found, with its trace (JSON types only)."""

    suffix_ids: list[int]
    """The best suffix found over all steps (lowest objective, or most targets met: ``GCGConfig.select``)."""
    suffix: str
    """Its text (decodes and re-encodes to ``suffix_ids`` when ``filter_ids`` is on)."""
    best_loss: float
    """Objective of the best suffix (mean target cross-entropy + perplexity term)."""
    losses: list[float]
    """Objective of each step's best candidate."""
    n_steps: int
    """Steps run (fewer than configured after an early stop)."""
    early_stopped: bool
    success: bool
    """Greedy decoding emits every target exactly after the best suffix (every prompt, every model)."""
    model_calls: int
    """Forward passes (gradient passes count one each, candidate batches one each, prefixes one each)."""
    sequences_scored: int
    """Candidate sequences evaluated (search width x prompts x models, less filtered and duplicate ones)."""
    wall_seconds: float
    seconds_per_step: float
    suffix_nll: float | None = None
    """Mean NLL of the best suffix under the first model (when the perplexity term is on)."""
    config: dict[str, Any] = field(default_factory=dict)
    converged_step: int | None = None
    """First step after which greedy decoding emitted every target exactly (every request, every model);
    None when the budget ran out first (steps to convergence)."""
    n_active: list[int] = field(default_factory=list)
    """Requests in the objective at each step (all of them unless ``progressive``)."""
    exact_fraction: float | None = None
    """Fraction of (model, request) pairs whose target the best suffix makes greedy decoding emit exactly."""
    targets_met: list[float] = field(default_factory=list)
    """Targets (model, request pairs in the objective) that each step's best candidate makes greedy decoding emit
    exactly: the convergence curve behind ``converged_step``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_targets(models: ChatTarget | Sequence[ChatTarget]) -> list[ChatTarget]:
    targets = [models] if isinstance(models, ChatTarget) else list(models)
    if not targets:
        raise UserError("gcg needs at least one model")
    vocab = targets[0].tokenizer.get_vocab()
    for t in targets[1:]:
        if t.tokenizer.get_vocab() != vocab:
            raise UserError(f"ensemble GCG needs models with one tokenizer; {targets[0].name} and {t.name} differ "
                            "(optimise on each separately and transfer the text instead)")
    return targets


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, search_width: int, topk: int,
                      n_replace: int, generator: torch.Generator) -> torch.Tensor:
    """Candidate suffixes from the gradient (Zou et al. 2023, Algorithm 1, lines 3-7).

    Args:
        suffix: (L,) current suffix ids.
        grad: (L, V) gradient w.r.t. the one-hot suffix.
        allowed: (n_allowed,) ids that may be proposed.
        search_width, topk, n_replace: see :class:`GCGConfig`.
        generator: torch random generator.

    Returns:
        (search_width, L) candidate ids, each differing from ``suffix`` in ``n_replace`` positions.
    """
    length = suffix.numel()
    masked = torch.full_like(grad, math.inf)
    masked[:, allowed] = grad[:, allowed]
    k = min(topk, allowed.numel())
    top = (-masked).topk(k, dim=1).indices  # (L, k)
    pos = torch.argsort(torch.rand(search_width, length, generator=generator), dim=1)[:, :n_replace]  # (W, r)
    pick = torch.randint(0, k, (search_width, n_replace), generator=generator)
    vals = top[pos, pick]  # (W, r)
    return suffix.repeat(search_width, 1).scatter_(1, pos, vals)


def gcg(
    models: ChatTarget | Sequence[ChatTarget],
    requests: Sequence[str],
    targets: Sequence[str],
    config: GCGConfig = GCGConfig(),
    *,
    checkpoint: Path | None = None,
    checkpoint_every: float = 300.0,
) -> GCGResult:
    """Optimise one suffix for every (model, request) pair: single, universal or ensemble GCG.

    Args:
        models: one :class:`ChatTarget`, or several sharing a tokenizer (ensemble objective).
        requests: user messages; the suffix is appended to each after a space.
        targets: the response each request should begin with (one per request).
        config: :class:`GCGConfig`.
        checkpoint: a JSON file for the search's state (None: none kept). Written at most every
            ``checkpoint_every`` seconds of search and once at the end; a call that finds one made by the
            same settings, requests, targets and weights goes on from its step, along the trajectory an
            uninterrupted call takes, and one that finds a finished search returns its result. A paper-scale
            search (500 steps of 512 candidates) runs for hours on a CPU: a crash then loses minutes.
        checkpoint_every: seconds between checkpoint writes (0: after every step).

    Returns:
        :class:`GCGResult` with the best suffix, the loss trace and the cost.

    Raises:
        UserError: empty inputs, a bad budget or suffix length, a target the tokenizer cannot
            encode, a model without a chat template, or an ensemble whose tokenizers differ.
    """
    config.check()
    if not requests or len(requests) != len(targets):
        raise UserError(f"gcg needs one target per request (got {len(requests)} requests, {len(targets)} targets)")
    start = time.perf_counter()
    models = _as_targets(models)
    first = models[0]
    gen = torch.Generator().manual_seed(config.seed)
    allowed = first.allowed_ids(config.allow_non_ascii)
    if allowed.numel() == 0:
        raise UserError(f"{first.name}: no token can be used in a suffix (all special or not self-encoding)")
    if config.suffix_init is not None:
        suffix = torch.tensor(first.encode_suffix(config.suffix_init), dtype=torch.long)
        if suffix.numel() == 0:
            raise UserError("suffix_init encodes to no tokens; give some text or leave it unset")
    else:
        bang = first.tokenizer("!", add_special_tokens=False)["input_ids"]
        tok = bang[0] if len(bang) == 1 and bang[0] in set(allowed.tolist()) else int(allowed[0])
        suffix = torch.full((config.suffix_length,), tok, dtype=torch.long)

    # Prompt spans and prefix caches: one forward per (model, prompt), reused every step.
    jobs: list[tuple[ChatTarget, PromptParts, Any, torch.Tensor, bool, int]] = []
    calls = 0
    for m_i, m in enumerate(models):
        for r_i, (req, tgt) in enumerate(zip(requests, targets)):
            parts = m.parts(req, tgt)
            kv, last = m.prefix_cache(parts)
            calls += 1
            jobs.append((m, parts, kv, last, m_i == 0, r_i))
    pw = config.perplexity_weight
    n_requests = len(requests)
    active = 1 if config.progressive else n_requests

    def score(cands: torch.Tensor, base: torch.Tensor | None = None, n_req: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Objective over the first ``n_req`` requests (default: the active ones), whether every target in it
        is exact, the suffix NLL, and how many of all n_req x models targets each candidate makes exact."""
        nonlocal calls
        n_req = active if n_req is None else n_req
        total = torch.zeros(cands.shape[0])
        exact = torch.ones(cands.shape[0], dtype=torch.bool)
        n_exact = torch.zeros(cands.shape[0])
        nll_sum, n_first, n_used = torch.zeros(cands.shape[0]), 0, 0
        for m, parts, kv, last, is_first, r_i in jobs:
            if r_i >= n_req:
                continue
            loss, ex, nll, n_calls = m.candidate_losses(parts, kv, last, cands, batch_size=config.batch_size,
                                                        suffix_nll=bool(pw) and is_first, base=base)
            calls += n_calls
            n_used += 1
            total += loss
            exact &= ex
            n_exact += ex.float()
            if nll is not None:
                nll_sum += nll
                n_first += 1
        nll_mean = nll_sum / n_first if n_first else None
        obj = total / n_used + (pw * nll_mean if nll_mean is not None else 0.0)
        return obj, exact, nll_mean, n_exact

    def entry_of(obj: torch.Tensor, exact: torch.Tensor, nll: torch.Tensor | None, cands: torch.Tensor, i: int,
                 n_met: torch.Tensor) -> tuple[float, torch.Tensor, bool, float | None, int, float]:
        return (float(obj[i]), cands[i].clone(), bool(exact[i]), None if nll is None else float(nll[i]), active,
                float(n_met[i]))

    def rank(e: tuple[float, torch.Tensor, bool, float | None, int, float]) -> tuple[float, ...]:
        """Higher is better. Objectives over different request sets are not comparable: a suffix over more
        requests is better, whichever the criterion."""
        return (e[4], e[5], -e[0]) if config.select == "targets" else (e[4], -e[0])

    identity = _search_identity(models, requests, targets, config) if checkpoint is not None else ""
    saved = _read_checkpoint(checkpoint, identity) if checkpoint is not None else None
    if saved is None:
        init_obj, init_exact, init_nll, init_met = score(suffix[None])
        buffer = [entry_of(init_obj, init_exact, init_nll, suffix[None], 0, init_met)]
        best = buffer[0]
        losses: list[float] = []
        n_active: list[int] = []
        met_trace: list[float] = []
        scored = 1
        early = finished = False
        converged: int | None = None
        done_steps, before = 0, 0.0
    else:
        buffer, best = [_entry(e) for e in saved["buffer"]], _entry(saved["best"])
        losses, n_active, met_trace = saved["losses"], saved["n_active"], saved["targets_met"]
        scored, calls, active, converged = saved["scored"], saved["calls"], saved["active"], saved["converged"]
        early, finished, done_steps, before = saved["early"], saved["finished"], saved["step"], saved["seconds"]
        gen.set_state(torch.tensor(saved["generator"], dtype=torch.uint8))
    last_save = time.perf_counter()

    def save(step: int, finished: bool) -> None:
        state = {"identity": identity, "step": step, "finished": finished, "early": early, "active": active,
                 "converged": converged, "scored": scored, "calls": calls, "buffer": [_plain(e) for e in buffer],
                 "best": _plain(best), "losses": losses, "n_active": n_active, "targets_met": met_trace,
                 "generator": gen.get_state().tolist(), "seconds": before + time.perf_counter() - start}
        checkpoint.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")  # type: ignore[union-attr]
        tmp.write_text(json.dumps(state))
        tmp.replace(checkpoint)  # type: ignore[union-attr]

    steps = done_steps
    for steps in range(done_steps + 1, (done_steps if finished else config.n_steps) + 1):
        current = buffer[0][1]
        grad = torch.zeros(current.numel(), first.embedding.weight.shape[0])
        for m, parts, kv, last, is_first, r_i in jobs:
            if r_i >= active:
                continue
            g, _ = m.suffix_gradient(parts, kv, last, current, pw if is_first else 0.0)
            calls += 1
            g = g.float().cpu()
            grad += g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # each prompt weighs equally (Zou et al., Alg. 2)
        cands = sample_candidates(current, grad, allowed, config.search_width, config.topk, config.n_replace, gen)
        if config.filter_ids:
            ok = torch.ones(cands.shape[0], dtype=torch.bool)
            for m in models:
                ok &= m.roundtrips(cands)
            cands = cands[ok]
        cands = torch.unique(cands, dim=0)
        if cands.shape[0] == 0:
            raise UserError(f"{first.name}: no candidate suffix survives the round-trip filter; set filter_ids=False "
                            "or start from another suffix_init")
        obj, exact, nll, n_met = score(cands, current)
        scored += cands.shape[0] * len(models) * active
        i = int(obj.argmin())
        entry = entry_of(obj, exact, nll, cands, i, n_met)
        losses.append(entry[0])
        n_active.append(active)
        met_trace.append(entry[5])
        if rank(entry) > rank(best):
            best = entry
        if config.buffer_size == 0:
            buffer = [entry]
        elif len(buffer) < config.buffer_size or entry[0] < buffer[-1][0]:
            buffer = sorted(buffer + [entry], key=lambda e: e[0])[: config.buffer_size]
        while entry[2] and active < n_requests:
            # Algorithm 2: the suffix works on every request so far; the next one joins the objective.
            active += 1
            o, ex, nl, met = score(entry[1][None])
            entry = entry_of(o, ex, nl, entry[1][None], 0, met)
            buffer = [entry]
            best = entry
        if entry[2] and active == n_requests and converged is None:
            converged = steps
        if (config.early_stop and entry[2] and active == n_requests) or \
                (config.stop_loss is not None and entry[0] < config.stop_loss and active == n_requests):
            early = True
            break
        if checkpoint is not None and time.perf_counter() - last_save >= checkpoint_every:
            save(steps, False)
            last_save = time.perf_counter()
    if checkpoint is not None and not finished:
        save(steps, True)
    wall = before + time.perf_counter() - start
    ids = [int(x) for x in best[1]]
    _, final_exact, _, n_exact = score(best[1][None], n_req=n_requests)
    return GCGResult(
        suffix_ids=ids, suffix=first.decode(ids), best_loss=best[0], losses=losses, n_steps=steps,
        early_stopped=early, success=bool(final_exact[0]), model_calls=calls, sequences_scored=scored,
        wall_seconds=wall, seconds_per_step=wall / max(steps, 1), suffix_nll=best[3], config=asdict(config),
        converged_step=converged, n_active=n_active, exact_fraction=float(n_exact[0]) / len(jobs),
        targets_met=met_trace)


Entry = tuple[float, torch.Tensor, bool, "float | None", int, float]


def _plain(e: Entry) -> list[Any]:
    """A buffer entry as JSON: objective, suffix ids, exact, suffix NLL, active requests, targets met."""
    return [e[0], [int(x) for x in e[1]], e[2], e[3], e[4], e[5]]


def _entry(v: list[Any]) -> Entry:
    return (float(v[0]), torch.tensor(v[1], dtype=torch.long), bool(v[2]), v[3], int(v[4]), float(v[5]))


def _search_identity(models: Sequence[ChatTarget], requests: Sequence[str], targets: Sequence[str],
                     config: GCGConfig) -> str:
    """What a checkpoint must match to be continued: the settings, the prompts and every model's weights. Of
    the weights, each tensor's name, shape, type and first and last 4,096 values: a fine-tune, a merged or
    attached adapter, or another checkpoint changes them, and a 7B model is read in well under a second."""
    h = hashlib.sha256(json.dumps([asdict(config), list(requests), list(targets)]).encode())
    for m in models:
        h.update(m.name.encode())
        for name, w in m.model.state_dict().items():
            flat = w.detach().reshape(-1)
            h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
            for part in (flat[:4096], flat[-4096:]):
                h.update(part.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _read_checkpoint(path: Path, identity: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none or it belongs to another search (which is then replaced)."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"note: GCG checkpoint {path} is unreadable; starting the search over", file=sys.stderr)
        return None
    if state.get("identity") != identity:
        print(f"note: GCG checkpoint {path} was made by other settings, prompts or weights; starting over",
              file=sys.stderr)
        return None
    return state


def random_suffix(target: ChatTarget, length: int, rng: np.random.Generator,
                  allow_non_ascii: bool = False) -> list[int]:
    """A uniformly random suffix of allowed tokens (the random-suffix baseline)."""
    if length < 1:
        raise UserError(f"suffix length={length}: a suffix needs at least one token")
    allowed = target.allowed_ids(allow_non_ascii).numpy()
    return [int(x) for x in rng.choice(allowed, size=length)]
