"""Measure `make paper` against its targets: pipeline time ≤ 30 min on the 2-core machine, and the
distilled student beating the same-size student trained with RL alone (held-out pass@1).

    .venv/bin/python bench/paper_time.py [--config configs/paper.yaml] [--read runs/paper]

Without --read it runs the whole pipeline from an empty folder (bench/out/paper) and times it; with
--read it reports on a finished run. Prints wall time per stage (from the ledgers), the main table's
pass@1 and language consistency (per question language and overall) per model, the target checks
and the machine's load; writes the same as JSON next to the run."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 30 * 60


def run_pipeline(run: Path, config: Path) -> float:
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qiusuo.cli", "paper", "--run", str(run), "--config", str(config)],
                   check=True, cwd=ROOT)
    return time.perf_counter() - t0


def summarise(run: Path, wall: float | None) -> dict:
    sys.path.insert(0, str(ROOT))
    from qiusuo.paper import ROWS, row_figures

    stages = {str(p.relative_to(run)): round(json.loads(p.read_text())["wall_s"], 1)
              for p in sorted(run.rglob("*ledger.json"))}
    rows = {label: row_figures(run, model, lineage, None) for label, model, lineage in ROWS}
    total = wall if wall is not None else sum(stages.values())
    distilled, rl_only = rows.get("distilled student"), rows.get("student, RL only")
    return {"run": str(run), "wall_s": round(total, 1), "measured_by": "clock" if wall is not None else "ledgers",
            "target_s": TARGET_S, "load_avg": os.getloadavg(), "stages": stages,
            "pass@1": {label: None if f is None else round(100 * f["pass@1"], 1) for label, f in rows.items()},
            "lang_consistency": {label: None if f is None else
                                 {lang: None if x["lang"] is None else round(100 * x["lang"], 1)
                                  for lang, x in {**f["langs"], "all": {"lang": f["lang"]}}.items()}
                                 for label, f in rows.items()},
            "distilled_beats_rl_only": None if not (distilled and rl_only) else distilled["pass@1"] > rl_only["pass@1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "paper")
    ap.add_argument("--read", type=Path, default=None, help="report on a finished run instead of running one")
    args = ap.parse_args()
    run = args.read or args.out
    wall = None if args.read else run_pipeline(run, args.config)
    r = summarise(run, wall)
    for stage, s in r["stages"].items():
        print(f"    {stage:<32} {s:7.1f} s")
    for label, p in r["pass@1"].items():
        lang = ", ".join(f"{x} {'—' if c is None else f'{c:.1f}'}" for x, c in (r["lang_consistency"][label] or {}).items())
        print(f"    {label:<34} pass@1 {'—' if p is None else f'{p:.1f} %'}   language consistency: {lang or '—'}")
    print(f"pipeline {r['wall_s']:.0f} s ({r['measured_by']}; target ≤ {TARGET_S} s, ratio {r['wall_s'] / TARGET_S:.2f}); "
          f"distilled student beats RL-only student: {r['distilled_beats_rl_only']}; "
          f"load average {', '.join(f'{x:.1f}' for x in r['load_avg'])}")
    (run / "paper_time.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
