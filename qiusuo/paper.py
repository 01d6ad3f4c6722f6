"""`qiusuo paper`: the whole DeepSeek-R1 recipe in miniature, and the paper's comparison as one table.

The stages (docs/design.md §8), each a folder of `runs/paper/`:

- `corpus`, `base` — the synthetic corpus and the pretrained tiny base (as in `make demo`);
- `control` — the base trained further on its own corpus for the FLOPs the R1-Zero stage spent: does RL
  beat simply spending the same compute on more pretraining?
- `zero` — R1-Zero: GRPO straight from the base;
- `coldstart`, `cold`, `r1` — R1: SFT of the base on a small set of clean, readable traces (the paper's
  "thousands of long CoT" cold-start examples), then the same GRPO from that checkpoint, plus the
  language-consistency reward when the config sets one (`r1` section); `r1_nolang` is the same RL
  without that reward, to show what it buys and costs;
- `sampled` — rejection sampling of R1's correct answers on training problems (`qiusuo sample`);
- `student_base`, `student`, `student_rl` — distillation: a smaller model (fewer layers, narrower),
  pretrained on the same corpus, then either fine-tuned on R1's samples (`student`) or trained with
  GRPO alone at equal or larger compute than that fine-tuning (`student_rl`);
- `eval/*.json` of every model, and `report.md` whose first table mirrors the paper's.

Departures, all from scale: the paper's cold-start traces are human-refined model outputs and ours are
the tasks' reference traces; its distillation set is 800k samples, ours a few thousand; its students
are Qwen/Llama checkpoints, ours a smaller model of the same family trained from scratch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from .config import build, read_yaml
from .corpus import CorpusConfig
from .evaluate import EvalConfig
from .grpo import GRPOConfig
from .ledger import read_json
from .sample import SampleConfig
from .sft import SFTConfig

# (row label, model folder, folders whose cost the row carries) — the folders are the stages that
# produced the model, so FLOPs and dollars are the whole lineage's, teacher included for the student.
ROWS = (
    ("base", "base", ("corpus", "base")),
    ("equal-compute control", "control", ("corpus", "base", "control")),
    ("R1-Zero (RL from base)", "zero", ("corpus", "base", "zero")),
    ("cold start (SFT, before RL)", "cold", ("corpus", "base", "coldstart", "cold")),
    ("R1 (cold start + RL)", "r1", ("corpus", "base", "coldstart", "cold", "r1")),
    ("R1 without the language reward", "r1_nolang", ("corpus", "base", "coldstart", "cold", "r1_nolang")),
    ("distilled student", "student", ("corpus", "base", "coldstart", "cold", "r1", "sampled", "student_base",
                                      "student")),
    ("student, RL only", "student_rl", ("corpus", "student_base", "student_rl")),
)


@dataclass
class Step:
    """One stage of the plan: its kind (`qiusuo <kind>`), its config, and the file that marks it done."""

    name: str
    kind: str
    cfg: object
    done: Path


def ledger_flops(folder: Path) -> float:
    """FLOPs a finished stage spent, from its ledger; an error when the stage has not run."""
    ledger = read_json(folder / "ledger.json")
    if ledger is None:
        raise FileNotFoundError(f"{folder}/ledger.json missing: the stage has not finished")
    return float(ledger["flops"])


class Plan:
    """The stages in order, built from a multi-section YAML (configs/paper.yaml). Stages whose size
    depends on an earlier one's FLOPs (the control, the RL-only student) are sized when they start."""

    def __init__(self, run: Path, sections: dict, price: float | None):
        self.run, self.sections = Path(run), sections
        self.price_kw = {} if price is None else {"price_per_device_hour": price}

    def cfg(self, cls, *sections: str, **wiring):
        """A stage's config: the named sections merged in order (later ones win), then the wiring."""
        merged = {}
        for section in sections:
            merged.update(self.sections.get(section) or {})
        return build(cls, {**merged, **wiring, **self.price_kw})

    def eval_step(self, model: str) -> Step:
        return Step(f"eval {model}", "eval", self.cfg(EvalConfig, "eval", checkpoint=str(self.run / model)),
                    self.run / "eval" / f"{model}.json")

    def static(self) -> list[Step]:
        r = self.run
        return [
            Step("corpus", "corpus", self.cfg(CorpusConfig, "corpus", out=str(r / "corpus")), r / "corpus" / "ledger.json"),
            Step("base", "pretrain", self.cfg(SFTConfig, "pretrain", data=str(r / "corpus"), out=str(r / "base")),
                 r / "base" / "ledger.json"),
            self.eval_step("base"),
            Step("zero", "grpo", self.cfg(GRPOConfig, "grpo", init=str(r / "base"), out=str(r / "zero")),
                 r / "zero" / "ledger.json"),
            self.eval_step("zero"),
            "control",
            self.eval_step("control"),
            Step("coldstart", "corpus", self.cfg(CorpusConfig, "coldstart", out=str(r / "coldstart")),
                 r / "coldstart" / "ledger.json"),
            Step("cold", "pretrain", self.cfg(SFTConfig, "cold", init=str(r / "base"), data=str(r / "coldstart"),
                                              out=str(r / "cold")), r / "cold" / "ledger.json"),
            self.eval_step("cold"),
            Step("r1", "grpo", self.cfg(GRPOConfig, "grpo", "r1", init=str(r / "cold"), out=str(r / "r1")),
                 r / "r1" / "ledger.json"),
            self.eval_step("r1"),
            "r1_nolang",
            "eval r1_nolang",
            Step("sampled", "sample", self.cfg(SampleConfig, "sample", checkpoint=str(r / "r1"), out=str(r / "sampled")),
                 r / "sampled" / "ledger.json"),
            Step("student_base", "pretrain", self.cfg(SFTConfig, "student_base", data=str(r / "corpus"),
                                                      out=str(r / "student_base")), r / "student_base" / "ledger.json"),
            "student",
            "eval student",
            "student_rl",
            self.eval_step("student_rl"),
        ]

    def distill_flops(self) -> float:
        """FLOPs the distilled student cost beyond its base: rejection sampling plus fine-tuning."""
        return ledger_flops(self.run / "sampled") + (ledger_flops(self.run / "student") if self.distilling() else 0.0)

    def distilling(self) -> bool:
        """Whether rejection sampling kept anything to distil (a weak teacher may solve nothing)."""
        stats = read_json(self.run / "sampled" / "stats.json")
        return bool(stats and stats["kept"])

    def sized(self, name: str) -> Step | None:
        """Stages that depend on earlier ones: the control and the RL-only student are sized from the
        FLOPs of stages that already ran; the student and its eval are skipped (None) when rejection
        sampling kept nothing."""
        r = self.run
        if name in ("r1_nolang", "eval r1_nolang"):
            # The ablation of R1's language reward: the same RL from the cold start without it.
            r1 = self.cfg(GRPOConfig, "grpo", "r1")
            if not r1.reward_language:
                return None
            if name == "eval r1_nolang":
                return self.eval_step("r1_nolang")
            return Step("r1_nolang", "grpo", self.cfg(GRPOConfig, "grpo", "r1", init=str(r / "cold"),
                                                      out=str(r / "r1_nolang"), reward_language=0.0),
                        r / "r1_nolang" / "ledger.json")
        if name in ("student", "eval student"):
            if not self.distilling():
                return None
            if name == "eval student":
                return self.eval_step("student")
            return Step("student", "pretrain", self.cfg(SFTConfig, "student", init=str(r / "student_base"),
                                                        data=str(r / "sampled"), out=str(r / "student")),
                        r / "student" / "ledger.json")
        if name == "control":
            from .cli import control_config   # the same control as `qiusuo demo`'s

            return Step("control", "pretrain", control_config(r, self.sections, self.price_kw),
                        r / "control" / "ledger.json")
        # student_rl: at least the compute of the distillation fine-tuning (sampling + SFT), estimated
        # per step from the R1-Zero stage scaled by the models' sizes; the table shows what it spent.
        zero = self.cfg(GRPOConfig, "grpo")
        budget = self.distill_flops()
        scale = _params(r / "student_base") / _params(r / "base")
        per_step = ledger_flops(r / "zero") / zero.steps * scale
        steps = max(zero.steps, math.ceil(budget / per_step))
        cfg = self.cfg(GRPOConfig, "grpo", init=str(r / "student_base"), out=str(r / "student_rl"), steps=steps)
        return Step("student_rl", "grpo", cfg, r / "student_rl" / "ledger.json")


