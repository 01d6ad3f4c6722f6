"""Honest billing (issue 17, item 4): one ledger row per request that reached the model, with its
status (stop, length, cancelled, error) and what it consumed — the prompt too when the client left
during prefill; an engine crash ends a request as `error` with its usage sent to the client; the
ledger's totals equal what clients were told; old rows are pruned; the /metrics gauges of what
requests hold return to idle."""
import json
import os
import signal
import threading
import time

import httpx
import pytest

from qiusuo.serve.keys import KeyStore, Usage
from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import LOOP, SCRIPT, idle, scripted_model, serve, wait_for
from test_serve_load import Stream

Q = [{"role": "user", "content": "What is 1+3?"}]
PRICES = dict(price_prompt=1.0, price_completion=4.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


@pytest.fixture(scope="module")
def looping(tok):
    return scripted_model(tok, LOOP, loop=True, context=8192)


def chat(url, secret=None, **body):
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(url + "/v1/chat/completions", json={"messages": Q, **body}, headers=headers, timeout=60)


def sse(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_one_row_per_request_with_its_status_and_totals_equal_what_clients_were_told(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, engine_process=False, **PRICES) as s:
        key, secret = s.service.store.create("bill", rpm=1000)
        told = [chat(s.url, secret).json()["usage"], chat(s.url, secret, max_tokens=4).json()["usage"]]
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {secret}"},
                          json={"messages": Q, "stream": True, "stream_options": {"include_usage": True}}) as r:
            told.append(sse(r.read().decode())[-1]["usage"])
        assert chat(s.url, secret, temperature=9).status_code == 422          # refused: never reached the model
        assert chat(s.url, "qs-x-y").status_code == 401
        wait_for(lambda: idle(s.service), what="idle")
        rows = s.service.store.usage_rows(key.id)
        assert [r["finish_reason"] for r in rows] == ["stop", "length", "stop"]
        totals = s.service.store.totals(key.id)
        assert (totals["prompt_tokens"], totals["completion_tokens"]) == \
            (sum(u["prompt_tokens"] for u in told), sum(u["completion_tokens"] for u in told))
        cost = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 4.0 for u in told) / 1e6
        assert totals["cost"] == pytest.approx(cost) and s.service.store.get(key.id).spent == pytest.approx(cost)


def test_a_client_that_leaves_during_prefill_pays_for_the_prompt(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, no_auth=True, engine_process=False, max_tokens_limit=8000) as s:
        svc = s.service
        batch = svc.scheduler._batch
        admit, entered, go = batch.admit, threading.Event(), threading.Event()

        def slow_prefill(prompts, rows):
            entered.set()
            go.wait(30)
            return admit(prompts, rows)

        batch.admit = slow_prefill
        stream = Stream(s.url, max_tokens=50)
        assert entered.wait(30)
        stream.close()                                        # gone while the prompt is being prefilled
        wait_for(lambda: svc.unsettled, what="the bill to wait for the engine's word")
        go.set()
        wait_for(lambda: idle(svc), what="idle")
        batch.admit = admit
        rows = svc.store.usage_rows()
        from test_serve_load import QUESTION
        assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled"
        assert rows[0]["prompt_tokens"] == len(tok.encode_chat(QUESTION)) and rows[0]["completion_tokens"] == 0


def test_a_request_cancelled_before_the_model_saw_it_is_not_billed(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, no_auth=True, max_concurrent=1, max_queue=2, max_tokens_limit=8000,
               keepalive_interval=0.05) as s:
        first = Stream(s.url)
        first.read_content()
        waiting = Stream(s.url)
        waiting.read_until(lambda line: line == ": keep-alive")   # queued behind the first
        waiting.close()
        first.close()
        wait_for(lambda: idle(s.service), what="idle")
        rows = s.service.store.usage_rows()
        assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled" and rows[0]["completion_tokens"] > 0


def _kill_engine(svc):
    wait_for(lambda: svc.scheduler.running == 1, timeout=60, what="the request to run")
    time.sleep(0.3)
    os.kill(svc.scheduler._proc.pid, signal.SIGKILL)


@pytest.mark.slow  # kills the engine process and waits for a new one
def test_an_engine_crash_ends_the_request_as_error_with_its_usage(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, max_tokens_limit=8000, **PRICES) as s:
        svc = s.service
        key, secret = svc.store.create("crash", rpm=1000)
        killer = threading.Thread(target=_kill_engine, args=(svc,))
        killer.start()
        r = chat(s.url, secret, max_tokens=8000)
        killer.join()
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error" and "Retry-After" in r.headers
        told = [r.json()["usage"]]
        assert told[0]["completion_tokens"] > 0
        wait_for(lambda: svc.scheduler.error is None and svc.scheduler.restarts == 1, timeout=120,
                 what="a new engine process")
        killer = threading.Thread(target=_kill_engine, args=(svc,))
        killer.start()
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {secret}"}, json={"messages": Q, "max_tokens": 8000, "stream": True}) as resp:
            events = sse(resp.read().decode())
        killer.join()
        assert [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][-1] == "error"
        assert events[-2]["usage"]["completion_tokens"] > 0 and events[-1]["error"]["code"] == "engine_error"
        told.append(events[-2]["usage"])
        wait_for(lambda: svc.scheduler.error is None and svc.scheduler.restarts == 2, timeout=120,
                 what="a new engine process")   # (not left starting while the server shuts down)
        wait_for(lambda: idle(svc), timeout=60, what="idle")
        rows = svc.store.usage_rows(key.id)
        assert [r["finish_reason"] for r in rows] == ["error", "error"]
        assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == \
            [(u["prompt_tokens"], u["completion_tokens"]) for u in told]


