"""AWS Signature Version 4 (``AWS4-HMAC-SHA256`` in an ``Authorization`` header): signing and verifying.

Written from the published algorithm (AWS General Reference, "Create a signed AWS API request"), with
botocore's ``SigV4Auth`` read as a reference only; :func:`sign` is cross-checked against botocore in
``tests/test_services_aws.py``, and the server verifies what boto3 itself signs.

1. canonical request = method, canonical URI, canonical query string, canonical headers (each signed header
   as ``lowercase-name:value``, runs of spaces collapsed, repeated headers joined by ``,``), the signed header
   names, and the hex SHA-256 of the body, joined by newlines;
2. string to sign = ``AWS4-HMAC-SHA256``, the ``X-Amz-Date`` timestamp, the credential scope
   (``date/region/service/aws4_request``) and the hex SHA-256 of the canonical request;
3. signing key = HMAC-SHA256 chain ``"AWS4" + secret`` -> date -> region -> service -> ``aws4_request``;
   signature = hex HMAC-SHA256 of the string to sign under that key.

:func:`verify` recomputes the signature from the request as it arrived and compares it in constant time. It
refuses, each with the exception type and message the real service gives (see :mod:`.base`): no
``Authorization`` header (``MissingAuthenticationTokenException``), a malformed one
(``IncompleteSignatureException``), an unknown access key id or any session token
(``UnrecognizedClientException``), a scope for another region, service or terminator, a timestamp more than
:data:`MAX_SKEW_S` from the server's clock, an unsigned ``host`` or ``x-amz-*`` header, a
body whose hash differs from ``X-Amz-Content-SHA256``, and a signature that does not match
(``InvalidSignatureException``). A signed request can be replayed within the skew window, as on AWS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cloakbench.attacks.services.base import (
    IncompleteSignatureError,
    InvalidSignatureError,
    MissingAuthenticationTokenError,
    UnauthorizedError,
)

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW_S = 300
"""How far (seconds) a request's ``X-Amz-Date`` may lie from the server's clock, either way (AWS: 5 minutes)."""
MUST_SIGN = ("host", "x-amz-date")
"""Headers a request must sign besides every ``x-amz-*`` header it carries (``x-amz-target``: the action)."""

_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The derived key of ``secret`` for one day (``YYYYMMDD``), region and service."""
    key = _hmac(f"AWS4{secret}".encode(), date)
    for part in (region, service, TERMINATOR):
        key = _hmac(key, part)
    return key


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_query(query: str) -> str:
    """The query string with each name and value URI-encoded once (RFC 3986 unreserved kept) and sorted."""
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append(
            (
                urllib.parse.quote(urllib.parse.unquote(name), safe="-_.~"),
                urllib.parse.quote(urllib.parse.unquote(value), safe="-_.~"),
            )
        )
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_uri(path: str) -> str:
    """The path, each segment URI-encoded (non-S3 services encode the already encoded path once more)."""
    return urllib.parse.quote(path or "/", safe="/~")


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, Sequence[str]],
    signed_headers: Sequence[str],
    payload_sha256: str,
) -> str:
    """Step 1. ``headers`` maps lower-case names to their values in arrival order."""
    lines = [f"{name}:{','.join(_trim(v) for v in headers[name])}" for name in signed_headers]
    return "\n".join(
        [
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            "\n".join(lines) + "\n",
            ";".join(signed_headers),
            payload_sha256,
        ]
    )


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    """Step 2."""
    return "\n".join([ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])


