"""Keys and ledger in a real SQLite file; token buckets on a fake clock; the concurrency gate."""
import asyncio
import sqlite3

import pytest

from qiusuo.cli import main
from qiusuo.serve.keys import KeyStore, Usage, hash_key
from qiusuo.serve.limits import Gate, KeyLimits, QueueFull, Refused, TokenBucket, retry_after_header


def test_keys_are_stored_hashed_and_authenticate(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    key, secret = store.create("alice", rpm=5, tpm=1000, balance=2.5)
    raw = sqlite3.connect(tmp_path / "k.sqlite").execute("SELECT * FROM keys").fetchall()
    assert secret not in repr(raw) and hash_key(secret) in repr(raw)
    assert store.authenticate(secret) == key
    assert (key.rpm, key.tpm, key.balance, key.spent) == (5, 1000, 2.5, 0.0)
    assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None  # wrong secret
    assert store.authenticate(f"qs-00000000-{secret.split('-', 2)[2]}") is None         # wrong id
    assert store.authenticate("sk-not-ours") is None


def test_revoked_key_no_longer_authenticates(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    key, secret = store.create("bob")
    assert store.revoke(key.id) and not store.revoke(key.id)
    assert store.authenticate(secret) is None
    assert store.get(key.id).revoked_at is not None


def test_ledger_rows_sum_to_spent_and_survive_reopening(tmp_path):
    store = KeyStore(tmp_path / "k.sqlite")
    key, _ = store.create("carol", balance=1.0)
    for i, (p, c, r) in enumerate([(10, 20, 5), (7, 3, 0)]):
        store.record(key.id, f"req{i}", "m", Usage(p, c, r, cost=(p + 2 * c) / 1e6), "stop", 1.0, 2.0)
    store.record(None, "anon", "m", Usage(1, 1, 0, cost=3e-6), "stop", 1.0, 2.0)
    store.close()
    again = KeyStore(tmp_path / "k.sqlite")
    totals = again.totals(key.id)
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"], totals["reasoning_tokens"]) \
        == (2, 17, 23, 5)
    assert totals["cost"] == pytest.approx(63e-6)
    assert again.get(key.id).spent == pytest.approx(totals["cost"])
    assert again.get(key.id).remaining == pytest.approx(1.0 - 63e-6)
    assert again.totals()["requests"] == 3


def test_keys_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "cli.sqlite")
    assert main(["keys", "create", "--name", "dave", "--rpm", "7", "--balance", "3", "--db", db]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    key = KeyStore(db).authenticate(secret)
    assert key is not None and key.rpm == 7 and key.balance == 3.0
    assert main(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert key.id in listing and "dave" in listing and "active" in listing
    assert main(["keys", "revoke", key.id, "--db", db]) == 0
    assert KeyStore(db).authenticate(secret) is None
    assert main(["keys", "revoke", key.id, "--db", db]) == 2  # already revoked: a clear error


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_token_bucket_refills_continuously_and_caps_at_one_minute():
    clock = Clock()
    b = TokenBucket(60, clock)  # 1 per second
    b.take(60)
    assert b.wait_time(1) == pytest.approx(1.0)
    clock.t = 0.5
    assert b.wait_time(1) == pytest.approx(0.5)
    clock.t = 1000
    assert b.wait_time(60) == 0 and b.level == 60  # never more than a minute's worth
    assert b.wait_time(500) == 0  # a request larger than the bucket waits for a full one, not forever


def admit(limits, key_id, rpm, tpm, tokens, max_concurrent=100, remaining=1.0):
    """Both admission steps; returns 0 when admitted, else the wait the refusal asked for."""
    try:
        hold = limits.enter(key_id, rpm, tpm, max_concurrent, remaining)
    except Refused as r:
        return r.retry_after
    try:
        limits.reserve(hold, rpm, tpm, tokens, 0.0, remaining)
    except Refused as r:
        hold.release()
        return r.retry_after
    return 0


def test_key_limits_requests_per_minute_then_retry_after():
    clock = Clock()
    limits = KeyLimits(clock)
    assert admit(limits, "k", rpm=2, tpm=10_000, tokens=10) == 0
    assert admit(limits, "k", rpm=2, tpm=10_000, tokens=10) == 0
    wait = admit(limits, "k", rpm=2, tpm=10_000, tokens=10)
    assert wait == pytest.approx(30.0)  # 2/min: one request every 30 s
    assert admit(limits, "other", rpm=2, tpm=10_000, tokens=10) == 0  # keys are independent
    clock.t = 30
    assert admit(limits, "k", rpm=2, tpm=10_000, tokens=10) == 0


def test_key_limits_tokens_per_minute_settle_gives_back_the_unused():
    clock = Clock()
    limits = KeyLimits(clock)
    first = limits.enter("k", 100, 600, 10, 1.0)
    limits.reserve(first, 100, 600, 500, 0.0, 1.0)
    assert admit(limits, "k", rpm=100, tpm=600, tokens=200) == pytest.approx(10.0)  # 100 missing at 10/s
    first.settle(100)  # the first request used 100 of its 500
    assert admit(limits, "k", rpm=100, tpm=600, tokens=200) == 0


def test_a_settled_reservation_never_gives_back_more_than_it_took():
    """The --tpm 300 bug: prompt + max_tokens 1024 took a full bucket (300), and settling gave back
    1024 + prompt − used, refilling the bucket: five such requests in a row all passed."""
    limits = KeyLimits(Clock())
    passed = 0
    for _ in range(5):
        try:
            hold = limits.enter("k", 100, 300, 10, 1.0)
            limits.reserve(hold, 100, 300, 20 + 1024, 0.0, 1.0)
        except Refused:
            hold.release()
            continue
        passed += 1
        hold.settle(20 + 9)   # used the prompt and 9 completion tokens
    assert passed == 1
    assert limits._buckets["k"][1].level == pytest.approx(300 - 29)


def test_a_request_that_used_more_than_it_took_leaves_a_debt():
    clock = Clock()
    limits = KeyLimits(clock)
    hold = limits.enter("k", 100, 300, 10, 1.0)
    limits.reserve(hold, 100, 300, 1000, 0.0, 1.0)   # took 300 (a full bucket)
    hold.settle(400)
    assert limits._buckets["k"][1].level == pytest.approx(-100)
    assert admit(limits, "k", rpm=100, tpm=300, tokens=10) == pytest.approx(22.0)  # 110 missing at 5/s


def test_a_refused_request_takes_nothing():
    clock = Clock()
    limits = KeyLimits(clock)
    admit(limits, "k", rpm=1, tpm=1000, tokens=10)
    assert admit(limits, "k", rpm=1, tpm=1000, tokens=10) > 0
    clock.t = 60
    assert admit(limits, "k", rpm=1, tpm=1000, tokens=990) == 0  # the refused one took no tokens
    assert limits.holds == 2 and limits.active("k") == 2


def test_concurrency_cap_and_balance_holds_per_key():
    limits = KeyLimits(Clock())
    a = limits.enter("k", 100, 10_000, 2, 1.0)
    limits.reserve(a, 100, 10_000, 10, 0.6, 1.0)
    b = limits.enter("k", 100, 10_000, 2, 1.0)
    with pytest.raises(Refused) as e:                       # a third at once: 429
        limits.enter("k", 100, 10_000, 2, 1.0)
    assert (e.value.status, e.value.code) == (429, "too_many_concurrent_requests")
    with pytest.raises(Refused) as e:                       # 0.6 of 1.0 is held: 0.5 more does not fit
        limits.reserve(b, 100, 10_000, 10, 0.5, 1.0)
    assert e.value.status == 402
    limits.reserve(b, 100, 10_000, 10, 0.4, 1.0)
    assert limits.held("k") == pytest.approx(1.0)
    a.settle(5)
    a.release()                                             # twice: no effect
    assert (limits.active("k"), limits.held("k"), limits.holds) == (1, pytest.approx(0.4), 1)
    b.release()
    assert (limits.active("k"), limits.held("k"), limits.holds) == (0, 0.0, 0)


def test_retry_after_header_is_whole_seconds_between_1_and_60():
    assert [retry_after_header(s) for s in (0.01, 1.2, 59.5, 3600)] == ["1", "2", "60", "60"]


def test_gate_runs_queues_refuses_and_hands_slots_over_in_order():
    async def scenario():
        gate = Gate(max_running=1, max_queue=2)
        a = gate.join()
        b, c = gate.join(), gate.join()
        with pytest.raises(QueueFull):
            gate.join()
        assert (gate.running, gate.waiting) == (1, 2)
        assert await gate.wait(a, 0.01) and not b.done()
        assert not await gate.wait(c, 0.01)  # times out in the queue…
        gate.leave(c)                        # …and leaves it
        gate.leave(a)                        # a finishes: b gets the slot
        assert await gate.wait(b, 0.01)
        assert (gate.running, gate.waiting) == (1, 0)
        gate.leave(b)
        assert (gate.running, gate.waiting) == (0, 0)

    asyncio.run(scenario())