def top_up(plan: Plan, step: Step) -> None:
    """Continue the RL-only student until it has spent at least the distillation's FLOPs: its steps
    were sized from an estimate, and GRPO's constant learning rate makes more steps simply more RL."""
    budget = plan.distill_flops()
    spent = ledger_flops(step.done.parent)
    while spent < budget:
        per_step = spent / step.cfg.steps
        step.cfg.steps += math.ceil((budget - spent) / per_step)
        print(f"[student_rl] {spent:.2e} of {budget:.2e} FLOPs spent: continuing to step {step.cfg.steps}")
        from .cli import run_stage

        run_stage("grpo", step.cfg, resume=True)
        spent = ledger_flops(step.done.parent)


def _params(folder: Path) -> int:
    from .model import load_model

    return load_model(folder).num_params()


def run_paper(run: Path, config: Path | None, resume: bool, price: float | None) -> Path:
    """Run every stage of the plan in order (with `resume`, finished ones are skipped and a stopped one
    continues), then write `<run>/report.md`."""
    from .checkpoint import has_checkpoints
    from .cli import run_stage

    plan = Plan(run, read_yaml(config) if config else {}, price)
    t0 = time.perf_counter()
    for item in plan.static():
        step = plan.sized(item) if isinstance(item, str) else item
        if step is None:
            print(f"[{item}] skipped: " + ("R1 has no language reward to ablate" if "nolang" in item else
                                         "rejection sampling kept no completion, so there is nothing to distil"))
            continue
        if resume and step.done.exists():
            print(f"[{step.name}] already done ({step.done}), skipping")
            continue
        out = Path(getattr(step.cfg, "out", "") or "")
        partial = resume and step.kind in ("pretrain", "grpo") and has_checkpoints(out)
        print(f"[{step.name}] {'resuming' if partial else 'starting'}")
        run_stage(step.kind, step.cfg, resume=partial)
        if step.name == "student_rl":
            top_up(plan, step)
    report = write_paper_report(run, price)
    print(f"paper pipeline done in {time.perf_counter() - t0:.0f} s — report: {report}")
    return report


