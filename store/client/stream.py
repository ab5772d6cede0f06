"""LogStream writer: fan-out appends to every replica, acknowledged only when all have them.

``append(data)`` queues the bytes (waiting for window space: backpressure) and returns a
:class:`Ticket`; the stream's writer task places each append at the end of the current
extent and sends it to every replica at once, pipelined per replica connection. An
append is acknowledged when every replica answered it durable; the extent's acknowledged
length is the end of the longest fully-acknowledged prefix. Tickets complete in order
with the (extent, offset, length) pieces where their bytes now live.

When a replica fails (error, lost connection, timeout) the extent is sealed at its
acknowledged length, a new extent is placed on healthy nodes (avoiding the failed one),
and every unacknowledged append is sent again there — the application's write does not
fail (DESIGN §2). A full extent is sealed and the next one allocated the same way.

An ``ec:K+M`` stream (docs/erasure-coding.md) differs only where an append is placed and
what each lane sends: the append starts at a stripe boundary of the logical extent and is
encoded (``ec.Codec.encode``) when placed, a short last stripe zero-padded to the next
boundary; the lane of fragment *i* sends fragment *i*'s records at their fragment offset.
Acknowledgement, tickets (LOGICAL extent offsets), sealing at the acknowledged logical
length and resending on a new extent (re-encoded there) are the replicated path's.

An EC stream also buffers stripes on the way out: the writer coalesces queued appends into
one op of up to ``append_bytes / cell_bytes`` stripes (``_batch_bytes``), so each fragment
append carries about ``append_bytes`` of records instead of ``append_bytes / K`` (the
DataNodes' cost is per request), and small appends share stripes instead of each padding
one. It holds a partial batch only while at least a batch is in flight (self-clocking, like
Nagle's algorithm): a lone or last append is sent at once, and one waiting behind a busy
pipeline goes out as soon as acknowledgements drain it below a batch.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from appendfs.store import ec
from appendfs.store.client.locator import Piece
from appendfs.store.codec import checksum
from appendfs.store.errors import LeaseLost, NoSpace, StoreError, Unavailable
from appendfs.store.rpc import Channel, ConnectionLost, Pending, RpcError

Buffer = bytes | bytearray | memoryview

if TYPE_CHECKING:
    from appendfs.store.client.client import StoreClient

log = logging.getLogger(__name__)


class Ticket:
    """Completion of one ``append``: where its bytes landed, once acknowledged."""

    def __init__(self, nbytes: int, parts: int) -> None:
        self.nbytes = nbytes
        self.pieces: list[Piece] = []
        self.error: BaseException | None = None
        self.done = trio.Event()
        self._parts = parts

    def _piece_done(self, piece: Piece) -> None:
        if self.pieces and self.pieces[-1].extent_id == piece.extent_id and \
                self.pieces[-1].ext_off + self.pieces[-1].length == piece.ext_off:
            last = self.pieces[-1]
            self.pieces[-1] = Piece(last.extent_id, last.ext_off, last.length + piece.length)
        else:
            self.pieces.append(piece)
        self._parts -= 1
        if self._parts == 0:
            self.done.set()

    def _fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()

    async def wait(self) -> list[Piece]:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.pieces


@dataclass
class _Op:
    parts: list[tuple[Ticket, int]]  # whose bytes ``data`` holds, in order (one per append, or coalesced)
    data: Buffer  # as the caller handed it in (see LogStream.append), never changed
    digest: int  # xxh3 of ``data`` (replicated streams only; EC ops send per-fragment digests)
    resends: int = 0
    # set while in flight on an extent:
    offset: int = 0  # logical extent offset (a stripe boundary for EC)
    acks: int = 0
    failed: bool = False
    frags: list[bytes] | None = None  # EC only: the records of each fragment index for this op
    frag_digests: list[int] = field(default_factory=list)
    frag_off: int = 0  # EC only: where those records go in every fragment file

    def payload(self, idx: int) -> tuple[int, Buffer, int]:
        """(offset, bytes, xxh3) the replica / fragment with index ``idx`` stores for this op."""
        if self.frags is None:
            return self.offset, self.data, self.digest
        return self.frag_off, self.frags[idx], self.frag_digests[idx]


@dataclass
class _Extent:
    extent_id: int
    seq: int
    replicas: list[dict[str, Any]]
    length: int = 0  # bytes assigned (sent or about to be)
    acked: int = 0  # end of the fully-acknowledged prefix
    inflight: deque[_Op] = field(default_factory=deque)
    failed_nodes: set[str] = field(default_factory=set)
    failure: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)  # set on every ack or failure
    reason: str = ""

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class LogStream:
    """One append-only stream held by this client (exactly one writer per stream)."""

    def __init__(self, client: StoreClient, stream_id: int, redundancy: str, owner: str, extent_max_bytes: int,
                 codec: ec.Codec | None = None) -> None:
        self.client = client
        self.stream_id = stream_id
        self.redundancy = redundancy
        self.owner = owner
        self._codec = codec  # None for rep:N
        if codec is not None:  # an EC extent holds whole stripes
            extent_max_bytes = codec.layout.stripes_per_extent(extent_max_bytes) * codec.layout.stripe_bytes
        self.extent_max_bytes = extent_max_bytes
        cfg = client.cfg
        self._append_bytes = min(cfg.append_bytes, extent_max_bytes)
        # EC: coalesce queued appends up to this many logical bytes (0: never, replicated streams)
        self._batch_bytes = 0
        if codec is not None:
            lay = codec.layout
            self._batch_bytes = min(max(1, cfg.append_bytes // lay.cell_bytes) * lay.stripe_bytes, extent_max_bytes)
        self._slots = max(1, cfg.window_bytes // self._append_bytes)
        self._window = trio.Semaphore(self._slots)
        self._send, self._recv = trio.open_memory_channel[_Op](self._slots)
        self._last: Ticket | None = None
        self._tickets: deque[Ticket] = deque()  # in append order; done ones dropped as appends come
        # nodes that failed this stream's extents since its last full one: the MetaNode places
        # the next extent on others while it has enough (placement.choose)
        self._avoid: set[str] = set()
        self._broken: BaseException | None = None
        self._extent: _Extent | None = None
        self._seq = 0
        self._stopped = trio.Event()
        self._waiting: tuple[trio.CancelScope, trio.Event] | None = None  # the writer's wait in _next_op
        self.extents_used: list[int] = []
        self.bytes_acked = 0
        self.switches = 0
        self.encode_cpu_s = 0.0  # EC: CPU time of this writer's Codec.encode calls (thread time)

    # ---- public API -----------------------------------------------------------------

    @property
    def failed(self) -> BaseException | None:
        """The error that broke this stream (no more appends), or None while it works."""
        return self._broken


    async def append(self, data: Buffer | Sequence[Buffer], *, frozen: bool = False) -> Ticket:
        """Queue ``data`` (one buffer, or several appended in order under one ticket);
        returns at once unless the window is full (backpressure).

        ``bytes`` are kept as they are, split into views where longer than an append. Other
        buffers are copied, unless ``frozen``: the caller promises not to change them until
        the ticket is done (the store holds them until every replica has acknowledged, and
        sends them again after a failure). A copy costs ~0.1-1 ms per MiB."""
        if self._broken is not None:
            raise self._broken
        parts = self._split(data, frozen)
        ticket = Ticket(sum(len(p) for p in parts), len(parts))
        if not parts:
            ticket.done.set()
            return ticket
        self._last = ticket
        tickets = self._tickets
        while tickets and tickets[0].done.is_set():
            tickets.popleft()
        tickets.append(ticket)
        try:
            for part in parts:
                # A free window slot and a queue with room (the common case) cost no yield:
                # each yield is a trio task switch, a measurable part of a small file's CPU.
                # The window bounds how far a caller that never waits can run ahead.
                try:
                    self._window.acquire_nowait()
                except trio.WouldBlock:
                    await self._window.acquire()
                if self._broken is not None:
                    raise self._broken
                op = _Op([(ticket, len(part))], part, 0 if self._codec else checksum(part))
                try:
                    try:
                        self._send.send_nowait(op)
                    except trio.WouldBlock:
                        await self._send.send(op)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise self._broken or StoreError(f"stream {self.stream_id} is closed") from None
        except BaseException as exc:
            # Interrupted (cancelled while the window was full, or the stream broke) with
            # some parts not queued: the ticket can never complete. Failed now, it does not
            # hold up flush() and close() of this stream for good; the parts already queued
            # are stored as garbage nobody points at.
            ticket._fail(exc if isinstance(exc, Exception) else
                         StoreError(f"append to stream {self.stream_id} interrupted before all of it was queued"))
            raise
        return ticket

    def _split(self, data: Buffer | Sequence[Buffer], frozen: bool) -> list[Buffer]:
        """The appends for ``data``: at most ``append_bytes`` each, copies only of buffers
        that may still change."""
        step = self._append_bytes
        parts: list[Buffer] = []
        for buf in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
            n = len(buf)
            if n == 0:
                continue
            if frozen or isinstance(buf, bytes):
                if n <= step:
                    parts.append(buf)
                else:
                    view = memoryview(buf)  # its slices keep the buffer alive, no copy
                    parts.extend(view[i:i + step] for i in range(0, n, step))
            else:
                view = memoryview(buf)
                parts.extend(bytes(view[i:i + step]) for i in range(0, n, step))
        return parts

    async def flush(self) -> None:
        """Wait until every append queued so far is acknowledged (or raise its error)."""
        if self._last is not None:
            await self._last.wait()
        if self._broken is not None:
            raise self._broken

    async def close(self) -> None:
        """Flush, seal the last extent at its acknowledged length, release the stream."""
        try:
            await self.flush()
        finally:
            await self._send.aclose()
            await self._stopped.wait()
        if self._broken is not None:
            raise self._broken
        await self.client.meta.call("close_stream", {"stream_id": self.stream_id, "holder": self.client.holder})
        self.client._streams.pop(self.stream_id, None)

    # ---- the writer task ------------------------------------------------------------

    async def run(self) -> None:
        """Writer task (started by StoreClient in its nursery)."""
        pending: deque[_Op] = deque()
        try:
            while True:
                if not pending:
                    try:
                        pending.append(await self._recv.receive())
                    except trio.EndOfChannel:
                        break
                if self._extent is None or self._extent.length + self._span(pending[0]) > self.extent_max_bytes:
                    if self._extent is not None:
                        await self._seal(self._extent)
                        self._avoid.clear()  # a full extent: its nodes (and earlier ones) worked
                    self._extent = await self._allocate()
                ext = self._extent
                await self._run_extent(ext, pending)
                if ext.failure.is_set():
                    unacked = list(ext.inflight)
                    ext.inflight.clear()
                    pending.extendleft(reversed(unacked))  # before anything can raise: _break fails them
                    for op in unacked:
                        op.resends += 1
                        if op.resends > self.client.cfg.max_resends:
                            raise StoreError(f"append failed after {op.resends} extent switches: {ext.reason}")
                    log.warning("stream %d: extent %d failed (%s); sealing at %d and resending %d appends",
                                self.stream_id, ext.extent_id, ext.reason, ext.acked, len(unacked))
                    await self._seal(ext)
                    self._avoid |= ext.failed_nodes  # the next extent goes elsewhere if it can
                    self._extent = None
                    self.switches += 1
            if self._extent is not None:
                await self._seal(self._extent)
                self._extent = None
        except BaseException as exc:
            err = exc if isinstance(exc, StoreError) else StoreError(f"stream {self.stream_id} failed: {exc!r}")
            self._break(err)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._stopped.set()

    def _break(self, err: BaseException) -> None:
        """Fail every append not yet acknowledged — held by the writer, in flight, still
        queued, or in the middle of being coalesced or encoded — so no ticket waits forever
        (a waiter may hold a file's flush, and through it a FUSE request no signal can
        interrupt). Every unfinished ticket is in ``_tickets``, whatever op holds it."""
        self._broken = err
        for ticket in self._tickets:
            ticket._fail(err)
        self._tickets.clear()
        self._recv.close()
        for _ in range(self._slots):  # wake appenders blocked on the window: they see the error
            self._window.release()

    async def _allocate(self) -> _Extent:
        avoid = sorted(self._avoid)
        try:
            m = await self.client.meta.call(
                "alloc_extent", {"stream_id": self.stream_id, "holder": self.client.holder, "avoid": avoid,
                                 "seq": self._seq}, wait_s=self.client.cfg.placement_wait_s)
        except RpcError as exc:
            if exc.code == "no_space":
                raise NoSpace(f"no space left in the cluster: {exc.message}") from None
            if exc.code == "lease_lost":
                raise LeaseLost(exc.message) from None
            raise StoreError(f"cannot allocate an extent: {exc.message}") from None
        except Unavailable as exc:
            raise Unavailable(f"cannot place a new extent: {exc}") from None
        self._seq = int(m["seq"]) + 1
        self.client._cache_map(m)
        self.extents_used.append(int(m["extent_id"]))
        return _Extent(int(m["extent_id"]), int(m["seq"]), list(m["replicas"]))

    async def _seal(self, ext: _Extent) -> None:
        try:
            await self.client.meta.call("seal_extent", {"extent_id": ext.extent_id, "holder": self.client.holder,
                                                        "length": ext.acked})
        except RpcError as exc:
            if exc.code == "lease_lost":
                raise LeaseLost(exc.message) from None
            raise StoreError(f"cannot seal extent {ext.extent_id}: {exc.message}") from None
        self.client._forget_map(ext.extent_id)

    async def _run_extent(self, ext: _Extent, pending: deque[_Op]) -> None:
        """Feed appends into ``ext`` until it is full, fails, or the stream is closed."""
        pool = self.client.pool
        lane = f"w{self.stream_id}"
        channels = []
        for r in ext.replicas:
            try:
                channels.append(await pool.get(r["address"], lane=lane))
            except ConnectionLost as exc:
                self._fail_extent(ext, str(exc), r["node_id"])
                return
        queues = [trio.open_memory_channel[_Op | None](1 << 16) for _ in channels]
        async with trio.open_nursery() as nursery:
            for (send_q, recv_q), ch, rep in zip(queues, channels, ext.replicas, strict=True):
                del send_q
                nursery.start_soon(self._replica_lane, ext, ch, rep, recv_q)
            while not ext.failure.is_set():
                if pending:
                    op = pending.popleft()
                else:
                    nxt = await self._next_op(ext)
                    if not isinstance(nxt, _Op):  # closed, or the extent failed
                        break
                    op = nxt
                if ext.length + self._span(op) > self.extent_max_bytes:
                    pending.appendleft(op)
                    break
                if self._batch_bytes:
                    op = await self._coalesce(ext, op, pending)
                    if ext.failure.is_set():
                        pending.appendleft(op)
                        break
                op.offset, op.acks, op.failed = ext.length, 0, False
                ext.length += self._span(op)
                if self._codec is not None:
                    self._encode(ext, op)
                ext.inflight.append(op)
                for send_q, _ in queues:
                    send_q.send_nowait(op)
            for send_q, _ in queues:
                send_q.send_nowait(None)  # drain: lanes finish their in-flight appends, then stop
            await self._drained(ext)
            nursery.cancel_scope.cancel()

    def _span(self, op: _Op) -> int:
        """Logical bytes ``op`` takes in an extent: its length, or whole stripes for EC (pad included)."""
        if self._codec is None:
            return len(op.data)
        return self._codec.layout.next_boundary(len(op.data))

    def _encode(self, ext: _Extent, op: _Op) -> None:
        """Fragment records of ``op`` at its place in ``ext`` (headers name extent and stripe,
        so a resend on another extent encodes again)."""
        assert self._codec is not None
        layout = self._codec.layout
        first = layout.stripe_of(op.offset)
        t0 = time.thread_time()
        op.frags = self._codec.encode(op.data, extent_id=ext.extent_id, first_stripe=first)
        self.encode_cpu_s += time.thread_time() - t0
        op.frag_digests = [checksum(f) for f in op.frags]
        op.frag_off = layout.record_span(first, 0)[0]

    async def _coalesce(self, ext: _Extent, op: _Op, pending: deque[_Op]) -> _Op:
        """``op`` joined with the appends queued behind it, up to a batch and the extent's room
        (EC streams; see the module docstring for when a partial batch is held)."""
        assert self._codec is not None  # only EC streams have a batch size
        layout = self._codec.layout
        room = min(self._batch_bytes, self.extent_max_bytes - ext.length)
        ops, size = [op], len(op.data)
        closed = False
        while not ext.failure.is_set():
            nxt: _Op | bool | None
            if pending:
                nxt = pending.popleft()
            elif closed or ext.length - ext.acked < self._batch_bytes:
                try:  # the pipeline is short: take what is queued, wait for nothing
                    nxt = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            else:  # a batch or more in flight: wait for more data or for an acknowledgement
                nxt = await self._next_op(ext, wake=ext.changed)
                if nxt is None:
                    closed = True
                    continue
                if nxt is False:
                    continue
            assert isinstance(nxt, _Op)
            if layout.next_boundary(size + len(nxt.data)) > room:
                pending.appendleft(nxt)
                break
            ops.append(nxt)
            size += len(nxt.data)
            if size >= room:
                break
        if len(ops) == 1:
            return op
        return _Op([p for o in ops for p in o.parts], b"".join(o.data for o in ops), 0, max(o.resends for o in ops))

    async def _next_op(self, ext: _Extent, wake: trio.Event | None = None) -> _Op | bool | None:
        """Next queued append; None when the stream closes or the extent fails first; False
        when ``wake`` (an EC batch waiting for an acknowledgement) is set first."""
        try:  # the common case under load: an append is already queued, no need to wait
            return self._recv.receive_nowait()
        except trio.WouldBlock:
            pass
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        if wake is not None or self._batch_bytes:
            return await self._next_op_or_wake(ext.failure if wake is None else wake, failure=wake is None)
        # Replicated streams: the wait is one ``receive`` in a cancel scope that a failure of
        # the extent cancels (_wake_writer): no nursery and no helper tasks. This runs once
        # per append whenever the queue is empty, as for every small file's close.
        while not ext.failure.is_set():
            with trio.CancelScope() as scope:
                self._waiting = (scope, ext.failure)
                try:
                    # An append handed over before a cancel lands is returned: trio delivers
                    # a value to a receiver it already woke, and nothing here checkpoints after.
                    return await self._recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return None
                finally:
                    self._waiting = None
        return None

    async def _next_op_or_wake(self, wake: trio.Event, failure: bool = False) -> _Op | bool | None:
        """An EC stream's wait: the next append, or False (None for the extent's ``failure``)
        once ``wake`` is set. Two tasks race; the slack of their hand-over also lets the
        appends queued in the same scheduling round join the op (two 3,000-byte appends
        then share an 8 KiB stripe instead of padding one each: test_writer_faults)."""
        result: list[_Op | bool | None] = []
        async with trio.open_nursery() as nursery:
            async def take() -> None:
                try:
                    result.append(await self._recv.receive())
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    result.append(None)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                await wake.wait()
                result.append(None if failure else False)
                nursery.cancel_scope.cancel()
            nursery.start_soon(take)
            nursery.start_soon(watch)
        for got in result:  # an append that was received wins over a wake-up in the same tick
            if isinstance(got, _Op):
                return got
        return result[0] if result else None

    def _wake_writer(self, event: trio.Event) -> None:
        """``event`` was just set: end the writer's wait in :meth:`_next_op` if it watches it."""
        if self._waiting is not None and self._waiting[1] is event:
            self._waiting[0].cancel()

    async def _drained(self, ext: _Extent) -> None:
        """Wait until every append sent to ``ext`` is acknowledged, or the extent fails."""
        while ext.inflight and not ext.failure.is_set():
            await ext.changed.wait()

    async def _replica_lane(self, ext: _Extent, ch: Channel, rep: dict[str, Any],
                            queue: trio.MemoryReceiveChannel[_Op | None]) -> None:
        """Send this replica its appends in order and count its answers.

        Answers are taken by a callback the channel's reader calls as each one lands, not
        by a task of ours that wakes for it: that task cost two task switches per replica
        per append, a measurable part of a small file's CPU on rep:3. Ops complete in
        order anyway (:meth:`_ack_prefix` pops only the fully acknowledged front). A watch
        task fails the replica when it answers nothing for ``append_timeout_s`` while
        appends wait (checked every quarter of that: a silent replica is failed after one
        to one and a quarter timeouts)."""
        timeout = self.client.cfg.append_timeout_s
        idx = int(rep["idx"])
        node = rep["node_id"]
        unanswered: set[Pending] = set()  # this lane's requests the replica has not answered yet
        progress = trio.current_time()  # last answer, or the send that found nothing waiting
        live = True  # False once this lane stops or its replica failed: later answers are ignored

        def fail(reason: str) -> None:
            nonlocal live
            if live:
                live = False
                self._fail_extent(ext, f"replica on {node}: {reason}", node)

        def answered(op: _Op, pending: Pending) -> None:
            nonlocal progress
            unanswered.discard(pending)
            if not live:
                return
            progress = trio.current_time()
            try:
                result, _ = ch.outcome(pending)
            except (RpcError, ConnectionLost) as exc:
                fail(str(exc))
                return
            at, payload, _ = op.payload(idx)
            if int(result.get("length", -1)) != at + len(payload):
                fail("acknowledged a wrong length")
                return
            op.acks += 1
            if op.acks == len(ext.replicas):
                self._ack_prefix(ext)

        async def watch() -> None:
            while live:
                await trio.sleep(timeout / 4)
                if live and unanswered and trio.current_time() - progress > timeout:
                    fail(f"no answer for {timeout:g} s")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async for op in queue:
                    if op is None or not live:
                        break
                    at, payload, digest = op.payload(idx)
                    if not unanswered:
                        progress = trio.current_time()
                    try:
                        pending = await ch.send("append", {"extent_id": ext.extent_id, "offset": at, "xxh3": digest},
                                                payload, on_done=functools.partial(answered, op))
                    except ConnectionLost as exc:
                        fail(str(exc))
                        break
                    if not pending.done.is_set():
                        unanswered.add(pending)
                if live:
                    # Drained (None): the writer waits for the last answers (_drained), which
                    # the callbacks still count, and then cancels this lane.
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
        finally:
            live = False
            for pending in unanswered:  # answers that never came: let go of their ops' bytes
                pending.on_done = None

    def _fail_extent(self, ext: _Extent, reason: str, node_id: str) -> None:
        ext.failed_nodes.add(node_id)
        if not ext.failure.is_set():
            ext.reason = reason
            ext.failure.set()
            self._wake_writer(ext.failure)
        ext.poke()

    def _ack_prefix(self, ext: _Extent) -> None:
        """Pop fully-acknowledged appends off the front; complete their tickets in order."""
        need = len(ext.replicas)
        while ext.inflight and ext.inflight[0].acks >= need:
            op = ext.inflight.popleft()
            ext.acked = op.offset + len(op.data)
            self.bytes_acked += len(op.data)
            at = op.offset
            for ticket, nbytes in op.parts:  # one window slot per append coalesced into op
                self._window.release()
                ticket._piece_done(Piece(ext.extent_id, at, nbytes))
                at += nbytes
        ext.poke()
