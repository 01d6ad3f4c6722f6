"""Limits under load: 429 from the key buckets, 503 from a full queue or a queue timeout, keep-alive
comments while a stream waits, and generation cancelled when the client goes away.

Requests that must stay busy use a model that loops forever (max_tokens 8000 ≈ seconds of decoding),
and every test ends them by disconnecting — which is itself what the disconnect tests check."""
import json

import httpx
import openai
import pytest
from openai import OpenAI

from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import LOOP, SCRIPT, scripted_model, serve, wait_for

QUESTION = [{"role": "user", "content": "Go on forever"}]
LONG = 8000


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


@pytest.fixture(scope="module")
def looping(tok):
    return scripted_model(tok, LOOP, loop=True, context=8192)


def settings(**kw):
    return dict(no_auth=True, max_tokens_limit=LONG, max_concurrent=1, max_queue=1, keepalive_interval=0.05, **kw)


class Stream:
    """A streaming request on its own connection, read line by line; `close()` hangs up."""

    def __init__(self, url, max_tokens=LONG, headers=None):
        self.http = httpx.Client(timeout=30)
        self.response = self.http.send(self.http.build_request(
            "POST", url + "/v1/chat/completions", headers=headers,
            json={"messages": QUESTION, "stream": True, "max_tokens": max_tokens}), stream=True)
        self.lines = self.response.iter_lines()

    def read_until(self, predicate) -> str:
        for line in self.lines:
            if predicate(line):
                return line
        raise AssertionError("stream ended first")

    def read_content(self) -> str:
        line = self.read_until(lambda s: s.startswith("data: {") and '"content": "' in s and '"content": ""' not in s)
        return json.loads(line[6:])["choices"][0]["delta"]["content"]

    def close(self):
        self.response.close()
        self.http.close()


def idle(svc):
    return svc.gate.running == 0 and svc.gate.waiting == 0 and svc.scheduler.running == 0


def test_requests_per_minute_limit_gives_429_with_retry_after(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path) as s:
        _, secret = s.service.store.create("limited", rpm=2)
        c = OpenAI(base_url=s.url + "/v1", api_key=secret, max_retries=0)
        for _ in range(2):
            c.chat.completions.create(model="qiusuo-test", messages=QUESTION)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="qiusuo-test", messages=QUESTION)
        retry_after = int(e.value.response.headers["Retry-After"])
        assert 1 <= retry_after <= 60 and retry_after >= 25  # 2/min: the next slot is ~30 s away
        assert e.value.response.json()["error"]["code"] == "rate_limit_exceeded"


def test_tokens_per_minute_limit_reserves_max_tokens_and_refunds_the_unused(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path) as s:
        _, secret = s.service.store.create("tpm", rpm=100, tpm=300)
        c = OpenAI(base_url=s.url + "/v1", api_key=secret, max_retries=0)
        prompt = len(tok.encode_chat(QUESTION))
        r = c.chat.completions.create(model="qiusuo-test", messages=QUESTION, max_tokens=200)
        assert r.usage.total_tokens == prompt + len(SCRIPT)  # reserved prompt + 200, used prompt + 12
        with pytest.raises(openai.RateLimitError) as e:     # prompt + 280 > 300 − what the first one used
            c.chat.completions.create(model="qiusuo-test", messages=QUESTION, max_tokens=280)
        assert 1 <= int(e.value.response.headers["Retry-After"]) <= 60
        c.chat.completions.create(model="qiusuo-test", messages=QUESTION, max_tokens=200)  # fits: it was refunded


def test_full_queue_gives_503_and_a_waiting_stream_gets_keep_alives(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, **settings()) as s:
        running = Stream(s.url)
        running.read_content()                                     # A generates
        waiting = Stream(s.url)                                    # B waits in the queue …
        assert waiting.response.status_code == 200
        waiting.read_until(lambda line: line == ": keep-alive")    # … and is kept alive meanwhile
        assert (s.service.gate.running, s.service.gate.waiting) == (1, 1)
        with pytest.raises(openai.InternalServerError) as e:      # C: no room left
            OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                model="qiusuo-test", messages=QUESTION)
        assert e.value.status_code == 503 and 1 <= int(e.value.response.headers["Retry-After"]) <= 60
        assert e.value.response.json()["error"]["code"] == "overloaded"
        running.close()                                            # A leaves: B runs
        content = waiting.read_content()       # one token, or several when the loop fell behind
        waiting.close()
        assert content and set(content) <= set(LOOP)
        wait_for(lambda: idle(s.service), what="both requests to be cancelled")
        metrics = httpx.get(s.url + "/metrics").text
        assert 'qiusuo_requests_total{route="/v1/chat/completions",status="503"} 1.0' in metrics


def test_queue_timeout_gives_503_or_an_in_band_error_once_streaming(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, **settings(queue_timeout=0.2)) as s:
        running = Stream(s.url)
        running.read_content()
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="qiusuo-test", messages=QUESTION)
        assert e.value.status_code == 503 and e.value.response.json()["error"]["code"] == "queue_timeout"
        assert "Retry-After" in e.value.response.headers
        with pytest.raises(openai.APIError) as e:  # the stream's headers are out: the error comes as an event
            list(c.chat.completions.create(model="qiusuo-test", messages=QUESTION, stream=True))
        assert e.value.body["code"] == "queue_timeout"
        running.close()
        wait_for(lambda: idle(s.service), what="the running request to be cancelled")


def test_client_disconnect_cancels_a_stream_and_records_what_was_generated(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, **settings()) as s:
        stream = Stream(s.url)
        stream.read_content()
        stream.close()
        wait_for(lambda: idle(s.service), what="the generation to stop")
        rows = s.service.store.usage_rows()
        assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled"
        assert 0 < rows[0]["completion_tokens"] < LONG


def test_client_disconnect_cancels_a_non_streaming_request(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, **settings()) as s:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            httpx.post(s.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": LONG},
                       timeout=httpx.Timeout(30, read=0.3))
        wait_for(lambda: idle(s.service), what="the generation to stop")
        rows = s.service.store.usage_rows()
        assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled"
        assert 0 < rows[0]["completion_tokens"] < LONG


def test_a_generation_cancelled_before_it_first_runs_releases_everything(tok, looping, tmp_path):
    """`Service.start` hands an admitted job to the engine at once; when its task is cancelled before
    its first step (so `run`'s finally never runs), the gate slot, the key reservation and the engine
    request are released all the same."""
    import asyncio
    import json

    with serve(tok, looping, tmp_path, **settings()) as s:
        svc = s.service

        async def start_and_cancel():
            body = json.dumps({"messages": QUESTION, "stream": True, "max_tokens": LONG}).encode()
            job = await svc.prepare(svc.parse(body), None, None)
            task = svc.start(job, svc.admit(job))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return job

        job = asyncio.run_coroutine_threadsafe(start_and_cancel(), svc.scheduler._loop).result(10)
        assert not job.running
        wait_for(lambda: idle(svc), what="the slot and the engine row released")
        # and the server still serves
        assert OpenAI(base_url=s.url + "/v1", api_key="none").chat.completions.create(
            model="qiusuo-test", messages=QUESTION, max_tokens=5).choices[0].finish_reason == "length"
