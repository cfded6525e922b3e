"""Retraining speed (pytest-benchmark): one Lightning epoch of each adaptation of SFace on real faces.

Each round trains a fresh copy of SFace for one epoch over ``IMAGES`` celeb24 faces (4 identities) with no
checkpoint store, so nothing is cached; images/s = IMAGES / the round's time (``adversarial`` includes its
PGD steps, which is why it is slower). Plain ``python -m pytest`` runs each once as a test::

    python -m pytest tests/benchmarks/test_adaptation_speed.py --benchmark-only

The device, the batch and the torch threads are added to the machine info; on CUDA the target
synchronises before returning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cloakbench.attacks.adaptation import ADAPTATIONS, TrainingSet
from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.attacks.recognizers.base import TorchRecognizer
from cloakbench.datasets import load_images, scan_folder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMAGES = 32
BATCH = 16 if DEVICE == "cpu" else 32


@pytest.fixture(scope="module")
def training_set(celeb24_root: Path) -> TrainingSet:
    by = scan_folder(celeb24_root).by_identity()
    records = [r for ident in sorted(by)[:4] for r in by[ident][: IMAGES // 4]]
    images = load_images(records)
    return TrainingSet(images=images, labels=tuple(r.identity for r in records), references=images)


@pytest.fixture(scope="module")
def sface() -> TorchRecognizer:
    rec = RECOGNIZERS.create("sface").to(DEVICE)
    assert isinstance(rec, TorchRecognizer)
    return rec


@pytest.mark.parametrize("name", ["end-to-end-anchored", "adaptive-anchored", "adversarial"])
def test_adaptation_epoch(benchmark: Any, name: str, training_set: TrainingSet, sface: TorchRecognizer) -> None:
    adaptation = ADAPTATIONS.create(name, epochs=1, batch_size=BATCH, attack_steps=3)
    benchmark.group = f"adaptation epoch (sface, {IMAGES} faces, batch {BATCH})"
    benchmark.extra_info.update(device=DEVICE, batch=BATCH, images=IMAGES, torch_threads=torch.get_num_threads())
    if DEVICE == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()

    def target() -> float:
        adapted = adaptation.adapt(sface, training_set, seed=0, checkpoints=None)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return adapted.report.final_loss

    loss = benchmark.pedantic(target, rounds=3, warmup_rounds=1, iterations=1)
    assert loss == loss and loss > 0  # trained (a finite, positive loss), not cached
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["images_per_s_median"] = IMAGES / stats.stats.median
