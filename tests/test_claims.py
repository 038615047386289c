import math

import pytest

from safetylab.claims import Claim, ThreatModel, Verdict, VerdictRecord

GREATER = Claim(statement="s", metric="m/x", direction="greater", threshold=0.5)
LESS = Claim(statement="s", metric="m/x", direction="less", threshold=0.5)


@pytest.mark.parametrize(
    "claim, lo, hi, expected",
    [
        (GREATER, 0.51, 0.9, Verdict.HOLDS),
        (GREATER, 0.5, 0.9, Verdict.INCONCLUSIVE),  # touching the threshold is not clearing it
        (GREATER, 0.1, 0.5, Verdict.DOES_NOT_HOLD),
        (GREATER, 0.4, 0.6, Verdict.INCONCLUSIVE),
        (LESS, 0.1, 0.49, Verdict.HOLDS),
        (LESS, 0.5, 0.7, Verdict.DOES_NOT_HOLD),
        (LESS, 0.4, 0.6, Verdict.INCONCLUSIVE),
        (GREATER, None, 0.9, Verdict.INCONCLUSIVE),
        (GREATER, math.nan, math.nan, Verdict.INCONCLUSIVE),
    ],
)
def test_verdict_is_read_off_the_interval(claim, lo, hi, expected):
    assert claim.decide(lo, hi) is expected


def test_verdict_record_cleans_non_finite_bounds():
    rec = VerdictRecord.from_interval(GREATER, 0.7, math.nan, math.inf, n=3, interval_method="t")
    assert rec.ci_low is None and rec.ci_high is None
    assert rec.verdict is Verdict.INCONCLUSIVE
    assert rec.model_dump(mode="json")["verdict"] == "inconclusive"


def test_threat_model_rejects_unknown_access():
    with pytest.raises(ValueError):
        ThreatModel(deployer="d", adversary="a", access="root", budget="b", protected="p")


# --------------------------------------------------------------------------- controls decide validity, not the verdict
from safetylab.claims import Contrast, Control, Evidence, control_not_run, decide, judge_control  # noqa: E402
from safetylab.metrics.stats import Interval  # noqa: E402

POS = Control(name="pos", kind="positive", arms=("a",), measure="m", threshold=0.1, reason="r")
NEG = Control(name="neg", kind="negative", arms=("b",), measure="m", threshold=0.1, reason="r")
WITH = Claim(statement="s", metric="m/x", direction="greater", threshold=0.1, controls=(POS, NEG),
             contrast=Contrast(treatment=("t",), measure="m", unit="seeds", threshold_reason="why"))


@pytest.mark.parametrize(
    "control, est, lo, hi, status",
    [
        (POS, 0.3, 0.2, 0.5, "pass"),     # shows the effect
        (POS, 0.3, 0.05, 0.5, "fail"),    # cannot show it: the measurement may be blind
        (NEG, 0.02, 0.0, 0.05, "pass"),   # demonstrably absent
        (NEG, 0.05, -0.2, 0.3, "pass"),   # no clear effect and an estimate below: not a failure
        (NEG, 0.33, 0.02, 0.65, "fail"),  # its estimate shows the effect: too few units cannot make it pass
        (NEG, 0.3, 0.2, 0.5, "fail"),     # invents an effect that is not there
        (POS, 0.3, None, None, "not run"),
    ],
)
def test_control_status(control, est, lo, hi, status):
    assert judge_control(control, est, lo, hi).status == status


def test_a_negative_control_says_when_absence_is_not_demonstrated_and_decide_says_why_controls_failed():
    wide = judge_control(NEG, 0.05, -0.2, 0.3)
    assert wide.status == "pass" and "absence not demonstrated: the interval reaches 0.3" in wide.detail
    assert "absence not demonstrated" not in judge_control(NEG, 0.0, -0.02, 0.02).detail
    ev = Evidence(primary={"t": Interval(0.5, 0.3, 0.7, n=5, se=0.1, df=4)},
                  controls={"pos": Interval(0.42, -0.76, 1.0, n=2, se=0.5, df=1),
                            "neg": Interval(0.33, 0.02, 0.65, n=12, se=0.15, df=11)})
    reason = decide(WITH, ev).verdict.reason
    assert reason.startswith("control failed: pos (not demonstrated: its estimate 0.42 is past 0.1")
    assert "too few units" in reason and "neg (0.33 [0.02, 0.65] shows the effect it must not, past 0.1)" in reason
    ev = Evidence(primary={"t": Interval(0.5, 0.3, 0.7, n=5, se=0.1, df=4)},
                  controls={"pos": Interval(0.05, -0.1, 0.2, n=5, se=0.07, df=4),
                            "neg": Interval(0.0, -0.02, 0.02, n=12, se=0.01, df=11)})
    assert decide(WITH, ev).verdict.reason == "control failed: pos (0.05 [-0.1, 0.2] does not show the effect)"


def test_a_failed_or_missing_control_makes_the_verdict_inconclusive():
    ok = [judge_control(POS, 0.5, 0.3, 0.7), judge_control(NEG, 0.0, -0.02, 0.02)]
    rec = VerdictRecord.from_interval(WITH, 0.4, 0.2, 0.6, n=3, interval_method="t", controls=ok)
    assert rec.verdict is Verdict.HOLDS and rec.reason == "" and rec.unit == "seeds"
    bad = [judge_control(POS, 0.05, 0.0, 0.1), control_not_run(NEG, ["b"])]
    rec = VerdictRecord.from_interval(WITH, 0.4, 0.2, 0.6, n=3, interval_method="t", controls=bad)
    assert rec.verdict is Verdict.INCONCLUSIVE and rec.contrast_verdict is Verdict.HOLDS
    assert rec.reason == "control failed: pos; control not run: neg"
    assert rec.label == "inconclusive (control failed: pos; control not run: neg)"
