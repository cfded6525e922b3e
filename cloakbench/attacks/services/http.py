"""The services over HTTP on loopback: a stdlib server, and clients with the in-process interface.

Wire formats:

- **Rekognition** (:class:`~.rekognition.FaceCollection`): Amazon Rekognition's own JSON protocol, so that the
  official AWS SDKs call it unchanged (boto3 with ``endpoint_url``): ``POST /`` with
  ``X-Amz-Target: RekognitionService.<Action>``, ``Content-Type: application/x-amz-json-1.1``, signed with
  AWS Signature Version 4 (access key id :data:`ACCESS_KEY_ID`, the server's secret as the secret access
  key, the server's region, service ``rekognition``). Actions, shapes and differences: :mod:`.rekognition_wire`;
  signature checks: :mod:`.sigv4`. Errors are ``400`` (``500`` for ``InternalServerError``)
  ``{"__type", "Code", "Logref", "Message"}``; an ``X-Amz-Target`` this server does not serve is a ``400``
  ``UnknownOperationException`` naming the served actions.
- **Face** (:class:`~.azure.PersonGroupService`): ``POST /face/<Action>`` with a JSON body, Action one of
  ``CreatePersonGroup {personGroupId, name}``, ``DeletePersonGroup {personGroupId}``,
  ``CreatePerson {personGroupId, name}``, ``DeletePerson {personGroupId, personId}``, ``ListPersons {personGroupId}``,
  ``AddFace {personGroupId, personId, image}``, ``Train {personGroupId}``,
  ``GetTrainingStatus {personGroupId}``,
  ``Identify {personGroupId, images, maxNumOfCandidatesReturned, confidenceThreshold}`` (field names after Azure
  Face's; images base64 PNG); errors ``{"__type": code, "message": text}`` with status 400, 404, 409, 429 or 500.
- **Administration** (cloakbench's own, never counted nor rate-limited): ``POST /rekognition/<A>`` and
  ``POST /face/<A>`` for A in ``QueryCounts``, ``ResetQueryCounts``, ``Describe``; ``GET /usage`` returns every
  served service's query counts, ``GET /health`` ``ok``.

The clients raise the very exception type the in-process service raises, with the same message. Query counts
live on the server (the service object), so every client of one server sees the same numbers.

The server binds 127.0.0.1 only: these are local stand-ins, not something to expose to a network. Binding
to loopback keeps other machines out, not other local processes, nor a web page in a local browser that
finds the port. So a server answers only the client that holds its **secret**, a random token made for each
server (``secrets.token_urlsafe``; randomness from the OS, never a seed: it is a credential, not a result).
Before it reads a request body, the server refuses, and counts (:attr:`ServiceServer.refusals`):

- a ``Host`` header other than the ``127.0.0.1:<port>`` it is bound to (403 ``AccessDeniedException``): a
  web page that re-resolved its own domain to 127.0.0.1 (DNS rebinding) sends its own domain;
- on the Rekognition route, a request without a valid SigV4 signature made with the secret (400
  ``MissingAuthenticationTokenException``, ``IncompleteSignatureException``, ``UnrecognizedClientException``
  or ``InvalidSignatureException``; a stale ``X-Amz-Date`` too: see :mod:`.sigv4`); the body is read, up to
  :data:`MAX_BODY_BYTES`, only once the header checks passed, since the signature covers it;
- elsewhere, a missing or wrong ``Authorization: Bearer <secret>`` (401 ``UnrecognizedClientException``;
  compared in constant time, never echoed); only ``GET /health`` needs no secret;
- a POST whose ``Content-Type`` is not the route's (``application/x-amz-json-1.1`` for Rekognition,
  ``application/json`` elsewhere; 415 ``UnsupportedMediaTypeException``, 400 on the Rekognition route): what a
  web page may send cross-origin without asking first (``text/plain``, forms) is never one of them.

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
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.services import rekognition_wire, sigv4
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
    CollectionInfo,
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
ACCESS_KEY_ID = "CLOAKBENCHLOCAL"
"""The access key id a Rekognition client signs with; the secret access key is the server's secret."""
DEFAULT_REGION = "us-east-1"
"""The region a server answers for (its requests must be signed for it) unless told another."""
MAX_BODY_BYTES = IDENTIFY_MAX_IMAGES * (MAX_IMAGE_BYTES * 4 // 3 + 16) + 64 * 1024
"""Ten base64 images at the size limit plus room for the other fields."""
MAX_LENGTH_DIGITS = 12
"""The most digits a ``Content-Length`` may have (anything longer is over :data:`MAX_BODY_BYTES` anyway)."""
MAX_INT_DIGITS = 4300
"""The most digits an integer in a request body may have (Python's own limit for ``int(str)``)."""
SECRET_BYTES = 32
"""Entropy of a server's secret (``secrets.token_urlsafe(32)``: 43 characters)."""
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: what may follow "Bearer "
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")

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
    """Where a served service answers (``http://127.0.0.1:<port>``), the secret its server accepts and the
    region it answers for. AWS SDKs take ``url`` as ``endpoint_url``, :attr:`access_key_id` and ``secret`` as
    credentials, and ``region`` as the region name.

    The secret is left out of ``repr`` (and so of log lines and tracebacks)."""

    url: str
    secret: str = field(repr=False)
    region: str = DEFAULT_REGION

    @property
    def access_key_id(self) -> str:
        return ACCESS_KEY_ID

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
        if not _REGION.fullmatch(self.region):
            raise ValueError(f"region must look like us-east-1, got {self.region!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    rekognition: FaceCollection | None = None
    face: PersonGroupService | None = None

    def __init__(self, address: tuple[str, int], secret: str, region: str, clock: Callable[[], float]) -> None:
        super().__init__(address, _Handler)
        self.secret = secret.encode("ascii")
        self.secret_text = secret
        self.region = region
        self.clock = clock
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

    _wire = "plain"  # "aws" while answering a Rekognition request (set per request: connections are kept alive)
    _request_id = ""

    def _reply(
        self, status: int, payload: object, headers: dict[str, str] | None = None, media: str = "application/json"
    ) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ServiceError) -> None:
        headers = {"Connection": "close"}
        if self._wire == "aws":
            status, payload = rekognition_wire.error_reply(exc, str(uuid.uuid4()))
            headers["x-amzn-RequestId"] = self._request_id
        else:
            status, payload = exc.http_status, {"__type": exc.code, "message": str(exc)}
            if isinstance(exc, UnauthorizedError):
                headers["WWW-Authenticate"] = 'Bearer realm="cloakbench-services"'
        if isinstance(exc, ThrottlingError):
            payload["RetryAfterSeconds"] = exc.retry_after_s
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        self.close_connection = True
        self._reply(status, payload, headers, self._media())

    def _media(self) -> str:
        return rekognition_wire.CONTENT_TYPE if self._wire == "aws" else "application/json"

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
            headers = {"x-amzn-RequestId": self._request_id} if self._wire == "aws" else {}
            self._reply(200, payload, headers, self._media())
        except ConnectionError as exc:
            self.close_connection = True
            log.debug("client %s hung up: %s", self.client_address, exc)

    def _check_host(self) -> None:
        server = self.server
        hosts = self.headers.get_all("Host") or []
        if hosts != [server.host_header]:
            raise server.refuse(
                "host",
                RequestRefusedError(
                    f"request refused: Host {_shown(hosts)} is not this server's address ({server.host_header})"
                ),
            )

    def _check_media(self, expected: str) -> None:
        types = self.headers.get_all("Content-Type") or []
        media = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
        if media != expected:
            raise self.server.refuse(
                "content-type",
                UnsupportedMediaTypeError(f"request refused: Content-Type must be {expected}, got {_shown(types)}"),
            )

    def _check_caller(self, *, needs_secret: bool, needs_json: bool) -> None:
        """Refuse (and count) a request that did not come from the run's own client; see the module docstring."""
        server = self.server
        self._check_host()
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
            self._check_media("application/json")

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

    def _json(self, raw: bytes) -> Json:
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
        return body

    def do_GET(self) -> None:
        self._wire = "plain"
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
        self._wire = "aws" if urllib.parse.urlsplit(self.path).path == "/" else "plain"
        self._request_id = str(uuid.uuid4())
        self._answer(self._aws if self._wire == "aws" else self._post)

    def _aws(self) -> Json:
        """One Amazon Rekognition JSON-protocol request: host, content type, SigV4, then the action."""
        server = self.server
        read = False

        def read_body() -> bytes:
            nonlocal read
            read = True
            return self._read_body()

        try:
            self._check_host()
            self._check_media(rekognition_wire.CONTENT_TYPE)
            headers: dict[str, list[str]] = {}
            for name, value in self.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            try:
                raw = sigv4.verify(
                    "POST", self.path, headers, read_body, access_key_id=ACCESS_KEY_ID, secret=server.secret_text,
                    region=server.region, service=rekognition_wire.SIGNING_NAME, now=server.clock(),
                )  # fmt: skip
            except UnauthorizedError as exc:
                raise server.refuse("secret", exc) from None
        except RequestRefusedError:
            if not read:
                self._drain()
            raise
        targets = self.headers.get_all("X-Amz-Target") or []
        target = targets[0] if len(targets) == 1 else ""
        action = target.removeprefix(rekognition_wire.TARGET_PREFIX)
        if (
            server.rekognition is None
            or not target.startswith(rekognition_wire.TARGET_PREFIX)
            or (action not in rekognition_wire.ACTIONS)
        ):
            served = ", ".join(rekognition_wire.TARGET_PREFIX + a for a in rekognition_wire.ACTIONS)
            what = "no Rekognition collection" if server.rekognition is None else served
            raise UnknownOperationError(
                f"X-Amz-Target {_shown(targets)} is not an operation this server serves (it serves {what})"
            )
        return rekognition_wire.ACTIONS[action](server.rekognition, self._json(raw))

    def _post(self) -> Json:
        try:
            self._check_caller(needs_secret=True, needs_json=True)
        except RequestRefusedError:
            self._drain()
            raise
        raw = self._read_body()
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 2:
            raise UnknownOperationError(
                f"POST {self.path}: expected / (Amazon Rekognition's protocol), /rekognition/<Admin> or /face/<Action>"
            )
        api, action = parts
        body = self._json(raw)
        if api == "rekognition" and self.server.rekognition is not None:
            admin = _admin(self.server.rekognition, action)
            if admin is not None:
                return admin
            raise UnknownOperationError(
                f"POST /rekognition/{action}: Rekognition operations use Amazon Rekognition's protocol (POST / with "
                "X-Amz-Target: RekognitionService.<Action>); this path serves QueryCounts, ResetQueryCounts, Describe"
            )
        if api == "face" and self.server.face is not None:
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
    Rekognition requests must be signed for ``region``; ``clock`` (seconds since the epoch) is what their
    ``X-Amz-Date`` is checked against. Use :func:`serve` for a context-managed one."""

    def __init__(
        self,
        *services: FaceCollection | PersonGroupService,
        port: int = 0,
        secret: str | None = None,
        region: str = DEFAULT_REGION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not services:
            raise ValueError("ServiceServer needs at least one service to serve")
        secret = secrets.token_urlsafe(SECRET_BYTES) if secret is None else secret
        ServiceEndpoint(f"http://{LOOPBACK}:1", secret, region)  # checks both before binding a port
        self._httpd = _Server((LOOPBACK, port), secret, region, clock)
        self._secret = secret
        self._region = region
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
        """The Rekognition route's secret access key, and elsewhere the token sent as ``Authorization: Bearer``."""
        return self._secret

    @property
    def region(self) -> str:
        return self._region

    @property
    def endpoint(self) -> ServiceEndpoint:
        return ServiceEndpoint(self.base_url, self._secret, self._region)

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


def _image_bytes(image: object, what: str) -> bytes:
    """PNG bytes pass through as they are (the server checks them); tensors are checked and encoded here."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return encode_png(image_to_uint8(image, what=what))


def _encode_image(image: object, what: str) -> str:
    return base64.b64encode(_image_bytes(image, what)).decode("ascii")


def _raise_error(action: str, status: int, reply: object, code: str, message: str) -> None:
    cls = ERROR_TYPES.get(code, ServiceError)
    message = message or f"HTTP {status}"
    if cls is ThrottlingError:
        retry = reply.get("RetryAfterSeconds", 0.0) if isinstance(reply, dict) else 0.0
        raise ThrottlingError(message, retry_after_s=float(retry))
    raise cls(message)


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
        self._endpoint = endpoint
        self._host, self._port = parts.hostname, parts.port
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.secret}"}
        self.timeout = timeout

    def _send(self, action: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, object]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            status, data = response.status, response.read()
        except OSError as exc:
            raise ServiceError(f"{action}: no answer from {self.base_url} ({exc})") from exc
        finally:
            conn.close()
        try:
            return status, json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(f"{action}: HTTP {status} with a body that is not JSON: {data[:200]!r}") from None

    def _post(self, action: str, payload: Json) -> Json:
        body = json.dumps(payload, default=_json_default).encode()
        status, reply = self._send(action, f"/{self.api}/{action}", body, self._headers)
        if status == 200 and isinstance(reply, dict):
            return reply
        if not isinstance(reply, dict):
            raise ServiceError(f"{action}: HTTP {status}: unexpected reply {reply!r}")
        _raise_error(action, status, reply, str(reply.get("__type")), str(reply.get("message", "")))
        raise AssertionError("unreachable")

    def query_counts(self) -> dict[str, int]:
        counts = self._post("QueryCounts", {})["QueryCounts"]
        return {str(k): int(v) for k, v in counts.items()}

    def reset_query_counts(self) -> None:
        self._post("ResetQueryCounts", {})

    def describe(self) -> dict[str, object]:
        return dict(self._post("Describe", {}))


class CollectionClient(_Client):
    """:class:`~.base.CollectionAPI` over Amazon Rekognition's JSON protocol, signed with SigV4 (stdlib only;
    ``transport: aws`` uses boto3 instead, see :mod:`.aws`). Lists follow ``NextToken`` to the end."""

    api = "rekognition"

    def _call(self, action: str, payload: Json) -> Json:
        body = json.dumps(payload, default=_json_default).encode()
        headers = {
            "Content-Type": rekognition_wire.CONTENT_TYPE,
            "X-Amz-Target": rekognition_wire.TARGET_PREFIX + action,
        }
        endpoint = self._endpoint
        signed = sigv4.sign(
            "POST", f"{self.base_url}/", headers, body, access_key_id=endpoint.access_key_id, secret=endpoint.secret,
            region=endpoint.region, service=rekognition_wire.SIGNING_NAME,
        )  # fmt: skip
        status, reply = self._send(action, "/", body, signed)
        if status == 200 and isinstance(reply, dict):
            return reply
        code, message = rekognition_wire.error_code(reply), rekognition_wire.error_message(reply)
        _raise_error(action, status, reply, code, message)
        raise AssertionError("unreachable")

    def _pages(self, action: str, payload: Json, key: str) -> list[Any]:
        items: list[Any] = []
        token: str | None = None
        while True:
            reply = self._call(action, payload if token is None else {**payload, "NextToken": token})
            items += reply[key]
            token = reply.get("NextToken")
            if token is None:
                return items

    def create_collection(self, collection_id: str) -> None:
        self._call("CreateCollection", {"CollectionId": collection_id})

    def delete_collection(self, collection_id: str) -> None:
        self._call("DeleteCollection", {"CollectionId": collection_id})

    def list_collections(self) -> list[str]:
        return [str(c) for c in self._pages("ListCollections", {}, "CollectionIds")]

    def describe_collection(self, collection_id: str) -> CollectionInfo:
        reply = self._call("DescribeCollection", {"CollectionId": collection_id})
        created = reply.get("CreationTimestamp")
        return CollectionInfo(
            face_count=int(reply["FaceCount"]),
            face_model_version=str(reply["FaceModelVersion"]),
            created=None if created is None else float(created),
        )

    def index_faces(self, collection_id: str, image: ImageInput, external_image_id: str) -> str:
        payload = {
            "CollectionId": collection_id,
            "Image": {"Bytes": _encode_image(image, "image")},
            "ExternalImageId": external_image_id,
        }
        return str(self._call("IndexFaces", payload)["FaceRecords"][0]["Face"]["FaceId"])

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
        reply = self._call("SearchFacesByImage", payload)
        return [
            FaceMatch(str(m["Face"]["FaceId"]), str(m["Face"]["ExternalImageId"]), float(m["Similarity"]))
            for m in reply["FaceMatches"]
        ]

    def list_faces(self, collection_id: str) -> list[Face]:
        faces = self._pages("ListFaces", {"CollectionId": collection_id}, "Faces")
        return [Face(str(f["FaceId"]), str(f["ExternalImageId"])) for f in faces]

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> list[str]:
        ids = face_ids if isinstance(face_ids, str) else list(face_ids)  # a str is refused by the server
        reply = self._call("DeleteFaces", {"CollectionId": collection_id, "FaceIds": ids})
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
