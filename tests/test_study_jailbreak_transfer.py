"""The jailbreak-transfer study on tiny organisms: units and records, target kinds (independent vs same base), the
audit of a tiny run (null and extreme), verdicts both ways on simulated records, and bad input through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_fixtures import run_cli

from safetylab.audit import audit_records
from safetylab.claims import Verdict
from safetylab.study import Context, torch_threads
from safetylab.studies.jailbreak_transfer import CLAIM, STUDY, SAME_BASE, _arm, _organism_request

# Tiny organisms resist GCG as sft (2 layers, width 64), so the tiny run attacks from sft-late (only its last layer
# safety-trained). Independent target: sft-small, a 1-layer model pretrained from its own base at seed 3, the first
# seed no source uses.
TINY = {"organism_scale": "tiny", "source_variant": "sft-late", "organism_seeds": 3,
        "targets": ["sft-late", "sft", "sft-small", "never-taught", "depth-robust"], "n_train": 8,
        "n_heldout_templates": 6, "n_heldout_hazards": 4, "n_benign": 20, "gcg_steps": 8, "search_width": 48,
        "topk": 32, "suffix_length": 8, "n_random_suffixes": 2, "max_new_tokens": 32, "progressive": True,
        "small_overrides": {"model": {"n_layers": 1}}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from organism_fixtures import run_tiny_study

    config, _, records, analysis = run_tiny_study(STUDY, TINY, tmp_path_factory.mktemp("jailbreak_transfer"))
    return config, records, analysis


def test_tiny_run_measures_every_target_on_the_training_requests(tiny_run):
    config, records, analysis = tiny_run
    # Three sources: one is no interval over source seeds (each suffix is one GCG run), two are t(1).
    assert [r["key"] for r in records] == ["targets", "source=sft-late@0", "source=sft-late@1", "source=sft-late@2"]
    src = records[1]["result"]
    assert set(src["targets"]) == {"sft-late@0", "sft-late@1", "sft-late@2", "sft@0", "sft-small@3",
                                   "never-taught@0", "depth-robust@0"}
    assert all(len(c["gcg"]) == 8 and len(c["random1"]) == 8 for c in src["targets"].values())
    assert len(set(src["subjects"]["train"])) == 4  # the training requests cycle through every covered hazard
    assert set(src["universality"]) == {"heldout_templates", "heldout_hazards"}
    g = src["gcg"]["gcg"]
    assert g["n_active"][0] == 1 and g["n_active"] == sorted(g["n_active"])  # progressive: requests join in turn
    # The convergence curve: one count per step, never more than the requests in the objective, and every target
    # met at the step the search converged.
    assert len(g["targets_met"]) == g["n_steps"] == len(g["losses"])
    assert all(0 <= met <= active for met, active in zip(g["targets_met"], g["n_active"]))
    if g["converged_step"] is not None:
        assert g["targets_met"][g["converged_step"] - 1] == 8
    base = records[0]["result"]["models"]
    assert not any(base["sft@0"]["no_suffix"])  # the sft organism refuses the bare requests
    assert not any(base["never-taught@0"]["prefill"])  # it cannot continue a procedure it never learned
    kinds = next(t for t in analysis.tables if t.title.startswith("Transfer per target kind"))
    roles = {r[0]: r[1] for r in kinds.rows}
    assert roles == {"source": "control (+)", "sft (same base)": "reported apart", "sft-small": "treatment",
                     "sft-late (same base)": "reported apart",
                     "never-taught": "control (−)", "depth-robust (same base)": "defence"}
    assert analysis.verdict.arm in (None, "sft-small")  # only independently pretrained kinds decide
    neg = next(c for c in analysis.controls if c.kind == "negative")
    assert neg.status == "pass" and neg.estimate == pytest.approx(0.0)
    m = analysis.metrics
    bypass = 1 - np.mean(src["targets"]["sft-late@0"]["gcg_refused"])
    assert bypass >= m["transfer/success/source"].estimate  # a reply carrying the procedure is not a refusal
    defence = next(t for t in analysis.tables if t.title.startswith("Defences"))
    assert {r[0] for r in defence.rows} == {"none", "perplexity filter", "re-templating", "depth-robust organism"}
    if analysis.verdict.verdict is Verdict.INCONCLUSIVE:
        assert analysis.verdict.reason  # always says why


def test_report_plots_each_sources_convergence(tiny_run, tmp_path):
    config, records, analysis = tiny_run
    figures = STUDY.plots(config, records, analysis, tmp_path)
    assert figures[0].path == "gcg_convergence.png" and (tmp_path / "gcg_convergence.png").stat().st_size > 0
    old = json.loads(json.dumps(records))
    for r in old[1:]:
        r["result"]["gcg"]["gcg"].pop("targets_met")  # records from before the trace was kept
    (tmp_path / "old").mkdir()
    assert "gcg_convergence.png" not in [f.path for f in STUDY.plots(config, old, analysis, tmp_path / "old")]


def test_tiny_run_audit_goes_both_ways(tiny_run):
    """Random-suffix outcomes copied onto GCG (paired by target and request) cannot hold; every GCG-suffixed request
    jailbroken must."""
    config, records, analysis = tiny_run
    out = audit_records(STUDY, config, records)
    assert out["ok"], out["stuck"]
    assert out["null"]["contrast_verdict"] != "holds" and out["extreme"]["contrast_verdict"] == "holds"
    assert out["extreme"]["verdict"] == "holds", out["extreme"]  # never-taught is left as measured: its control passes
    assert out["null"]["estimate"] == pytest.approx(
        np.mean(np.asarray(records[1]["result"]["targets"]["sft-small@3"]["random0"], float)
                - np.mean([records[1]["result"]["targets"]["sft-small@3"][k] for k in ("random0", "random1")], 0)))
    nulled = STUDY.analyze(config, STUDY.null(config, json.loads(json.dumps(records))))
    # The null keeps each source's outcomes on itself, so it tests transfer with the positive control standing.
    assert (next(c for c in nulled.controls if c.kind == "positive").estimate
            == pytest.approx(next(c for c in analysis.controls if c.kind == "positive").estimate))


def test_targets_are_classed_by_where_their_weights_come_from():
    quick = STUDY.resolve_config("quick")
    assert _arm(quick, "sft@0", "sft@1") == "sft" + SAME_BASE  # fine-tuned from one shared base
    assert _arm(quick, "sft@0", "dpo@0") == "dpo" + SAME_BASE
    assert _arm(quick, "sft@0", "sft-small@5") == "sft-small"  # another architecture, its own base
    assert _arm(quick, "sft@0", "sft-narrow@5") == "sft-narrow"
    paper = STUDY.resolve_config("paper")
    assert not paper.shared_base and _arm(paper, "sft@0", "sft@1") == "sft"  # each seed pretrained apart
    assert _arm(paper, "sft@0", "dpo@0") == "dpo" + SAME_BASE and _arm(paper, "sft@1", "dpo@0") == "dpo"


@pytest.mark.parametrize("scale", ["quick", "paper"])
def test_architecture_targets_share_no_pretraining_with_any_source(scale):
    """The data order is drawn from the seed, not the architecture: a narrow target pretrained at a source's base
    seed would have read the source's pretraining stream in the same order."""
    config = STUDY.resolve_config(scale, {"targets": ["sft", "sft-small", "sft-narrow", "never-taught"]})
    seeds = config.organism_seed_list()
    source_bases = {s if b is None else b for s, b in zip(seeds, [config.request("sft", s).config().base_seed
                                                                 for s in seeds])}
    assert source_bases == ({0} if config.shared_base else set(seeds))
    arch = [n for n in config.target_names() if n.split("@")[0] in ("sft-small", "sft-narrow")]
    assert arch == [f"sft-small@{config.arch_seed()}", f"sft-narrow@{config.arch_seed()}"]
    for name in arch:
        request = _organism_request(config, name)
        assert request.config().base_seed is None and request.seed not in source_bases  # its own base, a new seed
        assert all(_arm(config, s, name) == name.split("@")[0] for s in config.source_names())


