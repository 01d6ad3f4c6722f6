"""Measure the tiny R1-Zero demo against its targets (issue 16): pipeline time (install excluded)
≤ 6 min on the 2-core machine; held-out pass@1 of the RL checkpoint ≥ base + 25 points and ≥ the
equal-compute control + 20 points; trace accuracy ≥ base + 10 points.

    .venv/bin/python bench/demo_time.py [--runs 1] [--config configs/demo.yaml] [--check]

Each run starts from an empty run folder; the script prints, per run, the scores of base / control /
zero (pass@1, trace accuracy, reflection rate, mean length), the wall time and FLOPs of every stage and
the host's load average before and after (the machine may be shared: a load above the core count
slows every stage), then the medians over the runs. With `--check`, each run's checkpoints are also
re-measured by bench/demo_check.py (transformers sampling, its own problems and strict checker)."""
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
            print(f"    {stage:<28} {s:7.1f} s  {flops:.3e} FLOPs")
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
