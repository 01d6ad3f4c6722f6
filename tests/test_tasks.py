"""Tests for qiusuo.tasks: generation, splits, completion styles and verifiers."""

import random
import re
from collections import Counter

import pytest

from qiusuo.rewards import parse_completion
from qiusuo.tasks import (
    ARITH_DIRECT_ACCURACY,
    COUNTDOWN_DIRECT_ACCURACY,
    INTEGER_RE,
    STYLES,
    TASKS,
    ArithmeticTask,
    Chain,
    CountdownTask,
    Problem,
    REFLECTION,
    Slip,
    arith_trace,
    attempt_text,
    format_completion,
    get_task,
    heldout,
    random_chain,
    arith_rechecked_trace,
    reflected_attempt_text,
    reflects,
    verify_countdown,
)

ARITH = TASKS["arith"]
COUNTDOWN = TASKS["countdown"]
ALLOWED_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyz +-*/=<>(),;:")
PER_DIFFICULTY = 25  # problems per difficulty in the style sweeps


def all_problems(task, per_difficulty=PER_DIFFICULTY, split="train"):
    """A fixed sweep of problems covering every difficulty of ``task``."""
    return [
        task.sample(split, seed, d) for d in task.difficulties for seed in range(per_difficulty)
    ]


# --- arithmetic trace checker (independent re-implementation of the rules) ---

ADD_MUL_STEP = re.compile(r"(\d)([+*])(\d)\+(\d+)=(\d+)>(\d+)")
SUB_STEP = re.compile(r"(\d)-(\d)-(\d)=(\d)(b?)>(\d+)")
CARRY_STEP = re.compile(r"c(\d+)>(\d+)")


def arith_mistakes(think: str) -> int:
    """Count wrong column results, mis-propagated carries and suffix copy errors."""
    mistakes, carry, suffix = 0, 0, ""
    for step in think.split(","):
        if m := CARRY_STEP.fullmatch(step):
            mistakes += int(m[1]) != carry
            mistakes += m[2] != m[1] + suffix
            carry, suffix = 0, m[2]
            continue
        if m := SUB_STEP.fullmatch(step):
            x, y, c, digit, mark, new = int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5], m[6]
            raw = x - y - c
            mistakes += (digit, bool(mark)) != (raw % 10, raw < 0)
            carry_out = int(bool(mark))
        else:
            m = ADD_MUL_STEP.fullmatch(step)
            assert m, f"unparseable step {step!r}"
            x, op, y, c, written, new = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5]), m[6]
            mistakes += written != (x + y + c if op == "+" else x * y + c)
            digit, carry_out = written % 10, written // 10
        mistakes += c != carry
        mistakes += new != f"{digit}{suffix}"
        carry, suffix = carry_out, new
    mistakes += carry != 0 and "-" not in think  # an add/mul carry left unwritten
    return mistakes


# --- countdown trace checker ---

CD_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def countdown_attempts(think: str):
    """Yield (steps, verdict) per attempt, steps as (left, op, right, shown) ints."""
    for attempt in think.split(";"):
        body, verdict = attempt.rsplit(" ", 1)
        steps = []
        for step in body.split(","):
            m = CD_STEP.fullmatch(step)
            assert m, f"unparseable step {step!r}"
            steps.append((int(m[1]), m[2], int(m[3]), int(m[4])))
        yield steps, verdict


def true_result(left: int, op: str, right: int) -> int:
    """Exact integer result of one countdown step (division must be exact)."""
    if op == "/":
        assert left % right == 0
        return left // right
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def check_attempt_uses_given(steps, numbers) -> None:
    """An attempt draws its operands from distinct given positions and chains results."""
    used = Counter([steps[0][0]] + [right for _, _, right, _ in steps])
    assert not used - Counter(numbers)
    for (_, _, _, shown), (left, _, _, _) in zip(steps, steps[1:]):
        assert left == shown


# ---------------------------------------------------------------------------
# Registry, problems, splits
# ---------------------------------------------------------------------------


def test_registry_and_get_task():
    assert set(TASKS) == {"arith", "countdown"}
    assert isinstance(get_task("arith"), ArithmeticTask)
    assert isinstance(get_task("countdown"), CountdownTask)
    with pytest.raises(ValueError, match="arith.*countdown"):
        get_task("sudoku")


