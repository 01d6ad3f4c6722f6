"""Tests of the cost ledger, the FLOP estimates and the run report, on a hand-built fake run."""

import json
import logging
import math
import re
from types import SimpleNamespace

import pytest

from qiusuo import ledger, report
from qiusuo.ledger import StageLedger, forward_flops, git_info, train_flops
from qiusuo.report import discover_stages, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRICE = 3.0
# Stage -> (wall_s, price in its own ledger); the ledgers' prices differ from PRICE on purpose,
# so a report that ignored the price argument would show a different total.
LEDGERS = {
    "base/ledger.json": (1800.0, 1.0),
    "zero/ledger.json": (900.0, 1.0),
    "eval/base.ledger.json": (36.0, 2.0),
    "eval/zero.ledger.json": (72.0, 2.0),
}
GRPO_PNGS = [f"zero_{m}.png" for m in ("reward", "accuracy", "trace_accuracy", "reflection", "length", "kl",
                                       "entropy", "reflection_length")]


def _write_ledger(path, wall_s, price):
    """A ledger file as StageLedger.finish would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hours = wall_s / 3600
    path.write_text(
        json.dumps(
            {
                "stage": path.parent.name,
                "wall_s": wall_s,
                "flops": 1.5e15,
                "tokens": 1_000_000,
                "device": "cpu",
                "device_hours": hours,
                "price_per_device_hour": price,
                "cost": hours * price,
                "currency": "USD",
                "achieved_flops_per_s": 1.5e15 / wall_s,
            }
        )
    )


def _eval_result(stage, overall_pass, arith3_pass, trace_accuracy=0.6, reflection_rate=0.05):
    """An eval JSON with two tasks, two difficulties of arith and an "all" row per task."""

    def cell(pass_at_1, n):
        return {"pass@1": pass_at_1, "cons@k": pass_at_1 + 0.05, "n": n, "mean_len": 40.0}

    return {
        "checkpoint": f"runs/tiny/{stage}",
        "k": 8,
        "temperature": 0.6,
        "top_p": 0.95,
        "n_problems": 50,
        "overall": {
            "pass@1": overall_pass,
            "cons@k": overall_pass + 0.04,
            "n": 50,
            "mean_len": 37.2,
            "trace_accuracy": trace_accuracy,
            "trace_rate": 0.5,
            "reflection_rate": reflection_rate,
        },
        "tasks": {
            "arith": {"3": cell(arith3_pass, 10), "12": cell(0.1, 15), "all": cell(0.3, 25)},
            "countdown": {"all": cell(0.2, 25)},
        },
        "wall_s": 12.3,
    }


def _make_run(root):
    """A finished run: pretrained `base` (20 steps), GRPO `zero` (30 steps + a torn line), evals."""
    run = root / "tiny"
    (run / "base").mkdir(parents=True)
    (run / "zero").mkdir()
    (run / "eval").mkdir()
    (run / "base" / "config.yaml").write_text("model:\n  n_layers: 4\nlr: 0.001\n")
    (run / "zero" / "config.yaml").write_text("group_size: 8\nkl_coef: 0.04\n")
    base_lines = [
        {"step": s, "train/loss": 10.0 - 0.3 * s, "train/lr": 1e-3, "perf/tokens_per_s": 5e3}
        for s in range(20)
    ]
    (run / "base" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base_lines))
    zero_lines = [
        {
            "step": s,
            "rollout/reward_mean": s / 30,
            "rollout/accuracy": s / 100,
            "rollout/len_mean": 50.0 - s,
            "train/kl": 0.001 * s,
            "train/entropy": 2.0 - 0.01 * s,
            "rollout/reflection_rate": 0.01 * s,
            "rollout/trace_accuracy": 0.5 + 0.01 * s,
            "time_s": s,
        }
        for s in range(30)
    ]
    text = "".join(json.dumps(r) + "\n" for r in zero_lines)
    torn = '{"step": 30, "rollout/rew'  # the run was killed mid-write
    (run / "zero" / "metrics.jsonl").write_text(text + torn)
    (run / "eval" / "base.json").write_text(json.dumps(_eval_result("base", 0.41, 0.5)))
    (run / "eval" / "zero.json").write_text(json.dumps(_eval_result("zero", 0.55, 0.8, 0.75, 0.2)))
    (run / "eval" / "control.json").write_text(json.dumps(_eval_result("control", 0.3, 0.4, 0.55, 0.04)))
    for rel, (wall_s, price) in LEDGERS.items():
        _write_ledger(run / rel, wall_s, price)
    return run


def _fake_git(monkeypatch):
    """Pin the commit the report shows, so the tests do not depend on this checkout."""
    monkeypatch.setattr(report, "git_info", lambda path: {"commit": "0123abc", "dirty": True})


@pytest.fixture
def fake_git(monkeypatch):
    _fake_git(monkeypatch)


@pytest.fixture
def run_dir(tmp_path):
    """The fake run without metrics, for tests of tables: plotting is the slow part."""
    run = _make_run(tmp_path)
    for stage in ("base", "zero"):
        (run / stage / "metrics.jsonl").unlink()
    return run


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    """(run dir, report text) of the fake run priced at PRICE, built once: plots take time."""
    run = _make_run(tmp_path_factory.mktemp("priced"))
    with pytest.MonkeyPatch.context() as mp:
        _fake_git(mp)
        return run, write_report(run, price_per_device_hour=PRICE).read_text()


# ---------------------------------------------------------------------------- report


def test_report_header_and_summary(priced):
    _, text = priced
    assert text.startswith("# Run report: `tiny`")
    assert "- Git commit: `0123abc` (dirty: yes)" in text
    assert re.search(r"- Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "| logical_cores |" in text
    # Overall scores side by side, with the delta in percentage points.
    assert "| metric | `base` | `control` | `zero` | Δ zero − base |" in text
    assert "| pass@1 | 41.0% | 30.0% | 55.0% | +14.0 pt |" in text
    assert "| cons@8 | 45.0% | 34.0% | 59.0% | +14.0 pt |" in text
    assert "| trace accuracy | 60.0% | 55.0% | 75.0% | +15.0 pt |" in text
    assert "| reflection rate | 5.0% | 4.0% | 20.0% | +15.0 pt |" in text
    assert "| mean response length | 37.2 | 37.2 | 37.2 | +0.0 |" in text


def test_report_compares_rl_with_base_and_equal_compute_control(priced):
    _, text = priced
    # the paper-style table: a row per stage, in pipeline order, with its training FLOPs
    assert ("| stage | pass@1 | cons@8 | trace accuracy | trace rate | reflection rate | mean response length "
            "| training FLOPs |") in text
    assert "| `base` | 41.0% | 45.0% | 60.0% | 50.0% | 5.0% | 37.2 | 1.500e+15 |" in text
    assert "| `control` | 30.0% | 34.0% | 55.0% | 50.0% | 4.0% | 37.2 | – |" in text
    assert "| `zero` | 55.0% | 59.0% | 75.0% | 50.0% | 20.0% | 37.2 | 1.500e+15 |" in text
    assert "- pass@1, RL over the base: 41.0% → 55.0%, +14.0 pt" in text
    assert "- pass@1, RL over the equal-compute control (more pretraining): 30.0% → 55.0%, +25.0 pt" in text
    assert "- trace accuracy, RL over the base: 60.0% → 75.0%, +15.0 pt" in text
    assert "- reflection rate, RL over the base: 5.0% → 20.0%, +15.0 pt" in text


def test_report_grpo_reflection_trend(priced):
    _, text = priced
    # reflection = step/100: 4.5% over steps 0-9 → 24.5% over steps 20-29
    assert "reflection rate 4.5% (first 10 steps) → 24.5% (last 10 steps), +20.0 pt" in text
    assert "![zero reflection rate and length per step](plots/zero_reflection_length.png)" in text


def test_report_per_difficulty_rows(priced):
    _, text = priced
    assert "| arith | 3 | 10 | 50.0% | 40.0% | 80.0% | +30.0 pt |" in text
    assert "| countdown | all | 25 | 20.0% | 20.0% | 20.0% | +0.0 pt |" in text
    # Difficulties in numeric order (3 before 12), the "all" row of a task last.
    pass_table = text.split("### pass@1 by task and difficulty")[1].split("###")[0]
    rows = [line.split(" | ")[:2] for line in pass_table.splitlines() if line.startswith("| arith")]
    assert rows == [["| arith", "3"], ["| arith", "12"], ["| arith", "all"]]


def test_report_cost_total_uses_given_price(priced):
    _, text = priced
    total = sum(wall_s for wall_s, _ in LEDGERS.values()) / 3600 * PRICE
    assert total == pytest.approx(2.34)  # (1800 + 900 + 36 + 72) s at $3 per hour
    total_row = next(line for line in text.splitlines() if line.startswith("| **total**"))
    assert f"${total:.4f}" in total_row
    assert "| `eval zero` | cpu | 1 min 12 s |" in text
    base_row = "| `base` | cpu | 30 min 00 s | 1.500e+15 | 1,000,000 | 0.5000 | $3.00 | $1.5000 |"
    assert base_row in text


def test_report_cost_defaults_to_each_ledgers_price(run_dir, fake_git):
    text = write_report(run_dir).read_text()
    total = sum(wall_s / 3600 * price for wall_s, price in LEDGERS.values())
    total_row = next(line for line in text.splitlines() if line.startswith("| **total**"))
    assert f"${total:.4f}" in total_row


def test_report_plots_are_pngs_and_linked(priced):
    run_dir, text = priced
    for name in [*GRPO_PNGS, "base_loss.png"]:
        png = run_dir / "plots" / name
        assert png.stat().st_size > len(PNG_MAGIC)
        assert png.read_bytes()[: len(PNG_MAGIC)] == PNG_MAGIC
        assert f"](plots/{name})" in text
    # `base` has no rollouts, so no GRPO plots; `zero` is GRPO, so no loss plot.
    assert not (run_dir / "plots" / "base_reward.png").exists()
    assert not (run_dir / "plots" / "zero_loss.png").exists()


def test_report_grpo_trend_line(priced):
    _, text = priced
    # accuracy = step/100: steps 0-9 average 0.045, steps 20-29 average 0.245.
    assert "accuracy 4.5% (first 10 steps) → 24.5% (last 10 steps), +20.0 pt" in text
    # len_mean = 50 - step: 45.5 → 25.5.
    assert "response length 45.5 (first 10 steps) → 25.5 (last 10 steps), -20.0" in text


def test_report_config_blocks(priced):
    _, text = priced
    assert "<summary><code>base</code> config.yaml</summary>" in text
    assert "```yaml\nmodel:\n  n_layers: 4\nlr: 0.001\n```" in text
    assert "kl_coef: 0.04" in text


def test_report_sections_in_order(priced):
    _, text = priced
    headings = [
        "## Summary",
        "## Time and cost",
        "## GRPO curves",
        "## Pretraining curves",
        "## Config",
    ]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)


def test_report_says_what_is_missing(tmp_path, fake_git):
    run = tmp_path / "bare"
    (run / "corpus").mkdir(parents=True)
    (run / "corpus" / "config.yaml").write_text("n_docs: 10\n")
    (run / "base").mkdir()
    (run / "base" / "metrics.jsonl").write_text("")
    text = write_report(run).read_text()
    assert "No evaluation results" in text
    assert "No ledgers in this run" in text
    assert "- `base`: no readable `base/ledger.json`, so its cost is not counted." in text
    assert "No stage logged `rollout/reward_mean`." in text
    assert "- `corpus`: no metrics.jsonl." in text
    assert "- `base`: metrics.jsonl is empty or unreadable." in text
    assert "`base`: no config.yaml." in text


def test_report_ledger_without_price(tmp_path, fake_git):
    run = tmp_path / "run"
    (run / "corpus").mkdir(parents=True)
    (run / "corpus" / "ledger.json").write_text(json.dumps({"stage": "corpus", "wall_s": 7.0}))
    text = write_report(run).read_text()
    assert "| `corpus` |" in text
    assert "- `corpus`: no device-hours or price in its ledger, so no cost." in text
    # With a price given, the same ledger is costed from its wall time.
    text = write_report(run, price_per_device_hour=3600.0).read_text()
    assert "| **total** |  | 7.0 s |" in text and "$7.0000" in text


def test_report_one_eval_and_a_missing_ledger(run_dir, fake_git):
    (run_dir / "eval" / "zero.json").unlink()
    (run_dir / "eval" / "control.json").unlink()
    (run_dir / "zero" / "ledger.json").unlink()
    text = write_report(run_dir, price_per_device_hour=PRICE).read_text()
    assert "RL over the" not in text    # nothing to compare
    assert "Only one stage was evaluated, so there is no delta." in text
    assert "| pass@1 | 41.0% |" in text
    assert "- `zero`: no readable `zero/ledger.json`, so its cost is not counted." in text
    # The zero eval's ledger outlived its result and is still counted.
    assert "| `eval zero` |" in text
    total = (1800 + 36 + 72) / 3600 * PRICE
    assert f"${total:.4f}" in text


def test_report_requires_a_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_read_metrics_skips_malformed_lines(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    good = ['{"step": 0, "train/loss": 2.0}', '{"step": 1}']
    lines = [good[0], "not json", "", "[1, 2]", good[1], '{"step": 2, "t']
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="qiusuo.report"):
        rows = read_metrics(path)
    assert rows == [{"step": 0, "train/loss": 2.0}, {"step": 1}]
    assert len(caplog.records) == 3
    assert f"{path}:2:" in caplog.records[0].getMessage()
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_discover_stages_order(tmp_path):
    for name in ["zzz", "zero", "alpha", "base", "corpus", "eval", "plots", "empty"]:
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "config.yaml").write_text("a: 1\n")
    assert discover_stages(tmp_path) == ["corpus", "base", "zero", "alpha", "zzz"]


# ---------------------------------------------------------------------------- ledger


def test_stage_ledger_finish_cost(tmp_path, monkeypatch):
    clock = iter([100.0, 172.0])  # construction, then finish: 72 s of wall time
    monkeypatch.setattr(ledger, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stage = StageLedger("zero", price_per_device_hour=2.5, device="cpu")
    stage.add(flops=1e12, tokens=1000)
    stage.add(flops=2e12, tokens=500)
    path = tmp_path / "zero" / "ledger.json"
    record = stage.finish(path)
    assert record == {
        "stage": "zero",
        "wall_s": 72.0,
        "flops": 3e12,
        "tokens": 1500,
        "device": "cpu",
        "device_hours": 0.02,
        "price_per_device_hour": 2.5,
        "cost": 0.02 * 2.5,
        "currency": "USD",
        "achieved_flops_per_s": 3e12 / 72,
    }
    assert StageLedger.load(path) == record
    # Written through a temp file that was renamed, so nothing else is left in the folder.
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]


def test_stage_ledger_resume_keeps_totals(tmp_path, monkeypatch):
    # Run 1: built at t=0, checkpoint at t=40, then killed. Run 2: built at t=1000, done at 1030.
    clock = iter([0.0, 40.0, 1000.0, 1030.0])
    monkeypatch.setattr(ledger, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    first = StageLedger("base", price_per_device_hour=3600.0, device="cpu")
    first.add(flops=5e9, tokens=100)
    saved = first.snapshot()
    assert saved == {"wall_s": 40.0, "flops": 5e9, "tokens": 100}
    resumed = StageLedger("base", price_per_device_hour=3600.0, device="cpu")
    resumed.restore(saved)
    resumed.restore(None)  # a checkpoint without a ledger changes nothing
    resumed.add(flops=1e9, tokens=20)
    record = resumed.finish(tmp_path / "ledger.json")
    assert (record["wall_s"], record["flops"], record["tokens"]) == (70.0, 6e9, 120)
    assert record["cost"] == pytest.approx(70.0)


def test_stage_ledger_real_clock(tmp_path):
    record = StageLedger("base", 4.0, "cpu").finish(tmp_path / "ledger.json")
    assert record["wall_s"] >= 0
    assert record["cost"] == record["wall_s"] / 3600 * 4.0


def test_stage_ledger_load_missing_or_broken(tmp_path):
    assert StageLedger.load(tmp_path / "absent.json") is None
    (tmp_path / "torn.json").write_text('{"stage": "ba')
    assert StageLedger.load(tmp_path / "torn.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert StageLedger.load(tmp_path / "list.json") is None


def test_git_info_outside_a_repo(tmp_path, monkeypatch):
    # Stop git from finding a repository in a parent of the temp folder.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": False}
    assert git_info(tmp_path / "does-not-exist") == {"commit": "unknown", "dirty": False}


def test_git_info_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": False}


def test_hardware_fields():
    info = ledger.hardware()
    keys = {"device", "cpu", "logical_cores", "torch_threads", "ram_gib", "os", "python", "torch"}
    assert set(info) == keys
    assert info["logical_cores"] >= 1 and info["torch_threads"] >= 1
    assert isinstance(info["device"], str) and info["device"]


# ---------------------------------------------------------------------------- FLOPs


def test_flop_formulas_by_hand():
    # N = 1e6 params, 1000 tokens, 4 layers, d_model 128, ctx 256.
    # forward: 2*1e6*1000 + 2*4*128*256*1000 = 2e9 + 262_144_000
    assert forward_flops(1_000_000, 1000, 4, 128, 256) == 2_262_144_000
    # train: 6*1e6*1000 + 6*4*128*256*1000 = 6e9 + 786_432_000
    assert train_flops(1_000_000, 1000, 4, 128, 256) == 6_786_432_000
    assert train_flops(10, 0, 2, 8, 16) == 0


def test_measure_matmul_peak_is_a_rate():
    peak = ledger.measure_matmul_peak(n=128, repeats=2)
    assert math.isfinite(peak) and peak > 1e6
