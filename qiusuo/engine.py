"""Token-in / token-out generation engine: one engine for GRPO rollouts, evaluation, chat and serving.

- `DecodeBatch`: rows decoding together over one preallocated KV cache with room to spare. Prompts
  are prefilled once from position 0; with `n > 1` the prefilled cache is copied to the n samples of
  each prompt (GRPO's group), so a prompt is never recomputed. Each step samples one token per row
  and feeds it back; a finished row leaves at once (the last running row moves into its place) so it
  stops costing compute; new rows can join between steps.
- `Decoder`: what a batch asks of the model — prefill prompts into cache rows, one step for every
  row, copy rows (a prompt's prefix to its samples; a running row into a finished one's place), sample
  — with two implementations, picked once per engine (`pick_decoder`): `NativeDecoder` (the C kernel
  of `native.py`: CPU, fp32) and `TorchDecoder` (PyTorch ops: any device, any dtype; its step runs on
  static buffers, captured as CUDA graphs on a GPU: `StepRunner`).
- Sampling: temperature, top-k, top-p, per row; every row draws from its own counter-based random
  stream, so a row's tokens depend on its seed only — the same seed gives the same tokens alone or in
  any batch.
- Rows stop on eos / stop token ids / stop strings / `max_new_tokens` / the context limit.
- `Engine.generate` (static batches: rollouts, evaluation), `Engine.stream` (one prompt, chat) and
  the server's continuous-batching `Scheduler` (`qiusuo/serve/scheduler.py`) all run on `DecodeBatch`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Protocol, Sequence

import numpy as np
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


def sampling_plan(temperature, top_p, top_k) -> tuple[bool, bool, bool, bool]:
    """(all greedy, any greedy, any top-p / top-k cut, all cut) of per-row settings — numpy arrays or
    tensors; a caller holding the settings on the host passes this to `sample_next`, which then asks
    the device nothing before its result."""
    greedy, cut = temperature == 0, (top_p < 1) | (top_k > 0)
    return bool(greedy.all()), bool(greedy.any()), bool(cut.any()), bool(cut.all())


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                u: torch.Tensor, plan: tuple[bool, bool, bool, bool] | None = None) -> torch.Tensor:
    """One token per row from `logits` [B, V] with per-row temperature / top-p / top-k [B] and one
    uniform draw per row `u` [B] (inverse-CDF sampling) → ids [B]. `plan`: `sampling_plan` of the
    settings (computed here when not given).

    A row without a top-p / top-k cut samples in vocabulary order and skips the sort; a row with one
    samples in descending-probability order. Which order a row uses depends on its own settings
    only, so a row draws the same token whatever batch it is in."""
    all_greedy, any_greedy, any_cut, all_cut = plan or sampling_plan(temperature, top_p, top_k)
    if all_greedy:
        return logits.argmax(-1)
    greedy = temperature == 0
    logits = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    cut = (top_p < 1) | (top_k > 0)
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
    if any_greedy:
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


_CANCELS = itertools.count(1)


@dataclass
class Row:
    """One sequence being decoded. `owner` is whatever the caller uses to route its tokens. Its
    position in the cache lives in its batch (`DecodeBatch.state["pos"]`), with the batch's other
    per-row numbers."""

    owner: object
    params: SamplingParams
    stops: frozenset
    key: int                        # sampling stream of this row (see `uniform`)
    limit: int                      # last position this row may reach (context or max_new_tokens)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    last_withheld: bool = False     # the token that ended the row is not output (set with finish_reason)

    cancels: ClassVar[int] = 0
    """A new value at every `cancel`, so a batch looks for cancelled rows only when it has changed."""

    def cancel(self) -> None:
        """End at the next step (any thread); the token drawn then is not reported."""
        self.cancelled = True
        # after the flag: a batch that sees the new value sees the flag. A fresh number rather than
        # += 1, so two threads cancelling at once cannot write back a value a batch has already seen.
        Row.cancels = next(_CANCELS)

    def reported(self) -> int:
        """How many of `generated` belong to the output (all but an ending stop or cancel token, as
        decided when the row ended: a cancel that comes later changes nothing)."""
        return len(self.generated) - self.last_withheld


class Decoder(Protocol):
    """The model side of a `DecodeBatch`: a KV cache with room for `capacity` rows and each row's
    next-token logits. The batch decides which rows run, join and leave; a decoder only computes.
    Rows are cache rows; a step runs rows 0..B−1, at each row's own position."""

    capacity: int

    def reserve(self, rows: int, keep: int, upto: int) -> None:
        """Room for at least `rows` rows, keeping rows [0, keep) (cache positions [0, upto), logits)."""

    def prefill(self, prompts: list[list[int]], rows: list[int]):
        """Each prompt into cache row rows[i] from position 0; return (and keep for `sample`) the
        next-token logits after each prompt [P, ≥ vocab]."""

    def step(self, tokens: np.ndarray, positions: np.ndarray):
        """Feed token b at position b of row b for rows 0..B−1; return (and keep) their next logits."""

    def copy_rows(self, src: list[int], dst: list[int], upto: int) -> None:
        """Rows src[i] → dst[i] (disjoint): cache positions [0, upto) and logits."""

    def sample(self, state: dict[str, np.ndarray], n: int) -> np.ndarray:
        """One token for each of rows 0..n−1 from their logits, with the per-row settings and random
        streams in `state` (`DecodeBatch._state`) → int64 [n]."""

    def close(self) -> None:
        """Give the cache back (the decoder is unusable after)."""


