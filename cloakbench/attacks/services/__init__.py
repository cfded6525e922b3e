"""Commercial-style face-recognition services: black boxes the harness talks to as to a remote service.

- :class:`FaceCollection`: Amazon Rekognition-like collections (``index_faces``, ``search_faces_by_image``
  with ``max_faces`` and ``face_match_threshold``, similarity 0..100).
- :class:`PersonGroupService`: Azure Face-like person groups (``create_person``, ``add_face``, ``train``,
  ``identify`` with ``max_candidates`` and ``confidence_threshold``, confidence 0..1).

Both are backed by any zoo :class:`~cloakbench.attacks.recognizers.Recognizer`, take images as 8-bit
pixels only (canonical tensors are rounded as a PNG would be), never return embeddings or tensors,
count successful calls per operation and can be rate-limited (:class:`RateLimit`). :func:`serve` puts
them behind a real HTTP server on 127.0.0.1 that answers only clients holding its per-server secret (a
:class:`ServiceEndpoint`: url, secret, region); :class:`CollectionClient` and :class:`PersonGroupClient`
implement the same :class:`CollectionAPI` / :class:`PersonGroupAPI` protocols over it, raising the same
exceptions, so code written against the protocols runs unchanged in-process or over HTTP.

The collection server speaks Amazon Rekognition's own JSON protocol, SigV4-signed (:mod:`.rekognition_wire`,
:mod:`.sigv4`), so AWS SDKs call it unchanged; :class:`AwsCollection` is the same protocol through boto3, to
the real Amazon Rekognition (the user's AWS credentials) or to that server.
"""

from __future__ import annotations

from cloakbench.attacks.services.aws import AwsCollection, AwsCredentials
from cloakbench.attacks.services.azure import PersonGroupService
from cloakbench.attacks.services.base import (
    SIMILARITY_MAPPING,
    Candidate,
    CollectionAPI,
    CollectionInfo,
    Face,
    FaceMatch,
    ImageInput,
    ImageTooLargeError,
    InvalidImageFormatError,
    InvalidParameterError,
    InvalidSignatureError,
    NoFaceError,
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
    "AwsCollection",
    "AwsCredentials",
    "Candidate",
    "CollectionAPI",
    "CollectionClient",
    "CollectionInfo",
    "Face",
    "FaceCollection",
    "FaceMatch",
    "ImageInput",
    "ImageTooLargeError",
    "InvalidImageFormatError",
    "InvalidParameterError",
    "InvalidSignatureError",
    "NoFaceError",
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
