"""Measure the tiny R1-Zero demo against its targets (issue 16): pipeline time (install excluded)
≤ 6 min on the 2-core machine; held-out pass@1 of the RL checkpoint ≥ base + 25 points and ≥ the
equal-compute control + 20 points; trace accuracy ≥ base + 10 points.

    .venv/bin/python bench/demo_time.py [--runs 1] [--config configs/demo.yaml] [--check]

Each run starts from an empty run folder; the script prints, per run, the scores of base / control /
zero (pass@1, trace accuracy, reflection rate, mean length), the wall time and FLOPs of every stage and
the host's load average before and after (the machine may be shared: a load above the core count
slows every stage), then the medians over the runs. With `--check`, each run's checkpoints are also
re-measured by bench/demo_check.py (transformers sampling, its own problems and strict checker).

Before the runs it measures the bound: the fp32 matmul rate of this host at the pretraining's own
shapes (every linear layer's forward, input-gradient and weight-gradient product at one batch of
packed rows), with torch's thread count as the pipeline runs it (`OMP_NUM_THREADS`, else every core),
and prints each stage's FLOPs over that rate beside its wall time."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 360
STAGES = ("base", "control", "zero")


def matmul_rate(config: Path) -> float:
    """GFLOP/s of fp32 matmuls at the shapes of one pretraining step (best of 5 timings per shape,
    weighted by each shape's FLOPs): a step's FLOPs over this rate is the least time it can take."""
    import torch

    from qiusuo.config import read_yaml
    from qiusuo.sft import SFTConfig
    from qiusuo.tokenizer import Tokenizer

    pre = SFTConfig(**(read_yaml(config).get("pretrain") or {}))
    m, tokens = pre.model, pre.batch_size * (pre.max_len - 1)
    h, inter, head = m["hidden_size"], m["intermediate_size"], m["hidden_size"] // m["num_attention_heads"]
    kv = m["num_key_value_heads"] * head
    linears = [(h, h, 2), (h, kv, 2), (h, inter, 2), (inter, h, 1), (h, Tokenizer.char_level().vocab_size, 1)]
    flops = seconds = 0.0
    for fan_in, fan_out, count in linears:   # per layer (head: once; the products weigh alike at this size)
        for a_shape, b_shape in (((tokens, fan_in), (fan_in, fan_out)), ((tokens, fan_out), (fan_out, fan_in)),
                                 ((fan_in, tokens), (tokens, fan_out))):
            a, b = torch.randn(*a_shape), torch.randn(*b_shape)
            for _ in range(3):
                a @ b
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(10):
                    a @ b
                best = min(best, (time.perf_counter() - t) / 10)
            flops += 2 * a_shape[0] * a_shape[1] * b_shape[1] * count
            seconds += best * count
    return flops / seconds / 1e9


def one_run(run: Path, config: Path) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qiusuo.cli", "demo", "--run", str(run), "--config", str(config)],
                   check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    scores = {s: json.loads((run / "eval" / f"{s}.json").read_text())["overall"] for s in STAGES}
    metrics = [json.loads(x) for x in (run / "zero" / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(metrics) // 5)
    ends = {key: (statistics.mean(m.get(key, 0.0) for m in metrics[:k]),
                  statistics.mean(m.get(key, 0.0) for m in metrics[-k:]))
            for key in ("rollout/len_mean", "rollout/reflection_rate", "rollout/trace_accuracy")}
    stages = {}
    for p in sorted(run.rglob("*ledger.json")):
        ledger = json.loads(p.read_text())
        stages[str(p.relative_to(run))] = (ledger["wall_s"], ledger["flops"])
    return {"wall_s": wall, "scores": scores, "ends": ends, "stages": stages,
            "load": (load_before[0], os.getloadavg()[0]), "cores": os.cpu_count(),
            "rl_vs_base": 100 * (scores["zero"]["pass@1"] - scores["base"]["pass@1"]),
            "rl_vs_control": 100 * (scores["zero"]["pass@1"] - scores["control"]["pass@1"]),
            "trace_vs_base": 100 * ((scores["zero"]["trace_accuracy"] or 0) - (scores["base"]["trace_accuracy"] or 0))}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "demo")
    ap.add_argument("--check", action="store_true", help="re-measure each run with bench/demo_check.py")
    args = ap.parse_args()
    import torch

    rate = matmul_rate(args.config)
    print(f"fp32 matmul rate at the pretraining's shapes: {rate:.0f} GFLOP/s with {torch.get_num_threads()} "
          f"torch threads (load average {os.getloadavg()[0]:.1f})")
    results = []
    for i in range(args.runs):
        r = one_run(args.out / f"run{i}", args.config)
        results.append(r)
        print(f"\nrun {i}: pipeline {r['wall_s']:.0f} s on {r['cores']} cores, load average "
              f"{r['load'][0]:.1f} before → {r['load'][1]:.1f} after")
        print(f"    {'stage':<8} {'pass@1':>7} {'cons@k':>7} {'trace acc':>9} {'traces':>7} {'reflect':>7} {'length':>7}")
        for s in STAGES:
            o = r["scores"][s]
            print(f"    {s:<8} {pct(o['pass@1']):>7} {pct(o['cons@k']):>7} {pct(o.get('trace_accuracy')):>9} "
                  f"{pct(o.get('trace_rate')):>7} {pct(o.get('reflection_rate')):>7} {o['mean_len']:7.1f}")
        for key, (a, b) in r["ends"].items():
            print(f"    GRPO {key}: {a:.3f} (first fifth of the steps) → {b:.3f} (last fifth)")
        for stage, (s, flops) in r["stages"].items():
            print(f"    {stage:<28} {s:7.1f} s  {flops:.3e} FLOPs  (at the matmul rate: {flops / rate / 1e9:5.1f} s)")
        if args.check:   # after the timing: the check's own time is not the pipeline's
            subprocess.run([sys.executable, str(ROOT / "bench" / "demo_check.py"), "--run", str(args.out / f"run{i}"),
                            "--json", str(args.out / f"run{i}" / "check.json")], check=True, cwd=ROOT)
    med = {k: statistics.median(r[k] for r in results)
           for k in ("wall_s", "rl_vs_base", "rl_vs_control", "trace_vs_base")}
    print(f"\nmedian of {len(results)}: pipeline {med['wall_s']:.0f} s (target ≤ {TARGET_S} s), pass@1 RL − base "
          f"{med['rl_vs_base']:+.1f} pt (target ≥ +25), RL − control {med['rl_vs_control']:+.1f} pt (target ≥ +20), "
          f"trace accuracy RL − base {med['trace_vs_base']:+.1f} pt (target ≥ +10)")


if __name__ == "__main__":
    main()
