"""The model matches `transformers` on checkpoints it writes, and bad checkpoints fail clearly."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_model
from qiusuo.model import (CheckpointError, DecodeWeights, ModelConfig, UnsupportedModel, load_model, rope_cos_sin,
                          rope_inv_freq, save_model)

TEXT = "<|user|>4821+397<|end|><|assistant|><think>1+7+0=8>8,2+9+0=11>18</think><answer>5218</answer><|end|>"


@pytest.mark.parametrize("qkv_bias,tied", [(True, True), (False, True), (True, False)])
def test_transformers_loads_same_logits_and_ids(tmp_path, tok, qkv_bias, tied):
    model = tiny_model(tok, qkv_bias=qkv_bias, tie_word_embeddings=tied)
    save_model(model, tmp_path)
    tok.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    arch = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    assert arch == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")

    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(TEXT)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == TEXT == tok.decode(ids)
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "4821+397"}], tokenize=False,
                                          add_generation_prompt=True)
    assert rendered == tok.render_chat([{"role": "user", "content": "4821+397"}])

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_round_trip_is_exact(tmp_path, tok, model):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    x = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_kv_cache_matches_full_forward_at_every_position(tok, model):
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        prefix = 7
        steps = [model(ids[:, :prefix], cache=cache)]
        for t in range(prefix, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("native", [False, True], ids=["torch", "C"])
@pytest.mark.parametrize("qkv_bias,kv_heads", [(True, 2), (False, 4), (True, 1)])
def test_fused_decode_step_matches_full_forward(tok, qkv_bias, kv_heads, native):
    """Both decode steps — PyTorch (norms folded into matmuls, rotary as a gather) and the C kernel —
    give the logits of a full forward, for rows at different positions in one batch, with and without
    q/k/v bias and for every grouping of query heads."""
    from qiusuo.model import DecodeWeights
    from qiusuo.native import NativeWeights

    model = tiny_model(tok, qkv_bias=qkv_bias, num_key_value_heads=kv_heads)
    rows = [tok.encode(TEXT), tok.encode(TEXT[::-1])[:31], tok.encode("12+34=46")]
    width = max(map(len, rows))
    fast = NativeWeights(model, width) if native else DecodeWeights(model, width)
    with torch.no_grad():
        cache = model.new_cache(len(rows), width)
        prefix = 5
        model(torch.tensor([r[:prefix] for r in rows]), cache=cache)  # prefill from position 0
        pos = [prefix] * len(rows)
        for _ in range(width - prefix):
            live = [i for i, r in enumerate(rows) if pos[i] < len(r)]
            if not live:
                break
            # rows that are done stay put (they rewrite their last slot, like finished engine rows)
            at = [min(pos[i], len(r) - 1) for i, r in enumerate(rows)]
            logits = fast.step(torch.tensor([r[a] for r, a in zip(rows, at)]), torch.tensor(at), cache)
            for i in live:
                full = model(torch.tensor([rows[i][:at[i] + 1]]))[0, -1]
                assert (logits[i] - full).abs().max().item() < 1e-4
                pos[i] += 1


def test_right_padded_prefill_then_decode_matches_each_row_alone(tok, model):
    """Prompts of different lengths share one cache; each row's next-token logits equal its own."""
    prompts = [tok.encode("12+34"), tok.encode("reach 46 with 3 7 25")]
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_id)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        cache = model.new_cache(2, 40)
        h = model(ids, cache=cache)
        first = torch.stack([h[i, len(p) - 1] for i, p in enumerate(prompts)])
        nxt = torch.tensor([[7], [9]])
        pos = torch.tensor([[len(p)] for p in prompts])
        second = model(nxt, pos, cache)[:, -1]
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [nxt[i, 0].item()]]))
            assert (alone[0, len(p) - 1] - first[i]).abs().max() < 1e-5
            assert (alone[0, len(p)] - second[i]).abs().max() < 1e-5


def test_missing_and_corrupt_checkpoints_fail_clearly(tmp_path, model):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads(tmp_path, tok, model):
    from safetensors.torch import save_file

    save_model(model, tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), model(x))


