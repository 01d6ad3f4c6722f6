"""Token-in / token-out generation engine: one engine for GRPO rollouts, evaluation, chat and serving.

- Prompts are left-padded into one batch and prefilled once; with `n > 1` the prefilled KV cache is
  fanned out to the n samples of each prompt (GRPO's group), so a prompt is never recomputed.
- A preallocated KV cache; each decode step feeds one token per running row.
- Sampling: temperature, top-k, top-p; every row has its own `torch.Generator`, so a row's tokens
  depend on its seed only — the same seed gives the same tokens alone or in any batch.
- Rows stop on eos / stop token ids / stop strings / `max_new_tokens`; finished rows are dropped
  from the batch (the cache is compacted) so they stop costing compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import KVCache, Transformer


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


def sample_next(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row from `logits` [B, V] → ids [B].

    Inverse-CDF sampling with one uniform draw per row from that row's generator: unlike
    `torch.multinomial` on the batch, a row's draw does not depend on the other rows."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    cum = probs.cumsum(-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        probs = probs.masked_fill(cum - probs >= params.top_p, 0.0)
        cum = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]) * cum[:, -1]
    pick = torch.searchsorted(cum, u[:, None]).clamp_max(probs.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class Engine:
    """Batched sampling from a `Transformer`. `tokenizer` (optional) decodes texts and stop strings."""

    def __init__(self, model: Transformer, tokenizer=None, eos_ids: Sequence[int] = (), max_batch: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        ids = set(eos_ids)
        if tokenizer is not None:
            ids.update(tokenizer.stop_ids)
        self.eos_ids = tuple(sorted(ids))
        self.max_batch = max_batch

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[Completion]:
        """n completions for every prompt, prompt-major: result[i * n + j] is sample j of prompt i."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        per_chunk = max(1, self.max_batch // n)
        out: list[Completion] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start:start + per_chunk]
            seeds = None if params.seed is None else [params.seed + (start + i) * n + j
                                                       for i in range(len(chunk)) for j in range(n)]
            out.extend(self._run(chunk, params, n, seeds, first_index=start))
        return out

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield the ids of one completion as they are generated (stop token excluded)."""
        seeds = None if params.seed is None else [params.seed]
        for _, token in self._steps([prompt], params, 1, seeds):
            if token not in self._stops(params):
                yield token

    # --- internals -------------------------------------------------------------------------------
    def _stops(self, params: SamplingParams) -> set[int]:
        return set(self.eos_ids) | set(params.stop_token_ids)

    def _run(self, prompts, params, n, seeds, first_index: int) -> list[Completion]:
        done = [Completion(prompt_index=first_index + i // n) for i in range(len(prompts) * n)]
        for row, token in self._steps(prompts, params, n, seeds):
            done[row].token_ids.append(token)
        stops = self._stops(params)
        for c in done:
            hit_stop_token = bool(c.token_ids) and c.token_ids[-1] in stops
            if self.tokenizer is not None:
                ids = c.token_ids[:-1] if hit_stop_token else c.token_ids
                c.text = self.tokenizer.decode(ids)
                cut = _find_stop_string(c.text, params.stop_strings)
                if cut is not None:
                    c.text, hit_stop_token = c.text[:cut], True
            c.finish_reason = "stop" if hit_stop_token else "length"
        return done

    def _steps(self, prompts, params: SamplingParams, n: int, seeds) -> Iterator[tuple[int, int]]:
        """Yield (row, token) pairs until every row has finished. Row r is sample r % n of prompt r // n."""
        model, device = self.model, self.device
        stops = torch.tensor(sorted(self._stops(params)), device=device)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        max_len = width + params.max_new_tokens
        limit = model.config.max_position_embeddings
        # ids/positions/mask of the left-padded prompt batch
        ids = torch.full((len(prompts), width), self._pad_id(), dtype=torch.long)
        key_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            key_mask[i, width - len(p):] = True
        positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
        ids, key_mask, positions = ids.to(device), key_mask.to(device), positions.to(device)

        cache = model.new_cache(len(prompts), max_len)
        logits = model(ids, positions, cache, key_mask)[:, -1]  # [P, V]
        # Fan the prefilled prompts out to n samples each.
        fan = torch.arange(len(prompts), device=device).repeat_interleave(n)
        if n > 1:
            cache, logits, key_mask = cache.select(fan), logits[fan], key_mask[fan]
        pos = positions[fan, -1] + 1                     # next position of each row  [B]
        rows = torch.arange(len(fan), device=device)     # original row index of each running row
        gens = [_generator(s) for s in (seeds or [None] * len(fan))]
        texts = [[] for _ in range(len(fan))] if params.stop_strings else None

        alive = torch.ones(len(rows), dtype=torch.bool, device=device)
        for step in range(params.max_new_tokens):
            token = sample_next(logits, params, gens)
            for r, t, a in zip(rows.tolist(), token.tolist(), alive.tolist()):
                if a:
                    yield r, t
            finished = torch.isin(token, stops)
            if step == params.max_new_tokens - 1 or int(pos.max()) + 1 >= limit:
                finished[:] = True
            if texts is not None:
                finished |= self._stop_string_hit(texts, rows, token, alive, params.stop_strings)
            alive &= ~finished
            if not alive.any():
                return
            if alive.sum() <= 0.75 * len(rows):
                # Compact: drop finished rows so they stop costing compute. Done in bursts, not on
                # every finish, because each compaction copies the cache.
                idx = alive.nonzero().squeeze(-1)
                cache, key_mask, token, pos, rows = cache.select(idx), key_mask[idx], token[idx], pos[idx], rows[idx]
                gens = [gens[i] for i in idx.tolist()]
                alive = alive[idx]
            # Finished rows not yet dropped decode on, but nothing they produce is yielded.
            key_mask = torch.cat([key_mask, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], dim=1)
            logits = model(token[:, None], pos[:, None], cache, key_mask)[:, -1]
            pos = pos + 1

    def _stop_string_hit(self, texts, rows, token, alive, stop_strings) -> torch.Tensor:
        hit = torch.zeros(len(rows), dtype=torch.bool)
        for i, (r, t, a) in enumerate(zip(rows.tolist(), token.tolist(), alive.tolist())):
            if not a:
                continue
            texts[r].append(t)
            tail = self.tokenizer.decode(texts[r][-64:])
            hit[i] = _find_stop_string(tail, stop_strings) is not None
        return hit.to(token.device)

    def _pad_id(self) -> int:
        if self.tokenizer is not None:
            return self.tokenizer.pad_id
        return self.eos_ids[0] if self.eos_ids else 0


def _find_stop_string(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None
