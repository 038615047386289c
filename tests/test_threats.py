"""The threat-model taxonomy (user x adversary x asset) and `safetylab threats`' grid."""

from __future__ import annotations

import pytest

from safetylab.claims import ADVERSARY_TIERS, ASSETS, USER_POPULATIONS, ThreatModel
from safetylab.studies import available, get_study

BASE = dict(deployer="d", adversary="a", access="black-box", budget="b", protected="p")


def test_taxonomy_fields_are_canonical_sets():
    tm = ThreatModel(**BASE, users=("experts", "public", "public"), tiers=("casual",), assets=("model", "users"))
    assert tm.users == ("public", "experts") and tm.assets == ("users", "model")
    assert tm.cells() == [("public", "casual", "users"), ("experts", "casual", "users"),
                          ("public", "casual", "model"), ("experts", "casual", "model")]
    assert tm.narrow(assets=["model", "society"]).cells() == [("public", "casual", "model"),
                                                            ("experts", "casual", "model")]
    assert not ThreatModel(**BASE).placed and ThreatModel(**BASE).cells() == []


@pytest.mark.parametrize("field, value", [("users", "everyone"), ("tiers", "nation-state"), ("assets", "profits")])
def test_unknown_taxonomy_value_is_rejected(field, value):
    kw = {"users": ("public",), "tiers": ("casual",), "assets": ("users",), field: (value,)}
    with pytest.raises(ValueError, match=field):
        ThreatModel(**BASE, **kw)


def test_a_partial_placement_or_an_attacker_without_access_is_rejected():
    with pytest.raises(ValueError, match="not tiers"):
        ThreatModel(**BASE, users=("public",), assets=("users",))
    with pytest.raises(ValueError, match="access='none'"):
        ThreatModel(**{**BASE, "access": "none"}, users=("public",), tiers=("casual",), assets=("users",))


def test_taxonomy_sizes():
    assert len(USER_POPULATIONS) * len(ADVERSARY_TIERS) * len(ASSETS) == 36


# --------------------------------------------------------------------------- the grid over run folders
import dataclasses  # noqa: E402
import json  # noqa: E402

from cli_fixtures import run_cli  # noqa: E402
from report_fixtures import simulated_run  # noqa: E402

from safetylab.report import render_combined, render_run  # noqa: E402
from safetylab.results import load_run  # noqa: E402
from safetylab.threats import coverage  # noqa: E402


def test_every_registered_study_places_itself_in_the_grid():
    unplaced = [s for s in available() if not get_study(s).threat_model.placed]
    assert not unplaced, f"THREAT_MODEL without users/tiers/assets: {unplaced}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    simulated_run("shield", root / "shield" / "20250102-030405-a")
    return root


def _cells(cov):
    return {(c["user"], c["tier"], c["asset"]): c for c in cov["cells"]}


def test_grid_places_a_run_in_its_cells_and_names_the_silent_ones(runs, capsys):
    cov = coverage(runs)
    cells = _cells(cov)
    ev = cells[("enterprise", "none", "users")]["evidence"]
    assert [e["study"] for e in ev] == ["shield"] and ev[0]["ci_low"] is not None
    assert len(cov["silent_cells"]) == 35 and not cov["flagged"] and not cov["unplaced"]
    code, out, _ = run_cli(["threats", "--runs", str(runs)], capsys)
    assert code == 0 and "1 of 36 cells" in out and "silent" in out and "shield: " in out
    code, out, _ = run_cli(["threats", "--runs", str(runs), "--json"], capsys)
    assert code == 0 and json.loads(out)["n_runs"] == 1


def test_a_verdict_stated_beyond_the_evidence_is_flagged(runs, tmp_path):
    run = simulated_run("shield", tmp_path / "shield" / "20250102-030405-b")
    study, config, env = load_run(run)
    # A config that ran no adversary-free arm would cover nothing of what shield declares.
    narrowed = dataclasses.replace(study, evidence=lambda c: study.threat_model.narrow(tiers=()))
    render_run(run, study=narrowed, config=config, env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evidence"]["tiers"] == []
    assert "Flagged: the verdict is stated for 1 cell(s)" in (run / "report.md").read_text()
    cov = coverage(tmp_path)
    assert cov["flagged"] and cov["flagged"][0]["cells"] == [["enterprise", "none", "users"]]
    assert _cells(cov)[("enterprise", "none", "users")]["silent"]


def test_old_folders_load_with_a_note_and_bad_ones_are_one_line(runs, tmp_path, capsys):
    run = simulated_run("shield", tmp_path / "shield" / "20250102-030405-c")
    path = run / "summary.json"
    summary = json.loads(path.read_text())
    old = {**summary, "threat_model": {k: v for k, v in summary["threat_model"].items()
                                       if k not in ("users", "tiers", "assets")}}
    old.pop("evidence")
    path.write_text(json.dumps(old))
    code, out, err = run_cli(["threats", "--runs", str(tmp_path)], capsys)
    assert code == 0 and "predates the taxonomy" in out and "0 of 36" in out
    path.write_text(json.dumps({**summary, "threat_model": {**summary["threat_model"], "tiers": ["nation-state"]}}))
    code, out, err = run_cli(["threats", "--runs", str(tmp_path)], capsys)
    assert code == 2 and "tiers" in err and len(err.strip().splitlines()) == 1 and not out
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "threat_model"}))
    code, out, err = run_cli(["threats", "--runs", str(tmp_path), "--json"], capsys)
    assert code == 2 and "has no threat model" in err and len(err.strip().splitlines()) == 1 and not out


def test_combined_report_shows_the_grid(runs, tmp_path):
    page = render_combined([runs / "shield" / "20250102-030405-a"], tmp_path / "reproduce", "quick").read_text()
    assert "id='threats'" in page and "Protecting the model from users" in page and page.count(">silent<") == 35


def test_a_study_whose_threat_model_names_an_unknown_tier_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "badtier_study.py").write_text(
        "import dataclasses\n"
        "from safetylab.claims import ThreatModel\n"
        "from safetylab.studies.shield import STUDY as _S\n"
        "TM = ThreatModel(deployer='d', adversary='a', access='black-box', budget='b', protected='p',\n"
        "                 users=('public',), tiers=('nation-state',), assets=('users',))\n"
        "STUDY = dataclasses.replace(_S, name='badtier', threat_model=TM)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SAFETYLAB_STUDIES", "badtier=badtier_study")
    code, out, err = run_cli(["describe", "badtier"], capsys)
    assert code == 2 and "tiers" in err and "badtier" in err and len(err.strip().splitlines()) == 1
