"""Re-measure a demo run independently of qiusuo's own evaluation (issue 16): the base, control and zero
checkpoints are loaded with `transformers` (AutoModelForCausalLM, AutoTokenizer — not qiusuo's engine),
sampled k = 8 times at T = 0.6, top-p 0.95 on freshly drawn 3–5-digit arithmetic problems and scored by a
strict checker written here, not by qiusuo.tasks / qiusuo.rewards.

    .venv/bin/python bench/demo_check.py --run runs/tiny [--n-per-digits 50] [--k 8] [--json out.json]

The problems come from this script's own generator (`a op b`, op in + − ×, a with 3–5 digits, the same
shape as the corpus's) and its own seed. A problem is dropped when its canonical form (operands of + and ×
sorted) falls in qiusuo's training split (`qiusuo.tasks.heldout` — the only qiusuo function used, so the
split is the trainer's) or when its prompt, in either operand order, is in the run's corpus file.

A completion counts as correct only when it is exactly `<think>T</think><answer>N</answer>` — no text
around it, no tag inside T or N — and N is the answer's one spelling as an integer (no sign but a leading
minus, no leading zero, no `-0`). It is a trace when T is not empty; it reflects when it holds the word
`wait`. Printed per stage: pass@1 (mean over problems of the share of correct samples, with its standard
error), trace accuracy (correct among well-formed traces), trace rate, reflection rate, and beside them
qiusuo's own figures from `<run>/eval/<stage>.json` and the difference."""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

STAGES = ("base", "control", "zero")
COMPLETION_RE = re.compile(r"<think>((?:(?!</?think>|</?answer>).)*)</think><answer>(0|-?[1-9][0-9]*)</answer>",
                           re.DOTALL)
REFLECT_RE = re.compile(r"\bwait\b")


def check(text: str, answer: int) -> dict:
    """Score one completion strictly: {"correct", "trace", "reflects"} (trace: well-formed with a
    non-empty think block)."""
    m = COMPLETION_RE.fullmatch(text)
    ok = m is not None and int(m.group(2)) == answer
    return {"correct": ok, "trace": m is not None and m.group(1) != "", "reflects": bool(REFLECT_RE.search(text))}


def canonical(a: int, op: str, b: int) -> str:
    """The problem with its operand order removed where the operator commutes."""
    return f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"


def draw(rng: random.Random, digits: int) -> tuple[int, str, int]:
    """One `a op b` with `digits`-digit a: b has 1..digits digits for + and −, b in 2..9 for ×;
    a subtraction never goes below zero."""
    def number(n: int) -> int:
        return rng.randrange(10 ** (n - 1), 10 ** n)

    op = rng.choice("+-*")
    a = number(digits)
    b = rng.randint(2, 9) if op == "*" else number(rng.randint(1, digits))
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def problems(digits: list[int], n: int, seed: int, corpus_prompts: set[str]) -> list[dict]:
    """`n` distinct held-out problems per digit count, none of them (in any operand order) in the corpus."""
    from qiusuo.tasks import heldout

    rng, out = random.Random(f"demo-check:{seed}"), []
    for d in digits:
        seen: set[str] = set()
        for _ in range(1000 * n):
            a, op, b = draw(rng, d)
            key = canonical(a, op, b)
            if key in seen or not heldout(f"arith:{key}"):
                continue
            if f"{a}{op}{b}" in corpus_prompts or f"{b}{op}{a}" in corpus_prompts:
                continue
            seen.add(key)
            out.append({"prompt": f"{a}{op}{b}", "answer": {"+": a + b, "-": a - b, "*": a * b}[op], "digits": d})
            if len(seen) == n:
                break
        else:
            raise SystemExit(f"only {len(seen)} held-out {d}-digit problems found")
    return out


def read_corpus(run: Path) -> set[str]:
    path = run / "corpus" / "train.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}


