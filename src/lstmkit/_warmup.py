"""Compiling the CPU kernels ahead of their first use: in the foreground (:func:`warmup`, ``python -m
lstmkit.warmup``) or in a background process while ``backend="auto"`` runs the reference math.

The Numba kernels compile on their first call and land in Numba's on-disk cache (``cache=True``):
a new install's first forward and backward would wait tens of seconds. Instead, the first time
``backend="auto"`` picks the numba backend for a dtype whose kernels are not known to be cached
(:func:`ready`), it starts one background process that compiles them (:func:`start_background`),
answers with the reference backend (the same numbers within the documented tolerance) and prints
one line saying so; once that process has written its marker, ``auto`` picks numba, which loads
the kernels from the cache. A process, not a thread: Numba's compiler holds the GIL.

Cache location: ``NUMBA_CACHE_DIR`` where set; ``LSTMKIT_CACHE_DIR`` sets it when ``import lstmkit``
comes before Numba's import; else Numba's default (``__pycache__`` next to the kernel sources when
writable, else a user-wide directory). Numba keys each cache entry by the CPU's name and features
(``codegen.magic_tuple()`` in its index key), so a cache shared between machines never runs code
built for another CPU. The markers (``lstmkit-warm-*.json``, next to the cache) are keyed the same
way, and by lstmkit's and Numba's versions and the kernel sources' stamps.

``LSTMKIT_BACKGROUND_COMPILE=0`` turns the background compile off: ``auto`` then picks numba and
compiles in the foreground on the first call, as an explicit ``backend="numba"`` always does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["warmup", "cache_dir", "ready", "start_background", "background_enabled", "VARIANTS"]

ENV_BACKGROUND = "LSTMKIT_BACKGROUND_COMPILE"
VARIANTS = ("layer_norm", "peephole", "recurrent_dropout", "zoneout")
_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64}
_KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def background_enabled() -> bool:
    """Whether ``backend="auto"`` may compile in a background process (``LSTMKIT_BACKGROUND_COMPILE``,
    default on)."""
    return os.environ.get(ENV_BACKGROUND, "1") != "0"


def cache_dir() -> str:
    """The directory of the kernels' on-disk cache (and of the warm-up markers): ``NUMBA_CACHE_DIR``
    where set, else ``__pycache__`` next to the kernel sources when writable (Numba's own default),
    else ``$XDG_CACHE_HOME/lstmkit`` (``~/.cache/lstmkit``) for the markers, Numba then keeping the
    kernels in its user-wide cache directory."""
    d = os.environ.get("NUMBA_CACHE_DIR")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    if os.access(_KERNELS_DIR, os.W_OK):
        return os.path.join(_KERNELS_DIR, "__pycache__")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lstmkit")


def _dtype(d: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(d, torch.dtype) and d in _DTYPE_NAMES.values():
        return d
    if isinstance(d, str) and d.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[d.replace("torch.", "")]
    raise ValueError(f"dtypes: expected float32 or float64 (names or torch dtypes), got {d!r}")


_KEY: Optional[str] = None


def _key() -> str:
    """What a marker is valid for: lstmkit's and Numba's versions, the CPU's name and features (as
    Numba keys its cache entries), the kernel sources' stamps (an edit makes Numba's entries stale,
    ``kernels/_cache.py``) and the options that change the compiled code."""
    global _KEY
    if _KEY is None:
        from importlib.metadata import PackageNotFoundError, version

        import llvmlite.binding as ll

        from . import __version__

        try:
            nb_version = version("numba")
        except PackageNotFoundError:
            nb_version = "?"
        from .kernels._cache import _STAMPS

        parts = [__version__, nb_version, sys.version, ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten(),
                 os.environ.get("NUMBA_CPU_NAME", ""), os.environ.get("NUMBA_CPU_FEATURES", ""), _STAMPS]
        _KEY = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    return _KEY


def _kind_name(dtype: torch.dtype, kind: str) -> str:
    return f"{kind}-{str(dtype).replace('torch.', '')}"


def marker_path(dtype: torch.dtype, kind: str = "plain") -> str:
    """The file that says the kernels of ``dtype`` and ``kind`` ("plain" or "variants") are cached."""
    return os.path.join(cache_dir(), f"lstmkit-warm-{_kind_name(dtype, kind)}-{_key()}.json")


def _write_marker(dtype: torch.dtype, kind: str, training: bool, seconds: float) -> str:
    path = marker_path(dtype, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".lstmkit-warm-")
    with os.fdopen(fd, "w") as f:
        json.dump({"dtype": str(dtype), "kind": kind, "training": training, "seconds": round(seconds, 2),
                   "time": time.time()}, f)
    os.replace(tmp, path)  # atomic: a reader sees no marker or a whole one
    return path


# --- the background compile ---------------------------------------------------------------------

_ready: set = set()          # (dtype, kind) known cached in this process
_checked: dict = {}          # (dtype, kind) -> time of the last look at the marker
_procs: dict = {}            # (dtype, kind) -> the background process this process started
_gave_up: set = set()        # (dtype, kind) whose background compile failed: compile in the foreground
_RECHECK_S = 0.25            # a cold answer looks at the marker again after this long
os.register_at_fork(after_in_child=_procs.clear)  # a forked child does not own its parent's process


def ready(dtype: torch.dtype, kind: str = "plain") -> bool:
    """Whether the numba backend may serve ``dtype``/``kind`` without compiling in the foreground:
    its kernels are cached (a warm-up's marker), the background compile is off, or it failed (then
    the kernels compile in the foreground, as without this feature). Cheap: one ``stat`` at most
    every 0.25 s while cold, nothing once warm."""
    k = (dtype, kind)
    if k in _ready:
        return True
    if not background_enabled() or k in _gave_up:
        return True
    now = time.monotonic()
    last = _checked.get(k)
    if last is not None and now - last < _RECHECK_S:
        return False
    _checked[k] = now
    proc = _procs.get(k)
    done = proc is not None and proc.poll() is not None
    if os.path.exists(marker_path(dtype, kind)):
        _ready.add(k)
        return True
    if done:  # finished without a marker for this process (failed, or the kernel sources changed meanwhile)
        _gave_up.add(k)
        if proc.returncode != 0:
            sys.stderr.write(f"lstmkit: the background compile of the {_kind_name(dtype, kind)} kernels failed "
                             f"(exit {proc.returncode}; log: {_log_path(dtype, kind)}); compiling on first use\n")
        return True
    return False


def _log_path(dtype: torch.dtype, kind: str) -> str:
    return os.path.join(cache_dir(), f"lstmkit-warm-{_kind_name(dtype, kind)}.log")


def start_background(dtype: torch.dtype, kind: str = "plain") -> bool:
    """Start the background process compiling ``dtype``/``kind`` unless this process already did (at
    most one per process and kind; processes that start one each wait for the first, by a file
    lock, and find its marker). Prints one line on stderr. False where it could not start (the
    caller then compiles in the foreground)."""
    k = (dtype, kind)
    if k in _procs:
        return True
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        log = open(_log_path(dtype, kind), "ab")
    except OSError:
        _gave_up.add(k)
        return False
    env = dict(os.environ, **{ENV_BACKGROUND: "0"})  # the same NUMBA_CACHE_DIR (or none) as this process
    try:
        _procs[k] = subprocess.Popen(
            [sys.executable, "-m", "lstmkit.warmup", "--background", "--dtypes", str(dtype).replace("torch.", ""),
             "--kind", kind],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True, close_fds=True)
    except OSError:
        _gave_up.add(k)
        return False
    finally:
        log.close()
    sys.stderr.write(f"lstmkit: compiling the {_kind_name(dtype, kind)} CPU kernels in the background (cache: "
                     f"{cache_dir()}); running the reference math until they are ready (lstmkit.warmup() "
                     "compiles them ahead)\n")
    return True


def wait(timeout: Optional[float] = None) -> bool:
    """Wait for the background compiles this process started; True when all finished."""
    end = None if timeout is None else time.monotonic() + timeout
    for proc in list(_procs.values()):
        try:
            proc.wait(None if end is None else max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    _checked.clear()
    return True


# --- what "auto" answers for plain calls meanwhile --------------------------------------------------

class _Pending(types.ModuleType):
    """The reference backend as ``auto``'s answer for plain calls while numba's kernels compile
    (``backends._while_compiling``): every attribute is the reference backend's, but for
    :func:`call_runner`, whose functions switch to numba's once the kernels are ready."""

    NAME = "reference"

    def __getattr__(self, name: str):
        from .backends import reference

        return getattr(reference, name)

    @staticmethod
    def call_runner(x_shape: tuple, h_shape: tuple, c_shape: tuple, dtype: torch.dtype, *, num_layers: int,
                    bidirectional: bool, has_biases: bool, proj_size: int, batch_first: bool, grad: bool):
        """numba's ``call_runner`` once its kernels are ready; until then a function that runs the
        reference math through :func:`lstmkit.functional.lstm` and, on its first call after they are
        ready, takes numba's function for these shapes (or, where numba has none, the general path)."""
        from .backends import _load

        numba_be = _load("numba")
        kw = dict(num_layers=num_layers, bidirectional=bidirectional, has_biases=has_biases, proj_size=proj_size,
                  batch_first=batch_first, grad=grad)
        if ready(dtype, "plain"):
            return numba_be.call_runner(x_shape, h_shape, c_shape, dtype, **kw)
        from . import functional

        step = len(x_shape) == 2

        def general(x: Tensor, h0: Tensor, c0: Tensor, weights, backend: str) -> tuple[Tensor, Tensor, Tensor]:
            xt = x.unsqueeze(0) if step else (x.transpose(0, 1) if batch_first else x)
            out, h, c = functional.lstm(xt, h0, c0, weights, num_layers=num_layers, bidirectional=bidirectional,
                                        has_biases=has_biases, proj_size=proj_size, backend=backend)
            return (out[0] if step else (out.transpose(0, 1) if batch_first else out)), h, c

        fast = None

        def run(x: Tensor, h0: Tensor, c0: Tensor, weights) -> tuple[Tensor, Tensor, Tensor]:
            nonlocal fast
            if fast is None:
                if not ready(dtype, "plain"):
                    return general(x, h0, c0, weights, "reference")
                fast = numba_be.call_runner(x_shape, h_shape, c_shape, dtype, **kw)
                if fast is None:
                    def fast(x, h0, c0, weights):
                        return general(x, h0, c0, weights, "numba")
            return fast(x, h0, c0, weights)

        return run


