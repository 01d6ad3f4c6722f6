"""`runs/<name>/report.md`: what each stage scored, what it cost and how its training went.

The report only reads files the stages left behind (config.yaml, metrics.jsonl, ledger.json,
eval/*.json), so it can be rebuilt at any time, also for a run that stopped half way.
Anything missing becomes a line in the report saying so, never an exception.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from qiusuo.ledger import git_info, hardware, read_json

log = logging.getLogger(__name__)

# The pipeline runs stages in this order; stages the report does not know come after it.
PREFERRED_ORDER = ("corpus", "base", "control", "sft", "zero", "r1")
# A sub-folder of a run is a stage when it holds one of these.
STAGE_FILES = ("config.yaml", "metrics.jsonl", "ledger.json")
# Sub-folders of a run that belong to the evaluator and to this report, not to a stage.
NOT_STAGES = ("eval", "plots")
# (key in eval JSON, label, shown as a percentage) for the score tables.
EVAL_METRICS = (
    ("pass@1", "pass@1", True),
    ("cons@k", "cons@k", True),
    ("trace_accuracy", "trace accuracy", True),
    ("trace_rate", "trace rate", True),
    ("reflection_rate", "reflection rate", True),
    ("mean_len", "mean response length", False),
)
# (file suffix, metrics key, axis label) of the GRPO plots.
GRPO_PLOTS = (
    ("reward", "rollout/reward_mean", "mean reward"),
    ("accuracy", "rollout/accuracy", "accuracy"),
    ("trace_accuracy", "rollout/trace_accuracy", "trace accuracy"),
    ("reflection", "rollout/reflection_rate", "reflection rate"),
    ("length", "rollout/len_mean", "mean response length (tokens)"),
    ("kl", "train/kl", "KL to reference"),
    ("entropy", "train/entropy", "entropy"),
)
# The trend line compares the mean of these metrics over this many first and last steps.
TREND_METRICS = (
    ("rollout/accuracy", "accuracy", True),
    ("rollout/trace_accuracy", "trace accuracy", True),
    ("rollout/reflection_rate", "reflection rate", True),
    ("rollout/len_mean", "response length", False),
)
TREND_STEPS = 10
COST_HEADER = [
    "stage", "device", "wall time", "FLOPs", "tokens",
    "device-hours", "$/device-hour", "cost (USD)", "achieved FLOP/s",
]
MISSING = "–"


def write_report(run_dir: str | Path, price_per_device_hour: float | None = None) -> Path:
    """Write `run_dir/report.md` and its plots under `run_dir/plots/`; return the report path.

    `price_per_device_hour` re-prices every stage (to compare hardware offers); without it
    each ledger's own price is used.
    """
    import matplotlib

    # Reports are written on headless machines; a GUI backend would fail or open windows.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    stages = discover_stages(run_dir)
    metrics = {s: read_metrics(run_dir / s / "metrics.jsonl") for s in stages}
    evals = _load_evals(run_dir)
    lines = [
        *_header_section(run_dir),
        *_summary_section(evals, run_dir),
        *_cost_section(run_dir, stages, price_per_device_hour),
        *_grpo_section(metrics, plots_dir, plt),
        *_pretrain_section(run_dir, metrics, plots_dir, plt),
        *_config_section(run_dir, stages),
    ]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------------- reading a run


def discover_stages(run_dir: str | Path) -> list[str]:
    """Names of the stage folders of a run, in pipeline order."""
    found = [
        p.name
        for p in Path(run_dir).iterdir()
        if p.is_dir() and p.name not in NOT_STAGES and any((p / f).exists() for f in STAGE_FILES)
    ]
    return sorted(found, key=_stage_key)


def _stage_key(name: str) -> tuple[int, str]:
    """Sort key: known stages in pipeline order, then the rest alphabetically."""
    rank = PREFERRED_ORDER.index(name) if name in PREFERRED_ORDER else len(PREFERRED_ORDER)
    return rank, name


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one per line; bad lines are skipped with a warning.

    A missing file gives []. Lines can be malformed when a run was killed mid-write.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s:%d: skipping malformed metrics line", path, lineno)
    return rows


def _load_evals(run_dir: Path) -> dict[str, dict]:
    """Eval results by stage name, from `eval/<stage>.json`, in pipeline order."""
    evals = {}
    for path in (run_dir / "eval").glob("*.json"):
        if path.name.endswith(".ledger.json"):
            continue
        result = read_json(path)
        if result is not None:
            evals[path.stem] = result
    return dict(sorted(evals.items(), key=lambda item: _stage_key(item[0])))


def _eval_ledger_names(run_dir: Path) -> list[str]:
    """Stages evaluated according to `eval/`, whether their result or their ledger survived."""
    files = (run_dir / "eval").glob("*.json")
    names = {p.name.removesuffix(".json").removesuffix(".ledger") for p in files}
    return sorted(names, key=_stage_key)


def _num(value: object) -> float | None:
    """`value` as a finite float, or None: these files are hand-editable and may hold junk."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the rows that logged it.

    Rows without a usable `step` are placed by their line position instead.
    """
    steps, values = [], []
    for i, row in enumerate(rows):
        value = _num(row.get(key))
        if value is not None:
            step = _num(row.get("step"))
            steps.append(step if step is not None else float(i))
            values.append(value)
    return steps, values


# ---------------------------------------------------------------------------- formatting


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, followed by the blank line Markdown needs to end it."""
    return [_row(header), _row(["---"] * len(header)), *map(_row, rows), ""]


