"""Image-quality measures used to report the budget each cloak actually used."""

from __future__ import annotations

import math

import torch

from cloakbench.defenses.budgets import dssim, l2, linf, psnr, quality_report, ssim


def test_identical_images() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.all(dssim(x, x).abs() < 1e-6)
    assert torch.all(torch.isinf(psnr(x, x)))
    assert torch.all(linf(x, x) == 0) and torch.all(l2(x, x) == 0)


def test_known_values() -> None:
    x = torch.full((1, 3, 16, 16), 0.5)
    y = x + 0.1
    assert math.isclose(float(linf(x, y)), 0.1, rel_tol=1e-5)
    assert math.isclose(float(l2(x, y)), 0.1 * math.sqrt(3 * 16 * 16), rel_tol=1e-5)
    assert math.isclose(float(psnr(x, y)), 20.0, rel_tol=1e-4)  # mse 0.01 -> 20 dB


def test_ssim_orders_distortions_and_is_differentiable() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 48, 48, generator=g)
    small = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    large = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert float(ssim(x, small)) > float(ssim(x, large))
    y = small.clone().requires_grad_(True)
    dssim(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and float(y.grad.abs().sum()) > 0
    report = quality_report(x, small)
    assert set(report) == {"linf", "l2", "psnr", "ssim", "dssim"}
