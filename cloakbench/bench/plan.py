"""Grid expansion: a suite becomes an ordered list of tasks, the units a run commits, resumes and spreads.

A *cell* is one summary row: (seed, protocol, defense, recognizer, countermeasure, classifier). Cells are
grouped into *tasks*, the units of work that share their expensive inputs:

- ``cloak``: one (seed, defense): cloak every protected identity's enrollment photos (rows: per-photo quality);
- ``evaluate``: one (seed, recognizer, countermeasure): embed (or retrain, then embed) once, then every
  (protocol, classifier, defense) cell of that recognizer and countermeasure;
- ``service``: one (seed, commercial-style service, countermeasure): enrol and search over the service's API.

Evaluate and service tasks of a seed read the cloaks of that seed (from the artifact cache), so cloak tasks
come first. A task's rows are committed in one transaction (see :mod:`cloakbench.bench.store`); a resumed
run skips every task already committed ``ok``. Everything here is pure.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloakbench.bench.suite import Protocol, Suite


class TaskKind(enum.Enum):
    CLOAK = "cloak"
    EVALUATE = "evaluate"
    SERVICE = "service"


@dataclass(frozen=True)
class Task:
    kind: TaskKind
    seed: int
    subject: str  # the defense label (cloak), recognizer name (evaluate) or service label (service)
    countermeasure: str = ""  # countermeasure label (evaluate, service)

    @property
    def key(self) -> str:
        """Unique within a suite; the primary key of the store's ``tasks`` table."""
        parts = [self.kind.value, str(self.seed), self.subject]
        if self.kind is not TaskKind.CLOAK:
            parts.append(self.countermeasure)
        return "/".join(parts)


def _is_adaptation(name: str) -> bool:
    from cloakbench.attacks.adaptation import ADAPTATIONS

    return name in ADAPTATIONS


def _white_box(recognizer: str, suite: Suite) -> bool:
    """Whether an adaptation can retrain the recognizer (a black box gets skipped cells, without a softmax head)."""
    from cloakbench.attacks.recognizers import RECOGNIZERS

    for model in suite.models:  # a model from a file: TorchScript is a white box, ONNX a black one
        if model.name == recognizer:
            return model.white_box
    return "white-box" in RECOGNIZERS.get(recognizer).meta.tags


def plan_tasks(suite: Suite) -> list[Task]:
    """Every task of the suite, in run order: per seed, its cloak tasks, then evaluate, then service tasks."""
    tasks: list[Task] = []
    for seed in suite.seeds:
        tasks += [Task(TaskKind.CLOAK, seed, d.label) for d in suite.defenses]
        tasks += [Task(TaskKind.EVALUATE, seed, r, c.label) for r in suite.recognizers for c in suite.countermeasures]
        # a commercial black box is retrained by its vendor, not by the tracker: adaptations do not apply
        tasks += [
            Task(TaskKind.SERVICE, seed, s.label, c.label)
            for s in suite.services
            for c in suite.countermeasures
            if not _is_adaptation(c.name)
        ]
    return tasks


def cells_of(suite: Suite, task: Task) -> int:
    """How many summary rows (cells) a task commits (adaptations add the end-to-end softmax classifier)."""
    if task.kind is TaskKind.CLOAK:
        return 0
    if task.kind is TaskKind.SERVICE:
        svc = next(s for s in suite.services if s.label == task.subject)
        return len(suite.service_protocols(svc)) * len(suite.defenses)
    trackers = len(suite.classifiers) if Protocol.POISONING in suite.protocols else 0
    trackers += 1 if Protocol.EVASION in suite.protocols else 0
    trackers += 1 if Protocol.PROBE_CLOAKING in suite.protocols else 0
    cm = next(c for c in suite.countermeasures if c.label == task.countermeasure)
    if _is_adaptation(cm.name) and Protocol.POISONING in suite.protocols and _white_box(task.subject, suite):
        from cloakbench.attacks.adaptation import ADAPTATIONS

        if ADAPTATIONS.get(cm.name).create(**dict(cm.params)).training_data.end_to_end:
            trackers += 1
    return trackers * len(suite.defenses)


@dataclass(frozen=True)
class DataShape:
    """What the dataset holds, as far as the plan needs it (from the manifest and the split; no pixels)."""

    identities: int
    images: int
    protected: tuple[str, ...]
    train_photos: Mapping[str, int]  # identity -> enrollment photos
    query_photos: Mapping[str, int]


def describe(suite: Suite, tasks: Sequence[Task], shape: DataShape, done: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per task for ``run --dry-run``: its cells, the work it needs, and its state in the store."""
    rows = []
    n_train = sum(shape.train_photos.values())
    n_query = sum(shape.query_photos.values())
    protected_train = sum(shape.train_photos[i] for i in shape.protected)
    for t in tasks:
        if t.kind is TaskKind.CLOAK:
            spec = next(d for d in suite.defenses if d.label == t.subject)
            work = (
                f"cloak {protected_train} photos of {len(shape.protected)} protected identities with {spec.name} "
                f"(surrogates: {', '.join(spec.surrogates)}" + (", robust" if spec.robust else "") + ")"
            )
        elif t.kind is TaskKind.EVALUATE:
            cm = next(c for c in suite.countermeasures if c.label == t.countermeasure)
            retrain = f"retrain {t.subject} ({cm.name}), then " if _is_adaptation(cm.name) else ""
            through = "" if cm.name in ("none",) or _is_adaptation(cm.name) else f" through {cm.label}"
            work = (
                f"{retrain}embed {n_train + n_query} clean + {protected_train} cloaked photos x "
                f"{len(suite.defenses)} defenses with {t.subject}{through}; "
                f"{len(shape.protected)} protected identities one at a time"
            )
        else:
            work = f"enrol {n_train} photos and search {n_query} queries over {t.subject}'s API, per defense"
        rows.append(
            {
                "task": t.key,
                "kind": t.kind.value,
                "seed": t.seed,
                "cells": cells_of(suite, t),
                "work": work,
                "state": done.get(t.key, "to do"),
            }
        )
    return rows
