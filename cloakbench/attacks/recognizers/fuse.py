"""Inference-time rewrites of plain Conv/BN/PReLU chains (exact up to float rounding).

Folding an eval-mode BatchNorm into the preceding convolution removes a pass over every activation, and the
network runs in channels-last memory (faster mkldnn/cuDNN convolutions); cloaking loops spend their time in
these forward and backward passes. Gradients w.r.t. the input are unchanged: the rewrite computes the same
function.

PReLU is :class:`FrozenPReLU`: the slopes a buffer (never trained), the forward pass one ``F.prelu`` kernel, and
the backward pass one multiplication by a slope map saved in the forward pass (1 where x > 0, the slope where
x < 0, 0 where x = 0). An earlier version wrote PReLU as ``relu(x) - a * relu(-x)`` (five kernels forward, about
seven backward); torch's own PReLU backward computes the slopes' gradient too, a reduction over every
activation, and took 42 % of SFace's forward+backward time. Measured on the 2-core Intel Xeon of 2026-12-02
(``benchmarks/results/speed_cpu.md``, ``speed_cpu/measure-after.json``), against the relu form: embedding 1.8x
faster (batch 8: 88 -> 159 images/s), forward+backward 1.6x (batch 8: 29.5 -> 48.2 images/s; ``nn.PReLU``'s
backward: 41.4). Embeddings and input gradients are bit-identical to the relu form's, at x = 0 too (where
``nn.PReLU``'s gradient would be ``a`` times the incoming one and the relu form's is 0), so cloaks made by older
code are the same bits (``speed_cpu/fp-compare.json``). The slopes span -0.81..1.12 on SFace, so ``max(x, a * x)``
(valid only for 0 <= a <= 1) is not the same function. Our own fold is kept rather than
``torch.nn.utils.fusion.fuse_conv_bn_eval``: that one rounds differently (embeddings move by ~2e-6), which would
change every cloak for no speed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _SlopeMapPReLU(torch.autograd.Function):
    """``F.prelu`` forward; backward ``grad * s`` with the slope map ``s = prelu(sign(x)) * sign(x)`` (1, a or 0)
    saved in the forward pass. No gradient for the slopes (they are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        sign = torch.sign(x)
        ctx.save_for_backward(F.prelu(sign, weight).mul_(sign))
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (slopes,) = ctx.saved_tensors
        return grad * slopes, None


class FrozenPReLU(nn.Module):
    """PReLU with fixed per-channel slopes (a buffer, so fine-tuning never trains them; module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().reshape(-1).clone())

    weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out: torch.Tensor = _SlopeMapPReLU.apply(x, self.weight)  # type: ignore[no-untyped-call]
            return out
        return F.prelu(x, self.weight)


class ChannelsLast(nn.Module):
    """Switch the memory format of the input to channels-last (faster mkldnn/cuDNN convolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))`` of eval-mode ``bn``."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
    )
    with torch.no_grad():
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        assert fused.bias is not None
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_sequential(model: nn.Sequential) -> nn.Sequential:
    """Fold Conv2d+BatchNorm2d pairs and freeze the per-channel PReLUs of a flat ``nn.Sequential``."""
    children = list(model.named_children())
    fused: list[tuple[str, nn.Module]] = [("channels_last", ChannelsLast())]
    i = 0
    while i < len(children):
        name, module = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(module, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            fused.append((name, fold_conv_bn(module, nxt)))
            i += 2
            continue
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            fused.append((name, FrozenPReLU(module.weight)))
        else:
            fused.append((name, module))
        i += 1
    from collections import OrderedDict

    out = nn.Sequential(OrderedDict(fused)).eval()
    out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return out
