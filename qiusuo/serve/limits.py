"""Admission control: per-key limits (→ 429 / 402) and a global concurrency gate with a bounded queue
(→ 503). Both live in memory, so limits restart with the server (the ledger and balances do not).

A request is admitted in two steps, as a public LLM API must to stay cheap under abuse:

1. `KeyLimits.enter`, before the body is read: one of the key's concurrent-request slots, one
   request from its requests/minute bucket, and a balance above what its running requests hold.
2. `KeyLimits.reserve`, once the prompt is tokenised: prompt + max_tokens from its tokens/minute
   bucket, and a hold on its balance of what the request may cost at most.

`Hold.settle(used_tokens)` at the end gives back the tokens the request did not use (never more than
it took; a request that used more than it could take owes the difference) and drops the balance hold
(the ledger row then carries the real cost). `Hold.release` is idempotent, so every path may call it.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Callable

MAX_RETRY_AFTER = 60  # seconds; docs/design.md §5 promises clients a Retry-After of at most this


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (0 would invite an immediate retry storm), at most 60."""
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(seconds))))


class TokenBucket:
    """`per_minute` units refill continuously; the bucket holds at most one minute's worth. The level
    may go below zero when a settled request used more than it could take: that debt delays the next."""

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

    def take(self, n: float) -> float:
        """Take `n` units, at most a full bucket; returns what was taken."""
        self._refill()
        taken = min(n, self.capacity)
        self.level -= taken
        return taken

    def give(self, n: float) -> None:
        """Return units taken but not used (a completion shorter than its max_tokens)."""
        self._refill()
        self.level = min(self.capacity, self.level + n)

    def owe(self, n: float) -> None:
        """Take units already used beyond what was taken, down to one minute of debt at most."""
        self._refill()
        self.level = max(-self.capacity, self.level - n)


class Refused(Exception):
    """A limit refused the request: answer `status` with `message`, `code` and maybe Retry-After."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


class Hold:
    """What one request holds at its key: a concurrency slot, tokens taken from the tokens/minute
    bucket and a balance hold (USD). `settle` or `release` gives them back, once."""

    def __init__(self, limits: "KeyLimits", key_id: str):
        self.limits, self.key_id = limits, key_id
        self.tokens = 0.0
        self.usd = 0.0
        self.released = False

    def settle(self, used_tokens: int) -> None:
        """The request is over and used `used_tokens` (prompt + completion) of its reservation."""
        if self.released:
            return
        bucket = self.limits._tokens_bucket(self.key_id)
        if bucket is not None and self.tokens:
            if used_tokens <= self.tokens:
                bucket.give(self.tokens - used_tokens)  # never more than it took
            else:
                bucket.owe(used_tokens - self.tokens)
        self._drop()

    def release(self) -> None:
        """The request ended before the model saw it: nothing was used."""
        self.settle(0)

    def _drop(self) -> None:
        self.released = True
        lim = self.limits
        lim._active[self.key_id] -= 1
        lim._held[self.key_id] -= self.usd
        if lim._active[self.key_id] <= 0:
            del lim._active[self.key_id], lim._held[self.key_id]
        lim.holds -= 1


class KeyLimits:
    """Per key id: requests/minute and tokens/minute buckets, concurrent requests and balance holds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket, int, int]] = {}
        self._active: dict[str, int] = {}
        self._held: dict[str, float] = {}
        self.holds = 0
        """Holds not yet released (a /metrics gauge: 0 when idle)."""

    def _get(self, key_id: str, rpm: int, tpm: int) -> tuple[TokenBucket, TokenBucket]:
        entry = self._buckets.get(key_id)
        if entry is None or entry[2:] != (rpm, tpm):  # new key, or its limits were changed
            entry = (TokenBucket(rpm, self._clock), TokenBucket(tpm, self._clock), rpm, tpm)
            self._buckets[key_id] = entry
        return entry[0], entry[1]

    def _tokens_bucket(self, key_id: str) -> TokenBucket | None:
        entry = self._buckets.get(key_id)
        return None if entry is None else entry[1]

    def active(self, key_id: str) -> int:
        return self._active.get(key_id, 0)

    def held(self, key_id: str) -> float:
        return self._held.get(key_id, 0.0)

    def enter(self, key_id: str, rpm: int, tpm: int, max_concurrent: int, remaining: float) -> Hold:
        """Step 1, before the body is read: a concurrency slot, one request/minute, a balance left.
        Takes nothing when it refuses."""
        if self.active(key_id) >= max_concurrent:
            raise Refused(429, f"key {key_id} already has {max_concurrent} requests in flight; wait for one to "
                               "finish", "too_many_concurrent_requests", retry_after=1)
        if remaining - self.held(key_id) <= 0:
            raise Refused(402, "insufficient balance", "insufficient_balance")
        requests, _ = self._get(key_id, rpm, tpm)
        wait = requests.wait_time(1)
        if wait > 0:
            raise Refused(429, f"rate limit of key {key_id} reached ({rpm} requests per minute)",
                          "rate_limit_exceeded", retry_after=wait)
        requests.take(1)
        self._active[key_id] = self.active(key_id) + 1
        self._held.setdefault(key_id, 0.0)
        self.holds += 1
        return Hold(self, key_id)

    def reserve(self, hold: Hold, rpm: int, tpm: int, tokens: int, usd: float, remaining: float) -> None:
        """Step 2, after tokenisation: `tokens` (prompt + max_tokens) from the tokens/minute bucket
        and `usd` (the most the request may cost) from the balance. Takes nothing when it refuses."""
        if remaining - self.held(hold.key_id) < usd:
            raise Refused(402, f"insufficient balance for this request (it may cost up to ${usd:.6f}); "
                               "lower max_tokens or top up", "insufficient_balance")
        _, bucket = self._get(hold.key_id, rpm, tpm)
        wait = bucket.wait_time(tokens)
        if wait > 0:
            raise Refused(429, f"rate limit of key {hold.key_id} reached ({tpm} tokens per minute)",
                          "rate_limit_exceeded", retry_after=wait)
        hold.tokens = bucket.take(tokens)
        hold.usd = usd
        self._held[hold.key_id] += usd


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
