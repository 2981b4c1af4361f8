"""One step of a unidirectional stacked LSTM split over torch's OpenMP team (``LSTM.step``).

A streaming step of B=1 at H=128 multiplies 1 MB of weights with two vectors: reading them from
one core's cache is the whole cost (~13 us). Each thread of the team takes a share of the hidden
units of every layer: the weight rows of its units' four gates (a quarter of each gate's rows per
thread at two threads), their cell updates and outputs; the threads meet once per layer (the next
layer needs all of h) and, with a projection, once more before it (it needs all units).

The team is entered without Python: :func:`stack_step_team` (compiled) calls libgomp's
``GOMP_parallel`` with the address of a compiled callback (``numba.cfunc``) and
of an int64 argument block; each thread reads its number and the team size from libgomp and runs
:func:`_step_part`. A Python callback would take the GIL on every thread (~60 us a call, measured).

Each dtype's callback is compiled (or loaded from Numba's cache) on its first use.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from ._cache import tie, tie_module
from .numba_blas import call_int_void
from .numba_lstm import _JIT, _dot_rows, act_sigmoid, act_tanh, address_as
from .numba_parallel import atomic_load, atomic_store, backoff

# the argument block: addresses and sizes, int64
(A_TNUM, A_TSIZE, A_YIELD, A_X, A_H0, A_C0, A_W, A_L, A_B, A_I, A_H, A_P, A_BIAS, A_PROJ, A_Y, A_HN, A_CN, A_HP,
 A_FLAGS) = range(19)
N_ARGS = 19

_LIKE32 = np.zeros(0, np.float32)
_LIKE64 = np.zeros(0, np.float64)
_INT64 = np.zeros(0, np.int64)


@intrinsic
def call_gomp_parallel(typingctx, addr, fn, data, nthreads):
    """``GOMP_parallel(fn, data, nthreads, 0)`` of the libgomp function at ``addr``: fn(data) on each
    thread of a team of (at most) nthreads, this thread included; returns when all are done."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        cb_ty = ir.FunctionType(ir.VoidType(), [i8p]).as_pointer()
        fn_ty = ir.FunctionType(ir.VoidType(), [cb_ty, i8p, i32, i32]).as_pointer()
        gomp = builder.inttoptr(args[0], fn_ty)
        builder.call(gomp, [builder.inttoptr(args[1], cb_ty), builder.inttoptr(args[2], i8p),
                            builder.trunc(args[3], i32), ir.Constant(i32, 0)])
        return context.get_dummy_value()

    return sig, codegen


# the team block: addresses of GOMP_parallel, omp_get_thread_num, omp_get_num_threads, sched_yield
# and of the callback for the dtype of the arrays (:func:`team_block`)
T_GOMP, T_TNUM, T_TSIZE, T_YIELD, T_CB = range(5)


@njit(**_JIT)
def stack_step_team(team, nthreads, x, h0, c0, wptr, num_layers, B, I, H, P, has_bias, has_proj, y, h_n, c_n):
    """What ``numba_lstm.stack_step_ptr`` computes, on a team of nthreads of torch's OpenMP threads.

    team (5,) int64     :func:`team_block` for the dtype of y
    x, h0, c0, wptr     as ``stack_step_ptr``: addresses of (B, I), (L, B, P), (L, B, H) and the weights
    y (B, P) or (1, B, P) or (B, 1, P), h_n (L, B, P), c_n (L, B, H)   written
    """
    args = np.empty(N_ARGS, np.int64)
    flags = np.zeros(nthreads, np.int64)  # each thread's meetings passed
    hp = np.empty((B, H), y.dtype)        # h before the projection (shared by the threads)
    args[A_TNUM] = team[T_TNUM]
    args[A_TSIZE] = team[T_TSIZE]
    args[A_YIELD] = team[T_YIELD]
    args[A_X] = x
    args[A_H0] = h0
    args[A_C0] = c0
    args[A_W] = wptr.ctypes.data
    args[A_L] = num_layers
    args[A_B] = B
    args[A_I] = I
    args[A_H] = H
    args[A_P] = P
    args[A_BIAS] = has_bias
    args[A_PROJ] = has_proj
    args[A_Y] = y.ctypes.data
    args[A_HN] = h_n.ctypes.data
    args[A_CN] = c_n.ctypes.data
    args[A_HP] = hp.ctypes.data
    args[A_FLAGS] = flags.ctypes.data
    call_gomp_parallel(team[T_GOMP], team[T_CB], args.ctypes.data, nthreads)
    # the threads reached these buffers through their addresses: keep them alive until here
    args[0] = flags[0]
    hp[0, 0] = hp[0, 0]


@njit(inline="always")
def _meet(flags, part, nparts, stage, sched_yield):
    """Publish that this thread reached ``stage``; wait until every thread has."""
    atomic_store(flags, part, stage)
    spins = 0
    for q in range(nparts):
        while atomic_load(flags, q) < stage:
            spins = backoff(sched_yield, spins)


