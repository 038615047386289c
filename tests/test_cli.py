"""Bad input at the command line: one line naming problem and fix, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_fixtures import run_cli


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("seeds: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a_file").write_text("not a folder")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "env.json").write_text("{not json")
    (broken / "config.yaml").write_text("seeds: 2\n")
    return tmp_path


BAD = [
    (["run", "no-such-study"], "unknown study 'no-such-study'"),
    (["run", "shield", "--set", "not_a_key=1"], "unknown key 'not_a_key'"),
    (["run", "shield", "--set", "seeds=many"], "seeds"),
    (["run", "shield", "--set", "seeds=0"], "greater than or equal to 1"),
    (["run", "shield", "--set", "total_steps=0"], "total_steps"),
    (["run", "shield", "--config", "bad.yaml"], "not valid YAML"),
    (["run", "shield", "--config", "list.yaml"], "must hold a mapping"),
    (["run", "shield", "--config", "missing.yaml"], "does not exist"),
    (["run", "shield", "--out", "a_file"], "is a file"),
    (["run", "shield", "--out", "a_file/sub"], "is a file"),
    (["run", "--resume", "no_such_run"], "does not exist"),
    (["run", "--resume", "broken_run"], "corrupt"),
    (["run", "--resume", "a_file"], "not a folder"),
    (["run"], "name a study"),
    (["report", "no_such_run"], "does not exist"),
    (["report", "broken_run"], "corrupt"),
    (["run", "shield", "--scale", "huge"], "huge"),
    (["run", "shield", "--workers", "0"], "workers"),
    (["reproduce", "--only", "shield,nope"], "unknown study nope"),
    (["threats", "--runs", "a_file"], "is a file"),
    (["runs", "a_file"], "is a file"),
    (["runs", "no_such_dir"], "does not exist"),
    (["index", "a_file"], "is a file"),
    (["index", "no_such_dir"], "does not exist"),
    (["describe", "nope"], "unknown study"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(workspace, capsys, args, message):
    before = snapshot(workspace)
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err
    assert snapshot(workspace) == before
    assert not (workspace / "runs").exists()


def test_list_and_describe_json(capsys):
    code, out, _ = run_cli(["list", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    names = [r["study"] for r in rows]
    assert "shield" in names
    assert all(r["claim"] and r["metric"] for r in rows)
    code, out, _ = run_cli(["describe", "shield", "--json"], capsys)
    data = json.loads(out)
    keys = {f["key"]: f for f in data["config"]}
    assert keys["seeds"]["default"] < 40  # quick scale
    assert all(f["doc"] for f in data["config"]), "every config key is documented"
    code, out, _ = run_cli(["describe", "shield", "--scale", "paper", "--json"], capsys)
    keys = {f["key"]: f for f in json.loads(out)["config"]}
    assert keys["seeds"]["default"] == 40 and keys["total_steps"]["default"] == 100_000  # the essay's


def test_reproduce_dry_run_lists_the_organisms_to_train_and_writes_nothing(workspace, capsys):
    """Before hours of training, a user learns what would be trained, what is cached and how long the rest
    takes; the studies' configs are checked as in a real run, and nothing is trained or written."""
    before = snapshot(workspace)
    code, out, _ = run_cli(["reproduce", "--only", "early-exit,shield", "--dry-run", "--json",
                            "--cache-dir", "cache"], capsys)
    assert code == 0
    plan = json.loads(out)
    rows = plan["organisms"]
    variants = sorted(r["variant"] for r in rows)
    # early-exit at quick: one shared base and its safety-trained organisms; shield needs none.
    assert variants.count("base") == 1 and {"sft", "dpo", "depth-robust", "sft-late"} <= set(variants)
    assert all(r["status"] == "missing" and r["seconds_left"] > 0 for r in rows) and plan["to_train"] == len(rows)
    assert plan["one_core_seconds"] == pytest.approx(sum(r["seconds_left"] for r in rows))
    base = next(r for r in rows if r["variant"] == "base")
    assert rows[0]["variant"] == "base"  # bases train first: their variants wait on them
    assert all(r["base"] == base["hash"] for r in rows if r is not base)
    assert {s["study"]: (s["organisms"], s["to_train"]) for s in plan["studies"]} == {
        "early-exit": (len(rows), len(rows)), "shield": (0, 0)}
    assert plan["study_one_core_seconds"] == sum(s["quick_seconds"] for s in plan["studies"]) > 0
    assert snapshot(workspace) == before and not (workspace / "cache").exists() and not (workspace / "runs").exists()
    code, _, err = run_cli(["reproduce", "--dry-run", "--only", "early-exit", "--seed", "-1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "seed" in err


def test_run_dry_run_plans_one_study_with_the_users_config(workspace, capsys):
    """`run STUDY --dry-run` is the one-study plan, with the user's own --set applied; the measured study time
    belongs to the default config, so a changed config is not given it."""
    before = snapshot(workspace)
    code, out, _ = run_cli(["run", "jailbreak-transfer", "--dry-run", "--json", "--cache-dir", "cache"], capsys)
    assert code == 0
    plain = json.loads(out)
    code, out, _ = run_cli(["reproduce", "--only", "jailbreak-transfer", "--dry-run", "--json", "--cache-dir",
                            "cache"], capsys)
    assert json.loads(out) == plain and plain["study_one_core_seconds"] > 0
    code, out, _ = run_cli(["run", "jailbreak-transfer", "--dry-run", "--json", "--cache-dir", "cache",
                            "--set", "organism_seeds=2"], capsys)
    fewer = json.loads(out)
    # Five sft sources from one base, plus dpo, depth-robust, never-taught and sft-narrow (with its own base).
    assert [r["variant"] for r in plain["organisms"]].count("sft") == 6  # 5 sources + sft-narrow
    assert [r["variant"] for r in fewer["organisms"]].count("sft") == 3
    assert fewer["study_one_core_seconds"] is None and fewer["to_train"] == plain["to_train"] - 3
    assert snapshot(workspace) == before and not (workspace / "cache").exists() and not (workspace / "runs").exists()
    code, _, err = run_cli(["run", "jailbreak-transfer", "--dry-run", "--set", "gcg_steps=0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gcg_steps" in err


def test_threats_json_on_empty_folder(tmp_path, capsys):
    code, out, _ = run_cli(["threats", "--runs", str(tmp_path), "--json"], capsys)
    assert code == 0
    cov = json.loads(out)
    assert cov["n_runs"] == 0 and len(cov["silent_cells"]) == len(cov["cells"]) == 36


def test_config_keys_work_as_options():
    from safetylab.runs import parse_extra_options, resolve_config
    from safetylab.studies import get_study

    opts = parse_extra_options(["--total-steps", "2048", "--arms=shield,none", "--observe-hazards", "--seeds", "3"])
    cfg = resolve_config(get_study("shield"), overrides=opts)
    assert cfg.total_steps == 2048 and cfg.arms == ("shield", "none") and cfg.observe_hazards is True and cfg.seeds == 3


def test_a_typo_in_an_option_is_an_unknown_key(workspace, capsys):
    code, _, err = run_cli(["run", "shield", "--wokers", "2"], capsys)
    assert code == 2 and "unknown key 'wokers'" in err
    assert not (workspace / "runs").exists()
