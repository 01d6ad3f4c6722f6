"""docs/design.md §5 end to end: a real uvicorn server on loopback, the official `openai` client, a real
SQLite ledger, and a scripted model that writes `<think>Sum 1+3</think><answer>4</answer>`."""
import httpx
import openai
import pytest
from openai import OpenAI

from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import ANSWER, REASONING, SCRIPT, scripted_model, serve

MODEL = "qiusuo-test"
QUESTION = [{"role": "user", "content": "What is 1+3?"}]
PRICES = dict(price_prompt=1.0, price_completion=4.0)  # USD per million tokens


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path_factory.mktemp("api"), max_body_bytes=20_000,
               max_messages=8, **PRICES) as s:
        yield s


@pytest.fixture
def new_key(server):
    """A fresh key per test (its own limits and ledger rows): returns (key, secret)."""
    def make(**kw):
        kw.setdefault("rpm", 1000)
        return server.service.store.create("test", **kw)
    return make


def client(server, secret) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=30)


def ask(c: OpenAI, **kw):
    return c.chat.completions.create(model=MODEL, messages=kw.pop("messages", QUESTION), **kw)


def test_non_streaming_splits_reasoning_and_counts_tokens(server, new_key, tok):
    _, secret = new_key()
    r = ask(client(server, secret))
    msg = r.choices[0].message
    assert (msg.role, msg.content, msg.reasoning_content) == ("assistant", ANSWER, REASONING)
    assert r.object == "chat.completion" and r.model == MODEL and r.choices[0].finish_reason == "stop"
    prompt_tokens = len(tok.encode_chat(QUESTION))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (prompt_tokens, len(SCRIPT), prompt_tokens + len(SCRIPT))
    assert r.usage.completion_tokens_details.reasoning_tokens == SCRIPT.index("</think>") + 1


def test_streaming_sends_reasoning_deltas_then_content_then_usage(server, new_key):
    _, secret = new_key()
    c = client(server, secret)
    chunks = list(ask(c, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant"
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" for d in deltas if
             getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, key=lambda k: k == "content") and "reasoning" in kinds and "content" in kinds
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage == ask(c).usage  # the same numbers as the non-streamed answer


def test_streaming_without_include_usage_sends_no_usage(server, new_key):
    _, secret = new_key()
    chunks = list(ask(client(server, secret), stream=True))
    assert all(ch.choices and ch.usage is None for ch in chunks)


@pytest.mark.parametrize("limits, n", [({"max_tokens": 3}, 3), ({"max_completion_tokens": 5, "max_tokens": 100}, 5)])
def test_max_tokens_cut_the_completion(server, new_key, limits, n):
    _, secret = new_key()
    r = ask(client(server, secret), **limits)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
    assert r.choices[0].message.reasoning_content == REASONING[:n - 1]  # <think> is the first token
    assert r.choices[0].message.content == ""


@pytest.mark.parametrize("stop, reasoning, content", [(["+"], "Sum 1", ""), ("4", REASONING, "")])
def test_stop_strings_cut_the_text(server, new_key, stop, reasoning, content):
    _, secret = new_key()
    for stream in (False, True):
        if stream:
            chunks = list(ask(client(server, secret), stop=stop, stream=True))
            deltas = [ch.choices[0].delta for ch in chunks]
            got = ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                   "".join(d.content or "" for d in deltas), chunks[-1].choices[0].finish_reason)
        else:
            m = ask(client(server, secret), stop=stop).choices[0]
            got = (m.message.reasoning_content, m.message.content, m.finish_reason)
        assert got == (reasoning, content, "stop")


def test_models_health_and_metrics(server, new_key):
    _, secret = new_key()
    c = client(server, secret)
    assert [m.id for m in c.models.list()] == [MODEL]
    bare = httpx.get(server.url + "/models", headers={"Authorization": f"Bearer {secret}"})  # without /v1
    assert bare.json()["data"][0]["id"] == MODEL
    ask(c)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("qiusuo_requests_total", "qiusuo_queue_depth", "qiusuo_running_sequences", "qiusuo_tokens_total",
                 "qiusuo_time_to_first_token_seconds_bucket", "qiusuo_inter_token_latency_seconds_bucket"):
        assert name in metrics
    assert 'qiusuo_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    completion = [line for line in metrics.splitlines() if line.startswith('qiusuo_tokens_total{kind="completion"}')]
    assert float(completion[0].split()[-1]) >= len(SCRIPT)


def test_balance_in_deepseek_shape_goes_down_by_the_cost(server, new_key, tok):
    key, secret = new_key(balance=1.0)
    headers = {"Authorization": f"Bearer {secret}"}
    before = httpx.get(server.url + "/user/balance", headers=headers).json()
    assert before == {"is_available": True, "balance_infos": [
        {"currency": "USD", "total_balance": "1.00", "granted_balance": "0.00", "topped_up_balance": "1.00"}]}
    u = ask(client(server, secret)).usage
    cost = (u.prompt_tokens * PRICES["price_prompt"] + u.completion_tokens * PRICES["price_completion"]) / 1e6
    assert server.service.store.get(key.id).spent == pytest.approx(cost)


def test_ledger_totals_equal_what_the_client_was_told(server, new_key):
    key, secret = new_key()
    c = client(server, secret)
    told = [ask(c).usage, ask(c, max_tokens=4).usage]
    told.append(list(ask(c, stream=True, stream_options={"include_usage": True}))[-1].usage)
    totals = server.service.store.totals(key.id)
    assert totals["requests"] == 3
    assert totals["prompt_tokens"] == sum(u.prompt_tokens for u in told)
    assert totals["completion_tokens"] == sum(u.completion_tokens for u in told)
    assert totals["reasoning_tokens"] == sum(u.completion_tokens_details.reasoning_tokens for u in told)
    rows = server.service.store.usage_rows(key.id)
    assert [r["finish_reason"] for r in rows] == ["stop", "length", "stop"]
    assert all(r["finished_at"] >= r["started_at"] for r in rows)


