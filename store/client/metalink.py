"""How a client reaches the leading MetaNode: read the leader row from META_URL, call it,
and on a lost connection, a redirect or a temporary error look again, backing off, for at
most a bounded time (DESIGN §7)."""

from __future__ import annotations

import logging
import math
from typing import Any

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Engine

from appendfs.store.errors import Unavailable
from appendfs.store.metanode.leader import current
from appendfs.store.rpc import ChannelPool, ConnectionLost, RpcError

log = logging.getLogger(__name__)


class MetaLink:
    def __init__(self, engine: Engine, pool: ChannelPool, *, wait_s: float, db_lane: trio.CapacityLimiter) -> None:
        self.engine = engine
        self.pool = pool
        self.wait_s = wait_s
        self._db_lane = db_lane
        self._leader: str | None = None

    async def leader(self) -> str:
        if self._leader is None:
            try:
                _epoch, address = await trio.to_thread.run_sync(current, self.engine, limiter=self._db_lane)
            except sa.exc.DBAPIError as exc:
                raise ConnectionLost(f"database unreachable: {exc.__class__.__name__}") from None
            if not address:
                raise ConnectionLost("no MetaNode has been elected yet")
            self._leader = address
        return self._leader

    async def call(self, op: str, args: dict[str, Any], *, wait_s: float | None = None,
                   timeout_s: float = 30.0) -> dict[str, Any]:
        """Call the leader; retry leader changes and temporary errors until ``wait_s`` passes."""
        deadline = trio.current_time() + (self.wait_s if wait_s is None else wait_s)
        delay = 0.05
        while True:
            try:
                ch = await self.pool.get(await self.leader(), lane="meta")
                result, _ = await ch.call(op, args, timeout_s=timeout_s)
                return result
            except RpcError as exc:
                if not exc.temporary:
                    raise
                if exc.code == "not_leader":
                    self._leader = exc.details.get("leader") or None
                last: Exception = exc
            except (ConnectionLost, trio.TooSlowError) as exc:
                self._leader = None
                last = exc
            if trio.current_time() + delay > deadline:
                raise Unavailable(f"{op}: {last}") from None
            log.debug("%s: %s; retrying in %.2f s", op, last, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)
            if math.isinf(deadline):
                continue
