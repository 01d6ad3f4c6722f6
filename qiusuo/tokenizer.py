"""Tokenizer wrapper over the `tokenizers` library, plus chat formatting.

The tiny default is character level: every printable ASCII character is one token, plus the special
tokens the chat format needs. One token per character keeps arithmetic digit-aligned (a BPE that
merges "48" into one token makes carries much harder for a 1 M-parameter model to learn).

A real checkpoint's `tokenizer.json` loads through the same class. Its chat template comes from
`chat_template.jinja` (what current `transformers` writes) or `tokenizer_config.json` (a string, or a
list of named templates, of which "default" is used), and is rendered as
`transformers.AutoTokenizer.apply_chat_template` renders it: jinja2's ImmutableSandboxedEnvironment with
trim_blocks / lstrip_blocks, the `raise_exception`, `strftime_now` and `tojson` it defines, and the
special tokens (`bos_token`, `eos_token`, …) as variables. Its stop ids add the `eos_token_id` list of
`generation_config.json` (Llama-3 stops on three ids).

A chat is encoded so that a message's text is always text: the control tokens of the checkpoint (its
special tokens, and the added tokens its template writes, such as `<|im_end|>`, `<|start_header_id|>`
or R1's `<think>`) become tokens only where the template writes them. As transformers'
`apply_chat_template(..., sanitize_control_tokens=True)` does, control tokens inside the caller's
strings are wrapped in private-use markers before rendering, and the rendered text is encoded piece by
piece, the marked tokens as plain text (without matching any added token).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .rewards import ReasoningFormat

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


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or its template cannot be used (the server answers 4xx/5xx
    with this message rather than crashing)."""


_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
"""Private-use markers around a control token found in the caller's text (the ones transformers uses)."""


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment():
    """The sandboxed environment transformers renders chat templates in, with its globals and filters."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` (assistant-mask templates): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _template_literals(env, source: str) -> str:
    """The literal text of a template's source (its text and string constants), joined by NULs so that
    a search cannot match across two of them."""
    import jinja2.nodes

    ast = env.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


def _mark(obj, pattern: re.Pattern):
    """Wrap every control token in the strings of `obj` (nested lists / dicts; keys untouched) in the
    markers, after dropping any marker the caller wrote, so none can be forged."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, obj)
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


