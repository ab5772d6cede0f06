"""One cluster, one mount and one S3 gateway per engine for all S3 test modules (their
setup is most of the cost; pytest runs the tests of one engine, then the other's).

Tests must not depend on each other: each makes its own bucket (``bucket`` fixture).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from cluster import Cluster
from mounts import Mount, fuse_available
from pgserver import create_database, drop_database
from s3gw import S3Env, S3Gateway

_names = itertools.count()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def s3env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Env]:
    root = tmp_path_factory.mktemp(f"s3-{request.param}")
    admin = request.getfixturevalue("pg_admin_url") if request.param == "postgresql" else None
    url = create_database(admin) if admin else f"sqlite:///{root}/meta.db"
    cluster = Cluster(root / "cluster", url, extent_max_bytes=32 << 20)
    gw: S3Gateway | None = None
    m: Mount | None = None
    try:
        try:
            cluster.add_metanode()
            for _ in range(3):
                cluster.add_datanode()
            cluster.wait_alive(3)
            gw = S3Gateway(cluster).start()
            key = gw.new_key("default")
            if not fuse_available():
                m = Mount(cluster, root / "mnt", "-o", "allow_other").start()
        except BaseException:
            print(cluster.logs())
            if gw is not None:
                print(gw.text()[-5000:])
            raise
        yield S3Env(cluster, gw, key, gw.client(key), m, request.param)
    finally:
        if m is not None:
            m.stop()
        if gw is not None:
            failed = getattr(request.node, "rep_call", None)
            gw.stop()
            if failed is not None and failed.failed:
                print(gw.text()[-8000:])
        cluster.stop()
        if admin:
            drop_database(admin, url)


@pytest.fixture
def bucket(s3env: S3Env) -> str:
    name = f"b{next(_names)}-{s3env.engine[:2]}"
    s3env.s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def need_mount(s3env: S3Env) -> Mount:
    if s3env.mount is None:
        reason = fuse_available() or "no mount"
        print(f"SKIP REASON: {reason}")
        pytest.skip(reason)
    return s3env.mount
