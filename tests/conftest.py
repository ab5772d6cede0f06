"""Fixtures shared by every tier: databases on both engines, and real clusters.

``pg_admin_url`` is a real PostgreSQL server for the whole session (a throwaway one
unless APPENDFS_TEST_PG names one); ``pg_url`` is a fresh database on it per test;
``sqlite_url`` a fresh SQLite file; ``meta_url`` runs a test once on each engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from hypothesis import HealthCheck, settings
from mounts import Mount, fuse_available
from pgserver import ThrowawayPostgres, create_database, drop_database, postgres_server

# Property tests are derandomized: the same examples every run, so CI is repeatable and a
# failure found once is found again. HYPOTHESIS_PROFILE=explore searches with fresh seeds.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: A test still running after this long is taken as hung (the slowest take ~20 s).
HANG_S = float(os.environ.get("APPENDFS_TEST_HANG_S", "300"))


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """A hang in a mount must fail its test, not block the suite until CI's time runs out.

    A program (or this process) waiting in a FUSE request the mount never answers cannot
    be interrupted, not even by SIGKILL, and neither can anyone waiting for it. After
    HANG_S this kills the test's mounts: the kernel aborts their requests, every blocked
    call returns ENOTCONN, and the test fails with its mounts' logs (make_mount prints them).
    pytest-timeout (pyproject) is the backstop for hangs elsewhere: it dumps every
    thread's stack and ends the run."""
    import threading

    def expire() -> None:
        hung = list(Mount.live)
        print(f"\n{request.node.nodeid}: still running after {HANG_S:.0f} s; killing its "
              f"{len(hung)} FUSE mount(s) so blocked calls return", flush=True)
        for m in hung:
            m.kill()

    timer = threading.Timer(HANG_S, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[tuple[str, ThrowawayPostgres | None]]:
    # fsync=off (APPENDFS_TEST_PG_FSYNC=on to keep it): nothing here crashes the machine's
    # kernel, the one event it guards against, and a flush of this disk costs ~1.5 ms per
    # MiB (docs/benchmarks.md). The mount's program tests on PostgreSQL: 79 -> 71 s, git
    # alone 35.6 -> 26.9 s. Benchmarks start their server durable.
    with postgres_server(durable=os.environ.get("APPENDFS_TEST_PG_FSYNC") == "on") as server:
        yield server


@pytest.fixture(scope="session")
def pg_admin_url(pg_server: tuple[str, ThrowawayPostgres | None]) -> str:
    return pg_server[0]


@pytest.fixture
def stoppable_pg(pg_server: tuple[str, ThrowawayPostgres | None]) -> ThrowawayPostgres:
    """The session's PostgreSQL, for outage tests that stop and restart it (pause/resume)."""
    server = pg_server[1]
    if server is None:
        print("SKIP REASON: APPENDFS_TEST_PG names an external server; outage tests stop their own")
        pytest.skip("needs the throwaway PostgreSQL (APPENDFS_TEST_PG is set)")
    return server


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    url = create_database(pg_admin_url)
    yield url
    drop_database(pg_admin_url, url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/meta.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def meta_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/meta.db"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Factory: make_cluster(meta_url, metanodes=1, datanodes=3, env=None) → a running Cluster."""
    made: list[Cluster] = []

    def make(meta_url: str, *, metanodes: int = 1, datanodes: int = 3, extent_max_bytes: int = 8 << 20,
             datanode_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", meta_url, extent_max_bytes=extent_max_bytes, env=env)
        made.append(c)
        for _ in range(metanodes):
            c.add_metanode()
        for _ in range(datanodes):
            c.add_datanode(*datanode_args)
        if datanodes:
            c.wait_alive(datanodes)
        return c

    yield make
    for c in made:
        c.stop()
        failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
        if failed:
            print(c.logs())


@pytest.fixture
def make_mount(make_cluster: object, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Factory: make_mount(cluster, *args, env=None) → a started Mount at a fresh directory."""
    reason = fuse_available()
    if reason:
        print(f"SKIP REASON: {reason}")
        pytest.skip(reason)
    made: list[Mount] = []

    def make(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> Mount:
        m = Mount(cluster, tmp_path / f"mnt{len(made)}", *args, env=env, name=f"mount-{len(made)}")
        made.append(m)
        return m.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for m in made:
        m.stop()
        if failed:
            print(f"==== {m.log.name}\n{m.text()[-6000:]}")


@pytest.fixture
def mounted(meta_url: str, make_cluster: object, make_mount: object) -> Mount:
    """A mount of a fresh 3-DataNode cluster, once on SQLite and once on PostgreSQL.

    meta_url comes first: fixtures are torn down in reverse, so the database outlives
    the mount and the cluster that use it."""
    cluster = make_cluster(meta_url)  # type: ignore[operator]
    return make_mount(cluster)  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_mount(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One cluster and mount shared by a whole test module, once per engine (saves ~4 s a test).

    Tests using it must not depend on each other: each works in its own subdirectory.
    """
    reason = fuse_available()
    if reason:
        print(f"SKIP REASON: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp(f"mod-{request.param}")
    admin = request.getfixturevalue("pg_admin_url") if request.param == "postgresql" else None
    url = create_database(admin) if admin else f"sqlite:///{root}/meta.db"
    cluster = Cluster(root / "cluster", url)
    cluster.add_metanode()
    for _ in range(3):
        cluster.add_datanode()
    m: Mount | None = None
    try:
        try:
            cluster.wait_alive(3)
            m = Mount(cluster, root / "mnt", "-o", "allow_other").start()
        except BaseException:
            print(cluster.logs())  # a failed setup has no rep_call to print them
            raise
        yield m
    finally:
        if m is not None:
            m.stop()
        cluster.stop()
        if admin:
            drop_database(admin, url)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_report_header(config: pytest.Config) -> str:
    """The disk the tests write to, as df counts it: a CI failure with ENOSPC or `no_space`
    is first a question of how much room the machine had."""
    import tempfile
    where = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    st = os.statvfs(where)
    used, avail = (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize
    return (f"disk under {where}: {avail / 2**30:.1f} GiB available, {used / 2**30:.1f} GiB used "
            f"({100 * used / max(1, used + avail):.0f}% as df counts it)")
