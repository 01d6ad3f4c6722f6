"""The synthetic pretraining corpus that leaves the tiny base model an *imperfect* reasoner.

docs/design.md §4: for the same problem families, mix short direct answers (cheap, often wrong on hard
instances) with step-by-step traces (longer, right) and some flawed traces. The base model then holds a
weak, inconsistent ability — sampled at R1's T = 0.6 it mostly answers directly and is often wrong — that
GRPO can sharpen into choosing, and executing, the trace.

Every problem comes from the tasks' *train* split, so held-out evaluation problems are never seen.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .language import check_langs, localize, other, pose
from .rewards import parse_completion
from .tasks import STYLES, format_completion, get_task

# The styles whose traces are always right, which `weak_slip_share` makes flawed in the weak language.
RIGHT_TRACES = ("steps", "checked")


@dataclass
class CorpusConfig:
    """Settings of `qiusuo corpus`."""

    out: str = "runs/tiny/corpus"
    """Stage folder; the corpus is written to `<out>/train.jsonl`."""
    tasks: dict = field(default_factory=lambda: {"arith": [1, 2, 3, 4, 5], "countdown": [3, 4]})
    """Task name → difficulties to draw from (uniformly)."""
    task_weights: dict = field(default_factory=lambda: {"arith": 0.6, "countdown": 0.4})
    """Task name → share of the examples."""
    styles: dict = field(default_factory=lambda: {"direct": 0.45, "steps": 0.3, "flawed": 0.17, "reflect": 0.08})
    """Completion style → share. Direct answers are guesses, steps are right, flawed traces hold one
    slip carried through to a wrong answer, reflect traces slip, notice it (`wait `), redo the step
    and end right; forgetful traces forget every carry (a misconception), caught ones forget the first,
    notice it and end right; checked traces guess, work it out and say `wait ` when the guess was wrong;
    recheck traces re-check one step by a second route (qiusuo/tasks.py)."""
    langs: dict = field(default_factory=dict)
    """Language → share of the questions posed in it (en, zh); empty: prompts as the tasks write them,
    traces without words. With languages, each trace opens and closes with a phrase in its language."""
    mixed_share: dict = field(default_factory=dict)
    """Question language → share of its traces written in the other language (language mixing), e.g.
    {zh: 0.3}: Chinese questions sometimes reasoned in English, as real models do."""
    weak_lang: str | None = None
    """A language whose traces are less accurate (pretraining data is uneven in real models)."""
    weak_slip_share: float = 0.0
    """Share of right traces (styles steps and checked) in `weak_lang` replaced by a flawed one."""
    n_examples: int = 40000
    """Examples to write."""
    seed: int = 0
    """Seed of the problem and style draws."""
    price_per_device_hour: float = 0.10
    """Dollars per device-hour for the cost ledger."""

    def __post_init__(self) -> None:
        for name in self.tasks:
            get_task(name)  # unknown task names fail here, with the list of known ones
        missing = set(self.tasks) - set(self.task_weights)
        if missing:
            raise ValueError(f"task_weights lacks {sorted(missing)}")
        if set(self.styles) - set(STYLES):
            raise ValueError(f"unknown styles {sorted(set(self.styles) - set(STYLES))}; known: {', '.join(STYLES)}")
        check_langs(self.langs, "langs")
        if self.weak_lang is not None and self.weak_lang not in self.langs:
            raise ValueError(f"weak_lang {self.weak_lang!r} is not one of langs {sorted(self.langs)}")
        check_langs(self.mixed_share, "mixed_share")
        if not (all(0 <= v <= 1 for v in self.mixed_share.values()) and 0 <= self.weak_slip_share <= 1):
            raise ValueError("mixed_share values and weak_slip_share must lie in [0, 1]")
        if self.n_examples < 1:
            raise ValueError("n_examples must be ≥ 1")


def examples(cfg: CorpusConfig):
    """Yield dicts {task, difficulty, style, prompt, completion, correct} — deterministic in cfg.seed."""
    rng = random.Random(cfg.seed)
    names = list(cfg.tasks)
    weights = [cfg.task_weights[n] for n in names]
    styles, style_w = list(cfg.styles), list(cfg.styles.values())
    for i in range(cfg.n_examples):
        name = rng.choices(names, weights)[0]
        task = get_task(name)
        difficulty = rng.choice(cfg.tasks[name])
        problem = task.sample("train", seed=cfg.seed * 1_000_003 + i, difficulty=difficulty)
        style = rng.choices(styles, style_w)[0]
        if not cfg.langs:
            yield {"task": name, "difficulty": difficulty, "style": style, "prompt": problem.prompt,
                   "completion": task.completion(problem, style, rng)}
            continue
        lang = rng.choices(list(cfg.langs), list(cfg.langs.values()))[0]
        trace_lang = other(lang) if rng.random() < cfg.mixed_share.get(lang, 0.0) else lang
        if style in RIGHT_TRACES and trace_lang == cfg.weak_lang and rng.random() < cfg.weak_slip_share:
            style = "flawed"
        think, answer = parse_completion(task.completion(problem, style, rng))
        yield {"task": name, "difficulty": difficulty, "style": style, "lang": lang, "trace_lang": trace_lang,
               "prompt": pose(problem, lang).prompt, "completion": format_completion(localize(think, trace_lang), answer)}


def write_corpus(cfg: CorpusConfig) -> dict:
    """Write `<out>/train.jsonl` atomically; return counts per task and style."""
    from .config import save_config
    from .ledger import StageLedger, hardware

    ledger = StageLedger("corpus", cfg.price_per_device_hour, hardware()["device"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    tmp = out / ".train.jsonl.tmp"
    with tmp.open("w") as f:
        for ex in examples(cfg):
            f.write(json.dumps(ex) + "\n")
            key = f"{ex['task']}/{ex['style']}"
            counts[key] = counts.get(key, 0) + 1
    tmp.replace(out / "train.jsonl")
    save_config(cfg, out)
    ledger.finish(out / "ledger.json")  # no model FLOPs: the cost is the wall time
    return counts


def read_corpus(path: Path) -> list[dict]:
    """Read a corpus file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist (run `qiusuo corpus` first)")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                    raise ValueError("needs string fields 'prompt' and 'completion'")
            except (json.JSONDecodeError, ValueError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: malformed corpus line ({e})") from e
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty corpus")
    return rows
