"""The insightface path, run offline on the SFace ONNX file (the same code path as buffalo_l/antelopev2)."""

from __future__ import annotations

from pathlib import Path

import insightface  # a test extra: this file exercises the insightface path itself
import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, ChannelOrder, sface
from cloakbench.attacks.recognizers.insightface_onnx import InsightfaceRecognizer, insightface_pack, onnx_recognizer
from cloakbench.errors import ConfigError, FetchError
from cloakbench.images import load_image, stack_images, to_uint8


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::40]])


def test_insightface_path_equals_onnxruntime_with_the_declared_spec(faces: torch.Tensor) -> None:
    via_insightface = RECOGNIZERS.create("sface-insightface")
    assert isinstance(via_insightface, InsightfaceRecognizer)
    reference = RECOGNIZERS.create("sface-onnx").embed(faces)
    assert float((via_insightface.embed(faces) - reference).abs().max()) < 1e-5  # measured 0.0


def test_insightface_guess_is_wrong_for_sface_and_is_overridden(faces: torch.Tensor) -> None:
    rec = RECOGNIZERS.create("sface-insightface")
    assert isinstance(rec, InsightfaceRecognizer)
    assert rec.guess_overridden
    assert rec.insightface_guess["mean"] == 127.5  # insightface's name-based guess for this file
    # what insightface alone would have computed: its guess, its BGR->RGB swap
    raw = insightface.model_zoo.get_model(str(sface.onnx_path()))
    bgr = [img[:, :, ::-1].copy() for img in to_uint8(faces)]
    guessed = torch.nn.functional.normalize(torch.from_numpy(raw.get_feat(bgr)), dim=1)
    right = RECOGNIZERS.create("sface-onnx").embed(faces)
    # measured: mean cosine -0.07 between the guessed and the right embeddings: silently useless features
    assert float((guessed * right).sum(dim=1).mean()) < 0.5


def test_strict_mode_refuses_a_wrong_guess() -> None:
    with pytest.raises(ConfigError, match=r"insightface guessed mean=127\.5"):
        onnx_recognizer(sface.onnx_path(), spec=sface.SPEC, embedding_dim=128, strict=True)


def test_bgr_spec_and_missing_file_are_refused(tmp_path: Path) -> None:
    import dataclasses

    bgr = dataclasses.replace(sface.SPEC, channel_order=ChannelOrder.BGR)
    with pytest.raises(ConfigError, match="feeds RGB"):
        onnx_recognizer(sface.onnx_path(), spec=bgr, embedding_dim=128)
    with pytest.raises(ConfigError, match="does not exist"):
        onnx_recognizer(tmp_path / "missing.onnx")


def test_named_pack_without_network_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"by hand .*w600k_r50\.onnx"):
        insightface_pack("buffalo_l", root=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown insightface pack"):
        insightface_pack("buffalo_xl", root=str(tmp_path))
