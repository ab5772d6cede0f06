"""Sans-IO decoder of ``Content-Encoding: aws-chunked`` request bodies (S3 streaming uploads).

Where it sits: after :func:`appendfs.s3.sigv4.verify` accepted a request whose
``x-amz-content-sha256`` names a ``STREAMING-*`` mode, the HTTP layer feeds the body bytes
(already freed of any HTTP ``Transfer-Encoding: chunked`` framing) to
:meth:`AwsChunkedDecoder.feed`, which returns the object's payload pieces, and calls
:meth:`AwsChunkedDecoder.end` when the body is over, which returns the trailing headers
(``x-amz-checksum-*``, for :mod:`appendfs.s3.checksums`). Nothing is authenticated until
``end`` returns: the caller stages the payload and commits only then.

Wire format (``<sig>`` is 64 lowercase hex, sizes are hex)::

    signed:    <size>;chunk-signature=<sig>\\r\\n<data>\\r\\n ... 0;chunk-signature=<sig>\\r\\n
    unsigned:  <size>\\r\\n<data>\\r\\n ... 0\\r\\n
    then:      <name>:<value>\\r\\n ... [x-amz-trailer-signature:<sig>\\r\\n] \\r\\n

Each chunk signature is HMAC(signing key, ``AWS4-HMAC-SHA256-PAYLOAD\\n<amz date>\\n<scope>
\\n<previous signature>\\n<sha256 of "">\\n<sha256 of chunk data>``), chained from the
request's own (seed) signature; the trailer signature is HMAC(signing key,
``AWS4-HMAC-SHA256-TRAILER\\n<amz date>\\n<scope>\\n<final chunk signature>\\n<sha256 of the
trailers as "name:value\\n" in name order>``) — the form of the AWS documentation's worked
example (sigv4-streaming-trailers), which the tests reproduce.

Bounded: a chunk-size line of at most :data:`MAX_CHUNK_LINE_BYTES`, chunks of at most
``max_chunk_bytes``, trailers of at most ``max_trailer_bytes``. Fast: payload pieces are
zero-copy views of the fed bytes and chunk data is hashed by hashlib (which drops the GIL) —
no per-byte Python loop and no growing buffer; only the few bytes of a line split across two
feeds are copied. With chunk signatures, a chunk's pieces are returned only once its
signature has been checked (so at most ``max_chunk_bytes`` of views are held).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Final

from appendfs.s3.sigv4 import EMPTY_SHA256_HEX, AuthError, Code, PayloadMode, SigningContext

#: A chunk-size line is ``hex;chunk-signature=<64 hex>\r\n`` (~90 bytes); refuse longer.
MAX_CHUNK_LINE_BYTES: Final = 256
#: The largest chunk accepted (clients send 64 KiB to 1 MiB chunks; AWS allows up to 16 MiB).
DEFAULT_MAX_CHUNK_BYTES: Final = 16 * 1024 * 1024
#: The largest trailer section accepted (a checksum and a signature are ~130 bytes).
DEFAULT_MAX_TRAILER_BYTES: Final = 4 * 1024

TRAILER_SIGNATURE: Final = "x-amz-trailer-signature"
_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;(.*))?")
_CHUNK_SIGNATURE = re.compile(rb"chunk-signature=([0-9a-f]{64})")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{64}")


class _State(enum.Enum):
    SIZE_LINE = enum.auto()  # expecting "<size>[;ext]\r\n"
    DATA = enum.auto()  # inside a chunk's data
    DATA_END = enum.auto()  # expecting the "\r\n" after a chunk's data
    TRAILER = enum.auto()  # after the 0-size chunk: trailer lines until an empty one
    DONE = enum.auto()


def parse_trailer_header(values: Iterable[str]) -> tuple[str, ...]:
    """The trailer names announced by ``x-amz-trailer`` header values (comma-separated)."""
    names = [n.strip().lower() for v in values for n in v.split(",")]
    return tuple(n for n in names if n)


class AwsChunkedDecoder:
    """Decodes one ``aws-chunked`` body; :meth:`feed` it bytes, then call :meth:`end`.

    ``mode`` is the request's payload mode (a ``STREAMING-*`` one); ``context`` what verify
    returned for it — required when chunks are signed, None only for an anonymous
    ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` upload. ``decoded_length_bytes`` is the request's
    ``x-amz-decoded-content-length`` when it sent one; ``trailer_names`` what its
    ``x-amz-trailer`` announced (see :func:`parse_trailer_header`): exactly those trailers must
    arrive. With ``trailer_names=None`` any trailers are accepted. After any error the
    decoder is dead: every later call raises the same error.
    """

    def __init__(self, mode: PayloadMode, context: SigningContext | None = None, *,
                 decoded_length_bytes: int | None = None,
                 trailer_names: Iterable[str] | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 max_trailer_bytes: int = DEFAULT_MAX_TRAILER_BYTES) -> None:
        if not mode.aws_chunked:
            raise ValueError(f"{mode} is not an aws-chunked payload mode")
        if context is None and mode.chunk_signatures:
            raise ValueError(f"{mode} needs the SigningContext of the verified request")
        if context is not None and context.payload_mode is not mode:
            raise ValueError(f"{mode} is not the payload mode the request was signed with")
        self._mode = mode
        self._signed = mode.chunk_signatures
        self._key = context.signing_key if context is not None else b""
        self._previous = context.seed_signature if context is not None else ""
        amz_date, scope = (context.amz_date, context.scope) if context is not None else ("", "")
        self._sts_prefix = f"AWS4-HMAC-SHA256-PAYLOAD\n{amz_date}\n{scope}\n"
        self._trailer_sts_prefix = f"AWS4-HMAC-SHA256-TRAILER\n{amz_date}\n{scope}\n"
        self._expected_length = decoded_length_bytes
        self._expected_trailers = (None if trailer_names is None
                                   else frozenset(n.lower() for n in trailer_names))
        self._max_chunk_bytes = max_chunk_bytes
        self._max_trailer_bytes = max_trailer_bytes
        self._state = _State.SIZE_LINE
        self._line = bytearray()  # the start of a line split across feeds (bounded)
        self._remaining = 0  # data bytes still to come in the current chunk
        self._chunk_signature = ""
        self._chunk_hash = hashlib.sha256()
        self._pending: list[memoryview] = []  # a signed chunk's data, held until verified
        self._decoded_bytes = 0  # sum of the chunk sizes announced so far
        self._trailer_bytes = 0
        self._trailers: dict[str, str] = {}
        self._trailer_signature: str | None = None
        self._error: AuthError | None = None

    @property
    def done(self) -> bool:
        """The body's final empty line has been seen."""
        return self._state is _State.DONE

    @property
    def decoded_bytes(self) -> int:
        """Payload bytes announced by the chunks read so far."""
        return self._decoded_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Decode the next body bytes; returns the payload pieces they complete, in order.

        The pieces are views of ``data`` (copied first unless it is ``bytes``, so a buffer
        the caller reuses cannot change them). Raises :class:`AuthError` on a bad body.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data if isinstance(data, bytes) else bytes(data))
        except AuthError as error:
            self._error = error
            raise

    def end(self) -> dict[str, str]:
        """The body is over: check that it was complete; returns the trailers (lowercase
        names, ``x-amz-trailer-signature`` left out)."""
        if self._error is not None:
            raise self._error
        try:
            if self._state is _State.TRAILER and not self._line:
                # Some clients omit the body's final empty line; what came is whole.
                self._finish_trailers()
            if self._state is not _State.DONE:
                raise AuthError(Code.INCOMPLETE_BODY, "The aws-chunked body ended before its "
                                "final chunk and trailers.")
            if self._expected_length is not None and self._decoded_bytes != self._expected_length:
                raise AuthError(Code.INCOMPLETE_BODY, f"The body decoded to {self._decoded_bytes}"
                                f" bytes but x-amz-decoded-content-length says "
                                f"{self._expected_length}.")
            return dict(self._trailers)
        except AuthError as error:
            self._error = error
            raise

    # ------------------------------------------------------------------ the state machine

    def _feed(self, data: bytes) -> list[memoryview]:
        out: list[memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state is _State.DATA:
                take = min(self._remaining, size - pos)
                piece = view[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._signed:
                    self._chunk_hash.update(piece)
                    self._pending.append(piece)
                else:
                    out.append(piece)
                if self._remaining == 0:
                    self._state = _State.DATA_END
            elif state is _State.DATA_END:
                pos = self._take_data_end(data, pos)
                if self._state is _State.SIZE_LINE and self._signed:
                    self._check_chunk_signature()
                    out.extend(self._pending)
                    self._pending.clear()
            elif state is _State.DONE:
                raise AuthError(Code.INVALID_REQUEST, "There is data after the end of the "
                                "aws-chunked body.")
            else:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                if state is _State.SIZE_LINE:
                    self._on_size_line(line)
                else:
                    self._on_trailer_line(line)
        return out

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """The next CRLF-terminated line (without CRLF) from ``data[pos:]``, joined with a
        start kept from earlier feeds; ``(None, len(data))`` when it is not complete yet."""
        if self._state is _State.SIZE_LINE:
            limit = MAX_CHUNK_LINE_BYTES - len(self._line)
        else:
            limit = self._max_trailer_bytes - self._trailer_bytes - len(self._line)
        if limit <= 0:
            raise self._too_long()
        newline = data.find(b"\n", pos, pos + limit)
        if newline < 0:
            if len(data) - pos >= limit:
                raise self._too_long()
            self._line += data[pos:]
            return None, len(data)
        if self._line:
            line = bytes(self._line) + data[pos:newline + 1]
            self._line.clear()
        else:
            line = data[pos:newline + 1]
        if self._state is _State.TRAILER:
            self._trailer_bytes += len(line)
        if not line.endswith(b"\r\n"):
            raise self._malformed_line("a line of the aws-chunked body does not end in CRLF")
        return line[:-2], newline + 1

    def _too_long(self) -> AuthError:
        if self._state is _State.SIZE_LINE:
            return AuthError(Code.INVALID_CHUNK_SIZE_ERROR, "A chunk-size line is longer than "
                             f"{MAX_CHUNK_LINE_BYTES} bytes.")
        return AuthError(Code.MALFORMED_TRAILER_ERROR, "The trailers are longer than "
                         f"{self._max_trailer_bytes} bytes.")

    def _malformed_line(self, why: str) -> AuthError:
        code = (Code.INVALID_CHUNK_SIZE_ERROR if self._state is _State.SIZE_LINE
                else Code.MALFORMED_TRAILER_ERROR)
        return AuthError(code, why)

    def _take_data_end(self, data: bytes, pos: int) -> int:
        """Consume the CRLF after a chunk's data (possibly split across feeds)."""
        need = 2 - len(self._line)
        got = data[pos:pos + need]
        self._line += got
        if len(self._line) == 2:
            if self._line != b"\r\n":
                raise AuthError(Code.INVALID_REQUEST, "A chunk's data is not followed by CRLF: "
                                "the chunk is longer than its size says.")
            self._line.clear()
            self._state = _State.SIZE_LINE
        return pos + len(got)

    def _on_size_line(self, line: bytes) -> None:
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise AuthError(Code.INVALID_CHUNK_SIZE_ERROR, "A chunk-size line is malformed.")
        chunk_bytes = int(match.group(1), 16)
        if chunk_bytes > self._max_chunk_bytes:
            raise AuthError(Code.INVALID_CHUNK_SIZE_ERROR, f"A chunk of {chunk_bytes} bytes is "
                            f"larger than the {self._max_chunk_bytes} bytes allowed.")
        if self._signed:
            extension = match.group(2) or b""
            signature = _CHUNK_SIGNATURE.fullmatch(extension.lower())
            if signature is None:
                raise AuthError(Code.SIGNATURE_DOES_NOT_MATCH, "A chunk carries no well-formed "
                                "chunk-signature.")
            self._chunk_signature = signature.group(1).decode("ascii")
            self._chunk_hash = hashlib.sha256()
        self._decoded_bytes += chunk_bytes
        if self._expected_length is not None and self._decoded_bytes > self._expected_length:
            raise AuthError(Code.INCOMPLETE_BODY, "The chunks carry more bytes than "
                            f"x-amz-decoded-content-length says ({self._expected_length}).")
        if chunk_bytes:
            self._remaining = chunk_bytes
            self._state = _State.DATA
        else:
            if self._signed:
                self._check_chunk_signature()
            self._state = _State.TRAILER

    def _check_chunk_signature(self) -> None:
        to_sign = (f"{self._sts_prefix}{self._previous}\n{EMPTY_SHA256_HEX}\n"
                   f"{self._chunk_hash.hexdigest()}")
        expected = hmac.new(self._key, to_sign.encode("ascii"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self._chunk_signature):
            raise AuthError(Code.SIGNATURE_DOES_NOT_MATCH, "The chunk signature we calculated "
                            "does not match the signature you provided.",
                            {"StringToSign": to_sign})
        self._previous = expected

    def _on_trailer_line(self, line: bytes) -> None:
        if not line:
            self._finish_trailers()
            return
        name_bytes, colon, value_bytes = line.partition(b":")
        name = name_bytes.decode("latin-1").strip().lower()
        value = value_bytes.decode("latin-1").strip()
        if not colon or not name:
            raise AuthError(Code.MALFORMED_TRAILER_ERROR, "A trailer line is not name:value.")
        if name == TRAILER_SIGNATURE:
            if self._mode is not PayloadMode.STREAMING_SIGNED_TRAILER or \
                    self._trailer_signature is not None or not _SIGNATURE_HEX.fullmatch(value):
                raise AuthError(Code.MALFORMED_TRAILER_ERROR, "Unexpected or malformed "
                                "x-amz-trailer-signature.")
            self._trailer_signature = value
            return
        if not self._mode.trailer or name in self._trailers or self._trailer_signature:
            raise AuthError(Code.MALFORMED_TRAILER_ERROR, f"Unexpected trailer {name!r}.")
        self._trailers[name] = value

    def _finish_trailers(self) -> None:
        if self._expected_trailers is not None and set(self._trailers) != self._expected_trailers:
            raise AuthError(Code.MALFORMED_TRAILER_ERROR, "The trailers sent "
                            f"({', '.join(sorted(self._trailers)) or 'none'}) are not those "
                            "announced by x-amz-trailer.")
        if self._mode is PayloadMode.STREAMING_SIGNED_TRAILER:
            self._check_trailer_signature()
        self._state = _State.DONE

    def _check_trailer_signature(self) -> None:
        if self._trailer_signature is None:
            raise AuthError(Code.SIGNATURE_DOES_NOT_MATCH, "The trailers carry no "
                            "x-amz-trailer-signature.")
        canonical = "".join(f"{n}:{self._trailers[n]}\n" for n in sorted(self._trailers))
        digest = hashlib.sha256(canonical.encode("latin-1")).hexdigest()
        to_sign = f"{self._trailer_sts_prefix}{self._previous}\n{digest}"
        expected = hmac.new(self._key, to_sign.encode("ascii"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self._trailer_signature):
            raise AuthError(Code.SIGNATURE_DOES_NOT_MATCH, "The trailer signature we calculated "
                            "does not match the signature you provided.",
                            {"StringToSign": to_sign})
