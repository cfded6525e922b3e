"""``cloakbench leaderboard``: the defenses of one or more stored runs, ranked by their worst case.

A tracker is not limited to one model or one trick: against a cloaked user it can try every recognizer,
countermeasure and classifier it has (services included), and a photo is lost as soon as one of them identifies
it. So a defense's place on the leaderboard is its **worst-case protection**: the share of its protected users'
clean query photos that *no* tracker of the runs identified (:func:`cloakbench.reports.worst_case.worst_case`
over every ``ok`` cell of every run, per protocol), with the interval cloakbench reports for every rate
(:func:`cloakbench.bench.metrics.protection_interval`: the person is the unit, exact binomial for one person,
identity-clustered bootstrap widened to the exact interval for several; never zero-width; seed 0, so the same
runs give the same page). Beside it: the tracker that identified the most photos alone, the image quality the
cloaks measured (the ``cloaks`` table: SSIM, DSSIM, PSNR, L-inf) and what a cloak cost (seconds per photo as
the run measured it, with the device).

Runs are pooled: a defense with the same spec (registry name, parameters, surrogates, robust settings, cloak
fraction) in several runs is one entry, whose photos count as protected only if no tracker of any run
identified them; a photo under two seeds is two samples of one person. A label that names different specs in
different runs becomes one entry per run (``label [run]``). Runs on different data or threat models measure
different things: runs whose dataset, protected people or protocols differ are refused, naming the runs and
what differs, unless ``merge`` is asked for — then the page says what was merged, and a photo of one dataset
is judged only by the trackers that saw it.

Everything is a function of the stored runs (:func:`cloakbench.reports.data.load_run`): no model, no dataset,
nothing recomputed; the stores are opened read-only. :func:`write_leaderboard` writes ``leaderboard.md``,
``leaderboard.html`` (self-contained, with the report's escaping and Content-Security-Policy) and one CSV per
table into a folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cloakbench.bench.export import store_path
from cloakbench.bench.metrics import INTERVAL_METHOD
from cloakbench.bench.store import disk_full_is_one_line
from cloakbench.cache import atomic_write_text
from cloakbench.errors import ConfigError
from cloakbench.reports import html as page
from cloakbench.reports.data import RunData, load_run
from cloakbench.reports.render import Column, Estimate, Table, markdown_text, to_csv, to_markdown
from cloakbench.reports.worst_case import ANY_RECOGNIZER, CELL_KEYS, worst_case
from cloakbench.results import table_frame

COMPARED = ("dataset", "protected", "protocols")
"""What two runs must share to be ranked together without ``merge``: the suite's ``dataset`` and ``protected``
mappings (every key) and its ``protocols``."""

QUALITY = ("linf", "l2", "psnr", "ssim", "dssim")


@dataclass(frozen=True, kw_only=True)
class RunEntry:
    """One run on the leaderboard: its label (the suite's name, made unique), where it is stored, and its data."""

    label: str
    data: RunData


@dataclass(frozen=True, kw_only=True)
class Leaderboard:
    """The ranked defenses of some runs (pure data; see :func:`build_leaderboard`).

    ``rows``: one per (protocol, defense entry), ranked within the protocol; ``merged``: what differed between
    the runs and was pooled anyway (empty without ``merge``, or when nothing differed)."""

    runs: tuple[RunEntry, ...]
    rows: tuple[dict[str, Any], ...]
    merged: tuple[str, ...]
    confidence: float
    resamples: int

    @property
    def protocols(self) -> list[str]:
        return list(dict.fromkeys(str(r["protocol"]) for r in self.rows))


# -- which runs may be ranked together ---------------------------------------------------------------------


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def _compared(data: RunData) -> dict[str, str]:
    suite = data.suite
    flat = {**_flatten("dataset", suite.get("dataset") or {}), **_flatten("protected", suite.get("protected") or {})}
    flat["protocols"] = sorted(str(p) for p in suite.get("protocols") or ())
    # JSON: one line whatever the value holds (a newline or an escape in a path is shown escaped)
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()}


