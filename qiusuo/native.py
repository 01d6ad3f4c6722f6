"""The C decode step (`csrc/decode.c`): built with the system C compiler on first use, cached, loaded
with ctypes. Not a build dependency: when no compiler is found (or `QIUSUO_NATIVE=0`), `kernel()`
returns None, `applies()` is False and the engine decodes with PyTorch instead, which computes the
same logits. `NativeWeights` holds a model's weights in the kernel's layout and calls it.

The shared object is cached under `$QIUSUO_CACHE` (default `~/.cache/qiusuo`), keyed by a hash of the
source, the compiler flags and this CPU's feature flags (it is built with `-march=native`); it is
written through a temporary file and renamed, so concurrent first uses cannot load half a file.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from .model import KVCache, Transformer, decode_rotary, fused_decode_layers

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "decode.c"
# Tried in order: the fast build first, then more portable ones.
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-pthread"],
    ["-O3", "-fno-math-errno", "-pthread"],
)

_lock = threading.Lock()
_loaded: dict[str, object] = {}


class Model(ctypes.Structure):
    """Mirror of `Model` in decode.c."""

    _fields_ = [(name, ctypes.c_int32) for name in
                ("hidden", "inter", "layers", "heads", "kv_heads", "head_dim", "vocab", "vocab_padded", "max_pos")] + [
        ("eps", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("qkv", ctypes.POINTER(ctypes.c_void_p)),
        ("qkv_b", ctypes.POINTER(ctypes.c_void_p)),
        ("o", ctypes.POINTER(ctypes.c_void_p)),
        ("gu", ctypes.POINTER(ctypes.c_void_p)),
        ("down", ctypes.POINTER(ctypes.c_void_p)),
        ("head", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
    ]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("QIUSUO_CACHE") or Path.home() / ".cache" / "qiusuo")


def _build(compiler: str) -> Path | None:
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_flags().encode()).hexdigest()[:16]
        target = _cache_dir() / f"decode-{key}.so"
        if target.exists():
            return target
        cmd = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", "<tmp>", "-lm"]
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            cmd[cmd.index("<tmp>")] = tmp
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)
            return target
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            errors.append(f"{' '.join(cmd)}: {getattr(e, 'stderr', '') or e}")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    log.warning("could not build the C decode step; using the PyTorch one:\n%s", "\n".join(errors))
    return None


def kernel():
    """The loaded library (with `qiusuo_decode_step`), or None when it is disabled or cannot be built."""
    if os.environ.get("QIUSUO_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" not in _loaded:
            lib = None
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            path = _build(compiler) if compiler else None
            if path is not None:
                try:
                    # Two handles on one library: the decode step releases the GIL while it computes
                    # (the server's event loop runs meanwhile); the short calls keep it, so a scheduler
                    # step does not queue for the GIL again after each of them.
                    lib = ctypes.PyDLL(str(path))
                    lib.nogil = ctypes.CDLL(str(path))
                    fn = lib.nogil.qiusuo_decode_step
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
                    fn = lib.qiusuo_sample
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 6
                    fn = lib.qiusuo_copy_rows
                    fn.restype = None
                    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
                except OSError as e:
                    log.warning("could not load %s (%s); using the PyTorch decode step", path, e)
                    lib = None
            _loaded["lib"] = lib
        return _loaded["lib"]


class Sampler:
    """`qiusuo_sample` for a decode batch: `sampler(logits, state, n)` samples rows 0..n−1 of `logits`
    (C-contiguous float32, first `vocab` columns) with the per-row settings in `state` (numpy arrays)
    into an int64 array (reused by the next call) and holds the GIL (microseconds). Called once per
    step, so the ctypes pointers of the arrays are worked out again only when they are replaced
    (admission, compaction), not on every call — `ndarray.ctypes` costs microseconds per array."""

    def __init__(self, lib, vocab: int):
        self.lib, self.vocab = lib, vocab
        self._logits = self._state = None
        self._args: tuple = ()
        self._out = np.empty(0, dtype=np.int64)

    def __call__(self, logits: np.ndarray, state: dict, n: int) -> np.ndarray:
        if logits is not self._logits or state is not self._state or len(self._out) < n:
            if not logits.flags.c_contiguous or logits.dtype != np.float32:
                raise ValueError("logits must be a C-contiguous float32 array")
            self._logits, self._state = logits, state
            self._out = np.empty(max(n, len(logits)), dtype=np.int64)
            self._args = (logits.ctypes.data, logits.shape[1], *(state[k].ctypes.data for k in
                          ("temperature", "top_p", "top_k", "key", "drawn")), self._out.ctypes.data)
        if self.lib.qiusuo_sample(n, self.vocab, *self._args):
            raise MemoryError("C sampler could not allocate its buffers")
        return self._out[:n]   # overwritten by the next call


def copy_rows(lib, cache, src: list[int], dst: list[int], upto: int) -> None:
    """Cache rows src[i] → dst[i] (disjoint), positions [0, upto), every layer, keys and values."""
    kv = cache.kv
    layers, _, capacity, heads, L, D = kv.shape
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    lib.qiusuo_copy_rows(kv.data_ptr(), layers, capacity, heads, L, D, s.ctypes.data, d.ctypes.data, len(s), upto)


def applies(model: Transformer) -> bool:
    """Whether the C step can run `model`: on the CPU in fp32, widths that are multiples of 8, and a
    kernel that builds here."""
    cfg, p = model.config, model.lm_head.weight
    dims_ok = all(n % 8 == 0 for n in (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim))
    return p.device.type == "cpu" and p.dtype == torch.float32 and dims_ok and kernel() is not None


def aligned_empty(n: int, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised 1-D array whose data starts on an `align`-byte boundary. numpy (malloc) only
    promises 16 bytes, and then every other 32-byte AVX load of a weight panel straddles two cache
    lines: measured in one process, alternating, a step of 1 or 16 rows 6–7 % slower."""
    size = np.dtype(dtype).itemsize
    buf = np.empty(n + align // size, dtype=dtype)
    skip = (-buf.ctypes.data % align) // size
    return buf[skip:skip + n]


def panels(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight w [out N, in K] (N a multiple of 8) in the C kernel's layout: wᵀ [K, N] cut into
    column panels of 16, each stored as a row-major [K, 16] block (the last one [K, 8] when N is not a
    multiple of 16), one after another: flat, 16·p·K is where panel p starts."""
    a = w.detach().numpy()                   # CPU fp32 only (the kernel's case); numpy: less overhead per op
    N, K = a.shape
    full = N // 16 * 16
    out = aligned_empty(N * K, a.dtype)
    out[:full * K].reshape(N // 16, K, 16)[...] = a[:full].reshape(N // 16, 16, K).transpose(0, 2, 1)
    if full < N:
        out[full * K:].reshape(K, N - full)[...] = a[full:].T
    return torch.from_numpy(out)


def _no_array() -> None:
    """Stands for a weak reference whose array is gone (`NativeWeights._address`)."""


TEAM_WEIGHT_BYTES = 16 << 20
"""Above this many bytes of weights the C step runs in team mode (`NativeWeights._team`)."""
TEAM_PREFILL_ROWS = 48
"""A prefill of fewer prompts than threads runs in team mode from this many prompt tokens."""


class NativeWeights:
    """A model's decode weights in the C kernel's layout: the fused matrices of `fused_decode_layers`
    in column panels (`panels`), the vocabulary padded to a multiple of 8, and the rotary tables of
    `decode_rotary` — the maths of `model.DecodeWeights`, the whole step in one parallel region on
    the kernel's own threads, in blocks of rows or, for large weights and long lone prompts, in team
    mode (`_team`). Built from the live parameters (a copy); CPU, fp32, `applies(model)` only."""

    @torch.no_grad()
    def __init__(self, model: Transformer, max_len: int):
        lib = kernel()
        if lib is None or not applies(model):
            raise RuntimeError("the C decode step is unavailable (needs a CPU fp32 model and a C compiler)")
        cfg = model.config
        self.cfg, self.max_len, self.lib = cfg, max_len, lib
        # a copy like every other weight here, so a copy kept past a weight change is the old model
        # in full rather than old layers behind a new embedding
        embed = model.model.embed_tokens.weight.detach().clone()
        fused, head = fused_decode_layers(model)
        cos, sin = decode_rotary(cfg, max_len, embed.device, embed.dtype)
        V = embed.shape[0]
        self.vocab = V
        padded = head.new_zeros(-(-V // 8) * 8, head.shape[1])         # vocabulary padded to a multiple of 8
        padded[:V] = head
        self._keep = [embed.contiguous(), panels(padded), cos.contiguous(), sin.contiguous()]
        self.weight_bytes = sum(t.numel() * t.element_size() for layer in [*fused, (head,)] for t in layer)
        self.team: bool | None = None
        """Team mode of the C step: None decides per call (`_team`), True / False forces it."""
        self._addresses = [(_no_array, 0)] * 5   # see `_address`

        def per_layer(j):
            arr = (ctypes.c_void_p * len(fused))()
            for i, layer in enumerate(fused):
                t = layer[j].contiguous() if j == 1 else panels(layer[j])     # j == 1: the q|k|v bias
                self._keep.append(t)
                arr[i] = t.data_ptr()
            self._keep.append(arr)
            return ctypes.cast(arr, ctypes.POINTER(ctypes.c_void_p))

        k = self._keep
        self.model = Model(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, V, padded.shape[0], max_len, cfg.rms_norm_eps,
                           k[0].data_ptr(), per_layer(0), per_layer(1), per_layer(2), per_layer(3), per_layer(4),
                           k[1].data_ptr(), k[2].data_ptr(), k[3].data_ptr())

    @property
    def vocab_padded(self) -> int:
        return self.model.vocab_padded

    def kernel(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, logits: np.ndarray,
               slots: np.ndarray | None = None, blocks: np.ndarray | None = None, last_only: bool = False) -> None:
        """The C step on numpy arrays (int64 tokens / positions / slots, int32 block bounds) writing
        `logits` [≥ B, vocab padded to 8] (C-contiguous float32) — with `last_only`, [≥ blocks] for each
        block's last row. No torch op runs here, so a caller holding the GIL gives it up only while
        the kernel computes."""
        m = self.model
        threads = torch.get_num_threads()
        kv = cache.kv
        if kv.dtype != torch.float32 or not kv.is_contiguous():
            raise ValueError("the C decode step needs a contiguous fp32 cache")
        B = len(tokens)
        if slots is None and B > cache.batch:
            raise ValueError(f"{B} rows do not fit a cache of {cache.batch}")
        rows_out = len(blocks) - 1 if last_only and blocks is not None else B
        if (logits.shape[0] < rows_out or logits.shape[1] != m.vocab_padded or len(positions) != B
                or (slots is not None and len(slots) != B)):
            raise ValueError("logits buffer, positions or slots of the wrong shape")
        rc = self.lib.nogil.qiusuo_decode_step(
            ctypes.byref(m), B, self._address(0, tokens, np.int64), self._address(1, positions, np.int64),
            None if slots is None else self._address(2, slots, np.int64), kv.data_ptr(), cache.batch, cache.max_len,
            self._address(3, logits, np.float32), None if blocks is None else self._address(4, blocks, np.int32),
            0 if blocks is None else len(blocks) - 1, threads, self._team(B, blocks, threads), int(last_only))
        if rc:
            why = {1: "unsupported shape (or last_only without blocks)", 2: "a position outside the cache",
                   3: "a token id outside the vocabulary", 4: "a cache row outside the cache", 5: "out of memory",
                   6: "block bounds that are not increasing within the rows"}
            if rc == 5:
                raise MemoryError("C decode step: out of memory for its work buffers")
            raise ValueError(f"C decode step rejected its input: {why.get(rc, rc)}")

    def _address(self, arg: int, a: np.ndarray, dtype) -> int:
        """The data address of `a`, the step's array argument number `arg`, after checking its type
        and layout. `ndarray.ctypes` costs ~2 µs a call, a large share of a small step's Python: the
        address of the array last passed as each argument is kept (under a weak reference, so nothing
        is held alive), and a decode batch passes the same arrays step after step."""
        ref, address = self._addresses[arg]
        if ref() is a:
            return address
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"the C decode step needs C-contiguous {np.dtype(dtype)} arrays")
        address = a.ctypes.data
        self._addresses[arg] = (weakref.ref(a), address)
        return address

    def _team(self, rows: int, blocks: np.ndarray | None, threads: int) -> bool:
        """Whether a kernel call runs in team mode (decode.c): every thread on every row, the weights
        read once per step, rather than each thread's block of rows reading them all. Team mode when
        the weights do not fit in the caches, and for a prefill of fewer prompts than threads (one
        long prompt would otherwise run on one thread); `self.team` = True / False forces it."""
        if self.team is not None:
            return self.team
        if threads < 2:
            return False
        if self.weight_bytes > TEAM_WEIGHT_BYTES:
            return True
        return blocks is not None and len(blocks) - 1 < threads and rows >= TEAM_PREFILL_ROWS

    def prefill(self, prompts: list[list[int]], slots: list[int], cache: KVCache) -> np.ndarray:
        """Run each prompt into cache row `slots[i]` from position 0; return the next-token logits after
        each prompt, numpy [P, vocab padded to 8]. Each prompt is one block, its tokens in order, so
        token t attends to the keys its predecessors wrote in the same layer; prompts run in parallel."""
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("prefill needs at least one prompt, each of at least one token")
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        tokens = np.fromiter((t for p in prompts for t in p), dtype=np.int64, count=int(lengths.sum()))
        bounds = np.zeros(len(prompts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=bounds[1:])
        positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(bounds[:-1].astype(np.int64), lengths)
        rows = np.repeat(np.asarray(slots, dtype=np.int64), lengths)
        logits = np.empty((len(prompts), self.vocab_padded), dtype=np.float32)
        self.kernel(tokens, positions, cache, logits, rows, bounds, last_only=True)
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`DecodeWeights.step` on tensors: tokens [B] at positions [B] → logits [B, V] (a copy)."""
        tokens = tokens.to(torch.int64).contiguous().numpy()
        positions = positions.to(torch.int64).contiguous().numpy()
        logits = np.empty((len(tokens), self.vocab_padded), dtype=np.float32)
        self.kernel(tokens, positions, cache, logits)
        return torch.from_numpy(logits)[:, :self.vocab]
