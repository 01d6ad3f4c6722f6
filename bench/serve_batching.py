"""Continuous batching: aggregate tokens/s of N concurrent requests through the scheduler vs the same N
requests one after another (each alone in the engine), same checkpoint, same sampling settings.

Every request samples exactly `--new-tokens` tokens (no early stop) with its own seed, so both sides do
the same work and — a check printed below — produce the same tokens.

The concurrent requests are consumed as the server consumes them: N tasks on one asyncio event loop,
tokens handed over once per scheduler step, or every `--stream-interval-ms` when more than 8 streams
run (the server's default). `--threads` consumes each request in its own thread instead (one wake-up
per token per thread).

One after another is measured two ways, each against the same concurrent runs:
- `Engine.stream`, the leanest single-request path (no scheduler thread, no hand-over): the target's
  baseline;
- the same scheduler with one running slot, the requests submitted one after another as a server
  without batching would run them: this isolates what continuous batching itself adds.

The last line bounds the ratio from the C decode step alone, timed in the same run at the same
positions (one row at a time, then all N rows in one cache, alternated): the concurrent side cannot
beat N rows' step time per token, so `Engine.stream`'s time per token over that is the most the ratio
could reach if the scheduler, sampling, prefill and consumers cost nothing.

    .venv/bin/python bench/serve_batching.py [--checkpoint runs/tiny/base | --size tiny|small|medium] [--requests 32]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.generate import SIZES, checkpoint  # noqa: E402
from qiusuo.engine import Engine, NativeDecoder, SamplingParams  # noqa: E402
from qiusuo.serve.scheduler import Scheduler  # noqa: E402
from qiusuo.ledger import hardware  # noqa: E402
from qiusuo.model import load_model  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["4821+397", "reach 46 with 3 7 25 2", "12*7", "90817-3349", "reach 100 with 5 5 4", "77+77"]


def step_seconds(engine: Engine, lengths: list[int], new_tokens: int) -> float:
    """Seconds per token of the C decode step alone, for rows whose prompts are `lengths` long, all in
    one cache, stepped `new_tokens` times from the end of their prompts (what the same rows cost the
    concurrent side's kernel, nothing else)."""
    max_len = max(lengths) + new_tokens + 1
    weights = engine.decode_weights(max_len)
    cache = engine.model.new_cache(len(lengths), max_len)
    tokens, pos = np.zeros(len(lengths), dtype=np.int64), np.array(lengths, dtype=np.int64)
    logits = np.empty((len(lengths), weights.vocab_padded), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        weights.kernel(tokens, pos, cache, logits)
        pos += 1
    return (time.perf_counter() - t0) / (len(lengths) * new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="random model without --checkpoint")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-interval-ms", type=float, default=20.0, help="as `qiusuo serve` (0: every step)")
    ap.add_argument("--threads", action="store_true", help="one consumer thread per request, not one event loop")
    args = ap.parse_args()
    ckpt = checkpoint(args.checkpoint, args.size)
    tok = Tokenizer.load(ckpt)
    engine = Engine(load_model(ckpt).eval(), None, eos_ids=())
    prompts = [tok.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i) for i in range(args.requests)]
    total = args.requests * args.new_tokens

    def sequential():
        return [list(engine.stream(p, sp)) for p, sp in zip(prompts, params)]

    def one_slot():
        sched = Scheduler(engine, max_running=1, stream_interval=args.stream_interval_ms / 1000).start()

        async def each():
            outs = []
            for p, sp in zip(prompts, params):
                outs.append([])
                async for tokens in sched.submit(p, sp).batches():
                    outs[-1] += tokens
            return outs

        outs = asyncio.run(each())
        sched.stop()
        return outs

    def concurrent():
        sched = Scheduler(engine, max_running=args.requests, stream_interval=args.stream_interval_ms / 1000).start()
        outs = [None] * args.requests
        ttft = [0.0] * args.requests

        def client(i):
            req = sched.submit(prompts[i], params[i])
            outs[i] = list(req)
            ttft[i] = req.first_token_at - req.submitted_at

        async def task(i):
            req = sched.submit(prompts[i], params[i])
            outs[i] = []
            async for tokens in req.batches():
                outs[i] += tokens
            ttft[i] = req.first_token_at - req.submitted_at

        async def tasks():
            await asyncio.gather(*(task(i) for i in range(args.requests)))

        if args.threads:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            asyncio.run(tasks())
        sched.stop()
        return outs, ttft

    seq_times, slot_times, con_times, ttfts = [], [], [], []
    for _ in range(args.repeats):   # interleaved, so a noisy moment hits all three sides alike
        t0 = time.perf_counter()
        seq_out = sequential()
        seq_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slot_out = one_slot()
        slot_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        con_out, ttft = concurrent()
        con_times.append(time.perf_counter() - t0)
        ttfts += ttft
    same = seq_out == con_out == slot_out
    lengths = [len(p) for p in prompts]
    lone_step, batch_step = [], []
    if engine.decoder_type is NativeDecoder:
        for _ in range(args.repeats):
            lone_step.append(statistics.mean(step_seconds(engine, [n], args.new_tokens) for n in lengths))
            batch_step.append(step_seconds(engine, lengths, args.new_tokens))
    seq, slot, con = (total / statistics.median(t) for t in (seq_times, slot_times, con_times))
    consumers = "a thread per request" if args.threads else f"one event loop, stream interval {args.stream_interval_ms:g} ms"
    params_m = sum(p.numel() for p in engine.model.parameters()) / 1e6
    print(f"# {hardware()['device']} ({hardware()['cpu']}), {args.checkpoint or f'random {args.size}'} "
          f"({params_m:.1f} M parameters), {args.requests} requests × {args.new_tokens} tokens, "
          f"median of {args.repeats}, consumers: {consumers}")
    print(f"one after another: Engine.stream {seq:,.0f} tok/s, scheduler with one slot {slot:,.0f} tok/s | "
          f"continuous batching: {con:,.0f} tok/s | TTFT p50 {1000 * statistics.median(ttfts):.0f} ms | "
          f"identical tokens: {same}")
    print(f"ratio vs Engine.stream {con / seq:.2f}x (target ≥ 6x: {'PASS' if con / seq >= 6 else 'FAIL'}) | "
          f"vs one slot {con / slot:.2f}x")
    if lone_step:
        lone_us, batch_us = 1e6 * statistics.median(lone_step), 1e6 * statistics.median(batch_step)
        print(f"C step alone, same positions: 1 row {lone_us:.1f} µs/token, {args.requests} rows "
              f"{batch_us:.1f} µs/token ({torch.get_num_threads()} threads) = {lone_us / batch_us:.2f}x | "
              f"bound on the ratio vs Engine.stream ({1e6 / seq:.1f} µs/token): {1e6 / seq / batch_us:.2f}x")


if __name__ == "__main__":
    main()
