"""Language of questions and of chains of thought: posing problems in English or Chinese, the
language-consistency measure, and the reward built on it.

DeepSeek-R1 §2.3.2: "CoT often exhibits language mixing, particularly when RL prompts involve multiple
languages. To mitigate [it], we introduce a language consistency reward during RL training, which is
calculated as the proportion of target language words in the CoT." It is added to the accuracy reward;
the paper notes a slight loss of performance in exchange for readability.

Here a *word* is a run of Latin letters (English) or one CJK character (Chinese, which has no spaces);
digits and symbols belong to no language. Consistency is the share of the CoT's words that are in the
question's language. A CoT with no words at all (a bare column of digits and symbols) is in no language,
so it is not consistent: it scores 0, else a model could satisfy the reward by dropping every word. The
synthetic tasks' traces are mostly symbols, so a trace carries its language in an opening and a closing
phrase (`localize`), and a Chinese trace says its operators in words (`OPS_ZH`) — enough words for
mixing to show and to be measured in every step.
"""
from __future__ import annotations

import dataclasses
import re

LANGS = ("en", "zh")
# Opening and closing phrases of a trace, per language.
TRACE_PHRASES = {"en": ("let me work it out: ", " so that is it"), "zh": ("我来算一下：", "，就是这样")}
# How each task poses its question in each language (from the problem's data).
QUESTION = {
    ("arith", "en"): lambda d: f"compute {d['a']}{d['op']}{d['b']}",
    ("arith", "zh"): lambda d: f"计算 {d['a']}{d['op']}{d['b']}",
    ("countdown", "en"): lambda d: f"reach {d['target']} with {' '.join(map(str, d['numbers']))}",
    ("countdown", "zh"): lambda d: f"用 {' '.join(map(str, d['numbers']))} 得到 {d['target']}",
}
# The English words the tasks' traces use, in Chinese; a word not listed stays English (and counts as mixing).
TRACE_WORDS_ZH = {"yes": "对", "no": "错", "c": "进", "b": "借", "wait": "等等", "check": "检查", "recheck": "再查",
                  "so": "所以", "fix": "改",
                  "guess": "猜"}
# Chinese traces read the operators out (8乘2加0得16), as a Chinese chain of thought would.
OPS_ZH = {"+": "加", "-": "减", "*": "乘", "=": "得"}
_OPS = re.compile("[" + re.escape("".join(OPS_ZH)) + "]")
_LATIN = re.compile(r"[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def check_langs(shares: dict, what: str) -> None:
    """A language → share mapping must name known languages with positive shares."""
    unknown = set(shares) - set(LANGS)
    if unknown:
        raise ValueError(f"{what}: unknown language(s) {sorted(unknown)}; known: {', '.join(LANGS)}")
    if shares and (min(shares.values()) < 0 or sum(shares.values()) <= 0):
        raise ValueError(f"{what}: shares must be ≥ 0 and not all 0, got {shares}")


def pose(problem, lang: str):
    """The same problem asked in `lang`: a new prompt, `data["lang"]` set, the same canonical key (so a
    problem and its translation fall on the same side of the held-out split)."""
    render = QUESTION.get((problem.task, lang))
    if render is None:
        raise ValueError(f"cannot pose a {problem.task} problem in {lang!r}: languages are supported for "
                         f"{sorted({t for t, _ in QUESTION})}")
    canonical = problem.canonical or problem.prompt
    return dataclasses.replace(problem, prompt=render(problem.data), data={**problem.data, "lang": lang},
                               canonical=canonical)


def question_lang(problem) -> str | None:
    """The language a problem was posed in; None for problems not posed in a language."""
    return problem.data.get("lang")


def prompt_lang(prompt: str) -> str:
    """The language a posed prompt is in, read from its text (rollout logs keep the prompt, not the
    problem): Chinese if it has a Chinese character, else English."""
    return "zh" if words(prompt)["zh"] else "en"


def cot_lang(think: str, lang: str) -> str | None:
    """Which language a CoT is in, relative to the question's `lang`: "same" (every word in `lang`),
    "other" (no word in it), "mixed"; None for a CoT without words."""
    counts = words(think)
    if not sum(counts.values()):
        return None
    return "same" if counts[lang] == sum(counts.values()) else "other" if not counts[lang] else "mixed"


def words(text: str) -> dict[str, int]:
    """Count of words per language in `text` (English: runs of Latin letters; Chinese: characters)."""
    counts = {lang: 0 for lang in LANGS}
    for w in _WORD.findall(text):
        counts["en" if w.isascii() else "zh"] += 1
    return counts


def consistency(think: str, lang: str) -> float:
    """Share of the CoT's words in `lang`; 0.0 for a CoT without words (it is in no language)."""
    counts = words(think)
    total = sum(counts.values())
    return counts[lang] / total if total else 0.0


def localize(think: str, lang: str) -> str:
    """A trace written in `lang`: its steps (in Chinese, words translated by `TRACE_WORDS_ZH` and
    operators read out by `OPS_ZH`) between the language's opening and closing phrases. An empty trace
    (a direct answer) stays empty."""
    if not think:
        return think
    if lang == "zh":
        think = _LATIN.sub(lambda m: TRACE_WORDS_ZH.get(m.group(), m.group()), think)
        think = _OPS.sub(lambda m: OPS_ZH[m.group()], think)
    start, end = TRACE_PHRASES[lang]
    return f"{start}{think}{end}"


def other(lang: str) -> str:
    return next(x for x in LANGS if x != lang)
