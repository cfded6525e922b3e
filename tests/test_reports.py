"""``cloakbench report`` on a real stored run: every table and figure, a self-contained HTML page checked in
headless Chromium, escaping of data, determinism, and no model work.

The run: 4 celeb24 identities (one named ``<script>alert(1)</script>`` through the dataset's names file), two
protected; PGD at two budgets and uniform noise against SFace (PyTorch and onnxruntime), with JPEG at two
qualities — enough for every figure type. It has its own artifact cache, so the cost per photo is measured.

Chromium (Debian's ``chromium``) and ``pdffonts`` (``poppler-utils``) are installed by ``.ci/run``; on a machine
without them the tests that need them are skipped, unless ``CLOAKBENCH_REQUIRE_TOOLS=1`` (set by ``.ci/run``)
makes a missing tool a failure.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from cloakbench.cache import overlay_cache
from cloakbench.cli import EXIT_BAD_INPUT, main
from cloakbench.reports.build import write_report
from cloakbench.reports.data import RunData, load_run
from cloakbench.reports.figures import INTENSITIES
from cloakbench.reports.render import Column, Estimate, Table, to_csv, to_latex, to_markdown
from cloakbench.reports.summaries import pooled_cells

SCRIPT = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"
FIGURE_KINDS = ("heatmap", "intensity", "budget", "tradeoff", "cost", "grids")


def _tool(path: str | None, what: str) -> str:
    if path and Path(path).exists():
        return path
    message = f"{what} is not installed (apt-get install {'chromium' if 'hromium' in what else 'poppler-utils'})"
    if os.environ.get("CLOAKBENCH_REQUIRE_TOOLS") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory, names_dataset: tuple[Path, Path]) -> Path:
    root, names = names_dataset
    work = tmp_path_factory.mktemp("report_run")
    suite = {
        "name": "report-test",
        "description": f"Report test: identity {SCRIPT} & friends | pipes",
        "dataset": {"source": "folder", "path": str(root), "names": str(names)},
        "protected": {"identities": [SCRIPT, "Drew_Barrymore"]},
        "defenses": [
            {"name": "pgd", "label": "pgd-4", "params": {"epsilon": 4 / 255, "steps": 5}},
            {"name": "pgd", "label": "pgd-8", "params": {"epsilon": 8 / 255, "steps": 5}},
            "noise",
        ],
        "recognizers": ["sface", "sface-onnx"],
        "countermeasures": [
            "none",
            {"name": "jpeg", "label": "jpeg-75", "params": {"quality": 75}, "apply_to": "both"},
            {"name": "jpeg", "label": "jpeg-50", "params": {"quality": 50}, "apply_to": "both"},
        ],
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 200},
    }
    path = work / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    cache = work / "cache"
    overlay_cache(cache)  # fresh artifacts (the cloaks' cost is measured), shared model files
    env = {**os.environ, "CLOAKBENCH_CACHE": str(cache)}
    run = work / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cloakbench.cli", "run", str(path), "--out", str(run), "--quiet"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def report(stored_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``cloakbench report`` in a fresh process whose cache is an empty folder: it must load no torch (so no
    model) and create nothing in the cache."""
    out = tmp_path_factory.mktemp("report") / "out"
    empty_cache = tmp_path_factory.mktemp("empty_cache")
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "from cloakbench.cli import main\n"
        f"rc = main(['report', {str(stored_run)!r}, '--out', {str(out)!r}, '--quiet'])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'onnxruntime': 'onnxruntime' in sys.modules,"
        " 'seconds': time.perf_counter() - t}))\n"
    )
    env = {**os.environ, "CLOAKBENCH_CACHE": str(empty_cache)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    outcome["out"] = out
    outcome["cache_entries"] = sorted(p.name for p in empty_cache.iterdir())
    return outcome


# -- no model work ------------------------------------------------------------------------------------------


def test_report_on_a_stored_run_loads_no_model(report: dict[str, Any]) -> None:
    assert report["rc"] == 0
    assert report["torch"] is False, "the report imported torch: it must read the store only"
    assert report["onnxruntime"] is False
    assert report["cache_entries"] == [], f"the report wrote into the cache: {report['cache_entries']}"
    # measured on the 2-core CI machine: ~8 s for 7 tables and 14 figure files x 3 formats; a report that
    # re-ran models would take minutes
    assert report["seconds"] < 120


# -- tables -------------------------------------------------------------------------------------------------


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tables_in_every_format_match_the_stored_cells(report: dict[str, Any], stored_run: Path) -> None:
    out: Path = report["out"]
    for name in ("protection", "worst-case", "clean-accuracy", "quality", "cost", "time", "identities"):
        for suffix in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{suffix}").stat().st_size > 0, f"{name}.{suffix}"
    rows = _csv_rows(out / "tables" / "protection.csv")
    with (stored_run / "summary.csv").open() as f:
        cells = list(csv.DictReader(f))
    assert len(rows) == len(cells) == 3 * 2 * 3  # defenses x recognizers x countermeasures
    by_key = {(r["defense"], r["recognizer"], r["countermeasure"]): r for r in rows}
    for c in cells:
        r = by_key[(c["defense"], c["recognizer"], c["countermeasure"])]
        for mine, theirs in (("protection", "protection_rate"), ("protection_ci_low", "ci_low"),
                             ("protection_ci_high", "ci_high")):  # fmt: skip
            assert float(r[mine]) == pytest.approx(float(c[theirs]), abs=1e-12)
    # PGD protects against the white-box model without a countermeasure, noise does not (measured: 1.00 vs 0.00)
    assert float(by_key[("pgd-8", "sface", "none")]["protection"]) >= 0.8
    assert float(by_key[("noise", "sface", "none")]["protection"]) <= 0.3
    cost = {r["defense"]: r for r in _csv_rows(out / "tables" / "cost.csv")}
    assert float(cost["pgd-8"]["s_per_image"]) > float(cost["noise"]["s_per_image"]) > 0
    latex = (out / "tables" / "protection.tex").read_text()
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    assert latex.count("\\\\") == len(rows) + 1  # header + one line per row
    identities = (out / "tables" / "identities.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in identities and SCRIPT not in identities
    assert "\\textless{}script\\textgreater{}" in (out / "tables" / "identities.tex").read_text()
    assert SCRIPT in {r["identity"] for r in _csv_rows(out / "tables" / "identities.csv")}


# -- figures ------------------------------------------------------------------------------------------------


def _pdf_fonts_embedded(data: bytes) -> tuple[int, int]:
    """(font descriptors, descriptors with an embedded font file) of a PDF (matplotlib's are uncompressed
    dictionaries); a Type 3 font counts as not embedded."""
    descriptors = re.findall(rb"/Type\s*/FontDescriptor(.*?)>>", data, flags=re.S)
    embedded = sum(1 for d in descriptors if re.search(rb"/FontFile[23]?\s", d))
    if b"/Subtype /Type3" in data:
        return len(descriptors) + 1, embedded
    return len(descriptors), embedded


def test_every_figure_type_in_both_widths_and_three_formats(report: dict[str, Any]) -> None:
    out: Path = report["out"] / "figures"
    stems = {p.name.rsplit(".", 1)[0] for p in out.iterdir()}
    for kind in FIGURE_KINDS:
        names = [s for s in stems if s.startswith(kind)]
        assert names, f"no {kind} figure in {sorted(stems)}"
        for stem in names:
            for fmt in ("pdf", "svg", "png"):
                assert (out / f"{stem}.{fmt}").stat().st_size > 1000, f"{stem}.{fmt}"
    widths = {}
    for width in ("1col", "2col"):
        with Image.open(out / f"heatmap-poisoning-nearest-neighbour-{width}.png") as img:
            widths[width] = img.size[0] / (img.info["dpi"][0])
            pixels = np.asarray(img.convert("L"), dtype=np.float64)
        assert pixels.std() > 20  # not blank
    assert widths["1col"] == pytest.approx(3.33, abs=0.02) and widths["2col"] == pytest.approx(7.0, abs=0.02)
    for pdf in out.glob("*.pdf"):
        data = pdf.read_bytes()
        total, embedded = _pdf_fonts_embedded(data)
        assert total >= 1 and embedded == total, f"{pdf.name}: {embedded} of {total} fonts embedded"


def test_pdffonts_says_every_font_is_embedded(report: dict[str, Any]) -> None:
    pdffonts = _tool(shutil.which("pdffonts"), "pdffonts")
    for pdf in sorted((report["out"] / "figures").glob("*-2col.pdf")):
        listing = subprocess.run([pdffonts, str(pdf)], capture_output=True, text=True, check=True).stdout
        fonts = listing.splitlines()[2:]
        assert fonts, f"{pdf.name}: no fonts"
        for line in fonts:
            # columns: name type encoding emb sub uni object ID
            fields = line.split()
            assert fields[-5] == "yes", f"{pdf.name}: font not embedded: {line}"
            assert "Type 3" not in line


# -- HTML in a real browser ---------------------------------------------------------------------------------


def test_html_report_in_headless_chromium(report: dict[str, Any]) -> None:
    chromium = _tool(CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), "Chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    page_file = report["out"] / "report.html"
    html_text = page_file.read_text(encoding="utf-8")
    assert SCRIPT not in html_text  # escaped everywhere: in tables, the suite, the description
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html_text), "the page refers to the network"

    events: list[tuple[str, str]] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: events.append((m.type, m.text)))
            page.on("pageerror", lambda e: events.append(("pageerror", str(e))))
            page.on("dialog", lambda d: (events.append(("dialog", d.message)), d.dismiss()))
            page.on(
                "request",
                lambda r: events.append(("request", r.url)) if not r.url.startswith(("file:", "data:")) else None,
            )
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            shot = page.screenshot(full_page=False)
            body_text = page.inner_text("body")
            scripts = page.evaluate("document.scripts.length")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            # sort the protection table by its estimate column, ascending then descending
            header = page.locator("#table-protection th", has_text="protection (95% CI)")
            header.click()
            col = page.evaluate(
                "Array.from(document.querySelectorAll('#table-protection tbody tr'))"
                ".map(r => parseFloat(r.cells[6].getAttribute('data-sort')))"
            )
            header.click()
            col_desc = page.evaluate(
                "Array.from(document.querySelectorAll('#table-protection tbody tr'))"
                ".map(r => parseFloat(r.cells[6].getAttribute('data-sort')))"
            )
        finally:
            browser.close()
    errors = [e for e in events if e[0] in ("error", "pageerror", "dialog", "request", "warning")]
    assert errors == [], errors
    assert SCRIPT in body_text  # shown as text
    assert scripts == 1  # the report's own sorting script, nothing from data
    assert images and all(complete and width > 0 for complete, width in images), images
    assert col == sorted(col) and col_desc == sorted(col, reverse=True) and col[0] < col[-1]
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    dark = float((pixels < 128).mean())
    assert pixels.std() > 10 and 0.005 < dark < 0.6, f"screenshot looks blank: std {pixels.std():.1f}, dark {dark}"


