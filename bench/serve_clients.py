"""Serving throughput and latency: N concurrent streaming clients vs one client alone, through the real
HTTP server (`qiusuo serve` in its own process) and the continuous-batching scheduler.

Each client sends streaming chat requests back to back for `--seconds`; tokens are counted from the
server's own `usage` (include_usage), time to first token (TTFT) and inter-token latency (ITL) are
measured at the client from the arrival of the SSE chunks. Target: N = 32 clients together make ≥ 6×
the tokens/s of one client alone.

The load generator shares the machine with the server, so it is the leanest well-kept async client:
aiohttp (measured at a third of httpx's CPU per streamed request here). The server's CPU time, its
engine process included, and the generator's are printed for each phase, and from them the most the
N clients could make on this machine's cores at the CPU time per token they measured.

    .venv/bin/python bench/serve_clients.py [--checkpoint runs/tiny/base | --size tiny|small|medium]
                                            [--clients 32] [--seconds 10] [--rounds 2]

Without --checkpoint a random model is served (bench/generate.py's; tiny, ~0.8 M parameters, by
default), so completions run to max_tokens or a random end-of-text. The host is noisy, so the phases
alternate (one client, N clients, N, one, …) and each figure is the median over the rounds. Results
also go to bench/out/serve_clients.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.generate import SIZES, checkpoint  # noqa: E402
from qiusuo.ledger import hardware  # noqa: E402

PROMPTS = ["4821+397", "reach 46 with 3 7 25 2", "12*7", "90817-3349", "reach 100 with 5 5 4", "77+77"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(ckpt: Path, *flags: str):
    """`qiusuo serve` in a child process on a free loopback port; yields (url, pid)."""
    port = free_port()
    db = Path(tempfile.mkdtemp()) / "bench.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo.cli", "serve", str(ckpt), "--port", str(port),
                             "--db", str(db), *flags], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_request(http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, stats: dict) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
            "temperature": 1.0, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    last = None
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            stats["errors"] += 1
            await r.read()
            return
        async for line in r.content:  # one SSE line at a time
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("reasoning_content") or delta.get("content"):
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - sent)
                else:
                    stats["itl"].append(now - last)
                last = now
    stats["requests"] += 1


async def phase(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """Every client first sends one unmeasured request (opening its connection), then all start
    together and send requests back to back for `seconds`."""
    stats = {"tokens": 0, "requests": 0, "errors": 0, "ttft": [], "itl": []}
    warm = {"tokens": 0, "requests": 0, "errors": 0, "ttft": [], "itl": []}
    ready, go = [0], asyncio.Event()
    stop_at = [0.0]

    async def client(i: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await one_request(http, url, PROMPTS[i % len(PROMPTS)], max_tokens, warm)
            ready[0] += 1
            if ready[0] == clients:
                stop_at[0] = time.perf_counter() + seconds
                go.set()
            await go.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                await one_request(http, url, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, stats)
                n += 1

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await go.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0  # includes the requests still finishing after the deadline
    return {"clients": clients, "wall_s": wall, "requests": stats["requests"], "errors": stats["errors"],
            "tokens": stats["tokens"], "tok_per_s": stats["tokens"] / wall,
            "ttft_p50_ms": 1000 * pct(stats["ttft"], 50), "ttft_p95_ms": 1000 * pct(stats["ttft"], 95),
            "itl_p50_ms": 1000 * pct(stats["itl"], 50), "itl_p95_ms": 1000 * pct(stats["itl"], 95)}


def server_pids(pid: int) -> list[int]:
    """The server process and its children (the engine process)."""
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def _cpu(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server and its engine process, from /proc."""
    return sum(_cpu(Path(f"/proc/{p}/stat").read_text()) for p in server_pids(pid))


