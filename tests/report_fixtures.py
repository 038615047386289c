"""Run folders written from a study's simulator: real analyses, tables and plots in seconds,
for tests of what is rendered from a run (reports, the run index) rather than of the study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from safetylab.report import render_run
from safetylab.results import CONFIG_FILE, ENV_FILE, RESULTS_FILE, RESULTS_VERSION, ResultsLog
from safetylab.runs import config_to_dict
from safetylab.studies import get_study


def simulated_run(study_name: str, run_dir: Path, *, effect: str = "alternative", seed: int = 0,
                  drop_last: int = 0, started: str = "2025-01-02T03:04:05") -> Path:
    """A run folder of ``study_name`` whose results come from its simulator, rendered.

    Args:
        effect: "alternative" or "null" (the study's calibration effects).
        drop_last: leave this many units unfinished (a partial run).
    """
    study = get_study(study_name)
    cal = study.calibration
    config = study.resolve_config(cal.scale, cal.overrides)
    records = study.simulate(config, cal.alternative_effect if effect == "alternative" else cal.null_effect,
                             np.random.default_rng(seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    env = {"study": study.name, "scale": cal.scale, "seed": config.seed, "argv": ["simulated"],
           "overrides": dict(cal.overrides), "executor": "local", "workers": 1, "started": started,
           "device": "cpu", "git": {"commit": None, "dirty": None}, "packages": {}}
    (run_dir / ENV_FILE).write_text(json.dumps(env, indent=2))
    log = ResultsLog(run_dir / RESULTS_FILE)
    log.path.touch()
    keep = records[: len(records) - drop_last]
    for i, r in enumerate(keep):
        log.append({"version": RESULTS_VERSION, "index": i, "key": r["key"], "params": r["params"],
                    "status": "ok", "result": r["result"], "error": None, "timing": {"elapsed_s": 0.0}})
    render_run(run_dir)
    return run_dir
