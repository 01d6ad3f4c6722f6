"""Stage folders: checkpoints a killed run resumes from exactly, and the checkpoint users load.

A training stage's folder `<out>/` holds:

    config.json, model.safetensors, generation_config.json,   the newest checkpoint in the Hugging Face
    tokenizer.json, tokenizer_config.json, config.yaml         layout: what --init, eval, serve and
                                                               transformers load
    checkpoints/step-000200/                                   the same files + train_state.pt + manifest.json;
    checkpoints/step-000400/                                   the last `keep_last` are kept
    metrics.jsonl, samples.jsonl, ledger.json, .lock

A checkpoint is written into `checkpoints/.tmp-…` and renamed when complete, so a run killed at any
instant leaves only whole checkpoints. The manifest (size and CRC32 of every file) catches one damaged
afterwards — a truncated copy, a bad disk: resuming skips it with a warning (renamed `….corrupt`) and
uses the one before. `train_state.pt` holds what the weights do not: optimizer moments, RNG states,
data position, step and cost ledger. The top-level files are hard links to the newest checkpoint's.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import save_config
from .log import warn
from .model import CheckpointError, Transformer, _read_weights, load_model, save_model
from .tokenizer import Tokenizer

STATE = "train_state.pt"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def training_state(opt, ledger, cfg, **extra) -> dict:
    """What `train_state.pt` holds: optimizer, RNG states, the cost ledger so far, the config, and each
    stage's own position (`step`, `data_pos`, `prompt_rng`, …) passed as `extra`. `step` is required."""
    return {"optimizer": opt.state_dict(), "rng": rng_state(), "ledger": ledger.snapshot(),
            "config": asdict(cfg), **extra}


def checkpoint_steps(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a stage folder, oldest first."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """`manifest.json`: size and CRC32 of every file of the checkpoint, each file synced to disk first."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            _fsync(p)
            files[p.name] = {"bytes": p.stat().st_size, "crc32": _crc32(p)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / MANIFEST)


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"no readable {MANIFEST} ({type(e).__name__})") from e
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{name} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {want['bytes']}")
        if _crc32(p) != want["crc32"]:
            raise CheckpointError(f"{name} fails its CRC32 check")


