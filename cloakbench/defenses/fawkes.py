"""Fawkes (Shan et al., USENIX Security 2020): the paper's targeted cloak and v1.0's untargeted one.

Both optimise a perturbation in tanh space (x' = tanh(w + m) / k + 1/2, k = 2 - 1e-6, so x' stays in
(0, 1)) under a soft DSSIM penalty ``c * max(DSSIM(x, x') - rho, 0)^2``, as Shawn-Shan/fawkes does it
step by step (``docs/faithfulness.md`` cites the lines). The original works on 0..255 pixels; the
optimised variable (m, in arctanh space), the DSSIM (SSIM is scale-free given ``max_val``) and the unit-norm
features are the same numbers on [0, 1], so its learning rates, start and kick carry over unchanged and its
+-15 pixel cap is +-15/255 here.

- **v1.0** (untargeted, ``fawkes/differentiator.py`` and ``protection.py`` at HEAD): *maximise*
  ``sum_s ||f_s(x') - f_s(x)||^2 / ||f_s(x)||`` (unit-norm features, so the sum of squared distances) with
  each pixel held within +-15/255; loss ``c * max(d - rho, 0)^2 - w * feature`` with the command line's
  c = 1e6 and a per-image weight w on the feature term that doubles while DSSIM <= 0.9 rho and halves
  while >= 1.1 rho (:func:`v1_weight_update`); start uniform in +-1e-4 (tanh space), after the first
  Adadelta step a kick of -0.01 * sign(gradient); Keras Adadelta (rho 0.95, eps 1e-7); modes (rho, steps,
  learning rate, extractors): low (0.004, 40, 25, 1), mid (0.012, 75, 20, 2), high (0.017, 150, 15, 2).
  Kept: the iterate with the largest feature term among those with DSSIM <= 1.1 rho, replaced by the last
  iterate when that best is below 0.3, the last one's DSSIM below 0.015 and its feature term larger
  (:func:`v1_save_last`). DSSIM is TensorFlow's SSIM (valid windows, :func:`~cloakbench.defenses.budgets.
  dssim_tf`); nothing projects onto it, so a v1.0 cloak may end slightly above rho.
- **paper** (targeted, the 0.3 release, ``v0.3`` tag): pick a public target identity among the 20
  farthest (:mod:`cloakbench.defenses.targets`), then *minimise* ``||T - f(x')|| / ||T||`` summed over
  surrogates, where T = f(x) + 2 (f(t) - f(x)) overshoots the target photo t's features (0.3 with its
  command line's batch of one; the May 2020 research code aims at f(t) itself: ``target_overshoot`` 1);
  loss ``c * max(d - rho, 0)^2 + feature``, c = 1e6 (command line), constant start 1e-6, TF1 Adadelta
  (rho 0.95, eps 1e-8), learning rate times 0.8 after every third of the steps; modes (rho, steps, learning
  rate): min (0.002, 20, 40), low (0.003, 50, 35), mid (0.005, 200, 20), high (0.008, 500, 10), ultra
  (0.01, 1000, 8). Kept: the iterate after any step with the smallest feature term, whatever its DSSIM.
  No pixel cap. We follow 0.3, not the May 2020 research code (Adam, learning rate 0.1 halved every third,
  c = 1e4, one fixed rho, target among the 2 farthest): 0.3 is the released code with the paper's modes.

``rule: centred`` (the ``fawkes-v1-centred-*`` presets) is cloakbench's own budget, not Fawkes': DSSIM with
windows centred on every pixel (:func:`~cloakbench.defenses.budgets.dssim`, which weighs the border like
any pixel; valid windows leave a 5-pixel frame almost unmeasured), enforced on the saved image by the
:class:`~cloakbench.defenses.budgets.Budget` (shrinking the perturbation to the bound), choosing per image
between the best iterate whatever its DSSIM (then shrunk) and the best one within the bound. Same
optimisation otherwise. Measured on 4 celeb24 faces (v1.0 high, 150 steps, sface + facenet-casia; see
``docs/faithfulness.md``): the faithful rule ends at TF DSSIM 0.016-0.018 (rho 0.017) but centred DSSIM 0.022-0.031
(the border, almost free under valid windows, takes the change), PSNR 34.4 dB; the centred rule holds centred DSSIM
at 0.0170, PSNR 35.4 dB, and pushes the features as far or farther (cosine distance 1.90 vs 1.82 on sface, 1.81 vs
1.70 on facenet-casia).

Other differences from the originals: cloakbench's white-box zoo models stand in for Fawkes' extractors
(never documented), images are 112x112 (the paper version used 224x224), outputs are rounded to uint8
(Keras' ``array_to_img`` truncates).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import build, require, to_plain
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget, dssim, dssim_tf
from cloakbench.defenses.objectives import (
    batches,
    embed_all,
    feature_distance,
    from_tanh_space,
    squared_distance_over_norm,
    to_tanh_space,
)
from cloakbench.defenses.targets import (
    TARGET_POOLS,
    PublicFaces,
    TargetChoice,
    choose_target,
    load_target_pool,
    lookalikes,
    pool_centroids,
    target_photos,
)
from cloakbench.errors import ConfigError

V1_START = 1e-4
"""v1.0's start: uniform in +-V1_START in tanh space."""
V1_KICK = 0.01
"""v1.0's kick after the first step: the modifier moves by -V1_KICK * sign(gradient)."""
PAPER_START = 1e-6
"""0.3's start: every entry of the modifier at PAPER_START."""
V1_WEIGHT_CAP = 129.0
"""v1.0 doubles the feature weight only while it is <= 129 and halves it only while it is >= 1/129."""
V1_SAVE_LAST_BELOW = 0.3
V1_SAVE_LAST_DSSIM = 0.015
"""v1.0 keeps the last iterate instead when the best feature term is below 0.3, the last DSSIM below 0.015
and the last feature term above the best."""


