"""The gateway's adjustments to hypercorn: they must find what they change.

A hypercorn release that renamed or dropped what these patch would make the gateway fall
back silently (and slower); this test fails instead, so the upgrade gets a look.
"""

from __future__ import annotations

import pytest
from hypercorn.trio import tcp_server

from appendfs.s3.server import RECV_BYTES, _read_larger_chunks


def test_request_bodies_are_read_in_large_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_server, "MAX_RECV", 2**16)  # hypercorn's own value (raises if it is gone)
    _read_larger_chunks()
    assert tcp_server.MAX_RECV == RECV_BYTES
    _read_larger_chunks()  # idempotent
    assert tcp_server.MAX_RECV == RECV_BYTES
    monkeypatch.setattr(tcp_server, "MAX_RECV", 4 * RECV_BYTES)
    _read_larger_chunks()  # never lowers a larger value
    assert tcp_server.MAX_RECV == 4 * RECV_BYTES
