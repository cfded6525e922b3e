"""The defense contract: a cloak the user applies to their own photos.

:meth:`Defense.protect` is a template method: it checks the input, calls the implementation's
:meth:`Defense._protect`, then enforces the budget and the [0, 1] range and quantises to the 256 uint8
levels with rounding, as a saved PNG would be. No implementation can skip those steps, and the budget is
re-measured on the quantised output (a violation is a bug and raises).

A cloak within budget may still be no cloak: an optimiser whose kept iterate is the clean image (Fawkes v1.0's
rule keeps the photo itself when no iterate met its bound), a perturbation below half a level that rounding
erases, or one that does not move the surrogates' embedding. :func:`cloak_failures` says, per image, whether
the cloak is one (the measured criterion is at :data:`MIN_SURROGATE_SHIFT`); ``cloakbench protect`` and the
bench run it on every cloak, fresh or read from the cache, and report a failure instead of a cloak. It is a
separate check, not part of :meth:`Defense.protect`, so a faithful preset keeps its original algorithm and
its outcome is detected, not changed.

A defense that does not compute its cloak from the pixels alone (``precomputed`` reads the cloaked files another
tool wrote) declares :attr:`Defense.needs_photo_ids`; the bench then passes each photo's dataset image id to
:meth:`Defense.protect` (``photo_ids``), which hands them to :meth:`Defense._protect_photos`. A defense that leaves
some photos clean on purpose (an allowed missing file) names them in :meth:`Defense.uncloaked`, so the check above
does not call them failed cloaks. Both hooks default to nothing; every other defense ignores them.

Speed (none of it changes a cloak on the CPU):

- A defense whose images are cloaked independently of one another (:attr:`Defense.independent_images`: PGD,
  LowKey, Fawkes v1.0; not Fawkes' paper version, whose target is chosen per user, nor OPOM's per-user mask)
  splits :meth:`Defense._protect` into :meth:`Defense._starts` (its random draws, made from the user's generator
  in the order of the photos) and :meth:`Defense._optimise` (the optimisation of a batch of images from their
  starts). :meth:`Defense.protect_groups` then cloaks several users' photos in shared batches: each user's draws
  come from their own generator as before, and the batches span users, which fills a GPU (256 images a batch
  where one user has a few dozen photos). The benchmark uses it on a GPU only (the CPU's preferred batch of 8 is
  what one user's photos already fill). A batch's other images move a cloak by float rounding only: measured on
  the CPU, PGD's cloaks are the same bits, LowKey's and Fawkes v1.0's (2 steps) differ in up to 25 of 112,896
  values by up to 2 levels (``tests/test_speed_paths.py``).
- The batch a defense optimises is halved on a CUDA out-of-memory error and retried
  (:func:`~cloakbench.oom.run_with_oom_retry`); :attr:`Defense.oom_halvings` counts the halvings.
- The budget (projection, rounding, DSSIM bisection and re-measurement) runs on the device the cloak was made on,
  and only the finished cloak comes back to the CPU.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, final

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.defenses.budgets import Budget
from cloakbench.errors import ConfigError, ImageContractError
from cloakbench.images import check_images, quantize
from cloakbench.oom import run_with_oom_retry

MIN_SURROGATE_SHIFT = 0.01
"""The least cosine distance ``1 - cos(f(x'), f(x))`` a cloak must put between the cloaked and the clean photo's
embedding on at least one of the defense's own surrogates (the models it was optimised against) to count as
moved. Measured on 8 celeb24 faces with SFace as the surrogate: uniform noise of +-1/255 moves the embedding by
0.0002-0.0006 and of +-4/255 by 0.002-0.008, re-saving the photo as JPEG at quality 95 by 0-0.002 and at 75 by
0.010-0.016; the weakest cloaks cloakbench makes move it much farther: LowKey after 2 of its 50 steps by
0.017-0.09, OPOM after 2 of its 16 rounds by 0.03-0.22, 3 steps of Fawkes (0.3 min, v1.0 low) by 0.06-0.44, one
PGD step at 8/255 by 0.18-0.39. Below 0.01 a cloak moves its own surrogate no more than re-saving the clean
photo as a JPEG does."""


class ThreatModel(enum.Enum):
    POISONING = "poisoning"  # the tracker trains/enrols on cloaked photos, queries clean ones
    EVASION = "evasion"  # cloaked photos sit in a searchable gallery, clean probes search it


@dataclass(frozen=True, kw_only=True)
class DefenseRequirements:
    """What a defense needs from its surrogates."""

    differentiable_surrogates: bool
    min_surrogates: int


@dataclass(frozen=True)
class PhotoGroup:
    """One user's photos for :meth:`Defense.protect_groups`: the arguments of one :meth:`Defense.protect` call."""

    images: torch.Tensor
    identities: Sequence[str]
    generator: torch.Generator
    photo_ids: Sequence[str] | None = None


class CloakFailure(RuntimeError):
    """A defense's output protects nothing (:func:`cloak_failures`): reported as a failure, never as a cloak."""


class Defense(abc.ABC):
    """Base class of every cloak."""

    name: str
    threat_model: ThreatModel
    budget: Budget
    requirements: DefenseRequirements
    surrogates: tuple[Recognizer, ...]
    needs_photo_ids: ClassVar[bool] = False
    """Whether :meth:`protect` must be given ``photo_ids`` (the photos' dataset image ids; module docstring)."""
    oom_halvings: int = 0
    """How often this defense's batch was halved after a CUDA out-of-memory error (module docstring)."""

    @property
    def independent_images(self) -> bool:
        """Whether each image's cloak depends on that image and its own random draws only (:meth:`_starts`,
        :meth:`_optimise`; module docstring). False by default."""
        return False

    def _starts(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The random draws an independent defense makes for ``images``, in photo order, on the CPU."""
        raise NotImplementedError(f"{type(self).__name__} does not cloak images independently")

    def _optimise(self, images: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """An independent defense's cloak of one batch of ``images`` (on the surrogates' device) from ``starts``."""
        raise NotImplementedError(f"{type(self).__name__} does not cloak images independently")

    def batch_size(self) -> int:
        """Images optimised together: the config's ``batch_size`` when it sets one, else the first surrogate's
        preferred batch (8 on a CPU, 256 on a GPU)."""
        configured = getattr(getattr(self, "config", None), "batch_size", None)
        if configured:
            return int(configured)
        return self.surrogates[0].preferred_batch_size if self.surrogates else 8

    def _optimise_all(self, images: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """:meth:`_optimise` over ``images`` in batches of :meth:`batch_size` on the surrogates' device, the batch
        halved on a CUDA out-of-memory error; the cloaks stay on that device (the budget runs there next)."""
        device = self.surrogates[0].device

        def run(size: int) -> torch.Tensor:
            outs = [
                self._optimise(images[i : i + size].to(device), starts[i : i + size].to(device))
                for i in range(0, images.shape[0], size)
            ]
            return torch.cat(outs)

        out, record = run_with_oom_retry(run, min(self.batch_size(), max(1, images.shape[0])))
        self.oom_halvings += record.halvings
        return out

    def __init__(self, *, name: str, budget: Budget, surrogates: Sequence[Recognizer] = ()) -> None:
        self.name = name
        self.budget = budget
        self.surrogates = tuple(surrogates)
        req = self.requirements
        if len(self.surrogates) < req.min_surrogates:
            raise ConfigError(f"defense {name!r} needs at least {req.min_surrogates} surrogate recognizer(s)")
        if req.differentiable_surrogates:
            black = [s.name for s in self.surrogates if not s.capabilities.differentiable]
            if black:
                raise ConfigError(
                    f"defense {name!r} needs differentiable surrogates; {', '.join(black)} "
                    "is a black box (pick a white-box recognizer such as 'sface')"
                )

    @abc.abstractmethod
    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        """Return cloaked images (any float values; the base class projects, clips and quantises)."""

    def _protect_photos(
        self, images: torch.Tensor, identities: Sequence[str], photo_ids: Sequence[str], *, generator: torch.Generator
    ) -> torch.Tensor:
        """:meth:`_protect` given the photos' dataset image ids too; only a defense with :attr:`needs_photo_ids`
        overrides it (the default ignores them)."""
        return self._protect(images, identities, generator=generator)

    def uncloaked(self, photo_ids: Sequence[str]) -> dict[str, str]:
        """The photos among ``photo_ids`` that this defense leaves clean on purpose, with why (default: none)."""
        return {}

    def _check_input(self, images: torch.Tensor, identities: Sequence[str]) -> None:
        """The canonical image contract and one identity label per image (what :meth:`protect` and
        :meth:`protect_groups` both require)."""
        check_images(images, what=f"{self.name}.protect input")
        if len(identities) != images.shape[0]:
            raise ImageContractError(
                f"{self.name}.protect: {images.shape[0]} images but {len(identities)} identity labels"
            )

    @final
    def protect(
        self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator,
        photo_ids: Sequence[str] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Cloak a canonical batch of one user's (or several users') photos (``photo_ids``: their dataset image ids,
        required by a defense with :attr:`needs_photo_ids`, ignored by the others)."""
        self._check_input(images, identities)
        if photo_ids is not None and len(photo_ids) != images.shape[0]:
            raise ImageContractError(f"{self.name}.protect: {images.shape[0]} images but {len(photo_ids)} photo ids")
        if self.needs_photo_ids and photo_ids is None:
            raise ImageContractError(
                f"{self.name}.protect: this defense reads per-photo files, so it needs each photo's dataset image id "
                "(photo_ids); it runs inside a benchmark suite, not on bare images"
            )
        if images.shape[0] == 0:
            return images.clone()
        if self.needs_photo_ids:
            assert photo_ids is not None
            out = self._protect_photos(images, identities, photo_ids, generator=generator)
        else:
            out = self._protect(images, identities, generator=generator)
        return self._finish(images, out)

    def _finish(self, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The template's tail: shape and finiteness, then the budget enforced and re-measured on the device the
        cloak was made on (module docstring); returned on ``images``' device."""
        if out.shape != images.shape:
            raise ImageContractError(f"{self.name}: returned shape {list(out.shape)}, expected {list(images.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise ImageContractError(f"{self.name}: produced NaN or infinite pixels")
        device = out.device
        originals = images.to(device)
        out = self.budget.enforce(originals, out.detach().to(device, torch.float32))
        problems = self.budget.violations(originals, out)
        if problems:
            raise AssertionError(
                f"{self.name}: budget {self.budget.describe()} exceeded after quantisation: {'; '.join(problems)}"
            )
        return out.to(images.device)

    @final
    def protect_groups(self, groups: Sequence[PhotoGroup]) -> list[torch.Tensor]:
        """:meth:`protect` of each group, the same cloaks; an independent defense optimises the groups' photos in
        shared batches (module docstring), the others one group after another."""
        if not self.independent_images or self.needs_photo_ids or len(groups) < 2:
            return [self.protect(g.images, g.identities, generator=g.generator, photo_ids=g.photo_ids) for g in groups]
        for g in groups:
            self._check_input(g.images, g.identities)
        sizes = [g.images.shape[0] for g in groups]
        images = torch.cat([g.images for g in groups])
        starts = torch.cat([self._starts(g.images, g.generator) for g in groups])
        out = self._optimise_all(images, starts) if images.shape[0] else images.clone()
        return [self._finish(g.images, part) for g, part in zip(groups, torch.split(out, sizes), strict=True)]

    def config_dict(self) -> dict[str, object]:
        """The parameters that determine the output (for cache keys and the resolved config)."""
        return {
            "name": self.name,
            "budget": self.budget.describe(),
            "surrogates": [(s.name, s.weights_id) for s in self.surrogates],
        }


def surrogate_shift(surrogates: Sequence[Recognizer], originals: torch.Tensor, cloaked: torch.Tensor) -> torch.Tensor:
    """Per image, the largest cosine distance ``1 - cos(f(cloaked), f(original))`` over ``surrogates`` ([B]).

    A robust (EOT) surrogate is measured through its base model (``.base``): the plain photo, no random
    transform, and its generator is left untouched so later cloaks do not change.
    """
    shift = torch.zeros(originals.shape[0])
    for surrogate in surrogates:
        model: Recognizer = getattr(surrogate, "base", surrogate)
        with torch.no_grad():
            a = model.embed_batched(originals)
            b = model.embed_batched(cloaked)
        shift = torch.maximum(shift, (1.0 - (a * b).sum(dim=1)).cpu())
    return shift


def cloak_failures(defense: Defense, originals: torch.Tensor, cloaked: torch.Tensor) -> list[str]:
    """Per image, why ``cloaked`` is no cloak of ``originals`` ("" when it is one).

    Two criteria, on the images as saved (rounded to uint8): *unchanged*, no pixel value differs from the
    original's (the cloak is below half a level everywhere, or the defense returned its input); *not moved*,
    the defense has surrogates and none of them sees the cloaked photo's embedding at a cosine distance of
    :data:`MIN_SURROGATE_SHIFT` or more from the clean one's. A defense without surrogates (``noise``) is held to
    the first only.
    """
    originals, cloaked = quantize(originals.detach().cpu()), quantize(cloaked.detach().cpu())
    changed = (cloaked != originals).flatten(1).any(dim=1)
    out = ["" if bool(c) else "unchanged: no pixel of the saved image differs from the original" for c in changed]
    if not defense.surrogates or not bool(changed.any()):
        return out
    idx = changed.nonzero().flatten()
    shift = surrogate_shift(defense.surrogates, originals[idx], cloaked[idx])
    names = ", ".join(getattr(s, "name", "?") for s in defense.surrogates)
    for i, value in zip(idx.tolist(), shift.tolist(), strict=True):
        if not value >= MIN_SURROGATE_SHIFT:  # NaN fails too
            out[i] = (
                f"not moved: the embedding on its surrogate(s) {names} moved by cosine distance {value:.2g} "
                f"(< {MIN_SURROGATE_SHIFT:g})"
            )
    return out
