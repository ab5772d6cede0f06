"""A loopback HTTP/1.1 server that records what real S3 clients (boto3) put on the wire.

Tests point a boto3 client at it, make calls, and check the recorded requests with the
gateway's pure verifiers. It answers PUT with 200 and an ETag (so uploads complete), and
everything else with 403 AccessDenied (which botocore does not retry). It speaks TLS when
given a certificate: botocore streams ``aws-chunked`` bodies with trailing checksums only
over https. Bounded: one connection at a time, socket timeouts, heads and bodies capped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from appendfs.s3.sigv4 import SignedRequest

ACCESS_KEY = "AKIDEXAMPLE0000000001"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
_MAX_HEAD_BYTES = 64 * 1024
_MAX_BODY_BYTES = 64 * 1024 * 1024
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Captured:
    """One request as received: head fields and the body (HTTP chunked framing removed)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def signed_request(self) -> SignedRequest:
        path, _, query = self.target.partition("?")
        return SignedRequest(self.method, path, query, self.headers)

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        return values[-1] if values else None


class CaptureServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.requests: list[Captured] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="s3-capture", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> CaptureServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=_TIMEOUT_S)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                conn.settimeout(_TIMEOUT_S)
                if self._tls is not None:
                    conn = self._tls.wrap_socket(conn, server_side=True)
                with conn:
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        reader = _Reader(conn)
        head = reader.until(b"\r\n\r\n", _MAX_HEAD_BYTES)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip(" \t")))
        fields = dict(headers)
        if fields.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = reader.http_chunked()
        else:
            body = reader.exactly(int(fields.get("content-length", "0")))
        self.requests.append(Captured(method, target, tuple(headers), body))
        if method == "PUT":
            conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "0123456789abcdef0123456789abcdef"\r\n'
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            xml = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                   b"<Message>captured</Message></Error>")
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(xml), xml))


class _Reader:
    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buf = bytearray()

    def _more(self) -> None:
        data = self._conn.recv(256 * 1024)
        if not data:
            raise ValueError("connection closed mid-request")
        self._buf += data

    def until(self, marker: bytes, limit: int) -> bytes:
        while (end := self._buf.find(marker)) < 0:
            if len(self._buf) > limit:
                raise ValueError("line too long")
            self._more()
        out = bytes(self._buf[:end])
        del self._buf[:end + len(marker)]
        return out

    def exactly(self, count: int) -> bytes:
        if count > _MAX_BODY_BYTES:
            raise ValueError("body too large")
        while len(self._buf) < count:
            self._more()
        out = bytes(self._buf[:count])
        del self._buf[:count]
        return out

    def http_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.until(b"\r\n", 1024).split(b";")[0], 16)
            if size == 0:
                while self.until(b"\r\n", 8192):  # HTTP trailers, then the empty line
                    pass
                return bytes(body)
            body += self.exactly(size)
            self.exactly(2)
            if len(body) > _MAX_BODY_BYTES:
                raise ValueError("body too large")


def self_signed_cert(directory: Path) -> tuple[Path, Path] | None:
    """(certificate, key) for 127.0.0.1 made by the openssl CLI; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def s3_client(url: str, *, ca_bundle: Path | None = None, signature_version: str | None = None,
              **s3_config: object) -> Any:
    """A boto3 S3 client as a user would make one, aimed at the capture server.

    Its presigned URLs are SigV2 unless ``signature_version="s3v4"`` (botocore's default).
    """
    config = Config(s3={"addressing_style": "path", **s3_config},
                    signature_version=signature_version,
                    retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=_TIMEOUT_S, read_timeout=_TIMEOUT_S)
    return boto3.client("s3", endpoint_url=url, region_name=REGION,
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        config=config, verify=str(ca_bundle) if ca_bundle else None)


@contextlib.contextmanager
def capturing(tls: ssl.SSLContext | None = None) -> Iterator[CaptureServer]:
    with CaptureServer(tls) as server:
        yield server
