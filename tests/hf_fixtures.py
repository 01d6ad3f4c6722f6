"""Small real-format checkpoints, built by `transformers` itself, for tests of every stage.

No model hub here: each builder writes, into a folder, a random model saved with `save_pretrained` and
a byte-level BPE tokenizer trained with `tokenizers` on `CORPUS`, wrapped as
`PreTrainedTokenizerFast` and saved with `save_pretrained` — so the files are exactly what current
`transformers` writes for a real checkpoint (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`). The chat templates are the ones the real models ship, byte for byte
(`tests/fixtures/chat_templates/`, see `TEMPLATES`); the added tokens carry the real models' names and
special / non-special flags (their ids are small here).

| builder | like | model | embeddings | chat template | stop ids |
| --- | --- | --- | --- | --- | --- |
| `qwen25_checkpoint` | Qwen2.5-Instruct | Qwen2, q/k/v bias, vocab padded past the tokenizer | tied | ChatML with default system prompt and tools | `<|im_end|>`, `<|endoftext|>` |
| `llama3_checkpoint` | Llama-3.1/3.2-Instruct | Llama, `rope_scaling` llama3 (original window 64) | untied | header ids, `strftime_now` date (3.2) | `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>` |
| `r1_distill_checkpoint` | DeepSeek-R1-Distill-Qwen | Qwen2 | untied | opens the assistant turn with `<think>\\n` | `<｜end▁of▁sentence｜>` |

Common keyword arguments (stable; other test files rely on them):
- `shard_size`: `max_shard_size` for `save_pretrained` (e.g. `"60KB"`): several shards and an index.
- `template_location`: `"jinja"` (chat_template.jinja, what `save_pretrained` writes today), `"config"`
  (a string in tokenizer_config.json) or `"named"` (tokenizer_config.json's list of named templates:
  "default" plus a "tool_use" copy).
- `seed`: weights' seed. `dims`: overrides of the model's shape (hidden_size, num_hidden_layers, …).
- `dtype`: the weights' dtype on disk (float32; bfloat16 like real checkpoints).

Each returns the folder. The models are tiny (hidden 64, 2 layers, vocabulary ~ 500) so a builder runs
in well under a second; biases and norm gains are perturbed so that tests exercise them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TEMPLATE_DIR = Path(__file__).parent / "fixtures" / "chat_templates"
TEMPLATES = {name: (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
             for name in ("qwen2.5-instruct", "llama-3.1-instruct", "llama-3.2-instruct", "deepseek-r1-distill")}
"""The chat templates of Qwen2.5-Instruct, Llama-3.1-8B-Instruct, Llama-3.2-1B-Instruct and every
DeepSeek-R1-Distill checkpoint, as shipped."""

# Pre-tokenizer split patterns of the two families (Qwen2 splits digits one by one, Llama-3 in threes).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CORPUS = """\
A conversation between User and Assistant. The user asks a question, and the Assistant solves it.
The assistant first thinks about the reasoning process in the mind and then provides the user with
the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer>
tags, respectively. Let me solve this step by step. First, add the ones: 7 + 5 = 12, write 2 carry 1.
Then the tens: 4 + 3 + 1 = 8. So 47 + 35 = 82. Wait, let me check: 82 - 35 = 47. Yes, that is right.
What is 12 * 13? 12 * 13 = 156. Reach 24 with 3 7 2 8: (7 - 3) * (8 - 2) = 24. The answer is 24.
Solve for x: 3x + 5 = 20, so 3x = 15 and x = 5. Sort 9 4 7 1 ascending: 1 4 7 9.
You are a helpful assistant. Hello! How can I help you today? Please reason step by step, and put your
final answer within \\boxed{}. The final answer is \\boxed{42}. Natalia sold clips to 48 of her friends
in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?
In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. #### 72
def add(a, b):
    return a + b
