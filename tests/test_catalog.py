"""`safetylab runs` and `safetylab index`: every run in one table, partial runs named as such,
bad folders as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from report_fixtures import simulated_run
from safetylab.catalog import list_runs
from cli_fixtures import run_cli


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    simulated_run("shield", root / "shield" / "20250101-000000-aaaaaa", started="2025-01-01T00:00:00")
    torn = simulated_run("shield", root / "shield" / "20250102-000000-bbbbbb", started="2025-01-02T00:00:00")
    data = (torn / "summary.json").read_bytes()
    (torn / "summary.json").write_bytes(data[: len(data) // 2])  # a crash mid-write
    simulated_run("shield", root / "shield" / "20250103-000000-cccccc", started="2025-01-03T00:00:00", drop_last=2)
    return root


def test_every_run_listed_newest_first_with_its_state(root, capsys):
    code, out, err = run_cli(["runs", str(root), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["run_dir"][-6:] for r in rows] == ["cccccc", "bbbbbb", "aaaaaa"]
    unfinished, torn, complete = rows
    assert complete["status"] == "complete" and complete["verdict"] in {"holds", "does not hold", "inconclusive"}
    assert complete["ci_low"] <= complete["estimate"] <= complete["ci_high"]
    assert complete["scale"] == "quick" and complete["seed"] == 0
    assert torn["status"] == "partial" and "summary.json unreadable" in torn["note"] and torn["verdict"] is None
    assert unfinished["status"] == "partial" and "2 unfinished" in unfinished["note"]


def test_config_keys_that_differ_from_the_scales_defaults(tmp_path):
    run = simulated_run("shield", tmp_path / "shield" / "20250101-000000-aaaaaa")
    from safetylab.studies import get_study

    cal = get_study("shield").calibration
    changed = list_runs(tmp_path)[0]["changed"]
    assert set(changed) == {k for k in cal.overrides if k != "seed"}  # the simulator's overrides, nothing else
    assert list_runs(run)[0]["path"] == "."  # a single run folder works too


def test_table_and_index(root, capsys):
    code, out, _ = run_cli(["runs", str(root)], capsys)
    assert code == 0 and "partial" in out and "shield" in out
    code, out, _ = run_cli(["index", str(root)], capsys)
    assert code == 0
    page = (root / "index.html").read_text()
    assert page.count("href='shield/2025") >= 3 and "http" not in page


def test_empty_folder_is_a_note_not_an_error(tmp_path, capsys):
    code, out, err = run_cli(["runs", str(tmp_path)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 and "no runs" in out
    code, out, _ = run_cli(["runs", str(tmp_path), "--json"], capsys)
    assert code == 0 and json.loads(out) == []
