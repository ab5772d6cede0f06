"""SigV4 verification against real signers: AWS's documented examples, botocore's signers,
what boto3 puts on the wire (captured on loopback), boto3's presigned URLs and awscrt."""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st
from s3_capture import ACCESS_KEY, REGION, SECRET_KEY, Captured, CaptureServer, s3_client

from appendfs.s3.sigv4 import (
    EMPTY_SHA256_HEX,
    Auth,
    AuthError,
    Code,
    ContentSha256,
    PayloadMode,
    SignedRequest,
    parse_auth,
    verify,
)

CREDENTIALS = Credentials(ACCESS_KEY, SECRET_KEY)
ENDPOINT = "http://127.0.0.1:9000"
# Keys that trip encoders: space, +, =, ~, %, unicode, reserved characters, empty segments.
KEYS = ["plain.txt", "with space.txt", "plus+sign", "eq=uals", "tilde~x", "per%41cent",
        "ключ/日本語 ü.txt", "dir/sub dir/file (1).txt", "!$&'()*,;:@", "a//b/", "~/.hidden"]


def check(request: SignedRequest, *, secret: str = SECRET_KEY,
          now_s: float | None = None) -> tuple[Auth, Any]:
    auth = parse_auth(request)
    assert auth is not None
    assert auth.access_key_id == ACCESS_KEY
    context = verify(request, auth, secret, time.time() if now_s is None else now_s)
    return auth, context


def expect_error(code: str, request: SignedRequest, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as raised:
        check(request, **kwargs)
    assert raised.value.code == code, raised.value
    return raised.value


def from_aws_request(request: AWSRequest) -> SignedRequest:
    """What the gateway would receive for a botocore-signed request (Host added by http)."""
    url = urlsplit(request.url)
    headers = [(name.lower(), str(value)) for name, value in request.headers.items()]
    if not any(name == "host" for name, _ in headers):
        headers.insert(0, ("host", url.netloc))
    return SignedRequest(request.method, url.path, url.query, tuple(headers))


def from_url(method: str, url: str, *extra: tuple[str, str]) -> SignedRequest:
    parts = urlsplit(url)
    return SignedRequest(method, parts.path, parts.query, (("host", parts.netloc), *extra))


def presigner() -> Any:
    # boto3 presigns with SigV2 unless told otherwise (see test_default_boto3_presign_is_sigv2).
    return s3_client(ENDPOINT, signature_version="s3v4")


def header_signed(method: str, key: str, *, query: str = "", body: bytes = b"",
                  headers: dict[str, str] | None = None) -> AWSRequest:
    """Sign the way boto3 does: the serializer quotes the key with safe='/~'."""
    url = f"{ENDPOINT}/bucket/{quote(key, safe='/~')}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    S3SigV4Auth(CREDENTIALS, "s3", REGION).add_auth(request)
    return request


def replace_header(request: SignedRequest, name: str, value: str) -> SignedRequest:
    headers = tuple((n, value if n == name else v) for n, v in request.headers)
    return SignedRequest(request.method, request.raw_path, request.raw_query, headers)


# --------------------------------------------------------------------------- AWS's examples

AWS_DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_DOC_TIME_S = calendar.timegm((2013, 5, 24, 0, 0, 0))


def test_the_aws_documentation_get_object_example() -> None:
    # "Example: GET Object" of the S3 API reference (sig-v4-header-based-auth).
    request = SignedRequest("GET", "/test.txt", "", (
        ("host", "examplebucket.s3.amazonaws.com"), ("range", "bytes=0-9"),
        ("x-amz-content-sha256", EMPTY_SHA256_HEX), ("x-amz-date", "20130524T000000Z"),
        ("authorization", "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/"
         "s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature="
         "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")))
    auth = parse_auth(request)
    assert auth is not None and auth.payload_mode is PayloadMode.SHA256
    context = verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S + 60, region="us-east-1")
    assert context.scope == "20130524/us-east-1/s3/aws4_request"
    assert ContentSha256.for_context(context) is not None


def test_the_aws_documentation_presigned_url_example() -> None:
    # "Example: Presigned URL" of the S3 API reference (sigv4-query-string-auth).
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524"
             "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400"
             "&X-Amz-SignedHeaders=host&X-Amz-Signature="
             "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    request = SignedRequest("GET", "/test.txt", query, (("host", "examplebucket.s3.amazonaws.com"),))
    auth = parse_auth(request)
    assert auth is not None and auth.presigned and auth.expires_s == 86400
    assert auth.payload_mode is PayloadMode.UNSIGNED
    verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S + 86400)
    with pytest.raises(AuthError, match="expired"):
        verify(request, auth, AWS_DOC_SECRET, AWS_DOC_TIME_S + 86401)


