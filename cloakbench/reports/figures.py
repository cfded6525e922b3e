"""Paper-ready figures of a stored run (matplotlib, object API: no pyplot state, safe in any process).

One style for every figure: DejaVu Sans 8 pt (shipped with matplotlib, so a PDF embeds it everywhere), the
Okabe-Ito palette (distinguishable with every common colour-vision deficiency) with a marker per series as a
second cue, and ``cividis`` for heat maps. Each defense keeps its colour and marker in every figure (its
position in the suite), each recognizer its marker. Every figure is drawn for one paper column
(:data:`ONE_COLUMN_IN`) and for two (:data:`TWO_COLUMN_IN`), and saved as PDF (TrueType fonts embedded,
``pdf.fonttype`` 42), SVG (text kept as text) and PNG (300 dpi), with no time stamp: the same run gives the
same files.

Figure builders are pure functions of the report's pooled rows (:mod:`cloakbench.reports.summaries`); a
builder returns ``None`` when the run holds nothing it could show (no JPEG series, no stored grid, ...).
"""

from __future__ import annotations

import enum
import functools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cloakbench.cache import atomic_path
from cloakbench.reports.data import RunData
from cloakbench.reports.render import Estimate

ONE_COLUMN_IN = 3.33  # text column of the two-column USENIX / IEEE / ACM templates
TWO_COLUMN_IN = 7.0  # their full text width

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
"""Okabe & Ito (2008), 'Color Universal Design': blue, orange, bluish green, vermillion, reddish purple, sky blue,
black, and yellow last (it is faint on white)."""
MAX_BANDS = 4
"""Above this many defenses in one panel the confidence bands pile up into one grey area: lines only (the
intervals are in the protection table)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
HEATMAP = "cividis"  # perceptually uniform and readable with colour-vision deficiencies
FIGURE_FORMATS = ("pdf", "svg", "png")

STYLE: dict[Any, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "axes.prop_cycle": cycler(color=list(PALETTE)),
    "pdf.fonttype": 42,  # TrueType, embedded (Type 3 fonts are refused by some venues)
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # text stays text in SVG (editable, searchable)
    "svg.hashsalt": "cloakbench",  # stable element ids: the same figure gives the same SVG
    "savefig.dpi": 300,
    "image.interpolation": "none",
}


class Width(enum.Enum):
    ONE = "1col"
    TWO = "2col"

    @property
    def inches(self) -> float:
        return ONE_COLUMN_IN if self is Width.ONE else TWO_COLUMN_IN


@dataclass(frozen=True)
class SeriesStyle:
    color: str
    marker: str
    linestyle: Any  # one of LINESTYLES (matplotlib types it as a Literal)


def series_style(index: int) -> SeriesStyle:
    """The style of the ``index``-th series: 8 colours x 8 markers, then line styles for more than 8."""
    return SeriesStyle(
        PALETTE[index % len(PALETTE)], MARKERS[index % len(MARKERS)], LINESTYLES[(index // len(PALETTE)) % 4]
    )


@dataclass(frozen=True, kw_only=True)
class FigureSpec:
    """A figure of the report: file stem, title, caption (what is plotted, in words) and its builder."""

    name: str
    title: str
    caption: str
    build: Callable[[Width], Figure | None]
    """Draws the figure at a width; None when the run holds nothing it could show."""


# -- countermeasure intensity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Intensity:
    """How a transform's strength is read from its parameters: the parameter, the axis label, its default (the
    transform config's), its value when nothing is done, and whether smaller values are stronger."""

    param: str
    label: str
    default: float
    neutral: float
    smaller_is_stronger: bool


