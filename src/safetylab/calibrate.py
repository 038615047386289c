"""Measured calibration of a study's decision rule (``safetylab calibrate STUDY``).

A verdict is only worth something if it could have come out the other way. Each study
ships a simulator of its raw records (``Study.simulate``) in which the primary contrast's
true effect is chosen; here the study's own ``analyze`` decides each simulated run, and
we count:

* **false holds** at the null, where the true effect sits exactly on the claim's
  threshold: the rule may say "holds" at most 5% of the time (its intervals are 95%
  two-sided, so a calibrated rule says it about 2.5% of the time);
* **power** at the study's declared alternative: how often it says "holds" when the
  effect is there.

Both come with exact (Clopper–Pearson) intervals, so Monte-Carlo error is visible: the
rule passes when the false-holds interval reaches down to 5% or below and the power
interval reaches up to the declared power or above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from safetylab.claims import Verdict
from safetylab.errors import UserError
from safetylab.metrics.stats import clopper_pearson_interval
from safetylab.study import Study, StudyConfig

MAX_FALSE_HOLDS = 0.05


def check_calibratable(study: Study) -> None:
    """Raise UserError (one line, exit 2) when ``study`` ships no simulator."""
    if study.simulate is None or study.calibration is None:
        raise UserError(f"study '{study.name}' has no simulator, so its decision rule cannot be calibrated; "
                        f"add simulate= and calibration= to its STUDY (see safetylab.study)")


def calibrate(study: Study, n: int = 400, *, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """Run ``study.analyze`` on ``n`` simulated runs at the null and ``n`` at the alternative.

    Args:
        study: a study with ``simulate`` and ``calibration``.
        n: simulated runs per effect (>= 400 for a 5% rate to within about ±2 points).
        seed: seeds the simulator (run ``i`` at the null uses ``[seed, 0, i]``).
        progress: optional callable advanced once per simulated run.

    Returns:
        JSON-ready dict: per effect, the count and rate of each verdict, the holds rate with
        its Clopper–Pearson interval, and whether the rule is calibrated.

    Raises:
        UserError: the study has no simulator.
    """
    check_calibratable(study)
    if n < 1:
        raise UserError(f"--n {n}: need at least 1 simulated run per effect (400 or more for a 5% rate)")
    cal = study.calibration
    config = study.resolve_config(cal.scale, cal.overrides)
    out: dict[str, Any] = {"study": study.name, "n": n, "seed": seed, "effect": cal.effect,
                           "threshold": study.claim.threshold, "direction": study.claim.direction}
    with threadpool_limits(limits=1):  # many small analyses: threaded BLAS only adds overhead
        for which, effect in (("null", cal.null_effect), ("alternative", cal.alternative_effect)):
            out[which] = _simulate_and_decide(study, config, which, effect, n, seed, progress)
    out["null"]["max_false_holds"] = MAX_FALSE_HOLDS
    out["null"]["ok"] = out["null"]["holds_ci"][0] <= MAX_FALSE_HOLDS
    out["alternative"]["declared_power"] = cal.power
    out["alternative"]["ok"] = out["alternative"]["holds_ci"][1] >= cal.power
    out["calibrated"] = bool(out["null"]["ok"] and out["alternative"]["ok"])
    return out


def _simulate_and_decide(study: Study, config: StudyConfig, which: str, effect: float, n: int, seed: int,
                         progress: Any) -> dict[str, Any]:
    """Verdict counts of ``n`` simulated runs at one true effect."""
    counts = {v.value: 0 for v in Verdict}
    contrast_holds = 0
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if which == "null" else 1, i])
        verdict = study.analyze(config, study.simulate(config, effect, rng)).verdict
        counts[verdict.verdict.value] += 1
        contrast_holds += verdict.contrast_verdict is Verdict.HOLDS
        if progress is not None:
            progress(1)
    k = counts[Verdict.HOLDS.value]
    lo, hi = clopper_pearson_interval(k, n)
    return {"effect": effect, "verdicts": counts, "holds_rate": k / n, "holds_ci": [lo, hi],
            "contrast_holds_rate": contrast_holds / n}
