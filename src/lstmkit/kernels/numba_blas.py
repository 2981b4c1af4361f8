"""The float32 GEMM the Numba kernels call: MKL's ``cblas_sgemm_compute`` from torch's own library.

torch's x86 CPU builds link MKL and export its packed-GEMM entry points. Calling them from the
kernels (through an address passed in as an argument, so the compiled kernels stay cacheable)
gives three things SciPy's OpenBLAS does not: the recurrent weights packed once per sequence
instead of once per step (a 16x128 @ 128x512 step: ~11 us packed against ~40 us), the same
OpenMP thread pool and thread count as torch (no oversubscription), and AVX-512 kernels.

Where the symbols are missing (other torch builds), ``SGEMM`` is 0, never called, and the kernels
use ``np.dot`` (SciPy's BLAS) instead; ``HAVE_MKL`` tells which.

Dimension legend: n rows of the left operand, K inner dimension, N columns of the result.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import WIDE_VECTORS, tie_module

ROW_MAJOR = 101
NO_TRANS = 111
TRANS = 112
PACKED = 151
B_MATRIX = 162

_I = ctypes.c_int
_P = ctypes.c_void_p
# cblas_sgemm_compute(layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc)
_COMPUTE_ARGS = [_I, _I, _I, _I, _I, _I, _P, _I, _P, _I, ctypes.c_float, _P, _I]
# cblas_sgemm_pack(layout, identifier, trans, m, n, k, alpha, src, ld, dest)
_PACK_ARGS = [_I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I, _P]


def _load():
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        compute = lib.cblas_sgemm_compute
        pack = lib.cblas_sgemm_pack
        size = lib.cblas_sgemm_pack_get_size
        local = lib.MKL_Set_Num_Threads_Local  # the C binding (the lowercase one takes int*)
    except (OSError, AttributeError):
        return None
    compute.restype = None
    compute.argtypes = _COMPUTE_ARGS
    pack.restype = None
    pack.argtypes = _PACK_ARGS
    size.restype = ctypes.c_size_t
    size.argtypes = [_I, _I, _I, _I]
    local.restype = _I
    local.argtypes = [_I]
    return compute, pack, size, local


_SYMS = _load()
HAVE_MKL = _SYMS is not None



# C functions reach the kernels as addresses (int64 arguments, called through :func:`call_sgemm`,
# :func:`call_int_int`, ...): a ctypes function object among a kernel's arguments costs ~1 us a
# call to convert, and a second one defeats Numba's argument-type cache (~80 us a call).
def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


# cblas_sgemm_compute's address; 0 without MKL (never called: HAVE_MKL is False)
SGEMM = _address(_SYMS[0]) if HAVE_MKL else 0


_libc = ctypes.CDLL(None)
# sched_yield(): give the core to another runnable thread
SCHED_YIELD = _address(_libc.sched_yield)
# MKL_Set_Num_Threads_Local(n): MKL's thread count for calls from this thread (kernels switch between
# one thread for per-step products and all for sequence-wide ones); 0 without MKL (never called)
SET_THREADS = _address(_SYMS[3]) if HAVE_MKL else 0


@intrinsic
def wide_vectors(typingctx):
    """Called first in a kernel: its loops may vectorize with 512-bit registers where the CPU has
    them. LLVM's tuning for AVX-512 Intel CPUs prefers 256-bit vectors unless a function says
    otherwise (``"prefer-vector-width"="512"``), which Numba has no option for: this sets that
    function attribute on the function being compiled. Measured on the elementwise step (one thread,
    us a step, 256 -> 512 bits): B=64 H=32 4.4 -> 3.7, B=16 H=128 4.6 -> 3.1, B=64 H=64 8.1 -> 6.1
    (the same results to 1-2 float32 ulps). CPUs without AVX-512 keep their widest vectors.
    Not in the kernels of dot products and row updates on buffers that are not cache-line aligned,
    where a 512-bit access splits across two lines: ``numba_lstm.mm``, ``stack_fwd_short``,
    ``stack_step_ptr`` and ``cell_step``, ``numba_parallel.layer_fwd_units``, ``numba_step``'s team
    part (marked, T=1000 B=1 H=128 on two threads measured 15-20% slower and streaming steps 5-8%
    slower; unmarked, even). ``LSTMKIT_WIDE_VECTORS=0`` (read at import) leaves LLVM's choice
    everywhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if not WIDE_VECTORS:
            return context.get_dummy_value()
        try:  # llvmlite checks attribute names against LLVM's enum ones: a string attribute goes in as is
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except (AttributeError, TypeError):  # another llvmlite: the default width
            pass
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def call_sgemm(typingctx, addr, layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """cblas_sgemm_compute (``SGEMM``) at address ``addr``: a, b and c are addresses
    (``array.ctypes.data``), beta a float32, the rest ints."""
    i32 = types.int32
    sig = types.void(types.intp, i32, i32, i32, i32, i32, i32, types.uintp, i32, types.uintp, i32, types.float32,
                     types.uintp, i32)  # the arguments are cast to these

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)] * 6 + [ptr, ir.IntType(32), ptr, ir.IntType(32),
                                                                        ir.FloatType(), ptr, ir.IntType(32)])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(fn, [builder.inttoptr(v, ptr) if t == ptr else v for v, t in zip(args[1:], fnty.args)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def unowned(typingctx, a):
    """The same view of array ``a``'s memory without its reference to the memory's owner (a NULL
    meminfo): views taken of it then skip Numba's atomic reference counting, which in per-step
    loops of small steps costs more than the arithmetic (T=10 B=5 H=5, one layer's backward: 12.7
    -> 8.9 us). Only for arrays that outlive the kernel's use of the view: its arguments."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, value=args[0])
        dst = context.make_array(a)(context, builder)
        for name in ("data", "shape", "strides", "itemsize", "nitems"):
            setattr(dst, name, getattr(src, name))
        dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
        dst.parent = cgutils.get_null_value(dst.parent.type)
        return dst._getvalue()

    return a(a), codegen


@intrinsic
def keep(typingctx, *arrays):
    """Nothing, where it stands: the arrays given stay alive until here (Numba frees a local array
    after its last use), for :func:`unowned` views of a kernel's own buffers."""
    return types.void(types.StarArgTuple(arrays)), lambda context, builder, signature, args: context.get_dummy_value()


@intrinsic
def call_int_int(typingctx, addr, arg):
    """The C function ``int f(int)`` at address ``addr`` called with ``arg``."""
    sig = types.int32(types.int64, arg)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [builder.trunc(args[1], ir.IntType(32))
                                 if args[1].type.width > 32 else args[1]])

    return sig, codegen


@intrinsic
def call_int_void(typingctx, addr):
    """The C function ``int f(void)`` at address ``addr`` called."""
    sig = types.int32(types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [])

    return sig, codegen

# MKL's packed buffers are at least ~8 MB whatever the matrix; below this many elements packing
# saves nothing worth that (a 512x128 matrix: ~10 us a step saved, 20 MB touched)
PACK_MIN_SIZE = 16 * 1024
# products with at most this many rows on weights up to this size: loops over a transposed copy
# beat a BLAS call (a 1x128 @ 128x512 product: ~1 us against ~2.5 us)
WT_MAX_ROWS = 2
WT_MAX_SIZE = 256 * 1024


# Per-step products below this many multiply-adds run on the calling thread: splitting a ~10 us
# product over OpenMP threads saves a few microseconds on an idle machine but adds a barrier per
# step, and on a busy one each barrier waits for a descheduled thread (milliseconds a step).
SERIAL_MACS = 4 * 1024 * 1024
# ... unless the weights exceed a core's L2 cache: then the product is memory-bound and long enough
# (a 2048x512 float32 matrix-vector product: ~200 us) that both cores' bandwidth pays
SERIAL_WEIGHTS = 512 * 1024


def run_serial(rows: int, n: int, k: int) -> bool:
    """Whether a (rows, k) @ (k, n) product per step should run on the calling thread alone."""
    return rows * n * k < SERIAL_MACS and n * k < SERIAL_WEIGHTS


class serial_blas:
    """Context manager: MKL calls from this thread run on it alone
    when ``serial``; otherwise, and without MKL, nothing changes (``MKL_Set_Num_Threads_Local``)."""

    __slots__ = ("serial", "prev")

    def __init__(self, serial: bool):
        self.serial = serial and HAVE_MKL

    def __enter__(self):
        if self.serial:
            self.prev = _SYMS[3](1)
        return self

    def __exit__(self, *exc):
        if self.serial:
            _SYMS[3](self.prev)
        return False


class PackScratch:
    """Buffers for MKL's packed form, reused across calls (``with PackScratch() as s: s.pack(..)``).

    MKL asks for ~9 MB per packed matrix whatever its size; a fresh buffer each call costs page
    faults on all of it (~3.7 ms against ~0.15 ms for the packing itself). Buffers taken inside
    the ``with`` block go back to a small free list at its end: use the packed arrays only
    inside it."""

    _free: dict = {}
    KEEP = 8  # free buffers kept per size

    __slots__ = ("taken",)

    def __init__(self):
        self.taken: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for buf in self.taken:
            free = PackScratch._free.setdefault(buf.shape[0], [])
            if len(free) < PackScratch.KEEP:
                free.append(buf)
        self.taken = []
        return False

    def buffer(self, length: int) -> np.ndarray:
        free = PackScratch._free.get(length)
        try:
            buf = free.pop() if free else None
        except IndexError:  # emptied by another thread in between
            buf = None
        if buf is None:
            buf = aligned_empty(length, np.float32)
        self.taken.append(buf)
        return buf

    def pack(self, w: np.ndarray, n: int, transpose: bool) -> np.ndarray:
        return pack_b(w, n, transpose, self)


# the start of the arrays the per-step loops stream through: a cache line, so that no vector load
# straddles two (NumPy aligns to 16 bytes)
ALIGN = 64


def aligned_empty(length: int, dtype) -> np.ndarray:
    """An uninitialized (length,) array whose data starts on an ALIGN-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(length + ALIGN // itemsize, dtype)
    skip = (-raw.ctypes.data % ALIGN) // itemsize
    return raw[skip:skip + length]


def pack_b(w: np.ndarray, n: int, transpose: bool, scratch: PackScratch | None = None) -> np.ndarray:
    """``w`` prepared as the right operand of ``(n, K) @ op(w)``, for ``numba_lstm.mm``.

    w          (N, K) when transpose (the product is a @ w.T), (K, N) otherwise; C-contiguous
    n          rows of the left operand (MKL tunes the packing for it); 0: prepare nothing
    scratch    where MKL's packed buffer comes from (:class:`PackScratch`), or None: a new one
    returns    (K*N + 1,): w.T as a C-contiguous (K, N) copy plus one unused element (the length
               tells it apart), for transposed products that hand-written loops do better: small
               ones (``w.size < PACK_MIN_SIZE``), or few rows (n <= WT_MAX_ROWS) on weights up
               to WT_MAX_SIZE; any dtype;
               (S,) float32, S != K*N + 1: MKL's opaque packed form (float32, MKL present, n > 1);
               (0,) otherwise
    """
    if n == 0:
        return np.zeros(0, w.dtype)
    if transpose and (w.size < PACK_MIN_SIZE or (n <= WT_MAX_ROWS and w.size <= WT_MAX_SIZE)):
        wt = aligned_empty(w.size + 1, w.dtype)
        wt[:-1] = w.T.reshape(-1)
        wt[-1] = 0
        return wt
    if not HAVE_MKL or w.dtype != np.float32 or n == 1:  # one row: a matrix-vector product,
        return np.zeros(0, w.dtype)                      # memory-bound; packing gains nothing
    if transpose:
        N, K = w.shape
    else:
        K, N = w.shape
    _, pack, size, _ = _SYMS
    nbytes = size(B_MATRIX, n, N, K)
    length = nbytes // 4 + 16
    if length == K * N + 1:
        length += 1
    buf = aligned_empty(length, np.float32) if scratch is None else scratch.buffer(length)
    pack(ROW_MAJOR, B_MATRIX, TRANS if transpose else NO_TRANS, n, N, K, 1.0,
         w.ctypes.data, w.shape[1], buf.ctypes.data)
    return buf


@njit(cache=True, error_model="numpy")
def _same_bits(a, b):  # a, b: (n,) unsigned-integer views of two arrays
    d = 0  # a branch-free count vectorizes (~6 us per 256 KB); an early exit per element does not
    for i in range(a.shape[0]):
        d += a[i] != b[i]
    return d == 0


def same_contents(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the C-contiguous arrays a and b hold the same bits (NaNs included)."""
    u = np.uint32 if a.dtype.itemsize == 4 else np.uint64
    return a.shape == b.shape and _same_bits(a.reshape(-1).view(u), b.reshape(-1).view(u))


# the on-disk cache follows edits of the kernel files compiled into these kernels (``_cache``)
tie_module(globals())
