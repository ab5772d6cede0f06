"""AWS Signature Version 4 verification for the S3 gateway: pure code, no I/O, no clock.

Where it sits: the HTTP layer receives a request head, describes it as a
:class:`SignedRequest` and calls :func:`parse_auth`, which says which access key signed the
request and how (``Authorization`` header or presigned URL). The gateway looks the key up
(and raises ``InvalidAccessKeyId`` itself when it does not know it: nothing here knows
keys), then calls :func:`verify` with the secret and the current time. ``verify`` checks the
clock and the signature and returns the :class:`SigningContext` the body readers need:
:class:`ContentSha256` for a body signed by its SHA-256 (``x-amz-content-sha256: <hex>``),
:class:`appendfs.s3.chunked.AwsChunkedDecoder` for ``aws-chunked`` bodies whose chunks carry
signatures of their own. Nothing in the body is authenticated until those readers finish.

Strings in a :class:`SignedRequest` are the bytes received, decoded as latin-1 (one
character per byte, the WSGI convention), so the canonical request re-encodes to exactly the
bytes the client signed, UTF-8 metadata and raw non-ASCII paths included.

Canonical request, as AWS builds it for S3: the path is used as sent (S3 neither normalises
nor double-encodes it, and botocore signs ``urlsplit(url).path`` verbatim); the query pairs
are sorted (``X-Amz-Signature`` left out of presigned URLs); signed header values are trimmed,
runs of whitespace collapse to one space and repeated headers join with ``,``. Clients
that percent-encode differently on the wire than in what they sign (an unencoded ``$`` in the
path, ``/`` in a query value) are accepted by a second, spec-normalised canonical request
(every name, value and path segment decoded and re-encoded with the RFC 3986 unreserved set,
``+`` in the query read as a space); both describe the same resource, so accepting either
gives a forger nothing.

Every refusal is an :class:`AuthError` whose ``code`` is the S3 error code; the HTTP layer
maps codes to statuses (see :class:`Code`). This module imports nothing from the rest of
``appendfs.s3``.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from appendfs.errors import AppendfsError

ALGORITHM: Final = "AWS4-HMAC-SHA256"
#: hex SHA-256 of no bytes: the "previous payload" of every chunk string-to-sign.
EMPTY_SHA256_HEX: Final = hashlib.sha256(b"").hexdigest()
#: AWS refuses header-signed requests whose x-amz-date is further than this from its clock.
DEFAULT_MAX_SKEW_S: Final = 15 * 60
#: The longest lifetime a presigned URL may ask for (X-Amz-Expires), 7 days.
MAX_PRESIGN_EXPIRES_S: Final = 7 * 24 * 3600

_SIGNATURE_MISMATCH: Final = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method."
)
_AMZ_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")
_SCOPE_DATE = re.compile(r"\d{8}")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# What bytes.split() treats as whitespace: the ASCII set botocore's `' '.join(v.split())`
# collapses. str.split() would also split latin-1 "\xa0", a byte inside UTF-8 characters.
_WHITESPACE = re.compile(r"[ \t\n\r\x0b\x0c]+")
_UNRESERVED = "-_.~"  # with ASCII letters and digits, what SigV4 leaves unencoded


class Code(enum.StrEnum):
    """S3 error codes this layer raises (HTTP status in the comment), plus the one it leaves
    to its caller."""

    ACCESS_DENIED = "AccessDenied"  # 403
    SIGNATURE_DOES_NOT_MATCH = "SignatureDoesNotMatch"  # 403
    #: 403; raised by the caller when parse_auth names a key it does not know.
    INVALID_ACCESS_KEY_ID = "InvalidAccessKeyId"
    REQUEST_TIME_TOO_SKEWED = "RequestTimeTooSkewed"  # 403
    AUTHORIZATION_HEADER_MALFORMED = "AuthorizationHeaderMalformed"  # 400
    AUTHORIZATION_QUERY_PARAMETERS_ERROR = "AuthorizationQueryParametersError"  # 400
    MISSING_SECURITY_HEADER = "MissingSecurityHeader"  # 400
    INVALID_REQUEST = "InvalidRequest"  # 400
    INVALID_ARGUMENT = "InvalidArgument"  # 400
    X_AMZ_CONTENT_SHA256_MISMATCH = "XAmzContentSHA256Mismatch"  # 400
    INCOMPLETE_BODY = "IncompleteBody"  # 400
    INVALID_DIGEST = "InvalidDigest"  # 400
    BAD_DIGEST = "BadDigest"  # 400
    INVALID_CHUNK_SIZE_ERROR = "InvalidChunkSizeError"  # 400
    MALFORMED_TRAILER_ERROR = "MalformedTrailerError"  # 400


class AuthError(AppendfsError):
    """A request (or its body) failed authentication or integrity checks: permanent.

    ``code`` is the S3 error code (a :class:`Code`), ``message`` the text for the XML error
    body, ``details`` extra elements AWS puts in that body (``StringToSign``,
    ``CanonicalRequest`` on a signature mismatch) to help client authors debug.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: Mapping[str, str] = dict(details or {})