# --------------------------------------------------------------------------- botocore's signer


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "POST"])
@pytest.mark.parametrize("key", KEYS)
def test_botocore_header_signatures_verify(method: str, key: str) -> None:
    body = b"hello body" if method in ("PUT", "POST") else b""
    request = from_aws_request(header_signed(method, key, body=body))
    auth, context = check(request)
    assert auth.payload_mode is PayloadMode.SHA256
    assert context.payload_hash == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("query", [
    "uploads", "list-type=2&prefix=a%2Fb", "delete=", "uploadId=abc%2B%3D&partNumber=3",
    "prefix=&delimiter=%2F&max-keys=10", "versionId=null&tagging", "b=2&a=1&a=0&c",
    "prefix=%E2%82%AC%20x&encoding-type=url"])
def test_botocore_signatures_cover_query_strings(query: str) -> None:
    check(from_aws_request(header_signed("GET", "k", query=query)))


def test_repeated_and_whitespace_laden_headers() -> None:
    request = AWSRequest(method="PUT", url=f"{ENDPOINT}/bucket/k", data=b"x", headers={})
    request.headers["X-Amz-Meta-Spaces"] = "  a   lot\tof   space  "
    request.headers.add_header("X-Amz-Meta-Twice", "first")
    request.headers.add_header("X-Amz-Meta-Twice", "  second  value ")
    request.headers["Content-Type"] = "text/plain;  charset=utf-8"
    S3SigV4Auth(CREDENTIALS, "s3", REGION).add_auth(request)
    signed = from_aws_request(request)
    assert [v for n, v in signed.headers if n == "x-amz-meta-twice"] == ["first", "  second  value "]
    check(signed)
    # The order of repeated values is signed too.
    swapped = [h for h in signed.headers if h[0] != "x-amz-meta-twice"]
    swapped += [("x-amz-meta-twice", "  second  value "), ("x-amz-meta-twice", "first")]
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, SignedRequest(
        signed.method, signed.raw_path, signed.raw_query, tuple(swapped)))


def test_header_values_are_the_wire_bytes_as_latin1() -> None:
    # A client that sends and signs UTF-8 metadata: the gateway decodes the bytes as latin-1.
    request = header_signed("PUT", "k", headers={"x-amz-meta-name": "héllo wörld"})
    signed = from_aws_request(request)
    signed = replace_header(signed, "x-amz-meta-name", "héllo wörld".encode().decode("latin-1"))
    check(signed)


def test_the_date_header_may_stand_in_for_x_amz_date() -> None:
    # Given a Date header, botocore signs that (RFC 1123 format) and sends no x-amz-date.
    request = AWSRequest(method="GET", url=f"{ENDPOINT}/bucket/k", headers={"Date": "x"})
    S3SigV4Auth(CREDENTIALS, "s3", REGION).add_auth(request)
    signed = from_aws_request(request)
    assert "x-amz-date" not in dict(signed.headers)
    auth, _ = check(signed)
    assert "date" in auth.signed_headers
    assert auth.amz_date == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(auth.amz_time_s))


# --------------------------------------------------------------------------- presigned URLs


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("operation", ["get_object", "put_object", "delete_object",
                                       "head_object"])
def test_boto3_presigned_urls_verify(operation: str, key: str) -> None:
    url = presigner().generate_presigned_url(operation, Params={"Bucket": "bucket", "Key": key},
                                        ExpiresIn=600)
    method = {"get_object": "GET", "put_object": "PUT", "delete_object": "DELETE",
              "head_object": "HEAD"}[operation]
    auth, context = check(from_url(method, url))
    assert auth.presigned and auth.expires_s == 600
    assert context.payload_mode is PayloadMode.UNSIGNED


def test_default_boto3_presign_is_sigv2_and_refused() -> None:
    # botocore's generate_presigned_url still defaults to SigV2 (AWSAccessKeyId, Signature,
    # Expires); only SigV4 is supported here, so users must configure signature_version="s3v4".
    url = s3_client(ENDPOINT).generate_presigned_url(
        "get_object", Params={"Bucket": "bucket", "Key": "k"})
    assert "AWSAccessKeyId=" in url
    error = expect_error(Code.INVALID_REQUEST, from_url("GET", url))
    assert "AWS4-HMAC-SHA256" in error.message


