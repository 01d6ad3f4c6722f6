"""Rule-based rewards for GRPO: strict format, verified accuracy, overlong penalty.

The same strict parser serves training and evaluation, so the model can never be
rewarded for junk in or around the tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations; keeps this module import-light
    from qiusuo.tasks import Problem, Task

TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Any character, unless it starts one of the four tags: neither field may hide a tag.
_FIELD = r"((?:(?!</?think>|</?answer>).)*)"
THINK_RE = re.compile(rf"<think>{_FIELD}</think><answer>{_FIELD}</answer>", re.DOTALL)


@dataclass(frozen=True)
class Reward:
    """A reward value with a short human-readable reason."""

    value: float
    reason: str


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward parts in the total."""

    accuracy: float = 1.0
    format: float = 0.2
    language: float = 0.0


def parse_completion(text: str) -> tuple[str, str] | None:
    """Split a completion into (think, answer), or None unless the format is exact."""
    if not isinstance(text, str):
        return None
    match = THINK_RE.fullmatch(text)
    return (match.group(1), match.group(2)) if match else None


def _format_problem(text: str) -> str:
    """Name the first thing wrong with a completion that failed to parse."""
    for tag in TAGS:
        count = text.count(tag)
        if count == 0:
            return f"missing {tag}"
        if count > 1:
            return f"duplicate {tag}"
    starts = [text.index(tag) for tag in TAGS]
    if starts != sorted(starts):
        return "tags out of order"
    if starts[0] > 0:
        return "text before <think>"
    if starts[1] + len("</think>") != starts[2]:
        return "text between </think> and <answer>"
    if not text.endswith("</answer>"):
        return "text after </answer>"
    return "malformed"  # unreachable when the four checks above are exhaustive


def format_reward(text: str) -> Reward:
    """1.0 for an exactly formatted completion, else 0.0 naming the defect."""
    if parse_completion(text) is not None:
        return Reward(1.0, "ok")
    if not isinstance(text, str):
        return Reward(0.0, "not a string")
    return Reward(0.0, _format_problem(text))


def accuracy_reward(task: Task, problem: Problem, text: str) -> Reward:
    """Score the task's reading of the final answer (`Task.answer_of`) with its verifier; 0 when there is none."""
    answer = task.answer_of(problem, text)
    if answer is None:
        return Reward(0.0, "no answer")
    value, reason = task.score(problem, answer)
    return Reward(value, reason)


def language_reward(problem: Problem, text: str) -> Reward:
    """R1's language-consistency reward: the share of the chain of thought's words in the question's
    language (qiusuo/language.py). 1.0 for a problem posed in no particular language; 0.0 when the
    completion does not parse, as for accuracy."""
    from .language import consistency, question_lang

    lang = question_lang(problem)
    if lang is None:
        return Reward(1.0, "question in no particular language")
    parsed = parse_completion(text)
    if parsed is None:
        return Reward(0.0, "no chain of thought")
    share = consistency(parsed[0], lang)
    return Reward(share, f"{share:.0%} of the chain of thought in {lang}")


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO soft overlong punishment.

    0 up to ``max_len - buffer``, then a linear ramp reaching -1 at ``max_len``,
    and -1 beyond: long-winded answers are discouraged gradually rather than by a
    cliff at truncation.
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    free = max_len - buffer
    if length <= free:
        return 0.0
    if length <= max_len:
        return (free - length) / buffer
    return -1.0


def score_completion(
    task: Task, problem: Problem, text: str, weights: RewardWeights = RewardWeights()
) -> tuple[float, dict[str, Reward]]:
    """Weighted total reward and its parts {"accuracy": ..., "format": ..., "language": ...}."""
    parts = {
        "accuracy": accuracy_reward(task, problem, text),
        "format": format_reward(text),
        "language": language_reward(problem, text),
    }
    total = (weights.accuracy * parts["accuracy"].value + weights.format * parts["format"].value
             + weights.language * parts["language"].value)
    return total, parts