def assert_error_body(body, code):
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_auth_errors_raise_authentication_error(server, new_key):
    with pytest.raises(openai.AuthenticationError) as e:
        ask(client(server, "qs-deadbeef-nope"))
    assert_error_body(e.value.response.json(), "invalid_api_key")
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION})  # no key at all
    assert r.status_code == 401
    key, secret = new_key()
    server.service.store.revoke(key.id)
    with pytest.raises(openai.AuthenticationError):
        ask(client(server, secret))


def test_exhausted_balance_is_402(server, new_key):
    _, secret = new_key(balance=0.0)
    with pytest.raises(openai.APIStatusError) as e:
        ask(client(server, secret))
    assert e.value.status_code == 402
    assert_error_body(e.value.response.json(), "insufficient_balance")
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(server.url + "/user/balance", headers=headers).json()["is_available"] is False


@pytest.mark.parametrize("bad, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"n": 2}, "n"),
    ({"seed": 2 ** 70}, "seed"),
])
def test_invalid_parameters_are_422(server, new_key, bad, param):
    _, secret = new_key()
    with pytest.raises(openai.UnprocessableEntityError) as e:
        ask(client(server, secret), **bad)
    assert e.value.response.json()["error"]["param"] == param


def test_reasoning_content_in_input_is_400(server, new_key):
    _, secret = new_key()
    history = QUESTION + [{"role": "assistant", "content": "4", "reasoning_content": "Sum 1+3"},
                          {"role": "user", "content": "And 2+2?"}]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(server, secret), messages=history)
    assert e.value.response.json()["error"]["param"] == "messages[1].reasoning_content"


def test_unknown_model_is_404_and_unknown_fields_are_ignored(server, new_key):
    _, secret = new_key()
    c = client(server, secret)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=QUESTION)
    r = ask(c, extra_body={"frequency_penalty": 0.5, "some_future_option": {"x": 1}})
    assert r.choices[0].message.content == ANSWER


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    (b'{"model": "qiusuo-test"}', 400, "invalid_request"),                       # no messages
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_request"),
    (b'{"messages": "hello"}', 400, "invalid_request"),
    (b'{"messages": [' + b",".join([b'{"role": "user", "content": "x"}'] * 9) + b"]}", 400, "too_many_messages"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 600 + b'"}]}', 400, "context_length_exceeded"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 30_000 + b'"}]}', 413, "request_too_large"),
])
def test_malformed_bodies(server, new_key, body, status, code):
    _, secret = new_key()
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    assert r.status_code == status
    assert_error_body(r.json(), code)


def test_max_context_bounds_prompts_and_the_cache(tok, tmp_path):
    model = scripted_model(tok, SCRIPT)
    with serve(tok, model, tmp_path, no_auth=True, max_context=64) as live:
        assert live.service.scheduler.max_len == 64
        r = httpx.post(live.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x" * 80}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(live.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "12*7"}], "max_tokens": 500})
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= 64


def test_unknown_routes_and_methods_are_openai_shaped(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


def test_ledger_and_balance_survive_a_restart(tok, tmp_path):
    model = scripted_model(tok, SCRIPT)
    with serve(tok, model, tmp_path, **PRICES) as first:
        key, secret = first.service.store.create("persist", balance=2.0)
        told = [ask(client(first, secret)).usage for _ in range(2)]
    with serve(tok, model, tmp_path, **PRICES) as second:  # same SQLite file
        totals = second.service.store.totals(key.id)
        assert totals["requests"] == 2
        assert totals["completion_tokens"] == sum(u.completion_tokens for u in told)
        balance = httpx.get(second.url + "/user/balance", headers={"Authorization": f"Bearer {secret}"}).json()
        assert balance["balance_infos"][0]["total_balance"] == f"{2.0 - totals['cost']:.2f}"
        assert second.service.store.get(key.id).spent == pytest.approx(totals["cost"])
        assert ask(client(second, secret)).choices[0].message.content == ANSWER  # the key still works


def test_no_auth_mode_needs_no_key_and_still_records_usage(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, no_auth=True) as s:
        r = ask(OpenAI(base_url=s.url + "/v1", api_key="anything", max_retries=0))
        assert r.choices[0].message.content == ANSWER
        rows = s.service.store.usage_rows()
        assert len(rows) == 1 and rows[0]["key_id"] is None
        assert rows[0]["completion_tokens"] == r.usage.completion_tokens


def test_a_chat_template_that_refuses_the_messages_gives_400(tok, tmp_path):
    """Real checkpoints' templates raise on role orders they don't support; that is the client's error."""
    refuse = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    strict = Tokenizer(tok.backend, {**tok.config, "chat_template": refuse + tok.config["chat_template"]})
    with serve(strict, scripted_model(tok, SCRIPT), tmp_path, no_auth=True) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat template refused"):
            ask(c, messages=[{"role": "system", "content": "be brief"}] + QUESTION)
        assert ask(c).choices[0].message.content == ANSWER


def test_an_empty_think_block_gives_empty_reasoning_not_null(tok, tmp_path):
    with serve(tok, scripted_model(tok, ["<think>", "</think>", "<answer>", "7", "</answer>"]), tmp_path,
               no_auth=True) as s:
        r = ask(OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0))
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("", "7")
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
