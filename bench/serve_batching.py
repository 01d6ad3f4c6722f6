"""Continuous batching: aggregate tokens/s of N concurrent requests through the scheduler vs the same N
requests one after another (each alone in the engine), same checkpoint, same sampling settings.

Every request samples exactly `--new-tokens` tokens (no early stop) with its own seed, so both sides do
the same work and — a check printed below — produce the same tokens.

The concurrent requests are consumed as the server consumes them: N tasks on one asyncio event loop,
tokens handed over once per scheduler step, or every `--stream-interval-ms` when more than 8 streams
run (the server's default). `--threads` consumes each request in its own thread instead (one wake-up
per token per thread). One after another means `Engine.stream`, the leanest single-request path.

    .venv/bin/python bench/serve_batching.py [--checkpoint runs/tiny/base] [--requests 32]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.generate import checkpoint  # noqa: E402
from qiusuo.engine import Engine, SamplingParams, Scheduler  # noqa: E402
from qiusuo.ledger import hardware  # noqa: E402
from qiusuo.model import load_model  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["4821+397", "reach 46 with 3 7 25 2", "12*7", "90817-3349", "reach 100 with 5 5 4", "77+77"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-interval-ms", type=float, default=20.0, help="as `qiusuo serve` (0: every step)")
    ap.add_argument("--threads", action="store_true", help="one consumer thread per request, not one event loop")
    args = ap.parse_args()
    ckpt = checkpoint(args.checkpoint)
    tok = Tokenizer.load(ckpt)
    engine = Engine(load_model(ckpt).eval(), None, eos_ids=())
    prompts = [tok.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i) for i in range(args.requests)]
    total = args.requests * args.new_tokens

    def sequential():
        return [list(engine.stream(p, sp)) for p, sp in zip(prompts, params)]

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

    seq_times, con_times, ttfts = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        seq_out = sequential()
        seq_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        con_out, ttft = concurrent()
        con_times.append(time.perf_counter() - t0)
        ttfts += ttft
    same = seq_out == con_out
    seq, con = total / statistics.median(seq_times), total / statistics.median(con_times)
    consumers = "a thread per request" if args.threads else f"one event loop, stream interval {args.stream_interval_ms:g} ms"
    print(f"# {hardware()['device']} ({hardware()['cpu']}), {args.requests} requests × {args.new_tokens} tokens, "
          f"median of {args.repeats}, consumers: {consumers}")
    print(f"sequential: {seq:,.0f} tok/s | continuous batching: {con:,.0f} tok/s | ratio {con / seq:.2f}x | "
          f"TTFT p50 {1000 * statistics.median(ttfts):.0f} ms | identical tokens: {same}")


if __name__ == "__main__":
    main()