def test_invalid_split_style_and_difficulty_raise():
    with pytest.raises(ValueError, match="split"):
        ARITH.sample("test", 0, 2)
    with pytest.raises(ValueError, match="difficulty"):
        ARITH.sample("train", 0, 9)
    with pytest.raises(ValueError, match="difficulty"):
        COUNTDOWN.generate(random.Random(0), 2)
    with pytest.raises(ValueError, match="style"):
        ARITH.completion(ARITH.make_problem(1, "+", 2), "cot", random.Random(0))


def test_problem_key_and_hashable():
    problem = ARITH.make_problem(4821, "+", 397)
    assert problem.key() == "arith:397+4821"
    assert problem.answer == "5218" and problem.difficulty == 4
    assert problem == ARITH.make_problem(4821, "+", 397)
    assert len({problem, ARITH.make_problem(4821, "+", 397)}) == 1


def test_heldout_is_stable_hash_bucket():
    # Pinned values catch a change of hash scheme (e.g. to the salted hash()),
    # which would silently reshuffle the splits between runs.
    assert [i for i in range(100) if heldout(f"arith:{i}+1")] == [14, 24, 30, 61, 80, 88, 92]
    assert sum(heldout(f"arith:{i}+1") for i in range(4000)) == 483  # about 1 in 8


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_splits_disjoint_and_consistent(name):
    task = TASKS[name]
    train, held = set(), set()
    for d in task.difficulties:
        for seed in range(250):
            train.add(task.sample("train", seed, d).key())
            held.add(task.sample("heldout", seed, d).key())
    assert train and held
    assert not train & held
    assert not any(map(heldout, train))
    assert all(map(heldout, held))


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_sample_is_deterministic(name):
    task = TASKS[name]
    d = task.difficulties[-1]
    first = [task.sample("train", seed, d) for seed in range(20)]
    again = [task.sample("train", seed, d) for seed in range(20)]
    assert [p.key() for p in first] == [p.key() for p in again]
    assert len({p.key() for p in first}) > 15  # different seeds, different problems
    assert task.sample("train", 3, d).key() != task.sample("heldout", 3, d).key()


def test_arith_generation_shape():
    rng = random.Random(1)
    for d in ARITH.difficulties:
        for _ in range(200):
            p = ARITH.generate(rng, d)
            a, op, b = p.data["a"], p.data["op"], p.data["b"]
            assert len(str(a)) == d and p.difficulty == d
            assert p.prompt == f"{a}{op}{b}"
            assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
            if op == "*":
                assert 2 <= b <= 9
            else:
                assert len(str(b)) <= d
            if op == "-":
                assert a >= b


def test_countdown_generation_shape():
    rng = random.Random(2)
    for n in COUNTDOWN.difficulties:
        for _ in range(200):
            p = COUNTDOWN.generate(rng, n)
            numbers, target = p.data["numbers"], p.data["target"]
            assert len(numbers) == n and all(1 <= x <= 12 for x in numbers)
            assert 1 <= target <= 200 and target not in numbers
            assert p.prompt == f"reach {target} with {' '.join(map(str, numbers))}"
            assert p.data["chain"].value() == target
            assert COUNTDOWN.score(p, p.answer) == (1.0, "correct")


# ---------------------------------------------------------------------------
# Completions: format, correctness by style, exact examples
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_every_style_parses_and_scores_as_intended(name):
    task = TASKS[name]
    rng = random.Random(3)
    for problem in all_problems(task):
        for style in STYLES:
            text = task.completion(problem, style, rng)
            assert text.isascii() and set(text) <= ALLOWED_CHARS, text
            parsed = parse_completion(text)
            assert parsed is not None, text
            think, answer = parsed
            value, reason = task.score(problem, answer)
            if style == "caught" and name == "arith":
                # Without an inner carry to forget there is nothing to catch: the correct trace.
                assert reflects(think) == (think != arith_trace(*ARITH._operands(problem))[0]), text
            elif style == "checked" and name == "arith":
                # The guess is rejected exactly when it is wrong.
                assert reflects(think) == (think.split(",")[0] != f"guess {problem.answer}"), text
            else:
                assert reflects(think) == (style in ("reflect", "recheck", "caught", "checked")), text
            if style == "forgetful" and name == "arith":
                # Right exactly when the problem never carries (or borrows).
                carries = arith_trace(*ARITH._operands(problem))[0] != think
                assert (value, reason) == ((0.0, "wrong value") if carries else (1.0, "correct")), text
            elif style in ("steps", "reflect", "recheck", "caught", "checked"):
                assert (value, reason) == (1.0, "correct"), text
            elif style in ("flawed", "forgetful"):
                assert value == 0.0 and reason == "wrong value", text
            else:
                assert think == ""
                assert not reason.startswith("malformed"), text


