"""Continuous batching for the server: a background thread admits waiting requests into the running
`DecodeBatch` between decode steps and retires finished ones, and an outbox hands each request's tokens
to its consumer (an event loop, a blocked thread or a sink). The engine that GRPO and evaluation import
(`qiusuo.engine`) has no threads or asyncio; this module is the server's.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Iterator

from ..engine import DecodeBatch, Engine, Row, SamplingParams


def check_prompt(prompt_ids: list[int], max_len: int) -> None:
    """What a scheduler refuses before queueing: an empty prompt, or one that leaves no room to generate."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a context of {max_len}")


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at capacity."""


class Request:
    """A submitted generation: iterate it (blocking or `async for`) to receive token ids as they come."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None,
                 sink=None, tag=None):
        """`sink` (instead of a consumer): a callable that the scheduler thread hands each batch of
        news to, as [(request, tokens, finished)] — how a request reaches another process. `tag`:
        the caller's name for the request (the engine process's id)."""
        self.prompt_ids, self.params, self.tag = prompt_ids, params, tag
        self.output_ids: list[int] = []     # the tokens handed to the consumer so far
        # set when the end is handed over, with the last of `output_ids` (the scheduler knows it at
        # once, as `_finish` / `_finished_at`)
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._finish: str | None = None
        self._finished_at: float | None = None
        self.started = False
        self.row: Row | None = None
        # where its tokens go: the sink, the event loop of its consumer, or a blocked thread's queue
        self._route = sink if sink is not None else loop if loop is not None else _SYNC
        self._on_cancel = None        # called by `cancel` (a remote request tells its engine process)
        # what the consumer receives: (token ids, finished) items, each carrying everything produced
        # since the previous one — one item per hand-over, not one per token
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._handed = 0              # row.generated[:_handed] are on their way to the consumer
        self._end_handed = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating at the next step (or never start, if still waiting)."""
        self._cancelled.set()
        row = self.row
        if row is not None and row.finish_reason is None:   # (the server cancels every request it ends)
            row.cancel()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _take(self) -> tuple[list[int], bool]:
        """The tokens its row generated that the consumer has not been given yet (added to
        `output_ids`), and whether the end goes with them (scheduler thread)."""
        tokens = []
        if self.row is not None:
            upto = self.row.reported()
            if upto > self._handed:
                tokens = self.row.generated[self._handed:upto]
                self._handed = upto
                self.output_ids += tokens
        done = self._finish is not None and not self._end_handed
        if done:
            self._end_handed = True
            self.finish_reason, self.finished_at = self._finish, self._finished_at
        return tokens, done

    def __iter__(self) -> Iterator[int]:
        if self._async is not None:
            raise RuntimeError("this request was submitted from an event loop: use `async for`")
        while True:
            tokens, done = self._sync.get()
            yield from tokens
            if done:
                return

    async def __aiter__(self):
        async for tokens in self.batches():
            for token in tokens:
                yield token

    async def batches(self):
        """`async for tokens in request.batches()`: the token ids that arrived since the last wake-up,
        as one list — under load a consumer falls behind the engine and catches up in one go."""
        if self._async is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate it normally")
        while True:
            tokens, done = await self._async.get()
            while not done and not self._async.empty():
                more, done = self._async.get_nowait()
                tokens = tokens + more
            if tokens:
                yield tokens
            if done:
                return


_SYNC = object()   # route of requests consumed by a blocked thread: their tokens go out every step


class _Outbox:
    """Tokens on their way from the scheduler thread to their consumers.

    Requests are grouped by route: the event loop that consumes them, a sink, or blocked threads.
    A step only notes which requests joined (a first token) or ended; the tokens themselves stay in
    each row's `generated` until a hand-over takes, for every request of a route, all its tokens
    since the last one — for an event loop one thread-safe wake-up with one queue item per request
    and, in the server, one SSE chunk. So the per-request work is done once per hand-over, not once
    per step.

    With few streams running, a loop gets the next hand-over as soon as it has taken the previous
    one: every token goes out at once. With many (`busy`), tokens are held for `interval` seconds so
    each stream's tokens go out several to a chunk: per-chunk work (event loop wake-ups, JSON, socket
    writes, the client's parsing) is what limits a loaded server, not the decoding. Nothing is held
    longer than `max_delay`, and a first token or the end of a stream is not held at all: they decide
    time to first token and when a client can send its next request. (vLLM and SGLang call this the
    stream interval.) Blocked threads get every step's tokens."""

    def __init__(self, interval: float = 0.02, max_delay: float = 0.05):
        self.interval, self.max_delay = interval, max(max_delay, interval)
        self.running: dict = {}          # route → {request: None}: its requests in the batch, in order
        self.ended: dict = {}            # route → [request]: ended since the route's last hand-over
        self.since: dict = {}            # route → when its oldest news not handed over arrived
        self.ready: dict = {}            # loop → it has taken the last hand-over
        self.urgent: dict = {}           # route → {request: None} with a first token or an end pending

    def stepped(self, joined: list[Request], ended: list[Request]) -> None:
        """After a step's sampling: `joined` got their first token (or ended at once), `ended` ended;
        every running request got a token."""
        now = time.perf_counter()
        for r in joined:
            self.running.setdefault(r._route, {})[r] = None
            self.urgent.setdefault(r._route, {})[r] = None
        for r in ended:
            route = r._route
            running = self.running[route]
            del running[r]
            if not running:
                del self.running[route]
            self.ended.setdefault(route, []).append(r)
            self.urgent.setdefault(route, {})[r] = None
            self.since.setdefault(route, now)
        for route in self.running:
            self.since.setdefault(route, now)

    def requests(self) -> list[Request]:
        """Every request with news not handed over, or still running."""
        return [r for reqs in self.ended.values() for r in reqs] + [r for reqs in self.running.values() for r in reqs]

    def hand_over(self, force: bool = False, busy: bool = False) -> None:
        now = time.perf_counter()
        for route in list(self.since):
            age = now - self.since[route]
            if (force or route is _SYNC or (self.ready.get(route, True) and (not busy or age >= self.interval))
                    or age > self.max_delay):
                reqs = self.ended.pop(route, []) + list(self.running.get(route, ()))
                del self.since[route]
                self.urgent.pop(route, None)
            elif route in self.urgent:
                # only the streams with a first token or an end go now (every ended one is urgent)
                reqs = list(self.urgent.pop(route))
                self.ended.pop(route, None)
                if route not in self.running:
                    del self.since[route]
            else:
                continue
            self._send(route, reqs)

    def _send(self, route, reqs: list[Request]) -> None:
        items = [(r, item) for r in reqs if (item := r._take())[0] or item[1]]
        if not items:
            return
        if route is _SYNC:
            for r, item in items:
                r._sync.put(item)
        elif not isinstance(route, asyncio.AbstractEventLoop):   # a sink: it takes them here and now
            route([(r, *item) for r, item in items])
        else:
            self.ready[route] = False
            try:
                route.call_soon_threadsafe(self._put_all, route, [(r._async, item) for r, item in items])
            except RuntimeError:  # the loop was closed: nobody is waiting for these tokens
                self.ready.pop(route, None)

    def _put_all(self, loop, items: list) -> None:
        """Runs in the event loop."""
        self.ready[loop] = True
        for q, item in items:
            q.put_nowait(item)


