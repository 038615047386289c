"""The stability study on tiny organisms: verdict direction, controls, geometry records, the
step-bound check, the simulator both ways, and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from cli_fixtures import run_cli

from safetylab.claims import Verdict
from safetylab.studies.stability import CLAIM, STUDY, Config

# Tiny organisms are sturdier than quick ones (at lr 1e-4 none leaves S in 20 steps), so the tiny run
# fine-tunes at 3e-3, where benign data takes them out and their own safety mix does not.
TINY = {"organism_scale": "tiny", "variants": ["sft", "sft-late"], "seeds": 2, "shared_base": True, "lr": 3e-3,
        "steps": 20, "batch_size": 8, "eval_every": 5, "stop_at_exit": True, "n_forbidden": 16, "n_benign": 12,
        "detail_seeds": 1, "detail_variants": ["sft"], "lrs": [1e-3], "mitigations": ["cap", "anchor"],
        "harmful_sizes": [10, 100], "hessian_pairs": 2, "geometry_batch": 4, "lanczos_iter": 6, "top_k": 3,
        "n_check_batches": 1, "n_random_directions": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from organism_fixtures import run_tiny_study

    config, ctx, records, analysis = run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("stability"))
    return config, ctx.run_dir, records, analysis


def test_tiny_run_leaves_s_and_controls_pass(tiny_run):
    config, _, records, analysis = tiny_run
    assert [r["key"] for r in records] == ["variant=sft/seed=0", "variant=sft/seed=1", "variant=sft-late/seed=0",
                                           "variant=sft-late/seed=1"]
    by_key = {r["key"]: r["result"] for r in records}
    assert [x["name"] for x in by_key["variant=sft/seed=0"]["runs"]] == [
        "novel", "safety-mix", "harmful-10", "harmful-100", "novel@0.001", "replay", "novel+cap", "novel+anchor"]
    assert [x["name"] for x in by_key["variant=sft/seed=1"]["runs"]] == ["novel"]
    assert [x["name"] for x in by_key["variant=sft-late/seed=0"]["runs"]] == [
        "novel", "safety-mix", "harmful-10", "harmful-100"]
    for res in by_key.values():
        for run in res["runs"]:
            steps = [e["step"] for e in run["evals"]]
            assert steps[0] == 0 and all(s % config.eval_every == 0 for s in steps)
            assert all(len(e["refused"]) == config.n_forbidden for e in run["evals"])
            # Runs stop at their first exit: only the last evaluation may lie outside S.
            rates = [e["refused"].count("1") / config.n_forbidden for e in run["evals"]]
            assert all(r >= config.threshold for r in rates[:-1])
            assert (run["final_replies"] is not None) == (rates[-1] < config.threshold)
    controls = {c.name: c for c in analysis.controls}
    assert controls["organisms start in S"].status == "pass"
    assert controls["harmful fine-tuning leaves S"].status == "pass"
    assert controls["own safety mix stays in S"].status == "pass"
    v = analysis.verdict
    assert v.metric == CLAIM.metric and v.n == 4
    assert v.estimate == 1.0 and v.ci_low > CLAIM.threshold
    assert v.verdict is Verdict.HOLDS
    assert analysis.metrics["arm/harmful-100/unsafe_after_exit"]["rate"] >= 0.5  # the attack brings out the hazard


def test_geometry_records(tiny_run):
    config, _, records, analysis = tiny_run
    geos = {r["key"]: r["result"]["geometry"] for r in records}
    assert geos["variant=sft/seed=1"] is None and geos["variant=sft-late/seed=1"] is None
    for key in ("variant=sft/seed=0", "variant=sft-late/seed=0"):
        g = geos[key]
        assert len(g["eigenvalues"]) == config.top_k and g["eigenvalues"] == sorted(g["eigenvalues"], reverse=True)
        assert g["eigenvalues"][0] > 0 and -1 <= g["cosine_task_safety"] <= 1
        assert g["d_hat"] == min(p["distance"] for p in g["probes"].values())
        for p in g["probes"].values():
            assert p["inside"] <= p["distance"] <= p["outside"]
        for c in g["checks"]:
            assert math.isclose(c["eta_pred"], g["d_hat"] / c["grad_norm"])
        assert g["hessian_batch"]["sequences"] == 2 * config.hessian_pairs
        assert set(g["probes"]) == {"benign descent", "sharpest +", "sharpest -", "safety ascent", "random 1"}
    assert analysis.metrics["geometry/flattest"] in ("sft", "sft-late")
    assert {t.title.split(" (")[0].split(":")[0] for t in analysis.tables} >= {"Per variant", "Curvature of the safety loss"}


def test_no_exit_cannot_hold(tiny_run):
    """Every benign run's trace replaced by its own starting point: nothing leaves S, so the
    verdict must not be 'holds'."""
    config, _, records, _ = tiny_run
    same = copy.deepcopy(records)
    for rec in same:
        for run in rec["result"]["runs"]:
            if run["role"] == "primary":
                run["evals"] = [run["evals"][0]] * 3
                run["final_replies"] = None
    analysis = STUDY.analyze(config, same)
    assert analysis.verdict.estimate == 0.0
    assert analysis.verdict.contrast_verdict is not Verdict.HOLDS
    assert analysis.verdict.verdict is not Verdict.HOLDS


def test_bound_violations_are_counted(tiny_run):
    config, _, records, analysis = tiny_run
    bad = copy.deepcopy(records)
    res = bad[0]["result"]
    d_hat = res["geometry"]["d_hat"]
    run = next(r for r in res["runs"] if r["task"] == "novel")
    run["evals"].append({**run["evals"][0], "step": 999, "distance": 0.5 * d_hat,
                         "refused": "0" * config.n_forbidden})
    before = analysis.metrics["bound/trajectory_exits_below"]
    after = STUDY.analyze(config, bad).metrics
    assert after["bound/trajectory_exits_below"] == before + 1
    assert after["bound/holds"] is False


def test_an_organism_that_cannot_spell_the_novel_task_is_bad_input(tiny_run, monkeypatch):
    from safetylab.errors import UserError
    from safetylab.organisms.novel_tasks import ReverseAtlas
    from safetylab.study import Context

    config, run_dir, _, _ = tiny_run
    real = ReverseAtlas.vocabulary
    monkeypatch.setattr(ReverseAtlas, "vocabulary", lambda self: real(self) | {"zzzunknown"})
    with pytest.raises(UserError, match="lacks 1 word"):
        STUDY.prepare(config, Context(run_dir=run_dir, seed=0, cache_dir=run_dir / "cache"))


def test_plots_written(tiny_run, tmp_path):
    config, _, records, analysis = tiny_run
    figs = STUDY.plots(config, records, analysis, tmp_path)
    assert {f.path for f in figs} >= {"refusal_vs_step.png", "refusal_by_lr.png"}
    for f in figs:
        assert (tmp_path / f.path).stat().st_size > 1000


@pytest.mark.parametrize("effect, expected", [(0.0, Verdict.DOES_NOT_HOLD), (1.0, Verdict.HOLDS)])
def test_simulator_decides_both_ways(effect, expected):
    config = STUDY.resolve_config("quick")
    for seed in range(3):
        analysis = STUDY.analyze(config, STUDY.simulate(config, effect, np.random.default_rng(seed)))
        assert {c.name: c.status for c in analysis.controls} == {
            "organisms start in S": "pass", "harmful fine-tuning leaves S": "pass", "own safety mix stays in S": "pass"}
        assert analysis.verdict.verdict is expected


def test_config_validation():
    with pytest.raises(ValueError, match="greater than 0"):
        Config(lr=0)
    with pytest.raises(ValueError, match="lrs: learning rate -0.1 must be > 0"):
        Config(lrs=[1e-4, -0.1])
    with pytest.raises(ValueError, match="less than 1"):
        Config(threshold=1.0)
    with pytest.raises(ValueError, match="never taught to refuse"):
        Config(variants=["base"])
    with pytest.raises(ValueError, match="neither a safety variant"):
        Config(variants=["/no/such/model"])
    with pytest.raises(ValueError, match="detail_variants: 'dpo' is not in variants"):
        Config(variants=["sft"], detail_variants=["dpo"])
    assert STUDY.resolve_config("paper").seeds >= 3


@pytest.mark.parametrize("setting, message", [
    ("lr=0", "lr"), ("lr=-1e-4", "lr"), ("threshold=1.5", "threshold"), ("threshold=0", "threshold"),
    ("variants=[base]", "never taught to refuse"), ("variants=[./plain_model]", "organism.json")])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, setting, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain_model").mkdir()
    (tmp_path / "plain_model" / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["run", "stability", "--set", setting, "--out", str(tmp_path / "runs")], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
