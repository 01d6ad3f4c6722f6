"""Rejection sampling (DeepSeek-R1 §2.3.3): turn an RL checkpoint's correct answers into an SFT set.

The paper samples several responses per prompt from the reasoning-RL checkpoint, keeps only the correct
ones (rule-based verification), and filters out mixed-language chains of thought, long paragraphs and
code blocks; about 600k reasoning samples result. `qiusuo sample` does the same: k completions per
problem from the shared engine, kept when the completion is well-formed in the checkpoint's reasoning
format (`Tokenizer.reasoning`: the tiny model's exact tags, or a real checkpoint's `<think>` text, also
when its template opens the think block itself), the verifier scores its answer correct and (for
questions posed in a language) its chain of thought is in the question's language, optionally only the
shortest correct one per problem (`keep: shortest`, the readable-trace choice), deduplicated by text.

The problems are

- the tasks' *train* split (never the held-out one, so a student trained on the set is still evaluated
  on unseen problems), `n_per_difficulty` per task and difficulty. The result, `<out>/train.jsonl` of
  {prompt, completion} lines, is a corpus: `qiusuo pretrain --init … --data <out>` trains on it (the
  cold-start and distillation SFT stages); or
- with `data`, every row of a dataset file (qiusuo/data.py: GSM8K, MATH, …; `data_options` as for
  `eval` and `grpo`). The file is taken to be the user's *training* set, so all of it is sampled
  (`data_options: {limit: N}` for its first N rows); keep your test split out of it. Correctness is
  math-verify's, and the answer is read as `eval` reads it. `<out>/train.jsonl` is then a dataset for
  `qiusuo sft --data`: under a chat template each line is a `messages` chat (the system prompt if any,
  the user turn as sampled, the accepted completion as the assistant turn), so SFT trains on exactly the
  prompt tokens that were sampled from; under a plain-text template (`r1_zero`, your own) each line is
  {prompt, completion} with the rendered prompt, read back with `--data-options "{template: '{question}'}"`.

`stats.json` gives the acceptance rate per task (or source) and difficulty (or level), and with `data`
per source. Departure: the paper also uses DeepSeek-V3 as a judge for answers a rule cannot check;
every problem here has a rule.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_checkpoint
from .data import DataOptions, load_problems
from .engine import Engine, SamplingParams
from .evaluate import distinct_problems
from .ledger import StageLedger, forward_flops, hardware
from .log import console
from .language import check_langs, consistency, pose, question_lang
from .rewards import STRICT, ReasoningFormat, parse_completion
from .tasks import get_task, source_of

KEEP = ("all", "shortest")


@dataclass
class SampleConfig:
    """Settings of `qiusuo sample`."""

    checkpoint: str = "runs/tiny/zero"
    """Checkpoint to sample from (R1: the reasoning-RL checkpoint)."""
    out: str = "runs/tiny/sampled"
    """Folder for `train.jsonl` (the SFT set), `stats.json` (acceptance rates) and `ledger.json`."""
    tasks: dict = field(default_factory=lambda: {"arith": [2, 3, 4, 5], "countdown": [3, 4]})
    """Task name → difficulties to draw training-split problems from."""
    n_per_difficulty: int = 200
    """Problems per task and difficulty."""
    k: int = 8
    """Completions sampled per problem."""
    temperature: float = 0.7
    """Sampling temperature: high enough for k different completions, low enough to be mostly right."""
    top_p: float = 0.95
    """Top-p of the sampling."""
    max_new_tokens: int = 128
    """Completion length cap; a completion cut at the cap never parses, so it is never kept."""
    langs: list = field(default_factory=list)
    """Languages to pose each problem in (en, zh); empty: prompts as the tasks write them."""
    data: str | None = None
    """Dataset file of math problems (JSONL, Parquet or a save_to_disk folder) to sample instead of
    `tasks`: your training set, every row of it (`data_options` limit: the first N)."""
    data_options: dict = field(default_factory=dict)
    """How to read `data`: template, field names, on_bad_row, limit (qiusuo/data.py, DataOptions)."""
    min_consistency: float = 1.0
    """Language filter (R1 drops mixed-language CoT): a completion is kept only when at least this share
    of its chain of thought is in the question's language."""
    keep: str = "all"
    """`all` correct completions (deduplicated), or only the `shortest` correct one per problem."""
    seed: int = 4321
    """Seed of the problems and of the sampling streams; distinct from the corpus' and GRPO's seeds."""
    device: str = "cpu"
    """torch device."""
    price_per_device_hour: float = 0.10
    """Dollars per device-hour for the cost ledger."""

    def __post_init__(self) -> None:
        for name in self.tasks:
            get_task(name)
        if self.keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {self.keep!r}")
        if self.k < 1 or self.n_per_difficulty < 1 or self.max_new_tokens < 1:
            raise ValueError("k, n_per_difficulty and max_new_tokens must be ≥ 1")
        check_langs({lang: 1 for lang in self.langs}, "langs")
        if self.data:
            DataOptions.of(self.data_options)
            if self.langs:
                raise ValueError("langs poses the tasks' problems in a language; a dataset's questions keep their own")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: k greedy samples would all be the same completion")


