"""Limits that hold (issue 17, item 1): two-step admission, per-key concurrency, tokens/minute that a
settlement cannot refill, balances held at admission, cheap checks before any tokenisation, and
everything a request holds released on every path (refused, failed ledger write, failed submission,
disconnect)."""
import sqlite3
import threading

import httpx
import pytest

from qiusuo.cli import main
from qiusuo.serve.keys import KeyStore
from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import LOOP, idle, scripted_model, serve, wait_for
from test_serve_load import QUESTION as ENDLESS
from test_serve_load import Stream

QUESTION = [{"role": "user", "content": "What is 1+3?"}]
LONG = 8000


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


class CountingTokenizer(Tokenizer):
    """The tiny tokenizer, noting which thread renders each prompt."""

    threads: list

    def encode_chat(self, messages, add_generation_prompt=True):
        self.threads.append(threading.current_thread().name)
        return super().encode_chat(messages, add_generation_prompt)


@pytest.fixture(scope="module")
def counting(tok):
    t = CountingTokenizer(tok.backend, tok.config)
    t.threads = []
    return t


@pytest.fixture(scope="module")
def server(counting, tmp_path_factory):
    model = scripted_model(counting, LOOP, loop=True, context=8192)
    with serve(counting, model, tmp_path_factory.mktemp("limits"), max_tokens_limit=LONG, key_max_concurrent=2,
               max_body_bytes=200_000) as s:
        yield s


