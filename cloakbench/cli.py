"""Command-line interface: ``cloakbench run | export | report | leaderboard | list | validate | protect | data |
cache | bench``.

Exit codes: 0 success; 1 the run finished but some cells failed (``protect``: some photos were skipped);
2 bad input (suite, dataset, arguments, a damaged or empty results store) or a full disk; 3 a required file
could not be fetched; 130 interrupted (the finished tasks are in the results store; the same command resumes).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sqlite3
import sys
from pathlib import Path
from typing import Any

from cloakbench.errors import CloakbenchError, ConfigError, DatasetError, FetchError

EXIT_OK, EXIT_CELLS_FAILED, EXIT_BAD_INPUT, EXIT_FETCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _suite_path(arg: str) -> Path:
    from cloakbench.bench.suite import builtin_suite_path, builtin_suites

    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path.resolve()
    builtin = builtin_suite_path(arg)
    if builtin is None:
        raise ConfigError(f"{arg!r} is neither a suite file nor a built-in suite ({', '.join(builtin_suites())})")
    return builtin


def _load_run_suite(args: argparse.Namespace) -> Any:
    from cloakbench.bench.suite import load_suite

    suite = load_suite(_suite_path(args.suite))
    if args.device:
        import dataclasses

        suite = dataclasses.replace(suite, device=args.device)
    return suite


def _executor(args: argparse.Namespace) -> Any:
    from cloakbench.bench.executors import InProcess, RayExecutor

    if args.executor == "ray":
        return RayExecutor(args.address, workers=args.workers)
    if args.address or args.workers:
        raise ConfigError("--address and --workers are options of --executor ray")
    return InProcess()


def _cmd_run(args: argparse.Namespace) -> int:
    from cloakbench.bench.cache import ArtifactCache
    from cloakbench.bench.executors import run_into_store
    from cloakbench.bench.output import write_run
    from cloakbench.bench.store import STORE_FILE

    suite = _load_run_suite(args)
    executor = _executor(args)  # option errors before any work
    out_dir = (Path(args.out) if args.out else Path("runs") / suite.name).resolve()
    if args.dry_run:
        return _dry_run(suite, out_dir, args)
    if args.fresh:
        for suffix in ("", "-wal", "-shm"):
            (out_dir / f"{STORE_FILE}{suffix}").unlink(missing_ok=True)
    chatty = not (args.quiet or args.json)
    outcome = run_into_store(
        suite, out_dir, executor=executor, cache=ArtifactCache(enabled=not args.no_cache), progress=chatty
    )
    written = write_run(outcome.result, out_dir, attempts_of=outcome.store_path)
    summary = written["summary"]
    failed = sum(1 for r in summary if r.get("status") == "failed")
    if args.json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in summary]
        payload = {
            "run_dir": str(out_dir), "store": str(outcome.store_path), "resumed": outcome.resumed,
            "tasks": {"total": outcome.tasks_total, "already_done": outcome.tasks_skipped, "run": outcome.tasks_run,
                      "failed": outcome.tasks_failed},
            "cells_failed": failed, "seconds": outcome.seconds, "stage_seconds": outcome.stage_seconds,
            "warnings": outcome.warnings, "summary": clean,
        }  # fmt: skip
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        sys.stdout.write((out_dir / "summary.md").read_text())
        resumed = (
            f"resumed: {outcome.tasks_skipped} of {outcome.tasks_total} tasks were done; " if outcome.resumed else ""
        )
        sys.stdout.write(
            f"\nrun folder: {out_dir}  ({resumed}{outcome.tasks_run} tasks run in {outcome.seconds:.0f} s"
            + (f"; {failed} cells failed, see summary.csv" if failed else "")
            + ")\n"
        )
    return EXIT_CELLS_FAILED if failed else EXIT_OK


def _dry_run(suite: Any, out_dir: Path, args: argparse.Namespace) -> int:
    from cloakbench.bench.executors import load_layout
    from cloakbench.bench.plan import describe, plan_tasks
    from cloakbench.bench.store import STORE_FILE, ResultsStore

    layout = load_layout(suite)
    done: dict[str, str] = {}
    if (out_dir / STORE_FILE).is_file():
        from cloakbench.bench.executors import suite_digest

        with ResultsStore.in_folder(out_dir) as store:
            stored = store.get("suite_digest")
            if stored is not None and stored != suite_digest(suite):
                store.bind_suite(suite.to_dict(), suite_digest(suite))  # raises what `run` would say
            done = store.task_states()
    rows = describe(suite, plan_tasks(suite), layout.shape, done)
    cells = sum(r["cells"] for r in rows)
    todo = sum(1 for r in rows if r["state"] != "ok")
    if args.json:
        payload = {"suite": suite.name, "run_dir": str(out_dir), "tasks": rows, "cells": cells, "tasks_to_run": todo}
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    shape = layout.shape
    sys.stdout.write(
        f"suite {suite.name!r}: {shape.images} photos of {shape.identities} identities, protected (one at a "
        f"time): {', '.join(shape.protected)}\n\n"
    )
    width = max(len(r["task"]) for r in rows)
    sys.stdout.write(f"{'task':<{width}}  cells  {'state':<7}  work\n")
    for r in rows:
        sys.stdout.write(f"{r['task']:<{width}}  {r['cells']:>5}  {r['state']:<7}  {r['work']}\n")
    sys.stdout.write(f"\n{len(rows)} tasks, {cells} cells; {todo} tasks to run into {out_dir} (nothing was run)\n")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from cloakbench.bench.export import export_store, parse_formats

    formats = parse_formats(args.format)
    results = Path(args.results)
    out_dir = Path(args.out) if args.out else (results if results.is_dir() else results.parent) / "export"
    written = export_store(results, out_dir, formats)
    if args.json:
        json.dump({"files": [str(p) for p in written]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        for path in written:
            sys.stdout.write(f"{path}\n")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from cloakbench.reports.build import FORMATS, parse_list, write_report
    from cloakbench.reports.figures import FIGURE_FORMATS

    formats = parse_list(args.format, FORMATS, "--format")
    figure_formats = parse_list(args.figures, FIGURE_FORMATS, "--figures")
    results = Path(args.results)
    out = write_report(results, Path(args.out) if args.out else None, formats=formats, figure_formats=figure_formats)
    if args.json:
        payload = {"folder": str(out.folder), "tables": out.tables, "figures": out.figures,
                   "files": [str(p) for p in out.files]}  # fmt: skip
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        html = out.folder / "report.html"
        sys.stdout.write(
            f"{len(out.tables)} tables, {len(out.figures)} figures, {len(out.files)} files in {out.folder}"
            + (f"\nopen {html}" if html in out.files else "")
            + "\n"
        )
    return EXIT_OK


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from cloakbench.reports.leaderboard import write_leaderboard

    out = write_leaderboard([Path(r) for r in args.results], Path(args.out).resolve(), merge=args.merge)
    if args.json:
        rows = [{**{k: v for k, v in r.items() if k != "protection"}, "protection": r["protection"].value,
                 "ci_low": r["protection"].low, "ci_high": r["protection"].high} for r in out.board.rows]  # fmt: skip
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        payload = {"folder": str(out.folder), "files": [str(p) for p in out.files], "merged": list(out.board.merged),
                   "rows": clean}  # fmt: skip
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        sys.stdout.write((out.folder / "leaderboard.md").read_text(encoding="utf-8"))
        sys.stdout.write(f"\nopen {out.folder / 'leaderboard.html'}\n")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from cloakbench.attacks.adaptation import ADAPTATIONS
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.transforms import TRANSFORMS
    from cloakbench.bench.classifiers import CLASSIFIERS
    from cloakbench.bench.suite import Protocol, ServiceKind, Transport, builtin_suites
    from cloakbench.defenses import DEFENSES
    from cloakbench.plugins import loaded_plugins

    if args.suite:  # its plug-ins register their components (a bad suite is an error, as for validate)
        from cloakbench.bench.suite import load_suite

        load_suite(_suite_path(args.suite))
    registries: dict[str, Any] = {
        "defenses": DEFENSES, "recognizers": RECOGNIZERS, "transforms": TRANSFORMS, "adaptations": ADAPTATIONS,
        "classifiers": CLASSIFIERS,
    }  # fmt: skip
    kinds = [args.kind] if args.kind else [*registries, "services", "protocols", "plugins", "suites"]
    payload: dict[str, Any] = {}
    for kind in kinds:
        if kind == "suites":
            payload[kind] = [{"name": n, "origin": "built-in"} for n in builtin_suites()]
        elif kind == "services":  # suite key services[].kind; every one is backed by any recognizer

            def transports(kind: ServiceKind) -> str:  # transport aws is Amazon Rekognition only
                usable = [t for t in Transport if t is not Transport.AWS or kind is ServiceKind.REKOGNITION]
                return ", ".join(t.value for t in usable)

            payload[kind] = [
                {"name": s.value, "summary": _SERVICE_SUMMARIES.get(s.value, ""), "origin": "built-in",
                 "details": {"transports": transports(s), "backend": "any recognizer (services[].backend)"}}
                for s in ServiceKind
            ]  # fmt: skip
        elif kind == "protocols":
            payload[kind] = [
                {"name": p.value, "summary": _PROTOCOL_SUMMARIES.get(p.value, ""), "origin": "built-in"}
                for p in Protocol
            ]
        elif kind == "plugins":
            for registry in registries.values():
                len(registry)  # reading a registry loads its installed plug-ins
            payload[kind] = [
                {"name": str(p.origin), "origin_kind": p.origin.kind.value, "source": p.origin.source,
                 "version": p.version, "entry_point": p.origin.detail,
                 "registers": [f"{k} {n}" for k, n in p.registered]}
                for p in loaded_plugins()
            ]  # fmt: skip
        else:
            payload[kind] = [_entry_payload(e) for e in registries[kind]]
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for kind, entries in payload.items():
        sys.stdout.write(f"{kind}:\n")
        if kind == "plugins" and not entries:
            sys.stdout.write(
                "  none loaded (installed ones register through entry points of the groups cloakbench.defenses, "
                ".recognizers, .transforms, .adaptations; --suite FILE loads a suite's plugins: list)\n"
            )
        for e in entries:
            sys.stdout.write(f"  {e['name']:<24} {e.get('summary', '')}".rstrip() + "\n")
            cite = ", ".join(str(x) for x in (e.get("paper"), e.get("venue"), e.get("year")) if x)
            lines = [("paper", cite)] if cite else []
            lines += [(k, str(v)) for k, v in (e.get("details") or {}).items()]
            if e.get("weights"):
                lines.append(("weights", f"{e['weights']} ({e['license']})"))
            if e.get("cached") is not None:
                lines.append(("cached", "yes" if e["cached"] else "no (fetched on first use)"))
            if kind == "plugins":
                lines += [("entry point", e["entry_point"])] if e["entry_point"] else [("sha256", e["version"])]
                lines.append(("registers", ", ".join(e["registers"]) or "nothing"))
            elif kind != "suites":
                lines.append(("origin", e["origin"]))
            for key, value in lines:
                sys.stdout.write(f"  {'':<24} {key}: {value}\n")
    return EXIT_OK


_SERVICE_SUMMARIES = {
    "rekognition": "Amazon Rekognition-like collections: index faces, search faces by image (poisoning and evasion)",
    "azure": "Azure Face-like person groups: add faces, train, identify (poisoning only: no gallery search)",
}
_PROTOCOL_SUMMARIES = {
    "poisoning": "the tracker enrols the (cloaked) photos and classifies clean query photos (Fawkes, FaceCure)",
    "evasion": "cloaked photos sit in a searchable gallery; clean probes search it, rank-1/5/50 (LowKey)",
    "probe-cloaking": "a universal mask fitted on enrollment photos cloaks unseen query photos, searched against a "
    "clean gallery (OPOM)",
}


def _entry_payload(entry: Any) -> dict[str, Any]:
    meta = entry.meta
    return {
        "name": entry.name,
        "summary": meta.summary,
        "paper": meta.paper,
        "year": meta.year,
        "venue": meta.venue,
        "license": meta.license,
        "weights": meta.weights_origin,
        "tags": list(meta.tags),
        "details": dict(meta.details),
        "cached": None if meta.is_cached is None else bool(meta.is_cached()),
        "origin": str(entry.origin),  # built-in, entry point <dist> <version>, plug-in file <path>, ...
        "origin_kind": entry.origin.kind.value,
    }


def _cmd_validate(args: argparse.Namespace) -> int:
    from cloakbench.bench.plan import cells_of, plan_tasks
    from cloakbench.bench.suite import load_suite

    suite = load_suite(_suite_path(args.suite))
    tasks = plan_tasks(suite)
    cells = sum(cells_of(suite, t) for t in tasks)
    sys.stdout.write(f"{args.suite}: valid suite {suite.name!r}, {len(tasks)} tasks, {cells} cells\n")
    return EXIT_OK


def _cmd_protect(args: argparse.Namespace) -> int:
    from cloakbench.datasets.folder import safe_text
    from cloakbench.protect import CLOAKED, NOT_IMAGE, parse_params, protect_folder

    chatty = not (args.quiet or args.json)

    def progress(message: str) -> None:
        sys.stderr.write(f"cloakbench protect: {message}\n")

    report = protect_folder(
        Path(args.folder),
        defense=args.defense,
        surrogates=args.surrogate,
        params=parse_params(args.param),
        seed=args.seed,
        device=args.device,
        aligned=args.aligned,
        out_dir=Path(args.out) if args.out else None,
        progress=progress if chatty else None,
    )
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        for photo in report.photos:
            if photo.status == CLOAKED:
                assert photo.output is not None
                budgets = "; ".join(
                    f"L-inf {f.linf * 255:.3g}/255, PSNR {f.psnr:.1f} dB, SSIM {f.ssim:.4f}, DSSIM {f.dssim:.4f}"
                    for f in photo.faces
                )
                faces = f"{len(photo.faces)} face{'s' if len(photo.faces) != 1 else ''}"
                sys.stdout.write(
                    f"{photo.status:<10} {safe_text(photo.source.name)} -> {safe_text(photo.output.name)}  "
                    f"({faces}: {budgets})\n"
                )
            else:  # names and details quote the user's file names: control characters escaped
                sys.stdout.write(f"{photo.status:<10} {safe_text(photo.source.name)}  ({safe_text(photo.detail)})\n")
        photos = sum(1 for p in report.photos if p.status != NOT_IMAGE)
        sys.stdout.write(
            f"\n{report.n_cloaked} of {photos} photo(s) cloaked with {report.defense} into {report.out_dir} "
            f"({report.seconds:.0f} s)\n"
        )
    return EXIT_CELLS_FAILED if report.skipped else EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    import datetime as _dt

    from cloakbench.bench.timing_suite import run_timing_suite

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = (Path(args.out) if args.out else Path("runs") / f"bench-{stamp}").resolve()

    def progress(message: str) -> None:
        sys.stderr.write(f"cloakbench bench: {message}\n")

    result = run_timing_suite(
        out_dir,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        quick=args.quick,
        progress=None if (args.quiet or args.json) else progress,
        quiet=args.quiet,
        precision=args.precision,
        tf32=args.tf32,
    )
    if args.json:
        payload = {k: result[k] for k in ("run_id", "out_dir", "device", "timings", "kernels", "skipped", "failed")}
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif not args.quiet:
        sys.stdout.write((out_dir / "bench.md").read_text())
        sys.stdout.write(f"\nbench folder: {out_dir}\n")
    return EXIT_CELLS_FAILED if result["failed"] else EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    import datetime as dt
    import math

    from cloakbench.cache import cache_root
    from cloakbench.cache_admin import cache_info, info_json, info_table, prune, prune_json, prune_table

    root = cache_root()
    if args.cache_command == "info":
        infos = cache_info(root)
        sys.stdout.write(json.dumps(info_json(root, infos), indent=2) + "\n" if args.json else info_table(root, infos))
        return EXIT_OK
    days = args.older_than
    if days is not None and not (math.isfinite(days) and days >= 0):
        raise ConfigError(f"cache prune: --older-than takes a number of days >= 0, got {days}")
    older = None if days is None else dt.timedelta(days=days)
    report = prune(root, kinds=args.kind, older_than=older, dry_run=args.dry_run)
    sys.stdout.write(json.dumps(prune_json(report), indent=2) + "\n" if args.json else prune_table(report))
    return EXIT_OK


def _cmd_data(args: argparse.Namespace) -> int:
    from cloakbench.datasets import celeb24

    if args.verify:
        problems = celeb24.verify(Path(args.verify))
        if problems:
            raise DatasetError(f"celeb24 at {args.verify} does not match its manifest: {'; '.join(problems)}")
        sys.stdout.write(f"{args.verify}: all {len(celeb24.manifest())} files match the manifest\n")
        return EXIT_OK
    dest = celeb24.build(Path(args.dest), source=Path(args.source) if args.source else None)
    sys.stdout.write(f"{dest}: celeb24, all {len(celeb24.manifest())} files verified\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloakbench", description="Benchmark face cloaking defenses against face recognizers."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a suite (a YAML file or a built-in name such as 'quick'); run it again with the same --out to resume",
    )
    run.add_argument("suite")
    run.add_argument(
        "--out",
        help="results folder (default: ./runs/<suite name>); holds results.sqlite; an unfinished run in it resumes",
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's device")
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute cloaks and embeddings instead of reusing cached ones",
    )
    run.add_argument("--dry-run", action="store_true", help="print the tasks, their cells and work; run nothing")
    run.add_argument("--fresh", action="store_true", help="discard the results store in --out and start over")
    run.add_argument(
        "--executor", choices=["in-process", "ray"], default="in-process", help="where tasks run (default: %(default)s)"
    )
    run.add_argument("--address", help="Ray cluster address (HOST:PORT or 'auto'; default: start a local Ray)")
    run.add_argument("--workers", type=int, help="Ray worker actors (default: one per GPU, or per CPU without GPUs)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    mode.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    run.set_defaults(func=_cmd_run)

    exp = sub.add_parser("export", help="export a results store to Parquet and CSV (one file per table)")
    exp.add_argument("results", help="a results folder (or its results.sqlite)")
    exp.add_argument("--format", default="parquet,csv", help="comma-separated: parquet, csv (default: %(default)s)")
    exp.add_argument("--out", help="folder for the files (default: <results>/export)")
    exp_mode = exp.add_mutually_exclusive_group()
    exp_mode.add_argument("--quiet", action="store_true")
    exp_mode.add_argument("--json", action="store_true", help="print the written files as JSON")
    exp.set_defaults(func=_cmd_export)

    rep = sub.add_parser(
        "report", help="tables, figures and a self-contained HTML page of a stored run (no model work)"
    )
    rep.add_argument("results", help="a results folder (or its results.sqlite)")
    rep.add_argument(
        "--format", default="md,latex,csv,html", help="comma-separated: md, latex, csv, html (default: %(default)s)"
    )
    rep.add_argument(
        "--figures", default="pdf,svg,png", help="figure files: pdf, svg, png, or none (default: %(default)s)"
    )
    rep.add_argument("--out", help="folder for the report (default: <results>/report)")
    rep_mode = rep.add_mutually_exclusive_group()
    rep_mode.add_argument("--quiet", action="store_true")
    rep_mode.add_argument("--json", action="store_true", help="print the written files as JSON")
    rep.set_defaults(func=_cmd_report)

    board = sub.add_parser(
        "leaderboard",
        help="rank the defenses of stored runs by their worst case over every tracker, beside quality and cost",
    )
    board.add_argument("results", nargs="+", help="results folders (or their results.sqlite files)")
    board.add_argument(
        "--out", default="leaderboard", help="folder for leaderboard.md, .html and tables/ (default: %(default)s)"
    )
    board.add_argument(
        "--merge",
        action="store_true",
        help="rank runs whose dataset, protected people or protocols differ together (the page says what differs)",
    )
    board_mode = board.add_mutually_exclusive_group()
    board_mode.add_argument("--quiet", action="store_true")
    board_mode.add_argument("--json", action="store_true", help="print the ranked rows as JSON")
    board.set_defaults(func=_cmd_leaderboard)

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument(
        "kind",
        nargs="?",
        choices=[
            "defenses", "recognizers", "transforms", "adaptations", "classifiers", "services", "protocols", "plugins",
            "suites",
        ],
    )  # fmt: skip
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--suite", help="load this suite's plug-ins first (a suite file or a built-in suite's name)")
    lst.set_defaults(func=_cmd_list)

    val = sub.add_parser("validate", help="check a suite file without running it")
    val.add_argument("suite")
    val.set_defaults(func=_cmd_validate)

    prot = sub.add_parser(
        "protect",
        help="cloak the photos in a folder (writes <stem>_cloaked.png; exit 1 when some photo was skipped)",
    )
    prot.add_argument("folder", help="folder of photos of one person (jpg, jpeg, png, bmp, webp; not recursive)")
    prot.add_argument(
        "--defense", default="fawkes-high", help="a name from 'cloakbench list defenses' (default: %(default)s)"
    )
    prot.add_argument(
        "--surrogate",
        action="append",
        metavar="NAME",
        help="recognizer to optimise against, repeatable (default: sface; sface and facenet-casia for "
        "two-extractor defenses such as fawkes-v1-high, and lowkey, lowkey-linf)",
    )
    prot.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter of the defense, repeatable; the value is a YAML scalar (e.g. steps=50)",
    )
    prot.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    prot.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    prot.add_argument(
        "--aligned",
        action="store_true",
        help="the photos are already 112x112 ArcFace-aligned faces: cloak them as they are",
    )
    prot.add_argument("--out", metavar="DIR", help="where to write the cloaked photos (default: beside the originals)")
    prot_mode = prot.add_mutually_exclusive_group()
    prot_mode.add_argument(
        "--quiet", action="store_true", help="no progress and no per-photo lines (warnings still go to stderr)"
    )
    prot_mode.add_argument("--json", action="store_true", help="print the outcome of every photo as JSON (for scripts)")
    prot.set_defaults(func=_cmd_protect)

    bench = sub.add_parser(
        "bench",
        help="time embedding, cloaking and JPEG on real models and faces (median and IQR over repeats; exit 1 when "
        "some target failed)",
    )
    bench.add_argument(
        "--out",
        metavar="DIR",
        help="folder for results.sqlite, bench.json, bench.md (default: ./runs/bench-<UTC time>)",
    )
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: %(default)s")
    bench.add_argument("--repeats", type=int, default=10, help="timed calls per target (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls before them (default: %(default)s)")
    bench.add_argument(
        "--quick", action="store_true", help="sface and facenet-casia embedding, a 2-step pgd and JPEG only"
    )
    bench.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32",
        help="the white-box networks' arithmetic (bf16: autocast; losses and budgets stay fp32; default: %(default)s)",
    )  # fmt: skip
    bench.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions (CUDA)")
    bench_mode = bench.add_mutually_exclusive_group()
    bench_mode.add_argument("--quiet", action="store_true", help="no progress and no table")
    bench_mode.add_argument("--json", action="store_true", help="print the stored rows as JSON (for scripts)")
    bench.set_defaults(func=_cmd_bench)

    data = sub.add_parser("data", help="get or check a dataset the project's tests use (celeb24)")
    data.add_argument("dataset", choices=["celeb24"])
    data_mode = data.add_mutually_exclusive_group(required=True)
    data_mode.add_argument(
        "--dest", metavar="DIR", help="build it here from its public source (verified file by file; an existing "
        "folder is verified instead)",
    )  # fmt: skip
    data_mode.add_argument("--verify", metavar="DIR", help="check a copy against the manifest shipped with cloakbench")
    data.add_argument(
        "--source", metavar="PATH", help="a checkout of the source repository or its commit's .tar.gz (default: "
        "download it from GitHub)",
    )  # fmt: skip
    data.set_defaults(func=_cmd_data)

    cache = sub.add_parser("cache", help="show or prune the cache (cloaks, embeddings, checkpoints, models, ...)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_info = cache_sub.add_parser("info", help="entries, size and last use of every kind of cache entry")
    cache_info.add_argument("--json", action="store_true", help="print as JSON (for scripts)")
    cache_info.set_defaults(func=_cmd_cache)
    cache_prune = cache_sub.add_parser(
        "prune", help="remove cache entries (default: artifacts, checkpoints and manifests, which need no network)"
    )
    cache_prune.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="a kind from 'cloakbench cache info' or 'artifacts' (every artifact kind), repeatable; model files "
        "(converted, files, downloads), the demo set and aligned datasets go only when named",
    )
    cache_prune.add_argument(
        "--older-than", type=float, metavar="DAYS", help="only entries not used for DAYS days (default: all)"
    )
    cache_prune.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    cache_prune.add_argument("--json", action="store_true", help="print the outcome as JSON (for scripts)")
    cache_prune.set_defaults(func=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from cloakbench.cuda_env import prepare_cuda_env

    prepare_cuda_env()  # before the first CUDA matmul of the process (cuBLAS reads it once)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("cloakbench: interrupted; finished tasks are in the results store (run again to resume)\n")
        return EXIT_INTERRUPTED
    except (ConfigError, DatasetError) as exc:
        sys.stderr.write(f"cloakbench: error: {exc}\n")
        return EXIT_BAD_INPUT
    except FetchError as exc:
        sys.stderr.write(f"cloakbench: could not fetch a required file:\n{exc}\n")
        return EXIT_FETCH
    except CloakbenchError as exc:
        sys.stderr.write(f"cloakbench: error: {exc}\n")
        return EXIT_BAD_INPUT
    except sqlite3.Error as exc:  # the store's own methods say which file (StoreError); this is the safety net
        sys.stderr.write(f"cloakbench: error: an SQLite file failed: {exc}\n")
        return EXIT_BAD_INPUT
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.stderr.write(
            f"cloakbench: error: the disk is full ({exc}); files are replaced whole, so none was left half-written, "
            "and the results store keeps every finished task; free some space and run the same command again\n"
        )
        return EXIT_BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main())
