"""Models from a file, checked against the zoo models they were exported from, on real faces.

For each zoo model asked for (default: ``sface`` and ``facenet-casia``) the script exports its network to ONNX
(``torch.onnx.export``, the TorchScript-based exporter: the dynamo exporter needs ``onnxscript``) and to
TorchScript (``torch.jit.trace``) in a temporary folder, plus, for the first model, a variant that takes NHWC
BGR input (the layout and colour conversions of a Keras/OpenCV export). Each file is loaded the way a suite
loads it (a ``recognizers:`` mapping through :func:`cloakbench.bench.suite.parse_suite`, with the zoo model's
input spec written out as ``input:``), and its embeddings of celeb24 faces are compared with the zoo model's own:
the largest absolute difference of any embedding component and the smallest cosine similarity.

It then makes a PGD cloak (L-inf 8/255, 10 steps) of the first model's faces with the TorchScript file as the
surrogate and with the zoo model as the surrogate, and reports how far each cloak moves the TorchScript model's
embedding (cosine distance) and how far the two cloaks are apart (8-bit levels), next to uniform noise at the
same budget.

    python scripts/file_models_check.py                              # writes benchmarks/results/file_models.json
    python scripts/file_models_check.py --models sface --every 20 --out /tmp/file_models.json

``tests/test_file_models.py`` imports the export helpers from this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "results" / "file_models.json"
CELEB24 = PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24"


class NhwcBgr(torch.nn.Module):
    """A network wrapped to take [B, H, W, 3] BGR input, as a TensorFlow or OpenCV export would."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.permute(0, 3, 1, 2).flip(1))
        return out


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamic_batch: bool = True) -> Path:
    """``module`` to an ONNX file (opset 17, legacy exporter; a dynamic batch axis unless told otherwise)."""
    axes = {"input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the legacy exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=17,
        )
    return path


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``module`` traced to a TorchScript file."""
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    traced.save(str(path))
    return path


def input_mapping(rec: Any) -> dict[str, Any]:
    """A zoo recognizer's :class:`InputSpec` written as a suite's ``input:`` mapping."""
    spec = rec.spec
    return {
        "size": list(spec.size),
        "colour": spec.channel_order.value,
        "scale": spec.scale,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "alignment": spec.alignment.value,
        "flip_tta": spec.flip_tta,
    }


def export_variants(rec: Any, folder: Path, *, nhwc_bgr: bool) -> dict[str, dict[str, Any]]:
    """Suite mappings (``{name, onnx|torchscript, input}``) for the files exported from zoo recognizer ``rec``."""
    h, w = rec.spec.size
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * rec.spec.scale
    base = input_mapping(rec)
    out: dict[str, dict[str, Any]] = {}
    for fmt, export, suffix in (("onnx", export_onnx, "onnx"), ("torchscript", export_torchscript, "pt")):
        path = export(rec.module, example, folder / f"{rec.name}.{suffix}")
        out[f"{fmt}"] = {"name": f"file-{rec.name}-{fmt}", fmt: str(path), "input": base}
        if nhwc_bgr:
            wrapped = NhwcBgr(rec.module)
            path = export(wrapped, example.permute(0, 2, 3, 1).flip(-1), folder / f"{rec.name}-nhwc-bgr.{suffix}")
            spec = {**base, "layout": "nhwc", "colour": "bgr"}
            out[f"{fmt}-nhwc-bgr"] = {"name": f"file-{rec.name}-{fmt}-nhwc-bgr", fmt: str(path), "input": spec}
    return out


def load_faces(root: Path, every: int) -> torch.Tensor:
    from cloakbench.images import load_image, stack_images

    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[::every]
    if not paths:
        raise SystemExit(f"no images under {root}/<identity>/")
    return stack_images([load_image(p) for p in paths], what=str(root))


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_diff": float((reference - other).abs().max()),
        "min_cosine": float((reference * other).sum(dim=1).min()),
    }


def cosine_shift(rec: Any, originals: torch.Tensor, cloaked: torch.Tensor) -> list[float]:
    a, b = rec.embed(originals), rec.embed(cloaked)
    return [float(v) for v in 1.0 - (a * b).sum(dim=1)]


def pgd_check(zoo: Any, file_rec: Any, faces: torch.Tensor, *, epsilon: float, steps: int) -> dict[str, Any]:
    """Cloaks of ``faces`` with the file model and with the zoo model as PGD surrogates, and noise."""
    from cloakbench.defenses import DEFENSES

    out: dict[str, Any] = {"epsilon": epsilon, "steps": steps, "faces": int(faces.shape[0])}
    cloaks = {}
    for label, surrogate in (("file", file_rec), ("zoo", zoo)):
        pgd = DEFENSES.create("pgd", surrogates=[surrogate], name=f"pgd-{label}", epsilon=epsilon, steps=steps)
        start = time.perf_counter()
        cloaks[label] = pgd.protect(faces, ["user"] * faces.shape[0], generator=torch.Generator().manual_seed(0))
        out[f"seconds_{label}_surrogate"] = time.perf_counter() - start
        out[f"file_model_shift_{label}_surrogate"] = cosine_shift(file_rec, faces, cloaks[label])
    noise = DEFENSES.create("noise", name="noise", epsilon=epsilon)
    noisy = noise.protect(faces, ["user"] * faces.shape[0], generator=torch.Generator().manual_seed(0))
    out["file_model_shift_noise"] = cosine_shift(file_rec, faces, noisy)
    out["cloaks_max_diff_levels"] = float((cloaks["file"] - cloaks["zoo"]).abs().max() * 255)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.recognizers.from_file import load_file_model
    from cloakbench.bench.suite import parse_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sface", "facenet-casia"], help="zoo models to export")
    parser.add_argument("--faces", type=Path, default=CELEB24, help="DIR/<identity>/<image> (default: celeb24)")
    parser.add_argument("--every", type=int, default=10, help="every n-th face (sorted paths)")
    parser.add_argument("--pgd-faces", type=int, default=8, help="faces cloaked in the PGD check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    faces = load_faces(args.faces, args.every)
    report: dict[str, Any] = {
        "command": "python scripts/file_models_check.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "faces": int(faces.shape[0]),
        "models": {},
    }
    try:
        import onnxruntime

        report["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.models):
            zoo = RECOGNIZERS.create(name)
            folder = Path(tmp) / name
            folder.mkdir()
            start = time.perf_counter()
            variants = export_variants(zoo, folder, nhwc_bgr=i == 0)
            export_seconds = time.perf_counter() - start
            suite = parse_suite(
                {"name": "file-models", "defenses": ["noise"], "recognizers": list(variants.values())},
                where="file_models_check",
            )
            reference = zoo.embed_batched(faces)
            entry: dict[str, Any] = {"export_seconds": export_seconds, "embedding_dim": zoo.embedding_dim}
            files = {}
            for key, model in zip(variants, suite.models, strict=True):
                rec = load_file_model(model)
                files[key] = rec
                entry[key] = {**compare(reference, rec.embed_batched(faces)), "weights_id": rec.weights_id}
            if i == 0:
                entry["pgd"] = pgd_check(zoo, files["torchscript"], faces[: args.pgd_faces], epsilon=8 / 255, steps=10)
            report["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
