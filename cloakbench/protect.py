"""Cloak a folder of one person's photos, for users (``cloakbench protect DIR``, like Fawkes' own CLI).

For each photo in the folder (not its subfolders; the extensions of
:data:`~cloakbench.datasets.IMAGE_EXTENSIONS`, any case, EXIF orientation applied):

1. the faces are detected (YuNet, then dlib's HOG detector where YuNet finds none) and each is aligned
   to the 112x112 ArcFace template with the similarity ``M`` from its five landmarks;
2. every aligned face of every photo is cloaked in one call of :meth:`Defense.protect` with a single
   identity label (the photos are of one person, so a targeted cloak such as Fawkes picks one target for
   all of them) and a generator seeded with ``seed``;
3. the perturbation (cloaked face minus aligned face, in float) is warped back into the photo with the
   inverse of ``M`` (bilinear), weighted by a warped mask of ones so that it stops at the crop's edge
   (where faces overlap, the masks average their perturbations), added to the photo, clipped and rounded
   to uint8, and written losslessly as ``<stem>_cloaked.png``.

Only pixels inside the faces' crops change. The warp interpolates a perturbation that is already on the
uint8 grid, so a defense with an L-inf budget ``eps`` changes no photo pixel by more than
``eps * 255 + 1`` levels (half a level from the cloak's own rounding, half from the photo's). The budget
reported per face (:class:`FaceReport`) is measured on the aligned crop, where the defense enforces it.
The saved PNG carries no metadata of the original (EXIF, GPS) and is stored upright.

With ``aligned=True`` the photos are taken to be 112x112 ArcFace-aligned faces already and the cloaked
faces are written as they are. A photo with no face, one that cannot be read, or (with ``aligned``) one
of another size is reported and skipped, never an error; files already named ``*_cloaked.png`` are
outputs of an earlier run and are not read. Files with other extensions are listed as ``not_image``.

A cloak that protects nothing is a failure (``failed``), never ``cloaked``: no ``_cloaked.png`` is written for
a photo whose saved image would equal the original (every change below half a level, or a defense that kept
the photo itself: Fawkes v1.0's own rule does when no iterate meets its bound) or any of whose faces' cloaks
leaves the surrogates' embedding where it was (:func:`~cloakbench.defenses.base.cloak_failures`). The user
is told, and the exit code says some photos were not cloaked, so nobody posts a photo believing it cloaked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from cloakbench.datasets.folder import safe_text
from cloakbench.errors import ConfigError, DatasetError
from cloakbench.png import save_uint8_png

if TYPE_CHECKING:
    from cloakbench.datasets import FaceDetector

log = logging.getLogger(__name__)

CLOAKED = "cloaked"
NO_FACE = "no_face"
UNREADABLE = "unreadable"
BAD_SIZE = "bad_size"
FAILED = "failed"
"""The defense ran but its cloak protects nothing (:func:`~cloakbench.defenses.base.cloak_failures`); not saved."""
NOT_IMAGE = "not_image"
STATUSES = (CLOAKED, NO_FACE, UNREADABLE, BAD_SIZE, FAILED, NOT_IMAGE)
SKIPPED = (NO_FACE, UNREADABLE, BAD_SIZE, FAILED)
"""Statuses of photos that were left uncloaked (``not_image`` files are no photos and do not count)."""

OUTPUT_SUFFIX = "_cloaked.png"
USER = "user"
"""The identity label given to the defense for every face: the photos are taken to be of one person."""

TWO_SURROGATES = ("sface", "facenet-casia")
_DEFAULT_SURROGATE = "sface"


@dataclass(frozen=True, kw_only=True)
class FaceReport:
    """One cloaked face: where it is and the budget the cloak used, measured on the aligned crop."""

    box: tuple[float, float, float, float]
    """(x, y, width, height) of the detected face in the photo's pixels (the whole image with ``aligned``)."""
    score: float | None
    """The detector's score (None with ``aligned``)."""
    detector: str
    """The detector that found it (``describe()["detector"]``; empty with ``aligned``)."""
    linf: float
    """Largest change of a pixel value of the aligned crop, on [0, 1]."""
    psnr: float
    """dB; +inf for an unchanged crop."""
    ssim: float
    dssim: float

    def to_json(self) -> dict[str, Any]:
        return {
            "box": [round(v, 2) for v in self.box],
            "score": self.score,
            "detector": self.detector,
            "linf": self.linf,
            "linf_levels": round(self.linf * 255, 3),
            "psnr": self.psnr if np.isfinite(self.psnr) else None,
            "ssim": self.ssim,
            "dssim": self.dssim,
        }


