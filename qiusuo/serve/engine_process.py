"""The scheduler in a process of its own, so that the server's event loop never waits for the GIL.

In one process the event loop (HTTP, JSON, SSE) and the scheduler thread (admission, sampling
bookkeeping, the hand-over of tokens) take turns on one GIL: measured at 32 streaming clients, each
was off the CPU 35–40 % of the time waiting for the other, and the machine sat partly idle. vLLM
split its server the same way (the "engine core" process). Here the child runs an ordinary
`Scheduler`; a duplex pipe carries small pickled messages:

    server → engine   ("submit", id, prompt_ids, params) · ("cancel", id) · ("stop",)
    engine → server   ("ready", pid) · ("out", [(id, tokens, finish_reason or None), …])

An "out" message is one scheduler hand-over (the stream interval applies in the child), so under
load the event loop wakes once per hand-over for all streams. `EngineProcess` has the `Scheduler`
interface the server uses (`start`, `stop`, `submit`, `running`, `queue_depth`, `max_len`), and the
requests it returns are ordinary `engine.Request`s consumed with `async for`.

If the child dies, every request in flight ends with finish_reason "error" (the server answers them
500, in-band for a stream that has started) and a new child is started; requests submitted meanwhile
wait for it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..engine import SamplingParams
from .scheduler import QueueFull, Request, check_prompt

log = logging.getLogger(__name__)


def _child(conn, checkpoint: str, device: str, threads: int, kwargs: dict) -> None:
    """Entry point of the engine process: load the model, run a Scheduler, relay its output."""
    from ..checkpoint import load_checkpoint
    from ..engine import Engine
    from .scheduler import Scheduler

    # Ctrl-C in a terminal reaches the whole process group: the server shuts the engine down itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(Path(checkpoint), device=device)
    sched = Scheduler(Engine(model.eval(), tokenizer), **kwargs)
    by_id: dict[int, Request] = {}     # for cancels: in flight, and some finished ones
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    def sink(items) -> None:  # the scheduler thread, once per hand-over
        # `started`: the request reached the model (its prompt was prefilled), so it is billed
        out = [(req.tag, tokens, req.finish_reason if done else None, req.started) for req, tokens, done in items]
        try:
            send(("out", out))
        except OSError:  # the server is gone; the main loop stops on EOF
            pass

    sched.start()
    send(("ready", mp.current_process().pid))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the server went away
                break
            if msg[0] == "submit":
                _, rid, prompt_ids, params = msg
                if len(by_id) > 2 * kwargs["max_running"] + kwargs["max_queue"]:   # forget finished ones
                    by_id = {k: r for k, r in by_id.items() if r.finish_reason is None}
                try:
                    by_id[rid] = sched.submit(prompt_ids, params, sink=sink, tag=rid)
                except Exception as e:  # checked by the server first; a refusal here ends the request
                    log.warning("engine refused request %s: %s", rid, e)
                    send(("out", [(rid, [], "error")]))
            elif msg[0] == "cancel":
                req = by_id.get(msg[1])
                if req is not None:
                    req.cancel()
            elif msg[0] == "stop":
                break
    finally:
        sched.stop()   # in-flight requests end "cancelled" and are relayed if the pipe is still open
        conn.close()


class EngineProcess:
    """A `Scheduler` stand-in for the server whose scheduler runs in a child process."""

    def __init__(self, *, checkpoint: str | None = None, model=None, tokenizer=None, device: str = "cpu",
                 max_running: int = 64, max_queue: int = 256, max_cache_tokens: int = 1 << 16,
                 max_len: int, stream_interval: float = 0.0, start_timeout: float = 300.0):
        """The child loads `checkpoint` itself; a `model` and `tokenizer` given instead are written
        to a temporary checkpoint folder for it (removed by `stop`)."""
        if checkpoint is None and model is None:
            raise ValueError("an engine process needs a checkpoint or a model")
        self._scratch = None
        if checkpoint is None:
            from ..model import save_model

            self._scratch = tempfile.mkdtemp(prefix="qiusuo-engine-")
            save_model(model, Path(self._scratch))
            tokenizer.save(Path(self._scratch))
            checkpoint = self._scratch
        self.checkpoint = checkpoint
        self.device = device
        self.max_running, self.max_queue, self.max_len = max_running, max_queue, max_len
        self._kwargs = dict(max_running=max_running, max_queue=max_queue, max_cache_tokens=max_cache_tokens,
                            max_len=max_len, stream_interval=stream_interval)
        self.start_timeout = start_timeout
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}      # in flight: submitted, not finished
        self._started: set[int] = set()              # of those, the ones with output (admitted)
        self._pending: list[tuple] = []              # submits waiting for a (re)started child
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc = self._conn = None
        self._stopping = self._restarting = False
        self.restarts = 0
        self.error: BaseException | None = None

    # --- the Scheduler interface
    def start(self) -> "EngineProcess":
        """Start the child and wait until its model is loaded (call from the server's event loop)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._attach(*self._spawn())
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None:
            self._loop.remove_reader(self._conn.fileno())
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        if self._proc is not None:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._fail_all("cancelled")
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        check_prompt(prompt_ids, self.max_len)
        if len(self._requests) >= self.max_running + self.max_queue:
            raise QueueFull(f"{len(self._requests) - self.running} requests already waiting")
        if self._stopping or (self._conn is None and not self._restarting):
            raise RuntimeError(f"the engine process is not running ({self.error or 'stopped'})")
        req = Request(prompt_ids, params, self._loop)
        rid = next(self._ids)
        self._requests[rid] = req
        req._on_cancel = lambda: self._cancel(rid)
        self._send(("submit", rid, list(prompt_ids), params))
        return req

    @property
    def running(self) -> int:
        return len(self._started)

    @property
    def queue_depth(self) -> int:
        return len(self._requests) - len(self._started)

    # --- messages
    def _send(self, msg) -> None:
        if self._conn is None:              # restarting: goes out when the new child is up
            self._pending.append(msg)
            return
        try:
            self._conn.send(msg)
        except OSError:                     # the child died; `_readable` sees EOF and restarts it
            self._pending.append(msg)

    def _cancel(self, rid: int) -> None:
        if rid in self._requests:
            self._send(("cancel", rid))

    def _readable(self) -> None:
        """Runs in the event loop when the pipe has data: apply the messages waiting in it (at most 64,
        so a busy engine cannot keep the loop from its other work; the rest come on the next call)."""
        conn = self._conn
        try:
            for _ in range(64):
                if not conn.poll():
                    break
                kind, payload = conn.recv()
                if kind == "out":
                    self._apply(payload)
        except (EOFError, OSError):
            self._lost()

    def _apply(self, out: list) -> None:
        now = time.perf_counter()
        for rid, tokens, finish, *started in out:
            req = self._requests.get(rid)
            if req is None:
                continue
            if rid not in self._started and (not started or started[0]):
                self._started.add(rid)
                req.started = True
            if tokens:
                if req.first_token_at is None:
                    req.first_token_at = now
                req.output_ids += tokens
            if finish is not None:
                req.finish_reason, req.finished_at = finish, now
                del self._requests[rid]
                self._started.discard(rid)
            req._async.put_nowait((tokens, finish is not None))

    def _fail_all(self, reason: str) -> None:
        requests, self._requests = self._requests, {}
        self._started.clear()
        self._pending.clear()
        for req in requests.values():
            req.finish_reason, req.finished_at = reason, time.perf_counter()
            req._async.put_nowait(([], True))

    # --- the child
    def _spawn(self):
        ctx = mp.get_context("spawn")  # not fork: the parent has threads (torch's OpenMP team, the event loop)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, name="qiusuo-engine", daemon=True,
                           args=(child, self.checkpoint, self.device, torch.get_num_threads(), self._kwargs))
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout):
            proc.kill()
            raise RuntimeError(f"the engine process did not start within {self.start_timeout:g} s")
        try:
            kind, _ = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"the engine process failed to start (exit code {proc.exitcode})") from None
        assert kind == "ready"
        return proc, parent

    def _attach(self, proc, conn) -> None:
        if self._stopping:           # stopped while a new child was starting
            conn.send(("stop",))
            proc.join(timeout=10)
            return
        self._proc, self._conn = proc, conn
        self.error, self._restarting = None, False
        self._loop.add_reader(conn.fileno(), self._readable)
        pending, self._pending = self._pending, []
        for msg in pending:
            self._send(msg)

    def _lost(self) -> None:
        """The child died: end its requests with an error and start another one in the background."""
        self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        self._proc = self._conn = None
        if self._stopping:
            return
        self.error = RuntimeError(f"the engine process exited (code {code})")
        log.error("%s; failing %d requests and starting a new one", self.error, len(self._requests))
        self._fail_all("error")
        self.restarts += 1
        self._restarting = True
        threading.Thread(target=self._respawn, name="qiusuo-engine-restart", daemon=True).start()

    def _respawn(self) -> None:
        try:
            proc, conn = self._spawn()
        except Exception as e:
            log.exception("could not restart the engine process")
            self._loop.call_soon_threadsafe(self._gave_up, e)
            return
        self._loop.call_soon_threadsafe(self._attach, proc, conn)

    def _gave_up(self, e: BaseException) -> None:
        self.error, self._restarting = e, False
        self._fail_all("error")
