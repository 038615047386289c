"""Study `similarity-blindness`: constructions, the trigger effect, the verdict and its controls."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydantic import ValidationError

from safetylab.claims import Verdict
from safetylab.studies.similarity_blindness import MARGIN, STUDY, _trigger_detector, trigger_effect
from safetylab.study import Context, torch_threads

TINY = {"seeds": 3, "epochs": 10, "hidden_sizes": (32, 16), "epsilons": (0.01, 10.0)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sb_run")
    config = STUDY.resolve_config("quick", TINY)
    ctx = Context(run_dir=run_dir, seed=0, cache_dir=run_dir)
    with torch_threads(1):
        records = [{"key": u.key, "params": u.params, "result": STUDY.run_unit(config, u, ctx)} for u in STUDY.units(config)]
    return config, records


def _pair(records, name, seed=0):
    return records[seed]["result"]["pairs"][name]


def _trace(records, seed=0):
    return records[seed]["result"]["trace"]


def test_trigger_effect_is_asr_minus_clean_base_rate_on_non_target_inputs():
    labels = np.array([0, 0, 1, 2, 3, 4, 5])  # target 0: five non-target inputs (indices 2..6)
    pred_clean = np.array([0, 0, 1, 0, 3, 4, 5])  # one non-target input already predicted 0
    pred_trigger = np.array([1, 0, 0, 0, 0, 4, 0])  # four non-target inputs sent to 0
    te = trigger_effect(labels, pred_clean, pred_trigger, target_class=0)
    assert (te["n"], te["asr_hits"], te["base_hits"]) == (5, 4, 1)
    assert te["asr"] == pytest.approx(0.8) and te["base_rate"] == pytest.approx(0.2)
    assert te["effect"] == pytest.approx(0.6)  # not raw agreement (3/7) nor raw ASR (0.8)
    with pytest.raises(ValueError, match="equal-length"):
        trigger_effect(labels, pred_clean[:3], pred_trigger, target_class=0)


def test_rotated_copy_is_same_in_geometry_and_function(tiny_run):
    _, records = tiny_run
    p = _pair(records, "rotated_copy")
    assert p["geometry"]["clean"]["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert p["geometry"]["clean"]["procrustes"] == pytest.approx(0.0, abs=1e-6)
    assert p["agree_clean"] == 1.0 and p["agree_trigger"] == 1.0
    assert p["ablation_r"] == pytest.approx(1.0, abs=1e-9)


def test_low_variance_readout_fools_geometry_only_at_small_epsilon(tiny_run):
    _, records = tiny_run
    small, large = _pair(records, "low_variance_readout@0.01"), _pair(records, "low_variance_readout@10")
    assert small["geometry"]["clean"]["linear_cka"] > 0.999 and small["geometry"]["clean"]["cca"] > 0.999
    assert large["geometry"]["clean"]["linear_cka"] < 0.9  # a channel as large as the layer is seen
    tr = _trace(records)["networks"]
    a, b = np.array(tr["reference"]["pred_clean"]), np.array(tr["low_variance_readout@0.01"]["pred_clean"])
    np.testing.assert_array_equal(b, (a + 1) % 10)  # B reads the shifted label from the tiny channel
    assert small["agree_clean"] == 0.0


def test_hidden_trigger_is_identical_on_clean_and_different_on_trigger(tiny_run):
    _, records = tiny_run
    p = _pair(records, "hidden_trigger")
    assert p["geometry"]["clean"]["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert p["agree_clean"] == 1.0
    tr = _trace(records)["networks"]
    assert set(tr["hidden_trigger"]["pred_trigger"]) == {0}  # the trigger forces target_class on every input
    net = records[0]["result"]["networks"]["hidden_trigger"]["trigger"]
    assert net["asr_hits"] == net["n"]


def test_trained_backdoor_takes_and_honest_retrain_has_no_trigger(tiny_run):
    _, records = tiny_run
    for r in records:
        nets = r["result"]["networks"]
        for name, lo, hi in (("backdoor", 0.8, 1.0), ("retrain", -0.1, 0.1), ("reference", -0.1, 0.1)):
            t = nets[name]["trigger"]
            assert lo <= (t["asr_hits"] - t["base_hits"]) / t["n"] <= hi, (name, t)
        assert nets["backdoor"]["accuracy"] > 0.8  # clean accuracy kept


def test_the_sham_is_relabelled_without_a_trigger_and_reported_beside_the_verdict(tiny_run):
    """The relabel-only sham shares the backdoor's init, data order and relabelled examples but never sees the
    patch: no trigger effect. The report separates what the label shift moves from what the trigger adds, and
    the verdict does not read it."""
    config, records = tiny_run
    for r in records:
        t = r["result"]["networks"]["sham"]["trigger"]
        assert abs(t["asr_hits"] - t["base_hits"]) / t["n"] < 0.2, t  # relabelled, yet no backdoor
    out = STUDY.analyze(config, records)
    gap, beyond = out.metrics["sham/cka_gap"], out.metrics["sham/backdoor_minus_sham"]
    sham = [r["result"]["pairs"]["sham"]["geometry"]["clean"]["linear_cka"] for r in records]
    back = [r["result"]["pairs"]["backdoor"]["geometry"]["clean"]["linear_cka"] for r in records]
    assert beyond[0] == pytest.approx(np.mean(np.subtract(back, sham)))
    assert gap[1] <= gap[0] <= gap[2] and any("relabel-only sham" in f for f in out.findings)
    without = STUDY.analyze(config, [{**r, "result": {**r["result"], "pairs": {k: v for k, v in r["result"]["pairs"].items()
                                                                               if k != "sham"}}} for r in records])
    assert "sham/cka_gap" not in without.metrics and without.verdict == out.verdict


def test_analysis_tables_controls_and_plots(tiny_run, tmp_path):
    config, records = tiny_run
    analysis = STUDY.analyze(config, records)
    v = analysis.verdict
    assert v.n == config.seeds and v.threshold == -MARGIN and v.metric == "blindness/cka_gap"
    gaps = [r["result"]["pairs"]["backdoor"]["geometry"]["clean"]["linear_cka"]
            - r["result"]["pairs"]["retrain"]["geometry"]["clean"]["linear_cka"] for r in records]
    assert v.estimate == pytest.approx(np.mean(gaps))
    assert v.ci_low < v.estimate < v.ci_high
    assert v.df == config.seeds - 1 and v.se == pytest.approx(np.std(gaps, ddof=1) / np.sqrt(len(gaps)))
    assert v.verdict != Verdict.INCONCLUSIVE or v.reason  # an inconclusive verdict always says why
    assert {c.name: c.status for c in analysis.controls} == {
        "the backdoor took": "pass", "honest retrains have no trigger": "pass",
        "CKA sees an untrained network": "pass", "a constructed blind pair is blind": "pass"}
    assert v.verdict == v.contrast_verdict  # every control passed: the contrast decides
    titles = [t.title for t in analysis.tables]
    assert any(t.startswith("Audits") for t in titles) and any(t.startswith("Labelled demonstrations") for t in titles)
    audit = analysis.metrics["audit/function/trigger_effect"]
    assert audit["detected"] == audit["n"] == config.seeds  # behaviour on trigger inputs catches every backdoor
    figs = STUDY.plots(config, records, analysis, tmp_path)
    assert len(figs) == 2 and all((tmp_path / f.path).stat().st_size > 10_000 for f in figs)


def test_an_honest_retrain_in_the_backdoors_place_does_not_hold(tiny_run):
    """Swap each seed's backdoored network for another seed's honest retrain: CKA cannot be blind to
    a difference that is not there, so the study must not say 'holds'."""
    config, records = tiny_run
    swapped = copy.deepcopy(records)
    n = len(records)
    for j, r in enumerate(swapped):
        other = records[(j + 1) % n]["result"]
        r["result"]["pairs"]["backdoor"] = copy.deepcopy(other["pairs"]["retrain"])
        r["result"]["networks"]["backdoor"] = copy.deepcopy(other["networks"]["retrain"])
    analysis = STUDY.analyze(config, swapped)
    assert analysis.verdict.verdict != Verdict.HOLDS
    status = {c.name: c.status for c in analysis.controls}
    assert status["the backdoor took"] == "fail"
    assert "the backdoor took" in analysis.verdict.reason


def test_audit_of_the_tiny_run_can_go_both_ways(tiny_run):
    """null: the paired gaps moved so their mean sits on −MARGIN (CKA sees the backdoor by exactly the margin)
    -> the contrast must not hold; extreme: every backdoor at CKA 1 to its reference -> it must hold."""
    from safetylab.audit import audit_records

    config, records = tiny_run
    out = audit_records(STUDY, config, records)
    assert out["ok"], out["stuck"]
    assert out["null"]["estimate"] == pytest.approx(-MARGIN) and out["null"]["contrast_verdict"] != "holds"
    assert out["extreme"]["contrast_verdict"] == "holds" and out["extreme"]["ci_low"] > 0
    real = STUDY.analyze(config, records).verdict
    width = real.ci_high - real.ci_low
    assert out["null"]["ci_high"] - out["null"]["ci_low"] == pytest.approx(width)  # the run's own spread


def test_controls_are_judged_by_name_not_position(tiny_run, monkeypatch):
    """Reversing CLAIM.controls changes nothing about what each control is judged on. With an honest retrain in
    the backdoor's place the first control fails and the last passes, so judging by position would swap them."""
    import safetylab.studies.similarity_blindness as sb

    config, records = tiny_run
    swapped = copy.deepcopy(records)
    for r in swapped:
        r["result"]["networks"]["backdoor"] = copy.deepcopy(r["result"]["networks"]["retrain"])
    before = {c.name: c for c in STUDY.analyze(config, swapped).controls}
    assert before["the backdoor took"].status == "fail" and before["a constructed blind pair is blind"].status == "pass"
    claim = sb.CLAIM
    monkeypatch.setattr(sb, "CLAIM", claim.model_copy(update={"controls": tuple(reversed(claim.controls))}))
    after = {c.name: c for c in STUDY.analyze(config, swapped).controls}
    assert {n: (c.status, c.estimate, c.ci_low, c.ci_high) for n, c in after.items()} == \
        {n: (c.status, c.estimate, c.ci_low, c.ci_high) for n, c in before.items()}


