"""report.html as a reader meets it: matrices as heatmaps, wide tables in their own box,
long tables folded under the figures, alt text, a table of contents whose links resolve."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from report_fixtures import simulated_run
from safetylab.heatmap import heatmap_svg, matrix_of, viridis
from safetylab.report import LONG_TABLE_ROWS, render_combined
from safetylab.study import Table


def table(**kw) -> dict:
    return Table(**{"title": "t", "columns": ["rule", "BP", "FA"], "rows": [], **kw}).model_dump(mode="json")


def test_a_square_table_labelled_alike_on_both_axes_is_a_matrix() -> None:
    t = table(rows=[["backprop", "1.000", 0.5], ["feedback_alignment", None, "–"]])
    m = matrix_of(t)
    assert m is not None
    assert m.row_labels == ["backprop", "feedback_alignment"] and m.col_labels == ["BP", "FA"]
    assert m.values == [[1.0, 0.5], [None, None]]
    assert m.texts[0] == ["1.000", "0.5"]  # the study's own formatting is kept


@pytest.mark.parametrize("rows, columns", [
    ([["backprop", "0.1", "x"], ["feedback_alignment", "0.2", "0.3"]], ["rule", "BP", "FA"]),  # text cell
    ([["backprop", 0.1, 0.2], ["sgd", 0.2, 0.3]], ["rule", "BP", "FA"]),  # labels differ
    ([["backprop", 0.1, 0.2]], ["rule", "BP", "FA"]),  # not square
    ([["a", "–"], ["b", None]], ["x", "a"]),  # nothing numeric
])
def test_other_tables_stay_tables(rows, columns) -> None:
    assert matrix_of(table(rows=rows, columns=columns)) is None


def test_a_table_marked_as_a_matrix_may_be_rectangular() -> None:
    t = table(kind="matrix", columns=["source → target", "m1", "m2", "m3"], rows=[["m1", 0.9, 0.1, 0.2]])
    m = matrix_of(t)
    assert m is not None and len(m.values) == 1 and len(m.values[0]) == 3


def test_heatmap_is_valid_svg_with_a_name_and_every_number() -> None:
    m = matrix_of(table(rows=[["backprop", 0.93, 0.79], ["feedback_alignment", 0.79, 0.92]], title="CKA <layer 0>"))
    svg, width = heatmap_svg(m)
    root = ET.fromstring(svg)
    assert root.get("role") == "img" and "CKA <layer 0>" in root.get("aria-label")
    assert int(root.get("width")) == width
    texts = [el.text for el in root.iter("{http://www.w3.org/2000/svg}text")]
    for v in ("0.93", "0.79", "0.92", "backprop", "FA"):
        assert v in texts
    assert viridis(0) == "#440154" and viridis(1) == "#fde725"


@pytest.fixture(scope="module")
def combined(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    dirs = [simulated_run(name, root / name / "20250102-030405-abc123")
            for name in ("learning-rules", "similarity-blindness")]
    return render_combined(dirs, root / "reproduce" / "x", "quick")


def test_combined_report_reads_well(combined) -> None:
    page = combined.read_text()
    # Table of contents first, with a verdict badge per study; every internal link has its target.
    assert page.index("id='contents'") < page.index("id='learning-rules'") < page.index("id='similarity-blindness'")
    assert page.count("class='badge'") >= 4  # in the contents and in the overview
    ids = set(re.findall(r"id='([^']+)'", page))
    links = re.findall(r"href='#([^']+)'", page)
    assert links and set(links) <= ids
    # learning-rules' similarity matrices became heatmaps; the numbers are still in report.md.
    assert page.count("<svg") >= 2 and "Heatmap: linear_cka at hidden layer" in page
    md = (combined.parents[2] / "learning-rules" / "20250102-030405-abc123" / "report.md").read_text()
    assert "linear_cka at hidden layer layers.0" in md
    # Every table in its own scrolling box; long ones folded; every image with alt text.
    assert page.count("<table") == page.count("<div class='scroll'><table")
    assert re.search(r"<details><summary><b>[^<]+</b> \((\d+) rows\)", page)
    for n in re.findall(r"\((\d+) rows\)</summary>", page):
        assert int(n) > LONG_TABLE_ROWS
    imgs = re.findall(r"<img [^>]*>", page)
    assert imgs and all(re.search(r"alt='[^']+'", i) for i in imgs)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


@pytest.mark.parametrize("study", ["early-exit", "shield"])
def test_reports_open_with_verdict_then_controls_then_the_primary_contrast(study, tmp_path) -> None:
    """The verdict protocol's reading order, in report.md and report.html alike; a failed or
    missing control is named in the verdict line itself."""
    run = simulated_run(study, tmp_path / "run")
    md = (run / "report.md").read_text()
    order = [md.index("**Verdict:**"), md.index("## Controls"), md.index("## Primary contrast"),
             md.index("## Threat model"), md.index("## Results")]
    assert order == sorted(order), order
    assert "Unit of replication" in md and "| pass |" in md
    page = (run / "report.html").read_text()
    body = page[page.index("</nav>"):]  # past the section links
    order = [body.index("class='verdict'"), body.index(">Controls</h"), body.index(">Primary contrast</h"),
             body.index("Threat model</h")]
    assert order == sorted(order), order


def test_a_missing_control_is_named_in_the_verdict_line(tmp_path) -> None:
    run = simulated_run("early-exit", tmp_path / "run")
    import json

    from safetylab.report import render_run

    # Drop the positive control's units from the results log: the control is 'not run'.
    log = run / "results.jsonl"
    lines = [ln for ln in log.read_text().splitlines() if '"model=sft-late/' not in ln]
    log.write_text("\n".join(lines) + "\n")
    summary = render_run(run)
    assert summary["verdict"]["verdict"] == "inconclusive"
    assert "control not run: sft-late loses refusal" in summary["verdict"]["reason"]
    md = (run / "report.md").read_text()
    assert "**INCONCLUSIVE** (control not run: sft-late loses refusal)" in md
    assert json.loads((run / "summary.json").read_text())["controls"][1]["status"] == "not run"
