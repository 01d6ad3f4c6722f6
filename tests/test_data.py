"""Dataset files for --data (JSONL, Parquet, save_to_disk), prompt templates, malformed rows, math answer
extraction and math-verify equivalence with its timeout, and the sft / grpo / eval stages on a data file."""
import json
import threading

import pytest
import torch

from qiusuo.answers import (VerifyTimeout, Verifier, canonical, check, gold_answer, gsm8k_answer, last_boxed,
                            last_number, model_answer)
from qiusuo.data import (BOXED_INSTRUCTION, R1_ZERO_TEMPLATE, BadRow, DataOptions, levels_by_source, load_problems,
                         load_sft_rows, prompt_ids, sft_prompt_ids)
from qiusuo.rewards import accuracy_reward
from qiusuo.sft import SFTConfig, encode_examples
from qiusuo.tasks import get_task

GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = 24 clips.\nAltogether 48+24 = 72 clips.\n#### 72"},
    {"question": "A box holds 250 pens. How many pens are in 4 boxes?",
     "answer": "4 * 250 = 1,000 pens.\n#### 1,000"},
]
MATH = [
    {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.",
     "level": "Level 2", "type": "Prealgebra"},
    {"problem": "Compute $\\sqrt{16}$.", "solution": "It is $\\boxed{4}$.", "level": "Level 5", "type": "Algebra"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_disk(path, rows, split=None):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, ".jsonl"), "parquet": (write_parquet, ".parquet"), "disk": (write_disk, "")}


# --- loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", WRITERS)
def test_each_format_gives_the_same_problems(tmp_path, fmt):
    write, suffix = WRITERS[fmt]
    gsm = load_problems(write(tmp_path / f"gsm8k{suffix}", GSM8K), DataOptions())
    math = load_problems(write(tmp_path / f"math{suffix}", MATH), DataOptions())
    assert [p.answer for p in gsm] == ["72", "1000"]                 # `#### 1,000` → 1000
    assert [p.answer for p in math] == ["\\frac{1}{2}", "4"]         # the last \boxed{}, nested braces whole
    assert gsm[0].prompt == GSM8K[0]["question"] and math[1].prompt == MATH[1]["problem"]
    assert {p.data["source"] for p in gsm} == {"gsm8k"} and [p.difficulty for p in math] == [2, 5]
    assert [p.difficulty for p in gsm] == [0, 0]
    assert levels_by_source(gsm + math) == {"gsm8k": [], "math": [2, 5]}


def test_save_to_disk_dataset_dict_split(tmp_path):
    folder = write_disk(tmp_path / "d", MATH, split="test")
    assert len(load_problems(folder, DataOptions(split="test"))) == 2
    with pytest.raises(ValueError, match="no split 'train'; it has test"):
        load_problems(folder, DataOptions())


def test_json_array_and_a_folder_of_parquet_shards(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(GSM8K))
    assert [p.answer for p in load_problems(tmp_path / "g.json", DataOptions())] == ["72", "1000"]
    repo = tmp_path / "gsm8k" / "main"          # as a Hub dataset repository is laid out
    repo.mkdir(parents=True)
    write_parquet(repo / "train-00000-of-00002.parquet", GSM8K[:1])
    write_parquet(repo / "train-00001-of-00002.parquet", GSM8K[1:])
    write_parquet(repo / "test-00000-of-00001.parquet", GSM8K[1:])
    assert [p.answer for p in load_problems(tmp_path / "gsm8k", DataOptions())] == ["72", "1000"]
    assert [p.answer for p in load_problems(tmp_path / "gsm8k", DataOptions(split="test"))] == ["1000"]
    with pytest.raises(ValueError, match="nor a folder of validation-\\*.parquet shards"):
        load_problems(tmp_path / "gsm8k", DataOptions(split="validation"))