@pytest.mark.parametrize("failure", ["database is locked", "database or disk is full"])
def test_an_unwritable_ledger_is_503_with_retry_after(tok, tmp_path, failure, monkeypatch):
    import sqlite3
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, engine_process=False) as s:
        svc = s.service
        _, secret = svc.store.create("x", rpm=1000)

        def fail(*a, **kw):
            raise sqlite3.OperationalError(failure)

        monkeypatch.setattr(svc.store, "record", fail)
        r = chat(s.url, secret)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        wait_for(lambda: idle(svc), what="idle")


def test_a_locked_database_does_not_stall_the_server(tok, tmp_path):
    import sqlite3
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, engine_process=False, db_busy_timeout=0.1) as s:
        _, secret = s.service.store.create("x", rpm=1000)
        other = sqlite3.connect(s.service.store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")                   # another process holds the file
        try:
            started = time.monotonic()
            r = chat(s.url, secret)
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
            assert time.monotonic() - started < 5
            assert httpx.get(s.url + "/health", timeout=5).status_code == 200
        finally:
            other.execute("ROLLBACK")
            other.close()
        wait_for(lambda: idle(s.service), what="idle")
        assert chat(s.url, secret).status_code == 200


def test_ledger_retention_prunes_old_rows_but_not_balances(tok, tmp_path):
    db = tmp_path / "serve.sqlite"
    store = KeyStore(db)
    key, _ = store.create("old", balance=1.0)
    now = time.time()
    for age_days in (40, 10, 0):
        store.record(key.id, f"r{age_days}", "m", Usage(1, 1, 0, 0.01), "stop",
                     started_at=now - age_days * 86400, finished_at=now - age_days * 86400)
    store.close()
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, engine_process=False, ledger_retention_days=30) as s:
        wait_for(lambda: len(s.service.store.usage_rows()) == 2, what="the old row to be pruned")
        assert [r["request_id"] for r in s.service.store.usage_rows()] == ["r10", "r0"]
        assert s.service.store.get(key.id).spent == pytest.approx(0.03)


def test_metrics_show_what_requests_hold_and_return_to_idle(tok, looping, tmp_path):
    with serve(tok, looping, tmp_path, no_auth=True, engine_process=False, max_tokens_limit=8000) as s:
        stream = Stream(s.url)
        stream.read_content()

        def gauges():
            text = httpx.get(s.url + "/metrics").text
            return {n: float(line.split()[-1]) for line in text.splitlines() for n in
                    ("qiusuo_active_slots", "qiusuo_engine_sequences", "qiusuo_reservations", "qiusuo_preparing",
                     "qiusuo_unsettled", "qiusuo_key_requests_in_flight") if line.startswith(n + " ")}

        busy = gauges()
        assert busy["qiusuo_active_slots"] == 1 and busy["qiusuo_engine_sequences"] == 1
        stream.close()
        wait_for(lambda: idle(s.service), what="idle")
        assert set(gauges().values()) == {0.0} and len(gauges()) == 6


@pytest.mark.slow  # kills the engine process and waits for a new one
def test_requests_in_the_engine_queue_are_not_billed(tok, looping, tmp_path):
    """The engine process says whether it prefilled a prompt: a request that its scheduler still held
    in its queue (here: no room in the KV-cache budget) when the client left, or when the engine
    died, has no ledger row."""
    with serve(tok, looping, tmp_path, no_auth=True, max_tokens_limit=8000, max_cache_tokens=9000) as s:
        svc = s.service
        first = Stream(s.url)
        first.read_content()
        second = Stream(s.url)                                 # let in by the gate, waits in the engine
        wait_for(lambda: svc.scheduler.queue_depth == 1, what="the second to wait in the engine")
        second.close()
        wait_for(lambda: svc.scheduler.queue_depth == 0 and not svc.unsettled, timeout=30,
                 what="the engine to end the second")
        # a third waits in the engine's queue when the engine dies: 503, and no bill
        third = {}
        waiter = threading.Thread(target=lambda: third.update(r=chat(s.url, max_tokens=8000)))
        waiter.start()
        wait_for(lambda: svc.scheduler.queue_depth == 1, what="the third to wait in the engine")
        os.kill(svc.scheduler._proc.pid, signal.SIGKILL)
        waiter.join(60)
        r = third["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error" and "usage" not in r.json()
        first.read_until(lambda line: '"finish_reason": "error"' in line)   # the running one: error, billed
        first.close()
        wait_for(lambda: svc.scheduler.error is None and svc.scheduler.restarts == 1, timeout=120,
                 what="a new engine process")
        wait_for(lambda: idle(svc), what="idle")
        rows = svc.store.usage_rows()
        assert [r["finish_reason"] for r in rows] == ["error"] and rows[0]["completion_tokens"] > 0
