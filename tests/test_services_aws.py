"""Real commercial APIs, wire-compatible (issue 19, part 4): boto3, unchanged, against cloakbench's Amazon
Rekognition-compatible server on loopback, on real celeb24 faces with the real SFace behind it; SigV4 signatures
verified by the server; and ``transport: aws`` (the code path a suite runs against the real Amazon Rekognition)
pointed at that server giving the rows of ``transport: http``.

boto3 is a test dependency only (pinned in the ``test`` extra: the wire format is the point).
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.services import FaceCollection, RateLimit, ServiceEndpoint, ServiceServer, serve, sigv4
from cloakbench.attacks.services.rekognition_wire import ACTIONS, CONTENT_TYPE
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.runner import run_suite
from cloakbench.bench.service_tracker import open_service
from cloakbench.bench.suite import ServiceKind, ServiceSpec, Transport, parse_suite
from cloakbench.errors import ConfigError

boto3 = pytest.importorskip("boto3")
botocore = pytest.importorskip("botocore")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

IDENTITIES, ENROL, PROBES = 4, 5, 3
TIMINGS = {"cloak_s_per_image"}  # the only row values allowed to differ between two runs (wall-clock)
GALLERY = "celebs"


@pytest.fixture(scope="module")
def photos(celeb24_root: Path) -> dict[str, list[bytes]]:
    """The PNG files of four celeb24 identities, as they are on disk (ENROL + PROBES each)."""
    folders = sorted(p for p in celeb24_root.iterdir() if p.is_dir())[::6][:IDENTITIES]
    return {f.name: [p.read_bytes() for p in sorted(f.glob("*.png"))[: ENROL + PROBES]] for f in folders}


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture
def server(recognizer: Recognizer) -> Iterator[ServiceServer]:
    srv = ServiceServer(FaceCollection(recognizer), region="eu-west-1")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def client(endpoint: ServiceEndpoint, *, secret: str | None = None, key_id: str | None = None, **kw: Any) -> Any:
    """boto3's own Rekognition client, pointed at the server (nothing else changed)."""
    return boto3.client(
        "rekognition",
        endpoint_url=endpoint.url,
        region_name=kw.pop("region", endpoint.region),
        aws_access_key_id=key_id or endpoint.access_key_id,
        aws_secret_access_key=secret or endpoint.secret,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        **kw,
    )


