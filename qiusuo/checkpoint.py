"""Stage folders: the Hugging Face checkpoint, the resolved config, and the exact training state.

`train_state.pt` holds everything needed to resume exactly — weights, optimizer, scheduler position,
RNG states, data position, step — in one file written atomically, so a run killed at any instant
resumes from a consistent state (the HF files beside it are the export, not the resume source).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import save_config
from .model import CheckpointError, Transformer, load_model, save_model
from .tokenizer import Tokenizer

STATE = "train_state.pt"


def save_stage(out: Path, model: Transformer, tokenizer: Tokenizer, cfg, state: dict | None = None) -> None:
    """Write the checkpoint files, the config and (when given) the training state, each atomically."""
    out = Path(out)
    save_model(model, out)
    tokenizer.save(out)
    save_config(cfg, out)
    if state is not None:
        tmp = out / f".{STATE}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, out / STATE)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_train_state(out: Path) -> dict:
    path = Path(out) / STATE
    if not path.exists():
        raise CheckpointError(f"{out}: nothing to resume (no {STATE}); run without --resume to start")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types on a truncated or foreign file
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from e


def training_state(model, opt, ledger, cfg, **extra) -> dict:
    """What `train_state.pt` holds: weights, optimizer, RNG states, the cost ledger so far, the config,
    and each stage's own position (`step`, `data_pos`, …) passed as `extra`."""
    from dataclasses import asdict

    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
            "ledger": ledger.snapshot(), "config": asdict(cfg), **extra}


def resume_training(out: Path, model, opt, ledger) -> dict:
    """Load `<out>/train_state.pt` into model, optimizer, global RNGs and ledger; return the state for
    the stage's own fields."""
    state = load_train_state(out)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    ledger.restore(state.get("ledger"))
    return state


def load_checkpoint(path: Path, device="cpu") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a stage folder (or any HF-layout folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    return load_model(path, device=device), Tokenizer.load(path)
