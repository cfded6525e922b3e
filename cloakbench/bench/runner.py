"""The grid runner for the poisoning protocol (DESIGN §4).

For every seed and defense, each protected identity's training photos are cloaked (one identity at a
time; everybody else stays clean). For every recognizer and countermeasure, the tracker embeds its
(optionally transformed) enrollment set, fits each classifier and queries the protected identity's clean
query photos. Protection rate = 1 - top-1 accuracy on those queries; the same recognizer, countermeasure
and classifier without any cloak gives the clean accuracy, and a protection rate is only reported when
that clean accuracy reaches the suite's floor.

Cloaked images and embeddings are cached by content (see :mod:`cloakbench.bench.cache`); a failure in
one defense or recognizer becomes rows with ``status = failed`` and the rest of the grid still runs.

Every cloak, made now or read from the cache, passes one check before anything evaluates it
(:func:`cloak_problem`): the shape of the photos it cloaks, the defense's budget re-measured on the stored
pixels, and :func:`~cloakbench.defenses.base.cloak_failures` (a cloak that changed no pixel or did not move
its own surrogate's embedding is no cloak). A cached cloak is also checked against the SHA-256 recorded when
it was written (:meth:`~cloakbench.bench.cache.ArtifactCache.get_verified`); one that fails is remade with a
warning. A fresh cloak that fails makes its defense fail (:class:`~cloakbench.defenses.base.CloakFailure`):
every cell of it is ``failed`` with the photos and reasons in its note, never ``ok``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.adaptation import ADAPTATIONS, FileCheckpoints
from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer, TorchRecognizer
from cloakbench.attacks.recognizers.base import Precision
from cloakbench.attacks.recognizers.from_file import FileModel, load_file_model
from cloakbench.attacks.transforms import TRANSFORMS, InputTransform
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.classifiers import CLASSIFIERS
from cloakbench.bench.metrics import (
    gallery_ranks,
    predicted_labels,
    protection_interval,
    protection_rate,
    rank_of_true,
    topk_correct,
)
from cloakbench.bench.plan import Task, TaskKind, plan_tasks
from cloakbench.bench.suite import ApplyTo, CountermeasureSpec, DatasetSource, DefenseSpec, Protocol, Suite
from cloakbench.bench.timing import StageTimer, run_with_oom_retry
from cloakbench.bench.views import Plain, Retrained, View, make_view_provider, training_defenses
from cloakbench.config import source_digest, stable_hash
from cloakbench.datasets import (
    Manifest,
    Split,
    load_images,
    read_identity_names,
    rename_identities,
    scan_folder,
    split_per_identity,
)
from cloakbench.datasets.sources import SourcePhoto, source_photos
from cloakbench.defenses import DEFENSES, CloakFailure, Defense, cloak_failures, quality_report
from cloakbench.defenses.base import PhotoGroup
from cloakbench.defenses.precomputed import PrecomputedCloaks
from cloakbench.defenses.robust import make_robust
from cloakbench.defenses.targets import MAX_IMAGES_PER_TARGET, PublicFaces
from cloakbench.devices import apply_matmul_settings
from cloakbench.errors import ConfigError, DatasetError
from cloakbench.images import DECODER_VERSION, from_uint8, to_uint8
from cloakbench.png import decode_png, encode_png

log = logging.getLogger(__name__)

GALLERY_SEARCH = "gallery-search"  # the evasion protocol's tracker: rank gallery photos by cosine similarity
SOFTMAX = "softmax"  # the end-to-end tracker's own classifier (the head trained with the extractor)
CLOAK_VERSION = 2  # bump when the cloaking pipeline changes in a way the configs and the code digest do not capture
DEFENSE_CODE = ("cloakbench.defenses", "cloakbench.attacks.transforms", "cloakbench.attacks.recognizers")
"""Hashed into every cloak's cache key: the defenses, the twins they optimise through and the recognizers they
optimise against (a rewrite of a network's layers can move its gradients, and so the cloak)."""
# 2: budgets enforced after rounding, PNG round trip, SSIM windows centred on every pixel


@dataclass
class RunResult:
    suite: Suite
    summary: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    cloaks: list[dict[str, Any]]
    manifest: Manifest
    splits: dict[str, Split]
    onnx_providers: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None  # detection/alignment outcomes when the run aligned photos
    service_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # queries per service operation
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # defense label -> original/cloaked/diff grid
    adaptations: list[dict[str, Any]] = field(default_factory=list)  # one row per retrained model


@dataclass(frozen=True)
class PreparedData:
    manifest: Manifest
    images: torch.Tensor  # all photos, canonical
    labels: tuple[str, ...]
    shas: tuple[str, ...]
    splits: dict[str, Split]  # image id -> train/query
    train: dict[str, np.ndarray]  # identity -> indices into images
    query: dict[str, np.ndarray]
    protected: tuple[str, ...]
    sources: Mapping[str, SourcePhoto] = field(default_factory=dict)  # image id -> its file (defenses reading files)

    @property
    def all_train(self) -> np.ndarray:
        return np.concatenate([self.train[i] for i in sorted(self.train)])

    @property
    def all_query(self) -> np.ndarray:
        return np.concatenate([self.query[i] for i in sorted(self.query) if len(self.query[i])])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def load_manifest(suite: Suite) -> tuple[Manifest, dict[str, Any] | None]:
    """The suite's dataset, and the per-photo detection/alignment report when it had to be aligned.

    This is where every run gets its manifest: a folder dataset's identities are renamed here by
    ``dataset.names`` (after alignment, whose folder keeps the source's identity folders; the alignment
    report's identities too), so the splits, the protected identities, the cache keys and the stored results
    all see the names."""
    if suite.dataset.source is DatasetSource.DEMO:
        from cloakbench.datasets import demo_dataset

        root, report = demo_dataset()
        return scan_folder(root), {"counts": report.counts(), "photos": report.to_json(root)}
    source = suite.dataset.path
    assert source is not None
    alignment: dict[str, Any] | None = None
    if suite.dataset.align:
        from cloakbench.datasets import align_dataset

        root, report = align_dataset(source)
        manifest = scan_folder(root)
        alignment = {"counts": report.counts(), "photos": report.to_json(root)}
    else:
        manifest = scan_folder(source)
    if suite.dataset.names is not None:
        names = read_identity_names(suite.dataset.names, source)
        manifest = rename_identities(manifest, names)
        if alignment is not None:  # the report's source paths keep the folder
            for photo in alignment["photos"]:
                photo["identity"] = names.get(photo["identity"], photo["identity"])
    return manifest, alignment


def choose_protected(suite: Suite, manifest: Manifest, eligible: Sequence[str]) -> tuple[str, ...]:
    cfg = suite.protected
    if cfg.identities != "all":
        unknown = [i for i in cfg.identities if i not in eligible]
        if unknown:
            raise ConfigError(
                f"protected.identities: {unknown} not in the dataset (or with fewer than 2 photos); "
                f"available: {', '.join(eligible)}"
            )
        return tuple(cfg.identities)
    if cfg.count is None:
        return tuple(eligible)
    if cfg.count > len(eligible):
        raise ConfigError(
            f"protected.count: {cfg.count} asked for, the dataset has {len(eligible)} eligible identities"
        )
    rng = np.random.default_rng(suite.dataset.split_seed)
    return tuple(sorted(rng.choice(np.array(eligible), size=cfg.count, replace=False).tolist()))


def cap_per_identity(manifest: Manifest, limit: int, *, seed: int) -> Manifest:
    """A seeded sample of at most ``limit`` photos per identity (the same photos on every run)."""
    kept: list[Any] = []
    for ident, records in manifest.by_identity().items():
        if len(records) <= limit:
            kept.extend(records)
            continue
        rng = np.random.default_rng([seed, derive_seed("cap", ident) % 2**32])
        kept.extend(records[int(i)] for i in sorted(rng.permutation(len(records))[:limit]))
    return dataclasses.replace(manifest, records=tuple(sorted(kept, key=lambda r: r.image_id)))


def split_layout(
    suite: Suite, manifest: Manifest, splits: dict[str, Split]
) -> tuple[dict[str, list[int]], dict[str, list[int]], tuple[str, ...]]:
    """Per identity, the manifest indices of its enrollment and query photos, and the protected identities."""
    train: dict[str, list[int]] = {}
    query: dict[str, list[int]] = {}
    for i, rec in enumerate(manifest.records):
        target = train if splits[rec.image_id] is Split.TRAIN else query
        target.setdefault(rec.identity, []).append(i)
        train.setdefault(rec.identity, [])
        query.setdefault(rec.identity, [])
    eligible = [ident for ident in sorted(train) if train[ident] and query[ident]]
    if len(eligible) < 2:
        raise DatasetError(f"{manifest.root}: need at least 2 identities with 2+ photos, found {len(eligible)}")
    return train, query, choose_protected(suite, manifest, eligible)


def photo_sources(suite: Suite, manifest: Manifest, alignment: dict[str, Any] | None) -> dict[str, SourcePhoto]:
    """Each evaluated photo's file in the suite's dataset folder (and the landmarks that aligned it); none for the
    demo set, whose photos are no folder the suite names."""
    if suite.dataset.source is not DatasetSource.FOLDER or suite.dataset.path is None:
        return {}
    photos = alignment["photos"] if alignment is not None else None
    return source_photos(manifest, root=suite.dataset.path, alignment_photos=photos)


def prepare_data(suite: Suite, manifest: Manifest, sources: Mapping[str, SourcePhoto] | None = None) -> PreparedData:
    splits = split_per_identity(manifest, train_fraction=suite.dataset.train_fraction, seed=suite.dataset.split_seed)
    images = load_images(manifest.records)
    labels = tuple(r.identity for r in manifest.records)
    train, query, protected = split_layout(suite, manifest, splits)
    return PreparedData(
        manifest=manifest,
        images=images,
        splits=splits,
        labels=labels,
        shas=tuple(r.sha256 for r in manifest.records),
        train={k: np.array(v, dtype=np.int64) for k, v in train.items()},
        query={k: np.array(v, dtype=np.int64) for k, v in query.items()},
        protected=protected,
        sources=dict(sources or {}),
    )


def derive_seed(*parts: Any) -> int:
    return int(stable_hash(*parts, length=15), 16)


class ModelPool:
    """Builds each recognizer once per worker, on the device where it can run (else it stays on the CPU)."""

    def __init__(
        self, device: torch.device, files: Sequence[FileModel] = (), *, precision: Precision | str = Precision.FP32
    ) -> None:
        self.device = device
        self.precision = Precision(precision)  # of the white boxes; black boxes run as they are
        self._cache: dict[str, Recognizer] = {}
        self._files = {m.name: m for m in files}  # the suite's models from a file, by name

    def get(self, name: str) -> Recognizer:
        """The recognizer ``name``, built once. Factories that take a ``device`` argument get the pool's device
        (the ONNX and insightface entries build their onnxruntime session for it: CUDA provider first on a GPU);
        then every recognizer is moved there, where it can go."""
        from cloakbench.devices import takes_device

        if name not in self._cache:
            device = str(self.device)
            if name in self._files:
                rec = load_file_model(self._files[name], device=device)
            else:
                entry = RECOGNIZERS.get(name)
                try:
                    rec = entry.create(device=device) if takes_device(entry.factory) else entry.create()
                except ValueError:  # a CPU-only recognizer (dlib) refuses another device: built on the CPU
                    rec = entry.create()
            if rec.capabilities.differentiable:
                rec = rec.set_precision(self.precision)
            try:
                rec = rec.to(self.device)
            except ValueError:
                log.info("recognizer %s stays on the CPU", name)
            self._cache[name] = rec
        return self._cache[name]

    def onnx_providers(self) -> dict[str, list[str]]:
        return {
            n: list(getattr(r, "providers_used", ())) for n, r in self._cache.items() if hasattr(r, "providers_used")
        }


def _progress(items: Iterable[Any], *, enabled: bool, desc: str, total: int) -> Iterator[Any]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


@dataclass
class _Cloaks:
    """Cloaked training photos of each protected identity, for one (seed, defense)."""

    images: dict[str, np.ndarray]  # identity -> uint8 [n, H, W, 3]
    key: dict[str, str]
    seconds_per_image: float | None
    error: str | None = None
    surrogate_weights: frozenset[str] | None = None  # weights the defense optimised against (none for noise)
    # probe-cloaking protocol: each protected identity's query photos under the universal mask fitted on its
    # enrollment photos (uint8 [n, H, W, 3]), and their cache keys
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    probe_key: dict[str, str] = field(default_factory=dict)
    note: str = ""  # how many photos a defense that reads files cloaked (added to every row's note)


def make_defense(spec: DefenseSpec, data: PreparedData, seed: int, models: ModelPool) -> Any:
    """The suite entry's defense, with robust (EOT) surrogates when the entry asks for them."""
    surrogates = make_robust(
        [models.get(s) for s in spec.surrogates], spec.robust, seed=derive_seed("robust", seed, spec.label) % 2**31
    )
    extra: dict[str, Any] = {}
    if "public" in DEFENSES.get(spec.name).runtime_args:
        extra["public"] = dataset_target_pool(data)
    if "sources" in DEFENSES.get(spec.name).runtime_args:  # precomputed: the files behind the evaluated photos
        extra["sources"] = data.sources
    return DEFENSES.create(spec.name, surrogates=surrogates, name=spec.label, **extra, **dict(spec.params))


def cloak_all(
    suite: Suite, data: PreparedData, spec: DefenseSpec, seed: int, models: ModelPool, cache: ArtifactCache,
    *, progress: bool, quality_rows: list[dict[str, Any]] | None, identities: Sequence[str] | None = None,
    per_identity: int | None = None, clock: StageClock | None = None,
) -> _Cloaks:  # fmt: skip
    """Cloak the training photos of ``identities`` (default: the protected ones), the first ``per_identity``
    of each (default: all), cached by content. ``quality_rows`` (None: not recorded) gets one row per photo.

    The seconds each identity's cloaks took are cached beside them, so the cost per image a run reports is the
    cost of making the cloak, also when this run read it from the cache (a resumed run reports what an
    uninterrupted one would)."""
    defense = make_defense(suite.cloak_source(spec), data, seed, models)  # entries that cloak alike share cloaks
    identities = data.protected if identities is None else tuple(identities)
    # the code that makes the cloak is part of its key: a cloak cached by older code is never read as this code's
    code = source_digest(defense, packages=DEFENSE_CODE)
    # where and in what arithmetic the surrogates ran: a GPU's or a bf16 cloak is not the CPU's float32 one
    compute = sorted({s.compute() for s in defense.surrogates})
    out: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    seconds = 0.0
    photos = 0
    probes: dict[str, np.ndarray] = {}
    probe_keys: dict[str, str] = {}
    failures: list[str] = []
    cloaked_photos, left_clean = 0, []  # photos a defense that reads files cloaked, and those it left clean
    want_probes = Protocol.PROBE_CLOAKING in suite.protocols and not per_identity
    want_probes = want_probes and set(identities) <= set(data.protected)
    batch_of = shared_batches(defense, data, identities, per_identity)

    def key_of(ident: str, idx: np.ndarray) -> tuple[Any, ...]:
        parts = (
            "cloak", CLOAK_VERSION, defense.config_dict(), code, DECODER_VERSION, seed, ident,
            [data.shas[i] for i in idx], compute,
        )  # fmt: skip
        return (*parts, "batch", list(batch_of[ident])) if ident in batch_of else parts

    shared = _cloak_in_shared_batches(defense, data, batch_of, per_identity, seed, cache, key_of, clock)
    for ident in _progress(identities, enabled=progress, desc=f"cloak {spec.label} seed={seed}", total=len(identities)):
        idx = data.train[ident][:per_identity] if per_identity else data.train[ident]
        originals = data.images[idx]
        key_parts = key_of(ident, idx)
        keys[ident] = stable_hash(key_parts, length=24)
        measured: list[float] = []

        ids = _ids(data, idx)

        def make(
            originals: torch.Tensor = originals, ident: str = ident, measured: list[float] = measured,
            ids: tuple[str, ...] = ids,
        ) -> np.ndarray:  # fmt: skip
            if ident in shared:  # made in a batch shared with other users (GPU): the same cloak, its share of the time
                arr, share = shared.pop(ident)
                measured.append(share)
                return arr
            generator = torch.Generator().manual_seed(derive_seed(seed, ident, defense.config_dict()))
            start = time.perf_counter()
            with clock.stage("cloaking") if clock else contextlib.nullcontext():
                cloaked = defense.protect(originals, [ident] * originals.shape[0], generator=generator, photo_ids=ids)
            measured.append(time.perf_counter() - start)
            return png_round_trip(to_uint8(cloaked))

        arr, problem = cache.get_verified(
            "cloaks", key_parts, make, functools.partial(cloak_problem, defense, originals, ids)
        )
        if problem is not None:
            failures.append(f"{ident}: {problem}")
        left = defense.uncloaked(ids) if problem is None else {}  # on purpose (precomputed: allowed missing files)
        cloaked_photos += len(ids) - len(left)
        left_clean += [f"{i} ({why})" for i, why in left.items()]
        cost = cache.get_or_compute("cloak_seconds", key_parts, functools.partial(_seconds_array, measured))
        if math.isfinite(float(cost[0])):
            seconds += float(cost[0])
            photos += originals.shape[0]
        out[ident] = arr
        if want_probes:  # the same mask (same generator) fitted on these enrollment photos cloaks the query photos
            q_idx = data.query[ident]
            probe_parts = (*key_parts, "probes", [data.shas[i] for i in q_idx])
            probe_keys[ident] = stable_hash(probe_parts, length=24)
            probes[ident], problem = cache.get_verified(
                "cloaks",
                probe_parts,
                functools.partial(
                    _cloak_probes, defense, originals, data.images[q_idx],
                    torch.Generator().manual_seed(derive_seed(seed, ident, defense.config_dict())), clock,
                ),
                functools.partial(cloak_problem, defense, data.images[q_idx], _ids(data, q_idx)),
            )  # fmt: skip
            if problem is not None:
                failures.append(f"{ident} (query photos under the mask): {problem}")
        if quality_rows is None:
            continue
        q = quality_report(originals, from_uint8(arr))
        for j, i in enumerate(idx):
            if ids[j] in left:  # no cloak, no budget: the rows count the photos that were cloaked
                continue
            quality_rows.append(
                {
                    "seed": seed,
                    "defense": spec.label,
                    "identity": ident,
                    "image_id": data.manifest.records[i].image_id,
                    **{k: float(v[j]) for k, v in q.items()},
                }
            )
    if failures:
        raise CloakFailure(f"defense {spec.label!r} made no cloak of some photos: {' | '.join(failures)}")
    note = ""
    if defense.needs_photo_ids or left_clean:
        total = cloaked_photos + len(left_clean)
        note = f"{spec.label}: {cloaked_photos} of {total} enrollment photo(s) cloaked"
        if left_clean:
            more = f"; and {len(left_clean) - MAX_LISTED} more" if len(left_clean) > MAX_LISTED else ""
            note += f"; left clean: {'; '.join(left_clean[:MAX_LISTED])}{more}"
    if quality_rows is not None and clock is not None:  # once per cloaking task
        reports = defense.file_report() if isinstance(defense, PrecomputedCloaks) else []
        for line in ([note] if note else []) + reports:
            log.log(logging.WARNING if line in reports or left_clean else logging.INFO, "%s", line)
            clock.events.append({"kind": "cloak-inputs", "detail": line})
    used = frozenset(getattr(s, "base", s).weights_id for s in defense.surrogates)  # an EOT wrapper's base model
    return _Cloaks(
        images=out, key=keys, seconds_per_image=(seconds / photos) if photos else None, surrogate_weights=used,
        probes=probes, probe_key=probe_keys, note=note,
    )  # fmt: skip


SHARED_BATCH_DEVICES = ("cuda",)
"""Device types on which an independent defense's users share batches (:func:`shared_batches`)."""


def shared_batches(
    defense: Defense, data: PreparedData, identities: Sequence[str], per_identity: int | None
) -> dict[str, tuple[str, ...]]:
    """On a GPU, the users whose photos an independent defense (:attr:`~cloakbench.defenses.base.Defense.
    independent_images`) optimises in one shared batch: consecutive users in ``identities`` order, as many as fit
    in its batch size; each user maps to their batch's users. Empty on a CPU (a user's own batches are already the
    preferred size there) and for defenses that are not independent.

    The partition depends on the users and their photo counts only, never on what is cached, so a resumed run
    batches as an uninterrupted one does; a user's cloak key names their batch (a batch's neighbours move a cloak
    by float rounding: measured on the CPU, 2 steps of lowkey or fawkes-v1-low, up to 25 of 112,896 values by up
    to 2 levels)."""
    if not defense.independent_images or not defense.surrogates:
        return {}
    if defense.surrogates[0].device.type not in SHARED_BATCH_DEVICES:
        return {}
    size = defense.batch_size()
    batches: list[list[str]] = []
    photos = 0
    for ident in identities:
        n = len(data.train[ident][:per_identity] if per_identity else data.train[ident])
        if not batches or photos + n > size:
            batches.append([])
            photos = 0
        batches[-1].append(ident)
        photos += n
    return {ident: tuple(batch) for batch in batches for ident in batch}


def _cloak_in_shared_batches(
    defense: Defense, data: PreparedData, batch_of: Mapping[str, tuple[str, ...]], per_identity: int | None,
    seed: int, cache: ArtifactCache, key_of: Callable[[str, np.ndarray], Any], clock: StageClock | None,
) -> dict[str, tuple[np.ndarray, float]]:  # fmt: skip
    """The cloaks of every shared batch (:func:`shared_batches`) with a user whose cloak is not cached, made in one
    :meth:`~cloakbench.defenses.base.Defense.protect_groups` call (each user's random draws from their own generator,
    as in a call of their own), with each user's share of the seconds (by photos)."""
    out: dict[str, tuple[np.ndarray, float]] = {}
    for batch in dict.fromkeys(batch_of.values()):
        members = [(ident, data.train[ident][:per_identity] if per_identity else data.train[ident]) for ident in batch]
        if cache.enabled and all(cache.path("cloaks", key_of(ident, idx)).is_file() for ident, idx in members):
            continue
        groups = [
            PhotoGroup(
                images=data.images[idx], identities=[ident] * len(idx),
                generator=torch.Generator().manual_seed(derive_seed(seed, ident, defense.config_dict())),
            )
            for ident, idx in members
        ]  # fmt: skip
        photos = sum(len(idx) for _, idx in members)
        start = time.perf_counter()
        with clock.stage("cloaking") if clock else contextlib.nullcontext():
            cloaked = defense.protect_groups(groups)
        seconds = time.perf_counter() - start
        for (ident, idx), images in zip(members, cloaked, strict=True):
            out[ident] = (png_round_trip(to_uint8(images)), seconds * len(idx) / max(1, photos))
    return out


MAX_LISTED = 5
"""Photos a failure note names one by one (the rest are counted)."""


def _ids(data: PreparedData, idx: np.ndarray) -> tuple[str, ...]:
    return tuple(data.manifest.records[int(i)].image_id for i in idx)


def cloak_problem(defense: Defense, originals: torch.Tensor, image_ids: Sequence[str], arr: np.ndarray) -> str | None:
    """What is wrong with ``arr`` as ``defense``'s cloaks of ``originals`` (None: nothing).

    The same check for a cloak made now and one read from the cache: uint8 photos of the originals' shape, the
    defense's budget (re-measured on these pixels, as :meth:`Defense.protect` does on its output) and
    :func:`~cloakbench.defenses.base.cloak_failures` (changed pixels, a moved surrogate embedding).
    """
    n, _, height, width = originals.shape
    if arr.dtype != np.uint8 or arr.shape != (n, height, width, 3):
        return f"expected uint8 photos of shape {[n, height, width, 3]}, found {arr.dtype} {list(arr.shape)}"
    cloaked = from_uint8(arr)
    over = defense.budget.violations(originals, cloaked)
    if over:
        return f"outside the budget {defense.budget.describe()}: {'; '.join(over)}"
    left = defense.uncloaked(image_ids)  # left clean on purpose: no cloak to check
    keep = [j for j, i in enumerate(image_ids) if i not in left]
    if len(keep) < n:
        originals, cloaked, image_ids = originals[keep], cloaked[keep], tuple(image_ids[j] for j in keep)
    bad = [f"{image_ids[j]}: {why}" for j, why in enumerate(cloak_failures(defense, originals, cloaked)) if why]
    if not bad:
        return None
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{len(bad)} of {n} photo(s) not cloaked: {'; '.join(bad[:MAX_LISTED])}{more}"


def _cloak_probes(
    defense: Any, enrollment: torch.Tensor, queries: torch.Tensor, generator: torch.Generator, clock: StageClock | None
) -> np.ndarray:
    """Query photos under the universal mask fitted on the enrollment photos (a defense with fit/apply)."""
    with clock.stage("cloaking") if clock else contextlib.nullcontext():
        mask = defense.fit(enrollment, generator=generator)
        return png_round_trip(to_uint8(defense.apply(mask, queries)))


def _seconds_array(measured: list[float]) -> np.ndarray:
    return np.array([measured[0] if measured else math.nan], dtype=np.float64)


def png_round_trip(images: np.ndarray) -> np.ndarray:
    """Save every cloaked photo as a real PNG and read it back: what a tracker scrapes is the file."""
    return np.stack([decode_png(encode_png(img)) for img in images]) if len(images) else images.copy()


def dataset_target_pool(data: PreparedData) -> PublicFaces:
    """The benchmark's non-protected identities as a target pool (``target_pool: dataset``): their
    enrollment photos, at most :data:`MAX_IMAGES_PER_TARGET` each."""
    protected = set(data.protected)
    images = {}
    shas = []
    for ident, idx in sorted(data.train.items()):
        if ident in protected or len(idx) == 0:
            continue
        chosen = idx[:MAX_IMAGES_PER_TARGET]
        images[ident] = data.images[chosen]
        shas.append((ident, [data.shas[i] for i in chosen]))
    return PublicFaces(source="dataset", images=images, digest=stable_hash(shas))


def _embed(
    rec: Recognizer, images: torch.Tensor, transform: InputTransform | None, seed: int, clock: StageClock | None = None
) -> np.ndarray:
    with clock.stage("transform") if clock and transform else contextlib.nullcontext():
        if transform is not None:
            images = transform.apply(images, generator=torch.Generator().manual_seed(seed))
    with clock.stage("embedding") if clock else contextlib.nullcontext():
        out, record = run_with_oom_retry(
            lambda batch: rec.embed_batched(images, batch_size=batch), rec.embed_batch_size
        )
    if record.halvings and clock is not None:
        tried = " -> ".join(str(b) for b in record.tried)
        clock.events.append({"kind": "oom-retry", "detail": f"embedding with {rec.name}: batch {tried}"})
    return out.numpy()


class StageClock(StageTimer):
    """A task's stage timer (seconds per stage, the device synchronised at both ends of a stage) and the
    events worth recording, such as a batch halved after a CUDA out-of-memory error."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.events: list[dict[str, str]] = []


@dataclass
class TaskResult:
    """Everything one task produced; committed to the store in one transaction (picklable, for Ray)."""

    task: Task
    status: str = "ok"  # ok | failed (the task raised, or some of its cells failed)
    error: str = ""
    summary: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    cloaks: list[dict[str, Any]] = field(default_factory=list)
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    service_usage: dict[str, int] = field(default_factory=dict)
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    worker: str = ""
    onnx_providers: dict[str, list[str]] = field(default_factory=dict)
    events: list[dict[str, str]] = field(default_factory=list)  # {"kind": ..., "detail": ...}


def load_suite_data(suite: Suite) -> tuple[Manifest, dict[str, Any] | None]:
    """The suite's manifest (aligned first when asked; capped per identity when asked) and alignment report."""
    manifest, alignment = load_manifest(suite)
    if suite.dataset.max_per_identity is not None:
        manifest = cap_per_identity(manifest, suite.dataset.max_per_identity, seed=suite.dataset.split_seed)
    return manifest, alignment


class CellWorker:
    """Runs tasks of one suite: holds the dataset, the models and (for the current seed) the cloaks.

    The same worker serves the in-process executor and each Ray actor; every task is a pure function of the
    suite and its seed, so where it runs does not change its rows."""

    def __init__(
        self, suite: Suite, *, cache: ArtifactCache | None = None, checkpoints: FileCheckpoints | None = None,
        progress: bool = False, name: str = "",
    ) -> None:  # fmt: skip
        self.suite = suite
        self.cache = cache if cache is not None else ArtifactCache()
        self.checkpoints = checkpoints or FileCheckpoints(
            self.cache.root.parent / "checkpoints", enabled=self.cache.enabled
        )
        self.progress = progress
        self.device = resolve_device(suite.device)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        t0 = time.perf_counter()
        self.manifest, self.alignment = load_suite_data(suite)
        self.data = prepare_data(suite, self.manifest, photo_sources(suite, self.manifest, self.alignment))
        self.data_seconds = time.perf_counter() - t0
        # process-wide matmul settings, chosen by the suite, never left to torch's defaults (cloakbench.devices)
        self.matmul = apply_matmul_settings(self.device, tf32=suite.tf32)
        self.models = ModelPool(self.device, suite.models, precision=suite.precision)
        self._cloaks: tuple[int, dict[str, _Cloaks]] | None = None

    def run(self, task: Task) -> TaskResult:
        """Run one task; an exception becomes a failed task (with failed cells), never a crashed suite."""
        result = TaskResult(task=task, worker=self.name)
        clock = StageClock(self.device)
        hits, misses = self.cache.hits, self.cache.misses
        start = time.perf_counter()
        try:
            with clock.stage("loading"):  # build (and on first use fetch) the models the task needs
                for name in self._models_of(task):
                    self.models.get(name)
            if task.kind is TaskKind.CLOAK:
                self._cloak(task, result, clock)
            elif task.kind is TaskKind.EVALUATE:
                self._evaluate(task, result, clock)
            else:
                self._service(task, result, clock)
        except Exception as exc:  # one task failing must not sink the suite
            log.error("task %s failed: %s", task.key, exc)
            result.status, result.error = "failed", _error_text(exc)
            result.summary, result.queries = self._failed_cells(task, result.error), []
        failed = [r for r in result.summary if r.get("status") == "failed"]
        if failed and result.status == "ok":
            result.status, result.error = "failed", f"{len(failed)} of {len(result.summary)} cells failed"
        result.seconds = time.perf_counter() - start
        result.stages = clock.as_dict()
        result.events = list(clock.events)
        retrained = sum(float(r["seconds"]) for r in result.adaptations if not r.get("cached"))
        if retrained:
            result.stages["retraining"] = retrained
        result.cache_hits, result.cache_misses = self.cache.hits - hits, self.cache.misses - misses
        result.onnx_providers = self.models.onnx_providers()
        return result

    def _memo(self, seed: int) -> dict[str, _Cloaks]:
        """The cloaks kept for ``seed`` (a new seed drops the previous one's)."""
        if self._cloaks is None or self._cloaks[0] != seed:
            self._cloaks = (seed, {})
        return self._cloaks[1]

    def _models_of(self, task: Task) -> tuple[str, ...]:
        if task.kind is TaskKind.CLOAK:
            return next(d for d in self.suite.defenses if d.label == task.subject).surrogates
        if task.kind is TaskKind.EVALUATE:
            return (task.subject,)
        return (next(s for s in self.suite.services if s.label == task.subject).backend,)

    def cloaks(self, seed: int, clock: StageClock | None = None) -> dict[str, _Cloaks]:
        """Every defense's cloaks for ``seed`` (from the artifact cache when the cloak tasks ran; a cloak that is
        not there is made again and its time charged to ``clock``'s cloaking stage); the worker keeps one seed
        at a time."""
        memo = self._memo(seed)
        for spec in self.suite.defenses:
            if spec.label not in memo:
                try:
                    memo[spec.label] = cloak_all(
                        self.suite, self.data, spec, seed, self.models, self.cache, progress=self.progress,
                        quality_rows=None, clock=clock,
                    )  # fmt: skip
                except Exception as exc:
                    log.error("defense %s failed: %s", spec.label, exc)
                    memo[spec.label] = _Cloaks(images={}, key={}, seconds_per_image=None, error=_error_text(exc))
        return memo

    def _cloak(self, task: Task, result: TaskResult, clock: StageClock) -> None:
        spec = next(d for d in self.suite.defenses if d.label == task.subject)
        memo = self._memo(task.seed)
        try:
            cl = cloak_all(
                self.suite, self.data, spec, task.seed, self.models, self.cache, progress=self.progress,
                quality_rows=result.cloaks, clock=clock,
            )  # fmt: skip
        except Exception as exc:
            memo[spec.label] = _Cloaks(images={}, key={}, seconds_per_image=None, error=_error_text(exc))
            raise
        memo[spec.label] = cl
        if task.seed == self.suite.seeds[0]:
            result.grids = _grids(self.data, {spec.label: cl})

    def _evaluate(self, task: Task, result: TaskResult, clock: StageClock) -> None:
        cm = next(c for c in self.suite.countermeasures if c.label == task.countermeasure)
        cloaks = self.cloaks(task.seed, clock)
        ctx = _Context(
            suite=self.suite, data=self.data, seed=task.seed, models=self.models, cache=self.cache,
            checkpoints=self.checkpoints, cloaks=cloaks, progress=self.progress, clock=clock,
        )  # fmt: skip
        result.summary, result.queries = _evaluate(ctx, task.subject, cm)
        result.adaptations = ctx.adaptation_rows

    def _service(self, task: Task, result: TaskResult, clock: StageClock) -> None:
        from cloakbench.bench.service_tracker import evaluate_service

        svc = next(s for s in self.suite.services if s.label == task.subject)
        cm = next(c for c in self.suite.countermeasures if c.label == task.countermeasure)
        cloaks = self.cloaks(task.seed, clock)
        with clock.stage("service"):
            result.summary, result.queries, result.service_usage = evaluate_service(
                self.suite, self.data, task.seed, svc, self.models.get(svc.backend), cm, cloaks
            )

    def _failed_cells(self, task: Task, error: str) -> list[dict[str, Any]]:
        suite, seed = self.suite, task.seed
        if task.kind is TaskKind.CLOAK:
            return []
        if task.kind is TaskKind.EVALUATE:
            return [
                _failed_row(seed, t.protocol.value, d.label, task.subject, task.countermeasure, t.classifier, error)
                for d in suite.defenses
                for t in _trackers(suite)
            ]
        svc = next(s for s in suite.services if s.label == task.subject)
        return [
            _failed_row(seed, p.value, d.label, task.subject, task.countermeasure, "service", error)
            for d in suite.defenses
            for p in suite.service_protocols(svc)
        ]


def seed_timings(tasks: Iterable[tuple[str, int, float]]) -> dict[str, float]:
    """Seconds of (task kind, seed, seconds) summed into ``cloak_s_seed<N>`` and ``evaluate_s_seed<N>`` (pure)."""
    out: dict[str, float] = {}
    for kind, seed, seconds in tasks:
        name = f"{'cloak' if kind == TaskKind.CLOAK.value else 'evaluate'}_s_seed{seed}"
        out[name] = out.get(name, 0.0) + seconds
    return out


def assemble(
    suite: Suite, worker_data: tuple[Manifest, dict[str, Split], dict[str, Any] | None], results: Sequence[TaskResult],
    *, data_seconds: float = 0.0, total_seconds: float | None = None,
) -> RunResult:  # fmt: skip
    """A :class:`RunResult` from task results (in plan order)."""
    manifest, splits, alignment = worker_data
    timings = {"data_s": data_seconds, **seed_timings((r.task.kind.value, r.task.seed, r.seconds) for r in results)}
    timings["total_s"] = total_seconds if total_seconds is not None else data_seconds + sum(r.seconds for r in results)
    providers: dict[str, list[str]] = {}
    grids: dict[str, np.ndarray] = {}
    usage: dict[str, dict[str, int]] = {}
    for r in results:
        providers.update(r.onnx_providers)
        grids.update(r.grids)
        if r.service_usage:
            usage[f"{r.task.subject}/{r.task.countermeasure}/seed{r.task.seed}"] = r.service_usage
    return RunResult(
        suite=suite, summary=[x for r in results for x in r.summary], queries=[x for r in results for x in r.queries],
        cloaks=[x for r in results for x in r.cloaks], manifest=manifest, splits=splits, onnx_providers=providers,
        timings=timings, alignment=alignment, service_usage=usage, grids=grids,
        adaptations=[x for r in results for x in r.adaptations],
    )  # fmt: skip


def run_suite(
    suite: Suite, *, cache: ArtifactCache | None = None, checkpoints: FileCheckpoints | None = None,
    progress: bool = False,
) -> RunResult:  # fmt: skip
    """Run the whole grid in this process and return its rows (nothing is written here: the CLI runs suites
    through :func:`cloakbench.bench.executors.run_into_store`, which commits each task as it finishes)."""
    t0 = time.perf_counter()
    worker = CellWorker(suite, cache=cache, checkpoints=checkpoints, progress=progress)
    tasks = plan_tasks(suite)
    results = [worker.run(t) for t in _progress(tasks, enabled=progress, desc=suite.name, total=len(tasks))]
    return assemble(
        suite, (worker.manifest, worker.data.splits, worker.alignment), results, data_seconds=worker.data_seconds,
        total_seconds=time.perf_counter() - t0,
    )  # fmt: skip


GRID_PHOTOS = 4


def _grids(data: PreparedData, cloaks: dict[str, _Cloaks]) -> dict[str, np.ndarray]:
    """Original / cloaked / amplified-difference grids of the first protected identity's first photos."""
    from cloakbench.reports.grids import cloak_grid

    ident = data.protected[0]
    idx = data.train[ident][:GRID_PHOTOS]
    originals = to_uint8(data.images[idx])
    return {
        label: cloak_grid(originals, cl.images[ident][:GRID_PHOTOS])
        for label, cl in cloaks.items()
        if cl.error is None and ident in cl.images
    }


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-2:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return f"{type(exc).__name__}: {exc} [{where}]"


def _failed_row(seed: int, protocol: str, defense: str, rec: str, cm: str, clf: str, error: str) -> dict[str, Any]:
    return {"seed": seed, "protocol": protocol, "defense": defense, "recognizer": rec, "countermeasure": cm,
            "classifier": clf, "status": "failed", "note": error}  # fmt: skip


@dataclass
class _Outcome:
    """What one tracker did with one protected identity's clean query photos."""

    ident: str
    query_idx: np.ndarray  # indices into the dataset
    ranks: np.ndarray  # 1-based rank of the true identity (or of its first gallery photo), cloaked enrollment
    preds: list[str]
    ranks_clean: np.ndarray  # the same tracker without any cloak
    sims: np.ndarray  # similarity of the best true-identity match, cloaked enrollment
    sims_clean: np.ndarray


def _topk_accuracy(ranks: np.ndarray, k: int, n_candidates: int) -> float:
    """Top-k accuracy, or NaN when k covers every candidate (it would be 1.0 by construction)."""
    return float(topk_correct(ranks, k).mean()) if k < n_candidates else float("nan")


def _cell_rows(
    suite: Suite, data: PreparedData, cell: dict[str, Any], outcomes: list[_Outcome], clean_all_acc: float,
    seconds_per_image: float | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """The summary row and the per-query rows of one cell (pure)."""
    rows: list[dict[str, Any]] = []
    for o in outcomes:
        for j, qi in enumerate(o.query_idx):
            rows.append({
                **cell, "protected_identity": o.ident, "image_id": data.manifest.records[int(qi)].image_id,
                "predicted": o.preds[j], "rank": int(o.ranks[j]), "correct": bool(o.ranks[j] == 1),
                "rank_clean": int(o.ranks_clean[j]), "correct_clean": bool(o.ranks_clean[j] == 1),
                "true_similarity": float(o.sims[j]), "true_similarity_clean": float(o.sims_clean[j]),
            })  # fmt: skip
    ranks = np.concatenate([o.ranks for o in outcomes])
    correct = topk_correct(ranks, 1)
    # Poisoning ranks identities; evasion ranks gallery photos.
    n_candidates = len(data.train) if cell["protocol"] == Protocol.POISONING.value else len(data.all_train)
    clean_acc = float(topk_correct(np.concatenate([o.ranks_clean for o in outcomes]), 1).mean())
    rng = np.random.default_rng(derive_seed("bootstrap", cell))
    people = np.concatenate([np.full(o.ranks.size, o.ident, dtype=object) for o in outcomes])
    lo, hi = protection_interval(
        1.0 - correct.astype(np.float64), people, rng=rng,
        resamples=suite.bootstrap.resamples, confidence=suite.bootstrap.confidence,
    )  # fmt: skip
    row = {
        **cell, "n_identities": len(outcomes), "n_queries": int(ranks.size),
        "protection_rate": protection_rate(correct), "ci_low": lo, "ci_high": hi,
        "protection_rate_identity_mean": float(np.mean([protection_rate(topk_correct(o.ranks, 1)) for o in outcomes])),
        "top5_accuracy": _topk_accuracy(ranks, 5, n_candidates),
        "top50_accuracy": _topk_accuracy(ranks, 50, n_candidates),
        "clean_accuracy_protected": clean_acc, "clean_accuracy_all": clean_all_acc,
        "cloak_s_per_image": seconds_per_image, "status": "ok", "note": "",
    }  # fmt: skip
    if clean_acc < suite.clean_accuracy_floor:
        row.update(
            protection_rate=float("nan"), ci_low=float("nan"), ci_high=float("nan"),
            protection_rate_identity_mean=float("nan"), status="refused",
            note=f"clean accuracy {clean_acc:.3f} is below the floor {suite.clean_accuracy_floor:.3f}: "
            "a protection rate would mean nothing",
        )  # fmt: skip
    return row, rows


class _Tracker:
    """A way to identify query embeddings from enrollment embeddings: a classifier or a gallery search."""

    def __init__(self, protocol: Protocol, classifier: str) -> None:
        self.protocol = protocol
        self.classifier = classifier

    def ranks(
        self, enrolled: np.ndarray, labels: Sequence[str], queries: np.ndarray, truth: Sequence[str]
    ) -> tuple[np.ndarray, list[str]]:
        if self.protocol in (Protocol.EVASION, Protocol.PROBE_CLOAKING):
            sims = queries @ enrolled.T
            ranks = gallery_ranks(sims, labels, truth)
            return ranks, [labels[int(i)] for i in sims.argmax(axis=1)]
        clf = CLASSIFIERS.create(self.classifier).fit(enrolled, labels)
        scores = clf.scores(queries)
        return rank_of_true(scores, clf.classes, truth), predicted_labels(scores, clf.classes)


def _trackers(suite: Suite) -> list[_Tracker]:
    out = []
    if Protocol.POISONING in suite.protocols:
        out += [_Tracker(Protocol.POISONING, name) for name in suite.classifiers]
    if Protocol.EVASION in suite.protocols:
        out.append(_Tracker(Protocol.EVASION, GALLERY_SEARCH))
    if Protocol.PROBE_CLOAKING in suite.protocols:
        out.append(_Tracker(Protocol.PROBE_CLOAKING, GALLERY_SEARCH))
    return out


class _SoftmaxTracker(_Tracker):
    """The end-to-end tracker's own classifier: the softmax head trained with the extractor."""

    def __init__(self) -> None:
        super().__init__(Protocol.POISONING, SOFTMAX)


def _ranks(
    tracker: _Tracker, view: View, enrolled: np.ndarray, labels: Sequence[str], queries: np.ndarray,
    truth: Sequence[str], logits: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Ranks of the true identity; the softmax tracker ranks its head's scores: the ``logits`` recognizer's
    embeddings of the same queries (FaceCure's head on raw features) or a cosine head on ``queries``."""
    if isinstance(tracker, _SoftmaxTracker):
        assert view.head is not None
        scores = view.head.head_scores(queries) if view.head.logits is None else (logits or _no_logits)()
        return rank_of_true(scores, view.head.classes, truth), predicted_labels(scores, view.head.classes)
    return tracker.ranks(enrolled, labels, queries, truth)


def _no_logits() -> np.ndarray:
    raise ValueError("the softmax tracker's head reads raw features; no logits were given for its queries")


def is_oblivious(spec: DefenseSpec, rec: Recognizer, models: ModelPool, cloaks: _Cloaks | None = None) -> bool:
    """Whether ``rec`` played no part in making the cloak: its weights are none of the weights the defense
    optimised against (so ``sface-onnx`` is not oblivious to a cloak made on ``sface``: same weights, another
    runtime; every recognizer is oblivious to ``noise``, which uses no model)."""
    if cloaks is not None and cloaks.surrogate_weights is not None:
        return rec.weights_id not in cloaks.surrogate_weights
    return rec.weights_id not in {models.get(s).weights_id for s in spec.surrogates}


@dataclass
class _Context:
    """What evaluating one (seed, recognizer, countermeasure) needs from the run."""

    suite: Suite
    data: PreparedData
    seed: int
    models: ModelPool
    cache: ArtifactCache
    checkpoints: FileCheckpoints
    cloaks: dict[str, _Cloaks]
    progress: bool = False
    adaptation_rows: list[dict[str, Any]] = field(default_factory=list)
    clock: StageClock | None = None


def _evaluate(
    ctx: _Context, rec_name: str, cm: CountermeasureSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    suite, data, seed, cache = ctx.suite, ctx.data, ctx.seed, ctx.cache
    rec = ctx.models.get(rec_name)

    def oblivious(d: DefenseSpec) -> bool:
        return is_oblivious(d, rec, ctx.models, ctx.cloaks.get(d.label))

    defenses = [d for d in suite.defenses if not suite.oblivious_only or oblivious(d)]
    adaptive = cm.name in ADAPTATIONS
    trackers = _trackers(suite)
    if adaptive:
        transform: InputTransform | None = None
        on_enroll = on_query = False
        if not rec.capabilities.differentiable or not isinstance(rec, TorchRecognizer):
            note = f"{cm.name} retrains the model's weights; {rec.name} is not a white-box PyTorch recognizer"
            return [
                {**_cell(seed, t, d, rec.name, cm.label), "oblivious": oblivious(d),
                 "status": "skipped", "note": note}
                for t in trackers for d in defenses
            ], []  # fmt: skip
    else:
        transform = TRANSFORMS.create(cm.name, **dict(cm.params))
        on_enroll = cm.apply_to in (ApplyTo.ENROLLMENT, ApplyTo.BOTH)
        on_query = cm.apply_to in (ApplyTo.QUERIES, ApplyTo.BOTH)
    t_seed = derive_seed(seed, cm.label)
    cm_key = (transform.config_dict(), t_seed) if transform is not None else None

    loaded: dict[tuple[str, str, bool, bytes], np.ndarray] = {}  # each (model, photos) read once per call

    def embed(model: Recognizer, idx: np.ndarray, *, apply: bool) -> np.ndarray:
        here = (model.name, model.weights_id, apply, idx.tobytes())
        if here not in loaded:
            key = (
                "clean", (model.name, model.describe()), cm_key if apply else None, DECODER_VERSION,
                [data.shas[i] for i in idx],
            )  # fmt: skip
            loaded[here] = cache.get_or_compute(
                "embeddings",
                key,
                lambda: _embed(model, data.images[idx], transform if apply else None, t_seed, ctx.clock),
            )
        return loaded[here]

    provider: Plain | Retrained
    if adaptive:

        def cloak_public(
            spec: DefenseSpec, identities: tuple[str, ...], per_identity: int | None
        ) -> dict[str, np.ndarray]:
            if set(identities) <= set(data.protected) and per_identity is None:
                return {i: ctx.cloaks[spec.label].images[i] for i in identities}
            return cloak_all(  # public photos for the adaptive tracker: charged to the cloaking stage too
                suite, data, spec, seed, ctx.models, cache, progress=ctx.progress, quality_rows=None,
                identities=identities, per_identity=per_identity, clock=ctx.clock,
            ).images  # fmt: skip

        sources = training_defenses(  # FaceCure's adaptive tracker trains on every defense's cloaks
            suite.defenses, suite.cloak_source, lambda d: d.label in ctx.cloaks and ctx.cloaks[d.label].error is None
        )
        provider = make_view_provider(
            cm.name, dict(cm.params), rec, data, seed=derive_seed("adapt", seed) % 2**31, cloak=cloak_public,
            checkpoints=ctx.checkpoints, embed=lambda m, idx: embed(m, idx, apply=False), progress=ctx.progress,
            defenses=sources,
        )  # fmt: skip
        if provider.adaptation.training_data.end_to_end:
            trackers = [*trackers, _SoftmaxTracker()] if Protocol.POISONING in suite.protocols else trackers
    else:
        provider = Plain(rec)

    train_idx = data.all_train
    query_idx = data.all_query
    train_labels = [data.labels[i] for i in train_idx]
    query_labels = [data.labels[i] for i in query_idx]
    pos_in_train = {int(i): n for n, i in enumerate(train_idx)}
    pos_in_query = {int(i): n for n, i in enumerate(query_idx)}
    clean_memo: dict[tuple[str, str, str], tuple[np.ndarray, float]] = {}

    summary: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for tracker in trackers:
        for spec in defenses:
            cl = ctx.cloaks[spec.label]
            cell = {**_cell(seed, tracker, spec, rec.name, cm.label), "oblivious": oblivious(spec)}
            if cl.error is not None:
                summary.append({**cell, "status": "failed", "note": cl.error})
                continue
            try:
                clean_view = provider.clean(spec)
                memo_key = (clean_view.recognizer.weights_id, tracker.protocol.value, tracker.classifier)
                e_train_clean = embed(clean_view.recognizer, train_idx, apply=on_enroll)
                e_query_clean = embed(clean_view.recognizer, query_idx, apply=on_query)
                if memo_key not in clean_memo:
                    ranks_c, _ = _ranks(
                        tracker, clean_view, e_train_clean, train_labels, e_query_clean, query_labels,
                        logits=lambda v=clean_view: embed(v.head.logits, query_idx, apply=on_query),  # type: ignore[misc]
                    )  # fmt: skip
                    clean_memo[memo_key] = (ranks_c, float(topk_correct(ranks_c, 1).mean()))
                clean_ranks, clean_all_acc = clean_memo[memo_key]
                outcomes = []
                for ident in data.protected:
                    probing = tracker.protocol is Protocol.PROBE_CLOAKING  # clean gallery, masked unseen queries
                    view = clean_view if probing else provider.cloaked(spec, ident)
                    model = view.recognizer
                    e_train = embed(model, train_idx, apply=on_enroll)
                    e_query = embed(model, query_idx, apply=on_query)
                    cloaked = cl.probes[ident] if probing else cl.images[ident]
                    on_cloaked = on_query if probing else on_enroll
                    e_cloak = cache.get_or_compute(
                        "embeddings",
                        ("cloaked", (model.name, model.describe()), cm_key if on_cloaked else None,
                         cl.probe_key[ident] if probing else cl.key[ident]),
                        lambda cloaked=cloaked, model=model, on_cloaked=on_cloaked: _embed(  # type: ignore[misc]
                            model, from_uint8(cloaked), transform if on_cloaked else None, t_seed, ctx.clock
                        ),
                    )  # fmt: skip
                    enrolled = e_train.copy()
                    rows_of_ident = [pos_in_train[int(i)] for i in data.train[ident]]
                    n_cloaked = spec.cloaked_count(len(rows_of_ident))  # the rest stay clean (cloak_fraction)
                    if not probing:
                        enrolled[rows_of_ident[:n_cloaked]] = e_cloak[:n_cloaked]
                    q_pos = [pos_in_query[int(i)] for i in data.query[ident]]
                    q_emb = e_cloak if probing else e_query[q_pos]
                    ranks, preds = _ranks(
                        tracker, view, enrolled, train_labels, q_emb, [ident] * len(q_pos),
                        logits=lambda v=view, q=q_pos: embed(v.head.logits, query_idx, apply=on_query)[q],  # type: ignore[misc]
                    )  # fmt: skip
                    outcomes.append(
                        _Outcome(
                            ident=ident, query_idx=data.query[ident], ranks=ranks, preds=preds,
                            ranks_clean=clean_ranks[q_pos], sims=(q_emb @ enrolled[rows_of_ident].T).max(axis=1),
                            sims_clean=(e_query_clean[q_pos] @ e_train_clean[rows_of_ident].T).max(axis=1),
                        )
                    )  # fmt: skip
            except Exception as exc:  # one adaptation failing (a defense it needs, a training error) stays in its cell
                log.error("%s / %s / %s failed: %s", rec.name, cm.label, spec.label, exc)
                summary.append({**cell, "status": "failed", "note": _error_text(exc)})
                continue
            row, q_rows = _cell_rows(suite, data, cell, outcomes, clean_all_acc, cl.seconds_per_image)
            if cl.note:  # a defense that reads files: how many photos it cloaked
                row["note"] = f"{row['note']}; {cl.note}" if row["note"] else cl.note
            summary.append(row)
            rows.extend(q_rows)
    if isinstance(provider, Retrained):
        ctx.adaptation_rows.extend({**r, "seed": seed, "training_seed": provider.seed} for r in provider.reports)
    return summary, rows


def _cell(seed: int, tracker: _Tracker, spec: DefenseSpec, rec: str, cm: str) -> dict[str, Any]:
    return {"seed": seed, "protocol": tracker.protocol.value, "defense": spec.label, "recognizer": rec,
            "countermeasure": cm, "classifier": tracker.classifier}  # fmt: skip
