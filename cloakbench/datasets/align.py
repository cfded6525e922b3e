"""Similarity alignment of a face to the 5-point ArcFace template (112x112).

The template is the one insightface uses for its recognition models (and the one the aligned celeb24
photos and SFace's training data follow): left-in-image eye, right-in-image eye, nose tip, left-in-image
mouth corner, right-in-image mouth corner. "Left/right in image" means smaller/larger x; for a frontal
face that is the person's right eye first.

:func:`similarity_transform` is the least-squares similarity (rotation, uniform scale, translation;
reflection excluded) of Umeyama (IEEE TPAMI 13(4), 1991), solved with an SVD.

:func:`align_face` warps with bilinear interpolation and a **constant black border** (0): that is what
insightface's ``norm_crop`` does, so a face near the photo's edge looks the way the ArcFace-family
recognizers saw such faces in training. Replicating the edge would smear skin or hair into streaks that
no recognizer was trained on and that a cloak's budget would then be measured against.
"""

from __future__ import annotations

import cv2
import numpy as np

ARCFACE_SIZE = 112

ARCFACE_TEMPLATE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


def _points(value: np.ndarray, what: str) -> np.ndarray:
    pts = np.asarray(value, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(f"{what}: expected an (N, 2) array of points with N >= 2, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{what}: contains NaN or infinite coordinates")
    return pts


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix ``M = [s R | t]`` minimising ``sum ||s R src_i + t - dst_i||^2`` (Umeyama).

    ``R`` is a proper rotation (det +1): a mirrored point set is fitted as well as a rotation can,
    never by flipping the face. Raises ``ValueError`` for mismatched shapes, non-finite values or
    coincident source points.
    """
    s = _points(src, "similarity_transform src")
    d = _points(dst, "similarity_transform dst")
    if s.shape != d.shape:
        raise ValueError(f"similarity_transform: src has shape {s.shape}, dst has shape {d.shape}")
    n = s.shape[0]
    mean_s = s.mean(axis=0)
    mean_d = d.mean(axis=0)
    cs = s - mean_s
    cd = d - mean_d
    var_s = float((cs**2).sum()) / n
    if var_s <= 1e-12:
        raise ValueError("similarity_transform: source points coincide; no transform is defined")
    cov = cd.T @ cs / n  # 2x2 cross-covariance of dst and src
    u, sigma, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0  # exclude reflection: flip the axis of the smallest singular value
    rotation = u @ np.diag(signs) @ vt
    scale = float((sigma * signs).sum()) / var_s
    translation = mean_d - scale * rotation @ mean_s
    return np.hstack([scale * rotation, translation[:, None]])


def template(size: int = ARCFACE_SIZE) -> np.ndarray:
    """The ArcFace template scaled to a ``size`` x ``size`` crop."""
    if size <= 0:
        raise ValueError(f"template size must be positive, got {size}")
    return ARCFACE_TEMPLATE_112 * (size / ARCFACE_SIZE)


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Warp ``image_rgb`` (uint8 [H, W, 3]) so that its 5 ``landmarks`` land on the ArcFace template.

    ``landmarks`` are (x, y) pixel coordinates in template order (see the module docstring). Returns a
    uint8 ``[size, size, 3]`` crop (bilinear, black outside the photo).
    """
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise ValueError(
            f"align_face: expected a uint8 numpy image, got {getattr(image_rgb, 'dtype', type(image_rgb))}"
        )
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or min(image_rgb.shape[:2]) == 0:
        raise ValueError(f"align_face: expected an RGB image of shape [H, W, 3], got {image_rgb.shape}")
    pts = _points(landmarks, "align_face landmarks")
    if pts.shape != (5, 2):
        raise ValueError(f"align_face: expected 5 landmarks of shape (5, 2), got {pts.shape}")
    matrix = similarity_transform(pts, template(size))
    warped = cv2.warpAffine(
        np.ascontiguousarray(image_rgb),
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.asarray(warped, dtype=np.uint8)
