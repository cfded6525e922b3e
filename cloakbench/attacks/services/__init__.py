"""Commercial-style face-recognition services: black boxes the harness talks to as to a remote service.

- :class:`FaceCollection`: Amazon Rekognition-like collections (``index_faces``, ``search_faces_by_image``
  with ``max_faces`` and ``face_match_threshold``, similarity 0..100).
- :class:`PersonGroupService`: Azure Face-like person groups (``create_person``, ``add_face``, ``train``,
  ``identify`` with ``max_candidates`` and ``confidence_threshold``, confidence 0..1).

Both are backed by any zoo :class:`~cloakbench.attacks.recognizers.Recognizer`, take images as 8-bit
pixels only (canonical tensors are rounded as a PNG would be), never return embeddings or tensors,
count successful calls per operation and can be rate-limited (:class:`RateLimit`). :func:`serve` puts
them behind a real HTTP server on 127.0.0.1 that answers only clients holding its per-server secret (a
:class:`ServiceEndpoint`: url and secret); :class:`CollectionClient` and :class:`PersonGroupClient`
implement the same :class:`CollectionAPI` / :class:`PersonGroupAPI` protocols over it, raising the same
exceptions, so code written against the protocols runs unchanged in-process or over HTTP. An adapter
for a real service (with the user's own keys) only has to implement the same protocol.
"""

from __future__ import annotations

from cloakbench.attacks.services.azure import PersonGroupService
from cloakbench.attacks.services.base import (
    SIMILARITY_MAPPING,
    Candidate,
    CollectionAPI,
    Face,
    FaceMatch,
    ImageInput,
    InvalidParameterError,
    NotTrainedError,
    Person,
    PersonGroupAPI,
    RateLimit,
    RequestRefusedError,
    ResourceAlreadyExistsError,
    ResourceNotFoundError,
    ServiceError,
    ThrottlingError,
    UnauthorizedError,
    UnknownOperationError,
    UnsupportedMediaTypeError,
)
from cloakbench.attacks.services.http import (
    CollectionClient,
    PersonGroupClient,
    ServiceEndpoint,
    ServiceServer,
    serve,
)
from cloakbench.attacks.services.protocol import identify_top1, search_ranks
from cloakbench.attacks.services.rekognition import FaceCollection

__all__ = [
    "SIMILARITY_MAPPING",
    "Candidate",
    "CollectionAPI",
    "CollectionClient",
    "Face",
    "FaceCollection",
    "FaceMatch",
    "ImageInput",
    "InvalidParameterError",
    "NotTrainedError",
    "Person",
    "PersonGroupAPI",
    "PersonGroupClient",
    "PersonGroupService",
    "RateLimit",
    "RequestRefusedError",
    "ResourceAlreadyExistsError",
    "ResourceNotFoundError",
    "ServiceEndpoint",
    "ServiceError",
    "ServiceServer",
    "ThrottlingError",
    "UnauthorizedError",
    "UnknownOperationError",
    "UnsupportedMediaTypeError",
    "identify_top1",
    "search_ranks",
    "serve",
]
