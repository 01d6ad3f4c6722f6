"""Evaluation as in DeepSeek-R1: pass@1 averaged over k samples, and cons@k (majority vote).

R1 samples k responses per question at temperature 0.6, top-p 0.95 and reports
pass@1 = (1/k) Σ_i p_i (p_i = 1 when sample i is correct), averaged over questions; cons@k takes the most
frequent answer among the k samples and scores it. Both per task and difficulty, on the held-out split,
with the same strict parser and scorer the RL reward uses.

Besides the paper's two scores, each task and difficulty reports what R1-Zero's analysis looks at: trace
accuracy (the share of correct answers among completions that reason, i.e. whose `<think>` is not empty:
does RL make the reasoning itself better, or only choose it more often?), trace rate (the share of
completions that reason), reflection rate (the share of completions that re-check a step, `tasks.REFLECTION`)
and mean completion length in tokens.

Voting is on the task's canonical answer (`Task.vote_key`: the integer for arithmetic, the value of a
valid expression for Countdown), so `10*2`, `2*10` and `(10*2)` are one answer. Departures: a sample
whose completion does not parse casts no vote (a question whose samples are all unparseable counts as
wrong); a tie goes to the answer seen first. The held-out questions are distinct problems (by
`Problem.key`, which ignores operand order), never seen by corpus or GRPO (the tasks' held-out split).

With `data`, the questions are a dataset file's (qiusuo/data.py), scored by math-verify with the same
answer extraction as the RL reward, and reported per source and level in the same shape.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import dist
from .checkpoint import load_checkpoint
from .data import DataOptions, levels_by_source, load_problems
from .engine import Engine, SamplingParams
from .ledger import StageLedger, forward_flops, hardware
from .language import check_langs, consistency, pose, question_lang
from .log import console
from .rewards import STRICT, ReasoningFormat, parse_completion
from .tasks import get_task, reflects, source_of


@dataclass
class EvalConfig:
    """Settings of `qiusuo eval`."""

    checkpoint: str = "runs/tiny/base"
    """Checkpoint folder to evaluate."""
    out: str | None = None
    """Result file; empty: <run>/eval/<stage>.json next to the checkpoint's stage folder."""
    tasks: dict = field(default_factory=lambda: {"arith": [2, 3, 4, 5], "countdown": [3, 4]})
    """Task name → difficulties to evaluate (held-out split)."""
    n_per_difficulty: int = 30
    """Held-out questions per task and difficulty."""
    k: int = 8
    """Samples per question."""
    temperature: float = 0.6
    """Sampling temperature (R1: 0.6)."""
    top_p: float = 0.95
    """Top-p (R1: 0.95)."""
    max_new_tokens: int = 128
    """Completion length cap."""
    langs: list = field(default_factory=list)
    """Languages to pose every held-out question in (en, zh); empty: prompts as the tasks write them.
    Adds language consistency (share of the CoT in the question's language) and per-language scores."""
    data: str | None = None
    """Dataset file of math problems (JSONL, Parquet or a save_to_disk folder) to evaluate instead of
    `tasks`; scores per source and level."""
    data_options: dict = field(default_factory=dict)
    """How to read `data`: template, field names, on_bad_row, limit (qiusuo/data.py, DataOptions)."""
    seed: int = 1234
    """Seed of the held-out questions and of sampling."""
    device: str = "cpu"
    """torch device."""
    price_per_device_hour: float = 0.10
    """Dollars per device-hour for the cost ledger."""

    def __post_init__(self) -> None:
        for name in self.tasks:
            get_task(name)
        check_langs({lang: 1 for lang in self.langs}, "langs")
        if self.data:
            DataOptions.of(self.data_options)
        if self.k < 1 or self.n_per_difficulty < 1:
            raise ValueError("k and n_per_difficulty must be ≥ 1")

    def result_path(self) -> Path:
        if self.out:
            return Path(self.out)
        ckpt = Path(self.checkpoint)
        return ckpt.parent / "eval" / f"{ckpt.name}.json"