def generate(folder: Path, prompts: list[str], k: int, temperature: float, top_p: float, max_new_tokens: int,
             seed: int, batch: int) -> list[list[str]]:
    """k sampled completions per prompt with transformers' generate, cut at the first stop token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging

    logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").exists() else None
    stops = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else tok.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    tok.padding_side = "left"
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in chunk]
        ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                  top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=k,
                                  eos_token_id=stops, pad_token_id=pad)
        for row in seqs[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            text = tok.decode(row[:cut], skip_special_tokens=False)
            out.append(text)
    return [out[j * k:(j + 1) * k] for j in range(len(prompts))]


def score(items: list[dict], completions: list[list[str]]) -> dict:
    per_problem, samples, traces, traces_ok, reflect = [], 0, 0, 0, 0
    for item, texts in zip(items, completions):
        checks = [check(t, item["answer"]) for t in texts]
        per_problem.append(sum(c["correct"] for c in checks) / len(checks))
        samples += len(checks)
        traces += sum(c["trace"] for c in checks)
        traces_ok += sum(c["trace"] and c["correct"] for c in checks)
        reflect += sum(c["reflects"] for c in checks)
    n = len(per_problem)
    mean = sum(per_problem) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (n - 1) / n) if n > 1 else 0.0
    return {"pass@1": mean, "pass@1_se": se, "trace_accuracy": traces_ok / traces if traces else None,
            "trace_rate": traces / samples, "reflection_rate": reflect / samples, "n": n}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def diff(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (a - b):+.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a demo run folder (base/, control/, zero/, eval/)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES))
    ap.add_argument("--digits", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--n-per-digits", type=int, default=50)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--batch", type=int, default=50, help="prompts per generate call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    items = problems(args.digits, args.n_per_digits, args.seed, read_corpus(args.run))
    result = {"run": str(args.run), "k": args.k, "temperature": args.temperature, "top_p": args.top_p,
              "n_problems": len(items), "stages": {}}
    print(f"{len(items)} held-out problems ({args.digits} digits), k={args.k}, T={args.temperature}, "
          f"top-p {args.top_p}, transformers sampling, strict checker")
    print(f"{'stage':<8} {'pass@1':>12} {'qiusuo':>7} {'Δ':>6} {'trace acc':>9} {'qiusuo':>7} {'Δ':>6} "
          f"{'traces':>7} {'reflect':>7} {'qiusuo':>7} {'s':>5}")
    for stage in args.stages:
        t0 = time.perf_counter()
        texts = generate(args.run / stage, [it["prompt"] for it in items], args.k, args.temperature, args.top_p,
                         args.max_new_tokens, args.seed, args.batch)
        mine = score(items, texts)
        mine["per_digits"] = {str(d): score([it for it in items if it["digits"] == d],
                                            [t for it, t in zip(items, texts) if it["digits"] == d])
                              for d in args.digits}
        mine["wall_s"] = round(time.perf_counter() - t0, 1)
        theirs_path = args.run / "eval" / f"{stage}.json"
        theirs = json.loads(theirs_path.read_text())["overall"] if theirs_path.exists() else {}
        mine["qiusuo"] = {key: theirs.get(key) for key in ("pass@1", "trace_accuracy", "reflection_rate")}
        result["stages"][stage] = mine
        print(f"{stage:<8} {pct(mine['pass@1']):>6} ±{pct(mine['pass@1_se']):>4} {pct(theirs.get('pass@1')):>7} "
              f"{diff(mine['pass@1'], theirs.get('pass@1')):>6} {pct(mine['trace_accuracy']):>9} "
              f"{pct(theirs.get('trace_accuracy')):>7} {diff(mine['trace_accuracy'], theirs.get('trace_accuracy')):>6} "
              f"{pct(mine['trace_rate']):>7} {pct(mine['reflection_rate']):>7} {pct(theirs.get('reflection_rate')):>7} "
              f"{mine['wall_s']:5.0f}", flush=True)
    st = result["stages"]
    if all(s in st for s in STAGES):
        gaps = {"rl_vs_base": 100 * (st["zero"]["pass@1"] - st["base"]["pass@1"]),
                "rl_vs_control": 100 * (st["zero"]["pass@1"] - st["control"]["pass@1"]),
                "trace_vs_base": 100 * ((st["zero"]["trace_accuracy"] or 0) - (st["base"]["trace_accuracy"] or 0))}
        result["gaps"] = gaps
        print(f"independent: pass@1 RL − base {gaps['rl_vs_base']:+.1f} pt (target ≥ +25), RL − control "
              f"{gaps['rl_vs_control']:+.1f} pt (target ≥ +20), trace accuracy RL − base {gaps['trace_vs_base']:+.1f} pt "
              f"(target ≥ +10)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
