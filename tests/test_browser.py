"""The combined report and the run index in a real browser (headless Chromium at 1280 px):
no console errors, every image decodes, nothing widens the page, every link resolves.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright's Python API, which
drives the system browser (no ``playwright install``). Without them the test is skipped,
unless ``SAFETYLAB_REQUIRE_BROWSER=1`` or ``CI=true`` (as CI sets it) makes that a failure;
``make test`` installs Debian's ``chromium`` first where it can (root with apt-get).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

from report_fixtures import simulated_run
from safetylab.catalog import list_runs, write_index
from safetylab.report import html_page, html_section, render_combined

pytestmark = pytest.mark.browser

WIDTH = 1280


def _chromium() -> str:
    required = os.environ.get("SAFETYLAB_REQUIRE_BROWSER") == "1" or os.environ.get("CI") == "true"
    path = os.environ.get("SAFETYLAB_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    why = None
    if path is None or not Path(path).is_file():
        why = "no chromium binary on PATH (Debian: apt-get install chromium; or set SAFETYLAB_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright is not installed (pip install -e '.[test]')"
    if why:
        if required:
            pytest.fail(f"a browser is required here (CI=true or SAFETYLAB_REQUIRE_BROWSER=1) but {why}")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """Every study with a simulator as a rendered run, a partial run, a combined report, an index."""
    from safetylab.studies import available, get_study

    root = tmp_path_factory.mktemp("runs")
    names = [n for n in available() if get_study(n).simulate is not None]
    dirs = [simulated_run(n, root / n / f"20250102-03040{i}-abc{i}") for i, n in enumerate(names)]
    simulated_run(names[0], root / names[0] / "20250103-000000-part", drop_last=1)
    render_combined(dirs, root / "reproduce" / "20250102-040000-all", "quick")
    write_index(root, list_runs(root))
    return root


def _open(browser, path: Path):
    """The page at ``path`` and the console errors it raised while loading."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


def _check_layout(page) -> None:
    # Every image decodes to real pixels, and every heatmap draws.
    images = page.evaluate("""() => Promise.all([...document.images].map(
        img => img.decode().then(() => [img.alt, img.naturalWidth], () => [img.alt, -1])))""")
    for alt, width in images:
        assert alt, "an image without alt text"
        assert width > 0, f"image '{alt[:60]}' does not decode"
    svgs = page.evaluate("() => [...document.querySelectorAll('svg')].map(s => s.getBBox().width)")
    assert all(w > 0 for w in svgs)
    # Nothing widens the page, folded tables unfolded too: wide content scrolls in its own box.
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px at {WIDTH}px"
    # Every in-page link has its target.
    missing = page.evaluate("""() => [...document.querySelectorAll("a[href^='#']")]
        .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id))""")
    assert not missing, f"links to missing anchors: {missing}"


def test_combined_report_in_a_browser(browser, runs_root):
    report = next(runs_root.glob("reproduce/*/report.html"))
    page, errors = _open(browser, report)
    _check_layout(page)
    toc = page.evaluate("() => [...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href'))")
    assert len(toc) >= 4 and page.locator("nav.toc .badge").count() >= 1
    # Following a contents link scrolls its study's section to the top of the window.
    target = page.evaluate("() => [...document.querySelectorAll('nav.toc li > a')].map(a => a.getAttribute('href'))")[1]
    page.click(f"nav.toc a[href='{target}']")
    top = page.evaluate(f"() => document.getElementById('{target[1:]}').getBoundingClientRect().top")
    assert abs(top) < 5
    assert page.locator("svg[role='img']").count() >= 1  # learning-rules' matrices as heatmaps
    assert not errors, errors
    page.close()


def test_run_index_in_a_browser(browser, runs_root):
    page, errors = _open(browser, runs_root / "index.html")
    _check_layout(page)
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    reports = [h for h in hrefs if h.endswith("/report.html")]
    assert len(reports) >= 4
    for h in hrefs:
        assert Path(urllib.parse.unquote(urllib.parse.urlparse(h).path)).exists(), h
    assert "partial" in page.inner_text("table")
    # A linked single-study report opens clean too.
    page.goto(reports[-1])
    _check_layout(page)
    assert not errors, errors
    page.close()


def test_wide_tables_and_matrices_scroll_in_their_own_box(browser, runs_root, tmp_path):
    """Content far wider than the window (a 30-column table, a 14 x 14 matrix with long labels,
    an unbroken path) stays inside the page."""
    run_dir = next(d for d in runs_root.glob("*/*") if (d / "summary.json").is_file() and d.parent.name != "reproduce")
    summary = json.loads((run_dir / "summary.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    labels = [f"organism_variant_number_{i}" for i in range(14)]
    summary["tables"] = [
        {"title": "wide", "columns": [f"a long column header {i}" for i in range(30)],
         "rows": [[f"value_{i}_{j}_without_spaces" for j in range(30)] for i in range(3)], "caption": ""},
        {"title": "transfer", "kind": "matrix", "columns": ["source → target", *labels],
         "rows": [[r, *[0.01 * (i + j) for j in range(14)]] for i, r in enumerate(labels)], "caption": ""},
    ]
    summary["findings"] = ["/a/very/long/path/" + "x" * 300]
    page_path = tmp_path / "wide.html"
    page_path.write_text(html_page("wide", html_section(summary, env, run_dir)))
    page, errors = _open(browser, page_path)
    _check_layout(page)
    assert page.locator("svg[role='img']").count() == 1
    assert not errors, errors
    page.close()
