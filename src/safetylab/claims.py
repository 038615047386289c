"""Claims, threat models and verdicts: how a study decides.

Every study declares one :class:`Claim` and one :class:`ThreatModel` (whom the
evidence speaks to). The claim is stated before any data exists (the verdict protocol
of ``DESIGN.md``, "How a study decides"):

1. **One primary contrast** (:class:`Contrast`): treatment arm(s) against control
   arm(s), one effect measure, a threshold that is an effect size worth caring about
   (with the reason), the unit of replication (training seeds; prompts clustered by
   hazard; environment seeds), and how "at least one of k" treatments is corrected.
2. **Controls are validity checks, never the verdict** (:class:`Control`). A positive
   control must *show* the effect (its interval clears the threshold: the measurement
   can see what it looks for); a negative control must *not* show it (a negative control
   fails only when its interval clears the threshold). An arm that shows the effect by
   construction is a control, not a treatment.
3. The verdict is read off the primary contrast's interval, never off a point estimate:

   * ``holds``          -- the whole interval lies on the claimed side of the threshold;
   * ``does not hold``  -- the whole interval lies on the other side;
   * ``inconclusive``   -- the interval straddles the threshold, nothing was measured,
     or a control failed or was not run (the record says which).
4. Calibration is measured, not assumed: a study's simulator draws raw records under a
   chosen true effect and ``safetylab calibrate`` runs the study's own ``analyze`` on
   them (:mod:`safetylab.calibrate`).
"""

from __future__ import annotations

import math
from enum import Enum
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safetylab.metrics.stats import Interval, holm_adjust

Access = Literal["black-box", "white-box", "weights", "none"]
"""How far an adversary reaches into the system: queries only, activations and
gradients, or the weights themselves (can fine-tune). ``none`` = no adversary."""

ACCESS_LEVELS: tuple[str, ...] = ("none", "black-box", "white-box", "weights")

# The essay's taxonomy ("The AI Threat Landscape"): who uses the system, who attacks it, and
# what is protected. One piece of evidence may speak to several values on each axis; it covers
# every combination of the values it names (a cell of the user x adversary x asset grid).

UserPopulation = Literal["public", "enterprise", "experts"]
"""Who uses the system: the general public (naive, careless and adversarial requests mixed),
enterprise / internal users (benign, behind a system prompt), knowledgeable experts (hard,
technical requests)."""
USER_POPULATIONS: tuple[str, ...] = ("public", "enterprise", "experts")

AdversaryTier = Literal["none", "casual", "sophisticated"]
"""Who attacks it: nobody (accidents and honest mistakes), casual users (jailbreaking for fun,
social engineering, retries), or sophisticated, resourced attackers (optimised attacks,
gradients, fine-tuning when the weights are exposed)."""
ADVERSARY_TIERS: tuple[str, ...] = ("none", "casual", "sophisticated")

Asset = Literal["users", "model", "society", "future"]
"""What is protected; see :data:`ASSET_LABELS`."""
ASSETS: tuple[str, ...] = ("users", "model", "society", "future")
ASSET_LABELS: dict[str, str] = {
    "users": "users from the model",
    "model": "the model from users (extraction, manipulation, prompt injection)",
    "society": "society from the system",
    "future": "the future from the present",
}

Cell = tuple[str, str, str]
"""One cell of the grid: (user population, adversary tier, asset)."""


PREMISE_NOT_MET = "premise not met: "
"""How a verdict's reason states each premise of the claim that the run's records do not meet
(:func:`decide`); :mod:`safetylab.audit` reads them back."""


class Verdict(str, Enum):
    HOLDS = "holds"
    DOES_NOT_HOLD = "does not hold"
    INCONCLUSIVE = "inconclusive"


_FROZEN = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Contrast(BaseModel):
    """The primary contrast, named before the data: what decides the claim."""

    model_config = _FROZEN

    treatment: tuple[str, ...]
    """Arms the claim is about (e.g. naturally aligned variants, the shielded arm)."""
    control: tuple[str, ...] = ()
    """Arms they are compared against (empty when the measure is within-arm, e.g. a depth drop)."""
    measure: str
    """The one effect measure, in words (what a unit contributes)."""
    unit: str
    """The unit of replication the interval is over (e.g. 'training seeds x hazard-clustered prompts')."""
    threshold_reason: str
    """Why the threshold is an effect size worth caring about."""
    multiplicity: Literal["none", "holm"] = "none"
    """'holm': the claim is 'at least one of k treatments'; per-arm intervals are Holm-corrected."""