class PayloadMode(enum.Enum):
    """How the body is protected, from ``x-amz-content-sha256`` (values as on the wire)."""

    SHA256 = "<hex sha-256 of the body>"
    UNSIGNED = "UNSIGNED-PAYLOAD"
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

    @property
    def aws_chunked(self) -> bool:
        """The body is ``aws-chunked`` framed (see appendfs.s3.chunked)."""
        return self.value.startswith("STREAMING-")

    @property
    def chunk_signatures(self) -> bool:
        """Every chunk carries a signature chained from the request's."""
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def trailer(self) -> bool:
        """Trailing headers (a checksum) follow the last chunk."""
        return self.value.endswith("-TRAILER")


_MODES_BY_VALUE: Final = {m.value: m for m in PayloadMode if m is not PayloadMode.SHA256}


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A request head as received. Every string is the wire bytes decoded as latin-1.

    ``raw_path`` is the request-target's path exactly as sent (percent-encoding kept),
    ``raw_query`` what followed ``?`` (empty when nothing), ``headers`` every header line
    in arrival order with lowercase names, repeated names kept.
    """

    method: str
    raw_path: str
    raw_query: str
    headers: tuple[tuple[str, str], ...]

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (lowercase), in arrival order."""
        return [v for n, v in self.headers if n == name]


@dataclass(frozen=True, slots=True)
class Auth:
    """What a request claims about its signer, before any check (from :func:`parse_auth`)."""

    access_key_id: str
    scope_date: str  # yyyymmdd of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]  # as listed by the client
    signature: str
    amz_date: str  # yyyymmddThhmmssZ, the timestamp that was signed
    amz_time_s: int  # amz_date as Unix seconds
    payload_mode: PayloadMode
    #: the literal payload line of the canonical request: a hex digest or a mode's name
    payload_hash: str
    presigned: bool
    expires_s: int | None  # X-Amz-Expires of a presigned URL, else None

    @property
    def scope(self) -> str:
        return f"{self.scope_date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True, slots=True)
class SigningContext:
    """A verified request's signing state: what checks its body need (chunk signatures)."""

    access_key_id: str
    signing_key: bytes = field(repr=False)  # HMAC key derived from the secret; never log it
    scope: str  # yyyymmdd/region/s3/aws4_request
    amz_date: str
    seed_signature: str  # the request's own signature: the "previous" of the first chunk
    payload_mode: PayloadMode
    payload_hash: str


# --------------------------------------------------------------------------- parsing


def parse_auth(request: SignedRequest) -> Auth | None:
    """Read who claims to have signed ``request``; None for an anonymous request.

    Checks only the form of the claim; the signature and the clock are :func:`verify`'s.
    """
    authorization = request.header_values("authorization")
    query = _query_params(request.raw_query)
    presigned = "X-Amz-Algorithm" in query or "X-Amz-Credential" in query
    if authorization and (presigned or "Signature" in query):
        raise AuthError(Code.INVALID_ARGUMENT, "Only one auth mechanism allowed; only the "
                        "X-Amz-Algorithm query parameter, Signature query string parameter "
                        "or the Authorization header should be specified")
    if authorization:
        if len(authorization) > 1:
            raise AuthError(Code.AUTHORIZATION_HEADER_MALFORMED,
                            "The authorization header is malformed; it appears more than once.")
        return _parse_header_auth(request, authorization[0])
    if presigned:
        return _parse_presigned(request, query)
    if "AWSAccessKeyId" in query and "Signature" in query:
        raise AuthError(Code.INVALID_REQUEST, _UNSUPPORTED_MECHANISM)
    return None


_UNSUPPORTED_MECHANISM: Final = (
    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
)


