"""Where each photo a benchmark evaluates came from (:class:`SourcePhoto`).

A folder dataset is evaluated either as it is (``align: false``: the evaluated photo is the file) or through the
alignment stage (``align: true``: the evaluated photo is a 112x112 crop warped out of the file with the five
landmarks the detector found in it). A defense that reads files another tool wrote for the dataset's photos
(``precomputed``: cloaked copies) needs each evaluated photo's file and, for an aligned one, those landmarks, so
that it can align the other tool's copy exactly as the clean photo was aligned. :func:`source_photos` gives both,
keyed by the image id of the manifest the bench evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cloakbench.datasets.demo import ALIGNED
from cloakbench.datasets.folder import Manifest


@dataclass(frozen=True, kw_only=True, eq=False)
class SourcePhoto:
    """One evaluated photo's file in the dataset folder the suite names (compared by identity: it holds an array)."""

    image_id: str
    """The photo's id in the evaluated manifest (the aligned folder's ``<identity folder>/<stem>.png`` when aligned)."""
    source: str
    """POSIX path of the file relative to the dataset folder: ``<identity folder>/<file name>``."""
    path: Path
    """Absolute path of the file."""
    aligned: bool
    """Whether the evaluated photo was warped out of the file (``align: true``) rather than being the file."""
    landmarks: np.ndarray | None
    """Read-only (5, 2) float64 (x, y) landmarks, in the file's pixels, that aligned it (template order); None when
    not aligned, or when the alignment report predates recorded landmarks."""

    @property
    def folder(self) -> str:
        """The identity folder holding the file."""
        return PurePosixPath(self.source).parts[0]

    @property
    def name(self) -> str:
        """The file's name."""
        return PurePosixPath(self.source).name


def source_photos(
    manifest: Manifest, *, root: Path, alignment_photos: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, SourcePhoto]:
    """Image id -> :class:`SourcePhoto` for every record of ``manifest``.

    ``root`` is the dataset folder the suite names. ``alignment_photos`` are the alignment report's outcomes as
    JSON (:meth:`~cloakbench.datasets.demo.AlignmentReport.to_json`, outputs relative to ``manifest.root``) when
    the manifest is the aligned folder; None when the manifest is the dataset folder itself.
    """
    if alignment_photos is None:
        return {
            r.image_id: SourcePhoto(image_id=r.image_id, source=r.image_id, path=r.path, aligned=False, landmarks=None)
            for r in manifest.records
        }
    by_output = {str(p["output"]): p for p in alignment_photos if p.get("status") == ALIGNED and p.get("output")}
    out: dict[str, SourcePhoto] = {}
    for record in manifest.records:
        photo = by_output.get(record.image_id)
        if photo is None:  # not in the report: no file to point at (the defense says so when it needs one)
            continue
        points = photo.get("landmarks")
        landmarks = None if points is None else np.asarray(points, dtype=np.float64).reshape(5, 2)
        if landmarks is not None:
            landmarks.setflags(write=False)
        source = str(photo["source"])
        out[record.image_id] = SourcePhoto(
            image_id=record.image_id,
            source=source,
            path=root.joinpath(*PurePosixPath(source).parts),
            aligned=True,
            landmarks=landmarks,
        )
    return out
