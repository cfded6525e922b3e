"""OPOM, One Person One Mask (Zhong & Deng, TPAMI 2022): one universal mask per person.

Follows the authors' code (zhongyy/OPOM, ``code/generation/attack/privacy.py`` and the published
``gen_privacy_*.sh`` configurations; docs/faithfulness.md lists every step with its line):

- One perturbation ``delta`` (L-inf 8/255) for all of a person's photos (the original fits it on 10). The
  loss, per surrogate, is the mean over photos and feature dimensions of the squared distance of each
  masked photo's unit feature to the person's feature subspace, built from the clean photos' unit
  features: the class centre (their mean), the affine hull (exact projection, from an SVD) or the convex
  hull (projection onto the simplex of the features; the first 5 steps use the centre, as the original
  pushes the features out of the hull first). The projection is held fixed in the gradient (the original
  detaches its solver's coefficients; at the exact minimiser this is the distance's true gradient).
- Start: every photo gets its own uniform noise in the ball (the original's random start), then the
  shared mask is the mean over photos of their perturbations after each step, clipped to the ball.
- I-FGSM (the base configuration, 16 rounds, step 1/255): every photo moves by the sign of the mean
  gradient over the photos.
- MI-FGSM with DFANet (the transferability configuration, 100 rounds): each photo accumulates its own
  momentum (mu = 1) of gradients divided by their mean absolute value (the original averages over photos,
  channels and rows, so the divisor is one value per image column, kept as is), moves by the sign of its
  own momentum, and the mask is the mean of the photos' perturbations; the surrogate runs with dropout
  (rate 0.1) on the output of every convolution, active during the attack, on the clean and the masked
  photos alike (the subspace is rebuilt from the dropped-out clean features every step).

The mask is universal: :meth:`OPOM.fit` makes it from some photos and :meth:`OPOM.apply` adds it to any
photos of the same person (add and clip), which is how the authors evaluate it: fitted on a person's
training photos, applied to test photos it has never seen (:func:`unseen_photo_ranks`; the bench's
``probe-cloaking`` protocol). Through the ordinary :meth:`Defense.protect` (the ``evasion`` and ``poisoning``
protocols) each person's mask is fitted on the photos being cloaked. Differences from the original: the noisy
start is clipped to [0, 1]; DFANet's dropout follows every convolution of our zoo's surrogates; the applied mask
is rounded to uint8 (the original truncates).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cloakbench.attacks.recognizers.base import Recognizer, TorchRecognizer
from cloakbench.config import build, require, to_plain
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget
from cloakbench.defenses.objectives import batches, embed_all
from cloakbench.errors import ConfigError
from cloakbench.images import check_images, quantize


class Subspace(enum.Enum):
    CENTER = "center"  # loss_type 7, OPOM-ClassCenter
    AFFINE = "affine"  # loss_type 8, OPOM-AffineHull
    CONVEX = "convex"  # loss_type 9, OPOM-ConvexHull


class Update(enum.Enum):
    IFGSM = "i-fgsm"  # the original's FIM (--base 1): sign of the photos' mean gradient
    MIFGSM = "mi-fgsm"  # the original's DFANet_MFIM (--base 0): per-photo momentum, mean of the photos' steps


@dataclass(frozen=True, kw_only=True)
class OPOMConfig:
    epsilon: float = 8 / 255  # --alpha 8 on 0..255 pixels
    steps: int = 16  # --round 16 (I-FGSM) or 100 (MI-FGSM + DFANet)
    step_size: float = 1 / 255  # --step_size 1 on 0..255 pixels
    update: Update = Update.IFGSM
    momentum: float = 1.0  # MI-FGSM's decay mu (the original accumulates: mu = 1); unused by I-FGSM
    subspace: Subspace = Subspace.AFFINE
    centre_steps: int = 5  # convex hull only: the first steps aim at the class centre (the original's --nter 5)
    dropout: float = 0.0  # DFANet: dropout rate on every convolution's output of the surrogates (0.1 in the original)
    batch_size: int | None = None  # photos per forward pass; the mask's gradient is over all of them

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(0 < self.step_size <= 1, f"step_size must be in (0, 1], got {self.step_size}")
        require(0 <= self.momentum <= 1, f"momentum must be in [0, 1], got {self.momentum}")
        require(self.centre_steps >= 0, f"centre_steps must be >= 0, got {self.centre_steps}")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def subspace_distance(v: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``v``: distance to the affine set ``mean + span(basis rows)`` (the centre when None)."""
    r = v - mean
    if basis is not None and basis.shape[0] > 0:
        r = r - (r @ basis.T) @ basis
    return (r.pow(2).sum(dim=1) + 1e-12).sqrt()