def test_boto3_presigned_url_with_query_parameters() -> None:
    client = presigner()
    url = client.generate_presigned_url("list_objects_v2", Params={
        "Bucket": "bucket", "Prefix": "a/b c+d", "Delimiter": "/", "StartAfter": "~x"},
        ExpiresIn=60)
    check(from_url("GET", url))
    url = client.generate_presigned_url("upload_part", Params={
        "Bucket": "bucket", "Key": "k y", "UploadId": "u+1/=", "PartNumber": 7}, ExpiresIn=60)
    check(from_url("PUT", url))


def test_botocore_query_signer_with_signed_headers() -> None:
    request = AWSRequest(method="PUT", url=f"{ENDPOINT}/bucket/a%20b?uploads",
                         headers={"x-amz-acl": "private", "content-type": "text/plain"})
    S3SigV4QueryAuth(CREDENTIALS, "s3", REGION, expires=120).add_auth(request)
    signed = from_aws_request(request)
    auth, _ = check(signed)
    assert auth.signed_headers == ("content-type", "host", "x-amz-acl")
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, replace_header(signed, "x-amz-acl", "public-read"))


def test_presigned_url_lifetime() -> None:
    url = presigner().generate_presigned_url(
        "get_object", Params={"Bucket": "bucket", "Key": "k"}, ExpiresIn=100)
    request = from_url("GET", url)
    auth = parse_auth(request)
    assert auth is not None
    verify(request, auth, SECRET_KEY, auth.amz_time_s + 100)
    verify(request, auth, SECRET_KEY, auth.amz_time_s - 899)  # client clock a bit ahead
    error = expect_error(Code.ACCESS_DENIED, request, now_s=auth.amz_time_s + 101)
    assert error.message == "Request has expired"
    error = expect_error(Code.ACCESS_DENIED, request, now_s=auth.amz_time_s - 901)
    assert error.message == "Request is not valid yet"


def test_presigned_url_longer_than_a_week_is_refused() -> None:
    request = AWSRequest(method="GET", url=f"{ENDPOINT}/bucket/k")
    S3SigV4QueryAuth(CREDENTIALS, "s3", REGION, expires=604801).add_auth(request)
    with pytest.raises(AuthError) as raised:
        parse_auth(from_aws_request(request))
    assert raised.value.code == Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR


# --------------------------------------------------------------------------- awscrt's signer


def test_awscrt_signer_agrees() -> None:
    """The AWS Common Runtime's signer (aws-c-auth) is a second, independent implementation."""
    auth_mod = pytest.importorskip("awscrt.auth")
    from awscrt.http import HttpHeaders, HttpRequest

    for key in KEYS:
        path = "/bucket/" + quote(key, safe="/~")
        headers = HttpHeaders([("host", "127.0.0.1:9000"), ("x-amz-meta-a", " b   c "),
                               ("content-type", "x/y")])
        crt_request = HttpRequest("PUT", path + "?uploadId=a%2Fb&partNumber=1", headers)
        config = auth_mod.AwsSigningConfig(
            algorithm=auth_mod.AwsSigningAlgorithm.V4,
            signature_type=auth_mod.AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=auth_mod.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY),
            region=REGION, service="s3", use_double_uri_encode=False,
            should_normalize_uri_path=False,
            signed_body_value=auth_mod.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
            signed_body_header_type=auth_mod.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
        auth_mod.aws_sign_request(crt_request, config).result(timeout=10)
        path, _, query = crt_request.path.partition("?")
        signed = SignedRequest("PUT", path, query, tuple((n.lower(), v) for n, v in
                                                         crt_request.headers))
        auth, _ = check(signed)
        assert auth.payload_mode is PayloadMode.UNSIGNED


# --------------------------------------------------------------------------- boto3 on the wire


@pytest.fixture(scope="module")
def wire() -> Iterator[tuple[CaptureServer, Any]]:
    with CaptureServer() as server:
        yield server, s3_client(server.url)


def _key_calls(key: str) -> list[tuple[str, Callable[[Any], object]]]:
    return [
        (f"get {key}", lambda c: c.get_object(Bucket="b", Key=key, Range="bytes=0-9")),
        (f"put {key}", lambda c: c.put_object(Bucket="b", Key=key, Body=b"data",
                                              Metadata={"m": "  x  y "})),
        (f"delete {key}", lambda c: c.delete_object(Bucket="b", Key=key)),
    ]


