"""GRPO steps in 2 processes (torch.distributed, gloo, one thread each) against 1 process of one thread:
the completions/s ratio, and the bound this machine allows, measured in the same run.

The step is qiusuo's own `grpo` stage (8 prompts × 8 samples, up to 64 new tokens, the `grpo` loss,
β = 0) on a random ~5 M-parameter model of the character vocabulary. Each side runs `--steps` steps
after one warm-up step and reports the median of `perf/completions_per_s` (rank 0's wall time per
step, whole global batch). The bound is the same ratio for a pure 1-thread matmul loop run in 1 and
in 2 processes at once: what two cores give when nothing else is shared (memory bandwidth, turbo,
other load on the machine). On a machine busy with other work that bound falls toward 1×, so the
bench also prints each side's CPU seconds per step (the busiest rank's for 2 processes): their ratio
is the speed-up with a free core per process, whatever else is running.

    .venv/bin/python bench/grpo_ddp.py [--steps 5] [--procs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
GRPO = ["--tasks", "{arith: [3, 4], countdown: [3]}", "--prompts-per-step", "8", "--group-size", "8",
        "--max-new-tokens", "64", "--loss", "grpo", "--beta", "0", "--temperature", "1.0", "--lr", "1e-4",
        "--log-every", "1000", "--save-every", "1000"]


def checkpoint(folder: Path) -> Path:
    from qiusuo.model import ModelConfig, Transformer, save_model
    from qiusuo.tokenizer import Tokenizer

    tok = Tokenizer.char_level()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **MODEL))
    save_model(model, folder)
    tok.save(folder)
    return folder


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _grpo(rank: int, world: int, port: int, argv: list, cpu_file: str) -> None:
    _env(rank, world, port)
    import qiusuo.grpo
    from qiusuo.cli import main

    # this process's CPU seconds at the end of each step (step_metrics runs once a step on every rank)
    marks, metrics = [], qiusuo.grpo.step_metrics
    qiusuo.grpo.step_metrics = lambda *a, **k: (marks.append(time.process_time()), metrics(*a, **k))[1]
    assert main(argv) == 0
    Path(f"{cpu_file}.{rank}").write_text(json.dumps(marks))
    if world > 1:
        torch.distributed.destroy_process_group()


def _matmul(rank: int, world: int, seconds: float, out: str) -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 768)
    for _ in range(20):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    Path(out, f"{rank}").write_text(str(n / (time.perf_counter() - t0)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grpo(ckpt: Path, out: Path, world: int, steps: int) -> tuple[list[float], list[float]]:
    """(completions/s of each measured step, the busiest rank's CPU seconds of each measured step)."""
    argv = ["grpo", "--init", str(ckpt), "--out", str(out), "--steps", str(steps + 1), *GRPO]
    cpu_file = str(out) + ".cpu"
    mp.start_processes(_grpo, args=(world, free_port(), argv, cpu_file), nprocs=world, start_method="spawn")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    marks = [json.loads(Path(f"{cpu_file}.{r}").read_text()) for r in range(world)]
    cpu = [max(m[i + 1] - m[i] for m in marks) for i in range(len(marks[0]) - 1)]
    return [x["perf/completions_per_s"] for x in lines[1:]], cpu   # the first step warms up


def matmul_rate(world: int, seconds: float = 3.0) -> float:
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_matmul, args=(world, seconds, d), nprocs=world, start_method="spawn")
        return sum(float(Path(d, f"{r}").read_text()) for r in range(world))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side (after one warm-up)")
    ap.add_argument("--procs", type=int, default=2, help="processes of the parallel side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ckpt = checkpoint(Path(d) / "init")
        from qiusuo.checkpoint import load_checkpoint

        n_params = load_checkpoint(ckpt)[0].num_params()
        print(f"model {n_params / 1e6:.2f} M parameters; 8 prompts × 8 samples, ≤ 64 new tokens; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        bound = matmul_rate(args.procs) / matmul_rate(1)
        one, cpu1 = run_grpo(ckpt, Path(d) / "one", 1, args.steps)
        many, cpun = run_grpo(ckpt, Path(d) / "many", args.procs, args.steps)
        bound_after = matmul_rate(args.procs) / matmul_rate(1)
    m1, mn = statistics.median(one), statistics.median(many)
    print(f"1 process:   {m1:.1f} completions/s (median of {len(one)}: {', '.join(f'{x:.1f}' for x in one)})")
    print(f"{args.procs} processes: {mn:.1f} completions/s (median of {len(many)}: {', '.join(f'{x:.1f}' for x in many)})")
    print(f"ratio {mn / m1:.2f}× — matmul bound {args.procs} vs 1 process: {bound:.2f}× before, {bound_after:.2f}× after; "
          f"load average {os.getloadavg()[0]:.1f}")
    # With a core per process a step takes the busiest rank's CPU time (gloo waits without spinning):
    c1, cn = statistics.median(cpu1), statistics.median(cpun)
    print(f"CPU s per step: 1 process {c1:.2f}, busiest of {args.procs} {cn:.2f} — "
          f"{c1 / cn:.2f}× with a free core per process")


if __name__ == "__main__":
    main()
