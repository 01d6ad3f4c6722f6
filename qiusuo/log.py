"""Per-step logging shared by the training stages: `metrics.jsonl`, one readable line, a progress bar."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Wide when not a terminal, so one step stays one line in logs and CI output.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 240)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop the lines of a per-step JSONL file (and a half-written last line) after the
    checkpoint's step: those steps will be run again."""
    from .model import atomic_write_text

    keep = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))  # a kill while rewriting loses nothing


class StepLog:
    """Append metrics to `<folder>/metrics.jsonl` and show progress.

    `line_keys` maps metric keys to short labels for the one-line-per-step summary."""

    def __init__(self, folder: Path, total_steps: int, start_step: int, line_keys: dict[str, str],
                 every: int = 1, resume: bool = False):
        self.path = Path(folder) / "metrics.jsonl"
        if not resume:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            truncate_after(self.path, start_step)
        self.total, self.line_keys, self.every = total_steps, line_keys, max(1, every)
        self.t0, self.start_step = time.perf_counter(), start_step
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=not sys.stderr.isatty())
        self.task = self.progress.add_task(Path(folder).name, total=total_steps, completed=start_step)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, float) and math.isnan(v):
                raise FloatingPointError(f"step {step}: {k} is NaN — stopping (last good checkpoint kept)")
        record = {"step": step, **metrics, "time_s": round(time.perf_counter() - self.t0, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.progress.update(self.task, completed=step)
        if step % self.every == 0 or step == self.total:
            self.progress.console.print(self.line(step, record))

    def line(self, step: int, record: dict) -> str:
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}"]
        for key, label in self.line_keys.items():
            v = record.get(key)
            if v is not None:
                parts.append(f"{label} {v:.4g}" if isinstance(v, float) else f"{label} {v}")
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        if done > 0:
            parts.append(f"eta {elapsed / done * (self.total - step):.0f}s")
        return " | ".join(parts)
