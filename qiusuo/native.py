"""The C decode step (`csrc/decode.c`): built with the system C compiler on first use, cached, loaded
with ctypes. Not a build dependency: when no compiler is found (or `QIUSUO_NATIVE=0`), `kernel()`
returns None and the engine runs the PyTorch step instead, which computes the same logits.

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
from pathlib import Path

import numpy as np

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
