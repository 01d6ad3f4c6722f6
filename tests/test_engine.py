"""The engine: greedy equals transformers, batching and seeds don't change a row's tokens, stops work."""
import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from qiusuo.engine import DecodeBatch, Engine, NativeDecoder, SamplingParams, TorchDecoder, sample_next, uniform
from qiusuo.model import save_model

PROMPTS = ["4821+397", "reach 46 with 3 7 25 2", "12*7", "9"]


@pytest.fixture
def engine(model, tok):
    return Engine(model, tok)


@pytest.mark.parametrize("decoder", [NativeDecoder, TorchDecoder], ids=["native", "torch"])
@pytest.mark.parametrize("kind", ["tiny", "bpe"])
def test_greedy_matches_transformers_generate(tmp_path, model, tok, decoder, kind):
    """Both decoders give `transformers.generate`'s greedy tokens, for a batch of prompts of different
    lengths (each row decoded alongside the others), on the char-level model and a Qwen2.5-style
    checkpoint with a BPE vocabulary and q/k/v bias."""
    from hf_fixtures import qwen25_checkpoint
    from qiusuo.model import load_model
    from qiusuo.tokenizer import Tokenizer

    if kind == "tiny":
        save_model(model, tmp_path)
    else:
        qwen25_checkpoint(tmp_path, dims=dict(hidden_size=64, intermediate_size=128))
        model, tok = load_model(tmp_path).eval(), Tokenizer.load(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = Engine(model, None, decoder=decoder).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    for p, c in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        assert ref[0, len(p):].tolist() == c.token_ids


def test_batch_of_different_lengths_equals_each_row_alone(tok, engine):
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=30, seed=11)
    batched = engine.generate(prompts, params, n=3)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=30,
                                                    seed=11 + 3 * i), n=3)
        assert [c.token_ids for c in alone] == [c.token_ids for c in batched[3 * i:3 * i + 3]]


