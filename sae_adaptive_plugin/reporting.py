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


def aggregate_rows(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several seeds' runs merged by ``name`` (in order of first appearance): each number
    becomes the mean over the runs that have the row, with ``<key>_std`` (population std) and
    ``n_seeds`` beside it; other values are the first run's."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            groups.setdefault(row["name"], []).append(row)
    merged = []
    for group in groups.values():
        row: dict[str, Any] = dict(group[0])
        for key, value in group[0].items():
            if key == "k_eval" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            values = [float(r[key]) for r in group if r.get(key) is not None]
            if not values:
                continue
            mean = math.fsum(values) / len(values)
            row[key] = mean
            row[f"{key}_std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        row["n_seeds"] = len(group)
        merged.append(row)
    return merged


def cell_with_std(keys: Iterable[str]) -> Callable[[Mapping[str, Any], str, str], str]:
    """A :func:`markdown_table` cell writer showing ``mean ± std`` for ``keys`` in rows merged
    from several seeds (:func:`aggregate_rows`)."""
    with_std = frozenset(keys)

    def cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
        text = format_cell(row, key, fmt)
        if key in with_std and row.get("n_seeds", 1) > 1 and row.get(f"{key}_std") is not None:
            text += " ± " + fmt.format(row[f"{key}_std"]).lstrip("+")
        return text

    return cell


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
