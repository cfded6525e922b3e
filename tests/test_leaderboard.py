"""``cloakbench leaderboard`` on three real stored runs: pooling, the worst case checked against the stores
with independent code, intervals, refusal of runs that measure different things, ``--merge``, escaping, and the
HTML page in headless Chromium.

The runs (4 celeb24 identities x 8 photos, two protected, one named ``<script>alert(1)</script>``):

- ``lb-a``: PGD 8/255 under a hostile label and uniform noise, SFace (PyTorch and onnxruntime), no
  countermeasure and JPEG q=75;
- ``lb-b``: PGD 4/255 and the same noise (one entry with lb-a's), SFace and a Rekognition-style service, no
  countermeasure and blur;
- ``lb-c``: noise under the evasion protocol, stored in a folder whose name holds markup.

Chromium (Debian's ``chromium``) is installed by ``.ci/run``; without it the browser test is skipped, unless
``CLOAKBENCH_REQUIRE_TOOLS=1`` makes a missing tool a failure.
"""

from __future__ import annotations

import csv
import dataclasses
import io
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
from scipy.stats import binomtest

from cloakbench.cli import EXIT_BAD_INPUT, main
from cloakbench.errors import ConfigError
from cloakbench.reports.data import load_run
from cloakbench.reports.leaderboard import build_leaderboard, write_leaderboard
from cloakbench.results import load_results

# the three runs take minutes (178 s measured on the 2-core machine at load ~12, sharing it with a reproduction)
pytestmark = pytest.mark.slow

SCRIPT = "<script>alert(1)</script>"
HOSTILE = "pgd <img src=x onerror=alert(2)>"
CHROMIUM = "/usr/bin/chromium"
EPS8, EPS4 = 8 / 255, 4 / 255


