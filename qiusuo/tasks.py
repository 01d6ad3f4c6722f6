"""Synthetic verifiable tasks: problem generation, reference completions and scoring.

Two tasks are provided: multi-digit arithmetic ("arith") and the countdown number
game ("countdown"). Each task can

* generate random problems at a given difficulty,
* sample problems deterministically from a train or held-out split,
* write pretraining completions in eight styles ("direct", "steps", "flawed", "reflect", "recheck",
  "forgetful", "caught", "checked"),
* score a final answer strictly (the same scorer serves as the RL reward).

Every completion has the exact shape ``<think>...</think><answer>...</answer>``.
All strings stay ASCII and short, because the model is tokenised per character.
"""

from __future__ import annotations

import ast
from abc import ABC, abstractmethod
import hashlib
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

STYLES = ("direct", "steps", "flawed", "reflect", "recheck", "forgetful", "caught", "checked")
SPLITS = ("train", "heldout")

# What a trace writes when it re-checks a step it got wrong, before redoing the step correctly: the
# reflection ("aha moment") that evaluation counts and that R1-Zero's RL makes more frequent.
REFLECTION = "wait "
REFLECTION_ZH = "等等 "
# How a `checked` trace opens: a guess, which the trace then checks.
GUESS = "guess "

# One bucket in eight is held out; hashing the canonical problem (not the seed, not the prompt
# text) makes the split disjoint by construction, whichever seeds callers use, and keeps every
# reordering of a held-out problem out of training.
HELDOUT_BUCKETS = 8

# Bound on rejection sampling so a broken generator fails loudly instead of hanging.
MAX_DRAWS = 10_000


