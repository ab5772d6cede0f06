"""Streaming checks of the body checksums an S3 client sends: ``x-amz-checksum-*`` and
``Content-MD5`` — pure code, no I/O.

Where it sits: the HTTP layer reads the expected values from the request head
(:func:`expected_checksums`: headers, or a trailer announced by ``x-amz-trailer``), feeds
every payload byte to a :class:`ChecksumVerifier` (after :mod:`appendfs.s3.chunked` has
removed any ``aws-chunked`` framing) and calls :meth:`ChecksumVerifier.verify` with the
trailers when the body is over; only then may the object be committed. The computed
digests it returns are what the gateway stores and echoes in responses.

Values are base64 of the big-endian digest, as AWS sends them. CRC32 comes from zlib, SHA-1,
SHA-256 and MD5 from hashlib; CRC32C and CRC64NVME from awscrt (the AWS Common Runtime:
the same native code the AWS SDKs use, hardware-accelerated, several GB/s). Without awscrt
both fall back to table-driven pure Python: correct, but some MB/s, too slow to serve with.
Refusals are :class:`appendfs.s3.sigv4.AuthError` (``InvalidDigest``, ``InvalidRequest``,
``BadDigest``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from appendfs.s3.sigv4 import AuthError, Code

Buffer = bytes | bytearray | memoryview


class ChecksumAlgorithm(enum.StrEnum):
    """A body checksum S3 knows; the value is its lowercase name in headers."""

    CRC32 = "crc32"
    CRC32C = "crc32c"
    CRC64NVME = "crc64nvme"
    SHA1 = "sha1"
    SHA256 = "sha256"
    MD5 = "md5"  # only as Content-MD5

    @property
    def header(self) -> str:
        """The header (or trailer) that carries it."""
        return "content-md5" if self is ChecksumAlgorithm.MD5 else f"x-amz-checksum-{self.value}"

    @property
    def digest_bytes(self) -> int:
        return _DIGEST_BYTES[self]


_DIGEST_BYTES: Final = {
    ChecksumAlgorithm.CRC32: 4, ChecksumAlgorithm.CRC32C: 4, ChecksumAlgorithm.CRC64NVME: 8,
    ChecksumAlgorithm.SHA1: 20, ChecksumAlgorithm.SHA256: 32, ChecksumAlgorithm.MD5: 16,
}
_BY_HEADER: Final = {a.header: a for a in ChecksumAlgorithm}


# ------------------------------------------------------------- CRC32C and CRC64NVME


def _reflected_table(poly: int, width_bits: int) -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << width_bits) - 1))
    return table


_CRC32C_TABLE: Final = _reflected_table(0x82F63B78, 32)
_CRC64NVME_TABLE: Final = _reflected_table(0x9A6C9329AC4BC9B5, 64)
_MASK32: Final = 0xFFFFFFFF
_MASK64: Final = 0xFFFFFFFFFFFFFFFF


def crc32c_python(data: Buffer, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) in pure Python, continuing from ``crc``: the slow fallback."""
    table = _CRC32C_TABLE
    value = crc ^ _MASK32
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK32


def crc64nvme_python(data: Buffer, crc: int = 0) -> int:
    """CRC-64/NVME in pure Python, continuing from ``crc``: the slow fallback."""
    table = _CRC64NVME_TABLE
    value = crc ^ _MASK64
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK64


_CrcFunction = Callable[[Buffer, int], int]
try:
    from awscrt import checksums as _crt

    crc32c: _CrcFunction = _crt.crc32c
    crc64nvme: _CrcFunction = _crt.crc64nvme
    NATIVE_CRCS = True
except ImportError:  # pragma: no cover - awscrt is a dependency; kept for odd platforms
    crc32c = crc32c_python
    crc64nvme = crc64nvme_python
    NATIVE_CRCS = False


# ------------------------------------------------------------- one running checksum


