"""Reports: from raw results to ``summary.json``, ``report.md`` and ``report.html``.

``render_run(run_dir)`` needs nothing but the run folder: it re-reads the config,
the environment and the raw results, asks the study to analyse and plot them, and
writes the verdict first, then controls, the primary contrast and the threat model,
then tables, findings, figures, setup notes and provenance.

The HTML is one self-contained file (plots embedded, no scripts, nothing fetched) that
reads well in a browser at any width: wide tables scroll inside their own box, matrices
are drawn as annotated heatmaps (:mod:`safetylab.heatmap`; the numbers stay in report.md
and summary.json), tables longer than :data:`LONG_TABLE_ROWS` rows are folded under the
figures, every image has alt text, and the combined report opens with a table of contents
that carries each study's verdict.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from safetylab.audit import audit_lines, audit_records
from safetylab.claims import Verdict
from safetylab.heatmap import Matrix, heatmap_svg, matrix_of
from safetylab.metrics.stats import format_interval
from safetylab.results import (
    ENV_FILE, RESULTS_FILE, SUMMARY_FILE, ResultsLog, finished_records, json_safe, load_run, write_atomic,
)
from safetylab.study import Analysis, Figure, Study, StudyConfig

SUMMARY_VERSION = 4
"""2: verdicts carry contrast_verdict, reason and unit; summaries carry controls and contrast.
Tables carry ``kind`` ("table" or "matrix"), an addition readers ``.get`` (absent: "table").
3: threat models carry users, tiers and assets; summaries carry ``evidence``, the cells the
run's config measured (readers ``.get`` both: older summaries lack them).
4 (protocol v2): verdicts carry se, df and arm; summaries carry ``audit``, the verdicts of the
study's null and extreme record transforms (:mod:`safetylab.audit`; ``None`` when the study
declares none or the run has no records)."""

_VERDICT_COLOURS = {
    Verdict.HOLDS.value: "#1b7f3b",
    Verdict.DOES_NOT_HOLD.value: "#b3261e",
    Verdict.INCONCLUSIVE.value: "#8a6d00",
}


def render_run(
    run_dir: Path,
    *,
    study: Study | None = None,
    config: StudyConfig | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Analyse the raw results of ``run_dir`` and (re)write its summary and reports."""
    if study is None or config is None or env is None:
        study, config, env = load_run(run_dir)
    records_all = ResultsLog(run_dir / RESULTS_FILE).read(repair=False)
    units = study.units(config)
    records = finished_records(records_all, units)
    ok_keys = {r["key"] for r in records}
    failed = sorted({r["key"] for r in records_all if r["status"] != "ok"} - ok_keys)
    missing = [u.key for u in units if u.key not in ok_keys and u.key not in failed]

    from threadpoolctl import threadpool_limits

    # Analyses are many small matrix products: multithreaded BLAS only adds overhead (50 ms
    # instead of 0.4 ms per linear CKA on 2 busy cores).
    with threadpool_limits(limits=1):
        analysis = study.analyze(config, records)
        audit = audit_records(study, config, records, analysis.verdict) if records and study.null and study.extreme else None
        figures: list[Figure] = []
        if study.plots is not None and records:
            figures = study.plots(config, records, analysis, run_dir)

    summary = {
        "version": SUMMARY_VERSION,
        "study": study.name,
        "claim": study.claim.model_dump(mode="json"),
        "threat_model": study.threat_model.model_dump(mode="json"),
        "evidence": _evidence(study, config),
        "verdict": analysis.verdict.model_dump(mode="json"),
        "headline": analysis.headline,
        "controls": [c.model_dump(mode="json") for c in analysis.controls],
        "contrast": analysis.contrast,
        "audit": audit,
        "metrics": analysis.metrics,
        "tables": [t.model_dump(mode="json") for t in analysis.tables],
        "findings": analysis.findings,
        "setup_notes": analysis.setup_notes,
        "figures": [f.model_dump(mode="json") for f in figures],
        "units": {"total": len(units), "finished": len(records), "failed": failed, "missing": missing},
    }
    summary = json_safe(summary)
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    write_atomic(run_dir / "report.md", markdown_report(summary, env, run_dir))
    write_atomic(run_dir / "report.html", html_page(f"safetylab: {study.name}", html_section(summary, env, run_dir)))
    return summary