class Scheduler:
    """Continuous batching: a background thread admits waiting requests into the running batch
    between decode steps and retires finished ones, within a cap on running sequences and on
    reserved KV-cache positions. Each request gets the same tokens alone or among others (its own
    seed and random stream), so batching changes throughput, never results."""

    def __init__(self, engine: Engine, max_running: int = 64, max_queue: int = 256, max_cache_tokens: int = 1 << 16,
                 max_len: int | None = None, stream_interval: float = 0.0, coalesce_above: int = 8):
        """`stream_interval` > 0: with more than `coalesce_above` requests running, tokens reach async
        consumers in batches at most that many seconds apart (see `_Outbox`)."""
        self.engine = engine
        self.coalesce_above = coalesce_above
        self.max_running, self.max_queue, self.max_cache_tokens = max_running, max_queue, max_cache_tokens
        self.max_len = max_len or engine.model.config.max_position_embeddings
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self._batch = DecodeBatch(engine, self.max_len)
        self._thread: threading.Thread | None = None
        self._outbox = _Outbox(stream_interval)
        self._stop = False
        self._joining: list[Request] = []
        self.steps = 0
        self.error: BaseException | None = None

    # --- public
    def start(self) -> "Scheduler":
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qiusuo-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._batch.close()   # its cache goes back to the engine, for the next batch or scheduler

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink=None, tag=None) -> Request:
        """Queue a request; consume it by iterating it (from a thread or, when submitted from an event
        loop, with `async for`), or pass a `sink` (see `Request`). `tag` is kept as `request.tag`.
        Requests may be queued before `start`; a stopped scheduler refuses them (RuntimeError) until
        it is started again, rather than keep them waiting for a restart that may never come."""
        check_prompt(prompt_ids, self.max_len)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        req = Request(prompt_ids, params, None if sink is not None else loop, sink, tag)
        with self._lock:
            if self._stop:
                raise RuntimeError("the scheduler is stopped" if self.error is None else
                                   f"the scheduler stopped after an error: {self.error!r}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch)

    # --- the loop
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a failed step must not leave clients waiting forever
            self.error = e
            logging.getLogger(__name__).exception("scheduler stopped")
            self._end_all("error")

    def _end(self, req: Request, finish_reason: str) -> None:
        """Finish `req` outside a step (cancelled while waiting, scheduler stopped, a failed step): what
        is left of its tokens and its end go out at once."""
        req._finish, req._finished_at = finish_reason, time.perf_counter()
        self._outbox._send(req._route, [req])

    def _end_all(self, finish_reason: str) -> None:
        """Refuse new requests and end every request still owed an end: waiting, being admitted,
        running, or ended but not handed over. One that cannot be reached (a failing sink, perhaps
        the failure itself) does not keep the others from theirs."""
        log = logging.getLogger(__name__)
        with self._lock:
            self._stop = True
            waiting, self._waiting = self._waiting, []    # a restarted scheduler must not run them
        try:
            self._outbox.hand_over(force=True)   # the tokens already produced go out first
        except Exception:
            log.exception("handing over at the end failed")
        for req in waiting + self._joining + self._outbox.requests() + [row.owner for row in self._batch.rows]:
            if req._finish is None:
                try:
                    self._end(req, finish_reason)
                except Exception:
                    log.exception("could not end request %s", req.tag)
        self._outbox = _Outbox(self._outbox.interval, self._outbox.max_delay)

    def _run(self) -> None:
        batch, outbox = self._batch, self._outbox
        while True:
            with self._lock:
                if not self._waiting and not batch.rows:
                    outbox.hand_over(force=True)  # about to idle: nothing may stay behind
                while not self._stop and not self._waiting and not batch.rows:
                    self._lock.wait()
                if self._stop:
                    break
                admit = self._take_admissible()
            self._joining = admit   # (for the error path: they are in neither the queue nor the outbox yet)
            if admit:
                self._admit(admit)
            ended = [row.owner for row in batch.sample()]
            now = time.perf_counter()
            for req in admit:        # this was their first draw
                if req.row.reported():
                    req.first_token_at = now
            for req in ended:
                req._finish, req._finished_at = req.row.finish_reason, now
            outbox.stepped(admit, ended)
            # the tokens go out before the model computes the next ones, not one forward pass later
            outbox.hand_over(busy=len(batch) > self.coalesce_above)
            batch.forward()
            self.steps += 1
        self._end_all("cancelled")

    def _take_admissible(self) -> list[Request]:
        """Waiting requests that fit the running-sequence and cache budgets, oldest first."""
        if not self._waiting:
            return []
        admit, reserved = [], self._batch.cached_tokens()
        running = len(self._batch)
        for req in list(self._waiting):
            if req.cancelled:
                self._waiting.remove(req)
                try:
                    self._end(req, "cancelled")
                except Exception:   # (a failing sink) must not lose the requests taken so far
                    logging.getLogger(__name__).exception("could not end request %s", req.tag)
                continue
            need = min(self.max_len, len(req.prompt_ids) + req.params.max_new_tokens)
            over_budget = running + len(admit) >= self.max_running or reserved + need > self.max_cache_tokens
            if over_budget and (running or admit):  # an idle engine always takes the oldest request
                break
            admit.append(req)
            reserved += need
            self._waiting.remove(req)
        return admit

    def _admit(self, reqs: list[Request]) -> None:
        rows = []
        for req in reqs:
            req.row = self.engine.new_row(req, req.params, req.params.seed)
            if req.cancelled:
                req.row.cancel()
            req.started = True
            rows.append(req.row)
        self._batch.admit([r.prompt_ids for r in reqs], rows)
