"""A token bucket bounding the bytes per second a background job reads (rebuild, scrub).

:class:`TokenBucket` is pure arithmetic over a clock value the caller passes in, so it is
tested without time passing; :meth:`TokenBucket.acquire` is the trio wrapper the jobs use.

The bucket holds at most ``burst`` tokens (bytes) and starts full, or empty for jobs whose
limit must hold from their first byte (rebuild: several jobs one after another would each
add a burst); ``reserve(n)`` takes
``n`` tokens — the balance may go negative — and answers how long to wait before using
them: until the balance is back at zero. So over any window of T seconds a job that waits
as told reads at most ``burst + rate·T`` bytes, and a job reading in chunks of at most
``burst`` bytes exceeds the rate by at most one chunk. Concurrent callers (the parallel
source reads of an EC rebuild) queue up: each one's wait includes the debt of those before.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """``rate`` bytes per second (0 = unlimited), bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float, burst: int, now: float = 0.0, *, start_full: bool = True) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"rate {rate} and burst {burst} must be >= 0")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst) if start_full else 0.0
        self._last = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens at time ``now``; the seconds to wait before reading them."""
        if self.unlimited:
            return 0.0
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, nbytes: int) -> None:
        """Wait (trio clock) until ``nbytes`` may be read at this rate."""
        if self.unlimited:
            return
        wait = self.reserve(nbytes, trio.current_time())
        if wait > 0:
            await trio.sleep(wait)
