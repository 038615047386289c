"""The shield study: layouts, a tiny end-to-end run, and its decision rule on simulated records."""

import copy
import json

import numpy as np
import pytest
from pydantic import ValidationError

import safetylab.studies.shield as shield
from safetylab.audit import audit_records
from safetylab.claims import Verdict
from safetylab.rl.nav import layout_problem, random_layout
from safetylab.study import Context, torch_threads
from safetylab.studies.shield import STUDY, Config, nav_config, seed_layout


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


def _by_arm(records):
    return {r["result"]["arm"]: r["result"] for r in records}


def test_scales_and_units():
    paper = STUDY.resolve_config("paper")
    assert (paper.seeds, paper.total_steps, paper.trainer, paper.eval_episodes) == (40, 100_000, "ppo", 20)
    quick = STUDY.resolve_config("quick")
    keys = [u.key for u in STUDY.units(quick)]
    assert len(keys) == len(set(keys)) == 5 and "arm=shield+penalty/seeds=0-15" in keys
    keys = [u.key for u in STUDY.units(paper)]
    assert "arm=shield+signal/seeds=20-39" in keys and len(keys) == 12


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"hazards": ((-0.7, -0.7, 0.05),)}, "covers the start"),
        ({"hazards": ((0.7, 0.7, 0.3),)}, "covers the goal"),
        ({"hazards": ((0.0, 0.0, 0.6), (0.6, -0.6, 0.5), (-0.6, 0.6, 0.5))}, "every path"),
        ({"margin": 0.5}, "margin=0.5 makes the safe set empty"),
        ({"hazards": tuple((0.0, y, 0.17) for y in (-0.8, -0.4, 0.0, 0.4, 0.8)), "margin": 0.05}, "margin=0.05 closes"),
        ({"hazards": ((0.9, -0.9, 0.95),), "layout_spread": 0.0}, "no valid random hazard layout"),
        ({"seeds": 0}, "seeds"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 1000}, "rollout_steps"),
        ({"arms": ()}, "arms is empty"),
        ({"arms": ("penalty", "penalty")}, "repeats an arm"),
        ({"sensitivity_cutoffs": (0.0, 1.0)}, "sensitivity_cutoffs"),
        ({"envs_per_seed": 3}, "divisible"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, needle):
    with pytest.raises(ValidationError, match=needle):
        STUDY.resolve_config("quick", overrides)


def test_random_layouts_are_valid_seeded_and_shared_by_index(tmp_path):
    cfg = Config()
    nav = nav_config(cfg)
    ctx, ctx1 = (Context(run_dir=tmp_path, seed=k, cache_dir=tmp_path) for k in (0, 1))
    layouts = [seed_layout(cfg, ctx, s) for s in range(12)]
    assert len(set(layouts)) == 12  # a family, not one map
    for lay in layouts:
        assert [h[2] for h in lay] == [h[2] for h in cfg.hazards]  # radii kept
        assert layout_problem(nav, np.asarray(lay), cfg.margin) is None  # start, goal and a path stay free
    assert [seed_layout(cfg, ctx, s) for s in range(12)] == layouts  # same seed, same layout
    assert seed_layout(cfg, ctx1, 0) != layouts[0]  # the master seed moves it
    assert random_layout(nav, np.random.default_rng(5), spread=0.3) == random_layout(
        nav, np.random.default_rng(5), spread=0.3)
    assert seed_layout(Config(hazard_layout="on-path"), ctx, 3) == cfg.hazards


