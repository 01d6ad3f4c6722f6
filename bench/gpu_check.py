"""The GPU figures of issue 15 in one run, on a random Qwen2.5-0.5B-shaped checkpoint (written in bf16 by
`transformers`, read back through qiusuo's own loading path, `checkpoint.load_checkpoint`):

- generate: engine tokens/s — eager and with CUDA graphs — vs `transformers.generate` at batch 1 / 64 /
  256 (128 new tokens, sampling, no early stop), each pair measured back to back;
- grpo_step: one GRPO step as `qiusuo grpo` takes it (fp32 master weights, `dist.wrap`, bf16 autocast,
  rollouts by `Engine(dtype=bfloat16)`) vs TRL's `GRPOTrainer` (8 prompts × 8 samples, ≤ 256 new
  tokens), completions/s;
- sft: SFT tokens/s and MFU as `qiusuo sft` trains (packed documents, `dist.wrap`, bf16 autocast, fp32
  AdamW), against the measured bf16 matmul peak and the device's nominal dense peak where known;
- memory: peak allocated / reserved.

`<out>/gpu_check.json` is rewritten after every part, so a run cut short by a time limit still leaves
what it measured. `--smoke` runs the same code on a tiny model with small settings (on the CPU when
there is no GPU, in bf16 too: all but CUDA graphs and flash attention) to prove the script end to end.

    bench/gpu_check.sh OUT_DIR [--smoke] [--parts generate grpo sft]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import generate, grpo_step  # noqa: E402
from qiusuo import dist  # noqa: E402
from qiusuo.checkpoint import load_checkpoint  # noqa: E402
from qiusuo.engine import Engine, SamplingParams  # noqa: E402
from qiusuo.grpo import VARIANTS, GRPOConfig, collect, group_advantages, training_batch, update  # noqa: E402
from qiusuo.ledger import forward_flops, hardware, measure_matmul_peak, train_flops  # noqa: E402
from qiusuo.model import flash_varlen_applies  # noqa: E402
from qiusuo.sft import batches, collate, make_optimizer  # noqa: E402

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
"""Qwen2.5-0.5B's shape (494 M parameters, tied embedding, q/k/v bias, rope θ 1e6)."""
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
"""Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment."""


