"""The aws-chunked decoder: AWS's worked examples, what boto3 really streams (captured over
TLS on loopback), signed bodies made per the AWS spec, limits, and property tests."""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import io
import itertools
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st
from s3_capture import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Captured,
    CaptureServer,
    s3_client,
    self_signed_cert,
    server_tls,
)

from appendfs.s3.checksums import ChecksumVerifier, expected_checksums
from appendfs.s3.chunked import (
    DEFAULT_MAX_TRAILER_BYTES,
    MAX_CHUNK_LINE_BYTES,
    AwsChunkedDecoder,
    parse_trailer_header,
)
from appendfs.s3.sigv4 import (
    EMPTY_SHA256_HEX,
    AuthError,
    Code,
    PayloadMode,
    SignedRequest,
    SigningContext,
    parse_auth,
    signing_key,
    verify,
)

# --------------------------------------------------------------------------- a spec signer
# botocore and awscrt (Python) have no chunk signer, so signed bodies are made here, per the
# AWS spec (sigv4-streaming, sigv4-streaming-trailers); test_our_chunk_signer_reproduces_*
# shows this signer reproduces AWS's own worked examples byte for byte.


def chunk_signature(context: SigningContext, previous: str, data: bytes) -> str:
    to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", context.amz_date, context.scope, previous,
                         EMPTY_SHA256_HEX, hashlib.sha256(data).hexdigest()])
    return hmac.new(context.signing_key, to_sign.encode(), hashlib.sha256).hexdigest()


def encode(context: SigningContext, payload: bytes, chunk_bytes: int,
           trailers: dict[str, str] | None = None) -> bytes:
    """The aws-chunked body for ``payload`` in ``context``'s payload mode."""
    return encode_with_offsets(context, payload, chunk_bytes, trailers)[0]


