"""GRPO — the RL of DeepSeek-R1-Zero — with the Dr. GRPO and DAPO variants.

One step: sample P prompts → G completions each with the shared engine (π_old) → verifiable rewards
(accuracy + format, from the task's own scorer) → group advantages → μ passes of the clipped surrogate
with a k3 KL penalty against a frozen reference → update. Written as small pure functions plus one
visible loop (`train`).

Objective per token (docs/design.md §3):
    ρ = π_θ / π_old,   term = min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) − β·KL_k3,
    KL_k3 = π_ref/π_θ − log(π_ref/π_θ) − 1.
Aggregations (`VARIANTS`): grpo = mean over each completion's tokens then over completions;
dr_grpo = token sum / a constant (max completion length) and no std in the advantage;
dapo = token mean over the whole batch, clip-higher, dynamic sampling, soft overlong penalty, β = 0.

Departures from the paper: log-probs are taken from logits / rollout temperature (so the ratio compares
the distributions actually sampled from, as TRL does). The tiny demo (configs/demo.yaml) uses lr 2e-4
(R1-Zero: 3e-6), β = 0.01 and rollouts at T = 0.7 rather than 1.0: at T = 1 a 0.8 M-parameter
character model botches most 40-token traces, nearly every group is all-wrong, and the updates erode
the trace skill RL is meant to sharpen.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import dist
from .checkpoint import load_checkpoint
from .data import DataOptions, problem_pool
from .engine import Engine, SamplingParams
from .language import check_langs, pose
from .ledger import StageLedger, forward_flops, hardware, train_flops
from .log import console, truncate_after, warn
from .rewards import STRICT, ReasoningFormat, RewardWeights, overlong_penalty, parse_completion, score_completion
from .sft import make_optimizer
from .tasks import get_task, reflects


# --- the math, as small pure functions -------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] → advantages [P, G]: (r − mean_group) / (std_group + eps), or without the
    division (Dr. GRPO). std is the sample std (unbiased), as in the GRPO reference implementations."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) per token: π_ref/π_θ − log(π_ref/π_θ) − 1 (≥ 0, unbiased)."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logp, logp_old, adv, eps_low: float, eps_high: float):
    """PPO-clip per token. logp, logp_old [B, T]; adv [B] → (objective [B, T], clipped mask [B, T]).

    `clipped` marks tokens where the clipped branch is the one taken (its gradient is zero)."""
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None]
    unclipped = ratio * a
    clipped_obj = ratio.clamp(1 - eps_low, 1 + eps_high) * a
    objective = torch.minimum(unclipped, clipped_obj)
    clipped = clipped_obj < unclipped
    return objective, clipped


def agg_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """GRPO (paper): mean over each completion's tokens, then mean over completions."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_seq.mean()


