"""bench/soak.py in a few seconds (issue 17, item 6): clients mixing valid streams, hang-ups, bad
inputs and wrong keys against an in-process server with small limits — no 5xx but 503 with
Retry-After, idle afterwards, the ledger equal to what clients were told."""
import asyncio
from pathlib import Path

import pytest

from bench.soak import LIMITS, bad_inputs, make_keys, soak, verdict, wait_idle
from qiusuo.tokenizer import Tokenizer
from test_serve_helpers import SCRIPT, scripted_model, serve


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_a_short_soak_passes(tmp_path):
    tok = Tokenizer.char_level()
    with serve(tok, scripted_model(tok, SCRIPT), tmp_path, **LIMITS) as s:
        keys = make_keys(s.service.store)
        before = rss_kib()
        result = asyncio.run(soak(s.url, keys, seconds=6.0, clients=16, seed=1, rss=rss_kib))
        idle = wait_idle(s.url)
        v = verdict(result, Path(s.service.store.path), idle, before, rss_kib(), warm_up=1.0)
    assert v["verdict"] == "PASS", v["failures"]
    assert v["bad_inputs"] > 0 and v["bad_inputs_5xx"] == 0
    assert set(v["bad_inputs_by_kind"]) <= set(bad_inputs())
    assert v["ledger_totals"] == v["client_totals"] and v["client_totals"]["requests"] > 0
    assert v["by_kind"]["stream"].get(200, 0) > 0 and v["by_kind"]["hang_up"].get(299, 0) > 0