def test_same_seed_same_tokens_and_different_seed_differs(tok, engine):
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    a = engine.generate(prompts, SamplingParams(max_new_tokens=40, seed=3), n=2)
    b = engine.generate(prompts, SamplingParams(max_new_tokens=40, seed=3), n=2)
    c = engine.generate(prompts, SamplingParams(max_new_tokens=40, seed=4), n=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # the G samples of a group are different draws from one prefilled prompt
    assert a[0].token_ids != a[1].token_ids


def test_max_new_tokens_and_stop_token(tok, engine):
    p = tok.prompt_ids("12+34")
    out = engine.generate([p], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    # make the greedy first token a stop token: the row ends right there with reason "stop"
    first = out.token_ids[0]
    out = engine.generate([p], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(first,)))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.text == ""


def test_stop_string_cuts_text(tok, engine):
    p = tok.prompt_ids("12+34")
    full = engine.generate([p], SamplingParams(max_new_tokens=20, temperature=0))[0]
    stop = full.text[3:5]
    out = engine.generate([p], SamplingParams(max_new_tokens=20, temperature=0, stop_strings=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_stream_yields_the_same_tokens(tok, engine):
    p = tok.prompt_ids("4821+397")
    params = SamplingParams(max_new_tokens=25, seed=9)
    stops = set(tok.stop_ids)
    expected = [t for t in engine.generate([p], params)[0].token_ids if t not in stops]
    assert list(engine.stream(p, params)) == expected


def test_finished_rows_leave_the_batch(tok, model):
    """Rows that stop early must not keep the batch at full width: count rows per decode call."""
    widths = []
    from qiusuo.engine import DecodeBatch

    original = DecodeBatch.step
    DecodeBatch.step = lambda self: (widths.append(len(self.rows)), original(self))[1]
    try:
        eng = Engine(model, tok)
        prompts = [tok.prompt_ids("1+1")] * 8
        params = SamplingParams(max_new_tokens=30, temperature=1.5, seed=0,
                                stop_token_ids=tuple(range(40, 80)))  # many stop ids: rows end early
        out = eng.generate(prompts, params)
    finally:
        DecodeBatch.step = original
    lengths = sorted(len(c.token_ids) for c in out)
    assert lengths[0] < lengths[-1]
    assert max(widths) <= 8 and min(widths) < 8  # the batch shrank once rows finished


def _sample(logits, temperature=1.0, top_p=1.0, top_k=0, seed=0):
    B = logits.shape[0]
    u = uniform(torch.full((B,), seed), torch.arange(B))
    return sample_next(logits, torch.full((B,), temperature), torch.full((B,), top_p), torch.full((B,), top_k), u)


def test_uniform_streams_are_uniform_and_independent_of_the_batch():
    keys = torch.arange(5000) * 7919
    u = uniform(keys, torch.zeros(5000, dtype=torch.long))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02 and abs(u.std() - 0.2887) < 0.02
    # a row's draw is a function of (key, counter) alone
    assert uniform(keys[7:8], torch.tensor([3])).item() == uniform(keys, torch.full((5000,), 3))[7].item()
    assert uniform(keys[:1], torch.tensor([0])).item() != uniform(keys[:1], torch.tensor([1])).item()


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    for seed in range(20):
        assert _sample(logits, top_k=1, seed=seed).item() == 1
        # top_p small enough keeps only the most likely token
        assert _sample(logits, top_p=0.1, seed=seed).item() == 1
        # top_k=2 never picks outside the two best
        assert _sample(logits, top_k=2, seed=seed).item() in (1, 3)
    # temperature 0 is argmax, row by row, whatever the other rows do
    two = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    t = sample_next(two, torch.tensor([0.0, 1.0]), torch.ones(2), torch.tensor([0, 1]), torch.tensor([0.3, 0.9]))
    assert t.tolist() == [1, 0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    counts = torch.bincount(_sample(logits), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    # top-p 0.7 keeps {0.5, 0.3} renormalised to 5/8, 3/8
    counts = torch.bincount(_sample(logits, top_p=0.7), minlength=3).float() / 4000
    assert counts[2] == 0 and abs(counts[0] - 0.625) < 0.03


def test_bad_params_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


# --- continuous batching ----------------------------------------------------------------------------

from qiusuo.serve.scheduler import QueueFull, Scheduler  # noqa: E402


def _alone(engine, prompt, params):
    return list(engine.stream(prompt, params))


def test_scheduler_gives_each_request_its_solo_tokens(tok, model, engine):
    prompts = [tok.prompt_ids(p) for p in PROMPTS * 3]
    params = [SamplingParams(max_new_tokens=10 + 3 * i, temperature=0.9, top_p=0.95, seed=100 + i)
              for i in range(len(prompts))]
    widths = []
    from qiusuo.engine import DecodeBatch

    original = DecodeBatch.sample      # the scheduler's step: sample, hand the tokens over, forward
    DecodeBatch.sample = lambda self: (widths.append(len(self.rows)), original(self))[1]
    sched = Scheduler(Engine(model, tok), max_running=5).start()
    try:
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts[:6], params[:6])]
        got = [list(r) for r in reqs[:2]]          # first two finish while the rest still run
        reqs += [sched.submit(p, sp) for p, sp in zip(prompts[6:], params[6:])]  # join mid-way
        got += [list(r) for r in reqs[2:]]
    finally:
        sched.stop()
        DecodeBatch.sample = original
    assert max(widths) <= 5          # never more running sequences than the cap
    for p, sp, tokens, r in zip(prompts, params, got, reqs):
        assert tokens == _alone(engine, p, sp)
        assert r.finish_reason in ("stop", "length") and r.first_token_at >= r.submitted_at


def test_scheduler_respects_cache_budget_and_queue_cap(tok, model):
    sched = Scheduler(Engine(model, tok), max_running=8, max_queue=2, max_cache_tokens=60)
    params = SamplingParams(max_new_tokens=40, seed=1)
    p = tok.prompt_ids("1+1")
    reqs = [sched.submit(p, params), sched.submit(p, params)]
    with pytest.raises(QueueFull):
        sched.submit(p, params)
    assert sched.queue_depth == 2
    sched.start()
    try:
        # each request reserves len(p)+40 > 30 positions: only one runs at a time under a 60 budget
        for r in reqs:
            list(r)
    finally:
        sched.stop()
    first, second = reqs
    assert second.first_token_at >= first.finished_at or second.submitted_at > first.finished_at


def test_scheduler_cancel_stops_generation(tok, model, monkeypatch):
    # The row can end only by the cancel or at 400 tokens: no end-of-text stop (the random model
    # samples one sooner or later), and steps slowed to 1 ms, so the consuming thread cannot fall
    # hundreds of tokens behind the scheduler's (the engine is fast enough for that on a loaded host).
    sample = DecodeBatch.sample
    monkeypatch.setattr(DecodeBatch, "sample", lambda self: (time.sleep(0.001), sample(self))[1])
    sched = Scheduler(Engine(model, None, eos_ids=())).start()
    try:
        req = sched.submit(tok.prompt_ids("1+1"), SamplingParams(max_new_tokens=400, temperature=1.0, seed=0,
                                                                 stop_token_ids=()))
        seen, at_cancel = [], None
        for t in req:
            seen.append(t)
            if len(seen) == 3:
                req.cancel()
                # what the scheduler had produced once the cancel was set (read before cancelling, the
                # scheduler thread could run two steps in between: a flaky bound)
                at_cancel = len(req.output_ids)
        assert req.finish_reason == "cancelled"
        # at most the step already in flight finishes; nothing is generated after it
        assert len(req.output_ids) <= at_cancel + 1 < 400
    finally:
        sched.stop()


def test_scheduler_async_iteration(tok, model, engine):
    import asyncio

    p = tok.prompt_ids("12*7")
    params = SamplingParams(max_new_tokens=12, seed=5)
    sched = Scheduler(Engine(model, tok)).start()

    async def go():
        reqs = [sched.submit(p, params) for _ in range(3)]
        return [[t async for t in r] for r in reqs]

    try:
        outs = asyncio.run(go())
    finally:
        sched.stop()
    assert outs[0] == outs[1] == outs[2] == _alone(engine, p, params)


def test_busy_scheduler_hands_tokens_over_in_batches_without_losing_any(tok, model, engine):
    """With more streams running than `coalesce_above`, async consumers get several tokens per wake-up
    (the server's stream interval) — the same tokens, in order — while first tokens are not held."""
    import asyncio

    prompts = [tok.prompt_ids(p) for p in PROMPTS * 2]
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=40 + i, stop_token_ids=()) for i in range(8)]
    sched = Scheduler(Engine(model, tok), stream_interval=0.05, coalesce_above=2).start()

    async def go():
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs:
            # what the scheduler hands over, item by item: a consumer that wakes late merges the items
            # waiting in its queue, so its first batch can hold more than the first hand-over did
            # (the loop runs no hand-over before this coroutine first awaits)
            r.items, put = [], r._async.put_nowait
            r._async.put_nowait = lambda item, r=r, put=put: (r.items.append(item), put(item))

        async def consume(r):
            return [batch async for batch in r.batches()]

        return reqs, await asyncio.gather(*(consume(r) for r in reqs))

    try:
        reqs, batches = asyncio.run(go())
    finally:
        sched.stop()
    for p, sp, got in zip(prompts, params, batches):
        assert [t for b in got for t in b] == _alone(engine, p, sp)
    assert max(len(b) for got in batches for b in got) > 1            # tokens were coalesced
    assert max(len(tokens) for r in reqs for tokens, _ in r.items) > 1  # … by the hand-overs themselves
    for r in reqs:                                                     # a first token travels alone
        assert [len(tokens) for tokens, _ in r.items if tokens][0] == 1
    assert all(r.finish_reason in ("stop", "length") for r in reqs)


def test_scheduler_without_the_kernel_gives_the_same_tokens(tok, model, engine, monkeypatch):
    """The PyTorch path of DecodeBatch (GPU, no compiler) joins, compacts and samples like the C path."""
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=8 + 5 * i, temperature=0.9, top_p=0.9, seed=7 + i) for i in range(4)]
    expected = [_alone(engine, p, sp) for p, sp in zip(prompts, params)]
    monkeypatch.setenv("QIUSUO_NATIVE", "0")
    sched = Scheduler(Engine(model, tok), max_running=2).start()
    try:
        assert isinstance(sched._batch.decoder, TorchDecoder)
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
        got = [list(r) for r in reqs]
    finally:
        sched.stop()
    assert got == expected


