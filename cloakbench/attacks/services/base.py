"""What the commercial-style services share: errors, result records, the API protocols, image intake,
rate limiting and query counting.

Images cross every service boundary the way they cross a real one: as 8-bit pixels. A caller passes
either one canonical image (float32 ``[1, 3, H, W]``, RGB, [0, 1]) or the bytes of a PNG file; both are
turned into a uint8 ``[H, W, 3]`` array first (tensors are rounded to the nearest level, as writing a
PNG does), and the service only ever embeds ``from_uint8(array)``. So a tensor passed in-process and the
same tensor sent over HTTP as a PNG give bit-identical embeddings and similarities, and no autograd
graph can reach the backing model: the service is a black box even when its model is a white box.

Unlike the real services, these ones do not detect faces: every image must already be one aligned face
crop (the harness aligns before it enrols or queries), so there is no ``MaxFaces`` per image, no
bounding box and no ``QualityFilter``.

Order of checks in every call: arguments are validated first (an invalid call never consumes a
rate-limit token and is never counted), then the rate limiter admits the call, then it runs; only calls
that succeed are counted, per operation (the real services bill neither throttled nor failed calls).
"""

from __future__ import annotations

import io
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, runtime_checkable

import numpy as np
import torch
from PIL import Image

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import require
from cloakbench.errors import CloakbenchError, ImageContractError
from cloakbench.images import check_images, decode_image, from_uint8, to_uint8

ImageInput: TypeAlias = torch.Tensor | bytes
"""One aligned face: a canonical float32 tensor ``[1, 3, H, W]`` in [0, 1], or the bytes of a PNG file."""

DEFAULT_MAX_FACES = 80
"""SearchFacesByImage ``MaxFaces`` when the caller gives none (Rekognition accepts 1..4096)."""
MAX_MAX_FACES = 4096
DEFAULT_FACE_MATCH_THRESHOLD = 80.0
"""Rekognition's default ``FaceMatchThreshold`` (similarity 0..100)."""
DEFAULT_MAX_CANDIDATES = 1
"""Azure Identify's default ``maxNumOfCandidatesReturned`` (1..100)."""
MAX_CANDIDATES = 100
DEFAULT_CONFIDENCE_THRESHOLD = 0.5
IDENTIFY_MAX_IMAGES = 10
"""Azure Identify takes 1..10 faces per call."""
MAX_FACES_PER_PERSON = 248
"""Azure's limit of persisted faces per person."""

MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""Rekognition's limit for image bytes passed in a request."""
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 4096

SIMILARITY_MAPPING = "similarity = 100 * (cos + 1) / 2; confidence = (cos + 1) / 2 (clipped to the range)"
"""How cosine similarity ``cos`` of the backing model's unit embeddings becomes a service score.

Linear and model-agnostic: rankings are those of the cosine, threshold 0 returns everything, and a
threshold ``t`` on the 0..100 scale keeps ``cos >= t / 50 - 1``. Real services calibrate their scores;
these do not, so Rekognition's default threshold 80 means ``cos >= 0.6``, which with SFace keeps only
about half of the genuine pairs (SFace's own verification threshold, cos 0.363, is similarity 68.2).
"""


# ----------------------------------------------------------------------------------------------- errors


class ServiceError(CloakbenchError):
    """An error a face-recognition service returns; ``code`` is its wire name (Amazon Rekognition's exception
    name, which the HTTP server sends as ``__type``), ``http_status`` its status on cloakbench's own routes."""

    code = "InternalServerError"
    http_status = 500


class InvalidParameterError(ServiceError, ValueError):
    """An argument is malformed (the message names it): wrong image type, size, NaN, bad id, bad range."""

    code = "InvalidParameterException"
    http_status = 400


class InvalidImageFormatError(InvalidParameterError):
    """The image bytes are not a readable PNG (the services take lossless PNG only)."""

    code = "InvalidImageFormatException"


class ImageTooLargeError(InvalidParameterError):
    """The image bytes exceed :data:`MAX_IMAGE_BYTES` (Rekognition's 5 MB)."""

    code = "ImageTooLargeException"


