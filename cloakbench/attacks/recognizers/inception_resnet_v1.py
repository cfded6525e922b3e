"""Inception-ResNet-v1, the FaceNet embedding network (Szegedy et al. 2016; Sandberg's FaceNet layout).

Written for inference from converted weights: every convolution carries a bias because the batch norm
that follows it in training is folded into it (the CASIA graph ships folded; the Keras file's BN layers
are folded by the converter, in float64). The bottleneck keeps its BatchNorm1d, as both sources store
it separately.

Every convolution unit records its scope in Sandberg's TensorFlow naming (``Repeat/block35_1/Branch_1/
Conv2d_0b_3x3``), its stride and its TensorFlow padding (``SAME``/``VALID``), so a converter maps
source tensors by name and checks the source graph's strides and padding against the module instead of
trusting either. Layout for a 160x160 input (channels, spatial size):

    stem            Conv2d_1a_3x3 s2 V (32, 79) -> 2a V (32, 77) -> 2b S (64, 77) -> MaxPool_3a s2 (38)
                    -> 3b_1x1 (80, 38) -> 4a_3x3 V (192, 36) -> 4b_3x3 s2 V (256, 17)
    Repeat          5 x Block35 (residual scale 0.17, ReLU)            (256, 17)
    Mixed_6a        reduction A                                      (896, 8)
    Repeat_1        10 x Block17 (scale 0.10, ReLU)                    (896, 8)
    Mixed_7a        reduction B                                      (1792, 3)
    Repeat_2        5 x Block8 (scale 0.20, ReLU)                      (1792, 3)
    Block8          1 x Block8 (scale 1.0, no ReLU)                    (1792, 3)
    Logits          global average pool -> Bottleneck linear (no bias) -> BatchNorm1d

The residual scales are constructor arguments (the converters read them from the source file and
check them). Dropout before the bottleneck is the identity at inference and is left out. The output is
the un-normalised embedding; :class:`~cloakbench.attacks.recognizers.base.Recognizer` L2-normalises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK35_SCALE = 0.17
BLOCK17_SCALE = 0.10
BLOCK8_SCALE = 0.20
BN_EPS = 1e-3


class Prewhiten(nn.Module):
    """Per-image standardisation (Sandberg's ``prewhiten``), parameter-free and differentiable.

    ``(x - mean) / max(std, 1 / sqrt(n))`` with the mean and the population standard deviation taken over
    all ``n = C*H*W`` values of each image.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1, correction=0)
        floor = 1.0 / float(flat.shape[1]) ** 0.5
        std = torch.clamp(std, min=floor)
        return (x - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)


class ConvUnit(nn.Module):
    """Convolution (+ folded BN bias) and optional ReLU, tagged with its Sandberg scope."""

    def __init__(
        self,
        scope: str,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: str = "SAME",
        relu: bool = True,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if padding == "SAME":
            if stride != 1 or kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"{scope}: SAME padding is only symmetric for odd kernels at stride 1")
            pad = (kh // 2, kw // 2)
        elif padding == "VALID":
            pad = (0, 0)
        else:
            raise ValueError(f"{scope}: padding must be SAME or VALID, got {padding!r}")
        self.scope = scope
        self.stride = stride
        self.tf_padding = padding
        self.relu = relu
        self.batch_norm = batch_norm  # followed by BatchNorm in training (folded into the bias here)
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=pad, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(y, inplace=True) if self.relu else y


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)  # TensorFlow VALID: no padding


class Block35(nn.Module):
    """35x35 (here 17x17) residual block: three branches, 1x1 up-projection, scaled residual, ReLU."""

    def __init__(self, scope: str, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = ConvUnit(f"{scope}/Branch_0/Conv2d_1x1", 256, 32, 1)
        self.branch_1 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_1/Conv2d_0a_1x1", 256, 32, 1),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0b_3x3", 32, 32, 3),
        )
        self.branch_2 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_2/Conv2d_0a_1x1", 256, 32, 1),
            ConvUnit(f"{scope}/Branch_2/Conv2d_0b_3x3", 32, 32, 3),
            ConvUnit(f"{scope}/Branch_2/Conv2d_0c_3x3", 32, 32, 3),
        )
        self.up = ConvUnit(f"{scope}/Conv2d_1x1", 96, 256, 1, relu=False, batch_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], dim=1)
        return F.relu(x + self.scale * self.up(mixed))