def test_simulated_verdict_can_come_out_every_way():
    config = STUDY.resolve_config("quick")
    rng = np.random.default_rng(0)
    blind = STUDY.analyze(config, STUDY.simulate(config, 0.0, rng))
    assert blind.verdict.verdict == Verdict.HOLDS
    seen = STUDY.analyze(config, STUDY.simulate(config, -0.1, rng))
    assert seen.verdict.verdict == Verdict.DOES_NOT_HOLD
    # the same blind geometry without a working trigger: the positive control fails, no "holds"
    records = STUDY.simulate(config, 0.0, rng)
    for r in records:
        r["result"]["networks"]["backdoor"] = copy.deepcopy(r["result"]["networks"]["retrain"])
    dud = STUDY.analyze(config, records)
    assert dud.verdict.contrast_verdict == Verdict.HOLDS and dud.verdict.verdict == Verdict.INCONCLUSIVE
    assert "the backdoor took" in dud.verdict.reason
    # without the hidden-trigger construction its control is not run
    no_demo = type(config).model_validate({**config.model_dump(), "demonstrations": ("rotated_copy",)})
    res = STUDY.analyze(no_demo, STUDY.simulate(no_demo, 0.0, rng))
    assert res.verdict.verdict == Verdict.INCONCLUSIVE and "not run" in res.verdict.reason