@njit(**_JIT)
def _step_part(args, like):
    """One thread's share of the step: hidden units u0 .. u1 of every layer (and, with a
    projection, output features p0 .. p1)."""
    part = call_int_void(args[A_TNUM])
    nparts = call_int_void(args[A_TSIZE])
    sched_yield = args[A_YIELD]
    L = args[A_L]
    B = args[A_B]
    I = args[A_I]
    H = args[A_H]
    P = args[A_P]
    has_bias = args[A_BIAS] != 0
    has_proj = args[A_PROJ] != 0
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    x = carray(address_as(args[A_X], like), (B, I))
    h0 = carray(address_as(args[A_H0], like), (L, B, P))
    c0 = carray(address_as(args[A_C0], like), (L, B, H))
    y = carray(address_as(args[A_Y], like), (B, P))
    h_n = carray(address_as(args[A_HN], like), (L, B, P))
    c_n = carray(address_as(args[A_CN], like), (L, B, H))
    hp = carray(address_as(args[A_HP], like), (B, H))
    wptr = carray(address_as(args[A_W], _INT64), (L * per,))
    flags = carray(address_as(args[A_FLAGS], _INT64), (nparts,))
    u0 = (part * H) // nparts
    u1 = ((part + 1) * H) // nparts
    p0 = (part * P) // nparts
    p1 = ((part + 1) * P) // nparts
    hk = u1 - u0
    pk = p1 - p0
    sz = like.itemsize
    z = np.empty((4, B, hk), like.dtype)   # this thread's units of each gate, rows contiguous
    zh = np.empty((4, B, hk), like.dtype)
    hr = np.empty((B, pk), like.dtype)
    stage = 0
    for layer in range(L):
        k = layer * per
        K = I if layer == 0 else P
        inp = x if layer == 0 else h_n[layer - 1]
        for g in range(4):
            row = g * H + u0  # the weight rows of this thread's units of gate g
            _dot_rows(inp, carray(address_as(wptr[k] + row * K * sz, like), (hk, K)), z[g])
            _dot_rows(h0[layer], carray(address_as(wptr[k + 1] + row * P * sz, like), (hk, P)), zh[g])
        if has_bias:
            for g in range(4):
                b_ih = carray(address_as(wptr[k + 2] + (g * H + u0) * sz, like), (hk,))
                b_hh = carray(address_as(wptr[k + 3] + (g * H + u0) * sz, like), (hk,))
                for b in range(B):
                    zr = z[g, b]
                    zhr = zh[g, b]
                    for j in range(hk):
                        zr[j] += zhr[j] + (b_ih[j] + b_hh[j])
        else:
            for g in range(4):
                for b in range(B):
                    zr = z[g, b]
                    zhr = zh[g, b]
                    for j in range(hk):
                        zr[j] += zhr[j]
        for b in range(B):
            zi = z[0, b]
            zf = z[1, b]
            zg = z[2, b]
            zo = z[3, b]
            cp = c0[layer, b, u0:u1]
            cn = c_n[layer, b, u0:u1]
            hv = hp[b, u0:u1] if has_proj else h_n[layer, b, u0:u1]
            for j in range(hk):
                cv = act_sigmoid(zf[j]) * cp[j] + act_sigmoid(zi[j]) * act_tanh(zg[j])
                cn[j] = cv
                hv[j] = act_sigmoid(zo[j]) * act_tanh(cv)
            if layer == L - 1 and not has_proj:
                y[b, u0:u1] = hv
        if has_proj:
            stage += 1
            _meet(flags, part, nparts, stage, sched_yield)  # every unit of hp written
            _dot_rows(hp, carray(address_as(wptr[k + per - 1] + p0 * H * sz, like), (pk, H)), hr)
            for b in range(B):
                h_n[layer, b, p0:p1] = hr[b]
                if layer == L - 1:
                    y[b, p0:p1] = hr[b]
        if layer < L - 1:
            stage += 1
            _meet(flags, part, nparts, stage, sched_yield)  # the next layer reads all of h (and hp again)


def _callback32(data):
    _step_part(carray(data, (N_ARGS,), np.int64), _LIKE32)


def _callback64(data):
    _step_part(carray(data, (N_ARGS,), np.int64), _LIKE64)


_CALLBACKS = {np.float32: _callback32, np.float64: _callback64}


def _cached_cfunc(fn):
    """``numba.cfunc(void(voidptr), cache=True)(fn)``, its cache tied to the kernel sources
    (``_cache``: the callback has ``_step_part`` and ``numba_lstm``'s loops compiled into it)."""
    try:
        from numba.core import sigutils
        from numba.core.ccallback import CFunc

        sig = sigutils.normalize_signature(types.void(types.voidptr))
        cb = CFunc(fn, sig, locals={}, options=dict(nopython=True))
        cb.enable_caching()
    except (ImportError, AttributeError, TypeError):  # another Numba's internals: the plain decorator
        return cfunc(types.void(types.voidptr), cache=True, nopython=True)(fn)
    tie(cb)
    cb.compile()
    return cb
_compiled: dict = {}


def team_block(gomp: int, tnum: int, tsize: int, sched_yield: int, dtype) -> np.ndarray:
    """The ``team`` argument of :func:`stack_step_team` for arrays of ``dtype`` (np.float32 or
    np.float64) from the libgomp and libc addresses; compiles (or loads) that dtype's callback."""
    cb = _compiled.get(dtype)
    if cb is None:
        cb = _compiled[dtype] = _cached_cfunc(_CALLBACKS[dtype])
    return np.array([gomp, tnum, tsize, sched_yield, cb.address], np.int64)


# the on-disk cache follows edits of the kernel files compiled into these kernels (``_cache``)
tie_module(globals())
