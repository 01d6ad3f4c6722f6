"""`qiusuo paper`: every stage of the R1 recipe runs in order and the report carries the paper's table."""
import json

import pytest
import yaml

from qiusuo.cli import main
from qiusuo.paper import ROWS, findings, lang_table, row_figures

TINY = {
    "corpus": {"tasks": {"arith": [1, 2]}, "task_weights": {"arith": 1.0}, "n_examples": 300,
               "langs": {"en": 0.5, "zh": 0.5}, "mixed_share": {"zh": 0.3}, "weak_lang": "zh",
               "weak_slip_share": 0.3},
    "pretrain": {"steps": 3, "batch_size": 4, "max_len": 96, "save_every": 3, "warmup_steps": 1,
                 "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 1}},
    "eval": {"tasks": {"arith": [2]}, "n_per_difficulty": 3, "k": 2, "max_new_tokens": 16, "langs": ["en", "zh"]},
    "r1": {"reward_language": 1.0},
    "grpo": {"tasks": {"arith": [2]}, "langs": {"en": 0.5, "zh": 0.5}, "steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 16,
             "save_every": 2},
    "coldstart": {"tasks": {"arith": [2]}, "task_weights": {"arith": 1.0}, "styles": {"steps": 1.0},
                  "n_examples": 40},
    "cold": {"steps": 2, "batch_size": 4, "max_len": 96, "lr": 1e-4, "warmup_steps": 1, "save_every": 2},
    "sample": {"tasks": {"arith": [1]}, "n_per_difficulty": 3, "k": 2, "max_new_tokens": 16},
    "student_base": {"steps": 2, "batch_size": 4, "max_len": 96, "warmup_steps": 1, "save_every": 2,
                     "model": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1}},
    "student": {"steps": 2, "batch_size": 4, "max_len": 96, "warmup_steps": 1, "save_every": 2},
}


@pytest.mark.slow
def test_every_stage_runs_and_the_report_has_the_table(tmp_path):
    cfg = tmp_path / "paper.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "paper"
    assert main(["paper", "--run", str(run), "--config", str(cfg)]) == 0
    for stage in ("corpus", "base", "control", "zero", "coldstart", "cold", "r1", "r1_nolang", "sampled", "student_base",
                  "student_rl"):
        assert (run / stage / "ledger.json").exists(), stage
    # The control spent the FLOPs of the R1-Zero stage (whole pretraining steps: at most one step more).
    control, zero, base = (json.loads((run / s / "ledger.json").read_text())["flops"] for s in ("control", "zero", "base"))
    assert zero <= control <= zero + base / 3 * 1.5
    # The RL-only student spent at least what distillation did.
    rl = json.loads((run / "student_rl" / "ledger.json").read_text())["flops"]
    distill = json.loads((run / "sampled" / "ledger.json").read_text())["flops"]
    if (run / "student" / "ledger.json").exists():
        distill += json.loads((run / "student" / "ledger.json").read_text())["flops"]
    assert rl >= distill
    report = (run / "report.md").read_text()
    assert report.startswith("# The R1 recipe in miniature")
    for label, _, _ in ROWS:
        assert f"| {label} |" in report
    assert "Which of the paper's findings reproduce" in report
    r1 = yaml.safe_load((run / "r1" / "config.yaml").read_text())
    nolang = yaml.safe_load((run / "r1_nolang" / "config.yaml").read_text())
    assert r1["reward_language"] == 1.0 and nolang["reward_language"] == 0.0
    assert json.loads((run / "eval" / "r1.json").read_text())["langs"]["zh"]["n"] == 3
    # A second run with --resume finds every stage done and only rewrites the report.
    assert main(["paper", "--run", str(run), "--config", str(cfg), "--resume"]) == 0


def _stage(run, name, flops, cost):
    (run / name).mkdir(parents=True, exist_ok=True)
    (run / name / "ledger.json").write_text(json.dumps({"flops": flops, "cost": cost, "device_hours": cost * 10}))


def test_row_figures_add_up_the_lineage_and_price_solved_problems(tmp_path):
    run = tmp_path
    for name, flops, cost in (("corpus", 0, 0.001), ("base", 1e12, 0.01), ("zero", 2e11, 0.002)):
        _stage(run, name, flops, cost)
    (run / "eval").mkdir()
    (run / "eval" / "zero.json").write_text(json.dumps(
        {"k": 8, "n_problems": 100, "overall": {"pass@1": 0.5, "cons@k": 0.6, "mean_len": 40.0}}))
    f = row_figures(run, "zero", ("corpus", "base", "zero"), None)
    assert f["flops"] == pytest.approx(1.2e12)
    assert f["cost"] == pytest.approx(0.013)
    assert f["cost_per_solved"] == pytest.approx(0.013 / 50)
    assert f["missing"] == []
    # Re-priced: device-hours × the new price.
    assert row_figures(run, "zero", ("corpus", "base", "zero"), 1.0)["cost"] == pytest.approx(0.13)
    assert row_figures(run, "base", ("corpus", "base"), None) is None   # not evaluated


