"""A Rekognition-like face collection service backed by any zoo recognizer.

Operations (wire names as Amazon Rekognition's): ``CreateCollection``, ``DeleteCollection``,
``ListCollections``, ``DescribeCollection``, ``IndexFaces``, ``SearchFacesByImage``, ``ListFaces``,
``DeleteFaces``. Face ids are lower-case UUIDs, as Rekognition's.

``search_faces_by_image`` embeds the probe with the backing model, scores every indexed face by
``similarity = 100 * (cos + 1) / 2`` of the unit embeddings (:data:`~.base.SIMILARITY_MAPPING`), keeps
those with ``similarity >= face_match_threshold`` and returns at most ``max_faces`` of them, highest first
(ties keep the order of indexing). Each image is one aligned face (no detection; see :mod:`.base`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.attacks.services.base import (
    DEFAULT_FACE_MATCH_THRESHOLD,
    DEFAULT_MAX_FACES,
    MAX_MAX_FACES,
    CollectionInfo,
    Face,
    FaceMatch,
    ImageInput,
    InvalidParameterError,
    RateLimit,
    ResourceAlreadyExistsError,
    ResourceNotFoundError,
    ServiceCore,
    check_float,
    check_id,
    check_int,
    cosine_to_unit,
    image_to_uint8,
)


@dataclass
class _IndexedFace:
    face: Face
    embedding: torch.Tensor


@dataclass
class _Collection:
    created: float  # seconds since the epoch (DescribeCollection's CreationTimestamp)
    faces: dict[str, _IndexedFace] = field(default_factory=dict)
    _matrix: torch.Tensor | None = None  # [N, D] stacked embeddings, rebuilt after changes

    def matrix(self) -> tuple[torch.Tensor | None, list[Face]]:
        records = list(self.faces.values())
        if not records:
            return None, []
        if self._matrix is None:
            self._matrix = torch.stack([r.embedding for r in records])
        return self._matrix, [r.face for r in records]

    def changed(self) -> None:
        self._matrix = None


class FaceCollection(ServiceCore):
    """In-process Rekognition-like collections; implements :class:`~.base.CollectionAPI`.

    ``rate_limit`` throttles calls (see :class:`~.base.RateLimit`); ``clock`` and ``sleep`` drive it and
    are injectable for tests.
    """

    kind = "rekognition"

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        rate_limit: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(recognizer, rate_limit=rate_limit, clock=clock, sleep=sleep)
        self._collections: dict[str, _Collection] = {}

    def _get(self, collection_id: str) -> _Collection:
        try:
            return self._collections[collection_id]
        except KeyError:
            raise ResourceNotFoundError(f"collection {collection_id!r} does not exist") from None

    def create_collection(self, collection_id: str) -> None:
        check_id(collection_id, what="collection_id", kind="collection")
        with self._call("CreateCollection"), self._lock:
            if collection_id in self._collections:
                raise ResourceAlreadyExistsError(f"collection {collection_id!r} already exists")
            self._collections[collection_id] = _Collection(created=time.time())

    def delete_collection(self, collection_id: str) -> None:
        check_id(collection_id, what="collection_id", kind="collection")
        with self._call("DeleteCollection"), self._lock:
            self._get(collection_id)
            del self._collections[collection_id]

    def list_collections(self) -> list[str]:
        with self._call("ListCollections"), self._lock:
            return sorted(self._collections)

    def describe_collection(self, collection_id: str) -> CollectionInfo:
        check_id(collection_id, what="collection_id", kind="collection")
        with self._call("DescribeCollection"), self._lock:
            collection = self._get(collection_id)
            return CollectionInfo(
                face_count=len(collection.faces),
                face_model_version=self.face_model_version,
                created=collection.created,
            )

    def index_faces(self, collection_id: str, image: ImageInput, external_image_id: str) -> str:
        """Index one aligned face under ``external_image_id`` (e.g. the identity); returns its new face id."""
        check_id(collection_id, what="collection_id", kind="collection")
        check_id(external_image_id, what="external_image_id", kind="external")
        pixels = image_to_uint8(image, what="image")
        with self._call("IndexFaces"):
            with self._lock:
                self._get(collection_id)
            embedding = self._embed(pixels)  # outside the lock: other calls proceed meanwhile
            face = Face(face_id=self._new_id("face"), external_image_id=external_image_id)
            with self._lock:
                collection = self._get(collection_id)  # it may have been deleted meanwhile
                collection.faces[face.face_id] = _IndexedFace(face, embedding)
                collection.changed()
            return face.face_id

    def search_faces_by_image(
        self,
        collection_id: str,
        image: ImageInput,
        *,
        max_faces: int = DEFAULT_MAX_FACES,
        face_match_threshold: float = DEFAULT_FACE_MATCH_THRESHOLD,
    ) -> list[FaceMatch]:
        """Faces of the collection most similar to the face in ``image``, highest similarity first."""
        check_id(collection_id, what="collection_id", kind="collection")
        max_faces = check_int(max_faces, what="max_faces", lo=1, hi=MAX_MAX_FACES)
        threshold = check_float(face_match_threshold, what="face_match_threshold", lo=0.0, hi=100.0)
        pixels = image_to_uint8(image, what="image")
        with self._call("SearchFacesByImage"):
            with self._lock:
                self._get(collection_id)
            probe = self._embed(pixels)
            with self._lock:
                matrix, faces = self._get(collection_id).matrix()
            if matrix is None:
                return []
            similarity = 100.0 * cosine_to_unit((matrix @ probe).numpy())
            order = np.argsort(-similarity, kind="stable")
            matches: list[FaceMatch] = []
            for i in order[:max_faces]:
                if similarity[i] < threshold:
                    break
                face = faces[int(i)]
                matches.append(FaceMatch(face.face_id, face.external_image_id, float(similarity[i])))
            return matches

    def list_faces(self, collection_id: str) -> list[Face]:
        check_id(collection_id, what="collection_id", kind="collection")
        with self._call("ListFaces"), self._lock:
            return [r.face for r in self._get(collection_id).faces.values()]

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> list[str]:
        """Delete faces by id; returns the ids that were deleted (unknown ids are skipped, as Rekognition does)."""
        check_id(collection_id, what="collection_id", kind="collection")
        if isinstance(face_ids, (str, bytes)) or not isinstance(face_ids, Sequence) or not face_ids:
            raise InvalidParameterError(f"face_ids: expected a non-empty list of face ids, got {face_ids!r}")
        if len(face_ids) > MAX_MAX_FACES:
            raise InvalidParameterError(f"face_ids: {len(face_ids)} ids; at most {MAX_MAX_FACES} per call")
        ids = [check_id(f, what=f"face_ids[{i}]", kind="uuid") for i, f in enumerate(face_ids)]
        with self._call("DeleteFaces"), self._lock:
            collection = self._get(collection_id)
            deleted = [f for f in dict.fromkeys(ids) if collection.faces.pop(f, None) is not None]
            collection.changed()
            return deleted
