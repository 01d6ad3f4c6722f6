"""Dataset files for `--data`: JSONL (or a JSON array), Parquet, a `datasets.save_to_disk` folder or a
folder of `<split>-*.parquet` shards (a Hub dataset repository as downloaded) → math problems (for
`grpo` and `eval`) or prompt → response pairs (for `sft`). docs/design.md §6.

Rows are dicts; which fields hold what is configurable (`DataOptions`), with defaults that read GSM8K
(`question`, `answer` with `#### 42`), MATH (`problem`, `solution` with `\\boxed{}`, `level`), MATH-500
(`problem`, `answer`), verl-style files (`prompt`, `data_source`) and chat sets (`messages`). The prompt
template is

- `chat`: the checkpoint's chat template, the question as the user turn;
- `chat_boxed`: the same, plus "put your final answer within \\boxed{}" (the Qwen2.5-Math and
  DeepSeek-R1 evaluation prompt);
- `r1_zero`: the R1-Zero template of the paper (docs/design.md §3) as plain text, no chat template — for base
  models; an answer then counts only inside `<answer>…</answer>`;
- any other string: a plain-text template with `{question}`.

A malformed row (bad JSON, a missing field, a field of the wrong type) is reported with its file and
line (JSONL) or row index (Parquet, save_to_disk); `on_bad_row: stop` ends the run there, `skip` leaves
it out and the count of skipped rows is printed.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .answers import gold_answer, require_math_verify
from .log import warn
from .tasks import Problem

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:")
"""DeepSeek-R1-Zero's training template (DeepSeek-R1, Table 1), `prompt` renamed `{question}`."""
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHAT_TEMPLATES = ("chat", "chat_boxed")

QUESTION_FIELDS = ("question", "prompt", "problem")
ANSWER_FIELDS = ("answer", "solution")
RESPONSE_FIELDS = ("response", "completion", "solution", "answer")
SOURCE_FIELDS = ("data_source", "source")
LEVEL_FIELDS = ("level", "difficulty")


class BadRow(ValueError):
    """A row that cannot be used, with where it is (`file:line` or `file row N`)."""


@dataclass(frozen=True)
class DataOptions:
    """How to read a dataset file: the `data_options` mapping of `sft`, `grpo` and `eval`."""

    template: str = "chat"
    """chat | chat_boxed | r1_zero | a plain-text template containing {question}."""
    question: str | None = None
    """Field of the question; empty: the first present of question, prompt, problem."""
    answer: str | None = None
    """Field of the reference answer (GSM8K's `#### 42` and MATH's last \\boxed{} are extracted);
    empty: the first present of answer, solution."""
    response: str | None = None
    """SFT: field of the target response; empty: the first present of response, completion, solution, answer."""
    messages: str = "messages"
    """SFT: field of a chat, a list of {role, content}; the last assistant turn is the target."""
    source: str | None = None
    """Field naming a row's source, for per-source scores; empty: data_source or source, else the file name."""
    level: str | None = None
    """Field of a row's level (`Level 3` or 3), for per-level scores; empty: level or difficulty when present."""
    system: str | None = None
    """System prompt of the chat templates; empty: none (the template's own default, if it has one)."""
    split: str = "train"
    """Split of a save_to_disk DatasetDict folder, or of a folder of `<split>-*.parquet` shards."""
    on_bad_row: str = "stop"
    """stop: a malformed row ends the run, naming it; skip: it is left out and counted."""
    limit: int | None = None
    """Use only the first this many good rows; empty: all."""

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("stop", "skip"):
            raise ValueError(f"on_bad_row must be stop or skip, not {self.on_bad_row!r}")
        if self.template not in CHAT_TEMPLATES + ("r1_zero",) and "{question}" not in self.template:
            raise ValueError(f"template must be chat, chat_boxed, r1_zero or a string with {{question}}, "
                             f"not {self.template!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1, not {self.limit}")

    @classmethod
    def of(cls, options: dict | None) -> "DataOptions":
        """From a stage's `data_options` mapping; an unknown key is an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise ValueError(f"unknown data_options {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**(options or {}))


# --- reading rows ----------------------------------------------------------------------------------

def read_rows(path: str | Path, split: str = "train") -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for every row of a JSONL file, a JSON array, a Parquet file, a save_to_disk folder or
    a folder of `<split>-*.parquet` shards (a Hub dataset repository as downloaded), in order; a row that
    is not a JSON object comes as a BadRow instead of a dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        yield from _folder_rows(path, split)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json" and _starts_with(path, "["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadRow(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row if isinstance(row, dict) else BadRow(f"{path} row {i}: not a JSON object")
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRow(f"{where}: not JSON ({e.msg})")
                    continue
                yield where, row if isinstance(row, dict) else BadRow(f"{where}: not a JSON object")
    else:
        raise ValueError(f"{path}: unknown data format; expected .jsonl, .parquet or a save_to_disk folder")


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first non-blank character is `char` (a JSON array rather than JSON lines)."""
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0] == char
    return False


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {i}", row


def _folder_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    if not any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        shards = sorted(p for p in path.rglob("*.parquet") if p.name.startswith(f"{split}-") or p.parent.name == split)
        if not shards:
            raise ValueError(f"{path}: neither a datasets.save_to_disk folder nor a folder of {split}-*.parquet shards")
        for shard in shards:
            yield from _parquet_rows(shard)
        return

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: not a datasets.save_to_disk folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def _field(row: dict, name: str | None, candidates: tuple[str, ...], what: str, where: str,
           required: bool = True) -> str | None:
    """The string in `row[name]` (or the first present candidate)."""
    names = (name,) if name else candidates
    key = next((k for k in names if k in row and row[k] is not None), None)
    if key is None:
        if required:
            raise BadRow(f"{where}: no {what} field ({' / '.join(names)})")
        return None
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and what in ("answer", "level"):
        value = str(value)          # a bare numeric answer or level column
    if not isinstance(value, str):
        raise BadRow(f"{where}: field {key!r} is a {type(value).__name__}, not a string")
    return value