INTENSITIES: dict[str, Intensity] = {
    "jpeg": Intensity("quality", "JPEG quality", 75, 100, True),
    "blur": Intensity("sigma", "Gaussian blur σ (px)", 1.0, 0.0, False),
    "median": Intensity("size", "median filter size (px)", 3, 1, False),
    "resize": Intensity("factor", "resize factor", 0.5, 1.0, True),
    "bit-depth": Intensity("bits", "bits per channel", 4, 8, True),
    "gaussian-noise": Intensity("sigma", "Gaussian noise σ", 0.02, 0.0, False),
}
"""Transforms with one strength parameter (the defaults are checked against the transform configs in tests)."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _protection(row: Mapping[str, Any] | None) -> Estimate | None:
    if row is None:
        return None
    value = row.get("protection")
    if isinstance(value, Estimate) and _finite(value.value):
        return value
    return None


def _yerr(est: Estimate) -> list[list[float]] | None:
    """Error bar lengths below and above an estimate, or None without an interval."""
    if not (_finite(est.low) and _finite(est.high)):
        return None
    return [[max(est.value - est.low, 0.0)], [max(est.high - est.value, 0.0)]]


def _index(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    """(defense, recognizer, countermeasure) -> pooled row (rows of one protocol and classifier)."""
    return {(str(r["defense"]), str(r["recognizer"]), str(r["countermeasure"])): r for r in rows}


def _present(data: RunData, rows: Sequence[Mapping[str, Any]], axis: str) -> list[str]:
    return data.present(axis, (str(r[axis]) for r in rows))


def _baseline(data: RunData, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The countermeasure a figure about the cloaks alone shows: ``none`` when the suite has it, else its first."""
    return data.first("countermeasure", (str(r["countermeasure"]) for r in rows), prefer="none")


def _styles(data: RunData) -> dict[str, SeriesStyle]:
    return {d: series_style(i) for d, i in data.order("defense").items()}


def _defense_style(styles: Mapping[str, SeriesStyle], defense: str) -> SeriesStyle:
    return styles.get(defense, series_style(len(styles)))


def _new_figure(width: Width, height: float) -> Figure:
    return Figure(figsize=(width.inches, height), layout="constrained")


def _rate_axis(ax: Axes, *, label: bool) -> None:
    ax.set_ylim(-0.03, 1.03)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    if label:
        ax.set_ylabel("protection rate")


def _legend_handles(names: Sequence[str], styles: Mapping[str, SeriesStyle], *, lines: bool = True) -> list[Line2D]:
    handles = []
    for name in names:
        s = _defense_style(styles, name)
        handles.append(
            Line2D([], [], color=s.color, marker=s.marker, linestyle=s.linestyle if lines else "none", label=name)
        )
    return handles


def _top_legend(fig: Figure, handles: Sequence[Line2D], width: Width) -> None:
    ncols = min(len(handles), 4 if width is Width.ONE else 8)
    fig.legend(handles=list(handles), loc="outside upper center", ncols=max(ncols, 1), handlelength=1.8)


def _families(data: RunData, countermeasures: Sequence[str]) -> dict[tuple[str, str], list[tuple[float, str]]]:
    """(transform name, apply_to) -> sorted [(strength value, countermeasure label)], for the transforms of
    :data:`INTENSITIES` that the run used."""
    out: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for label in countermeasures:
        spec = data.spec("countermeasure", label)
        intensity = INTENSITIES.get(str(spec.get("name", "")))
        if intensity is None:
            continue
        value = (spec.get("params") or {}).get(intensity.param, intensity.default)
        out[(str(spec["name"]), str(spec.get("apply_to", "")))].append((float(value), label))
    return {k: sorted(v) for k, v in out.items()}


