"""``cloakbench report``: tables, figures and the HTML page of a stored run, written into one folder.

Layout of ``<out>/`` (default ``<run>/report/``)::

    report.md                  every table, then every figure (PNG links), for reading on a forge
    report.html                one self-contained page: sortable tables, figures, run metadata, the suite
    report.tex                 a LaTeX document that \\input-s every table and includes every figure (PDF)
    tables/<name>.md|tex|csv   each table alone (booktabs LaTeX ready to \\input; CSV at full precision)
    figures/<name>-1col.*      each figure one paper column wide, and
    figures/<name>-2col.*      two columns wide (PDF with embedded fonts, SVG, PNG at 300 dpi)

Everything is a function of the results store: no model is loaded, no dataset read, nothing recomputed,
and the same store gives the same files. The store is opened read-only; every file is written to a temporary
file and renamed onto its name, so a full disk leaves each file as it was and says so in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloakbench.bench.export import store_path
from cloakbench.bench.store import disk_full_is_one_line
from cloakbench.cache import atomic_write_text
from cloakbench.errors import ConfigError
from cloakbench.reports import figures as figs
from cloakbench.reports.data import RunData, load_run, suite_yaml
from cloakbench.reports.html import EmbeddedFigure, report_html
from cloakbench.reports.render import Table, latex_text, markdown_text, to_csv, to_latex, to_markdown
from cloakbench.reports.summaries import cost_rows, pooled_cells, pooled_quality, report_tables

FORMATS = ("md", "latex", "csv", "html")


def parse_list(text: str, allowed: Sequence[str], option: str) -> tuple[str, ...]:
    """A comma-separated option value checked against ``allowed`` (``none`` means the empty list)."""
    items = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if items == ("none",):
        return ()
    unknown = [f for f in items if f not in allowed]
    if unknown or not items:
        raise ConfigError(f"{option}: unknown value(s) {unknown or [text]}; choose from {', '.join(allowed)} or none")
    return items


@dataclass
class ReportOutput:
    folder: Path
    files: list[Path] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def _facts(data: RunData) -> list[tuple[str, str]]:
    finished = [a for a in data.attempts if a.get("status") == "finished"]
    done = sum(1 for t in data.tasks if t["status"] == "ok")
    planned = len(data.plan) or len(data.tasks)
    last = data.attempts[-1] if data.attempts else {}
    git = (last.get("metadata") or {}).get("git") or {}
    packages = (last.get("metadata") or {}).get("packages") or {}
    return [
        ("suite", data.name),
        ("results", str(data.source)),
        ("suite digest", data.suite_digest[:16]),
        ("started (UTC)", data.created_utc),
        ("tasks", f"{done} of {planned} finished ok" + ("" if done == planned else " (incomplete run)")),
        ("attempts", f"{len(data.attempts)} ({len(finished)} finished)"),
        ("device", ", ".join(data.devices) or "unknown"),
        ("git commit", f"{git.get('commit', 'unknown')}{' (dirty)' if git.get('dirty') else ''}"),
        ("torch", str(packages.get("torch", "unknown"))),
    ]


def _latex_document(data: RunData, tables: Sequence[Table], figure_names: Sequence[tuple[str, str]]) -> str:
    lines = [
        "% A LaTeX document with every table and figure of the report: pdflatex report.tex",
        r"\documentclass[10pt]{article}",
        r"\usepackage[T1]{fontenc}",
        r"\usepackage[utf8]{inputenc}",
        r"\usepackage[margin=0.8in,landscape]{geometry}",
        r"\usepackage{booktabs,graphicx,float}",
        r"\begin{document}",
        rf"\section*{{cloakbench report: {latex_text(data.name)}}}",
    ]
    for t in tables:
        lines += [
            r"\begin{table}[H]\centering\scriptsize",
            rf"\caption{{{latex_text(t.title)}. {latex_text(t.caption)}}}",
            rf"\resizebox{{\ifdim\width>\linewidth\linewidth\else\width\fi}}{{!}}{{\input{{tables/{t.name}.tex}}}}",
            r"\end{table}",
        ]
    for name, caption in figure_names:
        lines += [
            r"\begin{figure}[H]\centering",
            rf"\includegraphics{{figures/{name}-2col.pdf}}",
            rf"\caption{{{latex_text(caption)}}}",
            r"\end{figure}",
        ]
    lines.append(r"\end{document}")
    return "\n".join(lines) + "\n"


def write_report(
    results: Path, out_dir: Path | None = None, *, formats: Sequence[str] = FORMATS,
    figure_formats: Sequence[str] = figs.FIGURE_FORMATS,
) -> ReportOutput:  # fmt: skip
    """Write the report of the run stored in ``results`` (a run folder or its ``results.sqlite``)."""
    data = load_run(results)
    folder = out_dir if out_dir is not None else (results if results.is_dir() else results.parent) / "report"
    with disk_full_is_one_line(store_path(results)):
        return _write(data, folder, formats, figure_formats)


def _write(data: RunData, folder: Path, formats: Sequence[str], figure_formats: Sequence[str]) -> ReportOutput:
    out = ReportOutput(folder=folder)
    pooled = pooled_cells(data)
    quality = pooled_quality(data)
    cost = cost_rows(data, pooled)
    tables = report_tables(data)
    out.tables = [t.name for t in tables]

    writers = {"md": ("md", to_markdown), "latex": ("tex", to_latex), "csv": ("csv", to_csv)}
    for fmt in formats:
        if fmt in writers:
            suffix, fn = writers[fmt]
            for t in tables:
                path = folder / "tables" / f"{t.name}.{suffix}"
                atomic_write_text(path, fn(t))
                out.files.append(path)

    embedded: list[EmbeddedFigure] = []
    drawn: list[tuple[str, str, str]] = []  # name, title, caption
    want_html = "html" in formats
    if figure_formats or want_html:
        for spec in figs.report_figures(data, pooled, quality, cost):
            for width in figs.Width:
                fig = figs.render(spec, width)
                if fig is None:
                    break
                stem = folder / "figures" / f"{spec.name}-{width.value}"
                if figure_formats:
                    out.files += figs.save_figure(fig, stem, figure_formats)
                if want_html and width is figs.Width.TWO:
                    raster = spec.name == "grids"  # photos: a 150-dpi PNG; plots: the SVG (written once)
                    if raster:
                        image = figs.figure_bytes(fig, "png")
                    elif "svg" in figure_formats:
                        image = stem.with_name(f"{stem.name}.svg").read_bytes()
                    else:
                        image = figs.figure_bytes(fig, "svg")
                    embedded.append(
                        EmbeddedFigure(
                            name=spec.name, title=spec.title, caption=spec.caption,
                            mime="image/png" if raster else "image/svg+xml", data=image,
                        )
                    )  # fmt: skip
            else:
                drawn.append((spec.name, spec.title, spec.caption))
                out.figures.append(spec.name)

    if "md" in formats:
        parts = [
            f"# cloakbench report: {markdown_text(data.name)}\n",
            markdown_text(str(data.suite.get("description", ""))),
            "",
        ]
        parts += [f"- {markdown_text(k)}: {markdown_text(v)}" for k, v in _facts(data)]
        parts.append("")
        parts += [to_markdown(t, heading_level=2) for t in tables]
        if "png" in figure_formats:
            for name, title, caption in drawn:
                parts.append(f"## {markdown_text(title)}\n\n![{markdown_text(title)}](figures/{name}-2col.png)\n\n"
                             f"{markdown_text(caption)}\n")  # fmt: skip
        path = folder / "report.md"
        atomic_write_text(path, "\n".join(parts))
        out.files.append(path)
    if "latex" in formats:
        path = folder / "report.tex"
        atomic_write_text(
            path, _latex_document(data, tables, [(n, c) for n, _, c in drawn] if "pdf" in figure_formats else [])
        )
        out.files.append(path)
    if want_html:
        page = report_html(
            title=f"cloakbench report: {data.name}", description=str(data.suite.get("description", "")),
            facts=_facts(data), tables=tables, figures=embedded, suite_yaml=suite_yaml(data), attempts=data.attempts,
        )  # fmt: skip
        path = folder / "report.html"
        atomic_write_text(path, page)
        out.files.append(path)
    _remove_stale(folder, out.files)
    return out


def _remove_stale(folder: Path, written: Sequence[Path]) -> None:
    """tables/ and figures/ belong to the report: files an earlier report left there that this one did not
    write (a figure with nothing to draw any more, a format not asked for) are removed, so the folder never
    mixes two reports."""
    keep = {p.resolve() for p in written}
    for sub in ("tables", "figures"):
        d = folder / sub
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and f.resolve() not in keep:
                    f.unlink()
