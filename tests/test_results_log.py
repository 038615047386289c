"""The results log: atomic appends, torn-line repair, loud failure on mid-file corruption."""

import json

import pytest

from safetylab.errors import UserError
from safetylab.results import RESULTS_VERSION, ResultsLog, dumps_line, finished_records
from safetylab.runs import parse_set_options
from safetylab.study import Context, Unit


def rec(key, status="ok", value=1.0):
    return {"version": RESULTS_VERSION, "index": 0, "key": key, "params": {}, "status": status,
            "result": {"v": value} if status == "ok" else None, "error": None if status == "ok" else "boom",
            "timing": {"elapsed_s": 0.1}}


def test_append_and_read_round_trip(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")
    log.append(rec("a"))
    log.append(rec("b", value=float("nan")))
    out = log.read()
    assert [r["key"] for r in out] == ["a", "b"]
    assert out[1]["result"]["v"] is None  # JSON has no NaN; stored as null, never as invalid JSON
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 2


def test_torn_last_line_is_repaired_on_resume(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    log = ResultsLog(path)
    log.append(rec("a"))
    with open(path, "a") as f:
        f.write('{"version": 1, "key": "b", "sta')  # the process died mid-write
    assert [r["key"] for r in log.read()] == ["a"]  # read-only: ignored, file untouched
    assert not path.read_text().endswith("\n")
    assert [r["key"] for r in log.read(repair=True)] == ["a"]
    assert path.read_text() == dumps_line(rec("a"))
    assert "torn line" in capsys.readouterr().err
    log.append(rec("b"))
    assert [r["key"] for r in log.read()] == ["a", "b"]


def test_corrupt_line_in_the_middle_is_an_error_not_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(dumps_line(rec("a")) + "garbage\n" + dumps_line(rec("c")))
    before = path.read_bytes()
    with pytest.raises(UserError, match="line 2 is corrupt"):
        ResultsLog(path).read(repair=True)
    assert path.read_bytes() == before


def test_wrong_schema_version_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    r = rec("a")
    r["version"] = 99
    path.write_text(json.dumps(r) + "\n")
    with pytest.raises(UserError, match="schema version 99"):
        ResultsLog(path).read()


def test_finished_records_take_last_success_in_unit_order():
    units = [Unit("u1"), Unit("u2"), Unit("u3")]
    records = [rec("u2", value=2.0), rec("u1", status="failed"), rec("u1", value=1.0), rec("zz")]
    out = finished_records(records, units)
    assert [r["key"] for r in out] == ["u1", "u2"]
    assert out[0]["result"] == {"v": 1.0}


def test_set_options_are_typed():
    assert parse_set_options(["seeds=8", "lr=1e-3", "arms=[none, shield]", "name=x=y", "flag=true"]) == {
        "seeds": 8, "lr": 1e-3, "arms": ["none", "shield"], "name": "x=y", "flag": True}
    with pytest.raises(UserError, match="key=value"):
        parse_set_options(["seeds"])


def test_unit_seeds_are_stable_and_distinct(tmp_path):
    ctx = Context(run_dir=tmp_path, seed=0, cache_dir=tmp_path)
    assert ctx.seed_for(Unit("a")) == ctx.seed_for("a")
    assert ctx.seed_for("a") != ctx.seed_for("b")
    assert Context(run_dir=tmp_path, seed=1, cache_dir=tmp_path).seed_for("a") != ctx.seed_for("a")
    assert 0 <= ctx.seed_for("a") < 2**31