def _architecture_diff(folder: Path, model: Transformer) -> str:
    """'' when the checkpoint's config.json describes `model`'s shape, else the first differences."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    ours = model.config.to_hf()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    diff = [f"{k} {saved.get(k)} there, {ours.get(k)} here" for k in keys
            if k in saved and k in ours and saved[k] != ours[k]]
    return ", ".join(diff[:3])


class StageFolder:
    """The checkpoints of one training stage: resume from the newest good one, save atomically, keep the
    last `keep_last`. Holds an exclusive lock on `<out>/.lock` while open, so two runs cannot write the
    same folder. A fresh run (not `resume`) into a folder that holds checkpoints is refused unless
    `overwrite`, which deletes them."""

    def __init__(self, out: Path, keep_last: int = 2, resume: bool = False, overwrite: bool = False,
                 primary: bool = True):
        self.out, self.keep_last, self.wants_resume = Path(out), max(1, int(keep_last)), resume
        self.dir = self.out / CHECKPOINTS
        self._lock_fd, self.primary = None, primary
        if not primary:
            # Another process of the same torchrun job: it only reads the checkpoints rank 0 writes.
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        # what a save killed part-way leaves: a temporary checkpoint folder, temporary top-level files
        for stale in self.dir.glob(".tmp-*") if self.dir.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.out.glob(".*.tmp[0-9]*"):
            stale.unlink(missing_ok=True)
        held = checkpoint_steps(self.out)
        if held and not resume:
            if not overwrite:
                self.close()
                raise CheckpointError(f"{self.out} already holds checkpoints (newest: {held[-1][1].name}); "
                                      "use --resume to continue that run or --overwrite to start over")
            shutil.rmtree(self.dir)

    def _lock(self) -> int:
        fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"{self.out} is being written by another run (pid {holder}); "
                                  "wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def close(self) -> None:
        """Release the lock (also done when the process ends, however it ends)."""
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    __del__ = close

    # --- resume ---------------------------------------------------------------------------------
    def resume(self, model: Transformer, opt, ledger) -> dict | None:
        """Load the newest good checkpoint into model, optimizer, global RNGs and ledger and return its
        training state (for the stage's own fields); None when not resuming or nothing is saved."""
        found = self.newest(model)
        return None if found is None else self.apply(found, model, opt, ledger)

    def apply(self, found: tuple[dict, dict], model: Transformer, opt, ledger) -> dict:
        """Put a checkpoint's (weights, training state), from `newest`, into model, optimizer, RNGs and
        ledger; return the training state."""
        weights, state = found
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise _Foreign(f"{self.out}: weights do not match the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        ledger.restore(state.get("ledger"))
        return state

    def newest(self, model: Transformer) -> tuple[dict, dict] | None:
        """(weights, training state) of the newest good checkpoint, falling back past corrupt ones (renamed
        `.corrupt`, with a warning); None when not resuming or nothing is saved. `model` only serves to
        check that the checkpoint holds the same architecture."""
        if not self.wants_resume:
            return None
        fell_back = False
        for step, path in reversed(checkpoint_steps(self.out)):
            try:
                verify_manifest(path)
                diff = _architecture_diff(path, model)
                if diff:  # fatal: every older checkpoint of this run has the same shape
                    raise _Foreign(f"{path} holds a model of another architecture ({diff}); resume with the "
                                   "settings it was trained with, or start over with --overwrite")
                weights = _read_weights(path)
                state = torch.load(path / STATE, map_location="cpu", weights_only=False)
            except _Foreign:
                raise
            except Exception as e:  # noqa: BLE001 — any unreadable part makes the checkpoint unusable
                reason = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
                warn(f"{path.relative_to(self.out)} is corrupt ({reason.splitlines()[0][:200]}); "
                     f"renamed to {path.name}.corrupt, using the previous checkpoint")
                if self.primary:  # rank 0 renames it; the other ranks skip it alike
                    path.rename(path.with_name(path.name + ".corrupt"))
                fell_back = True
                continue
            if fell_back and self.primary:  # the top-level files may be the damaged checkpoint's
                self._export(path)
            return weights, state
        warn(f"{self.out}: no checkpoint to resume from; starting at step 0")
        return None

    # --- save -----------------------------------------------------------------------------------
    def save(self, model: Transformer, tok: Tokenizer, cfg, state: dict) -> Path:
        """Write `checkpoints/step-NNNNNN/` (HF files, config.yaml, train_state.pt, manifest) through a
        temporary folder, point the top-level files at it, and drop checkpoints beyond `keep_last`.
        A failed write (disk full, …) removes the temporary folder and leaves earlier checkpoints whole."""
        final = self.dir / f"step-{state['step']:06d}"
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.dir.mkdir(exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tmp)
            tok.save(tmp)
            save_config(cfg, tmp)
            torch.save(state, tmp / STATE)
            write_manifest(tmp)
            if final.exists():  # the same step saved again after resuming from an older checkpoint
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.dir)
            self._export(final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception) or isinstance(e, CheckpointError):
                raise
            held = [p.name for _, p in checkpoint_steps(self.out)]
            kept = f"{held[-1]} is intact" if held else "no earlier checkpoint"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            raise CheckpointError(f"cannot save {final.relative_to(self.out)} ({reason}); {kept}") from e
        for _, old in checkpoint_steps(self.out)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _export(self, ckpt: Path) -> None:
        """Top-level HF files ← hard links to the checkpoint's (a copy where links are not supported),
        each replaced atomically."""
        for src in ckpt.iterdir():
            if src.name in (STATE, MANIFEST):
                continue
            tmp = self.out / f".{src.name}.tmp{os.getpid()}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, self.out / src.name)


class _Foreign(CheckpointError):
    """A checkpoint that is whole but belongs to another model: no fallback can help."""


def has_checkpoints(out: Path) -> bool:
    return bool(checkpoint_steps(out))


def check_tokenizer(model: Transformer, tok: Tokenizer, where: Path) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (it belongs to another model). An
    embedding with more rows than the tokenizer has tokens is normal (Qwen pads its vocabulary)."""
    rows = model.config.vocab_size
    if tok.vocab_size > rows:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                              f"{rows} rows — tokenizer.json belongs to another model")


def load_checkpoint(path: Path, device="cpu") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a stage folder (or any HF-layout folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    model, tok = load_model(path, device=device), Tokenizer.load(path)
    check_tokenizer(model, tok, path)
    return model, tok

