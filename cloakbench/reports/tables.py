"""Tables over summary rows (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}f}"
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per cell: protection rate with its bootstrap CI, clean accuracy and the budget used."""
    header = [
        "protocol", "defense", "recognizer", "countermeasure", "classifier", "seed", "protection (95% CI)",
        "clean acc.", "top-5 / top-50 acc.", "L-inf (/255)", "PSNR dB", "SSIM", "status",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = str(r.get("status", ""))
        if status == "ok":
            prot = f"{_fmt(r.get('protection_rate'))} [{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]"
        else:
            prot = "–"
        linf = r.get("linf_max")
        cells = [
            str(r.get("protocol", "")), str(r.get("defense", "")), str(r.get("recognizer", "")),
            str(r.get("countermeasure", "")), str(r.get("classifier", "")), str(r.get("seed", "")), prot,
            _fmt(r.get("clean_accuracy_protected")),
            f"{_fmt(r.get('top5_accuracy'))} / {_fmt(r.get('top50_accuracy'))}",
            _fmt(linf * 255 if isinstance(linf, float) else None, 1),
            _fmt(r.get("psnr_mean"), 1), _fmt(r.get("ssim_mean"), 3),
            status if status == "ok" else f"{status}: {r.get('note', '')}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
