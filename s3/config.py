"""Configuration of the S3 gateway (TOML table ``[s3]``, env ``APPENDFS_S3_*``).

The file layer's settings (write budget, chunk size, default redundancy) are in ``[fs]``
and the store client's in ``[client]``; this table holds what is about S3 itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from appendfs.config import host_port, non_negative, option, positive


def _region(value: str) -> str | None:
    return None if value and all(c.isalnum() or c == "-" for c in value) else "letters, digits and '-' only"


def _part(value: int) -> str | None:
    return None if 1 <= value <= 5 << 30 else "must be between 1 byte and 5 GiB"


@dataclass(frozen=True)
class S3Config:
    """Over HTTPS, current boto3 and aws cli stream uploads as ``aws-chunked`` bodies with
    trailing checksums; over HTTP they sign the payload's SHA-256 and send checksums as
    headers. Both are served."""

    listen: str = option("127.0.0.1:9000", "address to serve HTTP on", host_port)
    region: str = option("us-east-1", "the region clients sign for (and GetBucketLocation answers)", _region)
    max_skew_s: float = option(900.0, "largest difference between a request's X-Amz-Date and our clock", positive)
    min_part_bytes: int = option(5 << 20, "smallest multipart part except the last (S3: 5 MiB)", _part)
    max_object_bytes: int = option(5 << 30, "largest single PUT or part (S3: 5 GiB)", positive)
    upload_expiry_s: float = option(7 * 86400.0, "incomplete multipart uploads older than this are aborted", positive)
    expiry_interval_s: float = option(3600.0, "how often this gateway looks for expired uploads", positive)
    key_cache_s: float = option(10.0, "access keys are cached this long (a deleted key works that much longer)", positive)
    max_xml_bytes: int = option(2 << 20, "largest XML request body (Delete of 1,000 keys, Complete of 10,000 parts)", positive)
    keep_alive_s: float = option(60.0, "idle keep-alive connections are closed after this", positive)
    read_timeout_s: float = option(120.0, "a client that sends nothing for this long is disconnected", positive)
    tls_cert_file: str | None = option(None, "PEM certificate (chain): serve HTTPS instead of HTTP")
    tls_key_file: str | None = option(None, "PEM private key of tls_cert_file")
    workers: int = option(0, "gateway processes sharing the listening socket (0: one per CPU, at most 8; "
                             "one Python process serves one core at most)", non_negative)
    metrics: str | None = option(None, "serve Prometheus /metrics on HOST:PORT (the sum over the workers)", host_port)
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