class _Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc:
    """A CRC function made incremental, hashlib-style."""

    def __init__(self, function: _CrcFunction, digest_bytes: int) -> None:
        self._function = function
        self._digest_bytes = digest_bytes
        self._crc = 0

    def update(self, data: Buffer, /) -> None:
        self._crc = self._function(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(self._digest_bytes, "big")


def _zlib_crc32(data: Buffer, crc: int) -> int:
    return zlib.crc32(data, crc)


class Checksum:
    """A running checksum of one algorithm: ``update`` with body bytes, then a digest."""

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self.algorithm = algorithm
        self._hasher: _Hasher
        if algorithm is ChecksumAlgorithm.CRC32:
            self._hasher = _Crc(_zlib_crc32, 4)
        elif algorithm is ChecksumAlgorithm.CRC32C:
            self._hasher = _Crc(crc32c, 4)
        elif algorithm is ChecksumAlgorithm.CRC64NVME:
            self._hasher = _Crc(crc64nvme, 8)
        else:
            self._hasher = hashlib.new(algorithm.value, usedforsecurity=False)

    def update(self, data: Buffer) -> None:
        self._hasher.update(data)

    def digest(self) -> bytes:
        return self._hasher.digest()

    def b64digest(self) -> str:
        return base64.b64encode(self._hasher.digest()).decode("ascii")


def new(name: str) -> Checksum:
    """A running checksum by its lowercase name (``crc32``, ``sha256``, ``md5``...);
    ValueError for a name S3 does not know."""
    return Checksum(ChecksumAlgorithm(name.lower()))


# ------------------------------------------------------------- what the request expects


@dataclass(frozen=True, slots=True)
class ExpectedChecksum:
    """A checksum the client announced: its value from a header, or None when it comes in
    a trailer (``x-amz-trailer``)."""

    algorithm: ChecksumAlgorithm
    b64: str | None


def expected_checksums(headers: Iterable[tuple[str, str]],
                       trailer_names: Sequence[str] = ()) -> tuple[ExpectedChecksum, ...]:
    """The checksums a request announces: ``Content-MD5``, at most one ``x-amz-checksum-*``
    header or trailer. ``headers`` are (lowercase name, value) pairs; ``trailer_names`` the
    names ``x-amz-trailer`` announced. Malformed values are refused here, before the body.
    """
    found: dict[ChecksumAlgorithm, ExpectedChecksum] = {}
    for name, value in headers:
        algorithm = _BY_HEADER.get(name)
        if algorithm is None:
            continue
        if algorithm in found:
            raise _invalid(algorithm, f"The {name} header appears more than once.")
        _check_b64(algorithm, value)
        found[algorithm] = ExpectedChecksum(algorithm, value.strip())
    for name in trailer_names:
        algorithm = _BY_HEADER.get(name)
        if algorithm is None or algorithm is ChecksumAlgorithm.MD5:
            raise AuthError(Code.INVALID_REQUEST, f"The trailer {name!r} is not supported.")
        if algorithm in found:
            raise _invalid(algorithm, f"{name} is both a header and a trailer.")
        found[algorithm] = ExpectedChecksum(algorithm, None)
    if len([a for a in found if a is not ChecksumAlgorithm.MD5]) > 1:
        raise AuthError(Code.INVALID_REQUEST, "Expecting a single x-amz-checksum- header. "
                        "Multiple checksum Types are not allowed.")
    return tuple(found.values())


def _check_b64(algorithm: ChecksumAlgorithm, value: str) -> bytes:
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != algorithm.digest_bytes:
        raise _invalid(algorithm, f"Value for {algorithm.header} header is invalid.")
    return digest


def _invalid(algorithm: ChecksumAlgorithm, message: str) -> AuthError:
    if algorithm is ChecksumAlgorithm.MD5:
        return AuthError(Code.INVALID_DIGEST, "The Content-MD5 you specified was invalid.")
    return AuthError(Code.INVALID_REQUEST, message)


class ChecksumVerifier:
    """Runs every expected checksum over the body and compares at the end."""

    def __init__(self, expected: Iterable[ExpectedChecksum],
                 also: Iterable[ChecksumAlgorithm] = ()) -> None:
        """``also``: algorithms to compute without an expected value (to store, e.g. MD5
        for the ETag)."""
        self._expected = {e.algorithm: e for e in expected}
        self._checksums = {a: Checksum(a) for a in (*self._expected, *also)}

    def update(self, data: Buffer) -> None:
        for checksum in self._checksums.values():
            checksum.update(data)

    def verify(self, trailers: Mapping[str, str] | None = None) -> dict[ChecksumAlgorithm, str]:
        """Compare with the announced values (trailer values from ``trailers``, as returned
        by the aws-chunked decoder); returns every computed base64 digest."""
        computed = {a: c.b64digest() for a, c in self._checksums.items()}
        for algorithm, expected in self._expected.items():
            value = expected.b64
            if value is None:
                value = (trailers or {}).get(algorithm.header)
                if value is None:
                    raise AuthError(Code.INVALID_REQUEST, f"The {algorithm.header} trailer "
                                    "announced by x-amz-trailer was not sent.")
                _check_b64(algorithm, value)
            if not hmac.compare_digest(base64.b64decode(value),
                                       base64.b64decode(computed[algorithm])):
                raise _mismatch(algorithm, value, computed[algorithm])
        return computed


def _mismatch(algorithm: ChecksumAlgorithm, expected_b64: str, computed_b64: str) -> AuthError:
    if algorithm is ChecksumAlgorithm.MD5:
        return AuthError(Code.BAD_DIGEST, "The Content-MD5 you specified did not match what we "
                         "received.", {"ExpectedDigest": expected_b64,
                                       "CalculatedDigest": computed_b64})
    return AuthError(Code.BAD_DIGEST, f"The {algorithm.value.upper()} you specified did not "
                     "match the calculated checksum.")