def good_rows(path, opts: DataOptions, make) -> list:
    """`make(where, row)` for every row; malformed rows stop the run or are skipped (and counted), per
    `opts.on_bad_row`. At most `opts.limit` results."""
    out, skipped, first = [], 0, None
    for where, row in read_rows(path, opts.split):
        try:
            if isinstance(row, BadRow):
                raise row
            out.append(make(where, row))
        except BadRow as e:
            if opts.on_bad_row == "stop":
                raise BadRow(f"{e} (set data_options on_bad_row: skip to leave such rows out)") from None
            skipped, first = skipped + 1, first or str(e)
            continue
        if opts.limit and len(out) == opts.limit:
            break
    if skipped:
        warn(f"{path}: skipped {skipped} malformed row(s); the first: {first}")
    if not out:
        raise ValueError(f"{path}: no usable rows")
    return out


# --- prompts ---------------------------------------------------------------------------------------

def render_prompt(question: str, opts: DataOptions) -> tuple[str, bool]:
    """(text, chat): the user turn of the chat template (chat True), or the whole plain-text prompt."""
    if opts.template == "chat":
        return question, True
    if opts.template == "chat_boxed":
        return f"{question}\n{BOXED_INSTRUCTION}", True
    template = R1_ZERO_TEMPLATE if opts.template == "r1_zero" else opts.template
    return template.replace("{question}", question), False


def prompt_ids(tok, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt: through the chat template with a generation prompt, or as plain text after
    the tokenizer's bos token (when it has one, as Llama-3's)."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tok.encode_chat(messages)
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)


def _level(value: str | None) -> int:
    """MATH's `Level 3` → 3; a bare number as itself; 0 when there is none."""
    found = re.search(r"\d+", value or "")
    return int(found.group()) if found else 0


# --- problems for grpo and eval --------------------------------------------------------------------

def load_problems(path, opts: DataOptions) -> list[Problem]:
    """The file's rows as `math` problems: the rendered prompt, the reference answer, and in `data`
    the template, source and level (the MathTask of qiusuo/tasks.py scores them)."""
    require_math_verify()
    default_source = Path(path).stem

    def make(where: str, row: dict) -> Problem:
        question = _field(row, opts.question, QUESTION_FIELDS, "question", where)
        answer = gold_answer(_field(row, opts.answer, ANSWER_FIELDS, "answer", where))
        if not answer:
            raise BadRow(f"{where}: empty answer")
        level = _field(row, opts.level, LEVEL_FIELDS, "level", where, required=False)
        source = _field(row, opts.source, SOURCE_FIELDS, "source", where, required=False) or default_source
        text, chat = render_prompt(question, opts)
        return Problem(task="math", difficulty=_level(level), prompt=text, answer=answer, canonical=question,
                       data={"source": source, "level": level, "chat": chat, "system": opts.system,
                             "template": opts.template, "where": where})

    return good_rows(path, opts, make)


@lru_cache(maxsize=4)
def problem_pool(path: str, options_json: str) -> tuple[Problem, ...]:
    """`load_problems` once per (file, options) in a process: GRPO draws from it every step."""
    return tuple(load_problems(path, DataOptions.of(json.loads(options_json))))


def levels_by_source(problems) -> dict[str, list[int]]:
    """Source → its levels, sorted (rows without a level count only in the source's "all")."""
    out: dict[str, set] = {}
    for p in problems:
        levels = out.setdefault(p.data["source"], set())
        if p.data.get("level") is not None:
            levels.add(p.difficulty)
    return {s: sorted(v) for s, v in sorted(out.items())}


# --- prompt → response pairs for sft ---------------------------------------------------------------

def load_sft_rows(path, opts: DataOptions) -> list[dict]:
    """The file's rows as {prompt, completion} plus how to tokenize the prompt (`sft_prompt_ids`):
    a `messages` chat trains on its last assistant turn, with the turns before it as the prompt;
    otherwise the question field, rendered by the template, is the prompt and the response field
    (the whole solution, not just its final answer) the completion."""

    def make(where: str, row: dict) -> dict:
        if opts.messages in row and row[opts.messages] is not None:
            return _chat_row(row[opts.messages], where)
        question = _field(row, opts.question, QUESTION_FIELDS, "question", where)
        response = _field(row, opts.response, RESPONSE_FIELDS, "response", where)
        text, chat = render_prompt(question, opts)
        return {"prompt": text, "completion": response, "chat": chat, "system": opts.system}

    return good_rows(path, opts, make)


def _chat_row(messages, where: str) -> dict:
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise BadRow(f"{where}: messages must be a list of {{role, content}} strings")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise BadRow(f"{where}: messages must end with an assistant turn after at least one other")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return {"prompt": context[-1]["content"], "completion": messages[-1]["content"], "messages": context}


def sft_prompt_ids(tok, row: dict) -> list[int]:
    """Prompt ids of an SFT row: a chat's earlier turns, a dataset row's rendered prompt, or a qiusuo
    corpus line's prompt as the user turn."""
    if "messages" in row:
        return tok.encode_chat(row["messages"])
    return prompt_ids(tok, row["prompt"], row.get("chat", True), row.get("system"))
