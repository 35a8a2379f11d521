"""Tables and JSON output of the benchmarks (see :mod:`experiments.bench`).

A table is a list of row dicts and a tuple of :class:`Column`. A column that no row has
is left out; an empty cell is shown as ``-`` and the row's ``note`` (or ``error``) column
says why it is empty. :func:`legend` prints what each shown column means.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Column:
    """``key`` in the rows, ``title`` in the header, ``fmt`` (``str.format``) for a value and
    ``meaning``, the line :func:`legend` prints for it."""

    key: str
    title: str
    fmt: str = "{}"
    meaning: str = ""


def shape_text(shape: Any) -> str:
    """``{"b": 2, "t": 1024}`` -> ``"b=2,t=1024"``."""
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def _cell(row: dict, column: Column, missing: str) -> str:
    value = row.get(column.key)
    if value is None:
        return missing
    if column.key == "shape":
        return shape_text(value)
    return column.fmt.format(value)


def _shown(rows: Sequence[dict], columns: Sequence[Column]) -> list[Column]:
    return [c for c in columns if any(r.get(c.key) is not None for r in rows)]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column], missing: str = "") -> str:
    """A markdown table of the columns that some row has."""
    shown = _shown(rows, columns)
    lines = ["| " + " | ".join(c.title for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r, c, missing).replace("|", "/") for c in shown) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Sequence[Column], missing: str = "-") -> str:
    """A plain-text table, columns padded to their widest cell (text left, numbers right); an
    empty number cell shows ``missing``, an empty text cell stays blank."""
    shown = _shown(rows, columns)
    cells = [[_cell(r, c, missing if c.fmt != "{}" else "") for c in shown] for r in rows]
    widths = [max([len(c.title)] + [len(line[i]) for line in cells]) for i, c in enumerate(shown)]
    numeric = [c.fmt != "{}" for c in shown]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    head = line([c.title for c in shown])
    return "\n".join([head, "-" * len(head), *(line(v) for v in cells)])


def legend(rows: Sequence[dict], columns: Sequence[Column], missing: str = "-") -> str:
    """One line per shown column with a meaning, and what an empty cell means."""
    shown = [c for c in _shown(rows, columns) if c.meaning]
    width = max((len(c.title) for c in shown), default=0)
    lines = [f"  {c.title:<{width}}  {c.meaning}" for c in shown]
    lines.append(f"  {missing!r:<{width}}  not measured; the row's note says why")
    return "\n".join(lines)


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path
