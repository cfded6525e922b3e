"""The ``grayscale`` and ``realign`` countermeasures on real celeb24 faces, with the real SFace and YuNet.

Thresholds come from measurements on the faces named in each test (2026-12-02; the same quantities over more faces
are in ``benchmarks/results/countermeasures_grayscale_realign.json``, ``scripts/countermeasure_check.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.attacks.transforms.realign import (
    DEFAULT_ROTATION,
    DEFAULT_SCALE,
    DEFAULT_SHIFT,
    Realign,
    realign_to_template,
)
from cloakbench.attacks.transforms.twins import (
    BT601_LUMA,
    GrayscaleTwin,
    RealignJitterTwin,
    draw_similarities,
    similarity_matrices,
)
from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import parse_suite
from cloakbench.datasets.align import align_face, template
from cloakbench.datasets.detect import YuNetDetector
from cloakbench.defenses.budgets import psnr
from cloakbench.defenses.robust import parse_robust
from cloakbench.errors import ConfigError
from cloakbench.images import from_uint8, load_image, stack_images, to_uint8

STRONG = {"rotation": 15.0, "scale": 0.3, "shift": 0.1}  # realign's intensity-100 anchors


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    """Every 60th celeb24 face (31 faces of 24 people; the fixture of tests/test_transforms.py)."""
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::60]])


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- grayscale


def test_grayscale_is_pillows_luma_on_three_equal_channels(faces: torch.Tensor) -> None:
    out = TRANSFORMS.create("grayscale").apply(faces, generator=generator(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    pil = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in to_uint8(faces)])
    assert np.abs(to_uint8(out)[..., 0].astype(int) - pil.astype(int)).max() <= 1
    # the BT.601 weights, computed independently in float64, and OpenCV's RGB2GRAY agree to one level
    rgb = to_uint8(faces).astype(np.float64)
    bt601 = rgb @ np.array(BT601_LUMA)
    assert np.abs(to_uint8(out)[..., 0] - bt601).max() <= 0.5 + 1e-9  # measured: 0.5 (rounding)
    cv = np.stack([cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) for a in to_uint8(faces)])
    assert np.abs(cv.astype(int) - to_uint8(out)[..., 0].astype(int)).max() <= 1
    assert TRANSFORMS.create("grayscale").intensity == 100.0


def test_grayscale_twin_is_the_same_linear_map(faces: torch.Tensor) -> None:
    t = TRANSFORMS.create("grayscale")
    twin = t.twin()
    assert isinstance(twin, GrayscaleTwin)
    real = t.apply(faces, generator=generator(0))
    approx = twin(faces)
    # measured: 0.49999 levels at most (the real output's rounding to 8 bits), on these 31 faces
    assert float((approx - real).abs().max()) * 255 <= 0.5 + 1e-3
    # exactly linear: twin(a x + b y) = a twin(x) + b twin(y); its Jacobian is the map itself
    x, y = faces[:4].double(), faces[4:8].double()
    np.testing.assert_allclose(twin(0.3 * x + 0.5 * y), 0.3 * twin(x) + 0.5 * twin(y), atol=1e-12)
    probe = torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    twin(probe)[0, 0, 0, 0].backward()
    assert probe.grad is not None
    assert probe.grad[0, :, 0, 0].tolist() == pytest.approx(list(BT601_LUMA))


def test_grayscale_removes_the_chroma_of_a_cloak_on_a_grey_photo(faces: torch.Tensor) -> None:
    """A cloak on a greyscale photo adds colour; a greyscale tracker keeps only its luma part."""
    grey = TRANSFORMS.create("grayscale").apply(faces, generator=generator(0))
    g = generator(1)
    delta = (torch.rand(grey.shape, generator=g) * 2 - 1) * 8 / 255
    w = torch.tensor(BT601_LUMA).view(1, 3, 1, 1)
    luma = (delta * w).sum(dim=1, keepdim=True)
    chroma = delta - luma  # per pixel: (delta * w).sum() - luma * w.sum() = 0, since the weights sum to 1
    assert float((chroma * w).sum(dim=1).abs().max()) < 1e-6
    inner = (grey > 16 / 255).all(dim=1, keepdim=True).expand_as(grey) & (grey < 239 / 255)  # no clipping there
    cloaked = (grey + chroma).clamp(0, 1)
    assert not torch.equal(cloaked[:, 0], cloaked[:, 1])  # the cloak made the photo colourful
    seen = TRANSFORMS.create("grayscale").apply(cloaked, generator=generator(0))
    # the chroma-only cloak is gone: back to the grey photo within the 8-bit roundings
    assert float((seen - grey)[inner].abs().max()) * 255 <= 1.0 + 1e-3
    assert float((cloaked - grey)[inner].abs().max()) * 255 > 4.0


# ------------------------------------------------------------------------------------------------ realign: jitter


def test_jitter_is_seeded_by_the_injected_generator(faces: torch.Tensor) -> None:
    t = TRANSFORMS.create("realign")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = t.apply(faces[:8], generator=generator(3))
    assert torch.equal(torch.get_rng_state(), state)  # never the global RNG
    torch.manual_seed(99)
    assert torch.equal(t.apply(faces[:8], generator=generator(3)), a)
    b = t.apply(faces[:8], generator=generator(4))
    assert not torch.equal(a, b)
    # each image gets its own draw: two copies of one face come out different
    pair = t.apply(faces[:1].expand(2, -1, -1, -1).contiguous(), generator=generator(3))
    assert not torch.equal(pair[0], pair[1])


def test_jitter_draws_stay_within_the_bounds() -> None:
    draws = draw_similarities(4000, generator(0), rotation=4.0, scale=0.11, shift=0.03)
    assert float(draws[:, 0].abs().max()) <= 4.0 and float(draws[:, 0].abs().max()) > 3.9
    assert float((draws[:, 1] - 1).abs().max()) <= 0.11 and float((draws[:, 1] - 1).abs().max()) > 0.1
    assert float(draws[:, 2:].abs().max()) <= 0.03 and float(draws[:, 2:].abs().max()) > 0.029
    # the matrices are OpenCV's: rotation about the centre, as cv2.getRotationMatrix2D builds it, then the shift
    one = torch.tensor([[10.0, 0.9, 0.05, -0.02]], dtype=torch.float64)
    expected = cv2.getRotationMatrix2D((55.5, 55.5), 10.0, 0.9)
    expected[:, 2] += np.array([0.05 * 112, -0.02 * 112])
    np.testing.assert_allclose(similarity_matrices(one, 112, 112)[0].numpy(), expected, atol=1e-9)


def test_jitter_moves_a_point_no_further_than_its_bounds() -> None:
    """A bright pixel at the centre moves by the shift only (rotation and scale are about the centre)."""
    x = torch.zeros(64, 3, 101, 101)
    x[:, :, 50, 50] = 1.0
    out = TRANSFORMS.create("realign", rotation=30.0, scale=0.2, shift=0.05).apply(x, generator=generator(0))
    ys, xs = torch.meshgrid(torch.arange(101.0), torch.arange(101.0), indexing="ij")
    mass = out[:, 0].sum(dim=(1, 2))
    assert bool((mass > 0).all())
    cy = (out[:, 0] * ys).sum(dim=(1, 2)) / mass
    cx = (out[:, 0] * xs).sum(dim=(1, 2)) / mass
    assert float((cx - 50).abs().max()) <= 0.05 * 101 + 0.5
    assert float((cy - 50).abs().max()) <= 0.05 * 101 + 0.5
    assert float((cx - 50).abs().max()) > 2.0  # and it does move


def test_jitter_at_zero_bounds_is_the_identity(faces: torch.Tensor) -> None:
    t = TRANSFORMS.create("realign", rotation=0.0, scale=0.0, shift=0.0)
    assert t.intensity == 0.0
    assert torch.equal(t.apply(faces, generator=generator(0)), faces)
    twin = t.twin()
    assert twin is not None
    assert torch.equal(twin(faces, generator=generator(0)), faces)
    # a tiny rotation is not the identity any more
    assert not torch.equal(
        TRANSFORMS.create("realign", rotation=1.0, scale=0.0, shift=0.0).apply(faces, generator=generator(0)), faces
    )


@pytest.mark.parametrize("params", [{}, STRONG], ids=["defaults", "anchors"])
def test_jitter_twin_tracks_the_real_warp(params: dict[str, Any], faces: torch.Tensor) -> None:
    t = TRANSFORMS.create("realign", **params)
    twin = t.twin()
    assert isinstance(twin, RealignJitterTwin)
    real = t.apply(faces, generator=generator(3))
    approx = twin(faces, generator=generator(3))
    gap = (approx - real).abs() * 255
    # measured on these 31 faces (seed 3): max 0.50 levels (the real output's rounding) at both settings, mean
    # 0.227 (defaults) and 0.196 (anchors) levels; PSNR(twin, real) mean 59.4 / 60.1 dB, min 59.0 dB. PSNR(x, real)
    # is 15.2 / 10.8 dB: the twin follows the warp, not the input.
    assert float(gap.max()) <= 1.0
    assert float(gap.mean()) < 0.3
    assert float(psnr(real, approx).min()) > 57.0
    assert float(psnr(real, approx).mean()) > float(psnr(real, faces).mean()) + 35.0


def test_jitter_twin_needs_a_generator_and_passes_gradients(faces: torch.Tensor) -> None:
    twin = TRANSFORMS.create("realign").twin()
    assert twin is not None
    with pytest.raises(ValueError, match="generator"):
        twin(faces[:1])
    x = faces[:2].clone().requires_grad_(True)
    out = twin(x, generator=generator(0))
    (out * torch.randn(out.shape, generator=generator(1))).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert float((x.grad != 0).float().mean()) > 0.5


def test_jitter_twin_in_a_robust_cloak_spec() -> None:
    cfg = parse_robust(
        {"transforms": ["none", "grayscale", {"name": "realign", "params": {"mode": "jitter"}}]}, where="robust"
    )
    assert [t.name for t in cfg.transforms] == ["none", "grayscale", "realign"]
    with pytest.raises(ConfigError, match=r"robust\.transforms\[0\]: 'realign' has no differentiable twin"):
        parse_robust({"transforms": [{"name": "realign", "params": {"mode": "detect"}}]}, where="robust")


# ------------------------------------------------------------------------------------------------ realign: detect


def landmark_error(images: torch.Tensor, detector: YuNetDetector) -> np.ndarray:
    """Mean distance (px) of YuNet's 5 landmarks to the ArcFace template, per image (NaN: no face)."""
    target = template(images.shape[-1])
    out = []
    for a in to_uint8(images):
        found = detector.detect(np.ascontiguousarray(a))
        out.append(float(np.linalg.norm(found[0].landmarks - target, axis=1).mean()) if found else np.nan)
    return np.array(out)


