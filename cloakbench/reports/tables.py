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
    """One line per cell: protection rate with its interval (per person), clean accuracy and the budget used."""
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


def protection_matrices(rows: Sequence[Mapping[str, Any]]) -> str:
    """Defense x recognizer matrices of protection rates, one per (protocol, countermeasure, classifier, seed).

    The transfer table: cloaks made against one surrogate (a defense row) evaluated by every recognizer
    (a column). Cells that were refused or failed show their status instead of a number.
    """
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = tuple(str(r.get(k, "")) for k in ("protocol", "countermeasure", "classifier", "seed"))
        groups.setdefault(key, []).append(r)
    out: list[str] = []
    for (protocol, cm, clf, seed), group in groups.items():
        defenses = list(dict.fromkeys(str(r.get("defense", "")) for r in group))
        recognizers = list(dict.fromkeys(str(r.get("recognizer", "")) for r in group))
        cell = {(str(r.get("defense", "")), str(r.get("recognizer", ""))): r for r in group}
        out.append(f"### protection rate: {protocol}, countermeasure {cm}, classifier {clf}, seed {seed}\n")
        out.append("| defense \\ recognizer | " + " | ".join(_md_escape(c) for c in recognizers) + " |")
        out.append("|---|" + "---|" * len(recognizers))
        for d in defenses:
            values = []
            for rec in recognizers:
                found = cell.get((d, rec))
                if found is None:
                    values.append("")
                elif found.get("status") == "ok":
                    values.append(_fmt(found.get("protection_rate")))
                else:
                    values.append(str(found.get("status", "")))
            out.append(f"| {_md_escape(d)} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def oblivious_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per (protocol, defense, countermeasure, classifier, seed): protection against the recognizers the cloak
    was made on (white box / same weights) next to the oblivious ones (no part in making it), each the
    lowest rate over its recognizers with the recognizer named — the oblivious tracker as its own column."""
    groups: dict[tuple[str, ...], dict[bool, list[Mapping[str, Any]]]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("oblivious") in (None, ""):
            continue
        key = tuple(str(r.get(k, "")) for k in ("protocol", "defense", "countermeasure", "classifier", "seed"))
        oblivious = r.get("oblivious") in (True, "True", "true", 1)
        groups.setdefault(key, {True: [], False: []})[oblivious].append(r)

    def lowest(cells: list[Mapping[str, Any]]) -> str:
        if not cells:
            return "–"
        worst = min(cells, key=lambda c: float(c.get("protection_rate", float("nan"))))
        return f"{_fmt(worst.get('protection_rate'))} ({_md_escape(str(worst.get('recognizer', '')))})"

    header = ["protocol", "defense", "countermeasure", "classifier", "seed", "surrogate recognizers (lowest)",
              "oblivious recognizers (lowest)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, split in groups.items():
        lines.append(
            "| " + " | ".join([*(_md_escape(k) for k in key), lowest(split[False]), lowest(split[True])]) + " |"
        )
    return "\n".join(lines) + "\n"
