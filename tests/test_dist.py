"""More than one process: real gloo process groups of 2 CPU processes (one thread each) against one
process with the same global batch — same losses and final weights for pretrain/SFT and GRPO, DDP and
FSDP2, resume under 2 processes, a rank-0 checkpoint transformers loads, sharded eval."""
import json
import math
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
    # A rank that tears gloo down while its peer still has the pair open aborts at exit (SIGABRT,
    # "terminate called without an active exception", seen about once in ten suites): meet first.
    torch.distributed.barrier()
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
    """The final weights a stage wrote (its top-level safetensors: rank 0's consolidated checkpoint)."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


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
    """A barely trained checkpoint (2 steps) to start GRPO and eval from."""
    out = corpus.parent / "base"
    alone("pretrain", "--data", corpus, "--out", out, "--model", TINY_MODEL, "--steps", 2, "--batch-size", 4,
          "--max-len", 128)
    return out


SFT = ["--model", TINY_MODEL, "--batch-size", 5, "--max-len", 128, "--lr", 1e-3, "--warmup-steps", 1]
# Rollouts of a random model: rewards differ within groups through the soft overlong penalty (some
# completions stop early, most run to the cap), so the advantages — and the update — are not zero.
GRPO = ["--tasks", "{arith: [2]}", "--prompts-per-step", 3, "--group-size", 4, "--max-new-tokens", 12,
        "--overlong-buffer", 10, "--lr", 1e-3, "--warmup-steps", 1, "--temperature", 1.5]
EVAL = ["--tasks", "{arith: [2]}", "--n-per-difficulty", 5, "--k", 2, "--max-new-tokens", 8]


@pytest.fixture(scope="module")
def runs(corpus, base):
    """Every stage once in one process and once in 2 processes (one spawn for all, to keep this fast).
    Pretrain: 5 rows a step, split 2 + 3; GRPO: 3 groups a step, split 1 + 2 — uneven shares, which
    the global normalisation makes exact."""
    root = corpus.parent
    pre = ["pretrain", "--data", corpus, *SFT]
    grpo = ["grpo", "--init", base, *GRPO]
    ev = ["eval", "--checkpoint", base, *EVAL]
    alone(*pre, "--out", root / "pre1", "--steps", 4)
    for loss in ("grpo", "dapo"):
        alone(*grpo, "--out", root / f"{loss}1", "--steps", 2, "--loss", loss)
    alone(*grpo, "--out", root / "single1", "--steps", 1, "--prompts-per-step", 1)
    alone(*ev, "--out", root / "eval1.json")
    torchrun([*pre, "--out", root / "pre_ddp", "--steps", 4],
             [*pre, "--out", root / "pre_fsdp", "--steps", 4, "--parallel", "fsdp"],
             [*pre, "--out", root / "pre_resume", "--steps", 2, "--save-every", 2],
             [*pre, "--out", root / "pre_resume", "--steps", 4, "--save-every", 2, "--resume"],
             [*grpo, "--out", root / "grpo2", "--steps", 2, "--loss", "grpo"],
             [*grpo, "--out", root / "dapo2", "--steps", 2, "--loss", "dapo"],
             [*grpo, "--out", root / "grpo_fsdp", "--steps", 1, "--loss", "grpo", "--parallel", "fsdp", "--save-every", 1],
             [*grpo, "--out", root / "grpo_fsdp", "--steps", 2, "--loss", "grpo", "--parallel", "fsdp", "--save-every", 1,
              "--resume"],
             [*grpo, "--out", root / "single2", "--steps", 1, "--prompts-per-step", 1],
             [*grpo, "--out", root / "minibatches2", "--steps", 1, "--minibatches", 6],
             [*ev, "--out", root / "eval2.json"])
    return root


@pytest.mark.parametrize("run", ["pre_ddp", "pre_fsdp", "pre_resume"])
def test_pretrain_two_processes_equal_one(runs, run):
    assert rel_diff(weights(runs / run), weights(runs / "pre1")) <= 1e-5
    assert metric(runs / run, "train/loss") == pytest.approx(metric(runs / "pre1", "train/loss"), rel=1e-5)
    assert metric(runs / run, "step") == [1, 2, 3, 4]      # rank 0 alone wrote metrics.jsonl


def test_rank0_checkpoint_loads_in_transformers(runs):
    """One consolidated HF folder, gathered from the FSDP shards."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(runs / "pre_fsdp", dtype=torch.float32)
    assert torch.equal(hf.model.embed_tokens.weight, weights(runs / "pre_fsdp")["model.embed_tokens.weight"])
    assert hf.model.embed_tokens.weight.shape[0] == weights(runs / "pre1")["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_grpo_two_processes_equal_one(runs, base, loss):
    """Same completions (row streams by global row), same kept groups (DAPO), same update."""
    one, two = runs / f"{loss}1", runs / f"{loss}2"
    assert rel_diff(weights(two), weights(one)) <= 1e-5
    assert rel_diff(weights(one), weights(base)) > 1e-4            # the steps did move the weights
    for key in ("rollout/reward_mean", "rollout/len_mean", "train/loss", "train/kl", "train/entropy", "train/grad_norm"):
        assert metric(two, key) == pytest.approx(metric(one, key), rel=1e-4, abs=1e-6), key
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()


def test_grpo_rank_without_a_group_still_steps(runs):
    """One group for two ranks: rank 0 rolls out nothing and trains on a weight-0 stand-in, so the
    gradient all-reduce meets and the step is rank 1's alone."""
    assert rel_diff(weights(runs / "single2"), weights(runs / "single1")) <= 1e-5
    assert metric(runs / "single2", "train/loss") == pytest.approx(metric(runs / "single1", "train/loss"), abs=1e-6)


def test_grpo_minibatches_on_uneven_shares(runs):
    """6 minibatches of 12 sequences split 4 + 8: both ranks take 4 optimizer steps (no hang)."""
    assert metric(runs / "minibatches2", "step") == [1]
    assert rel_diff(weights(runs / "minibatches2"), weights(runs / "grpo1")) > 0


def test_grpo_fsdp_and_resume_equal_one(runs):
    assert rel_diff(weights(runs / "grpo_fsdp"), weights(runs / "grpo1")) <= 1e-5


def test_eval_shards_problems(runs):
    one, two = (json.loads((runs / f).read_text()) for f in ("eval1.json", "eval2.json"))
    assert two["tasks"] == one["tasks"] and two["generated_tokens"] == one["generated_tokens"]


def test_ledger_counts_every_process(runs):
    one, two = (json.loads((runs / run / "ledger.json").read_text()) for run in ("pre1", "pre_ddp"))
    assert ("devices" not in one, two["devices"]) == (True, 2)
    assert two["flops"] == pytest.approx(one["flops"], rel=1e-12) and two["tokens"] == one["tokens"]
    assert two["device_hours"] == pytest.approx(2 * two["wall_s"] / 3600)


def test_shard_range_covers_in_order():
    for n in range(0, 9):
        for size in (1, 2, 3):
            parts = [dist.shard_range(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


# --- training options (single process) ------------------------------------------------------------

def _batch(tok):
    from qiusuo.sft import collate, encode_examples

    rows = [{"prompt": f"{a}+{a}=?", "completion": f"<answer>{2 * a}</answer>"} for a in range(11, 17)]
    seqs, _ = encode_examples(rows, tok, 64, False)
    return collate(seqs, [[0, 1, 2], [3, 4, 5]], tok.pad_id, 64)


def _loss(model, x, y, mask, pos, doc):
    logits = model(x, positions=pos, doc_ids=doc)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return (loss * mask.flatten()).sum() / mask.sum()


def test_packed_attention_equals_each_document_alone(tok):
    """Packed rows attend through scaled_dot_product_attention with a per-document causal mask: every
    document's outputs equal those of the document run alone from position 0."""
    from conftest import tiny_model

    model = tiny_model(tok)
    x, y, mask, pos, doc = _batch(tok)
    with torch.no_grad():
        packed = model(x, positions=pos, doc_ids=doc)
        for r in range(x.shape[0]):
            for d in range(int(doc[r].max()) + 1):
                at = (doc[r] == d).nonzero().squeeze(-1)
                alone_ = model(x[r, at][None])[0]
                assert torch.allclose(packed[r, at], alone_, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients(tok):
    from conftest import tiny_model

    grads = []
    for ckpt in (False, True):
        model = tiny_model(tok).train()
        if ckpt:
            dist.checkpoint_layers(model)
        _loss(model, *_batch(tok)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


def test_bf16_autocast_trains_close_to_fp32(tok):
    """bf16 compute, fp32 master weights and AdamW state: a few steps stay finite and close to fp32."""
    from conftest import tiny_model
    from qiusuo.sft import make_optimizer

    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model(tok).train()
        opt = make_optimizer(model, 3e-3, 0.0)
        batch = _batch(tok)
        losses[dtype] = []
        for _ in range(5):
            with dist.autocast(dtype, "cpu"):
                loss = _loss(model, *batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[dtype].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert all(math.isfinite(v) for v in losses["bfloat16"])
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_wrap_refuses_unknown_settings(tok):
    from conftest import tiny_model

    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp"):
        dist.wrap(tiny_model(tok), parallel="zero3")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        dist.wrap(tiny_model(tok), dtype="float16")
