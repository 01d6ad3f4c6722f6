"""The OpenAI / DeepSeek-compatible HTTP server (docs/design.md §5): `create_app(cfg)` returns a FastAPI app.

A chat request goes: authenticate (401) → the key's concurrent requests, requests per minute and
balance (429 / 402) → read the body within its size limit (413) → parse it strictly (400 / 422) →
a length pre-check, then render and tokenise in a thread pool, prompt limit (400) → tokens per
minute for prompt + max_tokens and a hold on the balance of the highest cost (429 / 402) → a place
in the gate's queue (503) → [response headers go out when streaming] → wait for a running slot
(queue timeout: 503) → the scheduler generates → the splitter turns tokens into
`reasoning_content` / `content` → one usage row in the ledger, and the key's hold settled.

Generation runs in a task of its own (`Service.run`) that owns the gate slot, the key's hold, the
scheduler request and the ledger row; the HTTP side only reads its events. Whatever ends the
request — the answer is complete, the client disconnects, the queue times out, the engine or the
ledger fails — the task's `finally` releases the slot, cancels the generation, records what the
model consumed exactly once (when the client left before the engine said whether it had prefilled
the prompt, once it has) and settles the hold. Before the task exists, `ChatRoute` releases the hold.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, SamplingParams
from .scheduler import QueueFull as SchedulerFull
from .scheduler import Request as EngineRequest
from .scheduler import Scheduler
from .engine_process import EngineProcess
from .keys import DEFAULT_DB, Key, KeyStore, Usage
from .limits import Gate, Hold, KeyLimits, QueueFull, Refused, retry_after_header
from .reasoning import IncrementalDecoder, ReasoningSplitter
from .schemas import ChatRequest, classify_error

log = logging.getLogger("qiusuo.serve")


@dataclass
class ServeConfig:
    """Settings of `qiusuo serve`."""

    checkpoint: str = ""
    """Stage folder to serve, e.g. runs/tiny/zero (also the first positional argument)."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback only by default)."""
    port: int = 8000
    """TCP port."""
    model_name: str = ""
    """Model id clients ask for; empty: qiusuo-<run>-<stage> from the checkpoint path."""
    db: str = DEFAULT_DB
    """SQLite file holding the API keys and the usage ledger (the same default as `qiusuo keys`)."""
    no_auth: bool = False
    """Serve without API keys (local use only): no key limits or balance; usage is still recorded.
    The server then listens on loopback only, takes JSON bodies only (415 for others: a web page
    can post text/plain across sites) and answers only requests naming a loopback `Host` (DNS
    rebinding)."""
    device: str = "cpu"
    """Device to run the model on (cpu, cuda)."""
    max_concurrent: int = 32
    """Requests generating at once (the scheduler's running batch)."""
    max_queue: int = 128
    """Requests waiting for a running slot; one more gets 503 with Retry-After."""
    queue_timeout: float = 30.0
    """Seconds a request may wait for a running slot before it gets 503."""
    overload_retry_after: float = 2.0
    """Retry-After (seconds) sent with a 503."""
    keepalive_interval: float = 5.0
    """Seconds of silence after which a stream gets a `: keep-alive` comment."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a larger one gets 413."""
    max_messages: int = 64
    """Most messages in one request."""
    max_prompt_tokens: int = 0
    """Longest prompt in tokens; 0: the model's context minus one."""
    key_max_concurrent: int = 8
    """Requests one key may have in flight at once (a key's own `max_concurrent` overrides it), so
    no key can take every slot; one more gets 429."""
    prepare_threads: int = 2
    """Threads that render chat templates and tokenise prompts, off the event loop."""
    ledger_retention_days: float = 0.0
    """Delete ledger rows older than this many days (at start and hourly); 0: keep them all. Key
    balances are not affected."""
    db_busy_timeout: float = 0.25
    """Seconds a ledger or key lookup waits for a SQLite lock held elsewhere before the request gets
    503 with Retry-After (the wait blocks the event loop, so keep it short)."""
    max_tokens_limit: int = 1024
    """Largest max_tokens / max_completion_tokens a request may ask for (larger: 422)."""
    default_max_tokens: int = 256
    """Completion budget of a request that sets no max_tokens (cut to fit the context)."""
    default_temperature: float = 0.6
    """Temperature of a request that sets none (R1's recommended 0.6)."""
    default_top_p: float = 0.95
    """top_p of a request that sets none (R1's recommended 0.95)."""
    price_prompt: float = 0.55
    """USD per million prompt tokens."""
    price_completion: float = 2.19
    """USD per million completion tokens (reasoning included)."""
    max_cache_tokens: int = 1 << 16
    """KV-cache positions the scheduler may reserve across running requests."""
    max_context: int = 0
    """Longest prompt + completion served, in tokens; 0: the model's own context. The KV cache holds
    this many positions for each running request, so bound it for long-context checkpoints."""
    stream_interval_ms: float = 20.0
    """With more than 8 streams generating, each stream's tokens are sent at most this often, several
    per SSE chunk (0: every token at once, always). Per-chunk work, not decoding, limits a loaded
    server; with 8 or fewer streams every token goes out as soon as it is made."""
    engine_process: bool = True
    """Run the scheduler and the model in a child process (false: a thread of the server process).
    The event loop then never waits for the GIL behind decoding; a crashed engine is restarted."""

    def __post_init__(self) -> None:
        if not self.model_name and self.checkpoint:
            self.model_name = "qiusuo-" + "-".join(Path(self.checkpoint).parts[-2:])
        if self.max_concurrent < 1 or self.max_queue < 0 or self.queue_timeout <= 0:
            raise ValueError("max_concurrent must be ≥ 1, max_queue ≥ 0 and queue_timeout > 0")
        if self.stream_interval_ms < 0:
            raise ValueError("stream_interval_ms must be ≥ 0")
        if self.max_context < 0 or self.max_context == 1:
            raise ValueError("max_context must be 0 (the model's) or ≥ 2")
        if self.default_max_tokens < 1 or self.max_tokens_limit < self.default_max_tokens:
            raise ValueError("need 1 ≤ default_max_tokens ≤ max_tokens_limit")
        if self.key_max_concurrent < 1 or self.prepare_threads < 1 or self.max_messages < 1:
            raise ValueError("key_max_concurrent, prepare_threads and max_messages must be ≥ 1")
        if self.ledger_retention_days < 0 or self.db_busy_timeout < 0:
            raise ValueError("ledger_retention_days and db_busy_timeout must be ≥ 0")