def _parse_header_auth(request: SignedRequest, value: str) -> Auth:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        if algorithm in ("AWS", "AWS4-ECDSA-P256-SHA256"):  # SigV2, SigV4a
            raise AuthError(Code.INVALID_REQUEST, _UNSUPPORTED_MECHANISM)
        raise AuthError(Code.INVALID_ARGUMENT, "Unsupported Authorization Type")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, field_value = part.strip().partition("=")
        if not eq or name in fields:
            raise _malformed_header(f"the component {part.strip()!r} is malformed")
        fields[name] = field_value
    missing = [f for f in ("Credential", "SignedHeaders", "Signature") if f not in fields]
    if missing:
        raise _malformed_header(f"missing {', '.join(missing)}")
    key, scope_date, region, service = _parse_credential(
        fields["Credential"], Code.AUTHORIZATION_HEADER_MALFORMED)
    amz_date, amz_time_s = _header_auth_date(request)
    if scope_date != amz_date[:8]:
        raise _malformed_header("Invalid credential date. Date is not the same as X-Amz-Date.")
    hashes = request.header_values("x-amz-content-sha256")
    if not hashes:
        raise AuthError(Code.INVALID_REQUEST,
                        "Missing required header for this request: x-amz-content-sha256")
    mode, payload_hash = _payload_mode(hashes[-1])
    return Auth(access_key_id=key, scope_date=scope_date, region=region, service=service,
                signed_headers=_parse_signed_headers(fields["SignedHeaders"],
                                                     Code.AUTHORIZATION_HEADER_MALFORMED),
                signature=fields["Signature"], amz_date=amz_date, amz_time_s=amz_time_s,
                payload_mode=mode, payload_hash=payload_hash, presigned=False, expires_s=None)


def _malformed_header(why: str) -> AuthError:
    return AuthError(Code.AUTHORIZATION_HEADER_MALFORMED,
                     f"The authorization header is malformed; {why}")


def _header_auth_date(request: SignedRequest) -> tuple[str, int]:
    """The signed timestamp: x-amz-date, or else the Date header (which SigV4 also allows)."""
    amz_dates = request.header_values("x-amz-date")
    if amz_dates:
        parsed = _parse_amz_date(amz_dates[-1].strip())
        if parsed is not None:
            return amz_dates[-1].strip(), parsed
    else:
        dates = request.header_values("date")
        try:
            when = parsedate_to_datetime(dates[-1]) if dates else None
        except (TypeError, ValueError):
            when = None
        if when is not None:
            # "-0000" (what formatdate writes) parses naive: it is UTC all the same.
            seconds = int(when.replace(tzinfo=when.tzinfo or datetime.UTC).timestamp())
            return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds)), seconds
    raise AuthError(Code.ACCESS_DENIED,
                    "AWS authentication requires a valid Date or x-amz-date header")


def _parse_presigned(request: SignedRequest, query: Mapping[str, str]) -> Auth:
    bad = Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR
    required = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date",
                "X-Amz-SignedHeaders", "X-Amz-Expires")
    if any(name not in query for name in required):
        raise AuthError(bad, "Query-string authentication version 4 requires the "
                        "X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature, X-Amz-Date, "
                        "X-Amz-SignedHeaders, and X-Amz-Expires parameters.")
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise AuthError(bad, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    key, scope_date, region, service = _parse_credential(query["X-Amz-Credential"], bad)
    amz_date = query["X-Amz-Date"]
    amz_time_s = _parse_amz_date(amz_date)
    if amz_time_s is None:
        raise AuthError(bad, "X-Amz-Date must be in the ISO8601 Long Format "
                        "\"yyyyMMdd'T'HHmmss'Z'\"")
    if scope_date != amz_date[:8]:
        raise AuthError(bad, "Invalid credential date. Date is not the same as X-Amz-Date.")
    expires = query["X-Amz-Expires"]
    if not (expires.isascii() and expires.isdigit()):
        raise AuthError(bad, "X-Amz-Expires should be a number")
    if int(expires) > MAX_PRESIGN_EXPIRES_S:
        raise AuthError(bad, "X-Amz-Expires must be less than a week (in seconds) that is 604800")
    # Presigned URLs carry no body hash unless the client chose to sign one.
    content_sha256 = next((v for k, v in query.items() if k.lower() == "x-amz-content-sha256"),
                          None)
    if content_sha256 is None:
        headers = request.header_values("x-amz-content-sha256")
        content_sha256 = headers[-1] if headers else PayloadMode.UNSIGNED.value
    mode, payload_hash = _payload_mode(content_sha256)
    return Auth(access_key_id=key, scope_date=scope_date, region=region, service=service,
                signed_headers=_parse_signed_headers(query["X-Amz-SignedHeaders"], bad),
                signature=query["X-Amz-Signature"], amz_date=amz_date, amz_time_s=amz_time_s,
                payload_mode=mode, payload_hash=payload_hash, presigned=True,
                expires_s=int(expires))


def _parse_credential(value: str, code: Code) -> tuple[str, str, str, str]:
    """``AKID/yyyymmdd/region/service/aws4_request`` → its four parts."""
    parts = value.strip().rsplit("/", 4)
    if len(parts) != 5 or parts[4] != "aws4_request" or not _SCOPE_DATE.fullmatch(parts[1]) \
            or not parts[0] or not parts[2]:
        raise AuthError(code, "the Credential is mal-formed; expecting "
                        '"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".')
    if parts[3] != "s3":
        raise AuthError(code, f'incorrect service "{parts[3]}". This endpoint belongs to "s3".')
    return parts[0], parts[1], parts[2], parts[3]


def _parse_signed_headers(value: str, code: Code) -> tuple[str, ...]:
    names = tuple(value.strip().split(";"))
    if any(not n or n != n.lower() or n.strip() != n for n in names) or \
            len(set(names)) != len(names):
        raise AuthError(code, f"SignedHeaders {value!r} is malformed: it must list distinct "
                        "lowercase header names separated by ';'")
    return names


def _payload_mode(value: str) -> tuple[PayloadMode, str]:
    mode = _MODES_BY_VALUE.get(value)
    if mode is not None:
        return mode, value
    if _HEX_SHA256.fullmatch(value):
        return PayloadMode.SHA256, value
    if value.startswith("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"):
        raise AuthError(Code.INVALID_REQUEST, _UNSUPPORTED_MECHANISM)
    raise AuthError(Code.INVALID_ARGUMENT, "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                    "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
                    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
                    {"ArgumentName": "x-amz-content-sha256", "ArgumentValue": value})


def _parse_amz_date(value: str) -> int | None:
    """``yyyymmddThhmmssZ`` → Unix seconds; None when malformed or out of range."""
    match = _AMZ_DATE.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 1, month)[1]
            and hour < 24 and minute < 60 and second < 60 and year >= 1970):
        return None
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


