"""The client-side work of `store put`, `store get` and `status` (the CLI stays thin).

Progress goes to stderr: a self-rewriting line on a terminal, otherwise one line per
step (``progress: <acked>/<total> bytes acknowledged (<pct>%)``) so scripts and tests can
follow it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import trio
import xxhash

from appendfs.store.client import ClientConfig, Locator, Piece, StoreClient
from appendfs.store.ec import EcError, choose_backend
from appendfs.store.errors import BadLocator


class Progress:
    def __init__(self, total: int | None, what: str) -> None:
        self.total = total
        self.what = what
        self.tty = sys.stderr.isatty()
        self._last_t = 0.0
        self._last_pct = -1

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        pct = int(done * 100 / self.total) if self.total else 0
        if not final and now - self._last_t < 0.25 and pct == self._last_pct:
            return
        self._last_t, self._last_pct = now, pct
        total = "?" if self.total is None else str(self.total)
        line = f"progress: {done}/{total} bytes {self.what} ({pct}%)"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


async def put_file(meta_url: str, cfg: ClientConfig, path: Path, redundancy: str) -> Locator:
    """Append a file to a new `raw` stream; return its locator once everything is acknowledged."""
    src = sys.stdin.buffer if str(path) == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    total = None if str(path) == "-" else os.fstat(src.fileno()).st_size
    progress = Progress(total, "acknowledged")
    hasher = xxhash.xxh3_64()
    tickets = []
    size = 0
    try:
        async with StoreClient.connect(meta_url, cfg) as client:
            stream = await client.create_stream("raw", redundancy)
            while True:
                chunk = await trio.to_thread.run_sync(src.read, cfg.append_bytes)
                if not chunk:
                    break
                hasher.update(chunk)
                size += len(chunk)
                tickets.append(await stream.append(chunk))
                progress.update(stream.bytes_acked)
            async with trio.open_nursery() as nursery:
                async def report() -> None:
                    while True:
                        progress.update(stream.bytes_acked)
                        await trio.sleep(0.2)
                nursery.start_soon(report)
                await stream.close()
                nursery.cancel_scope.cancel()
            progress.update(stream.bytes_acked, final=True)
            pieces: list[Piece] = []
            for t in tickets:
                for p in await t.wait():
                    if pieces and pieces[-1].extent_id == p.extent_id and pieces[-1].ext_off + pieces[-1].length == p.ext_off:
                        pieces[-1] = Piece(p.extent_id, pieces[-1].ext_off, pieces[-1].length + p.length)
                    else:
                        pieces.append(p)
            return Locator(stream.stream_id, hasher.intdigest(), size, tuple(pieces))
    finally:
        if src is not sys.stdin.buffer:
            src.close()


async def get_to(meta_url: str, cfg: ClientConfig, loc: Locator, out: BinaryIO) -> None:
    """Write the verified content of ``loc`` to ``out``; raise BadLocator on a content mismatch."""
    hasher = xxhash.xxh3_64()
    done = 0
    progress = Progress(loc.size, "read") if not out.isatty() and sys.stderr.isatty() else None
    async with StoreClient.connect(meta_url, cfg) as client:
        async for chunk in client.read_pieces([(p.extent_id, p.ext_off, p.length) for p in loc.pieces]):
            hasher.update(chunk)
            await trio.to_thread.run_sync(out.write, chunk)
            done += len(chunk)
            if progress:
                progress.update(done)
    out.flush()
    if hasher.intdigest() != loc.xxh3:
        raise BadLocator(f"content read ({done} bytes) does not match the locator's xxh3: wrong or damaged locator")


async def fetch_status(meta_url: str, wait_s: float = 10.0) -> dict[str, Any]:
    """The leading MetaNode's status; waits up to ``wait_s`` for a leader."""
    async with StoreClient.connect(meta_url, ClientConfig(leader_wait_s=wait_s)) as client:
        status = await client.meta.call("status", {}, wait_s=wait_s)
    try:
        choice = choose_backend(4, 2)
        status["ec_backend_here"] = f"{choice.name} — {choice.reason}"
    except EcError as exc:
        status["ec_backend_here"] = f"none ({exc})"
    return status


async def drain_node(meta_url: str, node_id: str, cancel: bool) -> str:
    """Ask the leading MetaNode to drain (or stop draining) a DataNode; its new state."""
    async with StoreClient.connect(meta_url, ClientConfig(leader_wait_s=10.0)) as client:
        result = await client.meta.call("drain", {"node_id": node_id, "cancel": cancel}, wait_s=10.0)
    return str(result["state"])


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(n)


def render_status(st: dict[str, Any]) -> str:
    lines = [f"leader: {st['leader']} (epoch {st['epoch']})", "", "nodes:"]
    lines.append(f"  {'node':18} {'address':22} {'state':6} {'seen':>6} {'sealed':>11} role")
    for n in st["nodes"]:
        seen = "-" if n.get("seen_ago_s") is None else f"{n['seen_ago_s']}s"
        role = n.get("state", "active") + (", declared dead: its copies are re-created elsewhere" if n.get("dead") else "")
        lines.append(f"  {n['node_id']:18} {n['address']:22} {'alive' if n['alive'] else 'DEAD':6} {seen:>6} "
                     f"{_size(n.get('stored_bytes')):>11} {role}")
    lines += ["", "devices:", f"  {'device':20} {'capacity':>11} {'used':>11} {'free':>11} full"]
    for d in st["devices"]:
        lines.append(f"  {d['device_id']:20} {_size(d['capacity_bytes']):>11} {_size(d['used_bytes']):>11} "
                     f"{_size(d.get('free_bytes')):>11} {'yes' if d.get('full') else 'no'}")
    e = st["extents"]
    lines += ["", f"extents: {e['open']} open, {e['sealed']} sealed; healthy {e['healthy']}, "
                  f"degraded {e.get('degraded', 0)}, under-replicated {e['under_replicated']}, lost {e['lost']}"]
    if st["under_replicated_extents"]:
        lines.append("not healthy (degraded, under-replicated or lost): "
                     + " ".join(map(str, st["under_replicated_extents"][:50])))
    r = st.get("repair")
    if r:
        lines.append(f"repair: {len(r['running'])} running, {r['queued']} queued; done: {r['repairs']} repairs, "
                     f"{r['drain_moves']} drain and {r['rebalance_moves']} rebalance moves, "
                     f"{r.get('transcodes', 0)} transcodes, "
                     f"{_size(r['moved_bytes'])} copied (limit {_size(r['limit_bytes_s'])}/s); "
                     f"{r['move_failures']} failed; imbalance {r['imbalance']:.0%}")
        for m in r["running"]:
            slot = "" if m["idx"] is None else f" slot {m['idx']}"
            lines.append(f"  {m['kind']} extent {m['extent_id']}{slot} -> {m['target']} "
                         f"({_size(m['bytes'])}): {m['reason']}")
        for line in r["stuck"]:
            lines.append(f"  cannot repair: {line}")
        if r.get("last_error"):
            lines.append(f"  last failure: {r['last_error']}")
    for u in st.get("erasure_coding", []):
        lines.append(f"erasure coding: {u['redundancy']} with backend {u['backend']}, "
                     f"{_size(u['cell_bytes'])} cells, {u['extents']} extents")
    if st.get("ec_backend_here"):
        lines.append(f"EC backend for new streams here: {st['ec_backend_here']}")
    return "\n".join(lines)


__all__ = ["BadLocator", "drain_node", "fetch_status", "get_to", "put_file", "render_status"]
