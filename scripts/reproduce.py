"""Run a reproduction suite, report it, and (with --update) store its headline numbers for the test.

    python scripts/reproduce.py facecure-tiny --update          # what tests/test_reproduction.py checks
    python scripts/reproduce.py facecure-reduced --update       # the 18-minute CPU version (docs/reproduction.md)
    python scripts/reproduce.py lowkey-reduced --update         # LowKey's evasion protocol, 10 minutes on a CPU
    python scripts/reproduce.py facecure --out runs/facecure    # the full suite (GPU-sized)

Runs ``cloakbench run SUITE --out OUT`` (resuming a killed run), then ``cloakbench report OUT``, then prints the
wall time and the headline numbers. ``--update`` writes them to ``docs/reproduction/<suite>.json``: the only
way the stored numbers change (the test never writes them). ``--fresh-artifacts`` gives the run its own empty
artifact cache (model files shared), so the wall time includes every cloak and embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cloakbench.cache import overlay_cache
from cloakbench.reports.data import load_run
from cloakbench.reports.render import to_markdown
from cloakbench.reports.reproduction import PUBLISHED, headline, side_by_side

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="a built-in suite name or a suite file")
    parser.add_argument("--out", help="results folder (default runs/<suite>)")
    parser.add_argument("--update", action="store_true", help="write docs/reproduction/<suite>.json")
    parser.add_argument("--fresh-artifacts", metavar="DIR", help="an empty artifact cache here (models shared)")
    args = parser.parse_args()
    name = Path(args.suite).stem
    out = Path(args.out) if args.out else ROOT / "runs" / name
    env = dict(os.environ)
    if args.fresh_artifacts:
        overlay_cache(Path(args.fresh_artifacts))
        env["CLOAKBENCH_CACHE"] = str(Path(args.fresh_artifacts).resolve())
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "cloakbench.cli", "run", args.suite, "--out", str(out), "--quiet"], env=env, check=False
    )
    seconds = time.perf_counter() - start
    if run.returncode not in (0, 1):  # 1: some cells failed; their rows say why and the report shows them
        return run.returncode
    subprocess.run([sys.executable, "-m", "cloakbench.cli", "report", str(out), "--quiet"], check=True)
    numbers: dict[str, object] = headline(load_run(out))
    print(f"{name}: run {seconds:.0f} s (this attempt), results in {out}, report in {out / 'report'}")
    cells = numbers["cells"]
    assert isinstance(cells, dict)
    for key, cell in cells.items():
        print(f"  {key}: {cell.get('protection', cell['status'])}  ({cell['queries']} queries)")
    if args.update:
        store(name, numbers, out / "report")
    return run.returncode


def store(name: str, numbers: dict[str, object], report: Path) -> None:
    """docs/reproduction/<name>.json, the report's tables and figures (never the cloak grids: they are faces),
    and side-by-side.md regenerated from every stored run."""
    docs = ROOT / "docs" / "reproduction"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{name}.json").write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    target = docs / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(report / "tables", target / "tables", ignore=shutil.ignore_patterns("*.tex", "*.csv"))
    (target / "figures").mkdir(parents=True)
    for png in sorted((report / "figures").glob("*-2col.png")):
        if not png.name.startswith("grids"):
            shutil.copy2(png, target / "figures" / png.name)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(docs.glob("*.json"))}
    published = {p.ours for p in PUBLISHED}
    runs = {k: v for k, v in runs.items() if published & set(v.get("cells") or {})}  # a column only where it helps
    (docs / "side-by-side.md").write_text(to_markdown(side_by_side(runs), heading_level=2))
    print(f"stored {name}.json, tables and figures in {target}; side-by-side.md from {len(runs)} stored runs")


if __name__ == "__main__":
    sys.exit(main())
