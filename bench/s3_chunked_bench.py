#!/usr/bin/env python3
"""S3 aws-chunked decoder throughput: how fast the gateway's pure-Python body path goes.

Builds an in-memory body of ``--size-mib`` (default 256) MiB in each streaming mode — signed
64 KiB chunks (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``, what e.g. the AWS Java/Go SDKs and
MinIO clients send over plain HTTP), signed chunks with a CRC32 trailer, and boto3's unsigned
1 MiB chunks with a CRC32 trailer — then feeds it to :class:`AwsChunkedDecoder` in pieces
of ``--feed-kib`` (what one socket read hands the gateway) and prints MiB/s of payload for
the decoder alone and with the trailing checksum verified as the gateway does. One core,
one thread; numbers vary with the machine's load. Tests never assert on wall time (STYLE 11).

    .venv/bin/python bench/s3_chunked_bench.py [--size-mib 256] [--feed-kib 64 1024]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import time
import zlib

from appendfs.s3.checksums import ChecksumVerifier, expected_checksums
from appendfs.s3.chunked import AwsChunkedDecoder
from appendfs.s3.sigv4 import EMPTY_SHA256_HEX, PayloadMode, SigningContext, signing_key

MIB = 1024 * 1024
TRAILER = "x-amz-checksum-crc32"


def context_for(mode: PayloadMode) -> SigningContext:
    key = signing_key("bench-secret", "20240101", "us-east-1")
    return SigningContext("AKBENCH", key, "20240101/us-east-1/s3/aws4_request",
                          "20240101T000000Z", "0" * 64, mode, mode.value)


def build_body(context: SigningContext, size_mib: int, chunk_bytes: int) -> bytes:
    """``size_mib`` MiB of payload (one random block repeated) in aws-chunked framing."""
    block = os.urandom(chunk_bytes)
    chunks = size_mib * MIB // chunk_bytes
    signed = context.payload_mode.chunk_signatures
    prefix = f"AWS4-HMAC-SHA256-PAYLOAD\n{context.amz_date}\n{context.scope}\n"
    block_hash = hashlib.sha256(block).hexdigest()
    out = bytearray()
    previous = context.seed_signature
    crc = 0
    for data in [block] * chunks + [b""]:
        crc = zlib.crc32(data, crc)
        if signed:
            digest = block_hash if data else EMPTY_SHA256_HEX
            to_sign = f"{prefix}{previous}\n{EMPTY_SHA256_HEX}\n{digest}"
            previous = hmac.new(context.signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
            out += b"%x;chunk-signature=%s\r\n" % (len(data), previous.encode())
        else:
            out += b"%x\r\n" % len(data)
        if data:
            out += data + b"\r\n"
    if context.payload_mode.trailer:
        trailer = f"{TRAILER}:{base64.b64encode(crc.to_bytes(4, 'big')).decode()}"
        out += trailer.encode() + b"\r\n"
        if signed:
            digest = hashlib.sha256((trailer + "\n").encode()).hexdigest()
            to_sign = (f"AWS4-HMAC-SHA256-TRAILER\n{context.amz_date}\n{context.scope}\n"
                       f"{previous}\n{digest}")
            signature = hmac.new(context.signing_key, to_sign.encode(), hashlib.sha256)
            out += b"x-amz-trailer-signature:%s\r\n" % signature.hexdigest().encode()
    out += b"\r\n"
    return bytes(out)


def run(context: SigningContext, body: bytes, feed_bytes: int, checksum: bool) -> float:
    """Seconds to decode ``body`` fed in ``feed_bytes`` pieces (and verify its CRC32)."""
    names = [TRAILER] if context.payload_mode.trailer else []
    verifier = ChecksumVerifier(expected_checksums((), names)) if checksum else None
    decoder = AwsChunkedDecoder(context.payload_mode, context, trailer_names=names)
    view = memoryview(body)
    started = time.perf_counter()
    for start in range(0, len(body), feed_bytes):
        # bytes(), as a socket read hands the gateway a fresh bytes object
        for piece in decoder.feed(bytes(view[start:start + feed_bytes])):
            if verifier is not None:
                verifier.update(piece)
    trailers = decoder.end()
    if verifier is not None:
        verifier.verify(trailers)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--feed-kib", type=int, nargs="+", default=[64, 1024])
    args = parser.parse_args()
    cases = [(PayloadMode.STREAMING_SIGNED, 64 * 1024),
             (PayloadMode.STREAMING_SIGNED_TRAILER, 64 * 1024),
             (PayloadMode.STREAMING_UNSIGNED_TRAILER, MIB)]
    print(f"{'mode':44} {'chunk':>7} {'feed':>7} {'decode MiB/s':>13} {'+crc32 MiB/s':>13}")
    for mode, chunk_bytes in cases:
        context = context_for(mode)
        body = build_body(context, args.size_mib, chunk_bytes)
        for feed_kib in args.feed_kib:
            plain = min(run(context, body, feed_kib * 1024, False) for _ in range(2))
            with_crc = (f"{args.size_mib / min(run(context, body, feed_kib * 1024, True) for _ in range(2)):.0f}"
                        if mode.trailer else "-")
            print(f"{mode.value:44} {chunk_bytes // 1024:>5}Ki {feed_kib:>5}Ki "
                  f"{args.size_mib / plain:>13.0f} {with_crc:>13}")


if __name__ == "__main__":
    main()