class InvalidPaginationTokenError(InvalidParameterError):
    """A ``NextToken`` this server did not hand out."""

    code = "InvalidPaginationTokenException"


class NoFaceError(InvalidParameterError):
    """A real service found no face in the image (the local services never raise it: every image is one
    aligned face crop)."""


class ResourceNotFoundError(ServiceError, LookupError):
    """The collection, person group, person or face does not exist."""

    code = "ResourceNotFoundException"
    http_status = 404


class ResourceAlreadyExistsError(ServiceError):
    """A collection or person group with that id already exists."""

    code = "ResourceAlreadyExistsException"
    http_status = 409


class NotTrainedError(ServiceError):
    """Identify on a person group that was never trained or changed since it was last trained."""

    code = "PersonGroupNotTrained"
    http_status = 409


class ThrottlingError(ServiceError):
    """The rate limit was exceeded; retry after ``retry_after_s`` seconds.

    On the Rekognition wire this is ``ProvisionedThroughputExceededException`` (HTTP 400), what Amazon
    Rekognition returns when a client exceeds its transactions per second; AWS SDKs retry it with back-off."""

    code = "ProvisionedThroughputExceededException"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownOperationError(ServiceError):
    """The HTTP server has no such path or operation."""

    code = "UnknownOperationException"
    http_status = 404


class RequestRefusedError(ServiceError):
    """The HTTP server refused the request before looking at it: it did not come from the run's own client."""

    code = "AccessDeniedException"
    http_status = 403


class UnauthorizedError(RequestRefusedError):
    """The request did not prove it holds the server's secret; as such, an unknown access key id."""

    code = "UnrecognizedClientException"
    http_status = 401


class MissingAuthenticationTokenError(UnauthorizedError):
    """No ``Authorization`` header at all."""

    code = "MissingAuthenticationTokenException"


class IncompleteSignatureError(UnauthorizedError):
    """An ``Authorization`` header that is not a well-formed AWS Signature Version 4."""

    code = "IncompleteSignatureException"


class InvalidSignatureError(UnauthorizedError):
    """A SigV4 signature that does not match, is stale, or is scoped to another region or service."""

    code = "InvalidSignatureException"


class UnsupportedMediaTypeError(RequestRefusedError):
    """The request body is not declared with the route's content type."""

    code = "UnsupportedMediaTypeException"
    http_status = 415


ERROR_TYPES: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        ServiceError,
        InvalidParameterError,
        InvalidImageFormatError,
        ImageTooLargeError,
        InvalidPaginationTokenError,
        ResourceNotFoundError,
        ResourceAlreadyExistsError,
        NotTrainedError,
        ThrottlingError,
        UnknownOperationError,
        RequestRefusedError,
        UnauthorizedError,
        MissingAuthenticationTokenError,
        IncompleteSignatureError,
        InvalidSignatureError,
        UnsupportedMediaTypeError,
    )
}
"""Wire code -> exception type, so a client raises what the in-process service would have raised."""
ERROR_TYPES["ThrottlingException"] = ThrottlingError  # Rekognition's other throttling name (HTTP 500 there)


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Face:
    """A face indexed in a collection (no embedding: services never expose one)."""

    face_id: str
    external_image_id: str


@dataclass(frozen=True)
class CollectionInfo:
    """What DescribeCollection tells about a collection: its face count, the model behind it
    (``face_model_version``: ``cloakbench/<recognizer>`` locally) and when it was created (seconds since the
    epoch; ``None`` when the service does not say)."""

    face_count: int
    face_model_version: str
    created: float | None = None


@dataclass(frozen=True)
class FaceMatch:
    """One SearchFacesByImage match; ``similarity`` in 0..100 (see :data:`SIMILARITY_MAPPING`)."""

    face_id: str
    external_image_id: str
    similarity: float


@dataclass(frozen=True)
class Person:
    """A person of a person group and the ids of its persisted faces."""

    person_id: str
    name: str
    persisted_face_ids: tuple[str, ...]