def test_all_arms_tiny_run_analyze_and_plots(tmp_path):
    cfg = Config(seeds=2, total_steps=2048, seeds_per_unit=2, eval_episodes=3, n_trajectories=2, n_epochs=2)
    ctx, records = _run(cfg, tmp_path)
    res = _by_arm(records)
    assert set(res) == set(cfg.arms)
    for arm, r in res.items():
        for policy in ("deterministic", "stochastic"):
            for mode in ("shielded", "unshielded"):
                ev = r["eval"][policy][mode]
                assert np.asarray(ev["hazard_steps"]).shape == (2, 3) and np.asarray(ev["success"]).shape == (2, 3)
        assert r["layouts"] == res["none"]["layouts"]  # paired: seed index s has one layout in every arm
        assert all(sum(r["eval"][p]["shielded"]["hazard_steps"][s][e] for p in ("deterministic", "stochastic"))
                   == 0 for s in range(2) for e in range(3))  # the shield keeps every arm out
    assert res["shield+penalty"]["train"]["hazard_steps"] == [0, 0]  # the penalty never fires behind the shield ...
    assert res["penalty"]["train"]["hazard_steps"] != [0, 0]  # ... and does without it
    # ... so shield and shield+penalty train bit-identically.
    assert res["shield"]["eval"] == res["shield+penalty"]["eval"]
    # Deterministic given (config, unit key), sampled evaluation included.
    unit = STUDY.units(cfg)[0]
    again = json.loads(json.dumps(STUDY.run_unit(cfg, unit, ctx)))
    assert again == records[0]["result"]

    analysis = STUDY.analyze(cfg, records)
    assert len(analysis.tables[0].rows) == 12  # arm x mode
    assert [c.status for c in analysis.controls].count("not run") == 0
    assert analysis.verdict.n == 2 and analysis.metrics["shield/identical_to_shield+penalty_seeds"] == 2
    assert analysis.tables[2].title.startswith("Sensitivity")
    assert analysis.verdict.se is not None and analysis.verdict.df == 1.0  # 2 paired seeds: t(1)
    assert analysis.verdict.verdict is not Verdict.INCONCLUSIVE or analysis.verdict.reason  # always says why
    assert audit_records(STUDY, cfg, records)["null"]["contrast_verdict"] != "holds"
    figs = STUDY.plots(cfg, records, analysis, tmp_path)
    assert {f.path for f in figs} == {"trajectories.png", "training_curves.png", "hazard_entry.png"}
    assert all((tmp_path / f.path).stat().st_size > 10_000 for f in figs)


def test_tiny_run_is_audited_on_its_own_records(tmp_path):
    """A real tiny run (untrained agents; the one hazard sits near the goal, out of their reach, so the penalty arm
    is safe and the design has room): with the treatment's unshielded episodes replaced by the penalty seeds' it
    cannot hold, and with every one of them entering a hazard it does."""
    cfg = Config(arms=("penalty", "shield+penalty"), seeds=4, seeds_per_unit=4, total_steps=2048, eval_episodes=8,
                 n_epochs=1, n_trajectories=0, hazard_layout="on-path", hazards=((0.35, 0.35, 0.15),))
    _, records = _run(cfg, tmp_path)
    before = copy.deepcopy(records)
    audit = audit_records(STUDY, cfg, records)
    assert records == before  # the audit works on copies
    assert audit["ok"], audit["stuck"]
    assert audit["null"]["estimate"] == 0.0 and audit["null"]["contrast_verdict"] == "does not hold"
    assert audit["extreme"]["contrast_verdict"] == "holds"
    # The null is paired by seed: the treatment's unshielded episodes are now exactly the penalty seeds'.
    nulled = _by_arm(STUDY.null(cfg, copy.deepcopy(records)))
    for policy in ("deterministic", "stochastic"):
        assert nulled["shield+penalty"]["eval"][policy]["unshielded"] == nulled["penalty"]["eval"][policy]["unshielded"]
        assert nulled["shield+penalty"]["eval"][policy]["shielded"] == _by_arm(records)["shield+penalty"]["eval"][policy]["shielded"]


def test_each_control_is_judged_on_its_own_measure_whatever_the_order(monkeypatch):
    cfg, records = _sim(0.6, arms=("none", "penalty", "shield+penalty"))
    res = _by_arm(records)
    res["none"]["eval"] = copy.deepcopy(res["penalty"]["eval"])  # fails 'no hazard signal is unsafe' only
    before = {c.name: (c.status, c.estimate) for c in STUDY.analyze(cfg, records).controls}
    assert before["no hazard signal is unsafe"][0] == "fail" and before["the penalty teaches avoidance"][0] == "pass"
    reversed_claim = shield.CLAIM.model_copy(update={"controls": tuple(reversed(shield.CLAIM.controls))})
    monkeypatch.setattr(shield, "CLAIM", reversed_claim)
    after = STUDY.analyze(cfg, records).controls
    assert [c.name for c in after] == [c.name for c in reversed_claim.controls]
    assert {c.name: (c.status, c.estimate) for c in after} == before


def test_stochastic_evaluation_samples_the_policy_reproducibly(tmp_path):
    cfg = Config(arms=("penalty",), seeds=2, total_steps=2048, seeds_per_unit=2, eval_episodes=6, n_epochs=1)
    _, records = _run(cfg, tmp_path)
    ev = records[0]["result"]["eval"]
    det, sto = ev["deterministic"]["unshielded"], ev["stochastic"]["unshielded"]
    assert det["length"] != sto["length"] or det["hazard_steps"] != sto["hazard_steps"]

    from safetylab.rl.ppo import SeedBatchedActorCritic

    model = SeedBatchedActorCritic([0, 1], obs_dim=4, act_dim=2)
    obs = np.random.default_rng(0).normal(size=(2, 5000, 4)).astype(np.float32)
    a1 = model.act_stochastic(obs, np.random.default_rng(3))
    assert np.array_equal(a1, model.act_stochastic(obs, np.random.default_rng(3)))
    noise = a1 - model.act_deterministic(obs)
    assert abs(float(noise.std()) - 1.0) < 0.05  # log_std starts at 0: unit noise around the mean


