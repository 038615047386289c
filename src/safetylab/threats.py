"""Threat-model coverage: which cells of the essay's grid the finished runs speak to, and
where the evidence is silent (essay "The AI Threat Landscape": no claim without a threat model).

The grid is user population x adversary tier x protected asset (3 x 3 x 4 = 36 cells; see
:data:`safetylab.claims.USER_POPULATIONS`, :data:`~safetylab.claims.ADVERSARY_TIERS`,
:data:`~safetylab.claims.ASSETS`). A study declares the cells its claim is about in its
``THREAT_MODEL``; a run folder's ``summary.json`` records that declaration
(``threat_model``) and the cells the run's own config has evidence for (``evidence``).

How "covers" is computed
    A run covers the product of the users, tiers and assets in its ``evidence``
    (:meth:`safetylab.study.Study.covered_threat_model`): the declared sets, narrowed by
    the config's ``users`` / ``tiers`` / ``assets`` fields where a study has them, then by
    the study's ``evidence(config)`` hook (e.g. a config without attacks covers adversary
    tier ``none`` only). The grid places a run in the cells it covers. A run whose report
    states its verdict under a threat model with cells it does not cover is *flagged*,
    with those cells: its verdict is stated beyond its evidence.

Folders this version did not write are read, not refused: a summary without
``evidence`` is taken to cover what it declares, and one whose threat model predates the
taxonomy (no users, tiers, assets) is listed as *unplaced* with a note. A run summary with
no threat model at all, or one naming a value outside the taxonomy, is bad input
(:class:`~safetylab.errors.UserError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from safetylab.claims import ADVERSARY_TIERS, ASSET_LABELS, ASSETS, USER_POPULATIONS, ThreatModel
from safetylab.errors import UserError, pydantic_one_line

SUMMARY_FILE = "summary.json"
CELL_MEASURES_KEY = "threats/cells"
"""Optional ``metrics`` entry of a summary: ``{"user/tier/asset": {"measure", "estimate",
"ci_low", "ci_high"}}``, a study's own measurement per cell (shown beside its verdict)."""


def cell_key(user: str, tier: str, asset: str) -> str:
    return f"{user}/{tier}/{asset}"


def _summaries(root: Path) -> list[Path]:
    """summary.json of ``root`` itself, of its children and grandchildren (runs root, a
    study's folder or one run folder), never deeper."""
    found = []
    for pattern in (SUMMARY_FILE, f"*/{SUMMARY_FILE}", f"*/*/{SUMMARY_FILE}"):
        found += sorted(root.glob(pattern))
    return found


def read_run(summary_path: Path) -> dict[str, Any] | None:
    """One finished run as the grid sees it; ``None`` for a summary that is not a run's
    (a reproduce index) or is unreadable (a torn write: ``safetylab runs`` reports those).

    Raises:
        UserError: a run summary without a threat model, or one naming an unknown
            user population, adversary tier or asset.
    """
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(s, dict) or not isinstance(s.get("verdict"), dict) or "study" not in s:
        return None
    run_dir = summary_path.parent
    if not isinstance(s.get("threat_model"), dict):
        raise UserError(f"{summary_path} has no threat model, so its verdict speaks to no one; re-render it with "
                        f"'safetylab report {run_dir}' (it writes the study's threat model)")
    try:
        declared = ThreatModel.model_validate(s["threat_model"])
    except ValidationError as exc:
        raise UserError(pydantic_one_line(exc, where=f"{summary_path} threat_model")) from None
    notes = []
    evidence = s.get("evidence")
    if isinstance(evidence, dict):
        try:
            covered = declared.narrow(**{k: tuple(evidence.get(k) or ()) for k in ("users", "tiers", "assets")})
        except TypeError:
            raise UserError(f"{summary_path}: 'evidence' is not lists of users, tiers and assets; re-render it "
                            f"with 'safetylab report {run_dir}'") from None
    else:
        covered = declared
        if declared.placed:
            notes.append("summary predates evidence cells: taken to cover what it declares")
    if not declared.placed:
        notes.append(f"threat model predates the taxonomy (no users, tiers, assets); re-render with "
                     f"'safetylab report {run_dir}' to place it")
    v = s["verdict"]
    units = s.get("units") if isinstance(s.get("units"), dict) else {}
    metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
    cell_measures = metrics.get(CELL_MEASURES_KEY) if isinstance(metrics.get(CELL_MEASURES_KEY), dict) else {}
    return {
        "study": s["study"],
        "run_dir": str(run_dir),
        "verdict": v.get("verdict"),
        "reason": v.get("reason", ""),
        "metric": v.get("metric"),
        "estimate": v.get("estimate"),
        "ci_low": v.get("ci_low"),
        "ci_high": v.get("ci_high"),
        "complete": not units.get("failed") and not units.get("missing"),
        "declared": declared.cells(),
        "covered": covered.cells(),
        "over_claimed": [c for c in declared.cells() if c not in set(covered.cells())],
        "placed": declared.placed,
        "notes": notes,
        "cell_measures": cell_measures,
        "access": declared.access,
    }


