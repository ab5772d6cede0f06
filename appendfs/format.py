"""`appendfs format META_URL`: create both schemas and the cluster identity (DESIGN §7, §8).

Idempotent: on a formatted database it checks both schema versions and rewrites the
secret file from the database (useful on a new DataNode host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from appendfs.db import make_engine
from appendfs.store.identity import new_cluster, write_secret_file
from appendfs.store.metanode import schema as cluster_schema
from appendfs.store.rpc import ClusterAuth


@dataclass(frozen=True)
class FormatResult:
    cluster_id: str
    created: bool
    secret_file: Path


def format_cluster(meta_url: str, secret_file: Path, extent_max_bytes: int = 64 << 20) -> FormatResult:
    engine = make_engine(meta_url)
    try:
        cluster_schema.create_schema(engine)
        _namespace_schema(engine)
        auth = new_cluster()
        created = cluster_schema.init_cluster(engine, auth.cluster_id, auth.secret, extent_max_bytes, time.time_ns())
        row = cluster_schema.read_cluster(engine)
        write_secret_file(secret_file, ClusterAuth(row.cluster_id, row.secret))
        return FormatResult(row.cluster_id, created, secret_file)
    finally:
        engine.dispose()


def _namespace_schema(engine: Engine) -> None:
    """Create the namespace schema (meta/) beside the cluster schema."""
    from appendfs.meta import create_schema

    create_schema(engine)
