"""Why does GRPO prune reflection in the demo? Samples a checkpoint's own arithmetic traces at the rollout
temperature on train-split problems and checks every step against the problem, to say where `wait `
falls (after a wrong step, or after a right one), whether the re-checked step comes out right, and how
often reflecting traces end right against the others.

    .venv/bin/python bench/demo_reflect.py runs/tiny/base runs/tiny/zero [--n 100] [--temperature 0.7]

A step is right when it is what a correct solver writes from the trace's own state so far (column,
carry, suffix): a slip is judged once, where it happens, and the steps after it are judged from the
values the trace wrote; a final carry left unwritten counts as one wrong step. A `wait ` step re-does the step before it (the state rolls back one column);
the re-check of the `recheck` style (`wait 7*8=56,56+1=57>…`) is read as one step. A wrong step that is
right but for a carry-in (borrow) written as 0, or a last carry left unwritten, is a *forgotten carry* —
the misconception of the `forgetful` corpus style — and is counted apart from the other slips. A trace
that opens with a guess (the `checked` style, `guess 5228,…,wait 5218`) is judged on its column steps, and
its guess apart: right or wrong, rejected (`wait …`) or kept."""
from __future__ import annotations

import argparse
import re
from collections import Counter

STEP = re.compile(r"^(wait )?(\d)([+*-])(\d)([+-])(\d)=(\d+)(b?)>(\d+)$")
CARRY = re.compile(r"^(wait )?c(\d)>(\d+)$")
RECHECK = re.compile(r"^wait (\d)([+*])(\d)=(\d+),(\d+)\+(\d)=(\d+)>(\d+)$")
RECHECK_SUB = re.compile(r"^wait (\d)\+(\d)=(\d+),(\d)-(\d+)=(\d)(b?)>(\d+)$")
# A `checked` trace: a guess first (`guess 5821,`), the column trace, and `,wait ` with the trace's
# value when it ends elsewhere than the guess (`,wait 5218`).
GUESS = re.compile(r"^guess (-?\d+),(.*?)(,wait (-?\d+))?$")


def merge(parts: list[str]) -> list[str]:
    """Comma-separated parts → steps: a re-check's first part (no `>` yet) joins the next."""
    out: list[str] = []
    for part in parts:
        if out and out[-1].startswith("wait ") and ">" not in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def judge(a: int, op: str, b: int, think: str) -> list[tuple[bool, bool, bool]]:
    """(reflects, right, forgot) for every step of a column trace of `a op b`; forgot: the step is wrong
    only in leaving out the carry (borrow) it should take in, or it is the last carry, unwritten."""
    ncols = max(len(str(a)), len(str(b))) if op == "+" else len(str(a))
    xs = [int(ch) for ch in reversed(str(a).zfill(ncols))]
    ys = [b] * ncols if op == "*" else [int(ch) for ch in reversed(str(b).zfill(ncols))]
    col, carry, suffix, out, prev = 0, 0, "", [], (0, 0, "")
    for s in merge(think.split(",")):
        wait = s.startswith("wait ")
        if wait and out:   # a re-check re-does the previous column
            col, carry, suffix = prev
        prev = (col, carry, suffix)
        m, c, r, rs = STEP.match(s), CARRY.match(s), RECHECK.match(s), RECHECK_SUB.match(s)
        true = None if col >= ncols else (xs[col] - ys[col] - carry if op == "-" else
                                          (xs[col] + ys[col] if op == "+" else xs[col] * ys[col]) + carry)
        if m and true is not None and m[3] == op:
            x, y, cin, raw, mark, suf = int(m[2]), int(m[4]), int(m[6]), int(m[7]), m[8], m[9]
            bare = true - carry if op != "-" else true + carry   # the column with no carry in
            if op == "-":
                right = (x, y, cin, raw, mark) == (xs[col], ys[col], carry, true % 10, "b" if true < 0 else "")
                forgot = (x, y, cin, raw, mark) == (xs[col], ys[col], 0, bare % 10, "b" if bare < 0 else "")
                digit, carry_out = raw % 10, int(mark == "b")
            else:
                right = (x, y, cin, raw) == (xs[col], ys[col], carry, true)
                forgot = (x, y, cin, raw) == (xs[col], ys[col], 0, bare)
                digit, carry_out = raw % 10, raw // 10
            forgot = forgot and carry > 0
        elif r and true is not None and op != "-" and r[2] == op:
            x, y, first, first2, cin, raw = (int(r[i]) for i in (1, 3, 4, 5, 6, 7))
            suf = r[8]
            right = (x, y, cin, raw) == (xs[col], ys[col], carry, true) and first == first2 == true - carry
            forgot = False
            digit, carry_out = raw % 10, raw // 10
        elif rs and true is not None and op == "-":
            y, cin, s1, x, s2, raw = (int(rs[i]) for i in range(1, 7))
            mark, suf = rs[7], rs[8]
            right = ((x, y, cin, raw, mark) == (xs[col], ys[col], carry, true % 10, "b" if true < 0 else "")
                     and s1 == s2 == y + cin)
            forgot = False
            digit, carry_out = raw, int(mark == "b")
        elif c:
            out.append((wait, col == ncols and carry > 0 and int(c[2]) == carry and c[3] == f"{carry}{suffix}",
                        False))
            carry = 0
            continue
        else:
            out.append((wait, False, False))
            continue
        suffix_right = suf == f"{digit}{suffix}"
        out.append((wait, right and suffix_right, forgot and suffix_right))
        col, carry, suffix = col + 1, carry_out, f"{digit}{suffix}"
    if carry and op != "-":   # the last carry never written out: a dropped carry, one wrong step
        out.append((False, False, True))
    return out


