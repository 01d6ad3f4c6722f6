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
    rows, per, by_source = accept([p1, p2], completions, k, "all", source="sample:zero")
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
    with pytest.raises(ValueError, match="a dataset's questions keep their own"):
        SampleConfig(data="train.jsonl", langs=["zh"])
    with pytest.raises(ValueError, match="unknown data_options colour"):
        SampleConfig(data="train.jsonl", data_options={"colour": "red"})


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


# --- a dataset file and a real checkpoint ------------------------------------------------------------

GSM8K = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
          "answer": "In May she sold 48/2 = 24 clips.\n#### 72", "level": None, "data_source": "gsm8k"},
         {"question": "A box holds 250 pens. How many pens are in 4 boxes?", "answer": "4 * 250 = 1,000 pens.\n#### 1,000",
          "level": None, "data_source": "gsm8k"}]
MATH = [{"question": "Compute $\\sqrt{16}$.", "answer": "It is $\\boxed{4}$.", "level": "Level 2", "data_source": "math"}]
# What the R1-distill-style checkpoint is taught to write (its template opens `<think>\n` itself).
TAUGHT = ["48+24=72\n</think>\n\n\\boxed{72}", "4*250=1000\n</think>\n\n\\boxed{1000}"]


def math_problems(tmp_path, rows, **options):
    from qiusuo.data import DataOptions, load_problems
    from test_data import write_jsonl

    return load_problems(write_jsonl(tmp_path / "m.jsonl", rows), DataOptions(**options))


def test_judge_reads_a_real_checkpoints_reasoning(tmp_path):
    from qiusuo.rewards import LENIENT, ReasoningFormat

    p = math_problems(tmp_path, GSM8K[:1], template="chat_boxed")[0]
    assert judge(p, "<think>48/2 = 24, 48+24 = 72</think>\n\nThe answer is \\boxed{72}.", "stop", fmt=LENIENT) == "ok"
    assert judge(p, "<think>48+24</think>\n\\boxed{73}", "stop", fmt=LENIENT) == "wrong"
    assert judge(p, "The answer is \\boxed{72}.", "stop", fmt=LENIENT) == "format"     # no reasoning block
    opened = ReasoningFormat(special=False, opens_think=True, strict=False)          # the template wrote <think>
    assert judge(p, "48+24=72\n</think>\n\n\\boxed{72}", "stop", fmt=opened) == "ok"
    r1 = math_problems(tmp_path, GSM8K[:1], template="r1_zero")[0]
    assert judge(r1, "<think>48+24</think> <answer>72</answer>", "stop", fmt=LENIENT) == "ok"
    assert judge(r1, "<think>48+24</think> \\boxed{72}", "stop", fmt=LENIENT) == "format"   # r1_zero: tags only


def test_a_plain_template_row_reads_back_with_the_question_template(tmp_path, tok):
    from qiusuo.data import DataOptions, load_sft_rows, sft_prompt_ids
    from qiusuo.sample import sft_row
    from test_data import write_jsonl

    p = math_problems(tmp_path, GSM8K[:1], template="r1_zero")[0]
    row = sft_row(p, "<think>48+24</think> <answer>72</answer>", "sample:x")
    back = load_sft_rows(write_jsonl(tmp_path / "set.jsonl", [row]), DataOptions(template="{question}"))[0]
    assert sft_prompt_ids(tok, back) == get_task("math").prompt_ids(p, tok)
    assert back["completion"] == "<think>48+24</think> <answer>72</answer>"


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """An R1-distill-style checkpoint (transformers-built, BPE, `<think>\\n` opened by its template) fine-
    tuned with `qiusuo sft` to answer the two GSM8K questions, so that rejection sampling keeps something."""
    from hf_fixtures import r1_distill_checkpoint
    from test_data import write_jsonl

    root = tmp_path_factory.mktemp("taught")
    init = r1_distill_checkpoint(root / "init")
    lesson = write_jsonl(root / "lesson.jsonl", [{"question": g["question"], "response": t}
                                                 for g, t in zip(GSM8K, TAUGHT)])
    assert main([str(a) for a in ("sft", "--init", init, "--data", lesson, "--out", root / "ckpt", "--steps", 80,
                                  "--batch-size", 2, "--lr", 1e-2, "--warmup-steps", 1, "--max-len", 128,
                                  "--log-every", 40)]) == 0
    return root


def test_sample_a_data_file_and_fine_tune_on_the_result(taught):
    from qiusuo.data import DataOptions, load_sft_rows, sft_prompt_ids
    from qiusuo.tokenizer import Tokenizer
    from test_data import write_parquet

    root = taught
    data = write_parquet(root / "train.parquet", GSM8K + MATH)
    out = root / "sampled"
    assert main(["sample", "--checkpoint", str(root / "ckpt"), "--data", str(data), "--out", str(out), "--k", "4",
                 "--max-new-tokens", "48", "--temperature", "0.5", "--keep", "shortest"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["problems"], stats["samples"], stats["data"]) == (3, 12, str(data))
    assert set(stats["by_task"]) == {"gsm8k", "math/2"} and set(stats["by_source"]) == {"gsm8k", "math"}
    gsm, math = stats["by_source"]["gsm8k"], stats["by_source"]["math"]
    assert gsm["solved"] == 2 and gsm["kept"] == 2 and math["ok"] == math["kept"] == 0   # taught GSM8K only
    assert gsm["acceptance"] == gsm["ok"] / 8 > 0 and stats["by_task"]["math/2"]["difficulty"] == 2

    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in lines] == [g["question"] for g in GSM8K]   # one per problem
    assert [r["messages"][1]["content"] for r in lines] == TAUGHT
    # the SFT set rebuilds the very prompt tokens that were sampled from
    tok = Tokenizer.load(root / "ckpt")
    problems = training_problems(SampleConfig(data=str(data)))
    for row, p in zip(load_sft_rows(out / "train.jsonl", DataOptions()), problems):
        assert sft_prompt_ids(tok, row) == get_task("math").prompt_ids(p, tok)
    assert main(["sft", "--init", str(root / "ckpt"), "--data", str(out / "train.jsonl"), "--out",
                 str(root / "student"), "--steps", "1", "--batch-size", "2", "--max-len", "128"]) == 0
    assert (root / "student" / "model.safetensors").exists()
