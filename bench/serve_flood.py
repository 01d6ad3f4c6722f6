"""Robustness under abuse: a bounded flood of mixed valid, invalid and unauthenticated requests against
`qiusuo serve` (its own process, loopback only) for `--seconds` (60 by default).

Passes when: no response is a 5xx other than 503-with-Retry-After, no connection fails, every kind of
request gets its expected status, the server's memory is flat (median RSS of the second half within
10 % / 16 MiB of the first half's, after a warm-up), and afterwards it is idle and its ledger adds up
(each key's `spent` equals the sum of its usage rows).

    .venv/bin/python bench/serve_flood.py [--seconds 60] [--concurrency 48] [--checkpoint runs/tiny/base]

Results also go to bench/out/serve_flood.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.generate import checkpoint  # noqa: E402
from bench.serve_clients import server, server_pids  # noqa: E402
from qiusuo.serve.keys import KeyStore  # noqa: E402

ASK = [{"role": "user", "content": "4821+397"}]


def kinds(keys: dict) -> dict:
    """Request kind → (expected statuses, how to send it). `send(http, url)` returns the status."""
    good, limited, broke = (f"Bearer {keys[k]}" for k in ("good", "limited", "broke"))

    def post(body=None, auth=good, content=None, headers=None):
        async def send(http, url):
            h = {"Authorization": auth} if auth else {}
            h.update(headers or {})
            r = await http.post(url + "/v1/chat/completions", json=body, content=content, headers=h)
            return check(r)
        return send

    def get(path, auth=good):
        async def send(http, url):
            return check(await http.get(url + path, headers={"Authorization": auth} if auth else {}))
        return send

    async def stream(http, url, hang_up=False):
        body = {"messages": ASK, "stream": True, "max_tokens": 48, "stream_options": {"include_usage": True}}
        async with http.stream("POST", url + "/v1/chat/completions", json=body,
                               headers={"Authorization": good}) as r:
            if r.status_code != 200:
                await r.aread()
                return check(r)
            n = 0
            async for line in r.aiter_lines():
                n += 1
                if hang_up and n >= 3:
                    return 299  # hung up mid-stream on purpose
                if line.startswith("data: {") and '"error"' in line:
                    return 503 if "queue_timeout" in line or "overloaded" in line else 500
        return 200

    return {
        "stream": ({200, 503}, stream),
        "hang_up": ({299, 200, 503}, lambda http, url: stream(http, url, hang_up=True)),
        "complete": ({200, 503}, post({"messages": ASK, "max_tokens": 32})),
        "rate_limited": ({200, 429, 503}, post({"messages": ASK, "max_tokens": 8}, auth=limited)),
        "no_balance": ({402}, post({"messages": ASK}, auth=broke)),
        "no_key": ({401}, post({"messages": ASK}, auth=None)),
        "bad_key": ({401}, post({"messages": ASK}, auth="Bearer qs-00000000-forged")),
        "bad_json": ({400}, post(content=b'{"messages": [', headers={"Content-Type": "application/json"})),
        "garbage": ({400}, post(content=bytes(random.Random(1).randbytes(512)))),
        "bad_param": ({422}, post({"messages": ASK, "temperature": 9})),
        "reasoning_back": ({400}, post({"messages": ASK + [{"role": "assistant", "content": "x",
                                                            "reasoning_content": "y"}]})),
        "too_big": ({413}, post({"messages": [{"role": "user", "content": "x" * 100_000}]})),
        "too_long": ({400}, post({"messages": [{"role": "user", "content": "9" * 2000}]})),
        "unknown_model": ({404}, post({"model": "gpt-5", "messages": ASK})),
        "unknown_route": ({404}, get("/v1/engines")),
        "models": ({200}, get("/v1/models")),
        "balance": ({200}, get("/user/balance")),
        "health": ({200}, get("/health", auth=None)),
        "metrics": ({200}, get("/metrics", auth=None)),
    }


def check(r: httpx.Response) -> int:
    """The status, or 599 for a 503 without Retry-After (counted as a failure)."""
    if r.status_code == 503 and not r.headers.get("retry-after"):
        return 599
    return r.status_code


def rss_kib(pid: int) -> int:
    """Resident memory of the server and its children (the engine process)."""
    total = 0
    for p in server_pids(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def flood(url: str, pid: int, keys: dict, seconds: float, concurrency: int, seed: int) -> dict:
    table = kinds(keys)
    names = list(table)
    weights = [6 if n in ("stream", "complete") else 1 for n in names]  # mostly real work
    rng = random.Random(seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def worker() -> None:
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            while time.perf_counter() < stop_at:
                name = rng.choices(names, weights)[0]
                try:
                    status = await table[name][1](http, url)
                except httpx.HTTPError as e:
                    status = 0
                    failures.append(f"{name}: {type(e).__name__} {e}")
                counts[name][status] += 1

    async def sample_memory() -> None:
        while time.perf_counter() < stop_at:
            rss.append((time.perf_counter() - t0, rss_kib(pid)))
            await asyncio.sleep(1.0)

    await asyncio.gather(sample_memory(), *(worker() for _ in range(concurrency)))
    for name, c in counts.items():
        bad = {s: n for s, n in c.items() if s not in table[name][0]}
        if bad:
            failures.append(f"{name}: unexpected statuses {bad}")
    return {"counts": {k: dict(v) for k, v in counts.items()}, "failures": failures, "rss_kib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=48, help="requests in flight (bounded)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ckpt = checkpoint(args.checkpoint)
    db = Path(tempfile.mkdtemp()) / "flood.sqlite"
    store = KeyStore(db)
    keys = {"good": store.create("good", rpm=1_000_000, tpm=1_000_000_000, balance=1e6)[1],
            "limited": store.create("limited", rpm=5)[1],
            "broke": store.create("broke", balance=0.0)[1]}
    store.close()
    flags = ["--db", str(db), "--max-concurrent", "16", "--max-queue", "16", "--queue-timeout", "2",
             "--overload-retry-after", "1", "--max-body-bytes", "65536", "--keepalive-interval", "0.5"]
    with server(ckpt, *flags) as (url, pid):
        result = asyncio.run(flood(url, pid, keys, args.seconds, args.concurrency, args.seed))
        deadline = time.monotonic() + 30
        while (h := httpx.get(url + "/health").json())["running"] or h["queue_depth"]:
            if time.monotonic() > deadline:
                result["failures"].append(f"not idle after the flood: {h}")
                break
            time.sleep(0.2)
    with sqlite3.connect(db) as con:  # the server has exited: read its ledger directly
        for key_id, spent, rows in con.execute(
                "SELECT k.id, k.spent, COALESCE(SUM(u.cost), 0) FROM keys k LEFT JOIN usage u ON u.key_id = k.id"
                " GROUP BY k.id"):
            if abs(spent - rows) > 1e-9:
                result["failures"].append(f"key {key_id}: spent {spent} != ledger {rows}")
        result["ledger_rows"] = con.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    # Memory is flat when the median RSS of the second half of the flood (after a warm-up) is within
    # 10 % / 16 MiB of the first half's: single samples swing by tens of MiB as batches come and go.
    rss = [kib for t, kib in result["rss_kib"] if t >= min(10.0, args.seconds / 6)]
    half = len(rss) // 2
    first, second, peak = statistics.median(rss[:half]), statistics.median(rss[half:]), max(rss)
    growth = second - first
    if growth > max(0.10 * first, 16 * 1024):
        result["failures"].append(f"memory grew {growth / 1024:.1f} MiB")
    total = Counter()
    for c in result["counts"].values():
        total.update(c)
    print(f"{sum(total.values())} requests in {args.seconds:g} s at {args.concurrency} in flight; "
          f"statuses {dict(sorted(total.items()))}; ledger rows {result['ledger_rows']}")
    for name, c in sorted(result["counts"].items()):
        print(f"  {name:15} {dict(sorted(c.items()))}")
    print(f"server RSS (median): {first / 1024:.1f} MiB in the first half after warm-up, {second / 1024:.1f} MiB in "
          f"the second; peak {peak / 1024:.1f} MiB")
    print("PASS" if not result["failures"] else "FAIL:\n  " + "\n  ".join(result["failures"][:20]))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_flood.json").write_text(json.dumps({"args": vars(args), **result}, indent=2))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
