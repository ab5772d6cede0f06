"""The ``rebuild`` request: (re)create one replica or fragment of a sealed extent from peers.

The MetaNode sends ``rebuild`` to a *target* DataNode to repair a lost or corrupt replica,
for rebalance and for drain (docs/erasure-coding.md §6)::

    rebuild {extent_id, stream_id, epoch, index, length, sources: [{idx, node_id, address}],
             layout: {k, m, cell_bytes, backend} | absent (replicated),
             rate_bytes_s: 0 | absent (unlimited)}
        → {length, read_bytes, seconds}

``length`` is the stored length the local extent ends with (for an EC fragment already
``Layout.fragment_length(sealed_length)``: whole records). Three ways to get the bytes:

* **copy** (a replicated extent, or an EC fragment from a source holding the same index):
  chunks of [0, length) read from any source with the DataNode ``read`` request (no epoch:
  a source re-placed under a newer epoch would refuse an older one, and this job has
  none), verified against their block checksums exactly as the client does, appended.
  A source that errs, times out or returns bad blocks is remembered and the others are
  preferred for the chunks that follow. EC copies are also checked record by record
  (``ec.check_record``: header, identity, cell digest), so a misplaced fragment with valid
  block checksums is refused.
* **reconstruction** (EC, no usable source of the same index): runs of whole records
  (about one chunk per source) are read from K sources — data fragments first, then
  parity, more when some fail — verified, and ``Codec.rebuild(..., missing=index)``
  returns the lost fragment's records, byte-identical to what the writer wrote (headers
  included). Fragments the codec finds bad are dropped and other sources read.

Every local byte goes through :meth:`ExtentStore.append` (xxh3, block entries, group
commit) into an extent created fresh as ``ExtentMeta(extent_id, stream_id, epoch, index)``
and is sealed at ``length`` at the end. A job that cannot finish deletes what it wrote and
answers ``unavailable`` naming every source and why it failed: a partial extent is never
left behind (a crash mid-job leaves an *open* extent, which the restart's reconcile
deletes, since no replica row names it yet). Reads from sources are paced by a
:class:`~appendfs.store.datanode.ratelimit.TokenBucket` of ``rate_bytes_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from appendfs.config import parse_host_port
from appendfs.store import ec
from appendfs.store.codec import BLOCK_BYTES, BlockError, checksum, verify_blocks
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.extents import ExtentError, ExtentStore
from appendfs.store.datanode.ratelimit import TokenBucket
from appendfs.store.rpc import ChannelPool, ConnectionLost, RpcError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_CALL_TIMEOUT_S = 30.0

#: What a failing source can raise; anything else is a bug and fails the job as such.
_SOURCE_ERRORS = (RpcError, ConnectionLost, trio.TooSlowError, BlockError, ec.CorruptFragment)


@dataclass(frozen=True)
class Source:
    idx: int
    node_id: str
    address: str

    def __str__(self) -> str:
        return f"{self.node_id} ({self.address}, index {self.idx})"


@dataclass(frozen=True)
class RebuildJob:
    extent_id: int
    stream_id: int
    epoch: int
    index: int
    length: int
    sources: tuple[Source, ...]
    layout: ec.Layout | None = None
    backend: str | None = None
    rate_bytes_s: float = 0.0
    logical_id: int = -1  # the extent's own id (EC headers name it); extent_id is the id copies are stored under

    def __post_init__(self) -> None:
        if self.logical_id < 0:
            object.__setattr__(self, "logical_id", self.extent_id)

    @property
    def read_id(self) -> int:
        return self.extent_id  # every copy of an extent is stored under the same id

    @classmethod
    def from_args(cls, a: dict[str, Any]) -> RebuildJob:
        """Parse and check the request's arguments; RpcError ``bad_request`` when malformed."""
        try:
            lay = a.get("layout")
            layout, backend = None, None
            if lay:
                layout = ec.Layout(int(lay["k"]), int(lay["m"]), int(lay["cell_bytes"]))
                backend = str(lay["backend"])
                if backend not in ec.BACKEND_CODES:
                    raise ValueError(f"unknown EC backend {backend!r}")
            sources = tuple(Source(int(s["idx"]) if layout else int(s.get("idx", 0)),
                                   str(s.get("node_id") or s["address"]), str(s["address"]))
                            for s in a.get("sources") or [])
            for s in sources:
                parse_host_port(s.address)  # ValueError names the bad one
            job = cls(extent_id=int(a["extent_id"]), stream_id=int(a["stream_id"]), epoch=int(a["epoch"]),
                      index=int(a["index"]), length=int(a["length"]), sources=sources, layout=layout,
                      backend=backend, rate_bytes_s=float(a.get("rate_bytes_s") or 0),
                      logical_id=int(a.get("logical_id", a["extent_id"])))
        except ec.LayoutError as exc:
            raise RpcError("bad_request", f"malformed rebuild request: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise RpcError("bad_request", f"malformed rebuild request: {exc!r}") from None
        if job.length < 0 or job.rate_bytes_s < 0 or job.epoch < 1 or job.index < 0:
            raise RpcError("bad_request", "rebuild: length, rate, epoch and index must not be negative "
                                          "(epoch >= 1)")
        if layout is not None:
            if job.length % layout.record_bytes:
                raise RpcError("bad_request", f"rebuild: length {job.length} is not whole records of "
                                              f"{layout.record_bytes} bytes")
            bad = [s.idx for s in sources if not 0 <= s.idx < layout.width] + \
                  ([job.index] if job.index >= layout.width else [])
            if bad:
                raise RpcError("bad_request", f"rebuild: fragment index {bad[0]} outside ec:{layout.k}+{layout.m}")
        return job

    @property
    def what(self) -> str:
        kind = f"fragment {self.index}" if self.layout else f"replica {self.index}"
        return f"extent {self.logical_id} {kind}"


@dataclass(frozen=True)
class TranscodeJob:
    """``transcode``: encode a sealed replicated extent into K+M fragments on ``targets``."""

    extent_id: int  # the logical extent (EC headers name it)
    stream_id: int
    epoch: int
    length: int  # its logical (sealed) length
    read_id: int  # the id its replicas are stored under
    local_id: int  # the id the fragments are created under (another: a node may hold both)
    sources: tuple[Source, ...]  # replicas
    targets: tuple[Source, ...]  # idx = fragment index, one per index 0..K+M-1
    layout: ec.Layout
    backend: str
    rate_bytes_s: float = 0.0

    @property
    def logical_id(self) -> int:
        return self.extent_id

    @property
    def what(self) -> str:
        return f"extent {self.extent_id} (transcoding to ec:{self.layout.k}+{self.layout.m})"

    @classmethod
    def from_args(cls, a: dict[str, Any]) -> TranscodeJob:
        try:
            lay = a["layout"]
            layout = ec.Layout(int(lay["k"]), int(lay["m"]), int(lay["cell_bytes"]))
            backend = str(lay["backend"])
            if backend not in ec.BACKEND_CODES:
                raise ValueError(f"unknown EC backend {backend!r}")

            def peers(key: str) -> tuple[Source, ...]:
                out = tuple(Source(int(s.get("idx", 0)), str(s.get("node_id") or s["address"]), str(s["address"]))
                            for s in a.get(key) or [])
                for p in out:
                    parse_host_port(p.address)
                return out
            job = cls(extent_id=int(a["extent_id"]), stream_id=int(a["stream_id"]), epoch=int(a["epoch"]),
                      length=int(a["length"]), read_id=int(a.get("read_id", a["extent_id"])),
                      local_id=int(a["local_id"]), sources=peers("sources"), targets=peers("targets"),
                      layout=layout, backend=backend, rate_bytes_s=float(a.get("rate_bytes_s") or 0))
        except ec.LayoutError as exc:
            raise RpcError("bad_request", f"malformed transcode request: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise RpcError("bad_request", f"malformed transcode request: {exc!r}") from None
        if sorted(t.idx for t in job.targets) != list(range(layout.width)):
            raise RpcError("bad_request", f"transcode: targets must be fragments 0..{layout.width - 1}, one each")
        if job.length < 0 or job.epoch < 1 or job.rate_bytes_s < 0 or job.local_id == job.read_id:
            raise RpcError("bad_request", "transcode: bad length, epoch, rate, or local_id equal to read_id")
        return job


class _Started:
    """ExtentStore.append wants the RPC layer's ordering callback; a rebuild has none."""

    def started(self) -> None:
        pass


class _Failed(Exception):
    """The job cannot finish: too few sources delivered verified bytes."""


class _Run:
    """State of one rebuild job: its rate limit, byte count and the sources that failed."""

    def __init__(self, job: RebuildJob | TranscodeJob, chunk_bytes: int) -> None:
        self.job = job
        # empty at the start: back-to-back jobs must not each add a burst to repair_bytes_s
        self.bucket = TokenBucket(job.rate_bytes_s, chunk_bytes, trio.current_time(), start_full=False)
        self.read_bytes = 0
        self.failed: dict[Source, str] = {}  # source -> why it last failed (kept in order of failure)
        self.codec: ec.Codec | None = None

    def fail(self, src: Source, why: str) -> None:
        self.failed.pop(src, None)
        self.failed[src] = why

    def ranked(self, sources: list[Source]) -> list[Source]:
        """Sources that have not failed first (in the request's order), then those that have."""
        return sorted(sources, key=lambda s: s in self.failed)

    def why(self, sources: list[Source] | tuple[Source, ...]) -> str:
        """Each failed source of ``sources`` and why (the others answered)."""
        if not sources:
            return "no sources given"
        return "; ".join(f"{s}: {self.failed[s]}" for s in sources if s in self.failed) or "every source answered"


class Rebuilder:
    """Runs ``rebuild`` jobs on one DataNode (one at a time per extent id)."""

    def __init__(self, store: ExtentStore, pool: ChannelPool, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S, stripes_per_run: int | None = None,
                 report_bad: Callable[[int, str, str], None] | None = None) -> None:
        """``report_bad(extent_id, node_id, reason)`` is told of every source whose bytes did
        not verify (it must not block: the DataNode hands it to a background task)."""
        if chunk_bytes <= 0 or chunk_bytes % BLOCK_BYTES:
            raise ValueError(f"chunk_bytes {chunk_bytes} must be a positive multiple of {BLOCK_BYTES}")
        self.store = store
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.call_timeout_s = call_timeout_s
        self.stripes_per_run = stripes_per_run
        self.report_bad = report_bad
        self._busy: set[int] = set()

    async def rebuild(self, job: RebuildJob) -> dict[str, Any]:
        if job.extent_id in self._busy:
            raise RpcError("busy", f"a rebuild of extent {job.extent_id} is already running on this node")
        self._busy.add(job.extent_id)
        try:
            return await self._rebuild(job)
        finally:
            self._busy.discard(job.extent_id)

    async def _rebuild(self, job: RebuildJob) -> dict[str, Any]:
        stats = self.store.stats
        try:
            have = self.store.stat(job.extent_id)
        except ExtentError:
            have = None
        if have is not None and have["state"] == "sealed" and have["sealed_length"] == job.length \
                and have["epoch"] == job.epoch and have["index"] == job.index and have["stream_id"] == job.stream_id:
            return {"length": job.length, "read_bytes": 0, "seconds": 0.0}  # done before: a retried request
        t0 = time.perf_counter()
        run = _Run(job, self.chunk_bytes)
        try:
            if have is not None:
                log.info("rebuild of %s: replacing the local copy (%s, epoch %d, index %d, %d bytes)",
                         job.what, have["state"], have["epoch"], have["index"], have["length"])
                await self.store.delete(job.extent_id)
            await self.store.create(ExtentMeta(job.extent_id, job.stream_id, job.epoch, job.index))
            if job.layout is None:
                await self._copy(run, list(job.sources), 0, job.length, check=None)
            else:
                await self._rebuild_ec(run)
            await self.store.seal(job.extent_id, job.length)
        except BaseException as exc:
            stats["rebuild_failures"] += 1
            with trio.CancelScope(shield=True):
                try:
                    await self.store.delete(job.extent_id)
                except ExtentError as err:
                    log.error("rebuild of %s: could not delete the partial copy: %s", job.what, err)
            if isinstance(exc, _Failed):
                log.error("rebuild of %s failed: %s", job.what, exc)
                raise RpcError("unavailable", f"rebuild of {job.what}: {exc}") from None
            raise
        seconds = time.perf_counter() - t0
        stats["rebuilds"] += 1
        stats["rebuild_bytes"] += job.length
        stats["rebuild_read_bytes"] += run.read_bytes
        log.info("rebuilt %s (epoch %d): %d bytes in %.2f s, %d bytes read from %d sources", job.what, job.epoch,
                 job.length, seconds, run.read_bytes, len(job.sources))
        return {"length": job.length, "read_bytes": run.read_bytes, "seconds": seconds}

    # ---- reading sources --------------------------------------------------------------

    async def _read(self, run: _Run, src: Source, offset: int, length: int) -> bytes | bytearray:
        """[offset, offset+length) of the extent on ``src``, verified against its block entries."""
        await run.bucket.acquire(length)
        ch = await self.pool.get(src.address)
        result, data = await ch.call("read", {"extent_id": run.job.read_id, "offset": offset, "length": length},
                                     timeout_s=self.call_timeout_s)
        run.read_bytes += len(data)
        start = int(result["start"])
        verify_blocks(data, result["entries"], start // BLOCK_BYTES)
        skip = offset - start
        if skip < 0 or len(data) < skip + length:
            raise BlockError(start // BLOCK_BYTES, f"source returned {len(data)} bytes from {start}, short of "
                                                   f"[{offset}, {offset + length})")
        return data[skip:skip + length] if (skip or len(data) != length) else data

    def _failed(self, run: _Run, src: Source, offset: int, exc: BaseException) -> None:
        why = _describe(exc)
        run.fail(src, why)
        log.warning("rebuild of %s: source %s failed at %d: %s", run.job.what, src, offset, why)
        if isinstance(exc, BlockError | ec.CorruptFragment) and self.report_bad is not None:
            self.report_bad(run.job.read_id, src.node_id, f"rebuild on another node read: {why}")

    async def _append(self, run: _Run, offset: int, data: bytes | bytearray) -> None:
        assert isinstance(run.job, RebuildJob)
        await self.store.append(run.job.extent_id, offset, data, checksum(data), _Started())

    # ---- copy -------------------------------------------------------------------------

    async def _copy(self, run: _Run, sources: list[Source], start: int, end: int,
                    check: Callable[[int, bytes | bytearray], None] | None) -> None:
        """Copy [start, end) from any of ``sources``; ``check(offset, data)`` may refuse bytes
        (raising CorruptFragment). _Failed when no source delivers a chunk."""
        off = start
        while off < end:
            n = min(self.chunk_bytes if check is None else self._run_bytes(run), end - off)
            for src in run.ranked(sources):
                try:
                    data = await self._read(run, src, off, n)
                    if check is not None:
                        check(off, data)
                    break
                except _SOURCE_ERRORS as exc:
                    self._failed(run, src, off, exc)
            else:
                raise _Failed(f"no source returned verified bytes for [{off}, {off + n}): {run.why(sources)}")
            await self._append(run, off, data)
            off += n

    # ---- erasure coding ---------------------------------------------------------------

    def _stripes_per_run(self, run: _Run) -> int:
        assert run.job.layout is not None
        return self.stripes_per_run or max(1, self.chunk_bytes // run.job.layout.record_bytes)

    def _run_bytes(self, run: _Run) -> int:
        assert run.job.layout is not None
        return self._stripes_per_run(run) * run.job.layout.record_bytes

    async def _rebuild_ec(self, run: _Run) -> None:
        job = run.job
        assert isinstance(job, RebuildJob)
        layout = job.layout
        assert layout is not None and job.backend is not None
        same = [s for s in job.sources if s.idx == job.index]
        others = [s for s in job.sources if s.idx != job.index]
        per_run = self._stripes_per_run(run)
        stripes = layout.records_in(job.length)
        first = 0
        while first < stripes:
            count = min(per_run, stripes - first)
            start, size = layout.record_span(first, count)
            usable = [s for s in same if s not in run.failed]
            if usable:
                try:
                    await self._copy(run, usable, start, start + size, check=self._record_check(run))
                    first += count
                    continue
                except _Failed as exc:  # every source of this index failed: reconstruct from here on
                    log.warning("rebuild of %s: copying fragment %d failed (%s); reconstructing from the other "
                                "fragments", job.what, job.index, exc)
            await self._append(run, start, await self._reconstruct(run, others, first, count))
            first += count

    def _record_check(self, run: _Run) -> Callable[[int, bytes | bytearray], None]:
        """Refuse a copied run of records unless each is fragment ``index``'s record of its stripe."""
        job = run.job
        assert isinstance(job, RebuildJob)
        layout = job.layout
        assert layout is not None

        def check(offset: int, data: bytes | bytearray) -> None:
            rb = layout.record_bytes
            stripe0 = offset // rb
            for j in range(len(data) // rb):
                h = ec.check_record(layout, memoryview(data)[j * rb:(j + 1) * rb], extent_id=job.logical_id,
                                    stripe=stripe0 + j, index=job.index)
                if h.backend != job.backend:
                    raise ec.CorruptFragment(job.index, stripe0 + j, f"record of backend {h.backend}, "
                                                                     f"expected {job.backend}")
        return check

    async def _reconstruct(self, run: _Run, sources: list[Source], first: int, count: int) -> bytes:
        """Fragment ``index``'s records of stripes [first, first+count) from K other fragments."""
        job = run.job
        assert isinstance(job, RebuildJob)
        layout = job.layout
        assert layout is not None and job.backend is not None
        if run.codec is None:
            try:
                run.codec = ec.Codec(layout, job.backend)
            except ec.EcError as exc:
                raise _Failed(f"cannot reconstruct here: {exc}") from None
        start, size = layout.record_span(first, count)
        order = sorted(run.ranked(sources), key=lambda s: (s in run.failed, s.idx >= layout.k))
        records: dict[int, bytes] = {}
        holder: dict[int, Source] = {}

        async def fetch(src: Source) -> None:
            try:
                data = await self._read(run, src, start, size)
            except _SOURCE_ERRORS as exc:
                self._failed(run, src, start, exc)
                return
            if src.idx not in records:
                records[src.idx], holder[src.idx] = bytes(data), src  # (the decoder wants bytes)

        while True:
            need = layout.k - len(records)
            if need > 0:
                batch = [s for s in order if s.idx not in records][:need]
                if not batch:
                    raise _Failed(f"only {len(records)} of the {layout.k} fragments needed returned verified "
                                  f"records of stripes {first}..{first + count - 1} ({len({s.idx for s in sources})} "
                                  f"other fragments given): {run.why(job.sources)}")
                order = [s for s in order if s not in batch]
                async with trio.open_nursery() as nursery:
                    for src in batch:
                        nursery.start_soon(fetch, src)
                continue
            try:
                out = run.codec.rebuild(records, missing=job.index, extent_id=job.logical_id, first_stripe=first)
            except ec.NotEnoughFragments as exc:
                dropped = [i for i in exc.bad if i in records]
                if not dropped:
                    raise _Failed(f"stripes {first}..{first + count - 1}: {exc}") from None
                for i in dropped:
                    del records[i]
                    self._failed(run, holder[i], start, ec.CorruptFragment(i, first, exc.bad[i]))
                continue
            except ec.EcError as exc:
                raise _Failed(f"stripes {first}..{first + count - 1}: {exc}") from None
            if len(out) != size:
                raise _Failed(f"reconstruction of stripes {first}..{first + count - 1} gave {len(out)} bytes, "
                              f"not {size}")
            return out


class Transcoder:
    """Runs ``transcode`` jobs: this DataNode reads the replicated extent once (from any
    replica, verified), encodes runs of whole stripes and appends each fragment's records
    to its target DataNode, all targets at once; then seals every fragment. Stripes are
    all full but the last, so logical offsets are unchanged (DESIGN §8)."""

    def __init__(self, rebuilder: Rebuilder) -> None:
        self.r = rebuilder

    async def transcode(self, job: TranscodeJob) -> dict[str, Any]:
        t0 = time.perf_counter()
        run = _Run(job, self.r.chunk_bytes)
        lay = job.layout
        try:
            codec = ec.Codec(lay, job.backend)
        except ec.EcError as exc:
            raise RpcError("unavailable", f"cannot encode {job.what} here: {exc}") from None
        created: list[Source] = []
        try:
            async def create(t: Source) -> None:
                args = {"extent_id": job.local_id, "stream_id": job.stream_id, "epoch": job.epoch, "index": t.idx}
                try:
                    await self._call(t, "create", args)
                except RpcError as exc:
                    if exc.code != "exists":
                        raise
                    # Left by an earlier attempt that died, or being written by a duplicate
                    # job. Only an unsealed copy may go: a sealed one may be what a
                    # duplicate job completed and the MetaNode placed (it never is deleted
                    # here; the MetaNode removes it if it ends unplaced).
                    try:
                        await self._call(t, "delete", {"extent_id": job.local_id, "unsealed_only": True})
                    except RpcError as err:
                        if err.code != "sealed":
                            raise
                        raise RpcError("conflict", f"{job.what}: fragment {t.idx} on {t} is already sealed "
                                                   f"(another transcode of this extent finished); not replacing it"
                                       ) from None
                    await self._call(t, "create", args)
                created.append(t)
            await self._each(job.targets, create)
            per_run = max(1, self.r.chunk_bytes // lay.stripe_bytes)
            stripes = lay.stripe_count(job.length)
            first = 0
            while first < stripes:
                count = min(per_run, stripes - first)
                lo = first * lay.stripe_bytes
                hi = min(job.length, (first + count) * lay.stripe_bytes)
                data = await self._read_any(run, lo, hi - lo)
                frags = codec.encode(data, extent_id=job.extent_id, first_stripe=first)
                at = lay.record_span(first, count)[0]

                async def append(t: Source, frags: list[bytes] = frags, at: int = at) -> None:
                    frag = frags[t.idx]
                    await self._call(t, "append", {"extent_id": job.local_id, "offset": at, "xxh3": checksum(frag)},
                                     frag)
                await self._each(job.targets, append)
                first += count
            end = lay.fragment_length(job.length)

            async def seal(t: Source) -> None:
                await self._call(t, "seal", {"extent_id": job.local_id, "length": end})
            await self._each(job.targets, seal)
        except BaseException as exc:
            self.r.store.stats["rebuild_failures"] += 1
            with trio.CancelScope(shield=True):
                for t in created:  # the sealed ones stay: the MetaNode deletes them if unplaced
                    try:
                        await self._call(t, "delete", {"extent_id": job.local_id, "unsealed_only": True})
                    except (RpcError, ConnectionLost, trio.TooSlowError) as err:
                        log.warning("%s: could not delete the partial fragment on %s: %s", job.what, t, err)
            if isinstance(exc, _Failed | RpcError | ConnectionLost | trio.TooSlowError):
                log.error("%s failed: %s", job.what, exc)
                raise RpcError("unavailable", f"{job.what}: {_describe(exc)}") from None
            raise
        seconds = time.perf_counter() - t0
        self.r.store.stats["transcodes"] += 1
        log.info("%s: %d bytes into %d fragments in %.2f s", job.what, job.length, lay.width, seconds)
        return {"length": job.length, "read_bytes": run.read_bytes, "seconds": seconds}

    async def _read_any(self, run: _Run, offset: int, length: int) -> bytes:
        sources = list(run.job.sources)
        for src in run.ranked(sources):
            try:
                data = await self.r._read(run, src, offset, length)
                return data if isinstance(data, bytes) else bytes(data)  # (the encoder wants bytes)
            except _SOURCE_ERRORS as exc:
                self.r._failed(run, src, offset, exc)
        raise _Failed(f"no replica returned verified bytes for [{offset}, {offset + length}): {run.why(sources)}")

    async def _call(self, t: Source, op: str, args: dict[str, Any], data: bytes = b"") -> None:
        ch = await self.r.pool.get(t.address)
        await ch.call(op, args, data, timeout_s=self.r.call_timeout_s)

    @staticmethod
    async def _each(targets: tuple[Source, ...], fn: Callable[[Source], Any]) -> None:
        """Run ``fn`` on every target at once; the first target's error is raised as itself
        (not an exception group), so the job's failure names it."""
        try:
            async with trio.open_nursery() as nursery:
                for t in targets:
                    nursery.start_soon(fn, t)
        except BaseExceptionGroup as group:
            first = next((e for e in group.exceptions if not isinstance(e, trio.Cancelled | BaseExceptionGroup)), None)
            if first is None:
                raise
            raise first from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, BlockError):
        return f"corrupt ({exc})"
    return str(exc) or exc.__class__.__name__

