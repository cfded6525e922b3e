"""Device checks of scripts/gpu-check.sh: host synchronisations per optimisation step, CPU vs device embeddings.

``sync``: host synchronisations inside one optimisation step of ``pgd``, ``fawkes-v1-low`` (Fawkes v1.0, one
extractor) and ``lowkey``, with SFace as the surrogate, on the demo faces. Each defense runs once untimed (lazy
initialisation), then with 1 and with 3 steps while the synchronisations are counted; the set-up and the tear-down
of ``protect`` (clean embeddings, budget check, copy back to the host) are the same in both runs, so
``(count(3) - count(1)) / 2`` is what one step costs, and it must be 0. On CUDA the count is of the warnings that
``torch.cuda.set_sync_debug_mode("warn")`` raises (each names the Python line); on the CPU (fallback) it is of the
operators that synchronise on CUDA, seen through a ``TorchDispatchMode``: ``.item()``/``bool()``
(``_local_scalar_dense``), ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique`` and tensors built
from Python data (``lift_fresh``: a host-to-device copy on CUDA).

``parity``: embeddings of the first N demo faces by every white-box zoo recognizer (tag ``white-box``). On CUDA:
the CPU's fp32 embeddings against the device's; on the CPU (fallback): the whole batch against one photo at a
time (kernel-order noise only; not a device comparison). The measure is the largest cosine distance
``1 - cos(a, b)`` over the faces. Tolerances (expected, not yet measured on a GPU): 1e-5 in fp32 without TF32,
1e-3 when TF32 is on for matmuls or convolutions (PyTorch enables TF32 for cuDNN convolutions by default).
A recognizer whose weights are not in the cache (the device has no network) is reported as skipped.

Each command writes a JSON result and a Markdown fragment for the report; exit 0 when it passed, 1 when not.

    python scripts/gpu_sync_check.py sync --device cuda --faces 8 --out DIR
    python scripts/gpu_sync_check.py parity --device cuda --faces 32 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_DEFENSES = ("pgd", "fawkes-v1-low", "lowkey")
SURROGATE = "sface"
STEPS_LOW, STEPS_HIGH = 1, 3
TOL_FP32 = 1e-5
TOL_TF32 = 1e-3

_ATEN = torch.ops.aten
_SYNC_OPS = {
    _ATEN._local_scalar_dense.default: "item/bool",
    _ATEN.nonzero.default: "nonzero",
    _ATEN.masked_select.default: "masked_select",
    _ATEN._unique2.default: "unique",
    _ATEN.unique_consecutive.default: "unique",
    _ATEN.unique_dim.default: "unique",
    _ATEN.lift_fresh.default: "tensor from host data",
}


class _SyncOpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the operators that synchronise with the host on CUDA, with the Python line that called each."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.where: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kind = _SYNC_OPS.get(func)
        if kind is None and func is _ATEN.index.Tensor:
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                kind = "boolean-mask indexing"
        if kind is not None:
            self.where[f"{kind} at {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost cloakbench frame of the current Python stack (else the innermost frame outside torch)."""
    frames = traceback.extract_stack()[:-2]
    for frame in reversed(frames):
        if "/cloakbench/" in frame.filename:
            return f"{frame.filename.split('/cloakbench/')[-1]}:{frame.lineno}"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


@contextmanager
def count_syncs(device: torch.device) -> Iterator[Counter[str]]:
    """Count host synchronisations in the block: CUDA's sync-debug warnings, or the CPU's operator proxy."""
    where: Counter[str] = Counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield where
                torch.cuda.set_sync_debug_mode("default")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    else:
        counter = _SyncOpCounter()
        with counter:
            yield where
        where.update(counter.where)