def intensity_figure(data: RunData, rows: Sequence[Mapping[str, Any]], width: Width) -> Figure | None:
    """Protection vs countermeasure strength: a column per transform (JPEG, blur, ...), a row per recognizer,
    a line per defense with its confidence band; the ``none`` countermeasure is each line's first point (at
    the strength that does nothing). The x axis runs from weak to strong."""
    countermeasures = _present(data, rows, "countermeasure")
    families = _families(data, countermeasures)
    if not families:
        return None
    none = [c for c in countermeasures if data.spec("countermeasure", c).get("name") == "none"]
    recognizers = _present(data, rows, "recognizer")
    defenses = _present(data, rows, "defense")
    cells = _index(rows)
    styles = _styles(data)
    ncols, nrows = len(families), len(recognizers)
    panel_w = width.inches / ncols
    height = nrows * min(max(panel_w * 0.8, 1.2), 2.0) + 0.45
    fig = _new_figure(width, height)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for c, ((name, apply_to), members) in enumerate(families.items()):
        intensity = INTENSITIES[name]
        for r, recognizer in enumerate(recognizers):
            ax = axes[r][c]
            for defense in defenses:
                points = sorted(([(intensity.neutral, none[0])] if none else []) + members)  # in x order
                xs, ys, lo, hi = [], [], [], []
                for x, cm in points:
                    est = _protection(cells.get((defense, recognizer, cm)))
                    if est is None:
                        continue
                    xs.append(x)
                    ys.append(est.value)
                    lo.append(est.low if _finite(est.low) else est.value)
                    hi.append(est.high if _finite(est.high) else est.value)
                if not xs:
                    continue
                s = _defense_style(styles, defense)
                ax.plot(xs, ys, color=s.color, marker=s.marker, linestyle=s.linestyle, label=defense)
                if len(defenses) <= MAX_BANDS:
                    ax.fill_between(xs, lo, hi, color=s.color, alpha=0.12, linewidth=0)
            if intensity.smaller_is_stronger and not ax.xaxis_inverted():
                ax.invert_xaxis()
            _rate_axis(ax, label=c == 0)
            if c == 0:
                ax.set_ylabel(f"{recognizer}\nprotection rate")
            if r == 0:
                ax.set_title(f"{name} ({apply_to})" if apply_to else name)
            if r == nrows - 1:
                ax.set_xlabel(intensity.label)
    _top_legend(fig, _legend_handles(defenses, styles), width)
    return fig


# -- perturbation budget ------------------------------------------------------------------------------------

_PRESET_SUFFIXES = ("-min", "-low", "-mid", "-high", "-ultra")


def defense_family(name: str) -> str:
    """A defense's family: its registry name without a preset suffix (fawkes-high -> fawkes, pgd -> pgd)."""
    for suffix in _PRESET_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


BUDGET_AXES = (("linf_max", "max L-inf (/255)", 255.0), ("dssim_mean", "mean DSSIM", 1.0))


def budget_figure(
    data: RunData, rows: Sequence[Mapping[str, Any]], quality: Sequence[Mapping[str, Any]], width: Width
) -> Figure | None:
    """Protection vs the perturbation each defense actually used, measured on its cloaks: L-inf (top row) and
    DSSIM (bottom row), a column per recognizer; the defenses of one family (PGD at several budgets, Fawkes'
    presets) are joined by a line in budget order. Countermeasure: ``none`` (else the suite's first)."""
    measured = {str(q["defense"]): q for q in quality}
    cm = _baseline(data, rows)
    if not measured or cm is None:
        return None
    recognizers = _present(data, rows, "recognizer")
    defenses = [d for d in _present(data, rows, "defense") if d in measured]
    if not defenses:
        return None
    families: dict[str, list[str]] = defaultdict(list)
    for d in defenses:
        families[defense_family(str(data.spec("defense", d).get("name", d)))].append(d)

    def budgets(members: list[str]) -> set[tuple[float, float]]:
        return {(round(float(measured[d]["linf_max"]), 5), round(float(measured[d]["dssim_mean"]), 5)) for d in members}

    if all(len(budgets(m)) < 2 for m in families.values()):
        return None  # one budget per family: unrelated points (the trade-off figure shows them better)
    cells = _index(rows)
    styles = _styles(data)
    ncols = len(recognizers)
    panel_w = width.inches / ncols
    height = 2 * min(max(panel_w * 0.75, 1.1), 1.9) + 0.45
    fig = _new_figure(width, height)
    axes = fig.subplots(2, ncols, squeeze=False, sharey=True)
    for r, (metric, label, scale) in enumerate(BUDGET_AXES):
        for c, recognizer in enumerate(recognizers):
            ax = axes[r][c]
            for members in families.values():
                pts = []
                for d in members:
                    est = _protection(cells.get((d, recognizer, cm)))
                    x: Any = measured[d].get(metric)
                    if est is not None and _finite(x):
                        pts.append((float(x) * scale, est, d))
                pts.sort(key=lambda p: p[0])
                if len(pts) > 1:
                    ax.plot([p[0] for p in pts], [p[1].value for p in pts], color="0.6", linewidth=0.8, zorder=1)
                for x, est, d in pts:
                    s = _defense_style(styles, d)
                    ax.errorbar(
                        [x], [est.value], yerr=_yerr(est), color=s.color, marker=s.marker, linestyle="none",
                        capsize=1.5, elinewidth=0.8, zorder=2,
                    )  # fmt: skip
            _rate_axis(ax, label=c == 0)
            ax.set_xlim(0, ax.get_xlim()[1] * 1.06)  # from no perturbation; room for the last marker
            if r == 0:
                ax.set_title(recognizer)
            ax.set_xlabel(label)
    _top_legend(fig, _legend_handles(defenses, styles, lines=False), width)
    return fig