def agg_constant_norm(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (max completion length), mean over completions —
    no length bias toward long wrong answers or short right ones."""
    return (per_token * mask).sum() / (mask.shape[0] * max_len)


def agg_token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """DAPO: one mean over every token of the batch, so long completions weigh by their length."""
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True)
class Variant:
    """What distinguishes grpo, dr_grpo and dapo; chosen once, in `VARIANTS`."""

    aggregate: Callable
    scale_by_std: bool
    eps_high: float
    beta: float
    dynamic_sampling: bool
    overlong: bool


VARIANTS = {
    "grpo": Variant(agg_sequence_mean, scale_by_std=True, eps_high=0.2, beta=0.001, dynamic_sampling=False, overlong=False),
    "dr_grpo": Variant(agg_constant_norm, scale_by_std=False, eps_high=0.2, beta=0.0, dynamic_sampling=False, overlong=False),
    "dapo": Variant(agg_token_mean, scale_by_std=True, eps_high=0.28, beta=0.0, dynamic_sampling=True, overlong=True),
}


def policy_loss(logp, logp_old, logp_ref, adv, mask, variant: Variant, eps_low, eps_high, beta, max_len):
    """The loss to minimise (−objective) and its parts. logp* [B, T], adv [B], mask [B, T] (bool)."""
    # Padding positions get π_old = π_ref = π_θ before any exp(), so whatever junk they hold cannot
    # overflow into inf·0 = NaN; `where` then zeroes them (value and gradient).
    same = logp.detach()
    logp_old = torch.where(mask, logp_old, same)
    objective, clipped = clipped_surrogate(logp, logp_old, adv, eps_low, eps_high)
    kl = kl_k3(logp, torch.where(mask, logp_ref, same)) if logp_ref is not None else torch.zeros_like(logp)
    per_token = torch.where(mask, objective - beta * kl, 0.0)
    m = mask.float()
    loss = -variant.aggregate(per_token, m, max_len)
    n = m.sum().clamp_min(1)
    return loss, {"kl": ((kl * m).sum() / n).item(), "clip_frac": ((clipped.float() * m).sum() / n).item()}


def token_logprobs(model, batch: "TrainBatch", temperature: float = 1.0):
    """log π of every completion token given what precedes it, and the entropy of π there, both in the
    per-sequence layout [S, T] of `batch.mask` (zero elsewhere). The LM head and softmax run only at
    the positions that predict a completion token; the entropy carries no gradient (it is a statistic)."""
    logits = model(batch.ids, batch.positions, doc_ids=batch.doc_ids, select=batch.source)
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.target[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(batch.mask.shape, device=logp.device)
    return zeros.masked_scatter(batch.mask, logp), zeros.masked_scatter(batch.mask, entropy)


# --- config ---------------------------------------------------------------------------------------

@dataclass
class GRPOConfig:
    """Settings of `qiusuo grpo`."""

    init: str = "runs/tiny/base"
    """Checkpoint to start from (also the frozen KL reference)."""
    out: str = "runs/tiny/zero"
    """Stage folder."""
    tasks: dict = field(default_factory=lambda: {"arith": [3, 4, 5], "countdown": [3, 4]})
    """Task name → difficulties of the training prompts (drawn from the train split)."""
    loss: str = "grpo"
    """Variant: grpo | dr_grpo | dapo."""
    steps: int = 60
    """RL steps (rollout batches)."""
    prompts_per_step: int = 16
    """Questions per step."""
    group_size: int = 8
    """Completions per question (G)."""
    mu: int = 1
    """Optimizer passes over each rollout batch (π_old is the rollout policy)."""
    minibatches: int = 1
    """Optimizer steps per pass (the rollout batch is split into this many)."""
    lr: float = 2e-4
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 3
    """Linear warm-up of the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta: float | None = None
    """KL coefficient; empty: the variant's (grpo 0.001, dr_grpo 0, dapo 0). β = 0 builds no reference model."""
    eps_low: float = 0.2
    """Lower clip range."""
    eps_high: float | None = None
    """Upper clip range; empty: the variant's (dapo's clip-higher 0.28, else 0.2)."""
    temperature: float = 1.0
    """Rollout temperature."""
    top_p: float = 1.0
    """Rollout top-p."""
    max_new_tokens: int = 96
    """Completion length cap."""
    reward_accuracy: float = 1.0
    """Weight of the accuracy reward."""
    reward_format: float = 0.2
    """Weight of the format reward (<think>…</think><answer>…</answer>)."""
    reward_language: float = 0.0
    """Weight of R1's language-consistency reward (share of the CoT in the question's language)."""
    langs: dict = field(default_factory=dict)
    """Language → share of the training questions posed in it (en, zh); empty: prompts as the tasks write them."""
    data: str | None = None
    """Dataset file of math problems (JSONL, Parquet or a save_to_disk folder) to train on instead of
    `tasks`; its questions are taken in epochs, each a seeded shuffle of every row (`DataEpochs`)."""
    data_options: dict = field(default_factory=dict)
    """How to read `data`: template, field names, on_bad_row, limit (qiusuo/data.py, DataOptions)."""
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards are all equal and refill the batch; empty: the variant's (dapo: on)."""
    max_refills: int = 3
    """Extra rollout rounds allowed per step when dynamic sampling refills."""
    overlong_buffer: int | None = None
    """Soft overlong penalty buffer in tokens; empty: the variant's (dapo: max_new_tokens // 4, else off)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    log_every: int = 5
    """Print one line every this many steps."""
    sample_every: int = 5
    """Write the step's rollouts to samples.jsonl every this many steps."""
    save_every: int = 20
    """Write a checkpoint (checkpoints/step-NNNNNN/) every this many steps."""
    keep_last: int = 2
    """Checkpoints kept in checkpoints/ (older ones are deleted)."""
    seed: int = 0
    """Seed of prompts and sampling."""
    device: str = "cpu"
    """torch device (under torchrun, `cuda` means this process's GPU, cuda:LOCAL_RANK)."""
    price_per_device_hour: float = 0.10
    """Dollars per device-hour for the cost ledger."""
    parallel: str = "ddp"
    """Under torchrun: ddp (replicated model) | fsdp (FSDP2, sharded parameters and optimizer state)."""
    dtype: str = "float32"
    """Training compute: float32 | bfloat16 (fp32 master weights and AdamW state; see qiusuo/dist.py)."""
    grad_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ≈ 1/3 more compute)."""

    def __post_init__(self) -> None:
        if self.loss not in VARIANTS:
            raise ValueError(f"loss must be one of {', '.join(VARIANTS)}, not {self.loss!r}")
        v = VARIANTS[self.loss]
        # Derived fields: the variant fills what the user left empty.
        self.beta = v.beta if self.beta is None else self.beta
        self.eps_high = v.eps_high if self.eps_high is None else self.eps_high
        self.dynamic_sampling = v.dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling
        if self.overlong_buffer is None:
            self.overlong_buffer = self.max_new_tokens // 4 if v.overlong else 0
        for name in self.tasks:
            get_task(name)
        check_langs(self.langs, "langs")
        if self.data:
            DataOptions.of(self.data_options)
        if self.group_size < 2:
            raise ValueError("group_size must be ≥ 2: the advantage compares completions within a group")
        if self.beta < 0 or self.mu < 1 or self.minibatches < 1:
            raise ValueError("need beta ≥ 0, mu ≥ 1, minibatches ≥ 1")
        if self.temperature <= 0:
            # log π at T = 0 divides the logits by zero: the ratio and KL would be NaN. GRPO needs a
            # group of *different* samples anyway, which greedy decoding cannot give.
            raise ValueError(f"temperature must be > 0 for GRPO rollouts, not {self.temperature}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("prompts_per_step × group_size must divide into minibatches")


# --- rollouts ---------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One step's experience: P groups of G completions, flattened prompt-major."""

    problems: list            # [P]
    prompt_ids: list          # [P] lists of ids
    completions: list         # [P*G] engine Completions
    rewards: torch.Tensor     # [P, G] total reward
    parts: dict               # name → [P, G] tensor of each reward part


