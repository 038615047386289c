"""Study `similarity-blindness`: constructions behave as their ground truth says."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from safetylab.claims import Verdict
from safetylab.studies.similarity_blindness import STUDY, _trigger_detector
from safetylab.study import Context, torch_threads

TINY = {"seeds": 1, "epochs": 10, "hidden_sizes": (32, 16)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sb_run")
    config = STUDY.resolve_config("quick", TINY)
    ctx = Context(run_dir=run_dir, seed=0, cache_dir=run_dir)
    with torch_threads(1):
        records = [{"key": u.key, "params": u.params, "result": STUDY.run_unit(config, u, ctx)} for u in STUDY.units(config)]
    return config, records


def _case(records, case):
    return next(r["result"] for r in records if r["result"]["case"] == case)


def test_rotated_copy_is_same_in_geometry_and_function(tiny_run):
    _, records = tiny_run
    r = _case(records, "rotated_copy")
    assert r["geometry"]["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert r["geometry"]["procrustes"] == pytest.approx(0.0, abs=1e-6)
    assert r["pred_a_clean"] == r["pred_b_clean"] and r["pred_a_trigger"] == r["pred_b_trigger"]
    assert r["ablation_similarity"] == pytest.approx(1.0, abs=1e-9)


def test_low_variance_readout_fools_geometry_not_function(tiny_run):
    _, records = tiny_run
    r = _case(records, "low_variance_readout")
    assert r["geometry"]["linear_cka"] > 0.999 and r["geometry"]["cca"] > 0.999
    a, b = np.array(r["pred_a_clean"]), np.array(r["pred_b_clean"])
    np.testing.assert_array_equal(b, (a + 1) % 10)  # B reads the shifted label from the tiny channel
    assert r["ablation_similarity"] < 0.9


def test_hidden_trigger_is_identical_on_clean_and_different_on_trigger(tiny_run):
    _, records = tiny_run
    r = _case(records, "hidden_trigger")
    assert r["geometry"]["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert r["pred_a_clean"] == r["pred_b_clean"]
    assert set(r["pred_b_trigger"]) == {0}  # the trigger forces target_class on every input
    assert np.mean(np.array(r["pred_a_trigger"]) == 0) < 0.5


def test_trained_backdoor_learns_the_trigger(tiny_run):
    _, records = tiny_run
    r = _case(records, "trigger_trained")
    assert np.mean(np.array(r["pred_b_trigger"]) == 0) > 0.8  # attack success
    assert np.mean(np.array(r["pred_b_clean"]) == np.array(r["labels"])) > 0.8  # clean accuracy kept


def test_analysis_verdict_and_plots(tiny_run, tmp_path):
    config, records = tiny_run
    analysis = STUDY.analyze(config, records)
    assert analysis.verdict.verdict == Verdict.HOLDS
    m = analysis.metrics
    # at least the two constructed cases are blind spots
    assert m["blindness/count"] >= 2 and m["blindness/n_function_different"] >= 2
    assert m["geometry/rotated_copy/linear_cka"] == pytest.approx(1.0)
    assert m["function/hidden_trigger/agree_clean"] == 1.0
    assert [t.title for t in analysis.tables][:2] == ["Geometric measures at the last hidden layer (clean test inputs)", "Functional measures"]
    figs = STUDY.plots(config, records, analysis, tmp_path)
    assert all((tmp_path / f.path).stat().st_size > 10_000 for f in figs)


def test_verdict_is_not_holds_when_cka_sees_every_difference(tiny_run):
    config, records = tiny_run
    strict = type(config).model_validate({**config.model_dump(), "cka_threshold": 1.0})
    only_trained = [r for r in records if r["result"]["case"] in ("independent_seeds", "trigger_trained")]
    analysis = STUDY.analyze(strict, only_trained)
    assert analysis.metrics["blindness/count"] == 0
    # an existence claim: zero blind pairs bounds the rate (Clopper-Pearson) but cannot prove it is 0
    assert analysis.verdict.verdict == Verdict.INCONCLUSIVE
    assert analysis.verdict.ci_low == 0.0 and analysis.verdict.ci_high < 1.0


def test_trigger_detector_fires_only_on_the_patch():
    config = STUDY.resolve_config("quick")
    x = np.zeros((3, 64))
    x[1, list(config.trigger_pixels)] = 1.0
    x[2, list(config.trigger_pixels)[:3]] = 1.0  # an incomplete patch
    np.testing.assert_allclose(_trigger_detector(x, config), [0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"cases": ("rotated_copy", "mystery")}, "cases: unknown"),
        ({"measures": ("rsa",)}, "must include 'linear_cka'"),
        ({"trigger_pixels": (70,)}, r"trigger_pixels=\(70,\): need indices in 0..63"),
        ({"dataset": "mnist1d"}, "need indices in 0..39"),
        ({"epsilon": 0.0}, "epsilon"),
    ],
)
def test_bad_config_is_rejected(override, message):
    with pytest.raises(ValidationError, match=message):
        STUDY.resolve_config("paper", override)