def test_arith_steps_have_no_mistakes_and_flawed_exactly_one():
    rng = random.Random(4)
    for problem in all_problems(ARITH):
        steps = ARITH.completion(problem, "steps", rng)
        flawed = ARITH.completion(problem, "flawed", rng)
        assert arith_mistakes(parse_completion(steps)[0]) == 0, steps
        assert arith_mistakes(parse_completion(flawed)[0]) == 1, flawed
        # The answer is always a copy of the last suffix, as in a correct trace.
        think, answer = parse_completion(flawed)
        assert answer == str(int(think.rsplit(">", 1)[1]))


def split_reflection(think: str) -> tuple[str, str]:
    """(the trace as first written, the trace with the re-checked step in place of the slipped one)."""
    steps = think.split(",")
    at = next(i for i, step in enumerate(steps) if step.startswith(REFLECTION))
    first = steps[:at]
    redone = steps[:at - 1] + [steps[at].removeprefix(REFLECTION)] + steps[at + 1:]
    return ",".join(first), ",".join(redone)


def test_arith_reflect_slips_once_then_redoes_the_step_and_ends_right():
    rng = random.Random(7)
    for problem in all_problems(ARITH):
        think, answer = parse_completion(ARITH.completion(problem, "reflect", rng))
        assert think.count(REFLECTION) == 1
        before, redone = split_reflection(think)
        # With the re-checked step in place of the slip the trace is the correct one, answer included.
        right, right_answer = arith_trace(*ARITH._operands(problem))
        assert (redone, answer) == (right, right_answer)
        # Before the marker: the correct steps, then one wrong step — the slip just noticed.
        written, correct = before.split(","), right.split(",")
        assert written[:-1] == correct[:len(written) - 1]
        assert written[-1] != correct[len(written) - 1]


def test_arith_reflect_example():
    assert arith_trace(4821, "+", 397, Slip(1, delta=1), reflect=True) == (
        "1+7+0=8>8,2+9+0=12>28,wait 2+9+0=11>18,8+3+1=12>218,4+0+1=5>5218", "5218")
    # A dropped carry shows only in the next column: not a slip a reflect trace is written with.
    assert arith_trace(4821, "+", 397, Slip(1, drop_carry=True), reflect=True) is None


def test_arith_forgetful_drops_every_carry_and_borrow():
    assert arith_trace(4821, "+", 397, forget="all") == ("1+7+0=8>8,2+9+0=11>18,8+3+0=11>118,4+0+0=4>4118", "4118")
    assert arith_trace(347, "*", 6, forget="all") == ("7*6+0=42>2,4*6+0=24>42,3*6+0=18>842", "842")
    assert arith_trace(623, "-", 61, forget="all") == ("3-1-0=2>2,2-6-0=6b>62,6-0-0=6>662", "662")
    rng = random.Random(5)
    for problem in all_problems(ARITH):
        think, answer = parse_completion(ARITH.completion(problem, "forgetful", rng))
        steps = think.split(",")
        # Every column is worked with a carry-in (borrow) of 0 and the last carry is never written.
        assert all("+0=" in s or "-0=" in s for s in steps) and not any(s.startswith("c") for s in steps)
        assert answer == str(int(steps[-1].rsplit(">", 1)[1]))
        # The column values themselves are right: the mistake is the misconception, not the arithmetic.
        a, op, b = ARITH._operands(problem)
        assert answer == str(int("".join(str(d) for d in reversed(_column_digits(a, op, b)))))


def _column_digits(a: int, op: str, b: int) -> list[int]:
    """Each column's own digit with no carry in, right to left (what a solver who never carries writes)."""
    n = max(len(str(a)), len(str(b))) if op == "+" else len(str(a))
    xs = [int(ch) for ch in reversed(str(a).zfill(n))]
    ys = [b] * n if op == "*" else [int(ch) for ch in reversed(str(b).zfill(n))]
    return [(x + y if op == "+" else x * y if op == "*" else x - y) % 10 for x, y in zip(xs, ys)]


