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

The server binds 127.0.0.1 only: these are local stand-ins, not something to expose to a network.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    ServiceCore,
    ServiceError,
    ThrottlingError,
    UnknownOperationError,
    check_identify_count,
    encode_png,
    image_to_uint8,
    split_images,
)
from cloakbench.attacks.services.rekognition import FaceCollection

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = IDENTIFY_MAX_IMAGES * (MAX_IMAGE_BYTES * 4 // 3 + 16) + 64 * 1024
"""Ten base64 images at the size limit plus room for the other fields."""

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------- wire helpers


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    rekognition: FaceCollection | None = None
    face: PersonGroupService | None = None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cloakbench-services/0.1"
    timeout = 60  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a benchmark must not print a line per query."""

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
        self._reply(exc.http_status, payload, headers)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            self._reply(200, {"status": "ok"})
        elif path == "/usage":
            usage = {
                name: service.query_counts()
                for name, service in (("rekognition", self.server.rekognition), ("face", self.server.face))
                if service is not None
            }
            self._reply(200, usage)
        else:
            self._error(UnknownOperationError(f"GET {path}: no such resource (try /usage or /health)"))

    def do_POST(self) -> None:
        try:
            self._reply(200, self._dispatch())
        except ServiceError as exc:
            self._error(exc)
        except Exception as exc:  # a bug must reach the client as a 500, not a dropped connection
            self._error(ServiceError(f"internal error: {type(exc).__name__}: {exc}"))

    def _dispatch(self) -> Json:
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise InvalidParameterError("request needs a Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise InvalidParameterError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        if len(parts) != 2:
            raise UnknownOperationError(f"POST {self.path}: expected /rekognition/<Action> or /face/<Action>")
        api, action = parts
        try:
            body = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    :class:`PersonGroupService`; ``port=0`` picks a free ephemeral port. Use :func:`serve` for a
    context-managed one."""

    def __init__(self, *services: FaceCollection | PersonGroupService, port: int = 0) -> None:
        if not services:
            raise ValueError("ServiceServer needs at least one service to serve")
        self._httpd = _Server((LOOPBACK, port), _Handler)
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
def serve(*services: FaceCollection | PersonGroupService, port: int = 0) -> Iterator[str]:
    """Serve ``services`` on 127.0.0.1 for the duration of the ``with`` block; yields the base URL."""
    server = ServiceServer(*services, port=port)
    server.start()
    try:
        yield server.base_url
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

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"base_url must look like http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port
        self.timeout = timeout

    def _post(self, action: str, payload: Json) -> Json:
        body = json.dumps(payload, default=_json_default).encode()
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request("POST", f"/{self.api}/{action}", body=body, headers={"Content-Type": "application/json"})
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
