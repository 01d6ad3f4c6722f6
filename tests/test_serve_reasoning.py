"""The think/answer splitter and the incremental decoder, as pure functions."""
import pytest

from qiusuo.rewards import ReasoningFormat
from qiusuo.serve.reasoning import CONTENT, REASONING, IncrementalDecoder, ReasoningSplitter


def split(pieces, **kw):
    """Feed one piece per token; return (reasoning, content, reasoning_tokens, stopped, emitted pieces)."""
    s = ReasoningSplitter(**kw)
    out = []
    for p in pieces:
        out += s.feed(p)
    out += s.finish()
    reasoning = "".join(t for f, t in out if f == REASONING)
    content = "".join(t for f, t in out if f == CONTENT)
    return reasoning, content, s.reasoning_tokens, s.stopped, out


TAGGED = ["<think>", "S", "u", "m", "</think>", "<answer>", "4", "2", "</answer>"]


def test_think_and_answer_are_split_and_tags_dropped():
    reasoning, content, n_reasoning, stopped, out = split(TAGGED)
    assert (reasoning, content, stopped) == ("Sum", "42", False)
    assert n_reasoning == 5  # <think> S u m </think>
    # every reasoning piece comes before every content piece
    fields = [f for f, _ in out]
    assert fields == sorted(fields, key=lambda f: f == CONTENT)


def test_without_answer_tags_content_is_everything_after_think():
    assert split(["<think>", "a", "b", "</think>", "\n", "x", "y"])[:3] == ("ab", "\nxy", 4)


def test_without_think_block_everything_is_content_and_no_reasoning_tokens():
    reasoning, content, n_reasoning, _, _ = split(["ju", "nk<think>", "x"])
    assert (reasoning, content, n_reasoning) == ("", "junk<think>x", 0)


def test_leading_whitespace_before_think_is_dropped():
    assert split([" ", "\n", "<think>", "a", "</think>", "b"])[:3] == ("a", "b", 5)


def test_prompt_ending_in_think_starts_inside_the_reasoning():
    assert split(["a", "</think>", "b"], in_think=True)[:3] == ("a", "b", 2)


def test_unclosed_think_counts_every_token_as_reasoning():
    assert split(["<think>", "a", "b", "c"])[:3] == ("abc", "", 4)


def test_tags_split_over_several_pieces_are_never_shown_half():
    pieces = ["<th", "ink>", "ab <", "/thi", "nk>", "<ans", "wer>4", "</ans", "wer>"]
    reasoning, content, n_reasoning, _, out = split(pieces)
    assert (reasoning, content, n_reasoning) == ("ab ", "4", 5)
    assert not any("<" in t for _, t in out)


def test_a_lone_angle_bracket_is_released_once_it_cannot_be_a_tag():
    assert split(["<think>", "a", "</think>", "1 <", " 2"])[1] == "1 < 2"


@pytest.mark.parametrize("pieces, expected", [
    (["<think>", "ab", "c STOP more", "</think>", "x"], ("abc ", "")),      # stop inside the reasoning
    (["<think>", "a", "</think>", "4", "ST", "OP", "5"], ("a", "4")),       # stop split over two tokens
])
def test_stop_string_cuts_the_text_and_stops(pieces, expected):
    reasoning, content, _, stopped, _ = split(pieces, stop_strings=["STOP"])
    assert (reasoning, content, stopped) == (*expected, True)


def test_partial_stop_string_at_the_end_is_released_by_finish():
    reasoning, content, _, stopped, _ = split(["<think>", "a", "</think>", "4", "ST"], stop_strings=["STOP"])
    assert (content, stopped) == ("4ST", False)


def test_streamed_pieces_concatenate_to_the_whole_message():
    text = "<think>let me see: 12+30</think><answer>42</answer>"
    whole = split([text])
    per_char = split(list(text))
    assert whole[:2] == per_char[:2] == ("let me see: 12+30", "42")


def test_incremental_decoder_holds_back_incomplete_characters():
    # A byte-level decoder: ids are bytes; "é" is two bytes, "猫" three.
    data = "é猫a".encode()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    dec = IncrementalDecoder(decode, window=2)
    deltas = [dec.add(b) for b in data]
    assert "".join(deltas) == "é猫a"
    assert deltas == ["", "é", "", "", "猫", "a"]


R1 = ReasoningFormat(special=True, opens_think=True, strict=False)
BPE = ReasoningFormat(special=False, opens_think=False, strict=False)


def test_a_prompt_that_opens_the_think_block_starts_inside_it():
    # R1-distill: the template wrote "<think>\n"; the model continues the reasoning, closes it, answers
    pieces = ["Let", " me", " add", ".\n", "</think>", "\n\n", "The", " answer", " is", " 5", "."]
    reasoning, content, n, _, _ = split(pieces, fmt=R1)
    assert (reasoning, content, n) == ("Let me add.\n", "The answer is 5.", 5)


def test_text_tags_over_bpe_pieces_with_whitespace_around_them():
    pieces = ["<", "think", ">\n", "S", "um", "\n</", "th", "ink", ">\n\n", "<answer", ">", "42", "</answer>"]
    reasoning, content, n, _, out = split(pieces, fmt=BPE)
    assert (reasoning, content, n) == ("Sum\n", "42", 9)
    assert not any("<" in t for _, t in out)
    # streamed one character at a time: the same message
    chars = [c for p in pieces for c in p]
    assert split(chars, fmt=BPE)[:2] == (reasoning, content)


def test_the_strict_format_keeps_whitespace():
    assert split(["<think>", "\n", "a", "</think>", "\n", "b"])[:2] == ("\na", "\nb")


def test_reply_decoding_keeps_think_tags_that_are_special_tokens():
    from tokenizers import AddedToken

    import hf_fixtures
    from qiusuo.tokenizer import Tokenizer

    backend = hf_fixtures.bpe_tokenizer(("<|im_end|>",))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")])
    tok = Tokenizer(backend, {"eos_token": "<|im_end|>"})
    ids = tok.encode("<think>a b</think>c<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a bc"        # what hid the reasoning before
    assert tok.decode_reply(ids) == "<think>a b</think>c"
    dec = IncrementalDecoder(tok.decode_reply)
    assert split([dec.add(i) for i in ids], fmt=BPE)[:2] == ("a b", "c")