def build(out: Path, dims: dict, vocab: int, dtype: torch.dtype) -> Path:
    """A random Qwen2 checkpoint saved by `transformers` in `dtype`, with a `vocab`-token BPE tokenizer
    (the embedding has more rows, as Qwen2.5's has)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = generate.bpe_tokenizer(vocab)
    tok.save(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(**dims, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, bos_token_id=None)
    Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(out)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_vs_hf(ckpt: Path, batches_: list[int], new: int, repeats: int, device: str, dtype: torch.dtype,
                 peak: float, save) -> list[dict]:
    """Generated tokens/s of the engine (eager, and with CUDA graphs on a GPU) and of
    `transformers.generate` at each batch size, same weights in `dtype`, sampling at T = 1, exactly
    `new` tokens per row; median of `repeats` after a warm-up. `save(rows)` runs after each batch size."""
    from transformers import AutoModelForCausalLM

    model, tok = load_checkpoint(ckpt, device)
    model = model.to(dtype).eval()
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    cuda = device.startswith("cuda")
    engines = {"eager": Engine(model, None, eos_ids=(), max_batch=max(batches_), cuda_graphs=False)}
    if cuda:
        engines["graphs"] = Engine(model, None, eos_ids=(), max_batch=max(batches_), cuda_graphs=True)
    prompt = tok.prompt_ids("4821+397")
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    cfg, rows = model.config, []
    for b in batches_:
        ids = torch.tensor([prompt] * b, device=device)

        def run_hf():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                            top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_id, use_cache=True)

        tokens = b * new
        row = {"batch": b, "new_tokens": new, "decoder": engines["eager"].decoder_type.__name__}
        for name, engine in engines.items():
            try:   # a failure of one engine (the untested graph capture) leaves the others' figures
                t = generate.timed(lambda: engine.generate([prompt] * b, params), repeats, device)
            except Exception as e:
                traceback.print_exc()
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                continue
            row[f"{name}_tok_s"] = tokens / t
            row[f"{name}_mfu"] = forward_flops(model.num_params(), tokens, cfg.num_hidden_layers, cfg.hidden_size,
                                               len(prompt) + new) / t / peak
        row["hf_tok_s"] = tokens / generate.timed(run_hf, repeats, device)
        for name in engines:
            if f"{name}_tok_s" in row:
                row[f"{name}_vs_hf"] = row[f"{name}_tok_s"] / row["hf_tok_s"]
        if cuda and engines["graphs"]._runner is not None:
            row["graphs_captured"] = len(engines["graphs"]._runner.graphs)
        rows.append(row)
        print("generate batch {batch:>4}: {tail}".format(batch=b, tail=", ".join(
            f"{k} {v:,.2f}" for k, v in row.items() if k.endswith(("tok_s", "vs_hf")))), flush=True)
        save(rows)
    return rows


def grpo_ours(ckpt: Path, steps: int, new: int, device: str, dtype: str) -> tuple[list[float], list[float]]:
    """`qiusuo grpo`'s step on the benchmark's settings (`grpo_step.P` × `grpo_step.G`, lr, β = 0, the
    paper's loss): fp32 master weights wrapped by `dist.wrap`, rollouts by an engine decoding in
    `dtype` (as `qiusuo grpo` does on a GPU; here on the CPU too, so the smoke run takes that path),
    the update under `dist.autocast` (inside `grpo.update`). Seconds per step and generating."""
    model, tok = load_checkpoint(ckpt, device)
    cfg = GRPOConfig(init=str(ckpt), tasks={"arith": [3, 4], "countdown": [3]}, prompts_per_step=grpo_step.P,
                     group_size=grpo_step.G, max_new_tokens=new, lr=grpo_step.LR, beta=0.0, temperature=1.0,
                     device=device, dtype=dtype)
    model = dist.wrap(model, cfg.parallel, cfg.dtype, cfg.grad_checkpointing)
    opt = make_optimizer(model, cfg.lr, 0.0)
    engine = Engine(model, tok, dtype=dist.DTYPES[cfg.dtype])
    rng, step_s, gen_s = random.Random(0), [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        model.eval()
        r, _, _ = collect(engine, tok, cfg, rng, step)
        engine.forget_weights()
        t_gen = time.perf_counter() - t0
        batch = training_batch(r, tok.pad_id, device)
        model.train()
        update(model, opt, batch, group_advantages(r.rewards).flatten().to(device), None, None, VARIANTS["grpo"],
               cfg, device=device)
        sync(device)
        if step:  # the first step warms up (and captures the engine's graphs)
            step_s.append(time.perf_counter() - t0)
            gen_s.append(t_gen)
    return step_s, gen_s


def grpo_vs_trl(ckpt: Path, steps: int, new: int, device: str, dtype: torch.dtype, save) -> dict:
    out = {"prompts": grpo_step.P, "group": grpo_step.G, "max_new_tokens": new, "steps": steps}
    out["qiusuo_completions_s"] = grpo_step.report("qiusuo", *grpo_ours(ckpt, steps, new, device, str(dtype)[6:]))
    save(out)
    out["trl_completions_s"] = grpo_step.report("TRL", *grpo_step.trl(ckpt, steps, new, device, dtype))
    out["ratio"] = out["qiusuo_completions_s"] / out["trl_completions_s"]
    return out


def sft(ckpt: Path, device: str, dtype: str, batch: int, seq: int, steps: int, peak: float, nominal: float | None) -> dict:
    """`qiusuo sft`'s step on random documents of 16..seq tokens packed into rows of `seq` (`sft.batches`,
    `sft.collate`): `dist.wrap`, forward under `dist.autocast`, fp32 loss, clipping, AdamW on fp32
    master weights. Tokens/s over the non-padding tokens (median of `steps` after a warm-up) and MFU
    = 6·N·tokens (+ attention) / time / peak."""
    model, tok = load_checkpoint(ckpt, device)
    model = dist.wrap(model, "ddp", dtype).train()
    opt = make_optimizer(model, 1e-5, 0.0)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    seqs = []
    while sum(len(s) for s, _ in seqs) < 2 * (steps + 1) * batch * seq:
        n = int(torch.randint(16, seq + 1, (1,), generator=g))
        ids = torch.randint(0, tok.vocab_size, (n,), generator=g).tolist()
        seqs.append((ids, [0] * 4 + [1] * (n - 4)))
    data = batches(seqs, batch, seq + 1, seed=0, position=0)
    times, tokens = [], []
    for i in range(steps + 1):
        x, y, mask, pos, doc = (t.to(device) for t in collate(seqs, next(data), tok.pad_id, seq + 1))
        sync(device)
        t0 = time.perf_counter()
        with dist.autocast(dtype, device):
            logits = model(x, positions=pos, doc_ids=doc)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        loss = (loss * mask.flatten()).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
            tokens.append(int((doc >= 0).sum()))
    t, n = statistics.median(times), statistics.median(tokens)
    flops = train_flops(model.num_params(), n, cfg.num_hidden_layers, cfg.hidden_size, seq)
    probe = torch.zeros(1, 1, 1, cfg.head_dim, device=device, dtype=dist.DTYPES[dtype])
    return {"batch": batch, "seq": seq, "tokens_per_step": n, "step_s": t, "tokens_s": n / t, "mfu": flops / t / peak,
            "mfu_nominal": flops / t / nominal if nominal else None, "loss": loss.item(),
            "attention": "flash varlen" if flash_varlen_applies(probe) else "SDPA block-diagonal mask"}


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {"gpu_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "gpu_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return {"cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model and settings: proves the script, measures nothing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", nargs="+", default=["generate", "grpo", "sft"], choices=["generate", "grpo", "sft"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    # bf16 as on a GPU also for the smoke run on the CPU, so it takes the GPU's code paths (the PyTorch
    # decode step on static buffers, bf16 rollouts over fp32 master weights, autocast) but for CUDA graphs
    # and flash attention
    dtype = torch.bfloat16 if cuda or args.smoke else torch.float32
    if args.smoke:
        dims, vocab, batches_, new, repeats, grpo_new, grpo_steps, sft_shape = SMOKE, 1000, [1, 4], 8, 1, 16, 1, (2, 64, 2)
    else:
        dims, vocab, batches_, new, repeats, grpo_new, grpo_steps, sft_shape = QWEN25_05B, 32000, [1, 64, 256], 128, 3, 256, 3, (16, 1024, 5)
    t_start = time.perf_counter()
    result: dict = {"hardware": hardware(), "smoke": args.smoke, "device": args.device, "dtype": str(dtype),
                    "parts": args.parts, "complete": False}

    def save(**parts) -> None:
        result.update(parts, elapsed_s=round(time.perf_counter() - t_start, 1))
        tmp = out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out / "gpu_check.json")

    peak = measure_matmul_peak(args.device, n=512 if args.smoke else 8192, dtype=dtype)
    name = result["hardware"]["device"]
    nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None) if cuda else None
    ckpt = build(Path(tempfile.mkdtemp()) / "ckpt", dims, vocab, dtype)
    save(params=load_checkpoint(ckpt)[0].num_params(), matmul_peak_flops=peak, nominal_peak_flops=nominal)
    print(f"# {name}, {dtype}, {result['params'] / 1e6:.0f} M params, matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    parts = {
        "generate": lambda: engine_vs_hf(ckpt, batches_, new, repeats, args.device, dtype, peak,
                                         lambda rows: save(generate=rows)),
        "grpo_step": lambda: grpo_vs_trl(ckpt, grpo_steps, grpo_new, args.device, dtype,
                                         lambda part: save(grpo_step=part)),
        "sft": lambda: sft(ckpt, args.device, str(dtype)[6:], *sft_shape, peak, nominal),
    }
    failed = []
    for key, run in parts.items():
        if key.split("_")[0] not in args.parts:
            continue
        try:   # a part that fails is recorded and the next one still runs: one run, every figure it can give
            save(**{key: run()}, memory=peak_memory(args.device))
        except Exception as e:
            traceback.print_exc()
            failed.append(key)
            save(**{key: {"error": f"{type(e).__name__}: {e}"}})
    if "grpo_step" in result and "ratio" in result["grpo_step"]:
        print(f"GRPO step: {result['grpo_step']['ratio']:.2f}x TRL's completions/s", flush=True)
    if "sft" in result and "mfu" in result["sft"]:
        print(f"SFT: {result['sft']['tokens_s']:,.0f} tok/s, MFU {100 * result['sft']['mfu']:.1f}% of the measured "
              f"peak ({result['sft']['attention']})", flush=True)
    save(memory=peak_memory(args.device), complete=not failed)
    print(f"peak memory: {result['memory']}; {result['elapsed_s']:.0f} s" + (f"; FAILED: {failed}" if failed else ""),
          flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
