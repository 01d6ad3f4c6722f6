"""Tests for qiusuo.rewards: strict format parsing, accuracy, overlong penalty, totals."""

import pytest

from qiusuo.rewards import (
    LENIENT,
    THINK_RE,
    ReasoningFormat,
    Reward,
    RewardWeights,
    accuracy_reward,
    format_reward,
    overlong_penalty,
    parse_completion,
    score_completion,
)
from qiusuo.tasks import TASKS, Chain

ARITH = TASKS["arith"]
PROBLEM = ARITH.make_problem(4821, "+", 397)  # answer 5218
GOOD = "<think>1+7+0=8>8</think><answer>5218</answer>"


@pytest.mark.parametrize(
    "text, parsed",
    [
        (GOOD, ("1+7+0=8>8", "5218")),
        ("<think></think><answer>5218</answer>", ("", "5218")),
        ("<think></think><answer></answer>", ("", "")),
        ("<think>a\nb</think><answer>1\n2</answer>", ("a\nb", "1\n2")),  # DOTALL
        ("<think><thinking></think><answer>1</answer>", ("<thinking>", "1")),
    ],
)
def test_parse_completion_accepts_exact_format(text, parsed):
    assert parse_completion(text) == parsed
    assert THINK_RE.fullmatch(text)
    assert format_reward(text) == Reward(1.0, "ok")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "missing <think>"),
        ("5218", "missing <think>"),
        ("<THINK></THINK><ANSWER>5218</ANSWER>", "missing <think>"),
        ("<think>x</think>5218", "missing <answer>"),
        ("<think>x</think><answer>5218", "missing </answer>"),
        ("<think>x<answer>5218</answer>", "missing </think>"),
        ("hi<think>x</think><answer>5218</answer>", "text before <think>"),
        (" <think>x</think><answer>5218</answer>", "text before <think>"),
        ("<think>x</think><answer>5218</answer>!", "text after </answer>"),
        ("<think>x</think><answer>5218</answer>\n", "text after </answer>"),
        ("<think>x</think>\n<answer>5218</answer>", "text between </think> and <answer>"),
        ("<answer>5218</answer><think>x</think>", "tags out of order"),
        ("<think>x<answer>1</think></answer>", "tags out of order"),
        ("</think>x<think><answer>5218</answer>", "tags out of order"),
        ("<think><think>x</think></think><answer>5218</answer>", "duplicate <think>"),
        ("<think>x</think><answer>1</answer><answer>5218</answer>", "duplicate <answer>"),
        ("<think>x<answer>1</answer></think><answer>5218</answer>", "duplicate <answer>"),
        ("<think>x</think><answer><answer>5218</answer></answer>", "duplicate <answer>"),
        ("<think>x</think><answer>5218</think></answer>", "duplicate </think>"),
    ],
)
def test_format_reward_rejects_with_reason(text, reason):
    assert parse_completion(text) is None
    assert format_reward(text) == Reward(0.0, reason)


def test_parse_completion_rejects_non_strings():
    assert parse_completion(None) is None
    assert format_reward(b"<think></think><answer>1</answer>") == Reward(0.0, "not a string")


def test_accuracy_reward_uses_task_verifier():
    assert accuracy_reward(ARITH, PROBLEM, GOOD) == Reward(1.0, "correct")
    wrong = "<think></think><answer>5219</answer>"
    assert accuracy_reward(ARITH, PROBLEM, wrong) == Reward(0.0, "wrong value")
    padded = "<think></think><answer> 5218</answer>"
    assert accuracy_reward(ARITH, PROBLEM, padded).reason.startswith("malformed")
    # A correct answer outside the strict format earns nothing.
    assert accuracy_reward(ARITH, PROBLEM, GOOD + " ") == Reward(0.0, "no answer")
    assert accuracy_reward(ARITH, PROBLEM, "5218") == Reward(0.0, "no answer")


def test_accuracy_reward_countdown():
    task = TASKS["countdown"]
    problem = task.make_problem((3, 7, 25, 2), 46, Chain(3, (("*", 7), ("+", 25))))
    text = "<think></think><answer>{}</answer>"
    assert accuracy_reward(task, problem, text.format("25+3*7")) == Reward(1.0, "correct")
    assert accuracy_reward(task, problem, text.format("25+3*7+7")) == Reward(
        0.0, "reused number 7"
    )


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (80, 0.0),  # max_len - buffer: still free
        (81, -0.05),
        (90, -0.5),
        (99, -0.95),
        (100, -1.0),  # max_len
        (101, -1.0),
        (10_000, -1.0),
    ],
)
def test_overlong_penalty_boundaries(length, expected):
    assert overlong_penalty(length, max_len=100, buffer=20) == pytest.approx(expected)


