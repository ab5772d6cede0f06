"""The trio transport over real loopback sockets: pipelining, ordering, and peers that vanish."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from appendfs.store.rpc import (
    ChannelPool,
    ClusterAuth,
    ConnectionLost,
    RpcError,
    ServerOptions,
    Started,
    serve,
)
from appendfs.store.wire import Request

AUTH = ClusterAuth("cluster-a", b"k" * 32)


async def _server(nursery: trio.Nursery, handler: Any) -> str:
    port = await nursery.start(serve, "127.0.0.1", 0, handler, AUTH, ServerOptions())
    return f"127.0.0.1:{port}"


async def test_requests_are_started_in_order_and_answered_out_of_order() -> None:
    seen: list[int] = []

    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        seen.append(req.args["n"])
        started.started()
        await trio.sleep(0.05 * (5 - req.args["n"]))  # later requests finish first
        return {"n": req.args["n"]}, bytes(req.data)

    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(AUTH) as pool:
            ch = await pool.get(address)
            pending = [await ch.send("echo", {"n": n}, bytes([n]) * 1000) for n in range(5)]
            answers = [await ch.wait(p, 5) for p in pending]
        assert seen == [0, 1, 2, 3, 4]
        assert [(r["n"], d) for r, d in answers] == [(n, bytes([n]) * 1000) for n in range(5)]
        nursery.cancel_scope.cancel()


async def test_frames_larger_than_the_socket_buffers_arrive_whole() -> None:
    """Sends write what the socket takes at once and the rest through trio's send_all: big
    pipelined frames in both directions come out byte for byte, in order."""
    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        started.started()
        return {"n": req.args["n"]}, bytes(reversed(req.data))

    payloads = [random.Random(n).randbytes(6 * 1024 * 1024 + n) for n in range(3)]
    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(AUTH) as pool:
            ch = await pool.get(address)
            pending = [await ch.send("echo", {"n": n}, p) for n, p in enumerate(payloads)]
            answers = [await ch.wait(p, 30) for p in pending]
        assert [r["n"] for r, _ in answers] == [0, 1, 2]
        assert [d for _, d in answers] == [bytes(reversed(p)) for p in payloads]
        nursery.cancel_scope.cancel()


async def test_a_client_vanishing_mid_request_does_not_disturb_the_server() -> None:
    """Regression: replies to a closed connection used to raise out of the request task
    and kill the whole server."""
    release = trio.Event()

    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        started.started()
        if req.op == "slow":
            await release.wait()
        return {"ok": True}, b""

    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(AUTH) as pool:
            ch = await pool.open(address)
            for _ in range(3):
                await ch.send("slow", {})
            await pool.drop(ch)  # the client goes away with three requests in flight
            await trio.sleep(0.05)
            release.set()  # now the server answers into a closed connection
            await trio.sleep(0.05)
            other = await pool.get(address)
            result, _ = await other.call("fast", {}, timeout_s=5)
            assert result == {"ok": True}
        nursery.cancel_scope.cancel()


async def test_a_request_cancelled_mid_frame_breaks_only_its_channel(caplog: pytest.LogCaptureFixture) -> None:
    """Regression (CI, session 21): a LogStream cancels the other lanes of a failed extent
    while their large appends sit half-written in full socket buffers. The channel used
    to stay in the pool, so the next request followed half a frame: the DataNode read
    garbage ("bad magic"), reset the connection, the next extent failed the same way, and
    the write failed after max_resends extent switches. A torn channel is now closed at
    once: the pool's next channel is fresh and works, and a request cancelled before any
    byte went out leaves its channel usable."""
    import logging

    release = trio.Event()

    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        if req.op == "hold":
            await release.wait()  # not started: the server reads nothing more on this connection
        started.started()
        return {"n": len(req.data)}, b""

    big = b"x" * (16 << 20)  # far more than the loopback socket buffers hold
    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(AUTH) as pool:
            ch = await pool.get(address)
            held = await ch.send("hold", {})
            with trio.move_on_after(0.5) as waited:
                for _ in range(16):  # until the socket buffers are full, whatever their size
                    await ch.send("big", {}, big)  # (its only checkpoint is inside a partial send)
            assert waited.cancelled_caught, "the big frames should have filled the socket buffers"
            assert ch.broken is not None
            with pytest.raises(ConnectionLost):
                await ch.send("echo", {}, b"after")
            with pytest.raises(ConnectionLost):
                await ch.wait(held, 5)  # the reader saw the close: what was in flight failed
            release.set()
            with caplog.at_level(logging.WARNING, logger="appendfs.store.rpc"):
                fresh = await pool.get(address)
                assert fresh is not ch
                assert await fresh.call("echo", {}, b"after", timeout_s=5) == ({"n": 5}, b"")
                # cancelled while waiting for the send lock (no byte sent): the channel is fine
                gate = trio.Event()

                async def hog() -> None:
                    await fresh.send("hold2", {}, big)  # finishes: the server reads it whole
                    gate.set()
                with trio.CancelScope() as scope:
                    nursery.start_soon(hog)
                    await trio.sleep(0)
                    scope.cancel()
                    await fresh.send("echo", {}, b"never")
                await gate.wait()
                assert fresh.broken is None
                assert await fresh.call("echo", {}, b"still", timeout_s=5) == ({"n": 5}, b"")
        assert not [r for r in caplog.records if "bad magic" in r.getMessage()]
        nursery.cancel_scope.cancel()


async def test_a_connection_holds_at_most_max_inflight_requests() -> None:
    """Requests beyond ``max_inflight`` wait unread until one in flight finishes (the
    server's memory bound per connection); all are answered in the end."""
    release = trio.Event()
    inside: list[int] = []

    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        started.started()
        inside.append(req.args["n"])
        await release.wait()
        return {"n": req.args["n"]}, b""

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, "127.0.0.1", 0, handler, AUTH, ServerOptions(max_inflight=3))
        async with ChannelPool(AUTH) as pool:
            ch = await pool.get(f"127.0.0.1:{port}")
            pending = [await ch.send("hold", {"n": n}) for n in range(5)]
            await trio.sleep(0.1)
            assert inside == [0, 1, 2]
            release.set()
            answers = [await ch.wait(p, 5) for p in pending]
        assert [r["n"] for r, _ in answers] == list(range(5))
        assert inside == list(range(5))
        nursery.cancel_scope.cancel()


