"""The token bucket pacing rebuild and scrub reads: pure arithmetic, and its trio wrapper."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from appendfs.store.datanode.ratelimit import TokenBucket

MiB = 1 << 20


def test_unlimited_never_waits() -> None:
    b = TokenBucket(0, MiB)
    assert b.unlimited
    assert all(b.reserve(100 * MiB, 0.0) == 0.0 for _ in range(10))


def test_one_chunk_of_burst_then_the_rate() -> None:
    b = TokenBucket(4 * MiB, MiB, now=10.0)
    assert b.reserve(MiB, 10.0) == 0.0  # starts full: one chunk at once
    assert b.reserve(MiB, 10.0) == pytest.approx(0.25)
    # The caller waited 0.25 s; the next chunk waits another 0.25 s.
    assert b.reserve(MiB, 10.25) == pytest.approx(0.25)
    # Idle for long: the bucket refills to one chunk only, not more.
    assert b.reserve(MiB, 100.0) == 0.0
    assert b.reserve(MiB, 100.0) == pytest.approx(0.25)


def test_concurrent_callers_queue_behind_each_other() -> None:
    b = TokenBucket(MiB, MiB, now=0.0)
    waits = [b.reserve(MiB, 0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_eight_mib_at_four_mib_s_takes_seven_quarters_of_a_second() -> None:
    b = TokenBucket(4 * MiB, MiB, now=0.0)
    t = 0.0
    for _ in range(8):
        t += b.reserve(MiB, t)
    assert t == pytest.approx(1.75)


def test_refuses_negative_settings() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1, MiB)
    with pytest.raises(ValueError):
        TokenBucket(1, -1)


@given(rate=st.integers(1, 64 * MiB), burst=st.integers(4096, 4 * MiB),
       steps=st.lists(st.tuples(st.floats(0, 1.0), st.floats(0, 1.0)), min_size=1, max_size=60))
def test_no_window_exceeds_burst_plus_rate(rate: int, burst: int, steps: list[tuple[float, float]]) -> None:
    """A caller that waits as told reads at most burst + rate·T bytes in any window of T s."""
    b = TokenBucket(rate, burst, now=0.0)
    t = 0.0
    reads: list[tuple[float, int]] = []
    for size_frac, idle in steps:
        n = max(1, int(size_frac * burst))  # chunks of at most one burst
        t += b.reserve(n, t)
        reads.append((t, n))
        t += idle
    for i, (start, _) in enumerate(reads):
        total = 0
        for at, n in reads[i:]:
            total += n
            assert total <= burst + rate * (at - start) + 1e-6 * rate + 1


@given(rate=st.integers(1, 64 * MiB), burst=st.integers(4096, 4 * MiB),
       steps=st.lists(st.tuples(st.floats(0, 1.0), st.floats(0, 1.0)), min_size=1, max_size=60))
def test_an_empty_start_bounds_every_read_since_the_start(rate: int, burst: int,
                                                          steps: list[tuple[float, float]]) -> None:
    """start_full=False (rebuild jobs): the bytes read by time t are at most rate * t, so
    jobs run back to back never exceed the rate together; idle time still earns a burst."""
    b = TokenBucket(rate, burst, now=0.0, start_full=False)
    t, total = 0.0, 0
    for size_frac, idle in steps:
        n = max(1, int(size_frac * burst))
        t += b.reserve(n, t)
        total += n
        assert total <= rate * t + 1e-6 * rate + 1
        t += idle


async def test_acquire_sleeps_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    b = TokenBucket(4 * MiB, MiB, now=trio.current_time())
    t0 = trio.current_time()
    for _ in range(8):
        await b.acquire(MiB)
    assert trio.current_time() - t0 == pytest.approx(1.75)