def _fmt_value(value: float | None, percent: bool) -> str:
    """A score for a table: rates as percentages, lengths as plain numbers."""
    if value is None:
        return MISSING
    return f"{100 * value:.1f}%" if percent else f"{value:.1f}"


def _fmt_delta(first: float | None, last: float | None, percent: bool) -> str:
    """`last - first`; for rates in percentage points, which a relative change would blur."""
    if first is None or last is None:
        return MISSING
    return f"{100 * (last - first):+.1f} pt" if percent else f"{last - first:+.1f}"


def _fmt_duration(seconds: float | None) -> str:
    """Seconds as `12.3 s`, `4 min 05 s` or `2 h 07 min`."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_sci(value: float | None) -> str:
    """FLOP counts and rates span many orders of magnitude, so scientific notation."""
    return MISSING if value is None else f"{value:.3e}"


def _fmt_cost(value: float | None) -> str:
    """Dollars with enough decimals that a run of a few CPU minutes does not show as $0.00."""
    return MISSING if value is None else f"${value:.4f}"


def _fence(text: str, lang: str) -> list[str]:
    """A fenced code block, with a fence longer than any backtick run inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence]


# ---------------------------------------------------------------------------- 1. header


def _header_section(run_dir: Path) -> list[str]:
    """Title, date, code version and the machine the report was written on."""
    git = _repo_git_info()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Run report: `{run_dir.name}`",
        "",
        f"- Date: {now}",
        f"- Git commit: `{git['commit']}` (dirty: {'yes' if git['dirty'] else 'no'})",
        "",
        "### Hardware (the machine that wrote this report)",
        "",
    ]
    rows = [[key, _fmt_hardware(key, value)] for key, value in hardware().items()]
    return lines + _table(["item", "value"], rows)


def _repo_git_info() -> dict:
    """git_info of the checkout holding this package, else of the working directory.

    The package directory comes first because that is the code that produced the run;
    the working directory covers an installed (non-editable) package.
    """
    info = git_info(Path(__file__).resolve().parent)
    return info if info["commit"] != "unknown" else git_info(Path.cwd())


def _fmt_hardware(key: str, value: object) -> str:
    """A hardware table cell."""
    if value is None:
        return MISSING
    return f"{value:.1f} GiB" if key == "ram_gib" else str(value)


# ---------------------------------------------------------------------------- 2. summary


def _stage_table(evals: dict[str, dict], overall: list[dict], run_dir: Path | None) -> list[str]:
    """The paper-style table: a row per evaluated stage, a column per score, and the FLOPs its own
    training took (from the stage's ledger; the control is meant to match the RL stage)."""
    header = ["stage", *(_metric_label(k, label, evals) for k, label, _ in EVAL_METRICS), "training FLOPs"]
    rows = []
    for stage, o in zip(evals, overall):
        ledger = read_json(run_dir / stage / "ledger.json") if run_dir is not None else None
        flops = _num(ledger.get("flops")) if isinstance(ledger, dict) else None
        rows.append([f"`{stage}`", *(_fmt_value(_num(o.get(k)), pct) for k, _, pct in EVAL_METRICS), _fmt_sci(flops)])
    return _table(header, rows)


