"""The rare-failure study: exact per-request failure probabilities, the tiny end-to-end run, the
decision rule both ways on simulated records, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cli_fixtures import run_cli
from safetylab.claims import Verdict
from safetylab.study import torch_threads
from safetylab.studies.rare_failure import CLAIM, STUDY, Config, refusal_probabilities

TINY = {"organism_scale": "tiny", "organism_seeds": 2, "n_population": 200, "mc_draws": 500, "is_draws": 200,
        "splitting_particles": 20, "splitting_moves": 3, "retry_users": 500, "n_attack": 2, "attack_budget": 16,
        "gcg_steps": 2, "gcg_width": 8, "accident_budget": 1000, "toy_attacks": 4, "toy_attack_budget": 100,
        "retries": [1, 10], "max_new_tokens": 24, "suffix_length": 4}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every unit of a tiny run; organisms from the test session's shared tiny cache."""
    from organism_fixtures import run_tiny_study

    return run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("rare_failure"))


def test_units_and_exact_probabilities(tiny_run):
    config, ctx, records, analysis = tiny_run
    assert [r["key"] for r in records] == [
        "system=toy", "system=classifier", "system=organism/variant=sft/seed=0", "system=organism/variant=sft/seed=1",
        "system=organism/variant=never-taught/seed=0"]
    org = records[2]["result"]
    pop = org["population"]
    q = np.array(pop["q_sampled"])
    assert pop["n"] == 200 and ((0 <= q) & (q <= 1)).all()
    assert pop["exact_p_sampled"] == pytest.approx(q.mean())
    assert set(pop["greedy_fail"]) <= {0, 1}
    assert [g["index"] for g in pop["greedy_failures"]] == [i for i, f in enumerate(pop["greedy_fail"]) if f]
    # Every estimator reports its cost; MC's cost is its draws.
    assert org["sampled"]["monte-carlo"]["n_evaluations"] == config.mc_draws
    assert org["sampled"]["importance-sampling"]["n_evaluations"] == config.is_draws + config.n_population
    # The retry table's exact column is E[1 - (1 - q)^n]; n = 1 is p itself.
    assert org["retries"][0]["exact"] == pytest.approx(pop["exact_p_sampled"])
    # Attacks ran on the attacked requests with the configured budget.
    reqs = org["attacks"]["requests"]
    assert len(reqs) == config.n_attack
    assert all(r["random-search"]["n_queries"] <= config.attack_budget for r in reqs)


def test_refusal_probability_matches_sampling(tiny_run):
    """The exact probability of no refusal equals the frequency of sampled replies that do not
    open with a refusal (the grader's rule), within sampling error."""
    from safetylab.lm import encode_prompts, load_causal_lm
    from safetylab.organisms.world import World

    config, ctx, records, _ = tiny_run
    path = records[2]["result"]["source"]
    lm = load_causal_lm(path)
    world = World.from_organism(path)
    req = world.eval_requests("forbidden", split="heldout", n=3, rng_seed=5)
    ids = encode_prompts(lm.tokenizer, [r.text for r in req])
    with torch_threads(1):
        exact = refusal_probabilities(lm.model, lm.tokenizer, ids, [2.0])["T=2"]
        torch.manual_seed(0)
        n = 400
        x = torch.tensor([ids[0]] * n)
        with torch.no_grad():
            out = lm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=2.0, top_k=0,
                                    top_p=1.0, max_new_tokens=4, pad_token_id=lm.tokenizer.pad_token_id)
    texts = lm.tokenizer.batch_decode(out[:, x.shape[1]:], skip_special_tokens=True)
    failed = np.mean([not world.grade(req[0], t).refused for t in texts])
    se = math.sqrt(max(exact[0] * (1 - exact[0]), 1e-4) / n)
    assert abs(failed - exact[0]) < 4 * se + 0.01


def test_verdict_direction_on_tiny_run(tiny_run):
    config, ctx, records, analysis = tiny_run
    # Tiny organisms are weak (failures are common) and the tiny attack budget rarely wins: no gap.
    v = analysis.verdict
    assert v.metric == CLAIM.metric and v.n == 2
    assert v.verdict != Verdict.HOLDS
    per_seed = analysis.metrics["contrast/log10_attack_over_accident"]["per_seed"]
    assert all(s["log_ratio"] < CLAIM.threshold for s in per_seed)
    status = {c.name: c.status for c in analysis.controls}
    assert status == {"toy shows the gap": "pass", "never-taught cannot be attacked": "pass"}
    assert any(t.title.startswith("Accident side") for t in analysis.tables)


@pytest.mark.parametrize("effect, expected", [(3.0, Verdict.HOLDS), (-1.0, Verdict.DOES_NOT_HOLD)])
def test_decision_both_ways_on_simulated_records(effect, expected):
    config = STUDY.resolve_config("quick", {"organism_seeds": 5, "n_attack": 20})
    records = STUDY.simulate(config, effect, np.random.default_rng(0))
    assert STUDY.analyze(config, records).verdict.verdict == expected


def test_a_failed_negative_control_makes_it_inconclusive():
    config = STUDY.resolve_config("quick", {"organism_seeds": 5, "n_attack": 20})
    records = STUDY.simulate(config, 3.0, np.random.default_rng(0))
    for r in records:
        if r["params"].get("variant") == "never-taught":
            for req in r["result"]["attacks"]["requests"]:
                req["gcg"]["success"] = True
    a = STUDY.analyze(config, records)
    assert a.verdict.verdict == Verdict.INCONCLUSIVE and "never-taught cannot be attacked" in a.verdict.reason


def test_bad_config():
    with pytest.raises(ValidationError, match="retries"):
        Config(retries=[0, 3])
    with pytest.raises(ValidationError, match="one perturbation per request"):
        Config(p_drop_word=0.6, p_typo=0.6)
    with pytest.raises(ValidationError):
        Config(mc_draws=0)


@pytest.mark.parametrize("key, value", [("mc_draws", "0"), ("attack_budget", "0"), ("n_population", "0")])
def test_bad_input_on_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys, key, value):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "rare-failure", "--set", f"{key}={value}"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and key in lines[0]
    assert not any(tmp_path.iterdir())
