"""Matrices in reports: which tables are matrices, and an annotated heatmap of one as inline SVG.

A study marks a table as a matrix with ``Table(kind="matrix")``: row labels in the first
column, one number per cell after it (a similarity matrix between learning rules, a
source → target transfer matrix). Tables that do not say so are still drawn as a heatmap
when they are unmistakably one: square, numeric, and each row labelled as its column
(the same label, or the column's abbreviation of it: ``BP`` for ``backprop``, ``DFA`` for
``direct_feedback_alignment``).

The heatmap is plain SVG text, so ``report.html`` stays one self-contained file that opens
offline; every cell carries its number (the study's own formatting), so nothing is read off
a colour scale, and ``report.md`` and ``summary.json`` keep the table itself. Colours are
viridis (perceptually uniform, legible in greyscale and to most colour-blind readers) over
the matrix's own range, which the legend states.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

_MISSING = {"", "–", "-", "—", "nan", "none", "null", "n/a"}

# matplotlib's viridis at 9 evenly spaced points, linearly interpolated between them.
_VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#fde725")


@dataclass(frozen=True)
class Matrix:
    """A table read as a matrix: ``values[i][j]`` is ``None`` where a cell is missing."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    values: list[list[float | None]]
    texts: list[list[str]]
    """What each cell shows: the table's own text for a number given as text, else 3 significant digits."""


def _number(cell: Any) -> tuple[float | None, str] | None:
    """``(value, text)`` of a numeric or missing cell; ``None`` for any other cell."""
    if cell is None:
        return None, "–"
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        v = float(cell)
        return (v, f"{v:.3g}") if math.isfinite(v) else (None, "–")
    if isinstance(cell, str):
        text = cell.strip()
        if text.lower() in _MISSING:
            return None, "–"
        try:
            v = float(text.replace("−", "-"))
        except ValueError:
            return None
        return (v, text) if math.isfinite(v) else (None, "–")
    return None


def _abbreviates(short: str, long: str) -> bool:
    """``short`` equals ``long`` or is an abbreviation of it: same first letter, and its
    letters appear in ``long`` in order (case-insensitive)."""
    s, t = short.strip().lower(), long.strip().lower()
    if not s or not t:
        return False
    if s == t:
        return True
    if s[0] != t[0] or len(s) >= len(t):
        return False
    it = iter(t)
    return all(ch in it for ch in s)


def matrix_of(table: dict[str, Any]) -> Matrix | None:
    """The table as a :class:`Matrix`, or ``None`` if it is not one (see the module docstring)."""
    columns, rows = table.get("columns") or [], table.get("rows") or []
    if len(columns) < 2 or not rows or any(len(r) != len(columns) for r in rows):
        return None
    parsed = [[_number(c) for c in r[1:]] for r in rows]
    if any(p is None for row in parsed for p in row):
        return None
    if not any(p[0] is not None for row in parsed for p in row):  # type: ignore[index]
        return None
    row_labels = ["–" if r[0] is None else str(r[0]) for r in rows]
    col_labels = [str(c) for c in columns[1:]]
    if table.get("kind") != "matrix":
        square = len(rows) == len(col_labels) >= 2
        if not square or not all(isinstance(r[0], str) for r in rows):
            return None
        if not all(_abbreviates(c, r) or _abbreviates(r, c) for c, r in zip(col_labels, row_labels)):
            return None
    return Matrix(
        title=str(table.get("title", "")),
        row_labels=row_labels,
        col_labels=col_labels,
        values=[[p[0] for p in row] for row in parsed],  # type: ignore[index]
        texts=[[p[1] for p in row] for row in parsed],  # type: ignore[index]
    )