def _suite(name: str, root: Path, names: Path, **grid: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"leaderboard test {name} {SCRIPT}",
        "dataset": {"source": "folder", "path": str(root), "names": str(names)},
        "protected": {"identities": [SCRIPT, "Drew_Barrymore"]},
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 200},
        **grid,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, names_dataset: tuple[Path, Path]) -> dict[str, Path]:
    root, names = names_dataset
    work = tmp_path_factory.mktemp("leaderboard_runs")
    noise = {"name": "noise", "params": {"epsilon": EPS8}}
    suites = {
        "lb-a": _suite(
            "lb-a", root, names,
            defenses=[{"name": "pgd", "label": HOSTILE, "params": {"epsilon": EPS8, "steps": 5}}, noise],
            recognizers=["sface", "sface-onnx"],
            countermeasures=["none", {"name": "jpeg", "label": "jpeg-75", "params": {"quality": 75},
                                      "apply_to": "both"}],
        ),
        "lb-b": _suite(
            "lb-b", root, names,
            defenses=[{"name": "pgd", "label": "pgd-4", "params": {"epsilon": EPS4, "steps": 5}}, noise],
            recognizers=["sface"], services=[{"kind": "rekognition", "backend": "sface", "transport": "in-process"}],
            countermeasures=["none", {"name": "blur", "label": "blur", "apply_to": "both"}],
        ),
        "lb-c": _suite("lb-c", root, names, defenses=[noise], recognizers=["sface"], protocols=["evasion"]),
    }  # fmt: skip
    folders = {"lb-a": work / "run-a", "lb-b": work / "run-b", "lb-c": work / "run <b>c</b>"}
    for name, suite in suites.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(suite, allow_unicode=True))
        proc = subprocess.run(
            [sys.executable, "-m", "cloakbench.cli", "run", str(path), "--out", str(folders[name]), "--quiet"],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return folders


@pytest.fixture(scope="module")
def board_ab(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("board") / "ab"
    assert main(["leaderboard", str(runs["lb-a"]), str(runs["lb-b"]), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def board_merged(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("board") / "merged"
    args = ["leaderboard", *(str(runs[n]) for n in ("lb-a", "lb-b", "lb-c")), "--out", str(out), "--merge", "--quiet"]
    assert main(args) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the ranking, checked against the stores -----------------------------------------------------------------


def _worst_case_from_stores(folders: list[Path], defense: str) -> tuple[int, int, int]:
    """(photos, protected photos, trackers) of one defense label over the runs, straight from their query rows:
    a photo (seed, person, image) is protected when no ok cell's tracker identified it."""
    frames = []
    for folder in folders:
        r = load_results(folder)
        ok = r.ok_cells[["seed", "protocol", "defense", "recognizer", "countermeasure", "classifier"]].astype(str)
        q = r.queries.astype({k: str for k in ok.columns}).merge(ok.drop_duplicates(), on=list(ok.columns))
        frames.append(q[q["defense"] == defense])
    every = np.concatenate([f["correct"].to_numpy(dtype=bool) for f in frames])
    photo = np.concatenate([(f["seed"] + "/" + f["protected_identity"].astype(str) + "/" + f["image_id"]).to_numpy()
                            for f in frames])  # fmt: skip
    trackers = {t for f in frames for t in zip(f["recognizer"], f["countermeasure"], f["classifier"], strict=True)}
    identified = {p for p, c in zip(photo, every, strict=True) if c}
    photos = set(photo.tolist())
    return len(photos), len(photos - identified), len(trackers)


def test_defenses_are_ranked_by_their_worst_case_over_every_tracker(board_ab: Path, runs: dict[str, Path]) -> None:
    rows = {r["defense"]: r for r in _csv(board_ab / "tables" / "leaderboard-poisoning.csv")}
    assert set(rows) == {HOSTILE, "noise", "pgd-4"}  # noise: one entry over both runs (same spec)
    assert rows["noise"]["runs"] == "lb-a, lb-b" and rows[HOSTILE]["runs"] == "lb-a"
    for defense, folders in ((HOSTILE, [runs["lb-a"]]), ("pgd-4", [runs["lb-b"]]),
                             ("noise", [runs["lb-a"], runs["lb-b"]])):  # fmt: skip
        photos, protected, trackers = _worst_case_from_stores(folders, defense)
        row = rows[defense]
        assert int(row["photos"]) == photos and int(row["trackers"]) == trackers, defense
        assert float(row["protection"]) == pytest.approx(protected / photos, abs=1e-12), defense
        # the interval: never zero-width, and never narrower than the exact binomial interval of the photos
        lo, hi = float(row["protection_ci_low"]), float(row["protection_ci_high"])
        exact = binomtest(protected, photos).proportion_ci(confidence_level=0.95, method="exact")
        assert lo <= exact.low + 1e-12 and hi >= exact.high - 1e-12 and hi - lo > 0, (defense, lo, hi)
    # noise pooled over both runs' trackers: SFace, SFace-ONNX x {none, JPEG}, and SFace, the service x {none, blur}
    assert int(rows["noise"]["trackers"]) == 7
    ranks = [(int(r["rank"]), float(r["protection"])) for r in _csv(board_ab / "tables" / "leaderboard-poisoning.csv")]
    assert [p for _, p in ranks] == sorted((p for _, p in ranks), reverse=True)
    # measured: PGD 8/255 keeps 0.50 of the photos against every tracker, noise none (the white box identifies all)
    assert float(rows[HOSTILE]["protection"]) > float(rows["noise"]["protection"])
    assert int(rows[HOSTILE]["rank"]) < int(rows["noise"]["rank"])


def test_quality_and_cost_come_from_the_stored_cloaks(board_ab: Path, runs: dict[str, Path]) -> None:
    rows = {r["defense"]: r for r in _csv(board_ab / "tables" / "leaderboard-poisoning.csv")}
    a, b = load_results(runs["lb-a"]), load_results(runs["lb-b"])
    # noise: both runs cloaked the same photos the same way; each photo counted once
    both = [c[c["defense"] == "noise"] for c in (a.cloaks, b.cloaks)]
    assert len(both[0]) == len(both[1]) > 0
    assert float(rows["noise"]["ssim_mean"]) == pytest.approx(both[0]["ssim"].mean(), abs=1e-12)
    assert float(rows["noise"]["dssim_max"]) == pytest.approx(both[0]["dssim"].max(), abs=1e-12)
    assert float(rows[HOSTILE]["linf_max"]) <= EPS8 + 0.5 / 255  # within the budget (8-bit rounding)
    assert float(rows["pgd-4"]["linf_max"]) <= EPS4 + 0.5 / 255
    assert float(rows["pgd-4"]["ssim_mean"]) > float(rows[HOSTILE]["ssim_mean"])  # the smaller budget
    for row in rows.values():
        assert float(row["s_per_image"]) > 0 and row["device"] == "cpu"
    pgd_cost = a.ok_cells.loc[a.ok_cells["defense"] == HOSTILE, "cloak_s_per_image"].mean()
    assert float(rows[HOSTILE]["s_per_image"]) == pytest.approx(pgd_cost, rel=1e-12)


def test_the_same_runs_give_the_same_files(board_ab: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    again = write_leaderboard([runs["lb-a"], runs["lb-b"]], tmp_path / "again")
    for path in again.files:
        assert path.read_bytes() == (board_ab / path.relative_to(again.folder)).read_bytes(), path.name


# -- which runs are ranked together -------------------------------------------------------------------------


def test_runs_on_different_protocols_are_refused_in_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "refused"
    args = ["leaderboard", *(str(runs[n]) for n in ("lb-a", "lb-b", "lb-c")), "--out", str(out)]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cloakbench: error: leaderboard: the runs lb-a (")
    for name in ("lb-a", "lb-b", "lb-c"):
        assert f'{name} ("{runs[name]}")' in err
    assert 'protocols: lb-a=["poisoning"], lb-b=["poisoning"], lb-c=["evasion"]' in err and "--merge" in err
    assert not out.exists()  # refused before anything was written


def test_a_different_dataset_is_refused_naming_the_key(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["lb-a"]), load_run(runs["lb-b"])
    moved = dataclasses.replace(b, suite={**b.suite, "dataset": {**b.suite["dataset"], "split_seed": 11}})
    with pytest.raises(ConfigError, match=r"differ in dataset\.split_seed: lb-a=10, lb-b=11;"):
        build_leaderboard([a, moved])
    fewer = dataclasses.replace(b, suite={**b.suite, "protected": {"identities": ["Drew_Barrymore"]}})
    with pytest.raises(ConfigError, match=r'differ in protected\.identities: lb-a=\["<script>'):
        build_leaderboard([a, fewer])
    assert build_leaderboard([a, moved], merge=True).merged == ("dataset.split_seed: lb-a=10, lb-b=11",)


def test_a_label_that_names_two_specs_is_two_entries(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["lb-a"]), load_run(runs["lb-b"])
    defenses = [{**d, "params": {"epsilon": 0.01}} if d["label"] == "noise" else d for d in b.suite["defenses"]]
    other = dataclasses.replace(b, suite={**b.suite, "defenses": defenses})
    names = {r["defense"] for r in build_leaderboard([a, other]).rows}
    assert {"noise [lb-a]", "noise [lb-b]"} <= names and "noise" not in names


def test_merge_pools_the_runs_and_says_what_differs(board_merged: Path) -> None:
    md = (board_merged / "leaderboard.md").read_text(encoding="utf-8")
    assert 'Merged (--merge): the runs differ in protocols: lb-a=["poisoning"], lb-b=["poisoning"], ' in md
    assert "## Leaderboard: poisoning protocol" in md and "## Leaderboard: evasion protocol" in md
    evasion = _csv(board_merged / "tables" / "leaderboard-evasion.csv")
    assert [r["defense"] for r in evasion] == ["noise"] and evasion[0]["runs"] == "lb-c"
    page = (board_merged / "leaderboard.html").read_text(encoding="utf-8")
    assert "<section id='merged'><h2>Merged runs</h2>" in page


def test_not_a_run_is_one_error_naming_it(tmp_path: Path, runs: dict[str, Path], capsys: Any) -> None:
    assert main(["leaderboard", str(runs["lb-a"]), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'nowhere'}: no results store here" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- escaping and the page in a browser ---------------------------------------------------------------------


def test_hostile_names_are_escaped_for_each_format(board_merged: Path, runs: dict[str, Path]) -> None:
    md = (board_merged / "leaderboard.md").read_text(encoding="utf-8")
    assert "pgd &lt;img src=x onerror=alert(2)&gt;" in md and "<img" not in md and "<b>" not in md
    page = (board_merged / "leaderboard.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page and "<b>c</b>" not in page and SCRIPT not in page
    assert "pgd &lt;img src=x onerror=alert(2)&gt;" in page and "run &lt;b&gt;c&lt;/b&gt;" in page
    assert str(runs["lb-c"]) in {r["results"] for r in _csv(board_merged / "tables" / "runs.csv")}  # CSV: raw data
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page refers to the network"


def _chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path:
        return path
    message = "Chromium is not installed (apt-get install chromium)"
    if os.environ.get("CLOAKBENCH_REQUIRE_TOOLS") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def test_leaderboard_page_in_headless_chromium(board_merged: Path) -> None:
    chromium = _chromium()
    playwright = pytest.importorskip("playwright.sync_api")
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
            page.goto((board_merged / "leaderboard.html").as_uri())
            page.wait_for_load_state("load")
            shot = page.screenshot(full_page=False)
            body = page.inner_text("body")
            scripts = page.evaluate("document.scripts.length")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            table = "#table-leaderboard-poisoning"
            header = page.locator(f"{table} th", has_text="worst-case protection")
            read = f"Array.from(document.querySelectorAll('{table} tbody tr')).map(r => r.cells[1].textContent)"
            ranked = page.evaluate(read)
            header.click()  # ascending: the worst first
            ascending = page.evaluate(read)
        finally:
            browser.close()
    errors = [e for e in events if e[0] in ("error", "pageerror", "dialog", "request", "warning")]
    assert errors == [], errors
    assert HOSTILE in body and "run <b>c</b>" in body  # shown as text
    assert scripts == 1  # the page's own sorting script, nothing from data
    assert len(images) == 2 and all(done and width > 0 for done, width in images), images  # one figure per protocol
    assert ranked[0] == HOSTILE and ascending[-1] == HOSTILE and ascending[0] != HOSTILE
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and 0.005 < float((pixels < 128).mean()) < 0.6, "the screenshot looks blank"
