"""Every registered study's decision rule is calibrated on its own simulator.

``safetylab calibrate`` at a small N: the rule's false-holds estimate at the null (true effect
on the threshold) is at most 5%, and its power interval reaches the declared power at the
alternative. A calibration verdict needs 400 draws (``safetylab calibrate STUDY --n 400``,
run for every study before a release); the suite's N keeps it to minutes, so it checks the
same two rates without claiming the verdict.
"""

import json
import subprocess
import sys

import pytest
from cli_fixtures import run_cli

from safetylab.calibrate import calibrate
from safetylab.studies import REGISTRY, get_study

N_TEST = 80


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_study_is_calibrated(name):
    study = get_study(name)
    assert study.simulate is not None and study.calibration is not None, f"{name} has no simulator"
    res = calibrate(study, N_TEST, seed=1)
    null, alt = res["null"], res["alternative"]
    # Observed false holds at the null: the estimate itself at most 5%.
    assert null["ok"] and null["holds_rate"] <= 0.05, \
        f"{name}: says 'holds' in {null['holds_rate']:.1%} of runs at the null {null}"
    # The simulator's controls behave as designed, so the verdict is the contrast's.
    assert alt["ok"], f"{name}: power {alt['holds_rate']:.1%} below declared {alt['declared_power']:.0%}"
    assert not res["calibrated"] and not res["enough_draws"]  # N_TEST < 400: no calibration verdict


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "safetylab.cli", *args], capture_output=True, text=True)


def test_calibrate_cli_json_and_table():
    name = next(iter(REGISTRY))
    out = _cli("calibrate", name, "--n", "20", "--json")
    assert out.returncode in (0, 1), out.stderr
    res = json.loads(out.stdout)
    assert res["study"] == name and res["n"] == 20
    assert sum(res["null"]["verdicts"].values()) == 20


def test_calibrate_without_simulator_is_one_line_exit_2(tmp_path, monkeypatch):
    mod = tmp_path / "nosim_study.py"
    mod.write_text(
        "from safetylab.studies.shield import STUDY as _S\n"
        "import dataclasses\n"
        "STUDY = dataclasses.replace(_S, name='nosim', simulate=None, calibration=None)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("SAFETYLAB_STUDIES", "nosim=nosim_study")
    out = _cli("calibrate", "nosim", "--n", "5")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no simulator" in lines[0]


def test_the_power_curve_rises_from_the_threshold_to_the_alternative(capsys):
    """--effects adds a row per true effect: power between the threshold and the alternative, where the design's
    resolution shows. It grows with the effect, and the calibration verdict is unchanged by it."""
    study = get_study("jailbreak-transfer")
    cal = study.calibration
    between = [cal.null_effect + f * (cal.alternative_effect - cal.null_effect) for f in (0.3, 0.7)]
    res = calibrate(study, 20, seed=2, effects=between)
    rates = [res["null"]["holds_rate"], *(r["holds_rate"] for r in res["curve"]), res["alternative"]["holds_rate"]]
    assert [r["effect"] for r in res["curve"]] == between
    assert rates == sorted(rates) and rates[-1] > rates[0]
    plain = calibrate(study, 20, seed=2)  # the curve draws its own streams: the null and alternative are untouched
    assert all(res[k] == plain[k] for k in ("null", "alternative", "calibrated"))
    code, out, err = run_cli(["calibrate", "jailbreak-transfer", "--n", "10", "--effects", "0.2,0.3", "--json"], capsys)
    assert code in (0, 1), err
    assert [(r["effect"], sum(r["verdicts"].values())) for r in json.loads(out)["curve"]] == [(0.2, 10), (0.3, 10)]


@pytest.mark.parametrize("args", [["--effects", "0.2,big"], ["--effects", "0.2", "--against", "."]])
def test_bad_effects_are_one_line_exit_2(args, capsys):
    code, _, err = run_cli(["calibrate", "jailbreak-transfer", *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--effects" in lines[0]


def test_false_does_not_hold_at_the_null_is_reported_and_flagged(capsys, monkeypatch):
    """The mirror of false holds: how often a run whose true effect sits on the threshold is called below it.
    Reported with its interval beside the verdict; a rule that over-calls it is flagged in the table."""
    import toy_study

    res = calibrate(toy_study.STUDY, 60, seed=0)
    null = res["null"]
    assert null["does_not_hold_rate"] == null["verdicts"]["does not hold"] / 60
    lo, hi = null["does_not_hold_ci"]
    assert lo <= null["does_not_hold_rate"] <= hi and null["does_not_hold_ok"] == (null["does_not_hold_rate"] <= 0.05)
    # A rule biased low (every simulated treatment loses 0.3) says 'does not hold' at the null and is flagged.
    from dataclasses import replace

    import safetylab.registry as registry

    biased = replace(toy_study.STUDY, simulate=lambda c, e, rng: toy_study.simulate(c, e - 0.3, rng))
    monkeypatch.setattr(registry, "get_study", lambda name: biased)
    code, out, err = run_cli(["calibrate", "toy", "--n", "30"], capsys)
    assert "false 'does not hold' at the null" in out and "over-called" in out, out + err
