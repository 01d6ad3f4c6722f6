"""The request body of `POST /v1/chat/completions`, as pydantic models.

Unknown fields are ignored (clients send many OpenAI options this server has no use for). Parsing
errors are split in two, as DeepSeek does: a body of the wrong shape is a 400, a well-formed sampling
parameter with a value out of range is a 422 (`classify_error`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16


class TextPart(BaseModel):
    """One part of a multi-part content list; only text parts are understood."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    """Only read to reject it: a client must not send the reasoning back (DeepSeek answers 400)."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    """Any int64, as OpenAI's; larger values would overflow the generator's seed."""
    n: int = Field(default=1, ge=1, le=1)
    """Only one choice per request (ask several times for more samples)."""

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Error types of a value of the right type that is out of range: the parameter is invalid (422).
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error",
                 "too_long", "finite_number"}


def classify_error(err: ValidationError) -> tuple[int, str, str]:
    """(status, message, param) of the first problem in a validation error."""
    first = err.errors(include_url=False)[0]
    loc = [str(x) for x in first["loc"]]
    param = ".".join(loc) if loc else None
    status = 422 if (first["type"] in _RANGE_ERRORS and loc and loc[0] != "messages") else 400
    return status, f"{param}: {first['msg']}" if param else first["msg"], param