def test_findings_say_reproduced_or_not_with_numbers():
    fig = {"base": {"pass@1": 0.2, "trace_acc": 0.5, "mean_len": 20.0, "reflection": 0.1},
           "equal-compute control": {"pass@1": 0.22},
           "R1-Zero (RL from base)": {"pass@1": 0.5, "trace_acc": 0.45, "mean_len": 35.0, "reflection": 0.4},
           "R1 (cold start + RL)": None, "distilled student": {"pass@1": 0.3}, "student, RL only": {"pass@1": 0.1}}
    text = "\n".join(findings(fig))
    assert "over the base (R1-Zero): **reproduced** (pass@1 50.0 vs 20.0)" in text
    assert "trace accuracy, R1-Zero vs base): **not reproduced** (trace accuracy 45.0 vs 50.0)" in text
    assert "R1 vs R1-Zero): not measured" in text
    assert "RL-only student): **reproduced** (pass@1 30.0 vs 10.0)" in text
    assert "mean length 20.0 → 35.0" in text
    assert 'moment"; R1-Zero vs base): **reproduced** (reflection rate 40.0 vs 10.0)' in text


def test_findings_check_mixing_from_the_cold_start_and_the_language_reward():
    fig = {"base": {"pass@1": 0.2, "lang": 0.9, "langs": {"zh": {"lang": 0.85}}},
           "R1-Zero (RL from base)": {"pass@1": 0.4, "lang": 0.95, "langs": {"zh": {"lang": 0.9}}},
           "cold start (SFT, before RL)": {"pass@1": 0.5, "lang": 0.85, "langs": {"zh": {"lang": 0.7}}},
           "R1 (cold start + RL)": {"pass@1": 0.45, "lang": 1.0, "langs": {"zh": {"lang": 1.0}}},
           "R1 without the language reward": {"pass@1": 0.47, "lang": 0.6, "langs": {"zh": {"lang": 0.3}}}}
    text = "\n".join(findings(fig))
    assert ("mixing (from the base): **not reproduced** (language consistency 90.0 base → 95.0 R1-Zero; "
            "Chinese questions 85.0 → 90.0)") in text
    assert ("mixing (from the cold start): **reproduced** (language consistency 85.0 cold start → 60.0 R1 "
            "without the reward; Chinese questions 70.0 → 30.0)") in text
    assert "question's language: **reproduced** (consistency 60.0 without → 100.0 with), costing 2.0 points" in text
    assert "on the cold start itself (R1 vs cold start): **not reproduced** (pass@1 45.0 vs 50.0)" in text


def test_lang_table_has_pass_and_consistency_per_question_language():
    fig = {"base": {"langs": {"en": {"pass@1": 0.3, "lang": 1.0}, "zh": {"pass@1": 0.1, "lang": 0.5}}},
           "R1-Zero (RL from base)": None}
    assert lang_table(fig) == ["| model | pass@1 en | pass@1 zh | consistency en | consistency zh |",
                               "| --- | ---: | ---: | ---: | ---: |",
                               "| base | 30.0 | 10.0 | 100.0 | 50.0 |"]
    assert lang_table({"base": {"langs": {"en": {"pass@1": 0.3, "lang": 1.0}}}}) == []


def test_mixing_section_tracks_chinese_consistency_per_step_and_the_premise(tmp_path):
    from qiusuo.language import localize
    from qiusuo.paper import accuracy_by_cot, mixing_curve, mixing_section
    from qiusuo.tasks import format_completion

    def roll(step, lang_of_cot, acc, prompt="计算 2+3"):
        return json.dumps({"step": step, "prompt": prompt, "accuracy": acc,
                           "completion": format_completion(localize("2+3=5", lang_of_cot), "5")})

    # without the reward the English CoTs (the more accurate ones) spread; with it, Chinese holds
    nolang = [roll(1, "zh", 0.0), roll(1, "en", 1.0), roll(1, "zh", 1.0), roll(1, "zh", 0.0),
              roll(5, "en", 1.0), roll(5, "en", 1.0), roll(5, "zh", 0.0), roll(5, "en", 1.0, prompt="compute 2+3")]
    r1 = [roll(1, "zh", 0.0), roll(1, "en", 1.0), roll(5, "zh", 1.0), roll(5, "zh", 1.0)]
    for stage, rows in (("r1_nolang", nolang), ("r1", r1)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "samples.jsonl").write_text("\n".join(rows) + "\n")
    assert mixing_curve(tmp_path / "r1_nolang" / "samples.jsonl") == [(1, 0.75, 4), (5, pytest.approx(1 / 3), 3)]
    split = accuracy_by_cot(tmp_path / "r1_nolang" / "samples.jsonl", last_step=1)
    assert split == {"same": (3, pytest.approx(1 / 3)), "other": (1, 1.0)}
    text = "\n".join(mixing_section(tmp_path, tmp_path / "plots"))
    assert "| r1_nolang (without the language reward) | 75.0 (step 1, n = 4) | 33.3 (step 5, n = 3) | -41.7 |" in text
    assert "| r1 (with the language reward) | 50.0 (step 1, n = 2) | 100.0 (step 5, n = 2) | +50.0 |" in text
    assert "a Chinese CoT 25.0 % (n = 4), an English CoT 100.0 % (n = 3)" in text   # steps ≤ 10
    assert (tmp_path / "plots" / "paper_mixing.png").stat().st_size > 0
    assert mixing_section(tmp_path / "nothing", tmp_path / "plots") == []
