"""Kill a suite run with SIGKILL several times, resume it, and compare its store with an uninterrupted run.

    python scripts/kill_resume.py quick --work /tmp/kill-resume [--kill-after 0:5 2:0 4:1]

Each ``--kill-after TASKS:SECONDS`` starts ``cloakbench run`` into the same folder and kills it SECONDS after at
least TASKS tasks are committed; then one last run finishes the suite. The uninterrupted run and the killed one
each get their own artifact cache (model files shared, see ``cloakbench.cache.overlay_cache``), so each computes
its own cloaks and embeddings. Writes ``<work>/kill_resume.md``: per attempt, what it committed and the seconds
per stage; per table, whether the two exports are equal (measured columns such as seconds left out).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cloakbench.bench.export import export_store
from cloakbench.bench.store import MEASURED_COLUMNS
from cloakbench.cache import overlay_cache

TABLES = ("cells", "queries", "cloaks", "adaptations")


def committed(store: Path) -> int:
    if not store.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def cli(suite: str, out: Path, cache: Path) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "cloakbench.cli", "run", suite, "--out", str(out), "--quiet"]
    return cmd, {**os.environ, "CLOAKBENCH_CACHE": str(cache)}


def run_to_end(suite: str, out: Path, cache: Path) -> float:
    cmd, env = cli(suite, out, cache)
    start = time.perf_counter()
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {code}")
    return time.perf_counter() - start


def run_and_kill(suite: str, out: Path, cache: Path, tasks: int, seconds: float) -> tuple[int, float]:
    cmd, env = cli(suite, out, cache)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = out / "results.sqlite"
    while committed(store) < tasks:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {tasks} tasks were committed: kill earlier")
        time.sleep(0.05)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return committed(store), time.perf_counter() - start


def exported(folder: Path) -> dict[str, list[dict[str, str]]]:
    export_store(folder, folder / "export", ["csv"])
    out = {}
    for table in (*TABLES, "tasks", "timings"):
        with (folder / "export" / f"{table}.csv").open() as f:
            out[table] = list(csv.DictReader(f))
    return out


def result_columns(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in MEASURED_COLUMNS} for r in rows]


def per_attempt(tables: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    tasks = {t["task_key"]: t for t in tables["tasks"]}
    out: dict[int, dict[str, Any]] = {}
    for t in tasks.values():
        a = out.setdefault(int(t["attempt_id"]), {"tasks": 0, "task_s": 0.0, "cache_misses": 0, "stages": {}})
        a["tasks"] += 1
        a["task_s"] += float(t["seconds"])
        a["cache_misses"] += int(t["cache_misses"])
    for row in tables["timings"]:
        a = out[int(tasks[row["task_key"]]["attempt_id"])]
        a["stages"][row["stage"]] = a["stages"].get(row["stage"], 0.0) + float(row["seconds"])
    return [{"attempt": k, **v} for k, v in sorted(out.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--kill-after", nargs="+", default=["0:5", "2:0", "4:1"], metavar="TASKS:SECONDS")
    args = parser.parse_args()
    work: Path = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work}: not empty; give a new --work folder")
    plain, killed = work / "uninterrupted", work / "killed"
    plain_s = run_to_end(args.suite, plain, overlay_cache(work / "cache-uninterrupted"))
    cache = overlay_cache(work / "cache-killed")
    kills = []
    for spec in args.kill_after:
        tasks, seconds = spec.split(":")
        kills.append(run_and_kill(args.suite, killed, cache, int(tasks), float(seconds)))
    final_s = run_to_end(args.suite, killed, cache)
    a, b = exported(plain), exported(killed)
    lines = [f"# Kill and resume: `{args.suite}`", ""]
    lines += [f"Uninterrupted run: {plain_s:.1f} s wall, {len(a['tasks'])} tasks.", ""]
    lines += ["| killed run | tasks committed when killed | wall s |", "|---|---|---|"]
    lines += [
        f"| kill {i + 1} (after {s}) | {n} | {w:.1f} |"
        for i, (s, (n, w)) in enumerate(zip(args.kill_after, kills, strict=True))
    ]
    lines += [f"| final run | {len(b['tasks'])} | {final_s:.1f} |", ""]
    lines += [
        "| attempt | tasks it committed | task seconds | cache misses | seconds per stage |",
        "|---|---|---|---|---|",
    ]
    for r in per_attempt(b):
        stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stages"].items()))
        lines.append(f"| {r['attempt']} | {r['tasks']} | {r['task_s']:.1f} | {r['cache_misses']} | {stages} |")
    total_a = sum(float(t["seconds"]) for t in a["tasks"])
    total_b = sum(float(t["seconds"]) for t in b["tasks"])
    lines += [
        "",
        f"Task seconds, summed: uninterrupted {total_a:.1f}, killed and resumed {total_b:.1f} (committed tasks only; "
        "work lost in the killed attempts is not in the store).",
        "",
    ]
    lines += ["| table | rows (uninterrupted) | rows (resumed) | equal (result columns) |", "|---|---|---|---|"]
    equal = True
    for table in TABLES:
        same = result_columns(a[table]) == result_columns(b[table])
        equal &= same
        lines.append(f"| {table} | {len(a[table])} | {len(b[table])} | {'yes' if same else 'NO'} |")
    keys = [t["task_key"] for t in b["tasks"]]
    lines += [
        "",
        f"Duplicate task rows in the resumed store: {len(keys) - len(set(keys))}.",
        f"Columns left out of the comparison (measurements of the machine): {', '.join(sorted(MEASURED_COLUMNS))}.",
    ]
    report = "\n".join(lines) + "\n"
    (work / "kill_resume.md").write_text(report)
    sys.stdout.write(report)
    json.dump({"equal": equal}, sys.stdout)
    sys.stdout.write("\n")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
