"""The alignment stage: any folder of unaligned photos -> a cached folder of 112x112 ArcFace-aligned faces.

:func:`align_dataset` takes ``root/<identity>/<photo>`` (any sizes, any of the image formats that
:func:`~cloakbench.datasets.folder.scan_folder` reads, EXIF orientation applied), tries the detectors in
order on each photo (by default YuNet, then dlib's HOG detector as the fallback), aligns the most
confident face of the first detector that finds one with
:func:`~cloakbench.datasets.demo.align_folder`, and returns the aligned folder with an
:class:`~cloakbench.datasets.demo.AlignmentReport`: one outcome per photo, naming the detector that found
the face (``PhotoOutcome.detector``). Photos with no face under any detector, or that cannot be decoded,
are reported and left out.

Cache. The aligned folder lives under ``<cache>/datasets/`` and is keyed by the source's content (its
manifest digest: image ids and SHA-256 of their bytes, so moving or touching the folder keeps the key,
changing any byte does not), the files scanning found unusable, the detectors' settings and weights
(``describe()``, in order), the output size, :data:`VERSION` and the image decoder's rules
(:data:`~cloakbench.images.DECODER_VERSION`: a 16-bit photo decoded white by older code was aligned as such).
The JSON report beside the folder is written last, after the folder is moved into place; a later call that
finds it (and every file it lists) returns without running any detector. Building the default dlib detector
is deferred to its first detection, so a cached call costs one (cached) folder scan. A lock serialises
concurrent first builds, as for the demo set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloakbench.cache import atomic_write_text, cache_dir
from cloakbench.datasets.align import ARCFACE_SIZE
from cloakbench.datasets.demo import (
    ALIGNED,
    AlignmentReport,
    FaceDetector,
    PhotoOutcome,
    _build_lock,
    align_folder,
)
from cloakbench.datasets.detect import YuNetDetector
from cloakbench.datasets.folder import Manifest, safe_text, scan_folder
from cloakbench.errors import ConfigError, DatasetError
from cloakbench.images import DECODER_VERSION

log = logging.getLogger(__name__)

VERSION = 1
"""Version of the stage (alignment code and report layout); part of the cache key."""

_REPORT_FORMAT = 1
_MIN_SIZE = 16
_MAX_SIZE = 1024


def default_detectors() -> tuple[FaceDetector, ...]:
    """YuNet (int8, OpenCV Zoo), then dlib's HOG detector with its 5-point predictor as the fallback."""
    from cloakbench.datasets.dlib_detect import DlibDetector

    return (YuNetDetector(), DlibDetector())


def detector_counts(report: AlignmentReport) -> dict[str, int]:
    """Detector name -> number of photos it aligned (the first detector to find a face wins), sorted."""
    counts = Counter(o.detector for o in report.outcomes if o.status == ALIGNED)
    return dict(sorted(counts.items()))


