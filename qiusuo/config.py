"""One documented config dataclass per stage: YAML file, then `--flag` overrides, then derived fields.

A field's documentation is the string literal right under it (an attribute docstring); the CLI shows
it in `--help`, so the dataclass is the single place a setting is explained.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or flag that cannot be used, with a message saying which and why."""


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field: text}."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_value(text: str, hint) -> object:
    """Turn a command-line string into the field's type (YAML syntax for lists and mappings)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {text!r}: {e}") from e
    if hint is str or hint == "str":
        return text
    return value


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name VALUE` flag per dataclass field (default: take the config file's value)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{docs.get(f.name, '')} (default: {json.dumps(default)})".replace("%", "%%")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                            metavar=f.name.upper(), help=help_text)


def read_yaml(path: str | Path, section: str | None = None) -> dict:
    """A YAML mapping; a multi-stage file (with a mapping named `section`) gives that section."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def build(cls, file_values: dict | None = None, overrides: dict | None = None):
    """Instantiate `cls` from file values then overrides; unknown keys are an error, not a silence."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(file_values or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, known, n=1)) else u
                 for u in unknown]
        raise ConfigError(f"unknown {cls.__name__} setting(s): {', '.join(hints)}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        values[name] = _coerce(name, value, hints.get(name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def _coerce(name: str, value, hint):
    """Check/convert simple scalar types so a typo fails at start-up, not an hour into a run."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        return None
    # `int | None` and Optional[int] both coerce as int
    base = args[0] if origin in (typing.Union, types.UnionType) and len(args) == 1 else hint
    try:
        if base is bool and not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        if base is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            return int(value)
        if base is float and not isinstance(value, bool):
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: expected {getattr(base, '__name__', base)}, got {value!r}") from e
    return value


def from_args(cls, args: argparse.Namespace, section: str) -> object:
    """Config for one stage from `--config FILE` (optional) and per-field flags."""
    file_values = read_yaml(args.config, section) if getattr(args, "config", None) else {}
    hints = typing.get_type_hints(cls)
    overrides = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f"cfg_{f.name}", None)
        if raw is not None:
            overrides[f.name] = _parse_value(raw, hints.get(f.name))
    return build(cls, file_values, overrides)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg, folder: Path) -> None:
    from .model import atomic_write_text

    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(folder) / "config.yaml", to_yaml(cfg))
