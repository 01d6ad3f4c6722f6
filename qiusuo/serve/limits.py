"""Admission control: per-key token buckets (→ 429) and a global concurrency gate with a bounded
queue (→ 503). Both live in memory, so limits restart with the server (the ledger does not)."""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Callable

MAX_RETRY_AFTER = 60  # seconds; DESIGN §5 promises clients a Retry-After of at most this


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (0 would invite an immediate retry storm), at most 60."""
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(seconds))))


class TokenBucket:
    """`per_minute` units refill continuously; the bucket holds at most one minute's worth."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_time(self, n: float) -> float:
        """Seconds until `n` units are available (0: now). `n` is capped at the capacity, so a
        request larger than a minute's budget waits for a full bucket instead of never passing."""
        self._refill()
        need = min(n, self.capacity) - self.level
        return max(0.0, need / self.rate)

    def take(self, n: float) -> None:
        self._refill()
        self.level -= min(n, self.capacity)

    def give(self, n: float) -> None:
        """Return units reserved but not used (a completion shorter than its max_tokens)."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


class KeyLimits:
    """Requests/minute and tokens/minute buckets per key id, created on first use.

    Tokens are reserved up front as prompt + max_tokens (what the request *may* use) and the unused
    part is given back when it finishes — otherwise a burst of long requests could all pass at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket, int, int]] = {}

    def _get(self, key_id: str, rpm: int, tpm: int) -> tuple[TokenBucket, TokenBucket]:
        entry = self._buckets.get(key_id)
        if entry is None or entry[2:] != (rpm, tpm):  # new key, or its limits were changed
            entry = (TokenBucket(rpm, self._clock), TokenBucket(tpm, self._clock), rpm, tpm)
            self._buckets[key_id] = entry
        return entry[0], entry[1]

    def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> float:
        """Take one request and `tokens` tokens and return 0, or take nothing and return the wait."""
        requests, token_bucket = self._get(key_id, rpm, tpm)
        wait = max(requests.wait_time(1), token_bucket.wait_time(tokens))
        if wait > 0:
            return wait
        requests.take(1)
        token_bucket.take(tokens)
        return 0.0

    def refund(self, key_id: str, tokens: int) -> None:
        entry = self._buckets.get(key_id)
        if entry is not None and tokens > 0:
            entry[1].give(tokens)


class QueueFull(Exception):
    """The gate's waiting room is full."""


class Gate:
    """At most `max_running` requests generate at once; at most `max_queue` wait, first come first
    served. Runs on one event loop, so plain counters suffice.

    Usage: `ticket = gate.join()` (raises QueueFull), `await gate.wait(ticket, timeout)` → bool, and
    always `gate.leave(ticket)` — whether the request ran, timed out or its client went away."""

    def __init__(self, max_running: int, max_queue: int):
        if max_running < 1 or max_queue < 0:
            raise ValueError("max_running must be ≥ 1 and max_queue ≥ 0")
        self.max_running, self.max_queue = max_running, max_queue
        self.running = 0
        self._waiting: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def join(self) -> asyncio.Future:
        ticket = asyncio.get_running_loop().create_future()
        if self.running < self.max_running and not self._waiting:
            self.running += 1
            ticket.set_result(True)
        elif len(self._waiting) >= self.max_queue:
            raise QueueFull
        else:
            self._waiting.append(ticket)
        return ticket

    async def wait(self, ticket: asyncio.Future, timeout: float) -> bool:
        """True once the ticket may run; False after `timeout` seconds in the queue."""
        done, _ = await asyncio.wait({ticket}, timeout=timeout)  # asyncio.wait never cancels the ticket
        return bool(done)

    def leave(self, ticket: asyncio.Future) -> None:
        if ticket.done() and not ticket.cancelled():
            self.running -= 1
        else:
            self._waiting.remove(ticket)
            ticket.cancel()
        while self._waiting and self.running < self.max_running:
            self.running += 1
            self._waiting.popleft().set_result(True)
