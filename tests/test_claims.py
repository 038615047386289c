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