def test_scheduler_error_finishes_every_request(tok, model):
    """If a step raises, waiting and running requests end with reason "error" instead of hanging."""
    from qiusuo.engine import DecodeBatch

    original = DecodeBatch.forward

    def broken(self, *a):
        raise RuntimeError("boom")

    DecodeBatch.forward = broken
    sched = Scheduler(Engine(model, tok))
    try:
        reqs = [sched.submit(tok.prompt_ids("1+1"), SamplingParams(max_new_tokens=20, seed=i)) for i in range(3)]
        sched.start()
        for r in reqs:
            list(r)
        sched._thread.join()
    finally:
        DecodeBatch.forward = original
    assert all(r.finish_reason == "error" for r in reqs)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        sched.submit(tok.prompt_ids("1+1"), SamplingParams())


def test_finished_batches_give_their_cache_to_the_next_and_results_do_not_change(tok, model):
    """A fresh cache costs a page fault per page on first touch, so the C step's caches are reused.
    A reused cache holds the last batch's keys and values: each row must only ever read positions it
    wrote itself, so the tokens equal a fresh engine's."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    engine, fresh = Engine(model, tok), Engine(model, tok)
    if engine.decoder_type is not NativeDecoder:
        pytest.skip("needs the C kernel")

    def ptrs():
        return [c.kv.data_ptr() for c in engine._spare]

    long = [tok.prompt_ids("reach 100 with 5 5 4 and 3 more " * 2), tok.prompt_ids("90817-3349")]
    engine.generate(long, params, n=4)                       # 8 rows, dirty up to a long prompt's end
    assert len(ptrs()) == 1
    spare = ptrs()[0]
    short = [tok.prompt_ids(p) for p in PROMPTS]             # other, shorter prompts in those rows
    got = engine.generate(short, params, n=2)
    assert ptrs() == [spare]                                  # the same buffer, taken and given back
    assert [c.token_ids for c in got] == [c.token_ids for c in fresh.generate(short, params, n=2)]

    stream = engine.stream(short[0], params)                 # a stream stopped early gives it back too
    next(stream)
    assert ptrs() == []
    stream.close()
    assert ptrs() == [spare]

    first = Scheduler(engine, max_running=4).start()         # a stopped scheduler's cache goes to the next
    try:
        [list(first.submit(p, params)) for p in short]
    finally:
        first.stop()
    assert first._batch.decoder.cache is None and len(ptrs()) == 2
    kept = ptrs()[-1]
    second = Scheduler(engine, max_running=4).start()
    try:
        got = [list(second.submit(p, params)) for p in short]
        assert second._batch.decoder.cache.kv.data_ptr() == kept
    finally:
        second.stop()
    assert got == [_alone(fresh, p, params) for p in short]

    # bounded by bytes: the most recent caches are kept; one over the budget by itself is not, and
    # does not push the others out
    engine._spare.clear()
    caches = [model.new_cache(1, 64, zeroed=False) for _ in range(3)]
    engine.SPARE_BYTES = 2 * caches[0].kv.numel() * 4
    for c in caches:
        engine._give_back(c)
    assert ptrs() == [c.kv.data_ptr() for c in caches[1:]]
    engine._give_back(model.new_cache(8, 64, zeroed=False))
    assert ptrs() == [c.kv.data_ptr() for c in caches[1:]]


def test_caches_without_the_kernel_are_not_reused(tok, model, monkeypatch):
    # the PyTorch step masks rather than skips positions past a row: its caches must start zeroed
    monkeypatch.setenv("QIUSUO_NATIVE", "0")
    from qiusuo import native
    monkeypatch.setattr(native, "_loaded", {})
    engine = Engine(model, tok)
    engine.generate([tok.prompt_ids(PROMPTS[0])], SamplingParams(max_new_tokens=4, seed=1))
    assert engine._spare == []


def test_a_restarted_scheduler_does_not_run_requests_cancelled_at_stop(tok, model):
    # No tokenizer, so no stop ids: a request cannot end on its own before `stop` runs.
    sched = Scheduler(Engine(model), max_running=1).start()
    params = SamplingParams(max_new_tokens=400, seed=1)
    running = sched.submit(tok.prompt_ids(PROMPTS[0]), params)
    waiting = sched.submit(tok.prompt_ids(PROMPTS[1]), params)
    sched.stop()
    assert running.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    sched.start()
    try:
        done = sched.submit(tok.prompt_ids(PROMPTS[2]), SamplingParams(max_new_tokens=5, seed=2))
        list(done)
    finally:
        sched.stop()
    assert done.finish_reason in ("stop", "length")
    assert not waiting.started and waiting.output_ids == []


@pytest.mark.parametrize("vector_rows", [1, 10**6])
def test_rows_end_alike_when_checked_on_arrays_or_row_by_row(tok, model, engine, monkeypatch, vector_rows):
    """From `DecodeBatch.VECTOR_ROWS` rows on, a step looks for ended rows on numpy arrays; stop
    ids, stop strings and limits must end each row where it ends alone."""
    from dataclasses import replace

    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    free = SamplingParams(max_new_tokens=25, temperature=1.2, seed=3, stop_token_ids=())
    probe = Engine(model, tok, eos_ids=()).generate(prompts, free, n=3)
    stop_id = probe[1].token_ids[4]           # ends some rows early and leaves others to run out
    stop_text = tok.decode(probe[4].token_ids[6:7])
    monkeypatch.setattr(DecodeBatch, "VECTOR_ROWS", vector_rows)
    reasons = set()
    for params in (free, replace(free, stop_token_ids=(stop_id,)), replace(free, stop_strings=(stop_text,))):
        batched = Engine(model, tok, eos_ids=()).generate(prompts, params, n=3)      # 12 rows
        for i, c in enumerate(batched):
            alone = Engine(model, tok, eos_ids=()).generate([prompts[i // 3]], replace(params, seed=params.seed + i))[0]
            assert (c.token_ids, c.finish_reason, c.text) == (alone.token_ids, alone.finish_reason, alone.text)
            reasons.add((params.stop_token_ids, params.stop_strings, c.finish_reason))
    assert ((stop_id,), (), "stop") in reasons and ((stop_id,), (), "length") in reasons
    assert ((), (stop_text,), "stop") in reasons


def test_a_cancel_in_a_wide_batch_ends_only_that_row(tok, model, engine, monkeypatch):
    """A wide batch looks for cancelled rows only when some row was cancelled since its last look
    (`Row.cancels`): the cancelled request ends at once, the others are untouched."""
    assert DecodeBatch.VECTOR_ROWS <= 10
    sample = DecodeBatch.sample
    monkeypatch.setattr(DecodeBatch, "sample", lambda self: (time.sleep(0.001), sample(self))[1])
    prompts = [tok.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(10)]
    params = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=20 + i, stop_token_ids=()) for i in range(10)]
    eng = Engine(model, None, eos_ids=())
    sched = Scheduler(eng, max_running=16).start()
    try:
        reqs = [sched.submit(p, sp) for p, sp in zip(prompts, params)]
        victim, seen = reqs[3], []
        for t in victim:
            seen.append(t)
            if len(seen) == 3:
                victim.cancel()
                at_cancel = len(victim.output_ids)   # (see test_scheduler_cancel_stops_generation)
        others = [list(r) for r in reqs if r is not victim]
    finally:
        sched.stop()
    assert victim.finish_reason == "cancelled" and len(victim.output_ids) <= at_cancel + 1 < 60
    assert victim.output_ids == _alone(eng, prompts[3], params[3])[:len(victim.output_ids)]
    rest = [(p, sp) for i, (p, sp) in enumerate(zip(prompts, params)) if i != 3]
    assert others == [_alone(eng, p, sp) for p, sp in rest]
    assert all(r.finish_reason == "length" for r in reqs if r is not victim)


def test_packed_weights_are_reused_until_the_weights_change(tok, model):
    """Packing the weights for the decode step is a pass over all of them: an engine keeps the packed
    copy while the parameters are unchanged and packs again after any in-place update."""
    engine = Engine(model, tok)
    prompt = tok.prompt_ids(PROMPTS[0])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop_token_ids=())
    first = engine.generate([prompt], params)[0].token_ids
    packed = engine.decode_weights(16)
    assert list(engine.stream(prompt, params)) == [t for t in first if t not in engine.eos_ids]
    assert engine.generate([prompt], params)[0].token_ids == first
    assert engine.decode_weights(64) is packed                # other batch lengths share it

    def fresh():
        return Engine(model, tok).generate([prompt], params)[0].token_ids

    with torch.no_grad():                                      # an in-place update
        model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    assert engine.decode_weights(16) is not packed
    assert engine.generate([prompt], params)[0].token_ids == fresh() != first

    packed = engine.decode_weights(16)                         # an optimizer step
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.tensor([prompt])).logsumexp(-1).sum().backward()
    opt.step()
    assert engine.decode_weights(16) is not packed
    assert engine.generate([prompt], params)[0].token_ids == fresh()

    packed = engine.decode_weights(16)                         # load_state_dict
    model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
    assert engine.decode_weights(16) is not packed
    assert engine.generate([prompt], params)[0].token_ids == fresh()

    engine.forget_weights()                                    # writes through .data are not seen
    assert engine._packed is None


def test_a_scheduler_context_beyond_the_models_positions_still_runs(tok):
    # the packed rotary tables must cover the batch's context even past max_position_embeddings
    model = tiny_model(tok, max_position_embeddings=32)
    sched = Scheduler(Engine(model, None, eos_ids=()), max_len=64).start()
    try:
        r = sched.submit(tok.prompt_ids("1+1"), SamplingParams(max_new_tokens=50, seed=0, stop_token_ids=()))
        got = list(r)
    finally:
        sched.stop()
    assert len(got) == 50 and r.finish_reason == "length" and sched.error is None


def test_a_stale_packed_copy_is_the_old_model_whole_until_forgotten(tok):
    """A fused optimizer step changes the weights without bumping their version counters: the engine
    keeps its packed copy, which must then be the old model entire (not old layers behind the new
    embedding), and `forget_weights` brings the new one."""
    model = tiny_model(tok)
    prompt = tok.prompt_ids(PROMPTS[1])
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=8, stop_token_ids=())
    engine = Engine(model, tok, eos_ids=())
    before = engine.generate([prompt], params)[0].token_ids
    old = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model(torch.tensor([prompt])).logsumexp(-1).sum().backward()
    opt.step()
    assert Engine(model, tok, eos_ids=()).generate([prompt], params)[0].token_ids != before   # it did change
    assert engine.generate([prompt], params)[0].token_ids == before == \
        Engine(old, tok, eos_ids=()).generate([prompt], params)[0].token_ids
    engine.forget_weights()
    assert engine.generate([prompt], params)[0].token_ids == Engine(model, tok, eos_ids=()).generate([prompt], params)[0].token_ids


def test_the_end_is_published_with_the_last_tokens(tok, model):
    """Under a stream interval tokens reach a request only at hand-overs: its finish_reason must not be
    visible before output_ids holds every token (a thread polling finish_reason reads a whole result)."""
    import asyncio

    seen = []
    sched = Scheduler(Engine(model, tok), stream_interval=0.05, coalesce_above=0)
    stepped = sched._outbox.stepped

    def watch(joined, ended):
        seen.extend((r.finish_reason, r.finished_at) for r in ended)
        return stepped(joined, ended)

    sched._outbox.stepped = watch
    sched.start()

    async def go():
        reqs = [sched.submit(tok.prompt_ids("12+34"), SamplingParams(max_new_tokens=20, seed=i)) for i in range(4)]
        return reqs, [[t async for t in r] for r in reqs]

    try:
        reqs, outs = asyncio.run(go())
    finally:
        sched.stop()
    assert len(seen) == 4 and all(f is None and at is None for f, at in seen)   # not yet at the step's end
    for r, out in zip(reqs, outs):
        assert r.finish_reason in ("stop", "length") and r.output_ids == out and r.finished_at >= r.first_token_at


def test_cancelling_a_finished_request_costs_the_batch_nothing(tok, model):
    from qiusuo.engine import Row

    sched = Scheduler(Engine(model, tok)).start()
    try:
        r = sched.submit(tok.prompt_ids("1+1"), SamplingParams(max_new_tokens=5, seed=1))
        list(r)
        before = Row.cancels
        r.cancel()                          # what the server does with every request it ends
        assert Row.cancels == before
    finally:
        sched.stop()
    row = Row(owner=None, params=SamplingParams(), stops=frozenset({2}), key=0, limit=9, generated=[5, 7],
              finish_reason="stop")         # ended on a stop string: both tokens are output …
    row.cancel()                            # … and a cancel arriving after that changes nothing
    assert row.reported() == 2


def test_a_failing_sink_ends_the_other_requests_and_a_stopped_scheduler_refuses_more(tok, model):
    """The error path must reach every request even when what failed is a sink that it calls again;
    and a request submitted once the scheduler has stopped is refused, not left waiting."""
    import threading

    def broken_sink(items):
        raise RuntimeError("the pipe is gone")

    sched = Scheduler(Engine(model, tok))
    params = SamplingParams(max_new_tokens=50, seed=3, stop_token_ids=())
    sched.submit(tok.prompt_ids("1+1"), params, sink=broken_sink, tag="remote")
    local = sched.submit(tok.prompt_ids("12+34"), params)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(local), daemon=True)
    consumer.start()
    sched.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "a request was left waiting after the scheduler failed"
    assert local.finish_reason == "error" and isinstance(sched.error, RuntimeError)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        sched.submit(tok.prompt_ids("1+1"), params)
    sched.stop()

    fine = Scheduler(Engine(model, tok)).start()
    fine.stop()
    with pytest.raises(RuntimeError, match="is stopped"):
        fine.submit(tok.prompt_ids("1+1"), params)
    fine.start()                                   # started again: it takes requests again
    try:
        assert len(list(fine.submit(tok.prompt_ids("1+1"), SamplingParams(max_new_tokens=3, seed=1)))) <= 3
    finally:
        fine.stop()


@pytest.mark.slow
def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    """bench/gpu_check.sh --smoke: every section runs and lands in the JSON (on the CPU here)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(tmp_path), "--smoke", "--device", "cpu"],
                   check=True, capture_output=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["complete"] and result["dtype"] == "torch.bfloat16"
    assert [r["batch"] for r in result["generate"]] == [1, 4]
    # bf16 on the CPU too: the PyTorch decode step on its static buffers, as on a GPU (without graphs)
    assert all(r["decoder"] == "TorchDecoder" and r["eager_vs_hf"] > 0 and "graphs_tok_s" not in r
               for r in result["generate"])
    assert result["grpo_step"]["ratio"] > 0 and result["sft"]["tokens_s"] > 0 and result["memory"]
    assert result["sft"]["attention"] == "SDPA block-diagonal mask" and result["sft"]["loss"] > 0