print(add(2, 3))  # 5
The café serves crème brûlée; naïve résumé. 猫は可愛い。 数学 推理 答案 思考 我们 你好 世界
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -7 1/2 0.5 \\frac{1}{2} x^2 + y^2 = z^2
"""


@functools.lru_cache(maxsize=None)
def _bpe_json(split: str, normalize: bool, specials: tuple[str, ...], added: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if normalize:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok.to_str()


def bpe_tokenizer(specials=(), added=(), split: str = QWEN2_SPLIT, normalize: bool = True, vocab_size: int = 480):
    """A byte-level BPE trained on `CORPUS` (Qwen2- or Llama-3-style splitting), then `specials` added as
    special tokens and `added` as ordinary added tokens, in that order (a fresh `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_bpe_json(split, normalize, tuple(specials), tuple(added), vocab_size))


def _save_tokenizer(folder: Path, backend, template: str, template_location: str, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    if template_location not in ("jinja", "config", "named"):
        raise ValueError(f"template_location must be jinja, config or named, not {template_location!r}")
    chat_template = {"default": template, "tool_use": template} if template_location == "named" else template
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **special)
    fast.save_pretrained(folder, save_jinja_files=template_location == "jinja")


def _save_model(folder: Path, model, shard_size, dtype, eos_ids, **gen) -> None:
    with torch.no_grad():  # perturb what random init leaves at 0 or 1, so tests see biases and norm gains
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = eos_ids
    for key, value in gen.items():
        setattr(model.generation_config, key, value)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size or "1GB")


def _dims(vocab_size: int, dims: dict | None, **defaults) -> dict:
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **defaults)
    shape.update(dims or {})
    return shape


QWEN25_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN25_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>")


def qwen25_checkpoint(folder, *, tied: bool = True, shard_size=None, template_location: str = "jinja",
                      seed: int = 0, dims: dict | None = None, dtype=torch.float32) -> Path:
    """A Qwen2.5-Instruct-style checkpoint (see the module docstring)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    backend = bpe_tokenizer(QWEN25_SPECIALS, QWEN25_ADDED)
    ids = {t: backend.token_to_id(t) for t in QWEN25_SPECIALS}
    _save_tokenizer(folder, backend, TEMPLATES["qwen2.5-instruct"], template_location,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    # the embedding has more rows than the tokenizer has tokens, as Qwen2.5's (151936 vs 151665)
    vocab = -(-backend.get_vocab_size() // 64) * 64 + 64
    torch.manual_seed(seed)
    cfg = Qwen2Config(**_dims(vocab, dims), tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    _save_model(folder, Qwen2ForCausalLM(cfg), shard_size, dtype, [ids["<|im_end|>"], ids["<|endoftext|>"]],
                pad_token_id=ids["<|endoftext|>"], do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    return folder


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""Llama-3.1's rope scaling with its original window shrunk to 64 positions, so tests reach past it.
With head_dim 16 the eight frequencies fall in all three bands: kept, smoothed and divided by 8."""


def llama3_checkpoint(folder, *, version: str = "3.2", shard_size=None, template_location: str = "jinja",
                      seed: int = 0, dims: dict | None = None, dtype=torch.float32, rope: dict | None = None) -> Path:
    """A Llama-3.x-Instruct-style checkpoint, untied, with `rope_scaling` llama3 (`rope`, default
    `LLAMA3_ROPE`) and Llama-3.1/3.2's stop ids; `version` picks the 3.1 or 3.2 chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    backend = bpe_tokenizer(LLAMA3_SPECIALS, split=LLAMA3_SPLIT, normalize=False)
    ids = {t: backend.token_to_id(t) for t in LLAMA3_SPECIALS}
    _save_tokenizer(folder, backend, TEMPLATES[f"llama-{version}-instruct"], template_location,
                    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**_dims(backend.get_vocab_size(), dims), tie_word_embeddings=False,
                      rope_parameters=dict(rope or LLAMA3_ROPE), attention_bias=False, mlp_bias=False,
                      bos_token_id=ids["<|begin_of_text|>"],
                      eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]])
    _save_model(folder, LlamaForCausalLM(cfg), shard_size, dtype,
                [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
                bos_token_id=ids["<|begin_of_text|>"], do_sample=True, temperature=0.6, top_p=0.9)
    return folder


R1_SPECIALS = ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")
R1_ADDED = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>")
"""As in DeepSeek-R1-Distill-Qwen: only bos/eos are special; the role markers and think tags are
ordinary added tokens (which the chat must still never let a user's text produce)."""


def r1_distill_checkpoint(folder, *, shard_size=None, template_location: str = "jinja", seed: int = 0,
                          dims: dict | None = None, dtype=torch.float32) -> Path:
    """A DeepSeek-R1-Distill-Qwen-style checkpoint: Qwen2, untied, a template whose generation prompt
    ends in `<think>\\n`, so every completion starts inside the reasoning."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    backend = bpe_tokenizer(R1_SPECIALS, R1_ADDED)
    eos, bos = (backend.token_to_id(t) for t in R1_SPECIALS)
    _save_tokenizer(folder, backend, TEMPLATES["deepseek-r1-distill"], template_location,
                    bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                    pad_token="<｜end▁of▁sentence｜>")
    torch.manual_seed(seed)
    cfg = Qwen2Config(**_dims(backend.get_vocab_size(), dims), tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      bos_token_id=bos, eos_token_id=eos)
    _save_model(folder, Qwen2ForCausalLM(cfg), shard_size, dtype, eos, bos_token_id=bos, do_sample=True,
                temperature=0.6, top_p=0.95)
    return folder


BUILDERS = {"qwen2.5": qwen25_checkpoint, "llama3": llama3_checkpoint, "r1-distill": r1_distill_checkpoint}


def build_checkpoint(style: str, folder, **kw) -> Path:
    """`BUILDERS[style](folder, **kw)`: "qwen2.5", "llama3" or "r1-distill"."""
    return BUILDERS[style](folder, **kw)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