def training_problems(cfg: SampleConfig) -> list:
    """Distinct train-split problems, `n_per_difficulty` per task and difficulty, deterministic in the seed;
    with `langs`, each once per language. With `data`, the file's rows."""
    if cfg.data:
        return load_problems(cfg.data, DataOptions.of(cfg.data_options))
    out = [p for name, diffs in cfg.tasks.items() for d in diffs
           for p in distinct_problems(get_task(name), "train", d, cfg.n_per_difficulty, cfg.seed * 1_000_033)]
    return [pose(p, lang) for p in out for lang in cfg.langs] if cfg.langs else out


def judge(problem, text: str, finish_reason: str, min_consistency: float = 1.0, fmt: ReasoningFormat = STRICT) -> str:
    """Why a completion is rejected, or "ok": cut at the length cap, not in the checkpoint's reasoning
    format `fmt` (or with no answer the task can read in it), wrong, or its chain of thought mixes
    languages (less than `min_consistency` in the question's language)."""
    if finish_reason != "stop":
        return "truncated"
    task = get_task(problem.task)
    parsed = parse_completion(text, fmt)
    answer = None if parsed is None else task.answer_of(problem, text, fmt)
    if answer is None:
        return "format"
    value, _ = task.score(problem, answer)
    if value != 1.0:
        return "wrong"
    lang = question_lang(problem)
    return "mixed" if lang and consistency(parsed[0], lang) < min_consistency else "ok"


def select(problem, texts: list[str], verdicts: list[str], keep: str) -> list[str]:
    """The accepted completions of one problem: correct ones without duplicates (first kept), or only
    the shortest correct one (ties: the first sampled)."""
    good = list(dict.fromkeys(t for t, v in zip(texts, verdicts) if v == "ok"))
    if keep == "shortest" and good:
        return [min(good, key=len)]
    return good


VERDICTS = ("ok", "wrong", "format", "mixed", "truncated")


def group_of(problem) -> tuple[str, int | None]:
    """(name, level) a problem's acceptance is tallied under: its task and difficulty, or a dataset
    row's source and level (None when the row has none)."""
    if "source" in problem.data and problem.data.get("level") is None:
        return source_of(problem), None
    return source_of(problem), problem.difficulty


def sft_row(problem, completion: str, source: str) -> dict:
    """One line of the SFT set. A task problem: a corpus line ({prompt, completion}, the prompt as the
    task wrote it). A dataset problem: a `messages` chat under a chat template, else the rendered
    plain-text prompt, so `qiusuo sft --data` rebuilds the very prompt tokens that were sampled from."""
    if "source" not in problem.data:
        return {"task": problem.task, "difficulty": problem.difficulty, "prompt": problem.prompt,
                "completion": completion, "source": source}
    meta = {"source": problem.data["source"], "level": problem.data.get("level"), "sampled_by": source}
    if not problem.data["chat"]:
        return {"prompt": problem.prompt, "completion": completion, **meta}
    system = problem.data.get("system")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem.prompt}, {"role": "assistant", "content": completion}]
    return {"messages": messages, **meta}


def tally(per: dict, key: str, fields: dict, verdicts: list[str], kept: int) -> None:
    s = per.setdefault(key, {**fields, "problems": 0, "samples": 0, **dict.fromkeys(VERDICTS, 0), "solved": 0,
                             "kept": 0})
    s["problems"] += 1
    s["samples"] += len(verdicts)
    for v in verdicts:
        s[v] += 1
    s["solved"] += bool(kept)
    s["kept"] += kept


