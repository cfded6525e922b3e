"""Command-line interface: ``cloakbench run | list | validate | protect``.

Exit codes: 0 success; 1 the run finished but some cells failed (``protect``: some photos were skipped);
2 bad input (suite, dataset, arguments); 3 a required file could not be fetched.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from cloakbench.errors import CloakbenchError, ConfigError, DatasetError, FetchError

EXIT_OK, EXIT_CELLS_FAILED, EXIT_BAD_INPUT, EXIT_FETCH = 0, 1, 2, 3


def _suite_path(arg: str) -> Path:
    from cloakbench.bench.suite import builtin_suite_path, builtin_suites

    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path.resolve()
    builtin = builtin_suite_path(arg)
    if builtin is None:
        raise ConfigError(f"{arg!r} is neither a suite file nor a built-in suite ({', '.join(builtin_suites())})")
    return builtin


def _cmd_run(args: argparse.Namespace) -> int:
    from cloakbench.bench.cache import ArtifactCache
    from cloakbench.bench.output import write_run
    from cloakbench.bench.runner import run_suite
    from cloakbench.bench.suite import load_suite

    suite = load_suite(_suite_path(args.suite))
    if args.device:
        import dataclasses

        suite = dataclasses.replace(suite, device=args.device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = (Path(args.out) if args.out else Path("runs") / f"{suite.name}-{stamp}").resolve()
    result = run_suite(suite, cache=ArtifactCache(enabled=not args.no_cache), progress=not (args.quiet or args.json))
    written = write_run(result, out_dir)
    summary = written["summary"]
    failed = sum(1 for r in summary if r.get("status") == "failed")
    if args.json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in summary]
        json.dump({"run_dir": str(out_dir), "summary": clean, "timings_s": result.timings}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        sys.stdout.write((out_dir / "summary.md").read_text())
        sys.stdout.write(f"\nrun folder: {out_dir}  ({result.timings['total_s']:.0f} s)\n")
    return EXIT_CELLS_FAILED if failed else EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from cloakbench.attacks.adaptation import ADAPTATIONS
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.transforms import TRANSFORMS
    from cloakbench.bench.classifiers import CLASSIFIERS
    from cloakbench.bench.suite import builtin_suites
    from cloakbench.defenses import DEFENSES

    registries: dict[str, Any] = {
        "defenses": DEFENSES, "recognizers": RECOGNIZERS, "transforms": TRANSFORMS, "adaptations": ADAPTATIONS,
        "classifiers": CLASSIFIERS,
    }  # fmt: skip
    kinds = [args.kind] if args.kind else [*registries, "suites"]
    payload: dict[str, Any] = {}
    for kind in kinds:
        if kind == "suites":
            payload[kind] = [{"name": n} for n in builtin_suites()]
        else:
            payload[kind] = [_entry_payload(e) for e in registries[kind]]
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for kind, entries in payload.items():
        sys.stdout.write(f"{kind}:\n")
        for e in entries:
            sys.stdout.write(f"  {e['name']:<24} {e.get('summary', '')}".rstrip() + "\n")
            cite = ", ".join(str(x) for x in (e.get("paper"), e.get("venue"), e.get("year")) if x)
            lines = [("paper", cite)] if cite else []
            lines += [(k, str(v)) for k, v in (e.get("details") or {}).items()]
            if e.get("weights"):
                lines.append(("weights", f"{e['weights']} ({e['license']})"))
            if e.get("cached") is not None:
                lines.append(("cached", "yes" if e["cached"] else "no (fetched on first use)"))
            for key, value in lines:
                sys.stdout.write(f"  {'':<24} {key}: {value}\n")
    return EXIT_OK


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
    }


def _cmd_validate(args: argparse.Namespace) -> int:
    from cloakbench.bench.suite import load_suite

    suite = load_suite(_suite_path(args.suite))
    cells = (
        len(suite.seeds)
        * len(suite.defenses)
        * len(suite.recognizers)
        * len(suite.countermeasures)
        * len(suite.classifiers)
    )
    sys.stdout.write(f"{args.suite}: valid suite {suite.name!r}, {cells} cells\n")
    return EXIT_OK


def _cmd_protect(args: argparse.Namespace) -> int:
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
                    f"{photo.status:<10} {photo.source.name} -> {photo.output.name}  ({faces}: {budgets})\n"
                )
            else:
                sys.stdout.write(f"{photo.status:<10} {photo.source.name}  ({photo.detail})\n")
        photos = sum(1 for p in report.photos if p.status != NOT_IMAGE)
        sys.stdout.write(
            f"\n{report.n_cloaked} of {photos} photo(s) cloaked with {report.defense} into {report.out_dir} "
            f"({report.seconds:.0f} s)\n"
        )
    return EXIT_CELLS_FAILED if report.skipped else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloakbench", description="Benchmark face cloaking defenses against face recognizers."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (a YAML file or a built-in name such as 'quick')")
    run.add_argument("suite")
    run.add_argument("--out", help="run folder (default: ./runs/<suite>-<UTC time>)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's device")
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute cloaks and embeddings instead of reusing cached ones",
    )
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    mode.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument(
        "kind", nargs="?", choices=["defenses", "recognizers", "transforms", "adaptations", "classifiers", "suites"]
    )
    lst.add_argument("--json", action="store_true")
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
        "two-extractor defenses such as fawkes-v1-high, and lowkey)",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code: int = args.func(args)
    except (ConfigError, DatasetError) as exc:
        sys.stderr.write(f"cloakbench: error: {exc}\n")
        return EXIT_BAD_INPUT
    except FetchError as exc:
        sys.stderr.write(f"cloakbench: could not fetch a required file:\n{exc}\n")
        return EXIT_FETCH
    except CloakbenchError as exc:
        sys.stderr.write(f"cloakbench: error: {exc}\n")
        return EXIT_BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main())