def test_detect_finds_faces_in_celeb24_crops(celeb24_root: Path) -> None:
    crops = stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::10]])  # 184 faces
    t = TRANSFORMS.create("realign", mode="detect")
    assert isinstance(t, Realign)
    t.apply(crops, generator=generator(0))
    report = t.last_report
    assert report.images == crops.shape[0]
    # measured: YuNet found a face in all 184 (and in all 1,839 crops, the JSON artifact); dlib never needed
    assert report.no_face <= 0.03 * report.images
    assert sum(report.by_detector.values()) + report.no_face == report.images
    assert t.totals == report


def test_detect_realigns_a_moved_face_back(faces: torch.Tensor) -> None:
    yunet = YuNetDetector()
    moved = TRANSFORMS.create("realign", **STRONG).apply(faces, generator=generator(1))
    t = TRANSFORMS.create("realign", mode="detect")
    back = t.apply(moved, generator=generator(0))
    again = t.apply(faces, generator=generator(0))
    err_clean, err_moved, err_back = (float(np.nanmean(landmark_error(x, yunet))) for x in (faces, moved, back))
    # measured on these 31 faces: YuNet's points sit 3.80 px from the template on the crops as given, 10.5 px
    # after the strong jitter, 4.83 px after re-detection of the jittered faces (3.58 px re-detecting the crops)
    assert err_moved > err_clean + 4.0
    assert err_back < err_moved - 4.0
    assert err_back < err_clean + 2.0
    # the pixels of the face (the centre) come back close to the re-aligned original: mean absolute difference
    # measured 18.8 levels, against 34.1 for the jittered faces
    centre = (slice(None), slice(None), slice(28, 84), slice(28, 84))
    mad_back = float((back - again)[centre].abs().mean()) * 255
    mad_moved = float((moved - again)[centre].abs().mean()) * 255
    assert mad_back < 0.7 * mad_moved