def _summary_section(evals: dict[str, dict], run_dir: Path | None = None) -> list[str]:
    """Scores of every evaluated stage side by side, overall and per task and difficulty."""
    lines = ["## Summary", ""]
    if not evals:
        return lines + ["No evaluation results: no `eval/<stage>.json` in this run.", ""]
    stages = list(evals)
    lines += [f"- `{s}`: {_eval_settings(e)}" for s, e in evals.items()]
    lines.append("")
    if len(stages) == 1:
        lines += ["Only one stage was evaluated, so there is no delta.", ""]
    overall = [e["overall"] if isinstance(e.get("overall"), dict) else {} for e in evals.values()]
    lines += _stage_table(evals, overall, run_dir)
    rows = [
        [_metric_label(key, label, evals), *_compare_cells([o.get(key) for o in overall], pct)]
        for key, label, pct in EVAL_METRICS
    ]
    lines += _table(["metric", *_compare_header(stages)], rows)
    return lines + _comparison_lines(evals) + _per_task_tables(evals)


# (later stage, earlier stage, metric key, label): the comparisons R1-Zero's claims rest on.
COMPARISONS = (
    ("zero", "base", "pass@1", "pass@1, RL over the base"),
    ("zero", "control", "pass@1", "pass@1, RL over the equal-compute control (more pretraining)"),
    ("zero", "base", "trace_accuracy", "trace accuracy, RL over the base"),
    ("zero", "base", "reflection_rate", "reflection rate, RL over the base"),
)


def _comparison_lines(evals: dict[str, dict]) -> list[str]:
    """One line per comparison whose two stages were both evaluated, in percentage points."""
    lines = []
    for later, earlier, key, label in COMPARISONS:
        if later in evals and earlier in evals:
            a = _num((evals[earlier].get("overall") or {}).get(key))
            b = _num((evals[later].get("overall") or {}).get(key))
            lines.append(f"- {label}: {_fmt_value(a, True)} → {_fmt_value(b, True)}, {_fmt_delta(a, b, True)}")
    return lines + [""] if lines else []


def _eval_settings(result: dict) -> str:
    """How a stage was evaluated, so scores from different settings are not compared blindly."""
    keys = ("checkpoint", "k", "temperature", "top_p", "n_problems")
    settings = [f"{key}={result[key]}" for key in keys if key in result]
    return ", ".join(settings) or "settings not recorded"


def _metric_label(key: str, label: str, evals: dict[str, dict]) -> str:
    """Row label; cons@k names its k when every stage used the same one."""
    ks = {e.get("k") for e in evals.values()}
    if key == "cons@k" and len(ks) == 1 and None not in ks:
        return f"cons@{ks.pop()}"
    return label


def _compare_header(stages: list[str]) -> list[str]:
    """Stage columns, plus a delta column when there is something to compare."""
    delta = [f"Δ {stages[-1]} − {stages[0]}"] if len(stages) > 1 else []
    return [f"`{s}`" for s in stages] + delta


def _compare_cells(raw: list[object], percent: bool) -> list[str]:
    """One cell per stage, plus last-minus-first when there are several stages."""
    values = [_num(v) for v in raw]
    cells = [_fmt_value(v, percent) for v in values]
    if len(values) > 1:
        cells.append(_fmt_delta(values[0], values[-1], percent))
    return cells


def _task_cells(result: dict) -> dict[tuple[str, str], dict]:
    """The per-task, per-difficulty score dicts of one eval result, keyed by (task, difficulty)."""
    tasks = result.get("tasks")
    if not isinstance(tasks, dict):
        return {}
    return {
        (task, str(level)): cell
        for task, levels in tasks.items()
        if isinstance(levels, dict)
        for level, cell in levels.items()
        if isinstance(cell, dict)
    }


def _difficulty_key(key: tuple[str, str]) -> tuple:
    """Tasks alphabetically; numeric difficulties in numeric order, then named ones ("all")."""
    task, level = key
    return (task, 0, int(level), "") if level.isdigit() else (task, 1, 0, level)


def _per_task_tables(evals: dict[str, dict]) -> list[str]:
    """One table per score, with a row per (task, difficulty)."""
    stages = list(evals)
    cells = {s: _task_cells(e) for s, e in evals.items()}
    keys = sorted({k for c in cells.values() for k in c}, key=_difficulty_key)
    if not keys:
        return ["No per-task results in the eval files.", ""]
    lines = []
    for metric, label, pct in EVAL_METRICS:
        rows = []
        for key in keys:
            per_stage = [cells[s].get(key, {}) for s in stages]
            n = next((c["n"] for c in per_stage if "n" in c), MISSING)
            rows.append([*key, str(n), *_compare_cells([c.get(metric) for c in per_stage], pct)])
        lines += [f"### {_metric_label(metric, label, evals)} by task and difficulty", ""]
        lines += _table(["task", "difficulty", "n", *_compare_header(stages)], rows)
    return lines