def viridis(t: float) -> str:
    """The viridis colour at ``t`` in [0, 1] as ``#rrggbb``."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - f) + int(b[k:k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


_CHAR_W = 7.0  # px per character at 12 px system-ui: a generous average, so labels are not clipped
_FONT = 12


def heatmap_svg(m: Matrix) -> tuple[str, int]:
    """An annotated heatmap of ``m`` as an inline ``<svg>`` with its own accessible name,
    and its width in CSS pixels (for laying out its caption)."""
    finite = [v for row in m.values for v in row if v is not None]
    lo, hi = min(finite), max(finite)
    span = hi - lo if hi > lo else 1.0
    n_rows, n_cols = len(m.row_labels), len(m.col_labels)
    cell_w = max(48.0, _CHAR_W * max(len(t) for row in m.texts for t in row) + 14)
    cell_h = 28.0
    left = _CHAR_W * max(len(r) for r in m.row_labels) + 12
    longest_col = _CHAR_W * max(len(c) for c in m.col_labels)
    rotate = longest_col > cell_w - 6
    top = (0.72 * longest_col + 14) if rotate else 22.0
    right = 0.72 * longest_col if rotate else 8.0
    grid_w, grid_h = n_cols * cell_w, n_rows * cell_h
    legend_y = top + grid_h + 14
    width = math.ceil(left + grid_w + right)
    height = math.ceil(legend_y + 34)

    name = f"Heatmap: {m.title}" if m.title else "Heatmap"
    desc = (f"{n_rows} rows ({', '.join(m.row_labels)}) by {n_cols} columns ({', '.join(m.col_labels)}); "
            f"values from {lo:.3g} to {hi:.3g}, each printed in its cell.")
    e = html.escape
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' role='img' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-size='{_FONT}' aria-label='{e(name)}. {e(desc)}'>",
        f"<title>{e(name)}</title><desc>{e(desc)}</desc>",
    ]
    for j, c in enumerate(m.col_labels):
        x = left + (j + 0.5) * cell_w
        if rotate:
            out.append(f"<text x='{x:.1f}' y='{top - 6:.1f}' transform='rotate(-45 {x:.1f} {top - 6:.1f})'>{e(c)}</text>")
        else:
            out.append(f"<text x='{x:.1f}' y='{top - 7:.1f}' text-anchor='middle'>{e(c)}</text>")
    for i, r in enumerate(m.row_labels):
        y = top + i * cell_h
        out.append(f"<text x='{left - 6:.1f}' y='{y + cell_h / 2 + 4:.1f}' text-anchor='end'>{e(r)}</text>")
        for j, v in enumerate(m.values[i]):
            x = left + j * cell_w
            t = None if v is None else (v - lo) / span
            fill = "#e6e6e6" if t is None else viridis(t)
            ink = "#1d1d1f" if t is None or t > 0.6 else "#ffffff"  # viridis turns light above ~0.6
            out.append(
                f"<g><title>{e(r)} × {e(m.col_labels[j])}: {e(m.texts[i][j])}</title>"
                f"<rect x='{x:.1f}' y='{y:.1f}' width='{cell_w:.1f}' height='{cell_h:.1f}' fill='{fill}' "
                f"stroke='#ffffff'/><text x='{x + cell_w / 2:.1f}' y='{y + cell_h / 2 + 4:.1f}' "
                f"text-anchor='middle' fill='{ink}'>{e(m.texts[i][j])}</text></g>"
            )
    # Legend: the colour scale over the matrix's own range, in ten steps.
    steps, lw = 10, min(grid_w, 240.0)
    for k in range(steps):
        out.append(f"<rect x='{left + k * lw / steps:.1f}' y='{legend_y:.1f}' width='{lw / steps + 0.5:.1f}' "
                   f"height='8' fill='{viridis(k / (steps - 1))}'/>")
    out.append(f"<text x='{left:.1f}' y='{legend_y + 22:.1f}' font-size='11'>{lo:.3g}</text>"
               f"<text x='{left + lw:.1f}' y='{legend_y + 22:.1f}' font-size='11' text-anchor='end'>{hi:.3g}</text>")
    out.append("</svg>")
    return "".join(out), width
