"""A real S3 gateway process for tests, and real clients for it (boto3, the aws cli, rclone).

:class:`S3Gateway` runs ``appendfs s3 --meta URL --listen 127.0.0.1:PORT`` beside a
:class:`cluster.Cluster`; :meth:`S3Gateway.new_key` makes a key pair with the CLI, as an
operator would. :func:`boto3_client` gives a client with path-style addressing and no
retries (a refused request must surface, not be retried into success).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from cluster import APPENDFS, Cluster, Proc, free_port, wait_for


@dataclass(frozen=True)
class Key:
    access_key: str
    secret_key: str
    tenant: str


class S3Gateway:
    def __init__(self, cluster: Cluster, name: str = "s3", env: dict[str, str] | None = None,
                 tls: bool = False) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.proc = Proc(name, [*APPENDFS, "s3", "--meta", cluster.meta_url, "--listen", f"127.0.0.1:{self.port}"],
                         cluster.root / f"{name}.log")
        self.env = {**cluster.env, "APPENDFS_S3_KEY_CACHE_S": "1", **(env or {})}

    def start(self, timeout_s: float = 60) -> S3Gateway:
        with open(self.proc.log, "ab") as f:
            self.proc.popen = subprocess.Popen(self.proc.argv, stdout=f, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=self.env)

        def up() -> bool:
            if not self.proc.alive:
                raise AssertionError(f"the gateway exited:\n{self.proc.text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        wait_for(up, "the S3 gateway to listen", timeout_s)
        return self

    def stop(self) -> None:
        self.proc.stop()

    def new_key(self, tenant: str = "default", *args: str) -> Key:
        out = self.cluster.run(["s3", "keys", "create", "--meta", self.cluster.meta_url, "--tenant", tenant, *args])
        text = out.stdout.decode()
        ak = re.search(r"access_key_id = (\S+)", text)
        sk = re.search(r"secret_access_key = (\S+)", text)
        assert ak and sk, text
        return Key(ak.group(1), sk.group(1), tenant)

    def client(self, key: Key, **cfg: Any) -> Any:
        return boto3_client(self.endpoint, key, **cfg)

    def aws(self, key: Key, *args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """Run the aws cli (the Debian package) against this gateway."""
        # Debian's package first: a user-level shim (pyenv) may shadow it with another version
        exe = shutil.which("aws", path="/usr/bin:/bin") or shutil.which("aws")
        assert exe, "the aws cli is not installed (apt-get install awscli)"
        env = {**_clean_env(), "AWS_ACCESS_KEY_ID": key.access_key, "AWS_SECRET_ACCESS_KEY": key.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        return subprocess.run([exe, "--endpoint-url", self.endpoint, *args], env=env, capture_output=True,
                              check=check, input=input, timeout=timeout)

    def rclone(self, key: Key, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        exe = shutil.which("rclone")
        assert exe, "rclone is not installed (apt-get install rclone)"
        env = {**_clean_env(), "RCLONE_CONFIG": "/dev/null", "RCLONE_CONFIG_GW_TYPE": "s3",
               "RCLONE_CONFIG_GW_PROVIDER": "Other", "RCLONE_CONFIG_GW_ENDPOINT": self.endpoint,
               "RCLONE_CONFIG_GW_ACCESS_KEY_ID": key.access_key, "RCLONE_CONFIG_GW_SECRET_ACCESS_KEY": key.secret_key,
               "RCLONE_CONFIG_GW_REGION": "us-east-1", "RCLONE_CONFIG_GW_FORCE_PATH_STYLE": "true"}
        return subprocess.run([exe, *args], env=env, capture_output=True, check=check, timeout=timeout)

    def text(self) -> str:
        return self.proc.text()


@dataclass
class S3Env:
    """What the s3 test modules share: a cluster, its gateway, a key and client, maybe a mount."""

    cluster: Cluster
    gw: S3Gateway
    key: Key
    s3: Any  # a boto3 client with `key`
    mount: Any  # mounts.Mount, or None where FUSE is unavailable
    engine: str

    def bucket_path(self, bucket: str) -> Path:
        assert self.mount is not None
        return Path(self.mount.path) / bucket


def _clean_env() -> dict[str, str]:
    """The environment without AWS_* settings of the host (an AWS_CA_BUNDLE makes rclone 1.60
    refuse to start: "unable to load custom CA bundle, HTTPClient's transport unsupported")."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 made with the openssl command (as an operator would)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def boto3_client(endpoint: str, key: Key, verify: str | None = None, **cfg: Any) -> Any:
    # SigV4 for presigned URLs too (boto3 still presigns with SigV2 for us-east-1 by default;
    # the gateway accepts SigV4 only and says so)
    config = Config(s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=10, read_timeout=120, **cfg)
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key.access_key,
                        aws_secret_access_key=key.secret_key, region_name="us-east-1", config=config,
                        **({"verify": verify} if verify else {}))


def raw(endpoint: str, method: str, url_path: str, headers: dict[str, str] | None = None,
        body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, url_path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str:
    return ET.fromstring(body).findtext("Code") or ""


def signed(endpoint: str, key: Key, method: str, path: str, body: bytes = b"",
           headers: dict[str, str] | None = None) -> AWSRequest:
    req = AWSRequest(method=method, url=endpoint + path, data=body, headers=headers or {})
    S3SigV4Auth(Credentials(key.access_key, key.secret_key), "s3", "us-east-1").add_auth(req)
    return req


def send(endpoint: str, req: AWSRequest) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(req.url)
    path = u.path + (f"?{u.query}" if u.query else "")
    return raw(endpoint, req.method, path, dict(req.headers.items()), req.data or b"")


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
