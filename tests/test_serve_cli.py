"""`qiusuo serve` as a real process, `qiusuo chat` (the terminal client) against a live server, and
the trained demo model behind the API when `runs/tiny/zero` exists."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from rich.console import Console

from qiusuo.model import save_model
from qiusuo.serve.app import ServeConfig
from qiusuo.serve.chat import ChatError, ChatSession, run
from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import ANSWER, REASONING, SCRIPT, scripted_model, serve

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "tiny" / "zero"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_name_is_derived_from_the_checkpoint_path():
    assert ServeConfig(checkpoint="runs/tiny/zero").model_name == "qiusuo-tiny-zero"
    assert ServeConfig(checkpoint="runs/tiny/zero", model_name="mine").model_name == "mine"


def test_qiusuo_serve_process_answers_and_stops_on_ctrl_c(tok, tmp_path):
    ckpt = tmp_path / "run" / "stage"
    save_model(scripted_model(tok, SCRIPT), ckpt)
    tok.save(ckpt)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo.cli", "serve", str(ckpt), "--port", str(port),
                             "--db", str(tmp_path / "s.sqlite"), "--no-auth"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # a fresh process imports torch first: poll its health with a deadline
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        r = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0).chat.completions.create(
            model="qiusuo-run-stage", messages=[{"role": "user", "content": "1+3?"}])
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (REASONING, ANSWER)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"on http://127.0.0.1:{port}" in out and "WITHOUT authentication" in out


def test_qiusuo_serve_without_checkpoint_is_a_clear_error(capsys):
    from qiusuo.cli import main

    assert main(["serve", "--no-auth"]) == 2
    assert "which checkpoint?" in capsys.readouterr().err


def test_terminal_chat_streams_keeps_history_without_reasoning(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path) as s:
        _, secret = s.service.store.create("terminal", rpm=2)
        session = ChatSession(url=s.url, api_key=secret)
        pieces = []
        reply = session.ask("What is 1+3?", lambda field, text: pieces.append(field))
        assert (reply.reasoning, reply.content) == (REASONING, ANSWER)
        assert reply.thought_seconds is not None and reply.usage["completion_tokens"] == len(SCRIPT)
        assert pieces == sorted(pieces, key=lambda f: f == "content")  # reasoning streamed first
        assert session.history == [{"role": "user", "content": "What is 1+3?"},
                                   {"role": "assistant", "content": ANSWER}]

        # the interactive loop: one question (rpm=2 allows it), then one refused readably, then EOF
        questions = iter(["And again?", "Once more?"])

        def fake_input(prompt=""):
            try:
                return next(questions)
            except StopIteration:
                raise EOFError from None

        console = Console(file=open(os.devnull, "w"), record=True, width=200)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("builtins.input", fake_input)
            run(session, console)
        text = console.export_text()
        assert "Sum 1+3" in text and "Thought for" in text and "\n4" in text
        assert "Rate limit reached. Try again in" in text
        assert len(session.history) == 4  # the refused question was not added


def test_terminal_chat_reports_a_bad_key(tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path) as s:
        with pytest.raises(ChatError, match="API key is missing or invalid"):
            ChatSession(url=s.url, api_key="qs-00000000-wrong").ask("hi")


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="needs the trained demo (make demo)")
def test_trained_demo_model_answers_with_separate_reasoning(tmp_path):
    from qiusuo.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(DEMO)
    with serve(tokenizer, model, tmp_path, no_auth=True) as s:
        r = OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0).chat.completions.create(
            model="qiusuo-test", messages=[{"role": "user", "content": "12*7"}], temperature=0, max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.reasoning_content and msg.content
    assert "<" not in msg.content and "<" not in msg.reasoning_content  # the tags are gone
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
