"""Fixtures for namespace tests: a formatted namespace on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from appendfs.db import make_engine
from appendfs.meta import Meta, MetaConfig, create_schema


def open_meta(url: str, **config: Any) -> Meta:
    engine = make_engine(url, pool_size=8, pre_ping=False)
    create_schema(engine)
    return Meta(engine, MetaConfig(**config))


@pytest.fixture
def meta(meta_url: str) -> Iterator[Meta]:
    """A fresh namespace; after the test its invariants must hold."""
    m = open_meta(meta_url, dir_mtime_granularity_ns=0)
    yield m
    problems = m.check_invariants()
    m.close()
    assert problems == []


@pytest.fixture
def pg_meta(pg_url: str) -> Iterator[Meta]:
    m = open_meta(pg_url)
    yield m
    problems = m.check_invariants()
    m.close()
    assert problems == []


@pytest.fixture
def open_meta_fn() -> Iterator[Callable[..., Meta]]:
    """open_meta for tests that need several clients; all are closed afterwards."""
    opened: list[Meta] = []

    def make(url: str, **config: object) -> Meta:
        m = open_meta(url, **config)
        opened.append(m)
        return m

    yield make
    for m in opened:
        m.close()