# -- defense x recognizer heat map ------------------------------------------------------------------------


def heatmap_figure(data: RunData, rows: Sequence[Mapping[str, Any]], width: Width) -> Figure | None:
    """A defense x recognizer matrix of protection rates per countermeasure (the transfer table as a picture):
    the value in each cell; a hatched grey cell is one that was refused, failed or skipped."""
    countermeasures = _present(data, rows, "countermeasure")
    defenses = _present(data, rows, "defense")
    recognizers = _present(data, rows, "recognizer")
    if not (countermeasures and defenses and recognizers):
        return None
    cells = _index(rows)
    per_row = 1 if width is Width.ONE else max(1, min(len(countermeasures), 3))
    nrows = math.ceil(len(countermeasures) / per_row)
    panel_w = width.inches / per_row
    cell_w = (panel_w - 1.1) / max(len(recognizers), 1)
    panel_h = max(0.9, min(cell_w, 0.32) * len(defenses) + 0.75)
    fig = _new_figure(width, nrows * panel_h + 0.3)
    axes = fig.subplots(nrows, per_row, squeeze=False)
    cmap = mpl.colormaps[HEATMAP]
    image = None
    for k, cm in enumerate(countermeasures):
        ax = axes[k // per_row][k % per_row]
        grid = np.full((len(defenses), len(recognizers)), np.nan)
        for i, d in enumerate(defenses):
            for j, rec in enumerate(recognizers):
                est = _protection(cells.get((d, rec, cm)))
                if est is not None:
                    grid[i, j] = est.value
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_facecolor("0.88")
        ax.grid(False)
        for i, d in enumerate(defenses):
            for j, rec in enumerate(recognizers):
                v = grid[i, j]
                if math.isnan(v):
                    row = cells.get((d, rec, cm))
                    status = str(row.get("status", "")).split(":")[0] if row else ""
                    ax.add_patch(
                        mpl.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.7", lw=0)
                    )
                    ax.text(
                        j, i, status[:8] or "–", ha="center", va="center", fontsize=6, color="0.2",
                        bbox={"facecolor": "0.88", "edgecolor": "none", "pad": 1.0},
                    )  # fmt: skip
                    continue
                ax.text(
                    j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if v < 0.55 else "black"
                )
        ax.set_xticks(range(len(recognizers)), labels=recognizers, rotation=30, ha="right")
        ax.set_yticks(range(len(defenses)), labels=defenses if k % per_row == 0 else [""] * len(defenses))
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"countermeasure: {cm}")
    for k in range(len(countermeasures), nrows * per_row):
        axes[k // per_row][k % per_row].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="protection rate", aspect=30)
    return fig


# -- quality vs protection --------------------------------------------------------------------------------


def tradeoff_figure(
    data: RunData, rows: Sequence[Mapping[str, Any]], quality: Sequence[Mapping[str, Any]], width: Width
) -> Figure | None:
    """Image quality (mean PSNR of the cloaks, dB; right is more faithful) against protection: a colour per
    defense, a marker per recognizer, interval bars; countermeasure ``none`` (else the suite's first). The
    best defenses sit top right."""
    measured = {str(q["defense"]): q for q in quality}
    cm = _baseline(data, rows)
    if not measured or cm is None:
        return None
    defenses = [d for d in _present(data, rows, "defense") if d in measured and _finite(measured[d].get("psnr_mean"))]
    recognizers = _present(data, rows, "recognizer")
    if not defenses:
        return None
    cells = _index(rows)
    styles = _styles(data)
    fig = _new_figure(width, 2.3 if width is Width.ONE else 2.6)
    ax = fig.subplots()
    rec_marker = {rec: MARKERS[i % len(MARKERS)] for i, rec in enumerate(recognizers)}
    psnr = [float(measured[d]["psnr_mean"]) for d in defenses]
    span = max(max(psnr) - min(psnr), 1.0)
    for d in defenses:
        color = _defense_style(styles, d).color
        for i, rec in enumerate(recognizers):
            est = _protection(cells.get((d, rec, cm)))
            if est is None:
                continue
            # recognizers of one defense side by side (same PSNR), so equal rates do not hide each other
            x = float(measured[d]["psnr_mean"]) + (i - (len(recognizers) - 1) / 2) * 0.015 * span
            ax.errorbar(
                [x], [est.value], yerr=_yerr(est), color=color, marker=rec_marker[rec], linestyle="none", capsize=1.5,
                elinewidth=0.8, markeredgecolor="white", markeredgewidth=0.4,
            )  # fmt: skip
    _rate_axis(ax, label=True)
    ax.set_xlabel("PSNR of the cloaks (dB, mean)")
    ax.set_title(f"countermeasure: {cm}")
    color_handles = [Line2D([], [], color=_defense_style(styles, d).color, marker="s", linestyle="none", label=d)
                     for d in defenses]  # fmt: skip
    marker_handles = [Line2D([], [], color="0.3", marker=rec_marker[r], linestyle="none", label=r) for r in recognizers]
    ax.margins(x=0.08)
    fig.legend(handles=color_handles, loc="outside right upper", title="defense", alignment="left")
    fig.legend(handles=marker_handles, loc="outside right lower", title="recognizer", alignment="left")
    return fig


# -- cost --------------------------------------------------------------------------------------------------


def cost_figure(data: RunData, cost: Sequence[Mapping[str, Any]], width: Width) -> Figure | None:
    """Milliseconds per cloaked photo for each defense (a log axis when they span more than 30x), with the
    device the run used."""
    rows = [r for r in cost if _finite(r.get("s_per_image")) and float(r["s_per_image"]) > 0]
    if not rows:
        return None
    styles = _styles(data)
    values = [1000.0 * float(r["s_per_image"]) for r in rows]
    names = [str(r["defense"]) for r in rows]
    fig = _new_figure(width, 0.35 + 0.22 * len(rows) + 0.4)
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, values, color=[_defense_style(styles, n).color for n in names], height=0.65)
    ax.set_yticks(y, labels=names)
    ax.invert_yaxis()
    if max(values) / min(values) > 30:
        ax.set_xscale("log")
    for yi, v in zip(y, values, strict=True):
        ax.text(v, float(yi), f" {v:.3g}", va="center", fontsize=6.5)
    ax.set_xlim(right=max(values) * (3.0 if ax.get_xscale() == "log" else 1.18))
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"milliseconds per cloaked photo ({', '.join(data.devices) or 'device unknown'})")
    return fig


