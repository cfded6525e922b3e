"""The recognizer registry (``RECOGNIZERS``) and its entries.

Every entry states, without loading anything, its embedding size, input spec, capabilities, weight origin
and licence (``EntryMeta.details``) and whether its weights are cached (``EntryMeta.is_cached``), which is
what ``cloakbench list recognizers`` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloakbench.attacks.recognizers import dlib_resnet, facenet, insightface_onnx, sface
from cloakbench.attacks.recognizers.base import InputSpec, Recognizer
from cloakbench.fetch import is_cached
from cloakbench.registry import EntryMeta, Registry

RECOGNIZERS: Registry[Recognizer] = Registry("recognizer")


def spec_text(spec: InputSpec) -> str:
    return (
        f"{spec.size[0]}x{spec.size[1]} {spec.channel_order.value.upper()}, x*{spec.scale:g} "
        f"mean {list(spec.mean)} std {list(spec.std)}, {spec.alignment.value} crop"
        + (", flip TTA" if spec.flip_tta else "")
        + (f" ({spec.note})" if spec.note else "")
    )


def details(*, dim: int, spec: InputSpec, white_box: bool, devices: str, **extra: Any) -> dict[str, Any]:
    kind = "white box (differentiable)" if white_box else "black box (no gradients)"
    return {"embedding_dim": dim, "input": spec_text(spec), "capabilities": f"{kind}; {devices}", **extra}


_SFACE = {
    "paper": "Zhong et al., SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition",
    "year": 2021,
    "venue": "IEEE TIP",
    "license": sface.PINNED.license,
    "weights_origin": f"{sface.PINNED.requirement} ({sface.PINNED.archive}): {sface.PINNED.member}",
}

RECOGNIZERS.register(
    "sface",
    sface.sface,
    meta=EntryMeta(
        summary="SFace MobileFaceNet, 128-d, PyTorch white box (dequantised int8 weights)",
        tags=("white-box",),
        details=details(dim=128, spec=sface.SPEC, white_box=True, devices="cpu, cuda"),
        is_cached=lambda: is_cached(sface.PINNED),
        **_SFACE,  # type: ignore[arg-type]
    ),
)
RECOGNIZERS.register(
    "sface-onnx",
    sface.sface_onnx,
    meta=EntryMeta(
        summary="SFace, 128-d, onnxruntime black box on the same weights",
        tags=("black-box",),
        details=details(dim=128, spec=sface.SPEC, white_box=False, devices="cpu (CUDA provider if installed)"),
        is_cached=lambda: is_cached(sface.PINNED),
        **_SFACE,  # type: ignore[arg-type]
    ),
)


RECOGNIZERS.register(
    "facenet-casia",
    facenet.facenet_casia,
    meta=EntryMeta(
        summary="FaceNet Inception-ResNet-v1, CASIA-WebFace (Sandberg 20180408-102900), 512-d, PyTorch white box",
        tags=("white-box",),
        details=details(dim=facenet.CASIA_EMBEDDING_DIM, spec=facenet.CASIA_SPEC, white_box=True, devices="cpu, cuda"),
        is_cached=lambda: is_cached(facenet.CASIA_PINNED),
        **facenet.CASIA_META,
    ),
)
RECOGNIZERS.register(
    "facenet-msceleb",
    facenet.facenet_msceleb,
    meta=EntryMeta(
        summary="FaceNet Inception-ResNet-v1, MS-Celeb-1M (Keras port), 128-d, PyTorch white box",
        tags=("white-box",),
        details=details(
            dim=facenet.MSCELEB_EMBEDDING_DIM, spec=facenet.MSCELEB_SPEC, white_box=True, devices="cpu, cuda"
        ),
        is_cached=lambda: is_cached(facenet.MSCELEB_PINNED),
        **facenet.MSCELEB_META,
    ),
)
RECOGNIZERS.register(
    "dlib-resnet",
    dlib_resnet.dlib_resnet,
    meta=EntryMeta(
        summary="dlib ResNet v1 (ResNet-29), 128-d, black box on dlib's own 150x150 face chips",
        tags=("black-box",),
        details=details(dim=dlib_resnet.EMBEDDING_DIM, spec=dlib_resnet.SPEC, white_box=False, devices="cpu"),
        is_cached=lambda: is_cached(dlib_resnet.DLIB_PINNED_RESNET, dlib_resnet.DLIB_PINNED_SHAPE5),
        **dlib_resnet.DLIB_META,
    ),
)


def _sface_insightface(*, device: str = "cpu") -> Recognizer:
    return insightface_onnx.onnx_recognizer(
        sface.onnx_path(), spec=sface.SPEC, embedding_dim=128, name="sface-insightface", device=device
    )


RECOGNIZERS.register(
    "sface-insightface",
    _sface_insightface,
    meta=EntryMeta(
        summary="the SFace ONNX file through insightface's ArcFaceONNX, its wrong normalisation guess overridden",
        tags=("black-box", "insightface"),
        details=details(dim=128, spec=sface.SPEC, white_box=False, devices="cpu (CUDA provider if installed)"),
        is_cached=lambda: is_cached(sface.PINNED),
        **_SFACE,  # type: ignore[arg-type]
    ),
)


def _pack_factory(pack: str) -> Callable[..., Recognizer]:
    def create(*, device: str = "cpu") -> Recognizer:
        return insightface_onnx.insightface_pack(pack, device=device)

    return create


def _pack_cached(pack: str) -> Callable[[], bool]:
    return lambda: insightface_onnx.pack_cached(pack)


for _pack, _arch in (
    ("buffalo_l", "ArcFace ResNet-50 (WebFace600K)"),
    ("antelopev2", "ArcFace ResNet-100 (Glint360K)"),
):
    RECOGNIZERS.register(
        f"insightface-{_pack}",
        _pack_factory(_pack),
        meta=EntryMeta(
            summary=f"insightface {_pack} pack: {_arch}, 512-d; downloaded by insightface on first use",
            paper="Deng et al., ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
            year=2019,
            venue="CVPR",
            license="insightface model packs: non-commercial research use",
            weights_origin=f"insightface release site, pack {_pack} ({insightface_onnx.PACKS[_pack]})",
            tags=("black-box", "insightface", "download"),
            details=details(
                dim=512, spec=insightface_onnx.ARCFACE_SPEC, white_box=False, devices="cpu (CUDA provider if installed)"
            ),
            is_cached=_pack_cached(_pack),
        ),
    )
