"""Trio transport for the wire protocol: authenticated channels (client) and a server loop.

Only moves bytes between sockets and :class:`appendfs.store.wire.Connection`.

Client side: a :class:`Channel` is one TCP connection; many requests may be in flight on
it at once (pipelining) and responses are matched by request id. Requests are written in
the order ``send()`` is called, which is what keeps appends to one extent in order.
Channels live in a :class:`ChannelPool` whose nursery owns their reader tasks.

Server side: :func:`serve` accepts connections, runs the handshake under a deadline and
then reads requests. Each request runs as a task of its own: the handler calls
``started.started()`` (:class:`Started`) once its *ordered* part is done (an append has
been written at its offset), and only then is the next request of that connection read.
So appends on one connection are applied in order, while their durability waits and
replies overlap. Any protocol violation closes that connection with one log line and
never disturbs other connections.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from appendfs.errors import AppendfsError
from appendfs.store.wire import (
    NEED_DATA,
    Authenticated,
    Closed,
    Connection,
    Hello,
    ProtocolError,
    Request,
    Response,
    Role,
)
from appendfs.store.wire.protocol import DIRECT_DATA_BYTES, NONCE_BYTES

log = logging.getLogger(__name__)

#: Error codes after which the same request may succeed later.
TEMPORARY_CODES = frozenset({"not_leader", "unavailable", "recovering", "busy", "timeout", "no_leader"})
#: The most one read of a socket takes into the connection's byte buffer: many small
#: frames, or the head of a large one, whose data then goes straight into its own buffer
#: (Connection.receive_buffer). Larger reads would take whole large frames the copying way.
RECV_CHUNK_BYTES = DIRECT_DATA_BYTES


@dataclass(frozen=True)
class ClusterAuth:
    """The cluster identity every connection proves: its id and shared secret."""

    cluster_id: str
    secret: bytes


class RpcError(AppendfsError):
    """The peer answered a request with an error (``code`` is machine-readable)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.temporary = code in TEMPORARY_CODES

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}

    @classmethod
    def from_wire(cls, error: dict[str, Any]) -> RpcError:
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        return cls(str(error.get("code", "internal")), str(error.get("message", "")), **details)


class ConnectionLost(AppendfsError):
    """The connection failed or closed before the answer came (the peer may be dead)."""

    temporary = True


class RateLimitedLog:
    """At most ``per_second`` lines a second; then one line saying how many were dropped.

    A flood of bad peers must not become a flood of log lines filling the disk.
    """

    def __init__(self, logger: logging.Logger, per_second: int = 20, clock: Any = None) -> None:
        import time

        self.logger = logger
        self.per_second = per_second
        self.clock = clock or time.monotonic
        self._window = -1.0
        self._count = 0
        self._dropped = 0

    def warning(self, msg: str, *args: Any) -> bool:
        now = self.clock()
        if now - self._window >= 1.0:
            if self._dropped:
                self.logger.warning("%d more lines like the above suppressed in the last second", self._dropped)
            self._window, self._count, self._dropped = now, 0, 0
        if self._count >= self.per_second:
            self._dropped += 1
            return False
        self._count += 1
        self.logger.warning(msg, *args)
        return True