def raw(endpoint: ServiceEndpoint, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    host, port = endpoint.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == CONTENT_TYPE
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def signed(endpoint: ServiceEndpoint, target: str, body: bytes, now: dt.datetime | None = None) -> dict[str, str]:
    return sigv4.sign(
        "POST", endpoint.url + "/", {"Content-Type": CONTENT_TYPE, "X-Amz-Target": target}, body,
        access_key_id=endpoint.access_key_id, secret=endpoint.secret, region=endpoint.region, service="rekognition",
        now=now,
    )  # fmt: skip


def fields(reply: dict[str, Any]) -> set[str]:
    return set(reply) - {"ResponseMetadata"}


# ------------------------------------------------------------------------------------------ boto3, the real SDK


def test_boto3_indexes_searches_lists_and_deletes_real_faces(
    server: ServiceServer, recognizer: Recognizer, photos: dict[str, list[bytes]]
) -> None:
    rek = client(server.endpoint)
    created = rek.create_collection(CollectionId=GALLERY)
    assert created["StatusCode"] == 200 and created["FaceModelVersion"] == "cloakbench/sface"

    reference = FaceCollection(recognizer)  # the same faces in-process: what the wire must reproduce exactly
    reference.create_collection(GALLERY)
    indexed: dict[str, str] = {}
    for name, files in photos.items():
        for png in files[:ENROL]:
            reply = rek.index_faces(CollectionId=GALLERY, Image={"Bytes": png}, ExternalImageId=name, MaxFaces=1)
            assert (
                fields(reply) == {"FaceRecords", "FaceModelVersion", "UnindexedFaces"} and not reply["UnindexedFaces"]
            )
            (record,) = reply["FaceRecords"]
            assert set(record["Face"]) == {"FaceId", "BoundingBox", "ExternalImageId"}
            assert record["Face"]["ExternalImageId"] == name
            indexed[record["Face"]["FaceId"]] = name
            reference.index_faces(GALLERY, png, name)
    assert len(indexed) == IDENTITIES * ENROL

    top1 = []
    for name, files in photos.items():
        for png in files[ENROL:]:
            reply = rek.search_faces_by_image(
                CollectionId=GALLERY, Image={"Bytes": png}, MaxFaces=IDENTITIES * ENROL, FaceMatchThreshold=0
            )
            assert fields(reply) == {"SearchedFaceBoundingBox", "FaceMatches", "FaceModelVersion"}
            matches = reply["FaceMatches"]
            local = reference.search_faces_by_image(GALLERY, png, max_faces=IDENTITIES * ENROL, face_match_threshold=0)
            # same order, same faces, bit-identical similarities (JSON carries a float64 exactly)
            assert [(m["Face"]["ExternalImageId"], m["Similarity"]) for m in matches] == [
                (m.external_image_id, m.similarity) for m in local
            ]
            assert {m["Face"]["FaceId"] for m in matches} == set(indexed)
            top1.append(matches[0]["Face"]["ExternalImageId"] == name)
    assert sum(top1) / len(top1) >= 0.9, top1  # measured 12 of 12 (4 identities, 5 enrolled photos each)

    pages = list(rek.get_paginator("list_faces").paginate(CollectionId=GALLERY, PaginationConfig={"PageSize": 6}))
    assert [len(p["Faces"]) for p in pages] == [6, 6, 6, 2]  # boto3 followed NextToken to the end
    listed = {f["FaceId"]: f["ExternalImageId"] for p in pages for f in p["Faces"]}
    assert listed == indexed
    described = rek.describe_collection(CollectionId=GALLERY)
    assert described["FaceCount"] == len(indexed) and described["UserCount"] == 0
    assert isinstance(described["CreationTimestamp"], dt.datetime)  # boto3 parsed the epoch seconds

    gone, unknown = next(iter(indexed)), "00000000-0000-4000-8000-000000000000"
    deleted = rek.delete_faces(CollectionId=GALLERY, FaceIds=[gone, unknown])
    assert deleted["DeletedFaces"] == [gone]
    assert deleted["UnsuccessfulFaceDeletions"] == [{"FaceId": unknown, "Reasons": ["FACE_NOT_FOUND"]}]
    assert rek.list_collections()["CollectionIds"] == [GALLERY]
    assert rek.delete_collection(CollectionId=GALLERY)["StatusCode"] == 200
    assert rek.list_collections()["CollectionIds"] == []

    probe = photos[next(iter(photos))][-1]
    with pytest.raises(rek.exceptions.ResourceNotFoundException) as info:  # the SDK's own exception class
        rek.search_faces_by_image(CollectionId=GALLERY, Image={"Bytes": probe})
    assert info.value.response["Error"]["Message"] == f"collection {GALLERY!r} does not exist"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    rek.create_collection(CollectionId="again")
    with pytest.raises(rek.exceptions.ResourceAlreadyExistsException):
        rek.create_collection(CollectionId="again")
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(probe)).save(jpeg, format="JPEG")
    with pytest.raises(rek.exceptions.InvalidImageFormatException, match="not a PNG file"):
        rek.index_faces(CollectionId="again", Image={"Bytes": jpeg.getvalue()}, ExternalImageId="x")
    with pytest.raises(rek.exceptions.InvalidParameterException, match="no face attributes"):
        rek.index_faces(CollectionId="again", Image={"Bytes": probe}, ExternalImageId="x", DetectionAttributes=["ALL"])

    usage = _usage(server)  # the server's own counts
    probes = IDENTITIES * PROBES
    assert usage == {
        "CreateCollection": 2,
        "DeleteCollection": 1,
        "DeleteFaces": 1,
        "DescribeCollection": 1,
        "IndexFaces": IDENTITIES * ENROL,
        "ListCollections": 2,
        "ListFaces": 4,
        "SearchFacesByImage": probes,
    }  # fmt: skip  (failed calls are not counted; one ListFaces per page)


def _usage(server: ServiceServer) -> dict[str, int]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/usage", headers={"Authorization": f"Bearer {server.secret}"})
        return dict(json.loads(conn.getresponse().read())["rekognition"])
    finally:
        conn.close()


