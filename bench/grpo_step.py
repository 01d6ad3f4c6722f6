"""One GRPO step, qiusuo vs TRL's `GRPOTrainer`, same checkpoint and settings: 8 prompts × 8 samples,
up to 64 new tokens, lr 1e-4, β = 0, the paper's `grpo` loss, sampling at T = 1, one optimizer step per
rollout batch. Prints completions/s and the share of each step spent generating (median over steps,
after one warm-up step). TRL is a bench-only dependency: `pip install -c constraints.txt trl`.

    .venv/bin/python bench/grpo_step.py [--checkpoint runs/tiny/base | --size bpe40m] [--steps 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.generate import SIZES, checkpoint  # noqa: E402
from qiusuo.checkpoint import load_checkpoint  # noqa: E402
from qiusuo.engine import Engine  # noqa: E402
from qiusuo.grpo import VARIANTS, GRPOConfig, collect, group_advantages, training_batch, update  # noqa: E402
from qiusuo.ledger import hardware  # noqa: E402
from qiusuo.rewards import RewardWeights, score_completion  # noqa: E402
from qiusuo.sft import make_optimizer  # noqa: E402
from qiusuo.tasks import get_task  # noqa: E402

P, G, NEW, LR = 8, 8, 64, 1e-4


def ours(ckpt: Path, steps: int, new: int = NEW, device: str = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[list[float], list[float]]:
    model, tok = load_checkpoint(ckpt)
    model.to(device, dtype)
    cfg = GRPOConfig(init=str(ckpt), tasks={"arith": [3, 4], "countdown": [3]}, prompts_per_step=P, group_size=G,
                     max_new_tokens=new, lr=LR, beta=0.0, temperature=1.0)
    opt = make_optimizer(model, LR, 0.0)
    engine, rng = Engine(model, tok), random.Random(0)
    step_s, gen_s = [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        model.eval()
        r, _, _ = collect(engine, tok, cfg, rng, step)
        t_gen = time.perf_counter() - t0
        batch = training_batch(r, tok.pad_id, device)
        model.train()
        update(model, opt, batch, group_advantages(r.rewards).flatten(), None, None, VARIANTS["grpo"], cfg)
        if device != "cpu":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            step_s.append(time.perf_counter() - t0)
            gen_s.append(t_gen)
    return step_s, gen_s


def trl(ckpt: Path, steps: int, new: int = NEW, device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    tasks = {"arith": get_task("arith"), "countdown": get_task("countdown")}
    rng = random.Random(0)
    problems = [tasks[n].sample("train", rng.randrange(2**31), d)
                for n, d in [("arith", 3), ("arith", 4), ("countdown", 3)] * (P * (steps + 2))]
    by_prompt = {p.prompt: p for p in problems}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}]} for p in problems])

    def reward(completions, prompts, **_):
        out = []
        for c, p in zip(completions, prompts):
            problem = by_prompt[p[-1]["content"]]
            out.append(score_completion(tasks[problem.task], problem, c[0]["content"], RewardWeights())[0])
        return out

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    gen_s, step_s, marks = [], [], {}
    original = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        gen_s.append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_s.append(time.perf_counter() - marks["t0"])

    args = TRLConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=P * G, num_generations=G,
                     max_completion_length=new, learning_rate=LR, beta=0.0, loss_type="grpo", temperature=1.0,
                     max_steps=steps + 1, logging_steps=1000, save_strategy="no", report_to=[],
                     use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Timer()])
    trainer.train()
    return step_s[1:], gen_s[1:len(step_s)]


def report(name: str, step_s: list[float], gen_s: list[float]) -> float:
    step = statistics.median(step_s)
    rate = P * G / step
    print(f"{name:>8}: {step:6.2f} s/step  {rate:7.1f} completions/s  generating {100 * sum(gen_s) / sum(step_s):4.0f}% of the step")
    return rate


def compare(ckpt: Path, steps: int, new: int = NEW, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Both trainers' step on one checkpoint, one after the other in this process: completions/s."""
    a = report("qiusuo", *ours(ckpt, steps, new, device, dtype))
    b = report("TRL", *trl(ckpt, steps, new, device, dtype))
    return {"prompts": P, "group": G, "max_new_tokens": new, "qiusuo_completions_s": a, "trl_completions_s": b,
            "ratio": a / b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="random model without --checkpoint")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    ckpt = checkpoint(args.checkpoint, args.size)
    print(f"# {hardware()['device']} ({hardware()['cpu']}), {P} prompts × {G} samples, ≤ {NEW} new tokens, "
          f"median of {args.steps} steps")
    print(f"ratio: {compare(ckpt, args.steps)['ratio']:.2f}x completions/s")


if __name__ == "__main__":
    main()
