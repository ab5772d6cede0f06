"""The extent engine of one device: append rules, checksums, group commit, recovery, seal.

Data flow of an append: the RPC handler calls :meth:`ExtentStore.append`, which checks
the rules (extent open, offset == current end, xxh3 of the payload matches, space left),
reserves the range and computes the block entries *in order* on the event loop, releases
the connection to read its next request, writes the bytes through the device's single
write lane, and waits for the group commit that makes them durable. A small append
(``inline_write_bytes``) that finds the write lane idle is written on the event loop
itself: a 4 KiB O_DIRECT write takes ~40 µs here, a hand-off to the lane's thread and back
costs more than that in CPU and several times that in wake-up latency. Order is kept
because it happens only when no write is in the lane and no lane append is between its
write and recording its block entries (``_lane_appends``). Such an append that then finds
nothing else waiting for a commit, no commit in progress and the lane still idle commits
in its own task, without the commit loop (two task switches fewer; see ``_durable``).
Every commit, wherever it runs, keeps one order:

    sync data files → write their new checksum entries → sync checksum files → wake waiters

Data is always durable before the entries that vouch for it (DESIGN §8), so after a
crash the recovered length — the longest prefix whose blocks verify — covers everything
that was acknowledged. An extent open at a restart is *recovering*: read-only until the
MetaNode tells it the sealed length (reconcile), because its writer has moved on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from appendfs.store.codec import BLOCK_BYTES, ENTRY_BYTES, checksum
from appendfs.store.codec.blocks import append_entries, encode_entry, recover_length
from appendfs.store.datanode.backend import Backend, BackendError, ExtentMeta, ExtentMissing, Usage

log = logging.getLogger(__name__)
_RECOVER_CHUNK = 4 * 1024 * 1024
_INLINE_READ_BYTES = 128 * 1024  # reads up to this size try the page cache on the event loop
# The free-space check of an append asks the backend (a statvfs) at most this often while
# the device has more than _FREE_MARGIN free beyond the append; nearer full, every time.
_FREE_CHECK_S = 0.1
_FREE_MARGIN = 256 << 20


class ExtentError(Exception):
    """An extent request broke a rule; ``code`` goes to the wire."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class _Extent:
    meta: ExtentMeta
    length: int  # end of the last accepted append (reserved, maybe not yet written)
    written: int  # end of the last completed write
    durable: int  # end of the last group-committed write
    tail: bytes = b""  # bytes of the last partial block at `length`
    pending: dict[int, bytes] = field(default_factory=dict)  # block -> entry, not yet flushed
    flushing: dict[int, bytes] = field(default_factory=dict)  # block -> entry, being flushed
    failed: str | None = None
    recovering: bool = False
    sealing: bool = False

    @property
    def sealed(self) -> bool:
        return self.meta.state == "sealed"


class _Batch:
    def __init__(self) -> None:
        self.extents: set[int] = set()
        self.done = trio.Event()
        self.error: str | None = None


