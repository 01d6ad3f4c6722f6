"""Shared pieces of the serving tests (this module holds no tests itself).

- `scripted_model`: a real `Transformer` whose weights make it a deterministic bigram machine — the
  next token depends only on the current one — so the server can be tested end to end on a model
  that really writes `<think>Sum 1+3</think><answer>4</answer>`, or loops forever for the tests
  that need a request to stay busy.
- `LiveServer`: uvicorn on 127.0.0.1 with a free port, in a thread.
"""
from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn

from qiusuo.model import ModelConfig, Transformer
from qiusuo.serve.app import ServeConfig, create_app
from qiusuo.tokenizer import Tokenizer

REASONING, ANSWER = "Sum 1+3", "4"
SCRIPT = ["<think>", *REASONING, "</think>", "<answer>", *ANSWER, "</answer>"]
LOOP = list("abcdefgh")  # a..h, then a again: never stops by itself


def scripted_model(tok: Tokenizer, script: list[str], loop: bool = False, context: int = 512) -> Transformer:
    """After `<|assistant|>` the model writes `script` (tokens must be distinct), then `<|end|>` —
    or starts the script again when `loop`. Any other token is followed by `<|end|>`.

    How: one layer whose attention and MLP outputs are zeroed, so the final hidden state is the
    normalised embedding of the current token; embeddings are one-hot (hidden ≥ vocab) and the
    untied LM head maps token t's direction to the logit of next(t), with a margin that keeps even
    temperature-2 sampling deterministic."""
    ids = [tok.token_id(t) for t in ["<|assistant|>", *script]]
    assert None not in ids and len(set(ids)) == len(ids), "script tokens must exist and be distinct"
    nxt = dict(zip(ids, ids[1:], strict=False))
    nxt[ids[-1]] = ids[1] if loop else tok.eos_id
    hidden = 8 * ((tok.vocab_size + 7) // 8)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight[:, :tok.vocab_size] = torch.eye(tok.vocab_size)
        for t in range(tok.vocab_size):
            model.lm_head.weight[nxt.get(t, tok.eos_id), t] = 10.0
    return model.eval()


class LiveServer:
    """`with LiveServer(app) as s:` serves `app` at `s.url` until the block ends."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=120, what="server start")  # a loaded machine is slow
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` (cheap, in-process state) until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def serve(tok: Tokenizer, model: Transformer, tmp_path, **settings) -> LiveServer:
    """A LiveServer for `model` with a ServeConfig built from `settings` (SQLite file in tmp_path)."""
    settings.setdefault("db", str(tmp_path / "serve.sqlite"))
    settings.setdefault("model_name", "qiusuo-test")
    return LiveServer(create_app(ServeConfig(**settings), model=model, tokenizer=tok))


def idle(svc) -> bool:
    """Nothing held: no gate slot, engine sequence, key slot, reservation, preparation or pending bill."""
    return (svc.gate.running == 0 and svc.gate.waiting == 0 and svc.scheduler.running == 0
            and svc.scheduler.queue_depth == 0 and svc.limits.holds == 0 and not svc.limits._active
            and svc.preparing == 0 and not svc.unsettled)
