"""Next-token training on prompt/completion corpora: pretraining of the tiny base model, and (with
`--init`) supervised fine-tuning of any checkpoint — cold start and distillation use the same loop;
`qiusuo sft` reads the examples from a dataset file (qiusuo/data.py) instead of a qiusuo corpus.

Loss is on completion tokens (and the end-of-turn token) only by default: the prompt is given at
inference, so learning to predict it would spend the tiny model's capacity on nothing we use.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dist
from .checkpoint import load_checkpoint
from .corpus import read_corpus
from .data import DataOptions, load_sft_rows, sft_prompt_ids
from .ledger import StageLedger, hardware, train_flops
from .log import console
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer


@dataclass
class SFTConfig:
    """Settings of `qiusuo pretrain` and `qiusuo sft` (fine-tuning an `init` checkpoint on a dataset file)."""

    data: str = "runs/tiny/corpus"
    """Corpus folder or .jsonl file of {prompt, completion} lines; with `data_options` (`qiusuo sft`), a
    dataset file: JSONL, Parquet or a save_to_disk folder of prompt → response rows or chats."""
    data_options: dict | None = None
    """How to read `data` as a dataset: template, field names, on_bad_row, limit (qiusuo/data.py,
    DataOptions); empty: a qiusuo corpus. `qiusuo sft` reads a dataset ({} at least)."""
    out: str = "runs/tiny/base"
    """Stage folder for the checkpoint, metrics and training state."""
    init: str | None = None
    """Checkpoint folder to start from; empty: a fresh model of shape `model`."""
    model: dict = field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2})
    """ModelConfig fields of a fresh model (vocab size comes from the tokenizer)."""
    steps: int = 1200
    """Optimizer steps."""
    flops_budget: float = 0.0
    """Stop once the stage's ledger has counted this many FLOPs (0: no budget; `steps` still caps it).
    The demo's equal-compute control trains for the FLOPs its GRPO stage spent."""
    batch_size: int = 16
    """Rows per step; each row packs whole examples into `max_len` tokens."""
    lr: float | None = None
    """Peak learning rate (AdamW); empty: 3e-3 for a fresh tiny model, 2e-5 when fine-tuning `init`
    (the usual full-fine-tuning rate of 0.5–7 B checkpoints)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr × this."""
    weight_decay: float = 0.05
    """AdamW weight decay (matrices only)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    max_len: int = 256
    """Row length of packed batches; longer examples are dropped (with a count in the log)."""
    loss_on_prompt: bool = False
    """Also learn to predict the prompt tokens."""
    log_every: int = 50
    """Print one line every this many steps (metrics.jsonl gets every step)."""
    save_every: int = 200
    """Write a checkpoint (checkpoints/step-NNNNNN/) every this many steps."""
    keep_last: int = 2
    """Checkpoints kept in checkpoints/ (older ones are deleted)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    device: str = "cpu"
    """torch device (under torchrun, `cuda` means this process's GPU, cuda:LOCAL_RANK)."""
    price_per_device_hour: float = 0.10
    """Dollars per device-hour for the cost ledger (a 2-core cloud VM ≈ $0.10/h)."""
    parallel: str = "ddp"
    """Under torchrun: ddp (replicated model) | fsdp (FSDP2, sharded parameters and optimizer state)."""
    dtype: str = "float32"
    """Training compute: float32 | bfloat16 (fp32 master weights and AdamW state; see qiusuo/dist.py)."""
    grad_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ≈ 1/3 more compute)."""

    def __post_init__(self) -> None:
        if self.lr is None:   # derived: a fresh tiny model wants a large step, a trained checkpoint a small one
            self.lr = 3e-3 if self.init is None else 2e-5
        if self.data_options is not None:
            DataOptions.of(self.data_options)


def encode_examples(rows: list[dict], tok: Tokenizer, max_len: int, loss_on_prompt: bool):
    """Token ids and loss masks of each example: chat prompt + completion + end-of-turn."""
    seqs, dropped = [], 0
    for row in rows:
        prompt = sft_prompt_ids(tok, row)
        completion = tok.encode(row["completion"]) + [tok.eos_id]
        ids = prompt + completion
        if len(ids) > max_len:
            dropped += 1
            continue
        mask = [loss_on_prompt] * len(prompt) + [True] * len(completion)
        seqs.append((ids, mask))
    if not seqs:
        raise ValueError(f"every example is longer than max_len={max_len}")
    return seqs, dropped


def pack(seqs: list, order: list[int], max_len: int) -> list[list[int]]:
    """Greedily fill rows of `max_len` tokens with whole examples, in the given order.

    Packing instead of padding: every batch holds a random mix of short direct answers and long
    traces (batches sorted by length would alternate between styles and skew what the model
    learns), and no compute is spent on padding."""
    rows, row, used = [], [], 0
    for i in order:
        n = len(seqs[i][0])
        if used + n > max_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(seqs: list, rows: list[list[int]], pad_id: int, max_len: int):
    """Packed rows → inputs, targets, loss mask, positions and document ids, each [B, max_len − 1].

    Targets never cross a document boundary: the last token of a document predicts nothing."""
    B = len(rows)
    ids = torch.full((B, max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_len), dtype=torch.bool)
    pos = torch.zeros((B, max_len), dtype=torch.long)
    doc = torch.full((B, max_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            seq, m = seqs[i]
            n = len(seq)
            ids[r, at:at + n] = torch.tensor(seq)
            mask[r, at:at + n] = torch.tensor(m)
            pos[r, at:at + n] = torch.arange(n)
            doc[r, at:at + n] = d
            at += n
    # target t+1 counts only if it is in the same document as t and carries loss
    same_doc = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:] & same_doc, pos[:, :-1], doc[:, :-1]


def lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains and biases are not shrunk toward zero)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def epoch_rows(seqs: list, max_len: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch: the examples shuffled (deterministically from seed and epoch), then packed."""
    order = list(range(len(seqs)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return pack(seqs, order, max_len)


def batches(seqs: list, batch_size: int, max_len: int, seed: int, position: int):
    """Endless batches of `batch_size` packed rows; `position` counts batches already consumed (for resume).

    The epochs are one stream of rows, each epoch a fresh shuffle and packing, and batch i is rows
    [i·B, (i+1)·B) of it: every row of every epoch is trained on, once. An epoch's last rows share a
    batch with the next epoch's first rather than being dropped (a 50-example cold-start set would lose
    up to B − 1 rows an epoch) or forming a short batch (every batch keeps B rows, so each of N processes
    always has rows to train on); a set that packs into fewer than B rows fills each batch from several
    epochs. The batch is a pure function of (seed, position), which makes resume exact."""
    epoch, at = 0, position * batch_size          # at: the stream offset of the next row, within `epoch`
    rows = epoch_rows(seqs, max_len, seed, epoch)
    while at >= len(rows):
        at -= len(rows)
        epoch += 1
        rows = epoch_rows(seqs, max_len, seed, epoch)
    while True:
        batch = []
        while len(batch) < batch_size:
            take = rows[at:at + batch_size - len(batch)]
            batch += take
            at += len(take)
            if at == len(rows):
                epoch, at = epoch + 1, 0
                rows = epoch_rows(seqs, max_len, seed, epoch)
        yield batch


def over_budget(ledger: StageLedger, cfg: SFTConfig) -> bool:
    """Whether the FLOP budget (if any) is spent."""
    return cfg.flops_budget > 0 and ledger.flops >= cfg.flops_budget


def train(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Under torchrun each rank trains on its share of every global batch of `batch_size` rows; the
    loss is normalised by the global count of loss tokens, so the step equals one process's."""
    world, device = dist.init(cfg.device)
    if cfg.batch_size < world.size:
        raise ValueError(f"batch_size={cfg.batch_size} gives some of the {world.size} processes no rows")
    out = Path(cfg.out)
    folder = dist.stage_folder(out, cfg.keep_last, resume, overwrite)
    torch.manual_seed(cfg.seed)
    # --- model and tokenizer
    corpus = (read_corpus(Path(cfg.data)) if cfg.data_options is None
              else load_sft_rows(cfg.data, DataOptions.of(cfg.data_options)))
    if cfg.init:
        model, tok = load_checkpoint(cfg.init, device)
    else:
        # A fresh character-level vocabulary also covers the corpus' characters beyond ASCII (Chinese).
        tok = Tokenizer.char_level(extra_chars="".join({c for r in corpus for v in r.values() if isinstance(v, str)
                                                        for c in v if not c.isascii()}))
        mcfg = ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           max_position_embeddings=max(512, cfg.max_len), **cfg.model)
        model = Transformer(mcfg).to(device)
    n_params, mc = model.num_params(), model.config
    model = dist.wrap(model, cfg.parallel, cfg.dtype, cfg.grad_checkpointing)
    # --- data
    seqs, dropped = encode_examples(corpus, tok, cfg.max_len, cfg.loss_on_prompt)
    if dist.is_main():
        console.print(f"pretrain: {n_params / 1e6:.2f} M parameters, {len(seqs)} examples"
                      + (f" ({dropped} longer than {cfg.max_len} dropped)" if dropped else "")
                      + (f", {world.size} processes ({cfg.parallel})" if world.size > 1 else ""))
        # A set of at least batch_size rows' worth of tokens packs into at least batch_size rows: only a
        # smaller one is packed here to tell.
        small = sum(len(s[0]) for s in seqs) < cfg.batch_size * cfg.max_len
        n_rows = len(epoch_rows(seqs, cfg.max_len, cfg.seed, 0)) if small else cfg.batch_size
        if n_rows < cfg.batch_size:
            console.print(f"note: the set packs into {n_rows} rows of {cfg.max_len} tokens, fewer than "
                          f"batch_size={cfg.batch_size}: each batch holds rows of several epochs")
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    # --- resume
    step, data_pos = 0, 0
    ledger = StageLedger(out.name, cfg.price_per_device_hour, hardware()["device"], dist.world().size)
    state = dist.resume(folder, model, opt, ledger)
    if state is not None:
        step, data_pos = state["step"], state["data_pos"]
        if dist.is_main():
            console.print(f"resumed {out} at step {step}")
    # --- loop
    model.train()
    data = batches(seqs, cfg.batch_size, cfg.max_len, cfg.seed, data_pos)
    with dist.step_log()(out, cfg.steps, step, {"train/loss": "loss", "train/lr": "lr", "perf/tokens_per_s": "tok/s"},
                         every=cfg.log_every, resume=state is not None) as log:
        while step < cfg.steps and not over_budget(ledger, cfg):
            t0 = time.perf_counter()
            rows = dist.shard(next(data))    # this rank's rows of the global batch
            x, y, mask, pos, doc = (t.to(device) for t in collate(seqs, rows, tok.pad_id, cfg.max_len))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with dist.autocast(cfg.dtype, device):
                logits = model(x, positions=pos, doc_ids=doc)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            loss = (loss * mask.flatten()).sum() / mask.sum()
            scale = dist.loss_scale(int(mask.sum()))   # global token normalisation (1.0 alone)
            opt.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            step, data_pos = step + 1, data_pos + 1
            loss_value, tokens = dist.all_sum([loss.item() * scale / world.size, int((doc >= 0).sum())])
            tokens = int(tokens)
            ledger.add(train_flops(n_params, tokens, mc.num_hidden_layers, mc.hidden_size, x.shape[1]), tokens)
            dt = time.perf_counter() - t0
            log.log(step, {"train/loss": round(loss_value, 5), "train/lr": lr_at(step - 1, cfg),
                           "train/grad_norm": round(grad_norm, 4), "perf/tokens_per_s": round(tokens / dt),
                           "perf/step_s": round(dt, 4)})
            if step % cfg.save_every == 0 or step == cfg.steps or over_budget(ledger, cfg):
                dist.save(folder, model, opt, tok, cfg, ledger, step=step, data_pos=data_pos)
    if dist.is_main():
        ledger.finish(out / "ledger.json")
    folder.close()
    return out