class DataEpochs:
    """A dataset file's questions in epochs, as TRL's and verl's samplers give them: each epoch a shuffle
    of every row (seeded by the run's seed and the epoch), taken in order without replacement; a draw
    that reaches the end of an epoch continues into the next. `drawn`, the count of questions taken so
    far, is the whole state: a checkpoint stores it, and a resumed run draws what an uninterrupted one
    would have. Every process of a torchrun group holds the same stream (each then rolls out its share)."""

    def __init__(self, cfg: GRPOConfig, drawn: int = 0):
        self.pool = problem_pool(cfg.data, json.dumps(cfg.data_options, sort_keys=True))
        self.seed, self.drawn = cfg.seed, drawn
        self._order: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        """The row order of `epoch` (the latest one is kept)."""
        if self._order[0] != epoch:
            order = list(range(len(self.pool)))
            random.Random(self.seed * 104_729 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def take(self, n: int) -> list:
        out = []
        for g in range(self.drawn, self.drawn + n):
            epoch, i = divmod(g, len(self.pool))
            out.append(self.pool[self.order(epoch)[i]])
        self.drawn += n
        return out

    @property
    def epoch(self) -> float:
        """Epochs done, fractional: 1.5 is halfway through the second."""
        return self.drawn / len(self.pool)


def draw_problems(cfg: GRPOConfig, rng: random.Random, n: int, epochs: DataEpochs | None = None) -> list:
    """`n` training questions: the next ones of the dataset's epochs (`data`), else drawn from the tasks'
    generators with `rng`, with replacement (a generator's train split is practically endless)."""
    if cfg.data:
        if epochs is None:
            raise ValueError("a dataset's questions are taken in epochs: pass its DataEpochs")
        return epochs.take(n)
    names = list(cfg.tasks)
    out = []
    for _ in range(n):
        name = rng.choice(names)
        p = get_task(name).sample("train", seed=rng.randrange(2**31), difficulty=rng.choice(cfg.tasks[name]))
        out.append(pose(p, rng.choices(list(cfg.langs), list(cfg.langs.values()))[0]) if cfg.langs else p)
    return out


def rollout_seed(cfg: GRPOConfig, step: int, round_: int) -> int:
    """Base sampling seed of rollout round `round_` (0: the first, then refills) of `step`. The engine
    gives row r the stream of seed + r, so each (step, round) owns a disjoint block of P·G streams:
    no round, step or run seed reuses another's."""
    rows = cfg.prompts_per_step * cfg.group_size
    return cfg.seed * 2**40 + (step * (cfg.max_refills + 1) + round_) * rows


def rollout(engine: Engine, tok, problems: list, cfg: GRPOConfig, seed: int) -> Rollout:
    prompt_ids = [get_task(p.task).prompt_ids(p, tok) for p in problems]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
    completions = engine.generate(prompt_ids, params, n=cfg.group_size)
    weights = RewardWeights(accuracy=cfg.reward_accuracy, format=cfg.reward_format, language=cfg.reward_language)
    P, G = len(problems), cfg.group_size
    rewards = torch.zeros(P, G)
    parts = {name: torch.zeros(P, G) for name in ("accuracy", "format", "language", "overlong")}
    for i, c in enumerate(completions):
        p, g = divmod(i, G)
        problem = problems[p]
        total, detail = score_completion(get_task(problem.task), problem, c.text, weights, tok.reasoning)
        if cfg.overlong_buffer:
            pen = overlong_penalty(len(c.token_ids), cfg.max_new_tokens, cfg.overlong_buffer)
            parts["overlong"][p, g] = pen
            total += pen
        rewards[p, g] = total
        for name, r in detail.items():
            parts[name][p, g] = r.value
    return Rollout(problems, prompt_ids, completions, rewards, parts)


def rollout_all(engine, tok, problems: list, cfg: GRPOConfig, seed: int) -> Rollout:
    """`rollout` of all `problems`; under torchrun each rank generates a contiguous share of the groups
    and every rank gets the whole (rewards gathered, so advantages, dynamic sampling and metrics see
    whole groups). Row streams are seed + global row, so the completions do not depend on the layout."""
    G = cfg.group_size
    parts = dist.gather_shards(len(problems), lambda a, b: rollout(engine, tok, problems[a:b], cfg, seed + a * G))
    whole = parts[0]
    for part in parts[1:]:
        whole = merge(whole, part)
    return whole


def keep_groups(r: Rollout, groups: list[int], G: int) -> Rollout:
    rows = [g * G + j for g in groups for j in range(G)]
    return Rollout([r.problems[g] for g in groups], [r.prompt_ids[g] for g in groups],
                   [r.completions[i] for i in rows], r.rewards[groups], {k: v[groups] for k, v in r.parts.items()})


def informative(r: Rollout, G: int) -> Rollout:
    """Only the groups whose *accuracy* differs (DAPO's dynamic sampling: 0 < #correct < G). A group
    that is all right or all wrong teaches nothing about solving the problem, even when format or
    overlong penalties make its total rewards differ."""
    return keep_groups(r, (r.parts["accuracy"].std(1) > 0).nonzero().squeeze(-1).tolist(), G)


def merge(a: Rollout, b: Rollout) -> Rollout:
    return Rollout(a.problems + b.problems, a.prompt_ids + b.prompt_ids, a.completions + b.completions,
                   torch.cat([a.rewards, b.rewards]), {k: torch.cat([a.parts[k], b.parts[k]]) for k in a.parts})


def collect(engine, tok, cfg: GRPOConfig, rng: random.Random, step: int,
            epochs: DataEpochs | None = None) -> tuple[Rollout, int, float]:
    """A step's rollout batch. With dynamic sampling (DAPO), groups with equal rewards carry no signal:
    drop them and sample more questions until the batch is full or the refill budget is spent.
    Returns (rollout, completions generated, fraction of zero-std groups in the first round)."""
    P, G = cfg.prompts_per_step, cfg.group_size
    batch = rollout_all(engine, tok, draw_problems(cfg, rng, P, epochs), cfg, seed=rollout_seed(cfg, step, 0))
    generated, zero_std_frac = P * G, (batch.rewards.std(1) == 0).float().mean().item()
    if not cfg.dynamic_sampling:
        return batch, generated, zero_std_frac
    kept = informative(batch, G)
    for refill in range(1, cfg.max_refills + 1):
        if len(kept.problems) >= P:
            break
        more = rollout_all(engine, tok, draw_problems(cfg, rng, P, epochs), cfg, seed=rollout_seed(cfg, step, refill))
        generated += P * G
        kept = merge(kept, informative(more, G))
    if len(kept.problems) == 0:
        return batch, generated, zero_std_frac  # nothing informative: the step's update is zero
    return keep_groups(kept, list(range(min(P, len(kept.problems)))), G), generated, zero_std_frac


@dataclass
class TrainBatch:
    """A rollout batch as the model trains on it. Every [prompt ‖ completion] sequence is packed whole
    into rows (first-fit by decreasing length, attention kept inside each sequence by `doc_ids`), so
    no compute goes to padding — about half of a right-padded GRPO batch when completion lengths vary.
    The loss still sees one row per completion: `mask` [S, T] marks the completion targets in that
    layout, and `source` / `target` say which packed output predicts each of them (in `mask` order)."""

    seqs: list                # [S] token ids of prompt ‖ completion
    starts: list              # [S] index of each sequence's first completion token
    ids: torch.Tensor         # [R, W] packed tokens
    positions: torch.Tensor   # [R, W] position of each token within its sequence
    doc_ids: torch.Tensor     # [R, W] which sequence of the row a token belongs to (−1: padding)
    source: torch.Tensor      # [n] flat index into the R·W outputs, one per completion target
    target: torch.Tensor      # [n] the completion token it predicts
    mask: torch.Tensor        # [S, T] completion targets in the per-sequence layout (T = longest − 1)
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def subset(self, sl: slice) -> "TrainBatch":
        """The sequences in `sl`, packed anew, in the same per-sequence width (for minibatches)."""
        return pack_sequences(self.seqs[sl], self.starts[sl], self.pad_id, self.ids.device, self.mask.shape[1])


def pack_sequences(seqs: list, starts: list, pad_id: int, device, seq_width: int | None = None) -> TrainBatch:
    width = max(len(s) for s in seqs)
    seq_width = seq_width or width - 1
    rows, free, place = [], [], {}
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):   # first fit, longest first
        r = next((r for r, f in enumerate(free) if f >= len(seqs[i])), None)
        if r is None:
            r = len(rows)
            rows.append([])
            free.append(width)
        place[i] = (r, width - free[r])
        rows[r].append(i)
        free[r] -= len(seqs[i])
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    pos = torch.zeros((R, width), dtype=torch.long)
    doc = torch.full((R, width), -1, dtype=torch.long)
    mask = torch.zeros((len(seqs), seq_width), dtype=torch.bool)
    source, target = [], []
    for i, seq in enumerate(seqs):
        r, at = place[i]
        n = len(seq)
        ids[r, at:at + n] = torch.tensor(seq)
        pos[r, at:at + n] = torch.arange(n)
        doc[r, at:at + n] = i
        first = starts[i] - 1                      # the output at t predicts token t + 1
        mask[i, first:n - 1] = True
        source.extend(range(r * width + at + first, r * width + at + n - 1))
        target.extend(seq[first + 1:])
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return TrainBatch(seqs, starts, ids.to(device), pos.to(device), doc.to(device), t(source), t(target),
                      mask.to(device), pad_id)


def training_batch(r: Rollout, pad_id: int, device) -> TrainBatch:
    """The step's [prompt ‖ completion] sequences, packed (see `TrainBatch`)."""
    G = len(r.completions) // len(r.prompt_ids)
    seqs = [r.prompt_ids[i // G] + c.token_ids for i, c in enumerate(r.completions)]
    starts = [len(r.prompt_ids[i // G]) for i in range(len(r.completions))]
    return pack_sequences(seqs, starts, pad_id, device)


# --- the loop ---------------------------------------------------------------------------------------

def train(cfg: GRPOConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Under torchrun the prompts of every rollout round are split over the ranks by whole groups
    (`rollout_all`); after the rewards are gathered each rank trains on its share of the kept groups,
    with the loss normalised by global counts (`dist.loss_scale`), so N processes step as one."""
    world, device = dist.init(cfg.device)
    out = Path(cfg.out)
    folder = dist.stage_folder(out, cfg.keep_last, resume, overwrite)
    torch.manual_seed(cfg.seed)
    variant = VARIANTS[cfg.loss]
    model, tok = load_checkpoint(cfg.init, device)
    ref = None
    if cfg.beta > 0:  # the frozen reference exists only when the KL term is used
        ref, _ = load_checkpoint(cfg.init, device)
        ref.eval().requires_grad_(False)
    n_params, mc = model.num_params(), model.config
    model = dist.wrap(model, cfg.parallel, cfg.dtype, cfg.grad_checkpointing)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    rng = random.Random(cfg.seed)
    epochs = DataEpochs(cfg) if cfg.data else None
    ledger = StageLedger(out.name, cfg.price_per_device_hour, hardware()["device"], dist.world().size)
    step = 0
    state = dist.resume(folder, model, opt, ledger)
    resume = state is not None
    if resume:
        rng.setstate(state["prompt_rng"])
        if epochs is not None:
            epochs.drawn = state.get("data_drawn", 0)   # 0: a checkpoint from before epochs
        step = state["step"]
        if dist.is_main():
            console.print(f"resumed {out} at step {step}")
    samples_path = out / "samples.jsonl"
    if not resume and dist.is_main():
        samples_path.unlink(missing_ok=True)
    elif dist.is_main():
        truncate_after(samples_path, step)
    if dist.is_main():
        console.print(f"grpo ({cfg.loss}): {n_params / 1e6:.2f} M parameters, {cfg.prompts_per_step}×{cfg.group_size} "
                      f"completions/step, β={cfg.beta}, ε=({cfg.eps_low}, {cfg.eps_high}), μ={cfg.mu}"
                      + (f", {world.size} processes ({cfg.parallel})" if world.size > 1 else ""))
    line = {"rollout/reward_mean": "reward", "rollout/accuracy": "acc", "rollout/len_mean": "len",
            "train/kl": "kl", "train/entropy": "ent", "perf/completions_per_s": "compl/s"}
    if epochs is not None:
        line["data/epoch"] = "epoch"
    engine = None
    with dist.step_log()(out, cfg.steps, step, line, every=cfg.log_every, resume=resume) as log:
        while step < cfg.steps:
            t0 = time.perf_counter()
            # 1. rollout with π_old (the current weights, no grad)
            model.eval()
            with dist.full_weights(model) as whole:
                if engine is None or dist.is_fsdp(model):   # FSDP's whole weights are new tensors each step
                    # on a GPU the rollouts decode in the training dtype (bf16 copies of the fp32
                    # master weights); on the CPU the C step decodes in fp32
                    engine = Engine(whole, tok, dtype=dist.DTYPES[cfg.dtype] if str(device).startswith("cuda") else None)
                r, generated, zero_std_frac = collect(engine, tok, cfg, rng, step, epochs)
                engine.forget_weights()   # the update makes the packed copy stale: not held through it
            t_gen = time.perf_counter() - t0
            adv = group_advantages(r.rewards, variant.scale_by_std).flatten()  # [P*G]
            gen_tokens = sum(len(c.token_ids) for c in r.completions)
            # this rank's groups (a rank left without any trains on group 0 with weight 0, so that
            # every rank takes part in the gradient all-reduce)
            G = cfg.group_size
            a, b = dist.shard_range(len(r.problems))
            mine = keep_groups(r, list(range(a, b)) if b > a else [0], G)
            batch = training_batch(mine, tok.pad_id, device)
            adv_mine = adv[a * G:b * G] if b > a else torch.zeros(G)
            # 2. log-probs of π_old and π_ref (only needed when μ > 1 / β > 0)
            with torch.no_grad(), dist.autocast(cfg.dtype, device):
                logp_old = token_logprobs(model, batch, cfg.temperature)[0] if cfg.mu > 1 or cfg.minibatches > 1 else None
                logp_ref = token_logprobs(ref, batch, cfg.temperature)[0] if ref is not None else None
            # 3. μ passes of minibatch updates
            model.train()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            stats = update(model, opt, batch, adv_mine.to(device), logp_old, logp_ref, variant, cfg,
                           weight=1.0 if b > a else 0.0, device=device)
            step += 1
            width = batch.ids.shape[1]
            # μ training passes (forward + backward) over every rank's rows, plus forwards only for π_old
            # (when it is not the training pass itself) and for the reference model (when β > 0)
            tokens_all = int(dist.all_sum([batch.ids.numel() if b > a else 0])[0])
            train_tokens = tokens_all * cfg.mu
            ref_tokens = tokens_all * ((ref is not None) + (logp_old is not None))
            ledger.add(forward_flops(n_params, gen_tokens + ref_tokens, mc.num_hidden_layers, mc.hidden_size, width)
                       + train_flops(n_params, train_tokens, mc.num_hidden_layers, mc.hidden_size, width),
                       gen_tokens + train_tokens + ref_tokens)
            dt = time.perf_counter() - t0
            metrics = step_metrics(r, zero_std_frac, stats, generated, gen_tokens, dt, t_gen, tok.reasoning)
            if epochs is not None:
                metrics["data/epoch"] = round(epochs.epoch, 4)
            if dist.is_main():
                warn_if_degenerate(step, metrics)
            log.log(step, metrics)
            if dist.is_main() and (step % cfg.sample_every == 0 or step == 1):
                write_samples(samples_path, step, r, adv)
            if step % cfg.save_every == 0 or step == cfg.steps:
                dist.save(folder, model, opt, tok, cfg, ledger, step=step, prompt_rng=rng.getstate(),
                          data_drawn=epochs.drawn if epochs is not None else 0)
    if dist.is_main():
        ledger.finish(out / "ledger.json")
    folder.close()
    return out


def minibatch_slices(n: int, minibatches: int) -> list[slice]:
    """`minibatches` contiguous, near-equal slices of n sequences — fewer when n is smaller (a batch
    that dynamic sampling left short still trains, one sequence per optimizer step at worst)."""
    m = max(1, min(minibatches, n))
    bounds = [i * n // m for i in range(m + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def update(model, opt, batch: TrainBatch, adv, logp_old, logp_ref, variant: Variant, cfg: GRPOConfig,
           weight: float = 1.0, device="cpu") -> dict:
    """μ passes over the rollout batch in `minibatches` optimizer steps each; returns mean stats.
    Under torchrun `batch` is this rank's share (`weight` 0: a stand-in for a rank with none) and each
    minibatch's loss is rescaled to the global normaliser: tokens for DAPO's token mean, sequences else."""
    # every rank takes the same number of optimizer steps (each is a collective): the fewest any can make
    slices = minibatch_slices(len(batch), dist.all_min(min(cfg.minibatches, len(batch))))
    parts_of = {0: batch} if len(slices) == 1 else {}   # minibatch start → its packed sequences
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    n = 0
    for _ in range(cfg.mu):
        for sl in slices:
            if sl.start not in parts_of:
                parts_of[sl.start] = batch.subset(sl)
            part = parts_of[sl.start]
            mask = part.mask
            with dist.autocast(cfg.dtype, device):
                logp, entropy = token_logprobs(model, part, cfg.temperature)
            # With μ = 1 and one minibatch π_old = π_θ: the ratio is 1 in value, its gradient the policy gradient.
            old = logp.detach() if logp_old is None else logp_old[sl]
            ref = None if logp_ref is None else logp_ref[sl]
            loss, parts = policy_loss(logp, old, ref, adv[sl], mask, variant, cfg.eps_low, cfg.eps_high,
                                      cfg.beta, cfg.max_new_tokens)
            m = mask.float()
            n_tok = float(m.sum()) * weight
            scale = dist.loss_scale(n_tok if variant.aggregate is agg_token_mean else len(part) * weight, device)
            opt.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            local = {"kl": parts["kl"], "clip_frac": parts["clip_frac"],
                     "entropy": float((entropy.detach() * m).sum() / m.sum().clamp_min(1))}
            if dist.active():   # token-weighted means over the ranks; the loss is already a share
                *sums, n_all = dist.all_sum([local[k] * n_tok for k in local] + [n_tok], device)
                local = {k: v / n_all if n_all else 0.0 for k, v in zip(local, sums)}
                local["loss"] = dist.all_sum([loss.item() * scale], device)[0] / dist.world().size
            else:
                local["loss"] = loss.item()
            for k, v in local.items():
                totals[k] += v
            totals["grad_norm"] += grad_norm
            n += 1
    return {k: v / n for k, v in totals.items()}


def step_metrics(r: Rollout, zero_std_frac: float, stats: dict, generated: int, gen_tokens: int, dt: float, t_gen: float,
                 fmt: ReasoningFormat = STRICT) -> dict:
    lengths = torch.tensor([len(c.token_ids) for c in r.completions], dtype=torch.float)
    m = {
        "rollout/reward_mean": r.rewards.mean().item(),
        "rollout/reward_std": r.rewards.std().item(),
        "rollout/zero_std_frac": zero_std_frac,
        "rollout/len_mean": lengths.mean().item(),
        "rollout/len_max": int(lengths.max().item()),
        "rollout/truncated_frac": sum(c.finish_reason == "length" for c in r.completions) / len(r.completions),
        "rollout/reflection_rate": sum(reflects(c.text) for c in r.completions) / len(r.completions),
    }
    # Trace accuracy: correct answers among the completions that reason (non-empty <think>).
    reasons = [bool((p := parse_completion(c.text, fmt)) and p[0]) for c in r.completions]
    if any(reasons):
        right = r.parts["accuracy"].flatten() > 0
        m["rollout/trace_accuracy"] = sum(bool(ok) for ok, t in zip(right, reasons) if t) / sum(reasons)
    for name, values in r.parts.items():
        m[f"rollout/{name}"] = values.mean().item()
        m[f"rollout/{name}_std"] = values.std().item()
    for name, v in stats.items():
        m[f"train/{name}"] = v
    m.update({"perf/step_s": dt, "perf/generate_frac": t_gen / dt, "perf/completions_per_s": generated / dt,
              "perf/tokens_per_s": gen_tokens / t_gen if t_gen else 0.0})
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}


def warn_if_degenerate(step: int, m: dict) -> None:
    if m["rollout/zero_std_frac"] >= 1.0:
        warn(f"step {step}: every group has equal rewards — no learning signal (tasks too easy or too hard?)")
    if m["train/entropy"] < 0.02:
        warn(f"step {step}: policy entropy collapsed to {m['train/entropy']:.4f}")


def write_samples(path: Path, step: int, r: Rollout, adv: torch.Tensor) -> None:
    import json

    G = len(r.completions) // len(r.problems)
    with path.open("a") as f:
        for i, c in enumerate(r.completions):
            p = r.problems[i // G]
            f.write(json.dumps({"step": step, "task": p.task, "difficulty": p.difficulty, "prompt": p.prompt,
                                "completion": c.text, "reward": round(r.rewards.flatten()[i].item(), 4),
                                "accuracy": r.parts["accuracy"].flatten()[i].item(),
                                "advantage": round(adv[i].item(), 4), "finish_reason": c.finish_reason}) + "\n")
