"""Evaluation-protocol helpers over a service API (in-process or HTTP alike).

- Evasion (gallery search; LowKey's rank-1 / rank-50 protocol): :func:`search_ranks` searches each probe
  against a collection and reports the 1-based rank of the first returned *face* whose
  ``external_image_id`` is the probe's true identity. This is a face-level rank over what the service
  returns (as with a real Rekognition collection), so it is never better than the identity-level rank
  of :func:`cloakbench.bench.metrics.rank_of_true`; a true identity outside the returned matches (past
  ``max_faces`` or below the threshold) has rank ``None``, i.e. a miss at every k <= ``max_faces``.
- Poisoning (the tracker enrols cloaked photos, then queries clean ones): :func:`identify_top1` returns
  the top identity per probe from a collection (``external_image_id`` of the best match) or from a
  trained person group (the ``name`` of the best candidate), ``None`` when nothing passes the threshold.

Both issue one service call per probe (person groups: one ``ListPersons`` plus one ``Identify`` per ten
probes), so the service's query counts equal the queries the protocol made.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloakbench.attacks.services.base import (
    IDENTIFY_MAX_IMAGES,
    CollectionAPI,
    ImageInput,
    PersonGroupAPI,
)


def search_ranks(
    api: CollectionAPI,
    collection_id: str,
    probes: Sequence[tuple[ImageInput, str]],
    *,
    max_faces: int,
    face_match_threshold: float = 0.0,
) -> list[int | None]:
    """Rank (1-based) of the first match of each probe's true identity, ``None`` if not among the matches.

    ``face_match_threshold`` defaults to 0 (pure ranking: every face is a candidate, as the rank-k
    protocol wants); pass the service default (80) to measure what an operator with default settings sees.
    """
    ranks: list[int | None] = []
    for image, identity in probes:
        matches = api.search_faces_by_image(
            collection_id, image, max_faces=max_faces, face_match_threshold=face_match_threshold
        )
        ranks.append(next((i for i, m in enumerate(matches, 1) if m.external_image_id == identity), None))
    return ranks


def identify_top1(
    api: CollectionAPI | PersonGroupAPI,
    collection_id: str,
    probes: Sequence[ImageInput],
    *,
    threshold: float = 0.0,
) -> list[str | None]:
    """The top identity for each probe, ``None`` when no match passes ``threshold``.

    ``collection_id`` is a collection id for a :class:`CollectionAPI` or a person group id for a
    :class:`PersonGroupAPI` (which must be trained). ``threshold`` is in the API's own unit: similarity
    0..100 for collections, confidence 0..1 for person groups; the default 0 always names someone, like
    a nearest-neighbour classifier.
    """
    if isinstance(api, CollectionAPI):
        top: list[str | None] = []
        for image in probes:
            matches = api.search_faces_by_image(collection_id, image, max_faces=1, face_match_threshold=threshold)
            top.append(matches[0].external_image_id if matches else None)
        return top
    if isinstance(api, PersonGroupAPI):
        if not probes:
            return []
        names = {p.person_id: p.name for p in api.list_persons(collection_id)}
        top = []
        for start in range(0, len(probes), IDENTIFY_MAX_IMAGES):
            chunk = list(probes[start : start + IDENTIFY_MAX_IMAGES])
            for candidates in api.identify(collection_id, chunk, max_candidates=1, confidence_threshold=threshold):
                top.append(names[candidates[0].person_id] if candidates else None)
        return top
    raise TypeError(f"identify_top1 needs a CollectionAPI or a PersonGroupAPI, got {type(api).__name__}")