def _pct(confidence: float) -> str:
    """A confidence level as the interval method states it: 95, but 98.75 (a Bonferroni level) is 98.8, not 99."""
    pct = 100 * confidence
    return f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:.1f}"


def _evidence(study: Study, config: StudyConfig) -> dict[str, list[str]]:
    covered = study.covered_threat_model(config)
    return {"users": list(covered.users), "tiers": list(covered.tiers), "assets": list(covered.assets)}


def _taxonomy_lines(summary: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """(label, text) pairs placing the threat model in the essay's grid, and a warning when
    the verdict is stated for cells the run's evidence does not cover ("" when none)."""
    from safetylab.claims import ASSET_LABELS

    tm = summary["threat_model"]
    if not tm.get("users"):
        return [("Cells", "not placed in the taxonomy (written before it; re-render with 'safetylab report')")], ""
    lines = [("Users", ", ".join(tm["users"])), ("Adversary tiers", ", ".join(tm["tiers"])),
             ("Assets", "; ".join(ASSET_LABELS.get(a, a) for a in tm["assets"]))]
    ev = summary.get("evidence")
    if not isinstance(ev, dict):
        return lines, ""
    declared = {(u, t, a) for u in tm["users"] for t in tm["tiers"] for a in tm["assets"]}
    covered = {(u, t, a) for u in ev.get("users") or [] for t in ev.get("tiers") or [] for a in ev.get("assets") or []}
    beyond = sorted(declared - covered)
    if not beyond:
        return lines, ""
    lines.append(("This run measured", f"users {', '.join(ev.get('users') or []) or 'none'}; tiers "
                  f"{', '.join(ev.get('tiers') or []) or 'none'}; assets {', '.join(ev.get('assets') or []) or 'none'}"))
    shown = ", ".join("/".join(c) for c in beyond[:6]) + (f" and {len(beyond) - 6} more" if len(beyond) > 6 else "")
    return lines, (f"Flagged: the verdict is stated for {len(beyond)} cell(s) this run's config did not measure "
                   f"({shown}); it speaks only to the cells above.")


# --------------------------------------------------------------------------- markdown


def _verdict_line(v: dict[str, Any]) -> str:
    ci = format_interval(v["estimate"], v["ci_low"], v["ci_high"], digits=3)
    cmp = ">" if v["direction"] == "greater" else "<"
    pct = _pct(v["confidence"])
    why = f" ({v['reason']})" if v.get("reason") else ""
    return (
        f"**{v['verdict'].upper()}**{why} — `{v['metric']}` = {ci} ({pct}% interval, {v['interval_method']}, "
        f"n = {v['n']}); the claim needs {cmp} {v['threshold']:g}"
    )


AUDIT_TITLE = "Could this verdict have come out the other way?"

_CONTROL_MARK = {"pass": "pass", "fail": "FAIL", "not run": "not run"}


def _control_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per declared control: kind, what it checks, status, interval, detail."""
    declared = {c["name"]: c for c in summary["claim"].get("controls") or []}
    rows = []
    for c in summary.get("controls") or []:
        d = declared.get(c["name"], {})
        need = (f"> {c['threshold']:g}" if c["kind"] == "positive" else f"not > {c['threshold']:g}") \
            if c.get("threshold") is not None else "–"
        rows.append([c["name"], c["kind"], d.get("measure", ""), need, _CONTROL_MARK[c["status"]],
                     format_interval(c.get("estimate"), c.get("ci_low"), c.get("ci_high"), digits=3)
                     if c.get("estimate") is not None else "–", c.get("detail", "")])
    return rows


_CONTROL_COLUMNS = ["control", "kind", "measure", "must be", "status", "estimate [95% CI]", "detail"]


def _contrast_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) pairs describing the primary contrast, from the claim and the analysis."""
    c = summary["claim"].get("contrast")
    if not c:
        return []
    v = summary["verdict"]
    arms = ", ".join(c["treatment"]) + (f" vs {', '.join(c['control'])}" if c.get("control") else "")
    out = [("Arms", arms), ("Measure", c["measure"]), ("Unit of replication", c["unit"]),
           ("Threshold", f"{v['threshold']:g}: {c['threshold_reason']}")]
    if c.get("multiplicity") == "holm":
        out.append(("Multiplicity", "at least one of the treatment arms: every arm's interval at the Bonferroni "
                                    "level 1 − 0.05/k (Holm's first step), the arm with the strongest evidence "
                                    "decides" + (f" (here: {v['arm']})" if v.get("arm") else "")))
    if v.get("contrast_verdict"):
        out.append(("The contrast alone says", v["contrast_verdict"]))
    if summary.get("contrast"):
        out.append(("Result", summary["contrast"]))
    return out


def _md_table(table: dict[str, Any]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "–" if not math.isfinite(x) else f"{x:.3g}"
        return "–" if x is None else str(x).replace("|", "\\|")

    lines = [f"### {table['title']}", ""]
    lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in table["columns"]) + " |")
    lines.append("|" + "---|" * len(table["columns"]))
    for row in table["rows"]:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    if table.get("caption"):
        lines += ["", f"_{table['caption']}_"]
    return "\n".join(lines) + "\n"


