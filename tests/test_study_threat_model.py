"""Study threat-model: one organism under every adversary tier, per asset and user population."""

from __future__ import annotations

import numpy as np
import pytest
from cli_fixtures import run_cli
from organism_fixtures import one_torch_thread, run_tiny_study  # noqa: F401

from safetylab.claims import Verdict
from safetylab.studies import get_study

STUDY = get_study("threat-model")
TINY = {"organism_scale": "tiny", "seeds": 2, "n_requests": 6, "retries": 1, "gcg_steps": 2, "gcg_train": 2,
        "search_width": 16, "topk": 8, "finetune_steps": 3, "finetune_examples": 4, "negative_control": False}


def test_tiny_run_measures_every_cell_and_the_secret_breaks_under_attack(tmp_path):
    config, _, records, analysis = run_tiny_study(STUDY, TINY, tmp_path)
    cells = analysis.metrics["threats/cells"]
    assert len(cells) == 3 * 3 * 2  # users x tiers x measured assets, one failure rate each
    assert all(0.0 <= c["estimate"] <= 1.0 for c in cells.values())
    model = analysis.metrics["failure/sophisticated_minus_none/model"]
    # Kept under natural traffic, extracted by GCG or fine-tuning: the contrast's direction.
    assert model["rate"] > 0.25 and all(cells[f"{u}/none/model"]["estimate"] == 0.0
                                        for u in ("public", "enterprise", "experts"))
    grid = next(t for t in analysis.tables if t.kind == "matrix")
    assert grid.columns == ["asset / users", "none", "casual", "sophisticated"] and len(grid.rows) == 6
    # The negative control was switched off: the verdict cannot be read and says why.
    assert analysis.verdict.verdict is Verdict.INCONCLUSIVE and "never-taught" in analysis.verdict.reason
    assert records[0]["result"]["cells"]["model/public"]["casual"]["attempts"] == 7 + TINY["retries"]


def _simulated(effect: float, seed: int = 0, **over):
    config = STUDY.resolve_config("quick", {"n_requests": 30, **over})
    return config, STUDY.simulate(config, effect, np.random.default_rng(seed))


def test_verdict_can_go_either_way_and_the_negative_control_can_fail():
    config, recs = _simulated(0.9)
    assert STUDY.analyze(config, recs).verdict.verdict is Verdict.HOLDS
    config, recs = _simulated(0.0)
    assert STUDY.analyze(config, recs).verdict.verdict is Verdict.DOES_NOT_HOLD
    config, recs = _simulated(0.7)
    for r in recs:  # a never-taught that gives harm under attack: the measurement is broken
        if r["result"]["kind"] == "never-taught":
            for cell in r["result"]["cells"].values():
                cell["sophisticated"]["failed"] = [True] * len(cell["sophisticated"]["failed"])
    a = STUDY.analyze(config, recs)
    assert a.verdict.verdict is Verdict.INCONCLUSIVE and a.controls[0].status == "fail"


def test_a_config_without_attackers_covers_only_the_none_tier():
    config = STUDY.resolve_config("quick", {"tiers": ["none"], "assets": ["model"]})
    covered = STUDY.covered_threat_model(config)
    assert covered.tiers == ("none",) and covered.assets == ("model",)
    assert set(covered.cells()) < set(STUDY.threat_model.cells())


@pytest.mark.parametrize("args,needle", [
    (["--set", 'tiers=["nation-state"]'], "tiers"),
    (["--set", 'users=["everyone"]'], "users"),
    (["--set", 'assets=["future"]'], "assets"),
    (["--set", "seeds=0"], "seeds"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    code, out, err = run_cli(["run", "threat-model", "--scale", "quick", "--out", str(tmp_path / "runs"), *args],
                             capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
