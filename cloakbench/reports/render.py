"""Report tables: one small contract (:class:`Table`) and pure renderers to Markdown, LaTeX (booktabs) and CSV.

A table holds typed values, not strings: a number, a text, or an :class:`Estimate` (a rate with its
confidence interval). Each renderer formats them its own way — Markdown ``0.83 [0.71, 0.92]``, LaTeX with the
interval in a smaller size, CSV as three columns (``x``, ``x_ci_low``, ``x_ci_high``) at full precision — and
escapes text for its own syntax, since identity names, labels and notes are data (in CSV: text a spreadsheet
would run as a formula gets a leading ``'``, see :mod:`cloakbench.csv_safe`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloakbench.config import require
from cloakbench.csv_safe import safe_cell


@dataclass(frozen=True)
class Estimate:
    """A rate with its confidence interval (``low <= value <= high`` unless any is NaN: no data)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class Column:
    """One column: the row key it reads, its header, and how numbers are shown (``digits`` after the point,
    multiplied by ``scale`` first: L-inf in units of 1/255, say). ``numeric`` columns are right-aligned."""

    key: str
    header: str
    digits: int = 2
    scale: float = 1.0
    numeric: bool = True

    def __post_init__(self) -> None:
        require(bool(self.key) and bool(self.header), "a column needs a key and a header")
        require(0 <= self.digits <= 8, f"column {self.key}: digits must be in 0..8, got {self.digits}")


@dataclass(frozen=True, kw_only=True)
class Table:
    """A titled table: ``name`` (file stem, ``[a-z0-9-]``), a title, a caption that says what the numbers
    are, columns and rows (mappings from column keys to values; a missing key is an empty cell)."""

    name: str
    title: str
    caption: str
    columns: tuple[Column, ...]
    rows: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        require(
            bool(self.name) and all(c.isascii() and (c.isalnum() or c == "-") for c in self.name),
            f"table name {self.name!r}: use letters, digits and '-' (it names files)",
        )
        keys = [c.key for c in self.columns]
        require(len(set(keys)) == len(keys), f"table {self.name}: duplicate column keys {keys}")


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def format_number(value: Any, column: Column) -> str:
    """A cell as text (no escaping): numbers with the column's digits, ``–`` for no value."""
    if _missing(value):
        return "–"
    if isinstance(value, Estimate):
        if _missing(value.value):
            return "–"
        v, lo, hi = (format_number(x, column) for x in (value.value, value.low, value.high))
        return v if lo == "–" else f"{v} [{lo}, {hi}]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value * column.scale:.{column.digits}f}"
    return str(value)


def sort_key(value: Any) -> float | None:
    """The number a cell sorts by (an estimate by its value), or None for text and empty cells."""
    if isinstance(value, Estimate):
        value = value.value
    if isinstance(value, bool) or _missing(value) or not isinstance(value, (int, float)):
        return None
    return float(value)


# -- Markdown ---------------------------------------------------------------------------------------------


def markdown_text(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, no line breaks, no raw HTML."""
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def to_markdown(table: Table, *, heading_level: int = 3) -> str:
    head = "#" * heading_level + " " + markdown_text(table.title)
    header = "| " + " | ".join(markdown_text(c.header) for c in table.columns) + " |"
    rule = "|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|"
    lines = [head, "", markdown_text(table.caption), "", header, rule]
    for row in table.rows:
        lines.append("| " + " | ".join(markdown_text(format_number(row.get(c.key), c)) for c in table.columns) + " |")
    if not table.rows:
        lines.append("| " + " | ".join("–" for _ in table.columns) + " |")
    return "\n".join(lines) + "\n"


# -- LaTeX ------------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "–": "--", "∞": r"$\infty$", "\n": " ", "\r": " ",
}  # fmt: skip


def latex_text(text: str) -> str:
    """Text safe in LaTeX body text (every special character escaped; other non-ASCII passes through for
    inputenc/fontenc to handle)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(value: Any, column: Column) -> str:
    if isinstance(value, Estimate) and not _missing(value.value) and not _missing(value.low):
        v, lo, hi = (format_number(x, column) for x in (value.value, value.low, value.high))
        return f"{v} {{\\scriptsize[{lo}, {hi}]}}"
    return latex_text(format_number(value, column))


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` ready to ``\\input`` inside a ``table`` float (needs ``\\usepackage{booktabs}``).
    The title and caption come first as comments, for the caption the author writes."""
    spec = "".join("r" if c.numeric else "l" for c in table.columns)
    lines = [
        f"% {table.title.replace(chr(10), ' ')}",
        f"% {table.caption.replace(chr(10), ' ')}",
        "% needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_text(c.header) for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    for row in table.rows:
        lines.append(" & ".join(_latex_cell(row.get(c.key), c) for c in table.columns) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# -- CSV --------------------------------------------------------------------------------------------------


def csv_header(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column keys; a column holding estimates gets ``_ci_low`` and ``_ci_high`` columns after it."""
    out = []
    for c in columns:
        out.append(c.key)
        if any(isinstance(r.get(c.key), Estimate) for r in rows):
            out += [f"{c.key}_ci_low", f"{c.key}_ci_high"]
    return out


def _csv_value(value: Any) -> Any:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: the CSV is for further analysis
    return safe_cell(value)  # text only: a number is never a formula, and a negative one stays a number


def to_csv(table: Table) -> str:
    """Machine-readable: raw values (no scaling, full precision), estimates split into three columns."""
    header = csv_header(table.columns, table.rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        values: list[Any] = []
        for c in table.columns:
            v = row.get(c.key)
            if c.key + "_ci_low" in header:
                if isinstance(v, Estimate):
                    values += [_csv_value(v.value), _csv_value(v.low), _csv_value(v.high)]
                else:
                    values += [_csv_value(v), "", ""]
            else:
                values.append(_csv_value(v))
        writer.writerow(values)
    return buffer.getvalue()