@dataclass(frozen=True, kw_only=True)
class PhotoResult:
    """What happened to one file of the folder."""

    source: Path
    status: str
    """One of :data:`STATUSES`."""
    output: Path | None = None
    """The cloaked PNG; None unless ``status == "cloaked"``."""
    faces: tuple[FaceReport, ...] = ()
    detail: str = ""
    """Why a file was skipped or its cloak failed; empty when cloaked."""
    max_change: int | None = None
    """Largest change of any pixel value of the saved photo, in uint8 levels (None unless cloaked or failed:
    for a failed cloak, of the photo it would have saved)."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"PhotoResult {self.source}: unknown status {self.status!r} (one of {STATUSES})")
        if (self.status == CLOAKED) != (self.output is not None):
            raise ValueError(f"PhotoResult {self.source}: an output path is required exactly when cloaked")

    @property
    def skipped(self) -> bool:
        """A photo that was left uncloaked (no face, unreadable, wrong size, a cloak that protects nothing)."""
        return self.status in SKIPPED

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "status": self.status,
            "output": None if self.output is None else str(self.output),
            "faces": len(self.faces),
            "detail": self.detail,
            "max_change_levels": self.max_change,
            "face_budgets": [f.to_json() for f in self.faces],
        }


@dataclass(frozen=True, kw_only=True)
class ProtectReport:
    """The outcome of :func:`protect_folder`: one :class:`PhotoResult` per file, sorted by name."""

    photos: tuple[PhotoResult, ...]
    defense: str
    params: Mapping[str, Any]
    surrogates: tuple[str, ...]
    seed: int
    device: str
    aligned: bool
    out_dir: Path
    seconds: float

    @property
    def n_cloaked(self) -> int:
        return sum(1 for p in self.photos if p.status == CLOAKED)

    @property
    def skipped(self) -> tuple[PhotoResult, ...]:
        return tuple(p for p in self.photos if p.skipped)

    @property
    def failed(self) -> tuple[PhotoResult, ...]:
        """Photos whose cloak protected nothing (also among :attr:`skipped`)."""
        return tuple(p for p in self.photos if p.status == FAILED)

    def to_json(self) -> dict[str, Any]:
        return {
            "defense": self.defense,
            "params": dict(self.params),
            "surrogates": list(self.surrogates),
            "seed": self.seed,
            "device": self.device,
            "aligned": self.aligned,
            "out_dir": str(self.out_dir),
            "cloaked": self.n_cloaked,
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "photos": [p.to_json() for p in self.photos],
        }


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["steps=5", "epsilon=0.03"]`` -> ``{"steps": 5, "epsilon": 0.03}``; values are YAML scalars."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. steps=5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {item!r}: the value is not a YAML scalar ({exc})") from None
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--param {item!r}: the value must be a single value, not a list or mapping")
        if key in params:
            raise ConfigError(f"--param {key!r} is given twice")
        params[key] = value
    return params


def default_surrogates(defense: str, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The surrogates a defense gets when none are named.

    ``noise`` uses none; defenses that use two extractors (Fawkes v1.0 mid and high, or any preset given
    ``extractors >= 2``) and LowKey (an ensemble cloak) get ``sface`` and ``facenet-casia``; the rest
    ``sface``.
    """
    from cloakbench.defenses import DEFENSES
    from cloakbench.defenses.noise import make_noise

    entry = DEFENSES.get(defense)
    if entry.factory is make_noise:
        return ()
    merged = {**entry.defaults, **(params or {})}
    extractors = merged.get("extractors")
    if (isinstance(extractors, int) and extractors >= 2) or defense in ("lowkey", "lowkey-linf"):
        return TWO_SURROGATES
    return (_DEFAULT_SURROGATE,)


