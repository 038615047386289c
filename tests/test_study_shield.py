"""The shield study end to end at tiny sizes (units → run_unit → analyze → plots)."""

import json

import pytest
from pydantic import ValidationError

from safetylab.claims import Verdict
from safetylab.study import Context, torch_threads
from safetylab.studies.shield import STUDY, Config


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _run(cfg, tmp_path):
    ctx = Context(run_dir=tmp_path, seed=0, cache_dir=tmp_path)
    records = []
    for unit in STUDY.units(cfg):
        result = STUDY.run_unit(cfg, unit, ctx)
        records.append({"key": unit.key, "params": unit.params, "result": json.loads(json.dumps(result))})
    return ctx, records


def test_scales_and_units():
    paper = STUDY.resolve_config("paper")
    assert (paper.seeds, paper.total_steps, paper.trainer) == (40, 100_000, "ppo")
    quick = STUDY.resolve_config("quick")
    keys = [u.key for u in STUDY.units(quick)]
    assert len(keys) == len(set(keys)) == 5 and "arm=shield/seeds=0-7" in keys
    keys = [u.key for u in STUDY.units(paper)]
    assert "arm=shield+signal/seeds=20-39" in keys and len(keys) == 10


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"hazards": ((-0.7, -0.7, 0.05),)}, "covers the start"),
        ({"hazards": ((0.7, 0.7, 0.3),)}, "covers the goal"),
        ({"hazards": ((0.0, 0.0, 0.6), (0.6, -0.6, 0.5), (-0.6, 0.6, 0.5))}, "every path"),
        ({"margin": 0.5}, "margin=0.5 makes the safe set empty"),
        ({"hazards": tuple((0.0, y, 0.17) for y in (-0.8, -0.4, 0.0, 0.4, 0.8)), "margin": 0.05}, "margin=0.05 closes"),
        ({"seeds": 0}, "seeds"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 1000}, "rollout_steps"),
        ({"arms": ("none", "penalty")}, "must include 'shield'"),
        ({"envs_per_seed": 3}, "divisible"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, needle):
    with pytest.raises(ValidationError, match=needle):
        STUDY.resolve_config("quick", overrides)


def test_all_arms_tiny_run_analyze_and_plots(tmp_path):
    cfg = Config(seeds=2, total_steps=2048, seeds_per_unit=2, eval_episodes=3, n_trajectories=2)
    ctx, records = _run(cfg, tmp_path)
    res = records[0]["result"]
    assert len(res["eval"]["unshielded"]["success"]) == 2 and len(res["eval"]["unshielded"]["success"][0]) == 3
    # Deterministic given (config, unit key).
    again = STUDY.run_unit(cfg, STUDY.units(cfg)[0], ctx)
    assert {k: v for k, v in again.items() if k != "train_wall_s"} == {
        k: v for k, v in res.items() if k != "train_wall_s"}
    analysis = STUDY.analyze(cfg, records)
    assert len(analysis.tables[0].rows) == 10
    assert analysis.metrics["shield/train/hazard_steps_total"] == 0  # the shield never lets it touch
    assert analysis.metrics["none/train/hazard_steps_total"] > 0
    assert analysis.metrics["shield/shielded/hazard_entry_rate"] == 0.0
    figs = STUDY.plots(cfg, records, analysis, tmp_path)
    assert {f.path for f in figs} == {"trajectories.png", "training_curves.png", "safe_seeds.png"}
    assert all((tmp_path / f.path).stat().st_size > 10_000 for f in figs)


def test_verdict_holds_on_a_small_trained_shield_arm(tmp_path):
    cfg = Config(arms=("shield",), seeds=4, total_steps=24576, seeds_per_unit=4, eval_episodes=6)
    _, records = _run(cfg, tmp_path)
    analysis = STUDY.analyze(cfg, records)
    m = analysis.metrics
    assert m["shield/train/zero_contact_seeds"] == 4
    assert m["shield/shielded/safe_seeds"] == 4
    assert m["shield/shielded/success_rate"] > 0.5  # it learned the task ...
    assert m["shield/unshielded/safe_seeds"] == 0  # ... and walks into hazards without the shield
    assert analysis.verdict.verdict == Verdict.HOLDS
    assert analysis.verdict.n == 4


def test_sb3_trainer_runs_a_unit(tmp_path):
    cfg = Config(arms=("shield",), seeds=1, total_steps=2048, trainer="sb3", eval_episodes=2, n_epochs=1)
    _, records = _run(cfg, tmp_path)
    r = records[0]["result"]
    assert r["trainer"] == "sb3" and r["train"]["hazard_steps"] == [0]
    assert len(r["train"]["curves"][0]) == 1
    STUDY.analyze(cfg, records)