def _hf_config(**over) -> dict:
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      qkv_bias=False).to_hf()
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over,words", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"num_experts": 8}, "num_experts"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_settings_are_refused_at_load_naming_them(tmp_path, over, words):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(**over)))
    with pytest.raises(UnsupportedModel, match=re.escape(words)) as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "default", "rope_theta": 1e6},
])
def test_rope_inv_freq_equals_transformers(rope):
    """Both config layouts (transformers 5's rope_parameters; rope_theta + rope_scaling before it)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_parameters=dict(rope))
    fn = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    expected = fn(hf, "cpu")[0] if fn else 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32))
    # older checkpoints: rope_theta apart, and the type under "type"
    legacy = {"rope_theta": rope["rope_theta"],
              "rope_scaling": {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}}
    for layout in ({"rope_parameters": rope}, legacy):
        cfg = ModelConfig.from_hf(_hf_config(hidden_size=128, head_dim=32, **layout))
        assert torch.equal(rope_inv_freq(cfg), expected), layout
    if rope["rope_type"] == "llama3":   # the three bands are all present: kept, smoothed, divided
        ratio = expected / (1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32)))
        assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8) and ((ratio < 1) & (ratio > 1 / 8)).any()


def test_missing_keys_take_transformers_defaults():
    cfg = {k: v for k, v in _hf_config().items() if k not in ("tie_word_embeddings", "rope_theta", "rope_scaling")}
    for model_type in ("qwen2", "llama"):
        m = ModelConfig.from_hf({**cfg, "model_type": model_type})
        assert (m.tie_word_embeddings, m.rope_theta, m.rope_scaling) == (False, 10000.0, None)
        assert m.qkv_bias == (model_type == "qwen2")


def test_rope_scaling_round_trips_and_drives_the_decode_tables(tmp_path, tok):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    model = tiny_model(tok, qkv_bias=False, rope_theta=500000.0, rope_scaling=rope)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.config.rope_scaling == rope and again.config.rope_theta == 500000.0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode(TEXT * 2)])
    with torch.no_grad():
        assert (again(x) - hf(x).logits).abs().max().item() <= 1e-4
        # the decode step's rotary tables come from the same frequencies
        dw = DecodeWeights(again, 128)
        cos, _ = rope_cos_sin(torch.arange(128)[None], rope_inv_freq(again.config), torch.float32)
        assert torch.equal(dw.cos, cos[0, 0])


# --- attention over packed documents ------------------------------------------------------------

def _packed_docs() -> torch.Tensor:
    """doc_ids [3, 12]: several documents per row, one row of a single document, padding (−1) at the ends."""
    return torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1],
                         [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
                         [4, 5, 5, 5, 5, 5, 6, 6, -1, -1, -1, -1]])


def _qkv(B, T, H=4, KV=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, T, D, generator=g),
            torch.randn(B, KV, T, D, generator=g))


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa):
    """`varlen_attn`'s contract in plain PyTorch (the real one runs on CUDA only): tokens [N, heads, D],
    sequences at cu_q[i]:cu_q[i+1], causal for window_size (−1, 0)."""
    assert window_size == (-1, 0) and cu_q is cu_k and cu_q.dtype == torch.int32
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seq = lambda x: x[a:b].transpose(0, 1)[None]
        out[a:b] = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), is_causal=True,
                                                  enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


def test_document_attention_paths_agree_with_each_document_alone(monkeypatch):
    """The mask path, the flash varlen path (its layout code, with the kernel replaced by its contract
    in PyTorch — the kernel itself is CUDA-only) and plain causal attention for one-document rows all
    give each document token what causal attention over its document alone gives."""
    from qiusuo import model as m

    doc = _packed_docs()
    q, k, v = _qkv(*doc.shape)
    docs = m.Documents(doc)
    assert not docs.single
    cu, longest = docs.runs()
    assert cu.tolist() == [0, 3, 5, 9, 12, 24, 25, 30, 32, 36] and longest == 12

    def alone(r, d, doc=doc):
        at = (doc[r] == d).nonzero().squeeze(-1)
        return at, F.scaled_dot_product_attention(q[r:r + 1, :, at], k[r:r + 1, :, at], v[r:r + 1, :, at],
                                                  is_causal=True, enable_gqa=True)[0]

    masked = m.document_attention(q, k, v, docs)
    monkeypatch.setattr(m, "varlen_attn", _reference_varlen)
    monkeypatch.setattr(m, "flash_varlen_applies", lambda q: True)
    varlen = m.document_attention(q, k, v, m.Documents(doc))
    for r in range(doc.shape[0]):
        for d in set(doc[r].tolist()) - {-1}:
            at, want = alone(r, d)
            assert torch.allclose(masked[:, :, at][r], want, atol=1e-6)
            assert torch.allclose(varlen[:, :, at][r], want, atol=1e-6)

    one = torch.tensor([[0] * 9 + [-1] * 3, [1] * 12])     # one document per row, padding after it
    single = m.Documents(one)
    assert single.single
    causal = m.document_attention(q[:2], k[:2], v[:2], single)
    assert torch.allclose(causal[0, :, :9], alone(0, 0, one)[1], atol=1e-6)
    assert torch.allclose(causal[1], m.document_attention(q[1:2], k[1:2], v[1:2], None)[0])
    monkeypatch.undo()
    assert not m.flash_varlen_applies(q) and not m.flash_varlen_applies(q.bfloat16())   # CPU: never


def test_logits_of_every_attention_path_are_those_of_the_block_diagonal_mask(tok, model, monkeypatch):
    """Whichever way `document_attention` goes, the model's logits at every document token are those of
    SDPA with the block-diagonal causal mask (the one path every device has, and what the model computed
    before the others existed), in fp32 and under bf16 autocast: plain causal SDPA for rows of one
    document each, and the varlen path's layout (its kernel replaced by its contract) for packed rows."""
    from qiusuo import model as m

    packed = _packed_docs()
    single = torch.tensor([[0] * 9 + [-1] * 3, [1] * 12, [2] * 8 + [-1] * 4])
    ids = torch.randint(0, tok.vocab_size, packed.shape, generator=torch.Generator().manual_seed(1))

    def positions(doc):
        pos = torch.zeros_like(doc)
        for r in range(doc.shape[0]):
            for d in set(doc[r].tolist()):
                at = (doc[r] == d).nonzero().squeeze(-1)
                pos[r, at] = torch.arange(len(at))
        return pos

    def masked(doc):                                   # the mask path, forced
        with monkeypatch.context() as mp:
            init = m.Documents.__init__
            mp.setattr(m.Documents, "__init__", lambda self, d: (init(self, d), setattr(self, "single", False))[0])
            return model(ids, positions(doc), doc_ids=doc)

    def varlen(doc):
        with monkeypatch.context() as mp:
            mp.setattr(m, "varlen_attn", _reference_varlen)
            mp.setattr(m, "flash_varlen_applies", lambda q: True)
            return model(ids, positions(doc), doc_ids=doc)

    assert m.Documents(single).single and not m.Documents(packed).single
    for autocast in (False, True):
        tol = dict(atol=3e-2, rtol=0) if autocast else dict(atol=1e-5, rtol=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            causal = model(ids, positions(single), doc_ids=single)
            assert torch.allclose(causal[single >= 0], masked(single)[single >= 0], **tol)
            assert torch.allclose(varlen(packed)[packed >= 0], masked(packed)[packed >= 0], **tol)


def test_the_varlen_call_is_well_formed_forward_and_backward(monkeypatch):
    """`document_attention`'s call of torch's `varlen_attn` (CUDA-only) passes torch's own shape checks of
    the op, forward and backward, with grouped-query heads: run on meta tensors, where the op's
    registered fake kernels stand in for the flash ones."""
    from qiusuo import model as m

    if m.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    monkeypatch.setattr(m, "flash_varlen_applies", lambda q: True)
    doc = _packed_docs()
    B, T = doc.shape
    docs = m.Documents(doc)
    cu, longest = docs.runs()
    docs._runs = (cu.to("meta"), longest)
    q, k, v = (torch.randn(B, h, T, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for h in (14, 2, 2))
    y = m.document_attention(q, k, v, docs)
    assert (y.shape, y.dtype) == (q.shape, torch.bfloat16)
    y.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_the_decode_step_reads_nothing_back_when_given_its_span(tok):
    """What a CUDA graph needs of `DecodeWeights.step`: no op whose result the host waits for. On meta
    tensors (shapes, no values) any such op fails — as the step without `span` does, which reads the
    longest position back — so a step that runs there with `span` given is capturable."""
    model = tiny_model(tok).to("meta")
    weights = DecodeWeights(model, 128)
    cache = model.new_cache(4, 128)
    tokens = positions = torch.zeros(4, dtype=torch.long, device="meta")
    assert weights.step(tokens, positions, cache, 64).shape == (4, tok.vocab_size)
    with pytest.raises(Exception):
        weights.step(tokens, positions, cache)