def stage_key(manifest: Manifest, detectors: Sequence[FaceDetector], size: int) -> str:
    """The SHA-256 that names the aligned folder of ``manifest`` under these detectors and size."""
    payload = {
        "stage": VERSION,
        "decoder": DECODER_VERSION,
        "manifest": manifest.digest,
        "problems": sorted(
            (p.path.relative_to(manifest.root).as_posix(), p.reason)
            for p in manifest.problems
            if p.path.is_relative_to(manifest.root)
        ),
        "detectors": [d.describe() for d in detectors],
        "size": size,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _folder_name(src: Path, key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.name).strip("._")[:40] or "dataset"
    return f"{readable}-aligned-{key[:16]}"


def _load_cached(root: Path, report_file: Path, key: str) -> AlignmentReport | None:
    if not report_file.is_file():
        return None
    try:
        doc: Any = json.loads(report_file.read_text(encoding="utf-8"))
        if doc["format"] != _REPORT_FORMAT or doc["key"] != key:
            return None
        report = AlignmentReport.from_json(doc["outcomes"], root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unusable report (%s); aligning again", safe_text(report_file), safe_text(exc))
        return None
    missing = [o.output for o in report.outcomes if o.output is not None and not o.output.is_file()]
    if missing:
        log.warning(
            "%s: %d aligned file(s) missing, e.g. %s; aligning again",
            safe_text(root),
            len(missing),
            safe_text(missing[0]),
        )
        return None
    return report


def align_dataset(
    src_root: Path | str,
    *,
    detectors: Sequence[FaceDetector] | None = None,
    size: int = ARCFACE_SIZE,
    rebuild: bool = False,
) -> tuple[Path, AlignmentReport]:
    """Align every photo of ``src_root/<identity>/<photo>`` (cached); returns the folder and its report.

    ``detectors`` are tried in order on each photo (default: :func:`default_detectors`). The result is
    ``<cache>/datasets/<name>-aligned-<key>/<identity>/<stem>.png``, ``size`` x ``size`` RGB, ready for
    :func:`~cloakbench.datasets.folder.scan_folder`; the report's outcomes name each source photo
    (relative to ``src_root``), its status and the detector that found its face. ``rebuild=True``
    aligns again even when a cached result exists.

    Raises :class:`DatasetError` when ``src_root`` is missing, has no usable image, or no photo has a
    face (the message gives the counts), and :class:`ConfigError` for an empty detector list or a
    size outside 16..1024.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ConfigError(f"align_dataset: size must be an integer in {_MIN_SIZE}..{_MAX_SIZE}, got {size!r}")
    chosen = tuple(detectors) if detectors is not None else default_detectors()
    if not chosen:
        raise ConfigError("align_dataset: detectors must name at least one detector")
    manifest = scan_folder(src_root)
    src = manifest.root
    key = stage_key(manifest, chosen, size)
    datasets = cache_dir("datasets")
    root = datasets / _folder_name(src, key)
    report_file = root.with_name(root.name + ".json")
    if not rebuild and (cached := _load_cached(root, report_file, key)) is not None:
        log.info("align_dataset %s: cached in %s (%s)", safe_text(src), safe_text(root), cached.counts())
        return root, cached
    with _build_lock(datasets / f".{root.name}.lock"):
        if not rebuild and (cached := _load_cached(root, report_file, key)) is not None:
            return root, cached  # another process built it while this one waited
        report_file.unlink(missing_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-{os.getpid()}-", dir=datasets))
        try:
            staged = build / "aligned"
            staged.mkdir()
            staged_report = align_folder(src, staged, chosen, size=size)
            if staged_report.n_aligned == 0:
                details = sorted({o.detail for o in staged_report.outcomes if o.detail})
                raise DatasetError(
                    f"align_dataset {safe_text(src)}: no face aligned in {len(staged_report.outcomes)} photo(s) "
                    f"({staged_report.counts()}; {'; '.join(details[:3])})"
                )
            if root.exists():
                shutil.rmtree(root)
            os.replace(staged, root)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        staged_root = staged.resolve()
        report = AlignmentReport(
            outcomes=tuple(
                PhotoOutcome(
                    source=o.source,
                    identity=o.identity,
                    status=o.status,
                    faces=o.faces,
                    score=o.score,
                    output=None if o.output is None else root / o.output.relative_to(staged_root),
                    detail=o.detail,
                    detector=o.detector,
                    landmarks=o.landmarks,
                )
                for o in staged_report.outcomes
            )
        )
        doc = {
            "format": _REPORT_FORMAT,
            "version": VERSION,
            "key": key,
            "source": str(src),
            "manifest_digest": manifest.digest,
            "size": size,
            "detectors": [d.describe() for d in chosen],
            "counts": report.counts(),
            "aligned_by": detector_counts(report),
            "outcomes": report.to_json(root),
        }
        atomic_write_text(report_file, json.dumps(doc, indent=1, sort_keys=True, default=str))
        log.info(
            "align_dataset %s -> %s: %s, by detector %s",
            safe_text(src),
            safe_text(root),
            report.counts(),
            detector_counts(report),
        )
        return root, report
