"""The services over HTTP on loopback: a stdlib server, and clients with the in-process interface.

Wire format (JSON over ``POST``, field names after the real APIs):

- ``POST /rekognition/<Action>`` for :class:`~.rekognition.FaceCollection`, Action one of
  ``CreateCollection {CollectionId}``, ``DeleteCollection {CollectionId}``, ``ListCollections {}``,
  ``IndexFaces {CollectionId, Image: {Bytes}, ExternalImageId}``,
  ``SearchFacesByImage {CollectionId, Image: {Bytes}, MaxFaces, FaceMatchThreshold}``,
  ``ListFaces {CollectionId}``, ``DeleteFaces {CollectionId, FaceIds}``.
- ``POST /face/<Action>`` for :class:`~.azure.PersonGroupService`, Action one of
  ``CreatePersonGroup {personGroupId, name}``, ``DeletePersonGroup {personGroupId}``,
  ``CreatePerson {personGroupId, name}``, ``DeletePerson {personGroupId, personId}``, ``ListPersons {personGroupId}``,
  ``AddFace {personGroupId, personId, image}``, ``Train {personGroupId}``,
  ``GetTrainingStatus {personGroupId}``,
  ``Identify {personGroupId, images, maxNumOfCandidatesReturned, confidenceThreshold}``.
- On both: ``QueryCounts``, ``ResetQueryCounts`` and ``Describe`` (administrative: never counted nor
  rate-limited); ``GET /usage`` returns every served service's query counts, ``GET /health`` ``ok``.

Images travel as base64 PNG (``Image.Bytes`` / ``image`` / ``images[i]``). Errors are JSON
``{"__type": code, "message": text}`` with status 400 (invalid parameter), 404 (unknown resource or
path), 409 (already exists, not trained), 429 (throttled, with ``Retry-After``) or 500; the clients raise
the very exception type the in-process service raises, with the same message. Query counts live on the
server (the service object), so every client of one server sees the same numbers.

The server binds 127.0.0.1 only: these are local stand-ins, not something to expose to a network. Binding
to loopback keeps other machines out, not other local processes, nor a web page in a local browser that
finds the port. So a server answers only the client that holds its **secret**, a random token made for each
server (``secrets.token_urlsafe``; randomness from the OS, never a seed: it is a credential, not a result).
Before it reads a request body, the server refuses, and counts (:attr:`ServiceServer.refusals`):

- a ``Host`` header other than the ``127.0.0.1:<port>`` it is bound to (403 ``AccessDeniedException``): a
  web page that re-resolved its own domain to 127.0.0.1 (DNS rebinding) sends its own domain;
- a missing or wrong ``Authorization: Bearer <secret>`` (401 ``UnrecognizedClientException``; compared in
  constant time, never echoed); only ``GET /health`` needs no secret;
- a POST whose ``Content-Type`` is not ``application/json`` (415 ``UnsupportedMediaTypeException``): what a
  web page may send cross-origin without asking first (``text/plain``, forms).

The benchmark starts the server and builds its client in the same process, so the secret never leaves the
process (no file, environment variable or command line holds it). Code that serves a service itself gets
both from :func:`serve` (a :class:`ServiceEndpoint`) or from :attr:`ServiceServer.endpoint`; a client in
another process needs the secret handed to it by whoever started the server.

Malformed requests get a 400 with a JSON error, never a 500: a ``Content-Length`` that is not 1..12 ASCII
digits (``int()`` would take ``'١٢'``; http.server reads header bytes as Latin-1, so ``b"\\xb2"`` arrives as
``'²'``, which ``str.isdigit`` accepts), a body shorter than its ``Content-Length``, JSON nested too deeply,
an integer of more digits than Python converts. A client that hangs up is logged at debug level.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.client
import json
import logging
import re
import secrets
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.services.azure import PersonGroupService
from cloakbench.attacks.services.base import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_FACE_MATCH_THRESHOLD,
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_MAX_FACES,
    ERROR_TYPES,
    IDENTIFY_MAX_IMAGES,
    MAX_IMAGE_BYTES,
    Candidate,
    Face,
    FaceMatch,
    ImageInput,
    InvalidParameterError,
    Person,
    RequestRefusedError,
    ServiceCore,
    ServiceError,
    ThrottlingError,
    UnauthorizedError,
    UnknownOperationError,
    UnsupportedMediaTypeError,
    check_identify_count,
    encode_png,
    image_to_uint8,
    split_images,
)
from cloakbench.attacks.services.rekognition import FaceCollection

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = IDENTIFY_MAX_IMAGES * (MAX_IMAGE_BYTES * 4 // 3 + 16) + 64 * 1024
"""Ten base64 images at the size limit plus room for the other fields."""
MAX_LENGTH_DIGITS = 12
"""The most digits a ``Content-Length`` may have (anything longer is over :data:`MAX_BODY_BYTES` anyway)."""
MAX_INT_DIGITS = 4300
"""The most digits an integer in a request body may have (Python's own limit for ``int(str)``)."""
SECRET_BYTES = 32
"""Entropy of a server's secret (``secrets.token_urlsafe(32)``: 43 characters)."""
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: what may follow "Bearer "

log = logging.getLogger(__name__)

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------- wire helpers


def _parse_int(text: str) -> int:
    """``json.loads``'s integer parser, with the digit limit as a clear 400 instead of int()'s ValueError."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise InvalidParameterError(f"request body has an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _field(body: Json, name: str) -> Any:
    if name not in body:
        raise InvalidParameterError(f"missing required field {name!r}")
    return body[name]


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidParameterError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(f"{what}: not valid base64") from None


def _rekognition_image(body: Json) -> bytes:
    image = _field(body, "Image")
    if not isinstance(image, dict) or "Bytes" not in image:
        raise InvalidParameterError('Image: expected an object {"Bytes": <base64 PNG>}')
    return _b64(image["Bytes"], "Image.Bytes")


def _face_json(face: Face) -> Json:
    return {"FaceId": face.face_id, "ExternalImageId": face.external_image_id}


def _search(s: FaceCollection, b: Json) -> Json:
    matches = s.search_faces_by_image(
        _field(b, "CollectionId"),
        _rekognition_image(b),
        max_faces=b.get("MaxFaces", DEFAULT_MAX_FACES),
        face_match_threshold=b.get("FaceMatchThreshold", DEFAULT_FACE_MATCH_THRESHOLD),
    )
    return {
        "FaceMatches": [
            {"Similarity": m.similarity, "Face": {"FaceId": m.face_id, "ExternalImageId": m.external_image_id}}
            for m in matches
        ]
    }


def _index(s: FaceCollection, b: Json) -> Json:
    face_id = s.index_faces(_field(b, "CollectionId"), _rekognition_image(b), _field(b, "ExternalImageId"))
    return {"FaceRecords": [{"Face": {"FaceId": face_id, "ExternalImageId": b["ExternalImageId"]}}]}


def _create_collection(s: FaceCollection, b: Json) -> Json:
    s.create_collection(_field(b, "CollectionId"))
    return {"StatusCode": 200}


def _delete_collection(s: FaceCollection, b: Json) -> Json:
    s.delete_collection(_field(b, "CollectionId"))
    return {"StatusCode": 200}


REKOGNITION_ACTIONS: dict[str, Callable[[FaceCollection, Json], Json]] = {
    "CreateCollection": _create_collection,
    "DeleteCollection": _delete_collection,
    "ListCollections": lambda s, b: {"CollectionIds": s.list_collections()},
    "IndexFaces": _index,
    "SearchFacesByImage": _search,
    "ListFaces": lambda s, b: {"Faces": [_face_json(f) for f in s.list_faces(_field(b, "CollectionId"))]},
    "DeleteFaces": lambda s, b: {"DeletedFaces": s.delete_faces(_field(b, "CollectionId"), _field(b, "FaceIds"))},
}


def _identify(s: PersonGroupService, b: Json) -> Json:
    images = _field(b, "images")
    if not isinstance(images, list):
        raise InvalidParameterError(f"images: expected a list of base64 PNG strings, got {type(images).__name__}")
    results = s.identify(
        _field(b, "personGroupId"),
        [_b64(img, f"images[{i}]") for i, img in enumerate(images)],
        max_candidates=b.get("maxNumOfCandidatesReturned", DEFAULT_MAX_CANDIDATES),
        confidence_threshold=b.get("confidenceThreshold", DEFAULT_CONFIDENCE_THRESHOLD),
    )
    return {
        "results": [
            {"candidates": [{"personId": c.person_id, "confidence": c.confidence} for c in cands]} for cands in results
        ]
    }


def _create_group(s: PersonGroupService, b: Json) -> Json:
    s.create_person_group(_field(b, "personGroupId"), b.get("name", ""))
    return {}


def _delete_group(s: PersonGroupService, b: Json) -> Json:
    s.delete_person_group(_field(b, "personGroupId"))
    return {}


def _delete_person(s: PersonGroupService, b: Json) -> Json:
    s.delete_person(_field(b, "personGroupId"), _field(b, "personId"))
    return {}


def _add_face(s: PersonGroupService, b: Json) -> Json:
    image = _b64(_field(b, "image"), "image")
    return {"persistedFaceId": s.add_face(_field(b, "personGroupId"), _field(b, "personId"), image)}


def _train(s: PersonGroupService, b: Json) -> Json:
    s.train(_field(b, "personGroupId"))
    return {}


def _list_persons(s: PersonGroupService, b: Json) -> Json:
    persons = s.list_persons(_field(b, "personGroupId"))
    return {
        "persons": [
            {"personId": p.person_id, "name": p.name, "persistedFaceIds": list(p.persisted_face_ids)} for p in persons
        ]
    }


FACE_ACTIONS: dict[str, Callable[[PersonGroupService, Json], Json]] = {
    "CreatePersonGroup": _create_group,
    "DeletePersonGroup": _delete_group,
    "CreatePerson": lambda s, b: {"personId": s.create_person(_field(b, "personGroupId"), _field(b, "name"))},
    "DeletePerson": _delete_person,
    "ListPersons": _list_persons,
    "AddFace": _add_face,
    "Train": _train,
    "GetTrainingStatus": lambda s, b: {"status": s.get_training_status(_field(b, "personGroupId"))},
    "Identify": _identify,
}


def _admin(service: ServiceCore, action: str) -> Json | None:
    if action == "QueryCounts":
        return {"QueryCounts": service.query_counts()}
    if action == "ResetQueryCounts":
        service.reset_query_counts()
        return {}
    if action == "Describe":
        return service.describe()
    return None


# ---------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServiceEndpoint:
    """Where a served service answers (``http://127.0.0.1:<port>``) and the secret its server accepts.

    The secret is left out of ``repr`` (and so of log lines and tracebacks)."""

    url: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None:
            raise ValueError(f"service url must look like http://HOST:PORT, got {self.url!r}")
        if not self.secret:
            raise ValueError("a service endpoint needs the server's secret (ServiceServer.secret)")
        if not _TOKEN.fullmatch(self.secret):
            raise ValueError("the server's secret may hold only letters, digits and -._~+/= (a Bearer token)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    rekognition: FaceCollection | None = None
    face: PersonGroupService | None = None

    def __init__(self, address: tuple[str, int], secret: str) -> None:
        super().__init__(address, _Handler)
        self.secret = secret.encode("ascii")
        self.host_header = f"{LOOPBACK}:{self.server_address[1]}"
        self.refusals: Counter[str] = Counter()
        self.refusals_lock = threading.Lock()

    def refuse(self, reason: str, exc: RequestRefusedError) -> RequestRefusedError:
        with self.refusals_lock:
            self.refusals[reason] += 1
        log.debug("refused a request (%s): %s", reason, exc)
        return exc

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr; a client that hangs up is routine, anything else a bug."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s hung up: %s", client_address, exc)
        else:
            log.error("error serving a request from %s", client_address, exc_info=True)


def _shown(values: list[str]) -> str:
    """A header's values for an error message: quoted and cut short (they come from anyone)."""
    if not values:
        return "none"
    if len(values) > 1:
        return f"{len(values)} headers"
    value = values[0]
    return f"{value[:40]!r}" + ("..." if len(value) > 40 else "")


def _secret_matches(header: str, secret: bytes) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), secret)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cloakbench-services/0.1"
    timeout = 60  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a benchmark must not print a line per query (debug level for those who ask)."""
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ServiceError) -> None:
        payload: Json = {"__type": exc.code, "message": str(exc)}
        headers = {}
        if isinstance(exc, ThrottlingError):
            payload["RetryAfterSeconds"] = exc.retry_after_s
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, UnauthorizedError):
            headers["WWW-Authenticate"] = 'Bearer realm="cloakbench-services"'
        self.close_connection = True
        self._reply(exc.http_status, payload, headers)

    def _answer(self, work: Callable[[], Json]) -> None:
        """Reply with ``work()``, or with the error it raised; a client that hung up gets nothing."""
        try:
            try:
                payload = work()
            except ServiceError as exc:
                self._error(exc)
                return
            except ConnectionError:
                raise
            except Exception as exc:  # a bug must reach the client as a 500, not a dropped connection
                log.error("internal error answering %s %s", self.command, self.path, exc_info=True)
                self._error(ServiceError(f"internal error: {type(exc).__name__}: {exc}"))
                return
            self._reply(200, payload)
        except ConnectionError as exc:
            self.close_connection = True
            log.debug("client %s hung up: %s", self.client_address, exc)

    def _check_caller(self, *, needs_secret: bool, needs_json: bool) -> None:
        """Refuse (and count) a request that did not come from the run's own client; see the module docstring."""
        server = self.server
        hosts = self.headers.get_all("Host") or []
        if hosts != [server.host_header]:
            raise server.refuse(
                "host",
                RequestRefusedError(
                    f"request refused: Host {_shown(hosts)} is not this server's address ({server.host_header})"
                ),
            )
        if needs_secret:
            auth = self.headers.get_all("Authorization") or []
            if len(auth) != 1 or not _secret_matches(auth[0], server.secret):
                raise server.refuse(
                    "secret",
                    UnauthorizedError(
                        "request refused: it does not carry this server's secret "
                        "(send Authorization: Bearer <ServiceServer.secret>)"
                    ),
                )
        if needs_json:
            types = self.headers.get_all("Content-Type") or []
            media = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
            if media != "application/json":
                raise server.refuse(
                    "content-type",
                    UnsupportedMediaTypeError(
                        f"request refused: Content-Type must be application/json, got {_shown(types)}"
                    ),
                )

    def _drain(self) -> None:
        """Read and drop a refused request's body, so that closing the socket does not reset the connection
        (and lose the reply) under a client still sending; bounded by :data:`MAX_BODY_BYTES`."""
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
            return
        remaining = min(int(length), MAX_BODY_BYTES)
        while remaining > 0:
            try:
                chunk = self.rfile.read(min(remaining, 1 << 16))
            except TimeoutError:
                return
            if not chunk:
                return
            remaining -= len(chunk)

    def _read_body(self) -> bytes:
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise InvalidParameterError("request needs a Content-Length header")
        length = lengths[0]
        if len(lengths) > 1 or not (length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
            raise InvalidParameterError(f"Content-Length must be one byte count in ASCII digits, got {_shown(lengths)}")
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise InvalidParameterError(f"request body of {size} bytes exceeds {MAX_BODY_BYTES} bytes")
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            raise InvalidParameterError(f"request body not received within {self.timeout} s") from None
        if len(raw) < size:
            raise InvalidParameterError(
                f"request body of {len(raw)} bytes is shorter than its Content-Length ({size} bytes)"
            )
        return raw

    def do_GET(self) -> None:
        self._answer(self._get)

    def _get(self) -> Json:
        path = urllib.parse.urlsplit(self.path).path
        self._check_caller(needs_secret=path != "/health", needs_json=False)
        if path == "/health":
            return {"status": "ok"}
        if path == "/usage":
            return {
                name: service.query_counts()
                for name, service in (("rekognition", self.server.rekognition), ("face", self.server.face))
                if service is not None
            }
        raise UnknownOperationError(f"GET {path}: no such resource (try /usage or /health)")

    def do_POST(self) -> None:
        self._answer(self._post)

    def _post(self) -> Json:
        try:
            self._check_caller(needs_secret=True, needs_json=True)
        except RequestRefusedError:
            self._drain()
            raise
        raw = self._read_body()
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 2:
            raise UnknownOperationError(f"POST {self.path}: expected /rekognition/<Action> or /face/<Action>")
        api, action = parts
        try:
            body = json.loads(raw, parse_int=_parse_int) if raw else {}
        except RecursionError:
            raise InvalidParameterError("request body is not valid JSON (it nests too deeply)") from None
        except InvalidParameterError:  # from _parse_int (a ValueError too: keep its own message)
            raise
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise InvalidParameterError(f"request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise InvalidParameterError("request body must be a JSON object")
        if api == "rekognition" and self.server.rekognition is not None:
            rekognition = self.server.rekognition
            admin = _admin(rekognition, action)
            if admin is not None:
                return admin
            if action in REKOGNITION_ACTIONS:
                return REKOGNITION_ACTIONS[action](rekognition, body)
        elif api == "face" and self.server.face is not None:
            face = self.server.face
            admin = _admin(face, action)
            if admin is not None:
                return admin
            if action in FACE_ACTIONS:
                return FACE_ACTIONS[action](face, body)
        raise UnknownOperationError(f"POST /{api}/{action}: no such operation on this server")


class ServiceServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving one :class:`FaceCollection` and/or one
    :class:`PersonGroupService`; ``port=0`` picks a free ephemeral port. It answers only requests that
    carry its :attr:`secret` (a fresh random one unless given); :attr:`endpoint` is what a client needs.
    Use :func:`serve` for a context-managed one."""

    def __init__(
        self, *services: FaceCollection | PersonGroupService, port: int = 0, secret: str | None = None
    ) -> None:
        if not services:
            raise ValueError("ServiceServer needs at least one service to serve")
        secret = secrets.token_urlsafe(SECRET_BYTES) if secret is None else secret
        ServiceEndpoint(f"http://{LOOPBACK}:1", secret)  # checks the secret before binding a port
        self._httpd = _Server((LOOPBACK, port), secret)
        self._secret = secret
        for service in services:
            if isinstance(service, FaceCollection) and self._httpd.rekognition is None:
                self._httpd.rekognition = service
            elif isinstance(service, PersonGroupService) and self._httpd.face is None:
                self._httpd.face = service
            else:
                self._httpd.server_close()
                raise ValueError(
                    f"cannot serve {type(service).__name__}: give at most one FaceCollection and one PersonGroupService"
                )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def secret(self) -> str:
        """The token clients send as ``Authorization: Bearer <secret>``."""
        return self._secret

    @property
    def endpoint(self) -> ServiceEndpoint:
        return ServiceEndpoint(self.base_url, self._secret)

    @property
    def refusals(self) -> dict[str, int]:
        """Requests refused so far, by reason: ``host``, ``secret``, ``content-type``."""
        with self._httpd.refusals_lock:
            return dict(sorted(self._httpd.refusals.items()))

    @property
    def refused_requests(self) -> int:
        """How many requests were refused so far (see :attr:`refusals`)."""
        return sum(self.refusals.values())

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"cloakbench-services-{self.address[1]}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the listening socket and join the server thread (idempotent)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()


@contextmanager
def serve(*services: FaceCollection | PersonGroupService, port: int = 0) -> Iterator[ServiceEndpoint]:
    """Serve ``services`` on 127.0.0.1 for the duration of the ``with`` block; yields the
    :class:`ServiceEndpoint` (url and secret) that :class:`CollectionClient` / :class:`PersonGroupClient` take."""
    server = ServiceServer(*services, port=port)
    server.start()
    try:
        yield server.endpoint
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- clients


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise InvalidParameterError(f"cannot send a {type(value).__name__} to a service (not JSON)")


def _encode_image(image: object, what: str) -> str:
    """PNG bytes pass through as they are (the server checks them); tensors are checked and encoded here."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    return base64.b64encode(encode_png(image_to_uint8(image, what=what))).decode("ascii")


class _Client:
    api = ""

    def __init__(self, endpoint: ServiceEndpoint, *, timeout: float = 60.0) -> None:
        if not isinstance(endpoint, ServiceEndpoint):
            raise TypeError(
                f"{type(self).__name__} needs a ServiceEndpoint (the server's url and secret: serve() yields one, "
                f"ServiceServer.endpoint is one), got {type(endpoint).__name__}"
            )
        parts = urllib.parse.urlsplit(endpoint.url)
        assert parts.hostname is not None and parts.port is not None  # ServiceEndpoint checked both
        self.base_url = endpoint.url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.secret}"}
        self.timeout = timeout

    def _post(self, action: str, payload: Json) -> Json:
        body = json.dumps(payload, default=_json_default).encode()
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request("POST", f"/{self.api}/{action}", body=body, headers=self._headers)
            response = conn.getresponse()
            status, data = response.status, response.read()
        except OSError as exc:
            raise ServiceError(f"{action}: no answer from {self.base_url} ({exc})") from exc
        finally:
            conn.close()
        try:
            reply = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(f"{action}: HTTP {status} with a body that is not JSON: {data[:200]!r}") from None
        if status == 200 and isinstance(reply, dict):
            return reply
        if not isinstance(reply, dict):
            raise ServiceError(f"{action}: HTTP {status}: unexpected reply {reply!r}")
        cls = ERROR_TYPES.get(str(reply.get("__type")), ServiceError)
        message = str(reply.get("message", f"HTTP {status}"))
        if cls is ThrottlingError:
            raise ThrottlingError(message, retry_after_s=float(reply.get("RetryAfterSeconds", 0.0)))
        raise cls(message)

    def query_counts(self) -> dict[str, int]:
        counts = self._post("QueryCounts", {})["QueryCounts"]
        return {str(k): int(v) for k, v in counts.items()}

    def reset_query_counts(self) -> None:
        self._post("ResetQueryCounts", {})

    def describe(self) -> dict[str, object]:
        return dict(self._post("Describe", {}))


class CollectionClient(_Client):
    """:class:`~.base.CollectionAPI` over HTTP (the server's ``/rekognition`` endpoints)."""

    api = "rekognition"

    def create_collection(self, collection_id: str) -> None:
        self._post("CreateCollection", {"CollectionId": collection_id})

    def delete_collection(self, collection_id: str) -> None:
        self._post("DeleteCollection", {"CollectionId": collection_id})

    def list_collections(self) -> list[str]:
        return [str(c) for c in self._post("ListCollections", {})["CollectionIds"]]

    def index_faces(self, collection_id: str, image: ImageInput, external_image_id: str) -> str:
        payload = {
            "CollectionId": collection_id,
            "Image": {"Bytes": _encode_image(image, "image")},
            "ExternalImageId": external_image_id,
        }
        return str(self._post("IndexFaces", payload)["FaceRecords"][0]["Face"]["FaceId"])

    def search_faces_by_image(
        self,
        collection_id: str,
        image: ImageInput,
        *,
        max_faces: int = DEFAULT_MAX_FACES,
        face_match_threshold: float = DEFAULT_FACE_MATCH_THRESHOLD,
    ) -> list[FaceMatch]:
        payload = {
            "CollectionId": collection_id,
            "Image": {"Bytes": _encode_image(image, "image")},
            "MaxFaces": max_faces,
            "FaceMatchThreshold": face_match_threshold,
        }
        reply = self._post("SearchFacesByImage", payload)
        return [
            FaceMatch(str(m["Face"]["FaceId"]), str(m["Face"]["ExternalImageId"]), float(m["Similarity"]))
            for m in reply["FaceMatches"]
        ]

    def list_faces(self, collection_id: str) -> list[Face]:
        reply = self._post("ListFaces", {"CollectionId": collection_id})
        return [Face(str(f["FaceId"]), str(f["ExternalImageId"])) for f in reply["Faces"]]

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> list[str]:
        ids = face_ids if isinstance(face_ids, str) else list(face_ids)  # a str is refused by the server
        reply = self._post("DeleteFaces", {"CollectionId": collection_id, "FaceIds": ids})
        return [str(f) for f in reply["DeletedFaces"]]


class PersonGroupClient(_Client):
    """:class:`~.base.PersonGroupAPI` over HTTP (the server's ``/face`` endpoints)."""

    api = "face"

    def create_person_group(self, person_group_id: str, name: str = "") -> None:
        self._post("CreatePersonGroup", {"personGroupId": person_group_id, "name": name})

    def delete_person_group(self, person_group_id: str) -> None:
        self._post("DeletePersonGroup", {"personGroupId": person_group_id})

    def create_person(self, person_group_id: str, name: str) -> str:
        return str(self._post("CreatePerson", {"personGroupId": person_group_id, "name": name})["personId"])

    def delete_person(self, person_group_id: str, person_id: str) -> None:
        self._post("DeletePerson", {"personGroupId": person_group_id, "personId": person_id})

    def list_persons(self, person_group_id: str) -> list[Person]:
        reply = self._post("ListPersons", {"personGroupId": person_group_id})
        return [
            Person(str(p["personId"]), str(p["name"]), tuple(str(f) for f in p["persistedFaceIds"]))
            for p in reply["persons"]
        ]

    def add_face(self, person_group_id: str, person_id: str, image: ImageInput) -> str:
        payload = {"personGroupId": person_group_id, "personId": person_id, "image": _encode_image(image, "image")}
        return str(self._post("AddFace", payload)["persistedFaceId"])

    def train(self, person_group_id: str) -> None:
        self._post("Train", {"personGroupId": person_group_id})

    def get_training_status(self, person_group_id: str) -> str:
        return str(self._post("GetTrainingStatus", {"personGroupId": person_group_id})["status"])

    def identify(
        self,
        person_group_id: str,
        images: Sequence[ImageInput] | torch.Tensor,
        *,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> list[list[Candidate]]:
        singles = split_images(images, what="images")
        check_identify_count(len(singles))  # here too: no point encoding 500 images for the server to refuse
        payload = {
            "personGroupId": person_group_id,
            "images": [_encode_image(img, f"images[{i}]") for i, img in enumerate(singles)],
            "maxNumOfCandidatesReturned": max_candidates,
            "confidenceThreshold": confidence_threshold,
        }
        reply = self._post("Identify", payload)
        return [
            [Candidate(str(c["personId"]), float(c["confidence"])) for c in result["candidates"]]
            for result in reply["results"]
        ]
