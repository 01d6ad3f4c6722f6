"""What a stage cost: wall time, FLOPs, tokens and money, plus the machine and code it ran on.

Every stage keeps a `StageLedger`, feeds it the FLOPs and tokens of each step, and writes
`ledger.json` when done; the report sums those files. FLOPs come from the closed-form
estimates below rather than from a profiler, so they are comparable across machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CURRENCY = "USD"


# ---------------------------------------------------------------------------- machine and code


def hardware() -> dict:
    """Describe the machine this process runs on, so a cost or speed can be read in context."""
    return {
        "device": _accelerator(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _accelerator() -> str:
    """The CUDA device name ("2 x <name>" for two), or "cpu" without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    count = torch.cuda.device_count()
    return name if count == 1 else f"{count} x {name}"


def _cpu_model() -> str:
    """CPU model name; /proc/cpuinfo first because platform.processor() is often empty on Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    """Total RAM in GiB from /proc/meminfo, or None off Linux."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return round(kib / 1024**2, 1)
    return None


def git_info(path: str | Path) -> dict:
    """`{"commit": sha or "unknown", "dirty": bool}` for the git checkout containing `path`.

    Never raises: a missing git binary, a folder outside any repository or a repository
    without commits all give "unknown" rather than stopping a run over bookkeeping.
    """
    commit = _git(path, "rev-parse", "HEAD")
    status = _git(path, "status", "--porcelain")
    return {"commit": commit or "unknown", "dirty": bool(status)}


def _git(path: str | Path, *args: str) -> str | None:
    """stdout of `git <args>` run in `path`, or None when git fails or is absent."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------------------- FLOP estimates
#
# Approximation (Kaplan et al. 2020; Hoffmann et al. 2022, appendix F):
#   * each parameter in a matmul costs 2 FLOPs per token forward (one multiply, one add),
#     so the dense part is 2N forward; backward costs twice the forward, so 6N to train;
#   * attention adds two matmuls that have no parameters, QK^T and scores x V. Each costs
#     2 * d_model FLOPs per (query, key) pair per layer. Under a causal mask a query sees
#     ctx/2 keys on average, so together they cost 2 * 2 * n_layers * d_model * ctx/2
#     = 2 * n_layers * d_model * ctx per token forward, and 3x that (6 * ...) to train.
#     The same average holds for cached generation up to length ctx.
# Ignored: softmax, norms, activations, rotary embeddings and the embedding lookup, which are
# a few percent at most for these shapes. N should count the parameters that take part in
# a matmul for every token: that excludes the embedding table but includes the output
# projection (with tied embeddings, `num_params()` of the model is exactly that).
# d_model is the attention width (n_heads * head_dim), the hidden size in most configs.


def forward_flops(n_params: int, n_tokens: int, n_layers: int, d_model: int, ctx: int) -> float:
    """FLOPs to run `n_tokens` tokens forward only (generation, scoring, evaluation).

    2*N per token for the weights plus 2*n_layers*d_model*ctx for attention; see the note above.
    """
    per_token = 2 * n_params + 2 * n_layers * d_model * ctx
    return float(per_token) * n_tokens


def train_flops(n_params: int, n_tokens: int, n_layers: int, d_model: int, ctx: int) -> float:
    """FLOPs to train on `n_tokens` tokens: forward plus a backward that costs twice as much.

    6*N per token for the weights plus 6*n_layers*d_model*ctx for attention; see the note above.
    """
    return 3 * forward_flops(n_params, n_tokens, n_layers, d_model, ctx)


def measure_matmul_peak(
    device: str = "cpu", n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """Achievable FLOP/s: the best of `repeats` timed n x n matmuls, the denominator of MFU.

    The default size takes well under a second on a 2-core CPU. On a GPU pass a larger n
    (e.g. 8192), otherwise launch latency rather than the math units sets the time.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    # The first call pays one-off costs (thread pool start-up, cuBLAS handle, kernel choice).
    torch.matmul(a, b, out=out)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    """Wait for queued CUDA work, since kernel launches return before the math is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- the ledger


class StageLedger:
    """Running totals of one stage's compute, turned into a cost when the stage finishes.

    Wall time runs from construction to `finish`, so build the ledger when the stage starts;
    a resumed stage adds the time saved in its checkpoint (`snapshot` / `restore`).
    Device-hours are wall-clock hours times `devices` (the processes of a torchrun stage, one device
    each; FLOPs and tokens are counted over all of them).
    """

    def __init__(self, stage: str, price_per_device_hour: float, device: str, devices: int = 1) -> None:
        self.stage = stage
        self.devices = devices
        self.price_per_device_hour = float(price_per_device_hour)
        self.device = device
        self.flops = 0.0
        self.tokens = 0
        self._earlier_s = 0.0
        self._start = time.perf_counter()

    def add(self, flops: float, tokens: int) -> None:
        """Count one step's (or batch's) FLOPs and tokens."""
        self.flops += float(flops)
        self.tokens += int(tokens)

    def elapsed(self) -> float:
        """Wall seconds so far, including those of earlier runs restored from a checkpoint."""
        return self._earlier_s + time.perf_counter() - self._start

    def snapshot(self) -> dict:
        """Totals so far, to save in a checkpoint and hand back to `restore` on resume."""
        return {"wall_s": self.elapsed(), "flops": self.flops, "tokens": self.tokens}

    def restore(self, snapshot: dict | None) -> None:
        """Continue the totals of an interrupted run from its checkpoint's `snapshot()`.

        Time between that checkpoint and the interruption is not counted: it is unknown,
        and the steps it bought are redone (and counted) after the resume. None, from a
        checkpoint saved without a ledger, leaves the totals alone.
        """
        if snapshot is None:
            return
        self._earlier_s = float(snapshot["wall_s"])
        self.flops = float(snapshot["flops"])
        self.tokens = int(snapshot["tokens"])

    def finish(self, path: str | Path) -> dict:
        """Stop the clock, write the totals as JSON to `path` and return them."""
        wall_s = self.elapsed()
        device_hours = wall_s / 3600 * self.devices
        record = {
            "stage": self.stage,
            "wall_s": wall_s,
            "flops": self.flops,
            "tokens": self.tokens,
            "device": self.device,
            "device_hours": device_hours,
            "price_per_device_hour": self.price_per_device_hour,
            "cost": device_hours * self.price_per_device_hour,
            "currency": CURRENCY,
            "achieved_flops_per_s": self.flops / wall_s if wall_s > 0 else 0.0,
        }
        if self.devices > 1:   # torchrun: wall time on every process's device
            record["devices"] = self.devices
        write_json_atomic(Path(path), record)
        return record

    @staticmethod
    def load(path: str | Path) -> dict | None:
        """A ledger written by `finish`, or None when it is missing or unreadable."""
        return read_json(Path(path))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one.

    The temp file sits in the destination folder because os.replace is atomic only
    within one filesystem.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None (with a warning unless simply absent) otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("cannot read %s: %s", path, err)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: expected a JSON object, got %s", path, type(data).__name__)
        return None
    return data