def tally(problems, texts: list[list[str]], task, reasoning) -> Counter:
    """Counts over every completion: traces and their accuracy, reflecting or not; steps, slips (and of
    them, forgotten carries), `wait` after a slip or after a right step; re-checks and those that came
    out right."""
    from qiusuo.rewards import parse_completion

    n = Counter()
    for p, group in zip(problems, texts):
        for text in group:
            parsed = parse_completion(text, reasoning)
            if not parsed or not parsed[0]:
                n["direct"] += 1
                continue
            answer = task.answer_of(p, text, reasoning)
            ok = answer is not None and task.score(p, answer)[0] == 1.0
            think, guessed, rejected = parsed[0], GUESS.match(parsed[0]), False
            if guessed:
                think, wrong, rejected = guessed[2], guessed[1] != p.answer, guessed[3] is not None
                n["guessed"] += 1
                n["guess_wrong"] += wrong
                n["rejected_wrong" if wrong else "rejected_right"] += rejected
            steps = judge(p.data["a"], p.data["op"], p.data["b"], think)
            kind = "reflect" if rejected or any(w for w, _, _ in steps) else "plain"
            n["traces"] += 1
            n[kind] += 1
            n[kind + "_right"] += ok
            for j, (wait, right, forgot) in enumerate(steps):
                then_wait = j + 1 < len(steps) and steps[j + 1][0]
                if wait:
                    n["rechecks"] += 1
                    n["rechecks_right"] += right
                else:
                    n["steps"] += 1
                    n["slips"] += not right
                    n["forgot"] += forgot
                    n["wait_after_forgot"] += forgot and then_wait
                    n["wait_after_slip" if not right else "wait_after_right"] += then_wait
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--n", type=int, default=100, help="train-split problems per digit count (3, 4, 5)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7, help="the demo's rollout temperature")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    from qiusuo.checkpoint import load_checkpoint
    from qiusuo.engine import Engine, SamplingParams
    from qiusuo.tasks import get_task

    task = get_task("arith")
    problems = [task.sample("train", seed=args.seed + i, difficulty=d) for d in (3, 4, 5) for i in range(args.n)]
    for ckpt in args.checkpoints:
        model, tok = load_checkpoint(ckpt, "cpu")
        model.eval()
        out = Engine(model, tok).generate([task.prompt_ids(p, tok) for p in problems],
                                          SamplingParams(max_new_tokens=144, temperature=args.temperature,
                                                         seed=args.seed), n=args.k)
        texts = [[c.text for c in out[i * args.k:(i + 1) * args.k]] for i in range(len(problems))]
        n = tally(problems, texts, task, tok.reasoning)
        share = lambda a, b: f"{n[a]}/{n[b]} = {100 * n[a] / max(1, n[b]):.1f} %"
        print(f"{ckpt}: {n['traces']} traces, {n['direct']} direct answers")
        print(f"  traces right {share('plain_right', 'plain')} without `wait`, {share('reflect_right', 'reflect')} with it")
        print(f"  slips per step {share('slips', 'steps')}; `wait` after a slip {share('wait_after_slip', 'slips')}, "
              f"after a right step {share('wait_after_right', 'steps')}")
        print(f"  of the slips, carries forgotten {share('forgot', 'slips')} (caught by `wait` "
              f"{share('wait_after_forgot', 'forgot')}); other slips per step "
              f"{100 * (n['slips'] - n['forgot']) / max(1, n['steps']):.1f} %")
        print(f"  re-checked steps right {share('rechecks_right', 'rechecks')}")
        print(f"  traces that guess first {share('guessed', 'traces')}; guesses wrong "
              f"{share('guess_wrong', 'guessed')}, of them rejected (`wait …`) {share('rejected_wrong', 'guess_wrong')}; "
              f"right guesses rejected {n['rejected_right']}")


if __name__ == "__main__":
    main()
