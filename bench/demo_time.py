"""Measure the tiny R1-Zero demo against its targets: pipeline time (install excluded) ≤ 10 min on the
2-core machine, held-out pass@1 of the RL checkpoint ≥ base + 20 points, mean response length rising
during GRPO.

    .venv/bin/python bench/demo_time.py [--runs 1] [--config configs/demo.yaml]

Each run starts from an empty run folder; the script prints a table per run and the medians."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(run: Path, config: Path) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qiusuo.cli", "demo", "--run", str(run), "--config", str(config)],
                   check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    base = json.loads((run / "eval" / "base.json").read_text())["overall"]
    zero = json.loads((run / "eval" / "zero.json").read_text())["overall"]
    metrics = [json.loads(x) for x in (run / "zero" / "metrics.jsonl").read_text().splitlines()]
    lens = [m["rollout/len_mean"] for m in metrics]
    k = max(1, len(lens) // 5)
    stages = {}
    for p in sorted(run.rglob("*ledger.json")):
        stages[str(p.relative_to(run))] = json.loads(p.read_text())["wall_s"]
    return {"wall_s": wall, "base_pass1": base["pass@1"], "zero_pass1": zero["pass@1"],
            "delta_points": 100 * (zero["pass@1"] - base["pass@1"]),
            "len_first": statistics.mean(lens[:k]), "len_last": statistics.mean(lens[-k:]), "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "demo")
    args = ap.parse_args()
    results = []
    for i in range(args.runs):
        r = one_run(args.out / f"run{i}", args.config)
        results.append(r)
        print(f"run {i}: pipeline {r['wall_s']:.0f} s | pass@1 base {100 * r['base_pass1']:.1f}% → zero "
              f"{100 * r['zero_pass1']:.1f}% ({r['delta_points']:+.1f} pt) | GRPO mean length "
              f"{r['len_first']:.1f} → {r['len_last']:.1f} tokens")
        for stage, s in r["stages"].items():
            print(f"    {stage:<28} {s:7.1f} s")
    med = {k: statistics.median(r[k] for r in results) for k in ("wall_s", "delta_points", "len_first", "len_last")}
    print(f"\nmedian of {len(results)}: pipeline {med['wall_s']:.0f} s (target ≤ 600 s, ratio {med['wall_s'] / 600:.2f}), "
          f"Δpass@1 {med['delta_points']:+.1f} pt (target ≥ +20), length {med['len_first']:.1f} → {med['len_last']:.1f}")


if __name__ == "__main__":
    main()