def demo_faces(n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` photos of the celeb5 demo dataset (sorted by identity and file) and their identities."""
    from cloakbench.datasets.demo import demo_dataset
    from cloakbench.images import load_image, stack_images

    root, _ = demo_dataset()
    paths = sorted(p for p in root.glob("*/*.png"))
    if len(paths) < n:
        raise SystemExit(f"the demo dataset at {root} has {len(paths)} photos; {n} asked for")
    chosen = paths[:n]
    return stack_images([load_image(p) for p in chosen], what=str(root)), [p.parent.name for p in chosen]


def _protect_counted(
    name: str, steps: int, device: torch.device, faces: torch.Tensor, ids: list[str], surrogate: Any
) -> Counter[str]:
    from cloakbench.defenses import DEFENSES

    defense = DEFENSES.create(name, surrogates=[surrogate], steps=steps)
    generator = torch.Generator().manual_seed(0)
    with count_syncs(device) as where:
        defense.protect(faces, ids, generator=generator)
    return where


def run_sync(device: torch.device, n_faces: int) -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS

    faces, ids = demo_faces(n_faces)
    surrogate = RECOGNIZERS.create(SURROGATE).to(device)
    rows: list[dict[str, Any]] = []
    for name in SYNC_DEFENSES:
        start = time.perf_counter()
        _protect_counted(name, STEPS_LOW, device, faces, ids, surrogate)  # untimed: lazy initialisation
        low = _protect_counted(name, STEPS_LOW, device, faces, ids, surrogate)
        high = _protect_counted(name, STEPS_HIGH, device, faces, ids, surrogate)
        per_step = (sum(high.values()) - sum(low.values())) / (STEPS_HIGH - STEPS_LOW)
        in_steps = {k: (high[k] - low.get(k, 0)) / (STEPS_HIGH - STEPS_LOW) for k in high if high[k] != low.get(k, 0)}
        seconds = round(time.perf_counter() - start, 2)
        rows.append({
            "defense": name, "syncs_total_1_step": sum(low.values()), "syncs_total_3_steps": sum(high.values()),
            "syncs_per_step": per_step, "per_step_locations": in_steps, "seconds": seconds,
        })  # fmt: skip
    return {
        "check": "sync", "device": str(device), "faces": n_faces, "surrogate": SURROGATE,
        "method": "sync-debug warnings" if device.type == "cuda" else "CPU proxy: CUDA-synchronising operators",
        "rows": rows, "passed": all(r["syncs_per_step"] == 0 for r in rows),
    }  # fmt: skip


def _white_box_names() -> list[str]:
    from cloakbench.attacks.recognizers import RECOGNIZERS

    return sorted(e.name for e in RECOGNIZERS if "white-box" in e.meta.tags)


def _embed_in_ones(rec: Any, faces: torch.Tensor) -> torch.Tensor:
    return torch.cat([rec.embed(faces[i : i + 1]) for i in range(faces.shape[0])])


def run_parity(device: torch.device, n_faces: int) -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.errors import FetchError

    faces, _ = demo_faces(n_faces)
    tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    tolerance = TOL_TF32 if tf32 else TOL_FP32
    rows: list[dict[str, Any]] = []
    for name in _white_box_names():
        try:
            reference = RECOGNIZERS.create(name)
        except FetchError as exc:
            rows.append({"model": name, "status": "skipped", "reason": str(exc).splitlines()[0]})
            continue
        ref = reference.embed(faces).float()
        if device.type == "cuda":
            other = RECOGNIZERS.create(name).to(device)
            got = other.embed(faces.to(device)).float().cpu()
            compared = "CPU fp32 vs CUDA"
        else:
            got = _embed_in_ones(reference, faces).float()
            compared = "CPU batch vs one at a time"
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=1)
        distance = float((1 - cos).max())
        rows.append({
            "model": name, "status": "passed" if distance <= tolerance else "failed", "compared": compared,
            "max_cosine_distance": distance, "max_abs_diff": float((ref - got).abs().max()),
        })  # fmt: skip
    statuses = [r["status"] for r in rows]
    return {
        "check": "parity", "device": str(device), "faces": n_faces, "tolerance": tolerance,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "rows": rows, "passed": "failed" not in statuses and "passed" in statuses,
    }  # fmt: skip


def to_markdown(result: dict[str, Any]) -> str:
    head = {k: v for k, v in result.items() if k not in ("rows", "check")}
    lines = [f"{k}: {v}" for k, v in head.items()]
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines += ["", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "; ".join(f"{k} x{v:g}" for k, v in value.items()) or "none"
    return str(value).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("check", choices=("sync", "parity"))
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--faces", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="folder for <check>.json and <check>.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sync_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    checks: dict[str, Callable[[torch.device, int], dict[str, Any]]] = {"sync": run_sync, "parity": run_parity}
    result = checks[args.check](torch.device(args.device), args.faces)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.check}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{args.check}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
