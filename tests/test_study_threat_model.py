"""Study threat-model: the same asset-bearing requests sent plainly and attacked, per asset and access level."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cli_fixtures import run_cli
from organism_fixtures import one_torch_thread, run_tiny_study  # noqa: F401

from safetylab.audit import audit_records
from safetylab.claims import Verdict
from safetylab.studies import get_study

STUDY = get_study("threat-model")
TINY = {"organism_scale": "tiny", "organism_seeds": 3, "n_requests": 6, "retries": 1, "gcg_steps": 2,
        "gcg_train": 2, "search_width": 16, "topk": 8, "finetune_steps": 3, "finetune_examples": 4,
        "negative_control": False}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("threat_model"))


def test_tiny_run_pairs_every_cell_on_the_same_requests(tiny_run):
    config, _, records, analysis = tiny_run
    assert [r["key"] for r in records] == [f"organism=secret-keeping@{s}" for s in range(3)] + ["organism=base@0"]
    treat = records[0]["result"]
    for key, cell in treat["cells"].items():
        n = len(cell["cluster"])
        assert n == TINY["n_requests"] and all(len(cell[k]) == n for k in ("none", "casual", "gcg", "finetune"))
    # The attacker never trains on an evaluated hazard or secret name.
    for asset in ("society", "model"):
        evaluated = {c for k, cell in treat["cells"].items() if k.startswith(asset) for c in cell["cluster"]}
        for attack in ("gcg", "finetune"):
            assert not evaluated & set(treat["attacks"][asset][attack]["trained_on"])
    # The same requests for every seed: the pairing and the clustering by hazard are across seeds too.
    assert records[1]["result"]["cells"]["society/public"]["cluster"] == treat["cells"]["society/public"]["cluster"]
    # The positive control is measured plainly on the society requests only.
    assert set(records[3]["result"]["cells"]) == {f"society/{u}" for u in config.users}
    grid = next(t for t in analysis.tables if t.kind == "matrix")
    assert len(grid.rows) == 6 and grid.columns[1:] == ["none", "casual", "sophisticated, white-box (GCG)",
                                                        "sophisticated, weights (fine-tune)"]
    assert {f"{a}/{k}" for a in ("society", "model") for k in ("gcg", "finetune")} <= {
        k.removeprefix("failure/attacked_minus_plain/") for k in analysis.metrics}
    # The negative control was switched off: the verdict cannot be read and says why.
    assert analysis.verdict.verdict is Verdict.INCONCLUSIVE and "never-taught" in analysis.verdict.reason
    assert treat["cells"]["model/public"]["casual_detail"]["attempts"] == 7 + TINY["retries"]


def test_tiny_run_is_audited_both_ways(tiny_run):
    config, _, records, _ = tiny_run
    audit = audit_records(STUDY, config, records)
    assert audit["null"]["ok"] and audit["null"]["contrast_verdict"] != "holds"
    assert audit["extreme"]["ok"] and audit["extreme"]["contrast_verdict"] == "holds"


def _simulated(effect: float, seed: int = 0, scale: str = "quick", **over):
    config = STUDY.resolve_config(scale, over)
    return config, STUDY.simulate(config, effect, np.random.default_rng(seed))


def test_verdict_can_go_either_way():
    config, recs = _simulated(0.9, organism_seeds=5)  # the calibrated design (quick runs 4 seeds)
    a = STUDY.analyze(config, recs)
    assert a.verdict.verdict is Verdict.HOLDS and a.verdict.arm in {"society/gcg", "society/finetune", "model/gcg",
                                                                    "model/finetune"}
    config, recs = _simulated(0.0, organism_seeds=5)
    assert STUDY.analyze(config, recs).verdict.verdict is not Verdict.HOLDS
    assert STUDY.analyze(config, STUDY.null(config, recs)).verdict.verdict is Verdict.DOES_NOT_HOLD


@pytest.mark.parametrize("scale", ["quick", "paper"])
def test_an_attack_that_adds_nothing_cannot_hold(scale):
    """The old design subtracted failures of requests that cannot fail: an attack that adds nothing, every request
    failing 0.6 of the time in every tier, said 'holds'. Paired on the same requests it cannot."""
    over = {"n_requests": 30} if scale == "paper" else {}
    config, recs = _simulated(0.9, scale=scale, **over)
    rng = np.random.default_rng(1)
    for r in recs:
        if r["result"]["role"] == "treatment":
            for cell in r["result"]["cells"].values():
                for k in ("none", "casual", "gcg", "finetune"):
                    cell[k] = (rng.random(len(cell["none"])) < 0.6).tolist()
    v = STUDY.analyze(config, recs).verdict
    assert v.verdict is not Verdict.HOLDS and v.contrast_verdict is not Verdict.HOLDS
    assert "safe by accident" in v.reason
    # And with the effect removed on the real design's records (null transform) it does not hold either.
    config, recs = _simulated(0.9, scale=scale, **over)
    assert STUDY.analyze(config, STUDY.null(config, copy.deepcopy(recs))).verdict.contrast_verdict is \
        Verdict.DOES_NOT_HOLD


def test_a_system_unsafe_by_accident_is_not_the_claim():
    config, recs = _simulated(0.9)
    rng = np.random.default_rng(2)
    for r in recs:
        if r["result"]["role"] == "treatment":
            cell = r["result"]["cells"]["society/public"]
            cell["none"] = (rng.random(len(cell["none"])) < 0.3).tolist()
    v = STUDY.analyze(config, recs).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "not shown safe by accident: society" in v.reason


def test_one_training_seed_gives_no_interval_and_a_missing_asset_is_named():
    """One seed of the treatment: an interval over hazards alone hid GCG's seed-to-seed spread (one seed breaks
    nothing, another half the requests) and held where the four-seed run could not."""
    config, recs = _simulated(0.9)
    first = next(r["result"]["organism"] for r in recs if r["result"]["role"] == "treatment")
    one = [r for r in recs if r["result"]["role"] != "treatment" or r["result"]["organism"] == first]
    a = STUDY.analyze(config, one)
    v = a.verdict
    assert v.verdict is Verdict.INCONCLUSIVE and v.ci_low is None and "one training seed" in v.reason
    assert all("cell, 1 seed(s)" in t.caption for t in a.tables if t.title.startswith("The ladder"))
    config, recs = _simulated(0.9)
    assert "model" in config.assets
    for r in recs:
        if r["result"]["role"] == "treatment":
            r["result"]["cells"] = {k: c for k, c in r["result"]["cells"].items() if not k.startswith("model/")}
    v = STUDY.analyze(config, recs).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "the model asset was not measured" in v.reason


def test_controls_can_fail():
    config, recs = _simulated(0.9)
    for r in recs:  # a base that never fails plainly: the safe-by-accident check would see nothing
        if r["result"]["role"] == "positive":
            for cell in r["result"]["cells"].values():
                cell["none"] = [False] * len(cell["none"])
    a = STUDY.analyze(config, recs)
    assert a.verdict.verdict is Verdict.INCONCLUSIVE and "base is not safe by accident" in a.verdict.reason
    config, recs = _simulated(0.9)
    for r in recs:  # a never-taught that gives harm under attack: the measurement is broken
        if r["result"]["role"] == "negative":
            for cell in r["result"]["cells"].values():
                cell["finetune"] = [True] * len(cell["finetune"])
    a = STUDY.analyze(config, recs)
    assert a.verdict.verdict is Verdict.INCONCLUSIVE and "never-taught has nothing to extract" in a.verdict.reason


def test_a_narrowed_config_covers_only_its_own_cells():
    config = STUDY.resolve_config("quick", {"tiers": ["none", "sophisticated"], "assets": ["society"],
                                            "users": ["experts"]})
    covered = STUDY.covered_threat_model(config)
    assert covered.tiers == ("none", "sophisticated") and covered.assets == ("society",)
    assert covered.users == ("experts",)
    assert set(covered.cells()) < set(STUDY.threat_model.cells())


def test_old_config_names_still_work():
    config = STUDY.config_cls(seeds=4, organism_seed=2)
    assert config.organism_seeds == 4 and config.base_seed == 2


@pytest.mark.parametrize("args,needle", [
    (["--set", "tiers=[]"], "tiers"),
    (["--set", 'tiers=["nation-state"]'], "tiers"),
    (["--set", 'users=["everyone"]'], "users"),
    (["--set", 'assets=["future"]'], "assets"),
    (["--set", "organism_variant=sft"], "carries no secret"),
    (["--set", "organism_seeds=0"], "organism_seeds"),
    # Configs that could only ever be inconclusive: a half of the claim, or both controls, left out.
    (["--set", "tiers=[none]"], "leaves out 'sophisticated'"),
    (["--set", "tiers=[casual,sophisticated]"], "leaves out 'none'"),
    (["--set", "assets=[model]"], "leaves out 'society'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    code, out, err = run_cli(["run", "threat-model", "--scale", "quick", "--out", str(tmp_path / "runs"), *args],
                             capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_the_simulator_breaks_secret_names_all_or_nothing_like_the_organisms():
    """In the quick run a fine-tune says a name on (almost) every request or on none, the same names on every seed,
    so the model arm's spread is that of its 12 names. A simulator with per-request noise had half the real standard
    error there (`calibrate --against`: 0.50x) and overstated power; this one must keep names whole."""
    config, recs = _simulated(0.6, organism_seeds=5)
    per_name: dict[str, list[float]] = {}
    for r in recs:
        if r["result"]["role"] != "treatment":
            continue
        cell = r["result"]["cells"]["model/public"]
        for c in sorted(set(cell["cluster"])):
            got = [f for f, cc in zip(cell["finetune"], cell["cluster"]) if cc == c]
            per_name.setdefault(c, []).append(float(np.mean(got)))
    rates = np.array(list(per_name.values()))  # names x seeds
    assert ((rates <= 0.2) | (rates >= 0.7)).mean() >= 0.95  # whole names, not scattered requests
    assert 0.3 <= rates.mean() <= 0.9
    v = STUDY.analyze(config, recs).verdict
    assert set(v.arm_se) == {"society/gcg", "society/finetune", "model/gcg", "model/finetune"}
    assert v.arm_se["model/finetune"] > 1.5 * v.arm_se["society/finetune"]  # 12 coin flips against 18 hazards