@dataclass(frozen=True)
class Candidate:
    """One Identify candidate; ``confidence`` in 0..1 (see :data:`SIMILARITY_MAPPING`)."""

    person_id: str
    confidence: float


# -------------------------------------------------------------------------------------------- protocols


@runtime_checkable
class CollectionAPI(Protocol):
    """A Rekognition-like face collection service; :class:`FaceCollection` and the HTTP client implement it."""

    def create_collection(self, collection_id: str) -> None: ...

    def delete_collection(self, collection_id: str) -> None: ...

    def list_collections(self) -> list[str]: ...

    def describe_collection(self, collection_id: str) -> CollectionInfo: ...

    def index_faces(self, collection_id: str, image: ImageInput, external_image_id: str) -> str: ...

    def search_faces_by_image(
        self,
        collection_id: str,
        image: ImageInput,
        *,
        max_faces: int = DEFAULT_MAX_FACES,
        face_match_threshold: float = DEFAULT_FACE_MATCH_THRESHOLD,
    ) -> list[FaceMatch]: ...

    def list_faces(self, collection_id: str) -> list[Face]: ...

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> list[str]: ...

    def query_counts(self) -> dict[str, int]: ...

    def reset_query_counts(self) -> None: ...

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class PersonGroupAPI(Protocol):
    """An Azure-Face-like person group service; :class:`PersonGroupService` and the HTTP client implement it."""

    def create_person_group(self, person_group_id: str, name: str = "") -> None: ...

    def delete_person_group(self, person_group_id: str) -> None: ...

    def create_person(self, person_group_id: str, name: str) -> str: ...

    def delete_person(self, person_group_id: str, person_id: str) -> None: ...

    def list_persons(self, person_group_id: str) -> list[Person]: ...

    def add_face(self, person_group_id: str, person_id: str, image: ImageInput) -> str: ...

    def train(self, person_group_id: str) -> None: ...

    def get_training_status(self, person_group_id: str) -> str: ...

    def identify(
        self,
        person_group_id: str,
        images: Sequence[ImageInput] | torch.Tensor,
        *,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> list[list[Candidate]]: ...

    def query_counts(self) -> dict[str, int]: ...

    def reset_query_counts(self) -> None: ...

    def describe(self) -> dict[str, object]: ...


# ----------------------------------------------------------------------------------------- image intake

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_side(height: int, width: int, what: str) -> None:
    if not (MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE):
        raise InvalidParameterError(
            f"{what}: image is {height}x{width} pixels; each side must lie in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]"
        )


def decode_png(data: bytes, *, what: str = "image") -> np.ndarray:
    """PNG bytes -> uint8 RGB ``[H, W, 3]``; anything else (JPEG, truncated, too large) is an error naming ``what``."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageTooLargeError(f"{what}: {len(data)} bytes exceeds the limit of {MAX_IMAGE_BYTES} bytes")
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidImageFormatError(f"{what}: not a PNG file (images cross service boundaries as lossless PNG)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            width, height = img.size
            _check_side(height, width, what)
        # the one image loader: 16-bit PNGs scaled by their true range (not clipped to white), EXIF honoured
        rgb = decode_image(data)
    except InvalidParameterError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageFormatError(f"{what}: unreadable PNG ({exc})") from None
    return np.array(rgb, dtype=np.uint8)  # a writable copy


def encode_png(array: np.ndarray) -> bytes:
    """uint8 RGB ``[H, W, 3]`` -> PNG bytes (lossless; fast compression level)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_to_uint8(image: object, *, what: str = "image") -> np.ndarray:
    """One service image (canonical ``[1, 3, H, W]`` tensor or PNG bytes) -> uint8 RGB ``[H, W, 3]``.

    Tensors are validated (dtype, shape, finite, range, size) and rounded to the nearest 8-bit level;
    ``requires_grad`` is ignored (detached), since nothing flows back from a service.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_png(bytes(image), what=what)
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[0] != 1:
            raise InvalidParameterError(
                f"{what}: expected one image as a float32 tensor [1, 3, H, W], got shape {list(image.shape)}"
            )
        try:
            check_images(image, what=what)
        except ImageContractError as exc:
            raise InvalidParameterError(str(exc)) from None
        _check_side(int(image.shape[2]), int(image.shape[3]), what)
        pixels: np.ndarray = to_uint8(image.detach())[0]
        return pixels
    raise InvalidParameterError(
        f"{what}: expected a float32 tensor [1, 3, H, W] or PNG bytes, got {type(image).__name__}"
    )


def split_images(images: object, *, what: str = "images") -> list[ImageInput]:
    """A batch tensor ``[B, 3, H, W]`` or a sequence of single images -> a list of single images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise InvalidParameterError(f"{what}: expected a tensor [B, 3, H, W], got shape {list(images.shape)}")
        return [images[i : i + 1] for i in range(images.shape[0])]
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        raise InvalidParameterError(
            f"{what}: expected a list of images or a tensor [B, 3, H, W], got {type(images).__name__}"
        )
    return list(images)


def check_identify_count(count: int) -> None:
    if not 1 <= count <= IDENTIFY_MAX_IMAGES:
        raise InvalidParameterError(f"images: expected 1 to {IDENTIFY_MAX_IMAGES} faces per call, got {count}")


# ------------------------------------------------------------------------------------ argument checking

_COLLECTION_ID = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")
_EXTERNAL_IMAGE_ID = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")
_PERSON_GROUP_ID = re.compile(r"[a-z0-9\-_]{1,64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_id(value: object, *, what: str, kind: Literal["collection", "external", "group", "uuid", "plain"]) -> str:
    """A string id matching the real API's pattern for ``kind`` (Rekognition ids, Azure group ids)."""
    if not isinstance(value, str):
        raise InvalidParameterError(f"{what}: expected a string, got {type(value).__name__}")
    pattern, rule = {
        "collection": (_COLLECTION_ID, "1-255 characters from [a-zA-Z0-9_.-]"),
        "external": (_EXTERNAL_IMAGE_ID, "1-255 characters from [a-zA-Z0-9_.:-]"),
        "group": (_PERSON_GROUP_ID, "1-64 characters from [a-z0-9_-]"),
        "uuid": (_UUID, "a lower-case UUID such as 0123abcd-0000-4000-8000-0123456789ab"),
        "plain": (None, "a non-empty string of at most 255 characters"),
    }[kind]
    ok = pattern.fullmatch(value) is not None if pattern is not None else 0 < len(value) <= 255
    if not ok:
        raise InvalidParameterError(f"{what}: {value!r} is not a valid id ({rule})")
    return value


def check_int(value: object, *, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(f"{what}: expected an integer, got {type(value).__name__} {value!r}")
    if not lo <= int(value) <= hi:
        raise InvalidParameterError(f"{what}: {value} is outside [{lo}, {hi}]")
    return int(value)


def check_float(value: object, *, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParameterError(f"{what}: expected a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not (math.isfinite(number) and lo <= number <= hi):
        raise InvalidParameterError(f"{what}: {value!r} is outside [{lo:g}, {hi:g}]")
    return number


def cosine_to_unit(cos: np.ndarray) -> np.ndarray:
    """Cosine similarities -> scores in [0, 1] (``(cos + 1) / 2``, clipped), in float64."""
    unit: np.ndarray = np.clip((cos.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return unit


# --------------------------------------------------------------------------------------- rate limiting


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket over a service's operations.

    ``per_s`` tokens are added per second up to ``burst``; each admitted call takes one. When the bucket
    is empty, ``on_exceed="raise"`` rejects the call with :class:`ThrottlingError` (HTTP 429 with
    ``Retry-After``, as the real services do) and ``"block"`` waits until a token is due (handy when a
    harness should simply run at the service's pace). ``operations`` names the limited operations (wire
    names, e.g. ``"SearchFacesByImage"``); empty means all. One bucket is shared by the limited operations.
    """

    per_s: float
    burst: int = 1
    on_exceed: Literal["raise", "block"] = "raise"
    operations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(math.isfinite(self.per_s) and self.per_s > 0, f"RateLimit.per_s must be positive, got {self.per_s}")
        require(self.burst >= 1, f"RateLimit.burst must be at least 1, got {self.burst}")
        require(
            self.on_exceed in ("raise", "block"),
            f"RateLimit.on_exceed must be 'raise' or 'block', got {self.on_exceed!r}",
        )


class TokenBucket:
    """Thread-safe token bucket with an injected clock and sleep (so tests need not wait)."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.limit = limit
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(limit.burst)
        self._last = clock()

    def _try_take(self) -> float:
        """Take a token and return 0, or return the seconds until one is due."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.limit.burst), self._tokens + (now - self._last) * self.limit.per_s)
            self._last = now
            if self._tokens >= 1.0 - 1e-9:
                self._tokens = max(self._tokens - 1.0, 0.0)
                return 0.0
            return (1.0 - self._tokens) / self.limit.per_s

    def acquire(self, operation: str) -> None:
        while (wait := self._try_take()) > 0.0:
            if self.limit.on_exceed == "raise":
                raise ThrottlingError(
                    f"{operation}: rate limit of {self.limit.per_s:g} calls/s (burst {self.limit.burst}) exceeded; "
                    f"retry after {wait:.3f} s",
                    retry_after_s=wait,
                )
            self._sleep(wait)


# ------------------------------------------------------------------------------------- the shared core


class ServiceCore:
    """Backing model, lock, query counts and rate limit of one service object (thread-safe)."""

    kind = "service"

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        rate_limit: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(recognizer, Recognizer):
            raise TypeError(f"{type(self).__name__} needs a Recognizer, got {type(recognizer).__name__}")
        self._recognizer = recognizer
        self._rate_limit = rate_limit
        self._bucket = TokenBucket(rate_limit, clock=clock, sleep=sleep) if rate_limit is not None else None
        self._lock = threading.RLock()
        self._counts: Counter[str] = Counter()
        self._next_id = 0
        # Every forward pass runs on this one worker thread, whichever thread (caller, HTTP handler) asked.
        # Concurrent HTTP handlers calling an OpenMP-parallel model each start their own thread team and
        # oversubscribe the cores; one worker keeps the model's own intra-op threads busy instead, and
        # makes in-process and HTTP calls run the very same code on the very same thread.
        self._model_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cloakbench-{self.kind}-model")

    @contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        """Admit ``operation`` through the rate limiter, run the body, and count it if it succeeds."""
        bucket = self._bucket
        if bucket is not None and (not bucket.limit.operations or operation in bucket.limit.operations):
            bucket.acquire(operation)
        yield
        with self._lock:
            self._counts[operation] += 1

    def _new_id(self, prefix: str) -> str:
        """A UUID-formatted id, deterministic in the order of creation (no ambient randomness)."""
        with self._lock:
            self._next_id += 1
            n = self._next_id
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"cloakbench/{self.kind}/{prefix}/{n}"))

    def _embed(self, array: np.ndarray) -> torch.Tensor:
        """The backing model's unit embedding ``[D]`` of one uint8 image (internal: never returned)."""
        return self._model_worker.submit(self._embed_now, array).result()

    def _embed_now(self, array: np.ndarray) -> torch.Tensor:
        emb = self._recognizer.embed(from_uint8(array))
        return emb[0].detach().to("cpu", torch.float32)

    @property
    def face_model_version(self) -> str:
        """The model behind the service, as the wire's ``FaceModelVersion`` names it: ``cloakbench/<recognizer>``."""
        return f"cloakbench/{self._recognizer.name}"

    def query_counts(self) -> dict[str, int]:
        """Successful calls per operation (wire names, e.g. ``{"SearchFacesByImage": 12}``) since the last reset."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def reset_query_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def describe(self) -> dict[str, object]:
        limit = self._rate_limit
        return {
            "service": self.kind,
            "recognizer": self._recognizer.name,
            "weights_id": self._recognizer.weights_id,
            "scores": SIMILARITY_MAPPING,
            "rate_limit": None
            if limit is None
            else {
                "per_s": limit.per_s,
                "burst": limit.burst,
                "on_exceed": limit.on_exceed,
                "operations": list(limit.operations),
            },
            "differentiable": False,
        }