_peer_log = RateLimitedLog(log)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _send_locked(lock: trio.Lock, stream: trio.SocketStream, chunks: list[Any],
                       torn: Callable[[BaseException], None] | None = None) -> None:
    """Send one frame's ``chunks`` whole under the connection's send ``lock``.

    Uncontended (the common case) the lock is taken without a yield: ``async with lock``
    always yields, and every yield is a trio task switch — with the hand-offs like it, they
    were most of a DataNode's CPU per small append (docs/benchmarks.md, session 15). A
    closed stream raises OSError (EBADF) or trio.ClosedResourceError; callers take both.

    A frame is all or nothing on the byte stream: if the send stops part-way (cancelled
    while the socket was full, as a LogStream cancels the other lanes of a failed extent),
    the next frame would follow half of this one and the peer would read garbage. So
    ``torn(exc)`` is called first — the channel must be closed before anyone sends again
    (it runs before the lock is released)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    started = False
    try:
        for chunk in chunks:
            # The socket is non-blocking: the kernel takes what fits at once, without the
            # yield trio's send makes after every send that succeeds. The descriptor is
            # looked up right before the write (no yield between): another task may have
            # closed the stream during an earlier chunk's send_all (then it is -1, EBADF).
            try:
                sent = os.write(stream.socket.fileno(), chunk)
            except BlockingIOError:
                sent = 0
            started = started or sent > 0
            if sent < len(chunk):
                started = True  # send_all may write some bytes before it is cancelled
                await stream.send_all(memoryview(chunk)[sent:])
    except BaseException as exc:
        if started and torn is not None:
            torn(exc)
        raise
    finally:
        lock.release()


async def _feed(conn: Connection, stream: trio.SocketStream) -> None:
    """Give ``conn`` what the socket holds now, waiting for some: into the data buffer of
    a large frame when the connection names one (no copy), else through receive_data."""
    view = conn.receive_buffer()
    if view is None:
        conn.receive_data(await _receive(stream))
        return
    with view:
        n = await _receive_into(stream, view)
    conn.received_into(n)


async def _receive_into(stream: trio.SocketStream, view: memoryview) -> int:
    """:func:`_receive` into ``view``: the number of bytes received (0 at end of stream)."""
    sock = stream.socket
    while True:
        try:
            return os.readv(sock.fileno(), [view])
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _receive(stream: trio.SocketStream) -> bytes:
    """The bytes ``stream``'s socket holds now (b"" at end of stream), waiting for some.

    Like ``stream.receive_some`` without its per-call machinery: a successful receive does
    not yield (trio's does, once per chunk of a large frame), and the attempt is a plain
    read of the non-blocking socket. The descriptor is looked up at each attempt: a stream
    closed meanwhile gives EBADF (OSError) or, while waiting, ClosedResourceError."""
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), RECV_CHUNK_BYTES)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


# ---- client ---------------------------------------------------------------------------


class Pending:
    """One request in flight on a :class:`Channel`: its answer or failure, once done."""

    __slots__ = ("done", "error", "on_done", "response")

    def __init__(self, on_done: Callable[[Pending], None] | None = None) -> None:
        self.done = trio.Event()
        self.response: Response | None = None
        self.error: BaseException | None = None
        self.on_done = on_done  # called in the reader's task when the answer (or failure) lands


class Channel:
    """One authenticated client connection with pipelined requests."""

    def __init__(self, address: str, stream: trio.SocketStream, conn: Connection) -> None:
        self.address = address
        self.peer_node = conn.peer_node
        self._stream = stream
        self._conn = conn
        self._send_lock = trio.Lock()
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self.broken: BaseException | None = None

    async def send(self, op: str, args: dict[str, Any] | None = None,
                   data: bytes | bytearray | memoryview = b"",
                   on_done: Callable[[Pending], None] | None = None) -> Pending:
        """Write a request now (in call order); await ``wait(pending)`` for its answer.

        ``on_done(pending)``, if given, is called once when the answer arrives or the
        connection fails — synchronously, in the task that noticed (no task switch; see
        LogStream's replica lanes); it takes the outcome with :meth:`outcome` and must not
        raise. A failed send also calls it before raising ConnectionLost."""
        if self.broken is not None:
            raise ConnectionLost(f"connection to {self.address} is broken: {self.broken}")
        req_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        pending = Pending(on_done)
        self._pending[req_id] = pending
        chunks = self._conn.send(Request(req_id=req_id, op=op, args=args or {}, data=data))
        try:
            await _send_locked(self._send_lock, self._stream, chunks, self._torn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(exc)
            raise ConnectionLost(f"sending to {self.address} failed: {exc}") from None
        except BaseException:
            # Cancelled: the caller never gets ``pending`` and nobody waits for its answer.
            # Before a byte of the frame went out the connection is intact (the peer never
            # sees the request); after, _torn has already broken it.
            self._pending.pop(req_id, None)
            raise
        return pending

    def _torn(self, exc: BaseException) -> None:
        """A frame was cut off mid-way (see _send_locked): this connection is unusable.
        Marked broken (send refuses) and its socket closed at once, so no later frame
        follows the torn one. The requests still in flight fail when the reader sees the
        close — not here, inside the cancelled sender, whose callbacks are being undone."""
        if self.broken is None:
            self.broken = ConnectionLost(f"a request to {self.address} was cut off mid-frame ({exc!r})")
        self._stream.socket.close()

    async def wait(self, pending: Pending, timeout_s: float = math.inf) -> tuple[dict[str, Any], bytes | bytearray]:
        """Wait for a request's answer; raise RpcError, ConnectionLost or trio.TooSlowError."""
        with trio.fail_after(timeout_s):
            await pending.done.wait()
        return self.outcome(pending)

    def outcome(self, pending: Pending) -> tuple[dict[str, Any], bytes | bytearray]:
        """The answer of a completed request; raises RpcError or ConnectionLost. Large data
        comes as the bytearray the connection received it into (no copy)."""
        if pending.error is not None:
            raise ConnectionLost(f"connection to {self.address} lost: {pending.error}")
        resp = pending.response
        assert resp is not None
        if resp.error is not None:
            raise RpcError.from_wire(resp.error)
        data = resp.data
        return resp.result, bytes(data) if isinstance(data, memoryview) else data

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   data: bytes | bytearray | memoryview = b"",
                   timeout_s: float = math.inf) -> tuple[dict[str, Any], bytes | bytearray]:
        return await self.wait(await self.send(op, args, data), timeout_s)

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        failed, self._pending = self._pending, {}
        for pending in failed.values():
            pending.error = exc
            self._complete(pending)

    def _complete(self, pending: Pending) -> None:
        pending.done.set()
        if pending.on_done is not None:
            try:
                pending.on_done(pending)
            except Exception:  # a broken callback must not take the connection down
                log.exception("answer callback for %s failed", self.address)

    async def _reader(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    await _feed(self._conn, self._stream)
                    continue
                if isinstance(event, Closed):
                    raise ConnectionLost("peer closed the connection")
                assert isinstance(event, Response)
                pending = self._pending.pop(event.req_id, None)
                if pending is not None:
                    pending.response = event
                    self._complete(pending)
        except (ProtocolError, ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not isinstance(exc, trio.ClosedResourceError):
                log.debug("channel to %s ended: %s", self.address, exc)
            self._fail(exc)
        finally:
            self._fail(ConnectionLost("channel closed"))
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def aclose(self) -> None:
        self._fail(ConnectionLost("channel closed by us"))
        await self._stream.aclose()


async def _handshake_client(address: str, auth: ClusterAuth, timeout_s: float,
                            max_data_bytes: int) -> tuple[trio.SocketStream, Connection]:
    host, port = parse_address(address)
    conn = Connection(Role.CLIENT, cluster_id=auth.cluster_id, secret=auth.secret,
                      nonce=os.urandom(NONCE_BYTES), max_data_bytes=max_data_bytes)
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            try:
                stream.setsockopt(6, 1, 1)  # TCP_NODELAY: small request frames must not wait for Nagle
                hello = await _next(conn, stream)
                if not isinstance(hello, Hello):
                    raise ProtocolError("expected HELLO")
                if hello.cluster_id != auth.cluster_id:
                    raise ProtocolError(f"{address} belongs to cluster {hello.cluster_id!r}, not {auth.cluster_id!r}")
                for chunk in conn.auth():
                    await stream.send_all(chunk)
                if not isinstance(await _next(conn, stream), Authenticated):
                    raise ProtocolError("expected AUTHOK")
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ConnectionLost, ProtocolError) as exc:
        raise ConnectionLost(f"cannot connect to {address}: {str(exc) or exc.__class__.__name__}") from None
    return stream, conn


async def _next(conn: Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            if isinstance(event, Closed):
                raise ConnectionLost("peer closed during handshake")
            return event
        await _feed(conn, stream)


class ChannelPool:
    """Cached channels by address; owns their reader tasks. Use as ``async with``."""

    def __init__(self, auth: ClusterAuth, *, connect_timeout_s: float = 5.0,
                 max_data_bytes: int = 16 * 1024 * 1024 + 65536) -> None:
        self.auth = auth
        self.connect_timeout_s = connect_timeout_s
        self.max_data_bytes = max_data_bytes
        self._channels: dict[tuple[str, str], Channel] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> ChannelPool:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(*exc)

    async def get(self, address: str, lane: str = "") -> Channel:
        """A healthy channel to ``address``; ``lane`` keeps separate connections per use."""
        key = (address, lane)
        ch = self._channels.get(key)
        if ch is not None and ch.broken is None:
            return ch
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            ch = self._channels.get(key)
            if ch is not None and ch.broken is None:
                return ch
            ch = await self.open(address)
            self._channels[key] = ch
            return ch

    async def open(self, address: str) -> Channel:
        """A new, uncached channel (closed with the pool or by ``drop``)."""
        assert self._nursery is not None, "ChannelPool used outside 'async with'"
        stream, conn = await _handshake_client(address, self.auth, self.connect_timeout_s, self.max_data_bytes)
        ch = Channel(address, stream, conn)
        self._nursery.start_soon(ch._reader)
        return ch

    async def drop(self, ch: Channel) -> None:
        for key, cached in list(self._channels.items()):
            if cached is ch:
                del self._channels[key]
        await ch.aclose()


# ---- server ---------------------------------------------------------------------------

Handler = Callable[[Request, "Started"], Awaitable[tuple[dict[str, Any], bytes | bytearray | memoryview]]]


class Started:
    """``started()`` (idempotent) releases the connection's reader to read the next request.

    A plain event rather than ``nursery.start``'s task_status: start() opens a nursery of
    its own per request, 40 µs of CPU against 18 for ``start_soon`` and an event, ~6% of a
    DataNode's CPU per small append."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def started(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class ServerOptions:
    handshake_timeout_s: float = 10.0
    max_inflight: int = 64
    max_data_bytes: int = 16 * 1024 * 1024 + 65536
    node: str = ""


async def serve_connection(stream: trio.SocketStream, handler: Handler, auth: ClusterAuth,
                           opts: ServerOptions) -> None:
    """Run one accepted connection to completion; never raises for peer misbehaviour."""
    peer = _peer_name(stream)
    conn = Connection(Role.SERVER, cluster_id=auth.cluster_id, secret=auth.secret,
                      nonce=os.urandom(NONCE_BYTES), max_data_bytes=opts.max_data_bytes, node=opts.node)
    send_lock = trio.Lock()
    limit = trio.Semaphore(opts.max_inflight)

    def torn(_exc: BaseException) -> None:  # an answer cut off mid-frame: later ones would be garbage
        stream.socket.close()

    async def send(chunks: list[Any]) -> None:
        await _send_locked(send_lock, stream, chunks, torn)

    async def run(req: Request, started: Started) -> None:
        try:
            result, data = await handler(req, started)
            resp = Response(req_id=req.req_id, result=result, data=data)
        except RpcError as exc:
            resp = Response(req_id=req.req_id, error=exc.to_wire())
        except Exception as exc:
            log.exception("request %s from %s failed", req.op, peer)
            resp = Response(req_id=req.req_id, error={"code": "internal", "message": f"{exc.__class__.__name__}: {exc}"})
        finally:
            started.started()
            limit.release()
        try:
            await send(conn.send(resp))
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer is gone (or went away mid-request): its answer has nowhere to go

    try:
        with trio.fail_after(opts.handshake_timeout_s):
            await send(conn.hello())
            event = await _next(conn, stream)
            if not isinstance(event, Authenticated):
                raise ProtocolError("expected AUTH")
            await send(conn.authok())
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        await _feed(conn, stream)
                        continue
                    if isinstance(event, Closed):
                        break
                    assert isinstance(event, Request)
                    try:
                        limit.acquire_nowait()  # (no yield: see _send_locked)
                    except trio.WouldBlock:
                        await limit.acquire()
                    started = Started()
                    nursery.start_soon(run, event, started)
                    await started.wait()
            except (ProtocolError, ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:
                # Raised out of the nursery it would come as an ExceptionGroup, past the
                # one-line reports below (a garbled frame logged a whole traceback).
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
    except ProtocolError as exc:
        _peer_log.warning("closing connection from %s: %s", peer, exc)
    except trio.TooSlowError:
        _peer_log.warning("closing connection from %s: no handshake within %.0f s", peer, opts.handshake_timeout_s)
    except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("connection from %s ended: %s", peer, exc or exc.__class__.__name__)
    finally:
        await trio.aclose_forcefully(stream)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


async def serve(host: str, port: int, handler: Handler, auth: ClusterAuth, opts: ServerOptions,
                *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen and serve forever; ``task_status.started`` gets the bound port."""

    async def on_conn(stream: trio.SocketStream) -> None:
        try:
            stream.setsockopt(6, 1, 1)
        except OSError:
            pass
        try:
            await serve_connection(stream, handler, auth, opts)
        except Exception:
            # One connection must never take the server down, whatever went wrong in it.
            log.exception("connection handler failed; closing that connection only")

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, on_conn, listeners)
        task_status.started(bound)


@asynccontextmanager
async def single_channel(address: str, auth: ClusterAuth, timeout_s: float = 5.0) -> AsyncIterator[Channel]:
    """A pool with one channel, for one-shot tools."""
    async with ChannelPool(auth, connect_timeout_s=timeout_s) as pool:
        yield await pool.get(address)
