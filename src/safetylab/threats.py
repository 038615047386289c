"""Threat-model coverage: which (study, adversary access) cells the finished runs
speak to, and where the evidence is silent (essay 10: no claim without a threat model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetylab.claims import ACCESS_LEVELS
from safetylab.studies import available


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    """Every finished run under ``runs_dir`` (one with a readable summary.json), oldest first."""
    out = []
    if not runs_dir.is_dir():
        return out
    for summary_path in sorted(runs_dir.glob("*/*/summary.json")):
        try:
            s = json.loads(summary_path.read_text())
            out.append(
                {
                    "study": s["study"],
                    "run_dir": str(summary_path.parent),
                    "verdict": s["verdict"]["verdict"],
                    "metric": s["verdict"]["metric"],
                    "estimate": s["verdict"]["estimate"],
                    "ci_low": s["verdict"]["ci_low"],
                    "ci_high": s["verdict"]["ci_high"],
                    "threat_model": s["threat_model"],
                    "complete": not s["units"]["failed"] and not s["units"]["missing"],
                }
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue  # not a finished safetylab run (e.g. a reproduce index); nothing to cover
    return out


def coverage(runs_dir: Path) -> dict[str, Any]:
    """The grid: rows are studies, columns access levels; each cell the latest verdict
    of the runs whose threat model has that access, or ``None`` where nothing speaks."""
    runs = collect(runs_dir)
    studies = list(dict.fromkeys([*available(), *(r["study"] for r in runs)]))
    grid: dict[str, dict[str, Any]] = {s: {a: None for a in ACCESS_LEVELS} for s in studies}
    for r in runs:
        access = r["threat_model"]["access"]
        grid[r["study"]][access] = {
            "verdict": r["verdict"],
            "runs": (grid[r["study"]][access] or {}).get("runs", 0) + 1,
            "latest": r["run_dir"],
            "adversary": r["threat_model"]["adversary"],
            "protected": r["threat_model"]["protected"],
        }
    silent_access = [a for a in ACCESS_LEVELS if all(grid[s][a] is None for s in studies)]
    no_runs = [s for s in studies if all(v is None for v in grid[s].values())]
    return {
        "runs_dir": str(runs_dir),
        "access_levels": list(ACCESS_LEVELS),
        "grid": grid,
        "n_runs": len(runs),
        "silent_access_levels": silent_access,
        "studies_without_runs": no_runs,
    }
