"""The engine: greedy equals transformers, batching and seeds don't change a row's tokens, stops work."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from qiusuo.engine import Engine, SamplingParams, sample_next
from qiusuo.model import save_model

PROMPTS = ["4821+397", "reach 46 with 3 7 25 2", "12*7", "9"]


@pytest.fixture
def engine(model, tok):
    return Engine(model, tok)


def test_greedy_matches_transformers_generate(tmp_path, model, tok, engine):
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    for p, c in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=list(tok.stop_ids),
                          pad_token_id=tok.pad_id)
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
    hook = model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[0]))
    try:
        eng = Engine(model, tok)
        prompts = [tok.prompt_ids("1+1")] * 8
        params = SamplingParams(max_new_tokens=30, temperature=1.5, seed=0,
                                stop_token_ids=tuple(range(40, 80)))  # many stop ids: rows end early
        out = eng.generate(prompts, params)
    finally:
        hook.remove()
    lengths = sorted(len(c.token_ids) for c in out)
    assert lengths[0] < lengths[-1]
    assert min(widths[1:]) < 8  # the batch shrank once rows finished


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(1)]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed)]
        assert sample_next(logits, SamplingParams(top_k=1), gens).item() == 1
        # top_p small enough keeps only the most likely token
        assert sample_next(logits, SamplingParams(top_p=0.1), gens).item() == 1
        # top_k=2 never picks outside the two best
        assert sample_next(logits, SamplingParams(top_k=2), gens).item() in (1, 3)


def test_bad_params_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
