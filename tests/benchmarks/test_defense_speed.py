"""Defense speed against a reference implementation: our ``pgd`` loop vs torchattacks.PGD (pytest-benchmark).

Both run the same attack on the same surrogate (SFace), the same 8 real celeb24 faces and 10 steps of
2/255 in the 8/255 ball from the same random start: torchattacks maximises the cross-entropy of
:class:`CosineLogits`, whose gradient signs are those of our cosine distance, so the two compute the
same iterates (``tests/test_torchattacks_parity.py`` checks that; the wrapper is repeated here). Each
timed call includes the clean embedding of the batch, which both need. The two benchmarks share one
group, so pytest-benchmark's table puts them side by side::

    python -m pytest tests/benchmarks/test_defense_speed.py --benchmark-only

Each benchmark is ``benchmark.pedantic`` with one warm-up round and one call per round; each target
synchronises CUDA before returning. The device, the batch, the steps and the torch threads go to each
benchmark's ``extra_info``; ``conftest.py`` adds the torch, CUDA, cuDNN and TF32 details to the machine info.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchattacks
from torch import nn

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.attacks.recognizers.base import TorchRecognizer
from cloakbench.bench.timing import synchronize
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.pgd import PGD

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 8
STEPS = 10
EPS, STEP, SEED = 8 / 255, 2 / 255, 0
GROUP = f"pgd-vs-torchattacks (sface, {BATCH} faces, {STEPS} steps)"


class CosineLogits(nn.Module):
    """SFace as a 2-class classifier, logits ``[cos(f(x), f(x_clean)), 0]`` (see the parity test)."""

    def __init__(self, recognizer: TorchRecognizer) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.backbone = recognizer.module  # torchattacks takes the device from the parameters
        self.reference: torch.Tensor | None = None
        self.eval()  # or torchattacks would put SFace's module in training mode after the attack

    def set_reference(self, clean: torch.Tensor) -> None:
        self.reference = self.recognizer.embed(clean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None, "set_reference() first"
        cos = (self.recognizer.embed(x, grad=True) * self.reference).sum(dim=1)
        return torch.stack([cos, torch.zeros_like(cos)], dim=1)


def _sync() -> None:
    synchronize(torch.device(DEVICE))


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    """The first photo of each of the first BATCH identities (contiguous: see the parity test)."""
    firsts = [records[0] for records in scan_folder(celeb24_root).by_identity().values()][:BATCH]
    assert len(firsts) == BATCH
    return load_images(firsts).contiguous().to(DEVICE)


@pytest.fixture(scope="module")
def sface() -> TorchRecognizer:
    rec = RECOGNIZERS.create("sface").to(DEVICE)
    assert isinstance(rec, TorchRecognizer)
    return rec


@pytest.fixture(autouse=True)
def _machine_info(benchmark: Any) -> None:
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["batch"] = BATCH
    benchmark.extra_info["steps"] = STEPS
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    if DEVICE == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()


@pytest.mark.benchmark(group=GROUP)
def test_pgd_cloakbench(benchmark: Any, faces: torch.Tensor, sface: TorchRecognizer) -> None:
    pgd = DEFENSES.create("pgd", surrogates=[sface], epsilon=EPS, step_size=STEP, steps=STEPS)
    assert isinstance(pgd, PGD)
    noise = torch.rand(faces.shape, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)

    def target() -> torch.Tensor:
        out = pgd._optimise(faces, noise)  # the loop protect() runs per batch, before quantisation
        _sync()
        return out

    out = benchmark.pedantic(target, rounds=7, warmup_rounds=1, iterations=1)
    assert float((out - faces).abs().max()) <= EPS + 1e-6


@pytest.mark.benchmark(group=GROUP)
def test_pgd_torchattacks(benchmark: Any, faces: torch.Tensor, sface: TorchRecognizer) -> None:
    model = CosineLogits(sface)
    attack = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
    labels = torch.zeros(BATCH, dtype=torch.long, device=DEVICE)

    def target() -> torch.Tensor:
        model.set_reference(faces)
        torch.manual_seed(SEED)  # the start it draws from the global generator: the same as ours
        out: torch.Tensor = attack(faces, labels)
        _sync()
        return out

    out = benchmark.pedantic(target, rounds=7, warmup_rounds=1, iterations=1)
    assert float((out - faces).abs().max()) <= EPS + 1e-6
    assert not sface.module.training