def differences(runs: Sequence[RunEntry]) -> list[tuple[str, tuple[str, ...]]]:
    """``(key, one value per run)`` for every compared key (:data:`COMPARED`) whose value is not the same in
    every run; values are one-line JSON (``null`` where a run's suite lacks the key)."""
    values = [_compared(r.data) for r in runs]
    keys = list(dict.fromkeys(k for v in values for k in v))
    out = []
    for key in keys:
        per_run = tuple(v.get(key, "null") for v in values)
        if len(set(per_run)) > 1:
            out.append((key, per_run))
    return out


def check_runs(runs: Sequence[RunEntry], *, merge: bool) -> tuple[str, ...]:
    """What differs between the runs, one line per key (``key: run=value, ...``); a :class:`ConfigError` of one
    line naming the runs and what differs when something does and ``merge`` is off."""
    diffs = differences(runs)
    lines = tuple(f"{key}: " + ", ".join(f"{r.label}={v}" for r, v in zip(runs, vals, strict=True))
                  for key, vals in diffs)  # fmt: skip
    if diffs and not merge:
        names = ", ".join(f"{r.label} ({json.dumps(str(r.data.source))})" for r in runs)
        raise ConfigError(
            f"leaderboard: the runs {names} differ in {'; '.join(lines)}; their protection rates measure different "
            "things: rank runs of one dataset and protocol, or pass --merge to pool them anyway"
        )
    return lines


def run_entries(runs: Sequence[RunData]) -> tuple[RunEntry, ...]:
    """Each run labelled by its suite's name; a name that repeats gets ``#2``, ``#3``... in the order given."""
    seen: dict[str, int] = {}
    out = []
    for data in runs:
        name = data.name or "run"
        seen[name] = seen.get(name, 0) + 1
        out.append(RunEntry(label=name if seen[name] == 1 else f"{name}#{seen[name]}", data=data))
    return tuple(out)


# -- defense entries across runs ---------------------------------------------------------------------------


def _spec_key(data: RunData, label: str) -> str:
    spec = {k: v for k, v in data.spec("defense", label).items() if k != "label"}
    return json.dumps(spec, sort_keys=True, default=str)


def defense_entries(runs: Sequence[RunEntry]) -> dict[tuple[int, str], str]:
    """(run index, defense label) -> the name of its leaderboard entry: the label, or ``label [run+run]`` when the
    label names different specs in different runs (each spec its own entry, named by the runs that hold it)."""
    specs: dict[str, dict[str, list[str]]] = {}  # label -> spec key -> runs
    keys: dict[tuple[int, str], str] = {}
    for i, run in enumerate(runs):
        labels = {str(c["defense"]) for c in run.data.cells} | {str(c["defense"]) for c in run.data.cloaks}
        for label in run.data.present("defense", labels):
            key = _spec_key(run.data, label)
            keys[(i, label)] = key
            specs.setdefault(label, {}).setdefault(key, []).append(run.label)
    return {
        (i, label): label if len(specs[label]) == 1 else f"{label} [{'+'.join(specs[label][key])}]"
        for (i, label), key in keys.items()
    }


def _dataset_key(data: RunData) -> str:
    """A short digest of the run's dataset and split (photos of two datasets never count as one photo)."""
    text = json.dumps(data.suite.get("dataset") or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# -- the ranking -------------------------------------------------------------------------------------------


def _cell_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in CELL_KEYS)