def encode_with_offsets(context: SigningContext, payload: bytes, chunk_bytes: int,
                        trailers: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The body, and where each payload byte is in it."""
    offsets: list[int] = []
    signed = context.payload_mode.chunk_signatures
    pieces = [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] + [b""]
    out = bytearray()
    previous = context.seed_signature
    for piece in pieces:
        if signed:
            previous = chunk_signature(context, previous, piece)
            out += b"%x;chunk-signature=%s\r\n" % (len(piece), previous.encode())
        else:
            out += b"%x\r\n" % len(piece)
        if piece:
            offsets.extend(range(len(out), len(out) + len(piece)))
            out += piece + b"\r\n"
    for name, value in (trailers or {}).items():
        out += f"{name}:{value}\r\n".encode()
    if context.payload_mode is PayloadMode.STREAMING_SIGNED_TRAILER:
        canonical = "".join(f"{n}:{v}\n" for n, v in sorted((trailers or {}).items()))
        to_sign = "\n".join(["AWS4-HMAC-SHA256-TRAILER", context.amz_date, context.scope,
                             previous, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(context.signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        out += f"x-amz-trailer-signature:{signature}\r\n".encode()
    out += b"\r\n"
    return bytes(out), offsets


def decode(context: SigningContext, body: bytes, splits: list[int] | None = None,
           **kwargs: Any) -> tuple[bytes, dict[str, str]]:
    decoder = AwsChunkedDecoder(context.payload_mode, context, **kwargs)
    out = bytearray()
    bounds = [0, *sorted(splits or []), len(body)]
    for start, end in itertools.pairwise(bounds):
        for piece in decoder.feed(body[start:end]):
            out += piece
    return bytes(out), decoder.end()


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def make_context(mode: PayloadMode, seed: str = "f" * 64) -> SigningContext:
    key = signing_key(SECRET_KEY, "20240101", REGION)
    return SigningContext(ACCESS_KEY, key, f"20240101/{REGION}/s3/aws4_request",
                          "20240101T000000Z", seed, mode, mode.value)


# --------------------------------------------------------------------------- AWS's examples
# "Example: PUT Object" of the S3 API reference, sigv4-streaming (signed chunks) and
# sigv4-streaming-trailers (signed chunks and a signed CRC32C trailer): 65536 + 1024 bytes of
# "a", example credentials, 2013-05-24T00:00:00Z. The signatures are AWS's published values.

AWS_DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_DOC_TIME_S = calendar.timegm((2013, 5, 24, 0, 0, 0))
AWS_DOC_PAYLOAD = b"a" * 66560
AWS_DOC: dict[PayloadMode, dict[str, Any]] = {
    PayloadMode.STREAMING_SIGNED: dict(
        headers=(("content-length", "66824"),),
        signed="content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
               "x-amz-decoded-content-length;x-amz-storage-class",
        signatures=["4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
                    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
                    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
                    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"],
        trailer=None),
    PayloadMode.STREAMING_SIGNED_TRAILER: dict(
        headers=(("x-amz-trailer", "x-amz-checksum-crc32c"),),
        signed="content-encoding;host;x-amz-content-sha256;x-amz-date;"
               "x-amz-decoded-content-length;x-amz-storage-class;x-amz-trailer",
        signatures=["106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
                    "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
                    "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
                    "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
                    "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"],
        trailer=("x-amz-checksum-crc32c", "sOO8/Q==")),
}


def aws_doc_request(mode: PayloadMode) -> tuple[SignedRequest, bytes]:
    doc = AWS_DOC[mode]
    seed, first, second, final, *trailer_sig = doc["signatures"]
    headers = (("host", "s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"),
               ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
               ("authorization", f"AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/"
                f"us-east-1/s3/aws4_request,SignedHeaders={doc['signed']},Signature={seed}"),
               ("x-amz-content-sha256", mode.value), ("content-encoding", "aws-chunked"),
               ("x-amz-decoded-content-length", "66560"), *doc["headers"])
    body = (b"10000;chunk-signature=" + first.encode() + b"\r\n" + b"a" * 65536 + b"\r\n"
            + b"400;chunk-signature=" + second.encode() + b"\r\n" + b"a" * 1024 + b"\r\n"
            + b"0;chunk-signature=" + final.encode() + b"\r\n")
    if doc["trailer"]:
        name, value = doc["trailer"]
        body += f"{name}:{value}\r\nx-amz-trailer-signature:{trailer_sig[0]}\r\n".encode()
    return SignedRequest("PUT", "/examplebucket/chunkObject.txt", "", headers), body + b"\r\n"


@pytest.mark.parametrize("mode", list(AWS_DOC))
def test_the_aws_documentation_chunked_examples(mode: PayloadMode) -> None:
    request, body = aws_doc_request(mode)
    if mode is PayloadMode.STREAMING_SIGNED:
        assert len(body) == 66824  # the example's Content-Length
    auth = parse_auth(request)
    assert auth is not None and auth.payload_mode is mode
    context = verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S)
    trailer_names = parse_trailer_header(request.header_values("x-amz-trailer"))
    payload, trailers = decode(context, body, decoded_length_bytes=66560,
                               trailer_names=trailer_names)
    assert payload == AWS_DOC_PAYLOAD
    checks = ChecksumVerifier(expected_checksums(request.headers, trailer_names))
    checks.update(payload)
    checks.verify(trailers)
    trailer = AWS_DOC[mode]["trailer"]
    assert trailers == (dict([trailer]) if trailer else {})


@pytest.mark.parametrize("mode", list(AWS_DOC))
def test_our_chunk_signer_reproduces_the_aws_examples(mode: PayloadMode) -> None:
    request, body = aws_doc_request(mode)
    auth = parse_auth(request)
    assert auth is not None
    context = verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S)
    trailer = AWS_DOC[mode]["trailer"]
    assert encode(context, AWS_DOC_PAYLOAD, 65536, dict([trailer]) if trailer else None) == body


@pytest.mark.parametrize("mode", list(AWS_DOC))
def test_the_aws_examples_with_a_wrong_secret_or_a_changed_byte(mode: PayloadMode) -> None:
    request, body = aws_doc_request(mode)
    auth = parse_auth(request)
    assert auth is not None
    context = verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S)
    wrong_key = SigningContext(context.access_key_id, signing_key("x", "20130524", "us-east-1"),
                               context.scope, context.amz_date, context.seed_signature,
                               context.payload_mode, context.payload_hash)
    with pytest.raises(AuthError) as raised:
        decode(wrong_key, body)
    assert raised.value.code == Code.SIGNATURE_DOES_NOT_MATCH
    changed = bytearray(body)
    changed[70000 if len(body) > 70000 else 30000] ^= 1
    with pytest.raises(AuthError):
        decode(context, bytes(changed))


# --------------------------------------------------------------------------- signed by botocore


def botocore_streaming_request(mode: PayloadMode, decoded_bytes: int,
                               trailer: str | None) -> SignedRequest:
    """A request head signed by botocore's S3 signer with the payload line forced to ``mode``
    (botocore itself never sends signed chunks)."""
    headers = {"Content-Encoding": "aws-chunked",
               "X-Amz-Decoded-Content-Length": str(decoded_bytes)}
    if trailer:
        headers["X-Amz-Trailer"] = trailer
    request = AWSRequest(method="PUT", url="http://127.0.0.1:9000/bucket/obj%20key", data=b"",
                         headers=headers)
    signer = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION)
    signer.payload = lambda _request: mode.value
    signer.add_auth(request)
    return SignedRequest("PUT", "/bucket/obj%20key", "", (("host", "127.0.0.1:9000"), *(
        (n.lower(), str(v)) for n, v in request.headers.items())))


@pytest.mark.parametrize("mode", [PayloadMode.STREAMING_SIGNED,
                                  PayloadMode.STREAMING_SIGNED_TRAILER,
                                  PayloadMode.STREAMING_UNSIGNED_TRAILER])
@pytest.mark.parametrize(("size", "chunk_bytes"), [(0, 8192), (1, 8192), (8192, 8192),
                                                   (300_000, 65536), (100_000, 1 << 20)])
def test_bodies_of_botocore_signed_requests(mode: PayloadMode, size: int, chunk_bytes: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    trailer = "x-amz-checksum-crc32" if mode.trailer else None
    request = botocore_streaming_request(mode, size, trailer)
    auth = parse_auth(request)
    assert auth is not None
    context = verify(request, auth, SECRET_KEY, auth.amz_time_s)
    body = encode(context, payload, chunk_bytes,
                  {trailer: crc32_b64(payload)} if trailer else None)
    names = parse_trailer_header(request.header_values("x-amz-trailer"))
    decoded, trailers = decode(context, body, [len(body) // 3, len(body) // 2],
                               decoded_length_bytes=size, trailer_names=names)
    assert decoded == payload
    checks = ChecksumVerifier(expected_checksums(request.headers, names))
    checks.update(decoded)
    checks.verify(trailers)


# --------------------------------------------------------------------------- boto3 over TLS


@pytest.fixture(scope="module")
def tls_wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaptureServer, Path]]:
    made = self_signed_cert(tmp_path_factory.mktemp("tls"))
    if made is None:
        print("SKIP REASON: no openssl CLI to make a loopback certificate")
        pytest.skip("needs the openssl CLI for a loopback TLS certificate")
    cert, key = made
    with CaptureServer(server_tls(cert, key)) as server:
        yield server, cert


class NonSeekable:
    """A body boto3 can only read once, front to back (a pipe, a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


PAYLOAD = bytes(range(256)) * 9000  # 2.2 MiB: three of botocore's 1 MiB chunks


@pytest.mark.parametrize(("label", "kwargs"), [
    ("bytes", {"Body": PAYLOAD}),
    ("empty", {"Body": b""}),
    ("non-seekable with length", {"Body": NonSeekable(PAYLOAD), "ContentLength": len(PAYLOAD)}),
    ("non-seekable", {"Body": NonSeekable(PAYLOAD)}),
    ("crc32c", {"Body": PAYLOAD, "ChecksumAlgorithm": "CRC32C"}),
    ("crc64nvme", {"Body": PAYLOAD, "ChecksumAlgorithm": "CRC64NVME"}),
    ("sha1", {"Body": PAYLOAD, "ChecksumAlgorithm": "SHA1"}),
    ("sha256", {"Body": PAYLOAD, "ChecksumAlgorithm": "SHA256"}),
    ("upload_part", {"Body": PAYLOAD, "UploadId": "upload+1", "PartNumber": 3}),
])
def test_what_boto3_streams_over_https(tls_wire: tuple[CaptureServer, Path], label: str,
                                       kwargs: dict[str, Any]) -> None:
    server, cert = tls_wire
    client = s3_client(server.url, ca_bundle=cert)
    operation = client.upload_part if "UploadId" in kwargs else client.put_object
    before = len(server.requests)
    operation(Bucket="bucket", Key="dir/a key+ü", **kwargs)
    assert len(server.requests) == before + 1
    captured: Captured = server.requests[-1]
    expected = kwargs["Body"] if isinstance(kwargs["Body"], bytes) else PAYLOAD
    payload, computed = check_captured(captured)
    assert payload == expected, label
    algorithm = kwargs.get("ChecksumAlgorithm", "CRC32").lower()
    assert [a.value for a in computed] == [algorithm]


def check_captured(captured: Captured) -> tuple[bytes, dict[Any, str]]:
    """Verify a captured streaming upload the way the gateway will."""
    request = captured.signed_request()
    auth = parse_auth(request)
    assert auth is not None
    # boto3 over https: the seed is signed, the chunks are not, a checksum trails them.
    assert auth.payload_mode is PayloadMode.STREAMING_UNSIGNED_TRAILER
    assert captured.header("content-encoding") == "aws-chunked"
    context = verify(request, auth, SECRET_KEY, auth.amz_time_s + 1)
    names = parse_trailer_header(request.header_values("x-amz-trailer"))
    decoded_length = captured.header("x-amz-decoded-content-length")
    payload, trailers = decode(context, captured.body, [7, len(captured.body) // 2],
                               decoded_length_bytes=int(decoded_length) if decoded_length
                               else None, trailer_names=names)
    checks = ChecksumVerifier(expected_checksums(request.headers, names))
    checks.update(payload)
    return payload, checks.verify(trailers)


def test_boto3_stream_with_a_changed_byte_fails_its_checksum(
        tls_wire: tuple[CaptureServer, Path]) -> None:
    server, cert = tls_wire
    s3_client(server.url, ca_bundle=cert).put_object(Bucket="b", Key="k", Body=PAYLOAD)
    captured = server.requests[-1]
    body = bytearray(captured.body)
    body[100_000] ^= 0x40
    tampered = Captured(captured.method, captured.target, captured.headers, bytes(body))
    with pytest.raises(AuthError) as raised:
        check_captured(tampered)
    assert raised.value.code == Code.BAD_DIGEST


# --------------------------------------------------------------------------- refusals

SIGNED = make_context(PayloadMode.STREAMING_SIGNED)
SIGNED_TRAILER = make_context(PayloadMode.STREAMING_SIGNED_TRAILER)
UNSIGNED_TRAILER = make_context(PayloadMode.STREAMING_UNSIGNED_TRAILER)
CRC_NAME = "x-amz-checksum-crc32"


def refused(context: SigningContext, body: bytes, code: str, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as raised:
        decode(context, body, **kwargs)
    assert raised.value.code == code, raised.value
    return raised.value


def test_truncated_bodies_are_incomplete() -> None:
    body = encode(SIGNED, b"x" * 20000, 8192)
    for cut in (1, 5, 100, 8300, len(body) - 90):
        refused(SIGNED, body[:cut], Code.INCOMPLETE_BODY)
    refused(SIGNED, b"", Code.INCOMPLETE_BODY)


def test_a_missing_final_empty_line_is_tolerated() -> None:
    body = encode(UNSIGNED_TRAILER, b"x" * 100, 64, {CRC_NAME: crc32_b64(b"x" * 100)})
    payload, trailers = decode(UNSIGNED_TRAILER, body[:-2], trailer_names=[CRC_NAME])
    assert payload == b"x" * 100 and CRC_NAME in trailers
    # ... but not a missing trailer: the one x-amz-trailer announced must come.
    cut = body.index(b"x-amz-checksum")
    refused(UNSIGNED_TRAILER, body[:cut], Code.MALFORMED_TRAILER_ERROR, trailer_names=[CRC_NAME])


def test_chunk_size_limits() -> None:
    refused(SIGNED, b"1" * (MAX_CHUNK_LINE_BYTES + 1), Code.INVALID_CHUNK_SIZE_ERROR)
    refused(UNSIGNED_TRAILER, b"1000001\r\n", Code.INVALID_CHUNK_SIZE_ERROR)
    refused(UNSIGNED_TRAILER, b"401\r\n", Code.INVALID_CHUNK_SIZE_ERROR, max_chunk_bytes=1024)
    refused(UNSIGNED_TRAILER, b"1g\r\n", Code.INVALID_CHUNK_SIZE_ERROR)
    refused(UNSIGNED_TRAILER, b"-1\r\n", Code.INVALID_CHUNK_SIZE_ERROR)
    refused(UNSIGNED_TRAILER, b"10\n", Code.INVALID_CHUNK_SIZE_ERROR)  # bare LF
    refused(UNSIGNED_TRAILER, b"3\r\nabcd\r\n", Code.INVALID_REQUEST)  # data longer than size


def test_trailer_limits_and_form() -> None:
    head = b"0\r\n"
    long_trailer = head + b"x-amz-meta:" + b"v" * DEFAULT_MAX_TRAILER_BYTES + b"\r\n\r\n"
    refused(UNSIGNED_TRAILER, long_trailer, Code.MALFORMED_TRAILER_ERROR)
    refused(UNSIGNED_TRAILER, head + b"no colon\r\n\r\n", Code.MALFORMED_TRAILER_ERROR)
    refused(UNSIGNED_TRAILER, head + b"a:1\r\na:2\r\n\r\n", Code.MALFORMED_TRAILER_ERROR)
    refused(UNSIGNED_TRAILER, head + b"other:1\r\n\r\n", Code.MALFORMED_TRAILER_ERROR,
            trailer_names=[CRC_NAME])
    refused(UNSIGNED_TRAILER, head + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n",
            Code.MALFORMED_TRAILER_ERROR)
    # No trailers at all in a mode without them.
    final = chunk_signature(SIGNED, SIGNED.seed_signature, b"")
    refused(SIGNED, f"0;chunk-signature={final}\r\na:1\r\n\r\n".encode(),
            Code.MALFORMED_TRAILER_ERROR)


def test_signed_trailers_need_their_signature() -> None:
    body = encode(SIGNED_TRAILER, b"abc", 8192, {CRC_NAME: crc32_b64(b"abc")})
    cut = body.index(b"x-amz-trailer-signature")
    refused(SIGNED_TRAILER, body[:cut] + b"\r\n", Code.SIGNATURE_DOES_NOT_MATCH)
    other = body.replace(crc32_b64(b"abc").encode(), crc32_b64(b"abd").encode())
    refused(SIGNED_TRAILER, other, Code.SIGNATURE_DOES_NOT_MATCH)


def test_chunk_signatures_are_required_and_chained() -> None:
    refused(SIGNED, b"3\r\nabc\r\n", Code.SIGNATURE_DOES_NOT_MATCH)
    refused(SIGNED, b"3;chunk-signature=xyz\r\nabc\r\n", Code.SIGNATURE_DOES_NOT_MATCH)
    # Chunks reordered (each validly signed in another position) are refused.
    one = encode(SIGNED, b"A" * 10 + b"B" * 10, 10)
    lines = one.split(b"\r\n")
    swapped = b"\r\n".join([lines[2], lines[3], lines[0], lines[1], *lines[4:]])
    refused(SIGNED, swapped, Code.SIGNATURE_DOES_NOT_MATCH)


def test_decoded_length_must_match() -> None:
    body = encode(UNSIGNED_TRAILER, b"x" * 100, 64)
    refused(UNSIGNED_TRAILER, body, Code.INCOMPLETE_BODY, decoded_length_bytes=99)
    refused(UNSIGNED_TRAILER, body, Code.INCOMPLETE_BODY, decoded_length_bytes=101)
    assert decode(UNSIGNED_TRAILER, body, decoded_length_bytes=100)[0] == b"x" * 100


def test_nothing_may_follow_the_body_and_errors_stick() -> None:
    body = encode(UNSIGNED_TRAILER, b"x", 64)
    refused(UNSIGNED_TRAILER, body + b"0\r\n", Code.INVALID_REQUEST)
    decoder = AwsChunkedDecoder(UNSIGNED_TRAILER.payload_mode, UNSIGNED_TRAILER)
    with pytest.raises(AuthError):
        decoder.feed(b"zz\r\n")
    with pytest.raises(AuthError):
        decoder.feed(body)
    with pytest.raises(AuthError):
        decoder.end()


def test_signed_chunk_data_is_released_only_once_verified() -> None:
    body = encode(SIGNED, b"y" * 1000, 1000)
    decoder = AwsChunkedDecoder(SIGNED.payload_mode, SIGNED)
    assert decoder.feed(body[:500]) == []  # header and half the data: nothing released yet
    assert b"".join(decoder.feed(body[500:])) == b"y" * 1000
    assert decoder.end() == {} and decoder.done


def test_modes_and_contexts() -> None:
    with pytest.raises(ValueError, match="not an aws-chunked"):
        AwsChunkedDecoder(PayloadMode.UNSIGNED, make_context(PayloadMode.UNSIGNED))
    with pytest.raises(ValueError, match="needs the SigningContext"):
        AwsChunkedDecoder(PayloadMode.STREAMING_SIGNED)
    with pytest.raises(ValueError, match="not the payload mode"):
        AwsChunkedDecoder(PayloadMode.STREAMING_SIGNED, UNSIGNED_TRAILER)
    # An anonymous upload has no context; its unsigned chunks decode all the same.
    body = encode(UNSIGNED_TRAILER, b"anonymous", 4, {CRC_NAME: crc32_b64(b"anonymous")})
    decoder = AwsChunkedDecoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, trailer_names=[CRC_NAME])
    assert b"".join(decoder.feed(body)) == b"anonymous"
    assert decoder.end() == {CRC_NAME: crc32_b64(b"anonymous")}


# --------------------------------------------------------------------------- properties

_payloads = st.binary(max_size=3000)
_modes = st.sampled_from([SIGNED, SIGNED_TRAILER, UNSIGNED_TRAILER])


def _body(context: SigningContext, payload: bytes, chunk_bytes: int) -> bytes:
    return _body_with_offsets(context, payload, chunk_bytes)[0]


def _body_with_offsets(context: SigningContext, payload: bytes,
                       chunk_bytes: int) -> tuple[bytes, list[int]]:
    trailers = {CRC_NAME: crc32_b64(payload)} if context.payload_mode.trailer else None
    return encode_with_offsets(context, payload, chunk_bytes, trailers)


def _decode_and_check(context: SigningContext, body: bytes) -> bytes:
    """Decode and check the trailing checksum, as the gateway does; the payload."""
    names = [CRC_NAME] if context.payload_mode.trailer else []
    decoded, trailers = decode(context, body, trailer_names=names)
    checks = ChecksumVerifier(expected_checksums((), names))
    checks.update(decoded)
    checks.verify(trailers)
    return decoded


@given(_modes, _payloads, st.integers(1, 700), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_decodes_the_same(context: SigningContext, payload: bytes, chunk_bytes: int,
                                    cuts: list[int]) -> None:
    body = _body(context, payload, chunk_bytes)
    splits = [c % (len(body) + 1) for c in cuts]
    decoded, trailers = decode(context, body, splits, decoded_length_bytes=len(payload))
    assert decoded == payload
    assert trailers == ({CRC_NAME: crc32_b64(payload)} if context.payload_mode.trailer else {})


@settings(max_examples=300)
@given(_modes, st.lists(st.binary(max_size=64) | st.sampled_from(
    [b"\r\n", b"0\r\n", b"10;chunk-signature=", b"0" * 64, b"x-amz-checksum-crc32:", b";", b":"]),
    max_size=20))
def test_garbage_raises_only_our_error(context: SigningContext, parts: list[bytes]) -> None:
    decoder = AwsChunkedDecoder(context.payload_mode, context, max_chunk_bytes=4096,
                                max_trailer_bytes=256)
    try:
        for part in parts:
            decoder.feed(part)
        decoder.end()
    except AuthError:
        pass


@settings(max_examples=300)
@given(_modes, _payloads.filter(bool), st.integers(1, 500), st.data())
def test_a_changed_byte_never_passes_unnoticed(context: SigningContext, payload: bytes,
                                               chunk_bytes: int, data: st.DataObject) -> None:
    body = bytearray(_body(context, payload, chunk_bytes))
    position = data.draw(st.integers(0, len(body) - 1))
    body[position] ^= data.draw(st.integers(1, 255))
    try:
        decoded = _decode_and_check(context, bytes(body))
    except AuthError:
        return
    # Accepted: then the change was one without meaning (the case of a trailer's name).
    assert decoded == payload


@given(_modes, _payloads.filter(bool), st.integers(1, 500), st.data())
def test_a_changed_payload_byte_is_refused(context: SigningContext, payload: bytes,
                                           chunk_bytes: int, data: st.DataObject) -> None:
    body, offsets = _body_with_offsets(context, payload, chunk_bytes)
    changed = bytearray(body)
    changed[data.draw(st.sampled_from(offsets))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(AuthError) as raised:
        _decode_and_check(context, bytes(changed))
    # Signed chunks catch it at once; unsigned ones at the trailing checksum.
    assert raised.value.code == (Code.SIGNATURE_DOES_NOT_MATCH
                                 if context.payload_mode.chunk_signatures else Code.BAD_DIGEST)