# --- errors ------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error the client gets as `{"error": {message, type, param, code}}` with this status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_balance",
             404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
             421: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None, usage: Usage | None = None, request_id: str | None = None):
        """`usage`: what the request consumed before it failed (billed, so the client is told, with
        the `request_id` of its ledger row)."""
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after
        self.usage, self.request_id = usage, request_id

    @classmethod
    def refused(cls, r: Refused) -> "ApiError":
        return cls(r.status, r.message, r.code, retry_after=r.retry_after)

    def body(self) -> dict:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}
        if self.usage is not None:
            body["id"], body["usage"] = self.request_id, self.usage.as_openai()
        return body

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after is None else {"Retry-After": retry_after_header(self.retry_after)}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI-shaped body; a bug is logged here and never shown."""

    @app.exception_handler(ApiError)
    async def _api(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return ApiError(400, "malformed request", "invalid_request").response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal server error", "internal_error").response()


# --- metrics -----------------------------------------------------------------------------------

class Metrics:
    """Prometheus series, in a registry of their own so several apps can live in one process."""

    def __init__(self, service: "Service"):
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("qiusuo_requests", "HTTP requests by route and status", ["route", "status"],
                                     registry=r)
        prom.Gauge("qiusuo_queue_depth", "Requests waiting for a running slot", registry=r).set_function(
            lambda: service.gate.waiting + service.scheduler.queue_depth)
        prom.Gauge("qiusuo_running_sequences", "Sequences in the running batch", registry=r).set_function(
            lambda: service.scheduler.running)
        # what requests hold; all 0 when the server is idle (a soak checks they return there)
        for name, doc, value in [
                ("qiusuo_active_slots", "Gate slots held by running requests", lambda: service.gate.running),
                ("qiusuo_engine_sequences", "Requests the engine holds (waiting or running)",
                 lambda: service.scheduler.running + service.scheduler.queue_depth),
                ("qiusuo_key_requests_in_flight", "Requests holding a key's concurrency slot",
                 lambda: sum(service.limits._active.values())),
                ("qiusuo_reservations", "Token and balance reservations not yet settled", lambda: service.limits.holds),
                ("qiusuo_preparing", "Requests being rendered and tokenised", lambda: service.preparing),
                ("qiusuo_unsettled", "Cancelled requests waiting for the engine's word before billing",
                 lambda: len(service.unsettled))]:
            prom.Gauge(name, doc, registry=r).set_function(value)
        self.tokens = prom.Counter("qiusuo_tokens", "Tokens processed", ["kind"], registry=r)
        self.ttft = prom.Histogram("qiusuo_time_to_first_token_seconds", "Request arrival to first token",
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = prom.Histogram("qiusuo_inter_token_latency_seconds", "Time between consecutive tokens",
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)

    def render(self) -> Response:
        return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware counting responses by route and status. (A pure ASGI wrapper rather than
    BaseHTTPMiddleware, which would buffer streams and hide client disconnects.)"""

    ROUTES = {"/v1/chat/completions", "/chat/completions", "/v1/models", "/models", "/health", "/metrics",
              "/user/balance", "/"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [499]  # nginx's "client closed request": the client left before any response

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status[0] = 500
            raise
        finally:
            route = scope["path"] if scope["path"] in self.ROUTES else "other"  # bounded label values
            self.metrics.requests.labels(route, str(status[0])).inc()


class ChatRoute:
    """`POST /v1/chat/completions` (and `/chat/completions`) as a plain ASGI handler in front of FastAPI
    (`App` hands it these paths before FastAPI's own middleware stack; `CountRequests` still counts).

    The hot route skips FastAPI's routing, its exception and body-limit middlewares and Starlette's
    `StreamingResponse`, which runs every stream in an anyio task group with a second task listening
    for the disconnect: measured at 32 streaming clients, framework code was about a third of the
    server process's CPU, and the server process, not the engine, set the pace (the engine process
    alone served the same 32 clients 1.3-1.6x faster). Here a stream is one coroutine writing SSE chunks
    straight to `send`, and a disconnect is a callback on one `receive()` future that cancels it.
    Errors leave exactly as the app's handlers would send them (`ApiError.response`)."""

    PATHS = ("/v1/chat/completions", "/chat/completions")

    def __init__(self, service: "Service"):
        self.svc = service

    async def __call__(self, scope, receive, send):
        svc = self.svc
        if scope["method"] != "POST":
            response = ApiError(405, "Method Not Allowed", "method_not_allowed").response()
            response.headers["Allow"] = "POST"
            return await response(scope, receive, send)
        hold, job = None, None
        try:
            request = Request(scope, receive)
            svc.check_content_type(request)
            key = svc.authenticate(request)
            hold = svc.enter(key)                     # cheap checks first: nothing read or tokenised yet
            body = await read_body(request, svc.cfg.max_body_bytes)
            job = await svc.prepare(svc.parse(body), key, hold)
            ticket = svc.admit(job)
            if job.stream:
                # Generation starts now, not when the first chunk is written: the task owns the
                # ticket, so the slot is released even if the client vanishes before the first byte.
                return await self._stream(job, svc.start(job, ticket), receive, send)
            response = await svc.complete(job, ticket, request)
        except ApiError as e:
            response = e.response()
        except Exception:
            log.exception("unhandled error on %s", scope["path"])
            response = ApiError(500, "internal server error", "internal_error").response()
        finally:
            if hold is not None and (job is None or not job.owned):
                hold.release()                        # refused or failed before generation started
        await response(scope, receive, send)

    async def _stream(self, job: "Job", task: asyncio.Task, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        me, open_ = asyncio.current_task(), [True]
        gone = asyncio.ensure_future(_disconnected(receive))
        # once the response is complete, uvicorn's receive() reports a disconnect too: ignore that one
        gone.add_done_callback(lambda f: me.cancel() if open_[0] and not f.cancelled() else None)
        chunks = self.svc.stream(job, task)
        try:
            async for text, last in chunks:   # `stream` ends with its last pair or raises
                await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
        except asyncio.CancelledError:
            if not gone.done() or gone.cancelled():
                raise  # the server is shutting down, not a client hanging up
            me.uncancel()  # the client left: `stream`'s finally has cancelled the generation
        finally:
            open_[0] = False
            gone.cancel()
            await chunks.aclose()


# --- one chat request --------------------------------------------------------------------------

@dataclass
class Job:
    """One chat completion from validation to its ledger row."""

    key: Key | None
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    in_think: bool
    reserved_tokens: int
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    thought: bool = False
    """The model opened a think block (so `reasoning_content` is a string, maybe empty, not null)."""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ApiError | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("piece", (field, text)) … then ("done", None) or ("error", ApiError)."""
    running: bool = False
    """`Service.run` has started (so its `finally` owns the cleanup)."""
    hold: Hold | None = None
    """What the job holds at its key (None without auth)."""
    owned: bool = False
    """The generation task owns the job's gate ticket and hold (`Service.start`)."""
    max_cost: float = 0.0
    """USD the job may cost at most: its balance hold."""


class Service:
    """What the routes share: tokenizer, scheduler, admission control, keys and metrics."""

    def __init__(self, cfg: ServeConfig, engine: Engine, from_checkpoint: bool = False):
        """`from_checkpoint`: the engine's model is `cfg.checkpoint`'s, so an engine process loads
        it from there (otherwise from a temporary copy)."""
        self.cfg = cfg
        self.tok = engine.tokenizer
        self.context = engine.model.config.max_position_embeddings
        if cfg.max_context:
            self.context = min(self.context, cfg.max_context)
        self.max_prompt = min(cfg.max_prompt_tokens or self.context - 1, self.context - 1)  # ≥ 1 token of room
        # The gate caps running requests; the scheduler's own queue only needs room for requests the
        # gate let through whose previous occupant has not left the batch yet.
        settings = dict(max_running=cfg.max_concurrent, max_queue=cfg.max_concurrent + cfg.max_queue,
                        max_cache_tokens=cfg.max_cache_tokens, max_len=self.context,
                        stream_interval=cfg.stream_interval_ms / 1000)
        if cfg.engine_process:
            source = (dict(checkpoint=cfg.checkpoint) if from_checkpoint
                      else dict(model=engine.model, tokenizer=engine.tokenizer))
            self.scheduler = EngineProcess(**source, device=cfg.device, **settings)
        else:
            self.scheduler = Scheduler(engine, **settings)
        self.gate = Gate(cfg.max_concurrent, cfg.max_queue)
        self.limits = KeyLimits()
        self.store = KeyStore(cfg.db, busy_timeout=cfg.db_busy_timeout)
        # rendering and tokenising take the GIL and up to milliseconds per request: a few threads do
        # it so the event loop keeps streaming meanwhile; the per-key concurrency cap bounds the queue
        self.pool = ThreadPoolExecutor(cfg.prepare_threads, thread_name_prefix="qiusuo-prepare")
        self.preparing = 0
        self.unsettled: set[asyncio.Task] = set()
        # no token covers more than this many bytes of text: a longer body cannot fit the prompt limit
        self.max_token_bytes = max((len(t.encode()) for t in self.tok.backend.get_vocab()), default=1)
        self.metrics = Metrics(self)

    @asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        prune = asyncio.create_task(self._prune()) if self.cfg.ledger_retention_days > 0 else None
        try:
            yield
        finally:
            if prune is not None:
                prune.cancel()
            for task in list(self.unsettled):
                task.cancel()
            if self.unsettled:
                await asyncio.gather(*self.unsettled, return_exceptions=True)
            self.scheduler.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.store.close()

    async def _prune(self) -> None:
        """Drop ledger rows past `ledger_retention_days`, now and every hour."""
        while True:
            try:
                n = self.store.prune(self.cfg.ledger_retention_days)
                if n:
                    log.info("pruned %d ledger rows older than %g days", n, self.cfg.ledger_retention_days)
            except sqlite3.Error as e:
                log.warning("could not prune the ledger: %s", e)
            await asyncio.sleep(3600)

    # --- admission -------------------------------------------------------------------------------
    def check_content_type(self, request: Request) -> None:
        """Without keys, only JSON bodies: a web page can post `text/plain` or a form to loopback
        across sites without a preflight, but not `application/json`."""
        if not self.cfg.no_auth:
            return
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be sent as application/json, not {kind or 'untyped'}",
                           "unsupported_media_type")

    def authenticate(self, request: Request) -> Key | None:
        if self.cfg.no_auth:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        try:
            key = self.store.authenticate(token.strip())
        except sqlite3.Error as e:
            raise self._db_unavailable(e) from None
        if key is None:
            raise ApiError(401, "invalid or revoked API key", "invalid_api_key")
        return key

    def _db_unavailable(self, e: Exception) -> ApiError:
        log.error("the key and ledger database cannot be used: %s", e)
        return ApiError(503, "the usage ledger is unavailable; try again shortly", "ledger_unavailable",
                        retry_after=self.cfg.overload_retry_after)

    def enter(self, key: Key | None) -> Hold | None:
        """Step 1 of admission, before the body is read: the key's concurrency slot, requests per
        minute and balance (429 / 402)."""
        if key is None:
            return None
        try:
            return self.limits.enter(key.id, key.rpm, key.tpm, key.max_concurrent or self.cfg.key_max_concurrent,
                                     key.remaining)
        except Refused as r:
            raise ApiError.refused(r) from None

    def parse(self, body: bytes) -> ChatRequest:
        """The body as a `ChatRequest` (400 / 422 naming the field), with the checks that need no
        tokenizer: model, message count, features this server does not have."""
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as e:
            status, message, param, code = classify_error(e)
            raise ApiError(status, message, code, param) from None
        cfg = self.cfg
        if req.model is not None and req.model != cfg.model_name:
            if not req.model:
                raise ApiError(400, "model must not be empty", "invalid_request", "model")
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {cfg.model_name!r}",
                           "model_not_found", "model")
        if len(req.messages) > cfg.max_messages:
            raise ApiError(400, f"at most {cfg.max_messages} messages per request", "too_many_messages", "messages")
        unsupported = req.unsupported()
        if unsupported is not None:   # n > 1 is a value out of range (422, as before); the rest 400
            status = 422 if unsupported[0] == "n" else 400
            raise ApiError(status, unsupported[1], "unsupported_parameter", unsupported[0])
        for i, m in enumerate(req.messages):
            if m.reasoning_content is not None:
                raise ApiError(400, "reasoning_content must not be sent back in input messages; keep only content",
                               "invalid_request", f"messages[{i}].reasoning_content")
        asked = req.requested_max_tokens()
        if asked is not None and asked > cfg.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise ApiError(422, f"{param} must be ≤ {cfg.max_tokens_limit}", "invalid_parameter", param)
        return req

    async def prepare(self, req: ChatRequest, key: Key | None, hold: Hold | None) -> Job:
        """Render and tokenise (in the pool), check the prompt's length, then step 2 of admission:
        reserve prompt + max_tokens tokens and the most the request may cost (429 / 402)."""
        cfg = self.cfg
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        text_bytes = sum(len(m["content"].encode("utf-8", "replace")) for m in messages)
        if text_bytes > self.max_prompt * self.max_token_bytes:  # too long for any tokenisation: skip it
            raise ApiError(400, f"the messages hold {text_bytes} bytes of text; a prompt of at most {self.max_prompt}"
                                " tokens is allowed", "context_length_exceeded", "messages")
        if self.preparing >= cfg.max_concurrent + cfg.max_queue:   # the pool's queue is bounded too
            raise ApiError(503, "server overloaded: too many prompts being prepared", "overloaded",
                           retry_after=cfg.overload_retry_after)
        self.preparing += 1
        try:
            prompt_ids = await asyncio.get_running_loop().run_in_executor(self.pool, self._tokenise, messages)
        finally:
            self.preparing -= 1
        if len(prompt_ids) > self.max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; at most {self.max_prompt} are allowed",
                           "context_length_exceeded", "messages")
        asked = req.requested_max_tokens()
        max_new = min(asked or cfg.default_max_tokens, self.context - len(prompt_ids))
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=cfg.default_top_p if req.top_p is None else req.top_p,
            stop_strings=req.stop_strings(), seed=req.seed)
        job = Job(key=key, model=cfg.model_name, prompt_ids=prompt_ids, params=params, stream=req.stream,
                  include_usage=bool(req.stream_options and req.stream_options.include_usage),
                  in_think=self.tok.reasoning.opens_think,
                  reserved_tokens=len(prompt_ids) + max_new, hold=hold,
                  max_cost=self._cost(len(prompt_ids), max_new))
        if key is not None:
            try:
                # the balance as of now: requests that ended while this one was tokenised are billed in it
                fresh = self.store.get(key.id) or key
            except sqlite3.Error as e:
                raise self._db_unavailable(e) from None
            try:
                self.limits.reserve(hold, key.rpm, key.tpm, job.reserved_tokens, job.max_cost, fresh.remaining)
            except Refused as r:
                raise ApiError.refused(r) from None
        return job

    def _tokenise(self, messages: list[dict]) -> list[int]:
        """In a pool thread: the prompt's token ids, or the ApiError that refuses it."""
        try:
            return self.tok.encode_chat(messages, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # a real checkpoint's template may refuse an order of roles
            raise ApiError(400, f"the chat template refused these messages: {e}", "invalid_request",
                           "messages") from None
        except (ValueError, TypeError) as e:  # no template at all, or one this server cannot render
            log.error("the chat template cannot be rendered: %s", e)
            raise ApiError(500, f"this checkpoint's chat template cannot be used: {e}",
                           "chat_template_error") from None

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.cfg.price_prompt + completion_tokens * self.cfg.price_completion) / 1e6

    def admit(self, job: Job) -> asyncio.Future:
        """A place in the gate (503). Returns the gate ticket."""
        try:
            return self.gate.join()
        except QueueFull:
            raise ApiError(503, "server overloaded: the queue is full", "overloaded",
                           retry_after=self.cfg.overload_retry_after) from None

    # --- generation ------------------------------------------------------------------------------
    def start(self, job: Job, ticket: asyncio.Future) -> asyncio.Task:
        """The task generating `job` (`run`); from here on it owns the ticket and the key's hold.
        When the gate has let the job in already, its request goes to the scheduler here and now,
        not when the task first runs: on a loaded event loop that is one loop iteration later
        (measured at 32 streaming clients: ~10 ms of the time to first token)."""
        early = None
        if ticket.done():  # a fresh ticket is done only when the gate let the job in
            try:
                early = self.scheduler.submit(job.prompt_ids, job.params)
            except Exception:
                pass  # full or not running: `run` tries again and answers 503
        job.owned = True
        task = asyncio.create_task(self.run(job, ticket, early))

        def never_ran(t: asyncio.Task) -> None:
            # cancelled before its first step, `run`'s finally never ran: release what it owned
            if not job.running:
                self.gate.leave(ticket)
                if early is None:
                    self._settle_hold(job, 0)
                else:
                    early.cancel()
                    booking = asyncio.get_running_loop().create_task(self._book_when_ended(job, early, 0, 0))
                    self.unsettled.add(booking)
                    booking.add_done_callback(self.unsettled.discard)

        task.add_done_callback(never_ran)
        return task

    async def run(self, job: Job, ticket: asyncio.Future, request: EngineRequest | None = None) -> None:
        """Wait for a slot, generate, split, record. Never raises: the outcome is in `job`.
        `request`: the job's scheduler request when `start` could submit it already."""
        job.running = True
        splitter = ReasoningSplitter(job.params.stop_strings, in_think=job.in_think, fmt=self.tok.reasoning)
        decoder = IncrementalDecoder(self.tok.decode_reply)
        n, last, booked, consumed = 0, None, False, 0
        try:
            if request is None:
                if not await self.gate.wait(ticket, self.cfg.queue_timeout):
                    raise ApiError(503, f"server overloaded: no slot within {self.cfg.queue_timeout:g} s",
                                   "queue_timeout", retry_after=self.cfg.overload_retry_after)
                try:
                    request = self.scheduler.submit(job.prompt_ids, job.params)
                except Exception as e:  # full, or the engine is not running (being restarted)
                    if not isinstance(e, SchedulerFull):
                        log.warning("submission failed for %s: %s", job.id, e)
                    raise ApiError(503, "server overloaded", "overloaded",
                                   retry_after=self.cfg.overload_retry_after) from None
            async for tokens in request.batches():  # several tokens when this loop fell behind the engine
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.observe(now - job.arrived)
                    gaps = [0.0] * (len(tokens) - 1)
                else:
                    gaps = [(now - last) / len(tokens)] * len(tokens)
                for gap in gaps:
                    self.metrics.itl.observe(gap)
                last = now
                pieces = []
                for token in tokens:
                    n += 1
                    pieces += splitter.feed(decoder.add(token))
                    if splitter.stopped:  # a stop string: the rest would be cut anyway
                        break
                self._push(job, pieces)
                if splitter.stopped:
                    break
            failed = request.finish_reason == "error" and not splitter.stopped  # the engine failed (logged there)
            if failed and n == 0 and not request.started:  # it died before it saw the prompt: nothing to bill
                booked = True
                raise ApiError(503, "the engine failed before it started this request; nothing was billed",
                               "engine_error", retry_after=self.cfg.overload_retry_after)
            self._push(job, splitter.finish())
            job.thought = splitter.saw_think
            job.finish_reason = "stop" if splitter.stopped else (request.finish_reason or "stop")
            booked, consumed = True, len(job.prompt_ids) + n
            job.usage = self._record(job, n, splitter.reasoning_tokens)
            if failed:
                raise ApiError(503, "the engine failed during generation; what it generated is billed",
                               "engine_error", retry_after=self.cfg.overload_retry_after, usage=job.usage,
                               request_id=job.id)
            job.events.put_nowait(("done", None))
        except ApiError as e:
            self._fail(job, e)
        except sqlite3.Error as e:  # the ledger is locked or the disk is full: nothing was billed
            self._fail(job, self._db_unavailable(e))
        except Exception:  # not CancelledError (a BaseException): a disconnect is handled in finally
            log.exception("generation failed for %s", job.id)
            self._fail(job, ApiError(503, "generation failed", "internal_error",
                                     retry_after=self.cfg.overload_retry_after))
        finally:
            self.gate.leave(ticket)
            if request is not None:
                request.cancel()  # no-op once finished; frees the row when the client went away
            if booked or request is None:
                self._settle_hold(job, consumed)
            elif request.finish_reason is not None:  # ended: the engine said whether it saw the prompt
                self._book_cancelled(job, request, n, splitter.reasoning_tokens)
            else:  # the engine has not said yet whether it prefilled the prompt: wait for its end
                task = asyncio.get_running_loop().create_task(
                    self._book_when_ended(job, request, n, splitter.reasoning_tokens))
                self.unsettled.add(task)
                task.add_done_callback(self.unsettled.discard)

    async def _book_when_ended(self, job: Job, request: EngineRequest, n: int, reasoning: int) -> None:
        try:
            async with asyncio.timeout(60):
                async for _ in request.batches():
                    pass
        except (TimeoutError, RuntimeError):
            pass  # an engine that never answers: bill by what it told so far
        finally:
            self._book_cancelled(job, request, n, reasoning)

    def _book_cancelled(self, job: Job, request: EngineRequest, n: int, reasoning: int) -> None:
        """A request that ended early (the client left, or an error before the model answered): one
        ledger row if the model saw its prompt, billing the prompt and the tokens sent."""
        ran = n > 0 or request.started
        try:
            if ran:
                reason = "error" if request.finish_reason == "error" or job.error is not None else "cancelled"
                job.usage = self._record(job, n, reasoning, finish_reason=reason)
        except sqlite3.Error as e:
            log.error("could not record the usage of %s: %s", job.id, e)
        finally:
            self._settle_hold(job, len(job.prompt_ids) + n if ran else 0)

    def _settle_hold(self, job: Job, used_tokens: int) -> None:
        if job.hold is not None:
            job.hold.settle(used_tokens)

    def _push(self, job: Job, pieces: list[tuple[str, str]]) -> None:
        for fld, text in pieces:
            (job.reasoning if fld == "reasoning_content" else job.content).append(text)
            job.events.put_nowait(("piece", (fld, text)))

    def _fail(self, job: Job, e: ApiError) -> None:
        job.error = e
        job.events.put_nowait(("error", e))

    def _record(self, job: Job, n: int, reasoning: int, finish_reason: str | None = None) -> Usage:
        """Write the job's one ledger row (raises sqlite3.Error when it cannot)."""
        p = len(job.prompt_ids)
        usage = Usage(prompt_tokens=p, completion_tokens=n, reasoning_tokens=reasoning, cost=self._cost(p, n))
        now = time.time()
        self.store.record(job.key.id if job.key else None, job.id, job.model, usage,
                          finish_reason or job.finish_reason, started_at=now - (time.perf_counter() - job.arrived),
                          finished_at=now)
        for kind, count in (("prompt", p), ("completion", n), ("reasoning", reasoning)):
            self.metrics.tokens.labels(kind).inc(count)
        return usage

    # --- responses -------------------------------------------------------------------------------
    async def complete(self, job: Job, ticket: asyncio.Future, request: Request) -> Response:
        """Non-streaming: wait for the whole answer, or cancel it when the client disconnects."""
        task = self.start(job, ticket)
        gone = asyncio.create_task(_disconnected(request.receive))
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)  # nobody is listening
        if job.error is not None:
            raise job.error
        message = {"role": "assistant", "content": "".join(job.content),
                   "reasoning_content": "".join(job.reasoning) if job.thought else None}
        return JSONResponse({
            "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": job.usage.as_openai(),
        })

    async def stream(self, job: Job, task: asyncio.Task):
        """Server-sent events: role, reasoning deltas, content deltas, finish, [usage], [DONE], as
        (text, last) pairs: the last one goes out with the end of the body in one write. Events that
        piled up while the client was being written to go out in one write."""
        try:
            yield self._chunk(job, {"role": "assistant", "content": ""}), False
            while True:
                try:
                    async with asyncio.timeout(self.cfg.keepalive_interval):  # cheaper than wait_for per token
                        events = [await job.events.get()]
                except TimeoutError:
                    yield ": keep-alive\n\n", False  # queued or slow: keeps proxies and clients from timing out
                    continue
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                out, finished = [], False
                for kind, payload in _merge_pieces(events):
                    if kind == "piece":
                        out.append(self._chunk(job, {payload[0]: payload[1]}))
                    elif kind == "error":
                        if payload.usage is not None:  # failed mid-answer: the usage it is billed goes out too
                            out.append(self._final(job, done=False, usage=True))
                        out.append(f"data: {json.dumps(payload.body())}\n\n")  # headers are gone: report in-band
                        finished = True
                    else:
                        out.append(self._final(job))
                        finished = True
                yield "".join(out), finished
                if finished:
                    return
        finally:
            task.cancel()  # the client went away (or we are done): stop generating

    def _final(self, job: Job, done: bool = True, usage: bool = False) -> str:
        out = self._chunk(job, {}, finish_reason=job.finish_reason)
        if job.include_usage or usage:
            out += _sse({"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                         "choices": [], "usage": job.usage.as_openai()})
        return out + "data: [DONE]\n\n" if done else out

    def _chunk(self, job: Job, delta: dict, finish_reason: str | None = None) -> str:
        chunk = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if job.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def balance(self, key: Key | None) -> dict:
        remaining = 0.0 if key is None else max(0.0, key.remaining)
        amount = f"{remaining:.2f}"
        return {"is_available": key is None or key.remaining > 0,
                "balance_infos": [{"currency": "USD", "total_balance": amount, "granted_balance": "0.00",
                                   "topped_up_balance": amount}]}


def _merge_pieces(events: list) -> list:
    """Adjacent text pieces of the same field become one delta: when a client falls behind, it gets
    fewer, longer chunks instead of a backlog of one-token events (the text is the same)."""
    out = []
    for kind, payload in events:
        if kind == "piece" and out and out[-1][0] == "piece" and out[-1][1][0] == payload[0]:
            out[-1] = ("piece", (payload[0], out[-1][1][1] + payload[1]))
        else:
            out.append((kind, payload))
    return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(receive) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refusing more than `limit` without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", "request_too_large")
    return bytes(body)


# --- the app -----------------------------------------------------------------------------------

class App(FastAPI):
    """FastAPI, with `chat` (an ASGI app) answering the chat-completion paths ahead of FastAPI's own
    middleware stack. An added middleware sits inside FastAPI's error, telemetry and body-limit layers
    (FastAPI 0.165), so each streamed chunk went through their `send` wrappers as well."""

    chat = None
    hosts: frozenset | None = None
    """With --no-auth: the `Host` names this server answers (others: 421, against DNS rebinding)."""

    async def __call__(self, scope, receive, send):
        if self.hosts is not None and scope["type"] == "http" and _host(scope) not in self.hosts:
            return await ApiError(421, "unknown Host header: this server answers only loopback names",
                                  "invalid_host").response()(scope, receive, send)
        if self.chat is not None and scope["type"] == "http" and scope["path"] in ChatRoute.PATHS:
            scope["app"] = self
            return await self.chat(scope, receive, send)
        return await super().__call__(scope, receive, send)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _host(scope) -> str:
    """The request's Host header without its port ("" when there is none)."""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):   # [::1]:8000
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(cfg: ServeConfig, model=None, tokenizer=None) -> FastAPI:
    """The app serving `cfg.checkpoint` (or the given model and tokenizer)."""
    from_checkpoint = model is None
    if from_checkpoint:
        from ..checkpoint import load_checkpoint

        # with an engine process, the server only needs the tokenizer and the config: it loads the
        # weights on the CPU once, to fail early on a bad checkpoint, and the child loads its own copy
        model, tokenizer = load_checkpoint(Path(cfg.checkpoint), device="cpu" if cfg.engine_process else cfg.device)
    svc = Service(cfg, Engine(model, tokenizer), from_checkpoint)
    app = App(title="qiusuo", lifespan=svc.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    if cfg.no_auth:
        app.hosts = frozenset({*LOOPBACK_NAMES, cfg.host.lower()})
    install_error_handlers(app)
    app.chat = CountRequests(ChatRoute(svc), svc.metrics)
    app.add_middleware(CountRequests, metrics=svc.metrics)
    page = resources.files(__package__).joinpath("static/index.html").read_text()

    async def models(request: Request):
        svc.authenticate(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "qiusuo"}]}

    async def balance(request: Request):
        return svc.balance(svc.authenticate(request))

    # Every route is `async def`: FastAPI would run plain functions in a thread pool, a needless hop.
    async def health():
        body = {"status": "ok", "model": cfg.model_name, "running": svc.scheduler.running,
                "queue_depth": svc.gate.waiting + svc.scheduler.queue_depth}
        if svc.scheduler.error is not None:  # the engine failed (an engine process is being replaced)
            return JSONResponse({**body, "status": "error", "error": str(svc.scheduler.error)}, status_code=503)
        return body

    async def metrics():
        return svc.metrics.render()

    async def chat_page():
        return HTMLResponse(page)

    for prefix in ("/v1", ""):       # chat completions: `ChatRoute`
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
    app.add_api_route("/user/balance", balance, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/", chat_page, methods=["GET"])
    return app


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    if cfg.no_auth and not is_loopback(cfg.host):
        raise ValueError(f"--no-auth serves without keys, so it listens on loopback only, not {cfg.host!r}: "
                         "use --host 127.0.0.1, or create keys with `qiusuo keys create`")
    app = create_app(cfg)
    auth = "WITHOUT authentication (--no-auth)" if cfg.no_auth else f"keys from {cfg.db}"
    print(f"serving {cfg.checkpoint} as {cfg.model_name!r} on http://{cfg.host}:{cfg.port} — {auth}")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
