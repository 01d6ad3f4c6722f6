"""More than one process: real gloo process groups of 2 CPU processes (one thread each) against one
process with the same global batch — same losses and final weights for pretrain/SFT and GRPO, DDP and
FSDP2, resume under 2 processes, a rank-0 checkpoint transformers loads, sharded eval."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qiusuo import dist
from qiusuo.cli import main

TINY_MODEL = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1}"


def _worker(rank: int, world: int, port: int, runs: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for argv in runs:
        assert main(argv) == 0, argv
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*runs, world: int = 2) -> None:
    """Each argv in `runs`, one after another, in `world` processes of one gloo group (as torchrun would)."""
    mp.start_processes(_worker, args=(world, free_port(), [[str(a) for a in r] for r in runs]), nprocs=world,
                       start_method="spawn")


def alone(*argv) -> None:
    """The same stage in this one process, with one thread like each worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)


def weights(folder):
    return torch.load(folder / "train_state.pt", weights_only=False)["model"]


def rel_diff(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all weights together. Not per tensor: the gradient of k_proj's bias is zero
    in exact arithmetic (it adds the same q·b to every key, which softmax ignores), so it holds only
    rounding noise, and Adam's first steps scale that noise up to ±lr whatever its size."""
    num = sum(float((a[k] - b[k]).square().sum()) for k in b)
    den = sum(float(b[k].square().sum()) for k in b)
    return (num / den) ** 0.5


def metric(folder, key):
    return [json.loads(x)[key] for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    assert main(["corpus", "--out", str(root / "corpus"), "--n-examples", "200"]) == 0
    return root / "corpus"


@pytest.fixture(scope="module")
def base(corpus):
    out = corpus.parent / "base"
    alone("pretrain", "--data", corpus, "--out", out, "--model", TINY_MODEL, "--steps", 2, "--batch-size", 4,
          "--max-len", 128)
    return out


SFT = ["--model", TINY_MODEL, "--batch-size", 5, "--max-len", 128, "--lr", 1e-3, "--warmup-steps", 1]


def test_pretrain_two_processes_equal_one(corpus, tmp_path):
    """5 rows a step, split 2 + 3: the global-token normalisation makes the uneven shares exact."""
    alone("pretrain", "--data", corpus, "--out", tmp_path / "one", "--steps", 3, *SFT)
    torchrun(["pretrain", "--data", corpus, "--out", tmp_path / "ddp", "--steps", 3, *SFT],
             ["pretrain", "--data", corpus, "--out", tmp_path / "fsdp", "--steps", 3, "--parallel", "fsdp", *SFT])
    one = weights(tmp_path / "one")
    assert rel_diff(weights(tmp_path / "ddp"), one) <= 1e-5
    assert rel_diff(weights(tmp_path / "fsdp"), one) <= 1e-5
    for run in ("ddp", "fsdp"):
        assert metric(tmp_path / run, "train/loss") == pytest.approx(metric(tmp_path / "one", "train/loss"), rel=1e-5)
        assert metric(tmp_path / run, "perf/tokens_per_s") != []
    # rank 0 alone wrote the stage: one consolidated checkpoint that transformers loads
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp", dtype=torch.float32)
    assert torch.equal(hf.model.embed_tokens.weight, weights(tmp_path / "fsdp")["model.embed_tokens.weight"])


def test_pretrain_resume_under_two_processes(corpus, tmp_path):
    alone("pretrain", "--data", corpus, "--out", tmp_path / "one", "--steps", 4, *SFT)
    torchrun(["pretrain", "--data", corpus, "--out", tmp_path / "two", "--steps", 2, "--save-every", 2, *SFT],
             ["pretrain", "--data", corpus, "--out", tmp_path / "two", "--steps", 4, "--save-every", 2, "--resume", *SFT])
    assert rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5
    assert [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# Rollouts of a random model: rewards differ within groups through the soft overlong penalty (some
# completions stop early, most run to the cap), so the advantages — and the update — are not zero.
GRPO = ["--tasks", "{arith: [2]}", "--prompts-per-step", 3, "--group-size", 4, "--max-new-tokens", 12,
        "--overlong-buffer", 10, "--lr", 1e-3, "--warmup-steps", 1, "--temperature", 1.5]


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_grpo_two_processes_equal_one(base, tmp_path, loss):
    """3 groups a step over 2 ranks (2 + 1); DAPO's refills and kept groups are global."""
    args = ["--init", base, "--steps", 2, "--loss", loss, *GRPO]
    alone("grpo", "--out", tmp_path / "one", *args)
    torchrun(["grpo", "--out", tmp_path / "two", *args])
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert rel_diff(two, one) <= 1e-5
    assert rel_diff(one, weights(base)) > 1e-4            # the steps did move the weights
    for key in ("rollout/reward_mean", "rollout/len_mean", "train/loss", "train/entropy"):
        assert metric(tmp_path / "two", key) == pytest.approx(metric(tmp_path / "one", key), rel=1e-5, abs=1e-6), key
    samples = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert samples == (tmp_path / "one" / "samples.jsonl").read_text().splitlines()


def test_grpo_fsdp_and_resume_equal_one(base, tmp_path):
    args = ["--init", base, "--loss", "grpo", "--save-every", 1, *GRPO]
    alone("grpo", "--out", tmp_path / "one", "--steps", 2, *args)
    torchrun(["grpo", "--out", tmp_path / "two", "--steps", 1, "--parallel", "fsdp", *args],
             ["grpo", "--out", tmp_path / "two", "--steps", 2, "--parallel", "fsdp", "--resume", *args])
    assert rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5


def test_eval_shards_problems(base, tmp_path):
    args = ["--checkpoint", base, "--tasks", "{arith: [2]}", "--n-per-difficulty", 5, "--k", 2, "--max-new-tokens", 8]
    alone("eval", "--out", tmp_path / "one.json", *args)
    torchrun(["eval", "--out", tmp_path / "two.json", *args])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["tasks"] == one["tasks"] and two["generated_tokens"] == one["generated_tokens"]


def test_shard_range_covers_in_order():
    for n in range(0, 9):
        for size in (1, 2, 3):
            parts = [dist.shard_range(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
