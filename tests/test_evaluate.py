"""Evaluation metrics on hand-built samples: votes on canonical answers, distinct held-out questions."""
import pytest

from qiusuo.evaluate import EvalConfig, heldout_problems, score_samples, summarise
from qiusuo.tasks import TASKS, Chain, heldout

COUNTDOWN, ARITH = TASKS["countdown"], TASKS["arith"]


def done(answer: str, think: str = "x") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def test_cons_votes_on_the_canonical_answer():
    """Three spellings of a correct 20 outvote two copies of one wrong expression (a raw-text vote
    would pick the wrong one: it is the only string written twice)."""
    p = COUNTDOWN.make_problem((10, 2, 5), 20, Chain(10, (("*", 2),)))
    texts = [done("10*2"), done("2*10"), done("(10*2)"), done("10+5"), done("10+5")]
    assert score_samples(p, texts) == {"pass@1": pytest.approx(3 / 5), "cons@k": 1.0, "samples": 5, "traces": 5,
                                       "traces_correct": 3, "reflections": 0}
    # and the other way round: two spellings of 15 beat one 20
    assert score_samples(p, [done("10+5"), done("5+10"), done("10*2")])["cons@k"] == 0.0


def test_cons_ignores_unparseable_samples_and_ties_go_to_the_first_answer():
    p = ARITH.make_problem(12, "+", 30)
    scores = lambda texts: {k: v for k, v in score_samples(p, texts).items() if k in ("pass@1", "cons@k")}
    assert scores(["42", "42", done("41")]) == {"pass@1": 0.0, "cons@k": 0.0}
    assert scores([done("42"), done("41")])["cons@k"] == 1.0
    assert scores([done("41"), done("42")])["cons@k"] == 0.0
    assert scores(["junk", "junk"]) == {"pass@1": 0.0, "cons@k": 0.0}


def test_trace_accuracy_and_reflection_rate_on_hand_made_completions():
    """12+30: a right and a wrong trace, a reflected right trace, a direct right answer (no trace: it
    does not count toward trace accuracy), and a malformed completion that still reflects."""
    p = ARITH.make_problem(12, "+", 30)
    texts = [
        done("42", "2+0+0=2>2,1+3+0=4>42"),
        done("52", "2+0+0=2>2,1+3+0=5>52"),
        done("42", "2+0+0=3>3,wait 2+0+0=2>2,1+3+0=4>42"),
        done("42", ""),
        "<think>2+0+0=3>3,wait 2+0+0=2>2</think>",
    ]
    row = score_samples(p, texts)
    assert row == {"pass@1": pytest.approx(3 / 5), "cons@k": 1.0, "samples": 5, "traces": 3,
                   "traces_correct": 2, "reflections": 2}
    row["mean_len"] = 20.0
    other = {**score_samples(p, [done("41", "x"), done("42", "")]), "mean_len": 10.0}
    s = summarise([row, other])
    # pooled over the 7 samples: 2 of 4 traces right, 2 of 7 samples reflect, 4 of 7 reason
    assert s["trace_accuracy"] == pytest.approx(2 / 4)
    assert s["reflection_rate"] == pytest.approx(2 / 7)
    assert s["trace_rate"] == pytest.approx(4 / 7)
    assert s["pass@1"] == pytest.approx((3 / 5 + 1 / 2) / 2) and s["mean_len"] == 15.0 and s["n"] == 2
    # no trace at all: trace accuracy is undefined, not 0
    assert summarise([other | score_samples(p, [done("42", "")])])["trace_accuracy"] is None


def test_heldout_questions_are_distinct_and_held_out():
    cfg = EvalConfig(tasks={"arith": [1, 2], "countdown": [3]}, n_per_difficulty=12, seed=5)
    problems = heldout_problems(cfg)
    assert len(problems) == 36
    keys = [p.key() for p in problems]
    assert len(set(keys)) == 36 and all(map(heldout, keys))
    assert [p.key() for p in heldout_problems(cfg)] == keys     # deterministic in the seed


def test_too_small_a_heldout_difficulty_is_an_error():
    with pytest.raises(ValueError, match=r"arith difficulty 1: found only \d+ distinct held-out problems"):
        heldout_problems(EvalConfig(tasks={"arith": [1]}, n_per_difficulty=200))