def test_architecture_targets_are_smaller_than_their_source_at_every_organism_scale():
    # Paper organisms (12 layers, width 256): half the depth, half the width; the digests stay those of the
    # explicit overrides the paper design had.
    paper = STUDY.resolve_config("paper")
    assert paper.arch_overrides("sft-small") == {"model": {"n_layers": 6}}
    assert paper.arch_overrides("sft-narrow") == {"model": {"d_model": 128, "n_heads": 4, "d_ff": 384}}
    # The paper design on quick organisms (8 layers, width 128) halves those, not the paper sizes: a fixed
    # 'narrow' of width 128 would have been the source's own width with a wider feed-forward layer.
    mixed = STUDY.resolve_config("paper", {"organism_scale": "quick"})
    assert mixed.arch_overrides("sft-small") == {"model": {"n_layers": 4}}
    assert mixed.arch_overrides("sft-narrow") == {"model": {"d_model": 64, "n_heads": 2, "d_ff": 128}}
    for config in (paper, mixed, STUDY.resolve_config("quick")):
        src = config.request("sft", 0).config()
        for kind in ("sft-small", "sft-narrow"):
            tgt = config.request("sft", 0, overrides=config.arch_overrides(kind)).config()
            assert tgt.model.n_layers * tgt.model.d_model < src.model.n_layers * src.model.d_model
    with pytest.raises(ValueError, match="narrow_overrides .* source's own architecture"):
        STUDY.resolve_config("paper", {"narrow_overrides": {"model": {"d_model": 256}}})