class FawkesOptimizer(enum.Enum):
    ADAM = "adam"
    ADADELTA = "adadelta"  # rho 0.95; eps: Keras' 1e-7 (v1.0) or TF1's 1e-8 (0.3)


class FawkesVersion(enum.Enum):
    PAPER = "paper"  # targeted, USENIX Security 2020 (the 0.3 release)
    V1 = "v1.0"  # untargeted, the 2021 release


class FawkesRule(enum.Enum):
    ORIGINAL = "original"  # the version's own kept iterate; TensorFlow's DSSIM, only penalised
    CENTRED = "centred"  # cloakbench's: centred-window DSSIM, enforced by shrinking, best of two candidates


@dataclass(frozen=True, kw_only=True)
class FawkesConfig:
    version: FawkesVersion = FawkesVersion.PAPER
    rule: FawkesRule = FawkesRule.ORIGINAL
    dssim_threshold: float = 0.007  # the paper's default rho
    steps: int = 1000  # 0.3's custom mode
    optimizer: FawkesOptimizer = FawkesOptimizer.ADADELTA
    learning_rate: float = 2.0  # 0.3's custom mode (command-line default)
    adadelta_eps: float = 1e-8  # TF1's AdadeltaOptimizer (0.3); v1.0's Keras Adadelta: 1e-7
    lr_decay: float = 0.8  # factor after every third of the steps (0.3: 0.8; research code 0.5; v1.0: 1)
    penalty: float = 1e6  # the command line's (0.3 and v1.0); the Python APIs default to 1e9 / 1e7
    max_change: float | None = None  # per-pixel cap on [0, 1]; v1.0: 15/255
    extractors: int | None = None  # how many of the surrogates to use (None: all); v1.0 low uses one
    target_pool: str = "auto"  # paper version: "auto", "dataset", "demo" or an aligned folder
    farthest: int = 20  # paper version: the target is drawn among this many farthest identities
    target_photos: int = 10  # paper version: photos of the target drawn from (0.3 fetches 10)
    target_overshoot: float = 2.0  # paper version: aim at f(x) + this * (f(t) - f(x)) (0.3: 2; research: 1)
    batch_size: int | None = None  # None: the first surrogate's preferred batch size

    def __post_init__(self) -> None:
        require(0 < self.dssim_threshold <= 0.5, f"dssim_threshold must be in (0, 0.5], got {self.dssim_threshold}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(self.adadelta_eps > 0, f"adadelta_eps must be > 0, got {self.adadelta_eps}")
        require(0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        require(self.penalty >= 0, f"penalty must be >= 0, got {self.penalty}")
        require(
            self.max_change is None or 0 < self.max_change <= 1, f"max_change must be in (0, 1], got {self.max_change}"
        )
        require(self.extractors is None or self.extractors >= 1, f"extractors must be >= 1, got {self.extractors}")
        require(self.farthest >= 1, f"farthest must be >= 1, got {self.farthest}")
        require(self.target_photos >= 1, f"target_photos must be >= 1, got {self.target_photos}")
        require(self.target_overshoot > 0, f"target_overshoot must be > 0, got {self.target_overshoot}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(bool(self.target_pool), f"target_pool must be one of {', '.join(TARGET_POOLS)} or a folder, got ''")


PAPER_MODES: dict[str, dict[str, Any]] = {  # 0.3's protection.py mode2param
    "min": {"dssim_threshold": 0.002, "steps": 20, "learning_rate": 40.0},
    "low": {"dssim_threshold": 0.003, "steps": 50, "learning_rate": 35.0},
    "mid": {"dssim_threshold": 0.005, "steps": 200, "learning_rate": 20.0},
    "high": {"dssim_threshold": 0.008, "steps": 500, "learning_rate": 10.0},
    "ultra": {"dssim_threshold": 0.01, "steps": 1000, "learning_rate": 8.0},
}
V1_MODES: dict[str, dict[str, Any]] = {  # v1.0's protection.py mode2param
    "low": {"dssim_threshold": 0.004, "steps": 40, "learning_rate": 25.0, "extractors": 1},
    "mid": {"dssim_threshold": 0.012, "steps": 75, "learning_rate": 20.0, "extractors": 2},
    "high": {"dssim_threshold": 0.017, "steps": 150, "learning_rate": 15.0, "extractors": 2},
}
V1_DEFAULTS: dict[str, Any] = {
    "version": "v1.0", "optimizer": "adadelta", "adadelta_eps": 1e-7, "lr_decay": 1.0, "penalty": 1e6,
    "max_change": 15 / 255,
}  # fmt: skip
V1_CENTRED_DEFAULTS: dict[str, Any] = {**V1_DEFAULTS, "rule": "centred"}


def v1_weight_update(
    weight: torch.Tensor, side: torch.Tensor, dssim_value: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """v1.0's per-image weight on the feature term after a step, and which side of the band it was on.

    Double while DSSIM <= 0.9 rho (and the weight <= 129), halve while >= 1.1 rho (and >= 1/129); crossing
    the band from one side to the other resets it to 1, and inside the band (or past the caps) it is 1.
    ``side`` starts at 1 (below): +1 below, -1 above, 0 in the band.
    """
    below = (dssim_value <= threshold * 0.9) & (weight <= V1_WEIGHT_CAP)
    above = ~below & (dssim_value >= threshold * 1.1) & (weight >= 1 / V1_WEIGHT_CAP)
    one = torch.ones_like(weight)
    doubled = torch.where(side == -1, one, weight * 2)
    halved = torch.where(side == 1, one, weight / 2)
    new_weight = torch.where(below, doubled, torch.where(above, halved, one))
    new_side = torch.where(below, one, torch.where(above, -one, torch.zeros_like(side)))
    return new_weight, new_side


def v1_save_last(best_feature: torch.Tensor, last_dssim: torch.Tensor, last_feature: torch.Tensor) -> torch.Tensor:
    """Which images v1.0 replaces by their last iterate (``save_last_on_failed``, on by default)."""
    return (best_feature < V1_SAVE_LAST_BELOW) & (last_dssim < V1_SAVE_LAST_DSSIM) & (last_feature > best_feature)


def paper_lr_decays(step: int, steps: int) -> bool:
    """Whether 0.3 multiplies the learning rate by its decay after (0-based) ``step``: every third of the run
    (never for runs under 3 steps, where the original divides by zero)."""
    third = steps // 3
    return third > 0 and step != 0 and step % third == 0


class Fawkes(Defense):
    requirements = DefenseRequirements(differentiable_surrogates=True, min_surrogates=1)
    threat_model = ThreatModel.POISONING

    def __init__(
        self, config: FawkesConfig, *, surrogates: Sequence[Recognizer], name: str = "fawkes",
        public: PublicFaces | None = None,
    ) -> None:  # fmt: skip
        if config.extractors is not None:
            if len(surrogates) < config.extractors:
                raise ConfigError(
                    f"defense {name!r} uses {config.extractors} extractors but {len(surrogates)} surrogate(s) "
                    f"were given ({', '.join(s.name for s in surrogates) or 'none'}); list more under 'surrogates'"
                )
            surrogates = surrogates[: config.extractors]
        if config.rule is FawkesRule.CENTRED:
            budget = Budget(dssim=config.dssim_threshold, linf=config.max_change)
        else:  # the original only penalises DSSIM; what it caps is the pixel change (v1.0) or nothing (0.3)
            budget = Budget(linf=config.max_change if config.max_change is not None else 1.0)
        super().__init__(name=name, budget=budget, surrogates=surrogates)
        self.config = config
        self._dataset_pool = public
        self._pool: PublicFaces | None = None
        self._centroids: dict[str, list[torch.Tensor]] | None = None
        self.targets: dict[str, TargetChoice] = {}  # the last target chosen per identity (for reports)

    @property
    def targeted(self) -> bool:
        return self.config.version is FawkesVersion.PAPER

    def measure(self, original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """The DSSIM this preset penalises: TensorFlow's (valid windows) or cloakbench's centred one."""
        return dssim(original, perturbed) if self.config.rule is FawkesRule.CENTRED else dssim_tf(original, perturbed)

    def pool(self) -> PublicFaces:
        if self._pool is None:
            self._pool = load_target_pool(self.config.target_pool, dataset_pool=self._dataset_pool)
        return self._pool

    def leave_out_lookalikes(self, faces: torch.Tensor) -> list[str]:
        """Remove from the target pool the identities that are the person in ``faces`` (:func:`lookalikes`),
        as Fawkes' own pool never holds its user; returns their names. For callers whose users may be in the
        pool under another name (``cloakbench protect`` labels every face ``user``)."""
        if not self.targeted:
            return []
        pool = self.pool()
        if self._centroids is None:
            self._centroids = pool_centroids(pool, self.surrogates)
        dropped = lookalikes(pool, faces, self.surrogates, centroids=self._centroids)
        if dropped:
            self._pool = pool.without(dropped)
        return dropped

    @property
    def independent_images(self) -> bool:
        """v1.0 cloaks each photo on its own; the paper version chooses one target per user."""
        return not self.targeted

    def _starts(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """v1.0's start: uniform in +-V1_START (tanh space), per pixel."""
        return (torch.rand(images.shape, generator=generator, dtype=torch.float32) * 2 - 1) * V1_START

    def _optimise(self, images: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return self._optimise_v1(images, starts)

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        device = self.surrogates[0].device  # the cloaks stay there: the budget runs there next
        out = torch.empty_like(images, device=device)
        for ident in dict.fromkeys(identities):  # each user in turn, in order of first appearance
            idx = torch.tensor([i for i, x in enumerate(identities) if x == ident])
            out[idx.to(device)] = self._protect_user(images[idx], ident, identities, generator)
        return out

    def _protect_user(
        self, images: torch.Tensor, ident: str, everyone: Sequence[str], generator: torch.Generator
    ) -> torch.Tensor:
        device = self.surrogates[0].device
        targets: torch.Tensor | None = None
        if self.targeted:
            pool = self.pool().without(list(dict.fromkeys(everyone)))
            if self._centroids is None:
                self._centroids = pool_centroids(self.pool(), self.surrogates)
            choice = choose_target(
                pool, images, self.surrogates, farthest=self.config.farthest, generator=generator,
                centroids=self._centroids,
            )  # fmt: skip
            self.targets[ident] = choice
            photos = pool.images[choice.identity][: self.config.target_photos]
            targets = target_photos(photos, images.shape[0], generator=generator)
        if targets is None:  # v1.0: each photo on its own, from its own draws
            return self._optimise_all(images, self._starts(images, generator))
        outs = []
        for sl in batches(images.shape[0], self.batch_size()):
            outs.append(self._optimise_paper(images[sl].to(device), targets[sl].to(device)))
        return torch.cat(outs)

    def _optimizer(self, modifier: torch.Tensor) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer is FawkesOptimizer.ADADELTA:
            return torch.optim.Adadelta([modifier], lr=cfg.learning_rate, rho=0.95, eps=cfg.adadelta_eps)
        return torch.optim.Adam([modifier], lr=cfg.learning_rate)

    def _image(self, w0: torch.Tensor, modifier: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        adv = from_tanh_space(w0 + modifier)
        if self.config.max_change is not None:
            adv = x + (adv - x).clamp(-self.config.max_change, self.config.max_change)
        return adv

    def _optimise_v1(self, x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """v1.0: maximise the squared feature distance from x with the adaptive weight (module docstring), from
        the modifier ``start`` (:meth:`_starts`)."""
        cfg, rho = self.config, self.config.dssim_threshold
        refs = embed_all(self.surrogates, x, grad=False)
        w0 = to_tanh_space(x)
        modifier = start.to(x.device).clone().requires_grad_(True)
        opt = self._optimizer(modifier)
        weight = torch.ones(x.shape[0], device=x.device)
        side = torch.ones_like(weight)
        keep = _Keeper(x, self._score_candidates, rule=cfg.rule, rho=rho, maximise=True, budget=self.budget)
        adv, d, feat = x, torch.zeros_like(weight), torch.zeros_like(weight)
        for step in range(cfg.steps):
            adv = self._image(w0, modifier, x)
            d = self.measure(x, adv)
            feat = squared_distance_over_norm(embed_all(self.surrogates, adv, grad=True), refs)
            loss = cfg.penalty * (d - rho).clamp_min(0) ** 2 - weight * feat
            (grad,) = torch.autograd.grad(loss.sum(), modifier)
            modifier.grad = grad
            opt.step()
            if step == 0:  # the kick; the original makes a new variable here, so Adadelta starts afresh
                with torch.no_grad():
                    modifier.sub_(V1_KICK * grad.sign())
                opt = self._optimizer(modifier)
            adv, d, feat = adv.detach(), d.detach(), feat.detach()
            weight, side = v1_weight_update(weight, side, d, rho)
            keep.offer(adv, d, feat)
        if cfg.rule is FawkesRule.ORIGINAL:
            keep.save_last(adv, d, feat)
        return keep.result()

    def _optimise_paper(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """0.3: minimise the distance to the overshot target features (module docstring)."""
        cfg, rho = self.config, self.config.dssim_threshold
        with torch.no_grad():
            own = embed_all(self.surrogates, x, grad=False)
            aim = embed_all(self.surrogates, target, grad=False)
            refs = [f + cfg.target_overshoot * (t - f) for f, t in zip(own, aim, strict=True)]
        w0 = to_tanh_space(x)
        modifier = torch.full_like(x, PAPER_START, requires_grad=True)
        opt = self._optimizer(modifier)
        lr = cfg.learning_rate
        keep = _Keeper(x, self._score_candidates, rule=cfg.rule, rho=rho, maximise=False, budget=self.budget, refs=refs)
        for step in range(cfg.steps):
            adv = self._image(w0, modifier, x)
            d = self.measure(x, adv)
            feat = feature_distance(embed_all(self.surrogates, adv, grad=True), refs)
            if step > 0:  # the iterate after the previous step (0.3 scores each iterate after its step)
                keep.offer(adv.detach(), d.detach(), feat.detach())
            loss = cfg.penalty * (d - rho).clamp_min(0) ** 2 + feat
            (modifier.grad,) = torch.autograd.grad(loss.sum(), modifier)
            opt.step()
            if paper_lr_decays(step, cfg.steps):
                lr *= cfg.lr_decay
                for group in opt.param_groups:
                    group["lr"] = lr
        with torch.no_grad():  # the iterate after the last step
            adv = self._image(w0, modifier, x)
            keep.offer(adv, self.measure(x, adv), feature_distance(embed_all(self.surrogates, adv, grad=False), refs))
        return keep.result()

    def _score_candidates(self, cands: torch.Tensor, x: torch.Tensor, refs: list[torch.Tensor] | None) -> torch.Tensor:
        """Feature term of candidates as they will be saved (lower is better): for the centred rule's choice."""
        feats = embed_all(self.surrogates, cands, grad=False)
        if refs is None:
            return -squared_distance_over_norm(feats, embed_all(self.surrogates, x, grad=False))
        return feature_distance(feats, refs)

    def config_dict(self) -> dict[str, object]:
        out: dict[str, object] = {**super().config_dict(), "config": to_plain(self.config)}
        if self.targeted:
            out["target_pool"] = self.pool().digest
        return out


class _Keeper:
    """Which iterate a Fawkes run returns, per image.

    ``original``: v1.0 keeps the best feature term among iterates with DSSIM <= 1.1 rho (the best starts at
    0, so only an iterate that moved the features counts), 0.3 the best feature term whatever the DSSIM.
    ``centred``: the best whatever its DSSIM and the best within rho, both projected into the budget, the
    better of the two as saved.

    Either rule can return the photo itself, or an iterate that rounds back to it: v1.0's when no iterate met
    1.1 rho and the last one is not saved (its best starts at the photo, as in the original), the centred one
    where no iterate was within rho (its second candidate starts at the photo) and the shrunk best scores no
    better. Neither rule is changed for it: :func:`~cloakbench.defenses.base.cloak_failures` reports the
    outcome as no cloak.
    """

    def __init__(
        self, x: torch.Tensor, score: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor] | None], torch.Tensor],
        *, rule: FawkesRule, rho: float, maximise: bool, budget: Budget, refs: list[torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        self.x, self.score, self.rule, self.rho, self.maximise, self.refs = x, score, rule, rho, maximise, refs
        self.budget = budget
        n = x.shape[0]
        # scores are "lower is better": the negated feature term when maximising
        start = 0.0 if (maximise and rule is FawkesRule.ORIGINAL) else float("inf")
        self.best, self.best_score = x.clone(), torch.full((n,), start, device=x.device)
        self.ok, self.ok_score = x.clone(), torch.full((n,), float("inf"), device=x.device)

    def offer(self, adv: torch.Tensor, d: torch.Tensor, feat: torch.Tensor) -> None:
        # torch.where, not boolean-mask indexing: a mask index reads the mask back to the host (a synchronisation
        # per step on a GPU); the values kept are the same
        score = -feat if self.maximise else feat
        better = score < self.best_score
        if self.rule is FawkesRule.ORIGINAL and self.maximise:
            better &= d <= self.rho * 1.1
        self.best = torch.where(better.view(-1, 1, 1, 1), adv, self.best)
        self.best_score = torch.where(better, score, self.best_score)
        if self.rule is FawkesRule.CENTRED:
            better = (score < self.ok_score) & (d <= self.rho)
            self.ok = torch.where(better.view(-1, 1, 1, 1), adv, self.ok)
            self.ok_score = torch.where(better, score, self.ok_score)

    def save_last(self, adv: torch.Tensor, d: torch.Tensor, feat: torch.Tensor) -> None:
        last = v1_save_last(-self.best_score, d, feat)
        self.best = torch.where(last.view(-1, 1, 1, 1), adv, self.best)

    def result(self) -> torch.Tensor:
        if self.rule is FawkesRule.ORIGINAL:
            return self.best
        with torch.no_grad():
            cands = [self.budget.enforce(self.x, self.best), self.budget.enforce(self.x, self.ok)]
            scores = [self.score(c, self.x, self.refs) for c in cands]
            take_ok = scores[1] < scores[0]
        return torch.where(take_ok.view(-1, 1, 1, 1), cands[1], cands[0])


def make_fawkes(
    *, surrogates: Sequence[Recognizer], name: str = "fawkes", public: PublicFaces | None = None, **config: Any
) -> Fawkes:
    cfg = build(FawkesConfig, config, where=f"defense {name!r}")
    return Fawkes(cfg, surrogates=surrogates, name=name, public=public)