def test_field_mapping_source_level_and_limit(tmp_path):
    rows = [{"q": "1+1?", "a": 2, "src": "mine", "lvl": 3}, {"q": "2+2?", "a": "4", "src": "mine", "lvl": "4"},
            {"q": "3+3?", "a": "6", "src": "other", "lvl": 1}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    opts = DataOptions(question="q", answer="a", source="src", level="lvl")
    problems = load_problems(path, opts)
    assert [(p.prompt, p.answer, p.data["source"], p.difficulty) for p in problems] == [
        ("1+1?", "2", "mine", 3), ("2+2?", "4", "mine", 4), ("3+3?", "6", "other", 1)]
    assert len(load_problems(path, DataOptions(question="q", answer="a", limit=2))) == 2
    with pytest.raises(ValueError, match="unknown data_options colour"):
        DataOptions.of({"colour": "red"})
    with pytest.raises(ValueError, match="on_bad_row must be stop or skip"):
        DataOptions(on_bad_row="ignore")


def test_templates(tmp_path, tok):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K[:1])
    q = GSM8K[0]["question"]

    def ids(**kw):
        p = load_problems(path, DataOptions(**kw))[0]
        return get_task(p.task).prompt_ids(p, tok)

    assert ids() == tok.prompt_ids(q)
    assert ids(template="chat_boxed") == tok.prompt_ids(f"{q}\n{BOXED_INSTRUCTION}")
    assert ids(system="Be brief.") == tok.encode_chat([{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": q}])
    r1 = tok.decode(ids(template="r1_zero"))   # plain text: no chat markers (this tokenizer has no bos)
    assert r1 == R1_ZERO_TEMPLATE.replace("{question}", q) and r1.endswith(f"User: {q}. Assistant:")
    assert tok.decode(ids(template="Q: {question}\nA:")) == f"Q: {q}\nA:"
    with pytest.raises(ValueError, match="template must be"):
        DataOptions(template="alpaca")


def test_plain_prompts_start_with_bos_when_the_tokenizer_has_one(tok, monkeypatch):
    monkeypatch.setitem(tok.__dict__, "bos_id", 7)
    assert prompt_ids(tok, "hi", chat=False) == [7] + tok.encode("hi")


# --- malformed rows ----------------------------------------------------------------------------------

BAD_JSONL = [json.dumps(GSM8K[0]), "{not json", json.dumps({"question": "no answer here"}),
             json.dumps({"question": ["a", "list"], "answer": "#### 1"}), "[1, 2]", json.dumps(GSM8K[1])]


def test_bad_rows_stop_naming_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_JSONL)
    with pytest.raises(BadRow, match=rf"{path}:2: not JSON .*on_bad_row: skip"):
        load_problems(path, DataOptions())
    write_jsonl(path, [BAD_JSONL[0], BAD_JSONL[2]])
    with pytest.raises(BadRow, match=rf"{path}:2: no answer field \(answer / solution\)"):
        load_problems(path, DataOptions())
    write_jsonl(path, [BAD_JSONL[3]])
    with pytest.raises(BadRow, match=rf"{path}:1: field 'question' is a list, not a string"):
        load_problems(path, DataOptions())


def test_bad_rows_skipped_and_counted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_JSONL)
    problems = load_problems(path, DataOptions(on_bad_row="skip"))
    assert [p.answer for p in problems] == ["72", "1000"]
    err = capsys.readouterr().err
    assert "skipped 4 malformed row(s)" in err and f"{path}:2" in err


def test_bad_parquet_row_named_by_index(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", [MATH[0], {"problem": "x", "solution": None}])
    with pytest.raises(BadRow, match=rf"{path} row 1: no answer field"):
        load_problems(path, DataOptions())


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl", DataOptions())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format"):
        load_problems(tmp_path / "x.csv", DataOptions())


# --- extraction --------------------------------------------------------------------------------------

def test_answer_extraction_edge_cases():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("so \\boxed 5$ done") == "5" and last_boxed("\\fbox{x}") == "x"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None and last_boxed("no box") is None
    assert gsm8k_answer("a #### b #### $1,234.") == "1234" and gsm8k_answer("72") is None
    assert gold_answer("#### 7") == "7" and gold_answer("it is \\boxed{3}") == "3" and gold_answer(" 12 ") == "12"
    assert last_number("from 3 to -4.5, then 1,000 and 3/4") == "3/4" and last_number("none") is None
    assert last_number("costs 1,000 dollars") == "1000"
    assert model_answer("<answer>a</answer> x <answer>The answer is \\boxed{9}.</answer>") == ("9", "answer_tag")
    assert model_answer("so \\boxed{12} not 13") == ("12", "boxed")
    assert model_answer("we get 3, then 41 apples") == ("41", "last_number")
    assert model_answer("we get 41", require_tags=True) is None and model_answer("nothing") is None


@pytest.mark.parametrize("gold,answer", [("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac{1}{2}"),
                                         ("1000", "1,000"), ("18", "18 \\text{ dollars}"), ("\\$18", "18"),
                                         ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("x=5", "5")])
def test_math_verify_equivalences(gold, answer):
    assert check(gold, answer) == (True, "correct")


def test_math_verify_tells_different_values_apart():
    assert check("72", "73") == (False, "wrong value") and check("1/2", "0.25")[0] is False
    assert canonical("0.5") == canonical("\\frac{1}{2}") == canonical("1/2") == "=1/2"
    assert canonical("1,000") == "=1000"


@pytest.mark.parametrize("gold,answer", [("1000", "1,000"), ("72", "73"), ("-5", "-5"), ("007", "7"), ("12", "-12")])
def test_integers_compared_in_process_agree_with_math_verify(gold, answer):
    from qiusuo.answers import _VERIFIER

    assert check(gold, answer)[0] is _VERIFIER.call("equal", gold, answer)


def test_pathological_expression_times_out_and_the_verifier_recovers():
    v = Verifier(timeout=1.0)
    try:
        with pytest.raises(VerifyTimeout):
            v.call("equal", "1", "9^{9^{9^{9}}}")
        out = []   # from another thread, after the kill: a fresh child answers
        t = threading.Thread(target=lambda: out.append(v.call("equal", "2", "2.0")))
        t.start()
        t.join()
        assert out == [True]
    finally:
        v.close()


# --- MathTask ----------------------------------------------------------------------------------------

def test_math_task_reward_and_votes(tmp_path):
    from qiusuo.evaluate import score_samples

    p = load_problems(write_jsonl(tmp_path / "m.jsonl", MATH[:1]), DataOptions())[0]
    task = get_task(p.task)
    assert accuracy_reward(task, p, "So it is \\boxed{0.5}.").value == 1.0
    assert accuracy_reward(task, p, "<think>hm</think><answer>1/3</answer>").reason == "wrong value"
    assert accuracy_reward(task, p, "no idea").reason == "no answer"
    texts = ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3}", "I give up"]
    row = score_samples(p, texts)
    assert (row["pass@1"], row["cons@k"], row["samples"]) == (0.5, 1.0, 4)   # 0.5 and 1/2 are one vote
    assert task.answer_of(p, "<think>maybe \\boxed{3}</think> so \\boxed{0.5}") == "0.5"   # read after </think>
    assert task.answer_of(p, "<think>it is 3</think>") is None
    r1 = load_problems(tmp_path / "m.jsonl", DataOptions(template="r1_zero"))[0]
    assert task.answer_of(r1, "\\boxed{0.5}") is None                  # r1_zero counts only <answer>
    assert task.answer_of(r1, "<think>x</think> <answer>0.5</answer>") == "0.5"