def _query_params(raw_query: str) -> dict[str, str]:
    """Decoded query parameters (first occurrence wins), for reading the auth parameters."""
    params: dict[str, str] = {}
    for pair in raw_query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params.setdefault(_unquote(name), _unquote(value))
    return params


def _unquote(text: str) -> str:
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "replace")


# --------------------------------------------------------------------------- verifying


def verify(request: SignedRequest, auth: Auth, secret_key: str, now_s: float,
           max_skew_s: float = DEFAULT_MAX_SKEW_S, *, region: str | None = None) -> SigningContext:
    """Check ``request``'s signature by ``secret_key`` (the secret of ``auth.access_key_id``).

    ``now_s`` is the gateway's clock in Unix seconds. A header-signed request must be
    signed within ``max_skew_s`` of it; a presigned URL is valid from ``max_skew_s``
    before its X-Amz-Date until X-Amz-Expires after it. With ``region`` given, the
    credential scope must name it. Returns what the body readers need.
    """
    if region is not None and auth.region != region:
        code = (Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR if auth.presigned
                else Code.AUTHORIZATION_HEADER_MALFORMED)
        raise AuthError(code, f"the region '{auth.region}' is wrong; expecting '{region}'",
                        {"Region": region})
    _check_signed_headers(request, auth)
    _check_clock(auth, now_s, max_skew_s)
    key = signing_key(secret_key, auth.scope_date, auth.region, auth.service)
    provided = auth.signature.encode("utf-8", "replace")
    first: tuple[str, str] | None = None
    for canonical in _canonical_requests(request, auth):
        to_sign = string_to_sign(auth.amz_date, auth.scope, canonical)
        expected = hmac.new(key, to_sign.encode("ascii"), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected.encode("ascii"), provided):
            return SigningContext(access_key_id=auth.access_key_id, signing_key=key,
                                  scope=auth.scope, amz_date=auth.amz_date,
                                  seed_signature=expected, payload_mode=auth.payload_mode,
                                  payload_hash=auth.payload_hash)
        first = first or (canonical, to_sign)
    assert first is not None
    raise AuthError(Code.SIGNATURE_DOES_NOT_MATCH, _SIGNATURE_MISMATCH, {
        "AWSAccessKeyId": auth.access_key_id, "StringToSign": first[1],
        "SignatureProvided": auth.signature, "CanonicalRequest": first[0]})


def _check_signed_headers(request: SignedRequest, auth: Auth) -> None:
    signed = set(auth.signed_headers)
    code = (Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR if auth.presigned
            else Code.AUTHORIZATION_HEADER_MALFORMED)
    if "host" not in signed:
        raise AuthError(code, "SignedHeaders must include the host header")
    unsigned = sorted({n for n, _ in request.headers if n.startswith("x-amz-")} - signed)
    if unsigned:
        raise AuthError(Code.ACCESS_DENIED, "There were headers present in the request which "
                        f"were not signed: {', '.join(unsigned)}",
                        {"HeadersNotSigned": ", ".join(unsigned)})


