"""Smoke runs of every CLI stage with tiny settings, resume after a stop, and clear errors on bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qiusuo.cli import main

pytestmark = pytest.mark.slow

TINY_MODEL = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1}"


def run(*args):
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    run("corpus", "--out", root / "corpus", "--n-examples", 400)
    run("pretrain", "--data", root / "corpus", "--out", root / "base", "--model", TINY_MODEL,
        "--steps", 6, "--batch-size", 4, "--save-every", 3, "--log-every", 3)
    return root


def test_corpus_mixes_styles_and_tasks(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "corpus" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 400
    assert {r["style"] for r in rows} == {"direct", "steps", "flawed", "reflect"}
    assert {r["task"] for r in rows} == {"arith", "countdown"}


def test_pretrain_writes_a_complete_stage(tiny_run):
    base = tiny_run / "base"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.jsonl", "config.yaml", "ledger.json"):
        assert (base / name).exists(), name
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert (base / "checkpoints" / "step-000006" / "train_state.pt").exists()
    lines = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    ledger = json.loads((base / "ledger.json").read_text())
    assert ledger["flops"] > 0 and ledger["cost"] >= 0


def test_pretrain_resume_continues_exactly(tiny_run, tmp_path):
    """6 steps in one go == 3 steps, stop, resume for the rest (same weights, bit for bit)."""
    args = ["--data", tiny_run / "corpus", "--model", TINY_MODEL, "--batch-size", 4, "--save-every", 3]
    run("pretrain", "--out", tmp_path / "a", "--steps", 6, *args)
    run("pretrain", "--out", tmp_path / "b", "--steps", 3, *args)
    run("pretrain", "--out", tmp_path / "b", "--steps", 6, "--resume", *args)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_grpo_eval_report(tiny_run, tmp_path, loss):
    out = tmp_path / "zero"
    run("grpo", "--init", tiny_run / "base", "--out", out, "--loss", loss, "--steps", 2, "--prompts-per-step", 2,
        "--group-size", 4, "--max-new-tokens", 16, "--mu", 2, "--minibatches", 2, "--beta", 0.01, "--sample-every", 1)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for key in ("rollout/reward_mean", "rollout/accuracy", "rollout/len_mean", "rollout/zero_std_frac",
                "rollout/reflection_rate",
                "train/kl", "train/entropy", "train/clip_frac", "train/grad_norm", "perf/tokens_per_s", "perf/step_s"):
        assert key in metrics[0], key
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reward", "advantage"} <= set(samples[0])
    run("eval", "--checkpoint", out, "--n-per-difficulty", 2, "--k", 2, "--max-new-tokens", 16,
        "--tasks", "{arith: [2], countdown: [3]}")
    result = json.loads((tmp_path / "eval" / "zero.json").read_text())
    assert result["k"] == 2 and result["overall"]["n"] == 4
    assert set(result["tasks"]) == {"arith", "countdown"}
    assert 0.0 <= result["overall"]["pass@1"] <= 1.0
    assert 0.0 <= result["overall"]["reflection_rate"] <= 1.0 and "trace_accuracy" in result["overall"]
    run("report", tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "zero" in report and (tmp_path / "plots" / "zero_reward.png").exists()


def test_grpo_resume(tiny_run, tmp_path):
    args = ["--init", tiny_run / "base", "--out", tmp_path / "z", "--prompts-per-step", 2, "--group-size", 2,
            "--max-new-tokens", 8, "--save-every", 1]
    run("grpo", "--steps", 1, *args)
    run("grpo", "--steps", 2, "--resume", *args)
    steps = [json.loads(x)["step"] for x in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "completion": "<think></think><answer>2</answer>"}\n{oops\n')
    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: malformed" in capsys.readouterr().err
    assert main(["grpo", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["grpo", "--loss", "ppo"]) == 2
    assert "loss must be one of" in capsys.readouterr().err
    assert main(["pretrain", "--steps", "many"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["grpo", "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("grpo:\n  stepz: 3\n")
    assert main(["grpo", "--config", str(cfg)]) == 2
    assert "unknown GRPOConfig setting(s): stepz" in capsys.readouterr().err


def test_demo_runs_every_stage_and_resume_skips_them(tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    # One short row per pretraining step, so that the control's FLOPs can match GRPO's closely.
    cfg.write_text(f"""
corpus: {{n_examples: 300}}
pretrain: {{steps: 4, batch_size: 1, max_len: 64, model: {TINY_MODEL}}}
eval: {{n_per_difficulty: 2, k: 2, max_new_tokens: 12, tasks: {{arith: [2]}}}}
grpo: {{steps: 2, prompts_per_step: 2, group_size: 2, max_new_tokens: 12, tasks: {{arith: [2]}}}}
""")
    r = tmp_path / "r"
    run("demo", "--run", r, "--config", cfg, "--price-per-device-hour", 2.0)
    report = (r / "report.md").read_text()
    assert "`base`" in report and "`zero`" in report and "`control`" in report and "pass@1" in report
    assert "- pass@1, RL over the equal-compute control" in report
    assert json.loads((r / "zero" / "ledger.json").read_text())["price_per_device_hour"] == 2.0
    # the control: the base pretrained further, for the FLOPs the GRPO stage spent
    zero, control = (json.loads((r / s / "ledger.json").read_text())["flops"] for s in ("zero", "control"))
    steps = [json.loads(x)["step"] for x in (r / "control" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) > 4 and zero <= control <= zero * (1 + 2 / len(steps))   # stops at the first step past it
    assert (r / "eval" / "control.json").exists()
    capsys.readouterr()
    run("demo", "--run", r, "--config", cfg, "--resume")
    out = capsys.readouterr().out
    assert out.count("already done") == 7


@pytest.mark.parametrize("stage", ["corpus", "pretrain", "grpo", "eval", "demo", "report"])
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text or stage == "report"
    if stage == "grpo":
        assert "KL coefficient" in text and "--resume" in text
