"""Robust cloaks: optimise through random input transforms (expectation over transformation, EOT).

The defenders' answer to a tracker that recompresses or blurs what it scrapes (Athalye et al., ICML 2018,
"Synthesizing Robust Adversarial Examples"). Any defense that optimises against surrogates becomes robust
by handing it :class:`EOTSurrogate` wrappers: every time the defense embeds an image, the wrapper first
passes it through one transform drawn at random from the configured list, using the transform's
*differentiable twin* (a differentiable JPEG approximation, Gaussian convolution, area/bilinear
resizing). Over the optimisation steps the cloak thus sees the expectation over the transforms — one
sample per step, as stochastic EOT does. Only the optimisation sees twins: the cloak that is saved and
evaluated is a plain image, and reported numbers come from the real codecs.

Listing ``none`` among the transforms keeps the untransformed view in the mix (recommended: the tracker
may not transform at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cloakbench.attacks.recognizers.base import Precision, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.attacks.transforms.twins import DifferentiableTwin
from cloakbench.config import build, require, stable_hash
from cloakbench.errors import ConfigError, RegistryError


@dataclass(frozen=True, kw_only=True)
class TransformRef:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """``robust:`` of a suite's defense entry: the transforms the cloak is optimised through."""

    transforms: tuple[TransformRef, ...]

    def __post_init__(self) -> None:
        require(len(self.transforms) >= 1, "robust.transforms: at least one transform is needed")


def parse_robust(data: Mapping[str, Any], *, where: str) -> RobustConfig:
    """Validate a ``robust`` mapping; every transform must exist and have a differentiable twin."""
    raw = data.get("transforms") if isinstance(data, Mapping) else None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.transforms: expected a non-empty list of transforms ({{name:, params:}} or names)")
    refs = []
    for i, item in enumerate(raw):
        mapping = {"name": item} if isinstance(item, str) else item
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}.transforms[{i}]: expected a name or a mapping, got {item!r}")
        refs.append(build(TransformRef, mapping, where=f"{where}.transforms[{i}]"))
    extra = sorted(set(data) - {"transforms"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, extra))} (allowed: 'transforms')")
    cfg = RobustConfig(transforms=tuple(refs))
    twins(cfg, where=where)  # fails early on a transform without a twin
    return cfg


def twins(cfg: RobustConfig, *, where: str = "robust") -> list[DifferentiableTwin | None]:
    """The differentiable twin of each configured transform (None: the identity)."""
    out: list[DifferentiableTwin | None] = []
    for i, ref in enumerate(cfg.transforms):
        try:
            transform = TRANSFORMS.create(ref.name, **dict(ref.params))
        except RegistryError as exc:
            raise ConfigError(f"{where}.transforms[{i}]: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}.transforms[{i}]: {exc}") from None
        if ref.name == "none":
            out.append(None)
            continue
        twin = transform.twin()
        if twin is None:
            with_twins = [n for n in TRANSFORMS.list() if n == "none" or TRANSFORMS.create(n).twin() is not None]
            raise ConfigError(
                f"{where}.transforms[{i}]: {ref.name!r} has no differentiable twin, so a cloak cannot be optimised "
                f"through it (transforms with one: {', '.join(with_twins)})"
            )
        out.append(twin)
    return out


class EOTSurrogate(Recognizer):
    """A surrogate that sees every image through a randomly drawn differentiable transform.

    Its ``weights_id`` carries the base model's and the transform list's identity, so robust and plain
    cloaks never share a cache entry. The draws come from its own seeded generator.
    """

    def __init__(self, base: Recognizer, cfg: RobustConfig, *, seed: int) -> None:
        self.base = base
        self.config = cfg
        self._twins = twins(cfg)
        self._generator = torch.Generator().manual_seed(seed)
        self.name = base.name
        self.spec = base.spec
        self.capabilities = base.capabilities
        self.embedding_dim = base.embedding_dim
        listing = [(t.name, sorted(dict(t.params).items())) for t in cfg.transforms]
        self.weights_id = f"{base.weights_id}+eot:{stable_hash(listing, seed, length=12)}"

    @property
    def device(self) -> torch.device:
        return self.base.device

    def to(self, device: str | torch.device) -> EOTSurrogate:
        self.base = self.base.to(device)
        return self

    def set_precision(self, precision: Precision | str) -> EOTSurrogate:
        self.base = self.base.set_precision(precision)
        return self

    def compute(self) -> str:
        return self.base.compute()

    def _draw(self) -> DifferentiableTwin | None:
        index = int(torch.randint(len(self._twins), (1,), generator=self._generator))
        return self._twins[index]

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:  # pragma: no cover - _embed is overridden
        return self.base._forward(model_input)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        twin = self._draw()
        if twin is not None:
            images = twin(images, generator=self._generator)
        return self.base._embed(images)

    def describe(self) -> dict[str, object]:
        return {
            **self.base.describe(),
            "weights_id": self.weights_id,
            "robust": [t.name for t in self.config.transforms],
        }


def make_robust(surrogates: Sequence[Recognizer], cfg: RobustConfig | None, *, seed: int) -> list[Recognizer]:
    """The surrogates a robust defense optimises against (unchanged when ``cfg`` is None)."""
    if cfg is None:
        return list(surrogates)
    return [EOTSurrogate(s, cfg, seed=seed + i) for i, s in enumerate(surrogates)]
