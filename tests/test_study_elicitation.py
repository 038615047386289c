"""The elicitation study on tiny organisms: probes, refusal removal, unlearning, the verdict's
direction both ways, layer selection on a separate split, bad input; and its two helpers
(Fisher ratio, unlearning)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from safetylab.claims import Verdict
from safetylab.study import torch_threads
from safetylab.studies.elicitation import CLAIM, STUDY, probe_set, unit_summary

TINY = {"organism_scale": "tiny", "treatments": ["sft"], "organism_seeds": 2, "shared_base": True,
        "unlearning": ["rmu"], "unlearn_seeds": 1, "unlearn_steps": 5, "n_probe": 240, "probe_folds": 3,
        "control_draws": 2, "n_eval": 24, "n_benign_eval": 8, "cka_prompts": 20, "n_direction_val": 8,
        "attack_steps": 5}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every unit of a tiny run, on the test session's shared tiny organisms."""
    from organism_fixtures import run_tiny_study

    config, _, records, analysis = run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("elicitation"))
    return config, records, analysis


def test_units_probes_and_controls_on_tiny_organisms(tiny_run, tmp_path) -> None:
    config, records, analysis = tiny_run
    assert [r["key"] for r in records] == ["arm=base/seed=0", "arm=sft/seed=0", "arm=sft/seed=1",
                                           "arm=never-taught/seed=0", "arm=unlearn-rmu/seed=0"]
    from safetylab.organisms.world import World

    base = records[0]["result"]
    n_rows = len(probe_set(World.from_organism(base["source"]), config)["text"])
    assert base["n_probe_rows"] == n_rows == 3 * (config.n_probe // 2)
    for r in records:
        pr = r["result"]["probes"]
        for target, splits in (("forbidden_vs_lookalike", ("template", "hazard")), ("hazard_identity", ("template",)),
                               ("next_step", ("template", "hazard"))):
            for split in splits:
                curve = pr[target][split]
                assert len(curve["accuracy"]) == len(curve["selectivity"]) == r["result"]["n_layers"] == 2
                assert all(0 <= a <= 1 for a in curve["accuracy"])
        assert pr["forbidden_vs_lookalike"]["hazard"]["control_draws"] == 2
        assert all(f >= 0 for f in pr["fisher"])
    # Only treatments are compared with the base (CKA), ablated; the base is never attacked.
    roles = {r["result"]["arm"]: r["result"] for r in records}
    assert roles["sft"]["cka"] is not None and set(roles["sft"]["behaviour"]) == {"plain", "ablated", "attacked"}
    assert set(roles["base"]["behaviour"]) == {"plain"} and roles["base"]["cka"] is None
    assert roles["unlearn-rmu"]["unlearning"]["method"] == "rmu"
    controls = {c.name: c for c in analysis.controls}
    # The base reads which hazard is asked; never-taught cannot read the next step of a procedure it never saw.
    assert controls["base reads hazard identity"].status == "pass"
    assert controls["never-taught has no next step"].status == "pass"
    assert analysis.verdict.metric == CLAIM.metric and analysis.verdict.n == 2
    assert {t.title for t in analysis.tables} >= {"Probes at the best layer (held-out hazards)", "Unlearning contrast"}
    figures = STUDY.plots(config, records, analysis, tmp_path)
    assert [f.path for f in figures] == ["probe_curves.png", "capability.png"]
    assert all((tmp_path / f.path).stat().st_size > 1000 for f in figures)


def test_best_layer_is_chosen_on_covered_hazards_only(tiny_run) -> None:
    """Raising the held-out-hazard score at a layer the covered-hazard split did not choose
    leaves the verdict's estimate unchanged: the measuring prompts never pick the layer."""
    config, records, analysis = tiny_run
    edited = copy.deepcopy(records)
    for r in edited:
        if r["result"]["arm"] == "sft":
            best = unit_summary(r["result"])["best_layer"]
            other = 1 - r["result"]["layers"].index(best)
            r["result"]["probes"]["forbidden_vs_lookalike"]["hazard"]["selectivity"][other] = 0.99
    again = STUDY.analyze(config, edited)
    assert again.verdict.estimate == pytest.approx(analysis.verdict.estimate)


@pytest.mark.parametrize("effect,expected", [(-0.1, Verdict.DOES_NOT_HOLD), (0.3, Verdict.HOLDS)])
def test_verdict_direction_both_ways(effect, expected) -> None:
    config = STUDY.resolve_config("quick")
    records = STUDY.simulate(config, effect, np.random.default_rng(3))
    analysis = STUDY.analyze(config, records)
    assert analysis.verdict.verdict == expected
    assert all(c.status == "pass" for c in analysis.controls)


def test_missing_negative_control_makes_it_inconclusive() -> None:
    config = STUDY.resolve_config("quick")
    records = [r for r in STUDY.simulate(config, 0.3, np.random.default_rng(0)) if r["result"]["arm"] != "never-taught"]
    verdict = STUDY.analyze(config, records).verdict
    assert verdict.verdict == Verdict.INCONCLUSIVE and "never-taught has no next step" in verdict.reason


@pytest.mark.parametrize("args,needle", [
    (["--set", "probe_layers=[9]"], "layer=9 but quick organisms have 8 decoder layers; use 0..7"),
    (["--set", "organism_scale=tiny", "--set", "n_probe=4"], "has one class"),
    (["--set", "rmu_layer=8"], "rmu_layer=8"),
])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(args, needle, tmp_path, capsys) -> None:
    from cli_fixtures import run_cli

    code, _, err = run_cli(["run", "elicitation", "--scale", "quick", "--out", str(tmp_path / "runs"), "--quiet",
                            *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_organism_without_hazard_metadata_is_one_line_exit_2(tmp_path, capsys) -> None:
    from cli_fixtures import run_cli

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, _, err = run_cli(["run", "elicitation", "--out", str(tmp_path / "runs"), "--quiet", "--set", f"base={folder}",
                            "--set", f'treatments=["{folder}"]', "--set", "negative_control=false",
                            "--set", "unlearning=[]"], capsys)
    assert code == 2 and "has no hazard metadata" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_fisher_ratio_is_invariant_and_grows_with_separation() -> None:
    from safetylab.metrics.separability import fisher_ratio

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    x = rng.normal(size=(400, 5))
    x[y == 1, 0] += 2.0
    r = fisher_ratio(x, y)
    assert 3.0 < r < 5.5  # d' = 2, so d'^2 = 4 up to sampling and shrinkage
    a = rng.normal(size=(5, 5)) + 3 * np.eye(5)
    assert fisher_ratio(x @ a + 7.0, y) == pytest.approx(r, rel=0.05)
    x[y == 1, 0] += 2.0
    assert fisher_ratio(x, y) > 3 * r
    with pytest.raises(ValueError, match="two classes"):
        fisher_ratio(x, np.zeros(400))


def test_unlearning_methods_change_the_model_and_check_layers() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from organism_fixtures import tiny_organism
    from safetylab.organisms.unlearning import gradient_ascent, rmu
    from safetylab.organisms.world import World

    path = tiny_organism("base")
    tok, world = AutoTokenizer.from_pretrained(path), World.from_organism(path)
    with torch_threads(1):
        for fn, kw in ((gradient_ascent, {"lr": 1e-3}), (rmu, {"lr": 5e-3, "layer": 0})):
            model = AutoModelForCausalLM.from_pretrained(path)
            before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            out = fn(model, tok, world, steps=3, batch_size=4, rng=np.random.default_rng(0), **kw)
            after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            assert len(out["forget_loss"]) == 3 and not torch.equal(before, after)
            if fn is rmu:  # only the MLPs up to the steered layer move
                moved = [n for n, p in model.named_parameters() if not torch.equal(
                    p.detach(), dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())[n].detach())]
                assert moved and all(n.startswith("model.layers.0.mlp") for n in moved)
        with pytest.raises(ValueError, match="rmu layer=5"):
            rmu(AutoModelForCausalLM.from_pretrained(path), tok, world, layer=5, steps=1, lr=1e-3, batch_size=2,
                rng=np.random.default_rng(0))