class ExtentStore:
    """All extents of one device, over one backend. Run :meth:`run` in a nursery."""

    def __init__(self, backend: Backend, *, high_water: float = 0.95, reserve_bytes: int = 64 << 20,
                 read_threads: int = 4, commit_bytes: int = 8 << 20, commit_wait_s: float = 0.005,
                 inline_write_bytes: int = 64 << 10, inline_commit_s: float = 0.005) -> None:
        self.backend = backend
        self.inline_write_bytes = inline_write_bytes
        # A small group commit runs on the event loop while commits stay this fast on average
        # (_commit_avg_s): a thread hand-off and back costs more here than two fdatasyncs of
        # a few KiB (~0.3 ms on this machine's disk, against ~1 ms per 4 KiB append in all).
        # 5 ms, not 1: with three DataNodes on one disk a small commit takes 1-2 ms, and
        # sending those to a thread cost each DataNode ~0.2 ms of CPU per append more
        # (about 20% of its CPU) while the host was CPU-bound (docs/benchmarks.md,
        # session 11). A device slower than that (a disk's flush) still goes to the thread.
        self.inline_commit_s = inline_commit_s
        self._commit_avg_s = 0.0
        # Appends between entering the write lane and recording their entries. The lane's
        # token is returned when the worker thread finishes, before the append's task runs
        # again to record its entries: an inline write in that gap would record newer
        # entries first, and the older ones would then overwrite them (a partial block's).
        self._lane_appends = 0
        self.commit_bytes = commit_bytes
        self.commit_wait_s = commit_wait_s
        self._batch_bytes = 0  # bytes written since the last batch was taken
        self._free_bytes = 0  # the device's free bytes at the last check (_room_for)
        self._free_checked = float("-inf")
        self._appended_since_check = 0
        self._wrote = trio.Event()  # set whenever a write completes
        self.high_water = high_water
        self.reserve_bytes = reserve_bytes
        self._extents: dict[int, _Extent] = {}
        self._write_lane = trio.CapacityLimiter(1)  # one write request at a time per device
        self._sync_lane = trio.CapacityLimiter(1)
        self._read_lane = trio.CapacityLimiter(read_threads)
        self._batch = _Batch()
        self._committing = False  # the commit loop holds a batch it has not finished
        self._wake = trio.Event()
        self.stats = {"appends": 0, "append_bytes": 0, "writes_inline": 0, "reads": 0, "reads_inline": 0, "read_bytes": 0,
                      "commits": 0, "commits_inline": 0,
                      "checksum_rejects": 0, "write_seconds": 0.0, "commit_seconds": 0.0,
                      "append_latency_seconds": 0.0,
                      # repair.py and scrub.py count here too, so /metrics shows them
                      "rebuilds": 0, "rebuild_bytes": 0, "rebuild_read_bytes": 0, "rebuild_failures": 0, "transcodes": 0,
                      "scrub_bytes": 0, "scrub_extents": 0, "scrub_errors": 0, "scrub_passes": 0}

    # ---- start-up -------------------------------------------------------------------

    def recover(self) -> list[int]:
        """Load every extent; recover open ones. Blocking: call before serving.

        Returns the ids of extents that are now *recovering* (open at the restart).
        """
        sweep = getattr(self.backend, "sweep_orphans", None)
        if sweep:
            sweep()
        recovering = []
        for extent_id in self.backend.list():
            try:
                meta = self.backend.get_meta(extent_id)
            except BackendError as exc:
                log.error("skipping extent %d: %s", extent_id, exc)
                continue
            if meta.state == "sealed":
                self._extents[extent_id] = _Extent(meta, meta.sealed_length, meta.sealed_length, meta.sealed_length)
                continue
            size: int | None = None
            try:
                size = self.backend.data_size(extent_id)
                length = self._recover_open(extent_id, size)
                tail = self._read_tail(extent_id, length)
            except (BackendError, OSError) as exc:
                if size is None and isinstance(exc, ExtentMissing):
                    self._drop_record(extent_id, exc)
                else:
                    # Unreadable data (an I/O error, a checksum file missing next to the
                    # data): not served, kept for the operator; the node itself must still
                    # start and serve every other extent (the MetaNode repairs the copy).
                    log.error("skipping open extent %d: its record is here but its data is not: %s", extent_id, exc)
                continue
            ext = _Extent(meta, length, length, length, tail=tail, recovering=True)
            self._extents[extent_id] = ext
            recovering.append(extent_id)
            log.info("extent %d was open at restart: recovered %d bytes, awaiting reconcile", extent_id, length)
        return recovering

    def _drop_record(self, extent_id: int, exc: BaseException) -> None:
        """An open extent's data region is gone (a file deleted by hand, a create interrupted
        between its files and its record): this node does not hold it and never will again.
        Its record goes too, or every start would log it anew; the MetaNode already counts
        this copy missing."""
        log.warning("open extent %d has a record but no data (%s): removing the record", extent_id, exc)
        try:
            self.backend.delete(extent_id)
        except (BackendError, OSError) as again:
            log.error("removing the record of extent %d: %s", extent_id, again)

    def _recover_open(self, extent_id: int, size: int) -> int:
        length = 0
        while length < size:
            chunk = self.backend.read_data(extent_id, length, _RECOVER_CHUNK)
            first = length // BLOCK_BYTES
            entries = self.backend.read_checksums(extent_id, first, -(-len(chunk) // BLOCK_BYTES))
            good = recover_length(chunk, entries)
            length += good
            if good < len(chunk) or good % BLOCK_BYTES:
                break
        blocks = -(-length // BLOCK_BYTES)
        self.backend.truncate(extent_id, length, blocks)
        return length

    def _read_tail(self, extent_id: int, length: int) -> bytes:
        cut = length % BLOCK_BYTES
        return self.backend.read_data(extent_id, length - cut, cut) if cut else b""

    # ---- group commit ---------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The device's commit loop: one fdatasync round serves every waiting append."""
        task_status.started()
        while True:
            await self._wake.wait()
            await self._let_batch_grow()
            self._wake = trio.Event()
            batch_bytes, self._batch_bytes = self._batch_bytes, 0
            batch, self._batch = self._batch, _Batch()
            self._committing = True
            try:
                await self._commit_batch(batch, self._small_idle_commit(batch_bytes))
            finally:
                self._committing = False

    async def _commit_batch(self, batch: _Batch, inline: bool) -> None:
        """Make the pending entries of ``batch``'s extents durable; set ``batch.done``.
        ``inline``: on the event loop, without yielding (see _small_idle_commit)."""
        work: dict[int, tuple[dict[int, bytes], int]] = {}
        for extent_id in batch.extents:
            ext = self._extents.get(extent_id)
            if ext is None:
                continue
            ext.flushing, ext.pending = ext.pending, {}
            work[extent_id] = (ext.flushing, ext.written)
        try:
            t0 = time.perf_counter()
            if inline:
                self._commit(work)  # blocks the loop for about _commit_avg_s
                self.stats["commits_inline"] += 1
            else:
                await trio.to_thread.run_sync(self._commit, work, limiter=self._sync_lane)
            took = time.perf_counter() - t0
            self._commit_avg_s += (took - self._commit_avg_s) / 8
            self.stats["commit_seconds"] += took
            self.stats["commits"] += 1
        except (OSError, BackendError) as exc:
            log.error("group commit failed on %s: %s", self.backend.kind, exc)
            batch.error = f"device I/O error: {exc}"
            for extent_id in work:
                if extent_id in self._extents:
                    self._extents[extent_id].failed = batch.error
        for extent_id, (_entries, written) in work.items():
            ext = self._extents.get(extent_id)
            if ext is not None:
                ext.flushing = {}
                if batch.error is None:
                    ext.durable = max(ext.durable, written)
        batch.done.set()

    def _small_idle_commit(self, batch_bytes: int) -> bool:
        """Whether this commit may run on the event loop: few bytes, nothing in the device's
        write lane, and commits that have been fast lately. A slow device (a flush of a
        busy disk can take tens of ms) sends commits back to the thread by itself."""
        return (self.inline_commit_s > 0 and batch_bytes <= self.inline_write_bytes
                and self._commit_avg_s <= self.inline_commit_s
                and not self._write_lane.borrowed_tokens and not self._lane_appends)

    async def _let_batch_grow(self) -> None:
        """While writes are still in the device's lane, let them join this commit.

        A flush costs about the same for 1 MiB as for 8 MiB on a device with a volatile
        cache, so one commit serving the appends already in flight beats a commit each.
        Bounded by bytes and by time (commit_bytes, commit_wait_s).
        """
        if self.commit_wait_s <= 0:
            return
        with trio.move_on_after(self.commit_wait_s):
            while self._write_lane.borrowed_tokens and self._batch_bytes < self.commit_bytes:
                self._wrote = trio.Event()
                await self._wrote.wait()

    def _commit(self, work: dict[int, tuple[dict[int, bytes], int]]) -> None:
        ids = sorted(work)
        self.backend.sync_data(ids)
        for extent_id in ids:
            entries = work[extent_id][0]
            for first, run in _runs(entries):
                self.backend.write_checksums(extent_id, first, run)
        self.backend.sync_checksums(ids)

    async def _durable(self, extent_id: int) -> None:
        batch = self._batch
        idle = not batch.extents and not self._committing and self._small_idle_commit(self._batch_bytes)
        batch.extents.add(extent_id)
        if idle:
            # Nothing else waits for a commit and the device is idle: commit right here.
            # Handing this one append to the commit loop and back cost two task switches
            # (docs/benchmarks.md, session 15).
            self._batch_bytes = 0
            self._batch = _Batch()
            await self._commit_batch(batch, inline=True)  # does not yield
        else:
            self._wake.set()
            await batch.done.wait()
        if batch.error is not None:
            raise ExtentError("io_error", batch.error)

    # ---- operations -----------------------------------------------------------------

    def _get(self, extent_id: int) -> _Extent:
        ext = self._extents.get(extent_id)
        if ext is None:
            raise ExtentError("not_found", f"extent {extent_id} does not exist on this node")
        return ext

    def index_of(self, extent_id: int) -> int:
        """The replica / fragment index the extent was created with (reads report it, so an
        EC client notices a fragment stored where another index is placed)."""
        return self._get(extent_id).meta.index

    def full(self, u: Usage | None = None) -> bool:
        """Whether the device takes no new extents; ``u``: a ``backend.usage()`` just read."""
        u = self.backend.usage() if u is None else u
        return u.capacity_bytes <= 0 or u.used_bytes / u.capacity_bytes >= self.high_water or u.free_bytes < self.reserve_bytes

    async def create(self, meta: ExtentMeta) -> None:
        existing = self._extents.get(meta.extent_id)
        if existing is not None:
            if existing.meta.stream_id == meta.stream_id and existing.length == 0 and not existing.sealed:
                return  # a retried create
            raise ExtentError("exists", f"extent {meta.extent_id:x} already exists")
        if self.full():
            raise ExtentError("no_space", "device is above its high-water mark")
        await trio.to_thread.run_sync(self.backend.create, meta, limiter=self._write_lane)
        self._extents[meta.extent_id] = _Extent(meta, 0, 0, 0)

    async def append(self, extent_id: int, offset: int, data: bytes | bytearray, digest: int, started: Any) -> int:
        """Append ``data`` at ``offset`` (must be the current end); return the new length once durable."""
        ext = self._get(extent_id)
        if ext.sealed or ext.sealing:
            raise ExtentError("sealed", f"extent {extent_id} is sealed", length=ext.length)
        if ext.recovering:
            raise ExtentError("recovering", f"extent {extent_id} awaits reconcile after a restart")
        if ext.failed:
            raise ExtentError("io_error", ext.failed)
        if offset != ext.length:
            raise ExtentError("bad_offset", f"append at {offset} but extent {extent_id} ends at {ext.length}",
                              length=ext.length)
        if checksum(data) != digest:
            self.stats["checksum_rejects"] += 1
            raise ExtentError("checksum", f"payload of {len(data)} bytes does not match its xxh3")
        if not self._room_for(len(data)):
            raise ExtentError("no_space", "device has no space left for this append")
        first_block = offset // BLOCK_BYTES
        entries, ext.tail = append_entries(ext.tail, data)
        ext.length = end = offset + len(data)
        started.started()  # the next request of this connection may now be read
        t0 = time.perf_counter()
        try:
            if len(data) <= self.inline_write_bytes and not self._write_lane.borrowed_tokens \
                    and not self._lane_appends:
                # No write is in the lane or waiting for it, no append is between its write and
                # recording its entries, and this does not yield: it is next in every order.
                self._timed_write(extent_id, offset, data)
                self.stats["writes_inline"] += 1
            else:
                self._lane_appends += 1
                try:
                    await trio.to_thread.run_sync(self._timed_write, extent_id, offset, data,
                                                  limiter=self._write_lane)
                finally:
                    self._lane_appends -= 1  # (no yield from here until the entries are recorded)
        except (OSError, BackendError) as exc:
            ext.failed = f"write failed: {exc}"
            raise ExtentError("io_error", ext.failed) from None
        for i in range(0, len(entries), ENTRY_BYTES):
            ext.pending[first_block + i // ENTRY_BYTES] = entries[i:i + ENTRY_BYTES]
        ext.written = max(ext.written, end)
        self._batch_bytes += len(data)
        self._wrote.set()
        await self._durable(extent_id)
        self.stats["append_latency_seconds"] += time.perf_counter() - t0
        self.stats["appends"] += 1
        self.stats["append_bytes"] += len(data)
        return end

    def _room_for(self, n: int) -> bool:
        """Whether ``n`` more bytes fit on the device. Far from full the answer comes from
        the last check minus what was appended since (a statvfs per append was ~6% of a
        DataNode's CPU on 4 KiB appends); within _FREE_MARGIN of full, and for every
        refusal, from a fresh check. Other writers of the same filesystem are caught by
        the next check; a write that still finds no space fails as an I/O error."""
        now = trio.current_time()
        if now - self._free_checked > _FREE_CHECK_S or \
                self._free_bytes - self._appended_since_check < n + _FREE_MARGIN:
            self._free_bytes = self.backend.usage().free_bytes
            self._free_checked = now
            self._appended_since_check = 0
        if self._free_bytes - self._appended_since_check < n:
            return False
        self._appended_since_check += n
        return True

    def _timed_write(self, extent_id: int, offset: int, data: bytes | bytearray) -> None:
        t0 = time.perf_counter()
        self.backend.write_data(extent_id, offset, data)
        self.stats["write_seconds"] += time.perf_counter() - t0

    async def read(self, extent_id: int, offset: int, length: int, epoch: int | None = None) -> tuple[int, bytes, bytes]:
        """(aligned start, data, entries) covering [offset, offset+length) for the client to verify.

        ``epoch`` is the placement epoch of the caller's extent map; an older one than this
        replica's is refused with ``stale_epoch`` so the caller refreshes its map.
        """
        ext = self._get(extent_id)
        if epoch is not None and epoch < ext.meta.epoch:
            raise ExtentError("stale_epoch", f"extent {extent_id} was re-placed: epoch {ext.meta.epoch} > {epoch}",
                              epoch=ext.meta.epoch)
        limit = ext.written
        if offset < 0 or length < 0 or offset + length > limit:
            raise ExtentError("out_of_range", f"read [{offset}, {offset + length}) beyond extent end {limit}",
                              length=limit)
        start = offset - offset % BLOCK_BYTES
        end = min(-(-(offset + length) // BLOCK_BYTES) * BLOCK_BYTES, limit)
        first, count = start // BLOCK_BYTES, -(-(end - start) // BLOCK_BYTES)
        overlay = {**ext.flushing, **ext.pending}
        last = (end - 1) // BLOCK_BYTES if end > start else first
        if end == limit == ext.length and end % BLOCK_BYTES and not ext.sealed:
            # The last block is still growing: vouch for it with the tail held in memory.
            # Not while a later append is in flight (length > written): the tail then holds
            # its bytes too, and the pending entries describe `written` exactly.
            overlay[last] = encode_entry(checksum(ext.tail[: end % BLOCK_BYTES]), end % BLOCK_BYTES)

        def merge(raw: bytes) -> bytes:
            entries = bytearray(raw)
            entries.extend(bytes(count * ENTRY_BYTES - len(entries)))
            for block, entry in overlay.items():
                if first <= block < first + count:
                    pos = (block - first) * ENTRY_BYTES
                    entries[pos:pos + ENTRY_BYTES] = entry
            return bytes(entries)

        def work() -> tuple[bytes, bytes]:
            data = self.backend.read_data(extent_id, start, end - start)
            return data, merge(self.backend.read_checksums(extent_id, first, count))

        # Small reads the page cache can answer are served right here: a thread hand-off
        # costs more than the read itself (4 KiB random reads).
        cached = self.backend.read_cached(extent_id, start, end - start, first, count) \
            if end - start <= _INLINE_READ_BYTES else None
        if cached is not None:
            data, entries = cached[0], merge(cached[1])
            self.stats["reads_inline"] += 1
            await trio.lowlevel.checkpoint()
        else:
            try:
                data, entries = await trio.to_thread.run_sync(work, limiter=self._read_lane)
            except (OSError, BackendError) as exc:
                raise ExtentError("io_error", f"read failed: {exc}") from None
        self.stats["reads"] += 1
        self.stats["read_bytes"] += len(data)
        return start, data, entries

    async def seal(self, extent_id: int, length: int) -> int:
        """Seal at ``length`` (truncating longer data); idempotent for the same length."""
        ext = self._get(extent_id)
        if ext.sealed:
            if ext.meta.sealed_length != length:
                raise ExtentError("conflict", f"extent {extent_id} is sealed at {ext.meta.sealed_length}, not {length}",
                                  length=ext.meta.sealed_length)
            return length
        ext.sealing = True
        try:
            if ext.pending or ext.written > ext.durable:
                try:
                    await self._durable(extent_id)
                except ExtentError:
                    pass  # seal below re-checks what is on disk
            if length > ext.written:
                raise ExtentError("short", f"extent {extent_id} has {ext.written} bytes, cannot seal at {length}",
                                  length=ext.written)
            meta = ExtentMeta(**{**ext.meta.to_dict(), "state": "sealed", "sealed_length": length})
            await trio.to_thread.run_sync(self._seal_sync, extent_id, length, meta, limiter=self._write_lane)
        finally:
            ext.sealing = False
        ext.meta, ext.length, ext.written, ext.durable = meta, length, length, length
        ext.tail, ext.recovering, ext.failed, ext.pending = b"", False, None, {}
        return length

    def _seal_sync(self, extent_id: int, length: int, meta: ExtentMeta) -> None:
        blocks = -(-length // BLOCK_BYTES)
        cut = length % BLOCK_BYTES
        self.backend.sync_data([extent_id])
        self.backend.truncate(extent_id, length, blocks)
        if cut:  # the last block became partial: its entry must cover exactly `cut` bytes
            tail = self.backend.read_data(extent_id, length - cut, cut)
            self.backend.write_checksums(extent_id, blocks - 1, encode_entry(checksum(tail), cut))
            self.backend.sync_checksums([extent_id])
        self.backend.set_meta(meta)

    async def delete(self, extent_id: int, *, unsealed_only: bool = False) -> None:
        """Delete ``extent_id`` (a no-op when absent). With ``unsealed_only`` a sealed extent
        is refused (``sealed``): a job that cleans up after itself must never remove a
        complete copy another job (or an earlier attempt) left in place."""
        ext = self._extents.get(extent_id)
        if ext is None:
            return
        if unsealed_only and ext.sealed:
            raise ExtentError("sealed", f"extent {extent_id} is sealed; not deleting it", length=ext.meta.sealed_length)
        del self._extents[extent_id]
        await trio.to_thread.run_sync(self.backend.delete, extent_id, limiter=self._write_lane)

    def stat(self, extent_id: int) -> dict[str, Any]:
        ext = self._get(extent_id)
        return {"extent_id": extent_id, "stream_id": ext.meta.stream_id, "epoch": ext.meta.epoch,
                "index": ext.meta.index, "state": "recovering" if ext.recovering else ext.meta.state,
                "length": ext.written, "durable": ext.durable, "sealed_length": ext.meta.sealed_length,
                "failed": ext.failed}

    def sealed_extents(self) -> list[tuple[int, ExtentMeta]]:
        """(id, record) of every sealed extent, for scrub."""
        return [(i, e.meta) for i, e in sorted(self._extents.items()) if e.sealed]

    def is_current(self, extent_id: int, meta: ExtentMeta) -> bool:
        """Whether ``extent_id`` still exists with exactly this record (not deleted, re-created
        or resealed since ``meta`` was taken from :meth:`sealed_extents`)."""
        ext = self._extents.get(extent_id)
        return ext is not None and ext.meta is meta

    async def read_stored(self, extent_id: int, offset: int, length: int) -> tuple[bytes, bytes]:
        """(data, checksum entries) of [offset, offset+length) as stored on the device, in a
        worker thread of the read lane (scrub); ``offset`` is block aligned. No overlay of
        entries still in memory: meant for sealed extents."""
        if offset % BLOCK_BYTES:
            raise ValueError(f"read_stored at {offset}: not a block boundary")
        self._get(extent_id)
        first, count = offset // BLOCK_BYTES, -(-length // BLOCK_BYTES)

        def work() -> tuple[bytes, bytes]:
            return (self.backend.read_data(extent_id, offset, length),
                    self.backend.read_checksums(extent_id, first, count))

        try:
            return await trio.to_thread.run_sync(work, limiter=self._read_lane)
        except (OSError, BackendError) as exc:
            raise ExtentError("io_error", f"read failed: {exc}") from None

    def all_extents(self) -> list[dict[str, Any]]:
        return [self.stat(i) for i in sorted(self._extents)]

    def recovering(self) -> list[tuple[int, int]]:
        return [(i, e.written) for i, e in self._extents.items() if e.recovering]

    def open_extents(self) -> list[tuple[int, int]]:
        return [(i, e.written) for i, e in self._extents.items() if not e.sealed]

    def mark_bad(self, extent_id: int, reason: str) -> None:
        ext = self._extents.get(extent_id)
        if ext is not None:
            ext.failed = reason


def _runs(entries: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Group block entries into runs of consecutive blocks, for one write each."""
    runs: list[tuple[int, bytes]] = []
    start = prev = -2
    buf = bytearray()
    for block in sorted(entries):
        if block != prev + 1:
            if buf:
                runs.append((start, bytes(buf)))
            start, buf = block, bytearray()
        buf += entries[block]
        prev = block
    if buf:
        runs.append((start, bytes(buf)))
    return runs