def check_text(text: str, what: str = "text") -> None:
    """Refuse text `tokenizers` cannot take (a lone surrogate, e.g. from JSON's "\\ud800") with a clear
    ValueError rather than its TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode ({e.reason} at position {e.start})") from None


class Tokenizer:
    """Text ↔ token ids, chat rendering, and the ids generation stops on."""

    def __init__(self, backend: HFTokenizer, config: dict, chat_template: str | None = None,
                 generation_eos: tuple[int, ...] = ()):
        """`chat_template` overrides `config`'s (a `chat_template.jinja`); `generation_eos` are the
        `eos_token_id`s of generation_config.json, added to the stop ids."""
        self.backend = backend
        self.config = config
        self.template_file = chat_template
        self.generation_eos = tuple(generation_eos)

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
        config = _read_json(folder / "tokenizer_config.json")
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.exists() else None
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos = tuple(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
        return cls(HFTokenizer.from_file(str(path)), config, template, eos)

    def save(self, folder: Path) -> None:
        """tokenizer.json, tokenizer_config.json and chat_template.jinja when the template came from one;
        stop ids read from a generation_config.json are merged into the folder's (`save_model` writes one
        with the model's single eos), so that the saved copy stops where this one does."""
        from .model import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(self.config, indent=2))
        if self.template_file is not None:
            atomic_write_text(folder / "chat_template.jinja", self.template_file)
        gen_path = folder / "generation_config.json"
        if self.generation_eos:
            gen = _read_json(gen_path)
            eos = gen.get("eos_token_id")
            eos = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
            merged = eos + [e for e in self.generation_eos if e not in eos]
            if merged != eos:
                gen["eos_token_id"] = merged
                atomic_write_text(gen_path, json.dumps(gen, indent=2))

    # --- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special(self, key: str) -> str | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):  # AddedToken serialised by transformers
            tok = tok.get("content")
        return tok or None

    def _special_id(self, key: str) -> int | None:
        tok = self._special(key)
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
        """Ids that end an assistant turn: eos, the pad/end-of-text token when distinct, and every
        `eos_token_id` of generation_config.json (Llama-3: end_of_text, eom and eot)."""
        ids = {self.eos_id, self.pad_id, *self.generation_eos}
        return tuple(sorted(i for i in ids if 0 <= i < self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in it become those tokens (for the caller's own
        markup — a user's text goes through `encode_plain` or `encode_chat`)."""
        check_text(text)
        # encode_batch releases the GIL while it works, which encode does not: the server tokenises
        # in worker threads
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    @cached_property
    def _plain_backend(self) -> HFTokenizer:
        """The same pipeline without any added token: a copy whose added-token list is empty."""
        spec = json.loads(self.backend.to_str())
        spec["added_tokens"] = []
        return HFTokenizer.from_str(json.dumps(spec))

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: no added token (special or not) is matched in it."""
        check_text(text)
        return self._plain_backend.encode_batch([text], add_special_tokens=False)[0].ids

    def completion_ids(self, text: str) -> list[int]:
        """Ids of a completion the model is trained to write (SFT targets): its own markup, such as the
        think tags, is tokenised as the model writes it."""
        return self.encode(text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _hidden_ids(self) -> frozenset[int]:
        """The special tokens a reply does not show: all but the think tags, which mark its reasoning."""
        fmt = ReasoningFormat()
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items()
                         if t.special and t.content not in (fmt.open, fmt.close))

    def decode_reply(self, ids) -> str:
        """The text of generated ids as a reply shows it: special tokens skipped, except think tags that
        are special tokens (so the reasoning can still be split from the answer)."""
        hidden = self._hidden_ids
        return self.backend.decode([i for i in ids if i not in hidden], skip_special_tokens=False)

    # --- chat ----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The template source: chat_template.jinja, else tokenizer_config.json's (a string, or the
        "default" of a list of named templates)."""
        if self.template_file is not None:
            return self.template_file
        src = self.config.get("chat_template")
        if isinstance(src, list):
            named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
            src = named.get("default")
            if src is None:
                raise ChatTemplateError(f"tokenizer_config.json's chat templates {sorted(map(str, named))} have "
                                        "no 'default'")
        return src or None

    @cached_property
    def _template(self):
        import jinja2

        src = self.chat_template
        if not src:
            raise ChatTemplateError("this checkpoint has no chat template (no chat_template.jinja and none in "
                                    "tokenizer_config.json)")
        try:
            template = _environment().from_string(src)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None
        return template

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        """bos_token, eos_token, … as strings: the variables transformers passes to a template."""
        keys = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        return {k: self._special(k) for k in keys if self._special(k)}

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokens that only the template may write: every special token, and the added tokens its
        literal text contains (except whitespace tokens, which templates hold as ordinary text)."""
        literals = _template_literals(self._template.environment, self.chat_template)
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values()
                     if t.special or (t.content in literals and not t.content.isspace()))

    @cached_property
    def _control_patterns(self) -> tuple[re.Pattern, re.Pattern]:
        longest = sorted(self.control_tokens, key=len, reverse=True)
        tokens = re.compile("|".join(map(re.escape, longest)) or "(?!)")
        marked = re.compile(f"{_MARK_START}({tokens.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        return tokens, marked

    def _render(self, messages, add_generation_prompt: bool, **kwargs) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **kwargs})

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The template's text for `messages`, as `apply_chat_template(..., tokenize=False)` gives it
        (`kwargs`: further template variables, e.g. tools)."""
        for m in messages:
            if isinstance(m.get("content"), str):
                check_text(m["content"], "a message's content")
        return self._render(messages, add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat, in which only the template's own markers are control tokens:
        a control token inside a message is encoded as plain text (see the module docstring). Equal to
        transformers' `apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`."""
        tokens_re, marked_re = self._control_patterns
        for m in messages:
            if isinstance(m.get("content"), str):
                check_text(m["content"], "a message's content")
        text = self._render(_mark(messages, tokens_re), add_generation_prompt, **_mark(kwargs, tokens_re))
        # [text, marked token, text, marked token, …]; None in place of the token for a lone marker
        pieces = marked_re.split(text)
        if len(pieces) == 1:
            return self.encode(text)
        ids = self.encode(pieces[0])
        newline = self.encode("\n")
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            encode = self.encode_plain if as_text else self.encode
            # after a newline, as transformers does (a SentencePiece tokenizer adds a space at the start)
            got = encode("\n" + piece)
            got = got[len(newline):] if got[:len(newline)] == newline else encode(piece)
            if as_text and self.token_id(piece) in got:
                raise ChatTemplateError(f"cannot encode {piece!r} as text: the tokenizer makes it from plain text")
            ids += got
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a one-turn user prompt, ready for the assistant's reply."""
        return self.encode_chat([{"role": "user", "content": prompt}])

    @cached_property
    def reasoning(self) -> ReasoningFormat:
        """How this checkpoint writes its reasoning: the think tags, whether each is one token, whether
        the generation prompt already opens the think block (R1-distill), and strict (the tiny character
        tokenizer's exact format) or lenient (a real checkpoint's, whitespace around tags allowed)."""
        fmt = ReasoningFormat()
        special = all(self.token_id(t) is not None for t in (fmt.open, fmt.close))
        try:
            prompt = self.render_chat([{"role": "user", "content": "1+1"}], add_generation_prompt=True)
        except Exception:  # no template, or one that needs more: no opening is known
            prompt = ""
        strict = isinstance(self.backend.model, models.WordLevel)
        return ReasoningFormat(special=special, opens_think=prompt.rstrip().endswith(fmt.open), strict=strict)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}
