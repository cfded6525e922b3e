"""The real Amazon Rekognition (or anything that speaks its protocol) as a :class:`~.base.CollectionAPI`, through
boto3.

boto3 is not a dependency of cloakbench: it is imported when an :class:`AwsCollection` is made, and a missing
boto3 is one clear error. Credentials come from the usual AWS chain (environment, shared files, SSO, instance
roles; ``AWS_ENDPOINT_URL_REKOGNITION`` is honoured by boto3 itself) unless ``credentials`` are given, as the
tests and ``endpoint: local`` do to point boto3 at cloakbench's own wire-compatible server.

- Every successful call is counted per operation (:meth:`query_counts`), as the local services count theirs, so
  a run records what it was billed for; retries boto3 made on its own are counted under ``Retries``.
- Collections are created only through :meth:`create_collection` and remembered; :meth:`close` deletes every
  one still there, and :func:`aws_collection` calls it whatever happens in its block. Collections it did not
  create are never touched.
- Calls go at most ``rate_limit_per_s`` per second when one is given (client-side pacing, a token bucket);
  boto3 retries throttled calls (``ProvisionedThroughputExceededException``) with back-off.
- Images cross as lossless PNG, as with every service here. Amazon Rekognition detects faces itself; each
  image is indexed with ``MaxFaces=1`` and ``QualityFilter=NONE`` (the largest face, whatever its quality). An
  image where it finds no face raises :class:`~.base.NoFaceError` (a ``ValueError``): the tracker then counts
  the photo as not enrolled, or the probe as not identified.
- Errors the service returns are raised as the local services raise them (``ResourceNotFoundError``,
  ``InvalidParameterError``, ...), with the service's message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloakbench.attacks.services.base import (
    DEFAULT_FACE_MATCH_THRESHOLD,
    DEFAULT_MAX_FACES,
    ERROR_TYPES,
    MAX_MAX_FACES,
    CollectionInfo,
    Face,
    FaceMatch,
    ImageInput,
    InvalidParameterError,
    NoFaceError,
    RateLimit,
    ServiceError,
    ThrottlingError,
    TokenBucket,
    check_float,
    check_id,
    check_int,
    encode_png,
    image_to_uint8,
)

log = logging.getLogger(__name__)

_NO_FACE = "no faces in the image"  # Rekognition's message: "There are no faces in the image. Should be at least 1."


@dataclass(frozen=True)
class AwsCredentials:
    """Explicit credentials (the secret is kept out of ``repr``); ``None`` everywhere means the AWS chain."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ServiceError(
            "transport 'aws' needs boto3, the AWS SDK for Python, which cloakbench does not install by itself: "
            "pip install boto3"
        ) from None
    return boto3