def markdown_report(summary: dict[str, Any], env: dict[str, Any], run_dir: Path) -> str:
    tm = summary["threat_model"]
    claim = summary["claim"]
    out = [
        f"# {summary['study']}",
        "",
        f"> **Claim.** {claim['statement']}",
        "",
        f"**Verdict:** {_verdict_line(summary['verdict'])}",
        "",
        summary["headline"],
        "",
    ]
    control_rows = _control_rows(summary)
    if control_rows:
        out += ["## Controls (validity checks; a failed or missing one makes the verdict inconclusive)", "",
                _md_table({"title": "", "columns": _CONTROL_COLUMNS, "rows": control_rows}).split("\n", 2)[2]]
    contrast = _contrast_lines(summary)
    if contrast:
        out += ["## Primary contrast", ""] + [f"- **{k}:** {t}" for k, t in contrast] + [""]
    if summary.get("audit"):
        out += [f"## {AUDIT_TITLE}", ""] + [f"- {t}" for _, t in audit_lines(summary["audit"])] + [""]
    out += [
        "## Threat model",
        "",
        f"- **Deployer:** {tm['deployer']}",
        f"- **Adversary:** {tm['adversary']} (access: {tm['access']}; budget: {tm['budget']})",
        f"- **Protected:** {tm['protected']}",
    ]
    if tm.get("out_of_scope"):
        out.append(f"- **Says nothing about:** {'; '.join(tm['out_of_scope'])}")
    cells, flag = _taxonomy_lines(summary)
    out += [f"- **{k}:** {t}" for k, t in cells]
    if flag:
        out += ["", f"**{flag}**"]
    units = summary["units"]
    if units["failed"] or units["missing"]:
        out += ["", f"**Incomplete run:** {len(units['failed'])} failed and {len(units['missing'])} unfinished "
                f"of {units['total']} units; resume it with `safetylab run --resume {run_dir}`."]
    out += ["", "## Results", ""]
    for t in summary["tables"]:
        out.append(_md_table(t))
    if summary["findings"]:
        out += ["## Findings", ""] + [f"- {f}" for f in summary["findings"]] + [""]
    if summary["setup_notes"]:
        out += ["## Setup choices (where the essay is silent)", ""] + [f"- {n}" for n in summary["setup_notes"]] + [""]
    if summary["figures"]:
        out += ["## Figures", ""]
        for f in summary["figures"]:
            out += [f"![{f['caption']}]({f['path']})", "", f"_{f['caption']}_", ""]
    out += ["## Provenance", "", _provenance_md(env), ""]
    return "\n".join(out)


def _provenance_md(env: dict[str, Any]) -> str:
    git = env.get("git") or {}
    pk = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    dirty = " (dirty)" if git.get("dirty") else ""
    return (
        f"scale `{env.get('scale')}`, seed {env.get('seed')}, executor {env.get('executor')} × {env.get('workers')}, "
        f"device {env.get('device')}; git {git.get('commit') or 'unknown'}{dirty}; python {env.get('python')}; {versions}. "
        f"Command: `{' '.join(env.get('argv') or [])}`"
    )


# --------------------------------------------------------------------------- html