def test_trigger_detector_fires_only_on_the_patch():
    config = STUDY.resolve_config("quick")
    x = np.zeros((3, 64))
    x[1, list(config.trigger_pixels)] = 1.0
    x[2, list(config.trigger_pixels)[:3]] = 1.0  # an incomplete patch
    np.testing.assert_allclose(_trigger_detector(x, config), [0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"seeds": 1}, "seeds=1: the verdict's interval is over seeds and needs at least 2"),
        ({"demonstrations": ("rotated_copy", "mystery")}, "demonstrations: unknown"),
        ({"measures": ("rsa",)}, "must include 'linear_cka'"),
        ({"trigger_pixels": (70,)}, r"trigger_pixels=\(70,\): need indices in 0..63"),
        ({"dataset": "mnist1d"}, "need indices in 0..39"),
        ({"epsilons": (0.0,)}, "epsilons"),
        ({"poison_fraction": 0.0}, "poison_fraction"),
        ({"cka_threshold": 0.9}, "cka_threshold"),  # the old cut-off is gone, not silently ignored
    ],
)
def test_bad_config_is_rejected(override, message):
    with pytest.raises(ValidationError, match=message):
        STUDY.resolve_config("paper", override)


def test_bad_input_at_the_cli_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    import sys

    from safetylab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["safetylab", "run", "similarity-blindness", "--set", "seeds=1"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(err) == 1 and "seeds=1" in err[0] and "at least 2" in err[0]
    assert list(tmp_path.iterdir()) == []
