"""Token-in / token-out generation engine: one engine for GRPO rollouts, evaluation, chat and serving.

- `DecodeBatch`: rows decoding together over one preallocated KV cache. Prompts are prefilled once,
  right-padded from position 0; with `n > 1` the prefilled cache is fanned out to the n samples of
  each prompt (GRPO's group), so a prompt is never recomputed. Each step samples one token per row
  and feeds it back; finished rows are dropped from the batch (the cache is compacted in bursts) so
  they stop costing compute; new rows can join between steps.
- Sampling: temperature, top-k, top-p, per row; every row draws from its own counter-based random
  stream, so a row's tokens depend on its seed only — the same seed gives the same tokens alone or in
  any batch.
- Rows stop on eos / stop token ids / stop strings / `max_new_tokens` / the context limit.
- `Engine.generate` (static batches: rollouts, evaluation), `Engine.stream` (one prompt, chat) and
  `Scheduler` (continuous batching for the server) all run on `DecodeBatch`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from . import native
from .model import DecodeWeights, KVCache, Transformer


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. R1's evaluation defaults are temperature 0.6, top-p 0.95."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    stop_token_ids: tuple[int, ...] = ()
    """Ids that end a row (besides the engine's eos ids); the stop token is kept in `token_ids`."""
    stop_strings: tuple[str, ...] = ()
    """Texts that end a row; `text` is cut before the stop string."""
    seed: int | None = None
    """Base seed; row r of a call uses seed + r (None: nondeterministic)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if self.temperature < 0:
            raise ValueError("temperature must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0")


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, including the stop token when a stop token ended the row."""
    finish_reason: str = "length"
    """"stop" (stop token or string) or "length" (max_new_tokens or the context limit)."""
    text: str | None = None
    """Decoded text without the stop token / stop string (set when the engine has a tokenizer)."""


def _wrap(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _wrap(0x9E3779B97F4A7C15), _wrap(0xBF58476D1CE4E5B9), _wrap(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): splitmix64 of (row key, draw index), computed for the whole
    batch in a few tensor ops. A row's stream depends only on its own key and how many tokens it has
    drawn — never on the batch around it — and no per-row generator object is stepped in Python."""
    z = keys + counters * _GOLDEN          # int64 arithmetic wraps modulo 2^64, as splitmix64 expects
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() / float(1 << 53)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each row whose cumulative mass exceeds u · total."""
    cum = probs.cumsum(-1)
    pick = torch.searchsorted(cum, (u.to(cum.dtype) * cum[:, -1])[:, None])
    return pick.clamp_max(probs.shape[-1] - 1).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                u: torch.Tensor) -> torch.Tensor:
    """One token per row from `logits` [B, V] with per-row temperature / top-p / top-k [B] and one
    uniform draw per row `u` [B] (inverse-CDF sampling) → ids [B].

    A row without a top-p / top-k cut samples in vocabulary order and skips the sort; a row with one
    samples in descending-probability order. Which order a row uses depends on its own settings
    only, so a row draws the same token whatever batch it is in."""
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    logits = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    cut = (top_p < 1) | (top_k > 0)
    any_cut, all_cut = bool(cut.any()), bool(cut.all())
    token = None
    if not all_cut:
        token = _inverse_cdf(logits.softmax(-1), u)
    if any_cut:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        outside_k = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
        probs = sorted_logits.masked_fill(outside_k, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
        truncated = order.gather(-1, _inverse_cdf(probs, u)[:, None]).squeeze(-1)
        token = truncated if token is None else torch.where(cut, truncated, token)
    if bool(greedy.any()):
        token = torch.where(greedy, logits.argmax(-1), token)
    return token


def _key(seed: int | None) -> int:
    """A row's 64-bit sampling key: from its seed, or fresh entropy when it has none."""
    if seed is None:
        return _wrap(int.from_bytes(os.urandom(8), "little"))
    return _wrap((seed * 0x2545F4914F6CDD1D + 0x632BE59BD9B4E019) % (1 << 64))


def _find_stop_string(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


@dataclass
class Row:
    """One sequence being decoded. `owner` is whatever the caller uses to route its tokens."""

    owner: object
    params: SamplingParams
    stops: frozenset
    key: int                        # sampling stream of this row (see `uniform`)
    limit: int                      # last position this row may reach (context or max_new_tokens)
    pos: int = 0                    # position of the next token fed to the model
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    def reports(self, token: int, finished: bool) -> bool:
        """Whether a sampled token belongs to the output: the stop token that ended the row, and the
        token drawn after a cancel, do not."""
        return not (finished and self.finish_reason in ("stop", "cancelled")
                    and (token in self.stops or self.cancelled))


class DecodeBatch:
    """Rows that decode together over one KV cache; rows join (`admit`) and leave between steps."""

    def __init__(self, engine: "Engine", max_len: int):
        self.engine, self.model, self.max_len = engine, engine.model, max_len
        self.fast = DecodeWeights(engine.model, max_len)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None   # next-token logits of every row [B, V]
        self.row_tensors: dict[str, torch.Tensor] = {}
        self.alive: list[bool] = []

    def __len__(self) -> int:
        return sum(self.alive)

    def cached_tokens(self) -> int:
        """Cache positions reserved by the rows (their prompt plus what they may still generate)."""
        return sum(r.limit + 1 for r, a in zip(self.rows, self.alive) if a)

    @torch.no_grad()
    def admit(self, prompts: list[list[int]], rows: list[Row], n: int = 1) -> None:
        """Prefill `prompts` once and add n rows per prompt (rows[i * n + j] is sample j of prompt i)."""
        device = self.engine.device
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lengths) >= self.max_len:
            raise ValueError(f"prompt of {max(lengths)} tokens leaves no room in a context of {self.max_len}")
        ids = torch.full((len(prompts), max(lengths)), self.engine.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        cache = self.model.new_cache(len(prompts), self.max_len)
        hidden = self.model.hidden(ids.to(device), cache=cache)
        last = hidden[torch.arange(len(prompts)), torch.tensor(lengths) - 1]
        logits = self.model.lm_head(last)                         # [P, V]
        if n > 1:
            fan = torch.arange(len(prompts), device=device).repeat_interleave(n)
            cache, logits = cache.select(fan, upto=max(lengths)), logits[fan]
        for i, row in enumerate(rows):
            row.pos = lengths[i // n]
            row.limit = min(self.max_len - 1, row.pos + row.params.max_new_tokens - 1)
        self._compact(force=True)
        new = self._tensors(rows, device)
        if self.cache is None:
            self.cache, self.logits, self.row_tensors = cache, logits, new
        else:
            self.cache = KVCache.concat(self.cache, cache)
            self.logits = torch.cat([self.logits, logits])
            self.row_tensors = {k: torch.cat([v, new[k]]) for k, v in self.row_tensors.items()}
        self.rows += rows
        self.alive += [True] * len(rows)

    @staticmethod
    def _tensors(rows: list[Row], device) -> dict[str, torch.Tensor]:
        """Per-row sampling settings as tensors, built once per admission rather than every step."""
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return {"temperature": column([r.params.temperature for r in rows], torch.float32),
                "top_p": column([r.params.top_p for r in rows], torch.float32),
                "top_k": column([r.params.top_k for r in rows], torch.long),
                "key": column([r.key for r in rows], torch.long),
                "drawn": column([len(r.generated) for r in rows], torch.long)}

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int, bool]]:
        """Sample one token for every live row and feed it back; return (row, token, finished) triples."""
        if not any(self.alive):
            return []
        rows = self.rows
        t = self.row_tensors
        if self.fast.native is not None:  # the C kernel is in use: sample there too, in one call
            tokens = native.sample(self.fast.native[0], self.logits, t["temperature"], t["top_p"], t["top_k"],
                                   t["key"], t["drawn"]).tolist()
        else:
            u = uniform(t["key"], t["drawn"])
            tokens = sample_next(self.logits, t["temperature"], t["top_p"], t["top_k"], u).tolist()
        t["drawn"] += 1
        events = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if not self.alive[i]:
                continue
            row.generated.append(token)
            if row.cancelled:
                row.finish_reason = "cancelled"
            elif token in row.stops or self._hit_stop_string(row):
                row.finish_reason = "stop"
            elif row.pos >= row.limit:
                row.finish_reason = "length"
            if row.finish_reason:
                self.alive[i] = False
            events.append((row, token, row.finish_reason is not None))
        self._compact()
        if self.rows:
            # Finished rows still in the batch are fed in place (their position stays put, so they
            # never write past the cache); what they produce is never reported.
            feed = torch.tensor([r.generated[-1] for r in self.rows], device=self.engine.device)
            pos = torch.tensor([r.pos for r in self.rows], device=self.engine.device)
            self.logits = self.fast.step(feed, pos, self.cache)
            for r, alive in zip(self.rows, self.alive):
                r.pos += alive
        return events

    def _hit_stop_string(self, row: Row) -> bool:
        if not row.params.stop_strings or self.engine.tokenizer is None:
            return False
        tail = self.engine.tokenizer.decode(row.generated[-64:])
        return _find_stop_string(tail, row.params.stop_strings) is not None

    def _compact(self, force: bool = False) -> None:
        """Drop finished rows once they are a quarter of the batch (or all of it, or when `force`d
        by an admission, which copies the cache anyway). Done in bursts, not on every finish,
        because each compaction copies the cache; until then finished rows decode junk that is
        never reported."""
        n_alive = sum(self.alive)
        if n_alive == len(self.rows) or (not force and n_alive > 0.75 * len(self.rows)):
            return
        keep = [i for i, a in enumerate(self.alive) if a]
        if not keep:
            self.rows, self.alive, self.cache, self.logits, self.row_tensors = [], [], None, None, {}
            return
        idx = torch.tensor(keep, device=self.engine.device)
        upto = max(self.rows[i].pos for i in keep)
        self.cache, self.logits = self.cache.select(idx, upto=upto), self.logits[idx]
        self.row_tensors = {k: v[idx] for k, v in self.row_tensors.items()}
        self.rows = [self.rows[i] for i in keep]
        self.alive = [True] * len(keep)


class Engine:
    """Sampling from a `Transformer`. `tokenizer` (optional) decodes texts and stop strings."""

    def __init__(self, model: Transformer, tokenizer=None, eos_ids: Sequence[int] = (), max_batch: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        ids = set(eos_ids)
        if tokenizer is not None:
            ids.update(tokenizer.stop_ids)
        self.eos_ids = tuple(sorted(ids))
        self.max_batch = max_batch
        self.pad_id = tokenizer.pad_id if tokenizer is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def new_row(self, owner, params: SamplingParams, seed: int | None) -> Row:
        return Row(owner=owner, params=params, stops=frozenset(self.eos_ids) | frozenset(params.stop_token_ids),
                   key=_key(seed), limit=0)

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[Completion]:
        """n completions for every prompt, prompt-major: result[i * n + j] is sample j of prompt i."""
        if not prompts:
            raise ValueError("no prompts")
        out: list[Completion] = []
        per_chunk = max(1, self.max_batch // n)
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start:start + per_chunk]
            done = [Completion(prompt_index=start + i // n) for i in range(len(chunk) * n)]
            rows = [self.new_row(c, params, None if params.seed is None else params.seed + start * n + i)
                    for i, c in enumerate(done)]
            batch = DecodeBatch(self, self._context(chunk, params))
            batch.admit(chunk, rows, n)
            while len(batch):
                batch.step()
            for row in rows:
                self._finish(row.owner, row)
            out += done
        return out

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield the ids of one completion as they are generated (stop token excluded)."""
        row = self.new_row(None, params, params.seed)
        batch = DecodeBatch(self, self._context([prompt], params))
        batch.admit([prompt], [row])
        while len(batch):
            for r, token, finished in batch.step():
                if r.reports(token, finished):
                    yield token

    def _context(self, prompts, params: SamplingParams) -> int:
        return min(self.model.config.max_position_embeddings, max(len(p) for p in prompts) + params.max_new_tokens)

    def _finish(self, c: Completion, row: Row) -> None:
        c.token_ids = row.generated
        hit_stop_token = bool(row.generated) and row.finish_reason == "stop" and row.generated[-1] in row.stops
        c.finish_reason = "stop" if row.finish_reason == "stop" else "length"
        if self.tokenizer is not None:
            c.text = self.tokenizer.decode(row.generated[:-1] if hit_stop_token else row.generated)
            cut = _find_stop_string(c.text, row.params.stop_strings)
            if cut is not None:
                c.text = c.text[:cut]


# --- continuous batching ----------------------------------------------------------------------------

class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at capacity."""


_DONE = object()


class Request:
    """A submitted generation: iterate it (blocking or `async for`) to receive token ids as they come."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None):
        self.prompt_ids, self.params = prompt_ids, params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.started = False
        self.row: Row | None = None
        self._loop = loop
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating at the next step (or never start, if still waiting)."""
        self._cancelled.set()
        if self.row is not None:
            self.row.cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item) -> None:
        if self._async is not None:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        else:
            self._sync.put(item)

    def _deliver(self, token: int | None, finish_reason: str | None) -> None:
        """Called from the scheduler thread."""
        if token is not None:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.output_ids.append(token)
            self._put(token)
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.finished_at = time.perf_counter()
            self._put(_DONE)

    def __iter__(self) -> Iterator[int]:
        if self._async is not None:
            raise RuntimeError("this request was submitted from an event loop: use `async for`")
        while (item := self._sync.get()) is not _DONE:
            yield item

    async def __aiter__(self):
        if self._async is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate it normally")
        while (item := await self._async.get()) is not _DONE:
            yield item


class Scheduler:
    """Continuous batching: a background thread admits waiting requests into the running batch
    between decode steps and retires finished ones, within a cap on running sequences and on
    reserved KV-cache positions. Each request gets the same tokens alone or among others (its own
    seed and random stream), so batching changes throughput, never results."""

    def __init__(self, engine: Engine, max_running: int = 64, max_queue: int = 256, max_cache_tokens: int = 1 << 16,
                 max_len: int | None = None):
        self.engine = engine
        self.max_running, self.max_queue, self.max_cache_tokens = max_running, max_queue, max_cache_tokens
        self.max_len = max_len or engine.model.config.max_position_embeddings
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self._batch = DecodeBatch(engine, self.max_len)
        self._thread: threading.Thread | None = None
        self._stop = False
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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a context of {self.max_len}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        req = Request(prompt_ids, params, loop)
        if self.error is not None:
            raise RuntimeError(f"the scheduler stopped after an error: {self.error!r}")
        with self._lock:
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
            with self._lock:
                waiting, self._waiting = self._waiting, []
            for req in waiting + [row.owner for row in self._batch.rows]:
                if req.finish_reason is None:
                    req._deliver(None, "error")
            logging.getLogger(__name__).exception("scheduler stopped")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not len(self._batch):
                    self._lock.wait()
                if self._stop:
                    break
                admit = self._take_admissible()
            if admit:
                self._admit(admit)
            for row, token, finished in self._batch.step():
                req: Request = row.owner
                req._deliver(token if row.reports(token, finished) else None, row.finish_reason if finished else None)
            self.steps += 1
        for req in self._waiting:
            req._deliver(None, "cancelled")
        for row in self._batch.rows:
            row.owner._deliver(None, "cancelled")

    def _take_admissible(self) -> list[Request]:
        """Waiting requests that fit the running-sequence and cache budgets, oldest first."""
        admit, reserved = [], self._batch.cached_tokens()
        running = len(self._batch)
        for req in list(self._waiting):
            if req.cancelled:
                self._waiting.remove(req)
                req._deliver(None, "cancelled")
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
            req.row.cancelled = req.cancelled
            req.started = True
            rows.append(req.row)
        self._batch.admit([r.prompt_ids for r in reqs], rows)