def test_arith_caught_forgets_the_first_carry_notices_it_and_ends_right():
    assert arith_trace(4821, "+", 397, forget="catch") == (
        "1+7+0=8>8,2+9+0=11>18,8+3+0=11>118,wait 8+3+1=12>218,4+0+1=5>5218", "5218")
    # The only carry is the last one: dropping it leaves nothing in the text to notice.
    assert arith_trace(52, "+", 71, forget="catch") is None
    rng, caught = random.Random(6), 0
    for problem in all_problems(ARITH):
        think, answer = parse_completion(ARITH.completion(problem, "caught", rng))
        right, right_answer = arith_trace(*ARITH._operands(problem))
        assert answer == right_answer == problem.answer
        if REFLECTION not in think:
            assert think == right
            continue
        caught += 1
        assert think.count(REFLECTION) == 1
        before, redone = split_reflection(think)
        assert redone == right
        # The step before the marker is the first column that needed a carry-in, written with 0.
        written, correct = before.split(","), right.split(",")
        assert written[:-1] == correct[:len(written) - 1]
        assert "+0=" in written[-1] or "-0=" in written[-1]
        assert written[-1] != correct[len(written) - 1]
    assert caught > len(all_problems(ARITH)) / 2


def test_arith_checked_guesses_then_works_it_out_and_rejects_a_wrong_guess():
    rng, rejected = random.Random(8), 0
    for problem in all_problems(ARITH):
        think, answer = parse_completion(ARITH.completion(problem, "checked", rng))
        right, right_answer = arith_trace(*ARITH._operands(problem))
        assert answer == right_answer == problem.answer
        opening, rest = think.split(",", 1)
        guess = opening.removeprefix("guess ")
        assert opening.startswith("guess ") and INTEGER_RE.fullmatch(guess)
        if guess == answer:
            assert rest == right
        else:
            rejected += 1
            assert rest == f"{right},wait {answer}"
    # The guess is as good as a direct answer: often wrong on long problems, mostly right on short ones.
    assert 0 < rejected < len(all_problems(ARITH))


def test_forget_is_checked():
    with pytest.raises(ValueError, match="forget"):
        arith_trace(12, "+", 34, forget="some")


def test_arith_recheck_confirms_or_corrects_one_column_by_another_route():
    rng, corrected = random.Random(9), 0
    for problem in all_problems(ARITH):
        think, answer = parse_completion(ARITH.completion(problem, "recheck", rng))
        assert think.count(REFLECTION) == 1 and answer == problem.answer
        steps = think.split(",")
        at = next(i for i, step in enumerate(steps) if step.startswith(REFLECTION))
        # The re-check is two steps (operands, then the carry); with them folded back into one
        # step of the usual form the trace is the correct one.
        right = arith_trace(*ARITH._operands(problem))[0].split(",")
        assert steps[:at - 1] == right[:at - 1] and steps[at + 2:] == right[at:]
        corrected += steps[at - 1] != right[at - 1]
        assert steps[at + 1].rsplit(">", 1)[1] == right[at - 1].rsplit(">", 1)[1]
    assert 0.3 < corrected / len(all_problems(ARITH)) < 0.7   # half the re-checks find a slip


def test_arith_recheck_example():
    assert arith_rechecked_trace(347, "*", 6, 1, delta=1) == (
        "7*6+0=42>2,4*6+4=29>92,wait 4*6=24,24+4=28>82,3*6+2=20>082,c2>2082", "2082")
    assert arith_rechecked_trace(33, "-", 6, 0) == ("3-6-0=7b>7,wait 6+0=6,3-6=7b>7,3-0-1=2>27", "27")


def test_countdown_reflect_redoes_the_slip_then_solves():
    rng = random.Random(8)
    for problem in all_problems(COUNTDOWN):
        think, answer = parse_completion(COUNTDOWN.completion(problem, "reflect", rng))
        assert think.count(REFLECTION) == 1 and answer == problem.answer
        attempts = think.split(";")
        reflected = next(a for a in attempts if REFLECTION in a)
        before, redone = split_reflection(reflected)
        wrong = CD_STEP.fullmatch(before.rsplit(",", 1)[-1])
        assert true_result(int(wrong[1]), wrong[2], int(wrong[3])) != int(wrong[4])  # the slip
        (steps, verdict), = countdown_attempts(redone)
        assert all(true_result(x, op, y) == shown for x, op, y, shown in steps)  # redone right
        assert verdict == "no" and steps[-1][3] != problem.data["target"]
        assert attempts[-1] == attempt_text(problem.data["chain"], problem.data["target"])


