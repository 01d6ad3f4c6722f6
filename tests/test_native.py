"""The C decode step and sampler (`qiusuo/native.py`): same results as the PyTorch versions, clear
errors on bad input, and a clean fallback when no compiler is available."""
import logging

import numpy as np
import pytest
import torch

from conftest import tiny_model
from qiusuo import native
from qiusuo.engine import Engine, SamplingParams, sample_next, uniform
from qiusuo.model import DecodeWeights
from qiusuo.native import NativeWeights


def test_the_kernel_builds_here():
    # CI machines have gcc: the fast path must be the one the tests exercise.
    assert native.kernel() is not None


def test_c_step_writes_the_same_cache_and_logits_as_the_torch_step(tok):
    model = tiny_model(tok)
    c_step, torch_step = NativeWeights(model, 48), DecodeWeights(model, 48)
    a, b = model.new_cache(7, 48), model.new_cache(7, 48)    # room for 7 rows, 5 decoding
    torch.manual_seed(1)
    a.kv.normal_()
    b.kv.copy_(a.kv)
    before = a.kv.clone()
    tokens, positions = torch.tensor([3, 9, 27, 5, 11]), torch.tensor([0, 7, 47, 20, 20])
    la, lb = c_step.step(tokens, positions, a), torch_step.step(tokens, positions, b)
    assert la.shape == lb.shape == (5, tok.vocab_size)
    assert (la - lb).abs().max() < 1e-4
    assert (a.kv - b.kv).abs().max() < 1e-5
    assert torch.equal(a.kv[:, :, 5:], before[:, :, 5:])     # idle rows untouched
    changed = (a.kv != before).any(-1)                        # [layers, 2, rows, kv, L]
    assert changed.nonzero()[:, [2, 4]].unique(dim=0).tolist() == [[0, 0], [1, 7], [2, 47], [3, 20], [4, 20]]


def test_a_row_gets_the_same_logits_alone_as_among_other_rows(tok):
    # The lone-row matmul and the register tiles add up every output in the same order, so a
    # request's logits do not depend on what else is in the batch, to the last bit (with row-major
    # weights the two once differed in the last columns of the LM head).
    model = tiny_model(tok)
    step = NativeWeights(model, 16)
    out = {}
    for rows in (1, 7):
        cache = model.new_cache(rows, 16)
        for p in range(4):
            out[rows] = step.step(torch.full((rows,), 3 + p), torch.full((rows,), p), cache)
    assert torch.equal(out[7], out[1].expand(7, -1))


def test_c_step_matches_the_torch_step_when_widths_are_not_multiples_of_16(tok):
    # The kernel stores each weight in column panels of 16, the last one 8 wide when the width is 8
    # mod 16 (q|k|v is 56 wide here, o and down 40); the lone-row loop and the register tiles both read
    # it. Head dim 8 and 5 query heads per kv head also take the attention's odd-head path.
    model = tiny_model(tok, hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1)
    c_step, torch_step = NativeWeights(model, 16), DecodeWeights(model, 16)
    for rows in (1, 7):
        a, b = model.new_cache(rows, 16), model.new_cache(rows, 16)
        for p in range(4):
            tokens, positions = torch.arange(rows) + 3 + p, torch.full((rows,), p)
            la, lb = c_step.step(tokens, positions, a), torch_step.step(tokens, positions, b)
            assert (la - lb).abs().max() < 1e-4
        assert (a.kv - b.kv).abs().max() < 1e-5