def accept(problems: list, completions: list, k: int, keep: str, source: str,
           min_consistency: float = 1.0, fmt: ReasoningFormat = STRICT) -> tuple[list[dict], dict, dict]:
    """The SFT rows kept from `k` completions per problem (prompt-major, as `Engine.generate` returns
    them), and the tallies per task and difficulty (a dataset's source and level) and per task (source):
    samples by verdict, problems solved, rows kept, acceptance (accepted share of the samples)."""
    rows, per, by_source = [], {}, {}
    for i, p in enumerate(problems):
        group = completions[i * k:(i + 1) * k]
        texts = [c.text for c in group]
        verdicts = [judge(p, c.text, c.finish_reason, min_consistency, fmt) for c in group]
        kept = select(p, texts, verdicts, keep)
        name, level = group_of(p)
        tally(per, name if level is None else f"{name}/{level}", {"task": name, "difficulty": level}, verdicts,
              len(kept))
        tally(by_source, name, {"task": name}, verdicts, len(kept))
        rows += [sft_row(p, t, source) for t in kept]
    for s in (*per.values(), *by_source.values()):
        s["acceptance"] = s["ok"] / s["samples"]
        s["solved_share"] = s["solved"] / s["problems"]
    return rows, per, by_source


def sample(cfg: SampleConfig) -> dict:
    """Run rejection sampling; write `<out>/train.jsonl` and `<out>/stats.json`; return the stats."""
    from .config import save_config
    from .model import atomic_write_text

    t0 = time.perf_counter()
    ledger = StageLedger("sample", cfg.price_per_device_hour, hardware()["device"])
    model, tok = load_checkpoint(cfg.checkpoint, cfg.device)
    model.eval()
    engine = Engine(model, tok)
    problems = training_problems(cfg)
    prompts = [get_task(p.task).prompt_ids(p, tok) for p in problems]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed)
    completions = engine.generate(prompts, params, n=cfg.k)

    rows, per, by_source = accept(problems, completions, cfg.k, cfg.keep,
                                  source=f"sample:{Path(cfg.checkpoint).name}",
                                  min_consistency=cfg.min_consistency, fmt=tok.reasoning)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    gen_tokens = sum(len(c.token_ids) for c in completions)
    stats = {"checkpoint": str(cfg.checkpoint), "data": cfg.data, "k": cfg.k, "temperature": cfg.temperature,
             "keep": cfg.keep, "problems": len(problems), "samples": len(completions), "kept": len(rows),
             "acceptance": sum(s["ok"] for s in per.values()) / len(completions),
             "by_task": dict(sorted(per.items())), "by_source": dict(sorted(by_source.items())),
             "generated_tokens": gen_tokens, "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
    save_config(cfg, out)
    mc = model.config
    ctx = sum(map(len, prompts)) / len(prompts) + gen_tokens / len(completions)
    ledger.add(forward_flops(model.num_params(), gen_tokens, mc.num_hidden_layers, mc.hidden_size, int(ctx)),
               gen_tokens)
    ledger.finish(out / "ledger.json")
    print_stats(stats, out)
    if cfg.data and rows:
        plain = "prompt" in rows[0]
        console.print(f"fine-tune on it: qiusuo sft --init <checkpoint> --data {out / 'train.jsonl'}"
                      + (" --data-options \"{template: '{question}'}\"" if plain else ""))
    return stats


def print_stats(stats: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"rejection sampling from {stats['checkpoint']} — k={stats['k']}, keep {stats['keep']}")
    name, level = ("source", "level") if stats.get("data") else ("task", "difficulty")
    for col in (name, level, "problems", "accepted %", "solved %", "wrong", "format", "mixed", "truncated",
                "kept"):
        table.add_column(col, justify="right")
    for s in stats["by_task"].values():
        table.add_row(s["task"], "–" if s["difficulty"] is None else str(s["difficulty"]), str(s["problems"]),
                      f"{100 * s['acceptance']:.1f}", f"{100 * s['solved_share']:.1f}", str(s["wrong"]),
                      str(s["format"]), str(s["mixed"]), str(s["truncated"]), str(s["kept"]))
    console.print(table)
    console.print(f"kept {stats['kept']} of {stats['samples']} samples → {out / 'train.jsonl'}")
