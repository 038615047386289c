"""The jailbreak-transfer study on tiny organisms: units, the transfer matrix, verdict direction (both ways),
controls, and bad input through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_fixtures import run_cli

from safetylab.claims import Verdict
from safetylab.study import Context, torch_threads
from safetylab.studies.jailbreak_transfer import CLAIM, STUDY

# Tiny organisms resist GCG as sft (2 layers, width 64: the loss stalls near 0.7), so the tiny run attacks
# from sft-late (only its last layer safety-trained), which a short GCG does jailbreak, and transfers to sft.
TINY = {"organism_scale": "tiny", "source_variant": "sft-late", "source_seeds": 1,
        "targets": ["sft-late", "sft", "never-taught", "depth-robust"], "n_train": [1, 2], "n_eval": 32,
        "n_eval_heldout_hazards": 6, "n_benign": 20, "gcg_steps": 6, "search_width": 48, "topk": 32,
        "suffix_length": 8, "n_random_suffixes": 2, "max_new_tokens": 32}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from organism_fixtures import run_tiny_study

    config, _, records, analysis = run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("jailbreak_transfer"))
    return config, records, analysis


def test_tiny_run_transfer_matrix_and_verdict(tiny_run):
    config, records, analysis = tiny_run
    assert [r["key"] for r in records] == ["targets", "source=sft-late@0"]
    src = records[1]["result"]
    assert set(src["targets"]) == {"sft-late@0", "sft@0", "never-taught@0", "depth-robust@0"}
    assert len(src["targets"]["sft@0"]["transfer"]) == 32
    base = records[0]["result"]["models"]
    assert not any(base["sft@0"]["no_suffix"]["eval"])  # the sft organism refuses the bare requests
    matrix = next(t for t in analysis.tables if t.kind == "matrix")
    assert matrix.columns[1:] == list(src["targets"]) and matrix.rows[-1][0] == "no suffix"
    m = analysis.metrics
    # White-box, the source gives up the procedure for some requests; a random suffix does not.
    assert m["transfer/success/sft-late@0/sft-late@0"]["rate"] > m["baseline/random_suffix/sft-late@0"]["rate"]
    # The tiny sft organism resists the transferred suffix, so the primary contrast (non-source targets: sft)
    # comes out "does not hold" -- the verdict can fail.
    assert analysis.verdict.contrast_verdict == Verdict.DOES_NOT_HOLD
    assert analysis.verdict.ci_high <= CLAIM.threshold
    neg = next(c for c in analysis.controls if c.kind == "negative")
    assert neg.status == "pass" and neg.estimate == pytest.approx(0.0)
    # A reply that carries the procedure does not open with a refusal: bypass is at least success.
    bypass = m["transfer/not_refused/sft-late@0/sft-late@0"]["rate"]
    assert bypass >= m["transfer/success/sft-late@0/sft-late@0"]["rate"]
    assert any(t.title.startswith("Refusal bypassed") for t in analysis.tables)
    defence = next(t for t in analysis.tables if t.title.startswith("Defences"))
    assert {r[0] for r in defence.rows} == {"none", "perplexity filter", "re-templating", "depth-robust organism"}
    fp = m["defence/perplexity_filter/false_positive_rate"]
    assert 0.0 <= fp["rate"] <= 0.5


def test_simulated_records_decide_both_ways():
    config = STUDY.resolve_config("quick", {"n_benign": 20})
    rng = np.random.default_rng(0)
    strong = STUDY.analyze(config, STUDY.simulate(config, 0.6, rng))
    assert strong.verdict.verdict == Verdict.HOLDS
    assert all(c.status == "pass" for c in strong.controls)
    none = STUDY.analyze(config, STUDY.simulate(config, 0.0, rng))
    assert none.verdict.verdict == Verdict.DOES_NOT_HOLD


@pytest.mark.parametrize("args,needle", [
    (["--set", "suffix_length=0"], "suffix_length"),
    (["--set", "gcg_steps=0"], "gcg_steps"),
    (["--set", "targets=[llama]"], "targets"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    code, out, err = run_cli(["run", "jailbreak-transfer", "--scale", "quick", "--out", str(tmp_path / "runs"),
                              *args], capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_real_models_by_folder_are_sources_and_targets(tiny_run, tmp_path):
    """A 'real' model is any chat model folder: here tiny organisms saved without their organism.json, so only
    the keyword judge can grade them (success = not refused, reported beside the verdict)."""
    import shutil

    from organism_fixtures import tiny_organism

    from safetylab.organisms import World

    folders = []
    for variant in ("sft-late", "sft"):
        dst = tmp_path / variant
        shutil.copytree(tiny_organism(variant), dst)
        (dst / "organism.json").unlink()
        folders.append(str(dst))
    world = World.from_organism(tiny_organism("sft"))
    reqs = world.eval_requests("forbidden", split="heldout", n=12, rng_seed=5)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r.text}) + "\n" for r in reqs))
    config, records, _ = tiny_run
    real_cfg = STUDY.resolve_config("quick", {**TINY, "real_models": folders, "prompts": str(tmp_path / "prompts.jsonl"),
                                              "real_target": "first ,", "n_eval": 8})
    unit = next(u for u in STUDY.units(real_cfg) if u.params["kind"] == "real-source")
    with torch_threads(1):
        result = json.loads(json.dumps(STUDY.run_unit(real_cfg, unit, Context(run_dir=tmp_path, seed=0,
                                                                              cache_dir=tmp_path))))
    assert set(result["targets"]) == set(folders) and len(result["targets"][folders[1]]["none"]) == 8
    assert not any(result["targets"][folders[1]]["none"])  # the sft folder refuses every bare request
    analysis = STUDY.analyze(real_cfg, records + [{"key": unit.key, "params": unit.params, "result": result}])
    table = next(t for t in analysis.tables if t.title.startswith("Real models"))
    assert table.columns[1:] == folders and table.rows[-1][0] == "no suffix"
    assert analysis.verdict.estimate == pytest.approx(STUDY.analyze(config, records).verdict.estimate)


def test_real_models_need_prompts(tmp_path, capsys):
    from organism_fixtures import tiny_organism

    code, _, err = run_cli(["run", "jailbreak-transfer", "--scale", "quick", "--out", str(tmp_path / "runs"),
                            "--set", f"real_models=[{tiny_organism('sft')}]"], capsys)
    assert code == 2 and "prompts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