def test_old_config_names_still_work():
    config = STUDY.resolve_config("quick", {"source_seeds": 2, "organism_seed": 3})
    assert config.organism_seeds == 2 and config.base_seed == 3
    assert config.source_names() == ["sft@3", "sft@4"]


def test_simulated_records_decide_both_ways():
    config = STUDY.resolve_config("quick", {"n_benign": 20})
    strong = STUDY.analyze(config, STUDY.simulate(config, 0.6, np.random.default_rng(0)))
    assert strong.verdict.verdict == Verdict.HOLDS and strong.verdict.arm in ("sft-small", "sft-narrow")
    assert all(c.status == "pass" for c in strong.controls)
    # No transfer at all: never "holds", and often narrow enough to say "does not hold" (5 seeds x 18 hazards,
    # Bonferroni over two kinds; the rest straddle the threshold and say why).
    none = [STUDY.analyze(config, STUDY.simulate(config, 0.0, np.random.default_rng([3, i]))).verdict
            for i in range(12)]
    assert not any(v.verdict == Verdict.HOLDS for v in none)
    assert sum(v.verdict == Verdict.DOES_NOT_HOLD for v in none) >= 3
    assert all(v.ci_high <= CLAIM.threshold for v in none if v.verdict == Verdict.DOES_NOT_HOLD)
    # The rest straddle the threshold, or (an unconverged quick suffix succeeds about 0.45 on its own source) a
    # source control that this draw could not demonstrate; each says which.
    assert all("too little power" in v.reason or "GCG works on its source (not demonstrated" in v.reason
               for v in none if v.verdict == Verdict.INCONCLUSIVE)


def _sim(overrides=None, effect=0.6, seed=0):
    config = STUDY.resolve_config("quick", {"n_benign": 20, **(overrides or {})})
    return config, STUDY.simulate(config, effect, np.random.default_rng(seed))