def _wire_calls() -> list[tuple[str, Callable[[Any], object]]]:
    calls = [call for key in KEYS for call in _key_calls(key)]
    calls += [
        ("list v2", lambda c: c.list_objects_v2(Bucket="b", Prefix="a/b", Delimiter="/")),
        ("list v2 unicode", lambda c: c.list_objects_v2(Bucket="b", Prefix="é +~", MaxKeys=5)),
        ("list uploads", lambda c: c.list_multipart_uploads(Bucket="b")),
        ("create upload", lambda c: c.create_multipart_upload(Bucket="b", Key="k +")),
        ("copy", lambda c: c.copy_object(Bucket="b", Key="dst key", CopySource={
            "Bucket": "b", "Key": "src key+ü"})),
        ("delete many", lambda c: c.delete_objects(Bucket="b", Delete={
            "Objects": [{"Key": "x"}, {"Key": "y z"}]})),
        ("get version", lambda c: c.get_object(Bucket="b", Key="k", VersionId="v+1=")),
    ]
    return calls


@pytest.mark.parametrize(("label", "call"), _wire_calls(), ids=[c[0] for c in _wire_calls()])
def test_what_boto3_sends_verifies(wire: tuple[CaptureServer, Any], label: str,
                                   call: Callable[[Any], object]) -> None:
    server, client = wire
    before = len(server.requests)
    try:
        call(client)
    except client.exceptions.ClientError:
        pass  # the capture server refuses all but PUT
    assert len(server.requests) == before + 1, label
    captured: Captured = server.requests[-1]
    auth, context = check(captured.signed_request())
    if auth.payload_mode is PayloadMode.SHA256:
        hasher = ContentSha256.for_context(context)
        assert hasher is not None
        hasher.update(captured.body)
        hasher.verify()
    # The same request with a tampered path, query or signed header is refused.
    request = captured.signed_request()
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, SignedRequest(
        request.method, request.raw_path + "x", request.raw_query, request.headers))
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, SignedRequest(
        request.method, request.raw_path, request.raw_query + "&x=1", request.headers))
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, replace_header(request, "host", "evil:9000"))
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, SignedRequest(
        "POST" if request.method != "POST" else "PUT", request.raw_path, request.raw_query,
        request.headers))


# --------------------------------------------------------------------------- refusals


def test_wrong_secret_is_refused_with_debugging_details() -> None:
    request = from_aws_request(header_signed("GET", "k"))
    error = expect_error(Code.SIGNATURE_DOES_NOT_MATCH, request, secret=SECRET_KEY + "x")
    assert error.details["CanonicalRequest"].startswith("GET\n/bucket/k\n")
    assert error.details["StringToSign"].startswith("AWS4-HMAC-SHA256\n")


def test_tampered_signed_header_and_body_hash() -> None:
    request = from_aws_request(header_signed("PUT", "k", body=b"abc",
                                             headers={"x-amz-meta-a": "1"}))
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, replace_header(request, "x-amz-meta-a", "2"))
    forged = replace_header(request, "x-amz-content-sha256", hashlib.sha256(b"abd").hexdigest())
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH, forged)
    # The right hash header with the wrong body is the body check's to catch.
    _, context = check(request)
    hasher = ContentSha256.for_context(context)
    assert hasher is not None
    hasher.update(b"abd")
    with pytest.raises(AuthError) as raised:
        hasher.verify()
    assert raised.value.code == Code.X_AMZ_CONTENT_SHA256_MISMATCH


def test_unsigned_amz_header_is_refused() -> None:
    request = from_aws_request(header_signed("PUT", "k"))
    extra = SignedRequest(request.method, request.raw_path, request.raw_query,
                          (*request.headers, ("x-amz-acl", "public-read")))
    error = expect_error(Code.ACCESS_DENIED, extra)
    assert "x-amz-acl" in error.message
    # Unsigned headers other than x-amz-* are allowed (and unprotected), as at AWS.
    check(SignedRequest(request.method, request.raw_path, request.raw_query,
                        (*request.headers, ("user-agent", "x"))))


