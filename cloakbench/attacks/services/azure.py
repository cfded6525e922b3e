"""An Azure-Face-like person group service backed by any zoo recognizer.

Operations (wire names after Azure Face's): ``CreatePersonGroup``, ``DeletePersonGroup``,
``CreatePerson``, ``ListPersons``, ``AddFace``, ``Train``, ``GetTrainingStatus``, ``Identify``.

- ``add_face`` embeds the face at once and stores the embedding with the person (at most 248 faces per
  person, as Azure allows).
- ``train`` snapshots every stored face embedding of the group (all faces, not a per-person mean): that
  snapshot is what ``identify`` searches. It runs synchronously (Azure's runs in the background and is
  polled; here ``get_training_status`` is ``"succeeded"`` as soon as ``train`` returns).
- ``identify`` is then a nearest-neighbour search per person: for each query face, a person's score is
  the highest cosine similarity between the query and that person's trained faces, ``confidence =
  (cos + 1) / 2`` (:data:`~.base.SIMILARITY_MAPPING`); persons with ``confidence >=
  confidence_threshold`` are returned, highest first, at most ``max_candidates`` of them.
- ``identify`` on a group that was never trained, or that changed (person created, face added) since it
  was last trained, raises :class:`~.base.NotTrainedError`. Azure itself keeps answering from the last
  trained state after changes; refusing instead means a harness can never silently query a model that
  does not contain the (cloaked) photos it just added.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.attacks.services.base import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MAX_CANDIDATES,
    MAX_CANDIDATES,
    MAX_FACES_PER_PERSON,
    Candidate,
    ImageInput,
    InvalidParameterError,
    NotTrainedError,
    Person,
    RateLimit,
    ResourceAlreadyExistsError,
    ResourceNotFoundError,
    ServiceCore,
    check_float,
    check_id,
    check_identify_count,
    check_int,
    cosine_to_unit,
    image_to_uint8,
    split_images,
)


@dataclass
class _Person:
    name: str
    faces: dict[str, torch.Tensor] = field(default_factory=dict)  # persisted face id -> embedding


@dataclass(frozen=True)
class _Trained:
    matrix: torch.Tensor  # [N, D] every trained face
    owner: np.ndarray  # [N] index into person_ids
    person_ids: tuple[str, ...]


@dataclass
class _Group:
    name: str
    persons: dict[str, _Person] = field(default_factory=dict)
    trained: _Trained | None = None
    changed_since_training: bool = False


class PersonGroupService(ServiceCore):
    """In-process Azure-like person groups; implements :class:`~.base.PersonGroupAPI`.

    ``rate_limit`` throttles calls (see :class:`~.base.RateLimit`); ``clock`` and ``sleep`` drive it and
    are injectable for tests.
    """

    kind = "face"

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        rate_limit: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(recognizer, rate_limit=rate_limit, clock=clock, sleep=sleep)
        self._groups: dict[str, _Group] = {}

    def _get(self, person_group_id: str) -> _Group:
        try:
            return self._groups[person_group_id]
        except KeyError:
            raise ResourceNotFoundError(f"person group {person_group_id!r} does not exist") from None

    def create_person_group(self, person_group_id: str, name: str = "") -> None:
        check_id(person_group_id, what="person_group_id", kind="group")
        if not isinstance(name, str) or len(name) > 128:
            raise InvalidParameterError(f"name: expected a string of at most 128 characters, got {name!r}")
        with self._call("CreatePersonGroup"), self._lock:
            if person_group_id in self._groups:
                raise ResourceAlreadyExistsError(f"person group {person_group_id!r} already exists")
            self._groups[person_group_id] = _Group(name=name or person_group_id)

    def delete_person_group(self, person_group_id: str) -> None:
        check_id(person_group_id, what="person_group_id", kind="group")
        with self._call("DeletePersonGroup"), self._lock:
            self._get(person_group_id)
            del self._groups[person_group_id]

    def create_person(self, person_group_id: str, name: str) -> str:
        """Create a person named ``name`` (e.g. the identity); returns its person id."""
        check_id(person_group_id, what="person_group_id", kind="group")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise InvalidParameterError(f"name: expected a non-empty string of at most 128 characters, got {name!r}")
        with self._call("CreatePerson"), self._lock:
            group = self._get(person_group_id)
            person_id = self._new_id("person")
            group.persons[person_id] = _Person(name=name)
            group.changed_since_training = True
            return person_id

    def delete_person(self, person_group_id: str, person_id: str) -> None:
        """Delete a person and their faces (Azure: PersonGroup Person - Delete); the group needs training again."""
        check_id(person_group_id, what="person_group_id", kind="group")
        check_id(person_id, what="person_id", kind="plain")
        with self._call("DeletePerson"), self._lock:
            group = self._get(person_group_id)
            self._person(group, person_group_id, person_id)
            del group.persons[person_id]
            group.changed_since_training = True

    def list_persons(self, person_group_id: str) -> list[Person]:
        check_id(person_group_id, what="person_group_id", kind="group")
        with self._call("ListPersons"), self._lock:
            return [
                Person(person_id=pid, name=p.name, persisted_face_ids=tuple(p.faces))
                for pid, p in self._get(person_group_id).persons.items()
            ]

    def _person(self, group: _Group, person_group_id: str, person_id: str) -> _Person:
        try:
            return group.persons[person_id]
        except KeyError:
            raise ResourceNotFoundError(
                f"person {person_id!r} does not exist in person group {person_group_id!r}"
            ) from None

    def add_face(self, person_group_id: str, person_id: str, image: ImageInput) -> str:
        """Add one aligned face to a person; returns its persisted face id."""
        check_id(person_group_id, what="person_group_id", kind="group")
        check_id(person_id, what="person_id", kind="plain")
        pixels = image_to_uint8(image, what="image")
        with self._call("AddFace"):
            with self._lock:
                self._person(self._get(person_group_id), person_group_id, person_id)
            embedding = self._embed(pixels)
            with self._lock:
                group = self._get(person_group_id)
                person = self._person(group, person_group_id, person_id)
                if len(person.faces) >= MAX_FACES_PER_PERSON:
                    raise InvalidParameterError(
                        f"person {person_id!r} already has {MAX_FACES_PER_PERSON} faces, the most a person may have"
                    )
                face_id = self._new_id("persisted-face")
                person.faces[face_id] = embedding
                group.changed_since_training = True
                return face_id

    def train(self, person_group_id: str) -> None:
        """Snapshot the group's face embeddings for :meth:`identify` (synchronous)."""
        check_id(person_group_id, what="person_group_id", kind="group")
        with self._call("Train"), self._lock:
            group = self._get(person_group_id)
            person_ids = tuple(pid for pid, p in group.persons.items() if p.faces)
            rows = [(i, e) for i, pid in enumerate(person_ids) for e in group.persons[pid].faces.values()]
            dim = self._recognizer.embedding_dim
            matrix = torch.stack([e for _, e in rows]) if rows else torch.zeros((0, dim))
            owner = np.array([i for i, _ in rows], dtype=np.int64)
            group.trained = _Trained(matrix=matrix, owner=owner, person_ids=person_ids)
            group.changed_since_training = False

    def get_training_status(self, person_group_id: str) -> str:
        """``"notstarted"`` (never trained), ``"succeeded"``, or ``"outdated"`` (changed since; not an Azure status)."""
        check_id(person_group_id, what="person_group_id", kind="group")
        with self._call("GetTrainingStatus"), self._lock:
            group = self._get(person_group_id)
            if group.trained is None:
                return "notstarted"
            return "outdated" if group.changed_since_training else "succeeded"

    def identify(
        self,
        person_group_id: str,
        images: Sequence[ImageInput] | torch.Tensor,
        *,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> list[list[Candidate]]:
        """Candidates per query face (1..10 faces per call, as Azure), highest confidence first."""
        check_id(person_group_id, what="person_group_id", kind="group")
        max_candidates = check_int(max_candidates, what="max_candidates", lo=1, hi=MAX_CANDIDATES)
        threshold = check_float(confidence_threshold, what="confidence_threshold", lo=0.0, hi=1.0)
        singles = split_images(images, what="images")
        check_identify_count(len(singles))
        pixels = [image_to_uint8(img, what=f"images[{i}]") for i, img in enumerate(singles)]
        with self._call("Identify"):
            with self._lock:
                group = self._get(person_group_id)
                if group.trained is None:
                    raise NotTrainedError(f"person group {person_group_id!r} has not been trained; call train() first")
                if group.changed_since_training:
                    raise NotTrainedError(
                        f"person group {person_group_id!r} changed since it was last trained; call train() again"
                    )
                trained = group.trained
            results: list[list[Candidate]] = []
            for px in pixels:
                probe = self._embed(px)
                if not trained.person_ids:
                    results.append([])
                    continue
                best = np.full(len(trained.person_ids), -np.inf)
                np.maximum.at(best, trained.owner, (trained.matrix @ probe).numpy().astype(np.float64))
                confidence = cosine_to_unit(best)
                order = np.argsort(-confidence, kind="stable")
                results.append(
                    [
                        Candidate(person_id=trained.person_ids[int(i)], confidence=float(confidence[i]))
                        for i in order[:max_candidates]
                        if confidence[i] >= threshold
                    ]
                )
            return results