def _sim(effect, seed=0, **overrides):
    cfg = STUDY.resolve_config("quick", overrides)
    return cfg, STUDY.simulate(cfg, effect, np.random.default_rng(seed))


def test_treatment_equal_to_control_never_holds():
    for seed in range(5):
        cfg, records = _sim(0.7, seed)
        res = _by_arm(records)
        res["shield+penalty"]["eval"] = copy.deepcopy(res["penalty"]["eval"])
        v = STUDY.analyze(cfg, records).verdict
        assert v.verdict is not Verdict.HOLDS and v.estimate == 0.0
        assert v.contrast_verdict is Verdict.DOES_NOT_HOLD
    # The same records with the effect left in do hold: the rule can come out either way.
    cfg, records = _sim(0.7, 0)
    assert STUDY.analyze(cfg, records).verdict.verdict is Verdict.HOLDS
    audit = audit_records(STUDY, cfg, records)
    assert audit["ok"] and audit["null"]["estimate"] == 0.0 and audit["extreme"]["verdict"] == "holds"


def test_missing_positive_control_arm_is_inconclusive_and_says_not_run():
    cfg, records = _sim(0.7, arms=("penalty", "shield+penalty"))
    analysis = STUDY.analyze(cfg, records)
    v = analysis.verdict
    assert v.verdict is Verdict.INCONCLUSIVE and v.contrast_verdict is Verdict.HOLDS
    assert "not run" in v.reason and "no hazard signal is unsafe" in v.reason
    status = {c.name: c.status for c in analysis.controls}
    assert status["no hazard signal is unsafe"] == "not run" and status["the penalty teaches avoidance"] == "pass"


def test_failed_control_makes_it_inconclusive():
    cfg, records = _sim(0.7)
    res = _by_arm(records)
    res["none"]["eval"] = copy.deepcopy(res["penalty"]["eval"])  # told nothing, yet safe: layouts miss the path
    v = STUDY.analyze(cfg, records).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "control failed: no hazard signal is unsafe" in v.reason


def test_one_shielded_entry_on_one_seed_fails_the_shield_control():
    """The shield is deterministic: a single episode that enters a hazard with it on shows it failed, however
    many seeds stayed out (an interval over seeds would call 1 of 20 episodes on 1 of 16 seeds 'not demonstrable')."""
    cfg, records = _sim(0.7)
    assert STUDY.analyze(cfg, records).verdict.verdict is Verdict.HOLDS
    shielded = _by_arm(records)["shield+penalty"]["eval"]["deterministic"]["shielded"]
    shielded["hazard_steps"][3][0] = 2
    v = STUDY.analyze(cfg, records).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "control failed: the shield works" in v.reason


def test_without_the_primary_arms_the_verdict_is_inconclusive():
    cfg, records = _sim(0.7, arms=("none",))
    analysis = STUDY.analyze(cfg, records)
    assert analysis.verdict.verdict is Verdict.INCONCLUSIVE
    assert "primary contrast was not run" in analysis.verdict.reason and "shield+penalty" in analysis.verdict.reason
    assert analysis.verdict.estimate is None


def test_simulator_hits_the_effect_and_rejects_what_it_cannot_make():
    cfg = STUDY.resolve_config("quick", {"seeds": 400, "seeds_per_unit": 400})
    analysis = STUDY.analyze(cfg, STUDY.simulate(cfg, 0.5, np.random.default_rng(0)))
    assert abs(analysis.verdict.estimate - 0.5) < 0.06
    with pytest.raises(ValueError, match="effect"):
        STUDY.simulate(cfg, 0.95, np.random.default_rng(0))


def test_sb3_trainer_runs_a_unit(tmp_path):
    cfg = Config(arms=("shield",), seeds=1, total_steps=2048, trainer="sb3", eval_episodes=2, n_epochs=1)
    _, records = _run(cfg, tmp_path)
    r = records[0]["result"]
    assert r["trainer"] == "sb3" and r["train"]["hazard_steps"] == [0]
    assert len(r["train"]["curves"][0]) == 1
    assert STUDY.analyze(cfg, records).verdict.verdict is Verdict.INCONCLUSIVE