def test_c_step_rejects_positions_and_tokens_out_of_range(tok):
    model = tiny_model(tok)
    step = NativeWeights(model, 16)
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="position outside the cache"):
        step.step(torch.tensor([1, 2]), torch.tensor([3, 16]), cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step.step(torch.tensor([1, tok.vocab_size]), torch.tensor([3, 4]), cache)


def test_c_step_checks_each_new_array_and_remembers_only_live_ones(tok):
    """`kernel` keeps the address of the arrays it was last given (a decode batch passes the same ones
    every step): an array it has not seen is checked for type and layout, and a new array at a dead
    one's place is never taken for it."""
    model = tiny_model(tok)
    step = NativeWeights(model, 16)
    cache = model.new_cache(2, 16)
    logits = np.zeros((2, step.vocab_padded), dtype=np.float32)
    tokens, positions = np.array([3, 4]), np.array([0, 0])
    step.kernel(tokens, positions, cache, logits)
    first = logits.copy()
    for bad in (tokens.astype(np.int32), np.array([3, 9, 4, 9])[::2]):
        with pytest.raises(ValueError, match="C-contiguous int64"):
            step.kernel(bad, positions, cache, logits)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        step.kernel(tokens, positions, cache, logits.astype(np.float64))
    step.kernel(tokens[:0], positions[:0], cache, logits)             # no rows: nothing to do
    for _ in range(3):                # fresh arrays each time (often at a freed one's address)
        out = np.zeros((2, step.vocab_padded), dtype=np.float32)
        step.kernel(np.array([3, 4]), np.array([0, 0]), cache, out)
        assert np.array_equal(out, first)


def test_c_sampler_draws_what_the_torch_sampler_draws():
    torch.manual_seed(0)
    B, V = 600, 50
    logits = torch.randn(B, V) * 3
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7] * (B // 4))
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.95, 1.0] * (B // 6))
    top_k = torch.tensor([0, 0, 5, 1, 0] * (B // 5))
    keys, counters = torch.arange(B) * 7919 - 10**6, torch.arange(B) % 13
    expected = sample_next(logits, temperature, top_p, top_k, uniform(keys, counters))
    state = {"temperature": temperature.numpy(), "top_p": top_p.numpy(), "top_k": top_k.numpy(),
             "key": keys.numpy(), "drawn": counters.numpy()}
    padded = np.zeros((B, 56), dtype=np.float32)        # the kernel's logits buffers are padded
    padded[:, :V] = logits.numpy()
    got = native.Sampler(native.kernel(), V)(padded, state, B).tolist()
    assert got == expected.tolist()


def test_engine_gives_the_same_tokens_with_and_without_the_kernel(tok, monkeypatch):
    model = tiny_model(tok)
    prompts = [tok.prompt_ids("12+34"), tok.prompt_ids("reach 46 with 3 7 25 2")]
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5)
    fast = [c.token_ids for c in Engine(model, tok).generate(prompts, params, n=2)]
    monkeypatch.setenv("QIUSUO_NATIVE", "0")
    assert not native.applies(model)
    slow = [c.token_ids for c in Engine(model, tok).generate(prompts, params, n=2)]
    assert fast == slow


def test_without_a_compiler_the_engine_falls_back_with_a_warning(tok, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("QIUSUO_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="qiusuo.native"):
        assert native.kernel() is None
    assert "could not build the C decode step" in caplog.text
    assert list(tmp_path.iterdir()) == []        # no half-written library left behind
    model = tiny_model(tok)
    assert not native.applies(model)
    out = Engine(model, tok).generate([tok.prompt_ids("1+1")], SamplingParams(max_new_tokens=5, temperature=0))
    assert len(out[0].token_ids) >= 1


def test_c_prefill_matches_a_full_forward_and_the_torch_prefill(tok):
    """Several prompts of different lengths prefilled in one call, each into its own cache row."""
    model = tiny_model(tok)
    prompts = [tok.prompt_ids("12+34"), tok.prompt_ids("reach 46 with 3 7 25 2"), [tok.eos_id]]
    step = NativeWeights(model, 64)
    cache = model.new_cache(6, 64)
    logits = torch.from_numpy(step.prefill(prompts, [4, 0, 2], cache))[:, :tok.vocab_size]
    with torch.no_grad():
        for i, (p, slot) in enumerate(zip(prompts, [4, 0, 2])):
            assert (logits[i] - model(torch.tensor([p]))[0, -1]).abs().max() < 1e-4
            ref = model.new_cache(1, 64)
            model(torch.tensor([p]), cache=ref)
            assert (cache.kv[:, :, slot, :, :len(p)] - ref.kv[:, :, 0, :, :len(p)]).abs().max() < 1e-5
    assert cache.kv[:, :, [1, 3, 5]].abs().max() == 0          # rows not named stay untouched


def test_c_step_and_prefill_with_a_vocabulary_wider_than_the_work_buffer(tok):
    """The LM head's output goes to the step's own work buffer when it fits (rows × the widest
    matmul); here the vocabulary (112 padded) is wider than q|k|v and gate|up (32), so a lone row and
    a short prompt take a buffer of their own, sized for the logits they return."""
    model = tiny_model(tok, hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    c_step, torch_step = NativeWeights(model, 32), DecodeWeights(model, 32)
    for rows in (1, 5):
        a, b = model.new_cache(rows, 32), model.new_cache(rows, 32)
        for p in range(3):
            tokens, positions = torch.arange(rows) + 3 + p, torch.full((rows,), p)
            assert (c_step.step(tokens, positions, a) - torch_step.step(tokens, positions, b)).abs().max() < 1e-4
    prompts = [[5], tok.prompt_ids("12+34")]          # 1 row: logits wider than its buffer; 9 rows: not
    logits = torch.from_numpy(c_step.prefill(prompts, [0, 1], model.new_cache(2, 32)))[:, :tok.vocab_size]
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            assert (logits[i] - model(torch.tensor([prompt]))[0, -1]).abs().max() < 1e-4


@pytest.mark.parametrize("team", [False, True])
def test_c_prefill_computes_the_last_tokens_logits_only_and_the_same_bits(tok, team):
    """A prefill asks for each prompt's last-token logits only (`last_only`): they are the bits the
    step computes when it writes every row's logits, in blocks and in team mode."""
    model = tiny_model(tok)
    prompts = [tok.prompt_ids("12+34"), [tok.eos_id], tok.prompt_ids("reach 46 with 3 7 25 2")]
    step = NativeWeights(model, 64)
    step.team = team
    lengths = np.array([len(p) for p in prompts])
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = np.concatenate([np.array(p, dtype=np.int64) for p in prompts])
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    slots = np.repeat(np.arange(3, dtype=np.int64), lengths)
    every = np.zeros((len(tokens), step.vocab_padded), dtype=np.float32)
    step.kernel(tokens, positions, model.new_cache(3, 64), every, slots, bounds)
    last = step.prefill(prompts, [0, 1, 2], model.new_cache(3, 64))
    assert last.shape == (3, step.vocab_padded)
    assert np.array_equal(last, every[bounds[1:] - 1])
    with pytest.raises(ValueError, match="block bounds"):
        step.kernel(tokens, positions, model.new_cache(3, 64), every, slots, bounds[[0, 2, 1, 3]], last_only=True)


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_c_top_p_sampler_matches_torch_on_flat_and_peaked_distributions(scale):
    """Top-p without top-k orders only the tokens above a threshold; flat logits (nearly the whole
    vocabulary kept) and peaked ones (a few kept, a large vocabulary) must still draw what the full
    sort draws."""
    torch.manual_seed(1)
    B, V = 300, 1003
    logits = torch.randn(B, V) * scale
    temperature = torch.tensor([0.7, 1.0, 1.3] * (B // 3))
    top_p = torch.tensor([0.95, 0.5, 0.999, 0.1, 0.8] * (B // 5))
    top_k = torch.tensor([0, 0, 0, 0, 0, 40] * (B // 6))
    keys, counters = torch.arange(B) * 104729 + 17, torch.arange(B) % 11
    expected = sample_next(logits, temperature, top_p, top_k, uniform(keys, counters))
    state = {"temperature": temperature.numpy(), "top_p": top_p.numpy(), "top_k": top_k.numpy(),
             "key": keys.numpy(), "drawn": counters.numpy()}
    padded = np.zeros((B, 1008), dtype=np.float32)
    padded[:, :V] = logits.numpy()
    got = native.Sampler(native.kernel(), V)(padded, state, B).tolist()
    assert got == expected.tolist()


def _fresh_cache(model, rows):
    cache = model.new_cache(rows, 48)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(3)))
    return cache


def _step_logits(step, tokens, positions, cache):
    logits = np.zeros((len(tokens), step.vocab_padded), dtype=np.float32)
    step.kernel(tokens, positions, cache, logits)
    return logits


def _forked_step(step, tokens, positions, cache, out):
    # no torch op here: torch's own OpenMP pool is not usable in a forked child, the kernel's must be
    torch.set_num_threads(2)
    out.put(_step_logits(step, tokens, positions, cache))


def test_c_step_is_the_same_on_any_number_of_threads_from_concurrent_callers_and_after_fork(tok):
    """The step's own worker threads: the rows split into blocks however many threads there are, a
    second caller while the workers are busy runs its blocks itself, and a forked child (which has
    none of the parent's threads) starts its own workers instead of waiting for the parent's."""
    import multiprocessing as mp
    import threading

    model = tiny_model(tok)
    step = NativeWeights(model, 48)
    rows = 36    # split 36 / 18 / 12 / 8 rows per block
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tok.vocab_size, rows).astype(np.int64)
    positions = rng.integers(0, 48, rows).astype(np.int64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cache = _fresh_cache(model, rows)
        ref = _step_logits(step, tokens, positions, cache)
        ref_kv = cache.kv
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            cache = _fresh_cache(model, rows)
            got = _step_logits(step, tokens, positions, cache)
            assert np.array_equal(got, ref) and torch.equal(cache.kv, ref_kv), n
        torch.set_num_threads(2)
        results, errors = [], []
        caches = [[_fresh_cache(model, rows) for _ in range(20)] for _ in range(4)]

        def caller(mine):
            try:
                for cache in mine:
                    results.append(_step_logits(step, tokens, positions, cache))
            except BaseException as e:  # surfaced below: an assertion in a thread would be lost
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 80
        assert all(np.array_equal(r, ref) for r in results)

        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_forked_step, args=(step, tokens, positions, _fresh_cache(model, rows), out),
                            daemon=True)
        child.start()
        try:
            got = out.get(timeout=120)     # a child waiting for the parent's workers would never answer
            child.join(timeout=60)
            assert child.exitcode == 0 and np.array_equal(got, ref)
        finally:
            child.kill()
    finally:
        torch.set_num_threads(before)


def test_team_mode_gives_bit_identical_logits_and_caches_to_blocks(tok):
    """Team mode (every thread on every row, phase by phase) computes each output as the block path
    does: the same logits and cache to the last bit, for a lone row (matmul-vector chunks) and for
    batches, on any number of threads, from concurrent callers, and for a prefill of prompts that
    share nothing but the call."""
    import threading

    model = tiny_model(tok)
    step = NativeWeights(model, 48)
    rng = np.random.default_rng(1)
    before = torch.get_num_threads()
    try:
        for rows in (1, 5, 36):
            tokens = rng.integers(0, tok.vocab_size, rows).astype(np.int64)
            positions = rng.integers(0, 48, rows).astype(np.int64)
            torch.set_num_threads(1)
            step.team = False
            cache = _fresh_cache(model, rows)
            ref, ref_kv = _step_logits(step, tokens, positions, cache), cache.kv
            step.team = True
            for n in (1, 2, 3, 5):
                torch.set_num_threads(n)
                cache = _fresh_cache(model, rows)
                assert np.array_equal(_step_logits(step, tokens, positions, cache), ref), (rows, n)
                assert torch.equal(cache.kv, ref_kv), (rows, n)
        # a second caller while the first owns the workers runs its team alone
        torch.set_num_threads(2)
        results, errors = [], []

        def caller():
            try:
                for _ in range(15):
                    results.append(_step_logits(step, tokens, positions, _fresh_cache(model, len(tokens))))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=caller) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 45 and all(np.array_equal(r, ref) for r in results)

        prompts = [tok.prompt_ids("reach 46 with 3 7 25 2"), tok.prompt_ids("12+34"), [tok.eos_id]]
        out = {}
        for team in (False, True):
            step.team = team
            cache = model.new_cache(4, 48)
            out[team] = step.prefill(prompts, [3, 0, 1], cache), cache.kv
        assert np.array_equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])
    finally:
        step.team = None
        torch.set_num_threads(before)


def test_team_mode_is_picked_for_large_weights_and_a_long_lone_prompt(tok):
    from qiusuo.native import TEAM_PREFILL_ROWS, TEAM_WEIGHT_BYTES

    step = NativeWeights(tiny_model(tok), 48)
    one_prompt, two_prompts = np.array([0, 60], dtype=np.int32), np.array([0, 30, 60], dtype=np.int32)
    assert step.weight_bytes < TEAM_WEIGHT_BYTES           # the demo's model: each thread its own rows
    assert not step._team(32, None, 2)
    assert step._team(TEAM_PREFILL_ROWS, one_prompt, 2)    # one long prompt: both threads on it
    assert not step._team(TEAM_PREFILL_ROWS - 1, one_prompt, 2)
    assert not step._team(60, two_prompts, 2)              # a prompt per thread already
    assert not step._team(60, one_prompt, 1)
    step.weight_bytes = TEAM_WEIGHT_BYTES + 1              # weights that no longer fit in the caches
    assert step._team(1, None, 2) and step._team(32, None, 2) and not step._team(32, None, 1)
    step.team = False
    assert not step._team(1, None, 2)


def test_narrow_panels_give_the_same_bits_alone_in_blocks_and_in_team_mode(tok):
    # Widths of 8 mod 16 end each matmul in an 8-wide panel, which the lone-row loop and the register
    # tiles each have a code path for. Both must fuse multiply and add alike: with the compiler left
    # to decide, the lone row's last 8 columns once differed in the last bit, so a request's logits
    # depended on its batch (3 rows on 2 threads: blocks of 2 and 1) and on the mode.
    model = tiny_model(tok, hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1)
    step = NativeWeights(model, 16)
    tokens, positions = np.array([5, 9, 11], dtype=np.int64), np.array([3, 7, 2], dtype=np.int64)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads, team in ((1, False), (2, False), (2, True), (3, True)):
            torch.set_num_threads(threads)
            step.team = team
            cache = _fresh_cache(model, 3)
            out[threads, team] = _step_logits(step, tokens, positions, cache), cache.kv
        lone = []
        for r in range(3):   # each row on its own
            cache = _fresh_cache(model, 3)
            logits = np.zeros((1, step.vocab_padded), dtype=np.float32)
            step.kernel(tokens[r:r + 1], positions[r:r + 1], cache, logits, np.array([r], dtype=np.int64))
            lone.append(logits[0])
    finally:
        step.team = None
        torch.set_num_threads(before)
    ref, ref_kv = out[1, False]
    for key, (logits, kv) in out.items():
        assert np.array_equal(logits, ref) and torch.equal(kv, ref_kv), key
    assert np.array_equal(np.stack(lone), ref)


def test_c_step_and_prefill_reject_short_slots_and_empty_prompts(tok):
    model = tiny_model(tok)
    step = NativeWeights(model, 16)
    cache = model.new_cache(2, 16)
    logits = np.zeros((2, step.vocab_padded), dtype=np.float32)
    with pytest.raises(ValueError, match="slots of the wrong shape"):
        step.kernel(np.array([3, 4]), np.array([0, 0]), cache, logits, slots=np.array([0]))
    for prompts in ([], [[]], [[3], []]):
        with pytest.raises(ValueError, match="at least one token"):
            step.prefill(prompts, list(range(len(prompts))), cache)
