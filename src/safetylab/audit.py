"""Counterfactual audits of a verdict on its own records (``safetylab audit RUN_DIR``).

A simulator holds only what its author assumed; a run's records hold what was measured. Each
study declares two record transforms (:class:`safetylab.study.Study` ``null`` and ``extreme``):

* **null**: the claimed effect removed on the same units (the treatment's outcomes replaced by
  the control's, paired by seed and request). The study's own ``analyze`` must not say "holds".
* **extreme**: the largest effect the design allows (every attacked request fails, every exit
  lost). ``analyze`` must be able to say "holds".

Both are judged on the primary contrast (``contrast_verdict``): a control that failed in the real
run makes every verdict inconclusive, and the question here is whether the decision rule could
move at all. A design stuck on one side is a defect however its simulator fares. The full
verdict is reported beside it. Audits work on deep copies; nothing is written in the run folder.

One case is not a defect: a run whose own records fail a premise of the claim (rare-failure at a
budget where accidents are not rare) cannot test it, and the premise may cap the contrast below
"holds" even at the extreme. The study already says ``inconclusive (premise not met: ...)`` for
that reason; the audit names the premise (``blocked``) instead of calling the design stuck, and
the design's two-way check needs a run where the premise holds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from safetylab.claims import PREMISE_NOT_MET, Verdict, VerdictRecord
from safetylab.errors import UserError
from safetylab.study import Study, StudyConfig

TRANSFORMS = ("null", "extreme")


def check_auditable(study: Study) -> None:
    """UserError (one line, exit 2) when ``study`` declares no record transforms."""
    if study.null is None or study.extreme is None:
        raise UserError(f"study '{study.name}' declares no null/extreme record transforms, so its verdict cannot "
                        "be audited; add null= and extreme= to its STUDY (see safetylab.study)")


def _outcome(study: Study, config: StudyConfig, records: list[dict[str, Any]], which: str) -> dict[str, Any]:
    transform = getattr(study, which)
    v = study.analyze(config, transform(config, copy.deepcopy(records))).verdict
    contrast = v.contrast_verdict or v.verdict
    ok = (contrast is not Verdict.HOLDS and v.verdict is not Verdict.HOLDS) if which == "null" \
        else contrast is Verdict.HOLDS
    return {"verdict": v.verdict.value, "label": v.label, "contrast_verdict": contrast.value,
            "estimate": v.estimate, "ci_low": v.ci_low, "ci_high": v.ci_high, "arm": v.arm, "ok": bool(ok),
            "premises": _premises_not_met(v.reason)}


def _premises_not_met(reason: str) -> list[str]:
    """The premises a verdict's reason names as not met (``claims.decide`` states each after
    :data:`PREMISE_NOT_MET`, joined with the other reasons by '; ')."""
    return [part[len(PREMISE_NOT_MET):] for part in reason.split("; ") if part.startswith(PREMISE_NOT_MET)]


def audit_records(study: Study, config: StudyConfig, records: list[dict[str, Any]],
                  verdict: VerdictRecord | None = None) -> dict[str, Any]:
    """Re-run ``study.analyze`` on the null and the extreme transform of ``records``.

    ``verdict``: the run's own verdict on ``records`` when the caller has it (else analysed here);
    a premise excuses an extreme stuck below 'holds' only when the run's own verdict names it too,
    so a transform that breaks a premise itself is still a stuck design.

    Returns:
        ``{"null": {...}, "extreme": {...}, "ok": bool, "stuck": str, "blocked": str}``; each outcome
        has the verdict, its label, what the contrast alone says, the estimate and interval, the
        premises its verdict names as not met, and ``ok``. ``stuck`` says which way the design is
        stuck ("" when it can go both ways); ``blocked`` names the premise that keeps the extreme
        from 'holds' on these records ("" unless the run's own verdict and the extreme's both name it).
    """
    check_auditable(study)
    out: dict[str, Any] = {which: _outcome(study, config, records, which) for which in TRANSFORMS}
    stuck = []
    if not out["null"]["ok"]:
        stuck.append("with the effect removed (null) it still says 'holds'")
    blocked = ""
    if not out["extreme"]["ok"]:
        # Matched by what the premise is (the text before its first ':'), not by its numbers.
        real = {p.split(":")[0] for p in _premises_not_met((verdict or study.analyze(config, records).verdict).reason)}
        shared = [p for p in out["extreme"]["premises"] if p.split(":")[0] in real]
        if shared:
            blocked = "; ".join(shared)
        else:
            stuck.append("with the largest effect the design allows (extreme) its contrast cannot say 'holds'")
    out["ok"] = not stuck
    out["stuck"] = "; ".join(stuck)
    out["blocked"] = blocked
    return out


def audit_run(run_dir: Path) -> dict[str, Any]:
    """Audit a finished run folder (read only).

    Raises:
        UserError: the folder is missing, not a run, partial (units unfinished or failed), written by
            an older safetylab whose records this study's transforms cannot read, or its study declares
            no transforms.
    """
    from safetylab.results import RESULTS_FILE, ResultsLog, finished_records, load_run

    study, config, _ = load_run(run_dir)
    check_auditable(study)
    log = run_dir / RESULTS_FILE
    if not log.is_file():
        raise UserError(f"{run_dir} has no {RESULTS_FILE}: no unit finished; run it with "
                        f"'safetylab run --resume {run_dir}' first")
    records_all = ResultsLog(log).read(repair=False)
    units = study.units(config)
    records = finished_records(records_all, units)
    if len(records) < len(units):
        raise UserError(f"{run_dir} is partial ({len(records)} of {len(units)} units finished); finish it with "
                        f"'safetylab run --resume {run_dir}', then audit it")
    try:
        real = study.analyze(config, records).verdict
        out = audit_records(study, config, records, real)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(f"{run_dir}'s records lack what the '{study.name}' audit reads ({type(exc).__name__}: "
                        f"{exc}); they were written by an older safetylab: rerun the study, then audit") from None
    return {"study": study.name, "run_dir": str(run_dir), "verdict": real.label, **out}


def audit_lines(audit: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, sentence) pairs for a report's "Could this verdict have come out the other way?"."""
    from safetylab.metrics.stats import format_interval

    out = []
    for which, what in (("null", "With the claimed effect removed on the same units (null)"),
                        ("extreme", "With the largest effect the design allows (extreme)")):
        o = audit[which]
        state = "as it must" if o["ok"] else "premise not met" if which == "extreme" and audit.get("blocked") \
            else "STUCK"
        out.append((which, f"{what}: {o['label']}, {format_interval(o['estimate'], o['ci_low'], o['ci_high'], 3)}"
                           f"; the contrast alone says {o['contrast_verdict']} ({state})."))
    if not audit["ok"]:
        last = f"The design is stuck: {audit['stuck']}."
    elif audit.get("blocked"):
        last = (f"This run cannot test the claim: its records do not meet the premise ({audit['blocked']}), which "
                "keeps even the largest effect from 'holds', and the verdict is inconclusive for that reason. "
                "The design goes both ways only where the premise holds: audit such a run.")
    else:
        last = "The design can go both ways."
    out.append(("audit", last))
    return out