# ---------------------------------------------------------------------------- 3. cost


def _cost_section(run_dir: Path, stages: list[str], price: float | None) -> list[str]:
    """Wall time, compute and money per stage and per evaluation, with totals."""
    sources = [(s, run_dir / s / "ledger.json") for s in stages]
    sources += [
        (f"eval {s}", run_dir / "eval" / f"{s}.ledger.json") for s in _eval_ledger_names(run_dir)
    ]
    lines = ["## Time and cost", ""]
    if price is not None:
        lines += [f"All stages priced at ${price:.2f} per device-hour.", ""]
    else:
        lines += ["Each stage priced at the price per device-hour in its own ledger.", ""]
    rows, missing = [], []
    totals = {"wall_s": 0.0, "flops": 0.0, "tokens": 0.0, "device_hours": 0.0, "cost": 0.0}
    for label, path in sources:
        ledger = read_json(path)
        if ledger is None:
            where = path.relative_to(run_dir)
            missing.append(f"- `{label}`: no readable `{where}`, so its cost is not counted.")
            continue
        entry = _ledger_entry(ledger, price)
        if entry["cost"] is None:
            missing.append(f"- `{label}`: no device-hours or price in its ledger, so no cost.")
        for key in totals:
            totals[key] += entry[key] or 0.0
        rows.append(_cost_row(f"`{label}`", entry))
    if not rows:
        return lines + ["No ledgers in this run, so nothing to cost.", "", *missing, ""]
    rows.append(_cost_row("**total**", {**totals, "device": "", "price": None, "achieved": None}))
    lines += _table(COST_HEADER, rows)
    return lines + (missing + [""] if missing else [])


def _ledger_entry(ledger: dict, price: float | None) -> dict:
    """The numbers of one ledger, re-priced when a price is given."""
    wall_s = _num(ledger.get("wall_s"))
    hours = _num(ledger.get("device_hours"))
    if hours is None and wall_s is not None:
        hours = wall_s / 3600
    if price is None:
        price = _num(ledger.get("price_per_device_hour"))
    return {
        "device": str(ledger.get("device", MISSING)),
        "wall_s": wall_s,
        "flops": _num(ledger.get("flops")),
        "tokens": _num(ledger.get("tokens")),
        "device_hours": hours,
        "price": price,
        "cost": hours * price if hours is not None and price is not None else None,
        "achieved": _num(ledger.get("achieved_flops_per_s")),
    }


def _cost_row(label: str, entry: dict) -> list[str]:
    """One row of the cost table."""
    tokens, hours, price = entry["tokens"], entry["device_hours"], entry["price"]
    return [
        label,
        entry["device"],
        _fmt_duration(entry["wall_s"]),
        _fmt_sci(entry["flops"]),
        MISSING if tokens is None else f"{int(tokens):,}",
        MISSING if hours is None else f"{hours:.4f}",
        "" if price is None else f"${price:.2f}",
        _fmt_cost(entry["cost"]),
        "" if entry["achieved"] is None else _fmt_sci(entry["achieved"]),
    ]


# ---------------------------------------------------------------------------- 4-5. curves


def _is_grpo(rows: list[dict]) -> bool:
    """GRPO stages are the ones that log rollouts."""
    return any("rollout/reward_mean" in row for row in rows)


def _grpo_section(metrics: dict[str, list[dict]], plots_dir: Path, plt) -> list[str]:
    """Reward, accuracy, length, KL and entropy per step for every GRPO stage."""
    lines = ["## GRPO curves", ""]
    grpo = [s for s, rows in metrics.items() if _is_grpo(rows)]
    if not grpo:
        return lines + ["No stage logged `rollout/reward_mean`.", ""]
    for stage in grpo:
        lines += [f"### `{stage}`", "", _trend_line(metrics[stage]), ""]
        figure3 = _figure3(plt, metrics[stage], plots_dir / f"{stage}_reflection_length.png", stage)
        if figure3:
            lines += [f"![{stage} reflection rate and length per step](plots/{figure3.name})", ""]
        for name, key, label in GRPO_PLOTS:
            steps, values = _series(metrics[stage], key)
            if not values:
                lines += [f"No `{key}` logged, so no {name} plot.", ""]
                continue
            path = plots_dir / f"{stage}_{name}.png"
            _plot(plt, steps, values, path, f"{stage}: {label}", label)
            lines += [f"![{stage} {label}](plots/{path.name})", ""]
    return lines