class NativeDecoder:
    """A `Decoder` on the C kernel (`native.NativeWeights`, CPU, fp32): prefill, step and sampling are
    single C calls on numpy arrays and no torch op runs in a step — in the server, every torch op
    would give up the GIL to the event loop and wait to get it back. The cache is uninitialised (the
    kernel never reads past a row's own positions) and comes from the engine's spare caches."""

    def __init__(self, engine: "Engine", max_len: int):
        self.engine, self.max_len = engine, max_len
        self.weights: native.NativeWeights = engine.decode_weights(max_len)
        self.cache: KVCache | None = None
        self.capacity = 0
        self.logits = np.zeros((0, self.weights.vocab_padded), dtype=np.float32)   # [capacity, vocab padded]
        self._sampler = native.Sampler(self.weights.lib, self.weights.vocab)

    @staticmethod
    def pack(engine: "Engine", max_len: int) -> native.NativeWeights:
        return native.NativeWeights(engine.model, max_len)

    def reserve(self, rows: int, keep: int, upto: int) -> None:
        if rows <= self.capacity:
            return
        grown = self.engine._cache(max(rows, 2 * self.capacity), self.max_len, zeroed=False)
        logits = np.zeros((grown.batch, self.weights.vocab_padded), dtype=np.float32)
        if keep:
            grown.kv[:, :, :keep, :, :upto] = self.cache.kv[:, :, :keep, :, :upto]
            logits[:keep] = self.logits[:keep]
        self.engine._give_back(self.cache)
        self.cache, self.logits, self.capacity = grown, logits, grown.batch

    def prefill(self, prompts: list[list[int]], rows: list[int]) -> np.ndarray:
        logits = self.weights.prefill(prompts, rows, self.cache)
        self.logits[rows] = logits
        return logits[:, :self.weights.vocab]

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.weights.kernel(tokens, positions, self.cache, self.logits)
        return self.logits[:len(tokens), :self.weights.vocab]

    def copy_rows(self, src: list[int], dst: list[int], upto: int) -> None:
        native.copy_rows(self.weights.lib, self.cache, src, dst, upto)
        self.logits[dst] = self.logits[src]

    def sample(self, state: dict[str, np.ndarray], n: int) -> np.ndarray:
        return self._sampler(self.logits, state, n)

    def close(self) -> None:
        self.engine._give_back(self.cache)
        self.cache, self.capacity = None, 0


