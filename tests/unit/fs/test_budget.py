"""ByteBudget: backpressure bytes are never leaked by a cancelled take."""

from __future__ import annotations

import trio

from appendfs.fs.budget import ByteBudget


async def test_a_take_cancelled_before_it_returns_holds_nothing() -> None:
    b = ByteBudget(100)
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.take(10)  # raises Cancelled: the bytes must not stay taken
    assert scope.cancelled_caught and b.used == 0
    await b.take(10)
    assert b.used == 10


async def test_a_waiting_take_cancelled_gives_its_place_up() -> None:
    b = ByteBudget(100)
    await b.take(90)
    with trio.move_on_after(0.05):
        await b.take(20)  # waits (90 + 20 > 100) until cancelled
    assert b.used == 90 and not b._waiters
    b.give(90)
    await b.take(100)
    assert b.used == 100