async def test_errors_travel_as_rpc_errors_with_codes() -> None:
    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        raise RpcError("bad_offset", "nope", length=7)

    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(AUTH) as pool:
            ch = await pool.get(address)
            with pytest.raises(RpcError) as err:
                await ch.call("append", {}, timeout_s=5)
        assert err.value.code == "bad_offset" and err.value.details == {"length": 7}
        assert not err.value.temporary
        nursery.cancel_scope.cancel()


async def test_a_wrong_secret_cannot_connect() -> None:
    async def handler(req: Request, started: Started) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    async with trio.open_nursery() as nursery:
        address = await _server(nursery, handler)
        async with ChannelPool(ClusterAuth("cluster-a", b"wrong" * 7), connect_timeout_s=5) as pool:
            with pytest.raises(ConnectionLost):
                await (await pool.get(address)).call("x", {}, timeout_s=5)
        nursery.cancel_scope.cancel()


def test_bad_peer_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of bad peers must not flood the log: N lines a second, then one summary."""
    import logging

    from appendfs.store.rpc import RateLimitedLog

    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.peers"), per_second=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.peers"):
        written = [limited.warning("bad peer %d", i) for i in range(10)]
        now[0] += 1.5
        limited.warning("bad peer after")
    assert written == [True] * 3 + [False] * 7
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad peer 0", "bad peer 1", "bad peer 2",
                     "7 more lines like the above suppressed in the last second", "bad peer after"]