def test_detect_is_align_face_on_square_images_and_keeps_other_shapes(faces: torch.Tensor) -> None:
    yunet = YuNetDetector()
    image = to_uint8(faces[:1])[0]
    landmarks = yunet.detect(image)[0].landmarks
    assert np.array_equal(realign_to_template(image, landmarks), align_face(image, landmarks, 112))
    # a face in a wider frame: the template is centred in a square of the shorter side, so YuNet finds the
    # re-aligned face's points there (measured: 2.9 px mean distance for this face, 12.9 px before re-alignment)
    wide = np.zeros((112, 160, 3), np.uint8)
    wide[:, 10:122] = image  # off-centre: re-alignment moves it to the middle
    out = TRANSFORMS.create("realign", mode="detect").apply(from_uint8(wide), generator=generator(0))
    assert out.shape == (1, 3, 112, 160)
    found = yunet.detect(to_uint8(out)[0])
    assert found
    centred = template(112) + np.array([24.0, 0.0])
    assert float(np.linalg.norm(found[0].landmarks - centred, axis=1).mean()) < 6.0
    before = yunet.detect(wide)[0].landmarks
    assert float(np.linalg.norm(before - centred, axis=1).mean()) > 10.0  # the face sat 14 px left of the centre


def test_detect_keeps_images_without_a_face_and_counts_them(
    faces: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    blank = torch.full((2, 3, 112, 112), 128 / 255)  # 8-bit, as every real transform returns
    x = torch.cat([faces[:3], blank])
    t = TRANSFORMS.create("realign", mode="detect")
    assert isinstance(t, Realign)
    with caplog.at_level(logging.WARNING, logger="cloakbench.attacks.transforms.realign"):
        out = t.apply(x, generator=generator(0))
    assert torch.equal(out[3:], blank)
    assert not torch.equal(out[:3], faces[:3])
    assert (t.last_report.images, t.last_report.no_face) == (5, 2)
    assert "no face found in 2 of 5" in caplog.text
    t.apply(blank, generator=generator(0))
    assert (t.totals.images, t.totals.no_face) == (7, 4)
    assert t.twin() is None
    assert t.intensity == TRANSFORMS.create("realign").intensity  # the default jitter stands in for it


# ------------------------------------------------------------------------------------------------ identification


@pytest.mark.parametrize(
    ("params", "mean_floor", "min_floor"),
    [
        # measured on these 31 faces (cosine of SFace embeddings, transformed vs clean photo): grayscale mean 0.963
        # (min 0.911); jitter at the defaults 0.929 (0.796, seed 1); detect 0.952 (0.785). Other people's photos:
        # mean 0.14, largest 0.64.
        ({"name": "grayscale"}, 0.93, 0.85),
        ({"name": "realign"}, 0.89, 0.72),
        ({"name": "realign", "mode": "detect"}, 0.91, 0.72),
    ],
    ids=["grayscale", "jitter", "detect"],
)
def test_a_real_recognizer_still_identifies_clean_photos(
    params: dict[str, Any], mean_floor: float, min_floor: float, faces: torch.Tensor, sface: Recognizer
) -> None:
    kwargs = dict(params)
    t = TRANSFORMS.create(kwargs.pop("name"), **kwargs)
    with torch.no_grad():
        clean = sface.embed(faces)
        seen = sface.embed(t.apply(faces, generator=generator(1)))
    cos = (clean * seen).sum(dim=1)
    assert float(cos.mean()) > mean_floor
    assert float(cos.min()) > min_floor
    others = clean @ clean.T - 2 * torch.eye(len(clean))  # every transformed photo stays nearest its own clean one
    assert bool((cos > others.max(dim=1).values).all())


# ------------------------------------------------------------------------------------------------ configuration


def suite_data(celeb24: Path, countermeasures: list[Any]) -> dict[str, Any]:
    return {
        "name": "realign-test",
        "dataset": {"source": "folder", "path": str(celeb24), "max_per_identity": 5},
        "protected": {"identities": ["Halle_Berry", "Tina_Fey"]},
        "defenses": ["noise"],
        "recognizers": ["sface"],
        "countermeasures": countermeasures,
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 100},
        "device": "cpu",
    }


