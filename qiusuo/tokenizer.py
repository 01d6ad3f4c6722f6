"""Tokenizer wrapper over the `tokenizers` library, plus chat formatting.

The tiny default is character level: every printable ASCII character is one token, plus the special
tokens the chat format needs. One token per character keeps arithmetic digit-aligned (a BPE that
merges "48" into one token makes carries much harder for a 1 M-parameter model to learn).

A real checkpoint's `tokenizer.json` loads through the same class, and its chat template is rendered
from its `tokenizer_config.json` with jinja2, the way `transformers` renders it.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

PAD, UNK, END, SYSTEM, USER, ASSISTANT = "<|endoftext|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL = [PAD, UNK, END, SYSTEM, USER, ASSISTANT]
TAGS = [THINK, THINK_END, ANSWER, ANSWER_END]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# The same template `transformers` applies (AutoTokenizer.apply_chat_template) and qiusuo renders.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(extra_chars: str = "") -> HFTokenizer:
    """A character-level tokenizer: specials, the four reasoning tags, printable ASCII, then any other
    characters a corpus needs (`extra_chars`, e.g. Chinese), in sorted order after ASCII so the ids of
    an ASCII-only vocabulary do not change."""
    extra = sorted(set(extra_chars) - set(CHARS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + TAGS + CHARS + extra)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Split every character into its own piece; `[\s\S]` includes newlines.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    # The tags are ordinary added tokens: they survive decode(skip_special_tokens=True), so the
    # reasoning can still be split from the answer.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


class Tokenizer:
    """Text ↔ token ids, chat rendering, and the ids generation stops on."""

    def __init__(self, backend: HFTokenizer, config: dict):
        self.backend = backend
        self.config = config

    # --- construction / files ------------------------------------------------------------------
    @classmethod
    def char_level(cls, model_max_length: int = 512, extra_chars: str = "") -> "Tokenizer":
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": END,
            "pad_token": PAD,
            "unk_token": UNK,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "padding_side": "left",
        }
        return cls(build_char_tokenizer(extra_chars), config)

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        cfg_path = folder / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        return cls(HFTokenizer.from_file(str(path)), config)

    def save(self, folder: Path) -> None:
        from .model import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(self.config, indent=2))

    # --- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, key: str) -> int | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):  # AddedToken serialised by transformers
            tok = tok.get("content")
        return self.token_id(tok) if tok else None

    @cached_property
    def eos_id(self) -> int:
        eos = self._special_id("eos_token")
        if eos is None:
            raise ValueError("tokenizer has no eos_token")
        return eos

    @cached_property
    def pad_id(self) -> int:
        pad = self._special_id("pad_token")
        return self.eos_id if pad is None else pad

    @cached_property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: eos plus the pad/end-of-text token when distinct."""
        return tuple(sorted({self.eos_id, self.pad_id}))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ----------------------------------------------------------------------------------
    @cached_property
    def _template(self):
        import jinja2

        src = self.config.get("chat_template")
        if not src:
            raise ValueError("tokenizer_config.json has no chat_template")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(src)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.config.get("bos_token") or "",
                                     eos_token=self.config.get("eos_token") or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a one-turn user prompt, ready for the assistant's reply."""
        return self.encode_chat([{"role": "user", "content": prompt}])
