"""The grid runner for the poisoning protocol (DESIGN §4).

For every seed and defense, each protected identity's training photos are cloaked (one identity at a
time; everybody else stays clean). For every recognizer and countermeasure, the tracker embeds its
(optionally transformed) enrollment set, fits each classifier and queries the protected identity's clean
query photos. Protection rate = 1 - top-1 accuracy on those queries; the same recognizer, countermeasure
and classifier without any cloak gives the clean accuracy, and a protection rate is only reported when
that clean accuracy reaches the suite's floor.

Cloaked images and embeddings are cached by content (see :mod:`cloakbench.bench.cache`); a failure in
one defense or recognizer becomes rows with ``status = failed`` and the rest of the grid still runs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS, InputTransform
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.classifiers import CLASSIFIERS
from cloakbench.bench.metrics import (
    bootstrap_ci,
    gallery_ranks,
    predicted_labels,
    protection_rate,
    rank_of_true,
    topk_correct,
)
from cloakbench.bench.suite import ApplyTo, CountermeasureSpec, DatasetSource, DefenseSpec, Protocol, Suite
from cloakbench.config import stable_hash
from cloakbench.datasets import Manifest, Split, load_images, scan_folder, split_per_identity
from cloakbench.defenses import DEFENSES, quality_report
from cloakbench.defenses.targets import MAX_IMAGES_PER_TARGET, PublicFaces
from cloakbench.errors import ConfigError, DatasetError
from cloakbench.images import from_uint8, to_uint8

log = logging.getLogger(__name__)

GALLERY_SEARCH = "gallery-search"  # the evasion protocol's tracker: rank gallery photos by cosine similarity
CLOAK_VERSION = 2  # bump when the cloaking pipeline changes in a way the configs do not capture
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
    """The suite's dataset, and the per-photo detection/alignment report when it had to be aligned."""
    if suite.dataset.source is DatasetSource.DEMO:
        from cloakbench.datasets import demo_dataset

        root, report = demo_dataset()
        return scan_folder(root), {"counts": report.counts(), "photos": report.to_json(root)}
    assert suite.dataset.path is not None
    if suite.dataset.align:
        from cloakbench.datasets import align_dataset

        root, report = align_dataset(suite.dataset.path)
        return scan_folder(root), {"counts": report.counts(), "photos": report.to_json(root)}
    return scan_folder(suite.dataset.path), None


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


def prepare_data(suite: Suite, manifest: Manifest) -> PreparedData:
    splits = split_per_identity(manifest, train_fraction=suite.dataset.train_fraction, seed=suite.dataset.split_seed)
    images = load_images(manifest.records)
    labels = tuple(r.identity for r in manifest.records)
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
    protected = choose_protected(suite, manifest, eligible)
    return PreparedData(
        manifest=manifest,
        images=images,
        splits=splits,
        labels=labels,
        shas=tuple(r.sha256 for r in manifest.records),
        train={k: np.array(v, dtype=np.int64) for k, v in train.items()},
        query={k: np.array(v, dtype=np.int64) for k, v in query.items()},
        protected=protected,
    )


def derive_seed(*parts: Any) -> int:
    return int(stable_hash(*parts, length=15), 16)