def collect(root: Path) -> list[dict[str, Any]]:
    """Every finished run at or under ``root`` (oldest first by folder name)."""
    if not root.is_dir():
        return []
    runs = [r for p in _summaries(root) if (r := read_run(p)) is not None]
    return sorted(runs, key=lambda r: (Path(r["run_dir"]).name, r["run_dir"]))


def runs_of(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """The finished runs among ``run_dirs`` (the combined report's runs), in that order."""
    return [r for d in run_dirs if (r := read_run(d / SUMMARY_FILE)) is not None]


def coverage_of(runs: list[dict[str, Any]], *, source: str = "") -> dict[str, Any]:
    """The grid over ``runs``: each of the 36 cells with the runs that cover it (their verdicts
    and intervals, and the study's own per-cell measurement where it gives one), the silent
    cells, the flagged runs, and the runs that predate the taxonomy."""
    from safetylab.registry import available

    cells = []
    for asset in ASSETS:
        for user in USER_POPULATIONS:
            for tier in ADVERSARY_TIERS:
                ev = []
                for r in reversed(runs):  # newest first
                    if (user, tier, asset) in r["covered"]:
                        m = r["cell_measures"].get(cell_key(user, tier, asset))
                        ev.append({k: r[k] for k in ("study", "run_dir", "verdict", "reason", "metric", "estimate",
                                                     "ci_low", "ci_high", "complete")}
                                  | {"cell_measure": m if isinstance(m, dict) else None})
                cells.append({"user": user, "tier": tier, "asset": asset, "evidence": ev, "silent": not ev})
    flagged = [{"study": r["study"], "run_dir": r["run_dir"], "verdict": r["verdict"],
                "cells": [list(c) for c in r["over_claimed"]],
                "why": f"the report states its verdict for {len(r['over_claimed'])} cell(s) its config did not measure"}
               for r in runs if r["over_claimed"]]
    seen = {r["study"] for r in runs}
    return {
        "source": source,
        "n_runs": len(runs),
        "axes": {"users": list(USER_POPULATIONS), "tiers": list(ADVERSARY_TIERS), "assets": list(ASSETS),
                 "asset_labels": dict(ASSET_LABELS)},
        "cells": cells,
        "silent_cells": [[c["user"], c["tier"], c["asset"]] for c in cells if c["silent"]],
        "flagged": flagged,
        "unplaced": [{"study": r["study"], "run_dir": r["run_dir"], "note": "; ".join(r["notes"])}
                     for r in runs if not r["placed"]],
        "notes": [{"study": r["study"], "run_dir": r["run_dir"], "note": n} for r in runs if r["placed"]
                  for n in r["notes"]],
        "studies_without_runs": [s for s in available() if s not in seen],
    }


def coverage(runs_dir: Path) -> dict[str, Any]:
    """:func:`coverage_of` every finished run at or under ``runs_dir``."""
    return coverage_of(collect(runs_dir), source=str(runs_dir))


def cell_lines(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per study in a cell (its newest run, and how many runs): what a grid cell
    prints. Keys: study, verdict, interval (the verdict's), measure (the cell's own, or
    ``None``), n_runs."""
    from safetylab.metrics.stats import format_interval

    by_study: dict[str, list[dict[str, Any]]] = {}
    for e in cell["evidence"]:
        by_study.setdefault(e["study"], []).append(e)
    out = []
    for study, ev in by_study.items():
        e = ev[0]
        m = e["cell_measure"]
        out.append({
            "study": study, "verdict": e["verdict"], "n_runs": len(ev),
            "interval": format_interval(e["estimate"], e["ci_low"], e["ci_high"], digits=2),
            "measure": (f"{m.get('measure', 'measure')} {format_interval(m.get('estimate'), m.get('ci_low'), m.get('ci_high'), digits=2)}"
                        if m else None),
        })
    return out
