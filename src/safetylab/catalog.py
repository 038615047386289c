"""Every run under a folder, as one table: ``safetylab runs [DIR]`` and ``safetylab index [DIR]``.

A run folder is recognised by its ``env.json`` or ``results.jsonl`` (``runs/<study>/<id>/``);
a combined report by a ``summary.json`` that lists runs (``runs/reproduce/<id>/``). DIR may
be the root of run folders, one study's folder, or a single run folder.

Each row says what a researcher would ask of a folder before opening it: which study,
when, at which scale and seed, the verdict with its interval, whether the run is complete,
and which config keys differ from that scale's defaults. Nothing here trusts a file to be
whole: a torn or missing ``summary.json`` makes a row ``partial`` with the reason, never a
crash. ``index.html`` is the same table as a static page that links each report and opens
offline (no scripts, nothing fetched).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from safetylab.errors import UserError
from safetylab.metrics.stats import format_interval
from safetylab.report import html_page, verdict_badge
from safetylab.results import CONFIG_FILE, ENV_FILE, RESULTS_FILE, SUMMARY_FILE, write_atomic

INDEX_FILE = "index.html"


# --------------------------------------------------------------------------- reading folders


def _read_json(path: Path) -> tuple[Any, str]:
    """``(data, "")``, or ``(None, why)`` when the file is missing or not whole JSON."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text()), ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{path.name} unreadable (torn or corrupt)"


