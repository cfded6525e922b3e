"""The recognizer registry (``RECOGNIZERS``) and its entries."""

from __future__ import annotations

import dataclasses

from cloakbench.attacks.recognizers import sface
from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.registry import EntryMeta, Registry

RECOGNIZERS: Registry[Recognizer] = Registry("recognizer")

_SFACE_META = EntryMeta(
    summary="",
    paper="Zhong et al., SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition",
    year=2021,
    venue="IEEE TIP",
    license=sface.PINNED.license,
    weights_origin=f"{sface.PINNED.requirement}: {sface.PINNED.member}",
)

RECOGNIZERS.register(
    "sface",
    sface.sface,
    meta=dataclasses.replace(
        _SFACE_META,
        summary="SFace MobileFaceNet, 128-d, PyTorch white box (dequantised int8 weights)",
        tags=("white-box",),
    ),
)
RECOGNIZERS.register(
    "sface-onnx",
    sface.sface_onnx,
    meta=dataclasses.replace(
        _SFACE_META, summary="SFace, 128-d, onnxruntime black box on the same weights", tags=("black-box",)
    ),
)
