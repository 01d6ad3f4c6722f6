"""bench/demo_reflect.py, the step checker behind the demo's reflection analysis: on the corpus's own
traces it finds no slip in a correct trace, exactly one in a flawed one, and in a reflecting trace a
`wait` right after the slip with the re-checked step right."""
import random

from bench.demo_reflect import GUESS, judge, tally
from qiusuo.rewards import STRICT, parse_completion
from qiusuo.tasks import ArithmeticTask

ARITH = ArithmeticTask()


def traces(style: str, n: int = 200):
    rng = random.Random(11)
    for i in range(n):
        p = ARITH.sample("train", seed=i, difficulty=1 + i % 5)
        yield p, parse_completion(ARITH.completion(p, style, rng))[0]


def operands(p):
    return p.data["a"], p.data["op"], p.data["b"]


def test_correct_traces_have_no_slip_and_flawed_ones_exactly_one():
    for p, think in traces("steps"):
        assert all(right and not wait for wait, right, _ in judge(*operands(p), think)), think
    for p, think in traces("flawed"):
        assert sum(not right for _, right, _ in judge(*operands(p), think)) == 1, think


def test_a_reflection_follows_the_slip_and_redoes_it_right():
    for style in ("reflect", "recheck"):
        for p, think in traces(style):
            steps = judge(*operands(p), think)
            at = [j for j, (wait, _, _) in enumerate(steps) if wait]
            assert len(at) == 1 and steps[at[0]][1], think               # one re-check, right
            others = [right for j, (_, right, _) in enumerate(steps) if j != at[0]]
            # reflect: the step before the re-check slipped; recheck: it slipped or was confirmed
            assert others.count(False) == (1 if style == "reflect" else int(not steps[at[0] - 1][1])), think
            assert all(others[at[0]:]), think                             # after it the trace is right


def test_forgetful_traces_slip_only_by_forgetting_carries():
    for p, think in traces("forgetful"):
        steps = judge(*operands(p), think)
        # Every wrong step is a forgotten carry, and there is one wherever the problem carries.
        wrong = [forgot for _, right, forgot in steps if not right]
        assert all(wrong), think
        assert bool(wrong) == (think != ARITH.completion(p, "steps", random.Random(0))[7:].split("</think>")[0]), think
    for p, think in traces("caught"):
        steps = judge(*operands(p), think)
        if any(w for w, _, _ in steps):
            at = next(j for j, (w, _, _) in enumerate(steps) if w)
            assert steps[at - 1][1:] == (False, True) and steps[at][1], think   # forgotten, then redone


def test_tally_counts_waits_after_slips_and_after_right_steps():
    p = ARITH.make_problem(4821, "+", 397)
    slip_then_wait = "1+7+0=8>8,2+9+0=12>28,wait 2+9+0=11>18,8+3+1=12>218,4+0+1=5>5218"
    right_then_wait = "1+7+0=8>8,wait 1+7+0=9>9,2+9+0=11>19,8+3+1=12>219,4+0+1=5>5219"
    texts = [f"<think>{t}</think><answer>{a}</answer>" for t, a in ((slip_then_wait, 5218), (right_then_wait, 5219))]
    n = tally([p], [texts], ARITH, STRICT)
    assert (n["reflect"], n["reflect_right"], n["wait_after_slip"], n["wait_after_right"]) == (2, 1, 1, 1)
    assert (n["rechecks"], n["rechecks_right"], n["slips"]) == (2, 1, 1)   # a re-check is not a step
    assert n["forgot"] == 0
    forgot = "1+7+0=8>8,2+9+0=11>18,8+3+0=11>118,4+0+0=4>4118"
    n = tally([p], [[f"<think>{forgot}</think><answer>4118</answer>"]], ARITH, STRICT)
    assert (n["slips"], n["forgot"]) == (2, 2)   # two carries, both forgotten
    caught = "1+7+0=8>8,2+9+0=11>18,8+3+0=11>118,wait 8+3+1=12>218,4+0+1=5>5218"
    n = tally([p], [[f"<think>{caught}</think><answer>5218</answer>"]], ARITH, STRICT)
    assert (n["slips"], n["forgot"], n["wait_after_forgot"], n["rechecks_right"]) == (1, 1, 1, 1)


def test_a_checked_trace_is_judged_on_its_steps_and_its_guess_apart():
    for p, think in traces("checked"):
        assert all(right for _, right, _ in judge(*operands(p), GUESS.match(think)[2])), think
    p = ARITH.make_problem(4821, "+", 397)
    steps = "1+7+0=8>8,2+9+0=11>18,8+3+1=12>218,4+0+1=5>5218"
    texts = [f"<think>guess 5228,{steps},wait 5218</think><answer>5218</answer>",   # wrong guess, rejected
             f"<think>guess 5218,{steps}</think><answer>5218</answer>",             # right guess, kept
             f"<think>guess 5118,{steps}</think><answer>5218</answer>"]             # wrong guess, kept
    n = tally([p], [texts], ARITH, STRICT)
    assert (n["guessed"], n["guess_wrong"], n["rejected_wrong"], n["rejected_right"]) == (3, 2, 1, 0)
    assert (n["reflect"], n["reflect_right"], n["plain"], n["slips"]) == (1, 1, 2, 0)