def _check_clock(auth: Auth, now_s: float, max_skew_s: float) -> None:
    if not auth.presigned:
        if abs(now_s - auth.amz_time_s) > max_skew_s:
            raise AuthError(Code.REQUEST_TIME_TOO_SKEWED, "The difference between the request "
                            "time and the current time is too large.",
                            {"RequestTime": auth.amz_date, "MaxAllowedSkewMilliseconds":
                             str(int(max_skew_s * 1000))})
        return
    if now_s < auth.amz_time_s - max_skew_s:
        raise AuthError(Code.ACCESS_DENIED, "Request is not valid yet")
    assert auth.expires_s is not None
    if now_s > auth.amz_time_s + auth.expires_s:
        raise AuthError(Code.ACCESS_DENIED, "Request has expired",
                        {"X-Amz-Expires": str(auth.expires_s)})


def signing_key(secret_key: str, scope_date: str, region: str, service: str = "s3") -> bytes:
    """The SigV4 signing key: HMAC chain over the scope, keyed by ``"AWS4" + secret``."""
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (scope_date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(_wire_bytes(canonical_request)).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _canonical_requests(request: SignedRequest, auth: Auth) -> list[str]:
    """The canonical request as sent (botocore's), then its spec-normalised form if different."""
    head = canonical_headers(request, auth.signed_headers)
    tail = f"{head}\n{';'.join(auth.signed_headers)}\n{auth.payload_hash}"
    skip = "X-Amz-Signature" if auth.presigned else None
    as_sent = (f"{request.method}\n{request.raw_path or '/'}\n"
               f"{_query_as_sent(request.raw_query, skip)}\n{tail}")
    normalised = (f"{request.method}\n{_normalise_path(request.raw_path)}\n"
                  f"{_query_normalised(request.raw_query, skip)}\n{tail}")
    return [as_sent] if normalised == as_sent else [as_sent, normalised]


def canonical_headers(request: SignedRequest, signed_headers: Iterable[str]) -> str:
    """``name:value\\n`` for each signed header, values trimmed and joined with ``,``."""
    values: dict[str, list[str]] = {}
    for name, value in request.headers:
        values.setdefault(name, []).append(_WHITESPACE.sub(" ", value).strip(" "))
    return "".join(f"{name}:{','.join(values.get(name, ()))}\n" for name in signed_headers)


def _query_as_sent(raw_query: str, skip: str | None) -> str:
    """botocore's canonical query: the pairs as on the wire, sorted."""
    pairs = []
    for pair in raw_query.split("&") if raw_query else ():
        name, _, value = pair.partition("=")
        if skip is None or _unquote(name) != skip:
            pairs.append((name, value))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _query_normalised(raw_query: str, skip: str | None) -> str:
    """The spec's canonical query: names and values decoded, re-encoded strictly, sorted."""
    pairs = []
    for pair in raw_query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            name_bytes = unquote_to_bytes(name.replace("+", " "))
            if skip is None or name_bytes != skip.encode():
                pairs.append((quote(name_bytes, safe=_UNRESERVED),
                              quote(unquote_to_bytes(value.replace("+", " ")), safe=_UNRESERVED)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _normalise_path(raw_path: str) -> str:
    return quote(unquote_to_bytes(raw_path or "/"), safe="/" + _UNRESERVED)


def _wire_bytes(text: str) -> bytes:
    """``text`` as the bytes received (latin-1); UTF-8 if a caller passed decoded text."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- payload hash


class ContentSha256:
    """Checks a body against its signed ``x-amz-content-sha256`` hex digest.

    Feed every body byte to :meth:`update`, then call :meth:`verify`; until then the body
    is unauthenticated and must not be committed.
    """

    def __init__(self, expected_hex: str) -> None:
        self._expected_hex = expected_hex.lower()
        self._hash = hashlib.sha256()

    @classmethod
    def for_context(cls, context: SigningContext) -> ContentSha256 | None:
        """A checker when the signature covers the body's hash, else None."""
        if context.payload_mode is PayloadMode.SHA256:
            return cls(context.payload_hash)
        return None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def verify(self) -> None:
        computed = self._hash.hexdigest()
        if not hmac.compare_digest(computed, self._expected_hex):
            raise AuthError(Code.X_AMZ_CONTENT_SHA256_MISMATCH, "The provided "
                            "'x-amz-content-sha256' header does not match what was computed.",
                            {"ClientComputedContentSHA256": self._expected_hex,
                             "S3ComputedContentSHA256": computed})
