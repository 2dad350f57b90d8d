"""Plain-text tables for command output (no dependency: a few lines beat a library here)."""

from __future__ import annotations


def format_table(headers, rows) -> str:
    """Left-aligned first column, right-aligned others, a dashed rule under the headers."""
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def share(value: float | None) -> str:
    """A fraction as a whole percentage for a table cell, or n/a when it was not measured."""
    return "n/a" if value is None else f"{value:.0%}"