def test_boto3_with_a_wrong_secret_key_region_or_clock_is_refused(
    server: ServiceServer, photos: dict[str, list[bytes]]
) -> None:
    endpoint = server.endpoint
    png = photos[next(iter(photos))][0]
    client(endpoint).create_collection(CollectionId=GALLERY)
    refused = []
    for kw, code, words in [
        ({"secret": endpoint.secret[:-1] + "x"}, "InvalidSignatureException", "signature we calculated does not match"),
        ({"key_id": "AKIAIOSFODNN7EXAMPLE"}, "UnrecognizedClientException", "security token"),
        ({"region": "us-west-2"}, "InvalidSignatureException", "scoped to a valid region, not 'us-west-2'"),
    ]:
        with pytest.raises(ClientError) as info:
            client(endpoint, **kw).index_faces(CollectionId=GALLERY, Image={"Bytes": png}, ExternalImageId="intruder")
        error = info.value.response["Error"]
        assert error["Code"] == code and words in error["Message"], error
        assert endpoint.secret not in error["Message"]
        refused.append(code)

    body = json.dumps({"CollectionId": GALLERY}).encode()
    now = dt.datetime.now(dt.timezone.utc)
    for shift, words in ((-10, "Signature expired"), (10, "Signature not yet current")):
        headers = signed(endpoint, "RekognitionService.DeleteCollection", body, now=now + dt.timedelta(minutes=shift))
        status, reply = raw(endpoint, headers, body)
        assert (status, reply["__type"]) == (400, "InvalidSignatureException") and words in reply["Message"], reply
    headers = signed(endpoint, "RekognitionService.DeleteCollection", body, now=now - dt.timedelta(minutes=4))
    fresh = dict(headers)
    headers.pop("Authorization")
    status, reply = raw(endpoint, headers, body)
    assert (status, reply["__type"]) == (400, "MissingAuthenticationTokenException")
    tampered = json.dumps({"CollectionId": "another"}).encode()  # a signature covers the body
    status, reply = raw(endpoint, fresh, tampered)
    assert (status, reply["__type"]) == (400, "InvalidSignatureException")
    assert server.refusals == {"secret": len(refused) + 4}
    assert _usage(server) == {"CreateCollection": 1}  # nothing indexed, nothing deleted
    status, reply = raw(endpoint, fresh, body)  # 4 minutes old: inside the 5-minute window
    assert (status, reply) == (200, {"StatusCode": 200})