# --- the PyTorch step over static buffers (CUDA graphs on a GPU) -----------------------------------

def test_the_static_step_gives_the_tokens_of_the_c_step_across_batches(tok, model):
    """`TorchDecoder` steps through a `StepRunner`: rows padded to a power of two, keys to a power-of-two
    span, over a cache a finished batch hands on (with its stale rows) — the tokens are those of the C
    step for batches of every width, rows ending at different times, and a second batch on the reused
    runner."""
    prompts = [tok.prompt_ids(p) for p in PROMPTS[:3]]              # 3 prompts × 3 samples: 9 rows → 16
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=5)
    native = Engine(model, tok, decoder=NativeDecoder)
    static = Engine(model, tok, decoder=TorchDecoder)
    assert static.cuda_graphs is False and static.dtype == torch.float32
    for n in (3, 1):
        want = native.generate(prompts, params, n=n)
        got = static.generate(prompts, params, n=n)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert len({len(c.token_ids) for c in got}) > 1                # rows ended at different steps
    runner = static._runner
    assert runner.capacity == 16 and runner.graphs is None
    static.generate(prompts[:1], params)
    assert static._runner is runner                                     # the next batch reused it


def test_step_runner_pads_rows_and_span_to_a_few_shapes(tok, model):
    """A step's logits for B rows at their own positions equal the exact-shape step's, whatever rows and
    keys the runner pads it to; the shapes are powers of two within the cache."""
    from qiusuo.engine import StepRunner
    from qiusuo.model import DecodeWeights

    engine = Engine(model, tok, decoder=TorchDecoder)
    runner = StepRunner(engine, 5, 200, graphs=False)
    assert runner.capacity == 8 and runner.max_len == 200
    assert runner.shape(5, 40) == (8, 64) and runner.shape(1, 130) == (1, 200) and runner.shape(8, 128) == (8, 128)
    weights = DecodeWeights(model, 200)
    exact = model.new_cache(5, 200)
    prompt = tok.prompt_ids(PROMPTS[1])
    with torch.no_grad():
        model(torch.tensor([prompt] * 5), cache=exact)
    runner.cache.kv[:, :, :5] = exact.kv
    runner.cache.kv[:, :, 5:] = 7.0                                     # stale rows: finite garbage
    tokens = torch.tensor([3, 9, 4, 4, 11])
    positions = torch.tensor([len(prompt) + d for d in (0, 3, 1, 0, 2)])  # rows at their own positions
    for i in range(1, 4):                                               # fill the skipped positions
        weights.step(tokens, torch.minimum(positions, torch.tensor(len(prompt) + i - 1)), exact)
        runner.cache.kv[:, :, :5] = exact.kv
    want = weights.step(tokens, positions, exact)
    got = runner.step(weights, tokens.numpy(), positions.numpy())
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert torch.equal(runner.cache.kv[:, :, :5], exact.kv)             # the same cache writes