# -- purity -------------------------------------------------------------------------------------------------


def test_rerunning_the_report_gives_the_same_files(stored_run: Path, report: dict[str, Any], tmp_path: Path) -> None:
    again = write_report(stored_run, tmp_path / "again")
    first: Path = report["out"]
    names = sorted(str(p.relative_to(again.folder)) for p in again.files)
    assert names == sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (again.folder / name).read_bytes(), name


def test_report_errors_name_what_is_wrong(tmp_path: Path, stored_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'nowhere'}: no results store here" in capsys.readouterr().err
    assert main(["report", str(stored_run), "--format", "md,pdf", "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "--format: unknown value(s) ['pdf']; choose from md, latex, csv, html or none" in capsys.readouterr().err
    assert main(["report", str(stored_run), "--figures", "jpg", "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "--figures: unknown value(s) ['jpg']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# -- pure pieces ----------------------------------------------------------------------------------------------


def test_renderers_escape_text_for_their_syntax() -> None:
    table = Table(
        name="t", title="T", caption="c",
        columns=(Column(key="who", header="who", numeric=False), Column(key="p", header="p")),
        rows=({"who": "a|b <i>x</i> 50% & $_#", "p": Estimate(0.5, 0.25, 0.75)}, {"who": "none", "p": float("nan")}),
    )  # fmt: skip
    md = to_markdown(table)
    assert "a\\|b &lt;i&gt;x&lt;/i&gt; 50% & $_#" in md and "0.50 [0.25, 0.75]" in md and "| none | – |" in md
    tex = to_latex(table)
    assert "a|b \\textless{}i\\textgreater{}x\\textless{}/i\\textgreater{} 50\\% \\& \\$\\_\\#" in tex
    assert "0.50 {\\scriptsize[0.25, 0.75]}" in tex
    rows = list(csv.reader(io.StringIO(to_csv(table))))
    assert rows == [["who", "p", "p_ci_low", "p_ci_high"], ["a|b <i>x</i> 50% & $_#", "0.5", "0.25", "0.75"],
                    ["none", "", "", ""]]  # fmt: skip
    with pytest.raises(Exception, match="table name 'a b'"):
        Table(name="a b", title="t", caption="c", columns=())


def test_intensity_defaults_are_the_transforms_defaults() -> None:
    from cloakbench.attacks.transforms import TRANSFORMS

    for name, intensity in INTENSITIES.items():
        transform = TRANSFORMS.create(name)
        assert transform.config_dict()["config"][intensity.param] == intensity.default, name


def test_seeds_are_pooled_over_query_photos(stored_run: Path) -> None:
    data = load_run(stored_run)
    # the same cells as two seeds: seed 1 a copy of seed 0 with every prediction wrong
    cells = tuple(data.cells) + tuple({**c, "seed": 1} for c in data.cells)
    queries = tuple(data.queries) + tuple({**q, "seed": 1, "correct": False} for q in data.queries)
    two = RunData(**{**data.__dict__, "cells": cells, "queries": queries})
    one = {(r["defense"], r["recognizer"], r["countermeasure"]): r for r in pooled_cells(data)}
    for row in pooled_cells(two):
        key = (row["defense"], row["recognizer"], row["countermeasure"])
        before = one[key]["protection"].value
        assert row["n_seeds"] == 2 and row["n_queries"] == 2 * one[key]["n_queries"]
        assert row["protection"].value == pytest.approx((before + 1.0) / 2)
        assert row["protection"].low <= row["protection"].value <= row["protection"].high


def test_a_failed_cell_is_hatched_and_named_in_the_heat_map(stored_run: Path) -> None:
    import dataclasses

    import matplotlib as mpl

    from cloakbench.reports.figures import STYLE, Width, heatmap_figure

    data = load_run(stored_run)
    broken = tuple(
        {**c, "status": "failed", "note": "RuntimeError: boom", "protection_rate": float("nan")}
        if (c["defense"], c["recognizer"]) == ("noise", "sface-onnx") else c
        for c in data.cells
    )  # fmt: skip
    rows = pooled_cells(dataclasses.replace(data, cells=broken))
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(failed) == 3 and all(r["status"] == "failed: RuntimeError: boom" for r in failed)
    with mpl.rc_context(STYLE):
        fig = heatmap_figure(data, rows, Width.ONE)
        assert fig is not None
        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue().decode()
    assert svg.count(">failed<") == 3  # one per countermeasure panel, as text


def test_only_the_formats_asked_for(stored_run: Path, tmp_path: Path) -> None:
    out = write_report(stored_run, tmp_path / "r", formats=("csv",), figure_formats=())
    assert out.files and all(p.suffix == ".csv" for p in out.files)
    assert not (tmp_path / "r" / "figures").exists() and not (tmp_path / "r" / "report.html").exists()
    # a later report into the same folder leaves no file of an earlier one in tables/ and figures/
    write_report(stored_run, tmp_path / "r", formats=("md",), figure_formats=("png",))
    left = sorted(p.suffix for p in (tmp_path / "r").rglob("*") if p.is_file() and p.parent.name != "r")
    assert set(left) == {".md", ".png"}
