"""Markdown cells and tables for ``RESULTS.md``: what the report and every benchmark's own section share.

Its own module so that the report (which renders every section) and a benchmark that renders its section
(``bench.applications``) both import it, and neither imports the other.
"""

from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    """A value as a table cell: ``n/a`` for None, ``yes``/``no`` for booleans, floats to ``digits``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def spread_cell(s: dict[str, Any], digits: int = 3) -> str:
    """``median [min, max]`` of a :func:`bench.common.spread` summary."""
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}, {fmt(s['max'], digits)}]"