@pytest.mark.parametrize(
    ("countermeasure", "key"),
    [
        ({"name": "realign", "params": {"rotation": -1}}, r"countermeasures\[0\]\.params\.rotation"),
        ({"name": "realign", "params": {"scale": -0.1}}, r"countermeasures\[0\]\.params\.scale"),
        ({"name": "realign", "params": {"scale": 1.0}}, r"countermeasures\[0\]\.params\.scale"),
        ({"name": "realign", "params": {"shift": -0.01}}, r"countermeasures\[0\]\.params\.shift"),
        ({"name": "realign", "params": {"rotation": 181}}, r"countermeasures\[0\]\.params\.rotation"),
        ({"name": "realign", "params": {"mode": "warp"}}, r"countermeasures\[0\]\.params\.mode.*'warp'"),
        ({"name": "realign", "params": {"mode": "detect", "shift": 0.1}}, r"params\.shift applies to mode 'jitter'"),
        ({"name": "realign", "params": {"angle": 3}}, r"unknown key.*'angle'"),
        ({"name": "grayscale", "params": {"weights": "bt709"}}, r"unknown key.*'weights'"),
    ],
)
def test_bad_params_fail_suite_validation_naming_the_key(
    countermeasure: dict[str, Any], key: str, celeb24_root: Path
) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_suite(suite_data(celeb24_root, [countermeasure]), where="suite.yaml")


