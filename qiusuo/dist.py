"""More than one process: `torch.distributed` under `torchrun`, and the GPU-side training options.

`torchrun --nproc-per-node N qiusuo <stage> …` starts N copies of a stage; `init` reads the launcher's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins one process group — gloo on CPU,
NCCL on CUDA, one GPU per process (`cuda:LOCAL_RANK`). Without that environment (or with WORLD_SIZE=1)
nothing here creates a group and every helper is the identity: a plain run is exactly what it was.

Data parallelism is exact: each rank takes a contiguous share of the global batch (SFT rows, GRPO
groups, eval problems), and every loss is normalised by the *global* count (tokens or sequences),
so N processes with the same global batch take the same optimizer step as one process (up to float
summation order). `parallel: ddp` replicates the model (`DistributedDataParallel`, gradients averaged
by all-reduce); `parallel: fsdp` shards parameters, gradients and optimizer state over the ranks with
FSDP2 (`fully_shard`, one unit per decoder layer plus the root) for models that do not fit one device.
Both average gradients over ranks, so a rank's loss is scaled by `world × local / global` (`loss_scale`).

Checkpoints: rank 0 writes each consolidated checkpoint of the stage folder — the Hugging Face files
and the training state, full weights and optimizer state gathered from the shards under FSDP; the
others wait at a barrier. Every rank reads the same checkpoint on `--resume` (the run folder must be
on a file system every node sees); data order and prompts are derived from the seed and the step,
not from the rank layout.

Precision (`dtype: bfloat16`): parameters and AdamW state stay fp32 (the master copy: bf16 has 8
mantissa bits, so updates of lr·g ≈ 1e-6 relative to a weight would round to nothing), and the forward
and backward run in bf16 — by `torch.autocast` for a single process and DDP, by FSDP2's
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` under FSDP, which gathers bf16 copies of
the shards and reduces gradients in fp32. Log-probabilities, softmax and losses are computed in fp32
(the GRPO ratio exp(logπ − logπ_old) is sensitive to bf16 rounding of logits). Rollouts on CUDA decode in
`dtype` too (`Engine(dtype=…)`: bf16 packed weights and KV cache made from the fp32 master); on the CPU the
C decode step runs in fp32.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

PARALLEL = ("ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


_world = World()
_device = "cpu"   # where collectives' tensors live: NCCL takes CUDA tensors only


def init(device: str = "cpu") -> tuple[World, str]:
    """Join the process group torchrun describes (once per process); returns (world, this rank's device).
    A single process — no WORLD_SIZE, or WORLD_SIZE=1 — gets World() and `device` unchanged."""
    global _world, _device
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _world, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
        atexit.register(lambda: td.is_initialized() and td.destroy_process_group())
    _world = World(rank, size, local_rank)
    _device = device if cuda else "cpu"
    return _world, device


def world() -> World:
    return _world


def active() -> bool:
    return _world.size > 1


def is_main() -> bool:
    return _world.rank == 0


def barrier() -> None:
    if active():
        td.barrier()


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """This rank's contiguous share [a, b) of n items: near-equal, later ranks take the remainder.
    Contiguous shards keep the global order when the parts are concatenated by rank."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    return rank * n // size, (rank + 1) * n // size


def shard(items: list) -> list:
    a, b = shard_range(len(items))
    return items[a:b]


def all_sum(values, device=None) -> list[float]:
    """Sum of each number over the ranks (fp64, one all-reduce); identity for one process."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device)
    td.all_reduce(t)
    return t.tolist()


def all_min(value: int) -> int:
    """The smallest of each rank's `value`; `value` itself for one process."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device)
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return int(t)


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] for one process."""
    if not active():
        return [obj]
    out = [None] * _world.size
    td.all_gather_object(out, obj)
    return out


def gather_shards(n: int, work) -> list:
    """Run `work(a, b)` on this rank's share of n items and return every rank's result in rank order
    (shares that are empty give no result)."""
    a, b = shard_range(n)
    return [part for part in all_gather_objects(work(a, b) if b > a else None) if part is not None]


def loss_scale(local: float, device=None) -> float:
    """Factor turning a loss normalised by this rank's count (tokens or sequences) into this rank's
    share of the loss normalised by the global count, times the world size that DDP / FSDP's gradient
    averaging divides by. 1.0 for one process (nothing is rescaled, so plain runs are bit-identical)."""
    if not active():
        return 1.0
    total = all_sum([local])[0]
    return _world.size * local / total if total else 0.0


# --- wrapping -------------------------------------------------------------------------------------

def checkpoint_layers(model) -> None:
    """Gradient checkpointing: each decoder layer keeps only its input during the forward pass and
    recomputes its activations in the backward pass (≈ one more forward, activations of one layer
    instead of all). Only when gradients are being recorded; inference is unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kw)
            return _inner(*args, **kw)

        layer.forward = forward


