"""Which model a tracker uses in each cell: the recognizer as it is, or a retrained copy (DESIGN §4 step 3).

An input-transform countermeasure leaves the model alone. A model-adaptation countermeasure retrains it,
and *what* it retrains on decides how many models a cell needs:

- ``end-to-end`` trains on the tracker's enrollment set, which holds the protected user's cloaked photos,
  so there is one model per (defense, protected identity), plus one trained on the clean enrollment set
  for the clean accuracy;
- ``adaptive`` (FaceCure's) trains on public identities' photos, clean and cloaked by every defense of the
  suite (``defenses``: one entry per set of cloaks): one model for the whole recognizer, which serves the
  clean accuracy too (the tracker adapted before any user cloaked anything);
- ``adaptive-anchored`` trains on public identities' photos, clean and cloaked by the cell's defense: one
  model per defense, which serves the clean accuracy too;
- ``adversarial`` trains on clean public photos with PGD: one model for the whole recognizer.

The public identities are the dataset's identities that are not protected (when at least two are left),
else everyone but the protected user; only their enrollment photos are used (``public_per_identity`` of
them each), never a query photo. Models are trained lazily, once, and their checkpoints are cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.adaptation import ADAPTATIONS, Adaptation, Adapted, FileCheckpoints, TrainingData, TrainingSet
from cloakbench.attacks.recognizers import Recognizer
from cloakbench.bench.metrics import topk_correct
from cloakbench.images import from_uint8

CloakFn = Callable[[Any, tuple[str, ...], int | None], dict[str, np.ndarray]]
"""(defense spec, identities, photos per identity or None) -> identity -> uint8 cloaks of its first photos."""


@dataclass
class View:
    """The model one tracker embeds with, and the softmax head it was trained with (end-to-end only)."""

    recognizer: Recognizer
    head: Adapted | None = None


class Plain:
    """Input transforms: the recognizer as it is, for every cell."""

    def __init__(self, recognizer: Recognizer) -> None:
        self.view = View(recognizer)

    def clean(self, spec: Any) -> View:
        return self.view

    def cloaked(self, spec: Any, ident: str) -> View:
        return self.view


class Retrained:
    """A model-adaptation countermeasure: retrained copies of ``recognizer``, built on first use."""

    def __init__(
        self, recognizer: Recognizer, adaptation: Adaptation, data: Any, *, seed: int, cloak: CloakFn,
        checkpoints: FileCheckpoints, embed: Callable[[Recognizer, np.ndarray], np.ndarray], progress: bool = False,
        defenses: Sequence[Any] = (),
    ) -> None:  # fmt: skip
        self.recognizer = recognizer
        self.defenses = tuple(defenses)  # every defense spec of the suite, one per set of cloaks (adaptive)
        self.adaptation = adaptation
        self.data = data  # runner.PreparedData
        self.seed = seed
        self.cloak = cloak
        self.checkpoints = checkpoints
        self.embed = embed  # (recognizer, dataset indices) -> embeddings (cached)
        self.progress = progress
        self.per_identity: int | None = getattr(getattr(adaptation, "config", None), "public_per_identity", None)
        self._models: dict[Any, View] = {}
        self.reports: list[dict[str, Any]] = []

    # -- which model a cell uses ---------------------------------------------------------------------------
    def clean(self, spec: Any) -> View:
        kind = self.adaptation.training_data
        if kind.end_to_end:
            return self._model((kind.value, None, None), spec=None, ident=None)
        if kind is TrainingData.PUBLIC_CLOAKED:
            return self._model(("public-cloaked", spec.label, self._public(None)), spec=spec, ident=None)
        if kind is TrainingData.PUBLIC_CLOAKED_ALL:
            return self._model(("public-cloaked-all", None, self._public(None)), spec=None, ident=None)
        return self._model(("public-clean", None, self._public(None)), spec=None, ident=None)

    def cloaked(self, spec: Any, ident: str) -> View:
        kind = self.adaptation.training_data
        if kind.end_to_end:
            return self._model((kind.value, spec.label, ident), spec=spec, ident=ident)
        if kind is TrainingData.PUBLIC_CLOAKED:
            return self._model(("public-cloaked", spec.label, self._public(ident)), spec=spec, ident=ident)
        if kind is TrainingData.PUBLIC_CLOAKED_ALL:
            return self._model(("public-cloaked-all", None, self._public(ident)), spec=None, ident=ident)
        return self._model(("public-clean", None, self._public(ident)), spec=None, ident=ident)

    # -- training sets ---------------------------------------------------------------------------------------
    def _public(self, ident: str | None) -> tuple[str, ...]:
        """Identities whose photos the tracker may retrain on without touching the protected user's."""
        data = self.data
        others = tuple(i for i in sorted(data.train) if i not in data.protected and len(data.train[i]))
        if len(others) >= 2:
            return others
        if ident is None:  # clean accuracy when every identity is protected: the first protected user's model
            ident = data.protected[0]
        return tuple(i for i in sorted(data.train) if i != ident and len(data.train[i]))

    def _public_indices(self, identities: tuple[str, ...]) -> dict[str, np.ndarray]:
        limit = self.per_identity
        return {i: self.data.train[i][:limit] if limit else self.data.train[i] for i in identities}

    def _training_set(self, key: Any, spec: Any, ident: str | None) -> tuple[TrainingSet, str]:
        data = self.data
        kind, _, what = key
        if kind in (TrainingData.ENROLLMENT.value, TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL.value):
            idx = data.all_train
            images = data.images[idx].clone()
            if ident is not None:
                user_cloaks = self.cloak(spec, (ident,), None)[ident]
                pos = {int(i): n for n, i in enumerate(idx)}
                n_cloaked = spec.cloaked_count(len(data.train[ident]))  # the rest stay clean (cloak_fraction)
                images[[pos[int(i)] for i in data.train[ident][:n_cloaked]]] = from_uint8(user_cloaks[:n_cloaked])
            labels = tuple(data.labels[i] for i in idx)
            # the tracker has only what it scraped: no clean originals of the user's cloaked photos
            description = "enrollment" + (f" ({ident} cloaked)" if ident else "")
            if kind == TrainingData.ENROLLMENT.value:
                return TrainingSet(images=images, labels=labels), description
            # FaceCure's eval_e2e.py --robust: each public identity's training photos also appear cloaked by
            # every defense (public_per_identity of them on CPU), labelled with their true identity
            public = self._public(ident)
            extra, extra_labels = self._public_cloaks(public)
            return (
                TrainingSet(images=torch.cat([images, *extra]), labels=labels + extra_labels * len(extra)),
                f"{description} + {len(public)} public identities cloaked by "
                + ", ".join(d.label for d in self.defenses),
            )
        chosen = self._public_indices(what)
        flat = np.concatenate([chosen[i] for i in what])
        clean = data.images[flat]
        labels = tuple(data.labels[i] for i in flat)
        if kind == "public-clean":
            return TrainingSet(images=clean, labels=labels), f"{len(what)} public identities, clean"
        if kind == "public-cloaked-all":  # FaceCure: each clean photo, then its cloak by every defense
            sets, _ = self._public_cloaks(what)
            n = len(sets) + 1
            return (
                TrainingSet(images=torch.cat([clean, *sets]), labels=labels * n, references=torch.cat([clean] * n)),
                f"{len(what)} public identities, clean + cloaked by {', '.join(d.label for d in self.defenses)}",
            )
        made = self.cloak(spec, what, self.per_identity)
        cloaked = torch.cat([from_uint8(made[i]) for i in what])
        return (
            TrainingSet(
                images=torch.cat([clean, cloaked]), labels=labels + labels, references=torch.cat([clean, clean])
            ),
            f"{len(what)} public identities, clean + cloaked by {spec.label}",
        )

    def _public_cloaks(self, identities: tuple[str, ...]) -> tuple[list[torch.Tensor], tuple[str, ...]]:
        """Each public identity's chosen photos cloaked by every defense of the suite (one tensor per defense,
        identities in order) and the labels of one such tensor."""
        if not self.defenses:
            raise ValueError(f"{self.adaptation.name} trains on every defense's cloaks, and the suite has none")
        chosen = self._public_indices(identities)
        labels = tuple(self.data.labels[i] for ident in identities for i in chosen[ident])
        sets = []
        for d in self.defenses:
            made = self.cloak(d, identities, self.per_identity)
            sets.append(torch.cat([from_uint8(made[i]) for i in identities]))
        return sets, labels

    def _model(self, key: Any, *, spec: Any, ident: str | None) -> View:
        if key in self._models:
            return self._models[key]
        training, description = self._training_set(key, spec, ident)
        adapted = self.adaptation.adapt(
            self.recognizer, training, seed=self.seed, checkpoints=self.checkpoints, progress=self.progress
        )
        view = View(adapted.recognizer, head=adapted)
        row = {
            "seed": self.seed, "recognizer": self.recognizer.name, "countermeasure": self.adaptation.name,
            "defense": key[1] or "", "protected_identity": (ident or "") if TrainingData(key[0]).end_to_end else "",
            "training_set": description, **adapted.report.to_row(),
            "clean_accuracy_before": self._clean_nn_accuracy(self.recognizer),
            "clean_accuracy_after": self._clean_nn_accuracy(adapted.recognizer),
        }  # fmt: skip
        self._models[key] = view
        self.reports.append(row)
        return view

    def _clean_nn_accuracy(self, recognizer: Recognizer) -> float:
        """Nearest-neighbour top-1 over every identity's clean queries against the clean enrollment set."""
        data = self.data
        e_train = self.embed(recognizer, data.all_train)
        e_query = self.embed(recognizer, data.all_query)
        train_labels = np.array([data.labels[i] for i in data.all_train])
        query_labels = np.array([data.labels[i] for i in data.all_query])
        predicted = train_labels[(e_query @ e_train.T).argmax(axis=1)]
        return float(topk_correct(np.where(predicted == query_labels, 1, 2), 1).mean())


def training_defenses(
    defenses: Sequence[Any], cloak_source: Callable[[Any], Any], usable: Callable[[Any], bool]
) -> list[Any]:
    """The defenses whose cloaks FaceCure's adaptive tracker trains on: every usable entry of the suite, one per
    set of cloaks (``cloak_source``: entries that differ only in label or ``cloak_fraction`` share cloaks)."""
    return [d for d in defenses if cloak_source(d) is d and usable(d)]


def make_view_provider(
    name: str, params: dict[str, Any], recognizer: Recognizer, data: Any, *, seed: int, cloak: CloakFn,
    checkpoints: FileCheckpoints, embed: Callable[[Recognizer, np.ndarray], np.ndarray], progress: bool = False,
    defenses: Sequence[Any] = (),
) -> Retrained:  # fmt: skip
    adaptation = ADAPTATIONS.create(name, **params)
    return Retrained(
        recognizer, adaptation, data, seed=seed, cloak=cloak, checkpoints=checkpoints, embed=embed, progress=progress,
        defenses=defenses,
    )  # fmt: skip