# --- sft rows ----------------------------------------------------------------------------------------

def test_sft_rows_and_loss_on_the_response_only(tmp_path, tok):
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", GSM8K[:1] + chats)
    rows = load_sft_rows(path, DataOptions())
    assert rows[0]["completion"] == GSM8K[0]["answer"] and rows[1]["completion"] == "4"
    assert sft_prompt_ids(tok, rows[1]) == tok.encode_chat(chats[0]["messages"][:2])
    seqs, dropped = encode_examples(rows, tok, max_len=512, loss_on_prompt=False)
    ids, mask = seqs[1]
    n_prompt = len(tok.encode_chat(chats[0]["messages"][:2]))
    assert dropped == 0 and mask == [False] * n_prompt + [True] * 2 and ids[n_prompt:] == tok.encode("4") + [tok.eos_id]
    write_jsonl(path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BadRow, match=rf"{path}:1: messages must end with an assistant turn"):
        load_sft_rows(path, DataOptions())


def test_sft_learning_rate_is_derived():
    assert SFTConfig().lr == 3e-3 and SFTConfig(init="ckpt").lr == 2e-5 and SFTConfig(init="c", lr=1e-4).lr == 1e-4


def test_stage_errors_are_one_line(tmp_path, capsys):
    from qiusuo.cli import main

    data = write_jsonl(tmp_path / "g.jsonl", GSM8K)
    assert main(["sft", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "--data", str(data), "--data-options", "{colour: red}"]) == 2
    assert main(["grpo", "--data", str(data), "--data-options", "{on_bad_row: maybe}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["qiusuo sft: error: qiusuo sft fine-tunes a checkpoint: give --init (a fresh model trains with "
                   "qiusuo pretrain)",
                   "qiusuo eval: error: EvalConfig: unknown data_options colour; known: answer, level, limit, messages, "
                   "on_bad_row, question, response, source, split, system, template",
                   "qiusuo grpo: error: GRPOConfig: on_bad_row must be stop or skip, not 'maybe'"]


@pytest.mark.parametrize("name,prompts", [("qwen25_05b_gsm8k_r1zero", 32), ("qwen25_05b_gsm8k_r1zero_8gpu", 128)])
def test_recipe_configs_are_valid(name, prompts):
    from pathlib import Path

    from qiusuo.config import build, read_yaml
    from qiusuo.evaluate import EvalConfig
    from qiusuo.grpo import GRPOConfig

    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    assert "ESTIMATED, not measured" in path.read_text()
    grpo, ev = build(GRPOConfig, read_yaml(path, "grpo")), build(EvalConfig, read_yaml(path, "eval"))
    assert (grpo.prompts_per_step, grpo.group_size, grpo.max_new_tokens) == (prompts, 8, 512)
    assert grpo.data_options["template"] == ev.data_options["template"] == "r1_zero"
    assert ev.checkpoint == grpo.out and (ev.temperature, ev.top_p) == (0.6, 0.95)


# --- whole stages on a data file ---------------------------------------------------------------------

def _save_tiny(folder, tok):
    from conftest import tiny_model
    from qiusuo.model import save_model

    save_model(tiny_model(tok, max_position_embeddings=1024), folder)
    tok.save(folder)
    return folder


def _run(*args):
    from qiusuo.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.mark.slow
def test_eval_on_a_data_file_reports_per_source_and_level(tmp_path, tok):
    ckpt = _save_tiny(tmp_path / "ckpt", tok)
    rows = ([dict(r, level=None, data_source="gsm8k") for r in GSM8K]       # one Parquet schema for both
            + [{"question": r["problem"], "answer": r["solution"], "level": r["level"], "data_source": "math"} for r in MATH])
    data = write_parquet(tmp_path / "test.parquet", rows)
    out = tmp_path / "eval.json"
    _run("eval", "--checkpoint", ckpt, "--data", data, "--data-options", "{template: chat_boxed}", "--k", 3,
         "--max-new-tokens", 8, "--out", out)
    result = json.loads(out.read_text())
    assert result["n_problems"] == 4 and result["k"] == 3
    assert set(result["tasks"]) == {"gsm8k", "math"}
    assert set(result["tasks"]["math"]) == {"2", "5", "all"} and set(result["tasks"]["gsm8k"]) == {"all"}
    assert result["tasks"]["math"]["2"]["n"] == 1 and result["tasks"]["gsm8k"]["all"]["n"] == 2
    assert 0.0 <= result["overall"]["pass@1"] <= 1.0 and result["config"]["data"] == str(data)


@pytest.fixture(scope="module")
def qwen_sft(tmp_path_factory):
    """A Qwen2.5-style checkpoint built by transformers, fine-tuned for 2 steps with `qiusuo sft`."""
    from hf_fixtures import qwen25_checkpoint

    root = tmp_path_factory.mktemp("qwen")
    init = qwen25_checkpoint(root / "qwen")   # chat template in chat_template.jinja, as transformers writes it
    data = write_disk(root / "sft", [{"prompt": r["question"], "response": r["answer"]} for r in GSM8K])
    _run("sft", "--init", init, "--data", data, "--out", root / "sft_out", "--steps", 2, "--batch-size", 1,
         "--max-len", 256, "--warmup-steps", 1, "--log-every", 1)
    return root / "sft_out"


@pytest.mark.slow
def test_sft_on_a_data_file_from_a_qwen_checkpoint(qwen_sft):
    cfg = (qwen_sft / "config.yaml").read_text()
    assert "lr: 2.0e-05" in cfg and "data_options: {}" in cfg
    losses = [json.loads(x)["train/loss"] for x in (qwen_sft / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert (qwen_sft / "model.safetensors").exists() and (qwen_sft / "tokenizer.json").exists()


@pytest.mark.slow
def test_eval_of_the_sft_checkpoint_with_the_r1_zero_template(qwen_sft, tmp_path):
    data = write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K)
    out = tmp_path / "eval.json"
    _run("eval", "--checkpoint", qwen_sft, "--data", data, "--data-options", "{template: r1_zero}", "--k", 2,
         "--max-new-tokens", 8, "--out", out)
    result = json.loads(out.read_text())
    assert result["n_problems"] == 2 and set(result["tasks"]) == {"gsm8k_test"}
    assert result["tasks"]["gsm8k_test"]["all"]["n"] == 2 and set(result["tasks"]["gsm8k_test"]) == {"all"}


@pytest.mark.slow
def test_grpo_step_on_a_data_file(tmp_path, tok):
    ckpt = _save_tiny(tmp_path / "ckpt", tok)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    out = tmp_path / "zero"
    _run("grpo", "--init", ckpt, "--out", out, "--data", data, "--steps", 1, "--prompts-per-step", 2,
         "--group-size", 2, "--max-new-tokens", 8, "--beta", 0)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and 0.0 <= metrics[0]["rollout/accuracy"] <= 1.0
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["task"] for s in samples} == {"math"}
    assert {s["prompt"] for s in samples} <= {r["question"] for r in GSM8K}
    assert torch.load(out / "checkpoints" / "step-000001" / "train_state.pt", weights_only=False)["step"] == 1


@pytest.mark.slow
def test_grpo_step_from_the_qwen_checkpoint_with_the_r1_zero_template(qwen_sft, tmp_path):
    data = write_parquet(tmp_path / "gsm8k.parquet", GSM8K)
    out = tmp_path / "zero"
    _run("grpo", "--init", qwen_sft, "--out", out, "--data", data, "--data-options", "{template: r1_zero}",
         "--steps", 1, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 8, "--reward-format", 0)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].startswith("A conversation between User and Assistant.")
                                     for s in samples)