THREADS = ("event loop", "scheduler", "step workers", "engine main")


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU time of the server's threads by role: the server's event loop (its main thread), the
    scheduler thread, the C step's worker threads (named `qiusuo-step`), and the engine process's
    main thread (which reads the pipe). Threads that have exited drop out, so take differences over
    a phase, whose threads all live throughout."""
    out = dict.fromkeys(THREADS, 0.0)
    for p in server_pids(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                stat = Path(f"/proc/{p}/task/{tid}/stat").read_text()
            except OSError:
                continue
            if int(tid) == p:
                role = "event loop" if p == pid else "engine main"
            else:
                role = "step workers" if "(qiusuo-step)" in stat else "scheduler"
            out[role] += _cpu(stat)
    return out


def measured(url: str, pid: int, clients: int, seconds: float, max_tokens: int) -> dict:
    """`phase`, plus the cores used by the server (in all and by thread role) and by this load
    generator meanwhile."""
    s0, th0, g0, t0 = cpu_seconds(pid), thread_seconds(pid), time.process_time(), time.perf_counter()
    r = asyncio.run(phase(url, clients, seconds, max_tokens))
    wall = time.perf_counter() - t0
    r["server_cores"] = (cpu_seconds(pid) - s0) / wall
    r["loadgen_cores"] = (time.process_time() - g0) / wall
    th1 = thread_seconds(pid)
    for role in THREADS:
        r[f"{role} cores"] = max(0.0, th1[role] - th0[role]) / wall
    return r


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="random model without --checkpoint")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--rounds", type=int, default=2,
                    help="phases per client count, alternated (1, N, N, 1, …) so host noise hits both alike")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engine-process", default="true", help="the server's --engine-process (true/false)")
    args = ap.parse_args()
    ckpt = checkpoint(args.checkpoint, args.size)
    runs: dict[int, list[dict]] = {1: [], args.clients: []}
    with server(ckpt, "--no-auth", "--max-concurrent", str(max(64, args.clients)),
                "--engine-process", args.engine_process) as (url, pid):
        for r in range(args.rounds):
            for n in ((1, args.clients) if r % 2 == 0 else (args.clients, 1)):
                runs[n].append(measured(url, pid, n, args.seconds, args.max_tokens))
    # each column: the median over the rounds of that client count
    alone, together = ({k: statistics.median(r[k] for r in runs[n]) if k != "clients" else n for k in runs[n][0]}
                       for n in (1, args.clients))
    ratio = together["tok_per_s"] / alone["tok_per_s"]
    hw = hardware()
    print(f"# {hw['device']} ({hw['cpu']}, {hw['logical_cores']} cores), "
          f"checkpoint {args.checkpoint or f'random {args.size}'}, max_tokens {args.max_tokens}, "
          f"{args.rounds} × {args.seconds:g} s per client count (medians), engine process {args.engine_process}")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} "
          f"{'p95':>7} {'server cores':>13} {'loadgen cores':>14}")
    for r in (alone, together):
        print(f"{r['clients']:>7} {r['requests']:>8.0f} {r['errors']:>6.0f} {r['tok_per_s']:>8.0f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>5.0f}ms {r['itl_p50_ms']:>6.1f}ms "
              f"{r['itl_p95_ms']:>5.1f}ms {r['server_cores']:>13.2f} {r['loadgen_cores']:>14.2f}")
    for r in (alone, together):
        print(f"  cores by thread, {r['clients']} client{'s' if r['clients'] > 1 else ''}: " +
              ", ".join(f"{role} {r[f'{role} cores']:.2f}" for role in THREADS) +
              f", load generator {r['loadgen_cores']:.2f}")
    # The machine's cores bound the N-client side: at its CPU time per token (server, engine and load
    # generator together), all cores busy would make `cores / that` tokens a second.
    cpu_per_token = {r["clients"]: (r["server_cores"] + r["loadgen_cores"]) / r["tok_per_s"] for r in (alone, together)}
    cores = hw["logical_cores"]
    bound = cores / cpu_per_token[args.clients] / alone["tok_per_s"]
    print(f"CPU time per token: {1e6 * cpu_per_token[1]:.0f} µs with 1 client, "
          f"{1e6 * cpu_per_token[args.clients]:.0f} µs with {args.clients}; at that cost {cores} busy cores "
          f"bound {args.clients} clients to {cores / cpu_per_token[args.clients]:,.0f} tok/s = "
          f"{bound:.1f}x one client")
    per_round = [b["tok_per_s"] / a["tok_per_s"] for a, b in zip(runs[1], runs[args.clients])]
    print(f"aggregate speed-up with {args.clients} clients: {ratio:.1f}x (target ≥ 6x) — "
          f"{'PASS' if ratio >= 6 else 'FAIL'}; per round: {', '.join(f'{x:.1f}x' for x in per_round)}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_clients.json").write_text(json.dumps(
        {"hardware": hw, "args": vars(args), "alone": alone, "together": together, "ratio": ratio, "cores_bound": bound,
         "rounds": runs}, indent=2))
    sys.exit(0 if ratio >= 6 else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
