"""Cluster identity on disk: the secret file and a DataNode's directory stamp (DESIGN §7).

``appendfs format`` creates the cluster id and secret in the database and writes them to
a *secret file* (JSON, mode 0600) that DataNodes read with ``--secret-file``. A DataNode
stamps its data directory with ``node.json`` {format_version, node_id, cluster_id} on
first start and refuses a directory stamped by another cluster or another format version;
``node.lock`` keeps a second DataNode process off a directory in use.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from appendfs.errors import ClusterMismatch, ConfigError, VersionMismatch
from appendfs.store.rpc import ClusterAuth

DATADIR_FORMAT_VERSION = 1


def new_cluster() -> ClusterAuth:
    return ClusterAuth(cluster_id=str(uuid.uuid4()), secret=secrets.token_bytes(32))


def write_secret_file(path: Path, auth: ClusterAuth) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"cluster_id": auth.cluster_id, "secret": auth.secret.hex()}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret_file(path: Path) -> ClusterAuth:
    try:
        raw = json.loads(Path(path).read_text())
        return ClusterAuth(cluster_id=str(raw["cluster_id"]), secret=bytes.fromhex(raw["secret"]))
    except FileNotFoundError:
        raise ConfigError(f"secret file {path} does not exist (appendfs format writes it)") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"secret file {path} is not an appendfs secret file") from None
    except OSError as exc:
        raise ConfigError(f"secret file {path} cannot be read: {exc.strerror}") from None


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    cluster_id: str


def lock_data_dir(data_dir: Path) -> int:
    """Take ``DIR/node.lock`` (an exclusive ``flock``) for the life of this process and
    return its descriptor (keep it open: closing it drops the lock). A second DataNode
    on the same directory would interleave appends into the same extent files; it is
    refused with the holder's pid. The kernel drops the lock when the holder dies, even
    by kill -9, so a restart never finds a stale lock."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"data directory {data_dir} is in use by another DataNode (pid {holder}); "
                          "stop it first, or give this one its own --data") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim_data_dir(data_dir: Path, cluster_id: str) -> NodeIdentity:
    """Stamp a new data directory, or check that an existing one is ours."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stamp = data_dir / "node.json"
    if stamp.exists():
        try:
            raw = json.loads(stamp.read_text())
            version = int(raw["format_version"])
            ident = NodeIdentity(node_id=str(raw["node_id"]), cluster_id=str(raw["cluster_id"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{stamp} is damaged; it is not an appendfs DataNode stamp") from None
        if version != DATADIR_FORMAT_VERSION:
            raise VersionMismatch(f"data directory {data_dir} format", DATADIR_FORMAT_VERSION, version)
        if ident.cluster_id != cluster_id:
            raise ClusterMismatch(f"data directory {data_dir} belongs to cluster {ident.cluster_id}, "
                                  f"but the secret file is for cluster {cluster_id}; refusing to use it")
        return ident
    if any(p.name not in ("lost+found", "node.lock") for p in data_dir.iterdir()):
        raise ClusterMismatch(f"data directory {data_dir} is not empty and has no node.json: not an appendfs DataNode directory")
    ident = NodeIdentity(node_id=uuid.uuid4().hex[:16], cluster_id=cluster_id)
    tmp = data_dir / "node.json.tmp"
    tmp.write_text(json.dumps({"format_version": DATADIR_FORMAT_VERSION, "node_id": ident.node_id,
                               "cluster_id": cluster_id}) + "\n")
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, stamp)
    _fsync_dir(data_dir)
    return ident
