"""The request body of `POST /v1/chat/completions`, as pydantic models.

The body is parsed straight from its bytes (`ChatRequest.model_validate_json`, pydantic's Rust
parser): invalid UTF-8, lone surrogates, `NaN` / `Infinity` and nesting deeper than the parser's
limit are invalid JSON (400), never a crash. Fields are strict: a string where a number belongs is
refused, not coerced. Unknown fields are ignored (clients send many OpenAI options this server has
no use for); known ones the server does not implement (`tools`, `response_format` other than text,
`logprobs`) are refused by name (`ChatRequest.unsupported`) rather than silently ignored.

Parsing errors are split in two, as DeepSeek does: a body of the wrong shape is a 400, a well-formed
sampling parameter with a value out of range is a 422 (`classify_error`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
"""Stop strings are few and short: the splitter looks for each at every token."""

_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(BaseModel):
    """One part of a multi-part content list; only text parts are understood."""

    model_config = _CONFIG
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    """Only read to reject it: a client must not send the reasoning back (DeepSeek answers 400)."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = _CONFIG
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    """Accepted and ignored (as by many open servers), but only within OpenAI's range."""
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    """Any int64, as OpenAI's; larger values would overflow the generator's seed."""
    n: int = Field(default=1, ge=1)
    """Only one choice per request (ask several times for more samples): more is refused with a
    message that says so (`ChatRequest.unsupported`)."""
    user: str | None = Field(default=None, max_length=256)
    # features this server does not implement: read only to refuse them by name
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must hold 1 to {MAX_STOP_CHARS} characters")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first feature asked for that this server does not have."""
        if self.n > 1:
            return "n", f"n={self.n}: this server returns one choice per request; send the request {self.n} times"
        if self.tools:
            return "tools", "tools (function calling) are not supported by this server"
        if self.functions:
            return "functions", "functions (function calling) are not supported by this server"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} is not supported by this server (it has no function calling)"
        fmt = self.response_format
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return "response_format", "response_format (JSON mode, JSON schema) is not supported; only {'type': 'text'}"
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.top_logprobs is not None:
            return "top_logprobs", "top_logprobs are not supported by this server"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Error types of a value of the right type that is out of range: the parameter is invalid (422).
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error",
                 "too_long", "string_too_long"}


def classify_error(err: ValidationError) -> tuple[int, str, str | None, str]:
    """(status, message, param, code) of the first problem in a validation error."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return 400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json"
    loc = [str(x) for x in first["loc"]]
    param = ".".join(loc) if loc else None
    if first["type"] == "model_type" and not loc:
        return 400, "the body must be a JSON object", None, "invalid_request"
    if first["type"] in _RANGE_ERRORS and loc and loc[0] != "messages":
        return 422, f"{param}: {first['msg']}", param, "invalid_parameter"
    return 400, f"{param}: {first['msg']}" if param else first["msg"], param, "invalid_request"