def _bucket(n: int) -> int:
    """The power of two at or above n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


class StepRunner:
    """The `TorchDecoder`'s decode step over static buffers, so that it can be captured as CUDA graphs
    and replayed: a step of a 0.5 B model is ~300 small kernels, whose launches from Python cost more
    than their arithmetic at small batches.

    The KV cache (zeroed once, `capacity` rows, a power of two) and the step's inputs (a token and a
    position per row) live at fixed addresses for the runner's life, and a runner outlives its batch:
    the engine keeps the last one for the next batch (`Engine._take_runner`). A step of B rows runs
    as `_bucket(B)` rows — the rows past B are idle cache rows, fed token 0 at position 0, harmless
    since a row's cache is rewritten from position 0 before it is used again — over `span` keys
    rounded up to a power of two (at least `MIN_SPAN`, at most the cache length): a few shapes cover
    every step. Keys a row has not written are masked, never skipped; what a cache holds past a row's
    position is zeros or an earlier row's finite values, so the mask's zero weights keep it out.

    With `graphs` (CUDA) each shape is captured once into one memory pool and replayed; the graphs
    read the runner's own copy of the weights (`DecodeWeights.clone`), refreshed in place when the
    engine's packed weights change (`copy_`), so a GRPO step's new weights cost a copy, not a new
    capture. Without, the same step runs eagerly on the same buffers — what the CPU runs and tests."""

    MIN_SPAN = 64
    """Fewest keys a step attends over (shorter spans are rounded up to it)."""

    def __init__(self, engine: "Engine", rows: int, max_len: int, graphs: bool):
        cfg, device = engine.model.config, engine.device
        self.cache = KVCache(cfg, _bucket(rows), max_len, device, engine.dtype)
        self.tokens = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple] | None = {} if graphs else None   # (rows, span) → (graph, logits)
        self._weights: DecodeWeights | None = None    # what the graphs read (a copy of `_source`)
        self._source = None                           # weakref to the packed weights copied last
        self._pool = None

    @property
    def capacity(self) -> int:
        return self.cache.batch

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def shape(self, B: int, span: int) -> tuple[int, int]:
        """(rows, keys) a step of B rows attending over `span` keys runs as."""
        return _bucket(B), min(self.max_len, max(self.MIN_SPAN, _bucket(span)))

    @torch.no_grad()
    def step(self, weights: DecodeWeights, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """`DecodeWeights.step` for rows 0..B−1 of the runner's cache → logits [B, V] (in a buffer the
        next step overwrites)."""
        B = len(tokens)
        rows, span = self.shape(B, int(positions.max()) + 1)   # from the host's copy: no wait on the device
        host = np.zeros((2, rows), dtype=np.int64)
        host[0, :B], host[1, :B] = tokens, positions
        host = torch.from_numpy(host)
        self.tokens[:rows].copy_(host[0], non_blocking=True)
        self.positions[:rows].copy_(host[1], non_blocking=True)
        if self.graphs is None:
            return weights.step(self.tokens[:rows], self.positions[:rows], self.cache, span)[:B]
        self._hold(weights)
        captured = self.graphs.get((rows, span)) or self._capture(rows, span)
        captured[0].replay()
        return captured[1][:B]

    def _hold(self, weights: DecodeWeights) -> None:
        """Make the graphs' copy of the weights equal `weights` (a copy in place; a new copy, and new
        graphs, only when the shapes differ)."""
        if self._source is not None and self._source() is weights:
            return
        if self._weights is None or not self._weights.fits(weights):
            self.graphs.clear()
            self._weights = None    # the old copy goes before the new one is made
            self._weights = weights.clone()
        else:
            self._weights.copy_(weights)
        self._source = weakref.ref(weights)

    def _capture(self, rows: int, span: int) -> tuple:
        """Capture the step of `rows` rows over `span` keys (after one warm-up run on a side stream, as
        CUDA graphs need; it writes the cache entries the replay writes next, with the same values)."""
        run = lambda: self._weights.step(self.tokens[:rows], self.positions[:rows], self.cache, span)
        side = torch.cuda.Stream(device=self.cache.kv.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server captures on its scheduler thread while others may touch CUDA
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = run()
        self._pool = graph.pool()
        self.graphs[(rows, span)] = (graph, logits)
        return graph, logits


class TorchDecoder:
    """A `Decoder` in PyTorch on the model's device, in the engine's dtype: prefill is
    `Transformer.hidden` with a cache (SDPA, causal; under autocast when the engine's dtype is not
    the model's), the step is `DecodeWeights.step` through a `StepRunner` (static buffers, CUDA graphs
    when the engine has them), sampling `sample_next`. The cache is the runner's; the logits are a
    preallocated fp32 buffer [capacity, V] on the device."""

    def __init__(self, engine: "Engine", max_len: int):
        self.engine, self.model, self.max_len = engine, engine.model, max_len
        self.device = engine.device
        self.weights: DecodeWeights = engine.decode_weights(max_len)
        self.runner: StepRunner | None = None
        self.cache: KVCache | None = None
        self.capacity = 0
        self.logits = torch.zeros(0, self.model.config.vocab_size, device=self.device)

    @staticmethod
    def pack(engine: "Engine", max_len: int) -> DecodeWeights:
        return DecodeWeights(engine.model, max_len, engine.dtype)

    def reserve(self, rows: int, keep: int, upto: int) -> None:
        if rows <= self.capacity:
            return
        grown = self.engine._take_runner(max(rows, 2 * self.capacity), self.max_len)
        logits = self.logits.new_zeros(grown.capacity, self.logits.shape[1])
        if keep:
            grown.cache.kv[:, :, :keep, :, :upto] = self.cache.kv[:, :, :keep, :, :upto]
            logits[:keep] = self.logits[:keep]
        self.runner, self.cache, self.logits, self.capacity = grown, grown.cache, logits, grown.capacity

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], rows: list[int]) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(prompts), width), self.engine.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        scratch = KVCache(self.model.config, len(prompts), width, self.device, self.engine.dtype)
        with self.engine.autocast():
            hidden = self.model.hidden(ids.to(self.device), cache=scratch)
            last = hidden[torch.arange(len(prompts)), torch.tensor(lengths) - 1]
            rows_t = torch.tensor(rows, device=self.device)
            self.cache.kv[:, :, rows_t, :, :width] = scratch.kv
            self.logits[rows_t] = self.model.lm_head(last).float()
        return self.logits[rows_t]

    @torch.no_grad()
    def step(self, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        B = len(tokens)
        self.logits[:B] = self.runner.step(self.weights, tokens, positions)
        return self.logits[:B]

    def copy_rows(self, src: list[int], dst: list[int], upto: int) -> None:
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.cache.kv[:, :, d, :, :upto] = self.cache.kv[:, :, s, :, :upto]
        self.logits[d] = self.logits[s]

    @torch.no_grad()
    def sample(self, state: dict[str, np.ndarray], n: int) -> np.ndarray:
        # the branches are decided on the host's copy of the settings, and the settings travel in two
        # copies, so the device is waited for once, for the tokens
        plan = sampling_plan(state["temperature"][:n], state["top_p"][:n], state["top_k"][:n])
        if plan[0]:
            return self.logits[:n].argmax(-1).cpu().numpy()
        ints = torch.from_numpy(np.stack([state["key"][:n], state["drawn"][:n], state["top_k"][:n]])).to(self.device)
        floats = torch.from_numpy(np.stack([state["temperature"][:n], state["top_p"][:n]])).to(self.device)
        u = uniform(ints[0], ints[1])
        return sample_next(self.logits[:n], floats[0], floats[1], ints[2], u, plan).cpu().numpy()

    def close(self) -> None:
        self.engine._give_back_runner(self.runner)
        self.runner, self.cache, self.capacity = None, None, 0


def pick_decoder(model: Transformer, dtype: torch.dtype | None = None) -> type:
    """`NativeDecoder` where the C kernel runs the model (`native.applies`: CPU, fp32, a compiler, not
    `QIUSUO_NATIVE=0`) and the engine decodes in the model's fp32, else `TorchDecoder`. Both give the
    same tokens up to float rounding."""
    if dtype not in (None, model.lm_head.weight.dtype):
        return TorchDecoder
    return NativeDecoder if native.applies(model) else TorchDecoder


class DecodeBatch:
    """Rows that decode together over one KV cache; rows join (`admit`) and leave between steps.

    The decoder's cache has room for more rows than are running (it grows by doubling) and row i of
    the batch is cache row i. A prompt is prefilled once into the row of its first sample and copied
    to its other samples; a row that finishes is replaced by the last running row (its cache moved,
    up to its position). So joining and leaving cost a copy of the rows that move, never of the whole
    batch, and a finished row never takes part in another step.

    The per-row numbers a step needs (sampling settings, draw counter, position, limit, last token)
    are numpy arrays in `state`, so a step's Python work per row is one list append: the checks for
    an end run on the arrays when the batch is wide (`VECTOR_ROWS`), and what a row's owner receives
    is read from `Row.generated` by whoever hands tokens on, as often as it likes (the scheduler:
    once per stream interval under load, not once per step)."""

    VECTOR_ROWS = 8
    """From this many rows on, the end-of-row checks run on numpy arrays (a few µs a step, whatever
    the width); below it a Python loop over the rows is cheaper."""

    def __init__(self, engine: "Engine", max_len: int):
        self.engine, self.max_len = engine, max_len
        self.decoder: Decoder = engine.decoder_type(engine, max_len)
        self.rows: list[Row] = []
        self.state: dict[str, np.ndarray] = {}     # per-row numbers, in row order (see `_state`)
        vocab = engine.model.config.vocab_size
        self._stop_ids = np.zeros(vocab, dtype=bool)   # any row's stop ids: candidates for a stop
        self._string_rows = 0                           # rows with stop strings (and a tokenizer)
        self._cancels_seen = -1                         # `Row.cancels` when rows were last checked

    def __len__(self) -> int:
        return len(self.rows)

    def cached_tokens(self) -> int:
        """Cache positions reserved by the rows (their prompt plus what they may still generate)."""
        return sum(r.limit + 1 for r in self.rows)

    def admit(self, prompts: list[list[int]], rows: list[Row], n: int = 1) -> None:
        """Prefill `prompts` once and add n rows per prompt (rows[i * n + j] is sample j of prompt i)."""
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lengths) >= self.max_len:
            raise ValueError(f"prompt of {max(lengths)} tokens leaves no room in a context of {self.max_len}")
        pos = [lengths[i // n] for i in range(len(rows))]
        for row, p in zip(rows, pos):
            row.limit = min(self.max_len - 1, p + row.params.max_new_tokens - 1)
        start = len(self.rows)
        self._reserve(start + len(rows))
        first = [start + i * n for i in range(len(prompts))]   # each prompt's first sample
        self.decoder.prefill(prompts, first)
        if n > 1:   # the n samples of a prompt share its prefill
            self.decoder.copy_rows([f for f in first for _ in range(n - 1)],
                                   [f + j for f in first for j in range(1, n)], max(lengths))
        new = self._state(rows, pos)
        self.state = new if start == 0 else {k: np.concatenate([v, new[k]]) for k, v in self.state.items()}
        self.rows += rows
        for row in rows:
            self._stop_ids[[t for t in row.stops if 0 <= t < len(self._stop_ids)]] = True
            self._string_rows += self._has_stop_strings(row)

    def close(self) -> None:
        """Give the cache back to the engine for the next batch (the batch is unusable after)."""
        self.decoder.close()
        self.rows, self.state, self._string_rows = [], {}, 0

    def _reserve(self, need: int) -> None:
        """Make room for `need` rows, keeping the running rows' caches and logits."""
        upto = int(self.state["pos"].max()) + 1 if self.rows else 0
        self.decoder.reserve(need, len(self.rows), upto)

    @staticmethod
    def _state(rows: list[Row], pos: list[int]) -> dict[str, np.ndarray]:
        """Per-row numbers, built once per admission rather than every step: sampling settings, the
        draw counter, the position of the next token fed to the model, the last position allowed,
        and the last sampled token."""
        return {"temperature": np.array([r.params.temperature for r in rows], dtype=np.float32),
                "top_p": np.array([r.params.top_p for r in rows], dtype=np.float32),
                "top_k": np.array([r.params.top_k for r in rows], dtype=np.int64),
                "key": np.array([r.key for r in rows], dtype=np.int64),
                "drawn": np.array([len(r.generated) for r in rows], dtype=np.int64),
                "pos": np.array(pos, dtype=np.int64),
                "limit": np.array([r.limit for r in rows], dtype=np.int64),
                "token": np.zeros(len(rows), dtype=np.int64)}

    def step(self) -> list[Row]:
        """Sample one token for every live row (appended to its `generated`) and feed it back; return
        the rows that this token ended."""
        ended = self.sample()
        self.forward()
        return ended

    def sample(self) -> list[Row]:
        """The first half of `step`: draw every live row's next token, append it to the row's
        `generated`, and retire the rows it ends (returned, `finish_reason` set). A caller that hands
        tokens on (the scheduler) does so between the halves, so they travel while the model computes
        the next logits rather than after."""
        rows, state = self.rows, self.state
        if not rows:
            return []
        tokens = self.decoder.sample(state, len(rows))
        state["drawn"] += 1
        state["token"][:] = tokens
        ids = tokens.tolist()
        for row, token in zip(rows, ids):
            row.generated.append(token)
        # which rows may have ended: a stop id, the limit, a stop string, a cancel; then the exact test
        if len(rows) >= self.VECTOR_ROWS:
            maybe = self._stop_ids[tokens] | (state["pos"] >= state["limit"])
            cancels = Row.cancels != self._cancels_seen
            if self._string_rows or cancels:
                self._cancels_seen = Row.cancels
                maybe |= [r.cancelled or self._has_stop_strings(r) for r in rows]
            maybe = np.flatnonzero(maybe).tolist()
        else:
            maybe = range(len(rows))
        pos = state["pos"]
        ended_at = []
        for i in maybe:
            row, token = rows[i], ids[i]
            if row.cancelled:
                row.finish_reason = "cancelled"
            elif token in row.stops or self._hit_stop_string(row):
                row.finish_reason = "stop"
            elif pos[i] >= row.limit:
                row.finish_reason = "length"
            else:
                continue
            row.last_withheld = row.cancelled or token in row.stops   # the stop token, or the draw after a cancel
            ended_at.append(i)
        ended = [rows[i] for i in ended_at]
        if ended_at:
            self._compact(ended_at)
        return ended

    def forward(self) -> None:
        """The second half of `step`: feed each live row's last token, making its next logits."""
        if not self.rows:
            return
        self.decoder.step(self.state["token"], self.state["pos"])
        self.state["pos"] += 1

    def _has_stop_strings(self, row: Row) -> bool:
        return bool(row.params.stop_strings) and self.engine.tokenizer is not None

    def _hit_stop_string(self, row: Row) -> bool:
        if not self._has_stop_strings(row):
            return False
        tail = self.engine.tokenizer.decode(row.generated[-64:])
        return _find_stop_string(tail, row.params.stop_strings) is not None

    def _compact(self, ended_at: list[int]) -> None:
        """Drop the rows at indices `ended_at` (ascending): each hole below the new batch size is filled
        by a running row from above it, whose cache (up to its position) and logits move down;
        everything else stays in place."""
        live = len(self.rows) - len(ended_at)
        self._string_rows -= sum(self._has_stop_strings(self.rows[i]) for i in ended_at)
        if live == 0:  # keep the cache buffer: the next admission reuses it
            self.rows, self.state = [], {}
            return
        ended = set(ended_at)
        holes = [i for i in ended_at if i < live]
        movers = [i for i in range(live, len(self.rows)) if i not in ended]
        order = list(range(live))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            self.decoder.copy_rows(movers, holes, int(self.state["pos"][movers].max()) + 1)
        self.state = {k: v[order] for k, v in self.state.items()}
        self.rows = [self.rows[i] for i in order]


