"""Turn a stream of generated token ids into `reasoning_content` and `content` text pieces.

The models write `<think>REASONING</think><answer>ANSWER</answer>` (a real checkpoint: the tags of its
`ReasoningFormat`, answer tags optional). The split works on *text*, not on tag token ids, so it holds
for any tokenizer: a tag that is one special token (decoded as its text: `Tokenizer.decode_reply`) or
text spread over several BPE tokens, split anywhere:

- phase START: whitespace before `<think>` is dropped; `<think>` enters THINK; any other text means
  the model skipped the think block, so everything is content (phase ANSWER).
- phase THINK: text is reasoning until `</think>`.
- phase ANSWER: text is content; `<answer>` / `</answer>` are dropped (for a checkpoint without
  answer tags the content is simply everything after `</think>`).
- a checkpoint whose template opens the think block in the prompt (R1-distill, `opens_think`) starts
  in THINK.
- in the lenient format of a real checkpoint, whitespace at the start of the reasoning and of the
  content (`<think>\n…</think>\n\nanswer`) is dropped.
- stop strings cut the visible text, reasoning or content, where they first appear — the same text the
  engine's stop-string check looks at — and nothing after them is emitted.

A piece that could be the start of a tag or stop string is held back until the next token settles it,
so a streamed answer never shows half a tag, and streamed pieces always concatenate to exactly the
non-streamed message.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..rewards import STRICT, ReasoningFormat

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
START, IN_THINK, IN_ANSWER = "start", "think", "answer"
REASONING, CONTENT = "reasoning_content", "content"


class ReasoningSplitter:
    """Feed the text of one token at a time; get back `(field, text)` pieces to emit.

    `reasoning_tokens` counts the tokens up to and including the one that closed the think block
    (all tokens while still thinking) — DeepSeek's `completion_tokens_details.reasoning_tokens`."""

    def __init__(self, stop_strings: Sequence[str] = (), in_think: bool | None = None,
                 fmt: ReasoningFormat = STRICT):
        """`in_think`: the prompt opened the think block (default: `fmt.opens_think`)."""
        in_think = fmt.opens_think if in_think is None else in_think
        self.open, self.close, self.lenient = fmt.open, fmt.close, not fmt.strict
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.phase = IN_THINK if in_think else START
        self.saw_think = in_think
        self.stopped = False
        self.tokens = 0
        self.reasoning_tokens = 0
        self._held = ""
        self._field_started = False   # lenient: leading whitespace of the current field is dropped

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The decoded text of the next token (possibly empty) → pieces that are now final."""
        self.tokens += 1
        was_thinking = self.phase in (START, IN_THINK)
        if self.stopped:
            pieces = []
        elif (self.phase != START and not self._held and not self.stop_strings and "<" not in text
              and (self._field_started or not self.lenient) and self.open[0] == self.close[0] == "<"):
            # the common token: every marker starts with "<", so none can start or end in this text
            pieces = [(REASONING if self.phase == IN_THINK else CONTENT, text)] if text else []
        else:
            pieces = self._consume(self._held + text, final=False)
        if self.phase == IN_THINK or (was_thinking and self.saw_think and self.phase == IN_ANSWER):
            self.reasoning_tokens = self.tokens
        return pieces

    def finish(self) -> list[tuple[str, str]]:
        """Flush what was held back once generation has ended."""
        return [] if self.stopped else self._consume(self._held, final=True)

    # --- internals -------------------------------------------------------------------------------
    def _tags(self) -> tuple[str, ...]:
        return {START: (self.open,), IN_THINK: (self.close,), IN_ANSWER: (ANSWER, ANSWER_END)}[self.phase]

    def _markers(self) -> tuple[str, ...]:
        return self._tags() + self.stop_strings

    def _consume(self, buf: str, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._held = ""
        while buf:
            if self.phase == START:
                buf = self._start(buf, final)
                if self.phase == START:  # only whitespace or a partial "<think>" so far: wait
                    self._held = buf
                    return out
                continue
            pos, marker = _first_marker(buf, self._markers())
            if marker is None:
                keep = 0 if final else _partial_suffix(buf, self._markers())
                self._emit(out, buf[:len(buf) - keep])
                self._held = buf[len(buf) - keep:]
                return out
            self._emit(out, buf[:pos])
            buf = buf[pos + len(marker):]
            if marker not in self._tags():  # a stop string
                self.stopped = True
                return out
            if marker == self.close and self.phase == IN_THINK:
                self.phase, self._field_started = IN_ANSWER, False
            # <answer> / </answer> are dropped and change nothing
        return out

    def _start(self, buf: str, final: bool) -> str:
        """Phase START: skip leading whitespace, enter THINK on `<think>`, else the answer begins."""
        text = buf.lstrip()
        if text.startswith(self.open):
            self.phase, self.saw_think = IN_THINK, True
            return text[len(self.open):]
        if final or (text and not self.open.startswith(text)):
            self.phase = IN_ANSWER  # no think block: everything is the answer
        return text if self.phase == IN_ANSWER else buf

    def _emit(self, out: list, text: str) -> None:
        if self.lenient and not self._field_started:
            text = text.lstrip()
            self._field_started = bool(text)
        if not text:
            return
        field = REASONING if self.phase == IN_THINK else CONTENT
        if out and out[-1][0] == field:
            out[-1] = (field, out[-1][1] + text)
        else:
            out.append((field, text))


def _first_marker(buf: str, markers: Sequence[str]) -> tuple[int, str | None]:
    """Earliest occurrence of any marker (the longest one when two start at the same place)."""
    best, found = len(buf) + 1, None
    for m in markers:
        i = buf.find(m)
        if i != -1 and (i < best or (i == best and len(m) > len(found))):
            best, found = i, m
    return best, found


def _partial_suffix(buf: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a marker."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf)), longest, -1):
            if buf.endswith(m[:n]):
                longest = n
                break
    return longest


class IncrementalDecoder:
    """Decode token ids one at a time into text deltas.

    Decoding each id alone breaks byte-level BPE (a character may span tokens) and decoding the whole
    sequence each step is quadratic, so decode a short window and hold back a delta that ends in an
    incomplete character (U+FFFD) until the next token completes it. The window's start moves in
    jumps, so the text of what was already emitted is usually the previous call's result: one decode
    per token rather than two."""

    def __init__(self, decode: Callable[[list[int]], str], window: int = 6):
        self._decode = decode
        self._window = window
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is context already emitted
        self._read = 0
        self._before: str | None = ""  # decode(ids[prefix:read]), when known

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._before if self._before is not None else self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._before = before
        if text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self._read = len(self._ids)
        self._before = text
        if self._read - self._prefix > 2 * self._window:
            self._prefix, self._before = self._read - self._window, None
        return text[len(before):]