class _Models:
    """Builds each recognizer once per run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache: dict[str, Recognizer] = {}

    def get(self, name: str) -> Recognizer:
        if name not in self._cache:
            rec = RECOGNIZERS.create(name)
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


def cloak_all(
    suite: Suite, data: PreparedData, spec: DefenseSpec, seed: int, models: _Models, cache: ArtifactCache,
    *, progress: bool, quality_rows: list[dict[str, Any]],
) -> _Cloaks:  # fmt: skip
    surrogates = [models.get(s) for s in spec.surrogates]
    extra: dict[str, Any] = {}
    if "public" in DEFENSES.get(spec.name).runtime_args:
        extra["public"] = dataset_target_pool(data)
    defense = DEFENSES.create(spec.name, surrogates=surrogates, name=spec.label, **extra, **dict(spec.params))
    out: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    seconds = 0.0
    computed = 0
    for ident in _progress(
        data.protected, enabled=progress, desc=f"cloak {spec.label} seed={seed}", total=len(data.protected)
    ):
        idx = data.train[ident]
        originals = data.images[idx]
        key_parts = ("cloak", CLOAK_VERSION, defense.config_dict(), seed, ident, [data.shas[i] for i in idx])
        keys[ident] = stable_hash(key_parts, length=24)

        def compute(originals: torch.Tensor = originals, ident: str = ident) -> np.ndarray:
            nonlocal seconds, computed
            generator = torch.Generator().manual_seed(derive_seed(seed, ident, defense.config_dict()))
            start = time.perf_counter()
            cloaked = defense.protect(originals, [ident] * originals.shape[0], generator=generator)
            seconds += time.perf_counter() - start
            computed += originals.shape[0]
            return png_round_trip(to_uint8(cloaked))

        arr = cache.get_or_compute("cloaks", key_parts, compute)
        out[ident] = arr
        q = quality_report(originals, from_uint8(arr))
        for j, i in enumerate(idx):
            quality_rows.append(
                {
                    "seed": seed,
                    "defense": spec.label,
                    "identity": ident,
                    "image_id": data.manifest.records[i].image_id,
                    **{k: float(v[j]) for k, v in q.items()},
                }
            )
    return _Cloaks(images=out, key=keys, seconds_per_image=(seconds / computed) if computed else None)


def png_round_trip(images: np.ndarray) -> np.ndarray:
    """Save every cloaked photo as a real PNG and read it back: what a tracker scrapes is the file."""
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


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


def _embed(rec: Recognizer, images: torch.Tensor, transform: InputTransform | None, seed: int) -> np.ndarray:
    if transform is not None:
        images = transform.apply(images, generator=torch.Generator().manual_seed(seed))
    return rec.embed_batched(images).numpy()


def run_suite(suite: Suite, *, cache: ArtifactCache | None = None, progress: bool = False) -> RunResult:
    """Run the whole grid and return its rows (nothing is written here; see :mod:`cloakbench.bench.output`)."""
    cache = cache if cache is not None else ArtifactCache()
    device = resolve_device(suite.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    manifest, alignment = load_manifest(suite)
    if suite.dataset.max_per_identity is not None:
        manifest = cap_per_identity(manifest, suite.dataset.max_per_identity, seed=suite.dataset.split_seed)
    data = prepare_data(suite, manifest)
    timings["data_s"] = time.perf_counter() - t0
    models = _Models(device)
    summary: list[dict[str, Any]] = []
    queries: list[dict[str, Any]] = []
    cloak_rows: list[dict[str, Any]] = []
    service_usage: dict[str, dict[str, int]] = {}
    grids: dict[str, np.ndarray] = {}

    for seed in suite.seeds:
        cloaks: dict[str, _Cloaks] = {}
        t = time.perf_counter()
        for spec in suite.defenses:
            try:
                cloaks[spec.label] = cloak_all(
                    suite, data, spec, seed, models, cache, progress=progress, quality_rows=cloak_rows
                )
            except Exception as exc:  # one defense failing must not sink the suite
                log.error("defense %s failed: %s", spec.label, exc)
                cloaks[spec.label] = _Cloaks(images={}, key={}, seconds_per_image=None, error=_error_text(exc))
        timings[f"cloak_s_seed{seed}"] = time.perf_counter() - t
        if seed == suite.seeds[0]:
            grids.update(_grids(data, cloaks))
        t = time.perf_counter()
        grid = [(r, c) for r in suite.recognizers for c in suite.countermeasures]
        for rec_name, cm in _progress(grid, enabled=progress, desc=f"evaluate seed={seed}", total=len(grid)):
            try:
                rows_s, rows_q = _evaluate(suite, data, seed, models.get(rec_name), cm, cloaks, cache)
            except Exception as exc:
                log.error("recognizer %s with %s failed: %s", rec_name, cm.label, exc)
                rows_s = [
                    _failed_row(seed, t.protocol.value, d.label, rec_name, cm.label, t.classifier, _error_text(exc))
                    for d in suite.defenses
                    for t in _trackers(suite)
                ]
                rows_q = []
            summary.extend(rows_s)
            queries.extend(rows_q)
        grid_s = [(svc, c) for svc in suite.services for c in suite.countermeasures]
        for svc, cm in _progress(grid_s, enabled=progress, desc=f"services seed={seed}", total=len(grid_s)):
            from cloakbench.bench.service_tracker import evaluate_service

            try:
                rows_s, rows_q, counts = evaluate_service(suite, data, seed, svc, models.get(svc.backend), cm, cloaks)
                service_usage[f"{svc.label}/{cm.label}/seed{seed}"] = counts
            except Exception as exc:
                log.error("service %s with %s failed: %s", svc.label, cm.label, exc)
                protocols = [p.value for p in suite.protocols] if svc.kind.value == "rekognition" else ["poisoning"]
                rows_s = [
                    _failed_row(seed, p, d.label, svc.label, cm.label, "service", _error_text(exc))
                    for d in suite.defenses
                    for p in protocols
                ]
                rows_q = []
            summary.extend(rows_s)
            queries.extend(rows_q)
        timings[f"evaluate_s_seed{seed}"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return RunResult(
        suite=suite, summary=summary, queries=queries, cloaks=cloak_rows, manifest=manifest, splits=data.splits,
        onnx_providers=models.onnx_providers(), timings=timings, alignment=alignment,
        service_usage=service_usage, grids=grids,
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
    lo, hi = bootstrap_ci(
        1.0 - correct.astype(np.float64), rng=rng,
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
        if self.protocol is Protocol.EVASION:
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
    return out


def _evaluate(
    suite: Suite, data: PreparedData, seed: int, rec: Recognizer, cm: CountermeasureSpec,
    cloaks: dict[str, _Cloaks], cache: ArtifactCache,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    transform = TRANSFORMS.create(cm.name, **dict(cm.params))
    on_enroll = cm.apply_to in (ApplyTo.ENROLLMENT, ApplyTo.BOTH)
    on_query = cm.apply_to in (ApplyTo.QUERIES, ApplyTo.BOTH)
    t_seed = derive_seed(seed, cm.label)
    rec_key = (rec.name, rec.describe())
    cm_key = (transform.config_dict(), t_seed)

    train_idx = data.all_train
    query_idx = data.all_query
    e_train = cache.get_or_compute(
        "embeddings",
        ("clean", rec_key, cm_key if on_enroll else None, [data.shas[i] for i in train_idx]),
        lambda: _embed(rec, data.images[train_idx], transform if on_enroll else None, t_seed),
    )
    e_query = cache.get_or_compute(
        "embeddings",
        ("clean", rec_key, cm_key if on_query else None, [data.shas[i] for i in query_idx]),
        lambda: _embed(rec, data.images[query_idx], transform if on_query else None, t_seed),
    )
    train_labels = [data.labels[i] for i in train_idx]
    query_labels = [data.labels[i] for i in query_idx]
    pos_in_train = {int(i): n for n, i in enumerate(train_idx)}
    pos_in_query = {int(i): n for n, i in enumerate(query_idx)}

    summary: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for tracker in _trackers(suite):
        clean_ranks, _ = tracker.ranks(e_train, train_labels, e_query, query_labels)
        clean_all_acc = float(topk_correct(clean_ranks, 1).mean())
        for spec in suite.defenses:
            cl = cloaks[spec.label]
            cell = {"seed": seed, "protocol": tracker.protocol.value, "defense": spec.label, "recognizer": rec.name,
                    "countermeasure": cm.label, "classifier": tracker.classifier}  # fmt: skip
            if cl.error is not None:
                summary.append({**cell, "status": "failed", "note": cl.error})
                continue
            outcomes = []
            for ident in data.protected:
                cloaked = cl.images[ident]
                e_cloak = cache.get_or_compute(
                    "embeddings",
                    ("cloaked", rec_key, cm_key if on_enroll else None, cl.key[ident]),
                    lambda cloaked=cloaked: _embed(  # type: ignore[misc]
                        rec, from_uint8(cloaked), transform if on_enroll else None, t_seed
                    ),
                )
                enrolled = e_train.copy()
                rows_of_ident = [pos_in_train[int(i)] for i in data.train[ident]]
                enrolled[rows_of_ident] = e_cloak
                q_pos = [pos_in_query[int(i)] for i in data.query[ident]]
                q_emb = e_query[q_pos]
                ranks, preds = tracker.ranks(enrolled, train_labels, q_emb, [ident] * len(q_pos))
                outcomes.append(
                    _Outcome(
                        ident=ident, query_idx=data.query[ident], ranks=ranks, preds=preds,
                        ranks_clean=clean_ranks[q_pos], sims=(q_emb @ e_cloak.T).max(axis=1),
                        sims_clean=(q_emb @ e_train[rows_of_ident].T).max(axis=1),
                    )
                )  # fmt: skip
            row, q_rows = _cell_rows(suite, data, cell, outcomes, clean_all_acc, cl.seconds_per_image)
            summary.append(row)
            rows.extend(q_rows)
    return summary, rows
