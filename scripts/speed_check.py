"""Speed facts behind issue 20's choices, and cloak fingerprints to compare two versions of the code.

``measure`` times, on this machine, interleaved round by round (same load for every variant):

- SFace written three ways over the same weights: PReLU as ``relu(x) - a * relu(-x)`` (the earlier form),
  ``nn.PReLU`` (one kernel each way, but its backward also reduces the slopes' gradient), and cloakbench's
  :class:`~cloakbench.attacks.recognizers.fuse.FrozenPReLU` (one kernel forward, a saved slope map backward):
  embedding of 8 faces and forward+backward of 8 faces, with whether each form's outputs and input gradients
  are the same bits as the relu form's;
- FaceNet-CASIA embedding at batch 8 and 32, and forward+backward at fp32 and bf16 (autocast), SFace too;
- the fp32 GEMM peak (2048x2048, the torch threads of this process) and each workload's share of it (FLOPs
  counted with ``torch.utils.flop_counter.FlopCounterMode``);
- with ``--compile``: SFace forward+backward compiled by ``torch.compile`` (inductor) vs eager.

``preset NAME [--surrogates a,b] [--photos 8] [--precision bf16]`` times ``protect`` of 8 celeb24 photos of one
user by a defense preset at its full steps (seconds per photo; the issue's "fawkes-low <= 1 s per image" and
"fawkes-v1-high <= 8 s").

``pgd [--rounds 6]`` times cloakbench's PGD loop and torchattacks' PGD on the same SFace, 8 faces and 10 steps (the
targets of ``tests/benchmarks/test_defense_speed.py``, imported from there), alternating call by call in one
process: separate pytest-benchmark runs of the two move by +-10 % from process to process on this machine.

``bf16`` gives, per white-box model, the cosine distance between fp32 and bf16 embeddings of 16 celeb24 faces.

``train`` times a training step of SFace's fused module (weights trainable, batch 32 celeb24 faces, SGD), as the
fine-tuning countermeasures run it (images/s).

``fingerprint OUT.pt`` writes the cloaks of 6 celeb24 photos (2 users) by pgd (3 steps), lowkey (2),
fawkes-v1-low (3), fawkes-v1-high (2) and fawkes-low (2) made by the cloakbench on ``PYTHONPATH``;
``compare A.pt B.pt`` says, per defense, whether two such files hold the same bits (and how many values differ).
Run ``fingerprint`` once with the old checkout and once with the new one on ``PYTHONPATH``.

    python scripts/speed_check.py measure [--rounds 3] [--compile] > speed.json
    PYTHONPATH=../old python scripts/speed_check.py fingerprint /tmp/old.pt
    python scripts/speed_check.py fingerprint /tmp/new.pt
    python scripts/speed_check.py compare /tmp/old.pt /tmp/new.pt

Prints JSON (``measure``, ``compare``); the machine, torch and the load average are in it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24", PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24"))
GEMM = 2048


def _faces(n: int) -> torch.Tensor:
    from cloakbench.datasets import load_images, scan_folder

    records = scan_folder(CELEB24).records
    return load_images(records[:: max(1, len(records) // n)][:n])


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class _ReluForm(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight.reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) - self.weight * F.relu(-x)


def _sface_forms() -> dict[str, nn.Module]:
    from cloakbench.attacks.recognizers.fuse import FrozenPReLU
    from cloakbench.attacks.recognizers.sface import load_sface

    ours = load_sface(fused=True)
    forms: dict[str, nn.Module] = {"relu-form": copy.deepcopy(ours), "nn.PReLU": copy.deepcopy(ours)}
    forms["cloakbench"] = ours
    for name, module in list(ours.named_children()):
        if isinstance(module, FrozenPReLU):
            setattr(forms["relu-form"], name, _ReluForm(module.weight))
            prelu = nn.PReLU(module.weight.numel())
            prelu.weight.data.copy_(module.weight)
            setattr(forms["nn.PReLU"], name, prelu)
    for net in forms.values():
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return forms


def _forward_backward(net: Callable[[torch.Tensor], torch.Tensor], faces: torch.Tensor, scale: float) -> Any:
    x = faces.clone().requires_grad_(True)
    out = net(x * scale)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def measure(rounds: int, compile_too: bool) -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.recognizers.base import Precision

    faces = _faces(32)
    eight = faces[:8]
    a, b = torch.randn(GEMM, GEMM), torch.randn(GEMM, GEMM)
    forms = _sface_forms()
    reference = _forward_backward(forms["relu-form"], eight, 255.0)
    same = {
        name: [bool(torch.equal(x, y)) for x, y in zip(_forward_backward(net, eight, 255.0), reference, strict=True)]
        for name, net in forms.items()
    }
    casia = RECOGNIZERS.create("facenet-casia")
    sface = RECOGNIZERS.create("sface")

    def grad_of(rec: Any) -> Callable[[], object]:
        def run() -> object:
            x = eight.clone().requires_grad_(True)
            return torch.autograd.grad(rec.embed(x, grad=True).sum(), x)

        return run

    targets: dict[str, tuple[Callable[[], object], int]] = {"gemm-fp32": (lambda: a @ b, 1)}
    for name, net in forms.items():  # run under inference mode below (" embed " in the name)
        targets[f"sface-{name} embed b8"] = (functools.partial(net, eight * 255.0), 8)
    for name, net in forms.items():
        targets[f"sface-{name} fwd+bwd b8"] = (functools.partial(_forward_backward, net, eight, 255.0), 8)
    targets["facenet-casia embed b8 (32 faces)"] = (lambda: casia.embed_batched(faces, batch_size=8), 32)
    targets["facenet-casia embed b32 (32 faces)"] = (lambda: casia.embed_batched(faces, batch_size=32), 32)
    for rec in (sface, casia):
        targets[f"{rec.name} fwd+bwd b8 fp32"] = (grad_of(rec), 8)
        bf16 = copy.copy(rec).set_precision(Precision.BF16)
        targets[f"{rec.name} fwd+bwd b8 bf16"] = (grad_of(bf16), 8)
    if compile_too:
        compiled = torch.compile(forms["cloakbench"])
        start = time.perf_counter()
        _forward_backward(compiled, eight, 255.0)
        compile_s = time.perf_counter() - start
        targets["sface-compiled fwd+bwd b8"] = (lambda: _forward_backward(compiled, eight, 255.0), 8)
    flops = {}
    for name, (fn, _) in targets.items():
        with torch.inference_mode(" embed " in name):
            flops[name] = _flops(fn)
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):  # interleaved: every variant once per round
        for name, (fn, _) in targets.items():
            with torch.inference_mode(" embed " in name):
                seconds[name].append(_median_s(fn, 3))
    load.append(os.getloadavg()[0])
    peak = flops["gemm-fp32"] / min(seconds["gemm-fp32"]) / 1e9
    rows = {}
    for name, (_, items) in targets.items():
        best = min(seconds[name])
        gflops = flops[name] / best / 1e9
        rows[name] = {
            "seconds_best_round": best, "seconds_rounds": seconds[name], "items": items,
            "items_per_s": items / best, "gflop_per_call": flops[name] / 1e9, "gflops_per_s": gflops,
            "share_of_peak": gflops / peak,
        }  # fmt: skip
    out: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "cpu": _cpu(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rounds": rounds, "loadavg_start_end": load, "peak_gflops": peak,
        "sface_forms_same_bits_as_relu_form": {
            k: {"embeddings": v[0], "input_gradients": v[1]} for k, v in same.items()
        },
        "rows": rows,
    }  # fmt: skip
    if compile_too:
        out["compile_seconds"] = compile_s
    return out


def _cpu() -> str:
    from cloakbench.bench.metadata import cpu_model

    return cpu_model()


FINGERPRINT_DEFENSES: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("pgd", ("sface",), {"steps": 3}),
    ("lowkey", ("sface", "facenet-casia"), {"steps": 2}),
    ("fawkes-v1-low", ("sface",), {"steps": 3}),
    ("fawkes-v1-high", ("sface", "facenet-casia"), {"steps": 2}),
    ("fawkes-low", ("sface",), {"steps": 2, "target_pool": "demo"}),
)


def fingerprint(out: Path) -> None:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.datasets import load_images, scan_folder
    from cloakbench.defenses import DEFENSES

    by_user: dict[str, list[Any]] = {}
    for record in scan_folder(CELEB24).records:
        by_user.setdefault(record.identity, []).append(record)
    chosen = [r for user in sorted(by_user)[:2] for r in by_user[user][:3]]
    images, labels = load_images(chosen), [r.identity for r in chosen]
    models = {name: RECOGNIZERS.create(name) for name in ("sface", "facenet-casia")}
    cloaks = {}
    for name, surrogates, params in FINGERPRINT_DEFENSES:
        defense = DEFENSES.create(name, surrogates=[models[s] for s in surrogates], name=name, **params)
        cloaks[name] = defense.protect(images, labels, generator=torch.Generator().manual_seed(0))
    torch.save(cloaks, out)


def compare(a: Path, b: Path) -> dict[str, Any]:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return {
        name: {
            "same_bits": bool(torch.equal(first[name], second[name])),
            "values_differing": int((first[name] != second[name]).sum()),
            "of": first[name].numel(),
            "largest_difference_levels": float((first[name] - second[name]).abs().max() * 255),
        }
        for name in first
    }


def preset(name: str, surrogates: list[str], photos: int, precision: str = "fp32") -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.datasets import load_images, scan_folder
    from cloakbench.defenses import DEFENSES

    records = [r for r in scan_folder(CELEB24).records if r.identity == "Tom_Hanks"][:photos]
    images = load_images(records)
    targeted = name.startswith("fawkes") and "v1" not in name  # the paper version draws a target: the demo pool
    extra: dict[str, Any] = {"target_pool": "demo"} if targeted else {}
    models = [RECOGNIZERS.create(s) for s in surrogates]
    if precision != "fp32":  # only code that has precisions (issue 20 and later) gets here
        models = [m.set_precision(precision) for m in models]
    defense = DEFENSES.create(name, surrogates=models, name=name, **extra)
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    defense.protect(images, ["user"] * len(images), generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    load.append(os.getloadavg()[0])
    return {
        "preset": name, "surrogates": surrogates, "precision": precision, "photos": len(images), "seconds": seconds,
        "seconds_per_photo": seconds / len(images), "cpu": _cpu(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "loadavg_start_end": load,
    }  # fmt: skip


def pgd_against_torchattacks(rounds: int) -> dict[str, Any]:
    import torchattacks

    sys.path.insert(0, str(PROJECT_ROOT / "tests" / "benchmarks"))
    from test_defense_speed import BATCH, EPS, SEED, STEP, STEPS, CosineLogits

    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.datasets import load_images, scan_folder
    from cloakbench.defenses import DEFENSES

    firsts = [records[0] for records in scan_folder(CELEB24).by_identity().values()][:BATCH]
    faces = load_images(firsts).contiguous()
    sface = RECOGNIZERS.create("sface")
    pgd = DEFENSES.create("pgd", surrogates=[sface], epsilon=EPS, step_size=STEP, steps=STEPS)
    noise = torch.rand(faces.shape, generator=torch.Generator().manual_seed(SEED))
    model = CosineLogits(sface)
    attack = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
    labels = torch.zeros(BATCH, dtype=torch.long)

    def theirs() -> object:
        model.set_reference(faces)
        torch.manual_seed(SEED)
        return attack(faces, labels)

    loop = getattr(pgd, "_optimise", None) or getattr(pgd, "_attack")  # noqa: B009 (named _attack before issue 20)
    calls: dict[str, Callable[[], object]] = {"cloakbench": lambda: loop(faces, noise), "torchattacks": theirs}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    return {
        "seconds": seconds, "medians": medians, "ratio_cloakbench_over_torchattacks":
        medians["cloakbench"] / medians["torchattacks"], "cpu": _cpu(), "threads": torch.get_num_threads(),
    }  # fmt: skip


def bf16_distance() -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.recognizers.base import Precision
    from cloakbench.datasets import load_images, scan_folder

    faces = load_images(scan_folder(CELEB24).records[::10][:16])
    out: dict[str, Any] = {"faces": len(faces), "cpu": _cpu(), "torch": torch.__version__}
    for name in ("sface", "facenet-casia", "facenet-msceleb"):
        fp32 = RECOGNIZERS.create(name)
        bf16 = copy.copy(fp32).set_precision(Precision.BF16)
        distance = 1 - (fp32.embed(faces) * bf16.embed(faces)).sum(dim=1)
        out[name] = {"min": float(distance.min()), "max": float(distance.max()), "mean": float(distance.mean())}
    return out


def train_step() -> dict[str, Any]:
    from cloakbench.attacks.recognizers import RECOGNIZERS

    net = copy.deepcopy(RECOGNIZERS.create("sface").module).train()  # type: ignore[attr-defined]
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    from cloakbench.datasets import load_images, scan_folder

    x = load_images(scan_folder(CELEB24).records[:32]) * 255  # the first 32 photos

    def step() -> None:
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()

    step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"images_per_s": 32 / sorted(times)[2], "seconds": times, "load": os.getloadavg()[0], "cpu": _cpu()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--compile", action="store_true")
    pr = sub.add_parser("preset")
    pr.add_argument("name")
    pr.add_argument("--surrogates", default="sface")
    pr.add_argument("--photos", type=int, default=8)
    pr.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    sub.add_parser("train")
    sub.add_parser("bf16")
    pg = sub.add_parser("pgd")
    pg.add_argument("--rounds", type=int, default=6)
    f = sub.add_parser("fingerprint")
    f.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "measure":
        json.dump(measure(args.rounds, args.compile), sys.stdout, indent=2)
    elif args.command == "preset":
        json.dump(preset(args.name, args.surrogates.split(","), args.photos, args.precision), sys.stdout, indent=2)
    elif args.command == "pgd":
        json.dump(pgd_against_torchattacks(args.rounds), sys.stdout, indent=2)
    elif args.command == "bf16":
        json.dump(bf16_distance(), sys.stdout, indent=2)
    elif args.command == "train":
        json.dump(train_step(), sys.stdout, indent=2)
    elif args.command == "fingerprint":
        fingerprint(args.out)
    else:
        json.dump(compare(args.a, args.b), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
