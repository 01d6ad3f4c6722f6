"""Rule-based rewards for GRPO: format, verified accuracy, language consistency, overlong penalty.

The same parser serves training and evaluation, so the model can never be rewarded for junk in or
around the tags. It reads a completion in its checkpoint's `ReasoningFormat`: strict for the tiny
character model (`<think>…</think><answer>…</answer>` exactly, as R1-Zero's template asks), lenient for
a real checkpoint, whose tags are text spanning several BPE tokens and are written with whitespace
around them, whose answer may follow `</think>` without answer tags (R1-distill writes
`…</think>\n\nThe answer is \\boxed{42}`), and whose chat template may already open the think block in
the prompt (then the completion starts inside it).
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
# Lenient: whitespace around the tags; the answer in <answer> tags or, without them, the rest.
LENIENT_RE = re.compile(rf"\s*<think>{_FIELD}</think>\s*(?:<answer>{_FIELD}</answer>\s*|{_FIELD})", re.DOTALL)


@dataclass(frozen=True)
class ReasoningFormat:
    """How a checkpoint writes its reasoning (`Tokenizer.reasoning` builds it).

    `open` / `close`: the think tags. `special`: each is a single token of the vocabulary (else text
    spanning several). `opens_think`: the chat template's generation prompt already ends with `open`, so
    a completion starts inside the think block. `strict`: the exact R1-Zero format of the tiny model, or
    the lenient one of a real checkpoint (see the module docstring)."""

    open: str = "<think>"
    close: str = "</think>"
    special: bool = True
    opens_think: bool = False
    strict: bool = True


STRICT = ReasoningFormat()
"""The tiny character model's format, the default."""
LENIENT = ReasoningFormat(special=False, strict=False)


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


def _whole(text: str, fmt: ReasoningFormat) -> str:
    """The completion with the think block's opening the prompt wrote, if it did."""
    return fmt.open + text if fmt.opens_think else text


def parse_completion(text: str, fmt: ReasoningFormat = STRICT) -> tuple[str, str] | None:
    """Split a completion into (think, answer), or None unless it has the format `fmt` asks for.
    Lenient fields come stripped of surrounding whitespace, and the answer must not be empty."""
    if not isinstance(text, str):
        return None
    text = _whole(text, fmt)
    if fmt.strict:
        match = THINK_RE.fullmatch(text)
        return (match.group(1), match.group(2)) if match else None
    match = LENIENT_RE.fullmatch(text)
    if not match:
        return None
    answer = (match.group(2) if match.group(2) is not None else match.group(3)).strip()
    return (match.group(1).strip(), answer) if answer else None


def _format_problem(text: str, fmt: ReasoningFormat = STRICT) -> str:
    """Name the first thing wrong with a completion that failed to parse."""
    text = _whole(text, fmt)
    if not fmt.strict:
        return _lenient_problem(text)
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


def _lenient_problem(text: str) -> str:
    for tag in ("<think>", "</think>"):
        count = text.count(tag)
        if count != 1:
            return f"{'missing' if count == 0 else 'duplicate'} {tag}"
    if text[:text.index("<think>")].strip():
        return "text before <think>"
    rest = text[text.index("</think>") + len("</think>"):]
    if rest.count("<answer>") > 1 or rest.count("</answer>") > 1:
        return "duplicate answer tags"
    if not rest.replace("<answer>", "").replace("</answer>", "").strip():
        return "empty answer"
    return "malformed answer tags"


def format_reward(text: str, fmt: ReasoningFormat = STRICT) -> Reward:
    """1.0 for a completion in the format `fmt` asks for, else 0.0 naming the defect."""
    if parse_completion(text, fmt) is not None:
        return Reward(1.0, "ok")
    if not isinstance(text, str):
        return Reward(0.0, "not a string")
    return Reward(0.0, _format_problem(text, fmt))


def accuracy_reward(task: Task, problem: Problem, text: str, fmt: ReasoningFormat = STRICT) -> Reward:
    """Score the task's reading of the final answer (`Task.answer_of`) with its verifier; 0 when there is none."""
    answer = task.answer_of(problem, text, fmt)
    if answer is None:
        return Reward(0.0, "no answer")
    value, reason = task.score(problem, answer)
    return Reward(value, reason)


def language_reward(problem: Problem, text: str, fmt: ReasoningFormat = STRICT) -> Reward:
    """R1's language-consistency reward: the share of the chain of thought's words in the question's
    language (qiusuo/language.py). 1.0 for a problem posed in no particular language; 0.0 when the
    completion does not parse, as for accuracy, and for a chain of thought with no words (a direct
    answer, a bare column of digits): R1 asks for a readable CoT in the question's language, and a
    reward that paid 1.0 for no words would teach the model to drop them."""
    from .language import consistency, question_lang

    lang = question_lang(problem)
    if lang is None:
        return Reward(1.0, "question in no particular language")
    parsed = parse_completion(text, fmt)
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
    task: Task, problem: Problem, text: str, weights: RewardWeights = RewardWeights(),
    fmt: ReasoningFormat = STRICT,
) -> tuple[float, dict[str, Reward]]:
    """Weighted total reward and its parts {"accuracy": ..., "format": ..., "language": ...}."""
    parts = {
        "accuracy": accuracy_reward(task, problem, text, fmt),
        "format": format_reward(text, fmt),
        "language": language_reward(problem, text, fmt),
    }
    total = (weights.accuracy * parts["accuracy"].value + weights.format * parts["format"].value
             + weights.language * parts["language"].value)
    return total, parts