def hull(feats: torch.Tensor, kind: Subspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centre and (for the affine hull) an orthonormal basis of the centred features' span."""
    mean = feats.mean(dim=0)
    if kind is Subspace.CENTER or feats.shape[0] < 2:
        return mean, None
    _, s, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    rank = int((s > s.max() * 1e-6).sum())
    return mean, vh[:rank]


def _project_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row onto the probability simplex (sort-based)."""
    u, _ = torch.sort(x, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
    rho = (u - css / k > 0).to(x.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = css.gather(1, rho) / (rho + 1).to(x.dtype)
    return (x - theta).clamp_min(0)


def convex_hull_projection(v: torch.Tensor, points: torch.Tensor, *, iterations: int = 3000) -> torch.Tensor:
    """Per row of ``v``: the nearest point of the convex hull of the rows of ``points``.

    Solves ``min ||c @ points - v_i||^2`` over the simplex (the original's cvxpy problem with bounds 0 and 1)
    by accelerated projected gradient (FISTA) in float64; a handful of photos make it a tiny problem.
    """
    a = points.detach().double()
    y = v.detach().double()
    gram = a @ a.T
    lip = 2 * float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
    b = y @ a.T
    c = torch.full((y.shape[0], a.shape[0]), 1 / a.shape[0], dtype=torch.float64, device=a.device)
    z, t = c, 1.0
    for _ in range(iterations):
        c_next = _project_simplex(z - 2 * (z @ gram - b) / lip)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = c_next + ((t - 1) / t_next) * (c_next - c)
        c, t = c_next, t_next
    return (c @ a).to(v.dtype)


def subspace_projection(v: torch.Tensor, clean: torch.Tensor, kind: Subspace) -> torch.Tensor:
    """The nearest point to each row of ``v`` in the ``kind`` subspace of the clean features (no gradient)."""
    v = v.detach()
    if kind is Subspace.CONVEX:
        return convex_hull_projection(v, clean)
    mean, basis = hull(clean, kind)
    r = v - mean
    if basis is not None and basis.shape[0] > 0:
        return mean + (r @ basis.T) @ basis
    return mean.expand_as(v)


@contextmanager
def conv_dropout(surrogates: Sequence[Recognizer], rate: float, generator: torch.Generator) -> Iterator[None]:
    """DFANet: while active, dropout (train mode, ``rate``) on every convolution's output of the surrogates.

    The original puts dropout after each convolution of its IR-50 body (and keeps the output layer's off);
    here a forward hook does it on every ``nn.Conv2d`` of each white-box surrogate, drawing its masks from
    ``generator`` (through a generator seeded from it on an accelerator).
    """
    if rate == 0:
        yield
        return
    gens: dict[torch.device, torch.Generator] = {}

    def device_generator(device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return generator
        if device not in gens:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return gens[device]

    def hook(_: nn.Module, __: Any, out: torch.Tensor) -> torch.Tensor:
        keep = torch.empty_like(out).bernoulli_(1 - rate, generator=device_generator(out.device))
        return out * keep / (1 - rate)

    handles = []
    for s in surrogates:
        if not isinstance(s, TorchRecognizer):
            raise ConfigError(f"DFANet needs white-box PyTorch surrogates; {s.name!r} is not one")
        handles += [m.register_forward_hook(hook) for m in s.module.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class OPOM(Defense):
    threat_model = ThreatModel.EVASION
    requirements = DefenseRequirements(differentiable_surrogates=True, min_surrogates=1)

    def __init__(self, config: OPOMConfig, *, surrogates: Sequence[Recognizer], name: str = "opom") -> None:
        super().__init__(name=name, budget=Budget(linf=config.epsilon), surrogates=surrogates)
        self.config = config
        self.masks: dict[str, torch.Tensor] = {}  # the last mask made per identity

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty_like(images)
        for ident in dict.fromkeys(identities):
            idx = torch.tensor([i for i, x in enumerate(identities) if x == ident])
            mask = self.fit(images[idx], generator=generator)
            self.masks[ident] = mask
            out[idx] = (images[idx] + mask).clamp(0, 1)
        return out

    def apply(self, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Add one person's universal mask to any of their photos (add, clip, quantise as a saved PNG)."""
        check_images(images, what=f"{self.name}.apply input")
        if mask.ndim != 4 or mask.shape[0] != 1 or mask.shape[1:] != images.shape[1:]:
            raise ConfigError(f"{self.name}: a mask of shape {list(mask.shape)} cannot cloak {list(images.shape)}")
        if float(mask.abs().max()) > self.config.epsilon + 1e-6:
            raise ConfigError(f"{self.name}: the mask exceeds the L-inf budget {self.config.epsilon:.6g}")
        return quantize((images + mask.to(images.device)).clamp(0, 1))

    def mask_for(self, photos: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Alias of :meth:`fit` (the name earlier versions used)."""
        return self.fit(photos, generator=generator)

    def fit(self, photos: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """The universal mask [1, 3, H, W] of one person, fitted on ``photos`` (the original uses 10)."""
        check_images(photos, what=f"{self.name}.fit input")
        cfg = self.config
        device = self.surrogates[0].device
        x = photos.to(device)
        batch_size = self.batch_size()
        # every photo starts from its own uniform noise in the ball (kept inside [0, 1], which embed requires)
        noise = ((2 * torch.rand(x.shape, generator=generator) - 1) * cfg.epsilon).to(device)
        adv = (x + noise).clamp(0, 1)
        velocity = torch.zeros_like(x)
        delta = torch.zeros((1, *x.shape[1:]), device=device)
        with conv_dropout(self.surrogates, cfg.dropout, generator):
            fixed = None if cfg.dropout > 0 else self._clean_features(x, batch_size)
            for step in range(cfg.steps):
                clean = fixed if fixed is not None else self._clean_features(x, batch_size)
                kind = cfg.subspace
                if kind is Subspace.CONVEX and step < cfg.centre_steps:
                    kind = Subspace.CENTER
                grad = self._gradients(adv, clean, kind, batch_size)
                if cfg.update is Update.IFGSM:
                    moved = adv + cfg.step_size * grad.mean(dim=0, keepdim=True).sign()
                else:
                    scale = grad.abs().mean(dim=(0, 1, 2), keepdim=True)  # one value per image column, as the original
                    velocity = cfg.momentum * velocity + grad / scale.clamp_min(1e-30)
                    moved = adv + cfg.step_size * velocity.sign()
                delta = (moved - x).mean(dim=0, keepdim=True).clamp(-cfg.epsilon, cfg.epsilon)
                adv = (x + delta).clamp(0, 1)
        return delta.detach().cpu()

    def _clean_features(self, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        per_batch = [embed_all(self.surrogates, x[sl], grad=False) for sl in batches(x.shape[0], batch_size)]
        return [torch.cat([b[k] for b in per_batch]) for k in range(len(self.surrogates))]

    def _gradients(self, adv: torch.Tensor, clean: list[torch.Tensor], kind: Subspace, batch_size: int) -> torch.Tensor:
        """Per photo, the gradient of the loss (per surrogate: the mean over photos and feature dimensions of
        the squared distance to the projection onto the clean features' subspace, held fixed)."""
        n = adv.shape[0]
        grad = torch.zeros_like(adv)
        for sl in batches(n, batch_size):
            a = adv[sl].detach().clone().requires_grad_(True)
            feats = embed_all(self.surrogates, a, grad=True)
            loss = sum(
                (f - subspace_projection(f, c, kind)).pow(2).sum() / (n * f.shape[1])
                for f, c in zip(feats, clean, strict=True)
            )
            (g,) = torch.autograd.grad(loss, a)  # type: ignore[arg-type]
            grad[sl] = g
        return grad

    def config_dict(self) -> dict[str, object]:
        return {**super().config_dict(), "config": to_plain(self.config)}


def unseen_photo_ranks(masked: torch.Tensor, clean: torch.Tensor, distractors: torch.Tensor) -> torch.Tensor:
    """OPOM's evaluation (``test_privacy.py``) for one person: unit embeddings of their test photos, masked
    (``masked``) and clean (``clean``), and of distractor photos of other people.

    For every ordered pair (i, j), i != j, the masked photo i searches a gallery of the clean photo j and
    every distractor by cosine similarity; returns the rank of photo j (1 = found first), one per pair, in
    the order (0, 1), (0, 2), ... A tie counts against the person (as the bench's gallery ranks). The
    protection rate at k is the fraction of ranks above k.
    """
    sims = masked @ clean.T  # [K, K]: masked i against clean j
    worse = masked @ distractors.T  # [K, G]
    k = masked.shape[0]
    ranks = [1 + int((worse[i] >= sims[i, j]).sum()) for i in range(k) for j in range(k) if i != j]
    return torch.tensor(ranks, dtype=torch.long)


def make_opom(*, surrogates: Sequence[Recognizer], name: str = "opom", **config: Any) -> OPOM:
    return OPOM(build(OPOMConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name)
