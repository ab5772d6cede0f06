from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Factory: make_cluster(meta_url, metanodes=1, datanodes=3) → a running Cluster."""
    made: list[Cluster] = []

    def make(meta_url: str, *, metanodes: int = 1, datanodes: int = 3, extent_max_bytes: int = 8 << 20,
             datanode_args: tuple[str, ...] = ()) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", meta_url, extent_max_bytes=extent_max_bytes)
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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