def _pooled_rows(
    runs: Sequence[RunEntry], entries: Mapping[tuple[int, str], str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every run's cells and the query rows of its ok cells, with the defense renamed to its entry, the seed folded
    into the photo (``seed`` itself emptied, so every seed pools) and photos and people qualified by their dataset.
    A query row of a refused or failed cell is left out here, while its seed is still known."""
    cells: list[dict[str, Any]] = []
    queries: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        ds = _dataset_key(run.data)
        ok = {_cell_key(c) for c in run.data.cells if c.get("status") == "ok"}
        for c in run.data.cells:
            cells.append({**c, "seed": "", "defense": entries[(i, str(c["defense"]))]})
        for q in run.data.queries:
            if _cell_key(q) not in ok:
                continue
            queries.append({
                **q, "seed": "", "defense": entries[(i, str(q["defense"]))],
                "protected_identity": f"{ds}/{q.get('protected_identity', '')}",
                "image_id": f"{ds}/{q.get('seed', '')}/{q.get('image_id', '')}",
            })  # fmt: skip
    return cells, queries


def _quality(runs: Sequence[RunEntry], entries: Mapping[tuple[int, str], str]) -> pd.DataFrame:
    """Per entry, over every photo it cloaked (a photo two runs both cloaked counted once): the budget it used."""
    parts = []
    for i, run in enumerate(runs):
        cloaks = table_frame(run.data, "cloaks")
        if cloaks.empty:
            continue
        part = cloaks[["seed", "identity", "image_id", *QUALITY]].copy()
        part["entry"] = [entries[(i, str(d))] for d in cloaks["defense"]]
        part["dataset"] = _dataset_key(run.data)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["photos", "linf_max", "l2_mean", "psnr_mean", "ssim_mean", "dssim_mean",
                                     "dssim_max"])  # fmt: skip
    every = pd.concat([p.astype({"identity": "string"}) for p in parts], ignore_index=True)
    every = every.drop_duplicates(["entry", "dataset", "seed", "identity", "image_id"])
    return every.groupby("entry", sort=False).agg(
        photos=("linf", "size"), linf_max=("linf", "max"), l2_mean=("l2", "mean"), psnr_mean=("psnr", "mean"),
        ssim_mean=("ssim", "mean"), dssim_mean=("dssim", "mean"), dssim_max=("dssim", "max"),
    )  # fmt: skip


def _cost(runs: Sequence[RunEntry], entries: Mapping[tuple[int, str], str]) -> dict[str, dict[str, Any]]:
    """Per entry: seconds per cloaked photo (each run's mean over its ok cells, then the mean over runs) and the
    devices of those runs."""
    per_run: dict[str, list[float]] = {}
    devices: dict[str, set[str]] = {}
    for i, run in enumerate(runs):
        seconds: dict[str, list[float]] = {}
        for c in run.data.cells:
            v = c.get("cloak_s_per_image")
            if c.get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v):
                seconds.setdefault(entries[(i, str(c["defense"]))], []).append(float(v))
        for entry, values in seconds.items():
            per_run.setdefault(entry, []).append(sum(values) / len(values))
            devices.setdefault(entry, set()).update(run.data.devices)
    return {
        e: {"s_per_image": sum(v) / len(v), "device": ", ".join(sorted(devices.get(e, ()))) or "–"}
        for e, v in per_run.items()
    }


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: by worst-case protection, then the lower end of its interval, then name; equal protection
    shares a rank (1, 1, 3)."""
    rows.sort(key=lambda r: (-r["protection"].value, -r["protection"].low, r["defense"]))
    for i, r in enumerate(rows):
        same = i > 0 and rows[i - 1]["protection"].value == r["protection"].value
        r["rank"] = rows[i - 1]["rank"] if same else i + 1
    return rows


def build_leaderboard(runs: Sequence[RunData], *, merge: bool = False) -> Leaderboard:
    """The leaderboard of ``runs`` (pure). The interval's confidence and resamples are the first run's suite's
    ``bootstrap`` settings. Raises :class:`ConfigError` when the runs differ (see :func:`check_runs`)."""
    if not runs:
        raise ConfigError("leaderboard: give at least one stored run")
    entries_of = run_entries(runs)
    merged = check_runs(entries_of, merge=merge)
    boot = runs[0].suite.get("bootstrap") or {}
    resamples, confidence = int(boot.get("resamples", 1000)), float(boot.get("confidence", 0.95))
    entries = defense_entries(entries_of)
    cells, queries = _pooled_rows(entries_of, entries)
    worst = [r for r in worst_case(queries, cells, resamples=resamples, confidence=confidence, seed=0)
             if r["recognizer"] == ANY_RECOGNIZER]  # fmt: skip
    people: dict[tuple[str, str], set[str]] = {}
    for q in queries:
        people.setdefault((str(q["protocol"]), str(q["defense"])), set()).add(str(q["protected_identity"]))
    holders: dict[tuple[str, str], list[str]] = {}  # (protocol, entry) -> the runs with an ok cell of it
    for i, run in enumerate(entries_of):
        for c in run.data.cells:
            key = (str(c["protocol"]), entries[(i, str(c["defense"]))])
            if c.get("status") == "ok" and run.label not in holders.setdefault(key, []):
                holders[key].append(run.label)
    quality = _quality(entries_of, entries)
    cost = _cost(entries_of, entries)
    rows: list[dict[str, Any]] = []
    listed = [str(p) for run in runs for p in run.suite.get("protocols") or ()]  # the suites' order
    for protocol in dict.fromkeys([*(p for p in listed if any(r["protocol"] == p for r in worst)),
                                   *(str(r["protocol"]) for r in worst)]):  # fmt: skip
        ranked = []
        for r in (r for r in worst if r["protocol"] == protocol):
            entry = str(r["defense"])
            q = quality.loc[entry].to_dict() if entry in quality.index else {}
            ranked.append({
                "protocol": protocol, "defense": entry,
                "protection": Estimate(float(r["worst_case_protection"]), float(r["ci_low"]), float(r["ci_high"])),
                "strongest": r["strongest"], "strongest_protection": float(r["strongest_protection"]),
                "trackers": int(r["n_countermeasures"]), "photos": int(r["n_queries"]),
                "people": len(people.get((protocol, entry), ())),
                "tracker_list": r["countermeasures"],
                **{k: (int(v) if k == "photos" else float(v)) for k, v in q.items() if k != "photos"},
                "cloaked_photos": int(q.get("photos", 0)),
                **cost.get(entry, {"s_per_image": float("nan"), "device": "–"}),
                "runs": ", ".join(holders.get((protocol, entry), [])),
            })  # fmt: skip
        rows += _ranked(ranked)
    return Leaderboard(runs=entries_of, rows=tuple(rows), merged=merged, confidence=confidence, resamples=resamples)


# -- tables ------------------------------------------------------------------------------------------------


def _text(key: str, header: str | None = None) -> Column:
    return Column(key=key, header=header or key, numeric=False)


def _slug(text: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in text.lower()).strip("-") or "x"


def leaderboard_table(board: Leaderboard, protocol: str) -> Table:
    rows = tuple(r for r in board.rows if r["protocol"] == protocol)
    return Table(
        name=f"leaderboard-{_slug(protocol)}",
        title=f"Leaderboard: {protocol} protocol",
        caption=(
            "Defenses ranked by worst-case protection: the share of the protected users' clean query photos that no "
            f"tracker of the runs identified (every recognizer, service, countermeasure and classifier whose cell "
            f"was ok; seeds pooled), with a {board.confidence:.0%} interval whose unit is the person "
            f"({INTERVAL_METHOD}). A defense that fewer trackers evaluated had an easier worst case: compare "
            "'trackers'. 'strongest': the tracker (recognizer/countermeasure/classifier) that identified the most "
            "photos alone. Quality over every photo the defense cloaked, on the stored 8-bit cloaks: SSIM mean, "
            "DSSIM = (1 - SSIM) / 2 mean and max, PSNR mean (dB), L-inf max in units of 1/255. Cost: milliseconds "
            "per cloaked photo as the runs measured it, on the device named."
        ),
        columns=(
            Column(key="rank", header="rank"),
            _text("defense"),
            Column(key="protection", header=f"worst-case protection ({board.confidence:.0%} CI)"),
            _text("strongest", "strongest tracker"),
            Column(key="strongest_protection", header="its protection"),
            Column(key="trackers", header="trackers"),
            Column(key="photos", header="query photos"),
            Column(key="people", header="people"),
            Column(key="ssim_mean", header="SSIM", digits=3),
            Column(key="dssim_mean", header="DSSIM mean", digits=4),
            Column(key="dssim_max", header="DSSIM max", digits=4),
            Column(key="psnr_mean", header="PSNR (dB)", digits=1),
            Column(key="linf_max", header="L-inf max (/255)", scale=255.0, digits=1),
            Column(key="s_per_image", header="ms / photo", scale=1000.0, digits=1),
            _text("device"),
            _text("runs"),
        ),
        rows=rows,
    )


def runs_table(board: Leaderboard) -> Table:
    rows = []
    for run in board.runs:
        d, suite = run.data, run.data.suite
        rows.append({
            "run": run.label, "results": str(d.source), "suite_digest": d.suite_digest[:16],
            "created": d.created_utc, "device": ", ".join(d.devices) or "–",
            "protocols": ", ".join(str(p) for p in suite.get("protocols") or ()),
            "dataset": json.dumps(suite.get("dataset") or {}, sort_keys=True, default=str),
            "protected": json.dumps(suite.get("protected") or {}, sort_keys=True, default=str),
            "defenses": len({str(c["defense"]) for c in d.cells}),
            "cells_ok": sum(1 for c in d.cells if c.get("status") == "ok"), "cells": len(d.cells),
        })  # fmt: skip
    return Table(
        name="runs",
        title="Runs ranked together",
        caption="Each stored run the leaderboard reads (opened read-only): its suite, data, threat models, and cells.",
        columns=(
            _text("run"),
            _text("results"),
            _text("suite_digest", "suite digest"),
            _text("created", "started (UTC)"),
            _text("device"),
            _text("protocols"),
            _text("dataset"),
            _text("protected"),
            Column(key="defenses", header="defenses"),
            Column(key="cells_ok", header="cells ok"),
            Column(key="cells", header="cells"),
        ),
        rows=tuple(rows),
    )


def leaderboard_tables(board: Leaderboard) -> tuple[Table, ...]:
    """One leaderboard table per protocol, then the table of runs."""
    return (*(leaderboard_table(board, p) for p in board.protocols), runs_table(board))


def _merge_note(board: Leaderboard) -> str:
    if not board.merged:
        return "The runs share their dataset, protected people and protocols."
    return "Merged (--merge): the runs differ in " + "; ".join(board.merged) + "."


def _title(board: Leaderboard) -> str:
    return "cloakbench leaderboard: " + ", ".join(r.label for r in board.runs)


def leaderboard_markdown(board: Leaderboard) -> str:
    parts = [f"# {markdown_text(_title(board))}\n", markdown_text(_merge_note(board)), ""]
    parts += [to_markdown(t, heading_level=2) for t in leaderboard_tables(board)]
    return "\n".join(parts)


# -- the figure and the page -------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def tradeoff_svg(board: Leaderboard, protocol: str) -> bytes | None:
    """Worst-case protection (bars: its interval) against the cloaks' mean PSNR, one point per defense in the
    report's style; None when no defense has a finite PSNR."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    from cloakbench.reports import figures as figs

    rows = [r for r in board.rows if r["protocol"] == protocol and _finite(r.get("psnr_mean"))]
    if not rows:
        return None
    with mpl.rc_context(figs.STYLE):
        fig = Figure(figsize=(figs.TWO_COLUMN_IN, 2.6), layout="constrained")
        ax = fig.subplots()
        for i, r in enumerate(rows):
            style = figs.series_style(i)
            est: Estimate = r["protection"]
            bars = [[max(est.value - est.low, 0.0)], [max(est.high - est.value, 0.0)]]
            ax.errorbar(
                [r["psnr_mean"]], [est.value], yerr=bars if _finite(est.low) else None, color=style.color,
                marker=style.marker, linestyle="none", capsize=2, elinewidth=0.8, label=str(r["defense"]),
            )  # fmt: skip
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("PSNR of the cloaks (dB, mean)")
        ax.set_ylabel("worst-case protection")
        ax.margins(x=0.1)
        fig.legend(loc="outside right upper", title="defense", alignment="left")
        return figs.figure_bytes(fig, "svg")


def leaderboard_html(board: Leaderboard) -> str:
    """The page (pure): the report's style, sorting script and Content-Security-Policy (no network, no script
    but its own); every text from data escaped."""
    esc = page.escape
    tables = leaderboard_tables(board)
    figures = []
    for protocol in board.protocols:
        svg = tradeoff_svg(board, protocol)
        if svg is not None:
            figures.append(page.EmbeddedFigure(
                name=f"tradeoff-{_slug(protocol)}", title=f"Quality vs worst-case protection ({protocol} protocol)",
                caption="Each defense's worst-case protection (bars: its interval) against the mean PSNR of its "
                "cloaks; top right is best.", mime="image/svg+xml", data=svg,
            ))  # fmt: skip
    nav = [f'<li><a href="#table-{esc(t.name)}">{esc(t.title)}</a></li>' for t in tables]
    nav += [f'<li><a href="#figure-{esc(f.name)}">{esc(f.title)}</a></li>' for f in figures]
    merged = "".join(f"<li>{esc(line)}</li>" for line in board.merged)
    merge_section = (
        f"<section id='merged'><h2>Merged runs</h2><p>These runs differ, and were pooled because --merge was "
        f"given:</p><ul>{merged}</ul></section>"
        if board.merged
        else f"<p class='muted'>{esc(_merge_note(board))}</p>"
    )
    return "".join([
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{esc(page.CONTENT_SECURITY_POLICY)}">',
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(_title(board))}</title><style>{page._CSS}</style></head><body>",
        f"<header><h1>{esc(_title(board))}</h1><p class='muted'>Defenses ranked by their worst case over every "
        "tracker of the runs, beside the image quality and cost of their cloaks.</p></header>",
        f"<nav><ul>{''.join(nav)}</ul></nav><main>",
        merge_section,
        *(page.table_html(t) for t in tables),
        *(page.figure_html(f) for f in figures),
        f"</main><script>{page._JS}</script></body></html>\n",
    ])  # fmt: skip


# -- writing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaderboardOutput:
    folder: Path
    files: tuple[Path, ...]
    board: Leaderboard


def write_leaderboard(results: Sequence[Path], out_dir: Path, *, merge: bool = False) -> LeaderboardOutput:
    """Read every run (read-only), rank, and write ``leaderboard.md``, ``leaderboard.html`` and
    ``tables/<name>.csv`` into ``out_dir``. Nothing is written when a run cannot be read or the runs are refused."""
    board = build_leaderboard([load_run(Path(r)) for r in results], merge=merge)
    files = []
    with disk_full_is_one_line(store_path(Path(results[0]))):
        for name, text in (
            ("leaderboard.md", leaderboard_markdown(board)),
            ("leaderboard.html", leaderboard_html(board)),
        ):
            atomic_write_text(out_dir / name, text)
            files.append(out_dir / name)
        for t in leaderboard_tables(board):
            path = out_dir / "tables" / f"{t.name}.csv"
            atomic_write_text(path, to_csv(t))
            files.append(path)
    return LeaderboardOutput(folder=out_dir, files=tuple(files), board=board)
