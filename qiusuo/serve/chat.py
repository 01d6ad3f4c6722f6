"""`qiusuo chat`: the chat page in a terminal. Streams from a running `qiusuo serve`, shows the
reasoning dimmed and then "Thought for N s", keeps the conversation and sends back only the answers."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx
from rich.console import Console


class ChatError(Exception):
    """A refusal from the server, already worded for a person."""


@dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    thought_seconds: float | None = None
    usage: dict | None = None


@dataclass
class ChatSession:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    system: str | None = None
    timeout: float = 120.0
    history: list[dict] = field(default_factory=list)
    """Messages sent back: roles and answers only — the reasoning is never sent back."""

    def events(self, question: str) -> Iterator[tuple[str, str]]:
        """Ask `question`; yield ("reasoning_content" | "content", text) as the answer streams in.
        The turn joins the history only once the answer is complete."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        answer = []
        with httpx.stream("POST", self.url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers,
                          timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                raise ChatError(explain(r.status_code, _message(r), r.headers.get("retry-after")))
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators and ": keep-alive" comments
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(explain(503 if chunk["error"].get("code") == "queue_timeout" else 500,
                                            chunk["error"].get("message")))
                if chunk.get("usage"):
                    yield "usage", json.dumps(chunk["usage"])
                for choice in chunk.get("choices", []):
                    for fld in ("reasoning_content", "content"):
                        if choice["delta"].get(fld):
                            if fld == "content":
                                answer.append(choice["delta"][fld])
                            yield fld, choice["delta"][fld]
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(answer)}]

    def ask(self, question: str, on_piece=lambda field, text: None) -> Reply:
        reply, thinking_since = Reply(), None
        for fld, text in self.events(question):
            if fld == "usage":
                reply.usage = json.loads(text)
                continue
            if fld == "reasoning_content":
                thinking_since = thinking_since or time.perf_counter()
                reply.reasoning += text
            else:
                if thinking_since and reply.thought_seconds is None:
                    reply.thought_seconds = time.perf_counter() - thinking_since
                reply.content += text
            on_piece(fld, text)
        if thinking_since and reply.thought_seconds is None:  # the reasoning ran to the end
            reply.thought_seconds = time.perf_counter() - thinking_since
        return reply


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def explain(status: int, message: str | None, retry_after: str | None = None) -> str:
    """The same wording as the chat page."""
    wait = f" Try again in {retry_after} s." if retry_after else ""
    why = {401: "The API key is missing or invalid (use --api-key or QIUSUO_API_KEY).",
           402: "This key's balance is used up.",
           413: "The conversation is too large — start a new chat (/new).",
           429: "Rate limit reached." + wait,
           503: "The server is busy." + wait}.get(status, f"Error {status}.")
    return why + (f" ({message})" if message else "")


def _printer(console: Console):
    """A callback printing one answer as it streams: reasoning dimmed, then "Thought for N s", then
    the answer (model text is printed verbatim, never as rich markup)."""
    since = []  # when the reasoning started; emptied once the answer begins

    def show(fld: str, text: str) -> None:
        if fld == "reasoning_content":
            if not since:
                since.append(time.perf_counter())
            console.print(text, style="dim", end="", markup=False)
            return
        if since:
            console.print(f"\n[dim]Thought for {max(1, round(time.perf_counter() - since.pop()))} s[/]")
        console.print(text, end="", markup=False)

    return show


def run(session: ChatSession, console: Console | None = None) -> None:
    """Read questions until EOF or /exit; /new starts a new conversation."""
    console = console or Console(highlight=False)
    console.print(f"[bold]qiusuo chat[/] — {session.url}  (/new: new conversation, /exit or Ctrl-D: quit)")
    while True:
        try:
            question = console.input("[bold cyan]you> [/]").strip()
        except EOFError:
            console.print()
            return
        if question in ("/exit", "/quit"):
            return
        if question == "/new":
            session.history.clear()
            console.print("[dim](new conversation)[/]")
            continue
        if not question:
            continue
        try:
            session.ask(question, _printer(console))
        except ChatError as e:
            console.print(f"\n[red]{e}[/]")
            continue
        except httpx.HTTPError as e:
            console.print(f"\n[red]cannot reach {session.url}: {e}[/]")
            continue
        console.print()
