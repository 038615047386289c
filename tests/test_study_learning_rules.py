"""Study `learning-rules`: the design on a tiny real run, the decision rule on simulated and
constructed records, IDX data built here, and bad input at the CLI."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

import safetylab.studies.learning_rules as lr
from safetylab.audit import audit_records
from safetylab.claims import Verdict
from safetylab.learning import RULES, backprop, load_init
from safetylab.metrics.similarity import linear_cka
from safetylab.studies.learning_rules import STUDY, decode_array, encode_array
from safetylab.study import Context, torch_threads

TINY = {"seeds": 2, "hidden_sizes": (32, 16), "probe_size": 60, "budget": 0.5, "train_subsample": 1000,
        "match_accuracy": 0.5}


def _run(config, run_dir):
    ctx = Context(run_dir=run_dir, seed=0, cache_dir=run_dir)
    with torch_threads(1):
        STUDY.prepare(config, ctx)
        return ctx, [{"key": u.key, "params": u.params, "result": STUDY.run_unit(config, u, ctx)} for u in STUDY.units(config)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = STUDY.resolve_config("quick", TINY)
    ctx, records = _run(config, tmp_path_factory.mktemp("lr_run"))
    return config, ctx, records


# --------------------------------------------------------------------------- design


def test_replicates_share_an_init_across_rules_and_orders_not_across_replicates(tiny_run):
    config, ctx, records = tiny_run
    res = [r["result"] for r in records]
    assert {r["arm"] for r in res} == {*config.rules, "init", "backprop-twin"}
    for s in range(config.seeds):
        rep = [r for r in res if r["seed"] == s]
        assert len({r["init_file"] for r in rep}) == 1  # one init per replicate, every arm
        # order a is one training seed for every rule; order b another; the twin a third
        assert len({r["train_seed"] for r in rep if r["order"] == "a"}) == 1
        assert len({r["train_seed"] for r in rep if r["order"] in ("a", "b", "c")}) == 3
    files = sorted({r["init_file"] for r in res})
    assert len(files) == config.seeds
    w0, w1 = (load_init(ctx.run_dir / "artifacts" / f).layers[0].weight.detach().numpy() for f in files)
    assert not np.allclose(w0, w1)
    assert res[0]["sizes"] == [64, 32, 16, 10]


def test_every_rule_is_read_through_the_same_pass_on_the_same_inputs(tiny_run):
    config, ctx, records = tiny_run
    rec = next(r["result"] for r in records if r["result"]["arm"] == "init")
    model = load_init(ctx.run_dir / "artifacts" / rec["init_file"])
    data = lr._load_data(config)
    probe = data.x_test[: config.probe_size]
    assert np.all(probe[:, :10] == lr.LABEL_SLOT_VALUE) and np.all(data.x_train[:, :10] == lr.LABEL_SLOT_VALUE)
    np.testing.assert_allclose(decode_array(rec["final"]["hidden"][1]), model.hidden(probe)[1], rtol=1e-6)
    ff = [r["result"] for r in records if r["result"]["arm"] == "forward_forward"]
    assert all(v[0] == pytest.approx(1.0) for v in (r["own_pass_linear_cka"] for r in ff))  # layer 1: same pass
    matched = [r["result"] for r in records if r["result"]["matched"] is not None]
    assert len(matched) >= len(records) // 2
    for r in matched:
        assert r["matched"]["test_accuracy"] >= r["match_accuracy"] and r["matched"]["step"] <= r["total_steps"]
        assert r["matched"]["hidden"] != r["final"]["hidden"]


def test_run_unit_is_deterministic(tiny_run):
    config, ctx, records = tiny_run
    unit = next(u for u in STUDY.units(config) if u.key == "feedback_alignment/seed1/b")
    with torch_threads(1):
        again = STUDY.run_unit(config, unit, ctx)
    first = next(r["result"] for r in records if r["key"] == unit.key)
    assert again["final"] == first["final"] and again["accuracy_trace"] == first["accuracy_trace"]


def test_tiny_run_analysis_is_recomputable_from_stored_activations(tiny_run, tmp_path):
    config, _, records = tiny_run
    analysis = STUDY.analyze(config, records)
    m = analysis.metrics
    res = {(r["result"]["arm"], r["result"]["seed"], r["result"]["order"]): r["result"] for r in records}

    def acts(key, layer):
        snap = res[key]["matched"] or res[key]["final"]
        return decode_array(snap["hidden"][layer])

    def d(a, b, layer):
        return 1 - linear_cka(acts(a, layer), acts(b, layer))

    # primary: disjoint replicate pairs, every term across two inits, both order indices
    units = []
    for i, j in lr.seed_pairs(list(range(config.seeds))):
        per = []
        for k, r1 in enumerate(config.rules):
            for r2 in config.rules[k + 1:]:
                for layer in (0, 1):
                    for o in ("a", "b"):
                        cross = (d((r1, i, o), (r2, j, o), layer) + d((r1, j, o), (r2, i, o), layer)) / 2
                        restart = (d((r1, i, o), (r1, j, o), layer) + d((r2, i, o), (r2, j, o), layer)) / 2
                        per.append(np.log(cross / restart))
        units.append(np.mean(per))
    assert m["similarity/rule_restart_ratio"] == pytest.approx(float(np.exp(np.mean(units))))
    assert STUDY.claim.metric == "similarity/rule_restart_ratio"
    assert analysis.verdict.n == config.seeds // 2 and analysis.verdict.threshold == 2.0
    # secondary (reported, not decided on): the same-init ratio, per replicate
    logs = []
    for s in range(config.seeds):
        per = []
        for k, r1 in enumerate(config.rules):
            for r2 in config.rules[k + 1:]:
                for layer in (0, 1):
                    within = (d((r1, s, "a"), (r1, s, "b"), layer) + d((r2, s, "a"), (r2, s, "b"), layer)) / 2
                    per.append(np.log(d((r1, s, "a"), (r2, s, "a"), layer) / within))
        logs.append(np.mean(per))
    assert m["secondary/same_init_ratio"] == pytest.approx(float(np.exp(np.mean(logs))))
    assert m["secondary/same_init_ratio_n"] == config.seeds and "secondary/mixed_init_ratio" in m
    ratios = next(t for t in analysis.tables if t.title.startswith("The primary ratio and the secondary"))
    assert [r[0] for r in ratios.rows] == ["primary: rules vs restarts (the verdict)", "secondary: same-init baseline",
                                           "secondary: mixed baseline"]
    assert any("Secondary, not the verdict" in f for f in analysis.findings)
    assert [c.name for c in analysis.controls] == [c.name for c in STUDY.claim.controls]
    assert analysis.contrast and "disjoint replicate pairs" in analysis.contrast
    figs = STUDY.plots(config, records, analysis, tmp_path)
    assert {f.path for f in figs} == {"ratio_per_pair.png", "accuracy.png", "similarity_heatmaps.png"}


def test_a_tiny_run_is_audited_on_its_own_records(tmp_path):
    """Two fast rules trained to 0.8 test accuracy (restarts of an undertrained net differ so much that no ratio
    could reach 2), six replicates (three independent pairs): the null (the other rule given backprop's run from
    the same init with the other data order) cannot hold, the extreme (CKA 0 between rules, restarts as measured)
    does."""
    config = STUDY.resolve_config("quick", {"seeds": 6, "rules": ("backprop", "feedback_alignment"),
                                            "hidden_sizes": (32, 16), "probe_size": 300, "train_subsample": 1000,
                                            "match_accuracy": 0.8, "measures": ("linear_cka",)})
    _, records = _run(config, tmp_path)
    audit = audit_records(STUDY, config, records)
    assert audit["ok"], audit["stuck"]
    assert audit["null"]["contrast_verdict"] == "does not hold" and audit["extreme"]["contrast_verdict"] == "holds"
    assert audit["null"]["ci_low"] < 1.0 < audit["null"]["ci_high"] or abs(audit["null"]["estimate"] - 1) < 0.05


def test_backprop_under_other_names_does_not_hold(tmp_path, monkeypatch):
    """Every 'rule' is backprop with its own data order: no rule effect, so never 'holds'."""

    def renamed(offset):
        def train(model, data, *, seed, hp=None, on_step=None):
            return backprop.train(model, data, seed=seed + offset, hp=hp, on_step=on_step)

        return SimpleNamespace(Hyperparams=backprop.Hyperparams, train=train, predict=backprop.predict,
                               hidden=backprop.hidden)

    monkeypatch.setitem(RULES, "feedback_alignment", renamed(101))
    monkeypatch.setitem(RULES, "evolution_strategies", renamed(202))
    config = STUDY.resolve_config("quick", {**TINY, "seeds": 4, "rules": ("backprop", "feedback_alignment",
                                                                          "evolution_strategies")})
    _, records = _run(config, tmp_path)
    analysis = STUDY.analyze(config, records)
    assert analysis.verdict.n == 2  # replicate pairs (0, 1), (2, 3)
    assert analysis.verdict.verdict is not Verdict.HOLDS
    assert analysis.verdict.contrast_verdict is not Verdict.HOLDS
    assert analysis.verdict.estimate < 1.5  # restarts of one rule: about 1


# --------------------------------------------------------------------------- decision rule


def test_simulated_records_have_the_shape_of_real_ones(tiny_run):
    config, _, records = tiny_run
    sim = STUDY.simulate(config, 2.0, np.random.default_rng(0))
    assert [r["key"] for r in sim] == [r["key"] for r in records]
    real, fake = records[1]["result"], sim[1]["result"]
    assert set(fake) == set(real)
    assert [decode_array(h).shape for h in fake["final"]["hidden"]] == [decode_array(h).shape for h in real["final"]["hidden"]]


@pytest.mark.parametrize("measure", ["rsa", "mutual_knn", "linear_cka"])
def test_the_reader_prepares_each_representation_once_and_gets_the_pairwise_values(measure):
    from safetylab.metrics.similarity import MEASURES

    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    records = STUDY.simulate(config, 2.0, np.random.default_rng(1))
    rd = lr._Reader(records, "matched", measure)
    keys = sorted(rd.units)[:4]
    m = MEASURES[measure]
    for a in keys:
        for b in keys:
            for layer in (0, 1):
                # a pair is cached unordered: either order's value, to the bit
                both = {1.0 - m.as_similarity(m.fn(rd.acts(u)[layer], rd.acts(v)[layer])) for u, v in ((a, b), (b, a))}
                assert rd.dissimilarity(a, b, layer) in both
                rows = rd.acts(b)[layer][np.random.default_rng([5, 7]).permutation(len(rd.acts(b)[layer]))]
                assert rd.dissimilarity(a, b, layer, shuffle=5) == 1.0 - m.as_similarity(m.fn(rd.acts(a)[layer], rows))
    # one preparation per (representation, layer, shuffle), however many pairs read it
    assert len(rd._prep) == (0 if m.prepare is None else len(keys) * 2 * 2)


def test_no_rule_effect_never_holds_and_a_large_one_does():
    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    for i in range(20):
        none = STUDY.analyze(config, STUDY.simulate(config, 1.0, np.random.default_rng(i))).verdict
        assert none.verdict is not Verdict.HOLDS
    big = STUDY.analyze(config, STUDY.simulate(config, 10.0, np.random.default_rng(0)))
    assert big.verdict.verdict is Verdict.HOLDS and big.verdict.ci_low > 2.0
    assert all(c.status == "pass" for c in big.controls)


def test_units_are_disjoint_replicate_pairs_and_an_odd_one_is_left_out():
    assert lr.seed_pairs([0, 1, 2, 3, 4]) == [(0, 1), (2, 3)]
    config = STUDY.resolve_config("quick", {**STUDY.calibration.overrides, "seeds": 5})
    out = STUDY.analyze(config, STUDY.simulate(config, 1.0, np.random.default_rng(0)))
    assert out.verdict.n == 2 and out.metrics["replicate_pairs"] == [[0, 1], [2, 3]]
    assert out.metrics["secondary/same_init_ratio_n"] == 5
    assert any("Replicate 4 has no partner" in f for f in out.findings)
    lo, hi = out.metrics["control/backprop_twin_ratio"][1:]
    assert lo < 1.0 < hi or abs(out.metrics["control/backprop_twin_ratio"][0] - 1) < 0.05  # a restart: about 1


def test_controls_can_fail():
    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    records = STUDY.simulate(config, 10.0, np.random.default_rng(0))
    by_key = {r["key"]: r for r in records}
    # negative: the 'twin' is really another rule -> it shows the effect it must not
    for s in range(config.seeds):
        by_key[f"backprop-twin/seed{s}"]["result"] = {**by_key[f"forward_forward/seed{s}/a"]["result"],
                                                      "arm": "backprop-twin", "order": "c"}
    out = STUDY.analyze(config, records)
    assert out.controls[0].status == "fail" and out.verdict.verdict is Verdict.INCONCLUSIVE
    assert "backprop twin" in out.verdict.reason
    # positive: when restarts of a rule share nothing, nothing can look radically different
    records = STUDY.simulate(config, 10.0, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for r in records:
        if r["params"]["arm"] != "init":
            for snap in ("final", "matched"):
                r["result"][snap]["hidden"] = [encode_array(rng.normal(size=decode_array(h).shape))
                                               for h in r["result"][snap]["hidden"]]
    out = STUDY.analyze(config, records)
    assert out.controls[1].status == "fail" and out.verdict.verdict is Verdict.INCONCLUSIVE


def test_a_rule_that_never_reaches_the_matched_accuracy_leaves_the_premise_unmet():
    """The claim is about rules at equal accuracy: runs read at the end of training because they never got there
    make the verdict inconclusive and name the rule, whichever way the ratio points."""
    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    records = STUDY.simulate(config, 10.0, np.random.default_rng(0))
    assert STUDY.analyze(config, records).verdict.verdict is Verdict.HOLDS
    for r in records:
        if r["params"]["arm"] == "forward_forward" and r["params"]["seed"] == 1:
            r["result"]["matched"] = None
    v = STUDY.analyze(config, records).verdict
    assert v.verdict is Verdict.INCONCLUSIVE and "premise not met" in v.reason
    assert "equal accuracy" in v.reason and "FF runs never reached" in v.reason


def test_each_control_is_judged_on_its_own_measure_whatever_the_order(monkeypatch):
    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    records = STUDY.simulate(config, 10.0, np.random.default_rng(0))
    by_key = {r["key"]: r for r in records}
    for s in range(config.seeds):  # the twin is really another rule: the negative control fails, the positive passes
        by_key[f"backprop-twin/seed{s}"]["result"] = {**by_key[f"forward_forward/seed{s}/a"]["result"],
                                                      "arm": "backprop-twin", "order": "c"}
    before = {c.name: (c.status, c.estimate) for c in STUDY.analyze(config, records).controls}
    assert before["backprop twin is not another rule"][0] == "fail"
    assert before["a shuffled representation is radically different"][0] == "pass"
    reversed_claim = lr.CLAIM.model_copy(update={"controls": tuple(reversed(lr.CLAIM.controls))})
    monkeypatch.setattr(lr, "CLAIM", reversed_claim)
    after = STUDY.analyze(config, records).controls
    assert [c.name for c in after] == [c.name for c in reversed_claim.controls]
    assert {c.name: (c.status, c.estimate) for c in after} == before


def test_null_and_extreme_move_the_verdict_on_simulated_records():
    config = STUDY.resolve_config("quick", STUDY.calibration.overrides)
    records = STUDY.simulate(config, 4.0, np.random.default_rng(3))
    assert STUDY.analyze(config, records).verdict.verdict is Verdict.HOLDS
    audit = audit_records(STUDY, config, records)
    assert audit["ok"] and audit["null"]["contrast_verdict"] == "does not hold" and audit["null"]["ci_high"] < 1.5
    # The extreme makes rules orthogonal (CKA 0) and leaves every within-rule comparison, the twin's included, as is.
    ext = STUDY.extreme(config, json.loads(json.dumps(records)))
    same, moved = lr._Reader(records, "matched", "linear_cka"), lr._Reader(ext, "matched", "linear_cka")
    for key in ((("feedback_alignment", 0, "a"), ("feedback_alignment", 1, "a")), (("backprop", 2, "b"), (lr.TWIN, 3, "c"))):
        assert moved.dissimilarity(*key, 0) == pytest.approx(same.dissimilarity(*key, 0), abs=1e-9)
    cross = (("backprop", 0, "a"), ("forward_forward", 1, "a"))
    assert moved.dissimilarity(*cross, 0) == pytest.approx(1.0, abs=1e-9)
    # The null gives each other rule the first rule's run from the same init with the other data order.
    nulled = {r["key"]: r["result"] for r in STUDY.null(config, json.loads(json.dumps(records)))}
    assert nulled["forward_forward/seed1/a"]["final"] == nulled["backprop/seed1/b"]["final"]
    assert nulled["backprop-twin/seed1"] == {r["key"]: r["result"] for r in records}["backprop-twin/seed1"]


def test_encode_decode_round_trip():
    a = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(a)), a)


# --------------------------------------------------------------------------- data


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (LeCun's format) of uint8 ``arr``, gzip when the name ends in .gz."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_folder(folder: Path, n_train=300, n_test=120, *, labels_short_by=0, gz=True) -> Path:
    """Tiny learnable 28x28 data: class c lights a 5x5 block at a class-specific place."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def images(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            r, k = 3 + 5 * (c // 5), 2 + 5 * (c % 5)
            x[i, r:r + 5, k:k + 5] = 250
        return x, y

    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = images(n)
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", y[: n - labels_short_by] if split == "train" else y)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads_with_the_label_slot(tmp_path, gz):
    folder = make_idx_folder(tmp_path / "idx", gz=gz)
    config = STUDY.resolve_config("paper", {"data": str(folder)})
    data = lr._load_data(config)
    assert data.name == "idx" and data.x_train.shape == (300, 784) and data.x_test.shape == (120, 784)
    assert data.n_classes == 10 and np.all(data.x_train[:, :10] == lr.LABEL_SLOT_VALUE)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_auto_uses_fashion_mnist_when_installed_else_digits_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lr, "FASHION_MNIST_DIR", make_idx_folder(tmp_path / "fashion"))
    assert lr.resolve_data("auto") == ("fashion-mnist", tmp_path / "fashion")
    config = STUDY.resolve_config("paper", {"seeds": 2, "hidden_sizes": (8, 4), "probe_size": 40})
    assert config.data == "auto" and lr._load_data(config).name == "fashion-mnist"
    monkeypatch.setattr(lr, "FASHION_MNIST_DIR", tmp_path / "missing")
    assert lr.resolve_data("auto") == ("digits", None)
    STUDY.prepare(config, Context(run_dir=tmp_path / "run", seed=0, cache_dir=tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0] and "data=PATH" in err[0]
    with pytest.raises(lr.UserError, match="apt-get install dataset-fashion-mnist"):
        lr.resolve_data("fashion-mnist")


# --------------------------------------------------------------------------- CLI: bad input and a tiny run


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safetylab.cli", *args], capture_output=True, text=True, cwd=cwd)


def _one_line_exit_2(out, *needles):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    from cli_fixtures import run_cli

    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    short = make_idx_folder(tmp_path / "short", labels_short_by=7)
    out = tmp_path / "runs"
    cases = [
        (["--set", f"data={empty}"], ["no MNIST found", "IDX"]),
        (["--set", f"data={short}"], ["image and label counts differ"]),
        (["--set", f"data={tmp_path / 'nowhere'}"], ["does not exist"]),
        (["--set", "rules=[backprop, sgd]"], ["unknown rule", "sgd"]),
        (["--set", "seeds=1"], ["seeds"]),
        (["--set", "extensions=[backprop]"], ["extensions"]),
    ]
    for args, needles in cases:  # in-process: the entry point as a shell calls it, without an interpreter start each
        code, _, err = run_cli(["run", "learning-rules", *args, "--out", str(out), "--quiet"], capsys)
        _one_line_exit_2(SimpleNamespace(returncode=code, stderr=err), *needles)
    assert not out.exists()


def test_tiny_end_to_end_run_on_idx_files(tmp_path):
    folder = make_idx_folder(tmp_path / "idx")
    out = tmp_path / "runs"
    res = _cli("run", "learning-rules", "--scale", "quick", "--set", f"data={folder}", "--set", "seeds=2",
               "--set", "hidden_sizes=[16, 8]", "--set", "probe_size=40", "--set", "budget=0.3",
               "--set", "match_accuracy=0.5", "--set", "measures=[linear_cka, rsa]", "--out", str(out), "--quiet",
               "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["study"] == "learning-rules"
    run_dir = next((out / "learning-rules").iterdir())
    assert (run_dir / "report.html").exists() and (run_dir / "ratio_per_pair.png").exists()
    first = json.loads((run_dir / "results.jsonl").read_text().splitlines()[0])
    assert first["result"]["dataset"] == "idx" and first["result"]["sizes"] == [784, 16, 8, 10]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rules": ("backprop", "sgd")}, "rules: unknown rule"),
        ({"rules": ("backprop",)}, "at least two distinct rules"),
        ({"extensions": ("backprop",)}, "repeat"),
        ({"verdict_measure": "cca"}, "verdict_measure='cca' must be one of measures"),
        ({"measures": ("linear_cka", "cka2")}, "measures: unknown"),
        ({"measures": ("linear_cka", "cca"), "probe_size": 100}, "probe_size=100 must exceed the widest hidden layer"),
        ({"seeds": 1}, "seeds"),
        ({"match_accuracy": 1.5}, "match_accuracy"),
        ({"data": " "}, "data: empty"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(override, message):
    with pytest.raises(ValidationError, match=message):
        STUDY.resolve_config("paper", override)


def test_scales_resolve():
    paper, quick = STUDY.resolve_config("paper"), STUDY.resolve_config("quick")
    assert paper.hidden_sizes == (256, 128) and paper.seeds >= 10 and paper.data == "auto"
    assert paper.rules == lr.ESSAY_RULES and paper.extensions == lr.EXTENSION_RULES
    assert quick.data == "digits" and quick.extensions == ()
    # the verdict's units are disjoint replicate pairs: at least 4 at quick scale, 5 at paper scale
    assert len(lr.seed_pairs(list(range(quick.seeds)))) >= 4 and len(lr.seed_pairs(list(range(paper.seeds)))) >= 5
