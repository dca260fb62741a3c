"""Result tables and JSON: one Markdown table writer and one JSON conversion for every command."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: A table column: (header, key in the row, format string)
Column = tuple[str, str, str]


def format_cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    """``fmt`` applied to ``row[key]``; ``–`` when the value is missing, ``None`` or not finite."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[Column],
    cell: Callable[[Mapping[str, Any], str, str], str] = format_cell,
) -> str:
    """The rows as a GitHub Markdown table: the first column left-aligned, the others right."""
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors/NumPy scalars as numbers, tuples as lists and NaN/inf as ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
