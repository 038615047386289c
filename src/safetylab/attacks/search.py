"""Black-box suffix searches: random search and greedy token substitution, queries counted.

The adversary sees only what an API returning log-probabilities gives: for a prompt, the
log-probability of a chosen continuation. The score of a suffix is the summed
log-probability of each request's target string, averaged over requests (higher is
better); every forward pass of one candidate on one request is one **query**. No gradient,
no cache shared across queries.

* :func:`random_search` -- Andriushchenko, Croce & Flammarion (2024), "Jailbreaking Leading
  Safety-Aligned LLMs with Simple Adaptive Attacks", section 3: change ``n_change`` random
  positions to random tokens, keep the change when the score improves.
* :func:`greedy_substitution` -- coordinate-wise greedy search: at each position in turn,
  try ``n_try`` random tokens and keep the best if it improves the score (the black-box
  analogue of GCG's coordinate step, without the gradient's ranking).

Both can stop early on success: ``is_success(suffix_ids)`` is called on each new best
suffix (e.g. greedy-decode and grade it); each call costs one query per request and is
counted, since it is a query to the target too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from safetylab.attacks.target import ChatTarget
from safetylab.errors import UserError


@dataclass
class SearchResult:
    """What a black-box search found (JSON types only)."""

    method: str
    suffix_ids: list[int]
    suffix: str
    best_score: float
    """Mean over requests of the target's summed log-probability (<= 0)."""
    scores: list[float]
    """Best score after each round (one candidate batch)."""
    n_queries: int
    """Forward passes spent: candidates x requests, plus success checks."""
    success: bool
    """``is_success`` said yes for the best suffix (False when no check was given)."""
    queries_to_success: int | None
    """Queries spent when success was first seen, or None."""
    wall_seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(budget: int, suffix_length: int, requests: Sequence[str], targets: Sequence[str]) -> None:
    if budget < 1:
        raise UserError(f"budget={budget}: a search needs at least one query; give a positive number of queries")
    if suffix_length < 1:
        raise UserError(f"suffix_length={suffix_length}: a suffix needs at least one token; use 1 or more")
    if not requests or len(requests) != len(targets):
        raise UserError(f"a search needs one target per request (got {len(requests)} requests, {len(targets)} targets)")


class _Scorer:
    """Counts queries; scores suffixes by the mean target log-probability over requests."""

    def __init__(self, target: ChatTarget, requests: Sequence[str], targets: Sequence[str], budget: int,
                 is_success: Callable[[list[int]], bool] | None) -> None:
        self.target = target
        self.parts = [target.parts(r, t) for r, t in zip(requests, targets)]
        self.budget = budget
        self.is_success = is_success
        self.queries = 0
        self.success_at: int | None = None

    def room(self) -> int:
        """Candidates that still fit in the budget."""
        return (self.budget - self.queries) // len(self.parts)

    def score(self, suffixes: torch.Tensor) -> torch.Tensor:
        self.queries += suffixes.shape[0] * len(self.parts)
        return self.target.target_logprob(self.parts, suffixes).mean(1)

    def check(self, suffix: torch.Tensor) -> bool:
        if self.is_success is None or self.success_at is not None or self.queries + len(self.parts) > self.budget:
            return self.success_at is not None
        self.queries += len(self.parts)
        if self.is_success([int(x) for x in suffix]):
            self.success_at = self.queries
        return self.success_at is not None


def _start(target: ChatTarget, suffix_length: int, init: str | None, rng: np.random.Generator) -> torch.Tensor:
    if init is not None:
        ids = target.encode_suffix(init)
        if not ids:
            raise UserError("init encodes to no tokens; give some text or leave it unset")
        return torch.tensor(ids)
    return torch.tensor(rng.choice(target.allowed_ids().numpy(), size=suffix_length))


