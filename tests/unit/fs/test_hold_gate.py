"""fs.filesystem._HoldGate: unlinks run together, a release batch runs alone."""

from __future__ import annotations

import trio
import trio.testing

from appendfs.fs.filesystem import _HoldGate


async def test_a_batch_waits_for_unlinks_in_flight_and_new_unlinks_wait_for_the_batch() -> None:
    gate = _HoldGate()
    log: list[str] = []
    release_first = trio.Event()

    async def unlink(name: str, hold: trio.Event | None = None) -> None:
        async with gate.shared():
            log.append(f"{name} in")
            if hold is not None:
                await hold.wait()
            log.append(f"{name} out")

    async def batch() -> None:
        async with gate.exclusive():
            log.append("batch in")
            await trio.sleep(0.01)
            log.append("batch out")

    async with trio.open_nursery() as n:
        n.start_soon(unlink, "a", release_first)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(unlink, "b")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(batch)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(unlink, "c")  # arrives while the batch waits: goes after it
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["a in", "b in", "b out"]  # two at once; the batch still waits for a
        release_first.set()
    assert log == ["a in", "b in", "b out", "a out", "batch in", "batch out", "c in", "c out"]


async def test_settle_waits_only_for_the_unlinks_in_flight() -> None:
    gate = _HoldGate()
    go = trio.Event()
    settled = False

    async def unlink() -> None:
        async with gate.shared():
            await go.wait()

    async def settle() -> None:
        nonlocal settled
        await gate.settle()
        settled = True

    async with trio.open_nursery() as n:
        n.start_soon(unlink)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(settle)
        await trio.testing.wait_all_tasks_blocked()
        assert not settled
        go.set()
    assert settled
    await gate.settle()  # nothing in flight: returns at once
