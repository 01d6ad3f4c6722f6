"""The scheduler in a child process (`qiusuo serve`'s default): the same tokens as in process,
cancellation, refusals, and a crashed engine process replaced without losing the server."""
import asyncio
import os
import signal

import pytest

from qiusuo.engine import Engine, SamplingParams
from qiusuo.serve.scheduler import QueueFull
from qiusuo.model import save_model
from qiusuo.serve.engine_process import EngineProcess

PROMPTS = ["12*7", "4821+397", "reach 46 with 3 7 25 2"]
# the random test model never ends a greedy completion of these prompts by itself (checked below)
ENDLESS = SamplingParams(max_new_tokens=450, temperature=0.0, stop_token_ids=())


def _alone(engine, prompt, params):
    return list(engine.stream(prompt, params))


def run(coro_fn, ep: EngineProcess):
    """Start `ep` inside a fresh event loop, run `coro_fn()`, always stop `ep`."""
    async def main():
        ep.start()
        try:
            return await coro_fn()
        finally:
            ep.stop()

    return asyncio.run(main())


@pytest.fixture
def engine(tok, model):
    return Engine(model, tok)


def test_tokens_equal_the_in_process_engine(tok, model, engine):
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=7 + i) for i in range(3)]
    ep = EngineProcess(model=model, tokenizer=tok, max_len=128)

    async def go():
        reqs = [ep.submit(p, sp) for p, sp in zip(prompts, params)]
        outs = [[t async for t in r] for r in reqs]
        return reqs, outs, (ep.running, ep.queue_depth)

    reqs, outs, counts = run(go, ep)
    for p, sp, out, r in zip(prompts, params, outs, reqs):
        assert out == _alone(engine, p, sp) == r.output_ids
        assert r.finish_reason in ("stop", "length") and r.started and r.first_token_at is not None
    assert counts == (0, 0)


def test_checkpoint_is_loaded_by_the_child(tok, model, engine, tmp_path):
    save_model(model, tmp_path)
    tok.save(tmp_path)
    p, sp = tok.prompt_ids("77+77"), SamplingParams(max_new_tokens=10, seed=3)
    ep = EngineProcess(checkpoint=str(tmp_path), max_len=128)

    async def go():
        return [t async for t in ep.submit(p, sp)]

    assert run(go, ep) == _alone(engine, p, sp)


def test_cancel_stops_generation_in_the_child(tok, model):
    ep = EngineProcess(model=model, tokenizer=tok, max_len=512)
    params = ENDLESS

    async def go():
        req = ep.submit(tok.prompt_ids("12*7"), params)
        seen = []
        async for tokens in req.batches():
            seen += tokens
            if len(seen) >= 3 and not req.cancelled:
                req.cancel()
        return req, seen

    req, seen = run(go, ep)
    assert len(_alone(Engine(model, tok), tok.prompt_ids("12*7"), ENDLESS)) == 450
    assert req.finish_reason == "cancelled"
    assert 3 <= len(seen) < 450


def test_refusals_happen_in_the_server_process(tok, model):
    ep = EngineProcess(model=model, tokenizer=tok, max_len=64, max_running=1, max_queue=1)
    long = SamplingParams(max_new_tokens=60, seed=0, stop_token_ids=())

    async def go():
        with pytest.raises(ValueError, match="does not fit"):
            ep.submit([5] * 64, long)
        with pytest.raises(ValueError, match="empty"):
            ep.submit([], long)
        a, b = ep.submit([5, 6], long), ep.submit([5, 6], long)
        with pytest.raises(QueueFull):
            ep.submit([5, 6], long)
        a.cancel()
        b.cancel()
        for r in (a, b):
            async for _ in r.batches():
                pass
        return ep.submit([5, 6], SamplingParams(max_new_tokens=2, seed=0))   # room again

    req = run(go, ep)
    assert req.finish_reason == "cancelled"  # stopped with the engine, not lost


def test_a_killed_engine_process_fails_its_requests_and_is_replaced(tok, model, engine):
    ep = EngineProcess(model=model, tokenizer=tok, max_len=512)
    p = tok.prompt_ids("12*7")
    short = SamplingParams(max_new_tokens=8, seed=2)

    async def go():
        req = ep.submit(p, ENDLESS)
        async for _ in req.batches():
            if ep._proc is not None and ep._proc.is_alive():
                os.kill(ep._proc.pid, signal.SIGKILL)
        assert req.finish_reason == "error" and ep.error is not None
        assert 0 < len(req.output_ids) < 450
        after = ep.submit(p, short)          # waits for the new child
        out = [t async for t in after]
        return out, after.finish_reason, ep.restarts, ep.error

    out, reason, restarts, error = run(go, ep)
    assert out == _alone(engine, p, short) and reason in ("stop", "length")
    assert restarts == 1 and error is None


def test_server_survives_its_engine_process_dying(tok, model, tmp_path):
    """Through HTTP: kill the engine process; /health says so (503) until the new one is up, and the
    server answers chat requests again without a restart of its own."""
    import httpx
    from test_serve_helpers import serve, wait_for

    with serve(tok, model, tmp_path, no_auth=True) as live:
        body = {"messages": [{"role": "user", "content": "12*7"}], "max_tokens": 5}
        assert httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        ep = live.service.scheduler
        assert isinstance(ep, EngineProcess)
        os.kill(ep._proc.pid, signal.SIGKILL)
        wait_for(lambda: ep.restarts == 1, what="the engine process to be noticed dead")
        health = httpx.get(live.url + "/health", timeout=10)
        # the restart may already be done on a fast machine; otherwise the server says it is not healthy
        assert health.status_code == 200 or (health.status_code == 503 and health.json()["status"] == "error")
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)  # waits for the new engine
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
