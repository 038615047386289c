"""Measured calibration of a study's decision rule (``safetylab calibrate STUDY``).

A verdict is only worth something if it could have come out the other way. Each study
ships a simulator of its raw records (``Study.simulate``) in which the primary contrast's
true effect is chosen; here the study's own ``analyze`` decides each simulated run, and
we count:

* **false holds** at the null, where the true effect sits exactly on the claim's
  threshold: the rule may say "holds" at most 5% of the time (its intervals are 95%
  two-sided, so a calibrated rule says it about 2.5% of the time);
* **power** at the study's declared alternative: how often it says "holds" when the
  effect is there;
* **false "does not hold"** at the same null, the mirror of false holds: a run whose true
  effect sits on the threshold should be called below it about 2.5% of the time. It is
  reported beside the verdict (``null.does_not_hold_rate`` with its interval, flagged above
  5%), not yet part of it: Wald-type intervals on skewed or all-or-nothing data over-call it.

Both come with exact (Clopper–Pearson) intervals, so Monte-Carlo error is visible. The rule
is calibrated when the false-holds *estimate* is at most 5% over at least
:data:`MIN_DRAWS` simulated runs (an interval that merely reaches down to 5% lets about 7%
pass) and the power interval reaches the declared power. The declared alternative is the
smallest effect worth detecting, not a sure thing, so the power printed there says how often
a real run of this size would see it.

A simulator holds only what its author assumed. ``--against RUN_DIR`` (:func:`compare_spread`)
simulates runs shaped by that run's own config and compares the between-unit spread of the
primary estimate (its standard error) with the real run's: a ratio beyond 2x either way means
the simulator's calibration says little about that design.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from safetylab.claims import Verdict
from safetylab.errors import UserError
from safetylab.metrics.stats import clopper_pearson_interval
from safetylab.study import Study, StudyConfig

MAX_FALSE_HOLDS = 0.05
MIN_DRAWS = 400
"""Fewest simulated runs per effect for a calibration verdict (a 5% rate to within about ±2 points)."""
MAX_SPREAD_RATIO = 2.0
"""``--against``: the simulator's standard error may differ from the real run's by at most this factor."""


def check_calibratable(study: Study) -> None:
    """Raise UserError (one line, exit 2) when ``study`` ships no simulator."""
    if study.simulate is None or study.calibration is None:
        raise UserError(f"study '{study.name}' has no simulator, so its decision rule cannot be calibrated; "
                        f"add simulate= and calibration= to its STUDY (see safetylab.study)")


def calibrate(study: Study, n: int = 400, *, seed: int = 0, progress: Any = None,
              effects: Sequence[float] = ()) -> dict[str, Any]:
    """Run ``study.analyze`` on ``n`` simulated runs at the null and ``n`` at the alternative.

    Args:
        study: a study with ``simulate`` and ``calibration``.
        n: simulated runs per effect (>= 400 for a 5% rate to within about ±2 points).
        seed: seeds the simulator (run ``i`` at the null uses ``[seed, 0, i]``).
        progress: optional callable advanced once per simulated run.
        effects: further true effects to simulate ``n`` runs at: the power curve between the
            threshold and the alternative, where a design's resolution shows. They do not enter
            whether the rule is calibrated.

    Returns:
        JSON-ready dict: per effect, the count and rate of each verdict, the holds rate with
        its Clopper–Pearson interval, and whether the rule is calibrated; ``curve``, one such
        entry per extra effect.

    Raises:
        UserError: the study has no simulator, or ``n`` < 1.
    """
    check_calibratable(study)
    if n < 1:
        raise UserError(f"--n {n}: need at least 1 simulated run per effect (400 or more for a 5% rate)")
    cal = study.calibration
    config = study.resolve_config(cal.scale, cal.overrides)
    out: dict[str, Any] = {"study": study.name, "n": n, "seed": seed, "effect": cal.effect,
                           "threshold": study.claim.threshold, "direction": study.claim.direction}
    with threadpool_limits(limits=1):  # many small analyses: threaded BLAS only adds overhead
        for stream, (which, effect) in enumerate((("null", cal.null_effect), ("alternative", cal.alternative_effect))):
            out[which] = _simulate_and_decide(study, config, stream, effect, n, seed, progress)
        # Streams 3, 4, ... (2 is compare_spread's): a curve point never reuses the null's or the alternative's draws.
        out["curve"] = [_simulate_and_decide(study, config, 3 + j, float(e), n, seed, progress)
                        for j, e in enumerate(effects)]
    out["null"]["max_false_holds"] = MAX_FALSE_HOLDS
    out["null"]["ok"] = out["null"]["holds_rate"] <= MAX_FALSE_HOLDS
    k = out["null"]["verdicts"][Verdict.DOES_NOT_HOLD.value]
    out["null"]["does_not_hold_rate"] = k / n
    out["null"]["does_not_hold_ci"] = list(clopper_pearson_interval(k, n))
    out["null"]["does_not_hold_ok"] = k / n <= MAX_FALSE_HOLDS
    out["alternative"]["declared_power"] = cal.power
    out["alternative"]["ok"] = out["alternative"]["holds_ci"][1] >= cal.power
    out["min_draws"] = MIN_DRAWS
    out["enough_draws"] = n >= MIN_DRAWS
    out["calibrated"] = bool(out["null"]["ok"] and out["alternative"]["ok"] and n >= MIN_DRAWS)
    return out


def compare_spread(study: Study, run_dir: Any, n: int = 100, *, seed: int = 0) -> dict[str, Any]:
    """The simulator's between-unit spread against a real run's, on the primary estimate.

    Simulates ``n`` runs with the run's own config (same seeds, requests, arms) at the run's own
    estimate of the effect (the null when it has none: a run far from the threshold has the spread
    of its own effect, e.g. a binomial floor near 0, not the null's) and compares the median
    standard error of the primary estimate with the real run's. With several treatment arms it is
    the standard error of the arm the real run was read off, in every simulated run.

    Returns:
        JSON-ready dict: ``real_se``, ``sim_se`` (median) with its 10-90% range, ``ratio``
        (sim / real), ``agrees`` (within :data:`MAX_SPREAD_RATIO` either way) and ``note``.

    Raises:
        UserError: no simulator, a bad run folder (see :func:`safetylab.results.load_run`), or a run
            of another study.
    """
    from pathlib import Path

    from safetylab.results import RESULTS_FILE, ResultsLog, finished_records, load_run

    check_calibratable(study)
    run_study_, config, _ = load_run(Path(run_dir))
    if run_study_.name != study.name:
        raise UserError(f"--against {run_dir} is a run of '{run_study_.name}', not '{study.name}'; "
                        f"pass a run folder of {study.name}")
    records = finished_records(ResultsLog(Path(run_dir) / RESULTS_FILE).read(repair=False), study.units(config))
    if not records:
        raise UserError(f"--against {run_dir}: no finished unit to compare with; finish the run first")
    real = study.analyze(config, records).verdict
    effect = real.estimate if real.estimate is not None else study.calibration.null_effect
    # With several arms, the spread of the arm the real run was read off: a simulated run may choose
    # another (every arm gets the same effect there), and arms differ in spread (clusters, sizes).
    arm = real.arm if real.arm in real.arm_se else None
    sims = []
    with threadpool_limits(limits=1):
        for i in range(n):
            rng = np.random.default_rng([seed, 2, i])
            v = study.analyze(config, study.simulate(config, effect, rng)).verdict
            se = v.arm_se.get(arm) if arm is not None else v.se
            if se is not None:
                sims.append(se)
    out: dict[str, Any] = {"study": study.name, "run_dir": str(run_dir), "n": n, "effect": effect, "arm": arm,
                           "real_se": real.se, "real_n": real.n, "sim_se": None, "sim_se_range": None, "ratio": None,
                           "agrees": None}
    if real.se is None or not sims or real.se <= 0:
        out["note"] = ("no standard error to compare: the real run's primary interval has none"
                       if real.se is None or real.se <= 0 else "the simulator's analyses give no standard error")
        return out
    med = float(np.median(sims))
    ratio = med / real.se
    out.update(sim_se=med, sim_se_range=[float(np.quantile(sims, 0.1)), float(np.quantile(sims, 0.9))],
               ratio=ratio, agrees=bool(1 / MAX_SPREAD_RATIO <= ratio <= MAX_SPREAD_RATIO))
    out["note"] = (f"the simulator's spread is {ratio:.2f}x the run's" + (f" on {arm}" if arm else "") + (
        "" if out["agrees"] else f": more than {MAX_SPREAD_RATIO:g}x apart, so its calibration says little "
                                 "about this design; refit the simulator's spread to real runs"))
    return out


def _simulate_and_decide(study: Study, config: StudyConfig, stream: int, effect: float, n: int, seed: int,
                         progress: Any) -> dict[str, Any]:
    """Verdict counts of ``n`` simulated runs at one true effect (run ``i`` draws from ``[seed, stream, i]``)."""
    counts = {v.value: 0 for v in Verdict}
    contrast_holds = 0
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])
        verdict = study.analyze(config, study.simulate(config, effect, rng)).verdict
        counts[verdict.verdict.value] += 1
        contrast_holds += verdict.contrast_verdict is Verdict.HOLDS
        if progress is not None:
            progress(1)
    k = counts[Verdict.HOLDS.value]
    lo, hi = clopper_pearson_interval(k, n)
    return {"effect": effect, "verdicts": counts, "holds_rate": k / n, "holds_ci": [lo, hi],
            "contrast_holds_rate": contrast_holds / n}