def post(server, secret, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {secret}"}, **kw)


def test_tpm_300_does_not_let_five_long_requests_through(server):
    """The bug of issue 17: five `max_tokens: 1024` requests on a --tpm 300 key all got 200."""
    _, secret = server.service.store.create("tpm", rpm=100, tpm=300)
    statuses = [post(server, secret, {"messages": QUESTION, "max_tokens": 1024, "stop": ["d"]}).status_code
                for _ in range(5)]
    assert statuses[0] == 200 and statuses[1:] == [429] * 4
    wait_for(lambda: idle(server.service), what="idle")


def test_per_key_concurrency_cap_and_its_override(server):
    _, secret = server.service.store.create("two", rpm=1000)     # the server's default: 2 at once
    headers = {"Authorization": f"Bearer {secret}"}
    streams = [Stream(server.url, headers=headers) for _ in range(2)]
    for s in streams:
        s.read_content()
    r = post(server, secret, {"messages": QUESTION, "max_tokens": 3})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_concurrent_requests"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    _, other = server.service.store.create("other", rpm=1000)
    assert post(server, other, {"messages": QUESTION, "max_tokens": 3}).status_code == 200  # keys are apart
    for s in streams:
        s.close()
    wait_for(lambda: idle(server.service), what="the streams to be released")
    assert post(server, secret, {"messages": QUESTION, "max_tokens": 3}).status_code == 200
    _, one = server.service.store.create("one", rpm=1000, max_concurrent=1)   # the key's own cap wins
    first = Stream(server.url, headers={"Authorization": f"Bearer {one}"})
    first.read_content()
    assert post(server, one, {"messages": QUESTION, "max_tokens": 3}).status_code == 429
    first.close()
    wait_for(lambda: idle(server.service), what="idle")


def test_balance_is_held_at_admission_so_it_never_goes_negative(server):
    svc = server.service
    one_max = svc._cost(len(svc.tok.encode_chat(ENDLESS)), 2000)
    key, secret = svc.store.create("poor", rpm=1000, balance=1.5 * one_max)
    headers = {"Authorization": f"Bearer {secret}"}
    running = Stream(server.url, max_tokens=2000, headers=headers)
    running.read_content()
    assert svc.limits.held(key.id) == pytest.approx(one_max)
    r = post(server, secret, {"messages": QUESTION, "max_tokens": 2000})   # its maximum does not fit what is left
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert post(server, secret, {"messages": QUESTION, "max_tokens": 3}).status_code == 200  # a small one does
    running.close()
    wait_for(lambda: idle(svc), what="idle")
    assert 0 < svc.store.get(key.id).spent < key.balance


def test_cheap_refusals_come_before_any_tokenisation(server, counting):
    svc = server.service
    _, secret = svc.store.create("rpm", rpm=1)
    assert post(server, secret, {"messages": QUESTION, "max_tokens": 2}).status_code == 200
    before = len(counting.threads)
    big = {"messages": [{"role": "user", "content": "x" * 150_000}]}
    assert post(server, secret, big).status_code == 429                   # the rate, before the body
    assert post(server, "qs-nobody-nothing", big).status_code == 401
    _, fresh = svc.store.create("fresh", rpm=1000)
    r = post(server, fresh, big)                                           # too long for any tokenisation
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    too_many = {"messages": QUESTION * 65}
    assert post(server, fresh, too_many).json()["error"]["code"] == "too_many_messages"
    huge = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    assert post(server, fresh, huge).status_code == 413
    assert len(counting.threads) == before                                 # none of them reached the tokenizer
    assert post(server, fresh, {"messages": QUESTION, "max_tokens": 2}).status_code == 200
    assert counting.threads[-1].startswith("qiusuo-prepare")               # off the event loop
    wait_for(lambda: idle(svc), what="idle")


@pytest.mark.parametrize("stop, ok", [(["x" * 64] * 16, True), (["x" * 65], False), ([""], False),
                                      (["a"] * 17, False)])
def test_stop_strings_are_few_and_short(server, stop, ok):
    _, secret = server.service.store.create("stops", rpm=1000)
    r = post(server, secret, {"messages": QUESTION, "max_tokens": 3, "stop": stop})
    assert r.status_code == (200 if ok else 422)
    if not ok:
        assert r.json()["error"]["param"] == "stop"


def test_a_failed_ledger_write_is_503_and_releases_everything(server, monkeypatch):
    svc = server.service
    key, secret = svc.store.create("ledger", rpm=1000)

    def locked(*a, **kw):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(svc.store, "record", locked)
    r = post(server, secret, {"messages": QUESTION, "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {secret}"},
                      json={"messages": QUESTION, "max_tokens": 3, "stream": True}) as s:
        text = s.read().decode()
    assert '"code": "ledger_unavailable"' in text                          # in band: the headers were out
    wait_for(lambda: idle(svc), what="everything released")
    monkeypatch.undo()
    assert svc.store.totals(key.id)["requests"] == 0
    assert post(server, secret, {"messages": QUESTION, "max_tokens": 3}).status_code == 200


def test_a_failed_submission_is_503_and_releases_everything(server, monkeypatch):
    svc = server.service
    _, secret = svc.store.create("submit", rpm=1000)

    def down(*a, **kw):
        raise RuntimeError("the engine process is not running")

    monkeypatch.setattr(svc.scheduler, "submit", down)
    for stream in (False, True):
        r = post(server, secret, {"messages": QUESTION, "max_tokens": 3, "stream": stream})
        assert r.status_code == (200 if stream else 503) and "overloaded" in r.text
    wait_for(lambda: idle(svc), what="everything released")
    monkeypatch.undo()
    assert post(server, secret, {"messages": QUESTION, "max_tokens": 3}).status_code == 200


def test_a_disconnect_releases_everything(server):
    svc = server.service
    key, secret = svc.store.create("leaver", rpm=1000)
    s = Stream(server.url, headers={"Authorization": f"Bearer {secret}"})
    s.read_content()
    assert svc.limits.active(key.id) == 1 and svc.limits.holds >= 1
    s.close()
    wait_for(lambda: idle(svc), what="everything released")
    rows = svc.store.usage_rows(key.id)
    assert len(rows) == 1 and rows[0]["finish_reason"] == "cancelled" and rows[0]["completion_tokens"] > 0


def test_keys_create_max_concurrent_and_an_old_database_is_migrated(tmp_path, capsys):
    db = tmp_path / "old.sqlite"
    old = sqlite3.connect(db)   # the keys table as qiusuo wrote it before max_concurrent existed
    old.executescript("""CREATE TABLE keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL,
        created_at REAL NOT NULL, revoked_at REAL, rpm INTEGER NOT NULL, tpm INTEGER NOT NULL,
        balance REAL NOT NULL, spent REAL NOT NULL DEFAULT 0);
        INSERT INTO keys VALUES ('abcd1234', 'old', 'x', 0, NULL, 60, 1000, 1.0, 0.25);""")
    old.commit()
    old.close()
    assert main(["keys", "create", "--name", "eve", "--max-concurrent", "3", "--db", str(db)]) == 0
    assert "3 at once" in capsys.readouterr().out
    store = KeyStore(db)
    keys = {k.name: k for k in store.list()}
    assert keys["old"].max_concurrent is None and keys["old"].spent == 0.25   # kept, with the server default
    assert keys["eve"].max_concurrent == 3
    with pytest.raises(ValueError):
        store.create("bad", max_concurrent=0)