# Seeds tried per wanted question before a (task, difficulty) is declared too small to fill.
DRAWS_PER_PROBLEM = 50


def distinct_problems(task, split: str, difficulty: int, n: int, first_seed: int) -> list:
    """`n` distinct problems of one task, split and difficulty, drawn with seeds first_seed, first_seed + 1, ….
    Duplicates (by canonical key) are skipped; a difficulty whose split holds fewer than `n` problems
    is an error naming it, not a silently shorter or repeated list."""
    seen, out = set(), []
    for i in range(n * DRAWS_PER_PROBLEM):
        p = task.sample(split, seed=first_seed + i, difficulty=difficulty)
        if p.key() not in seen:
            seen.add(p.key())
            out.append(p)
            if len(out) == n:
                return out
    label = "held-out" if split == "heldout" else split
    raise ValueError(f"{task.name} difficulty {difficulty}: found only {len(out)} distinct {label} problems "
                     f"in {n * DRAWS_PER_PROBLEM} draws, {n} asked (n_per_difficulty)")


def heldout_problems(cfg: EvalConfig) -> list:
    """The held-out questions; with `langs`, each question once per language. With `data`, the file's."""
    if cfg.data:
        return load_problems(cfg.data, DataOptions.of(cfg.data_options))
    problems = [p for name, diffs in cfg.tasks.items() for d in diffs
                for p in distinct_problems(get_task(name), "heldout", d, cfg.n_per_difficulty, cfg.seed * 10_007)]
    return [pose(p, lang) for p in problems for lang in cfg.langs] if cfg.langs else problems


def majority_correct(task, problem, answers: list[str]) -> float:
    """cons@k of one question: the score of the most frequent canonical answer (`Task.vote_key`);
    0 when no sample gave an answer. A tie goes to the key seen first."""
    if not answers:
        return 0.0
    keys = [task.vote_key(problem, a) for a in answers]
    top = Counter(keys).most_common(1)[0][0]   # most_common keeps first-seen order among equal counts
    return task.score(problem, answers[keys.index(top)])[0]


def score_samples(problem, texts: list[str], fmt: ReasoningFormat = STRICT) -> dict:
    """pass@1 (mean correctness over the k samples) and cons@k (the majority answer's correctness), and
    the counts behind trace accuracy and reflection rate: `samples`, `traces` (well-formed completions
    with a non-empty `<think>`), `traces_correct` (those of them that are right) and `reflections`
    (completions that re-check a step, well-formed or not)."""
    task = get_task(problem.task)
    answers, correct, lang = [], [], []
    traces = traces_correct = reflections = 0
    for text in texts:
        reflections += reflects(text)
        answer, parsed = task.answer_of(problem, text, fmt), parse_completion(text, fmt)
        if answer is None:
            correct.append(0.0)
            continue
        answers.append(answer)
        correct.append(task.score(problem, answer)[0])
        if parsed and parsed[0]:
            traces += 1
            traces_correct += int(correct[-1] == 1.0)
        if question_lang(problem) and parsed and parsed[0]:   # a direct answer has no CoT to measure
            lang.append(consistency(parsed[0], question_lang(problem)))
    row = {"pass@1": sum(correct) / len(texts), "cons@k": majority_correct(task, problem, answers),
           "samples": len(texts), "traces": traces, "traces_correct": traces_correct, "reflections": reflections}
    if lang:   # language consistency among the samples that have a chain of thought to measure
        row["lang_consistency"] = sum(lang) / len(lang)
    return row


def summarise(rows: list[dict]) -> dict:
    """Means over questions (pass@1, cons@k, length); trace accuracy, trace rate and reflection rate
    pool the samples of every question (trace accuracy is None when no sample reasoned)."""
    n = len(rows)
    samples = sum(r["samples"] for r in rows)
    traces = sum(r["traces"] for r in rows)
    out = {"pass@1": sum(r["pass@1"] for r in rows) / n, "cons@k": sum(r["cons@k"] for r in rows) / n,
           "n": n, "mean_len": sum(r["mean_len"] for r in rows) / n,
           "trace_accuracy": sum(r["traces_correct"] for r in rows) / traces if traces else None,
           "trace_rate": traces / samples, "reflection_rate": sum(r["reflections"] for r in rows) / samples}
    lang = [r["lang_consistency"] for r in rows if "lang_consistency" in r]
    if lang:
        out["lang_consistency"] = sum(lang) / len(lang)
    return out