PENDING = _Pending("lstmkit.backends.reference (while the numba kernels compile)")


# --- the workloads ------------------------------------------------------------------------------

def _plain_calls(dtype: torch.dtype, training: bool) -> None:
    """Calls that take the numba backend's plain paths: the forward stack, the step API (one thread
    and torch's team), the cell, packed and bidirectional inputs, projections, and with ``training``
    their backward (the fused stack node and the per-layer one)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from ._modules import LSTM, LSTMCell

    shapes = [  # (I, H, layers, T, B, bidirectional, proj)
        (3, 5, 2, 10, 4, False, 0),
        (32, 128, 2, 50, 16, False, 0),
        (64, 256, 1, 20, 64, False, 0),
        (16, 32, 2, 8, 4, True, 0),
        (16, 32, 1, 8, 4, False, 8),
    ]
    for I, H, L, T, B, bi, proj in shapes:
        m = LSTM(I, H, L, bidirectional=bi, proj_size=proj, dtype=dtype, backend="numba")
        x = torch.randn(T, B, I, dtype=dtype)
        with torch.no_grad():
            m(x)
            m(pack_padded_sequence(x, torch.tensor([max(1, T - i) for i in range(B)])))
        if training:
            y, (h, c) = m(x.requires_grad_())
            (y.sum() + h.sum() + c.sum()).backward()
    for H, B in ((128, 1), (32, 4)):
        m = LSTM(H, H, 2, dtype=dtype, backend="numba")
        state = None
        with torch.no_grad():
            for _ in range(30):  # back to back: the threaded step's "hot" path
                _, state = m.step(torch.randn(B, H, dtype=dtype), state)
    cell = LSTMCell(8, 16, dtype=dtype, backend="numba")
    x = torch.randn(4, 8, dtype=dtype)
    with torch.no_grad():
        cell(x)
    if training:
        h, c = cell(x.requires_grad_())
        (h.sum() + c.sum()).backward()


def _variant_calls(dtype: torch.dtype, training: bool, variants: Sequence[str]) -> None:
    from ._modules import LSTM, LSTMCell

    opts = {"layer_norm": {"layer_norm": True}, "peephole": {"peephole": True},
            "recurrent_dropout": {"recurrent_dropout": 0.25}, "zoneout": {"zoneout": 0.1}}
    combos = [dict(opts[v]) for v in variants]
    if len(variants) > 1:
        combos.append({k: v for name in variants for k, v in opts[name].items()})
    for kw in combos:
        for L, T, B, H in ((2, 10, 4, 16), (1, 20, 32, 128)):
            m = LSTM(H // 2, H, L, dtype=dtype, backend="numba", **kw)
            x = torch.randn(T, B, H // 2, dtype=dtype)
            m.eval()
            with torch.no_grad():
                m(x)
            if training:
                m.train()
                y, _ = m(x.requires_grad_())
                y.sum().backward()
        cell = LSTMCell(8, 16, dtype=dtype, backend="numba", **kw)
        x = torch.randn(4, 8, dtype=dtype)
        cell.eval()
        with torch.no_grad():
            cell(x)
        if training:
            cell.train()
            h, c = cell(x.requires_grad_())
            (h.sum() + c.sum()).backward()


def warmup(dtypes: Iterable[Union[str, torch.dtype]] = ("float32",), training: bool = True,
           variants: Iterable[str] = (), threads: Optional[Sequence[int]] = None, verbose: bool = False) -> dict:
    """Compile the numba backend's CPU kernels for what is named into the on-disk cache (see
    :func:`cache_dir`), so that later processes load them instead of compiling on first use: for
    Docker images and CI caches, or before a latency-sensitive service takes traffic.

    Args:
        dtypes: ``"float32"`` and/or ``"float64"`` (or torch dtypes).
        training: also compile the backward kernels (training); without it, the first backward of a
            process compiles them.
        variants: any of ``"layer_norm"``, ``"peephole"``, ``"recurrent_dropout"``, ``"zoneout"``:
            also compile the variants' kernels (each alone and all named together).
        threads: the thread counts to run the calls under (the threaded paths differ from the
            one-thread ones); default 1 and ``torch.get_num_threads()``.
        verbose: print one line per finished part.

    Returns:
        ``{"cache_dir": ..., "seconds": {"plain-float32": s, ...}}``. Writes one marker per part, by
        which ``backend="auto"`` knows it need not compile in the background.

    Example::

        >>> lstmkit.warmup(dtypes=["float32"], training=True, variants=["layer_norm"])  # doctest: +SKIP
    """
    dts = [_dtype(d) for d in ([dtypes] if isinstance(dtypes, (str, torch.dtype)) else list(dtypes))]
    if not dts:
        raise ValueError("dtypes: expected at least one of float32, float64, got none")
    if not isinstance(training, bool):
        raise TypeError(f"training should be of type bool, got: {type(training).__name__}")
    vs = [variants] if isinstance(variants, str) else list(variants)
    for v in vs:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected names among {list(VARIANTS)}, got {v!r}")
    n0 = torch.get_num_threads()
    if threads is None:
        threads = sorted({1, n0})
    threads = list(threads)
    for n in threads:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"threads: expected positive ints, got {n!r}")
    from . import backends

    backends.resolve("numba", torch.device("cpu"), torch.float32)  # numba installed, else a clear error
    seconds = {}
    for dt in dts:
        for kind in ("plain", "variants") if vs else ("plain",):
            seconds[_kind_name(dt, kind)] = _warm_part(dt, kind, training, vs, threads, verbose)
    return {"cache_dir": cache_dir(), "seconds": seconds}


def _warm_part(dt: torch.dtype, kind: str, training: bool, vs: Sequence[str], threads: Sequence[int],
               verbose: bool) -> float:
    """Run one part's calls under each thread count and write its marker; the seconds it took."""
    n0 = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
            for n in threads:
                torch.set_num_threads(n)
                torch.manual_seed(0)
                if kind == "plain":
                    _plain_calls(dt, training)
                else:
                    _variant_calls(dt, training, vs)
    finally:
        torch.set_num_threads(n0)
    s = time.perf_counter() - t0
    _write_marker(dt, kind, training, s)
    _checked.pop((dt, kind), None)
    if verbose:
        print(f"lstmkit warmup: {_kind_name(dt, kind)} kernels ready in {s:.1f} s", flush=True)
    return s


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m lstmkit.warmup") -> int:
    """``lstmkit warmup`` / ``python -m lstmkit.warmup``: :func:`warmup` from the command line."""
    import argparse

    p = argparse.ArgumentParser(prog=prog,
                                description="Compile lstmkit's CPU kernels into the on-disk cache "
                                            f"(now: {cache_dir()}; set NUMBA_CACHE_DIR or LSTMKIT_CACHE_DIR).")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(_DTYPE_NAMES))
    p.add_argument("--no-training", action="store_true", help="skip the backward kernels")
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS)
    p.add_argument("--kind", choices=("plain", "variants"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.background:
        return _background(a.dtypes, a.kind or "plain")
    r = warmup(dtypes=a.dtypes, training=not a.no_training, variants=a.variants, verbose=True)
    print(f"lstmkit warmup: cache {r['cache_dir']}")
    return 0


def _background(dtypes: Sequence[str], kind: str) -> int:
    """The background process: low priority, so that the calls running meanwhile keep the cores;
    one compile of a part at a time (a file lock per part: a process that finds one running waits
    for it, then finds its marker). The variants' part compiles the plain part first (their calls
    share kernels)."""
    import fcntl

    try:
        os.nice(10)
    except OSError:
        pass
    dt = _dtype(dtypes[0])
    os.makedirs(cache_dir(), exist_ok=True)
    threads = sorted({1, torch.get_num_threads()})
    for part in ("plain", "variants") if kind == "variants" else ("plain",):
        with open(os.path.join(cache_dir(), f"lstmkit-warm-{_kind_name(dt, part)}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(marker_path(dt, part)):
                continue
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} compiling {_kind_name(dt, part)} into {cache_dir()}",
                  flush=True)
            _warm_part(dt, part, True, VARIANTS, threads, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