def _search(method: str, target: ChatTarget, requests: Sequence[str], targets: Sequence[str], budget: int,
            suffix_length: int, init: str | None, rng: np.random.Generator,
            is_success: Callable[[list[int]], bool] | None,
            propose: Callable[[torch.Tensor, int, int], torch.Tensor], config: dict[str, Any]) -> SearchResult:
    """The loop both searches share: propose candidates from the best suffix, keep an improvement."""
    t0 = time.perf_counter()
    sc = _Scorer(target, requests, targets, budget, is_success)
    best = _start(target, suffix_length, init, rng)
    scores: list[float] = []
    best_score = -np.inf
    if sc.room() >= 1:
        best_score = float(sc.score(best[None])[0])
        scores.append(best_score)
        sc.check(best)
    round_ = 0
    while sc.room() >= 1 and sc.success_at is None:
        cands = propose(best, sc.room(), round_)
        round_ += 1
        s = sc.score(cands)
        i = int(s.argmax())
        if float(s[i]) > best_score:
            best, best_score = cands[i].clone(), float(s[i])
            sc.check(best)
        scores.append(best_score)
    return SearchResult(
        method=method, suffix_ids=[int(x) for x in best], suffix=target.decode(best.tolist()), best_score=best_score,
        scores=scores, n_queries=sc.queries, success=sc.success_at is not None, queries_to_success=sc.success_at,
        wall_seconds=time.perf_counter() - t0, config={"budget": budget, "suffix_length": int(best.numel()), **config})


def random_search(
    target: ChatTarget,
    requests: Sequence[str],
    targets: Sequence[str],
    *,
    budget: int,
    suffix_length: int = 20,
    n_change: int = 1,
    batch: int = 8,
    init: str | None = None,
    rng: np.random.Generator,
    is_success: Callable[[list[int]], bool] | None = None,
) -> SearchResult:
    """Random-search suffix attack (Andriushchenko et al. 2024), black-box, queries counted.

    Args:
        target: the attacked model.
        requests, targets: user messages and the response each should begin with.
        budget: queries at most (forward passes of one candidate on one request).
        suffix_length: tokens in the suffix (ignored with ``init``).
        n_change: positions mutated per candidate.
        batch: candidates mutated from the current best and scored together per round.
        init: initial suffix text (None: random allowed tokens).
        rng: source of randomness.
        is_success: optional success check on a new best suffix (one query per request).

    Returns:
        :class:`SearchResult`.
    """
    _check(budget, suffix_length, requests, targets)
    allowed = target.allowed_ids().numpy()

    def propose(best: torch.Tensor, k: int, _round: int) -> torch.Tensor:
        cands = best.repeat(min(batch, k), 1)
        for row in cands:
            pos = rng.choice(best.numel(), size=min(n_change, best.numel()), replace=False)
            row[torch.from_numpy(pos)] = torch.from_numpy(rng.choice(allowed, size=pos.size))
        return cands

    return _search("random_search", target, requests, targets, budget, suffix_length, init, rng, is_success, propose,
                   {"n_change": n_change, "batch": batch})


def greedy_substitution(
    target: ChatTarget,
    requests: Sequence[str],
    targets: Sequence[str],
    *,
    budget: int,
    suffix_length: int = 20,
    n_try: int = 16,
    init: str | None = None,
    rng: np.random.Generator,
    is_success: Callable[[list[int]], bool] | None = None,
) -> SearchResult:
    """Greedy token substitution, black-box, queries counted.

    Sweeps the suffix positions left to right (then again): at each, scores ``n_try``
    random replacement tokens in one batch and keeps the best if it beats the current suffix.

    Args:
        target, requests, targets, budget, suffix_length, init, rng, is_success: as in
            :func:`random_search`.
        n_try: replacement tokens tried per position.

    Returns:
        :class:`SearchResult`.
    """
    _check(budget, suffix_length, requests, targets)
    allowed = target.allowed_ids().numpy()

    def propose(best: torch.Tensor, k: int, round_: int) -> torch.Tensor:
        k = min(n_try, k)
        cands = best.repeat(k, 1)
        cands[:, round_ % best.numel()] = torch.from_numpy(rng.choice(allowed, size=k, replace=k > allowed.size))
        return cands

    return _search("greedy_substitution", target, requests, targets, budget, suffix_length, init, rng, is_success,
                   propose, {"n_try": n_try})
