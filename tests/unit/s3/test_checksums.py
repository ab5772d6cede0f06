"""Body checksums agree with botocore's (what boto3 sends) and catch what they should."""

from __future__ import annotations

import base64
import hashlib

import pytest
from botocore import httpchecksum
from hypothesis import given
from hypothesis import strategies as st

from appendfs.s3 import checksums
from appendfs.s3.checksums import (
    Checksum,
    ChecksumAlgorithm,
    ChecksumVerifier,
    ExpectedChecksum,
    crc32c_python,
    crc64nvme_python,
    expected_checksums,
)
from appendfs.s3.sigv4 import AuthError, Code

# botocore's own checksum classes: what boto3 puts in x-amz-checksum-* (CRC32C and
# CRC64NVME through awscrt, as botocore[crt] does).
BOTOCORE = {
    ChecksumAlgorithm.CRC32: httpchecksum.Crc32Checksum,
    ChecksumAlgorithm.CRC32C: httpchecksum.CrtCrc32cChecksum,
    ChecksumAlgorithm.CRC64NVME: httpchecksum.CrtCrc64NvmeChecksum,
    ChecksumAlgorithm.SHA1: httpchecksum.Sha1Checksum,
    ChecksumAlgorithm.SHA256: httpchecksum.Sha256Checksum,
}
INPUTS = [b"", b"a", b"123456789", bytes(range(256)) * 1000, b"\xff" * 4097]


@pytest.mark.parametrize("algorithm", list(BOTOCORE))
@pytest.mark.parametrize("data", INPUTS, ids=lambda d: f"{len(d)}B")
def test_digests_match_botocore(algorithm: ChecksumAlgorithm, data: bytes) -> None:
    theirs = BOTOCORE[algorithm]()
    theirs.update(data)
    ours = Checksum(algorithm)
    for start in range(0, len(data), 1000):  # in pieces, some of them memoryviews
        ours.update(memoryview(data)[start:start + 1000] if start % 2000 else data[start:start + 1000])
    assert ours.b64digest() == theirs.b64digest()
    assert len(ours.digest()) == algorithm.digest_bytes


def test_content_md5_matches_botocore() -> None:
    from botocore.utils import calculate_md5

    data = b"some body" * 1000
    checksum = checksums.new("MD5")
    checksum.update(data)
    assert checksum.b64digest() == calculate_md5(data)


def test_check_values_of_the_crc_catalogue() -> None:
    # The "check" of each CRC in the RevEng catalogue: the CRC of the ASCII "123456789".
    crc32c = Checksum(ChecksumAlgorithm.CRC32C)
    crc32c.update(b"123456789")
    assert crc32c.digest() == (0xE3069283).to_bytes(4, "big")
    crc64 = Checksum(ChecksumAlgorithm.CRC64NVME)
    crc64.update(b"123456789")
    assert crc64.digest() == (0xAE8B14860A799888).to_bytes(8, "big")
    assert crc32c_python(b"123456789") == 0xE3069283
    assert crc64nvme_python(b"123456789") == 0xAE8B14860A799888


@given(st.binary(max_size=600), st.integers(0, 600))
def test_pure_python_fallbacks_match_the_native_crcs(data: bytes, cut: int) -> None:
    assert crc32c_python(data[cut:], crc32c_python(data[:cut])) == checksums.crc32c(data, 0)
    assert crc64nvme_python(data[cut:], crc64nvme_python(data[:cut])) == \
        checksums.crc64nvme(data, 0)


def test_unknown_algorithm_names() -> None:
    with pytest.raises(ValueError):
        checksums.new("crc16")


def _b64(algorithm: ChecksumAlgorithm, data: bytes) -> str:
    checksum = Checksum(algorithm)
    checksum.update(data)
    return checksum.b64digest()


def test_header_checksums_are_verified() -> None:
    data = b"hello world"
    headers = [("content-md5", _b64(ChecksumAlgorithm.MD5, data)),
               ("x-amz-checksum-crc32", _b64(ChecksumAlgorithm.CRC32, data)),
               ("x-amz-checksum-type", "FULL_OBJECT"), ("content-type", "text/plain")]
    expected = expected_checksums(headers)
    assert {e.algorithm for e in expected} == {ChecksumAlgorithm.MD5, ChecksumAlgorithm.CRC32}
    verifier = ChecksumVerifier(expected, also=[ChecksumAlgorithm.SHA256])
    verifier.update(data[:5])
    verifier.update(memoryview(data)[5:])
    computed = verifier.verify()
    assert computed[ChecksumAlgorithm.SHA256] == base64.b64encode(
        hashlib.sha256(data).digest()).decode()
    wrong = ChecksumVerifier(expected)
    wrong.update(b"hello World")
    with pytest.raises(AuthError) as raised:
        wrong.verify()
    assert raised.value.code == Code.BAD_DIGEST


def test_trailer_checksums_are_verified() -> None:
    data = b"streamed"
    expected = expected_checksums([], ["x-amz-checksum-crc64nvme"])
    assert expected == (ExpectedChecksum(ChecksumAlgorithm.CRC64NVME, None),)
    verifier = ChecksumVerifier(expected)
    verifier.update(data)
    value = _b64(ChecksumAlgorithm.CRC64NVME, data)
    assert verifier.verify({"x-amz-checksum-crc64nvme": value}) == {
        ChecksumAlgorithm.CRC64NVME: value}
    for trailers, code in [({}, Code.INVALID_REQUEST),
                           ({"x-amz-checksum-crc64nvme": "AAAA"}, Code.INVALID_REQUEST),
                           ({"x-amz-checksum-crc64nvme": "AAAAAAAAAAA="}, Code.BAD_DIGEST)]:
        with pytest.raises(AuthError) as raised:
            verifier.verify(trailers)
        assert raised.value.code == code


@pytest.mark.parametrize(("headers", "trailers", "code"), [
    ([("content-md5", "not base64!")], [], Code.INVALID_DIGEST),
    ([("content-md5", "AAAA")], [], Code.INVALID_DIGEST),  # valid base64, 3 bytes
    ([("x-amz-checksum-sha256", "AAAA")], [], Code.INVALID_REQUEST),
    ([("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-crc32", "AAAAAA==")], [],
     Code.INVALID_REQUEST),
    ([("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-sha1", "A" * 27 + "=")], [],
     Code.INVALID_REQUEST),  # two algorithms
    ([("x-amz-checksum-crc32", "AAAAAA==")], ["x-amz-checksum-crc32"], Code.INVALID_REQUEST),
    ([], ["x-amz-meta-foo"], Code.INVALID_REQUEST),
    ([], ["content-md5"], Code.INVALID_REQUEST),
])
def test_malformed_checksum_headers(headers: list[tuple[str, str]], trailers: list[str],
                                    code: str) -> None:
    with pytest.raises(AuthError) as raised:
        expected_checksums(headers, trailers)
    assert raised.value.code == code