class AwsCollection:
    """:class:`~.base.CollectionAPI` over boto3's Rekognition client (see the module docstring).

    ``region`` None: the region of the AWS configuration chain. ``endpoint_url`` None: the real service.
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: AwsCredentials | None = None,
        rate_limit: RateLimit | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        boto3 = _boto3()
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            user_agent_extra="cloakbench",
        )
        keys: dict[str, Any] = {}
        if credentials is not None:
            keys = {
                "aws_access_key_id": credentials.access_key_id,
                "aws_secret_access_key": credentials.secret_access_key,
                "aws_session_token": None,
            }
        try:
            self._client = boto3.client(
                "rekognition", region_name=region, endpoint_url=endpoint_url, config=config, **keys
            )
        except Exception as exc:  # botocore's NoRegionError and kin: say what to set
            raise ServiceError(
                f"cannot make an Amazon Rekognition client ({type(exc).__name__}: {exc}); give the service a "
                "'region' or configure one (AWS_DEFAULT_REGION, ~/.aws/config)"
            ) from None
        self.region = str(self._client.meta.region_name)
        self.endpoint_url = str(self._client.meta.endpoint_url)
        self._bucket = (
            TokenBucket(rate_limit, clock=time.monotonic, sleep=time.sleep) if rate_limit is not None else None
        )
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._created: list[str] = []

    # ------------------------------------------------------------------------------------------ plumbing

    def _call(self, operation: str, method: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._bucket is not None:
            self._bucket.acquire(operation)
        try:
            reply: dict[str, Any] = getattr(self._client, method)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), str(error.get("Message", "")) or str(exc)
            cls = ERROR_TYPES.get(code, ServiceError)
            if cls is InvalidParameterError and _NO_FACE in message.lower():
                cls = NoFaceError
            if cls is ThrottlingError:
                raise ThrottlingError(f"{operation}: {message}") from None
            raise cls(f"{operation}: {message}" if cls is ServiceError else message) from None
        except BotoCoreError as exc:  # no credentials, no connection, ...
            raise ServiceError(f"{operation}: {type(exc).__name__}: {exc}") from None
        retries = int(reply.get("ResponseMetadata", {}).get("RetryAttempts", 0))
        with self._lock:
            self._counts[operation] += 1
            if retries:
                self._counts["Retries"] += retries
        return reply

    def query_counts(self) -> dict[str, int]:
        """Successful calls per operation since the last reset (``Retries``: extra attempts boto3 made)."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def reset_query_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def describe(self) -> dict[str, object]:
        return {"service": "rekognition", "region": self.region, "endpoint": self.endpoint_url, "sdk": "boto3"}

    @property
    def created_collections(self) -> list[str]:
        """Collections this object created and has not deleted yet."""
        with self._lock:
            return list(self._created)

    def close(self) -> list[str]:
        """Delete every collection this object created and that is still there; returns those it could not
        delete (each also logged as an error, with the command to delete it by hand)."""
        left: list[str] = []
        for collection_id in self.created_collections:
            try:
                self.delete_collection(collection_id)
            except ServiceError as exc:
                if exc.code == "ResourceNotFoundException":
                    self._forget(collection_id)
                    continue
                log.error(
                    "could not delete Amazon Rekognition collection %s in %s (%s); delete it with: aws rekognition "
                    "delete-collection --region %s --collection-id %s",
                    collection_id, self.region, exc, self.region, collection_id,
                )  # fmt: skip
                left.append(collection_id)
        return left

    def _forget(self, collection_id: str) -> None:
        with self._lock:
            if collection_id in self._created:
                self._created.remove(collection_id)

    # ---------------------------------------------------------------------------------------- operations

    def create_collection(self, collection_id: str) -> None:
        check_id(collection_id, what="collection_id", kind="collection")
        self._call("CreateCollection", "create_collection", CollectionId=collection_id)
        with self._lock:
            self._created.append(collection_id)

    def delete_collection(self, collection_id: str) -> None:
        check_id(collection_id, what="collection_id", kind="collection")
        self._call("DeleteCollection", "delete_collection", CollectionId=collection_id)
        self._forget(collection_id)

    def list_collections(self) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            reply = self._call("ListCollections", "list_collections", **({"NextToken": token} if token else {}))
            ids += [str(c) for c in reply.get("CollectionIds", [])]
            token = reply.get("NextToken")
            if not token:
                return ids

    def describe_collection(self, collection_id: str) -> CollectionInfo:
        check_id(collection_id, what="collection_id", kind="collection")
        reply = self._call("DescribeCollection", "describe_collection", CollectionId=collection_id)
        created = reply.get("CreationTimestamp")
        return CollectionInfo(
            face_count=int(reply.get("FaceCount", 0)),
            face_model_version=str(reply.get("FaceModelVersion", "")),
            created=None if created is None else float(created.timestamp()),
        )

    def index_faces(self, collection_id: str, image: ImageInput, external_image_id: str) -> str:
        check_id(collection_id, what="collection_id", kind="collection")
        check_id(external_image_id, what="external_image_id", kind="external")
        png = encode_png(image_to_uint8(image, what="image"))
        reply = self._call(
            "IndexFaces", "index_faces", CollectionId=collection_id, Image={"Bytes": png},
            ExternalImageId=external_image_id, MaxFaces=1, QualityFilter="NONE", DetectionAttributes=["DEFAULT"],
        )  # fmt: skip
        records = reply.get("FaceRecords", [])
        if not records:
            reasons = [r for u in reply.get("UnindexedFaces", []) for r in u.get("Reasons", [])]
            raise NoFaceError(f"image: no face indexed ({', '.join(reasons) or 'no face detected'})")
        return str(records[0]["Face"]["FaceId"])

    def search_faces_by_image(
        self,
        collection_id: str,
        image: ImageInput,
        *,
        max_faces: int = DEFAULT_MAX_FACES,
        face_match_threshold: float = DEFAULT_FACE_MATCH_THRESHOLD,
    ) -> list[FaceMatch]:
        check_id(collection_id, what="collection_id", kind="collection")
        max_faces = check_int(max_faces, what="max_faces", lo=1, hi=MAX_MAX_FACES)
        threshold = check_float(face_match_threshold, what="face_match_threshold", lo=0.0, hi=100.0)
        png = encode_png(image_to_uint8(image, what="image"))
        reply = self._call(
            "SearchFacesByImage", "search_faces_by_image", CollectionId=collection_id, Image={"Bytes": png},
            MaxFaces=max_faces, FaceMatchThreshold=threshold, QualityFilter="NONE",
        )  # fmt: skip
        return [
            FaceMatch(str(m["Face"]["FaceId"]), str(m["Face"].get("ExternalImageId", "")), float(m["Similarity"]))
            for m in reply.get("FaceMatches", [])
        ]

    def list_faces(self, collection_id: str) -> list[Face]:
        check_id(collection_id, what="collection_id", kind="collection")
        faces: list[Face] = []
        token: str | None = None
        while True:
            extra = {"NextToken": token} if token else {}
            reply = self._call("ListFaces", "list_faces", CollectionId=collection_id, **extra)
            faces += [Face(str(f["FaceId"]), str(f.get("ExternalImageId", ""))) for f in reply.get("Faces", [])]
            token = reply.get("NextToken")
            if not token:
                return faces

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> list[str]:
        check_id(collection_id, what="collection_id", kind="collection")
        if isinstance(face_ids, (str, bytes)) or not isinstance(face_ids, Sequence) or not face_ids:
            raise InvalidParameterError(f"face_ids: expected a non-empty list of face ids, got {face_ids!r}")
        ids = [check_id(f, what=f"face_ids[{i}]", kind="uuid") for i, f in enumerate(face_ids)]
        deleted: list[str] = []
        for start in range(0, len(ids), MAX_MAX_FACES):  # at most 4096 ids per call
            reply = self._call(
                "DeleteFaces", "delete_faces", CollectionId=collection_id, FaceIds=ids[start : start + MAX_MAX_FACES]
            )
            deleted += [str(f) for f in reply.get("DeletedFaces", [])]
        return deleted


@contextlib.contextmanager
def aws_collection(**kwargs: Any) -> Iterator[AwsCollection]:
    """An :class:`AwsCollection` whose collections are deleted when the block ends, whatever ends it."""
    api = AwsCollection(**kwargs)
    try:
        yield api
    finally:
        api.close()