def _figure3(plt, rows: list[dict], path: Path, stage: str) -> Path | None:
    """The R1 paper's Figure 3 measured: mean response length per RL step, and on a second axis the
    share of rollouts that reflect (re-check a step) — the "aha moment" as a curve. None when neither
    was logged."""
    len_steps, lengths = _series(rows, "rollout/len_mean")
    ref_steps, reflections = _series(rows, "rollout/reflection_rate")
    if not lengths and not reflections:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(len_steps, lengths, color="tab:blue", linewidth=1.5, label="mean length")
    ax.set(title=f"{stage}: response length and reflection per step", xlabel="step", ylabel="tokens")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(ref_steps, [100 * v for v in reflections], color="tab:red", linewidth=1.5, label="reflection rate")
    right.set_ylabel("reflection rate (%)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _trend_line(rows: list[dict]) -> str:
    """Mean accuracy and response length over the first vs the last steps of a GRPO run."""
    parts = []
    for key, label, pct in TREND_METRICS:
        _, values = _series(rows, key)
        if not values:
            parts.append(f"{label}: not logged")
            continue
        # Short runs shrink the window so that the two ends do not overlap.
        window = max(1, min(TREND_STEPS, len(values) // 2))
        first, last = float(np.mean(values[:window])), float(np.mean(values[-window:]))
        parts.append(
            f"{label} {_fmt_value(first, pct)} (first {window} steps) → "
            f"{_fmt_value(last, pct)} (last {window} steps), {_fmt_delta(first, last, pct)}"
        )
    return "; ".join(parts) + "."


def _pretrain_section(
    run_dir: Path, metrics: dict[str, list[dict]], plots_dir: Path, plt
) -> list[str]:
    """Loss per step of stages that train on text, and a note on stages with no curves."""
    lines = ["## Pretraining curves", ""]
    plotted = 0
    for stage, rows in metrics.items():
        steps, losses = _series(rows, "train/loss")
        if _is_grpo(rows) or not losses:
            continue
        path = plots_dir / f"{stage}_loss.png"
        _plot(plt, steps, losses, path, f"{stage}: training loss", "loss")
        lines += [
            f"### `{stage}`",
            "",
            f"Loss {losses[0]:.3f} at step {steps[0]:g} → {losses[-1]:.3f} at step {steps[-1]:g} "
            f"(lowest {min(losses):.3f}).",
            "",
            f"![{stage} loss](plots/{path.name})",
            "",
        ]
        plotted += 1
    if not plotted:
        lines += ["No pretraining stage logged `train/loss`.", ""]
    return lines + _no_curves_note(run_dir, metrics)


def _no_curves_note(run_dir: Path, metrics: dict[str, list[dict]]) -> list[str]:
    """Say which stages have no curves at all, and why, so a gap is not mistaken for a bug."""
    notes = []
    for stage, rows in metrics.items():
        if not (run_dir / stage / "metrics.jsonl").exists():
            notes.append(f"- `{stage}`: no metrics.jsonl.")
        elif not rows:
            notes.append(f"- `{stage}`: metrics.jsonl is empty or unreadable.")
        elif not _is_grpo(rows) and not _series(rows, "train/loss")[1]:
            notes.append(f"- `{stage}`: neither `rollout/reward_mean` nor `train/loss` logged.")
    return ["Stages without curves:", "", *notes, ""] if notes else []


def _plot(
    plt, steps: list[float], values: list[float], path: Path, title: str, ylabel: str
) -> None:
    """Save one metric against step as a PNG, with a moving average once the curve is long."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    # RL metrics are noisy from step to step; a moving average shows the trend through it.
    window = len(values) // 10
    smooth = window >= 2
    ax.plot(steps, values, linewidth=1, alpha=0.4 if smooth else 1.0, label="per step")
    if smooth:
        averaged = np.convolve(values, np.ones(window) / window, mode="valid")
        label = f"mean of the last {window} steps"
        ax.plot(steps[window - 1 :], averaged, linewidth=2, label=label)
        ax.legend()
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- 6. config


def _config_section(run_dir: Path, stages: list[str]) -> list[str]:
    """Each stage's resolved config, folded away because it is long and rarely read."""
    lines = ["## Config", ""]
    for stage in stages:
        path = run_dir / stage / "config.yaml"
        if not path.exists():
            lines += [f"`{stage}`: no config.yaml.", ""]
            continue
        lines += [
            "<details>",
            f"<summary><code>{stage}</code> config.yaml</summary>",
            "",
            *_fence(path.read_text(errors="replace"), "yaml"),
            "",
            "</details>",
            "",
        ]
    if not stages:
        lines += ["No stages found.", ""]
    return lines