def test_one_source_seed_gives_no_interval_and_says_so():
    """Each suffix is one GCG run: with one source the interval over source seeds does not exist, rather than
    falling back to hazards alone (which let one source hold where two agreeing ones could not)."""
    config, records = _sim()
    one = [records[0], records[1]]
    v = STUDY.analyze(config, one).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and v.ci_low is None and "one source seed" in v.reason


def test_several_target_models_of_a_kind_are_a_grouping_of_their_own():
    """Five independently pretrained targets of one kind, two with no transfer at all: pooled over requests alone
    this held, 0.50 [0.43, 0.57]; with the target model as a third grouping it does not."""
    config, records = _sim({"shared_base": False, "targets": ["sft", "never-taught"]}, effect=0.0)
    rate = {n: r for n, r in zip(sorted(config.source_names()), [0.0, 0.0, 0.5, 1.0, 1.0])}
    rng = np.random.default_rng(1)
    for rec in records[1:]:
        for name, cell in rec["result"]["targets"].items():
            if name in rate and name != rec["result"]["source"]:
                cell["gcg"] = (rng.random(len(cell["gcg"])) < rate[name]).tolist()
                for k in ("random0", "random1"):
                    cell[k] = [False] * len(cell[k])
    a = STUDY.analyze(config, records)
    assert a.verdict.arm == "sft" and a.verdict.estimate == pytest.approx(0.5, abs=0.05)
    assert a.verdict.verdict is not Verdict.HOLDS and "models" in a.verdict.interval_method


def test_targets_that_cannot_be_jailbroken_are_an_unmet_premise():
    config, records = _sim()
    narrow = next(n for n in config.target_names() if n.startswith("sft-narrow"))
    never_refuses = json.loads(json.dumps(records))
    never_refuses[0]["result"]["models"][narrow]["no_suffix_refused"] = [False] * config.n_train
    v = STUDY.analyze(config, never_refuses).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "premise not met: sft-narrow refuses only 0.00" in v.reason
    incapable = json.loads(json.dumps(records))
    incapable[0]["result"]["models"][narrow]["prefill"] = [False] * config.n_train
    v = STUDY.analyze(config, incapable).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "sft-narrow gives the procedure for only 0.00" in v.reason


def test_a_pair_missing_from_some_sources_still_renders(tmp_path):
    config, records = _sim()
    narrow = next(n for n in config.target_names() if n.startswith("sft-narrow"))
    for rec in records[2:]:
        del rec["result"]["targets"][narrow]
    del records[1]["result"]["targets"][records[1]["result"]["source"]]
    a = STUDY.analyze(config, records)
    matrix = next(t for t in a.tables if t.title.startswith("Transfer matrix"))
    col = matrix.columns.index(narrow)
    assert [r[col] for r in matrix.rows[1:len(records) - 1]] == ["–"] * (len(records) - 2)
    assert a.verdict.verdict is Verdict.INCONCLUSIVE and "one source seed" in a.verdict.reason


@pytest.mark.parametrize("args,needle", [
    (["--set", "suffix_length=0"], "suffix_length"),
    (["--set", "gcg_steps=0"], "gcg_steps"),
    (["--set", "targets=[llama]"], "targets"),
    (["--set", "real_models=[nosuch/model]", "--set", "prompts=/nonexistent.jsonl"], "prompts"),
    (["--set", "prompts=harmful.jsonl"], "read only for real_models"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("SAFETYLAB_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["run", "jailbreak-transfer", "--scale", "quick", "--out", str(tmp_path / "runs"),
                              *args], capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no organism was trained first


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
    reqs = world.eval_requests("forbidden", split="heldout", n=16, rng_seed=5)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r.text}) + "\n" for r in reqs))
    config, records, _ = tiny_run
    real_cfg = STUDY.resolve_config("quick", {**TINY, "real_models": folders, "prompts": str(tmp_path / "prompts.jsonl"),
                                              "real_target": "first ,", "n_heldout_templates": 8})
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
