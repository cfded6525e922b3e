"""Pieces the optimisation-based cloaks share: tanh-space parametrisation, feature losses, smoothing.

All pure functions on canonical batches; the surrogates are called with ``grad=True`` so gradients reach
the input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers.base import Recognizer

TANH_SCALE = 2.0 - 1e-6
"""x = tanh(w) / TANH_SCALE + 0.5 keeps x strictly inside (0, 1), so arctanh of a 0 or 1 pixel is finite."""


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((x - 0.5) * TANH_SCALE)


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / TANH_SCALE + 0.5


def embed_all(surrogates: Sequence[Recognizer], x: torch.Tensor, *, grad: bool) -> list[torch.Tensor]:
    """Each surrogate's unit-norm embeddings of ``x``."""
    if grad:
        return [s.embed(x, grad=True) for s in surrogates]
    with torch.no_grad():
        return [s.embed(x) for s in surrogates]


def feature_distance(feats: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the sum over surrogates of ||f(x') - f(ref)|| / ||f(ref)|| (Fawkes' feature distance).

    Embeddings are unit-norm, so the normaliser is 1 and each term is sqrt(2 * cosine distance). A 1e-12
    under the root keeps the gradient defined where f(x') == f(ref) (the first step of an untargeted cloak).
    """
    total = torch.zeros(feats[0].shape[0], device=feats[0].device)
    for f, r in zip(feats, refs, strict=True):
        total = total + ((f - r).pow(2).sum(dim=1) + 1e-12).sqrt() / r.norm(dim=1)  # smooth at f == r
    return total


def squared_feature_distance(feats: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the sum over surrogates of ||f(x') - f(ref)||^2 / ||f(ref)||^2 (LowKey's loss terms)."""
    total = torch.zeros(feats[0].shape[0], device=feats[0].device)
    for f, r in zip(feats, refs, strict=True):
        total = total + (f - r).pow(2).sum(dim=1) / r.pow(2).sum(dim=1)
    return total


def gaussian_blur(x: torch.Tensor, *, kernel: int, sigma: float) -> torch.Tensor:
    """Differentiable Gaussian smoothing (separable, reflect padding, same size)."""
    coords = torch.arange(kernel, dtype=x.dtype, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    pad = kernel // 2
    y = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def signed_gradient_ascent(
    x: torch.Tensor, start: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *, epsilon: float,
    step_size: float, steps: int,
) -> torch.Tensor:  # fmt: skip
    """L-inf projected signed-gradient ascent (I-FGSM / PGD) on ``objective(adv)`` (per image, summed).

    Each step moves every pixel by ``step_size`` along the sign of the gradient, then projects back into
    the ``epsilon`` ball around ``x`` and into [0, 1].
    """
    adv = start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(adv).sum(), adv)
        with torch.no_grad():
            adv = adv + step_size * grad.sign()
            adv = (x + (adv - x).clamp(-epsilon, epsilon)).clamp(0, 1)
    return adv.detach()


def squared_distance_over_norm(feats: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the sum over surrogates of ||f(x') - f(ref)||^2 / ||f(ref)|| (Fawkes v1.0's feature term:
    the squared distance over the reference's norm, not its square; 1 for unit-norm embeddings)."""
    total = torch.zeros(feats[0].shape[0], device=feats[0].device)
    for f, r in zip(feats, refs, strict=True):
        total = total + (f - r).pow(2).sum(dim=1) / r.norm(dim=1)
    return total