def wrap(model, parallel: str = "ddp", dtype: str = "float32", grad_checkpointing: bool = False):
    """The module to train: `model` itself for one process, else DDP or FSDP2 around it. Call before
    building the optimizer (FSDP2 replaces the parameters by sharded ones)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if grad_checkpointing:
        checkpoint_layers(model)
    if not active():
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = model.lm_head.weight.device
        return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    """The `Transformer` inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def autocast(dtype: str, device: str):
    """bf16 compute with fp32 master weights (see the module docstring); a no-op for float32. Under
    FSDP the mixed-precision policy has already made the gathered weights bf16, and autocast only
    keeps the few ops it lists (softmax, losses) in fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype])


@contextlib.contextmanager
def full_weights(model):
    """A plain `Transformer` with the whole weights for the duration (the engine reads whole matrices).
    Under FSDP a gathered copy on every rank — collective — dropped on exit; else the model itself."""
    if not is_fsdp(model):
        yield unwrap(model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = plain_model(model, {k: v.detach() for k, v in state.items()})
    yield copy.eval()
    del copy, state


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --- checkpoints ----------------------------------------------------------------------------------

def full_state(model, opt) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), whole, on CPU — collective under FSDP (every rank
    must call it); rank 0's copy is the one written."""
    if not is_fsdp(model):
        return unwrap(model).state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(model, state: dict):
    """A plain `Transformer` holding `state` (the consolidated weights) for writing as HF files."""
    if not is_fsdp(model):
        return unwrap(model)
    from .model import Transformer

    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


def stage_folder(out, keep_last: int, resume: bool, overwrite: bool):
    """The stage's `StageFolder`: rank 0 owns it (lock, refusal of a fresh run over checkpoints,
    writes); the other ranks get a read-only view of the same folder, created after rank 0's checks."""
    from .checkpoint import StageFolder

    folder = StageFolder(out, keep_last, resume=resume, overwrite=overwrite) if is_main() else None
    barrier()
    return folder or StageFolder(out, keep_last, resume=resume, primary=False)


def save(folder, model, opt, tok, cfg, ledger, **extra) -> None:
    """Rank 0 writes the consolidated checkpoint (weights and optimizer gathered whole); the others wait."""
    from .checkpoint import training_state

    msd, osd = full_state(model, opt)
    if is_main():
        state = training_state(opt, ledger, cfg, **extra)
        state["optimizer"] = osd
        folder.save(plain_model(model, msd), tok, cfg, state)
    barrier()


def resume(folder, model, opt, ledger) -> dict | None:
    """Every rank loads the newest good checkpoint into the (wrapped) model and optimizer. Rank 0 reads
    first, so a corrupt checkpoint is set aside (renamed) before the other ranks look."""
    found = None
    for main_turn in (True, False) if active() else (True,):
        if is_main() == main_turn:
            found = folder.newest(unwrap(model))
        barrier()
    if found is None:
        return None
    if not is_fsdp(model):
        return folder.apply(found, unwrap(model), opt, ledger)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from .checkpoint import set_rng_state

    weights, state = found
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))   # collective: every rank at once
    set_rng_state(state["rng"])
    ledger.restore(state.get("ledger"))
    return state


class NullLog:
    """StepLog's stand-in on ranks other than 0 (rank 0 alone writes metrics.jsonl and prints)."""

    def __init__(self, *args, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, step: int, metrics: dict) -> None:
        pass


def step_log():
    """The StepLog class for this rank."""
    from .log import StepLog

    return StepLog if is_main() else NullLog