def test_countdown_reflect_example():
    chain = Chain(7, (("+", 3), ("*", 2)))
    assert reflected_attempt_text(chain, 22, 0, 11) == "7+3=11,wait 7+3=10,10*2=20 no"


def test_countdown_steps_traces_are_correct_and_end_with_yes():
    rng = random.Random(5)
    for problem in all_problems(COUNTDOWN):
        think, _ = parse_completion(COUNTDOWN.completion(problem, "steps", rng))
        attempts = list(countdown_attempts(think))
        assert 1 <= len(attempts) <= 4
        for i, (steps, verdict) in enumerate(attempts):
            check_attempt_uses_given(steps, problem.data["numbers"])
            assert all(true_result(x, op, y) == shown for x, op, y, shown in steps)
            last = i == len(attempts) - 1
            assert verdict == ("yes" if last else "no")
            assert (steps[-1][3] == problem.data["target"]) == last


def test_countdown_flawed_has_one_slip_and_claims_target():
    rng = random.Random(6)
    for problem in all_problems(COUNTDOWN):
        think, answer = parse_completion(COUNTDOWN.completion(problem, "flawed", rng))
        *failed, (final, verdict) = countdown_attempts(think)
        for steps, no in failed:
            assert no == "no"
            assert all(true_result(x, op, y) == shown for x, op, y, shown in steps)
        check_attempt_uses_given(final, problem.data["numbers"])
        assert verdict == "yes" and final[-1][3] == problem.data["target"]
        slips = sum(true_result(x, op, y) != shown for x, op, y, shown in final)
        assert slips == 1, think
        assert COUNTDOWN.score(problem, answer)[0] == 0.0


@pytest.mark.parametrize(
    "a, op, b, think, answer",
    [
        (4821, "+", 397, "1+7+0=8>8,2+9+0=11>18,8+3+1=12>218,4+0+1=5>5218", "5218"),
        (52, "-", 17, "2-7-0=5b>5,5-1-1=3>35", "35"),
        (1000, "-", 999, "0-9-0=1b>1,0-9-1=0b>01,0-9-1=0b>001,1-0-1=0>0001", "1"),
        (95, "+", 7, "5+7+0=12>2,9+0+1=10>02,c1>102", "102"),
        (87, "*", 9, "7*9+0=63>3,8*9+6=78>83,c7>783", "783"),
        (0, "*", 5, "0*5+0=0>0", "0"),
        (7, "-", 7, "7-7-0=0>0", "0"),
    ],
)
def test_arith_trace_examples(a, op, b, think, answer):
    assert arith_trace(a, op, b) == (think, answer)
    assert str(reference_result(a, op, b)) == answer


def reference_result(a, op, b):
    """The true value of a op b, computed directly."""
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_arith_example_completion_exact():
    problem = ARITH.make_problem(4821, "+", 397)
    assert ARITH.completion(problem, "steps", random.Random(0)) == (
        "<think>1+7+0=8>8,2+9+0=11>18,8+3+1=12>218,4+0+1=5>5218</think><answer>5218</answer>"
    )


def test_arith_slips():
    # Off by one in the tens column: everything after follows from 12.
    assert arith_trace(4821, "+", 397, Slip(1, delta=1)) == (
        "1+7+0=8>8,2+9+0=12>28,8+3+1=12>228,4+0+1=5>5228", "5228")
    # Carry dropped after the tens column.
    assert arith_trace(4821, "+", 397, Slip(1, drop_carry=True)) == (
        "1+7+0=8>8,2+9+0=11>18,8+3+0=11>118,4+0+1=5>5118", "5118")
    # Forgotten borrow in subtraction.
    assert arith_trace(52, "-", 17, Slip(0, drop_carry=True)) == ("2-7-0=5b>5,5-1-0=4>45", "45")
    # Slips that cannot happen are refused rather than written.
    assert arith_trace(10, "+", 0, Slip(0, delta=-1)) is None
    assert arith_trace(10, "+", 0, Slip(0, drop_carry=True)) is None
    with pytest.raises(ValueError):
        arith_trace(17, "-", 52)


