"""Decoder-only transformer of the Llama / Qwen2 family, with Hugging Face checkpoint I/O.

Architecture (as in Qwen2 / Llama): token embedding → N × [RMSNorm → grouped-query attention with
rotary position embeddings (optional q/k/v bias) → residual → RMSNorm → SwiGLU MLP → residual] →
RMSNorm → LM head (optionally tied to the embedding).

Parameter names equal those of `transformers`' `Qwen2ForCausalLM` / `LlamaForCausalLM`, so a
checkpoint is a plain `model.safetensors` plus a `config.json` that `AutoModelForCausalLM` loads.
A model with q/k/v bias is written as Qwen2, one without as Llama (Qwen2 always has the bias).

The model knows nothing of text or data: it maps token ids (and an optional KV cache) to logits.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Shape of the transformer. Field names follow `transformers`' config.json."""

    vocab_size: int = 64
    """Rows of the embedding table (the tokenizer's vocabulary size)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the SwiGLU hidden layer."""
    num_hidden_layers: int = 4
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention: each serves heads/kv_heads query heads)."""
    max_position_embeddings: int = 512
    """Longest sequence the model is meant for (and the default KV-cache length)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: dict | None = None
    """Rotary frequency scaling as in config.json (`rope_type` "linear" or "llama3" with its keys), or
    None; `rope_inv_freq` applies it."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    qkv_bias: bool = True
    """Bias on the q/k/v projections (Qwen2: yes, Llama: no)."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    # --- Hugging Face config.json -------------------------------------------------------------
    def to_hf(self) -> dict:
        arch, model_type = ("Qwen2ForCausalLM", "qwen2") if self.qkv_bias else ("LlamaForCausalLM", "llama")
        cfg = {
            "architectures": [arch],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        if model_type == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return cfg

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """The config of a Qwen2 / Llama checkpoint; anything qiusuo does not implement is refused with a
        ValueError naming the setting (`unsupported`), so a checkpoint never loads into a wrong model."""
        problem = unsupported(cfg)
        if problem:
            raise ValueError(problem)
        model_type = cfg["model_type"]
        theta, scaling = _rope_settings(cfg)
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        kwargs.update(
            rope_theta=theta,
            rope_scaling=scaling,
            eos_token_id=eos,
            # Qwen2 always has the q/k/v bias (transformers ignores attention_bias there)
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            head_dim=cfg.get("head_dim") or 0,
            # transformers' default for both families when config.json leaves it out
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )
        return cls(**kwargs)


ROPE_TYPES = ("default", "linear", "llama3")
"""The `rope_type`s `rope_inv_freq` implements."""
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either layout of config.json: `rope_theta` and
    `rope_scaling` (transformers 4, older checkpoints) or `rope_parameters` holding both (transformers 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = params.get("rope_theta") or cfg.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return float(theta), scaling


def unsupported(cfg: dict) -> str | None:
    """One line naming the first setting of a Hugging Face config.json that qiusuo does not implement,
    or None when it implements them all."""
    model_type = cfg.get("model_type")
    if model_type not in ("qwen2", "llama"):
        return f"model_type {model_type!r} is not supported: qiusuo loads qwen2 and llama checkpoints"
    if cfg.get("use_sliding_window"):
        return "use_sliding_window: true is not supported (qiusuo implements full attention only)"
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer_types {sorted(set(layer_types))} are not supported (qiusuo implements full_attention only)"
    for key in _MOE_KEYS:
        if cfg.get(key):
            return f"{key} = {cfg[key]!r}: mixture-of-experts models are not supported"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act {cfg['hidden_act']!r} is not supported (qiusuo implements silu)"
    if cfg.get("mlp_bias"):
        return "mlp_bias: true is not supported"
    if cfg.get("quantization_config"):
        return "quantization_config: quantized checkpoints are not supported"
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        return f"partial_rotary_factor {cfg['partial_rotary_factor']} is not supported"
    if cfg.get("attention_bias") and model_type == "llama":
        return "attention_bias: true is not supported for llama (it also puts a bias on o_proj)"
    _, scaling = _rope_settings(cfg)
    if scaling is not None:
        kind = scaling["rope_type"]
        if kind not in ROPE_TYPES:
            return f"rope_scaling type {kind!r} is not supported (qiusuo implements {', '.join(ROPE_TYPES)})"
        need = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                              if kind == "llama3" else ())
        missing = [k for k in need if scaling.get(k) is None]
        if missing:
            return f"rope_scaling {kind!r} lacks {', '.join(missing)}"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / rms(x), with the statistics in fp32 as transformers computes them (so bf16 runs
    match it too); for fp32 inputs the casts are skipped."""
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] (fp32) of `cfg`: θ^(−2i/d), then `rope_scaling`
    as transformers applies it — "linear" divides every frequency by `factor`; "llama3" (Llama 3.1)
    divides the low frequencies (wavelength above original_max_position_embeddings / low_freq_factor)
    by `factor`, keeps the high ones (wavelength below original / high_freq_factor) and interpolates
    smoothly in between. The one source of rotary frequencies, for training and decoding alike."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind, factor = s["rope_type"], float(s["factor"])
    if kind == "linear":
        return inv / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (qiusuo implements {', '.join(ROPE_TYPES)})")
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for `positions` [B, T] → each [B, 1, T, head_dim] (HF's half-split layout), from
    `rope_inv_freq`'s frequencies."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys and values of every layer in one buffer `kv`:
    [layers, 2, B, kv_heads, max_len, head_dim], keys at [:, 0] (`k`), values at [:, 1] (`v`). One
    buffer lets a decode step store a token's key and value with a single write, and keeps each
    (row, kv head)'s keys contiguous so attention can run as one batched matmul over B × kv_heads.

    Rows are right-aligned from position 0, so a token's cache index *is* its position: a row of
    length n holds its keys at [0, n) and writes its next one at n. Rows of different lengths share
    the buffer; each query attends only to keys at or before its own position."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, zeroed: bool = True):
        """`zeroed=False` leaves the buffer uninitialised: only for readers that never look past a
        row's own positions (the C step). A buffer this large comes fresh from mmap, so its pages are
        not even touched until a position is written: admitting rows costs nothing and the RSS
        counts only the positions in use. The PyTorch step, which masks rather than skips the
        positions beyond a row, needs zeros (0 · NaN would poison it)."""
        shape = (cfg.num_hidden_layers, 2, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.kv = (torch.zeros if zeroed else torch.empty)(shape, device=device, dtype=dtype)

    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> int:
        """Store k/v [B, kv, T, D] of tokens at `positions` [B, T]; return the key length to attend to.
        Two shapes occur: a prefill from position 0 (T ≥ 1, same positions on every row) and a decode
        step (T = 1, each row at its own position)."""
        T = k.shape[2]
        if T == 1:
            rows = torch.arange(k.shape[0], device=k.device)
            pos = positions[:, 0]
            self.kv[layer, :, rows, :, pos] = torch.stack([k[:, :, 0], v[:, :, 0]], dim=1)
            return int(pos.max()) + 1
        self.kv[layer, 0, :, :, :T] = k
        self.kv[layer, 1, :, :, :T] = v
        return T


try:  # flash attention over variable-length sequences (CUDA, fp16 / bf16); absent in older torch
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


class Documents:
    """Where the documents of packed training rows lie, from `doc_ids` [B, T] (−1: padding; each
    document, and the padding, a contiguous run of a row). Worked out once per forward and shared
    by every layer, so the one host sync (whether any row holds several documents; the longest run)
    happens once, and the mask or the run boundaries are built once, on first use."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        doc = doc_ids
        # a row holds one document when no token starts a document after the row's first token
        # (padding may follow it: a causal query never sees the keys after it)
        self.single = not bool(((doc[:, 1:] != doc[:, :-1]) & (doc[:, 1:] >= 0)).any())
        self._mask = self._runs = None

    def mask(self) -> torch.Tensor:
        """Block-diagonal causal mask [B, 1, T, T]: query t sees key s ≤ t of its own document."""
        if self._mask is None:
            doc, T = self.doc_ids, self.doc_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
            self._mask = (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]
        return self._mask

    def runs(self) -> tuple[torch.Tensor, int]:
        """(cumulative run starts [N + 1] int32 over the B·T tokens flattened row by row, longest run):
        each document — and each stretch of padding — is one sequence of `varlen_attn`."""
        if self._runs is None:
            doc = self.doc_ids
            start = torch.ones_like(doc, dtype=torch.bool)
            start[:, 1:] = doc[:, 1:] != doc[:, :-1]
            starts = start.flatten().nonzero().squeeze(-1)
            cu = torch.cat([starts, starts.new_tensor([doc.numel()])]).to(torch.int32)
            self._runs = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._runs


def flash_varlen_applies(q: torch.Tensor) -> bool:
    """Whether `varlen_attn` (flash attention over packed sequences) takes these queries: torch has
    it, they are on a CUDA device of compute capability 8.0 or later (Ampere on: the flash kernels'
    floor) in fp16 / bf16, and the head width is one the flash kernels support."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and _capability(q.device.index or 0) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents | None) -> torch.Tensor:
    """Causal attention within each document: q [B, H, T, D], k/v [B, KV, T, D] → [B, H, T, D].

    Three ways to the same outputs at every document token (padding outputs are never read):
    - no `docs`, or one document per row: SDPA with `is_causal` — no mask, so the flash kernel on CUDA;
    - several documents per row, on CUDA in fp16 / bf16: `varlen_attn`, each document (and each
      stretch of padding) a sequence of its own — flash attention with no T × T mask;
    - otherwise: SDPA with the boolean block-diagonal mask (`Documents.mask`)."""
    B, H, T, D = q.shape
    gqa = k.shape[1] != H
    if docs is None or docs.single:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    if flash_varlen_applies(q):
        cu, longest = docs.runs()
        flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)   # [B·T, heads, D]
        y = varlen_attn(flat(q), flat(k), flat(v), cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=gqa)
        return y.view(B, T, H, D).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask(), enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, attn_mask, positions, docs=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        # under autocast the projections are bf16 but the rotary tables fp32: one dtype for the kernels
        # (what autocast would cast SDPA's inputs to; varlen_attn is not on its lists)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            S = cache.write(layer, k, v, positions)
            k, v = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]
        if attn_mask is None:
            y = document_attention(q, k, v, docs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache, attn_mask, positions, docs=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, attn_mask, positions, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`forward(ids, positions=None, cache=None, doc_ids=None) -> logits [B, T, V]`.

    - Training / scoring: `ids` right-padded [B, T], no cache; causal attention from position 0.
    - Packed training: several documents per row; `doc_ids` [B, T] keeps attention inside each
      document (`document_attention`) and `positions` restart at 0 for each.
    - Generation with a `KVCache`: a prefill writes right-padded prompts [B, T] from position 0
      (padding keys are overwritten by later tokens before any real query can see them); a decode
      step feeds one token per row at that row's own position `positions` [B, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Scale residual-branch outputs down with depth (GPT-2 style) so a fresh deep model trains stably.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, ids, positions=None, cache: KVCache | None = None, doc_ids=None):
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config, ids.device), x.dtype)
        attn_mask = docs = None
        if doc_ids is not None:
            docs = Documents(doc_ids)   # packed training rows: causal attention within each document
        elif cache is not None and T == 1:
            # Decode: each row sees its keys up to and including its own position.
            S = int(positions.max()) + 1
            attn_mask = (torch.arange(S, device=ids.device)[None, :] <= positions)[:, None, None, :]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache, attn_mask, positions, docs)
        return self.model.norm(x)

    def forward(self, ids, positions=None, cache: KVCache | None = None, doc_ids=None, select=None):
        """Logits [B, T, V]; with `select` (flat indices into the B·T outputs) only those, [n, V] — the
        head runs where a loss needs it. Through `forward` so DDP / FSDP wrappers see the whole pass."""
        h = self.hidden(ids, positions, cache, doc_ids)
        if select is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, select)
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int | None = None, zeroed: bool = True) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len or self.config.max_position_embeddings, p.device, p.dtype, zeroed)


@torch.no_grad()
def fused_decode_layers(model: "Transformer") -> tuple[list[tuple], torch.Tensor]:
    """The weights of a one-token decode step, in Linear layout [out, in], copied from the live
    parameters: per layer q|k|v with the input RMSNorm's weight folded in, W·(w ⊙ x/rms) = (W·diag w)·x/rms,
    and its bias (zeros without one), o, gate|up with the post-attention norm folded in, and down;
    then the LM head with the final norm folded in [vocab, hidden]. Both decode steps (`DecodeWeights`,
    `native.NativeWeights`) lay these out their own way."""
    cfg = model.config
    fused = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) * layer.input_layernorm.weight
        qkv_b = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if cfg.qkv_bias
                 else qkv_w.new_zeros(qkv_w.shape[0]))
        gu_w = torch.cat([m.gate_proj.weight, m.up_proj.weight]) * layer.post_attention_layernorm.weight
        fused.append((qkv_w, qkv_b, a.o_proj.weight, gu_w, m.down_proj.weight))
    return fused, model.lm_head.weight * model.model.norm.weight


def decode_rotary(cfg: ModelConfig, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of the decode steps, [max_len, head_dim] each: rotate_half(y) = [−y₂, y₁] per head
    becomes y gathered by a fixed column permutation (`DecodeWeights.perm`) times a sin table that
    carries the sign."""
    half = cfg.head_dim // 2
    cos, sin = rope_cos_sin(torch.arange(max_len, device=device)[None], rope_inv_freq(cfg, device), dtype)
    return cos[0, 0], sin[0, 0] * torch.cat([-torch.ones(half), torch.ones(half)]).to(device, dtype)


class DecodeWeights:
    """The model's weights laid out for one-token decode steps in PyTorch (any device, any dtype),
    where a small model is dominated by per-op overhead rather than arithmetic, so the step is
    written in as few ops as the maths allows:

    - q/k/v and gate/up are fused into one matmul each, with weights stored transposed ([in, out]),
      RMSNorm's weight folded in (`fused_decode_layers`); the 1/rms factor scales the matmul's output
      rows (one fused multiply-add with the bias).
    - Rotary embedding on q and k is one gather and two multiplies over the whole q|k|v row
      (`decode_rotary`); the v columns get cos = 1, sin = 0, so the rotated row holds k|v ready for a
      single cache write.
    - Residual adds ride on `addmm`; attention is baddbmm → softmax → bmm over B × kv_heads (faster
      than SDPA's kernels for one query row over keys of several lengths), grouped-query heads
      sharing their kv head.

    Built from the live parameters (a copy, one pass over the weights), in the model's dtype or
    `dtype` (bf16 decoding over an fp32 master model: the norms are folded in before the cast):
    rebuild after the weights change (`Engine.decode_weights` does, and reuses it while they do
    not). Positions up to `max_len`. Logits equal `Transformer.forward`'s up to float rounding. The
    C kernel's layout of the same weights is `native.NativeWeights`.

    A step issues no host synchronisation when the caller gives `span`, so a CUDA graph can capture
    it (`engine.StepRunner`, which keeps its own copy at fixed addresses: `clone`, `copy_`)."""

    @torch.no_grad()
    def __init__(self, model: "Transformer", max_len: int, dtype: torch.dtype | None = None):
        cfg = model.config
        self.cfg, self.max_len = cfg, max_len
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dtype = dtype or model.model.embed_tokens.weight.dtype
        # a copy like every other weight here, so a copy kept past a weight change is the old model
        # in full rather than old layers behind a new embedding
        self.embed = model.model.embed_tokens.weight.detach().to(dtype, copy=True)
        device = self.embed.device
        fused, head = fused_decode_layers(model)
        self.cos, self.sin = decode_rotary(cfg, max_len, device, dtype)
        half = D // 2
        within = torch.cat([torch.arange(half, D), torch.arange(half)])
        self.perm = (torch.arange(H + 2 * KV)[:, None] * D + within).flatten().to(device)
        self.eps = torch.tensor(cfg.rms_norm_eps, dtype=torch.float32, device=device)
        self.layers = [tuple(w.to(dtype) for w in (q.t().contiguous(), b, o.t().contiguous(), g.t().contiguous(),
                                                   d.t().contiguous()))
                       for q, b, o, g, d in fused]
        self.head = head.t().contiguous().to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step reads, in a fixed order."""
        return [self.embed, self.cos, self.sin, self.perm, self.eps, self.head, *(t for l in self.layers for t in l)]

    def clone(self) -> "DecodeWeights":
        """A copy in new memory (for a holder that needs the weights at addresses of its own)."""
        twin = object.__new__(DecodeWeights)
        twin.__dict__.update(self.__dict__)
        twin.embed, twin.cos, twin.sin, twin.perm, twin.eps, twin.head = (
            t.clone() for t in (self.embed, self.cos, self.sin, self.perm, self.eps, self.head))
        twin.layers = [tuple(t.clone() for t in layer) for layer in self.layers]
        return twin

    def fits(self, other: "DecodeWeights") -> bool:
        """Whether `copy_(other)` can take `other`: the same tensors' shapes and dtypes."""
        return [(t.shape, t.dtype) for t in self.tensors()] == [(t.shape, t.dtype) for t in other.tensors()]

    @torch.no_grad()
    def copy_(self, other: "DecodeWeights") -> "DecodeWeights":
        """Take `other`'s values in place (the addresses stay: a captured step reads the new weights)."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    def _inv_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / rms(x) per row [B, 1] (statistics in fp32, as transformers computes them)."""
        n = torch.linalg.vector_norm(x, 2, -1, True, dtype=torch.float32)
        r = torch.addcmul(self.eps, n, n, value=1 / x.shape[-1]).rsqrt_()
        return r if x.dtype == torch.float32 else r.to(x.dtype)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int | None = None) -> torch.Tensor:
        """One decode step: tokens [B] at positions [B] → next-token logits [B, V]; writes the cache.
        Row b of the batch is cache row b; the cache may hold more rows than B (the rest are idle).
        `span`: keys to attend over, at least max(positions) + 1 — given by a caller that knows the
        positions on the host, so a GPU step does not wait to read them back."""
        cfg = self.cfg
        B, H, KV, D = tokens.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        N, G, L, capacity = H + 2 * KV, H // KV, cache.max_len, cache.batch
        S = span or int(positions.max()) + 1
        # Per-step tables shared by every layer. Rotary factors over the q|k|v row (v: cos 1, sin 0):
        one, zero = self.cos.new_ones(1, 1, D).expand(B, KV, D), self.cos.new_zeros(1, 1, D).expand(B, KV, D)
        cos = torch.cat([self.cos.index_select(0, positions)[:, None].expand(B, H + KV, D), one], 1).view(B, N * D)
        sin = torch.cat([self.sin.index_select(0, positions)[:, None].expand(B, H + KV, D), zero], 1).view(B, N * D)
        # The keys a row may see, its positions up to the current one: additive mask [B·KV, 1, S].
        hide = torch.arange(S, device=tokens.device)[None] > positions[:, None]
        bias = self.cos.new_zeros(B, S).masked_fill_(hide, float("-inf"))[:, None].expand(B, KV, S).reshape(B * KV, 1, S)
        # Where each row's new key and value go in a layer's cache, viewed as [2·B·KV·L, D] rows.
        b, c, h = torch.arange(B, device=tokens.device), torch.arange(2, device=tokens.device), torch.arange(KV, device=tokens.device)
        slot = (((c[None, :, None] * capacity + b[:, None, None]) * KV + h[None, None, :]) * L
                + positions[:, None, None]).flatten()
        x = self.embed.index_select(0, tokens)                                     # [B, hidden]
        for i, (qkv_t, qkv_b, o_t, gu_t, down_t) in enumerate(self.layers):
            y = torch.addcmul(qkv_b, torch.mm(x, qkv_t), self._inv_rms(x))        # q|k|v [B, N·D]
            y = torch.addcmul(y * cos, y.index_select(1, self.perm), sin)        # rotary on q and k
            y = y.view(B, N, D)
            layer = cache.kv[i]                                                    # [2, B, KV, L, D]
            layer.view(-1, D).index_copy_(0, slot, y[:, H:].reshape(-1, D))        # k and v, one write
            keys = layer[0, :B].view(B * KV, L, D)[:, :S]                          # views, no copy
            values = layer[1, :B].view(B * KV, L, D)[:, :S]
            q = y[:, :H].reshape(B * KV, G, D)       # the G query heads of a kv head share its keys
            att = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=D ** -0.5).softmax(-1)
            x = torch.addmm(x, torch.bmm(att, values).view(B, H * D), o_t)
            gu = torch.mm(x * self._inv_rms(x), gu_t)
            x = torch.addmm(x, F.silu(gu[:, :gu.shape[1] // 2]).mul_(gu[:, gu.shape[1] // 2:]), down_t)
        return torch.mm(x * self._inv_rms(x), self.head)


# --- checkpoint I/O in the Hugging Face layout -------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a killed process leaves
    either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda p: p.write_text(text))


def save_model(model: Transformer, out_dir: Path, generation_config: dict | None = None) -> None:
    """Write config.json, model.safetensors and generation_config.json (each atomically)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _atomic_write(out_dir / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(out_dir / "config.json", json.dumps(model.config.to_hf(), indent=2))
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
           "pad_token_id": model.config.pad_token_id, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    gen.update(generation_config or {})
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt."""


class UnsupportedModel(ValueError):
    """A well-formed checkpoint of an architecture or setting qiusuo does not implement."""


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = ckpt / "model.safetensors", ckpt / "model.safetensors.index.json"
    try:
        if single.exists():
            return load_file(str(single))
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(ckpt / shard)))
            return state
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise CheckpointError(f"{ckpt}: cannot read weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


def load_model(ckpt: Path, device="cpu", dtype=torch.float32) -> Transformer:
    """Load a Qwen2 / Llama checkpoint folder written by qiusuo or by `transformers`."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt}: not a checkpoint (no config.json)")
    try:
        hf = json.loads((ckpt / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt}/config.json is not valid JSON: {e}") from e
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as e:
        raise UnsupportedModel(f"{ckpt}: {e}") from None
    state = _read_weights(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    # Rotary inverse frequencies are recomputed, never loaded.
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match config (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)