def test_default_bounds_are_the_documented_ones() -> None:
    t = TRANSFORMS.create("realign")
    assert t.config_dict() == {
        "name": "realign",
        "config": {"mode": "jitter", "rotation": DEFAULT_ROTATION, "scale": DEFAULT_SCALE, "shift": DEFAULT_SHIFT},
    }
    assert TRANSFORMS.create("realign", **STRONG).intensity == 100.0
    assert TRANSFORMS.create("realign", rotation=0.0, scale=0.0, shift=0.05).intensity == pytest.approx(50.0)


@pytest.mark.slow  # about 70 s of CPU on 2 cores (24 people x 5 photos, 3 countermeasures)
def test_a_tiny_suite_runs_with_grayscale_and_realign(celeb24_root: Path) -> None:
    countermeasures = ["none", "grayscale", {"name": "realign", "params": {"mode": "jitter"}}]
    suite = parse_suite(suite_data(celeb24_root, countermeasures), where="suite.yaml")
    result = run_suite(suite)
    cells = {r["countermeasure"]: r for r in result.summary}
    assert sorted(cells) == ["grayscale", "none", "realign"]
    for row in cells.values():
        assert row["status"] == "ok", row
        assert 0.0 <= row["protection_rate"] <= 1.0
        assert row["n_queries"] > 0
    # the tracker still recognises the clean queries against its greyscale or re-aligned enrollment photos
    assert cells["grayscale"]["clean_accuracy_all"] >= 0.8
    assert cells["realign"]["clean_accuracy_all"] >= 0.8
    assert {r["countermeasure"] for r in result.queries} == {"none", "grayscale", "realign"}