def test_countdown_example_strings():
    target = 46
    attempts = [
        attempt_text(Chain(7, (("+", 3), ("*", 2))), target),
        attempt_text(Chain(25, (("+", 3), ("*", 2))), target),
        attempt_text(Chain(3, (("*", 7), ("+", 25))), target),
    ]
    solution = Chain(3, (("*", 7), ("+", 25)))
    problem = COUNTDOWN.make_problem((3, 7, 25, 2), target, solution)
    assert problem.prompt == "reach 46 with 3 7 25 2"
    assert problem.answer == "3*7+25"
    assert format_completion(";".join(attempts), problem.answer) == (
        "<think>7+3=10,10*2=20 no;25+3=28,28*2=56 no;3*7=21,21+25=46 yes</think>"
        "<answer>3*7+25</answer>"
    )
    # A slipped attempt shows its (wrong) results and claims success.
    assert attempt_text(Chain(3, (("*", 7), ("+", 2))), 46, [21, 46]) == "3*7=21,21+2=46 yes"
    with pytest.raises(ValueError):
        COUNTDOWN.make_problem((3, 7, 25, 2), 47, solution)


@pytest.mark.parametrize(
    "chain, expression",
    [
        (Chain(7, (("+", 3), ("*", 5))), "(7+3)*5"),
        (Chain(3, (("*", 7), ("+", 25))), "3*7+25"),
        (Chain(12, (("/", 3), ("*", 2), ("-", 1))), "12/3*2-1"),
        (Chain(9, (("-", 4), ("-", 2), ("/", 3))), "(9-4-2)/3"),
        (Chain(2, (("+", 4), ("*", 3), ("-", 5), ("/", 13))), "((2+4)*3-5)/13"),
    ],
)
def test_chain_expression_minimal_parentheses(chain, expression):
    assert chain.expression() == expression


def test_chain_expressions_verify_to_their_value():
    rng = random.Random(7)
    for _ in range(2000):
        numbers = tuple(rng.randint(1, 12) for _ in range(rng.randint(2, 6)))
        chain = random_chain(rng, numbers)
        assert all(v > 0 for v in chain.values())
        assert verify_countdown(chain.expression(), numbers, chain.value()) == (1.0, "correct")


@pytest.mark.parametrize(
    "name, table, default",
    [("arith", ARITH_DIRECT_ACCURACY, 0.05), ("countdown", COUNTDOWN_DIRECT_ACCURACY, 0.1)],
)
def test_direct_accuracy_matches_stated_rate(name, table, default):
    task = TASKS[name]
    rng = random.Random(8)
    for d in task.difficulties:
        problems = [task.sample("train", seed, d) for seed in range(200)]
        scores = [
            task.score(p, parse_completion(task.completion(p, "direct", rng))[1])[0]
            for p in problems
            for _ in range(10)
        ]
        rate = sum(scores) / len(scores)
        assert abs(rate - table.get(d, default)) < 0.05, (d, rate)


def test_arith_direct_misses_are_near():
    rng = random.Random(9)
    problem = ARITH.make_problem(48213, "+", 397)
    for _ in range(300):
        answer = parse_completion(ARITH.completion(problem, "direct", rng))[1]
        differing = sum(x != y for x, y in zip(answer, problem.answer))
        assert len(answer) == len(problem.answer) and differing <= 2


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("5218", (1.0, "correct")),
        ("5217", (0.0, "wrong value")),
        ("-5218", (0.0, "wrong value")),
        ("05218", (0.0, "malformed: not a plain integer")),
        (" 5218", (0.0, "malformed: not a plain integer")),
        ("5218 ", (0.0, "malformed: not a plain integer")),
        ("+5218", (0.0, "malformed: not a plain integer")),
        ("5,218", (0.0, "malformed: not a plain integer")),
        ("5218.0", (0.0, "malformed: not a plain integer")),
        ("52l8", (0.0, "malformed: not a plain integer")),
        ("\uff15218", (0.0, "malformed: not a plain integer")),  # fullwidth digit
        ("", (0.0, "malformed: not a plain integer")),
    ],
)
def test_arith_score(answer, expected):
    assert ARITH.score(ARITH.make_problem(4821, "+", 397), answer) == expected


