"""SFace in two forms (PyTorch white box, onnxruntime black box) on real faces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.errors import ImageContractError
from cloakbench.images import load_image, stack_images


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    paths = sorted(celeb24_root.glob("*/*.png"))[::23][:80]  # 80 photos spread over all 24 identities
    return stack_images([load_image(p) for p in paths])


@pytest.fixture(scope="module")
def white() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture(scope="module")
def black() -> Recognizer:
    return RECOGNIZERS.create("sface-onnx")


def test_torch_and_onnx_agree_on_real_faces(faces: torch.Tensor, white: Recognizer, black: Recognizer) -> None:
    a, b = white.embed(faces), black.embed(faces)
    assert a.shape == b.shape == (faces.shape[0], 128)
    diff = float((a - b).abs().max())
    assert diff < 1e-4, diff  # measured 4.3e-7 while building it


def test_embeddings_are_unit_norm_and_discriminative(faces: torch.Tensor, white: Recognizer) -> None:
    e = white.embed(faces)
    assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)
    sims = e @ e.T
    assert float(sims.diagonal().min()) > 0.999
    assert float(sims.mean()) < 0.5  # different people are not all alike


def test_gradients_reach_the_input(faces: torch.Tensor, white: Recognizer) -> None:
    x = faces[:4].clone().requires_grad_(True)
    ref = white.embed(faces[4:8])
    loss = (white.embed(x, grad=True) * ref).sum()
    loss.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().mean()) > 0
    # and the gradient is right: a small step along it raises the loss
    with torch.no_grad():
        stepped = (faces[:4] + 1e-3 * x.grad.sign()).clamp(0, 1)
        assert float((white.embed(stepped) * ref).sum()) > float(loss)


def test_black_box_refuses_gradients(faces: torch.Tensor, black: Recognizer) -> None:
    assert not black.capabilities.differentiable
    with pytest.raises(ImageContractError, match="black box"):
        black.embed(faces[:1].clone().requires_grad_(True), grad=True)
    assert black.providers_used[0] == "CPUExecutionProvider"  # type: ignore[attr-defined]


def test_spec_is_explicit(white: Recognizer) -> None:
    spec = white.spec
    assert spec.size == (112, 112) and spec.channel_order.value == "rgb" and spec.scale == 255.0
    assert not spec.flip_tta


def test_fused_network_equals_the_plain_one(faces: torch.Tensor) -> None:
    from cloakbench.attacks.recognizers.sface import load_sface

    plain, fused = load_sface(fused=False), load_sface(fused=True)
    with torch.no_grad():
        x = faces[:8] * 255
        diff = float((plain(x) - fused(x)).abs().max() / plain(x).abs().max())
    assert diff < 1e-5, diff


def test_frozen_prelu_is_the_relu_form_bit_for_bit(faces: torch.Tensor) -> None:
    """The fused network's PReLU computes exactly what the relu form of earlier versions computed
    (``relu(x) - a * relu(-x)``), embeddings and input gradients alike, at x = 0 too (where nn.PReLU's gradient
    differs), so cloaks made by older code are the same bits; its slopes are buffers, never trained."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    from cloakbench.attacks.recognizers.fuse import FrozenPReLU
    from cloakbench.attacks.recognizers.sface import load_sface

    class ReluForm(nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = weight.reshape(1, -1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) - self.weight * F.relu(-x)

    fused = load_sface(fused=True)
    prelus = [name for name, m in fused.named_children() if isinstance(m, FrozenPReLU)]
    assert len(prelus) >= 20  # every PReLU of the MobileFaceNet body
    assert not any("relu" in name for name, _ in fused.named_parameters())
    slopes = torch.cat([getattr(fused, n).weight for n in prelus])
    assert float(slopes.min()) < 0 < 1 < float(slopes.max())  # so max(x, a*x) would be another function
    old = copy.deepcopy(fused)
    for name in prelus:
        setattr(old, name, ReluForm(getattr(fused, name).weight))

    def embed_and_grad(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        x = faces[:4].clone().requires_grad_(True)
        out = net(x * 255)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), grad

    new_out, new_grad = embed_and_grad(fused)
    old_out, old_grad = embed_and_grad(old)
    assert torch.equal(new_out, old_out)
    assert torch.equal(new_grad, old_grad)
    # the kink itself: exact zeros get the relu form's gradient 0 (nn.PReLU's would be a * grad)
    layer = getattr(fused, prelus[0])
    x = torch.tensor([-2.0, 0.0, 3.0]).view(1, 3, 1, 1).repeat(1, layer.weight.numel() // 3 + 1, 1, 1)
    x = x[:, : layer.weight.numel()].clone().requires_grad_(True)
    (g_new,) = torch.autograd.grad(layer(x).sum(), x)
    (g_old,) = torch.autograd.grad(ReluForm(layer.weight)(x).sum(), x)
    assert torch.equal(g_new, g_old) and float(g_new[x == 0].abs().max()) == 0.0