# --- grpo takes a dataset's questions in epochs ------------------------------------------------------

FIVE = [{"question": f"What is {a} + {a}?", "answer": f"#### {2 * a}"} for a in (11, 22, 33, 44, 55)]


def test_grpo_takes_the_questions_in_seeded_epochs(tmp_path):
    from qiusuo.grpo import DataEpochs, GRPOConfig, draw_problems

    cfg = GRPOConfig(data=str(write_jsonl(tmp_path / "five.jsonl", FIVE)), seed=3)
    epochs = DataEpochs(cfg)
    got = [p.prompt for _ in range(5) for p in draw_problems(cfg, None, 3, epochs)]   # 15 = 3 epochs, crossing two
    assert epochs.drawn == 15 and epochs.epoch == 3.0
    per_epoch = [got[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == sorted(r["question"] for r in FIVE) for e in per_epoch)   # each row once an epoch
    assert len({tuple(e) for e in per_epoch}) == 3                                    # a fresh shuffle each
    for drawn in range(15):   # resuming at any point continues the same stream
        assert [p.prompt for p in DataEpochs(cfg, drawn).take(15 - drawn)] == got[drawn:]
    assert [p.prompt for p in DataEpochs(GRPOConfig(data=cfg.data, seed=4)).take(5)] != got[:5]
    with pytest.raises(ValueError, match="in epochs"):
        draw_problems(cfg, None, 1)


GRPO_DATA = ["--steps", 4, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 8, "--beta", 0,
             "--sample-every", 1, "--lr", 1e-3, "--warmup-steps", 1]


def _prompts_by_step(out):
    steps = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        steps.setdefault(s["step"], [])
        if s["prompt"] not in steps[s["step"]][-1:]:   # G = 2 samples of each prompt, in a row
            steps[s["step"]].append(s["prompt"])
    return [steps[k] for k in sorted(steps)]


@pytest.mark.slow
def test_grpo_resume_draws_what_an_uninterrupted_run_draws(tmp_path, tok):
    """5 questions, 2 a step: step 3 crosses into the second epoch. Runs stopped mid-epoch (after step 3
    in one process, step 2 in two) and resumed take the same questions and reach the same weights."""
    from test_dist import alone, rel_diff, torchrun, weights

    ckpt = _save_tiny(tmp_path / "ckpt", tok)
    data = write_jsonl(tmp_path / "five.jsonl", FIVE)
    grpo = ["grpo", "--init", ckpt, "--data", data, *GRPO_DATA]
    alone(*grpo, "--out", tmp_path / "whole")
    alone(*grpo, "--out", tmp_path / "resumed", "--steps", 3, "--save-every", 3)
    alone(*grpo, "--out", tmp_path / "resumed", "--save-every", 3, "--resume")
    torchrun([*grpo, "--out", tmp_path / "two"],
             [*grpo, "--out", tmp_path / "two_resumed", "--steps", 2, "--save-every", 2],
             [*grpo, "--out", tmp_path / "two_resumed", "--save-every", 2, "--resume"])
    whole = _prompts_by_step(tmp_path / "whole")
    assert len(whole) == 4 and all(len(p) == 2 for p in whole)
    flat = [q for p in whole for q in p]
    assert sorted(flat[:5]) == sorted(r["question"] for r in FIVE)        # the first epoch: every row once
    epochs = [json.loads(x)["data/epoch"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0.4, 0.8, 1.2, 1.6]
    for run in ("resumed", "two", "two_resumed"):
        assert _prompts_by_step(tmp_path / run) == whole, run
        assert rel_diff(weights(tmp_path / run), weights(tmp_path / "whole")) <= 1e-5, run