class Block17(nn.Module):
    """17x17 (here 8x8) residual block with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, scope: str, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = ConvUnit(f"{scope}/Branch_0/Conv2d_1x1", 896, 128, 1)
        self.branch_1 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_1/Conv2d_0a_1x1", 896, 128, 1),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0b_1x7", 128, 128, (1, 7)),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0c_7x1", 128, 128, (7, 1)),
        )
        self.up = ConvUnit(f"{scope}/Conv2d_1x1", 256, 896, 1, relu=False, batch_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], dim=1)
        return F.relu(x + self.scale * self.up(mixed))


class Block8(nn.Module):
    """8x8 (here 3x3) residual block with factorised 1x3 / 3x1 convolutions; the last one has no ReLU."""

    def __init__(self, scope: str, scale: float, *, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.relu = relu
        self.branch_0 = ConvUnit(f"{scope}/Branch_0/Conv2d_1x1", 1792, 192, 1)
        self.branch_1 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_1/Conv2d_0a_1x1", 1792, 192, 1),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0b_1x3", 192, 192, (1, 3)),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0c_3x1", 192, 192, (3, 1)),
        )
        self.up = ConvUnit(f"{scope}/Conv2d_1x1", 384, 1792, 1, relu=False, batch_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], dim=1)
        out = x + self.scale * self.up(mixed)
        return F.relu(out) if self.relu else out


class ReductionA(nn.Module):
    """Mixed_6a: 256 -> 384 + 256 + 256 (max pool) = 896 channels, spatial size 17 -> 8."""

    def __init__(self, scope: str = "Mixed_6a") -> None:
        super().__init__()
        self.branch_0 = ConvUnit(f"{scope}/Branch_0/Conv2d_1a_3x3", 256, 384, 3, stride=2, padding="VALID")
        self.branch_1 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_1/Conv2d_0a_1x1", 256, 192, 1),
            ConvUnit(f"{scope}/Branch_1/Conv2d_0b_3x3", 192, 192, 3),
            ConvUnit(f"{scope}/Branch_1/Conv2d_1a_3x3", 192, 256, 3, stride=2, padding="VALID"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), _max_pool(x)], dim=1)


class ReductionB(nn.Module):
    """Mixed_7a: 896 -> 384 + 256 + 256 + 896 (max pool) = 1792 channels, spatial size 8 -> 3."""

    def __init__(self, scope: str = "Mixed_7a") -> None:
        super().__init__()
        self.branch_0 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_0/Conv2d_0a_1x1", 896, 256, 1),
            ConvUnit(f"{scope}/Branch_0/Conv2d_1a_3x3", 256, 384, 3, stride=2, padding="VALID"),
        )
        self.branch_1 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_1/Conv2d_0a_1x1", 896, 256, 1),
            ConvUnit(f"{scope}/Branch_1/Conv2d_1a_3x3", 256, 256, 3, stride=2, padding="VALID"),
        )
        self.branch_2 = nn.Sequential(
            ConvUnit(f"{scope}/Branch_2/Conv2d_0a_1x1", 896, 256, 1),
            ConvUnit(f"{scope}/Branch_2/Conv2d_0b_3x3", 256, 256, 3),
            ConvUnit(f"{scope}/Branch_2/Conv2d_1a_3x3", 256, 256, 3, stride=2, padding="VALID"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), _max_pool(x)], dim=1)


@dataclass(frozen=True)
class ResidualScales:
    """Residual-branch scales of the four block kinds (Sandberg: 0.17, 0.10, 0.20 and 1.0 for the last)."""

    block35: float = BLOCK35_SCALE
    block17: float = BLOCK17_SCALE
    block8: float = BLOCK8_SCALE
    final: float = 1.0


class InceptionResNetV1(nn.Module):
    """The FaceNet network: images (per :attr:`prewhiten`) -> un-normalised embeddings [B, embedding_dim].

    With ``prewhiten=True`` the first layer is the parameter-free :class:`Prewhiten` (input: RGB 0..255);
    otherwise the input must already be normalised. ``channels_last`` switches the input (and so every
    convolution) to channels-last memory, which mkldnn runs faster on CPUs.
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        prewhiten: bool = True,
        scales: ResidualScales = ResidualScales(),  # frozen dataclass: an immutable default
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.channels_last = channels_last
        self.prewhiten: nn.Module = Prewhiten() if prewhiten else nn.Identity()
        self.conv2d_1a = ConvUnit("Conv2d_1a_3x3", 3, 32, 3, stride=2, padding="VALID")
        self.conv2d_2a = ConvUnit("Conv2d_2a_3x3", 32, 32, 3, padding="VALID")
        self.conv2d_2b = ConvUnit("Conv2d_2b_3x3", 32, 64, 3)
        self.conv2d_3b = ConvUnit("Conv2d_3b_1x1", 64, 80, 1, padding="VALID")
        self.conv2d_4a = ConvUnit("Conv2d_4a_3x3", 80, 192, 3, padding="VALID")
        self.conv2d_4b = ConvUnit("Conv2d_4b_3x3", 192, 256, 3, stride=2, padding="VALID")
        self.repeat = nn.Sequential(*(Block35(f"Repeat/block35_{i}", scales.block35) for i in range(1, 6)))
        self.mixed_6a = ReductionA()
        self.repeat_1 = nn.Sequential(*(Block17(f"Repeat_1/block17_{i}", scales.block17) for i in range(1, 11)))
        self.mixed_7a = ReductionB()
        self.repeat_2 = nn.Sequential(*(Block8(f"Repeat_2/block8_{i}", scales.block8) for i in range(1, 6)))
        self.block8 = Block8("Block8", scales.final, relu=False)
        self.bottleneck = nn.Linear(1792, embedding_dim, bias=False)
        self.bottleneck_bn = nn.BatchNorm1d(embedding_dim, eps=BN_EPS)
        if channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def conv_units(self) -> Iterator[tuple[str, ConvUnit]]:
        """(module path, unit) of every convolution, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, ConvUnit):
                yield name, module

    def residual_scales(self) -> dict[str, float]:
        """Scope -> residual scale of every residual block."""
        return {
            m.up.scope.rsplit("/", 1)[0]: m.scale for m in self.modules() if isinstance(m, (Block35, Block17, Block8))
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1792-channel feature map before pooling."""
        x = self.prewhiten(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = _max_pool(x)
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.mixed_6a(self.repeat(x))
        x = self.mixed_7a(self.repeat_1(x))
        out: torch.Tensor = self.block8(self.repeat_2(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        out: torch.Tensor = self.bottleneck_bn(self.bottleneck(pooled))
        return out
