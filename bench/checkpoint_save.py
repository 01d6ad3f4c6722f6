"""Checkpoint save cost: qiusuo's `StageFolder.save` vs `torch.save` and `transformers`' `save_pretrained`.

For each model shape (the demo's ~0.8 M model and a ~40 M one), after one AdamW step so the optimizer
holds its moments, times in the same run, alternating, `--repeats` times each:
- `StageFolder.save`: a whole resumable checkpoint — safetensors weights, tokenizer, config, train_state.pt
  (optimizer, RNG, position), manifest with CRC32, files synced, then the temporary folder renamed;
- `torch.save`: one file of {weights, optimizer, RNG} — what a plain PyTorch loop writes to resume;
- `save_pretrained`: the same weights as a `transformers` Qwen2 model (weights only, no optimizer).
Prints median seconds and megabytes per checkpoint and our time as a ratio of each peer's.

    .venv/bin/python bench/checkpoint_save.py [--repeats 5] [--sizes demo 40m]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qiusuo.checkpoint import StageFolder, rng_state, training_state  # noqa: E402
from qiusuo.ledger import StageLedger  # noqa: E402
from qiusuo.model import ModelConfig, Transformer  # noqa: E402
from qiusuo.sft import SFTConfig, make_optimizer  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402

SIZES = {
    "demo": SFTConfig().model,                                                           # ~0.8 M
    "40m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=2),                          # ~40 M
}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def setup(shape: dict):
    tok = Tokenizer.char_level()
    cfg = ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **shape)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = make_optimizer(model, 1e-3, 0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # the optimizer now holds exp_avg and exp_avg_sq for every parameter
    return model, tok, opt


def bench(name: str, shape: dict, repeats: int, root: Path) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok, opt = setup(shape)
    hf = Qwen2ForCausalLM(Qwen2Config(**model.config.to_hf()))
    hf.load_state_dict(model.state_dict(), strict=False)
    cfg, ledger = SFTConfig(model=shape), StageLedger("bench", 0.0, "cpu")
    folder = StageFolder(root / name, keep_last=1, resume=False, overwrite=True)
    n = {"step": 0}

    def ours() -> Path:
        n["step"] += 1
        return folder.save(model, tok, cfg, training_state(opt, ledger, cfg, step=n["step"], data_pos=0))

    def plain() -> Path:
        path = root / f"{name}.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}, path)
        return path

    def hf_save() -> Path:
        path = root / f"{name}-hf"
        shutil.rmtree(path, ignore_errors=True)
        hf.save_pretrained(path)
        return path

    ways = {"StageFolder.save": ours, "torch.save": plain, "save_pretrained": hf_save}
    times = {k: [] for k in ways}
    sizes = {}
    for _ in range(repeats):
        for way, fn in ways.items():  # alternated, so host noise lands on every column alike
            t0 = time.perf_counter()
            path = fn()
            times[way].append(time.perf_counter() - t0)
            sizes[way] = folder_bytes(path)
    folder.close()
    return {"name": name, "params": model.num_params(), "time": {k: statistics.median(v) for k, v in times.items()},
            "bytes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, median of {args.repeats}")
    print(f"| model | params | {'StageFolder.save':>22} | {'torch.save':>22} | {'save_pretrained':>22} "
          "| ours / torch.save | ours / save_pretrained |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        for name in args.sizes:
            r = bench(name, SIZES[name], args.repeats, Path(tmp))
            t, b = r["time"], r["bytes"]
            cells = [f"{t[k]:7.3f} s {b[k] / 1e6:8.1f} MB" for k in ("StageFolder.save", "torch.save", "save_pretrained")]
            print(f"| {name} | {r['params'] / 1e6:.1f} M | " + " | ".join(cells)
                  + f" | {t['StageFolder.save'] / t['torch.save']:.2f}× | "
                    f"{t['StageFolder.save'] / t['save_pretrained']:.2f}× |")


if __name__ == "__main__":
    main()
