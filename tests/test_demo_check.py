"""bench/demo_check.py, the independent re-measurement of a demo run: its strict checker scores a
known-correct trace right and every near miss wrong, its problems are held out and not in the corpus, and
it runs end to end on checkpoints through transformers."""
import json
import random
import re

import pytest

from bench.demo_check import canonical, check, draw, main, problems
from conftest import tiny_model
from qiusuo.model import save_model
from qiusuo.tasks import ArithmeticTask, arith_trace, format_completion, heldout


def test_checker_scores_a_known_correct_trace_and_rejects_near_misses():
    think, answer = arith_trace(4821, "+", 397)
    right = format_completion(think, answer)
    assert check(right, 5218) == {"correct": True, "trace": True, "reflects": False}
    assert check("<think></think><answer>5218</answer>", 5218) == {"correct": True, "trace": False, "reflects": False}
    assert check("<think>8-3-0=5>5,wait 2-3-0=9b>9</think><answer>9</answer>", 9)["reflects"]
    for bad in (right + " ", " " + right, right.replace(">5218</", ">05218</"), right.replace(">5218</", ">5219</"),
                right.replace(">5218</", ">+5218</"), "<think>x</think><answer>5218</answer><answer>5218</answer>",
                "<think><think></think><answer>5218</answer>", "<answer>5218</answer>"):
        assert not check(bad, 5218)["correct"], bad
    assert check("<think>1-1</think><answer>0</answer>", 0)["correct"]
    assert not check("<think>1-1</think><answer>-0</answer>", 0)["correct"]
    assert check("<think>3-7</think><answer>-4</answer>", -4)["correct"]


def test_problems_are_held_out_distinct_and_not_in_the_corpus():
    rng = random.Random(0)
    a, op, b = draw(rng, 4)
    assert len(str(a)) == 4 and (op != "-" or a >= b)
    got = problems([3, 4], 20, seed=1, corpus_prompts=set())
    assert len(got) == 40 and len({p["prompt"] for p in got}) == 40
    task = ArithmeticTask()
    for p in got:
        x, op, y = (int(v) if v.isdigit() else v for v in re.split(r"([+*-])", p["prompt"]))
        assert heldout(task.make_problem(x, op, y).key()) and heldout(f"arith:{canonical(x, op, y)}")
        assert p["answer"] == int(task.make_problem(x, op, y).answer)
    # a prompt in the corpus, in either operand order, is never drawn
    blocked = {got[0]["prompt"]}
    again = problems([3, 4], 20, seed=1, corpus_prompts=blocked)
    assert got[0]["prompt"] not in {p["prompt"] for p in again}


def test_runs_end_to_end_on_checkpoints_through_transformers(tmp_path, tok, capsys):
    run = tmp_path / "run"
    for i, stage in enumerate(("base", "control", "zero")):
        save_model(tiny_model(tok, seed=i), run / stage)
        tok.save(run / stage)
    (run / "eval").mkdir()
    (run / "eval" / "base.json").write_text(json.dumps({"overall": {"pass@1": 0.25, "trace_accuracy": 0.5,
                                                                      "reflection_rate": 0.0}}))
    out = main(["--run", str(run), "--digits", "3", "--n-per-digits", "3", "--k", "2", "--max-new-tokens", "12",
                "--json", str(tmp_path / "check.json")])
    assert set(out["stages"]) == {"base", "control", "zero"} and out["n_problems"] == 3
    base = out["stages"]["base"]
    assert 0.0 <= base["pass@1"] <= 1.0 and base["qiusuo"]["pass@1"] == pytest.approx(0.25)
    assert json.loads((tmp_path / "check.json").read_text())["gaps"].keys() == {"rl_vs_base", "rl_vs_control",
                                                                                  "trace_vs_base"}
    assert "independent: pass@1 RL − base" in capsys.readouterr().out