def test_overlong_penalty_buffer_equal_to_max_len_and_invalid_buffers():
    assert overlong_penalty(0, 4, 4) == 0.0
    assert overlong_penalty(1, 4, 4) == -0.25
    assert overlong_penalty(4, 4, 4) == -1.0
    for bad in (0, -1, 5):
        with pytest.raises(ValueError):
            overlong_penalty(3, 4, bad)


def test_score_completion_default_weights():
    total, parts = score_completion(ARITH, PROBLEM, GOOD, RewardWeights())
    assert total == pytest.approx(1.2)
    assert parts == {"accuracy": Reward(1.0, "correct"), "format": Reward(1.0, "ok"),
                     "language": Reward(1.0, "question in no particular language")}
    # Formatted but wrong: only the format part.
    total, parts = score_completion(ARITH, PROBLEM, "<think></think><answer>1</answer>")
    assert total == pytest.approx(0.2)
    assert parts["accuracy"] == Reward(0.0, "wrong value")
    # Right number, junk after the tags: nothing at all.
    total, parts = score_completion(ARITH, PROBLEM, GOOD + "5218", RewardWeights())
    assert total == 0.0
    assert parts["format"] == Reward(0.0, "text after </answer>")


def test_score_completion_custom_weights():
    weights = RewardWeights(accuracy=2.0, format=0.5)
    assert score_completion(ARITH, PROBLEM, GOOD, weights)[0] == pytest.approx(2.5)
    only_format = RewardWeights(accuracy=0.0, format=1.0)
    wrong = "<think></think><answer>7</answer>"
    assert score_completion(ARITH, PROBLEM, wrong, only_format)[0] == pytest.approx(1.0)


R1 = ReasoningFormat(special=True, opens_think=True, strict=False)


@pytest.mark.parametrize("fmt, text, parsed", [
    (LENIENT, "<think>\n4821+397\n</think>\n\n<answer> 5218 </answer>\n", ("4821+397", "5218")),
    (LENIENT, "  <think>a</think>\nThe answer is 5218.", ("a", "The answer is 5218.")),
    (R1, "carry the one\n</think>\n\n<answer>5218</answer>", ("carry the one", "5218")),
    (R1, "carry\n</think>\n\\boxed{5218}", ("carry", "\\boxed{5218}")),
])
def test_lenient_format_allows_whitespace_and_a_think_block_the_prompt_opened(fmt, text, parsed):
    assert parse_completion(text, fmt) == parsed
    assert format_reward(text, fmt) == Reward(1.0, "ok")
    # the strict tiny-model format refuses all of these
    assert parse_completion(text) is None


@pytest.mark.parametrize("fmt, text, reason", [
    (LENIENT, "no tags at all", "missing <think>"),
    (LENIENT, "<think>a</think>  ", "empty answer"),
    (LENIENT, "hello <think>a</think>5", "text before <think>"),
    (LENIENT, "<think>a</think><think>b</think>5", "duplicate <think>"),
    (LENIENT, "<think>a</think><answer>5</answer> more", "malformed answer tags"),
    (R1, "<think>again</think>5", "duplicate <think>"),
    (R1, "still thinking when cut off", "missing </think>"),
])
def test_lenient_format_names_the_defect(fmt, text, reason):
    assert parse_completion(text, fmt) is None
    assert format_reward(text, fmt) == Reward(0.0, reason)


def test_rewards_follow_the_format_of_a_checkpoint_that_opens_the_think_block():
    text = "4821+397: 1+7=8\n</think>\n\n<answer>5218</answer>"
    total, parts = score_completion(ARITH, PROBLEM, text, fmt=R1)
    assert parts["accuracy"] == Reward(1.0, "correct") and parts["format"] == Reward(1.0, "ok")
    assert total == pytest.approx(1.2)
    assert score_completion(ARITH, PROBLEM, text)[0] == 0.0   # the strict default sees no think block
