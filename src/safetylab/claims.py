"""Claims, threat models and verdicts.

Every study declares one :class:`Claim` (what the essay asserts, as a metric, a
direction and a threshold) and one :class:`ThreatModel` (whom the evidence speaks
to). A verdict is read off a confidence interval, never off a point estimate:

* ``holds``          — the whole interval lies on the claimed side of the threshold;
* ``does not hold``  — the whole interval lies on the other side;
* ``inconclusive``   — the interval straddles the threshold (or nothing was measured).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Access = Literal["black-box", "white-box", "weights", "none"]
"""How far an adversary reaches into the system: queries only, activations and
gradients, or the weights themselves (can fine-tune). ``none`` = no adversary."""

ACCESS_LEVELS: tuple[str, ...] = ("none", "black-box", "white-box", "weights")


class Verdict(str, Enum):
    HOLDS = "holds"
    DOES_NOT_HOLD = "does not hold"
    INCONCLUSIVE = "inconclusive"


class Claim(BaseModel):
    """The essay's claim, stated so that data can decide it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    statement: str
    """One sentence, the essay's claim in plain words."""
    metric: str
    """Namespaced key of the decisive quantity, e.g. ``safety/unshielded_unsafe_frac``."""
    direction: Literal["greater", "less"]
    """The claim holds when the metric is greater (or less) than ``threshold``."""
    threshold: float
    """The value the metric must clear."""
    metric_doc: str = ""
    """What the metric measures and its range, for the report."""

    def decide(self, ci_low: float | None, ci_high: float | None) -> Verdict:
        """Verdict from a confidence interval ``[ci_low, ci_high]``."""
        if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
            return Verdict.INCONCLUSIVE
        if self.direction == "greater":
            if ci_low > self.threshold:
                return Verdict.HOLDS
            if ci_high <= self.threshold:
                return Verdict.DOES_NOT_HOLD
        else:
            if ci_high < self.threshold:
                return Verdict.HOLDS
            if ci_low >= self.threshold:
                return Verdict.DOES_NOT_HOLD
        return Verdict.INCONCLUSIVE


class ThreatModel(BaseModel):
    """Whom a piece of evidence speaks to (essay 10: no claim without one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    deployer: str
    """Who uses the system and how (e.g. 'a lab serving a chat model with early exit')."""
    adversary: str
    """Who may attack it; 'none (accidental failures only)' when there is no attacker."""
    access: Access
    """The adversary's access: black-box queries, white-box activations/gradients, or weights."""
    budget: str
    """The adversary's budget in the study's own units (queries, steps, GPU-hours)."""
    protected: str
    """What is protected (e.g. 'refusal of hazardous procedures')."""
    out_of_scope: tuple[str, ...] = ()
    """What this evidence says nothing about."""


class VerdictRecord(BaseModel):
    """The verdict on a claim as it goes into ``summary.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    metric: str
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float = 0.95
    threshold: float
    direction: Literal["greater", "less"]
    n: int = Field(0, ge=0)
    """Number of independent units (seeds, prompts) behind the interval."""
    interval_method: str = ""
    """How the interval was computed (e.g. 'bootstrap over 40 seeds', 'Wilson')."""

    @classmethod
    def from_interval(
        cls,
        claim: Claim,
        estimate: float | None,
        ci_low: float | None,
        ci_high: float | None,
        *,
        n: int,
        interval_method: str,
        confidence: float = 0.95,
    ) -> "VerdictRecord":
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        lo, hi = clean(ci_low), clean(ci_high)
        return cls(
            verdict=claim.decide(lo, hi),
            metric=claim.metric,
            estimate=clean(estimate),
            ci_low=lo,
            ci_high=hi,
            confidence=confidence,
            threshold=claim.threshold,
            direction=claim.direction,
            n=n,
            interval_method=interval_method,
        )
