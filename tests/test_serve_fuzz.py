"""A property-based fuzz of the chat request schema (issue 17, item 2): `hypothesis` builds bodies —
some valid, most subtly wrong (wrong types, out-of-range numbers, odd Unicode, unknown and unsupported
fields, deep nesting, raw bytes) — and posts them to a live server. Whatever the body, the answer is
never a 5xx other than 503 with Retry-After, and an error is always in the OpenAI shape. Bounded in
time: a fixed number of examples, and a deadline for the whole run."""
import collections
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import SCRIPT, idle, scripted_model, serve, wait_for

BUDGET_S = 25.0

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["<|end|><|assistant|>", "<think>", "</answer>", "\x00", "\u202e", "𝔘𝔫𝔦", "\ufeff"])


def maybe(strategy):
    return st.one_of(strategy, strategy, strategy, json_value)   # the right type mostly, anything sometimes


message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant", "developer", "tool", ""])),
     "content": maybe(text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                            "text": maybe(text)}), max_size=3))},
    optional={"reasoning_content": maybe(text), "name": json_value})

FIELDS = {
    "model": maybe(st.sampled_from(["qiusuo-test", "", "gpt-4o"])),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
    "max_tokens": maybe(st.integers(-2, 40)),
    "max_completion_tokens": maybe(st.integers(-2, 40)),
    "temperature": maybe(st.floats(-1, 3)),
    "top_p": maybe(st.floats(-0.5, 1.5)),
    "presence_penalty": maybe(st.floats(-3, 3)),
    "stop": maybe(text | st.lists(text, max_size=18)),
    "seed": maybe(st.integers(-(2 ** 64), 2 ** 64)),
    "n": maybe(st.integers(-1, 3)),
    "tools": json_value, "response_format": json_value, "logprobs": json_value, "top_logprobs": json_value,
    "surprise": json_value,
}
simple = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text}),
                  min_size=1, max_size=3)
body = st.fixed_dictionaries({"messages": st.one_of(simple, simple, st.lists(message, max_size=4), json_value)},
                             optional=FIELDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = Tokenizer.char_level()
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path_factory.mktemp("fuzz"), max_tokens_limit=32,
               default_max_tokens=16, max_body_bytes=50_000, max_messages=3) as s:
        s.secret = s.service.store.create("fuzz", rpm=10 ** 6, tpm=10 ** 9, balance=1e6)[1]
        s.http = httpx.Client(base_url=s.url, timeout=30, headers={"Authorization": f"Bearer {s.secret}"})
        s.deadline = time.monotonic() + BUDGET_S
        s.tried = {"json": 0, "bytes": 0}
        s.statuses = collections.Counter()
        yield s
        s.http.close()


def check(server, content: bytes, content_type="application/json") -> None:
    if time.monotonic() > server.deadline:
        return   # the time budget is spent: the remaining examples pass without a request
    r = server.http.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type})
    server.statuses[r.status_code] += 1
    assert r.status_code < 500 or (r.status_code == 503 and "Retry-After" in r.headers), (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["message"], r.text[:300]


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(body)
def test_fuzzed_bodies_get_no_5xx(server, b):
    server.tried["json"] += 1
    check(server, json.dumps(b, ensure_ascii=bool(len(b) % 2)).encode("utf-8", "surrogatepass"))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(st.binary(max_size=300) | st.builds(lambda d, s: b"[" * d + s + b"]" * d, st.integers(0, 5000),
                                            st.binary(max_size=10)))
def test_fuzzed_bytes_get_no_5xx(server, raw):
    server.tried["bytes"] += 1
    check(server, raw)


def test_nothing_is_left_held(server):
    assert server.tried["json"] > 0 and server.tried["bytes"] > 0
    # the fuzz reached the model as well as the validators
    assert server.statuses[200] > 0 and server.statuses[400] > 0 and server.statuses[422] > 0, server.statuses
    wait_for(lambda: idle(server.service), what="idle after the fuzz")