def test_our_signer_agrees_with_botocores(monkeypatch: pytest.MonkeyPatch) -> None:
    """An independent check of :func:`sigv4.sign` (which CollectionClient uses): botocore signs the same
    request at the same instant to the same Authorization header."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when.replace(tzinfo=None))
    body = b'{"CollectionId":"x",  "MaxResults": 3}'
    headers = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": "RekognitionService.ListFaces"}
    url = "http://127.0.0.1:8123/"
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # the AWS documentation's example key
    SigV4Auth(Credentials("AKIDEXAMPLE", secret), "rekognition", "eu-west-1").add_auth(request)
    ours = sigv4.sign(
        "POST", url, headers, body, access_key_id="AKIDEXAMPLE", secret=secret,
        region="eu-west-1", service="rekognition", now=when,
    )  # fmt: skip
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Date"] == request.headers["X-Amz-Date"] == "20260102T030405Z"


def test_an_unknown_x_amz_target_is_a_clear_error(server: ServiceServer, photos: dict[str, list[bytes]]) -> None:
    endpoint = server.endpoint
    with pytest.raises(ClientError) as info:  # a real Rekognition operation this server does not serve
        client(endpoint).detect_faces(Image={"Bytes": photos[next(iter(photos))][0]})
    error = info.value.response["Error"]
    assert error["Code"] == "UnknownOperationException"
    assert "'RekognitionService.DetectFaces' is not an operation this server serves" in error["Message"]
    assert all(f"RekognitionService.{action}" in error["Message"] for action in ACTIONS)
    for target in ("RekognitionService.NoSuchThing", "DynamoDB_20120810.ListTables"):
        status, reply = raw(endpoint, signed(endpoint, target, b"{}"), b"{}")
        assert (status, reply["__type"]) == (400, "UnknownOperationException") and target in reply["Message"]
    headers = signed(endpoint, "RekognitionService.ListCollections", b"{}")
    headers.pop("X-Amz-Target")  # still signed: the signature names x-amz-target, which is gone
    status, reply = raw(endpoint, headers, b"{}")
    assert (status, reply["__type"]) == (400, "InvalidSignatureException") and "x-amz-target" in reply["Message"]
    assert server.refusals == {"secret": 1}


def test_the_rate_limit_is_rekognitions_throughput_error(recognizer: Recognizer) -> None:
    """A client over its calls per second gets ProvisionedThroughputExceededException, the exception AWS SDKs
    retry with back-off; the clock is injected, so nothing waits."""
    now = [100.0]
    service = FaceCollection(recognizer, rate_limit=RateLimit(per_s=1.0, burst=1), clock=lambda: now[0])
    with serve(service) as endpoint:
        rek = client(endpoint)
        rek.list_collections()
        with pytest.raises(rek.exceptions.ProvisionedThroughputExceededException) as info:
            rek.list_collections()
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        now[0] += 1.0
        assert rek.list_collections()["CollectionIds"] == []
    assert service.query_counts() == {"ListCollections": 2}


# ------------------------------------------------------------------------------------------ transport: aws


def test_transport_aws_settings_are_validated() -> None:
    aws = {"kind": ServiceKind.REKOGNITION, "transport": Transport.AWS}
    assert ServiceSpec(**aws, region="eu-central-1", collection_prefix="me.").real_aws
    assert not ServiceSpec(**aws, endpoint="local").real_aws
    base = {"name": "s", "defenses": ["noise"], "recognizers": ["sface"]}
    for service, words in [
        ({"kind": "azure", "transport": "aws"}, "needs kind 'rekognition'"),
        ({"kind": "rekognition", "transport": "http", "region": "us-east-1"}, "region applies only to transport 'aws'"),
        ({"kind": "rekognition", "transport": "aws", "region": "Mars-1"}, "region must be an AWS region name"),
        ({"kind": "rekognition", "transport": "aws", "collection_prefix": "a b"}, "collection_prefix must be"),
        ({"kind": "rekognition", "transport": "aws", "endpoint": "https://evil.example"}, "is not one of"),
    ]:
        with pytest.raises(ConfigError, match=words) as info:
            parse_suite({**base, "services": [service]}, where="suite.yaml")
        assert "suite.yaml: services[0]" in str(info.value)
    suite = parse_suite({**base, "services": [{"kind": "rekognition", "transport": "aws"}]}, where="suite.yaml")
    assert suite.services[0].label == "rekognition-aws"  # Amazon's model, not the backend, answers


def test_transport_aws_deletes_its_collection_even_when_the_block_fails(
    recognizer: Recognizer, photos: dict[str, list[bytes]]
) -> None:
    spec = ServiceSpec(kind=ServiceKind.REKOGNITION, transport=Transport.AWS, endpoint="local", collection_prefix="t-")
    seen = []

    def fail() -> None:
        with open_service(spec, recognizer) as opened:
            seen.append(opened)
            assert opened.collection_id.startswith("t-") and len(opened.collection_id) == 2 + 12
            opened.api.create_collection(opened.collection_id)
            opened.api.index_faces(opened.collection_id, photos[next(iter(photos))][0], "someone")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    (opened,) = seen
    assert opened.leftovers == [] and opened.api.created_collections == []
    assert opened.counts() == {"CreateCollection": 1, "IndexFaces": 1, "DeleteCollection": 1}  # every call counted
    assert opened.refused_requests() == 0


@pytest.mark.slow  # two small suite runs: 37 s of CPU, 96 s wall on the loaded 2-core machine
def test_a_suite_over_transport_aws_gives_the_rows_of_transport_http(celeb24_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "faces"
    root.mkdir()
    for folder in sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:3]:
        (root / folder.name).symlink_to(folder, target_is_directory=True)

    def suite(service: dict[str, Any]) -> Any:
        return parse_suite(
            {
                "name": "wire", "dataset": {"source": "folder", "path": str(root), "max_per_identity": 8},
                "protected": {"count": 2}, "recognizers": ["sface"], "classifiers": ["nearest-neighbour"],
                "defenses": [{"name": "pgd", "params": {"epsilon": 8 / 255, "steps": 2}}, {"name": "noise"}],
                "countermeasures": ["none"], "protocols": ["poisoning", "evasion"], "device": "cpu",
                "services": [{"kind": "rekognition", "label": "rekognition", **service}],
            },
            where="test suite",
        )  # fmt: skip

    cache = ArtifactCache(tmp_path / "cache")  # the second run reuses the first one's cloaks
    over_http = run_suite(suite({"transport": "http"}), cache=cache)
    over_aws = run_suite(suite({"transport": "aws", "endpoint": "local", "region": "ap-south-1"}), cache=cache)

    def service_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [
            {
                k: "nan" if isinstance(v, float) and math.isnan(v) else v
                for k, v in r.items()
                if k != "cloak_s_per_image"
            }
            for r in rows
            if r["recognizer"] == "rekognition"
        ]
        assert out
        return out

    assert service_rows(over_aws.summary) == service_rows(over_http.summary)
    assert service_rows(over_aws.queries) == service_rows(over_http.queries)
    assert all(r["status"] == "ok" for r in service_rows(over_aws.summary))
    (http_counts,) = over_http.service_usage.values()
    (aws_counts,) = over_aws.service_usage.values()
    # the same calls, counted by the boto3 adapter; it also deleted its collection (the HTTP run's died with its server)
    assert aws_counts == {**http_counts, "DeleteCollection": 1}
    assert aws_counts["SearchFacesByImage"] > 0 and aws_counts["refused_requests"] == 0
