"""Re-alignment: the scraper detects the face again and re-aligns it before recognition.

A cloak is optimised pixel by pixel on one alignment of the face. A tracker that runs its own detector and
aligner on what it scrapes samples the photo on a slightly different grid (rotated, scaled and shifted by a few
pixels), and a perturbation tuned to the old grid may not survive the resampling. Two modes:

``jitter`` (default): a random similarity transform per image, as a model of "another aligner". Angle, scale and
shift are drawn uniformly within ``rotation`` (degrees), ``scale`` (relative) and ``shift`` (fraction of the
side, per axis) from the generator passed to :meth:`~InputTransform.apply` (one ``[B, 4]`` draw,
:func:`~cloakbench.attacks.transforms.twins.draw_similarities`; never the global RNG), about the image centre,
and applied with OpenCV's ``warpAffine`` (bilinear, black outside the photo, as
:func:`~cloakbench.datasets.align.align_face` and insightface's ``norm_crop`` fill it). Zero bounds are the
identity. Twin: :class:`~cloakbench.attacks.transforms.twins.RealignJitterTwin`, the same draws and warp with
``F.affine_grid`` / ``F.grid_sample`` (differentiable; it needs the generator).

``detect``: real re-detection. The project's detectors (:func:`~cloakbench.datasets.stage.default_detectors`:
YuNet, then dlib's HOG detector as the fallback) run on each image as it is given (the benchmark's photos are
already-aligned crops, so this is the tracker re-detecting in the crop it scraped), and the most confident face is
warped onto the 5-point ArcFace template scaled to the image's own size (for a non-square image, a square of the
shorter side centred in it), bilinear with a black border: the same warp as
:func:`~cloakbench.datasets.align.align_face`, which it equals on square images. The output keeps the input's
size because every transform does (:meth:`~InputTransform.apply`); each recognizer's adapter then resizes to its
own input, as it does for every photo. When no detector finds a face the image is kept as it is and counted:
:attr:`Realign.last_report` (the last call) and :attr:`Realign.totals` (every call of this object) hold the
counts, and every call that kept an image logs a warning with its count. The benchmark runner does not copy the
count into its rows (embeddings of a transformed set are cached and reused, so a count kept on the transform
object would be missing on a cached run); it is in the run's log, and ``scripts/countermeasure_check.py``
records it for the celeb24 crops (YuNet found a face in all 1,839 of them). Re-detection on the full-size photos,
where they are known, is the ``precomputed`` defense's ``alignment: redetect`` option, not this transform. The
detect mode has no twin (detection is a discrete search with no useful gradient): ``twin()`` is None, and a
robust cloak (``robust: {transforms: [...]}``) that should survive re-detection lists ``realign`` in jitter mode
as its stand-in, whose default bounds model the discrepancy re-detection produces (below).

Defaults, measured (2026-12-02, all 1,839 celeb24 crops, YuNet; the ``redetection`` section of
``benchmarks/results/countermeasures_grayscale_realign.json``): re-detecting a crop and fitting the similarity
that takes the crop's alignment to the re-detected one gives angles of standard deviation 2.3 degrees (95th
percentile of the absolute value 4.6, largest 10.2), scale factors of mean 1.056 and standard deviation 0.064
(YuNet's landmarks sit slightly inside the template, so re-detection zooms in by about 5 %), and shifts of the
centre of standard deviation 1.8 / 1.7 px (x / y; 95th percentiles 3.6 / 3.3 px, largest 20 px). The default
bounds give uniform draws of the same standard deviation (a bound is sqrt(3) standard deviations): rotation 4
degrees, scale 0.11, shift 0.03 of the side (3.4 px at 112).

Intensity: 100 at rotation 15 degrees, scale 0.3 or shift 0.1 of the side, past the largest discrepancy
re-detection produced on any crop: beyond it the tracker's aligner would be failing, not disagreeing. Jitter's
intensity is the largest of the three bounds over its anchor (linear, clipped to 100). ``detect`` has the
intensity of the default jitter bounds, which stand in for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import torch

from cloakbench.attacks.transforms.base import ConfiguredTransform
from cloakbench.attacks.transforms.twins import (
    RealignJitterTwin,
    check_jitter_bounds,
    draw_similarities,
    similarity_matrices,
)
from cloakbench.config import require
from cloakbench.images import from_uint8, to_uint8

if TYPE_CHECKING:
    from cloakbench.datasets.demo import FaceDetector

log = logging.getLogger(__name__)

DEFAULT_ROTATION = 4.0
DEFAULT_SCALE = 0.11
DEFAULT_SHIFT = 0.03
ROTATION_AT_100 = 15.0
SCALE_AT_100 = 0.3
SHIFT_AT_100 = 0.1

RealignMode = Literal["jitter", "detect"]
_MODES = ("jitter", "detect")


@dataclass(frozen=True, kw_only=True)
class RealignConfig:
    mode: RealignMode = "jitter"
    """``jitter``: a random similarity per image; ``detect``: re-detect the face and re-align it."""
    rotation: float = DEFAULT_ROTATION
    """Jitter: largest rotation in degrees (0..180); angles are uniform in [-rotation, rotation]."""
    scale: float = DEFAULT_SCALE
    """Jitter: largest relative change of scale (0 <= scale < 1); factors are uniform in [1 - scale, 1 + scale]."""
    shift: float = DEFAULT_SHIFT
    """Jitter: largest shift per axis as a fraction of the side (0 <= shift < 1), uniform in [-shift, shift]."""

    def __post_init__(self) -> None:
        require(self.mode in _MODES, f"mode must be one of {', '.join(map(repr, _MODES))}, got {self.mode!r}")
        check_jitter_bounds(rotation=self.rotation, scale=self.scale, shift=self.shift)
        if self.mode == "detect":
            defaults = {"rotation": DEFAULT_ROTATION, "scale": DEFAULT_SCALE, "shift": DEFAULT_SHIFT}
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            require(
                not changed,
                f"{changed[0] if changed else 'rotation'} applies to mode 'jitter' only; mode 'detect' takes no bounds "
                f"(got {', '.join(f'{k}={getattr(self, k)}' for k in changed)})",
            )


@dataclass(frozen=True, kw_only=True)
class RealignReport:
    """What re-detection did to a batch: images seen, images kept as they were (no face), faces per detector."""

    images: int = 0
    no_face: int = 0
    by_detector: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __add__(self, other: RealignReport) -> RealignReport:
        names = sorted({*self.by_detector, *other.by_detector})
        merged = {n: self.by_detector.get(n, 0) + other.by_detector.get(n, 0) for n in names}
        return RealignReport(
            images=self.images + other.images,
            no_face=self.no_face + other.no_face,
            by_detector=MappingProxyType(merged),
        )


def realign_to_template(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp a uint8 RGB ``[H, W, 3]`` image so its 5 landmarks land on the ArcFace template, at its own size.

    The template is scaled to a square of side ``min(H, W)`` centred in the frame; bilinear, black outside the
    photo (:func:`~cloakbench.datasets.align.align_face`'s warp, which this equals when ``H == W``).
    """
    from cloakbench.datasets.align import similarity_transform, template

    h, w = image.shape[:2]
    side = min(h, w)
    target = template(side) + np.array([(w - side) / 2.0, (h - side) / 2.0])
    matrix = similarity_transform(landmarks, target)
    warped = cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.asarray(warped, dtype=np.uint8)


