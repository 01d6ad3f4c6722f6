"""A soak of `qiusuo serve` under abuse (issue 17): `--clients` clients (64) for `--seconds` (60) against
a server with small limits, on loopback only, mixing valid streams and completions, clients that hang
up mid-stream, the bad inputs the server must refuse (deep nesting, lone surrogates, NaN, wrong types,
unsupported features, out-of-range numbers, …), oversized bodies and wrong or exhausted keys.

PASS when:
- no response is a 5xx other than 503 with Retry-After, and no connection fails;
- every kind of request gets one of its expected statuses (bad inputs: a 4xx);
- afterwards the server is idle: its /metrics gauges of slots, engine sequences, key slots,
  reservations, preparations and pending bills are all back to 0;
- resident memory (server and engine process) is flat: the median of the second half of the run
  within 10 % / 16 MiB of the first half's, after a warm-up;
- the ledger agrees with the clients: every request whose usage a client was told has exactly one
  ledger row with those token counts, and each key's `spent` equals the sum of its rows.

    .venv/bin/python bench/soak.py [--seconds 60] [--clients 64] [--checkpoint runs/tiny/base]

Prints the figures and writes them as JSON to bench/out/soak.json (or `--out`). `soak()` and
`verdict()` are also what tests/test_serve_soak.py runs, for a few seconds, against an in-process server.
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
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
ASK = [{"role": "user", "content": "4821+397"}]
GAUGES = ("qiusuo_active_slots", "qiusuo_engine_sequences", "qiusuo_key_requests_in_flight", "qiusuo_reservations",
          "qiusuo_preparing", "qiusuo_unsettled")
# the server's small limits (the in-process test uses the same through ServeConfig)
LIMITS = dict(max_concurrent=16, max_queue=16, queue_timeout=2.0, overload_retry_after=1.0, max_body_bytes=65536,
              max_messages=8, keepalive_interval=0.5, key_max_concurrent=8, max_tokens_limit=64,
              default_max_tokens=32)


def bad_inputs() -> dict[str, bytes]:
    """Bodies the server must refuse with a 4xx, by kind."""
    def body(**fields) -> bytes:
        return json.dumps({"messages": ASK, **fields}).encode()

    return {
        "deep_nesting": b"[" * 30_000 + b"]" * 30_000,   # (within the body limit, so the parser sees it)
        "deep_content": b'{"messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
        "lone_surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "invalid_utf8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        "nan": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "infinity": b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        "bad_json": b'{"messages": [',
        "garbage": random.Random(1).randbytes(512),
        "not_an_object": b"[1, 2, 3]",
        "wrong_type": body(stream="yes"),
        "wrong_role": json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
        "no_messages": b'{"messages": []}',
        "too_many_messages": json.dumps({"messages": ASK * 9}).encode(),
        "tools": body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        "response_format": body(response_format={"type": "json_object"}),
        "logprobs": body(logprobs=True, top_logprobs=3),
        "empty_model": body(model=""),
        "unknown_model": body(model="gpt-5"),
        "n_above_1": body(n=3),
        "temperature_range": body(temperature=9),
        "max_tokens_range": body(max_tokens=10 ** 30),
        "seed_range": body(seed=2 ** 64),
        "long_stop": body(stop=["x" * 65]),
        "many_stops": body(stop=[str(i) for i in range(17)]),
        "reasoning_back": json.dumps({"messages": ASK + [{"role": "assistant", "content": "x",
                                                          "reasoning_content": "y"}]}).encode(),
        "too_long": json.dumps({"messages": [{"role": "user", "content": "9" * 20_000}]}).encode(),
        "oversized": json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode(),
    }


def make_keys(store) -> dict[str, str]:
    """The soak's keys: eight ordinary ones (the clients share them), one capped at 2 requests at once,
    one at 5 requests/minute, one at 600 tokens/minute, one without balance, one revoked."""
    keys = {f"good{i}": store.create(f"good{i}", rpm=10 ** 6, tpm=10 ** 9, balance=1e6)[1] for i in range(8)}
    keys["greedy"] = store.create("greedy", rpm=10 ** 6, tpm=10 ** 9, balance=1e6, max_concurrent=2)[1]
    keys["rpm"] = store.create("rpm", rpm=5)[1]
    keys["tpm"] = store.create("tpm", rpm=10 ** 6, tpm=600)[1]
    keys["broke"] = store.create("broke", balance=0.0)[1]
    revoked, keys["revoked"] = store.create("revoked")
    store.revoke(revoked.id)
    return keys


class Client:
    """One simulated client: sends requests of random kinds back to back, notes what it was told."""

    def __init__(self, url: str, keys: dict, index: int, rng: random.Random, told: dict, counts: dict,
                 failures: list):
        self.url, self.keys, self.rng = url, keys, rng
        self.told, self.counts, self.failures = told, counts, failures
        self.good = f"Bearer {keys[f'good{index % 8}']}"   # 8 clients a key: its cap of 8 at once
        self.bad = bad_inputs()

    async def post(self, http, content: bytes, auth: str | None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = auth
        return await http.post(self.url + "/v1/chat/completions", content=content, headers=headers)

    async def complete(self, http, auth: str, **fields) -> int:
        r = await self.post(http, json.dumps({"messages": ASK, "max_tokens": 32, **fields}).encode(), auth)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if "usage" in body:   # a 200, or a 503 for an engine failure (billed, and said so)
            self.told[body["id"]] = body["usage"]
        return status(r)

    async def stream(self, http, auth: str, hang_up: bool) -> int:
        body = {"messages": ASK, "stream": True, "max_tokens": 48, "stream_options": {"include_usage": True}}
        async with http.stream("POST", self.url + "/v1/chat/completions", json=body,
                               headers={"Authorization": auth}) as r:
            if r.status_code != 200:
                await r.aread()
                return status(r)
            n, rid = 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                n += 1
                event = json.loads(line[6:])
                if "error" in event:
                    return 503 if event["error"].get("code") in ("queue_timeout", "overloaded", "engine_error",
                                                                 "ledger_unavailable") else 500
                rid = event.get("id", rid)
                if event.get("usage"):
                    self.told[rid] = event["usage"]
                if hang_up and n >= 3:
                    return 299  # hung up mid-stream on purpose
        return 200

    async def one(self, http, kind: str) -> int:
        k = self.keys
        if kind == "stream":
            return await self.stream(http, self.good, hang_up=False)
        if kind == "hang_up":
            return await self.stream(http, self.good, hang_up=True)
        if kind == "complete":
            return await self.complete(http, self.good)
        if kind == "greedy":
            return await self.complete(http, f"Bearer {k['greedy']}")
        if kind == "rpm_limited":
            return await self.complete(http, f"Bearer {k['rpm']}", max_tokens=8)
        if kind == "tpm_limited":
            return await self.complete(http, f"Bearer {k['tpm']}", max_tokens=64)
        if kind == "no_balance":
            return status(await self.post(http, json.dumps({"messages": ASK}).encode(), f"Bearer {k['broke']}"))
        if kind == "revoked_key":
            return status(await self.post(http, json.dumps({"messages": ASK}).encode(), f"Bearer {k['revoked']}"))
        if kind == "no_key":
            return status(await self.post(http, json.dumps({"messages": ASK}).encode(), None))
        if kind == "forged_key":
            return status(await self.post(http, json.dumps({"messages": ASK}).encode(), "Bearer qs-00000000-forged"))
        return status(await self.post(http, self.bad[kind.removeprefix("bad:")], self.good))


# kind → statuses that are right for it (299: hung up on purpose; 503 only with Retry-After). An
# ordinary key may answer 429 too: after a client hangs up, its request holds the key's slot until
# the server notices, and the client's next request may come first.
VALID = {"stream": {200, 429, 503}, "hang_up": {299, 200, 429, 503}, "complete": {200, 429, 503},
         "greedy": {200, 429, 503}, "rpm_limited": {200, 429, 503}, "tpm_limited": {200, 429, 503}}
WRONG_KEYS = {"no_balance": {402}, "revoked_key": {401}, "no_key": {401}, "forged_key": {401}}


def status(r: httpx.Response) -> int:
    """The status, or 599 for a 503 without Retry-After (a failure)."""
    return 599 if r.status_code == 503 and not r.headers.get("retry-after") else r.status_code


def expected(kind: str) -> set[int]:
    if kind in VALID:
        return VALID[kind]
    if kind in WRONG_KEYS:
        return WRONG_KEYS[kind]
    return set(range(400, 500)) | {503}   # a bad input: any 4xx, or 503 with Retry-After under load


async def soak(url: str, keys: dict, seconds: float, clients: int, seed: int = 0,
               rss: Callable[[], int] | None = None) -> dict:
    """Run the clients for `seconds`; returns counts by kind and status, what clients were told
    (request id → usage), failures and RSS samples (KiB, from `rss`)."""
    kinds = list(VALID) + list(WRONG_KEYS) + [f"bad:{k}" for k in bad_inputs()]
    weights = [12 if k in ("stream", "complete") else 4 if k == "hang_up" else 1 for k in kinds]  # mostly work
    counts: dict[str, Counter] = defaultdict(Counter)
    told: dict[str, dict] = {}
    failures: list[str] = []
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def run_client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        client = Client(url, keys, i, rng, told, counts, failures)
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2)) as http:
            while time.perf_counter() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                try:
                    code = await client.one(http, kind)
                except httpx.HTTPError as e:
                    code = 0
                    failures.append(f"{kind}: {type(e).__name__} {e}")
                counts[kind][code] += 1

    async def sample_memory() -> None:
        while rss is not None and time.perf_counter() < stop_at:
            samples.append((time.perf_counter() - t0, rss()))
            await asyncio.sleep(min(1.0, seconds / 20))

    await asyncio.gather(sample_memory(), *(run_client(i) for i in range(clients)))
    return {"counts": {k: dict(v) for k, v in counts.items()}, "told": told, "failures": failures,
            "rss_kib": samples}


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {name: float(line.split()[-1]) for line in text.splitlines() for name in GAUGES
            if line.startswith(name + " ")}


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """The gauges once all are 0, or as they stand after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any((g := gauges(url)).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return g


def verdict(result: dict, db: Path, idle_gauges: dict, rss_before: int | None, rss_after: int | None,
            warm_up: float) -> dict:
    """The soak's figures and PASS / FAIL (`failures`), from `soak()`'s result and the ledger file."""
    failures = list(result["failures"])
    by_outcome, bad_by_kind, bad_5xx = Counter(), {}, Counter()
    for kind, c in result["counts"].items():
        by_outcome.update({str(s): n for s, n in c.items()})
        wrong = {s: n for s, n in c.items() if s not in expected(kind)}
        if wrong:
            failures.append(f"{kind}: unexpected statuses {wrong}")
        if kind.startswith("bad:"):
            bad_by_kind[kind[4:]] = sum(c.values())
            bad_5xx[kind[4:]] = sum(n for s, n in c.items() if s >= 500 and s != 503)
    if any(idle_gauges.values()) or len(idle_gauges) != len(GAUGES):
        failures.append(f"not idle afterwards: {idle_gauges}")
    with sqlite3.connect(db) as con:
        rows = {r[0]: r[1:] for r in con.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, finish_reason FROM usage")}
        statuses = Counter(r[2] for r in rows.values())
        for key_id, spent, summed in con.execute(
                "SELECT k.id, k.spent, COALESCE(SUM(u.cost), 0) FROM keys k LEFT JOIN usage u ON u.key_id = k.id"
                " GROUP BY k.id"):
            if abs(spent - summed) > 1e-9:
                failures.append(f"key {key_id}: spent {spent} != its ledger rows {summed}")
    told = result["told"]
    client = {"requests": len(told), "prompt_tokens": sum(u["prompt_tokens"] for u in told.values()),
              "completion_tokens": sum(u["completion_tokens"] for u in told.values())}
    mine = [rows[rid] for rid in told if rid in rows]
    ledger = {"requests": len(mine), "prompt_tokens": sum(r[0] for r in mine),
              "completion_tokens": sum(r[1] for r in mine)}
    if ledger != client:
        failures.append(f"ledger {ledger} != what clients were told {client}")
    memory = {"rss_before_mib": rss_before and round(rss_before / 1024, 1),
              "rss_after_mib": rss_after and round(rss_after / 1024, 1)}
    rss = [kib for t, kib in result["rss_kib"] if t >= warm_up]
    if len(rss) >= 4:
        half = len(rss) // 2
        first, second = statistics.median(rss[:half]), statistics.median(rss[half:])
        memory.update(median_first_half_mib=round(first / 1024, 1), median_second_half_mib=round(second / 1024, 1),
                      peak_mib=round(max(rss) / 1024, 1))
        if second - first > max(0.10 * first, 16 * 1024):
            failures.append(f"memory grew {(second - first) / 1024:.1f} MiB")
    if not told:
        failures.append("no client was told any usage: nothing reached the model")
    return {"requests": sum(by_outcome.values()), "by_outcome": dict(sorted(by_outcome.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(result["counts"].items())},
            "bad_inputs_by_kind": dict(sorted(bad_by_kind.items())), "bad_inputs": sum(bad_by_kind.values()),
            "bad_inputs_5xx": sum(bad_5xx.values()),
            "ledger_rows_by_status": dict(statuses), "ledger_rows": len(rows),
            "ledger_totals": ledger, "client_totals": client, "gauges_after": idle_gauges, "memory": memory,
            "failures": failures, "verdict": "PASS" if not failures else "FAIL"}


def report(v: dict, seconds: float, clients: int) -> str:
    m = v["memory"]
    lines = [f"{v['requests']} requests in {seconds:g} s from {clients} clients; by outcome {v['by_outcome']}",
             f"bad inputs: {v['bad_inputs']} tried, 5xx among them: {v['bad_inputs_5xx']}; by kind "
             f"{v['bad_inputs_by_kind']}",
             f"ledger rows {v['ledger_rows']} by status {v['ledger_rows_by_status']}",
             f"ledger totals {v['ledger_totals']} vs client totals {v['client_totals']}",
             f"gauges after: {v['gauges_after']}",
             f"server RSS: {m}"]
    lines += [f"  {kind:22} {c}" for kind, c in v["by_kind"].items()]
    lines.append(v["verdict"] + ("" if not v["failures"] else ":\n  " + "\n  ".join(v["failures"][:20])))
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.generate import checkpoint
    from bench.serve_clients import server, server_pids
    from qiusuo.serve.keys import KeyStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="stage folder (default: a random tiny model)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "soak.json")
    args = ap.parse_args()

    def rss_kib(pid: int) -> int:
        total = 0
        for p in server_pids(pid):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    ckpt = checkpoint(args.checkpoint)
    db = Path(tempfile.mkdtemp()) / "soak.sqlite"
    store = KeyStore(db)
    keys = make_keys(store)
    store.close()
    flags = ["--db", str(db), "--host", "127.0.0.1"]
    for name, value in LIMITS.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    with server(ckpt, *flags) as (url, pid):
        before = rss_kib(pid)
        result = asyncio.run(soak(url, keys, args.seconds, args.clients, args.seed, rss=lambda: rss_kib(pid)))
        idle = wait_idle(url)
        after = rss_kib(pid)
    v = verdict(result, db, idle, before, after, warm_up=min(10.0, args.seconds / 6))
    print(report(v, args.seconds, args.clients))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "limits": LIMITS, **v}, indent=2))
    sys.exit(1 if v["failures"] else 0)


if __name__ == "__main__":
    main()