def signature(secret: str, timestamp: str, region: str, service: str, canonical: str) -> str:
    """Steps 2 and 3: the hex signature of a canonical request."""
    scope = f"{timestamp[:8]}/{region}/{service}/{TERMINATOR}"
    return hmac.new(
        signing_key(secret, timestamp[:8], region, service),
        string_to_sign(timestamp, scope, canonical).encode("utf-8"),
        hashlib.sha256,
    ).hexdigest()


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    access_key_id: str,
    secret: str,
    region: str,
    service: str,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus ``Host``, ``X-Amz-Date`` and ``Authorization`` for one request (every header signed).

    ``now`` (UTC) defaults to the current time; tests pass an old one to make a stale request.
    """
    parts = urllib.parse.urlsplit(url)
    when = now if now is not None else dt.datetime.now(dt.timezone.utc)
    timestamp = when.astimezone(dt.timezone.utc).strftime(TIMESTAMP_FORMAT)
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-amz-date", "host")}
    out["Host"] = parts.netloc
    out["X-Amz-Date"] = timestamp
    lowered: dict[str, list[str]] = {}
    for name, value in out.items():
        lowered.setdefault(name.lower(), []).append(value)
    signed = sorted(lowered)
    canonical = canonical_request(method, parts.path, parts.query, lowered, signed, hashlib.sha256(body).hexdigest())
    sig = signature(secret, timestamp, region, service, canonical)
    scope = f"{access_key_id}/{timestamp[:8]}/{region}/{service}/{TERMINATOR}"
    out["Authorization"] = f"{ALGORITHM} Credential={scope}, SignedHeaders={';'.join(signed)}, Signature={sig}"
    return out


@dataclass(frozen=True)
class Authorization:
    """The parts of an ``AWS4-HMAC-SHA256`` ``Authorization`` header."""

    access_key_id: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(values: Sequence[str]) -> Authorization:
    """The ``Authorization`` header's parts; a missing or malformed header is refused."""
    if not values:
        raise MissingAuthenticationTokenError("Missing Authentication Token")
    if len(values) > 1:
        raise IncompleteSignatureError("Authorization header appears more than once")
    algorithm, _, rest = values[0].strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureError(
            f"Authorization header must use the {ALGORITHM} algorithm (AWS Signature Version 4), got {algorithm[:20]!r}"
        )
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or key in fields:
            part = item.strip()[:40]
            raise IncompleteSignatureError(f"Authorization header has a malformed or repeated part {part!r}")
        fields[key] = value
    for key in ("Credential", "SignedHeaders", "Signature"):
        if key not in fields:
            raise IncompleteSignatureError(f"Authorization header requires '{key}' parameter.")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or not all(scope):
        raise IncompleteSignatureError(
            "Authorization header's Credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request"
        )
    names = tuple(fields["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(n) for n in names) or list(names) != sorted(set(names)):
        raise IncompleteSignatureError("SignedHeaders must be lower-case header names, sorted, separated by ';'")
    if not _HEX64.fullmatch(fields["Signature"]):
        raise IncompleteSignatureError("Signature must be 64 lower-case hexadecimal digits")
    key_id, date, region, service, terminator = scope
    return Authorization(key_id, date, region, service, terminator, names, fields["Signature"])


def verify(
    method: str,
    target: str,
    headers: Mapping[str, Sequence[str]],
    read_body: Callable[[], bytes],
    *,
    access_key_id: str,
    secret: str,
    region: str,
    service: str,
    now: float,
) -> bytes:
    """Check the request's SigV4 signature; returns the body (read once the header checks passed).

    ``target`` is the request line's target (path and query), ``headers`` maps lower-case names to their
    values, ``now`` is the server's clock (seconds since the epoch). Raises an :class:`~.base.UnauthorizedError`
    subclass; the body is read only after everything that can be checked without it passed.
    """
    auth = parse_authorization(headers.get("authorization", []))
    known = hmac.compare_digest(auth.access_key_id.encode(), access_key_id.encode())
    if not known or "x-amz-security-token" in headers:
        raise UnauthorizedError("The security token included in the request is invalid.")
    if auth.terminator != TERMINATOR:
        raise InvalidSignatureError(
            f"Credential should be scoped with a valid terminator: '{TERMINATOR}', not '{auth.terminator[:40]}'."
        )
    if auth.service != service:
        raise InvalidSignatureError(f"Credential should be scoped to correct service: '{service}'.")
    if auth.region != region:
        raise InvalidSignatureError(
            f"Credential should be scoped to a valid region, not '{auth.region[:40]}'. This server is '{region}'."
        )
    stamps = headers.get("x-amz-date", [])
    if len(stamps) != 1 or not _TIMESTAMP.fullmatch(stamps[0]):
        raise IncompleteSignatureError("the request needs one X-Amz-Date header (YYYYMMDDTHHMMSSZ)")
    stamp = stamps[0]
    try:
        when = dt.datetime.strptime(stamp, TIMESTAMP_FORMAT).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        raise IncompleteSignatureError(f"X-Amz-Date {stamp!r} is not a valid time") from None
    if auth.date != stamp[:8]:
        raise InvalidSignatureError(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{auth.date[:20]}' != '{stamp[:8]}', from '{stamp}'."
        )

    def fmt(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime(TIMESTAMP_FORMAT)

    if when < now - MAX_SKEW_S:
        raise InvalidSignatureError(
            f"Signature expired: {stamp} is now earlier than {fmt(now - MAX_SKEW_S)} ({fmt(now)} - 5 min.)"
        )
    if when > now + MAX_SKEW_S:
        raise InvalidSignatureError(
            f"Signature not yet current: {stamp} is still later than {fmt(now + MAX_SKEW_S)} ({fmt(now)} + 5 min.)"
        )
    signed = set(auth.signed_headers)
    unsigned = sorted(n for n in headers if (n in MUST_SIGN or n.startswith("x-amz-")) and n not in signed)
    if unsigned or "host" not in signed:
        raise InvalidSignatureError(
            f"the request must sign its {', '.join(unsigned or ['host'])} header(s) (SignedHeaders)"
        )
    absent = [n for n in auth.signed_headers if n not in headers]
    if absent:
        raise InvalidSignatureError(f"SignedHeaders names header(s) the request does not carry: {', '.join(absent)}")
    body = read_body()
    payload = hashlib.sha256(body).hexdigest()
    declared = headers.get("x-amz-content-sha256", [])
    if declared and declared != [payload]:
        raise InvalidSignatureError("The provided 'x-amz-content-sha256' header does not match what was computed.")
    path, _, query = target.partition("?")
    canonical = canonical_request(method, path, query, headers, auth.signed_headers, payload)
    expected = signature(secret, stamp, region, service, canonical)
    if not hmac.compare_digest(expected.encode(), auth.signature.encode()):
        raise InvalidSignatureError(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method."
        )
    return body