# ---------------------------------------------------------------------------- the report


def row_figures(run: Path, model: str, lineage: tuple[str, ...], price: float | None) -> dict | None:
    """The table's figures of one model: held-out scores from its eval, FLOPs and cost of its lineage,
    cost per held-out problem it solves (expected solved = pass@1 × problems). None when not evaluated."""
    result = read_json(run / "eval" / f"{model}.json")
    if result is None:
        return None
    flops = cost = 0.0
    missing = []
    for stage in lineage:
        ledger = read_json(run / stage / "ledger.json")
        if ledger is None:
            missing.append(stage)
            continue
        flops += float(ledger.get("flops", 0.0))
        cost += (ledger["device_hours"] * price) if price is not None else float(ledger.get("cost", 0.0))
    overall = result["overall"]
    solved = overall["pass@1"] * result["n_problems"]
    return {"pass@1": overall["pass@1"], "cons@k": overall["cons@k"], "k": result["k"],
            "trace_acc": overall.get("trace_accuracy"), "reflection": overall.get("reflection_rate"),
            "mean_len": overall.get("mean_len"), "lang": overall.get("lang_consistency"),
            "langs": {lang: {"pass@1": x["pass@1"], "lang": x.get("lang_consistency")}
                      for lang, x in result.get("langs", {}).items()},
            "flops": flops, "cost": cost, "cost_per_solved": cost / solved if solved else None,
            "missing": missing}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def main_table(run: Path, price: float | None) -> tuple[list[str], dict]:
    figures = {label: row_figures(run, model, lineage, price) for label, model, lineage in ROWS}
    k = next((f["k"] for f in figures.values() if f), 8)
    lines = [f"| model | pass@1 | cons@{k} | trace accuracy | reflection | mean length | language consistency "
             "| training FLOPs | cost | cost per solved |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, f in figures.items():
        if f is None:
            lines.append(f"| {label} | not evaluated |  |  |  |  |  |  |  |  |")
            continue
        flops = f"{f['flops']:.2e}" + (" (partial)" if f["missing"] else "")
        per = "—" if f["cost_per_solved"] is None else f"${f['cost_per_solved']:.5f}"
        mean_len = "—" if f["mean_len"] is None else f"{f['mean_len']:.1f}"
        lines.append(f"| {label} | {_pct(f['pass@1'])} | {_pct(f['cons@k'])} | {_pct(f['trace_acc'])} | "
                     f"{_pct(f['reflection'])} | {mean_len} | {_pct(f['lang'])} | {flops} | ${f['cost']:.4f} | {per} |")
    return lines, figures


def lang_table(figures: dict) -> list[str]:
    """pass@1 and language consistency of each model by the language its questions were asked in; []
    when no model was evaluated in more than one language."""
    langs = sorted({lang for f in figures.values() if f for lang in f.get("langs", {})})
    if len(langs) < 2:
        return []
    lines = ["| model | " + " | ".join(f"pass@1 {x}" for x in langs) + " | "
             + " | ".join(f"consistency {x}" for x in langs) + " |",
             "| --- |" + " ---: |" * (2 * len(langs))]
    for label, f in figures.items():
        if not f:
            continue
        by = f.get("langs", {})
        cells = [_pct(by.get(x, {}).get("pass@1")) for x in langs] + [_pct(by.get(x, {}).get("lang")) for x in langs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# A change in language consistency smaller than this (1 point) is noise at these sample sizes.
LANG_MARGIN = 0.01


def findings(fig: dict) -> list[str]:
    """The paper's findings, each checked against this run's numbers: reproduced, not reproduced, or
    not measurable (a row missing)."""
    def get(label, key="pass@1"):
        f = fig.get(label)
        return None if f is None else f.get(key)

    out = []

    def claim(text, a, b, margin=0.0, what="pass@1"):
        if a is None or b is None:
            out.append(f"- {text}: not measured (a row is missing).")
            return
        ok = a > b + margin
        out.append(f"- {text}: **{'reproduced' if ok else 'not reproduced'}** "
                   f"({what} {100 * a:.1f} vs {100 * b:.1f}).")

    claim("RL on verifiable rewards raises accuracy over the base (R1-Zero)", get("R1-Zero (RL from base)"), get("base"))
    claim("the gain is RL's, not the extra compute's (R1-Zero vs the equal-compute control)",
          get("R1-Zero (RL from base)"), get("equal-compute control"))
    claim("the reasoning itself gets more accurate (trace accuracy, R1-Zero vs base)",
          get("R1-Zero (RL from base)", "trace_acc"), get("base", "trace_acc"), what="trace accuracy")
    claim("reflection grows under RL (the \"aha moment\"; R1-Zero vs base)",
          get("R1-Zero (RL from base)", "reflection"), get("base", "reflection"), what="reflection rate")
    claim("a cold start before RL does better than RL alone (R1 vs R1-Zero)",
          get("R1 (cold start + RL)"), get("R1-Zero (RL from base)"))
    claim("RL after the cold start improves on the cold start itself (R1 vs cold start)",
          get("R1 (cold start + RL)"), get("cold start (SFT, before RL)"))
    claim("distilling the RL model beats RL on the small model itself (distilled vs RL-only student)",
          get("distilled student"), get("student, RL only"))
    r1, nolang = fig.get("R1 (cold start + RL)"), fig.get("R1 without the language reward")
    # Mixing is checked from both starting points of RL without the reward: the base (R1-Zero) and the
    # cold start (R1 without the language reward), on all questions and on the weaker language's.
    for start, label, end, end_label in (("base", "base", "R1-Zero (RL from base)", "R1-Zero"),
                                        ("cold start (SFT, before RL)", "cold start",
                                         "R1 without the language reward", "R1 without the reward")):
        a, b = get(start, "lang"), get(end, "lang")
        if a is None or b is None:
            continue
        zh = [(fig[x].get("langs") or {}).get("zh", {}).get("lang") for x in (start, end)]
        per = "" if None in zh else f"; Chinese questions {100 * zh[0]:.1f} → {100 * zh[1]:.1f}"
        out.append(f"- without a language reward, RL drifts into language mixing (from the {label}): "
                   f"**{'reproduced' if b < a - LANG_MARGIN else 'not reproduced'}** (language "
                   f"consistency {100 * a:.1f} {label} → {100 * b:.1f} {end_label}{per}).")
    if r1 and nolang and r1.get("lang") is not None and nolang.get("lang") is not None:
        cost = nolang["pass@1"] - r1["pass@1"]
        out.append(f"- the language reward keeps the chain of thought in the question's language: "
                   f"**{'reproduced' if r1['lang'] > nolang['lang'] + LANG_MARGIN else 'not reproduced'}** "
                   f"(consistency {100 * nolang['lang']:.1f} without → {100 * r1['lang']:.1f} with), "
                   f"{'costing' if cost > 0 else 'gaining'} {100 * abs(cost):.1f} points of pass@1 "
                   f"(the paper: a slight degradation).")
    z_len, b_len = get("R1-Zero (RL from base)", "mean_len"), get("base", "mean_len")
    if z_len is not None and b_len is not None:
        out.append(f"- responses lengthen under RL: **{'reproduced' if z_len > b_len else 'not reproduced'}** "
                   f"(mean length {b_len:.1f} → {z_len:.1f} tokens).")
    return out


# (metrics key, panel title) of the summary figure; a key no stage logged leaves its panel out.
CURVES = (("rollout/accuracy", "accuracy (training rollouts)"), ("rollout/trace_accuracy", "trace accuracy"),
          ("rollout/reflection_rate", "reflection rate"), ("rollout/len_mean", "mean response length (tokens)"),
          ("rollout/language", "language consistency (training rollouts)"))
RL_STAGES = ("zero", "r1", "r1_nolang", "student_rl")


def curves_figure(run: Path, path: Path) -> Path | None:
    """One PNG with a panel per RL metric and a line per RL stage (moving average over 5 steps) — the
    paper's Figure 2/3 curves for every RL stage of the run side by side. None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import read_metrics

    series = {s: read_metrics(run / s / "metrics.jsonl") for s in RL_STAGES if (run / s / "metrics.jsonl").exists()}
    panels = [(k, t) for k, t in CURVES if any(k in row for rows in series.values() for row in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), dpi=90)
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        for stage, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if not pts:
                continue
            x, y = map(np.array, zip(*pts))
            w = min(5, len(y))
            ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), label=stage, linewidth=1.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# The RL stages whose Chinese-question rollouts show mixing appear (or not): both start from the cold start.
MIXING_STAGES = (("r1_nolang", "without the language reward"), ("r1", "with the language reward"))


def rollouts(path: Path, lang: str = "zh"):
    """(step, consistency, CoT language, accuracy) of every logged rollout whose question is in `lang`
    and whose completion has a chain of thought (a direct answer has no CoT to measure, as in eval)."""
    import json

    from .language import consistency, cot_lang, prompt_lang
    from .rewards import parse_completion

    with open(path) as f:
        for line in f:
            r = json.loads(line)
            parsed = parse_completion(r["completion"])
            if prompt_lang(r["prompt"]) != lang or not parsed or not parsed[0]:
                continue
            yield r["step"], consistency(parsed[0], lang), cot_lang(parsed[0], lang), float(r["accuracy"])


def mixing_curve(path: Path, lang: str = "zh") -> list[tuple[int, float, int]]:
    """(step, mean language consistency, samples) of the rollouts on `lang` questions at each logged step."""
    by: dict = {}
    for step, c, _, _ in rollouts(path, lang):
        by.setdefault(step, []).append(c)
    return [(step, sum(cs) / len(cs), len(cs)) for step, cs in sorted(by.items())]


def accuracy_by_cot(path: Path, lang: str = "zh", last_step: int = 10) -> dict[str, tuple[int, float]]:
    """Accuracy of the rollouts on `lang` questions up to `last_step`, split by the CoT's language
    ("same", "other", "mixed" → (samples, accuracy)): the premise of mixing. Without a language reward,
    RL moves the policy toward whichever split is the more accurate."""
    by: dict = {}
    for step, _, which, acc in rollouts(path, lang):
        if step <= last_step and which is not None:
            by.setdefault(which, []).append(acc)
    return {k: (len(by[k]), sum(by[k]) / len(by[k])) for k in ("same", "other", "mixed") if k in by}


def mixing_section(run: Path, plots: Path) -> list[str]:
    """Language consistency on Chinese questions per RL step, with and without the reward (a table of
    the first and last logged steps, a figure), and the premise: the cold-start policy's accuracy by CoT
    language in the first steps. [] when the RL stages logged no rollouts."""
    curves = {stage: mixing_curve(run / stage / "samples.jsonl") for stage, _ in MIXING_STAGES
              if (run / stage / "samples.jsonl").exists()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return []
    lines = ["## Language mixing during RL", "",
             "Rollouts on Chinese questions, logged every few GRPO steps from the same cold start: mean "
             "language consistency of the chains of thought.", "",
             "| RL stage | first logged step | last logged step | change |", "| --- | ---: | ---: | ---: |"]
    for stage, label in MIXING_STAGES:
        if stage in curves:
            (s0, c0, n0), (s1, c1, n1) = curves[stage][0], curves[stage][-1]
            lines.append(f"| {stage} ({label}) | {100 * c0:.1f} (step {s0}, n = {n0}) | "
                         f"{100 * c1:.1f} (step {s1}, n = {n1}) | {100 * (c1 - c0):+.1f} |")
    if "r1_nolang" in curves:
        split = accuracy_by_cot(run / "r1_nolang" / "samples.jsonl")
        names = {"same": "a Chinese CoT", "other": "an English CoT", "mixed": "a mixed CoT"}
        parts = [f"{names[k]} {100 * a:.1f} % (n = {n})" for k, (n, a) in split.items()]
        lines += ["", "The premise of drift, measured on the cold-start policy's own rollouts (steps ≤ 10 of "
                  "r1_nolang): accuracy on Chinese questions answered with " + ", ".join(parts) + "."]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 2.8), dpi=90)
    for stage, label in MIXING_STAGES:
        if stage in curves:
            x, y, _ = zip(*curves[stage])
            ax.plot(x, [100 * v for v in y], marker="o", markersize=3, label=f"{stage} ({label})")
    ax.set_xlabel("GRPO step", fontsize=8)
    ax.set_ylabel("consistency, Chinese questions (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    fig.savefig(plots / "paper_mixing.png")
    plt.close(fig)
    return lines + ["", "![language consistency per RL step](plots/paper_mixing.png)", ""]


def _lang_section(fig: dict) -> list[str]:
    table = lang_table(fig)
    if not table:
        return []
    return ["## By question language", "",
            "Language consistency is the share of a chain of thought's words in the question's language, "
            "averaged over the samples that reason (a CoT of bare digits and symbols scores 0; a direct "
            "answer is not counted). The training curve of the same measure is the last panel below.", "",
            *table, ""]


def write_paper_report(run: Path, price: float | None = None) -> Path:
    """`<run>/report.md`: the paper's table and findings first, then the run report every pipeline gets
    (per-task tables, cost per stage, the curves of every RL stage, the configs)."""
    from .report import write_report

    run = Path(run)
    path = write_report(run, price)
    table, fig = main_table(run, price)
    student_rl = read_json(run / "student_rl" / "ledger.json")
    distill = [read_json(run / s / "ledger.json") for s in ("sampled", "student")]
    compute = []
    if student_rl and all(distill):
        d = sum(x["flops"] for x in distill)
        compute = [f"The RL-only student spent {student_rl['flops']:.2e} FLOPs against {d:.2e} for the "
                   f"distilled student's sampling and fine-tuning ({student_rl['flops'] / d:.1f}×).", ""]
    head = ["# The R1 recipe in miniature", "",
            "Held-out problems only (never in any training stage); pass@1 averaged over k samples at T = 0.6, "
            "top-p 0.95; percentages. Training FLOPs and cost are each model's whole lineage (the distilled "
            "student carries its teacher's). Cost per solved = cost / (pass@1 × held-out problems).", "",
            *table, "", *compute, *_lang_section(fig), *mixing_section(run, run / "plots"), "## Which of the paper's findings reproduce at this scale", "", *findings(fig), ""]
    figure = curves_figure(run, run / "plots" / "paper_curves.png")
    if figure:
        head += ["## RL curves of every stage", "", f"![RL curves](plots/{figure.name})", ""]
    path.write_text("\n".join(head) + "\n" + path.read_text())
    return path
