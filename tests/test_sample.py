"""`qiusuo sample`: rejection sampling keeps correct, well-formed completions of training problems."""
import json

import pytest

from conftest import tiny_model
from qiusuo.cli import main
from qiusuo.corpus import read_corpus
from qiusuo.engine import Completion
from qiusuo.model import save_model
from qiusuo.sample import SampleConfig, accept, judge, select, training_problems
from qiusuo.language import pose
from qiusuo.tasks import format_completion, get_task, heldout


def arith(a, op, b):
    return get_task("arith").make_problem(a, op, b)


def done(text, reason="stop"):
    return Completion(prompt_index=0, token_ids=[1] * len(text), finish_reason=reason, text=text)


def test_judge_names_each_rejection():
    p = arith(12, "+", 30)
    assert judge(p, format_completion("12+30", "42"), "stop") == "ok"
    assert judge(p, format_completion("12+30", "41"), "stop") == "wrong"
    assert judge(p, "<think>12+30</think>42", "stop") == "format"
    # A completion cut at the length cap is never kept, even when its prefix parses.
    assert judge(p, format_completion("12+30", "42"), "length") == "truncated"
    zh = pose(p, "zh")
    assert judge(zh, format_completion("我来算：12+30", "42"), "stop") == "ok"
    assert judge(zh, format_completion("let me 算", "42"), "stop") == "mixed"
    assert judge(zh, format_completion("let me 算", "42"), "stop", min_consistency=0.3) == "ok"


def test_select_deduplicates_and_keeps_the_shortest_on_request():
    p = arith(12, "+", 30)
    long_ok, short_ok, bad = format_completion("2+0=2, 1+3=4", "42"), format_completion("", "42"), format_completion("", "4")
    texts = [long_ok, bad, short_ok, long_ok]
    verdicts = [judge(p, t, "stop") for t in texts]
    assert select(p, texts, verdicts, "all") == [long_ok, short_ok]
    assert select(p, texts, verdicts, "shortest") == [short_ok]
    assert select(p, [bad], ["wrong"], "shortest") == []


def test_accept_tallies_per_task_and_difficulty():
    p1, p2 = arith(12, "+", 30), arith(7, "*", 6)
    k = 3
    completions = [done(format_completion("a", "42")), done(format_completion("b", "42")), done("junk"),
                   done(format_completion("c", "41")), done(format_completion("d", "42"), "length"),
                   done(format_completion("e", "42"))]   # p2's answer is 42 too: 7*6
    rows, per = accept([p1, p2], completions, k, "all", source="sample:zero")
    assert [r["completion"] for r in rows] == [format_completion("a", "42"), format_completion("b", "42"),
                                              format_completion("e", "42")]
    assert all(r["prompt"] in (p1.prompt, p2.prompt) and r["source"] == "sample:zero" for r in rows)
    s1 = per[f"arith/{p1.difficulty}"]
    total = {key: sum(s[key] for s in per.values()) for key in ("samples", "ok", "wrong", "format", "mixed",
                                                                 "truncated", "problems", "solved", "kept")}
    assert total == {"samples": 6, "ok": 3, "wrong": 1, "format": 1, "mixed": 0, "truncated": 1, "problems": 2,
                     "solved": 2, "kept": 3}
    assert 0 < s1["acceptance"] <= 1


def test_problems_come_from_the_training_split_and_are_distinct():
    cfg = SampleConfig(tasks={"arith": [2], "countdown": [3]}, n_per_difficulty=40)
    problems = training_problems(cfg)
    assert len(problems) == 80
    assert len({p.key() for p in problems}) == 80
    assert not any(heldout(p.key()) for p in problems)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="keep"):
        SampleConfig(keep="longest")
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown task|nope"):
        SampleConfig(tasks={"nope": [1]})


def test_the_stage_writes_a_corpus_and_its_acceptance_rates(tmp_path, tok):
    ckpt = tmp_path / "zero"
    save_model(tiny_model(tok), ckpt)
    tok.save(ckpt)
    out = tmp_path / "sampled"
    rc = main(["sample", "--checkpoint", str(ckpt), "--out", str(out), "--tasks", "{arith: [1, 2]}",
               "--n-per-difficulty", "4", "--k", "3", "--max-new-tokens", "24"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["problems"] == 8 and stats["samples"] == 24
    assert set(stats["by_task"]) == {"arith/1", "arith/2"}
    for s in stats["by_task"].values():
        assert s["ok"] + s["wrong"] + s["format"] + s["mixed"] + s["truncated"] == s["samples"] == 12
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) == stats["kept"]
    if lines:   # a random model rarely answers right; what it keeps must read back as a corpus
        assert read_corpus(out)
    assert (out / "ledger.json").exists() and (out / "config.yaml").exists()