class Engine:
    """Sampling from a `Transformer`. `tokenizer` (optional) decodes texts and stop strings."""

    def __init__(self, model: Transformer, tokenizer=None, eos_ids: Sequence[int] = (), max_batch: int = 256,
                 decoder: type | None = None, dtype: torch.dtype | None = None, cuda_graphs: bool | None = None):
        """`decoder`: `NativeDecoder` or `TorchDecoder`; by default `pick_decoder(model, dtype)`, decided
        here once for every batch of this engine (move the model to its device before). `dtype`: what
        the engine decodes in, by default the model's — GRPO on a GPU rolls out in bf16 over its fp32
        master weights (the packed weights and the cache are bf16, the prefill runs under autocast).
        `cuda_graphs`: capture the decode step as CUDA graphs (`StepRunner`); None means yes on a CUDA
        device unless QIUSUO_CUDA_GRAPHS=0."""
        self.model = model
        self.dtype = dtype or model.lm_head.weight.dtype
        self.decoder_type = decoder or pick_decoder(model, self.dtype)
        if self.decoder_type is NativeDecoder and self.dtype != torch.float32:
            raise ValueError("the C decoder runs fp32 only")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and os.environ.get("QIUSUO_CUDA_GRAPHS", "1") != "0"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.cuda_graphs = cuda_graphs
        self.tokenizer = tokenizer
        ids = set(eos_ids)
        if tokenizer is not None:
            ids.update(tokenizer.stop_ids)
        self.eos_ids = tuple(sorted(ids))
        self.max_batch = max_batch
        self.pad_id = tokenizer.pad_id if tokenizer is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._spare: list[KVCache] = []      # caches of finished batches, most recent last (`_cache`)
        self._spare_lock = threading.Lock()
        self._runner: StepRunner | None = None   # a finished batch's step runner, for the next (`_take_runner`)
        self._packed: tuple | None = None    # (what the weights were, DecodeWeights): `decode_weights`
        self._packed_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def new_row(self, owner, params: SamplingParams, seed: int | None) -> Row:
        return Row(owner=owner, params=params, stops=frozenset(self.eos_ids) | frozenset(params.stop_token_ids),
                   key=_key(seed), limit=0)

    PACKED_MIN_LEN = 1024
    """Positions the packed weights' rotary tables cover at least (up to the model's context), so
    batches of different lengths share one packing."""

    def autocast(self):
        """The prefill's precision: autocast to the engine's dtype when it is not the model's."""
        if self.dtype == self.model.lm_head.weight.dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def decode_weights(self, max_len: int):
        """The model's weights in the decoder's layout (`decoder_type.pack`: `DecodeWeights` in the
        engine's dtype or `native.NativeWeights`), for positions below `max_len`. Packing them is a pass over all the
        weights, so the packed copy is kept and made again only when the weights have changed (not
        at every `stream` or `generate` call). A change is seen from each parameter's storage and
        version counter, which in-place updates bump (`load_state_dict`, `copy_` under no_grad, the
        for-loop and foreach optimizer steps) — but a fused optimizer step (`fused=True`) and writes
        through `.data` do not: call `forget_weights` after those (or after any training step, as
        GRPO does). A stale copy is still one whole model (the embedding is copied too), never a mix
        of old and new weights."""
        key = [(p.data_ptr(), p._version) for p in self.model.parameters()]
        with self._packed_lock:
            if self._packed is None or self._packed[0] != key or self._packed[1].max_len < max_len:
                span = max(max_len, min(self.model.config.max_position_embeddings, self.PACKED_MIN_LEN))
                self._packed = None   # the old copy goes before the new one is made
                self._packed = (key, self.decoder_type.pack(self, span))
            return self._packed[1]

    def forget_weights(self) -> None:
        """Drop the packed copy of the weights (GRPO does before its update, which makes it stale)."""
        with self._packed_lock:
            self._packed = None

    SPARE_BYTES = 256 << 20
    """How much memory the caches of finished batches may keep for the next ones (`_cache`)."""

    def _take_runner(self, rows: int, max_len: int) -> StepRunner:
        """A `StepRunner` with room for `rows` rows of `max_len` positions, for one batch at a time:
        the one a finished batch gave back when it is big enough (its cache, buffers and captured
        graphs carry over; GRPO's rollout batch of every step reuses them), else a new one whose
        length is rounded up to a power of two (up to the model's context), so the next batches of
        about the same length fit it too."""
        with self._spare_lock:
            runner, self._runner = self._runner, None
        if runner is not None and runner.capacity >= rows and runner.max_len >= max_len:
            return runner
        del runner   # too small: its memory goes before the new one is made
        length = max(max_len, min(_bucket(max_len), self.model.config.max_position_embeddings))
        return StepRunner(self, rows, length, self.cuda_graphs)

    def _give_back_runner(self, runner: StepRunner | None) -> None:
        """Keep a finished batch's runner for the next batch (the latest one only)."""
        if runner is not None:
            with self._spare_lock:
                self._runner = runner

    def _cache(self, rows: int, max_len: int, zeroed: bool) -> KVCache:
        """A KV cache with room for `rows` rows of `max_len` positions. The C step's caches
        (uninitialised, on the CPU) come from those that finished batches gave back when one is big
        enough: the first write to each 4 KiB page of a fresh buffer is a page fault, and a 32-row
        batch of 128 tokens took 2,600 of them, ~10 % of its time (GRPO starts such a batch every
        step). (The PyTorch step's caches belong to its `StepRunner`s, kept by `_take_runner`.)"""
        if not zeroed and self.device.type == "cpu":
            dtype = self.model.lm_head.weight.dtype
            with self._spare_lock:
                fits = [c for c in self._spare if c.batch >= rows and c.max_len >= max_len and c.kv.dtype == dtype]
                if fits:
                    cache = min(fits, key=lambda c: c.kv.numel())
                    self._spare.remove(cache)
                    return cache
        return self.model.new_cache(rows, max_len, zeroed=zeroed)

    def _give_back(self, cache: KVCache | None) -> None:
        """Keep a finished batch's C-step cache for `_cache`: the most recent ones, up to `SPARE_BYTES`."""
        if cache is None or cache.kv.device.type != "cpu":
            return
        size = cache.kv.numel() * cache.kv.element_size()
        if size > self.SPARE_BYTES:   # too big to keep: do not drop the others for it
            return
        with self._spare_lock:
            self._spare.append(cache)
            while sum(c.kv.numel() * c.kv.element_size() for c in self._spare) > self.SPARE_BYTES:
                self._spare.pop(0)

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
            try:
                batch.admit(chunk, rows, n)
                while len(batch):
                    batch.step()
            finally:
                batch.close()
            for row in rows:
                self._finish(row.owner, row)
            out += done
        return out

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield the ids of one completion as they are generated (stop token excluded)."""
        row = self.new_row(None, params, params.seed)
        batch = DecodeBatch(self, self._context([prompt], params))
        try:
            batch.admit([prompt], [row])
            while len(batch):
                batch.step()
                if not row.last_withheld:
                    yield row.generated[-1]
        finally:  # also when the consumer stops early (the generator is closed)
            batch.close()

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

