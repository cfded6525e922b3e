"""The recognizer contract, checked on every registered recognizer with real faces.

Entries whose weights only their own download can provide (insightface packs: tag ``download``) are run
when their files are present; on machines that cannot reach the release site, the test checks the other
half of the contract instead: creating them fails with a FetchError that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer, TorchRecognizer
from cloakbench.errors import FetchError, ImageContractError
from cloakbench.images import load_image, stack_images

NAMES = RECOGNIZERS.list()


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::150][:12]])


_built: dict[str, Recognizer] = {}


def build(name: str) -> Recognizer:
    if name not in _built:
        _built[name] = RECOGNIZERS.create(name)
    return _built[name]


def test_the_zoo_has_the_expected_members() -> None:
    for name in ("sface", "sface-onnx", "sface-insightface", "facenet-casia", "facenet-msceleb", "dlib-resnet"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_states_its_contract(name: str) -> None:
    meta = RECOGNIZERS.get(name).meta
    for key in ("embedding_dim", "input", "capabilities"):
        assert key in meta.details, key
    assert meta.license and meta.weights_origin and meta.is_cached is not None


@pytest.mark.parametrize("name", NAMES)
def test_recognizer_contract(name: str, faces: torch.Tensor) -> None:
    meta = RECOGNIZERS.get(name).meta
    if "download" in meta.tags and meta.is_cached is not None and not meta.is_cached():
        with pytest.raises(FetchError, match="by hand"):
            RECOGNIZERS.create(name)
        return
    rec = build(name)
    assert rec.embedding_dim == meta.details["embedding_dim"]
    emb = rec.embed(faces)
    assert emb.shape == (faces.shape[0], rec.embedding_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(faces.shape[0]), atol=1e-4)
    assert not emb.requires_grad
    assert torch.equal(emb, rec.embed(faces))  # deterministic
    one_by_one = torch.cat([rec.embed(faces[i : i + 1]) for i in range(faces.shape[0])])
    assert float((one_by_one - emb).abs().max()) < 1e-4  # batching changes nothing
    if isinstance(rec, TorchRecognizer):
        assert not rec.module.training  # eval mode
        assert all(not p.requires_grad for p in rec.module.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_input_of_every_white_box(name: str, faces: torch.Tensor) -> None:
    meta = RECOGNIZERS.get(name).meta
    if "download" in meta.tags and meta.is_cached is not None and not meta.is_cached():
        with pytest.raises(FetchError):  # no weights here: the pack's own download is the only source
            RECOGNIZERS.create(name)
        return
    rec = build(name)
    x = faces[:2].clone().requires_grad_(True)
    if not rec.capabilities.differentiable:
        with pytest.raises(ImageContractError, match="black box"):
            rec.embed(x, grad=True)
        return
    (rec.embed(x, grad=True) * rec.embed(faces[2:4])).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