LONG_TABLE_ROWS = 12
"""Tables with more rows than this (per setting, per seed) are folded under the figures."""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.claim{font-size:1.05em;border-left:4px solid #999;padding:.3em .8em;background:#f7f7f7}
.verdict{color:#fff;padding:.7em 1em;border-radius:6px;margin:1em 0;font-size:1.05em}
.verdict b{font-size:1.2em;letter-spacing:.03em}
.threat{border:2px solid #444;border-radius:6px;padding:.6em 1em;background:#fcfcfc}
dl.threat-list,dl.contrast{display:grid;grid-template-columns:minmax(8em,max-content) minmax(0,1fr);gap:.25em 1em}
dl.threat-list dt,dl.contrast dt{font-weight:600} dl.threat-list dd,dl.contrast dd{margin:0}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0 1.2em}
table{border-collapse:collapse;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0} .tcap{font-style:italic;color:#555;margin:-.9em 0 1.2em;font-size:.92em}
figure{margin:1em 0} figure img{max-width:100%;height:auto} figcaption{color:#444;font-style:italic}
figure.matrix{display:inline-block;vertical-align:top;margin:.5em 2em 1em 0;max-width:100%}
details{margin:.4em 0 1em} summary{cursor:pointer}
code,dd,.claim,.verdict,.prov,li{overflow-wrap:anywhere} .nowrap{white-space:nowrap}
.prov{font-size:.8em;color:#555} .warn{background:#fff3cd;padding:.5em 1em;border-radius:4px}
.badge{display:inline-block;color:#fff;border-radius:1em;padding:0 .6em;font-size:.85em;font-weight:600;white-space:nowrap}
nav.sections a{margin-right:1em;white-space:nowrap}
nav.toc ol{padding-left:1.4em} nav.toc li{margin:.35em 0} nav.toc .sub{font-size:.85em}
nav.toc .sub a{margin-right:.8em;white-space:nowrap} .toplink{font-size:.85em}
"""


def html_page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}"
        f"<p class='prov'>Written by safetylab on {_dt.date.today().isoformat()}.</p></body></html>\n"
    )


def _cell_html(x: Any) -> str:
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3g}"
    return "–" if x is None else html.escape(str(x))


def _anchor(name: str) -> str:
    """An HTML id from a study name: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "section"


def verdict_badge(verdict: str) -> str:
    colour = _VERDICT_COLOURS.get(verdict, "#555")
    return f"<span class='badge' style='background:{colour}'>{html.escape(verdict)}</span>"


_NUMERIC_CELL = re.compile(r"^[-+−–]?\.?\d[^\s]*( \[[^\]]*\])?( \(.*\))?$")


def _td(x: Any) -> str:
    # A number or "0.48 [0.23, 0.74]" is read whole: it never breaks across lines (the table
    # scrolls in its box instead); prose wraps.
    text = _cell_html(x)
    keep = isinstance(x, (int, float)) or (isinstance(x, str) and len(x) <= 32 and _NUMERIC_CELL.match(x))
    return f"<td class='nowrap'>{text}</td>" if keep else f"<td>{text}</td>"


def _table_html(t: dict[str, Any]) -> str:
    """A table in its own horizontally scrolling box, so a wide one never widens the page."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t["columns"])
    rows = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in t["rows"])
    # The caption sits outside the scrolling box, so it wraps to the page, not to the table.
    cap = f"<p class='tcap'>{html.escape(t['caption'])}</p>" if t.get("caption") else ""
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>{cap}"


def _matrix_html(t: dict[str, Any], m: Matrix) -> str:
    """An annotated heatmap, its caption, and the numbers as a table folded beneath."""
    cap = f" {html.escape(t['caption'])}" if t.get("caption") else ""
    svg, width = heatmap_svg(m)
    # As wide as the heatmap (its caption wraps to it), so small matrices sit side by side.
    return (
        f"<figure class='matrix' style='width:{max(width, 320)}px'>"
        f"<figcaption><b>{html.escape(t['title'])}</b>{cap}</figcaption><div class='scroll'>{svg}</div>"
        f"<details><summary>the numbers as a table</summary>{_table_html({**t, 'caption': ''})}</details></figure>"
    )


def _sections(summary: dict[str, Any], env: dict[str, Any], run_dir: Path, h2: str,
              anchor: str) -> list[tuple[str, str, str]]:
    """The report's sections after the verdict, in order, as ``(id, label, html)``."""
    out: list[tuple[str, str, str]] = []

    def add(key: str, label: str, body: str) -> None:
        if body:
            sid = f"{anchor}-{key}"
            out.append((sid, label, f"<{h2} id='{sid}'>{html.escape(label)}</{h2}>{body}"))

    add("controls", "Controls", _controls_html(summary))
    add("contrast", "Primary contrast", _contrast_html(summary))
    if summary.get("audit"):
        add("audit", AUDIT_TITLE, "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for _, t in
                                                   audit_lines(summary["audit"])) + "</ul>")
    tm = summary["threat_model"]
    cells, flag = _taxonomy_lines(summary)
    threat = (
        f"<div class='threat'><dl class='threat-list'>"
        f"<dt>Deployer</dt><dd>{html.escape(tm['deployer'])}</dd>"
        f"<dt>Adversary</dt><dd>{html.escape(tm['adversary'])}</dd>"
        f"<dt>Access</dt><dd>{html.escape(tm['access'])}</dd>"
        f"<dt>Budget</dt><dd>{html.escape(tm['budget'])}</dd>"
        f"<dt>Protected</dt><dd>{html.escape(tm['protected'])}</dd>"
        + (f"<dt>Says nothing about</dt><dd>{html.escape('; '.join(tm['out_of_scope']))}</dd>" if tm.get("out_of_scope") else "")
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(t)}</dd>" for k, t in cells)
        + "</dl></div>" + (f"<p class='warn'>{html.escape(flag)}</p>" if flag else "")
    )
    units = summary["units"]
    if units["failed"] or units["missing"]:
        threat += (
            f"<p class='warn'>Incomplete run: {len(units['failed'])} failed and {len(units['missing'])} unfinished of "
            f"{units['total']} units; resume with <code>safetylab run --resume {html.escape(str(run_dir))}</code>.</p>"
        )
    add("threat", "Threat model", threat)

    results, folded = [], []
    for t in summary["tables"]:
        m = matrix_of(t)
        if m is not None:
            results.append(_matrix_html(t, m))
        elif len(t["rows"]) > LONG_TABLE_ROWS:
            folded.append(
                f"<details><summary><b>{html.escape(t['title'])}</b> ({len(t['rows'])} rows)</summary>"
                f"{_table_html(t)}</details>"
            )
        else:
            results.append(f"<p><b>{html.escape(t['title'])}</b></p>{_table_html(t)}")
    if folded and not results:
        results.append("<p>The per-setting tables are folded under the figures below.</p>")
    add("results", "Results", "".join(results))
    if summary["findings"]:
        add("findings", "Findings", "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in summary["findings"]) + "</ul>")

    figures = []
    for f in summary["figures"]:
        png = run_dir / f["path"]
        caption = f.get("caption") or ""
        alt = caption or f"figure {f['path']}"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            figures.append(
                f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        else:
            figures.append(f"<p class='warn'>Figure {html.escape(f['path'])} is missing from the run folder; "
                           f"rewrite it with <code>safetylab report {html.escape(str(run_dir))}</code>.</p>")
    if folded:
        figures.append("<p>Per-setting tables (click to unfold):</p>" + "".join(folded))
    add("figures", "Figures" if summary["figures"] else "Per-setting tables", "".join(figures))
    if summary["setup_notes"]:
        add("setup", "Setup choices (where the essay is silent)",
            "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["setup_notes"]) + "</ul>")
    add("provenance", "Provenance", f"<p class='prov'>{html.escape(_provenance_md(env))}</p>")
    return out


def _verdict_html(v: dict[str, Any]) -> str:
    # The interval is printed as the study computed it (clipped to the quantity's range where
    # the study's stats say so); nothing here widens or re-derives it.
    ci = format_interval(v["estimate"], v["ci_low"], v["ci_high"], digits=3)
    cmp = "&gt;" if v["direction"] == "greater" else "&lt;"
    pct = _pct(v["confidence"])
    return (
        f"<div class='verdict' style='background:{_VERDICT_COLOURS.get(v['verdict'], '#555')}'>"
        f"<b>{html.escape(v['verdict'].upper())}</b>"
        + (f" ({html.escape(v['reason'])})" if v.get("reason") else "") + " — "
        f"<code>{html.escape(v['metric'])}</code> = {ci} ({pct}% interval, {html.escape(v['interval_method'])}, "
        f"n = {v['n']}); the claim needs {cmp} {v['threshold']:g}</div>"
    )


def html_section(summary: dict[str, Any], env: dict[str, Any], run_dir: Path, level: int = 1,
                 anchor: str = "") -> str:
    """One study's report as HTML: verdict, controls, primary contrast, threat model, results,
    findings, figures (with long tables folded under them), setup choices, provenance.

    At ``level`` 1 (a report of its own) a line of links to its sections follows the title;
    in the combined report the table of contents at the top links them instead.
    """
    body, _ = _section_and_toc(summary, env, run_dir, level, anchor or _anchor(summary["study"]))
    return body


def _section_and_toc(summary: dict[str, Any], env: dict[str, Any], run_dir: Path, level: int,
                     anchor: str) -> tuple[str, list[tuple[str, str]]]:
    h, h2 = f"h{level}", f"h{level + 1}"
    sections = _sections(summary, env, run_dir, h2, anchor)
    toc = [(sid, label) for sid, label, _ in sections]
    parts = [f"<{h} id='{anchor}'>{html.escape(summary['study'])}</{h}>"]
    if level == 1:
        parts.append("<nav class='sections' aria-label='Sections'>"
                     + "".join(f"<a href='#{sid}'>{html.escape(label)}</a>" for sid, label in toc) + "</nav>")
    parts += [
        f"<p class='claim'><b>Claim.</b> {html.escape(summary['claim']['statement'])}</p>",
        _verdict_html(summary["verdict"]),
        f"<p>{html.escape(summary['headline'])}</p>",
    ]
    parts += [body for _, _, body in sections]
    return "\n".join(parts), toc


def _controls_html(summary: dict[str, Any]) -> str:
    rows = _control_rows(summary)
    if not rows:
        return ""
    colour = {"pass": "#1b7f3b", "FAIL": "#b3261e", "not run": "#8a6d00"}
    body = "".join(
        "<tr>" + "".join(f"<td style='color:{colour[c]};font-weight:600'>{html.escape(c)}</td>" if j == 4
                         else f"<td>{html.escape(str(c))}</td>" for j, c in enumerate(r)) + "</tr>" for r in rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _CONTROL_COLUMNS)
    return ("<p>Validity checks with known answers: a positive control must show the "
            "effect, a negative control must not. A failed or missing control makes the verdict inconclusive.</p>"
            f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _contrast_html(summary: dict[str, Any]) -> str:
    lines = _contrast_lines(summary)
    if not lines:
        return ""
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(t)}</dd>" for k, t in lines)
    return f"<dl class='contrast'>{items}</dl>"


# --------------------------------------------------------------------------- combined


def threat_grid_html(cov: dict[str, Any]) -> str:
    """The user x adversary x asset grid (:func:`safetylab.threats.coverage_of`) as one small
    table per asset: each cell lists the studies whose runs cover it, with verdict and
    interval (and the study's own measurement of that cell where it gives one), or says
    that the evidence is silent; flagged and unplaced runs follow."""
    from safetylab.threats import cell_lines

    axes = cov["axes"]
    by = {(c["user"], c["tier"], c["asset"]): c for c in cov["cells"]}
    parts = [f"<p>{len(cov['cells']) - len(cov['silent_cells'])} of {len(cov['cells'])} cells have evidence from "
             f"{cov['n_runs']} run(s); a cell lists each study's newest run covering it. <i>Silent</i>: no run "
             "speaks to that user population, adversary and asset.</p>"]
    head = "".join(f"<th>adversary: {html.escape(t)}</th>" for t in axes["tiers"])
    for asset in axes["assets"]:
        rows = []
        for user in axes["users"]:
            tds = []
            for tier in axes["tiers"]:
                lines = cell_lines(by[(user, tier, asset)])
                if not lines:
                    tds.append("<td style='color:#888;background:#f4f4f4'>silent</td>")
                    continue
                tds.append("<td>" + "<br>".join(
                    f"{html.escape(ln['study'])} {verdict_badge(ln['verdict'])} <span class='nowrap'>{html.escape(ln['interval'])}</span>"
                    + (f"<br><small>{html.escape(ln['measure'])}</small>" if ln["measure"] else "")
                    + (f" <small>({ln['n_runs']} runs)</small>" if ln["n_runs"] > 1 else "") for ln in lines) + "</td>")
            rows.append(f"<tr><th>users: {html.escape(user)}</th>{''.join(tds)}</tr>")
        label = axes["asset_labels"].get(asset, asset)
        parts.append(f"<h3>Protecting {html.escape(label)}</h3><div class='scroll'><table><thead><tr><th></th>{head}"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    for f in cov["flagged"]:
        parts.append(f"<p class='warn'>Flagged: {html.escape(f['study'])} (<code>{html.escape(f['run_dir'])}</code>): "
                     f"{html.escape(f['why'])}: {html.escape(', '.join('/'.join(c) for c in f['cells']))}.</p>")
    for u in cov["unplaced"]:
        parts.append(f"<p class='warn'>Not placed: {html.escape(u['study'])} (<code>{html.escape(u['run_dir'])}</code>): "
                     f"{html.escape(u['note'])}.</p>")
    return "".join(parts)


def render_combined(run_dirs: list[Path], out_dir: Path, scale: str) -> Path:
    """One HTML report over several finished runs (what ``reproduce`` ends with): a table of
    contents with each study's verdict badge, an overview table, then every study's report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, sections, toc, index = [], [], [], []
    used: set[str] = set()
    for rd in run_dirs:
        summary = json.loads((rd / SUMMARY_FILE).read_text())
        env = json.loads((rd / ENV_FILE).read_text())
        v = summary["verdict"]
        ci = format_interval(v["estimate"], v["ci_low"], v["ci_high"], digits=3)
        name = summary["study"]
        anchor = _anchor(name)
        while anchor in used:  # the same study twice: keep every id unique
            anchor += "-again"
        used.add(anchor)
        rows.append(
            f"<tr><td><a href='#{anchor}'>{html.escape(name)}</a></td>"
            f"<td>{html.escape(summary['claim']['statement'])}</td>"
            f"<td>{verdict_badge(v['verdict'])}"
            + (f"<br><small>{html.escape(v['reason'])}</small>" if v.get("reason") else "") + "</td>"
            f"<td><code>{html.escape(v['metric'])}</code> {ci}</td>"
            f"<td>{html.escape(summary['threat_model']['access'])}</td><td><code>{html.escape(str(rd))}</code></td></tr>"
        )
        body, sub = _section_and_toc(summary, env, rd, 2, anchor)
        sections.append(body + "<p class='toplink'><a href='#contents'>↑ contents</a></p>")
        toc.append(
            f"<li><a href='#{anchor}'><b>{html.escape(name)}</b></a> {verdict_badge(v['verdict'])} "
            f"<code>{html.escape(v['metric'])}</code> {ci}<br><span class='sub'>"
            + "".join(f"<a href='#{sid}'>{html.escape(label)}</a>" for sid, label in sub) + "</span></li>"
        )
        index.append({"study": name, "run_dir": str(rd), "verdict": v})
    from safetylab.threats import coverage_of, runs_of

    grid = threat_grid_html(coverage_of(runs_of(run_dirs), source=str(out_dir)))
    body = (
        f"<h1>safetylab reproduce ({html.escape(scale)} scale)</h1>"
        "<p>Each study reruns one essay's claim on model organisms trained here; the verdict is read off a "
        "95% interval over seeds or prompts. Sections below are the per-study reports.</p>"
        "<nav class='toc' aria-labelledby='contents'><h2 id='contents'>Contents</h2><ol>" + "".join(toc) + "</ol>"
        "<p><a href='#overview'>Overview</a> · <a href='#threats'>Threat-model coverage</a></p></nav>"
        "<h2 id='overview'>Overview</h2>"
        "<div class='scroll'><table><thead><tr><th>study</th><th>claim</th><th>verdict</th>"
        "<th>decisive metric [95% CI]</th><th>adversary access</th><th>run folder</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></div>"
        "<h2 id='threats'>Threat-model coverage (user × adversary × asset)</h2>" + grid
        + "".join(f"<hr>{s}" for s in sections)
    )
    write_atomic(out_dir / "report.html", html_page(f"safetylab reproduce ({scale})", body))
    write_atomic(out_dir / SUMMARY_FILE, json.dumps({"version": SUMMARY_VERSION, "scale": scale, "runs": index}, indent=2) + "\n")
    return out_dir / "report.html"


def describe_verdict(summary: dict[str, Any]) -> str:
    v = summary["verdict"]
    why = f" ({v['reason']})" if v.get("reason") else ""
    return f"{v['verdict']}{why}: {v['metric']} = {format_interval(v['estimate'], v['ci_low'], v['ci_high'], 3)}"


__all__ = ["render_run", "render_combined", "markdown_report", "html_section", "verdict_badge", "Analysis"]