def test_arith_score_negative_and_zero():
    assert ARITH.score(ARITH.make_problem(7, "-", 7), "0") == (1.0, "correct")
    assert ARITH.score(ARITH.make_problem(7, "-", 7), "-0") == (0.0, "malformed: not a plain integer")
    negative = Problem("arith", 1, "3-5", "-2", {"a": 3, "op": "-", "b": 5})
    assert ARITH.score(negative, "-2") == (1.0, "correct")


COUNTDOWN_PROBLEM = COUNTDOWN.make_problem(
    (3, 7, 25, 2, 7, 2), 46, Chain(3, (("*", 7), ("+", 25)))
)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("3*7+25", "correct"),
        ("25+7*3", "correct"),  # any correct expression counts, not only the reference
        ("3*7+25*1", "foreign number 1"),
        ("(3+2+2+2)*7-25", "reused number 2"),
        ("7+7+25+7", "reused number 7"),
        ("3*7+25+2", "wrong value"),
        ("3*7+", "malformed: syntax error"),
        ("3*7 25", "malformed: syntax error"),
        ("", "malformed: syntax error"),
        ("13+33", "foreign number 13"),
        ("25/(7-7)", "division by zero"),
        ("7/2*2", "non-integer intermediate 7/2"),
        ("25/2*2+3", "non-integer intermediate 25/2"),
        ("-3+7*7", "malformed: UnaryOp not allowed"),
        ("2**10", "malformed: Pow not allowed"),
        ("25//2", "malformed: FloorDiv not allowed"),
        ("25%7", "malformed: character '%' not allowed"),
        ("__import__('os')", "malformed: character '_' not allowed"),
        ("x+25", "malformed: character 'x' not allowed"),
        ("2.5*10+21", "malformed: character '.' not allowed"),
        ("True+45", "malformed: character 'T' not allowed"),
        ("'46'", "malformed: character \"'\" not allowed"),
        ("0x19+21", "malformed: character 'x' not allowed"),
        ("2_5+21", "malformed: character '_' not allowed"),
        ("[46]", "malformed: character '[' not allowed"),
        # Python's parser drops comments, newlines and line continuations: none may reach it.
        ("3*7+25#trust me", "malformed: character '#' not allowed"),
        ("3*7+25\n", "malformed: character '\\n' not allowed"),
        ("3*7+\\\n25", "malformed: character '\\\\' not allowed"),
        ("3*7\t+25", "malformed: character '\\t' not allowed"),
        ("3 * 7 + 25", "correct"),  # plain spaces are part of the alphabet
        ("00+46", "malformed: number not in plain decimal"),
        ("()", "malformed: Tuple not allowed"),
        ("(" * 45 + "46" + ")" * 45, "foreign number 46"),
        ("(" * 60 + "25" + ")" * 60 + "+21", "malformed: longer than 100 chars"),
        ("+".join(["1"] * 60), "malformed: longer than 100 chars"),
    ],
)
def test_countdown_verifier_reasons(answer, reason):
    value, got = COUNTDOWN.score(COUNTDOWN_PROBLEM, answer)
    assert got == reason
    assert value == (1.0 if reason == "correct" else 0.0)


def test_countdown_verifier_survives_deep_nesting():
    # Parser limits on nesting must surface as a rejection, never as an exception.
    hostile = ["(" * 99 + "3", "-" * 99 + "3", "(" * 50 + ")" * 50, "not " * 25, "3*7+25\x00"]
    for text in hostile:
        value, reason = verify_countdown(text, (3, 7), 10)
        assert value == 0.0 and reason.startswith("malformed"), (text, reason)


def test_countdown_verifier_accepts_unused_numbers_and_parentheses():
    assert verify_countdown("(7+3)", (7, 3, 5, 9), 10) == (1.0, "correct")
    assert verify_countdown("(7-7)+10", (7, 7, 10), 10) == (1.0, "correct")
    assert verify_countdown("12/4*3", (12, 4, 3), 9) == (1.0, "correct")
    assert verify_countdown("12/(4*3)", (12, 4, 3), 1) == (1.0, "correct")


# ---------------------------------------------------------------------------
# Canonical problems and votes
# ---------------------------------------------------------------------------


