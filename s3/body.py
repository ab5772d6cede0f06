"""A request body as the operations see it: decoded, hashed and verified while it streams.

:class:`Body` pulls ``http.request`` messages from the ASGI ``receive`` callable, undoes
``aws-chunked`` framing (checking every chunk signature, :mod:`appendfs.s3.chunked`),
and feeds each payload piece to the MD5 (the ETag), the signed SHA-256 when the
signature covers one, and every checksum the client sent (``Content-MD5``,
``x-amz-checksum-*`` as a header or a trailer). The checks run when the body ends —
:meth:`Body.__aiter__` raises there, before the operation commits anything — so a body
that is short, altered or mis-signed never becomes visible.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from appendfs.s3.checksums import ChecksumAlgorithm, ChecksumVerifier, expected_checksums
from appendfs.s3.chunked import AwsChunkedDecoder, parse_trailer_header
from appendfs.s3.errors import S3Error
from appendfs.s3.sigv4 import ContentSha256, SigningContext

if TYPE_CHECKING:
    from appendfs.s3.http import Request


class Body:
    def __init__(self, req: Request, receive: Callable[[], Awaitable[dict[str, Any]]], ctx: SigningContext) -> None:
        self._receive = receive
        h = req.h
        mode = ctx.payload_mode
        trailer_names = parse_trailer_header([h.get("x-amz-trailer", "")])
        self._decoder: AwsChunkedDecoder | None = None
        self.declared_length = _int_header(h, "content-length")
        if mode.aws_chunked:
            self.declared_length = _int_header(h, "x-amz-decoded-content-length")
            self._decoder = AwsChunkedDecoder(mode, ctx, decoded_length_bytes=self.declared_length,
                                              trailer_names=trailer_names)
        self._sha = ContentSha256.for_context(ctx)
        self._md5 = hashlib.md5()
        self._expected = expected_checksums(
            [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in req.headers], trailer_names)
        self._verifier = ChecksumVerifier(self._expected)
        self._echo: list[tuple[str, str]] = []
        self._done = False
        self.size = 0

    @property
    def has_trailer_checksum(self) -> bool:
        return any(e.b64 is None for e in self._expected)

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()

    def checksum_headers(self) -> list[tuple[str, str]]:
        """The verified x-amz-checksum-* values, echoed in the response as S3 does."""
        return list(self._echo)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                raise S3Error("IncompleteBody", "the client closed the connection before the body ended")
            raw = msg.get("body", b"")
            if raw:
                for p in self._decoder.feed(raw) if self._decoder is not None else (raw,):
                    self._update(p)
                    yield p if isinstance(p, bytes) else bytes(p)
            if not msg.get("more_body", False):
                break
        self._done = True
        self._finish()

    def _update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self._md5.update(data)
        if self._sha is not None:
            self._sha.update(data)
        self._verifier.update(data)

    def _finish(self) -> None:
        """The body is over: every check, before anything is committed."""
        trailers = self._decoder.end() if self._decoder is not None else {}
        if self.declared_length is not None and self.size != self.declared_length:
            raise S3Error("IncompleteBody", f"the body has {self.size} bytes, not the {self.declared_length} declared")
        if self._sha is not None:
            self._sha.verify()
        computed = self._verifier.verify(trailers)
        self._echo = [(a.header, v) for a, v in computed.items() if a is not ChecksumAlgorithm.MD5]

    async def read_all(self, limit: int) -> bytes:
        """The whole (small) body, e.g. an XML document; longer than ``limit`` is refused."""
        if self.declared_length is not None and self.declared_length > limit:
            raise S3Error("MaxMessageLengthExceeded", f"the request body is over {limit} bytes")
        buf = bytearray()
        async for data in self:
            buf += data
            if len(buf) > limit:
                raise S3Error("MaxMessageLengthExceeded", f"the request body is over {limit} bytes")
        return bytes(buf)


def _int_header(h: dict[str, str], name: str) -> int | None:
    v = h.get(name)
    if v is None:
        return None
    v = v.strip()
    if not v.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return int(v)
