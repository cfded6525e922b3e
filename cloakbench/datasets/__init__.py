"""Face datasets: folder layout and manifests, per-identity splits, detection, alignment, the demo set.

- :func:`scan_folder` turns any ``root/<identity>/<image>`` folder into a cached :class:`Manifest`
  (bad files become :class:`Problem` entries, never a crash); :func:`load_images` loads records as a
  canonical float32 ``[B, 3, H, W]`` batch; :func:`read_identity_names` and :func:`rename_identities`
  give identity folders display names (a suite's ``dataset.names``).
- :func:`split_per_identity` makes the 70/30 train/query split of each identity (DESIGN §4).
- :class:`YuNetDetector` and :func:`align_face` turn photos into 112x112 ArcFace-aligned faces;
  :func:`align_folder` does it for a whole folder and :func:`demo_dataset` builds the celeb5 demo set.

This subpackage depends on nothing else in cloakbench but the shared helpers (images, cache, fetch,
errors).
"""

from __future__ import annotations

from cloakbench.datasets.align import ARCFACE_TEMPLATE_112, align_face, similarity_transform
from cloakbench.datasets.demo import (
    CELEB5_PINNED,
    AlignmentReport,
    FaceDetector,
    PhotoOutcome,
    align_folder,
    demo_dataset,
)
from cloakbench.datasets.detect import YUNET_PINNED, Detection, YuNetDetector
from cloakbench.datasets.dlib_detect import DLIB_SHAPE5_PINNED, DlibDetector
from cloakbench.datasets.folder import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    Manifest,
    Problem,
    identity_folders,
    load_images,
    read_identity_names,
    rename_identities,
    scan_folder,
)
from cloakbench.datasets.splits import Split, split_per_identity
from cloakbench.datasets.stage import align_dataset

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "CELEB5_PINNED",
    "DLIB_SHAPE5_PINNED",
    "IMAGE_EXTENSIONS",
    "YUNET_PINNED",
    "AlignmentReport",
    "Detection",
    "DlibDetector",
    "FaceDetector",
    "ImageRecord",
    "Manifest",
    "PhotoOutcome",
    "Problem",
    "Split",
    "YuNetDetector",
    "align_dataset",
    "align_face",
    "align_folder",
    "demo_dataset",
    "identity_folders",
    "load_images",
    "read_identity_names",
    "rename_identities",
    "scan_folder",
    "similarity_transform",
    "split_per_identity",
]