def _started(folder: Path, env: dict[str, Any] | None) -> str | None:
    """When the run started: env.json's ``started``, else the folder's timestamp name, else its mtime."""
    if env and isinstance(env.get("started"), str):
        return env["started"]
    try:
        return _dt.datetime.strptime(folder.name[:15], "%Y%m%d-%H%M%S").isoformat()
    except ValueError:
        return _dt.datetime.fromtimestamp(folder.stat().st_mtime).isoformat(timespec="seconds")


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def config_changes(study_name: str, scale: str | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """Config keys whose value differs from ``study_name``'s defaults at ``scale`` (the seed,
    shown on its own, left out); ``None`` when the defaults cannot be known (an unknown study
    or scale)."""
    from safetylab.registry import get_study

    try:
        study = get_study(study_name)
        defaults = _normal(json.loads(study.resolve_config(scale or "quick").model_dump_json()))
    except (UserError, ValidationError):  # a study this version does not know: no baseline ("?")
        return None
    config = _normal(config)
    return {k: v for k, v in config.items() if k != "seed" and defaults.get(k, object()) != v}


def _run_row(folder: Path, root: Path) -> dict[str, Any]:
    env, env_why = _read_json(folder / ENV_FILE)
    env = env if isinstance(env, dict) else None
    summary, why = _read_json(folder / SUMMARY_FILE)
    if summary is not None and not (isinstance(summary, dict) and isinstance(summary.get("verdict"), dict)):
        summary, why = None, f"{SUMMARY_FILE} is not a run summary"
    study = (env or {}).get("study") or (summary or {}).get("study") or folder.parent.name
    row: dict[str, Any] = {
        "kind": "run",
        "study": study,
        "run_dir": str(folder),
        "path": folder.relative_to(root).as_posix() if folder != root else ".",
        "started": _started(folder, env),
        "scale": (env or {}).get("scale"),
        "seed": (env or {}).get("seed"),
        "verdict": None, "reason": None, "metric": None, "estimate": None, "ci_low": None, "ci_high": None,
        "status": "partial",
        "note": "",
        "changed": None,
        "report": None,
    }
    notes = [env_why] if env_why else []
    try:
        cfg = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        cfg = None
        notes.append(f"{CONFIG_FILE} missing or unreadable")
    if isinstance(cfg, dict):
        row["changed"] = config_changes(study, row["scale"], cfg)
        if row["seed"] is None:
            row["seed"] = cfg.get("seed")
    if row["changed"] is None and env and isinstance(env.get("overrides"), dict):
        row["changed"] = env["overrides"]  # what the user passed, when the defaults are unknown
    if summary is None:
        n = _count_lines(folder / RESULTS_FILE)
        notes.append(f"{why}; {n} unit(s) in {RESULTS_FILE}" if n is not None else why)
    else:
        v = summary["verdict"]
        row.update({k: v.get(k) for k in ("verdict", "reason", "metric", "estimate", "ci_low", "ci_high")})
        units = summary.get("units") if isinstance(summary.get("units"), dict) else {}
        failed, missing = len(units.get("failed") or []), len(units.get("missing") or [])
        if failed or missing:
            notes.append(f"{failed} failed and {missing} unfinished of {units.get('total', '?')} units")
        elif not notes:
            row["status"] = "complete"
    if (folder / "report.html").is_file():
        row["report"] = f"{row['path']}/report.html" if row["path"] != "." else "report.html"
    row["note"] = "; ".join(notes)
    return row


def _count_lines(path: Path) -> int | None:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return None


def _combined_row(folder: Path, root: Path, summary: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in summary.get("runs") or [] if isinstance(r, dict)]
    path = folder.relative_to(root).as_posix() if folder != root else "."
    return {
        "kind": "reproduce", "study": "reproduce", "run_dir": str(folder), "path": path,
        "started": _started(folder, None), "scale": summary.get("scale"), "seed": None,
        "verdict": None, "reason": None, "metric": None, "estimate": None, "ci_low": None, "ci_high": None,
        "status": "complete" if (folder / "report.html").is_file() else "partial",
        "note": f"combined report of {len(runs)} run(s)",
        "changed": {},
        "studies": [{"study": r.get("study"), "run_dir": r.get("run_dir"),
                     "verdict": (r.get("verdict") or {}).get("verdict")} for r in runs],
        "report": (f"{path}/report.html" if path != "." else "report.html") if (folder / "report.html").is_file() else None,
    }


def _kind(folder: Path) -> tuple[str, Any] | None:
    """("run", None), ("reproduce", summary) or None for a folder that is neither."""
    if (folder / ENV_FILE).is_file() or (folder / RESULTS_FILE).is_file():
        return "run", None
    summary, _ = _read_json(folder / SUMMARY_FILE)
    if isinstance(summary, dict) and isinstance(summary.get("runs"), list):
        return "reproduce", summary
    return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run and combined report at ``root``, one level or two below it, newest first.

    Raises:
        UserError: ``root`` does not exist or is a file.
    """
    if not root.exists():
        raise UserError(f"{root} does not exist; pass the folder that holds run folders (safetylab run writes to ./runs)")
    if not root.is_dir():
        raise UserError(f"{root} is a file; pass the folder that holds run folders (e.g. runs)")
    rows: list[dict[str, Any]] = []
    frontier = [root]
    for _depth in range(3):  # root itself, study folders, run folders; never inside a run
        nxt = []
        for folder in frontier:
            kind = _kind(folder)
            if kind is None:
                nxt += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            elif kind[0] == "run":
                rows.append(_run_row(folder, root))
            else:
                rows.append(_combined_row(folder, root, kind[1]))
        frontier = nxt
    rows.sort(key=lambda r: (r["started"] or "", r["path"]), reverse=True)
    return rows


# --------------------------------------------------------------------------- rendering


def verdict_text(row: dict[str, Any], *, metric: bool = True) -> str:
    """``holds: metric = 0.61 [0.40, 0.81]`` (``holds 0.61 [0.40, 0.81]`` without the metric's
    name), or ``–`` for a run without a verdict."""
    if not row.get("verdict"):
        return "–"
    ci = format_interval(row["estimate"], row["ci_low"], row["ci_high"], digits=3)
    if not row.get("metric"):
        return row["verdict"]
    return f"{row['verdict']}: {row['metric']} = {ci}" if metric else f"{row['verdict']} {ci}"


def changes_text(changed: dict[str, Any] | None) -> str:
    if changed is None:
        return "?"
    if not changed:
        return "defaults"
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in changed.items())


def when_text(started: str | None) -> str:
    return started.replace("T", " ")[:16] if started else "–"


def write_index(root: Path, rows: list[dict[str, Any]]) -> Path:
    """``root/index.html``: the rows as a static page linking each report (relative links)."""
    def link(path: str | None, text: str) -> str:
        if not path:
            return html.escape(text)
        return f"<a href='{html.escape(urllib.parse.quote(path))}'>{html.escape(text)}</a>"

    body_rows = []
    for r in rows:
        verdict = "–"
        if r.get("verdict"):
            verdict = verdict_badge(r["verdict"])
            if r.get("metric"):
                ci = format_interval(r["estimate"], r["ci_low"], r["ci_high"], digits=3)
                verdict += f"<br><code>{html.escape(r['metric'])}</code> {ci}"
        status = html.escape(r["status"]) + (f"<br><small>{html.escape(r['note'])}</small>" if r["note"] else "")
        body_rows.append(
            f"<tr><td>{link(r['report'], r['study'])}</td><td class='nowrap'>{html.escape(when_text(r['started']))}</td>"
            f"<td>{html.escape(str(r['scale'] or '–'))}</td><td>{html.escape(str(r['seed'] if r['seed'] is not None else '–'))}</td>"
            f"<td>{verdict}</td><td>{status}</td><td><code>{html.escape(changes_text(r['changed']))}</code></td>"
            f"<td>{link(r['path'] + '/', r['path'])}</td></tr>"
        )
    n_runs = sum(r["kind"] == "run" for r in rows)
    table = (
        "<div class='scroll'><table><thead><tr><th>study (report)</th><th>started</th><th>scale</th><th>seed</th>"
        "<th>verdict [95% CI]</th><th>status</th><th>config keys changed from the scale's defaults</th>"
        "<th>folder</th></tr></thead><tbody>" + "".join(body_rows) + "</tbody></table></div>"
    ) if rows else "<p>No runs yet. Start one with <code>safetylab run STUDY</code> or <code>safetylab reproduce</code>.</p>"
    body = (
        f"<h1>safetylab runs in {html.escape(str(root))}</h1>"
        f"<p>{n_runs} run(s), newest first. A run is <i>partial</i> when some units failed or never ran, or its "
        "summary is missing or unreadable; resume it with <code>safetylab run --resume FOLDER</code>. "
        "Regenerate this page with <code>safetylab index</code>.</p>" + table
    )
    path = root / INDEX_FILE
    write_atomic(path, html_page(f"safetylab runs: {root}", body))
    return path