def test_step_runner_refreshes_its_weights_in_place(tok, model):
    """A runner with graphs reads its own copy of the packed weights; new weights are copied into it
    (same addresses, so the captured graphs see them) unless their shapes differ. (The capture itself
    needs CUDA; this is the bookkeeping around it.)"""
    from qiusuo.engine import StepRunner
    from qiusuo.model import DecodeWeights

    runner = StepRunner(Engine(model, tok, decoder=TorchDecoder), 2, 64, graphs=False)
    runner.graphs = {}
    first = DecodeWeights(model, 64)
    runner._hold(first)
    held = runner._weights
    assert held is not first and all(torch.equal(a, b) and a.data_ptr() != b.data_ptr()
                                     for a, b in zip(held.tensors(), first.tensors()))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    second = DecodeWeights(model, 64)
    runner.graphs[(1, 64)] = "captured"
    runner._hold(second)
    assert runner._weights is held and runner.graphs == {(1, 64): "captured"}
    assert all(torch.equal(a, b) for a, b in zip(held.tensors(), second.tensors()))
    runner._hold(DecodeWeights(model, 128))                             # longer rotary tables: a new copy
    assert runner._weights is not held and runner.graphs == {}


def test_engine_decodes_in_bf16_over_an_fp32_model(tok, model):
    """`Engine(dtype=bfloat16)` over an fp32 model (GRPO's rollouts on a GPU): the packed weights and
    the cache are bf16, the prefill runs under autocast, the model keeps its fp32 weights, and the
    logits stay within bf16 rounding of fp32's."""
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    engine = Engine(model, tok, dtype=torch.bfloat16)
    assert engine.decoder_type is TorchDecoder                  # the C step is fp32 only
    assert Engine(model, tok).decoder_type is NativeDecoder     # the default on the CPU stays the C step
    batch, ref = DecodeBatch(engine, 64), DecodeBatch(Engine(model, tok, decoder=TorchDecoder), 64)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    try:
        for b in (batch, ref):
            b.admit(prompts, [b.engine.new_row(None, params, 0) for _ in prompts])
        assert batch.decoder.cache.kv.dtype == torch.bfloat16 and batch.decoder.weights.head.dtype == torch.bfloat16
        for _ in range(3):
            for b in (batch, ref):
                b.step()
            a, r = batch.decoder.logits[:4], ref.decoder.logits[:4]
            assert a.dtype == torch.float32 and (a - r).abs().max() < 0.05 * r.abs().max()
    finally:
        batch.close()
        ref.close()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(engine.generate(prompts, SamplingParams(max_new_tokens=6, seed=1))) == 4


def test_cuda_graphs_are_a_cuda_setting(tok, model):
    assert Engine(model, tok).cuda_graphs is False                      # None: on for CUDA only
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        Engine(model, tok, cuda_graphs=True)
    with pytest.raises(ValueError, match="C decoder runs fp32 only"):
        Engine(model, tok, decoder=NativeDecoder, dtype=torch.bfloat16)


def test_the_runner_step_reads_nothing_back_from_the_device(tok):
    """The step a graph captures (`StepRunner.step` on its static buffers) runs on meta tensors, where any
    op whose value the host needs would fail: nothing in it waits on the device."""
    import numpy as np

    from qiusuo.engine import StepRunner

    engine = Engine(tiny_model(tok).to("meta"), tok, decoder=TorchDecoder)
    runner = StepRunner(engine, 3, 128, graphs=False)
    logits = runner.step(engine.decode_weights(128), np.array([1, 2, 3]), np.array([5, 9, 70]))
    assert logits.shape == (3, tok.vocab_size) and logits.device.type == "meta"
