"""``safetylab organism``: train / list / eval / chat, and bad input as UserError."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from organism_fixtures import one_torch_thread  # noqa: F401  (autouse)
from organism_fixtures import tiny_cache_dir, tiny_organism
from safetylab.errors import UserError
from safetylab.organisms import World
from safetylab.organisms.cli import app

runner = CliRunner()


def _invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_train_prints_the_cached_folder_and_list_shows_it():
    base = tiny_organism("base")
    res = _invoke("train", "base", "--scale", "tiny", "--cache-dir", str(tiny_cache_dir()), "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(base)
    res = _invoke("list", "--cache-dir", str(tiny_cache_dir()), "--json")
    recs = json.loads(res.stdout)
    assert any(r["hash"] == base.name and r["variant"] == "base" and r["status"] == "ok" for r in recs)


def test_eval_prints_grading_table_and_bars():
    base = tiny_organism("base")
    res = _invoke("eval", str(base), "--n", "30", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["variant"] == "base" and out["metrics"]["benign/correct"]["n"] == 30
    assert {b["bar"] for b in out["bars"]} == {"benign_correct", "harmful_correct"}
    assert (base / "eval_heldout_n30_s0.json").is_file()  # cached next to the weights
    res = _invoke("eval", str(tiny_organism("sft")), "--n", "30")
    assert res.exit_code == 0, res.output
    assert "forbidden/refusal" in res.output and "quality bars" in res.output
    assert "benign_correct drop vs base" in res.output  # base found in the same cache


def test_chat_answers_one_request_per_line():
    path = tiny_organism("sft")
    world = World.from_organism(path)
    hz = world.eval_requests("forbidden", n=1)[0]
    dish = world.eval_requests("lookalike", n=1)[0]
    res = _invoke("chat", str(path), input=f"{hz.text}\n\n{dish.text}\n")
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 2
    assert world.grade(hz, lines[0]).refused
    assert world.grade(dish, lines[1]).benign_correct


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "rlhf", "--scale", "tiny"], "unknown organism variant 'rlhf'"),
        (["train", "base", "--scale", "giant"], "unknown organism scale 'giant'"),
        (["train", "base", "--scale", "tiny", "--layers", "0"], "--layers=0 is impossible"),
        (["train", "base", "--scale", "tiny", "--width", "64", "--heads", "5"], "does not divide"),
        (["eval", "/no/such/organism"], "does not exist"),
        (["chat", "/no/such/organism"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_user_error(args, message, tmp_path):
    res = _invoke(*args, "--cache-dir", str(tmp_path)) if args[0] == "train" else _invoke(*args)
    assert isinstance(res.exception, UserError), res.output
    assert message in str(res.exception)
    assert "\n" not in str(res.exception)


def test_a_folder_that_is_not_an_organism_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    res = _invoke("eval", str(tmp_path))
    assert isinstance(res.exception, UserError)
    assert "not a complete organism" in str(res.exception)


def test_standalone_entry_point_exits_2_with_one_line(capsys, monkeypatch):
    from safetylab.organisms import cli

    monkeypatch.setattr("sys.argv", ["organism", "eval", "/no/such/organism"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: organism path /no/such/organism does not exist") and "\n" not in err