def heldout(problem_key: str) -> bool:
    """Return True when the problem with this key belongs to the held-out split.

    sha256 is used instead of ``hash()`` because the latter is salted per process,
    which would make the split change between runs.
    """
    digest = hashlib.sha256(problem_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def reflects(think: str) -> bool:
    """Whether a reasoning trace re-checks one of its steps (holds the reflection marker, in English or
    as a Chinese trace writes it: qiusuo/language.py translates `wait` to 等等)."""
    return REFLECTION in think or REFLECTION_ZH in think


def format_completion(think: str, answer: str) -> str:
    """Wrap a reasoning trace and an answer in the exact completion format."""
    return f"<think>{think}</think><answer>{answer}</answer>"


@dataclass(frozen=True)
class Problem:
    """One task instance; ``key()`` identifies its content across runs."""

    task: str
    difficulty: int
    prompt: str
    answer: str
    # Left out of eq/hash: a dict is unhashable, and the prompt already pins the content.
    data: dict = field(default_factory=dict, compare=False, hash=False)
    canonical: str = field(default="", compare=False)
    """The problem with its incidental order removed (sorted operands of + and *, sorted Countdown
    numbers); empty: the prompt itself. Problems that differ only in that order share a canonical form."""

    def key(self) -> str:
        """Canonical identity of the problem content, e.g. ``arith:397+4821`` for ``4821+397``.

        The held-out split and held-out deduplication hash this key, so a permutation of a
        held-out problem (``397+4821``, ``reach 20 with 2 10 5``) is held out with it."""
        return f"{self.task}:{self.canonical or self.prompt}"


class Task(ABC):
    """Base class: subclasses supply generation, completion styles and scoring."""

    name: str = ""
    difficulties: tuple[int, ...] = ()

    @abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw one random problem of the given difficulty."""

    @abstractmethod
    def score(self, problem: Problem, answer: str) -> tuple[float, str]:
        """Return (1.0, "correct") or (0.0, reason) for a final answer string."""

    def vote_key(self, problem: Problem, answer: str) -> str:
        """The answer's canonical form for majority voting (cons@k): answers with the same key are
        the same answer and score the same. This default is the text itself; tasks override it."""
        return answer

    def prompt_ids(self, problem: Problem, tok) -> list[int]:
        """The prompt's token ids: the problem as the user turn of the checkpoint's chat template."""
        return tok.prompt_ids(problem.prompt)

    def answer_of(self, problem: Problem, text: str, fmt=None) -> str | None:
        """The final answer of a completion, or None: here the answer field of the checkpoint's reasoning
        format `fmt` (qiusuo/rewards.py; default the exact `<think>…</think><answer>…</answer>`, the
        strict parser of docs/design.md §4)."""
        from .rewards import STRICT, parse_completion

        parsed = parse_completion(text, fmt or STRICT)
        return None if parsed is None else parsed[1]

    def sample(self, split: str, seed: int, difficulty: int) -> Problem:
        """Draw a problem from ``split``; deterministic for (split, seed, difficulty).

        Problems of the other split are skipped, so a held-out problem can never
        be produced for training, whatever the seed.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.check_difficulty(difficulty)
        rng = random.Random(f"{split}:{self.name}:{difficulty}:{seed}")
        want_heldout = split == "heldout"
        for _ in range(MAX_DRAWS):
            problem = self.generate(rng, difficulty)
            if heldout(problem.key()) == want_heldout:
                return problem
        raise RuntimeError(f"no {split} problem found for {self.name} d={difficulty}")

    def completion(self, problem: Problem, style: str, rng: random.Random) -> str:
        """Write a pretraining completion for ``problem`` in the given style."""
        writers = {"direct": self._direct, "steps": self._steps, "flawed": self._flawed,
                   "reflect": self._reflect, "recheck": self._recheck,
                   "forgetful": self._forgetful, "caught": self._caught, "checked": self._checked}
        if style not in writers:
            raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
        think, answer = writers[style](problem, rng)
        return format_completion(think, answer)

    def check_difficulty(self, difficulty: int) -> None:
        """Raise ValueError for a difficulty this task does not support."""
        if difficulty not in self.difficulties:
            raise ValueError(
                f"{self.name}: difficulty {difficulty} not in {self.difficulties}"
            )

    # Style writers return (think, answer); subclasses implement them.
    @abstractmethod
    def _direct(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A short guess: often wrong on hard instances."""

    @abstractmethod
    def _steps(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A correct step-by-step trace."""

    @abstractmethod
    def _flawed(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A step-by-step trace with one slip, ending in a wrong answer."""

    @abstractmethod
    def _reflect(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A trace that slips once, notices it (``wait ``), redoes the step and ends right."""

    def _recheck(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A trace that re-checks a step by another route (``wait ``) and goes on from the re-checked
        value, whether the step was right or had slipped; a task without such a route reflects."""
        return self._reflect(problem, rng)

    def _forgetful(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A trace that follows a consistent misconception (arithmetic: carries and borrows forgotten);
        a task without one writes a flawed trace."""
        return self._flawed(problem, rng)

    def _caught(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A forgetful trace that notices its first mistake (``wait ``), redoes it and ends right; a task
        without a misconception reflects."""
        return self._reflect(problem, rng)

    def _checked(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A direct guess checked by working the problem out; a task without a checkable guess reflects."""
        return self._reflect(problem, rng)


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------

# How often a "direct" (no reasoning) answer is right, by digit count of a: short
# sums are guessable, long ones mostly are not, which is what RL has to discover.
ARITH_DIRECT_ACCURACY = {1: 0.95, 2: 0.85, 3: 0.5, 4: 0.3, 5: 0.15}
ARITH_DIRECT_ACCURACY_DEFAULT = 0.05

# Strict integer syntax: no sign other than a minus, no leading zeros, no spaces, no "-0": every
# integer has exactly one accepted spelling.
INTEGER_RE = re.compile(r"0|-?[1-9][0-9]*")


@dataclass(frozen=True)
class Slip:
    """One mistake in a column trace: the raw column value shifted by ``delta``,
    or the carry (borrow) out of the column forgotten."""

    column: int
    delta: int = 0
    drop_carry: bool = False


def random_number(rng: random.Random, ndigits: int) -> int:
    """A number with exactly ``ndigits`` digits (0 allowed for one digit)."""
    if ndigits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (ndigits - 1), 10**ndigits - 1)


def arith_result(a: int, op: str, b: int) -> int:
    """The true value of ``a op b``."""
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _column_count(a: int, op: str, b: int) -> int:
    """Columns worked in a trace: a's digits (b never has more for our problems)."""
    if op == "+":
        return max(len(str(a)), len(str(b)))
    return len(str(a))


def _column(op: str, x: int, y: int, carry: int, delta: int) -> tuple[str, int, int] | None:
    """Work one column; return (text, digit, carry_out) or None if the slip is absurd.

    ``delta`` shifts the raw column value to model a slip; later columns then follow
    consistently from the shifted value. Values a learner could never write (a
    negative sum, a subtraction needing a borrow of two) are refused.
    """
    if op == "-":
        raw = x - y - carry + delta
        if not -10 <= raw <= 9:
            return None
        mark = "b" if raw < 0 else ""
        return f"{x}-{y}-{carry}={raw % 10}{mark}", raw % 10, int(raw < 0)
    raw = (x + y if op == "+" else x * y) + carry + delta
    if raw < 0:
        return None
    return f"{x}{op}{y}+{carry}={raw}", raw % 10, raw // 10


def arith_trace(a: int, op: str, b: int, slip: Slip | None = None,
                reflect: bool = False, forget: str | None = None) -> tuple[str, str] | None:
    """Right-to-left column trace of ``a op b`` as (think, answer).

    Each step shows the column arithmetic, then ``>`` and the result suffix built so
    far, so the answer is a copy of the last suffix (leading zeros stripped). With a
    ``slip`` the named column goes wrong and everything after follows from it;
    returns None when that slip cannot happen in this column. With ``reflect`` the
    slipped step is followed by ``wait `` and the same column worked correctly, and the
    trace goes on from the corrected value (only for slips of the column value, which
    show in the slipped step itself).

    ``forget`` models a misconception rather than a random slip: ``"all"`` works every column with a
    carry-in (borrow) of 0 and leaves the last carry unwritten, so the trace is wrong exactly when the
    problem carries; ``"catch"`` writes the first column that needs a carry-in with 0, then ``wait ``
    and the column with its carry, and carries correctly from there (None when the only carry is the
    last one, which a trace drops by not writing it: nothing shows to notice).
    """
    bad_operands = a < 0 or b < 0 or (op == "-" and a < b) or (op == "*" and b > 9)
    if op not in ("+", "-", "*") or bad_operands:
        raise ValueError(f"unsupported operands for a trace: {a}{op}{b}")
    ncols = _column_count(a, op, b)
    xs = [int(ch) for ch in reversed(str(a).zfill(ncols))]
    ys = [b] * ncols if op == "*" else [int(ch) for ch in reversed(str(b).zfill(ncols))]
    if forget not in (None, "all", "catch"):
        raise ValueError(f"forget must be None, 'all' or 'catch', not {forget!r}")
    carry, suffix, steps = 0, "", []
    for i in range(ncols):
        if forget == "all":
            carry = 0
        here = slip is not None and slip.column == i
        worked = _column(op, xs[i], ys[i], carry, slip.delta if here else 0)
        if worked is None:
            return None
        text, digit, carry_out = worked
        if here and slip.drop_carry:
            if carry_out == 0 or reflect:
                return None
            carry_out = 0
        # A step noticed to be wrong: written first as it went wrong, then `wait ` and the column right.
        first = None
        if here and reflect:
            first, (text, digit, carry_out) = (text, digit), _column(op, xs[i], ys[i], carry, 0)
        elif forget == "catch" and carry:
            first, forget = _column(op, xs[i], ys[i], 0, 0)[:2], None
        if first:
            steps.append(f"{first[0]}>{first[1]}{suffix}")
            text = REFLECTION + text
        suffix = f"{digit}{suffix}"
        steps.append(f"{text}>{suffix}")
        carry = carry_out
    if forget == "catch":
        return None
    # A borrow left after the top column only happens after a slip; it is dropped,
    # as a careless solver would.
    if carry and op != "-" and forget != "all":
        suffix = f"{carry}{suffix}"
        steps.append(f"c{carry}>{suffix}")
    return ",".join(steps), str(int(suffix))


def _recheck_text(op: str, x: int, y: int, carry: int) -> tuple[str, int, int]:
    """One column worked again in two simpler steps (the re-check's independent route): the operands
    first, then the carry — ``7*8=56,56+1=57`` for ``7*8+1``, ``3+1=4,2-4=8b`` for ``2-3-1`` (the
    subtrahend and the borrow first). Returns (text, digit, carry_out) of the correct column."""
    if op == "-":
        raw = x - y - carry
        mark = "b" if raw < 0 else ""
        return f"{y}+{carry}={y + carry},{x}-{y + carry}={raw % 10}{mark}", raw % 10, int(raw < 0)
    first = x + y if op == "+" else x * y
    raw = first + carry
    return f"{x}{op}{y}={first},{first}+{carry}={raw}", raw % 10, raw // 10


def arith_rechecked_trace(a: int, op: str, b: int, column: int, delta: int = 0) -> tuple[str, str] | None:
    """Right-to-left column trace of ``a op b`` that re-checks ``column``: the step is written (off
    by ``delta`` when it slips), then ``wait `` and the same column worked by `_recheck_text`'s route,
    and the trace goes on from the re-checked (correct) value. With ``delta`` 0 the check confirms the
    step; otherwise it corrects it. None when that slip cannot happen in this column."""
    ncols = _column_count(a, op, b)
    xs = [int(ch) for ch in reversed(str(a).zfill(ncols))]
    ys = [b] * ncols if op == "*" else [int(ch) for ch in reversed(str(b).zfill(ncols))]
    carry, suffix, steps = 0, "", []
    for i in range(ncols):
        worked = _column(op, xs[i], ys[i], carry, delta if i == column else 0)
        if worked is None:
            return None
        text, digit, carry_out = worked
        if i == column:
            steps.append(f"{text}>{digit}{suffix}")
            text, digit, carry_out = _recheck_text(op, xs[i], ys[i], carry)
            text = REFLECTION + text
        suffix = f"{digit}{suffix}"
        steps.append(f"{text}>{suffix}")
        carry = carry_out
    if carry and op != "-":
        suffix = f"{carry}{suffix}"
        steps.append(f"c{carry}>{suffix}")
    return ",".join(steps), str(int(suffix))


def near_miss(answer: str, rng: random.Random) -> str:
    """Change one or two digits of a non-negative integer string, keeping it canonical."""
    sign, digits = ("-", list(answer[1:])) if answer.startswith("-") else ("", list(answer))
    count = min(len(digits), rng.choice((1, 2)))
    for pos in rng.sample(range(len(digits)), count):
        # A leading zero would make the guess malformed, not merely wrong.
        banned = {digits[pos], "0"} if pos == 0 and len(digits) > 1 else {digits[pos]}
        digits[pos] = rng.choice([d for d in "0123456789" if d not in banned])
    return sign + "".join(digits)


class ArithmeticTask(Task):
    """``a op b`` with op in + - *; difficulty = number of digits of a."""

    name = "arith"
    difficulties = tuple(range(1, 9))

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw a, op, b as described in the module docs."""
        self.check_difficulty(difficulty)
        op = rng.choice("+-*")
        a = random_number(rng, difficulty)
        if op == "*":
            b = rng.randint(2, 9)
        else:
            b = random_number(rng, rng.randint(1, difficulty))
            if op == "-" and b > a:
                # b can only exceed a when it has as many digits, so a keeps d digits.
                a, b = b, a
        return self.make_problem(a, op, b)

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        """Build the Problem for ``a op b`` (also handy for tests and demos)."""
        # + and * commute: 397+4821 and 4821+397 are one problem.
        lo, hi = (min(a, b), max(a, b)) if op in "+*" else (a, b)
        return Problem(
            task=self.name,
            difficulty=len(str(a)),
            prompt=f"{a}{op}{b}",
            answer=str(arith_result(a, op, b)),
            data={"a": a, "op": op, "b": b},
            canonical=f"{lo}{op}{hi}",
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str]:
        """Exact match on a strictly formatted integer."""
        if not INTEGER_RE.fullmatch(answer):
            return 0.0, "malformed: not a plain integer"
        if answer != problem.answer:
            return 0.0, "wrong value"
        return 1.0, "correct"

    def vote_key(self, problem: Problem, answer: str) -> str:
        """The integer (its one strict spelling); anything else votes as itself, marked invalid."""
        return answer if INTEGER_RE.fullmatch(answer) else f"invalid:{answer}"

    def _operands(self, problem: Problem) -> tuple[int, str, int]:
        """The (a, op, b) a problem was built from."""
        return problem.data["a"], problem.data["op"], problem.data["b"]

    def _direct(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """An untraced guess: right with a difficulty-dependent probability."""
        p = ARITH_DIRECT_ACCURACY.get(problem.difficulty, ARITH_DIRECT_ACCURACY_DEFAULT)
        guess = problem.answer if rng.random() < p else near_miss(problem.answer, rng)
        return "", guess

    def _steps(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """The correct column trace."""
        return arith_trace(*self._operands(problem))

    def _flawed(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A column trace with one slip in a uniformly chosen column."""
        a, op, b = self._operands(problem)
        columns = list(range(_column_count(a, op, b)))
        rng.shuffle(columns)
        for column in columns:
            slips = [Slip(column, delta=1), Slip(column, delta=-1),
                     Slip(column, drop_carry=True)]
            rng.shuffle(slips)
            for slip in slips:
                traced = arith_trace(a, op, b, slip)
                # A slip always moves the value, but check: a flawed trace must be wrong.
                if traced is not None and traced[1] != problem.answer:
                    return traced
        raise RuntimeError(f"no flawed trace for {problem.prompt}")

    def _reflect(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A column trace that slips by ±1 in a uniformly chosen column, re-checks that column at
        once and finishes correctly."""
        a, op, b = self._operands(problem)
        columns = list(range(_column_count(a, op, b)))
        rng.shuffle(columns)
        for column in columns:
            deltas = [1, -1]
            rng.shuffle(deltas)
            for delta in deltas:
                traced = arith_trace(a, op, b, Slip(column, delta=delta), reflect=True)
                if traced is not None:
                    return traced
        raise RuntimeError(f"no reflected trace for {problem.prompt}")

    def _forgetful(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A column trace that forgets every carry and borrow: a misconception, the same at every
        column, so the model learns it as a way of working (one choice, where the first carry falls)
        rather than as a rare per-digit slip that sampling below T = 1 mostly hides."""
        return arith_trace(*self._operands(problem), forget="all")

    def _caught(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A forgetful trace that catches itself: the first carry-in written as 0, then ``wait `` and
        the column redone with its carry, then carried correctly to a right answer. The slip shows in
        the text (a column value ≥ 10, or a borrow mark, followed by a carry-in of 0), so the re-check
        is one the model can learn to make where it is due. Without an inner carry to forget, the
        correct trace."""
        traced = arith_trace(*self._operands(problem), forget="catch")
        return traced if traced is not None else self._steps(problem, rng)

    def _checked(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A guess checked by the column trace: the direct guess first (``guess 5821,``, right as often
        as a direct answer is), then the correct trace; when the trace ends elsewhere, ``wait `` and the
        trace's value again (``wait 5831``), which the answer copies. The guess is the error no amount
        of care avoids (a one-shot 5-digit sum is beyond the model) and the trace exposes afterwards."""
        guess = self._direct(problem, rng)[1]
        think, answer = self._steps(problem, rng)
        verdict = "" if guess == answer else f",{REFLECTION}{answer}"
        return f"{GUESS}{guess},{think}{verdict}", answer

    def _recheck(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """A column trace that re-checks one uniformly chosen column by `_recheck_text`'s route: half
        the time that column slipped by ±1 and the check corrects it, else the check confirms it."""
        a, op, b = self._operands(problem)
        columns = list(range(_column_count(a, op, b)))
        rng.shuffle(columns)
        deltas = [1, -1]
        rng.shuffle(deltas)
        if rng.random() < 0.5:
            for column in columns:
                for delta in deltas:
                    traced = arith_rechecked_trace(a, op, b, column, delta)
                    if traced is not None:
                        return traced
        return arith_rechecked_trace(a, op, b, columns[0])


# ---------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------

COUNTDOWN_DIRECT_ACCURACY = {3: 0.4, 4: 0.25, 5: 0.15}
COUNTDOWN_DIRECT_ACCURACY_DEFAULT = 0.1
COUNTDOWN_MAX_NUMBER = 12
COUNTDOWN_MAX_TARGET = 200
MAX_ANSWER_CHARS = 100
# What an answer may contain. Checked before parsing: Python's parser would otherwise drop comments,
# newlines and line continuations (``10*2#trust me`` would parse as ``10*2``).
COUNTDOWN_ALPHABET = frozenset("0123456789+-*/() ")
# Random chains inspected when looking for a small, plausible slip in a flawed trace.
FLAWED_CANDIDATE_CHAINS = 32

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub,
            ast.Mult: operator.mul, ast.Div: operator.truediv}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class Chain:
    """A left fold ``((start op1 n1) op2 n2) ...`` over some of the given numbers."""

    start: int
    steps: tuple[tuple[str, int], ...]

    def values(self) -> list[int]:
        """The intermediate result after each step (exact for chains we build)."""
        value, out = self.start, []
        for op, n in self.steps:
            value = _APPLY[op](value, n)
            out.append(value)
        return out

    def value(self) -> int:
        """The final value of the chain."""
        return self.values()[-1]

    def expression(self) -> str:
        """Infix form with parentheses only where the fold needs them."""
        expr, last_op = str(self.start), None
        for op, n in self.steps:
            # Only a */ after a +- changes meaning without brackets; right operands
            # are single numbers, so they never need any.
            if last_op is not None and _PRECEDENCE[op] > _PRECEDENCE[last_op]:
                expr = f"({expr})"
            expr, last_op = f"{expr}{op}{n}", op
        return expr


def legal_ops(value: int, n: int) -> list[str]:
    """Ops that keep a chain's running value a positive integer."""
    ops = ["+"]
    if value - n > 0:
        ops.append("-")
    ops.append("*")
    # Dividing by 1 is a no-op that would only pad traces.
    if n != 1 and value % n == 0:
        ops.append("/")
    return ops


def random_chain(rng: random.Random, numbers: tuple[int, ...]) -> Chain:
    """A random valid chain over 2..len(numbers) distinct positions of ``numbers``."""
    positions = rng.sample(range(len(numbers)), rng.randint(2, len(numbers)))
    value, steps = numbers[positions[0]], []
    for pos in positions[1:]:
        n = numbers[pos]
        op = rng.choice(legal_ops(value, n))
        steps.append((op, n))
        value = _APPLY[op](value, n)
    return Chain(numbers[positions[0]], tuple(steps))


def attempt_text(chain: Chain, target: int, written: list[int] | None = None) -> str:
    """One attempt in a trace, e.g. ``7+3=10,10*2=20 no``.

    ``written`` overrides the shown intermediate results (for flawed traces); the
    verdict follows the shown final value, as the solver believes it.
    """
    results = chain.values() if written is None else written
    left, parts = chain.start, []
    for (op, n), result in zip(chain.steps, results):
        parts.append(f"{left}{op}{n}={result}")
        left = result
    verdict = "yes" if results[-1] == target else "no"
    return f"{','.join(parts)} {verdict}"


def reflected_attempt_text(chain: Chain, target: int, index: int, wrong: int) -> str:
    """An attempt whose step ``index`` first shows ``wrong``, then ``wait `` and the step redone
    right; the chain goes on from the true value, and the verdict follows the true final value,
    e.g. ``7+3=11,wait 7+3=10,10*2=20 no``."""
    results = chain.values()
    left, parts = chain.start, []
    for i, ((op, n), result) in enumerate(zip(chain.steps, results)):
        if i == index:
            parts.append(f"{left}{op}{n}={wrong}")
            parts.append(f"{REFLECTION}{left}{op}{n}={result}")
        else:
            parts.append(f"{left}{op}{n}={result}")
        left = result
    verdict = "yes" if results[-1] == target else "no"
    return f"{','.join(parts)} {verdict}"


def _invert(op: str, n: int, result: int) -> int | None:
    """The positive integer x with ``x op n == result``, or None."""
    if op == "+":
        return result - n if result - n > 0 else None
    if op == "-":
        return result + n
    if op == "*":
        return result // n if result % n == 0 else None
    return result * n


def _slipped_values(chain: Chain, target: int, index: int) -> list[int] | None:
    """Shown results if step ``index`` goes wrong so that the chain 'reaches' target.

    Works backwards from the target through the later steps to find what step
    ``index`` must (wrongly) produce; later steps are then shown correctly.
    """
    need = target
    for op, n in reversed(chain.steps[index + 1:]):
        need = _invert(op, n, need)
        if need is None:
            return None
    true_values = chain.values()
    if need == true_values[index]:
        return None
    shown, value = true_values[:index] + [need], need
    for op, n in chain.steps[index + 1:]:
        value = _APPLY[op](value, n)
        shown.append(value)
    return shown


class _Reject(Exception):
    """Raised inside the verifier to stop at the first problem found."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _parse_answer(text: str) -> ast.expr:
    """Parse (never evaluate) an answer into an expression tree."""
    if len(text) > MAX_ANSWER_CHARS:
        raise _Reject(f"malformed: longer than {MAX_ANSWER_CHARS} chars")
    stray = next((ch for ch in text if ch not in COUNTDOWN_ALPHABET), None)
    if stray is not None:
        raise _Reject(f"malformed: character {stray!r} not allowed")
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError:
        raise _Reject("malformed: syntax error") from None
    except (ValueError, RecursionError, MemoryError):
        raise _Reject("malformed: unparseable") from None


def _literals(tree: ast.expr, text: str) -> list[int]:
    """Check every node is allowed and return the integer literals, left to right."""
    found = []
    # ast.walk is iterative, so hostile nesting cannot overflow the stack here.
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if type(node.value) is not int:  # bool is an int subclass: excluded
                raise _Reject(f"malformed: {type(node.value).__name__} constant")
            literal = ast.get_source_segment(text, node)
            if literal != str(node.value):  # 0x7, 1_0, 00 ... are not plain numbers
                raise _Reject("malformed: number not in plain decimal")
            found.append(node)
        elif isinstance(node, ast.BinOp) or type(node) in _AST_OPS:
            continue  # the operator node itself is checked when walked
        else:
            raise _Reject(f"malformed: {type(node).__name__} not allowed")
    found.sort(key=lambda node: (node.lineno, node.col_offset))
    return [node.value for node in found]


def _check_numbers(used: list[int], numbers: tuple[int, ...]) -> None:
    """Each literal must be a given number, used at most as often as it was given."""
    given, seen = Counter(numbers), Counter()
    for n in used:
        if n not in given:
            raise _Reject(f"foreign number {n}")
        seen[n] += 1
        if seen[n] > given[n]:
            raise _Reject(f"reused number {n}")


def _evaluate(node: ast.expr) -> Fraction:
    """Exact value of a checked tree; every intermediate must be an integer."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    try:
        result = _AST_OPS[type(node.op)](left, right)
    except ZeroDivisionError:
        raise _Reject("division by zero") from None
    if result.denominator != 1:
        raise _Reject(f"non-integer intermediate {result}")
    return result


def countdown_value(text: str, numbers: tuple[int, ...]) -> int:
    """The value of a well-formed answer that uses only the given numbers; raises _Reject otherwise.
    Never executes the text: it is parsed into a tree and the tree is evaluated exactly."""
    tree = _parse_answer(text)
    _check_numbers(_literals(tree, text), numbers)
    try:
        return int(_evaluate(tree))
    except RecursionError:
        raise _Reject("malformed: too deeply nested") from None


def verify_countdown(text: str, numbers: tuple[int, ...], target: int) -> tuple[float, str]:
    """Score a countdown answer expression without ever executing it."""
    try:
        if countdown_value(text, numbers) != target:
            raise _Reject("wrong value")
    except _Reject as rejection:
        return 0.0, rejection.reason
    return 1.0, "correct"


class CountdownTask(Task):
    """Reach a target from given numbers with + - * /; difficulty = count of numbers."""

    name = "countdown"
    difficulties = (3, 4, 5, 6)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw numbers and a solution chain; the chain's value is the target."""
        self.check_difficulty(difficulty)
        for _ in range(MAX_DRAWS):
            numbers = tuple(rng.randint(1, COUNTDOWN_MAX_NUMBER) for _ in range(difficulty))
            chain = random_chain(rng, numbers)
            target = chain.value()
            # A target equal to a given number would be solvable with no arithmetic.
            if 1 <= target <= COUNTDOWN_MAX_TARGET and target not in numbers:
                return self.make_problem(numbers, target, chain)
        raise RuntimeError("could not draw a countdown problem")

    def make_problem(self, numbers: tuple[int, ...], target: int, chain: Chain) -> Problem:
        """Build the Problem; ``chain`` is the reference solution and must hit target."""
        if chain.value() != target:
            raise ValueError(f"chain {chain.expression()} does not reach {target}")
        numbers = tuple(numbers)
        return Problem(
            task=self.name,
            difficulty=len(numbers),
            prompt=f"reach {target} with {' '.join(map(str, numbers))}",
            answer=chain.expression(),
            data={"numbers": numbers, "target": target, "chain": chain},
            # The order of the given numbers is incidental: one problem, whatever the order.
            canonical=f"{target}:{','.join(map(str, sorted(numbers)))}",
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str]:
        """Verify the expression against the problem's numbers and target."""
        return verify_countdown(answer, problem.data["numbers"], problem.data["target"])

    def vote_key(self, problem: Problem, answer: str) -> str:
        """A valid expression votes for its value (``=46``: every correct answer votes alike, however
        it is written); an invalid one votes as itself, marked invalid."""
        try:
            return f"={countdown_value(answer, problem.data['numbers'])}"
        except _Reject:
            return f"invalid:{answer}"

    def _wrong_chain(self, problem: Problem, rng: random.Random) -> Chain:
        """A random valid chain whose value misses the target."""
        for _ in range(MAX_DRAWS):
            chain = random_chain(rng, problem.data["numbers"])
            if chain.value() != problem.data["target"]:
                return chain
        raise RuntimeError(f"no wrong chain for {problem.prompt}")

    def _wrong_attempts(self, problem: Problem, rng: random.Random) -> list[str]:
        """0..3 failed attempts (fewer for 3 numbers, to keep short traces short)."""
        count = rng.randint(0, min(3, problem.difficulty - 1))
        target = problem.data["target"]
        return [attempt_text(self._wrong_chain(problem, rng), target) for _ in range(count)]

    def _direct(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """An untraced guess: right with a difficulty-dependent probability."""
        p = COUNTDOWN_DIRECT_ACCURACY.get(problem.difficulty, COUNTDOWN_DIRECT_ACCURACY_DEFAULT)
        if rng.random() < p:
            return "", problem.answer
        return "", self._wrong_chain(problem, rng).expression()

    def _steps(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """Failed attempts, then the reference chain with its ``yes``."""
        attempts = self._wrong_attempts(problem, rng)
        attempts.append(attempt_text(problem.data["chain"], problem.data["target"]))
        return ";".join(attempts), problem.answer

    def _flawed(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """Failed attempts, then a wrong chain that 'reaches' the target via one slip."""
        attempts = self._wrong_attempts(problem, rng)
        chain, shown = self._slipped_chain(problem, rng)
        attempts.append(attempt_text(chain, problem.data["target"], shown))
        answer = chain.expression()
        if self.score(problem, answer)[0] != 0.0:
            raise RuntimeError(f"flawed answer {answer} is correct")  # cannot happen
        return ";".join(attempts), answer

    def _reflect(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        """Failed attempts, then the slipped chain of a flawed trace, but the slip is noticed and
        redone (``wait ``), the chain then misses, and the reference chain follows with its ``yes``."""
        attempts = self._wrong_attempts(problem, rng)
        chain, shown = self._slipped_chain(problem, rng)
        index = next(i for i, (s, t) in enumerate(zip(shown, chain.values())) if s != t)
        attempts.append(reflected_attempt_text(chain, problem.data["target"], index, shown[index]))
        attempts.append(attempt_text(problem.data["chain"], problem.data["target"]))
        return ";".join(attempts), problem.answer

    def _slipped_chain(self, problem: Problem, rng: random.Random) -> tuple[Chain, list[int]]:
        """Pick the wrong chain and slip with the smallest error among a few candidates.

        Small errors (often off by one) are what a plausible mistake looks like; a
        chain that jumps to the target from nowhere would be too easy to tell apart.
        """
        target, best, best_error = problem.data["target"], None, None
        for _ in range(FLAWED_CANDIDATE_CHAINS):
            chain = self._wrong_chain(problem, rng)
            true_values = chain.values()
            for index in range(len(chain.steps)):
                shown = _slipped_values(chain, target, index)
                if shown is None:
                    continue
                error = abs(shown[index] - true_values[index])
                if best_error is None or error < best_error:
                    best, best_error = (chain, shown), error
        # The last step can always be slipped straight onto the target, so a wrong
        # chain always yields at least one candidate.
        return best


# ---------------------------------------------------------------------------
# Math problems from a dataset file
# ---------------------------------------------------------------------------

class MathTask(Task):
    """Problems read from a dataset file (qiusuo/data.py: GSM8K, MATH, …), scored by math-verify
    (qiusuo/answers.py). `Problem.data` holds the prompt template, the source and the level; the level
    is the difficulty, the source the name its scores are reported under. Nothing is generated: the
    problems, and which of them are held out, are the dataset's."""

    name = "math"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        raise ValueError("math problems come from a dataset file (--data), not a generator")

    def prompt_ids(self, problem: Problem, tok) -> list[int]:
        """Through the chat template (chat, chat_boxed, with the system prompt if any) or as plain text
        (r1_zero, a custom template)."""
        from .data import prompt_ids

        return prompt_ids(tok, problem.prompt, problem.data["chat"], problem.data.get("system"))

    def answer_of(self, problem: Problem, text: str, fmt=None) -> str | None:
        """The `<answer>…</answer>` field, else the last `\\boxed{}`, else the last number
        (`answers.model_answer`), read after the reasoning's closing tag when there is one (the tag of
        `fmt`, default `</think>`); under the r1_zero template only the tagged answer counts."""
        from .answers import model_answer

        close = fmt.close if fmt is not None else "</think>"
        after = text.rsplit(close, 1)[1] if close in text else text
        found = model_answer(after, require_tags=problem.data.get("template") == "r1_zero")
        return None if found is None else found[0]

    def score(self, problem: Problem, answer: str) -> tuple[float, str]:
        """math-verify against the reference answer, with a timeout."""
        from .answers import check

        ok, reason = check(problem.answer, answer)
        return float(ok), reason

    def vote_key(self, problem: Problem, answer: str) -> str:
        """The answer's SymPy form (`answers.canonical`): 0.5, 1/2 and \\frac{1}{2} vote alike."""
        from .answers import canonical

        return canonical(answer)

    def _no_writer(self, problem: Problem, rng: random.Random) -> tuple[str, str]:
        raise ValueError("a dataset problem has no synthetic completions; its file holds the solutions")

    _direct = _steps = _flawed = _reflect = _no_writer


def source_of(problem: Problem) -> str:
    """The name a problem's scores are reported under: a dataset problem's source, else its task."""
    return problem.data.get("source") or problem.task


TASKS: dict[str, Task] = {"arith": ArithmeticTask(), "countdown": CountdownTask()}
"""The synthetic tasks: they generate their problems."""
DATA_TASKS: dict[str, Task] = {"math": MathTask()}
"""Tasks whose problems come from a dataset file."""


def get_task(name: str) -> Task:
    """Look a task up by name."""
    if name in DATA_TASKS:
        return DATA_TASKS[name]
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
