"""A toy study on protocol v2, small enough to run in a test: Config, CLAIM, units, run_unit,
analyze (measure -> Evidence -> decide), simulate and the two record transforms.

Each seed draws a treated and a plain outcome; the claim is that treatment raises the outcome
by more than 0.2. A positive control (a planted effect of 1) and a negative one (a placebo
with none) check that the measurement can see an effect and does not invent one. Register it
for a shell with ``SAFETYLAB_STUDIES="toy=toy_study"`` (tests put this folder on PYTHONPATH).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from safetylab.claims import Claim, Contrast, Control, Evidence, NotRun, ThreatModel, decide
from safetylab.metrics.stats import mean_interval
from safetylab.study import Analysis, Calibration, Context, Study, StudyConfig, Unit


class Config(StudyConfig):
    seeds: int = Field(8, ge=1)
    """Independent replications."""
    effect: float = 0.6
    """True treated − plain difference the toy world draws."""
    noise: float = Field(0.15, ge=0)
    """Per-seed noise of each outcome."""
    placebo: bool = True
    """Run the placebo arm (its control is 'not run' without it)."""


THRESHOLD = 0.2

CLAIM = Claim(
    statement="Treatment raises the outcome by more than 0.2.",
    metric="toy/gap",
    direction="greater",
    threshold=THRESHOLD,
    contrast=Contrast(treatment=("treated",), control=("plain",), measure="treated − plain, paired by seed",
                      unit="seeds (Student t)", threshold_reason="the toy's effect worth caring about"),
    controls=(
        Control(name="planted effect is seen", kind="positive", arms=("planted",), measure="planted − plain",
                threshold=0.5, reason="an effect of 1 is planted"),
        Control(name="placebo shows none", kind="negative", arms=("placebo",), measure="placebo − plain",
                threshold=THRESHOLD, reason="the placebo has no effect by construction"),
    ),
)

THREAT_MODEL = ThreatModel(deployer="a toy", adversary="none", access="none", budget="0", protected="nothing",
                           users=("public",), tiers=("none",), assets=("users",))


def units(config: Config) -> list[Unit]:
    return [Unit(f"seed{s}", {"seed": s}) for s in range(config.seeds)]


def _draw(config: Config, effect: float, rng: np.random.Generator) -> dict:
    plain = float(rng.normal(0.0, config.noise))
    out = {"plain": plain, "treated": plain + effect + float(rng.normal(0.0, config.noise)),
           "planted": plain + 1.0 + float(rng.normal(0.0, config.noise))}
    if config.placebo:
        out["placebo"] = plain + float(rng.normal(0.0, config.noise))
    return out


def run_unit(config: Config, unit: Unit, ctx: Context) -> dict:
    return {"seed": unit.params["seed"], **_draw(config, config.effect, np.random.default_rng(ctx.seed_for(unit)))}


def _gap(results: list[dict], arm: str):
    return mean_interval([r[arm] - r["plain"] for r in results if arm in r], unit="seeds")


def analyze(config: Config, records: list[dict]) -> Analysis:
    results = [r["result"] for r in records]
    primary = _gap(results, "treated")
    evidence = Evidence(
        primary={"treated": primary} if primary.measured else {},
        controls={"planted effect is seen": _gap(results, "planted"),
                  "placebo shows none": _gap(results, "placebo") if config.placebo else NotRun("placebo=false")},
        missing="no seed finished")
    d = decide(CLAIM, evidence)
    return Analysis(verdict=d.verdict, controls=d.controls, headline=f"gap {primary}; {d.verdict.label}",
                    metrics={CLAIM.metric: primary})


def simulate(config: Config, effect: float, rng: np.random.Generator) -> list[dict]:
    return [{"key": u.key, "params": u.params, "result": {"seed": u.params["seed"], **_draw(config, effect, rng)}}
            for u in units(config)]


def null(config: Config, records: list[dict]) -> list[dict]:
    """No effect on the same seeds: the treated outcome is the plain one."""
    for r in records:
        r["result"]["treated"] = r["result"]["plain"]
    return records


def extreme(config: Config, records: list[dict]) -> list[dict]:
    """A large effect on the same seeds: the planted effect of 1 added to each seed's treated
    outcome (its own noise kept: identical differences on every seed would leave no spread to
    make an interval from)."""
    for r in records:
        r["result"]["treated"] += 1.0
    return records


STUDY = Study(name="toy", config_cls=Config, claim=CLAIM, threat_model=THREAT_MODEL, units=units, run_unit=run_unit,
              analyze=analyze, simulate=simulate, null=null, extreme=extreme,
              calibration=Calibration(null_effect=THRESHOLD, alternative_effect=0.45, power=0.8,
                                      effect="true treated − plain gap"),
              scales={"quick": {}, "paper": {"seeds": 20}}, unit_threads=1)