def list_photos(folder: Path) -> tuple[list[Path], list[Path]]:
    """(photos, other files) of ``folder``, sorted; hidden files, subfolders and outputs are left out."""
    from cloakbench.datasets import IMAGE_EXTENSIONS

    photos: list[Path] = []
    others: list[Path] = []
    outputs = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() and not (path.is_symlink() and not path.exists()):
            continue  # a folder; a looping or dangling link is kept, to be reported as unreadable
        if path.name.lower().endswith(OUTPUT_SUFFIX):
            outputs += 1
            continue
        (photos if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    if outputs:
        log.info("%s: %d file(s) named *%s left alone (outputs of an earlier run)", folder, outputs, OUTPUT_SUFFIX)
    return photos, others


def _output_name(path: Path, taken: set[str]) -> str:
    """``<stem>_cloaked.png``; ``a.jpg`` and ``a.png`` in one folder become ``a_cloaked.png``, ``a_png_cloaked.png``."""
    candidates = [f"{path.stem}{OUTPUT_SUFFIX}", f"{path.stem}_{path.suffix.lstrip('.').lower()}{OUTPUT_SUFFIX}"]
    n = 1
    while all(c.lower() in taken for c in candidates):
        candidates.append(f"{path.stem}-{n}{OUTPUT_SUFFIX}")
        n += 1
    name = next(c for c in candidates if c.lower() not in taken)
    taken.add(name.lower())
    return name


@dataclass
class _Face:
    photo: int  # index into the photo list
    crop: np.ndarray  # uint8 [112, 112, 3]
    matrix: np.ndarray | None  # 2x3, photo -> crop; None with aligned inputs
    box: tuple[float, float, float, float]
    score: float | None
    detector: str


def _unreadable(path: Path, exc: Exception) -> str:
    from cloakbench.datasets.demo import _unreadable_detail

    return _unreadable_detail(path, exc)


def paste_perturbation(photo: np.ndarray, deltas: Sequence[np.ndarray], matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Add crop-space perturbations (float, in uint8 levels, [S, S, 3]) back into a uint8 photo.

    Each ``matrices[i]`` is the 2x3 similarity that mapped the photo to crop ``i``. The perturbation and a
    mask of ones are warped back with its inverse (bilinear); where crops overlap, their perturbations
    are averaged by mask weight. Pixels outside every crop are returned unchanged.
    """
    height, width = photo.shape[:2]
    total = np.zeros((height, width, 3), dtype=np.float32)
    weight = np.zeros((height, width), dtype=np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for delta, matrix in zip(deltas, matrices, strict=True):
        ones = np.ones(delta.shape[:2], dtype=np.float32)
        mask = cv2.warpAffine(ones, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        back = cv2.warpAffine(
            np.ascontiguousarray(delta, dtype=np.float32),
            matrix,
            (width, height),
            flags=flags,
            borderMode=cv2.BORDER_REPLICATE,
        )
        total += back * mask[:, :, None]
        weight += mask
    total /= np.maximum(weight, 1.0)[:, :, None]
    out: np.ndarray = np.clip(np.rint(photo.astype(np.float32) + total), 0, 255).astype(np.uint8)
    out[weight == 0] = photo[weight == 0]  # exactly unchanged outside the faces
    return out


def protect_folder(
    folder: Path | str,
    *,
    defense: str = "fawkes-high",
    surrogates: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    aligned: bool = False,
    out_dir: Path | str | None = None,
    detectors: Sequence[FaceDetector] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProtectReport:
    """Cloak every photo of ``folder`` with ``defense`` and write ``<stem>_cloaked.png`` beside it (or in ``out_dir``).

    ``surrogates`` name the recognizers the defense optimises against (default: :func:`default_surrogates`);
    ``params`` override the preset's parameters (e.g. ``{"steps": 5}``); ``device`` is ``auto``, ``cpu``
    or ``cuda``; ``detectors`` default to YuNet then dlib (unused with ``aligned``). ``progress``, when
    given, receives a line of text before each stage (detection, model loading, cloaking).

    Raises :class:`DatasetError` when ``folder`` is missing or holds no photo, and :class:`ConfigError` /
    :class:`~cloakbench.errors.RegistryError` for unknown names or bad parameters (checked before any
    model is loaded). Photos that cannot be cloaked are reported in the result, never raised.
    """
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.bench.runner import resolve_device
    from cloakbench.datasets.align import ARCFACE_SIZE, align_face, similarity_transform, template
    from cloakbench.datasets.demo import detector_name, first_detection, load_photo
    from cloakbench.defenses import DEFENSES, cloak_failures, quality_report
    from cloakbench.defenses.fawkes import Fawkes
    from cloakbench.images import from_uint8, to_uint8

    start = time.perf_counter()
    notify = progress or (lambda _msg: None)
    src = Path(folder).expanduser()
    if not src.exists():
        raise DatasetError(f"{src}: no such folder")
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder (give the folder that holds the photos)")
    src = src.resolve()
    dst = Path(out_dir).expanduser().resolve() if out_dir is not None else src
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"{dst}: the output path exists and is not a folder")

    # names and parameters first: a typo fails before any photo is read or model loaded
    params = dict(params or {})
    entry = DEFENSES.get(defense)
    entry.check_params(params, where=f"defense {defense!r} --param")
    chosen = tuple(surrogates) if surrogates else default_surrogates(defense, params)
    for name in chosen:
        RECOGNIZERS.get(name)
    extractors = {**entry.defaults, **params}.get("extractors")
    if isinstance(extractors, int) and len(chosen) < extractors:
        raise ConfigError(
            f"defense {defense!r} uses {extractors} extractors but {len(chosen)} surrogate(s) were given "
            f"({', '.join(chosen) or 'none'}); name {extractors} surrogates (e.g. sface and facenet-casia)"
        )
    torch_device = resolve_device(device)

    photos, others = list_photos(src)
    if not photos:
        raise DatasetError(
            f"{src}: no photo to cloak (looked for {', '.join(sorted(_extensions()))}, not in subfolders; "
            f"files named *{OUTPUT_SUFFIX} are outputs and are not cloaked again)"
        )
    results: dict[int, PhotoResult] = {}
    faces: list[_Face] = []
    size = ARCFACE_SIZE
    finders: tuple[FaceDetector, ...] = ()
    if aligned:
        notify(f"reading {len(photos)} aligned face(s) from {src}")
    else:
        notify(f"detecting faces in {len(photos)} photo(s) of {src}")
        if detectors is None:
            from cloakbench.datasets.stage import default_detectors

            detectors = default_detectors()
        finders = tuple(detectors)
        if not finders:
            raise ConfigError("protect: detectors must name at least one face detector")
    names = [detector_name(d) for d in finders]
    for i, path in enumerate(photos):
        try:
            rgb = load_photo(path)
        except Exception as exc:  # a decoder failure on untrusted bytes is an outcome, never a crash
            results[i] = PhotoResult(source=path, status=UNREADABLE, detail=_unreadable(path, exc))
            continue
        if aligned:
            if rgb.shape[:2] != (size, size):
                detail = (
                    f"{rgb.shape[1]}x{rgb.shape[0]} pixels, not a {size}x{size} aligned face "
                    "(leave out --aligned to detect and align faces in photos)"
                )
                results[i] = PhotoResult(source=path, status=BAD_SIZE, detail=detail)
                continue
            box = (0.0, 0.0, float(size), float(size))
            faces.append(_Face(photo=i, crop=rgb, matrix=None, box=box, score=None, detector=""))
            continue
        found, found_by = first_detection(rgb, names, finders)
        if not found:
            results[i] = PhotoResult(source=path, status=NO_FACE, detail=f"no face found by {', '.join(names)}")
            continue
        for det in found:  # every face: a group photo's other faces are cloaked too
            faces.append(
                _Face(
                    photo=i,
                    crop=align_face(rgb, det.landmarks, size),
                    matrix=similarity_transform(det.landmarks, template(size)),  # the matrix align_face used
                    box=det.box,
                    score=det.score,
                    detector=found_by,
                )
            )

    quality: dict[str, list[float]] = {}
    failures: list[str] = []
    cloaked_u8 = np.zeros((0, size, size, 3), dtype=np.uint8)
    deltas = np.zeros((0, size, size, 3), dtype=np.float32)
    if faces:
        notify(f"loading {defense} with surrogate(s) {', '.join(chosen) or '(none)'} on {torch_device}")
        models = []
        for name in chosen:
            rec = RECOGNIZERS.create(name)
            try:
                rec = rec.to(torch_device)
            except ValueError:
                log.info("recognizer %s stays on the CPU", name)
            models.append(rec)
        cloak = DEFENSES.create(defense, surrogates=models, name=defense, **params)
        originals = from_uint8(np.stack([f.crop for f in faces]))
        if isinstance(cloak, Fawkes):  # a targeted cloak must not aim at the user's own other photos
            dropped = cloak.leave_out_lookalikes(originals)
            if dropped:
                notify(f"left {', '.join(dropped)} out of the target pool: the faces in these photos look like them")
        notify(f"cloaking {len(faces)} face(s) with {defense} (seed {seed})")
        cloaked = cloak.protect(originals, [USER] * len(faces), generator=torch.Generator().manual_seed(seed))
        quality = {k: v.tolist() for k, v in quality_report(originals, cloaked).items()}
        failures = cloak_failures(cloak, originals, cloaked)
        cloaked_u8 = to_uint8(cloaked)
        deltas = (cloaked.permute(0, 2, 3, 1).numpy() - originals.permute(0, 2, 3, 1).numpy()) * 255.0

    dst.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for i, path in enumerate(photos):
        if i in results:
            continue
        mine = [j for j, f in enumerate(faces) if f.photo == i]
        out = dst / _output_name(path, taken)
        if aligned:
            (j,) = mine
            image = cloaked_u8[j]
            change = int(np.abs(image.astype(np.int16) - faces[j].crop.astype(np.int16)).max())
        else:
            try:
                rgb = load_photo(path)
            except Exception as exc:  # changed or removed since it was read
                results[i] = PhotoResult(source=path, status=UNREADABLE, detail=_unreadable(path, exc))
                continue
            matrices = [faces[j].matrix for j in mine]
            image = paste_perturbation(rgb, [deltas[j] for j in mine], [m for m in matrices if m is not None])
            change = int(np.abs(image.astype(np.int16) - rgb.astype(np.int16)).max())
        reports = tuple(
            FaceReport(
                box=faces[j].box,
                score=faces[j].score,
                detector=faces[j].detector,
                linf=float(quality["linf"][j]),
                psnr=float(quality["psnr"][j]),
                ssim=float(quality["ssim"][j]),
                dssim=float(quality["dssim"][j]),
            )
            for j in mine
        )
        failed = _failure_detail([failures[j] for j in mine], change, defense)
        if failed:  # never written: a file named *_cloaked.png must be a cloak
            results[i] = PhotoResult(source=path, status=FAILED, faces=reports, detail=failed, max_change=change)
            continue
        save_uint8_png(image, out)
        results[i] = PhotoResult(source=path, status=CLOAKED, output=out, faces=reports, max_change=change)

    listed = [results[i] for i in range(len(photos))]
    kinds = ", ".join(sorted(_extensions()))
    listed += [
        PhotoResult(
            source=p, status=NOT_IMAGE, detail=f"not a photo: {p.suffix or 'no extension'} is not one of {kinds}"
        )
        for p in others
    ]
    report = ProtectReport(
        photos=tuple(sorted(listed, key=lambda r: r.source.name)),
        defense=defense,
        params=params,
        surrogates=chosen,
        seed=seed,
        device=str(torch_device),
        aligned=aligned,
        out_dir=dst,
        seconds=time.perf_counter() - start,
    )
    for r in report.skipped:
        log.warning("%s: skipped (%s): %s", safe_text(str(r.source)), r.status, safe_text(r.detail))
    log.info("protect %s: %d of %d photo(s) cloaked into %s", src, report.n_cloaked, len(photos), dst)
    return report


def _failure_detail(face_failures: Sequence[str], change: int, defense: str) -> str:
    """Why a photo's cloak protects nothing ("" when it protects): its faces' failures, or no changed pixel."""
    many = len(face_failures) > 1
    parts = [f"face {n + 1}: {why}" if many else why for n, why in enumerate(face_failures) if why]
    if not parts and change == 0:
        parts.append("unchanged: no pixel of the saved photo differs from the original")
    if not parts:
        return ""
    return f"{defense} made no cloak, nothing saved ({'; '.join(parts)}); try another seed, defense or parameters"


def _extensions() -> frozenset[str]:
    from cloakbench.datasets import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS
