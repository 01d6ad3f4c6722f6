"""The GPU figures of issue 15 in one run: a random Qwen2.5-0.5B-shaped checkpoint (bf16, built with
`transformers`), then, each measured in the same process right after its peer,

- engine tokens/s vs `transformers.generate` at batch 1 / 64 / 256 (128 new tokens, sampling, no early stop),
- one GRPO step vs TRL's `GRPOTrainer` (8 prompts × 8 samples, ≤ 256 new tokens), completions/s,
- SFT tokens/s and MFU (AdamW, full sequences, bf16 weights) against a measured bf16 matmul peak,
- peak memory,

printed and written to `<out>/gpu_check.json`. `--smoke` runs the same code on a tiny model with small
settings (on the CPU when there is no GPU) to prove the script end to end.

    bench/gpu_check.sh OUT_DIR [--smoke]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import generate, grpo_step  # noqa: E402
from qiusuo.ledger import hardware, measure_matmul_peak, train_flops  # noqa: E402
from qiusuo.model import load_model  # noqa: E402
from qiusuo.sft import make_optimizer  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
"""Qwen2.5-0.5B's shape (494 M parameters, tied embedding, q/k/v bias, rope θ 1e6)."""
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)


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


def sft(ckpt: Path, device: str, dtype: torch.dtype, batch: int, seq: int, steps: int, peak: float) -> dict:
    """Training throughput: AdamW steps on random full sequences of `seq` tokens (median of `steps`
    after a warm-up); MFU = 6·N·tokens (+ attention) / time / peak."""
    model = load_model(ckpt, device=device, dtype=dtype).train()
    opt = make_optimizer(model, 1e-5, 0.0)
    cfg = model.config
    ids = torch.randint(0, Tokenizer.load(ckpt).vocab_size, (batch, seq + 1), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    tokens = batch * seq
    flops = train_flops(model.num_params(), tokens, cfg.num_hidden_layers, cfg.hidden_size, seq)
    return {"batch": batch, "seq": seq, "tokens_s": tokens / t, "mfu": flops / t / peak, "step_s": t}


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
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.smoke:
        dims, vocab, batches, new, repeats, grpo_new, grpo_steps, sft_shape = SMOKE, 1000, [1, 4], 8, 1, 16, 1, (2, 64, 2)
    else:
        dims, vocab, batches, new, repeats, grpo_new, grpo_steps, sft_shape = QWEN25_05B, 32000, [1, 64, 256], 128, 3, 256, 3, (8, 1024, 5)
    peak = measure_matmul_peak(args.device, n=512 if args.smoke else 8192, dtype=dtype)
    ckpt = build(Path(tempfile.mkdtemp()) / "ckpt", dims, vocab, dtype)
    result = {"hardware": hardware(), "smoke": args.smoke, "device": args.device, "dtype": str(dtype),
              "params": load_model(ckpt).num_params(), "matmul_peak_flops": peak}
    print(f"# {result['hardware']['device']}, {dtype}, {result['params'] / 1e6:.0f} M params, "
          f"matmul peak {peak / 1e12:.2f} TFLOP/s")
    result["generate"] = generate.compare(ckpt, batches, new, repeats, args.device, dtype, peak)
    for r in result["generate"]:
        print(f"generate batch {r['batch']:>4}: qiusuo {r['qiusuo_tok_s']:,.0f} tok/s ({r['decoder']}), "
              f"HF {r['hf_tok_s']:,.0f} tok/s, {r['ratio']:.2f}x, MFU {100 * r['mfu']:.1f}%")
    result["grpo_step"] = grpo_step.compare(ckpt, grpo_steps, grpo_new, args.device, dtype)
    print(f"GRPO step: {result['grpo_step']['ratio']:.2f}x TRL's completions/s")
    result["sft"] = sft(ckpt, args.device, dtype, *sft_shape, peak)
    print(f"SFT: {result['sft']['tokens_s']:,.0f} tok/s, MFU {100 * result['sft']['mfu']:.1f}%")
    result["memory"] = peak_memory(args.device)
    print(f"peak memory: {result['memory']}")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