def evaluate(cfg: EvalConfig) -> dict:
    t0 = time.perf_counter()
    world, device = dist.init(cfg.device)
    ledger = StageLedger(f"eval/{Path(cfg.checkpoint).name}", cfg.price_per_device_hour, hardware()["device"], world.size)
    model, tok = load_checkpoint(cfg.checkpoint, device)
    model.eval()
    engine = Engine(model, tok)
    problems = heldout_problems(cfg)
    prompts = [get_task(p.task).prompt_ids(p, tok) for p in problems]

    def generate(a: int, b: int) -> list:
        # row r of the whole batch samples from stream seed + r wherever it runs (torchrun: by shard)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=cfg.seed + a * cfg.k)
        return engine.generate(prompts[a:b], params, n=cfg.k)

    completions = [c for part in dist.gather_shards(len(problems), generate) for c in part]
    rows = []
    for i, p in enumerate(problems):
        group = completions[i * cfg.k:(i + 1) * cfg.k]
        row = score_samples(p, [c.text for c in group], tok.reasoning)
        row.update(task=source_of(p), difficulty=p.difficulty, lang=question_lang(p),
                   mean_len=sum(len(c.token_ids) for c in group) / cfg.k)
        rows.append(row)
    tasks: dict = {}
    layout = cfg.tasks if not cfg.data else levels_by_source(problems)   # report name → difficulties
    for name in layout:
        mine = [r for r in rows if r["task"] == name]
        tasks[name] = {str(d): summarise([r for r in mine if r["difficulty"] == d]) for d in layout[name]}
        tasks[name]["all"] = summarise(mine)
    gen_tokens = sum(len(c.token_ids) for c in completions)
    mc = model.config
    result = {"checkpoint": str(cfg.checkpoint), "k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
              "n_problems": len(problems), "overall": summarise(rows), "tasks": tasks,
              "langs": {lang: summarise([r for r in rows if r["lang"] == lang]) for lang in cfg.langs},
              "wall_s": round(time.perf_counter() - t0, 3), "generated_tokens": gen_tokens, "config": asdict(cfg)}
    if not dist.is_main():
        return result
    path = cfg.result_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    from .model import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2))
    # attention context: the mean prompt plus the mean completion length
    ctx = sum(map(len, prompts)) / len(problems) + gen_tokens / len(completions)
    ledger.add(forward_flops(model.num_params(), gen_tokens, mc.num_hidden_layers, mc.hidden_size, int(ctx)), gen_tokens)
    ledger.finish(path.with_suffix(".ledger.json"))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} — pass@1 over k={result['k']} samples, cons@{result['k']}")
    for col in ("task", "difficulty", "n", "pass@1", f"cons@{result['k']}", "trace acc", "traces", "reflect",
                "mean len"):
        table.add_column(col, justify="right")

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    def cells(s):
        return [str(s["n"]), pct(s["pass@1"]), pct(s["cons@k"]), pct(s.get("trace_accuracy")),
                pct(s.get("trace_rate")), pct(s.get("reflection_rate")), f"{s['mean_len']:.1f}"]

    for name, per in result["tasks"].items():
        for d, s in per.items():
            table.add_row(name, d, *cells(s))
    table.add_row("all", "", *cells(result["overall"]))
    console.print(table)
    for lang, s in result.get("langs", {}).items():
        console.print(f"questions in {lang}: pass@1 {100 * s['pass@1']:.1f}, cons@k {100 * s['cons@k']:.1f}, "
                      f"language consistency {100 * s.get('lang_consistency', 1.0):.1f}")
