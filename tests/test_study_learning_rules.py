"""Study `learning-rules`: a tiny real run, the analysis on constructed records, bad config."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from safetylab.claims import Verdict
from safetylab.learning import load_init
from safetylab.metrics.similarity import linear_cka
from safetylab.studies.learning_rules import STUDY, Config, decode_array, encode_array
from safetylab.study import Context, torch_threads

TINY = {
    "rules": ("backprop", "feedback_alignment", "forward_forward"),
    "seeds": 2,
    "hidden_sizes": (32, 16),
    "probe_size": 120,
    "budget": 0.5,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lr_run")
    config = STUDY.resolve_config("quick", TINY)
    ctx = Context(run_dir=run_dir, seed=0, cache_dir=run_dir)
    with torch_threads(1):
        STUDY.prepare(config, ctx)
        records = [{"key": u.key, "params": u.params, "result": STUDY.run_unit(config, u, ctx)} for u in STUDY.units(config)]
    return config, ctx, records


def test_same_init_across_rules_different_across_seeds(tiny_run):
    config, ctx, records = tiny_run
    by_seed = {}
    for r in records:
        by_seed.setdefault(r["result"]["seed"], set()).add((r["result"]["init_file"], r["result"]["train_seed"]))
    assert all(len(v) == 1 for v in by_seed.values())  # one init file and data order per seed
    files = [next(iter(v))[0] for v in by_seed.values()]
    assert len(set(files)) == 2
    w0 = load_init(ctx.run_dir / "artifacts" / files[0]).layers[0].weight
    w1 = load_init(ctx.run_dir / "artifacts" / files[1]).layers[0].weight
    assert not np.allclose(w0.detach().numpy(), w1.detach().numpy())
    assert records[0]["result"]["sizes"] == [64, 32, 16, 10]


def test_run_unit_is_deterministic(tiny_run):
    config, ctx, records = tiny_run
    unit = STUDY.units(config)[1]
    with torch_threads(1):
        again = STUDY.run_unit(config, unit, ctx)
    first = records[1]["result"]
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["hidden"] == first["hidden"]


def test_tiny_run_analysis_and_verdict_direction(tiny_run, tmp_path):
    config, _, records = tiny_run
    analysis = STUDY.analyze(config, records)
    m = analysis.metrics
    # the per-seed gaps are recomputable from the stored activations
    acts = {(r["result"]["rule"], r["result"]["seed"]): [decode_array(h) for h in r["result"]["hidden"]] for r in records}
    rules = list(config.rules)
    for layer in (0, 1):
        mat = m[f"matrix/layers.{layer}/linear_cka"]
        assert np.array(mat).shape == (3, 3)
        assert mat[0][0] == pytest.approx(linear_cka(acts[("backprop", 0)][layer], acts[("backprop", 1)][layer]))
        cross = np.mean([linear_cka(acts[(rules[0], s)][layer], acts[(rules[2], s)][layer]) for s in (0, 1)])
        assert mat[0][2] == pytest.approx(cross)
    assert m["similarity/within_minus_cross"] == pytest.approx(np.mean(m["similarity/within_minus_cross_per_seed"]))
    # the claim's direction on a tiny run: rules differ more than seeds of one rule do
    assert m["similarity/within_minus_cross"] > 0
    assert analysis.verdict.n == 2
    assert all(m[f"accuracy/{r}"] > 0.5 for r in rules)
    figs = STUDY.plots(config, records, analysis, tmp_path)
    assert {f.path for f in figs} == {"similarity_heatmaps.png", "accuracy_and_gap.png"}
    assert all((tmp_path / f.path).stat().st_size > 10_000 for f in figs)


def _fake_records(config, make_acts):
    recs = []
    for s in range(config.seeds):
        for r in config.rules:
            hidden = [encode_array(a) for a in make_acts(r, s)]
            recs.append(
                {
                    "key": f"{r}/seed{s}",
                    "params": {"rule": r, "seed": s},
                    "result": {"rule": r, "seed": s, "dataset": "digits", "sizes": [8, 6, 10], "test_accuracy": 0.9,
                               "train_seconds": 0.1, "hidden": hidden},
                }
            )
    return recs


def test_analysis_decides_both_ways_on_constructed_records():
    config = Config(rules=("backprop", "feedback_alignment"), seeds=4, hidden_sizes=(6,), probe_size=60,
                    measures=("linear_cka", "rsa"))
    probe = np.random.default_rng(0).normal(size=(60, 6))
    rule_maps = {r: np.random.default_rng(i + 1).normal(size=(6, 6)) for i, r in enumerate(config.rules)}

    def per_rule(r, s):  # every seed of a rule lands on the same representation; rules differ
        noise = np.random.default_rng(100 + s).normal(size=(60, 6)) * 0.05
        return [np.tanh(probe @ rule_maps[r]) ** 2 + noise]

    holds = STUDY.analyze(config, _fake_records(config, per_rule))
    assert holds.verdict.verdict == Verdict.HOLDS
    assert holds.verdict.ci_low > 0

    def shared(r, s):  # all units identical: no gap at all
        return [np.tanh(probe @ rule_maps["backprop"])]

    same = STUDY.analyze(config, _fake_records(config, shared))
    assert same.metrics["similarity/within_minus_cross"] == pytest.approx(0.0, abs=1e-9)
    assert same.verdict.verdict == Verdict.DOES_NOT_HOLD


def test_encode_decode_round_trip():
    a = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(a)), a)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rules": ("backprop", "sgd")}, "rules: unknown rule"),
        ({"rules": ("backprop",)}, "at least two distinct rules"),
        ({"verdict_measure": "cca"}, "verdict_measure='cca' must be one of measures"),
        ({"measures": ("linear_cka", "cka2")}, "measures: unknown"),
        ({"dataset": "mnist"}, "dataset='mnist' needs mnist_path"),
        ({"dataset": "digits", "mnist_path": "/data/mnist"}, "mnist_path is set but dataset='digits'"),
        ({"measures": ("linear_cka", "cca"), "probe_size": 100}, "probe_size=100 must exceed the widest hidden layer"),
        ({"seeds": 1}, "seeds"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(override, message):
    with pytest.raises(ValidationError, match=message):
        STUDY.resolve_config("paper", override)


def test_scales_resolve():
    paper = STUDY.resolve_config("paper")
    assert paper.hidden_sizes == (256, 128) and paper.seeds >= 5 and paper.resolved_dataset == "digits"
    assert STUDY.resolve_config("paper", {"mnist_path": "/x"}).resolved_dataset == "mnist"
    assert STUDY.resolve_config("quick").seeds == 3


def test_runs_on_local_mnist_file_with_the_essay_input_width(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, size=(150, 28, 28)).astype(np.uint8),
        y_train=np.arange(150) % 10,
        x_test=rng.integers(0, 256, size=(60, 28, 28)).astype(np.uint8),
        y_test=np.arange(60) % 10,
    )
    config = STUDY.resolve_config(
        "paper",
        {"mnist_path": str(tmp_path / "mnist.npz"), "rules": ("backprop", "forward_forward"), "seeds": 2,
         "hidden_sizes": (16, 8), "probe_size": 40, "budget": 0.1},
    )
    ctx = Context(run_dir=tmp_path / "run", seed=0, cache_dir=tmp_path)
    with torch_threads(1):
        result = STUDY.run_unit(config, STUDY.units(config)[1], ctx)
    assert result["dataset"] == "mnist" and result["sizes"] == [784, 16, 8, 10]
    assert result["probe_n"] == 40 and decode_array(result["hidden"][0]).shape == (40, 16)
    from safetylab.errors import UserError

    missing = STUDY.resolve_config("paper", {"mnist_path": str(tmp_path / "nope.npz")})
    with pytest.raises(UserError, match="does not exist"):
        STUDY.run_unit(missing, STUDY.units(missing)[0], ctx)