# -- image grids -------------------------------------------------------------------------------------------

GRID_ROWS = ("original", "cloaked", "difference ×10")


def grids_figure(data: RunData, width: Width) -> Figure | None:
    """Each defense's stored grid (original / cloaked / difference amplified 10x around grey, of the first
    protected identity's first photos) with its label; pixels drawn as stored, not resampled."""
    labels = [d for d in sorted(data.grids, key=lambda d: (data.order("defense").get(d, 1 << 30), d))]
    if not labels:
        return None
    per_row = 1 if width is Width.ONE and len(labels) <= 2 else 2  # a column holds two defenses a row beyond 2
    nrows = math.ceil(len(labels) / per_row)
    first = data.grids[labels[0]]
    aspect = first.shape[0] / first.shape[1]
    panel_w = (width.inches - 0.75) / per_row  # row labels on the left take about 0.75 in
    fig = _new_figure(width, nrows * (panel_w * aspect + 0.3) + 0.05)
    axes = fig.subplots(nrows, per_row, squeeze=False)
    for k, label in enumerate(labels):
        ax = axes[k // per_row][k % per_row]
        grid = data.grids[label]
        ax.imshow(grid, interpolation="none")
        ax.set_title(label)
        ax.set_xticks([])
        h = grid.shape[0] / 3
        labels_here = list(GRID_ROWS) if k % per_row == 0 else ["", "", ""]  # the rows are named once, on the left
        ax.set_yticks([h * (i + 0.5) for i in range(3)], labels=labels_here, fontsize=6)
        ax.tick_params(length=0)
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
    for k in range(len(labels), nrows * per_row):
        axes[k // per_row][k % per_row].set_visible(False)
    return fig


# -- saving ------------------------------------------------------------------------------------------------

_METADATA: dict[str, dict[str, Any]] = {
    "pdf": {"CreationDate": None, "Producer": None, "Creator": "cloakbench"},
    "svg": {"Date": None, "Creator": "cloakbench"},
    "png": {"Software": "cloakbench"},
}


def render(spec: FigureSpec, width: Width) -> Figure | None:
    """Draw a figure in the report's style."""
    with mpl.rc_context(STYLE):
        return spec.build(width)


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Write ``<stem>.<fmt>`` for each format, atomically, without time stamps."""
    written = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(STYLE):
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, metadata=_METADATA[fmt])
            written.append(path)
    return written


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    with mpl.rc_context(STYLE):
        fig.savefig(buffer, format=fmt, metadata=_METADATA[fmt], dpi=150 if fmt == "png" else None)
    return buffer.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in text.lower()).strip("-") or "x"


def report_figures(
    data: RunData, pooled: Sequence[Mapping[str, Any]], quality: Sequence[Mapping[str, Any]],
    cost: Sequence[Mapping[str, Any]],
) -> list[FigureSpec]:  # fmt: skip
    """Every figure of the report: the protection figures once per (protocol, classifier), then cost and grids.
    A spec whose builder returns None (nothing to draw) is left out by the writer."""
    specs: list[FigureSpec] = []
    for protocol in _present(data, pooled, "protocol"):
        for clf in _present(data, pooled, "classifier"):
            rows = [r for r in pooled if r["protocol"] == protocol and r["classifier"] == clf]
            if not rows:
                continue
            tag = f"{_slug(protocol)}-{_slug(clf)}"
            where = f"{protocol} protocol, {clf} tracker"
            specs += [
                FigureSpec(
                    name=f"heatmap-{tag}", title=f"Defense x recognizer ({where})",
                    caption="Protection rate per defense (rows) and recognizer (columns) for each countermeasure; "
                    "hatched: no result (refused, failed or skipped).",
                    build=functools.partial(heatmap_figure, data, rows),
                ),
                FigureSpec(
                    name=f"intensity-{tag}", title=f"Protection vs countermeasure strength ({where})",
                    caption="Protection rate as each input transform gets stronger (weak to strong, left to right; the "
                    f"first point is no countermeasure); bands: the rates' confidence intervals (drawn for up to "
                    f"{MAX_BANDS} defenses; the protection table has them all).",
                    build=functools.partial(intensity_figure, data, rows),
                ),
                FigureSpec(
                    name=f"budget-{tag}", title=f"Protection vs perturbation budget ({where})",
                    caption="Protection rate (no countermeasure) vs the perturbation each defense's cloaks measured: "
                    "max L-inf (top) and mean DSSIM (bottom); grey lines join one defense family's budgets.",
                    build=functools.partial(budget_figure, data, rows, quality),
                ),
                FigureSpec(
                    name=f"tradeoff-{tag}", title=f"Image quality vs protection ({where})",
                    caption="Mean PSNR of each defense's cloaks vs its protection rate (no countermeasure); colour: "
                    "defense, marker: recognizer; top right is best.",
                    build=functools.partial(tradeoff_figure, data, rows, quality),
                ),
            ]  # fmt: skip
    specs.append(
        FigureSpec(
            name="cost", title="Cost per cloaked photo",
            caption="Milliseconds per cloaked photo for each defense, as the run measured it.",
            build=functools.partial(cost_figure, data, cost),
        )
    )  # fmt: skip
    specs.append(
        FigureSpec(
            name="grids", title="What the cloaks look like",
            caption="Original / cloaked / difference x10 (grey: no change) of the first protected identity's first "
            "photos, for each defense.",
            build=functools.partial(grids_figure, data),
        )
    )  # fmt: skip
    return specs
