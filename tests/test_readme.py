"""The README's tables are what a reader checks a run against: each row has the header's columns,
and the quick-scale verdict table has one row per installed study, no more and no fewer."""

from __future__ import annotations

import re
from pathlib import Path

from safetylab.registry import available

README = Path(__file__).resolve().parent.parent / "README.md"


def _tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """Each markdown table as (the heading above it, its rows split into cells, header first)."""
    tables: list[tuple[str, list[list[str]]]] = []
    heading, rows = "", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
            continue
        if rows:
            tables.append((heading, rows))
            rows = []
    return tables


def test_every_readme_table_row_has_its_headers_columns():
    tables = _tables(README.read_text())
    assert tables
    for heading, (header, *body) in tables:
        for row in body:
            assert len(row) == len(header), (heading, row[0])


def test_the_quick_verdict_table_has_one_row_per_study():
    # the first table under this heading; the paper-size table follows it under the same heading
    rows = next(rows for heading, rows in _tables(README.read_text()) if heading.startswith("Verdicts at quick"))
    assert rows[0][1] == "quick verdict"
    ids = [row[0].strip("`") for row in rows[1:]]
    assert sorted(ids) == sorted(available())
