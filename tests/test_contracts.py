"""Contracts: the canonical image type, registries, validated configs, the defense template method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cloakbench.attacks.transforms import TRANSFORMS, InputTransform
from cloakbench.config import build, require
from cloakbench.defenses import DEFENSES, Budget, Defense, DefenseRequirements, ThreatModel
from cloakbench.errors import ConfigError, ImageContractError, RegistryError
from cloakbench.images import check_images, from_uint8, quantize, to_uint8
from cloakbench.registry import EntryMeta, Registry


def test_check_images_rejects_each_violation() -> None:
    ok = torch.rand(2, 3, 8, 8)
    assert check_images(ok) is ok
    with pytest.raises(ImageContractError, match="float32"):
        check_images(ok.double())
    with pytest.raises(ImageContractError, match=r"\[B, 3, H, W\]"):
        check_images(torch.rand(3, 8, 8))
    with pytest.raises(ImageContractError, match=r"\[B, 3, H, W\]"):
        check_images(torch.rand(2, 4, 8, 8))
    with pytest.raises(ImageContractError, match="NaN"):
        check_images(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ImageContractError, match=r"\[0, 1\]"):
        check_images(ok * 255)
    with pytest.raises(ImageContractError, match=r"torch\.Tensor"):
        check_images(np.zeros((1, 3, 2, 2), np.float32))


def test_uint8_conversion_rounds_not_truncates() -> None:
    # 0.6/255 must become level 1 (truncation would give 0); 254.4/255 must become 254
    x = torch.tensor([0.6, 254.4, 127.5, 1.0 * 255]).div(255).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    levels = to_uint8(x)[0, :, :, 0].ravel().tolist()
    assert levels == [1, 254, 128, 255]
    assert torch.equal(quantize(x), from_uint8(to_uint8(x)))


def test_registry_rejects_duplicates_and_suggests_names() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("alpha", lambda **kw: 1, meta=EntryMeta(summary="a"))
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", lambda **kw: 2, meta=EntryMeta(summary="b"))
    with pytest.raises(RegistryError, match="did you mean 'alpha'"):
        reg.create("alpah")
    assert reg.list("a*") == ["alpha"]
    assert reg.list("z*") == []


def test_presets_are_defaults_bound_to_names() -> None:
    reg: Registry[dict[str, int]] = Registry("preset")
    reg.register("p-low", lambda **kw: dict(kw), meta=EntryMeta(summary=""), defaults={"steps": 5})
    assert reg.create("p-low") == {"steps": 5}
    assert reg.create("p-low", steps=7) == {"steps": 7}


@dataclass(frozen=True, kw_only=True)
class _Cfg:
    epsilon: float = 0.1
    steps: int = 3

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")


def test_config_rejects_unknown_keys_by_name_and_where() -> None:
    with pytest.raises(ConfigError, match=r"suite.yaml: defenses\[0\].*'stpes'"):
        build(_Cfg, {"stpes": 3}, where="suite.yaml: defenses[0]")
    with pytest.raises(ConfigError, match="expected an integer"):
        build(_Cfg, {"steps": "3"}, where="x")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        build(_Cfg, {"steps": 0}, where="x")
    cfg = build(_Cfg, {"epsilon": 1}, where="x")
    assert cfg.epsilon == 1.0 and isinstance(cfg.epsilon, float)
    with pytest.raises(AttributeError):
        cfg.steps = 4  # type: ignore[misc]  # frozen


def test_registered_components_reject_unknown_parameters() -> None:
    with pytest.raises(ConfigError, match="'epsilom'"):
        DEFENSES.create("noise", epsilom=0.1)
    with pytest.raises(ConfigError, match=r"quality must be in 1\.\.100"):
        TRANSFORMS.create("jpeg", quality=0)


class _Rogue(Defense):
    """A defense that ignores its budget: the template method must clamp and quantise anyway."""

    threat_model = ThreatModel.POISONING
    requirements = DefenseRequirements(differentiable_surrogates=False, min_surrogates=0)

    def __init__(self, delta: float) -> None:
        super().__init__(name="rogue", budget=Budget(linf=4 / 255))
        self.delta = delta

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        return images + self.delta


def test_defense_template_enforces_budget_range_and_quantisation() -> None:
    images = from_uint8(np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    out = _Rogue(0.3).protect(images, ["a"] * 3, generator=torch.Generator().manual_seed(0))
    assert float((out - images).abs().max()) <= 4 / 255 + 1e-6
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, quantize(out))  # on the uint8 grid
    with pytest.raises(ImageContractError, match="NaN"):
        _Rogue(float("nan")).protect(images, ["a"] * 3, generator=torch.Generator())
    with pytest.raises(ImageContractError, match="identity labels"):
        _Rogue(0.0).protect(images, ["a"], generator=torch.Generator())
    with pytest.raises(ImageContractError, match=r"\[0, 1\]"):
        _Rogue(0.0).protect(images * 2, ["a"] * 3, generator=torch.Generator())


def test_noise_defense_is_seeded_and_within_budget() -> None:
    images = from_uint8(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    noise = DEFENSES.create("noise", epsilon=8 / 255)
    a = noise.protect(images, ["x", "x"], generator=torch.Generator().manual_seed(3))
    b = noise.protect(images, ["x", "x"], generator=torch.Generator().manual_seed(3))
    c = noise.protect(images, ["x", "x"], generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - images).abs().max()) <= 8 / 255 + 1e-6
    assert float((a - images).abs().mean()) > 2 / 255  # it really perturbs


def test_input_transform_contract_checks_output() -> None:
    class Broken(InputTransform):
        name = "broken"

        @property
        def intensity(self) -> float:
            return 0.0

        def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
            return images * 3

    with pytest.raises(ImageContractError, match=r"broken.apply output"):
        Broken().apply(torch.full((1, 3, 4, 4), 0.5), generator=torch.Generator())
