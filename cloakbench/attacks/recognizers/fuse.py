"""Inference-time rewrites of plain Conv/BN/PReLU chains (exact up to float rounding).

Folding an eval-mode BatchNorm into the preceding convolution and writing PReLU as
``relu(x) - a * relu(-x)`` make the forward and backward passes 2-4x faster on a CPU (measured on SFace,
see the SFace module), which is what cloaking loops spend their time on. Gradients w.r.t. the input are
unchanged: both rewrites compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReluFormPReLU(nn.Module):
    """PReLU as ``relu(x) - a * relu(-x)``, per channel of a [B, C, H, W] tensor."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().reshape(1, -1, 1, 1).clone())

    weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) - self.weight * F.relu(-x)


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
    """Fold Conv2d+BatchNorm2d pairs and rewrite 4-d PReLUs of a flat ``nn.Sequential``."""
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
            fused.append((name, ReluFormPReLU(module.weight)))
        else:
            fused.append((name, module))
        i += 1
    from collections import OrderedDict

    out = nn.Sequential(OrderedDict(fused)).eval()
    out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return out
