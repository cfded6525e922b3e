"""Robust cloaks: expectation over transformation through the differentiable twins (real faces, real SFace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.bench.suite import parse_suite
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.robust import EOTSurrogate, RobustConfig, TransformRef, make_robust, parse_robust
from cloakbench.errors import ConfigError
from cloakbench.images import load_image, stack_images

EPS = 8 / 255
JPEG_ONLY = RobustConfig(transforms=(TransformRef(name="jpeg", params={"quality": 75}),))


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::230]])


def test_eot_surrogate_changes_the_cache_identity_and_is_seeded(sface: Recognizer, faces: torch.Tensor) -> None:
    a, b = EOTSurrogate(sface, JPEG_ONLY, seed=1), EOTSurrogate(sface, JPEG_ONLY, seed=1)
    assert a.weights_id != sface.weights_id and a.weights_id == b.weights_id
    assert torch.equal(a.embed(faces), b.embed(faces))
    # through the JPEG twin the embedding moves, but stays the same face
    cos = F.cosine_similarity(a.embed(faces), sface.embed(faces))
    assert float(cos.max()) < 0.9999 and float(cos.min()) > 0.9
    assert make_robust([sface], None, seed=0) == [sface]
    x = faces[:2].clone().requires_grad_(True)
    a.embed(x, grad=True).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def _jpeg_similarity(defense_surrogates: list[Recognizer], sface: Recognizer, faces: torch.Tensor) -> float:
    """Mean cosine similarity between SFace's embedding of the clean face and of the cloak after real JPEG-75:
    lower means more of the cloak survived the recompression."""
    defense = DEFENSES.create("pgd", surrogates=defense_surrogates, epsilon=EPS, steps=10)
    cloaked = defense.protect(faces, ["u"] * faces.shape[0], generator=torch.Generator().manual_seed(0))
    jpeg = TRANSFORMS.create("jpeg", quality=75).apply(cloaked, generator=torch.Generator())
    return float(F.cosine_similarity(sface.embed(jpeg), sface.embed(faces)).mean())


def test_a_cloak_optimised_through_jpeg_survives_jpeg_better(sface: Recognizer, faces: torch.Tensor) -> None:
    plain = _jpeg_similarity([sface], sface, faces)
    robust = _jpeg_similarity(make_robust([sface], JPEG_ONLY, seed=0), sface, faces)
    # measured on these 8 faces (2026-11-30): plain 0.013, robust (EOT through the JPEG-75 twin) -0.155
    assert robust < plain - 0.08


@pytest.mark.parametrize(
    ("robust", "message"),
    [
        ({"transforms": ["median"]}, r"robust\.transforms\[0\]: 'median' has no differentiable twin"),
        ({"transforms": []}, r"robust\.transforms: expected a non-empty list"),
        ({"transforms": ["jpg"]}, r"robust\.transforms\[0\]: unknown transform 'jpg'"),
        ({"transforms": [{"name": "jpeg", "params": {"quality": 0}}]}, r"quality must be in 1\.\.100"),
        ({"transforms": ["jpeg"], "samples": 4}, r"unknown key\(s\) 'samples'"),
    ],
)
def test_bad_robust_configs_are_named(robust: dict[str, object], message: str) -> None:
    data = {
        "name": "t",
        "defenses": [{"name": "pgd", "robust": robust}],
        "recognizers": ["sface"],
    }
    with pytest.raises(ConfigError, match=message):
        parse_suite(data, where="s.yaml")


def test_robust_config_round_trips_through_the_resolved_suite() -> None:
    data = {
        "name": "t",
        "defenses": [{"name": "pgd", "robust": {"transforms": ["none", "blur"]}}],
        "recognizers": ["sface"],
    }
    suite = parse_suite(data, where="s.yaml")
    assert suite.defenses[0].robust == parse_robust({"transforms": ["none", "blur"]}, where="x")
    again = parse_suite(suite.to_dict(), where="config.yaml")
    assert again.defenses[0].robust == suite.defenses[0].robust
