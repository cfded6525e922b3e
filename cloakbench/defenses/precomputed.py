"""``precomputed``: evaluate cloaked photos that another tool wrote (the real Fawkes, ``cloakbench protect``, ...).

A suite entry ``{name: precomputed, surrogates: [...], params: {path: DIR, pattern: "{stem}_cloaked.png"}}`` makes
no cloak: it reads, for each dataset photo the bench would cloak, the file the other tool wrote for it.

Mapping. ``path`` mirrors the dataset's identity folders: the cloak of the dataset photo ``<folder>/<file>`` is
``<path>/<folder>/<pattern>``, the pattern filled in with ``{stem}`` (the file name without its extension),
``{name}`` (the file name) and ``{ext}`` (the extension without its dot). The default, ``{stem}_cloaked.png``, is
what Fawkes and ``cloakbench protect`` write. A pattern with another placeholder, with none of ``{stem}`` and
``{name}`` (every photo would map to one file), with a format spec, or whose path leaves the identity's folder
(``..``, an absolute path) is refused when the suite is validated, as is a pattern that maps two photos to one file
when the run starts. A relative ``path`` is relative to the suite file.

Alignment. With ``dataset.align: true`` the evaluated photo is a 112x112 crop warped out of the full-size file
with the five landmarks the detector found in it (:mod:`cloakbench.datasets.stage`). ``alignment:
clean-landmarks`` (the default) warps the cloaked file with the landmarks of its *clean* original, the very warp
that made the clean crop, so the crop differs from the clean one only by the cloak. It checks that warping the
clean file with those landmarks gives back the clean crop bit for bit (else the run fails: the cloak could not be
aligned as its original was). An alignment report written before landmarks were recorded has none; they are then
found again on the clean file by the same detectors, and the same check proves them the same. ``alignment:
redetect`` detects the face in the cloaked file itself, as a tracker that scrapes the photo would: it measures the
detector as well as the cloak. With ``dataset.align: false`` the file is used as it is.

Files. Each cloaked file must decode (:func:`~cloakbench.images.decode_image`, EXIF orientation applied as for the
dataset) and have its clean original's size. A photo whose file is missing, unreadable or of another size (or,
with ``redetect``, shows no face) has no usable cloak: the defense fails, naming the files, unless ``max_missing``
allows that share of a user's photos to lack one; those photos then reach the tracker clean
(:meth:`PrecomputedCloaks.uncloaked`) and each result row's note says how many photos were cloaked. Files under
``path`` that no evaluated photo maps to are reported (hidden files aside), never used.

Budgets are measured, never enforced: the budget is L-inf 1.0, so the base class's projection and rounding leave a
file's pixels as they are, and the bench records each photo's L-inf, L2, PSNR, SSIM and DSSIM on the evaluated
crop. The SHA-256 of every mapped file is part of :meth:`PrecomputedCloaks.config_dict`, hence of every cloak's
cache key: a changed file is read again, never served from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import quote, require, stable_hash, to_plain
from cloakbench.datasets.folder import list_folder
from cloakbench.datasets.sources import SourcePhoto
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget
from cloakbench.errors import ConfigError, DatasetError, ImageContractError
from cloakbench.images import decode_image, from_uint8, load_image, to_uint8

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "{stem}_cloaked.png"
"""What Fawkes (``<name>_cloaked.png``) and ``cloakbench protect`` write beside each photo."""
PLACEHOLDERS = ("stem", "name", "ext")
CLEAN_LANDMARKS: Final = "clean-landmarks"
REDETECT: Final = "redetect"
LISTED = 5
"""Files an error or note names one by one (the rest are counted)."""


def check_pattern(pattern: str) -> tuple[str, ...]:
    """The placeholders of ``pattern`` (see the module docstring); :class:`ConfigError` when it is unusable.

    Messages start with ``pattern`` so a suite error puts them on the key (``defenses[1].params.pattern``)."""
    shown = quote(pattern)
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise ConfigError(
            f"pattern {shown} is not a valid pattern ({exc}); write {{{{ and }}}} for literal braces"
        ) from None
    known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    fields = []
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            raise ConfigError(f"pattern {shown} has an unknown placeholder {{{field}}} (placeholders: {known})")
        if spec or conversion:
            raise ConfigError(f"pattern {shown}: write the placeholder {{{field}}} alone (no format spec)")
        fields.append(field)
    if not {"stem", "name"} & set(fields):
        raise ConfigError(
            f"pattern {shown} has no {{stem}} or {{name}} placeholder, so every photo would map to one file "
            f"(e.g. {DEFAULT_PATTERN!r})"
        )
    problem = _path_problem(pattern.format(stem="photo", name="photo.jpg", ext="jpg"))
    if problem:
        raise ConfigError(f"pattern {shown} {problem}")
    return tuple(fields)


def _path_problem(rendered: str) -> str:
    """Why ``rendered`` (a filled-in pattern) is no path inside an identity's folder ("" when it is one)."""
    if "\0" in rendered or "\\" in rendered:
        return "holds a NUL or a backslash; use '/' between folders"
    if rendered.startswith("/"):
        return "is an absolute path: it must name a file inside the identity's folder under 'path'"
    parts = rendered.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "leaves the identity's folder under 'path' (a '..', '.' or empty path component)"
    return ""


