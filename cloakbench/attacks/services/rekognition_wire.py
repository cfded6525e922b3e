"""Amazon Rekognition's JSON protocol for :class:`~.rekognition.FaceCollection`: request checks and response
shapes of the actions served, after botocore's service model ``rekognition/2016-06-27/service-2.json``.

The protocol (``awsJson1_1``): ``POST /`` with ``X-Amz-Target: RekognitionService.<Action>``,
``Content-Type: application/x-amz-json-1.1``, a JSON body of the action's request shape, signed with AWS
Signature Version 4 (:mod:`.sigv4`); ``200`` with the response shape, or ``400`` (``500`` for
``InternalServerError``) with ``{"__type": name, "Code": name, "Logref": id, "Message": text}``, as Amazon
Rekognition's error-handling page shows it. Images travel base64-encoded in ``Image.Bytes``.

Served actions and what differs from Amazon Rekognition (the services detect no faces: every image is one
aligned face crop, see :mod:`.base`):

- ``CreateCollection {CollectionId}`` -> ``{StatusCode, FaceModelVersion}``; ``Tags`` are refused (no
  tagging). No ``CollectionArn``: there is no account to name.
- ``DeleteCollection {CollectionId}`` -> ``{StatusCode}``.
- ``ListCollections {MaxResults?, NextToken?}`` -> ``{CollectionIds, FaceModelVersions, NextToken?}``.
- ``DescribeCollection {CollectionId}`` -> ``{FaceCount, FaceModelVersion, CreationTimestamp, UserCount: 0}``.
- ``IndexFaces {CollectionId, Image, ExternalImageId, MaxFaces?, QualityFilter?, DetectionAttributes?}`` ->
  ``{FaceRecords: [{Face, FaceDetail: {BoundingBox}}], FaceModelVersion, UnindexedFaces: []}``: one face per
  image, its bounding box the whole image. ``ExternalImageId`` is required here (it carries the identity;
  optional on AWS). ``MaxFaces`` (>= 1) and ``QualityFilter`` are checked and change nothing: the one face is
  always indexed. ``DetectionAttributes`` may only be ``[]`` or ``["DEFAULT"]`` (no face attributes).
- ``SearchFacesByImage {CollectionId, Image, MaxFaces?, FaceMatchThreshold?, QualityFilter?}`` ->
  ``{SearchedFaceBoundingBox, FaceMatches: [{Similarity, Face}], FaceModelVersion}``; no
  ``SearchedFaceConfidence`` (no detector to be confident).
- ``ListFaces {CollectionId, MaxResults?, NextToken?, FaceIds?}`` -> ``{Faces, FaceModelVersion, NextToken?}``;
  ``UserId`` is refused (no users).
- ``DeleteFaces {CollectionId, FaceIds}`` -> ``{DeletedFaces, UnsuccessfulFaceDeletions}`` (unknown ids with
  reason ``FACE_NOT_FOUND``).

A ``Face`` carries ``FaceId``, ``ExternalImageId`` and ``BoundingBox``; no ``ImageId`` or ``Confidence``.
Fields a request shape does not have are refused by name (``InvalidParameterException``), as are
``Image.S3Object`` (no S3 here) and non-PNG bytes (``InvalidImageFormatException``). Pages hold
:data:`PAGE_SIZE` items unless ``MaxResults`` (1..4096; 0 means the default) says otherwise; ``NextToken``
is an offset this server handed out.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from typing import Any

from cloakbench.attacks.services.base import (
    DEFAULT_FACE_MATCH_THRESHOLD,
    DEFAULT_MAX_FACES,
    MAX_MAX_FACES,
    Face,
    InvalidPaginationTokenError,
    InvalidParameterError,
    ServiceError,
    check_int,
)
from cloakbench.attacks.services.rekognition import FaceCollection

Json = dict[str, Any]

TARGET_PREFIX = "RekognitionService."
CONTENT_TYPE = "application/x-amz-json-1.1"
SIGNING_NAME = "rekognition"
PAGE_SIZE = 1000
"""Items per ``ListFaces`` / ``ListCollections`` page when the request gives no ``MaxResults``."""
WHOLE_IMAGE: Json = {"Width": 1.0, "Height": 1.0, "Left": 0.0, "Top": 0.0}
"""The bounding box of every face: the whole image (each image is one aligned face crop)."""
QUALITY_FILTERS = ("NONE", "AUTO", "LOW", "MEDIUM", "HIGH")
_TOKEN = re.compile(r"[0-9]{1,9}")


def _check_fields(body: Json, action: str, required: Sequence[str], optional: Sequence[str]) -> None:
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(sorted([*required, *optional]))
        raise InvalidParameterError(f"{action}: unknown field(s) {', '.join(map(repr, unknown))} (allowed: {allowed})")
    for name in required:
        if name not in body:
            raise InvalidParameterError(f"missing required field {name!r}")


def _image(body: Json) -> bytes:
    image = body["Image"]
    if not isinstance(image, dict):
        raise InvalidParameterError('Image: expected an object {"Bytes": <base64 PNG>}')
    if "S3Object" in image:
        raise InvalidParameterError("Image.S3Object: this service reads no S3 objects; send the image as Image.Bytes")
    if set(image) != {"Bytes"}:
        raise InvalidParameterError('Image: expected an object {"Bytes": <base64 PNG>}')
    value = image["Bytes"]
    if not isinstance(value, str):
        raise InvalidParameterError(f"Image.Bytes: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError("Image.Bytes: not valid base64") from None


def _quality_filter(body: Json) -> None:
    value = body.get("QualityFilter", "NONE")
    if value not in QUALITY_FILTERS:
        raise InvalidParameterError(f"QualityFilter: {value!r} is not one of {', '.join(QUALITY_FILTERS)}")


def face_json(face: Face) -> Json:
    return {"FaceId": face.face_id, "BoundingBox": WHOLE_IMAGE, "ExternalImageId": face.external_image_id}


def _page(items: list[Any], body: Json) -> tuple[list[Any], str | None]:
    size = check_int(body.get("MaxResults", 0), what="MaxResults", lo=0, hi=MAX_MAX_FACES) or PAGE_SIZE
    token = body.get("NextToken")
    start = 0
    if token is not None:
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise InvalidPaginationTokenError("Invalid Pagination Token")
        start = int(token)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


def _with_token(reply: Json, token: str | None) -> Json:
    if token is not None:
        reply["NextToken"] = token
    return reply


def create_collection(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "CreateCollection", ["CollectionId"], ["Tags"])
    if b.get("Tags"):
        raise InvalidParameterError("Tags: this service does not tag collections")
    s.create_collection(b["CollectionId"])
    return {"StatusCode": 200, "FaceModelVersion": s.face_model_version}


def delete_collection(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "DeleteCollection", ["CollectionId"], [])
    s.delete_collection(b["CollectionId"])
    return {"StatusCode": 200}


def list_collections(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "ListCollections", [], ["MaxResults", "NextToken"])
    page, token = _page(s.list_collections(), b)
    return _with_token({"CollectionIds": page, "FaceModelVersions": [s.face_model_version] * len(page)}, token)


def describe_collection(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "DescribeCollection", ["CollectionId"], [])
    info = s.describe_collection(b["CollectionId"])
    return {
        "FaceCount": info.face_count,
        "FaceModelVersion": info.face_model_version,
        "CreationTimestamp": info.created,
        "UserCount": 0,
    }


def index_faces(s: FaceCollection, b: Json) -> Json:
    optional = ["ExternalImageId", "MaxFaces", "QualityFilter", "DetectionAttributes"]
    _check_fields(b, "IndexFaces", ["CollectionId", "Image"], optional)
    if "ExternalImageId" not in b:
        raise InvalidParameterError("ExternalImageId: this service needs one per face (it carries the identity)")
    check_int(b.get("MaxFaces", 1), what="MaxFaces", lo=1, hi=2**31 - 1)
    _quality_filter(b)
    attributes = b.get("DetectionAttributes", [])
    if not isinstance(attributes, list) or any(a != "DEFAULT" for a in attributes):
        raise InvalidParameterError(
            f"DetectionAttributes: this service computes no face attributes; use [] or ['DEFAULT'], got {attributes!r}"
        )
    face_id = s.index_faces(b["CollectionId"], _image(b), b["ExternalImageId"])
    face = face_json(Face(face_id, b["ExternalImageId"]))
    return {
        "FaceRecords": [{"Face": face, "FaceDetail": {"BoundingBox": WHOLE_IMAGE}}],
        "FaceModelVersion": s.face_model_version,
        "UnindexedFaces": [],
    }


def search_faces_by_image(s: FaceCollection, b: Json) -> Json:
    optional = ["MaxFaces", "FaceMatchThreshold", "QualityFilter"]
    _check_fields(b, "SearchFacesByImage", ["CollectionId", "Image"], optional)
    _quality_filter(b)
    matches = s.search_faces_by_image(
        b["CollectionId"],
        _image(b),
        max_faces=b.get("MaxFaces", DEFAULT_MAX_FACES),
        face_match_threshold=b.get("FaceMatchThreshold", DEFAULT_FACE_MATCH_THRESHOLD),
    )
    return {
        "SearchedFaceBoundingBox": WHOLE_IMAGE,
        "FaceMatches": [
            {"Similarity": m.similarity, "Face": face_json(Face(m.face_id, m.external_image_id))} for m in matches
        ],
        "FaceModelVersion": s.face_model_version,
    }


def list_faces(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "ListFaces", ["CollectionId"], ["MaxResults", "NextToken", "FaceIds", "UserId"])
    if "UserId" in b:
        raise InvalidParameterError("UserId: this service has no users (AssociateFaces is not served)")
    faces = s.list_faces(b["CollectionId"])
    if "FaceIds" in b:
        wanted = b["FaceIds"]
        if not isinstance(wanted, list) or not 1 <= len(wanted) <= MAX_MAX_FACES:
            raise InvalidParameterError(f"FaceIds: expected a list of 1 to {MAX_MAX_FACES} face ids")
        keep = set(wanted)
        faces = [f for f in faces if f.face_id in keep]
    page, token = _page(faces, b)
    return _with_token({"Faces": [face_json(f) for f in page], "FaceModelVersion": s.face_model_version}, token)


def delete_faces(s: FaceCollection, b: Json) -> Json:
    _check_fields(b, "DeleteFaces", ["CollectionId", "FaceIds"], [])
    ids = b["FaceIds"]
    if not isinstance(ids, list):
        raise InvalidParameterError(f"FaceIds: expected a list of face ids, got {type(ids).__name__}")
    deleted = s.delete_faces(b["CollectionId"], ids)
    gone = set(deleted)
    missing = [f for f in dict.fromkeys(ids) if f not in gone]
    return {
        "DeletedFaces": deleted,
        "UnsuccessfulFaceDeletions": [{"FaceId": f, "Reasons": ["FACE_NOT_FOUND"]} for f in missing],
    }


ACTIONS: dict[str, Callable[[FaceCollection, Json], Json]] = {
    "CreateCollection": create_collection,
    "DeleteCollection": delete_collection,
    "ListCollections": list_collections,
    "DescribeCollection": describe_collection,
    "IndexFaces": index_faces,
    "SearchFacesByImage": search_faces_by_image,
    "ListFaces": list_faces,
    "DeleteFaces": delete_faces,
}
"""Served actions, by the name after ``RekognitionService.`` in ``X-Amz-Target``."""


def error_reply(exc: ServiceError, logref: str) -> tuple[int, Json]:
    """Status and body of an error, as Amazon Rekognition sends it (``500`` only for ``InternalServerError``)."""
    body: Json = {"__type": exc.code, "Code": exc.code, "Logref": logref, "Message": str(exc)}
    return (500 if exc.code == "InternalServerError" else 400), body


def error_code(body: object) -> str:
    """The exception name of an error body (``__type``, without a ``namespace#`` prefix)."""
    code = str(body.get("__type", "")) if isinstance(body, dict) else ""
    return code.rsplit("#", 1)[-1].split(":", 1)[0]


def error_message(body: object) -> str:
    if not isinstance(body, dict):
        return ""
    return str(body.get("Message", body.get("message", "")))
