"""Generation throughput: qiusuo's engine vs `transformers.generate`, same checkpoint, same settings.

Sampling (T = 1, top-p 1), KV cache on both sides, exactly `--new-tokens` new tokens per row (no early
stop, so both do the same work), batches of 1, 8, 64 and 256 copies of a chat prompt. Prints a table of
generated tokens/s (median of `--repeats` runs), the ratio, and our model-FLOP utilisation against a
measured fp32 matmul peak.

    .venv/bin/python bench/generate.py [--checkpoint runs/tiny/base | --size bpe40m] [--batches 1 8 64 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qiusuo.engine import Engine, SamplingParams  # noqa: E402
from qiusuo.ledger import forward_flops, hardware, measure_matmul_peak  # noqa: E402
from qiusuo.model import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402


# Random Qwen2-shaped models for the benches without --checkpoint: "tiny" is the demo's shape; the
# larger ones show how the figures move once the weights, not the per-token overhead, are the cost.
SIZES = {
    "tiny": {},                                                                         # ~0.8 M, 3 MB
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6),         # ~4.8 M, 19 MB
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2),                       # ~24 M, 97 MB
}
SIZES["bpe40m"] = SIZES["medium"]   # with a 32k byte-level BPE vocabulary: ~41 M, 162 MB
BPE_VOCAB = 32000


def bpe_tokenizer(vocab_size: int = BPE_VOCAB) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (plus the chat format's specials and tags), trained on
    synthetic text: task prompts and answers, and Zipf-distributed made-up words so that the merges
    reach the full vocabulary. What matters to the benches is its size (the LM head, sampling over 32k
    logits), and that it encodes and decodes every task's text."""
    import random

    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from qiusuo.tasks import get_task
    from qiusuo.tokenizer import SPECIAL, TAGS

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(2 * vocab_size)]
    weights = [1 / (i + 1) for i in range(len(words))]
    lines = [" ".join(rng.choices(words, weights, k=64)) for _ in range(6000)]
    for name, levels in (("arith", (1, 2, 3, 4)), ("countdown", (3, 4))):
        task = get_task(name)
        lines += [task.sample("train", rng.randrange(2**31), d).prompt for d in levels for _ in range(50)]
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL) - len(TAGS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(lines, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return Tokenizer(backend, Tokenizer.char_level().config)


def checkpoint(path: str | None, size: str = "tiny") -> Path:
    """The given checkpoint, or a random Qwen2 of one of `SIZES` (tiny: ~0.8 M parameters, hidden 128,
    4 layers, 4/2 heads — the demo's shape), with the character-level tokenizer or, for "bpe40m", a
    32k BPE (`bpe_tokenizer`)."""
    if path:
        return Path(path)
    out = Path(tempfile.mkdtemp()) / "ckpt"
    tok = bpe_tokenizer() if size.startswith("bpe") else Tokenizer.char_level()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **SIZES[size])
    save_model(Transformer(cfg), out)
    tok.save(out)
    return out


def timed(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of `repeats` calls after a warm-up (on a GPU, up to the device's last kernel)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(ckpt: Path, batches: list[int], new_tokens: int, repeats: int, device: str, dtype: torch.dtype,
            peak: float) -> list[dict]:
    """Generated tokens/s of the engine and of `transformers.generate` at each batch size, each pair
    measured back to back in this process (median of `repeats` after a warm-up)."""
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.load(ckpt)
    ours = load_model(ckpt, device=device, dtype=dtype).eval()
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    engine = Engine(ours, None, eos_ids=(), max_batch=max(batches))  # no eos: every row runs to the end
    prompt = tok.prompt_ids("4821+397")
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    cfg, out = ours.config, []
    for b in batches:
        ids = torch.tensor([prompt] * b, device=device)

        def run_hf():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                            top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=tok.pad_id, use_cache=True)

        def run_ours():
            engine.generate([prompt] * b, params)

        tokens = b * new_tokens
        t_ours, t_hf = timed(run_ours, repeats, device), timed(run_hf, repeats, device)
        flops = forward_flops(ours.num_params(), tokens, cfg.num_hidden_layers, cfg.hidden_size,
                              len(prompt) + new_tokens)
        out.append({"batch": b, "qiusuo_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf, "ratio": t_hf / t_ours,
                    "mfu": flops / t_ours / peak, "decoder": engine.decoder_type.__name__})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="random model without --checkpoint")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ckpt = checkpoint(args.checkpoint, args.size)
    peak = measure_matmul_peak(args.device, n=1024 if args.device == "cpu" else 8192, dtype=dtype)
    n_params = load_model(ckpt).num_params()
    print(f"# {hardware()['device']} ({hardware()['cpu']}, {torch.get_num_threads()} threads), {args.dtype}, "
          f"{n_params / 1e6:.2f} M params, {args.new_tokens} new tokens, matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'batch':>6} {'qiusuo tok/s':>13} {'HF tok/s':>10} {'ratio':>7} {'MFU':>7}")
    for r in compare(ckpt, args.batches, args.new_tokens, args.repeats, args.device, dtype, peak):
        print(f"{r['batch']:>6} {r['qiusuo_tok_s']:>13,.0f} {r['hf_tok_s']:>10,.0f} {r['ratio']:>6.2f}x "
              f"{100 * r['mfu']:>6.1f}%")


if __name__ == "__main__":
    main()
