"""Rejection sampling (DeepSeek-R1 §2.3.3): turn an RL checkpoint's correct answers into an SFT set.

The paper samples several responses per prompt from the reasoning-RL checkpoint, keeps only the correct
ones (rule-based verification), and filters out mixed-language chains of thought, long paragraphs and
code blocks; about 600k reasoning samples result. `qiusuo sample` does the same on the tasks' *train*
split (never the held-out one, so a student trained on the set is still evaluated on unseen problems):
k completions per problem from the shared engine, kept when the completion parses in the exact format,
the task's verifier scores it correct and (for questions posed in a language) its chain of thought is in
the question's language, optionally only the shortest correct one per problem
(`keep: shortest`, the readable-trace choice), deduplicated by text. The result is a corpus file
(`<out>/train.jsonl`, {prompt, completion} lines) that `qiusuo pretrain --init … --data <out>` trains
on — the cold-start and distillation SFT stages. Departure: the paper also uses DeepSeek-V3 as a judge
for answers a rule cannot check; every task here has a rule.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_checkpoint
from .engine import Engine, SamplingParams
from .evaluate import distinct_problems
from .ledger import StageLedger, forward_flops, hardware
from .log import console
from .language import check_langs, consistency, pose, question_lang
from .rewards import STRICT, ReasoningFormat, parse_completion
from .tasks import get_task

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
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: k greedy samples would all be the same completion")


def training_problems(cfg: SampleConfig) -> list:
    """Distinct train-split problems, `n_per_difficulty` per task and difficulty, deterministic in the seed;
    with `langs`, each once per language."""
    out = [p for name, diffs in cfg.tasks.items() for d in diffs
           for p in distinct_problems(get_task(name), "train", d, cfg.n_per_difficulty, cfg.seed * 1_000_033)]
    return [pose(p, lang) for p in out for lang in cfg.langs] if cfg.langs else out


def judge(problem, text: str, finish_reason: str, min_consistency: float = 1.0, fmt: ReasoningFormat = STRICT) -> str:
    """Why a completion is rejected, or "ok": cut at the length cap, not in the exact format, wrong, or
    its chain of thought mixes languages (less than `min_consistency` in the question's language)."""
    if finish_reason != "stop":
        return "truncated"
    parsed = parse_completion(text, fmt)
    if parsed is None:
        return "format"
    value, _ = get_task(problem.task).score(problem, parsed[1])
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


def accept(problems: list, completions: list, k: int, keep: str, source: str,
           min_consistency: float = 1.0, fmt: ReasoningFormat = STRICT) -> tuple[list[dict], dict]:
    """The SFT rows kept from `k` completions per problem (prompt-major, as `Engine.generate` returns
    them) and the tallies per task and difficulty: samples by verdict, problems solved, rows kept."""
    rows, per = [], {}
    for i, p in enumerate(problems):
        group = completions[i * k:(i + 1) * k]
        texts = [c.text for c in group]
        verdicts = [judge(p, c.text, c.finish_reason, min_consistency, fmt) for c in group]
        kept = select(p, texts, verdicts, keep)
        s = per.setdefault(f"{p.task}/{p.difficulty}", {"task": p.task, "difficulty": p.difficulty, "problems": 0,
                                                        "samples": 0, "ok": 0, "wrong": 0, "format": 0,
                                                        "mixed": 0, "truncated": 0, "solved": 0, "kept": 0})
        s["problems"] += 1
        s["samples"] += len(group)
        for v in verdicts:
            s[v] += 1
        s["solved"] += bool(kept)
        s["kept"] += len(kept)
        rows += [{"task": p.task, "difficulty": p.difficulty, "prompt": p.prompt, "completion": t, "source": source}
                 for t in kept]
    for s in per.values():
        s["acceptance"] = s["ok"] / s["samples"]
        s["solved_share"] = s["solved"] / s["problems"]
    return rows, per


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
    prompts = [tok.prompt_ids(p.prompt) for p in problems]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed)
    completions = engine.generate(prompts, params, n=cfg.k)

    rows, per = accept(problems, completions, cfg.k, cfg.keep, source=f"sample:{Path(cfg.checkpoint).name}",
                       min_consistency=cfg.min_consistency, fmt=tok.reasoning)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    gen_tokens = sum(len(c.token_ids) for c in completions)
    stats = {"checkpoint": str(cfg.checkpoint), "k": cfg.k, "temperature": cfg.temperature, "keep": cfg.keep,
             "problems": len(problems), "samples": len(completions), "kept": len(rows),
             "acceptance": sum(s["ok"] for s in per.values()) / len(completions),
             "by_task": dict(sorted(per.items())), "generated_tokens": gen_tokens,
             "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
    save_config(cfg, out)
    mc = model.config
    ctx = sum(map(len, prompts)) / len(prompts) + gen_tokens / len(completions)
    ledger.add(forward_flops(model.num_params(), gen_tokens, mc.num_hidden_layers, mc.hidden_size, int(ctx)),
               gen_tokens)
    ledger.finish(out / "ledger.json")
    print_stats(stats, out)
    return stats


def print_stats(stats: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"rejection sampling from {stats['checkpoint']} — k={stats['k']}, keep {stats['keep']}")
    for col in ("task", "difficulty", "problems", "accepted %", "solved %", "wrong", "format", "mixed", "truncated",
                "kept"):
        table.add_column(col, justify="right")
    for s in stats["by_task"].values():
        table.add_row(s["task"], str(s["difficulty"]), str(s["problems"]), f"{100 * s['acceptance']:.1f}",
                      f"{100 * s['solved_share']:.1f}", str(s["wrong"]), str(s["format"]), str(s["mixed"]),
                      str(s["truncated"]),
                      str(s["kept"]))
    console.print(table)
    console.print(f"kept {stats['kept']} of {stats['samples']} samples → {out / 'train.jsonl'}")