class Realign(ConfiguredTransform[RealignConfig]):
    """Re-alignment by a seeded random similarity (``jitter``) or by re-detection (``detect``).

    The detectors of the detect mode are built on its first call and kept; like them, an object is not
    thread-safe (use one per thread).
    """

    config_type = RealignConfig
    default_name = "realign"

    def __init__(self, config: RealignConfig, *, name: str | None = None) -> None:
        super().__init__(config, name=name)
        self._detectors: tuple[Sequence[str], Sequence[FaceDetector]] | None = None
        self.last_report = RealignReport()
        """Counts of the last detect-mode call (all zero in jitter mode)."""
        self.totals = RealignReport()
        """Counts of every detect-mode call of this object."""

    @property
    def intensity(self) -> float:
        cfg = self.config
        if cfg.mode == "detect":
            rotation, scale, shift = DEFAULT_ROTATION, DEFAULT_SCALE, DEFAULT_SHIFT
        else:
            rotation, scale, shift = cfg.rotation, cfg.scale, cfg.shift
        return min(max(rotation / ROTATION_AT_100, scale / SCALE_AT_100, shift / SHIFT_AT_100), 1.0) * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        if self.config.mode == "detect":
            return self._redetect(images)
        return self._jitter(images, generator)

    def _jitter(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        if cfg.rotation == 0 and cfg.scale == 0 and cfg.shift == 0:
            return images.clone()
        arrays = to_uint8(images)
        h, w = arrays.shape[1:3]
        draws = draw_similarities(len(arrays), generator, rotation=cfg.rotation, scale=cfg.scale, shift=cfg.shift)
        matrices = similarity_matrices(draws, h, w).numpy()
        out = np.stack(
            [
                cv2.warpAffine(
                    np.ascontiguousarray(a),
                    m,
                    (w, h),
                    flags=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=(0, 0, 0),
                )
                for a, m in zip(arrays, matrices, strict=True)
            ]
        )
        return from_uint8(out).to(images.device)

    def detectors(self) -> tuple[Sequence[str], Sequence[FaceDetector]]:
        """(names, detectors) of the detect mode, in the order they are tried (built on first use)."""
        if self._detectors is None:
            from cloakbench.datasets.demo import detector_name
            from cloakbench.datasets.stage import default_detectors

            found = default_detectors()
            self._detectors = ([detector_name(d) for d in found], found)
        return self._detectors

    def _redetect(self, images: torch.Tensor) -> torch.Tensor:
        from cloakbench.datasets.demo import first_detection

        names, detectors = self.detectors()
        arrays = to_uint8(images)
        out, missed, used = [], 0, dict.fromkeys(names, 0)
        for a in arrays:
            image = np.ascontiguousarray(a)
            faces, which = first_detection(image, names, detectors)
            if not faces:
                missed += 1
                out.append(image)
                continue
            used[which] += 1
            out.append(realign_to_template(image, faces[0].landmarks))
        report = RealignReport(images=len(arrays), no_face=missed, by_detector=MappingProxyType(used))
        self.last_report = report
        self.totals = self.totals + report
        if missed:
            log.warning("%s: no face found in %d of %d image(s); kept as they were", self.name, missed, len(arrays))
        return from_uint8(np.stack(out)).to(images.device)

    def twin(self) -> RealignJitterTwin | None:
        """Jitter mode: the same random warp in torch (optimisation loops only). Detect mode: None (no exact twin;
        a robust cloak uses ``realign`` in jitter mode as its stand-in)."""
        if self.config.mode == "detect":
            return None
        return RealignJitterTwin(rotation=self.config.rotation, scale=self.config.scale, shift=self.config.shift)