class Control(BaseModel):
    """A validity check with a known answer."""

    model_config = _FROZEN

    name: str
    """Short id, e.g. 'sft-late loses refusal'."""
    kind: Literal["positive", "negative"]
    """positive: must show the effect; negative: must not."""
    arms: tuple[str, ...]
    """Arms it needs; the control is 'not run' when one is missing."""
    measure: str
    """What is measured, in words."""
    threshold: float
    """Positive: passes when the interval lies above it; negative: fails when it does."""
    reason: str
    """Why the answer is known in advance."""


class Claim(BaseModel):
    """The essay's claim, stated so that data can decide it."""

    model_config = _FROZEN

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
    contrast: Contrast | None = None
    """The primary contrast (every built-in study names one)."""
    controls: tuple[Control, ...] = ()
    """Validity checks; a failed or missing one makes the verdict inconclusive."""

    def decide(self, ci_low: float | None, ci_high: float | None) -> Verdict:
        """Verdict of the primary contrast alone, from its interval ``[ci_low, ci_high]``."""
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

    model_config = _FROZEN

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
    users: tuple[UserPopulation, ...] = ()
    """User populations the evidence speaks to (empty: not placed in the taxonomy)."""
    tiers: tuple[AdversaryTier, ...] = ()
    """Adversary tiers the evidence speaks to (empty: not placed)."""
    assets: tuple[Asset, ...] = ()
    """Protected assets the evidence speaks to (empty: not placed)."""

    @field_validator("users", "tiers", "assets", mode="after")
    @classmethod
    def _canonical(cls, values: tuple[str, ...], info: Any) -> tuple[str, ...]:
        # One spelling per set of cells: the taxonomy's order, no repeats.
        order = {"users": USER_POPULATIONS, "tiers": ADVERSARY_TIERS, "assets": ASSETS}[info.field_name]
        return tuple(v for v in order if v in values)

    @model_validator(mode="after")
    def _check_taxonomy(self) -> "ThreatModel":
        named = [bool(self.users), bool(self.tiers), bool(self.assets)]
        if any(named) and not all(named):
            missing = [k for k, n in zip(("users", "tiers", "assets"), named) if not n]
            raise ValueError(f"threat model names some taxonomy axes but not {', '.join(missing)}; "
                             "a cell needs a user population, an adversary tier and an asset")
        if self.access == "none" and set(self.tiers) - {"none"}:
            raise ValueError(f"access='none' (no adversary) but tiers={list(self.tiers)}; an adversary tier "
                             "other than 'none' needs black-box, white-box or weights access")
        return self

    @property
    def placed(self) -> bool:
        """Whether the threat model names its cells (old run folders' models do not)."""
        return bool(self.users)

    def cells(self) -> list[Cell]:
        """Every (user, tier, asset) cell the evidence speaks to, in the grid's order."""
        return [(u, t, a) for a in self.assets for u in self.users for t in self.tiers]

    def narrow(self, *, users: Sequence[str] | None = None, tiers: Sequence[str] | None = None,
               assets: Sequence[str] | None = None) -> "ThreatModel":
        """The same threat model restricted to what one run's config actually measured
        (``None``: that axis unchanged). Values outside the declared ones are dropped: a run
        never covers more than its study declares."""
        update: dict[str, tuple[str, ...]] = {}
        for name, keep in (("users", users), ("tiers", tiers), ("assets", assets)):
            if keep is not None:
                update[name] = tuple(v for v in getattr(self, name) if v in set(keep))
        return self.model_copy(update=update)


ControlStatus = Literal["pass", "fail", "not run"]


class ControlResult(BaseModel):
    """How one control came out, with the interval it was judged on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["positive", "negative"]
    status: ControlStatus
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    threshold: float | None = None
    detail: str = ""
    """One sentence: what was measured and why it passed or failed (or which arm is missing)."""


def judge_control(
    control: Control,
    estimate: float | None,
    ci_low: float | None,
    ci_high: float | None,
    detail: str = "",
) -> ControlResult:
    """Pass/fail of ``control`` from its interval (``None`` bounds: the control was not run).

    A positive control passes only when its whole interval lies above the threshold
    (the measurement demonstrably sees the effect). A negative control fails when its
    whole interval lies above it (the measurement demonstrably sees an effect that is not
    there) or when its estimate does: an estimate past the threshold is the effect the
    control must not show, whatever the interval's width, so a control with too few units
    cannot pass on absence of evidence. One that passes with its interval reaching past the
    threshold says so in its detail (absence not demonstrated).
    """

    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    est, lo, hi = clean(estimate), clean(ci_low), clean(ci_high)
    if est is None or lo is None or hi is None:
        status: ControlStatus = "not run"  # nothing measured, or too few units for an interval
        detail = detail or "no interval: too few units finished"
    elif control.kind == "positive":
        status = "pass" if lo is not None and lo > control.threshold else "fail"
    else:
        status = "fail" if lo > control.threshold or est > control.threshold else "pass"
        if status == "pass" and hi > control.threshold:
            detail = (detail + "; " if detail else "") + (
                f"absence not demonstrated: the interval reaches {hi:.3g}, past {control.threshold:g}")
    return ControlResult(name=control.name, kind=control.kind, status=status, estimate=est, ci_low=lo,
                         ci_high=hi, threshold=control.threshold, detail=detail)


def control_not_run(control: Control, missing: Sequence[str]) -> ControlResult:
    """The result of a control whose arms were not in the run."""
    return ControlResult(name=control.name, kind=control.kind, status="not run", threshold=control.threshold,
                         detail=f"not run: the config has no {', '.join(missing)}")


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
    """Number of independent units (seeds, prompt clusters) behind the interval."""
    interval_method: str = ""
    """How the interval was computed (e.g. 'two-way cluster-robust t over 3 seeds x 18 hazards')."""
    unit: str = ""
    """The unit of replication (from the claim's contrast)."""
    contrast_verdict: Verdict | None = None
    """What the primary contrast's interval alone says (before the controls)."""
    reason: str = ""
    """Why the verdict is inconclusive: a failed or missing control, a premise not met, too little
    power (the interval straddles the threshold), or nothing measured."""
    se: float | None = None
    """Standard error of the primary estimate (``None`` for exact or bootstrap intervals); what
    ``safetylab calibrate --against`` compares with the simulator's."""
    df: float | None = None
    """Degrees of freedom of its t interval."""
    arm: str | None = None
    """The treatment arm the verdict is read off (the strongest evidence of k, Holm-corrected)."""
    arm_se: dict[str, float] = Field(default_factory=dict)
    """Standard error of every treatment arm's estimate (k > 1 only): ``calibrate --against``
    compares the simulator's spread on the arm the real run was read off, whichever arm a
    simulated run would have chosen."""

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
        controls: Sequence[ControlResult] = (),
        reasons: Sequence[str] = (),
    ) -> "VerdictRecord":
        """The verdict: the primary contrast's, made inconclusive by any failed or missing control.

        ``reasons``: further reasons the verdict cannot be read (e.g. 'primary contrast not
        run: ...'); each makes it inconclusive and is stated first."""

        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        lo, hi = clean(ci_low), clean(ci_high)
        raw = claim.decide(lo, hi)
        failed = [c.name for c in controls if c.status == "fail"]
        missing = [c.name for c in controls if c.status == "not run"]
        reasons = [r for r in reasons if r]
        if failed:
            reasons.append(f"control failed: {'; '.join(failed)}")
        if missing:
            reasons.append(f"control not run: {'; '.join(missing)}")
        return cls(
            verdict=Verdict.INCONCLUSIVE if reasons else raw,
            metric=claim.metric,
            estimate=clean(estimate),
            ci_low=lo,
            ci_high=hi,
            confidence=confidence,
            threshold=claim.threshold,
            direction=claim.direction,
            n=n,
            interval_method=interval_method,
            unit=claim.contrast.unit if claim.contrast else "",
            contrast_verdict=raw,
            reason="; ".join(reasons),
        )

    @property
    def label(self) -> str:
        """'holds', or 'inconclusive (control failed: ...)'."""
        return f"{self.verdict.value} ({self.reason})" if self.reason else self.verdict.value


# --------------------------------------------------------------------------- protocol v2: measure, then decide


@dataclass(frozen=True)
class NotRun:
    """A control (or the primary contrast) that the run could not measure, and why."""

    reason: str
    """e.g. 'the config has no never-taught organism'."""


@dataclass(frozen=True)
class Evidence:
    """What a study measured, handed to :func:`decide`. A study's ``analyze`` computes this and
    never judges it: multiplicity, the choice of arm, the controls and the verdict are ``decide``'s.

    ``primary`` has one :class:`Interval` per treatment arm (one entry when the contrast has one
    treatment), each already the contrast's effect measure (treatment against control, paired
    where the design pairs). ``controls`` has one entry per declared control, **by name**: an
    :class:`Interval` to judge, or :class:`NotRun`. ``premises`` lists premises of the claim the
    run found unmet (e.g. 'accidents are not rare at this budget'); any makes the verdict
    inconclusive, and says so.
    """

    primary: Mapping[str, Interval]
    controls: Mapping[str, Interval | NotRun] = field(default_factory=dict)
    details: Mapping[str, str] = field(default_factory=dict)
    """One sentence per control name: what was measured (shown beside its status)."""
    premises: Sequence[str] = ()
    missing: str = ""
    """Why the primary contrast has no estimate, when ``primary`` is empty."""


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` returns: the verdict record, every declared control judged, and the arms."""

    verdict: VerdictRecord
    controls: list[ControlResult]
    arm: str | None
    """The arm the verdict is read off; ``None`` when nothing was measured."""
    arms: dict[str, Interval]
    """Every measured arm's interval at the decision's level (Bonferroni level 1 − α/k when the
    claim is 'at least one of k')."""
    p_holm: dict[str, float]
    """Holm-adjusted one-sided p-values per arm against the threshold (``nan`` without se)."""


def check_evidence(claim: Claim, evidence: Evidence) -> None:
    """Raise ValueError unless the evidence names exactly the claim's controls and, for a claim
    about one treatment, at most one primary arm. A study's bug, never a user's: a conformance
    test runs this over every registered study."""
    declared = [c.name for c in claim.controls]
    given = list(evidence.controls)
    if sorted(declared) != sorted(given):
        missing = [n for n in declared if n not in given]
        extra = [n for n in given if n not in declared]
        raise ValueError(f"evidence for claim '{claim.metric}' must judge every declared control by name: "
                         f"missing {missing}, undeclared {extra}")
    multi = claim.contrast is not None and claim.contrast.multiplicity == "holm"
    if len(evidence.primary) > 1 and not multi:
        raise ValueError(f"claim '{claim.metric}' has one treatment (multiplicity 'none') but the evidence "
                         f"gives {len(evidence.primary)} primary arms: {list(evidence.primary)}")


def _judge(control: Control, value: Interval | NotRun, detail: str) -> ControlResult:
    if isinstance(value, NotRun):
        return ControlResult(name=control.name, kind=control.kind, status="not run",
                             threshold=control.threshold, detail=f"not run: {value.reason}")
    return judge_control(control, value.estimate, value.lo, value.hi, detail)


def _why_failed(c: ControlResult) -> str:
    """A failed control's name and what failed it: a positive one that is too uncertain to show the effect is a
    different problem (too few units) from one whose estimate does not show it."""
    est, lo, hi, t = c.estimate, c.ci_low, c.ci_high, c.threshold
    if est is None or lo is None or hi is None:
        return c.name
    if c.kind == "positive":
        if est > t:
            return (f"{c.name} (not demonstrated: its estimate {est:.3g} is past {t:g} but its interval "
                    f"[{lo:.3g}, {hi:.3g}] reaches it; too few units)")
        return f"{c.name} ({est:.3g} [{lo:.3g}, {hi:.3g}] does not show the effect)"
    return f"{c.name} ({est:.3g} [{lo:.3g}, {hi:.3g}] shows the effect it must not, past {t:g})"


def _side(claim: Claim, iv: Interval) -> Verdict:
    return claim.decide(iv.lo, iv.hi)


def decide(claim: Claim, evidence: Evidence, *, confidence: float = 0.95) -> Decision:
    """The verdict on ``claim`` from ``evidence`` (the protocol of ``DESIGN.md``, "How a study decides").

    1. Every declared control is judged by name (:func:`judge_control`); a failed or unmeasured
       one makes the verdict inconclusive and is named in the reason.
    2. The primary contrast: with k > 1 treatment arms ("at least one of k", multiplicity
       ``holm``) every arm's interval is moved to the level 1 − α/k (Bonferroni, which is Holm's
       first step: the claim "at least one holds" is rejected by Holm exactly when it is by
       Bonferroni) and the arm is chosen as the one with the smallest Holm-adjusted p among those
       that clear the threshold; when none clears it, the one nearest to clearing it. "Does not
       hold" needs every arm's interval on the other side.
    3. The verdict is the chosen arm's (holds / does not hold / inconclusive), made inconclusive
       by any premise not met or control failed or not run. An inconclusive verdict always says
       why: a control, a premise, nothing measured, or too little power (the interval straddles
       the threshold).
    """
    check_evidence(claim, evidence)
    by_name = {c.name: c for c in claim.controls}
    controls = [_judge(by_name[n], evidence.controls[n], evidence.details.get(n, "")) for n in
                (c.name for c in claim.controls)]
    arms_in = {a: iv for a, iv in evidence.primary.items() if iv.measured}
    k = len(arms_in)
    alpha = 1 - confidence
    level = 1 - alpha / k if k > 1 else confidence
    arms = {a: iv.at_level(level) if k > 1 else iv for a, iv in arms_in.items()}
    ps = {a: iv.p_value(claim.threshold, claim.direction) for a, iv in arms.items()}
    p_holm = dict(zip(ps, holm_adjust([p if math.isfinite(p) else 1.0 for p in ps.values()]))) if ps else {}
    sign = 1.0 if claim.direction == "greater" else -1.0
    arm = None
    if arms:
        sides = {a: _side(claim, iv) for a, iv in arms.items()}
        clear = [a for a in arms if sides[a] is Verdict.HOLDS]
        if clear:
            arm = min(clear, key=lambda a: (p_holm.get(a, 1.0), -sign * arms[a].estimate))
        elif all(sides[a] is Verdict.DOES_NOT_HOLD for a in arms):
            # every arm is on the other side: report the one that comes closest to holding
            arm = max(arms, key=lambda a: sign * (arms[a].hi if sign > 0 else arms[a].lo))
        else:
            arm = max((a for a in arms if sides[a] is Verdict.INCONCLUSIVE), key=lambda a: sign * arms[a].estimate)
    chosen = arms.get(arm) if arm is not None else None
    raw = _side(claim, chosen) if chosen is not None else Verdict.INCONCLUSIVE
    reasons = [f"{PREMISE_NOT_MET}{p}" for p in evidence.premises if p]
    failed = [_why_failed(c) for c in controls if c.status == "fail"]
    missing = [c.name for c in controls if c.status == "not run"]
    if failed:
        reasons.append(f"control failed: {'; '.join(failed)}")
    if missing:
        reasons.append(f"control not run: {'; '.join(missing)}")
    if chosen is None:  # said whatever else is wrong: a missing primary is never only a missing control
        reasons.insert(0, f"nothing measured: {evidence.missing or 'no treatment arm has an estimate'}")
    elif not chosen.decided:  # the primary's own reason first: controls measured on the same units share it
        reasons.insert(0, f"no interval: {chosen.method or 'too few units'}")
    elif raw is Verdict.INCONCLUSIVE and not reasons:
        reasons.append(f"too little power: the interval [{chosen.lo:.3g}, {chosen.hi:.3g}] straddles the "
                       f"threshold {claim.threshold:g}")
    method = ""
    if chosen is not None:
        method = chosen.method + (f"; {arm}, the treatment with the strongest evidence of {k} (Bonferroni "
                                  f"{level:.1%} interval, Holm's first step)" if k > 1 else "")
    verdict = VerdictRecord(
        verdict=Verdict.INCONCLUSIVE if reasons else raw, metric=claim.metric,
        estimate=chosen.estimate if chosen else None, ci_low=chosen.lo if chosen else None,
        ci_high=chosen.hi if chosen else None, confidence=level, threshold=claim.threshold,
        direction=claim.direction, n=chosen.n if chosen else 0, interval_method=method or evidence.missing,
        unit=claim.contrast.unit if claim.contrast else "", contrast_verdict=raw, reason="; ".join(reasons),
        se=chosen.se if chosen else None, df=chosen.df if chosen else None, arm=arm if k > 1 or arm else None,
        arm_se={a: float(iv.se) for a, iv in arms_in.items() if k > 1 and iv.se is not None and math.isfinite(iv.se)})
    return Decision(verdict=verdict, controls=controls, arm=arm, arms=arms, p_holm=p_holm)
