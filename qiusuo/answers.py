"""Math answers: the reference answer of a dataset row, the final answer of a completion, and whether
two answers are the same number or expression.

Extraction is plain string work (this module imports nothing heavy). Equivalence is decided by
`math-verify` (Hugging Face's verifier of open-r1 and lighteval): both sides are parsed to SymPy and
compared, so 1/2 = 0.5 = \\frac{1}{2}, 1,000 = 1000 and `18 \\text{ dollars}` = 18. SymPy can run for
ever on a pathological expression (`9^{9^{9^{9}}}`), so it runs in a child process that is killed after
`TIMEOUT_S`; the call then counts as not equal. The child is shared by the threads of a process (calls
take turns), which also keeps math-verify's SIGALRM timeouts, which work only on a main thread, out of
the picture. Two plain integers (every GSM8K answer) are compared in-process, exactly: the same verdict
without the round trip.
"""
from __future__ import annotations

import functools
import json
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

TIMEOUT_S = 5.0
"""Seconds one comparison may take before it is killed and counted as not equal."""
STARTUP_TIMEOUT_S = 120.0
"""Seconds the child may take to start (it imports SymPy and math-verify)."""

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


# --- extraction ------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`) in `text`, nested braces kept whole
    (`\\boxed{\\frac{1}{2}}` → `\\frac{1}{2}`); `\\boxed 5` gives `5`. None when there is none or its
    braces never close."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at + (6 if text.startswith("\\boxed", at) else 5):]
    if rest[:1] == " ":                                   # `\boxed 5`: up to the next space or `$`
        return re.split(r"[\s$]", rest.lstrip(), maxsplit=1)[0] or None
    if rest[:1] != "{":
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's final answer: what follows the last `####`, thousands separators and a `$` removed
    (`#### 1,000` → `1000`); None without `####`."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    return answer.rstrip(".") or None


def gold_answer(text: str) -> str:
    """The reference answer of a dataset row: GSM8K's `#### 42`, else MATH's last `\\boxed{…}`, else the
    whole field (a dataset with a bare answer column, such as MATH-500's `answer`)."""
    return gsm8k_answer(text) or last_boxed(text) or text.strip()


def last_number(text: str) -> str | None:
    """The last number written in `text` (`1,234.5`, `-3`, `3/4`), commas removed; None without one."""
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def model_answer(text: str, require_tags: bool = False) -> tuple[str, str] | None:
    """A completion's final answer and where it was found, or None:

    1. `"answer_tag"`: the last `<answer>…</answer>` (a `\\boxed{}` inside it wins over the rest of it);
    2. `"boxed"`: else the last `\\boxed{…}`;
    3. `"last_number"`: else the last number of the completion (lm-eval's "flexible extract").

    With `require_tags` (the R1-Zero template, whose format asks for the tags) only the first applies:
    an untagged completion has no answer, as the format reward also says."""
    tagged = _ANSWER_TAG_RE.findall(text)
    if tagged:
        inside = tagged[-1]
        answer = last_boxed(inside) or inside.strip()
        return (answer, "answer_tag") if answer else None
    if require_tags:
        return None
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    number = last_number(text)
    return (number, "last_number") if number else None


# --- equivalence (math-verify in a child process) --------------------------------------------------

