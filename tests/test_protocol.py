"""Protocol v2: studies measure, one ``decide`` judges, and every verdict is audited on its own records.

The toy study (``tests/toy_study.py``) runs in seconds through the real CLI; the registry
tests hold every built-in study to the same contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import toy_study
from safetylab.audit import audit_records
from safetylab.calibrate import MIN_DRAWS, calibrate
from safetylab.claims import Evidence, NotRun, Verdict, decide
from safetylab.metrics.stats import Interval, difference, mean_interval, rate_interval
from safetylab.registry import REGISTRY, get_study

HERE = Path(__file__).parent


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SAFETYLAB_STUDIES": "toy=toy_study", "SAFETYLAB_CACHE": str(cwd or HERE)}
    return subprocess.run([sys.executable, "-m", "safetylab.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def _records(config, effect=0.6, seed=0):
    return toy_study.simulate(config, effect, np.random.default_rng(seed))


# --------------------------------------------------------------------------- decide


def _iv(est, lo, hi, se=None, df=None):
    return Interval(est, lo, hi, n=5, se=se, df=df)


def test_controls_are_judged_by_name_not_position():
    """Reordering CLAIM.controls must not swap what each control is judged on."""
    ev = Evidence(primary={"treated": _iv(0.5, 0.3, 0.7)},
                  controls={"placebo shows none": _iv(0.6, 0.4, 0.8), "planted effect is seen": _iv(1.0, 0.9, 1.1)})
    claim = toy_study.CLAIM
    flipped = claim.model_copy(update={"controls": tuple(reversed(claim.controls))})
    for c in (claim, flipped):
        status = {r.name: r.status for r in decide(c, ev).controls}
        assert status == {"planted effect is seen": "pass", "placebo shows none": "fail"}
    d = decide(claim, ev)
    assert d.verdict.verdict is Verdict.INCONCLUSIVE and "control failed: placebo shows none" in d.verdict.reason
    assert d.verdict.contrast_verdict is Verdict.HOLDS


def test_evidence_must_name_every_declared_control():
    ev = Evidence(primary={"treated": _iv(0.5, 0.3, 0.7)}, controls={"planted effect is seen": _iv(1, 0.9, 1.1)})
    with pytest.raises(ValueError, match="placebo shows none"):
        decide(toy_study.CLAIM, ev)
    ev = Evidence(primary={"treated": _iv(0.5, 0.3, 0.7)},
                  controls={"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": NotRun("x"),
                            "a control nobody declared": NotRun("y")})
    with pytest.raises(ValueError, match="undeclared"):
        decide(toy_study.CLAIM, ev)


def test_one_treatment_claim_rejects_several_primary_arms():
    ok = {"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -0.1, 0.1)}
    with pytest.raises(ValueError, match="one treatment"):
        decide(toy_study.CLAIM, Evidence(primary={"a": _iv(0.5, 0.3, 0.7), "b": _iv(0.5, 0.3, 0.7)}, controls=ok))


def _holm_claim():
    return toy_study.CLAIM.model_copy(update={"contrast": toy_study.CLAIM.contrast.model_copy(
        update={"treatment": ("a", "b", "c"), "multiplicity": "holm"})})


def test_at_least_one_of_k_moves_every_arm_to_the_bonferroni_level():
    """k = 3 arms: each interval at 1 − 0.05/3, the one with the smallest Holm p decides, and the
    label says Bonferroni (Holm's first step), not 'Holm interval'."""
    ok = {"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -0.1, 0.1)}
    arms = {"a": mean_interval([0.50, 0.55, 0.60, 0.58, 0.52]), "b": mean_interval([0.1, 0.3, 0.2, 0.25, 0.15]),
            "c": mean_interval([0.0, 0.05, -0.05, 0.02, 0.01])}
    d = decide(_holm_claim(), Evidence(primary=arms, controls=ok))
    assert d.arm == "a" and d.verdict.verdict is Verdict.HOLDS
    assert d.verdict.confidence == pytest.approx(1 - 0.05 / 3)
    assert d.arms["a"].hi - d.arms["a"].lo > arms["a"].hi - arms["a"].lo  # wider than its 95% interval
    assert "Bonferroni" in d.verdict.interval_method and d.p_holm["a"] < 0.05
    # An arm clear of the threshold at 95% but not at 98.3% does not make the claim hold.
    x = [0.21, 0.23, 0.25, 0.27, 0.29]
    assert mean_interval(x).lo > 0.2 and mean_interval(x).at_level(1 - 0.05 / 3).lo <= 0.2
    d = decide(_holm_claim(), Evidence(primary={"a": mean_interval(x), "b": arms["c"], "c": arms["c"]}, controls=ok))
    assert d.verdict.verdict is Verdict.INCONCLUSIVE and "too little power" in d.verdict.reason


def test_does_not_hold_needs_every_arm_below():
    ok = {"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -0.1, 0.1)}
    low = mean_interval([0.0, 0.01, -0.01, 0.02, 0.0])
    d = decide(_holm_claim(), Evidence(primary={"a": low, "b": low, "c": mean_interval([0.1, 0.3, 0.2, 0.4, 0.0])},
                                       controls=ok))
    assert d.verdict.verdict is Verdict.INCONCLUSIVE
    d = decide(_holm_claim(), Evidence(primary={"a": low, "b": low, "c": low}, controls=ok))
    assert d.verdict.verdict is Verdict.DOES_NOT_HOLD and d.verdict.reason == ""


@pytest.mark.parametrize("evidence, why", [
    (Evidence(primary={}, controls={"planted effect is seen": NotRun("a"), "placebo shows none": NotRun("b")},
              missing="no seed finished"), "nothing measured: no seed finished; control not run"),
    (Evidence(primary={}, controls={"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -.1, .1)},
              missing="no seed finished"), "nothing measured: no seed finished"),
    (Evidence(primary={"treated": _iv(0.25, 0.1, 0.4)},
              controls={"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -.1, .1)}),
     "too little power"),
    (Evidence(primary={"treated": _iv(0.25, None, None)},
              controls={"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -.1, .1)}),
     "no interval"),
    (Evidence(primary={"treated": _iv(0.9, 0.8, 1.0)},
              controls={"planted effect is seen": _iv(1, 0.9, 1.1), "placebo shows none": _iv(0, -.1, .1)},
              premises=("accidents are not rare at this budget",)), "premise not met: accidents are not rare"),
])
def test_inconclusive_always_says_why(evidence, why):
    v = decide(toy_study.CLAIM, evidence).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and why in v.reason and why in v.label


# --------------------------------------------------------------------------- intervals


def test_interval_clips_to_bounds_and_keeps_se_for_other_levels():
    iv = rate_interval(np.r_[np.ones(199), 0], clusters=np.arange(200) % 10)
    assert 0.0 <= iv.lo <= iv.estimate <= iv.hi <= 1.0 and iv.se > 0 and iv.df == 9
    wider = iv.at_level(0.99)
    assert wider.lo < iv.lo and wider.hi <= 1.0
    assert f"{iv:.2f}".startswith("0.99 [") and str(iv).count(".") == 3


def test_log_scale_interval_moves_level_and_tests_on_the_log():
    """A geometric-mean ratio: bounds are ratios, se/df the log's; the Bonferroni level and the
    p-value against a ratio threshold are computed on the log scale."""
    logs = np.log([1.4, 1.6, 1.5, 1.7, 1.3])
    base = mean_interval(logs)
    iv = Interval(float(np.exp(base.estimate)), float(np.exp(base.lo)), float(np.exp(base.hi)), n=5, se=base.se,
                  df=base.df, log=True)
    wide = iv.at_level(0.99)
    assert wide.lo == pytest.approx(math.exp(base.at_level(0.99).lo))
    assert wide.hi == pytest.approx(math.exp(base.at_level(0.99).hi))
    assert iv.p_value(2.0) == pytest.approx(base.p_value(math.log(2.0)))
    assert iv.triple() == [iv.estimate, iv.lo, iv.hi] and math.isnan(Interval(None).triple()[0])


def test_difference_carries_both_errors():
    """A treatment's seeds against one shared base: the base's own error is carried."""
    a, b = mean_interval([0.50, 0.52, 0.54]), mean_interval([0.30, 0.40, 0.35])
    d = difference(a, b)
    assert d.estimate == pytest.approx(0.17)
    assert d.se == pytest.approx(math.sqrt(a.se ** 2 + b.se ** 2))
    assert d.hi - d.lo > a.hi - a.lo


# --------------------------------------------------------------------------- audit


def test_audit_moves_the_toy_verdict_both_ways():
    config = toy_study.Config()
    recs = _records(config)
    assert toy_study.analyze(config, recs).verdict.verdict is Verdict.HOLDS
    out = audit_records(toy_study.STUDY, config, recs)
    assert out["ok"] and out["null"]["contrast_verdict"] != "holds" and out["extreme"]["contrast_verdict"] == "holds"
    # A run where the effect is absent can still hold at the extreme: the design can go both ways.
    out = audit_records(toy_study.STUDY, config, _records(config, effect=0.0))
    assert out["ok"] and out["extreme"]["verdict"] == "holds"


def test_audit_finds_a_design_stuck_on_holds():
    """A 'null' that leaves the effect in place is what a design that cannot fail looks like."""
    stuck = dataclasses.replace(toy_study.STUDY, null=lambda config, recs: recs)
    out = audit_records(stuck, toy_study.Config(), _records(toy_study.Config()))
    assert not out["ok"] and "null" in out["stuck"] and out["null"]["verdict"] == "holds"


def _folder_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyruns")
    out = _cli("run", "toy", "--out", str(root), "--quiet", "--workers", "1", cwd=root)
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((root / "toy").iterdir())
    return run_dir


def test_audit_cli_prints_both_outcomes_and_writes_nothing(toy_run):
    before = _folder_digest(toy_run)
    out = _cli("audit", str(toy_run), "--json", cwd=toy_run.parent)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["ok"] and res["verdict"] == "holds"
    assert res["null"]["verdict"] != "holds" and res["extreme"]["verdict"] == "holds"
    text = _cli("audit", str(toy_run), cwd=toy_run.parent)
    assert text.returncode == 0 and "null" in text.stdout and "extreme" in text.stdout
    assert _folder_digest(toy_run) == before


def test_report_says_whether_the_verdict_could_have_come_out_the_other_way(toy_run):
    summary = json.loads((toy_run / "summary.json").read_text())
    assert summary["audit"]["ok"] and summary["audit"]["null"]["verdict"] != "holds"
    for name in ("report.md", "report.html"):
        text = (toy_run / name).read_text()
        assert "Could this verdict have come out the other way?" in text and "(null)" in text


def test_audit_bad_input_is_one_line_exit_2_and_nothing_written(toy_run, tmp_path):
    import shutil

    def one_line_exit_2(out, words):
        assert out.returncode == 2, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines

    one_line_exit_2(_cli("audit", str(tmp_path / "nope")), "does not exist")
    partial = tmp_path / "partial"
    shutil.copytree(toy_run, partial)
    lines = (partial / "results.jsonl").read_text().splitlines(keepends=True)
    (partial / "results.jsonl").write_text("".join(lines[:-2]))
    before = _folder_digest(partial)
    one_line_exit_2(_cli("audit", str(partial)), "partial")
    assert _folder_digest(partial) == before
    older = tmp_path / "older"
    shutil.copytree(toy_run, older)
    recs = [json.loads(x) for x in (older / "results.jsonl").read_text().splitlines()]
    for r in recs:
        r["result"].pop("plain")
    (older / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = _folder_digest(older)
    one_line_exit_2(_cli("audit", str(older)), "older safetylab")
    assert _folder_digest(older) == before
    mod = tmp_path / "notransforms_study.py"
    mod.write_text("import dataclasses, toy_study\n"
                   "STUDY = dataclasses.replace(toy_study.STUDY, name='bare', null=None, extreme=None)\n")
    env_run = tmp_path / "bare"
    shutil.copytree(toy_run, env_run)
    env = json.loads((env_run / "env.json").read_text())
    (env_run / "env.json").write_text(json.dumps({**env, "study": "bare"}))
    out = subprocess.run([sys.executable, "-m", "safetylab.cli", "audit", str(env_run)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{tmp_path}",
                              "SAFETYLAB_STUDIES": "bare=notransforms_study"})
    one_line_exit_2(out, "declares no null/extreme")


# --------------------------------------------------------------------------- calibration


def test_calibration_accepts_on_the_estimate_and_needs_400_draws():
    res = calibrate(toy_study.STUDY, 60, seed=0)
    assert res["null"]["ok"] == (res["null"]["holds_rate"] <= 0.05)
    assert not res["enough_draws"] and not res["calibrated"]  # too few draws for a verdict
    res = calibrate(toy_study.STUDY, MIN_DRAWS, seed=0)
    assert res["calibrated"] and res["null"]["holds_rate"] <= 0.05 and 0.5 < res["alternative"]["holds_rate"] < 1


def test_calibrate_against_a_real_run(toy_run, tmp_path):
    out = _cli("calibrate", "toy", "--against", str(toy_run), "--n", "40", "--json", cwd=toy_run.parent)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["agrees"] and 0.5 <= res["ratio"] <= 2
    # A simulator whose seeds vary five times as much as the run's: said, exit 1.
    mod = tmp_path / "noisy_study.py"
    mod.write_text(
        "import dataclasses, toy_study\n"
        "def simulate(config, effect, rng):\n"
        "    return toy_study.simulate(config.model_copy(update={'noise': 5 * config.noise}), effect, rng)\n"
        "STUDY = dataclasses.replace(toy_study.STUDY, name='toy', simulate=simulate)\n")
    out = subprocess.run([sys.executable, "-m", "safetylab.cli", "calibrate", "toy", "--against", str(toy_run), "--n",
                          "40", "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}",
                              "SAFETYLAB_STUDIES": "toy=noisy_study"})
    assert out.returncode == 1, out.stderr
    res = json.loads(out.stdout)
    assert res["agrees"] is False and res["ratio"] > 2 and "more than 2x" in res["note"]


# --------------------------------------------------------------------------- every registered study


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_study_declares_its_audit_and_judges_its_controls_by_name(name):
    """The conformance test of protocol v2: null/extreme transforms exist, and the analysis of
    simulated records judges exactly the declared controls, in their declared order, through
    ``decide`` (which rejects evidence that misses or invents a control)."""
    study = get_study(name)
    assert study.null is not None and study.extreme is not None, f"{name} declares no audit transforms"
    cal = study.calibration
    config = study.resolve_config(cal.scale, cal.overrides)
    analysis = study.analyze(config, study.simulate(config, cal.alternative_effect, np.random.default_rng(0)))
    assert [c.name for c in analysis.controls] == [c.name for c in study.claim.controls]
    v = analysis.verdict
    assert v.verdict is not Verdict.INCONCLUSIVE or v.reason, f"{name}: inconclusive without a reason"


def test_deprecated_organism_keys_still_work_beside_a_scale_preset(capsys):
    """Old names map to the one shared name with a one-line note, also when the scale's preset
    sets the new name (the user's value wins)."""
    st = get_study("threat-model")
    assert st.resolve_config("quick", {"seeds": 4}).organism_seeds == 4
    assert st.resolve_config("quick", {"organism_seed": 2}).base_seed == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("deprecated" in line for line in err)
    with pytest.raises(ValueError, match="give only"):
        st.config_cls.model_validate({"organism_seed": 1, "base_seed": 2})


def test_reproduce_runs_studies_side_by_side_with_the_same_records(tmp_path):
    """``reproduce`` runs one study per core, its units in series: every study gets its run folder and the
    combined report lists both, and the records are the ones ``run`` gives (the same bits: one thread either way)."""
    (tmp_path / "toy_twin.py").write_text(
        "import dataclasses\nfrom toy_study import STUDY as _TOY\nSTUDY = dataclasses.replace(_TOY, name='toy2')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "SAFETYLAB_STUDIES": "toy=toy_study,toy2=toy_twin", "SAFETYLAB_CACHE": str(tmp_path)}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "safetylab.cli", *args], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out

    printed = cli("reproduce", "--only", "toy,toy2", "--out", str(tmp_path / "lanes"), "--json").stdout
    cli("run", "toy", "--out", str(tmp_path / "serial"), "--quiet", "--workers", "2")
    summary = json.loads(next((tmp_path / "lanes" / "reproduce").glob("*/summary.json")).read_text())
    assert json.loads(printed) == summary  # --json: stdout is the combined summary and nothing else
    assert json.dumps(summary).count('"toy2"') >= 1 and json.dumps(summary).count('"toy"') >= 1

    def results(root, name):
        (run,) = list((root / name).iterdir())
        return {r["key"]: r["result"] for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())}

    assert results(tmp_path / "lanes", "toy") == results(tmp_path / "serial", "toy")
    assert results(tmp_path / "lanes", "toy2") == results(tmp_path / "serial", "toy")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="reproduce runs studies side by side only with 2 cores or more")
def test_reproduce_starts_a_study_whose_organisms_are_cached_while_others_still_train(tmp_path):
    """On a cold cache, ``reproduce`` trains organisms and runs studies in one pool: a study that needs no
    organism takes the core that training leaves free instead of waiting for the last organism, and a study
    that needs organisms starts only once they are in the cache."""
    (tmp_path / "toy_org.py").write_text(
        "import dataclasses\nfrom toy_study import STUDY as _TOY\n"
        "from safetylab.organisms.cache import OrganismRequest\n"
        "def organisms(config):\n"
        "    return [OrganismRequest('sft', 'tiny', seed=0)]\n"  # and its base: two stages, one after the other
        "STUDY = dataclasses.replace(_TOY, name='toyorg', organisms=organisms, quick_seconds=600.0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "SAFETYLAB_STUDIES": "toy=toy_study,toyorg=toy_org", "SAFETYLAB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "safetylab.cli", "reproduce", "--only", "toy,toyorg", "--out",
                          str(tmp_path / "runs"), "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    trained = {json.loads((d / "organism.json").read_text())["variant"]: (d / "organism.json").stat().st_mtime
               for d in (tmp_path / "cache" / "organisms").iterdir() if (d / "organism.json").is_file()}
    assert set(trained) == {"base", "sft"}

    def run(name):
        (run_dir,) = list((tmp_path / "runs" / name).iterdir())
        return run_dir

    # toy's units were all recorded while the sft was still training (its base took the first core); that
    # toyorg waited for its organisms is tests/test_pool.py's (its lane would train them itself otherwise)
    assert (run("toy") / "results.jsonl").stat().st_mtime < trained["sft"]
    assert json.loads((run("toyorg") / "summary.json").read_text())["verdict"]["verdict"] == "holds"
