"""Scrub: re-verify every sealed extent of the device against its block checksums.

A background task of the DataNode (started by ``DataNode.run`` unless ``scrub_bytes_s`` is
0). It reads each sealed extent in chunks of ``scrub_chunk_bytes`` through the store's read
lane (a worker thread; foreground reads keep the other slots), paced by a
:class:`~appendfs.store.datanode.ratelimit.TokenBucket` of ``scrub_bytes_s``, and checks
data against the checksum entries as stored (``verify_blocks``; the last block of an
extent is partial and its entry covers only its valid bytes). An EC fragment is an
ordinary extent here: its block entries cover headers, cells and pads as stored.

Schedule: an extent is verified at most once per ``scrub_interval_s``. One it has not seen
before (new, or re-created under another epoch) counts as verified when first seen — its
bytes were just checksummed on the way in — and becomes due an interval later. A pass
verifies every due extent, the longest-unverified first, then the task sleeps until the
next one is due. The times are kept in ``DATA/scrub.json`` (rewritten at most every few
minutes and after each pass; losing it only makes extents due again later), so a
restart does not start over.

A bad block (or a read error, or a data file shorter than its sealed length) is logged,
counted (``scrub_errors``) and reported to the MetaNode with ``report_bad`` — the same
request a client sends — after a second read confirms it; the MetaNode marks the replica
``corrupt`` and has it rewritten (``rebuild``). The extent is not reported again before
its next due time (an interval later), unless the report failed, which is retried. An
extent deleted, re-created or rebuilt while it is being read is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from appendfs.store.codec import BLOCK_BYTES, BlockError, verify_blocks
from appendfs.store.datanode.backend import ExtentMeta
from appendfs.store.datanode.extents import ExtentError, ExtentStore
from appendfs.store.datanode.ratelimit import TokenBucket

log = logging.getLogger(__name__)

STATE_VERSION = 1
_SAVE_EVERY_S = 300.0
_REPORT_RETRY_S = 5.0
_MIN_SLEEP_S = 0.2

#: ``report(extent_id, reason)`` → True once the MetaNode has the report.
Report = Callable[[int, str], Awaitable[bool]]


class Scrubber:
    def __init__(self, store: ExtentStore, report: Report, *, rate_bytes_s: int, interval_s: float,
                 chunk_bytes: int = 1 << 20, state_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if chunk_bytes <= 0 or chunk_bytes % BLOCK_BYTES:
            raise ValueError(f"scrub chunk {chunk_bytes} must be a positive multiple of {BLOCK_BYTES}")
        self.store = store
        self.report = report
        self.interval_s = interval_s
        self.chunk_bytes = chunk_bytes
        self.state_path = state_path
        self.clock = clock
        self.bucket = TokenBucket(rate_bytes_s, chunk_bytes)
        self._verified: dict[int, tuple[int, float]] = {}  # extent id -> (epoch, wall time verified / first seen)
        self._unreported: dict[int, tuple[ExtentMeta, str]] = {}  # bad extents whose report failed
        self._dirty = False
        self._saved_at = 0.0

    # ---- the task -----------------------------------------------------------------

    async def run(self) -> None:
        await trio.to_thread.run_sync(self._load)
        log.info("scrub: %d bytes/s, each sealed extent every %.0f s", self.bucket.rate, self.interval_s)
        while True:
            await self._retry_reports()
            await self.scrub_pass()
            delay = self._next_due() - self.clock()
            if self._unreported:
                delay = min(delay, _REPORT_RETRY_S)
            await trio.sleep(max(delay, _MIN_SLEEP_S))

    async def scrub_pass(self) -> int:
        """Verify every extent that is due now; the number verified."""
        now = self.clock()
        sealed = self.store.sealed_extents()
        live = {i for i, _ in sealed}
        for gone in [i for i in self._verified if i not in live]:
            del self._verified[gone]
            self._dirty = True
        due: list[tuple[float, int, ExtentMeta]] = []
        for extent_id, meta in sealed:
            seen = self._verified.get(extent_id)
            if seen is None or seen[0] != meta.epoch:
                self._verified[extent_id] = (meta.epoch, now)  # new here: its bytes were just checksummed
                self._dirty = True
            elif now - seen[1] >= self.interval_s:
                due.append((seen[1], extent_id, meta))
        done = 0
        for _, extent_id, meta in sorted(due, key=lambda d: (d[0], d[1])):
            if not self.store.is_current(extent_id, meta):
                continue  # deleted or re-created since the list was taken
            outcome = await self.scrub_extent(extent_id, meta)
            if outcome is None:
                continue
            done += 1
            self._verified[extent_id] = (meta.epoch, self.clock())
            self._dirty = True
            if outcome:
                await self._bad(extent_id, meta, outcome)
            if self.clock() - self._saved_at >= _SAVE_EVERY_S:
                await self._save()
        if done:
            self.store.stats["scrub_passes"] += 1
        await self._save()
        return done

    async def scrub_extent(self, extent_id: int, meta: ExtentMeta) -> str | None:
        """"" when every block verifies, the reason when one does not, None when the extent
        went away (deleted, re-created) while being read."""
        length = meta.sealed_length
        off = 0
        while off < length:
            n = min(self.chunk_bytes, length - off)
            await self.bucket.acquire(n)
            reason = await self._check(extent_id, off, n)
            if not self.store.is_current(extent_id, meta):
                return None
            if reason:
                # Confirm before accusing the replica: a read racing a delete can see a
                # closed (or reused) descriptor; a second read of a current extent cannot.
                reason = await self._check(extent_id, off, n)
                if not self.store.is_current(extent_id, meta):
                    return None
                if reason:
                    return reason
            self.store.stats["scrub_bytes"] += n
            off += n
        self.store.stats["scrub_extents"] += 1
        return ""

    async def _check(self, extent_id: int, off: int, n: int) -> str:
        try:
            data, entries = await self.store.read_stored(extent_id, off, n)
        except ExtentError as exc:
            return f"scrub: {exc.message}"
        if len(data) != n:
            return f"scrub: data file holds {off + len(data)} of {off + n} sealed bytes"
        try:
            verify_blocks(data, entries, off // BLOCK_BYTES)
        except BlockError as exc:
            return f"scrub: {exc}"
        return ""

    async def _bad(self, extent_id: int, meta: ExtentMeta, reason: str) -> None:
        self.store.stats["scrub_errors"] += 1
        log.error("scrub: extent %d (epoch %d, index %d) is corrupt: %s — reporting it", extent_id, meta.epoch,
                  meta.index, reason)
        if not await self.report(extent_id, reason):
            self._unreported[extent_id] = (meta, reason)

    async def _retry_reports(self) -> None:
        for extent_id, (meta, reason) in list(self._unreported.items()):
            if not self.store.is_current(extent_id, meta):
                del self._unreported[extent_id]  # rebuilt or deleted meanwhile
            elif await self.report(extent_id, reason):
                del self._unreported[extent_id]

    def _next_due(self) -> float:
        if not self._verified:
            return self.clock() + self.interval_s
        return min(t for _, t in self._verified.values()) + self.interval_s

    # ---- state file ---------------------------------------------------------------

    def _load(self) -> None:
        if self.state_path is None:
            return
        try:
            raw = json.loads(self.state_path.read_text())
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, not {STATE_VERSION}")
            self._verified = {int(k, 16): (int(v[0]), float(v[1])) for k, v in raw["extents"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("scrub: ignoring %s (%s); extents count as verified now", self.state_path, exc)
            self._verified = {}

    async def _save(self) -> None:
        if self.state_path is None or not self._dirty:
            return
        self._dirty = False
        self._saved_at = self.clock()
        snapshot = {"version": STATE_VERSION,
                    "extents": {f"{i:016x}": [e, round(t, 1)] for i, (e, t) in self._verified.items()}}
        path = self.state_path

        def write() -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot, separators=(",", ":")))
            os.replace(tmp, path)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            log.warning("scrub: cannot write %s: %s", path, exc)