def test_host_must_be_signed() -> None:
    request = from_aws_request(header_signed("GET", "k"))
    header = dict(request.headers)["authorization"].replace("SignedHeaders=host;",
                                                            "SignedHeaders=")
    expect_error(Code.AUTHORIZATION_HEADER_MALFORMED, replace_header(request, "authorization",
                                                                     header))


@pytest.mark.parametrize("skew_s", [-901, 901, 3600 * 24])
def test_skewed_clock_is_refused(skew_s: int) -> None:
    request = from_aws_request(header_signed("GET", "k"))
    auth = parse_auth(request)
    assert auth is not None
    expect_error(Code.REQUEST_TIME_TOO_SKEWED, request, now_s=auth.amz_time_s + skew_s)
    check(request, now_s=auth.amz_time_s + (899 if skew_s > 0 else -899))


def test_region_must_match_when_given() -> None:
    request = from_aws_request(header_signed("GET", "k"))
    auth = parse_auth(request)
    assert auth is not None
    with pytest.raises(AuthError) as raised:
        verify(request, auth, SECRET_KEY, auth.amz_time_s, region="eu-west-1")
    assert raised.value.code == Code.AUTHORIZATION_HEADER_MALFORMED
    assert "'us-east-1' is wrong; expecting 'eu-west-1'" in raised.value.message


def test_spec_encoded_signature_of_a_differently_encoded_wire_form() -> None:
    # The client signed the strict RFC 3986 form but sent reserved characters unencoded.
    request = from_aws_request(header_signed("GET", "a$b", query="prefix=a%2Fb%20c"))
    assert request.raw_path == "/bucket/a%24b"
    check(SignedRequest("GET", "/bucket/a$b", "prefix=a/b+c", request.headers))
    expect_error(Code.SIGNATURE_DOES_NOT_MATCH,
                 SignedRequest("GET", "/bucket/a$c", "prefix=a/b+c", request.headers))


AUTH_PREFIX = "AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/s3/aws4_request"


@pytest.mark.parametrize(("authorization", "code"), [
    ("AWS AK:c2lnbmF0dXJl", Code.INVALID_REQUEST),
    ("AWS4-ECDSA-P256-SHA256 Credential=x", Code.INVALID_REQUEST),
    ("Bearer token", Code.INVALID_ARGUMENT),
    ("AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/s3/aws4_request", Code.AUTHORIZATION_HEADER_MALFORMED),
    ("AWS4-HMAC-SHA256 Credential=AK/2024/us-east-1/s3/aws4_request, SignedHeaders=host, "
     "Signature=00", Code.AUTHORIZATION_HEADER_MALFORMED),
    ("AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/ec2/aws4_request, SignedHeaders=host, "
     "Signature=00", Code.AUTHORIZATION_HEADER_MALFORMED),
    ("AWS4-HMAC-SHA256 Credential=AK/20240102/us-east-1/s3/aws4_request, SignedHeaders=host, "
     "Signature=00", Code.AUTHORIZATION_HEADER_MALFORMED),
    (f"{AUTH_PREFIX}, SignedHeaders=Host, Signature=00", Code.AUTHORIZATION_HEADER_MALFORMED),
    (f"{AUTH_PREFIX}, SignedHeaders=host;;x, Signature=00", Code.AUTHORIZATION_HEADER_MALFORMED),
    (f"{AUTH_PREFIX}, SignedHeaders=host, SignedHeaders=host, Signature=00",
     Code.AUTHORIZATION_HEADER_MALFORMED),
])
def test_malformed_authorization_headers(authorization: str, code: str) -> None:
    request = SignedRequest("GET", "/b/k", "", (
        ("host", "h"), ("x-amz-date", "20240101T000000Z"),
        ("x-amz-content-sha256", EMPTY_SHA256_HEX), ("authorization", authorization)))
    with pytest.raises(AuthError) as raised:
        parse_auth(request)
    assert raised.value.code == code


