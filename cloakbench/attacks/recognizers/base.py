"""The recognizer contract.

A :class:`Recognizer` maps canonical images (float32 [B, 3, H, W], RGB, [0, 1]) to L2-normalised
embeddings [B, D]. Everything a model needs beyond that (its input size, channel order, value scaling,
flip test-time augmentation) is declared in its :class:`InputSpec` and applied by :meth:`Recognizer.embed`,
so callers never preprocess and nothing is guessed from graph node names.

Precision: a white-box recognizer runs its network in float32 unless :meth:`Recognizer.set_precision` asks for
``bf16``, which autocasts the network's forward (and so backward) pass to bfloat16 on its device; what comes
out is cast back to float32 before it is normalised, so losses, DSSIM, optimiser state and budgets stay float32.
:meth:`Recognizer.compute` names the device, the precision and (on CUDA) whether TF32 matmuls were allowed: the
things besides the weights that move an embedding, and so part of every cache key built on one.

Host synchronisation: ``embed(grad=True)`` (the call inside every optimisation step) checks the input's type
and shape but not its values (a value check reads the tensor back to the host, a synchronisation per step on
a GPU); the values of a defense's iterates are its own doing, and the photos it started from were checked by
:meth:`~cloakbench.defenses.base.Defense.protect`. ``embed()`` without gradients checks everything.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F

from cloakbench.config import require
from cloakbench.errors import ConfigError, ImageContractError
from cloakbench.images import check_image_layout, check_images


class ChannelOrder(enum.Enum):
    RGB = "rgb"
    BGR = "bgr"


class Precision(enum.Enum):
    """The arithmetic a white-box network runs in (see the module docstring)."""

    FP32 = "fp32"
    BF16 = "bf16"


class Alignment(enum.Enum):
    """The face crop a model was trained on."""

    ARCFACE_112 = "arcface-112"  # 5-point similarity transform to the insightface 112x112 template
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """What the model's first layer wants, stated explicitly.

    The model receives ``((x * scale) - mean) / std`` per channel, where ``x`` is the image resized to
    ``size`` and reordered to ``channel_order``. A model that normalises inside its own graph (SFace does)
    declares ``scale=255, mean=0, std=1`` and says so in ``note``.
    """

    size: tuple[int, int]  # (height, width)
    channel_order: ChannelOrder
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    alignment: Alignment
    flip_tta: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        require(self.size[0] > 0 and self.size[1] > 0, f"InputSpec.size must be positive, got {self.size}")
        require(self.scale > 0, f"InputSpec.scale must be positive, got {self.scale}")
        require(all(s > 0 for s in self.std), f"InputSpec.std must be positive, got {self.std}")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    differentiable: bool  # gradients w.r.t. the input are available (white box)
    batched: bool
    devices: tuple[str, ...]  # "cpu", "cuda"
    gradient_free_reason: str = ""


class Recognizer(abc.ABC):
    """A face-embedding model behind the canonical image contract."""

    name: str
    spec: InputSpec
    capabilities: Capabilities
    embedding_dim: int
    weights_id: str = ""
    """Identifies the weights (e.g. the source file's SHA-256 and the converter version): part of every
    cache key that depends on this model, so new weights never reuse old cloaks or embeddings."""
    precision: Precision = Precision.FP32

    @abc.abstractmethod
    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        """Raw embeddings [B, D] for preprocessed input (already resized, reordered and scaled)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> Recognizer:
        """Move to ``device``; recognizers that live on the CPU only accept "cpu"."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"recognizer {self.name!r} runs on the CPU only; asked for {device}")
        return self

    def set_precision(self, precision: Precision | str) -> Recognizer:
        """Run the network in ``precision`` (``fp32`` or ``bf16``); only white boxes support ``bf16``."""
        precision = Precision(precision)
        if precision is not Precision.FP32:
            raise ConfigError(f"recognizer {self.name!r} runs in float32 only; precision {precision.value!r} is for "
                              "white-box (PyTorch) recognizers")  # fmt: skip
        self.precision = precision
        return self

    def compute(self) -> str:
        """Device type, precision and (on CUDA) TF32 matmuls: what besides the weights moves an embedding. An
        onnxruntime session's device is its first provider's (``cuda-onnxruntime`` when CUDA's runs it)."""
        device = self.device
        parts = [device.type, self.precision.value]
        providers = getattr(self, "providers_used", ())  # an onnxruntime session runs where its first provider is
        if providers and providers[0] == "CUDAExecutionProvider":
            parts[0] = "cuda-onnxruntime"
        if device.type == "cuda":
            parts.append("tf32" if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 else "ieee")
        return "/".join(parts)

    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The spec's mean and std as [1, 3, 1, 1] tensors on ``like``'s device (built once per device and
        dtype: no host-to-device copy per call), or None when they are 0 and 1 (nothing to do, bit for bit)."""
        spec = self.spec
        if all(m == 0.0 for m in spec.mean) and all(s == 1.0 for s in spec.std):
            return None
        cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
        cache = self.__dict__.setdefault("_normalisation_cache", {})
        key = (like.device, like.dtype)
        if key not in cache:
            # built outside inference mode whatever the caller's mode: an inference tensor cannot be saved for a
            # later backward pass (embed(grad=True) after embed())
            with torch.inference_mode(False):
                mean = torch.tensor(spec.mean, dtype=like.dtype).view(1, 3, 1, 1).to(like.device)
                std = torch.tensor(spec.std, dtype=like.dtype).view(1, 3, 1, 1).to(like.device)
            cache[key] = (mean, std)
        return cache[key]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Canonical images -> model input, per :attr:`spec` (differentiable)."""
        spec = self.spec
        x = images
        if tuple(x.shape[-2:]) != spec.size:
            x = F.interpolate(x, size=spec.size, mode="bilinear", align_corners=False, antialias=True)
        if spec.channel_order is ChannelOrder.BGR:
            x = x.flip(1)
        x = x * spec.scale
        norm = self._normalisation(x)
        if norm is None:
            return x
        mean, std = norm
        return (x - mean) / std

    def _forward_at_precision(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward` under bf16 autocast when :attr:`precision` says so, returned as float32."""
        if self.precision is Precision.FP32:
            return self._forward(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self._forward(x).float()

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.device))
        feats = self._forward_at_precision(x)
        if self.spec.flip_tta:
            feats = feats + self._forward_at_precision(x.flip(-1))
        if feats.ndim != 2 or feats.shape[1] != self.embedding_dim:
            raise RuntimeError(
                f"recognizer {self.name!r} returned shape {list(feats.shape)}, expected [B, {self.embedding_dim}]"
            )
        return F.normalize(feats, dim=1)

    @final
    def embed(self, images: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """L2-normalised embeddings [B, D] of canonical images.

        Runs under ``torch.inference_mode()`` unless ``grad=True``, which only differentiable recognizers
        accept. With ``grad=True`` the values are not checked (no host synchronisation: module docstring).
        """
        if grad:
            check_image_layout(images, what=f"{self.name}.embed input")
        else:
            check_images(images, what=f"{self.name}.embed input")
        if images.shape[0] == 0:
            return torch.zeros((0, self.embedding_dim), dtype=torch.float32)
        if grad:
            if not self.capabilities.differentiable:
                raise ImageContractError(
                    f"recognizer {self.name!r} is a black box and gives no gradients "
                    f"({self.capabilities.gradient_free_reason or 'not differentiable'})"
                )
            return self._embed(images)
        with torch.inference_mode():
            out = self._embed(images)
        return out.clone()  # cloned outside inference mode: a normal tensor that autograd code may use

    @property
    def preferred_batch_size(self) -> int:
        """Images per forward pass: small on CPUs (activations stay in cache), large on GPUs.

        Measured on a 2-core CPU with SFace: 16 ms/image at batch 8, 34 at 32, 64 at 128; forward+backward
        26 ms/image at batch 8 and 110 at 32.
        """
        return 8 if self.device.type == "cpu" else 256

    cpu_embed_batch: int = 8
    """Images per forward pass when embedding (no gradients) on a CPU; see :attr:`embed_batch_size`."""

    @property
    def embed_batch_size(self) -> int:
        """Images per forward pass of :meth:`embed_batched` (no gradients): :attr:`cpu_embed_batch` on a CPU, 256 on
        a GPU. Optimisation loops keep :attr:`preferred_batch_size` (their cloaks do not depend on this one).

        SFace is fastest at 8 (see :attr:`preferred_batch_size`); FaceNet-CASIA embeds 32 faces at 73 images/s in
        batches of 8 and 87 in batches of 32 (2-core Intel Xeon, 2026-12-02,
        ``benchmarks/results/speed_cpu/measure-after.json``)."""
        return self.cpu_embed_batch if self.device.type == "cpu" else 256

    def embed_batched(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of a large batch, ``batch_size`` images at a time (default :attr:`embed_batch_size`),
        returned on the CPU."""
        batch_size = batch_size or self.embed_batch_size
        outs = [self.embed(images[i : i + batch_size]).cpu() for i in range(0, images.shape[0], batch_size)]
        if not outs:
            return torch.zeros((0, self.embedding_dim), dtype=torch.float32)
        return torch.cat(outs)

    def describe(self) -> dict[str, object]:
        spec = self.spec
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "embedding_dim": self.embedding_dim,
            "input": f"{spec.size[0]}x{spec.size[1]} {spec.channel_order.value} x{spec.scale:g} "
            f"mean={list(spec.mean)} std={list(spec.std)} align={spec.alignment.value} "
            f"flip_tta={spec.flip_tta}",
            "differentiable": self.capabilities.differentiable,
            "devices": list(self.capabilities.devices),
            "compute": self.compute(),
        }


class TorchRecognizer(Recognizer):
    """A white-box recognizer backed by an ``nn.Module`` kept in eval mode."""

    def __init__(
        self, *, name: str, module: torch.nn.Module, spec: InputSpec, embedding_dim: int, weights_id: str = "",
        cpu_embed_batch: int = 8,
    ) -> None:  # fmt: skip
        self.name = name
        self.cpu_embed_batch = cpu_embed_batch
        self.weights_id = weights_id
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.embedding_dim = embedding_dim
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        self.capabilities = Capabilities(differentiable=True, batched=True, devices=devices)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> TorchRecognizer:
        self.module.to(device)
        return self

    def set_precision(self, precision: Precision | str) -> TorchRecognizer:
        self.precision = Precision(precision)
        return self

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(model_input)
        return out