def test_reordered_problems_share_one_key():
    assert ARITH.make_problem(397, "+", 4821).key() == ARITH.make_problem(4821, "+", 397).key()
    assert ARITH.make_problem(3, "*", 7).key() == ARITH.make_problem(7, "*", 3).key()
    assert ARITH.make_problem(9, "-", 2).key() != ARITH.make_problem(2, "-", 9).key()
    chain = Chain(10, (("*", 2),))
    first = COUNTDOWN.make_problem((10, 2, 5), 20, chain)
    assert first.key() == COUNTDOWN.make_problem((5, 10, 2), 20, chain).key() == "countdown:20:2,5,10"


def test_no_permutation_of_a_heldout_countdown_problem_is_trainable():
    """The held-out split follows the canonical problem, so no reordering of a held-out problem's
    numbers can be drawn for training (hashing the prompt text left 37 of 50 with a training twin)."""
    from itertools import permutations

    twins = 0
    for seed in range(50):
        p = COUNTDOWN.sample("heldout", seed, 3)
        chain = p.data["chain"]
        for numbers in set(permutations(p.data["numbers"])):
            twins += not heldout(COUNTDOWN.make_problem(numbers, p.data["target"], chain).key())
    assert twins == 0


@pytest.mark.parametrize("answers, same", [
    (["10*2", "2*10", "(10*2)", "10 * 2", "5*2*2"], True),   # every valid way to write 20
    (["5+10", "(10+5)", "2*5+5-2*2+2*2"], False),             # the last reuses 5: invalid
    (["5+10", "(10+5)", "10+5+2-2"], True),                   # a wrong value votes as its value
    (["10*2", "10*2#trust me"], False),                       # invalid text is not a valid 20
    (["10*2*2", "10+2"], False),                              # a reused 2, a foreign 2: each alone
])
def test_countdown_vote_key_is_the_value_of_a_valid_expression(answers, same):
    p = COUNTDOWN.make_problem((10, 2, 5, 2), 20, Chain(10, (("*", 2),)))
    keys = {COUNTDOWN.vote_key(p, a) for a in answers}
    assert (len(keys) == 1) == same
    assert COUNTDOWN.vote_key(p, "2*10") == "=20"
    assert COUNTDOWN.vote_key(p, "7*3") == "invalid:7*3"


def test_arith_vote_key_is_the_integer():
    p = ARITH.make_problem(4821, "+", 397)
    assert ARITH.vote_key(p, "5218") == "5218"
    assert ARITH.vote_key(p, "05218") == "invalid:05218"
    assert ARITH.vote_key(p, "-0") == "invalid:-0"


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_equal_vote_keys_score_alike(name):
    """cons@k scores a representative of the winning key: every answer with that key must score the same."""
    task = TASKS[name]
    rng = random.Random(7)
    for problem in all_problems(task, per_difficulty=4):
        by_key = {}
        answers = [parse_completion(task.completion(problem, s, rng))[1] for s in STYLES for _ in range(3)]
        answers += [problem.answer, f"({problem.answer})", problem.answer + " ", "junk"]
        for a in answers:
            by_key.setdefault(task.vote_key(problem, a), set()).add(task.score(problem, a)[0])
        assert all(len(scores) == 1 for scores in by_key.values()), by_key


# ---------------------------------------------------------------------------
# The corpus: styles at their configured rates
# ---------------------------------------------------------------------------


def test_corpus_holds_slips_and_reflections_at_the_configured_rates():
    from qiusuo.corpus import CorpusConfig, examples

    styles = {"direct": 0.4, "steps": 0.3, "flawed": 0.2, "reflect": 0.1}
    cfg = CorpusConfig(n_examples=3000, styles=styles, seed=3)
    rows = list(examples(cfg))
    counts = Counter(r["style"] for r in rows)
    for style, share in styles.items():
        # 3000 draws: the binomial standard deviation is at most 0.9 points; allow 3 of them.
        assert abs(counts[style] / len(rows) - share) < 0.027, (style, counts)
    for i, r in enumerate(rows):
        task = get_task(r["task"])
        problem = task.sample("train", seed=cfg.seed * 1_000_003 + i, difficulty=r["difficulty"])
        assert problem.prompt == r["prompt"]
        think, answer = parse_completion(r["completion"])
        correct = task.score(problem, answer)[0] == 1.0
        assert reflects(think) == (r["style"] == "reflect")
        if r["style"] in ("steps", "reflect"):
            assert correct, r                      # a reflected slip is corrected: the answer is right
        elif r["style"] == "flawed":
            assert not correct and think, r        # a slip carried through to a wrong answer
