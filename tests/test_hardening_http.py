"""Hardening of the HTTP services (issue 18, items 1 and 13), over real HTTP on loopback against the real server.

Item 1: a running benchmark's server must answer only the client the benchmark built: a per-run secret (a SigV4
signature made with it on the Rekognition route, Amazon Rekognition's own protocol; a bearer token on the
administrative routes), the loopback Host it was bound to and the route's content type; every refused request is
counted, and a run records the count (store, cell notes, a warning).
Before the fix any local process (or a web page that found the
port) could index faces into the run's collection: the run then reported protection 0.0 instead of 1.0, ``ok``.

Item 13: malformed requests (deep nesting, non-ASCII digits in Content-Length, huge integers, a body shorter than
its Content-Length) get a 400 with a JSON error body, not a 500; a client that hangs up prints nothing.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.services import (
    CollectionClient,
    FaceCollection,
    ServiceEndpoint,
    ServiceServer,
    UnauthorizedError,
    serve,
    sigv4,
)
from cloakbench.attacks.services.base import encode_png, image_to_uint8
from cloakbench.attacks.services.rekognition_wire import CONTENT_TYPE
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.executors import run_into_store
from cloakbench.bench.store import ResultsStore
from cloakbench.bench.suite import parse_suite
from cloakbench.images import load_image, stack_images

GALLERY = "gallery"
EPS = 8 / 255


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture(scope="module")
def photos(celeb24_root: Path) -> list[tuple[torch.Tensor, str]]:
    """Three photos of each of three celeb24 identities."""
    out = []
    for folder in sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:3]:
        batch = stack_images([load_image(p) for p in sorted(folder.glob("*.png"))[:3]])
        out += [(batch[i : i + 1], folder.name) for i in range(batch.shape[0])]
    return out


@pytest.fixture(scope="module")
def service(recognizer: Recognizer, photos: list[tuple[torch.Tensor, str]]) -> FaceCollection:
    """Shared by the module: tests only try to change it, and check that nothing changed."""
    collection = FaceCollection(recognizer)
    collection.create_collection(GALLERY)
    for image, name in photos[:3]:
        collection.index_faces(GALLERY, image, name)
    return collection


@pytest.fixture
def server(service: FaceCollection) -> Iterator[ServiceServer]:
    srv = ServiceServer(service)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def b64_png(image: torch.Tensor) -> str:
    return base64.b64encode(encode_png(image_to_uint8(image))).decode()


def post(
    port: int, path: str, body: bytes, *, headers: dict[str, str], host: str | None = None
) -> tuple[int, dict[str, Any]]:
    """One POST with exactly these headers (and Host, default the loopback address the server is bound to)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def get(port: int, path: str, *, headers: dict[str, str], host: str | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def raw(port: int, request: bytes, *, half_close: bool = False) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (header values http.client would refuse to encode) and parse the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # the client has nothing more to send
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def auth(server: ServiceServer) -> dict[str, str]:
    """Headers of the administrative routes (``/rekognition/QueryCounts``, ...): the secret as a bearer token."""
    return {"Authorization": f"Bearer {server.secret}", "Content-Type": "application/json"}


def signed(
    server: ServiceServer,
    action: str,
    body: bytes,
    *,
    secret: str | None = None,
    host: str | None = None,
    content_type: str = CONTENT_TYPE,
) -> dict[str, str]:
    """Headers of a Rekognition request (``POST /``) signed with SigV4 (the server's secret unless given); the
    ``Host`` is left to :func:`post`, which sends ``host`` (signed as it is sent)."""
    port = server.address[1]
    headers = sigv4.sign(
        "POST", f"http://{host or f'127.0.0.1:{port}'}/", {"Content-Type": content_type,
        "X-Amz-Target": f"RekognitionService.{action}"}, body, access_key_id=server.endpoint.access_key_id,
        secret=server.secret if secret is None else secret, region=server.region, service="rekognition",
    )  # fmt: skip
    del headers["Host"]
    return headers


def index_body(image: torch.Tensor, name: str) -> bytes:
    return json.dumps({"CollectionId": GALLERY, "Image": {"Bytes": b64_png(image)}, "ExternalImageId": name}).encode()


# ------------------------------------------------------------------------------------------ item 1: who may call


def test_a_request_without_the_run_secret_is_refused_and_changes_nothing(
    server: ServiceServer, service: FaceCollection, photos: list[tuple[torch.Tensor, str]]
) -> None:
    port = server.address[1]
    faces_before, counts_before = service.list_faces(GALLERY), service.query_counts()
    image, name = photos[5]
    amz = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": "RekognitionService.IndexFaces"}
    delete = json.dumps({"CollectionId": GALLERY}).encode()
    json_only = {"Content-Type": "application/json"}
    attempts = [  # (path, body, headers, status, exception name): Amazon Rekognition's names for each
        ("/", index_body(image, name), amz, 400, "MissingAuthenticationTokenException"),  # no signature at all
        ("/", index_body(image, name), {**amz, "Authorization": "Bearer guess"}, 400, "IncompleteSignatureException"),
        ("/", delete, signed(server, "DeleteCollection", delete, secret="guess"), 400, "InvalidSignatureException"),
        ("/", index_body(image, name), signed(server, "IndexFaces", b"{}"), 400, "InvalidSignatureException"),
        ("/rekognition/ResetQueryCounts", b"{}", json_only, 401, "UnrecognizedClientException"),
    ]  # the fourth: signed for another body
    for path, body, headers, status, code in attempts:
        got, reply = post(port, path, body, headers=headers)
        assert (got, reply["__type"]) == (status, code), (path, reply)
    secret = server.secret
    for wrong in (secret[:-1], secret + "x", f"Basic {secret}", f"bearer  {secret}x", ""):
        status, _ = post(port, "/rekognition/QueryCounts", b"{}", headers={**json_only, "Authorization": wrong})
        assert status == 401, wrong
    status, reply = get(port, "/usage", headers={})
    assert status == 401
    assert service.query_counts() == counts_before  # nothing reset (and nothing counted)
    assert service.list_faces(GALLERY) == faces_before  # nothing indexed, nothing deleted
    assert server.refused_requests == len(attempts) + 5 + 1
    assert server.refusals == {"secret": len(attempts) + 5 + 1}
    status, reply = post(port, "/", b"{}", headers=signed(server, "ListCollections", b"{}"))
    assert (status, reply["CollectionIds"]) == (200, [GALLERY])  # the run's own client gets in
    assert server.refused_requests == len(attempts) + 5 + 1


def test_a_foreign_host_header_is_refused(
    server: ServiceServer, service: FaceCollection, photos: list[tuple[torch.Tensor, str]]
) -> None:
    """DNS rebinding: a web page served from evil.example re-resolved to 127.0.0.1 sends Host: evil.example."""
    port = server.address[1]
    before = service.list_faces(GALLERY)
    image, name = photos[5]
    body = index_body(image, name)
    for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        status, reply = post(port, "/", body, headers=signed(server, "IndexFaces", body, host=host), host=host)
        assert status == 400, host  # Amazon Rekognition answers every client error with 400
        assert reply["__type"] == "AccessDeniedException" and f"127.0.0.1:{port}" in reply["Message"]
    status, _ = get(port, "/health", headers={}, host=f"evil.example:{port}")
    assert status == 403
    assert service.list_faces(GALLERY) == before
    assert server.refusals == {"host": 5}
    assert get(port, "/health", headers={}) == (200, {"status": "ok"})  # a health check needs no secret


def test_a_non_json_content_type_is_refused(
    server: ServiceServer, service: FaceCollection, photos: list[tuple[torch.Tensor, str]]
) -> None:
    """text/plain and form posts are what a web page may send cross-origin without a preflight."""
    port = server.address[1]
    before = service.list_faces(GALLERY)
    image, name = photos[5]
    body = index_body(image, name)
    ctypes = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json")
    for ctype in (*ctypes, None):
        headers = signed(server, "IndexFaces", body)
        if ctype is None:
            del headers["Content-Type"]
        else:
            headers["Content-Type"] = ctype
        status, reply = post(port, "/", body, headers=headers)
        assert status == 400, ctype
        assert reply["__type"] == "UnsupportedMediaTypeException" and CONTENT_TYPE in reply["Message"]
    secret = {"Authorization": f"Bearer {server.secret}"}
    status, reply = post(port, "/rekognition/QueryCounts", b"{}", headers={**secret, "Content-Type": "text/plain"})
    assert status == 415 and "application/json" in reply["message"]
    assert service.list_faces(GALLERY) == before
    assert server.refusals == {"content-type": len(ctypes) + 2}
    json_utf8 = {**secret, "Content-Type": "Application/JSON; charset=utf-8"}
    assert post(port, "/rekognition/QueryCounts", b"{}", headers=json_utf8)[0] == 200
    amz = signed(server, "ListCollections", b"{}", content_type="Application/X-Amz-JSON-1.1; charset=utf-8")
    assert post(port, "/", b"{}", headers=amz)[0] == 200


def test_clients_send_the_secret_and_a_wrong_one_is_refused_without_echoing_it(
    recognizer: Recognizer, photos: list[tuple[torch.Tensor, str]]
) -> None:
    service = FaceCollection(recognizer)
    with serve(service) as endpoint:
        assert isinstance(endpoint, ServiceEndpoint) and endpoint.url.startswith("http://127.0.0.1:")
        assert endpoint.secret not in repr(endpoint)  # never in a log line or traceback
        client = CollectionClient(endpoint)
        client.create_collection(GALLERY)
        client.index_faces(GALLERY, photos[0][0], photos[0][1])
        assert [f.external_image_id for f in service.list_faces(GALLERY)] == [photos[0][1]]
        wrong = ServiceEndpoint(endpoint.url, "not-the-secret")
        with pytest.raises(UnauthorizedError, match="signature") as info:
            CollectionClient(wrong).index_faces(GALLERY, photos[1][0], photos[1][1])
        assert "not-the-secret" not in str(info.value) and endpoint.secret not in str(info.value)
        assert len(service.list_faces(GALLERY)) == 1
    with pytest.raises(ValueError, match="secret"):
        ServiceEndpoint("http://127.0.0.1:1", "")


def _attacker(photos: list[tuple[torch.Tensor, str]], aliases: dict[str, str], log: list[int]) -> None:
    """What the issue's attacker did: find the run's server, index clean photos of every identity under the
    run's alias for it (the protected identity's clean queries then match them), and reset the query counts."""
    deadline = time.monotonic() + 300
    port = None
    while port is None and time.monotonic() < deadline:
        names = [t.name for t in threading.enumerate() if t.name.startswith("cloakbench-services-")]
        port = int(names[0].rsplit("-", 1)[1]) if names else None
        time.sleep(0.001)
    assert port is not None
    headers = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": "RekognitionService.IndexFaces"}
    for image, name in photos:
        body = json.dumps(
            {"CollectionId": "cloakbench", "Image": {"Bytes": b64_png(image)}, "ExternalImageId": aliases[name]}
        ).encode()
        status, reply = post(port, "/", body, headers=headers)  # without a signature (it has no secret)
        log.append(status)
        assert reply["__type"] == "MissingAuthenticationTokenException"
    log.append(post(port, "/rekognition/ResetQueryCounts", b"{}", headers={"Content-Type": "application/json"})[0])


def test_a_run_with_an_attacker_on_its_port_keeps_its_numbers_and_records_the_refusals(
    celeb24_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "faces"
    root.mkdir()
    folders = sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:3]
    for folder in folders:
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    suite = parse_suite(
        {
            "name": "attacked", "dataset": {"source": "folder", "path": str(root), "max_per_identity": 8},
            "protected": {"count": 1},
            "defenses": [{"name": "pgd", "surrogates": ["sface"], "params": {"epsilon": EPS, "steps": 3}}],
            "recognizers": ["sface"], "countermeasures": ["none"], "classifiers": ["nearest-neighbour"],
            "protocols": ["poisoning"], "seeds": [0], "device": "cpu",
            "services": [{"kind": "rekognition", "backend": "sface", "transport": "http", "label": "rekognition"}],
        },
        where="test suite",
    )  # fmt: skip
    aliases = {f.name: f"id{i:04d}" for i, f in enumerate(folders)}
    per_folder = []
    for folder in folders:
        batch = stack_images([load_image(p) for p in sorted(folder.glob("*.png"))[:8]])
        per_folder.append([(batch[i : i + 1], folder.name) for i in range(batch.shape[0])])
    attack_photos = [photo for round_ in zip(*per_folder, strict=True) for photo in round_]  # each identity early
    statuses: list[int] = []
    attacker = threading.Thread(target=_attacker, args=(attack_photos, aliases, statuses), daemon=True)
    attacker.start()
    with caplog.at_level(logging.WARNING):
        outcome = run_into_store(suite, tmp_path / "run", cache=ArtifactCache(tmp_path / "cache"))
    attacker.join(timeout=60)
    assert statuses, "the attacker never reached the server"
    summary = outcome.result.summary
    direct = next(r for r in summary if r["recognizer"] == "sface")
    service = next(r for r in summary if r["recognizer"] == "rekognition")
    assert direct["protection_rate"] >= 0.8  # pgd on SFace: 1.0 here
    assert service["protection_rate"] == direct["protection_rate"]  # the attack changed nothing (before: 0.0)
    assert set(statuses) == {400, 401}  # every attacker request was refused (400: Rekognition's route, 401: admin)
    assert service["status"] == "ok" and f"refused {len(statuses)} request" in service["note"]
    with ResultsStore.in_folder(tmp_path / "run") as store:
        assert list(store.refused_requests().values()) == [len(statuses)]
    usage = next(iter(outcome.result.service_usage.values()))
    assert usage["refused_requests"] == len(statuses) and usage["IndexFaces"] > 0
    assert any("refused" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert any(f"refused {len(statuses)} request(s) from outside the run" in w for w in outcome.warnings)


def test_the_runs_own_client_is_never_refused(recognizer: Recognizer, photos: list[tuple[torch.Tensor, str]]) -> None:
    from cloakbench.bench.service_tracker import open_service
    from cloakbench.bench.suite import ServiceKind, ServiceSpec, Transport

    for kind in (ServiceKind.REKOGNITION, ServiceKind.AZURE):
        spec = ServiceSpec(kind=kind, transport=Transport.HTTP, label="r")
        with open_service(spec, recognizer) as opened:
            assert opened.server is not None and opened.api.base_url == opened.server.base_url
            api = opened.api
            if kind is ServiceKind.REKOGNITION:
                api.create_collection(GALLERY)
                api.index_faces(GALLERY, photos[0][0], "a")
                assert api.search_faces_by_image(GALLERY, photos[1][0], max_faces=1)[0].external_image_id == "a"
            else:
                api.create_person_group(GALLERY)
                api.add_face(GALLERY, api.create_person(GALLERY, "a"), photos[0][0])
                api.train(GALLERY)
                assert len(api.identify(GALLERY, [photos[1][0]], confidence_threshold=0.0)[0]) == 1
            assert opened.refused_requests() == 0 and opened.counts() == api.query_counts()


# ------------------------------------------------------------------------------ item 13: malformed requests


def assert_400(status: int, reply: dict[str, Any], words: str) -> None:
    assert status == 400, (status, reply)
    message = reply.get("Message", reply.get("message"))  # Rekognition's route says Message, the others message
    assert reply["__type"] == "InvalidParameterException" and words in message, reply


def signed_head(server: ServiceServer, length: bytes) -> bytes:
    """The head of a signed ListCollections request for the body ``{}`` with this Content-Length (not signed)."""
    headers = signed(server, "ListCollections", b"{}")
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    port = server.address[1]
    return f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}Content-Length: ".encode() + length


def test_deeply_nested_json_is_a_400(server: ServiceServer) -> None:
    port = server.address[1]
    for body in (b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        headers = signed(server, "SearchFacesByImage", body)
        assert_400(*post(port, "/", body, headers=headers), "nests too deeply")
        assert_400(*post(port, "/face/Identify", body, headers=auth(server)), "nests too deeply")


def test_a_huge_integer_is_a_400(server: ServiceServer) -> None:
    port = server.address[1]
    for digits in (5001, 4301):
        body = b'{"CollectionId": "gallery", "MaxFaces": -' + b"7" * digits + b"}"
        status, reply = post(port, "/", body, headers=signed(server, "SearchFacesByImage", body))
        assert_400(status, reply, f"request body has an integer of {digits} digits (at most 4300)")


@pytest.mark.parametrize(
    "length",
    [b"\xb2", b"1\xb9", "１２".encode(), "٣".encode(), b"1" * 5001, b"-1", b"+2", b"0x10", b"1_0", b"", b"3 4"],
    ids=["sup2-latin1", "1-sup1-latin1", "fullwidth-12", "arabic-3", "5001-digits", "minus", "plus", "hex",
         "underscore", "empty", "two-numbers"],
)  # fmt: skip
def test_a_content_length_that_is_not_ascii_digits_is_a_400(server: ServiceServer, length: bytes) -> None:
    """http.server reads header bytes as Latin-1: b"\\xb2" arrives as '²', which str.isdigit() accepts and int()
    refuses (a 500 before); UTF-8 digits arrive as other Latin-1 characters."""
    port = server.address[1]
    request = signed_head(server, length) + b"\r\nConnection: close\r\n\r\n{}"
    assert_400(*raw(port, request), "Content-Length")


def test_a_body_shorter_than_its_content_length_is_a_400(server: ServiceServer) -> None:
    port = server.address[1]
    request = signed_head(server, b"100") + b"\r\n\r\n{}"
    assert_400(*raw(port, request, half_close=True), "shorter than its Content-Length")
    assert post(port, "/", b"{}", headers=signed(server, "ListCollections", b"{}"))[0] == 200


def test_a_client_hanging_up_prints_nothing(
    server: ServiceServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port = server.address[1]
    caplog.set_level(logging.DEBUG, logger="cloakbench.attacks.services.http")
    head = signed_head(server, b"1000") + b"\r\n\r\n{"
    for request in (head, head[:20]):  # hang up in the body, and in the request line
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        time.sleep(0.1)  # the handler is now waiting for the rest
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, as a killed client sends
    err, deadline = "", time.monotonic() + 10
    while time.monotonic() < deadline:
        err += capfd.readouterr().err
        hung_up = [r for r in caplog.records if "hung up" in r.getMessage()]
        if "Traceback" in err or len(hung_up) >= 2:
            break
        time.sleep(0.05)
    assert "Traceback" not in err and "Error" not in err, err
    assert len([r for r in caplog.records if "hung up" in r.getMessage() and r.levelno == logging.DEBUG]) == 2
    assert post(port, "/rekognition/QueryCounts", b"{}", headers=auth(server))[0] == 200