@pytest.mark.parametrize(("headers", "code"), [
    ((("x-amz-content-sha256", EMPTY_SHA256_HEX),), Code.ACCESS_DENIED),  # no date at all
    ((("x-amz-date", "20240101T250000Z"), ("x-amz-content-sha256", EMPTY_SHA256_HEX)),
     Code.ACCESS_DENIED),
    ((("x-amz-date", "20240101T000000Z"),), Code.INVALID_REQUEST),  # no content-sha256
    ((("x-amz-date", "20240101T000000Z"), ("x-amz-content-sha256", "nope")),
     Code.INVALID_ARGUMENT),
    ((("x-amz-date", "20240101T000000Z"),
      ("x-amz-content-sha256", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD")), Code.INVALID_REQUEST),
])
def test_header_auth_needs_date_and_payload_hash(headers: tuple[tuple[str, str], ...],
                                                 code: str) -> None:
    request = SignedRequest("GET", "/b/k", "", (
        ("host", "h"), *headers,
        ("authorization", f"{AUTH_PREFIX}, SignedHeaders=host, Signature=00")))
    with pytest.raises(AuthError) as raised:
        parse_auth(request)
    assert raised.value.code == code


@pytest.mark.parametrize("value", [mode.value for mode in PayloadMode
                                   if mode is not PayloadMode.SHA256])
def test_payload_modes_are_read_from_x_amz_content_sha256(value: str) -> None:
    request = from_aws_request(header_signed("PUT", "k", headers={"X-Amz-Content-SHA256": value}))
    # botocore computes its own payload hash; re-sign with the mode forced.
    signer = S3SigV4Auth(CREDENTIALS, "s3", REGION)
    signer.payload = lambda _request: value
    aws_request = AWSRequest(method="PUT", url=f"{ENDPOINT}/bucket/k", data=b"")
    signer.add_auth(aws_request)
    request = from_aws_request(aws_request)
    auth, context = check(request)
    assert auth.payload_mode.value == value
    assert context.payload_hash == value
    assert ContentSha256.for_context(context) is None


@pytest.mark.parametrize(("query", "code"), [
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256", Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR),
    ("X-Amz-Algorithm=AWS4-HMAC-SHA1&X-Amz-Credential=AK%2F20240101%2Fus-east-1%2Fs3%2F"
     "aws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=1&X-Amz-SignedHeaders=host&"
     "X-Amz-Signature=00", Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR),
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20240101%2Fus-east-1%2Fs3%2F"
     "aws4_request&X-Amz-Date=20240101&X-Amz-Expires=1&X-Amz-SignedHeaders=host&"
     "X-Amz-Signature=00", Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR),
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20240101%2Fus-east-1%2Fs3%2F"
     "aws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=-1&X-Amz-SignedHeaders=host&"
     "X-Amz-Signature=00", Code.AUTHORIZATION_QUERY_PARAMETERS_ERROR),
    ("AWSAccessKeyId=AK&Expires=1&Signature=abc", Code.INVALID_REQUEST),
])
def test_malformed_presigned_urls(query: str, code: str) -> None:
    with pytest.raises(AuthError) as raised:
        parse_auth(SignedRequest("GET", "/b/k", query, (("host", "h"),)))
    assert raised.value.code == code


def test_two_auth_mechanisms_and_anonymous_requests() -> None:
    url = presigner().generate_presigned_url(
        "get_object", Params={"Bucket": "bucket", "Key": "k"})
    presigned = from_url("GET", url)
    header = from_aws_request(header_signed("GET", "k"))
    both = SignedRequest("GET", presigned.raw_path, presigned.raw_query, header.headers)
    with pytest.raises(AuthError) as raised:
        parse_auth(both)
    assert raised.value.code == Code.INVALID_ARGUMENT
    assert parse_auth(SignedRequest("GET", "/b/k", "list-type=2", (("host", "h"),))) is None


# --------------------------------------------------------------------------- fuzzing

_header_names = st.sampled_from(["authorization", "x-amz-date", "x-amz-content-sha256",
                                 "host", "date", "x-amz-meta-a"])
_texts = st.text(st.characters(codec="latin-1"), max_size=80)
_auth_like = st.builds(
    lambda parts: "AWS4-HMAC-SHA256 " + ",".join(parts),
    st.lists(st.sampled_from(["Credential=AK/20240101/us-east-1/s3/aws4_request",
                              "SignedHeaders=host;x-amz-date", "Signature=" + "0" * 64,
                              "Credential=", "SignedHeaders=", "Signature", "=", " "]),
             max_size=5))


@given(st.lists(st.tuples(_header_names, _texts | _auth_like), max_size=6),
       _texts, _texts)
def test_random_requests_raise_only_auth_errors(headers: list[tuple[str, str]], path: str,
                                                query: str) -> None:
    request = SignedRequest("GET", path, query, tuple(headers))
    try:
        auth = parse_auth(request)
        if auth is not None:
            verify(request, auth, "secret", auth.amz_time_s)
    except AuthError:
        pass