def _serve() -> None:
    """The child: import math-verify once, then answer one JSON request
    per line on stdin, `[op, args]`, with one JSON line `[status, value]` on the original stdout."""
    import logging
    import os
    import sys

    out = os.fdopen(os.dup(1), "w")      # the protocol's channel; anything else printed goes to stderr
    os.dup2(2, 1)
    logging.disable(logging.WARNING)     # math-verify warns on every call that timeouts are ours to do
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    import sympy

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parsed(answer: str):
        # Boxing makes a bare `1/2` or `18 \text{ dollars}` one expression to extract, as in lighteval.
        return parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=None)

    def equal(gold: str, answer: str) -> bool:
        g, a = parsed(gold), parsed(answer)
        return bool(g and a and verify(g, a, timeout_seconds=None))

    def canonical(answer: str) -> str | None:
        p = parsed(answer)
        if not p:
            return None
        expr = p[0]
        if getattr(expr, "is_number", False):       # 0.5 and 1/2 vote alike
            expr = sympy.nsimplify(expr, rational=True)
        return str(expr)

    ops = {"equal": equal, "canonical": canonical}
    out.write('["ready", null]\n')
    out.flush()
    for line in sys.stdin:
        try:
            op, args = json.loads(line)
            reply = ["ok", ops[op](*args)]
        except Exception as e:  # a parse or SymPy failure is an answer ("no"), not a crash
            reply = ["error", f"{type(e).__name__}: {e}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


def require_math_verify() -> None:
    """Raise ImportError naming the extra to install when math-verify is missing."""
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise ImportError("checking math answers needs math-verify: pip install -c constraints.txt -e '.[data]'")


class VerifyTimeout(Exception):
    """The comparison ran past the timeout and its child process was killed."""


class Verifier:
    """math-verify behind a pipe to one child process (running `_serve`), started on first
    use and restarted after a timeout or a crash. Thread-safe: callers take turns on the pipe. A plain
    subprocess rather than `multiprocessing`: it re-imports nothing of the caller's main script and
    copies none of its threads."""

    def __init__(self, timeout: float = TIMEOUT_S):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc = None

    def _start(self) -> None:
        require_math_verify()
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from qiusuo.answers import _serve; _serve()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
        if self._read(STARTUP_TIMEOUT_S) is None:
            self._stop()
            raise RuntimeError(f"math-verify's process did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _read(self, timeout: float):
        """The child's next reply, or None when it gives none within `timeout` s (or died)."""
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else b""
        return json.loads(line) if line else None

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
        self._proc = None

    def call(self, op: str, *args):
        """Run `op` in the child; raises VerifyTimeout after `timeout` s, ValueError if it failed."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                self._start()
            try:
                self._proc.stdin.write((json.dumps([op, args]) + "\n").encode())
                self._proc.stdin.flush()
                reply = self._read(self.timeout)
            except (BrokenPipeError, OSError):
                reply = ["error", "math-verify's process died"]
            if reply is None:
                self._stop()
                raise VerifyTimeout(f"math-verify took longer than {self.timeout:g} s")
            status, value = reply
            if status == "error":
                raise ValueError(value)
            return value

    def close(self) -> None:
        with self._lock:
            self._stop()


_VERIFIER = Verifier()


def _integer(text: str) -> int | None:
    """The value of a plain integer (`1,000`, `-7`), else None."""
    text = text.strip()
    return int(text.replace(",", "")) if _INTEGER_RE.fullmatch(text) else None


@functools.lru_cache(maxsize=65536)
def check(gold: str, answer: str) -> tuple[bool, str]:
    """(equal, reason): whether `answer` is the same value as `gold` by math-verify, with a reason
    ("correct", "wrong value", "unparseable: …" or "verifier timed out"). Two plain integers (every
    GSM8K answer) are compared here, exactly, without the child's round trip."""
    gold_int, answer_int = _integer(gold), _integer(answer)
    if gold_int is not None and answer_int is not None:
        return gold_int == answer_int, "correct" if gold_int == answer_int else "wrong value"
    try:
        ok = _VERIFIER.call("equal", gold, answer)
    except VerifyTimeout:
        return False, "verifier timed out"
    except ValueError as e:
        return False, f"unparseable: {e}"
    return ok, "correct" if ok else "wrong value"


def equivalent(gold: str, answer: str) -> bool:
    """True when math-verify finds `answer` equal to `gold` within the timeout."""
    return check(gold, answer)[0]


@functools.lru_cache(maxsize=65536)
def canonical(answer: str) -> str:
    """A vote key for cons@k: the SymPy form of the answer (numbers as exact rationals, so `0.5`, `1/2`
    and `\\frac{1}{2}` are one key); an answer math-verify cannot read (or times out on) votes as its
    own text, marked `invalid:`."""
    if _integer(answer) is not None:
        return f"={_integer(answer)}"
    try:
        key = _VERIFIER.call("canonical", answer)
    except (VerifyTimeout, ValueError):
        key = None
    return f"={key}" if key else f"invalid:{answer}"