@dataclass(frozen=True, kw_only=True)
class PrecomputedConfig:
    path: Path
    """The folder of cloaked photos, one subfolder per identity folder of the dataset."""
    pattern: str = DEFAULT_PATTERN
    alignment: Literal["clean-landmarks", "redetect"] = CLEAN_LANDMARKS
    max_missing: float = 0.0
    """The largest share of one user's photos (one cloaking batch) that may lack a usable cloak file."""

    def __post_init__(self) -> None:
        check_pattern(self.pattern)
        require(
            0.0 <= self.max_missing < 1.0,
            f"max_missing must be in [0, 1) (the largest share of a user's photos that may lack a usable cloak file), "
            f"got {self.max_missing}",
        )


@dataclass(frozen=True)
class _Read:
    crop: np.ndarray | None  # the cloak as evaluated (uint8 [H, W, 3]); None when unusable
    problem: str  # why it is unusable ("" when usable)
    clean_crop: np.ndarray | None = None  # the clean file warped as the cloak was (clean-landmarks), to check


class PrecomputedCloaks(Defense):
    """Cloaks read from another tool's files (module docstring)."""

    threat_model = ThreatModel.POISONING  # uploaded photos; the suite's protocols say how the tracker meets them
    requirements = DefenseRequirements(differentiable_surrogates=False, min_surrogates=0)
    needs_photo_ids = True

    def __init__(
        self, config: PrecomputedConfig, *, surrogates: Sequence[Recognizer] = (), name: str = "precomputed",
        sources: Mapping[str, SourcePhoto] | None = None,
    ) -> None:  # fmt: skip
        # surrogates: the models the other tool optimised against, as the suite declares them (none when unknown);
        # they decide which recognizers are oblivious and are the cloak check's surrogates
        super().__init__(name=name, budget=Budget(linf=1.0), surrogates=surrogates)
        self.config = config
        root = config.path.expanduser()
        if not root.is_dir():
            problem = "does not exist" if not root.exists() else "is not a folder"
            raise ConfigError(f"defense {name!r}: params.path: {root} {problem} (the folder of cloaked photos)")
        if not sources:
            raise ConfigError(
                f"defense {name!r} reads the cloaked files of a folder dataset's photos, and this dataset has no "
                "photo files to map (use dataset source 'folder')"
            )
        self.root = root.resolve()
        self.sources = dict(sources)
        self.files: dict[str, Path] = {}
        owner: dict[Path, str] = {}
        for image_id, src in sorted(self.sources.items()):
            path = self._cloak_path(src.source)
            if path in owner:
                raise ConfigError(
                    f"defense {name!r}: params.pattern {quote(config.pattern)} maps both {owner[path]} and "
                    f"{src.source} to {path}; add {{ext}} or use {{name}}"
                )
            owner[path] = src.source
            self.files[image_id] = path
        self.digests = {image_id: _sha256(path) for image_id, path in self.files.items()}
        # extra: what no photo of the dataset folder maps to (a photo with no face, or left out by max_per_identity,
        # is not evaluated, but its cloak is no stray file)
        some = next(iter(self.sources.values()))
        dataset_root = some.path.parents[len(PurePosixPath(some.source).parts) - 1]
        expected = set(owner)
        for entry in list_folder(dataset_root).candidates:
            with contextlib.suppress(DatasetError):
                expected.add(self._cloak_path(entry.rel))
        self.extra = tuple(sorted(_visible_files(self.root) - expected))
        self._reads: dict[str, str] = {}  # image id -> problem ("" when usable), memo of uncloaked()
        self._detectors: tuple[Any, ...] | None = None

    def _cloak_path(self, source: str) -> Path:
        """Where the cloak of the dataset photo ``source`` (``<folder>/<file>``) is expected."""
        folder, file_name = PurePosixPath(source).parts[0], PurePosixPath(source).name
        rendered = self.config.pattern.format(
            stem=PurePosixPath(file_name).stem, name=file_name, ext=PurePosixPath(file_name).suffix.lstrip(".")
        )
        problem = _path_problem(rendered)
        if problem:
            raise DatasetError(f"defense {self.name!r}: the cloak path of {source}, {rendered!r}, {problem}")
        return self.root / folder / rendered

    def config_dict(self) -> dict[str, object]:
        files = sorted(
            (image_id, self.files[image_id].relative_to(self.root).as_posix(), self.digests[image_id])
            for image_id in self.files
        )
        return {**super().config_dict(), "config": to_plain(self.config), "files": stable_hash(files, length=32)}

    def file_report(self) -> list[str]:
        """Lines worth reporting about the folder as a whole: the files that no photo of the dataset maps to."""
        if not self.extra:
            return []
        names = ", ".join(p.relative_to(self.root).as_posix() for p in self.extra[:LISTED])
        more = f" and {len(self.extra) - LISTED} more" if len(self.extra) > LISTED else ""
        return [f"{len(self.extra)} file(s) in {self.root} map to no photo of the dataset (not used): {names}{more}"]

    def uncloaked(self, photo_ids: Sequence[str]) -> dict[str, str]:
        out = {}
        for pid in photo_ids:
            if pid not in self._reads:
                self._reads[pid] = self._read(pid, None).problem
            if self._reads[pid]:
                out[pid] = self._reads[pid]
        return out

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        raise ImageContractError(f"{self.name}: reads cloaked files by photo id; protect() needs photo_ids")

    def _protect_photos(
        self, images: torch.Tensor, identities: Sequence[str], photo_ids: Sequence[str], *, generator: torch.Generator
    ) -> torch.Tensor:
        clean = to_uint8(images)
        out = images.clone()
        bad: list[str] = []
        for j, pid in enumerate(photo_ids):
            read = self._read(pid, clean[j].shape[:2])
            self._reads[pid] = read.problem
            if read.crop is None:
                bad.append(f"{pid}: {read.problem}")
                continue
            if read.clean_crop is not None and not np.array_equal(read.clean_crop, clean[j]):
                worst = int(np.abs(read.clean_crop.astype(np.int16) - clean[j].astype(np.int16)).max())
                raise DatasetError(
                    f"defense {self.name!r}: warping {self.sources[pid].path} with its landmarks does not give back "
                    f"the aligned photo {pid} (pixels differ by up to {worst} levels), so its cloak cannot be aligned "
                    "as the clean photo was; delete the dataset's aligned copy under the cache's datasets/ folder to "
                    "align it again, or use alignment: redetect"
                )
            if read.crop.shape != clean[j].shape:  # only a bug can get here: the size was checked
                raise ImageContractError(f"{self.name}: {pid}: cloak {read.crop.shape}, photo {clean[j].shape}")
            out[j] = from_uint8(np.array(read.crop[None]))[0].to(images.device)  # a writable copy
        allowed = math.floor(self.config.max_missing * len(photo_ids) + 1e-9)
        if len(bad) > allowed:
            who = ", ".join(sorted(set(identities)))
            more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
            raise DatasetError(
                f"defense {self.name!r}: {len(bad)} of {len(photo_ids)} photo(s) of {who} have no usable cloak file "
                f"in {self.root} (max_missing {self.config.max_missing:g} allows {allowed}): "
                f"{'; '.join(bad[:LISTED])}{more}"
            )
        for line in bad:
            log.warning("%s: left clean: %s", self.name, line)
        return out

    def _read(self, pid: str, size: tuple[int, ...] | None) -> _Read:
        """The cloak of photo ``pid`` as evaluated (``size``: the aligned crop's height and width; None: 112x112)."""
        src = self.sources.get(pid)
        if src is None:
            return _Read(None, "the dataset gives no file for this photo")
        path = self.files[pid]
        if self.digests[pid] is None:
            return _Read(None, f"missing: no file {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            return _Read(None, f"unreadable: {path}: {exc.strerror or exc}")
        if hashlib.sha256(data).hexdigest() != self.digests[pid]:
            raise DatasetError(f"defense {self.name!r}: {path} changed while the run was reading it; run again")
        try:
            cloak = decode_image(data)
        except Exception as exc:  # a decoder failure on untrusted bytes is a reported file, never a crash
            return _Read(None, f"unreadable: {path}: {'empty file' if not data else exc}")
        try:
            clean = load_image(src.path)
        except Exception as exc:
            raise DatasetError(f"defense {self.name!r}: the dataset photo {src.path} cannot be read: {exc}") from exc
        if cloak.shape != clean.shape:
            return _Read(
                None,
                f"wrong size: {path} is {cloak.shape[1]}x{cloak.shape[0]} pixels, its photo {src.source} is "
                f"{clean.shape[1]}x{clean.shape[0]}",
            )
        if not src.aligned:
            return _Read(cloak, "")
        from cloakbench.datasets.align import ARCFACE_SIZE, align_face

        side = int(size[0]) if size is not None else ARCFACE_SIZE
        if self.config.alignment == REDETECT:
            found = self._detect(cloak)
            if found is None:
                return _Read(None, f"no face: no detector found a face in {path}")
            return _Read(align_face(cloak, found, side), "")
        landmarks = src.landmarks if src.landmarks is not None else self._detect(clean)
        if landmarks is None:
            raise DatasetError(f"defense {self.name!r}: no face found again in {src.path}, which the dataset aligned")
        return _Read(align_face(cloak, landmarks, side), "", clean_crop=align_face(clean, landmarks, side))

    def _detect(self, image: np.ndarray) -> np.ndarray | None:
        """The landmarks of the most confident face the alignment stage's detectors find (first that finds one)."""
        from cloakbench.datasets.demo import detector_name, first_detection
        from cloakbench.datasets.stage import default_detectors

        if self._detectors is None:
            self._detectors = default_detectors()
        found, _ = first_detection(image, [detector_name(d) for d in self._detectors], self._detectors)
        return found[0].landmarks if found else None


def _sha256(path: Path) -> str | None:
    """SHA-256 of the file at ``path``; None when there is none (an unreadable file hashes as its error)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


def _visible_files(root: Path) -> set[Path]:
    """Every file under ``root`` whose path has no hidden (dot) component."""
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        out.add(path)
    return out


def make_precomputed(
    *, surrogates: Sequence[Recognizer] = (), name: str = "precomputed",
    sources: Mapping[str, SourcePhoto] | None = None, **config: Any,
) -> PrecomputedCloaks:  # fmt: skip
    from cloakbench.config import build

    return PrecomputedCloaks(
        build(PrecomputedConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name, sources=sources
    )
