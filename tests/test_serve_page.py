"""The chat page in headless Debian Chromium (Playwright driving /usr/bin/chromium; never
`playwright install`): streamed answer, reasoning block collapsed as "Thought for N s", reasoning
kept out of the history sent back, and 429 / 503 shown readably."""
import json
import os
import re

import pytest

from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import ANSWER, LOOP, REASONING, SCRIPT, scripted_model, serve
from test_serve_load import Stream

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.char_level()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def ask(page, question):
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function("() => !document.querySelector('#send').disabled")


def test_page_streams_answer_hides_reasoning_and_strips_it_from_history(browser, tok, tmp_path):
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path) as s:
        _, secret = s.service.store.create("page", rpm=2)
        page = browser.new_page()
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(s.url + "/")
        page.fill("#key", secret)
        page.dispatch_event("#key", "change")
        page.wait_for_function("() => document.querySelector('#model').textContent === 'qiusuo-test'")

        ask(page, "What is 1+3?")
        turn = page.locator(".assistant").last
        assert turn.locator(".answer").inner_text() == ANSWER
        thought = turn.locator("details.thought")
        assert thought.get_attribute("open") is None                      # collapsed by default
        assert re.fullmatch(r"Thought for \d+ s", thought.locator("summary").inner_text())
        assert not turn.locator(".reasoning").is_visible()
        thought.locator("summary").click()                                 # open the reasoning
        assert turn.locator(".reasoning").inner_text() == REASONING
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        assert (tmp_path / "chat.png").stat().st_size > 1000

        ask(page, "And 2+2?")
        assert sent[-1]["stream"] is True
        assert sent[-1]["messages"] == [{"role": "user", "content": "What is 1+3?"},
                                        {"role": "assistant", "content": ANSWER},  # no reasoning sent back
                                        {"role": "user", "content": "And 2+2?"}]

        ask(page, "A third question")                                       # rpm=2: refused
        error = page.locator(".error").last.inner_text()
        assert re.match(r"Rate limit reached\. Try again in \d+ s\.", error)
        page.close()


def test_page_shows_a_full_server_readably(browser, tok, tmp_path):
    looping = scripted_model(tok, LOOP, loop=True, context=8192)
    with serve(tok, looping, tmp_path, no_auth=True, max_concurrent=1, max_queue=0, max_tokens_limit=8000,
               overload_retry_after=3) as s:
        busy = Stream(s.url)
        busy.read_content()                          # the only slot is taken
        page = browser.new_page()
        page.goto(s.url + "/")
        ask(page, "Anyone there?")
        assert page.locator(".error").last.inner_text().startswith("The server is busy. Try again in 3 s.")
        assert page.locator(".user").count() == 1    # the question stays visible …
        busy.close()
        page.close()
