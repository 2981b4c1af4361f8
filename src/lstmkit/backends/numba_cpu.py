"""The Numba backend: fused CPU kernels for one layer-direction, forward and backward.

Forward is one compiled call per layer-direction over all steps (``kernels.numba_lstm.layer_fwd``),
saving the gate activations and the cell states. Backward is one compiled call producing the
gradient of every step's pre-activations (which is the gradient of ``xg``) and of the initial
state; the weight gradients are then one large GEMM each over all T*B rows.

The differentiable op exists twice with identical results: as torch custom operators
(``torch.ops.lstmkit.numba_layer_fwd`` / ``numba_layer_bwd``, with fake and autograd
registrations) which ``torch.compile`` traces, and as a ``torch.autograd.Function`` calling the
same kernels, used in eager mode because custom-op dispatch costs tens of microseconds per call.

Non-plain ``LayerOptions`` (the LSTM variants) are handed to ``_numba_variants``.

Inference hooks called by ``lstmkit.functional`` when no gradient is needed: :func:`lstm_stack`
(a whole stacked LSTM in one compiled call) and :func:`lstm_cell_step`.

Dimension legend: T steps, B batch rows, I input features, H hidden size, G = 4H,
P = proj_size or H, L layers, D directions.
"""

from __future__ import annotations

import ctypes
import math
import operator
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..kernels import numba_lstm as K
from ..kernels import numba_parallel as KP
from ..kernels import numba_stack as S
from ..kernels.numba_blas import (
    HAVE_MKL,
    PACK_MIN_SIZE,
    SCHED_YIELD,
    SET_THREADS,
    SGEMM,
    WT_MAX_ROWS,
    PackScratch,
    pack_b,
    run_serial,
    same_contents,
    serial_blas,
)
from ..kernels.numba_lstm import DOT_MAX_SIZE, SMALL_FLOPS_MKL
from . import reference
from ._contract import LayerOptions
from ._twice import differentiable

NAME = "numba"
AUTO_DEVICE_TYPES = ("cpu",)

_DTYPES = (torch.float32, torch.float64)
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


# float64 runs the exact exp / tanh, scalar libm calls (~17 ns an element; float32's approximations
# vectorize): from this many rows x hidden units a step's elementwise work outweighs what the fused
# kernels save, and torch's vectorized ops (the reference backend) win. Measured, 2 threads, ms,
# torch.nn.LSTM / numba / reference: training T=10 B=5 H=5 L=2 2.98 / 0.39 / 3.37; T=100 B=16 H=128
# L=2 85 / 100 / 94; T=50 B=64 H=256 113 / 300 / 116; an LSTMCell step of B=97 H=51 0.85 / 1.90 / 0.89.
F64_MAX_UNITS = 512


def declines(dtype: torch.dtype, units: int) -> bool:
    """``auto`` leaves float64 calls of more than F64_MAX_UNITS rows x hidden units to the reference
    backend (``backends.resolve``)."""
    return dtype is torch.float64 and units > F64_MAX_UNITS


def unavailable(device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions] = None) -> Optional[str]:
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dev_type != "cpu":
        return f"the numba backend runs CPU tensors only, got device {device}"
    if dtype not in _DTYPES:
        return f"the numba backend supports float32 and float64, got {dtype}"
    return None  # every variant too: non-plain LayerOptions go to _numba_variants


# --- threads ----------------------------------------------------------------------------------
# The kernels themselves are single-threaded; their BLAS calls go to SciPy's OpenBLAS. Its
# thread count follows torch.get_num_threads() so that BLAS and torch's OpenMP pool do not
# oversubscribe the cores.

_blas_threads: Optional[int] = None
_blas_ctl = None


def sync_threads() -> None:
    """Pin the BLAS that the kernels' float64 products call (SciPy's OpenBLAS; float32 calls MKL, whose
    thread count each call sets) to the calling thread. Its own threads would contend for the cores
    with torch's OpenMP threads, which keep spinning after every torch op between the kernels:
    float64 training with torch on 2 threads ran several times slower than on one."""
    global _blas_threads, _blas_ctl
    if _blas_threads == 1:
        return
    if _blas_ctl is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS the kernels call)
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        # numba's np.dot calls SciPy's 32-bit-integer OpenBLAS, not NumPy's 64-bit one
        _blas_ctl = [lib for lib in ctl.lib_controllers
                     if lib.user_api == "blas" and "scipy.libs" in lib.filepath]
    for lib in _blas_ctl:
        lib.set_num_threads(1)
    _blas_threads = 1


# --- helpers ----------------------------------------------------------------------------------

def _np(t: Tensor) -> np.ndarray:
    if not t.requires_grad and t.is_contiguous():
        return t.numpy()
    return t.detach().contiguous().numpy()


def _new(shape: tuple, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
    """An uninitialized tensor and its NumPy view (cheaper than Tensor.new_empty + .numpy())."""
    a = np.empty(shape, _NP_DTYPE[dtype])
    return torch.from_numpy(a), a


def _bs_np(batch_sizes: Optional[Tensor]) -> np.ndarray:
    if batch_sizes is None:
        return _NO_BS
    return batch_sizes.detach().to("cpu", torch.int64).contiguous().numpy()


_NO_BS = np.zeros(0, np.int64)
_NO_BIAS = {torch.float32: np.zeros(0, np.float32), torch.float64: np.zeros(0, np.float64)}


def _check(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor) -> None:
    why = unavailable(xg.device, xg.dtype)
    if why is not None:
        raise RuntimeError(why)
    for name, t in (("w_hh", w_hh), ("w_hr", w_hr), ("h0", h0), ("c0", c0)):
        if t is not None and t.dtype != xg.dtype:
            raise TypeError(f"{name}: expected dtype {xg.dtype}, got {t.dtype}")


def _forward(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
             batch_sizes: Optional[Tensor], reverse: bool, save: bool):
    """(out (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,G) or (0,B,G), cs (T,B,H) or (0,B,H))."""
    _check(xg, w_hh, w_hr, h0, c0)
    sync_threads()
    T, B, G = xg.shape
    H = G // 4
    P = w_hh.shape[1]
    out = xg.new_empty((T, B, P))
    h_n = h0.detach().clone(memory_format=torch.contiguous_format)
    c_n = c0.detach().clone(memory_format=torch.contiguous_format)
    n_save = T if save else 0
    gates = xg.new_empty((n_save, B, G))
    cs = xg.new_empty((n_save, B, H))
    w_hh_np = _np(w_hh)
    w_hr_np = _np(w_hr) if w_hr is not None else np.zeros((0, H), _NP_DTYPE[xg.dtype])
    mkl = HAVE_MKL and xg.dtype == torch.float32
    # packing the weights costs about one step's product: worth it from two steps on
    n_pack = B if T > 1 else 0
    with serial_blas(run_serial(B, G, P)), PackScratch() as pk:
        K.layer_fwd(SGEMM, mkl, _np(xg), _NO_BIAS[xg.dtype], w_hh_np, pk.pack(w_hh_np, n_pack, True), w_hr_np,
                    pk.pack(w_hr_np, n_pack, True), h_n.numpy(), c_n.numpy(), _bs_np(batch_sizes),
                    bool(reverse), out.numpy(), 0, gates.numpy(), cs.numpy())
    return out, h_n, c_n, gates, cs


def prev_h_product(dr: Tensor, out: Tensor, h0: Tensor, mask: Optional[Tensor],
                   batch_sizes: Optional[Tensor], reverse: bool) -> Tensor:
    """sum over steps and rows of dr_t^T (h_{t-1} * mask): (G, P).

    dr (T, B, G) is zero at inactive rows, out (T, B, P) is zero there too; h_{t-1} is the output
    of the step before in processing order, or h0 at a row's first step.
    """
    T, B, G = dr.shape
    P = out.shape[2]
    dw = dr.new_zeros((G, P))
    if T == 0:
        return dw
    out = out.detach()
    h0 = h0.detach()
    if mask is not None:
        out = out * mask
        h0 = h0 * mask
    if reverse:
        main_g, main_h = dr[:-1], out[1:]
        if batch_sizes is None:
            first = dr[T - 1]
        else:
            lengths = (batch_sizes.to(torch.int64).unsqueeze(0)
                       > torch.arange(B, dtype=torch.int64).unsqueeze(1)).sum(1)  # (B,)
            first = dr[(lengths - 1).clamp(min=0), torch.arange(B)]
            first = first * (lengths > 0).unsqueeze(1).to(first.dtype)
    else:
        main_g, main_h = dr[1:], out[:-1]
        first = dr[0]
    torch.mm(first.t(), h0, out=dw)
    if T > 1:
        dw.addmm_(main_g.reshape(-1, G).t(), main_h.reshape(-1, P))
    return dw


def _backward(gates: Tensor, cs: Tensor, out: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
              w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool,
              grad_out: Tensor, grad_h: Tensor, grad_c: Tensor):
    """(d xg (T,B,G), d w_hh (G,P), d w_hr (P,H) or None, d h0 (B,P), d c0 (B,H))."""
    sync_threads()
    T, B, G = gates.shape
    H = G // 4
    P = w_hh.shape[1]
    proj = w_hr is not None
    dgates = gates.new_empty((T, B, G))
    dh = grad_h.detach().clone(memory_format=torch.contiguous_format)
    dc = grad_c.detach().clone(memory_format=torch.contiguous_format)
    dhs = gates.new_empty((T if proj else 0, B, P))
    hps = gates.new_empty((T if proj else 0, B, H))
    w_hh_np = _np(w_hh)
    w_hr_np = _np(w_hr) if proj else np.zeros((0, H), _NP_DTYPE[gates.dtype])
    mkl = HAVE_MKL and gates.dtype == torch.float32
    n_pack = B if T > 1 else 0
    with serial_blas(run_serial(B, G, P)), PackScratch() as pk:
        K.layer_bwd(SGEMM, mkl, gates.numpy(), cs.numpy(), _np(c0), w_hh_np,
                    pk.pack(w_hh_np, n_pack, False), w_hr_np, pk.pack(w_hr_np, n_pack, False),
                    _np(grad_out), dh.numpy(), dc.numpy(), _bs_np(batch_sizes), bool(reverse),
                    dgates.numpy(), dhs.numpy(), hps.numpy())
    dw_hh = prev_h_product(dgates, out, h0, None, batch_sizes, reverse)
    dw_hr = torch.mm(dhs.reshape(-1, P).t(), hps.reshape(-1, H)) if proj else None
    return dgates, dw_hh, dw_hr, dh, dc


# --- eager autograd ---------------------------------------------------------------------------

def _layer_reference(ctx) -> tuple:
    xg, _, _, _, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors
    return (xg, w_hh, w_hr, h0, c0, batch_sizes, ctx.reverse), reference.layer


class _LayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, w_hr, h0, c0, batch_sizes, reverse):
        out, h_n, c_n, gates, cs = _forward(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, True)
        ctx.save_for_backward(xg, gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes)
        ctx.reverse = reverse
        return out, h_n, c_n

    @staticmethod
    @differentiable(_layer_reference)
    def backward(ctx, grad_out, grad_h, grad_c):
        _, gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors
        dxg, dw_hh, dw_hr, dh0, dc0 = _backward(gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes,
                                                ctx.reverse, grad_out, grad_h, grad_c)
        return dxg, dw_hh, dw_hr, dh0, dc0, None, None


# --- custom operators (torch.compile) ---------------------------------------------------------

@torch.library.custom_op("lstmkit::numba_layer_fwd", mutates_args=(), device_types="cpu")
def numba_layer_fwd(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                    batch_sizes: Optional[Tensor], reverse: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """out, h_n, c_n, and the saved gate activations and cell states."""
    return _forward(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, True)


@numba_layer_fwd.register_fake
def _(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse):
    T, B, G = xg.shape
    P = w_hh.shape[1]
    return (xg.new_empty((T, B, P)), xg.new_empty((B, P)), xg.new_empty((B, G // 4)),
            xg.new_empty((T, B, G)), xg.new_empty((T, B, G // 4)))


@torch.library.custom_op("lstmkit::numba_layer_bwd", mutates_args=(), device_types="cpu")
def numba_layer_bwd(gates: Tensor, cs: Tensor, out: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                    w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool,
                    grad_out: Tensor, grad_h: Tensor, grad_c: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """d xg, d w_hh, d w_hr ((0, 0) without projection), d h0, d c0."""
    dxg, dw_hh, dw_hr, dh0, dc0 = _backward(gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes,
                                            reverse, grad_out, grad_h, grad_c)
    if dw_hr is None:
        dw_hr = gates.new_empty((0, 0))
    return dxg, dw_hh, dw_hr, dh0, dc0


@numba_layer_bwd.register_fake
def _(gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes, reverse, grad_out, grad_h, grad_c):
    T, B, G = gates.shape
    P = w_hh.shape[1]
    dw_hr = gates.new_empty(tuple(w_hr.shape) if w_hr is not None else (0, 0))
    return (gates.new_empty((T, B, G)), gates.new_empty((G, P)), dw_hr,
            gates.new_empty((B, P)), gates.new_empty((B, G // 4)))


def _op_setup(ctx, inputs, output):
    xg, w_hh, w_hr, h0, c0, batch_sizes, reverse = inputs
    out, _, _, gates, cs = output
    ctx.save_for_backward(gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes)
    ctx.reverse = reverse


def _op_backward(ctx, grad_out, grad_h, grad_c, _grad_gates, _grad_cs):
    gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors
    dxg, dw_hh, dw_hr, dh0, dc0 = torch.ops.lstmkit.numba_layer_bwd(
        gates, cs, out, h0, c0, w_hh, w_hr, batch_sizes, ctx.reverse, grad_out, grad_h, grad_c)
    return dxg, dw_hh, (dw_hr if w_hr is not None else None), dh0, dc0, None, None


numba_layer_fwd.register_autograd(_op_backward, setup_context=_op_setup)


# --- the contract -----------------------------------------------------------------------------

def layer(
    xg: Tensor,                      # (T, B, 4H)
    w_hh: Tensor,                    # (4H, P)
    w_hr: Optional[Tensor],          # (P, H) or None
    h0: Tensor,                      # (B, P)
    c0: Tensor,                      # (B, H)
    batch_sizes: Optional[Tensor],   # (T,) int64, non-increasing, or None
    reverse: bool,
    opts: Optional[LayerOptions] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if opts is not None and not opts.is_plain():
        from . import _numba_variants  # peephole, layer norm, recurrent dropout, zoneout

        return _numba_variants.layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, opts)
    if torch.compiler.is_compiling():
        out, h_n, c_n, _, _ = torch.ops.lstmkit.numba_layer_fwd(xg, w_hh, w_hr, h0, c0, batch_sizes,
                                                                bool(reverse))
        return out, h_n, c_n
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xg, w_hh, w_hr, h0, c0)
    ):
        return _LayerFn.apply(xg, w_hh, w_hr, h0, c0, batch_sizes, bool(reverse))
    out, h_n, c_n, _, _ = _forward(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, False)
    return out, h_n, c_n


# --- inference hooks --------------------------------------------------------------------------

# Weights as NumPy views plus their packed forms, keyed by the identity of the weight tensors. The
# views share memory with the parameters; an entry is rebuilt when a tensor's version counter (an
# in-place update such as an optimizer step) or storage (a replaced ``.data``) changed. Writes
# through ``.data`` (``p.data.copy_(w)``, a hand-written ``p.data -= lr * p.grad``) move neither, so
# each weight that has a packed copy also keeps a raw copy, compared with the live values on every
# hit: a packed copy is never used stale. Non-contiguous weights are converted on every call, never
# cached. An entry dies with its weights (:func:`_remember`), so the ids of a live entry's key are
# its own weights'.
_WCACHE: OrderedDict = OrderedDict()
# calls shorter than SHORT_CALL_STEPS of at most SHORT_CALL_ROWS rows in all use the live weights,
# unprepared (their products call the GEMM on the weights as stored): checking a prepared copy
# against the weights costs more than such a call. One step of B=3 .. 16 rows at H=128, 2 layers:
# 225-480 us prepared, 30-60 us live
SHORT_CALL_STEPS = 8
SHORT_CALL_ROWS = 64
_WCACHE_SIZE = 16


def _unowned(w: Tensor, dt) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor's memory that does not keep the tensor alive (the views
    of cache entries, which die with their tensors: see :func:`_remember`)."""
    buf = (ctypes.c_byte * (w.numel() * w.element_size())).from_address(w.data_ptr())
    a = np.frombuffer(buf, dt).reshape(tuple(w.shape))
    return a.reshape(1, -1) if a.ndim == 1 else a


def _remember(cache: OrderedDict, key: tuple, weights: Sequence[Tensor], entry: tuple) -> None:
    """cache[key] = entry (the oldest out past _WCACHE_SIZE), dropped as soon as one of the weights
    dies: entries keep weak references only (their views are :func:`_unowned`), so a deleted
    model's weights and their prepared copies are freed at once."""
    def drop(_ref, key=key):
        cache.pop(key, None)

    cache[key] = entry + (tuple(weakref.ref(w, drop) for w in weights),)
    if len(cache) > _WCACHE_SIZE:
        cache.popitem(last=False)


def _prepared(weights: Sequence[Tensor], dtype: torch.dtype, pack_rows: Callable[[], list[int]],
              cache: bool = True) -> tuple:
    """(views, packed): 2-D NumPy views (biases as (1, G)) and each 2-D weight prepared by
    ``pack_b`` for ``a @ w.T`` with ``pack_rows()[i]`` rows of ``a`` (0: do not pack).

    ``cache=False`` prepares afresh: writes through ``.data`` (gradcheck, hand-written SGD
    updates) do not move the version counter, so cached packed copies could be stale."""
    if cache:
        key = tuple(map(id, weights))
        hit = _WCACHE.get(key)
        versions = [w._version for w in weights]
        ptrs = [w.data_ptr() for w in weights]
        if hit is not None and hit[0] == versions and hit[1] == ptrs and hit[4] == [w.shape for w in weights] and all(
                raw is None or same_contents(v.reshape(-1), raw) for v, raw in zip(hit[2], hit[5])):
            return hit[2], hit[3]
    cacheable = _check_weights(weights, dtype)
    views = _views(weights, dtype, cache and cacheable)
    packed = tuple(pack_b(v, n if v.shape[0] > 1 else 0, True) for v, n in zip(views, pack_rows()))
    if cache and cacheable:
        raws = tuple(v.reshape(-1).copy() if p.size else None for v, p in zip(views, packed))
        _remember(_WCACHE, key, weights, (versions, ptrs, views, packed, [w.shape for w in weights], raws))
    return views, packed


def _check_weights(weights: Sequence[Tensor], dtype: torch.dtype) -> bool:
    """Raise unless every weight is a CPU tensor of dtype; whether all are contiguous (cacheable)."""
    for w in weights:
        if w.dtype != dtype:
            raise TypeError(f"weights: expected dtype {dtype}, got {w.dtype}")
        if w.device.type != "cpu":
            raise RuntimeError(f"weights: expected CPU tensors, got device {w.device}")
    return all(w.is_contiguous() for w in weights)


def _views(weights: Sequence[Tensor], dtype: torch.dtype, unowned: bool) -> tuple:
    """2-D NumPy views of the weights (biases as (1, G)); ``unowned`` for a cache entry."""
    if unowned:
        dt = _NP_DTYPE[dtype]
        return tuple(_unowned(w, dt) for w in weights)
    return tuple(a.reshape(1, -1) if a.ndim == 1 else a for a in map(_np, weights))


def lstm_stack(
    x: Tensor,                        # (T, B, I)
    h0: Tensor,                       # (L*D, B, P)
    c0: Tensor,                       # (L*D, B, H)
    weights: Sequence[Tensor],        # torch.nn.LSTM's _flat_weights order
    *,
    num_layers: int,
    bidirectional: bool,
    has_biases: bool,
    proj_size: int,
    batch_sizes: Optional[Tensor],    # (T,) int64 or None
) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked LSTM forward without gradients, in one compiled call: (out (T,B,D*P), h_n, c_n)."""
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in _DTYPES:
        raise RuntimeError(unavailable(x.device, dtype))
    T, B, I = x.shape
    D = 2 if bidirectional else 1
    P = h0.shape[2]
    H = c0.shape[2]
    K_max = P if P > I else I
    out, out_np = _new((T, B, D * P), dtype)
    h_n, h_np = _new(tuple(h0.shape), dtype)
    c_n, c_np = _new(tuple(c0.shape), dtype)
    serial = run_serial(B, 4 * H, K_max)
    tiny = 4 * H * K_max <= TINY_WEIGHTS and T * B <= TINY_ROWS and batch_sizes is None
    if tiny or (T < SHORT_CALL_STEPS and T * B <= SHORT_CALL_ROWS):
        # streaming calls and tiny models: products on the live weights; a transposed copy would
        # have to be compared with them on every call (see _WCACHE), costing more than it saves
        views = _weight_views(weights, dtype)
        if 4 * H * K_max <= DOT_MAX_SIZE and batch_sizes is None and (tiny or B <= WT_MAX_ROWS):  # loops
            K.stack_fwd_short(_np(x), _np(h0), _np(c0), views, num_layers, D, bool(has_biases), proj_size > 0,
                              out_np, h_np, c_np)
            return out, h_n, c_n
        packed = _no_packs(len(weights), dtype)
    else:
        per = [T * B, B] + [0, 0] * bool(has_biases) + [B] * (proj_size > 0)
        views, packed = _prepared(weights, dtype, lambda: per * (len(weights) // len(per)))
        # the threaded paths take h0, c0 in the outputs and return False when the pool is busy
        nparts = stack_rows_parts(T, B, H, P, num_layers, D, dtype)
        if nparts > 1:
            h_np[:] = _np(h0)
            c_np[:] = _np(c0)
            from . import _numba_variants  # imports this module

            _numba_variants.plain_stack_rows(x, views, packed, num_layers, bool(has_biases), proj_size > 0,
                                             _bs_np(batch_sizes), h_np, c_np, out_np, nparts)
            return out, h_n, c_n
        nparts = unit_parts(T, B, I, H, P, num_layers, D, dtype)
        if nparts > 1:
            c_np[:] = _np(c0)
            if _layer_units(_np(x), views, _np(h0)[0], c_np[0], _bs_np(batch_sizes), out_np, h_np[0], nparts):
                return out, h_n, c_n
        nthreads = parallel_threads(T, B, I, H, P, num_layers, D, dtype)
        if nthreads > 1:
            h_np[:] = _np(h0)
            c_np[:] = _np(c0)
            if _stack_parallel(_np(x), views, packed, num_layers, D, bool(has_biases), proj_size > 0,
                               _bs_np(batch_sizes), out_np, h_np, c_np, None, None, None, nthreads):
                return out, h_n, c_n
    sync_threads()
    args = (SGEMM, HAVE_MKL and dtype == torch.float32, _np(x), _np(h0), _np(c0), views, packed,
            num_layers, D, bool(has_biases), proj_size > 0, _bs_np(batch_sizes), out_np, h_np, c_np)
    if serial:
        with serial_blas(True):
            K.stack_fwd(*args)
    else:
        K.stack_fwd(*args)
    return out, h_n, c_n


# --- layers and directions on several threads --------------------------------------------------
# With torch.get_num_threads() > 1, the two directions of a bidirectional layer run side by side,
# the layers of a unidirectional stack run as a pipeline over time, and a layer's batch rows or
# hidden units are shared (``kernels.numba_parallel``), on torch's OpenMP team or a small pool of
# Python threads plus the calling one (:func:`_run_threads`). Float32 with MKL only: each thread's
# products go to MKL on that thread alone (SciPy's BLAS, for float64, has one shared pool).

# multiply-adds of one layer-direction (T * B * 4H * (I + P)) from which the threads pay off
PARALLEL_MIN_MACS = 2 * 1024 * 1024
# per-step multiply-adds (B * 4H * H) from which a single layer's units are shared by the threads
# (a meeting per step), and the fewest units of a thread (slice bounds a multiple: whole vectors)
SPLIT_MIN_MACS = 48 * 1024
SPLIT_MIN_UNITS = 16
# rows of a pipeline chunk's input product at least, and chunks per sequence at most
PIPE_MIN_ROWS = 64
PIPE_MAX_CHUNKS = 16
# fewest batch rows of a thread when a layer's rows are shared by the threads (no meetings: rows
# are independent; each thread reads all of w_hh every step, so parts of fewer rows waste the read),
# and the largest w_hh (4H * P values) for which that beats sharing the units (measured: 1 MB of
# float32 weights, H=256, stays in each core's L2 and rows win by ~10%; at H=512, 4 MB, every
# thread streams all of it each step and units win by ~20%)
ROW_MIN = 4
ROW_MAX_WEIGHTS = 256 * 1024
ROW_MIN_ROWS_LARGE = 64  # batch rows from which rows win even with larger weights
ROWS_MAX_LAYERS = 2      # stacks deeper than this run the layer pipeline in inference
# per-step multiply-adds (B * 4H * P) from which plain training shares a layer's rows (rows_train)
ROW_TRAIN_MIN_STEP_MACS = 4 * 1024 * 1024
# ... and, for a single-layer stack, multiply-adds of its forward products (T * B * 4H * (I + P)):
# measured wins from 16.4M (T=50 B=256 I=4 H=16: 3.5 vs 4.9 ms), losses up to 12.9M (T=100 B=12 I=8
# H=48: 2.2 vs 2.0 ms)
ROW_TRAIN_MIN_MACS = 14 * 1024 * 1024

_pool: Optional[ThreadPoolExecutor] = None
_pool_pid: Optional[int] = None
_pool_lock = threading.Lock()


def parallel_threads(T: int, B: int, I: int, H: int, P: int, num_layers: int, D: int, dtype: torch.dtype,
                     training: bool = False) -> int:
    """Threads for a whole stack (1: the single-threaded kernels): bidirectional stacks run their
    directions side by side, unidirectional ones the layer pipeline, in inference and both ways
    in training."""
    n = torch.get_num_threads()
    if n < 2 or not HAVE_MKL or dtype != torch.float32 or (D == 1 and num_layers == 1):
        return 1
    if T * B * 4 * H * (I + P) < PARALLEL_MIN_MACS:
        return 1
    if D == 1 and not run_serial(B, 4 * H, max(I, P)):
        return 1  # the single-threaded kernels' products already use every thread: the pipeline gains nothing
    return max(1, min(n, _CPUS, D if D > 1 else num_layers))


def unit_parts(T: int, B: int, I: int, H: int, P: int, num_layers: int, D: int, dtype: torch.dtype) -> int:
    """Threads sharing the hidden units of a single layer-direction (inference), 1: none."""
    n = torch.get_num_threads()
    if n < 2 or not HAVE_MKL or dtype != torch.float32 or num_layers != 1 or D != 1 or P != H:
        return 1
    if B * 4 * H * H < SPLIT_MIN_MACS or T * B * 4 * H * (I + H) < PARALLEL_MIN_MACS:
        return 1
    # every part waits for the slowest at every step: never more parts than cores, nor parts
    # whose share of a step is too small to cover a meeting
    parts = min(n, _CPUS, H // SPLIT_MIN_UNITS, B * 4 * H * H // max(1, SPLIT_MIN_MACS // 2))
    return max(1, parts)


def row_parts(T: int, B: int, H: int, P: int, dtype: torch.dtype) -> int:
    """Threads sharing the batch rows of one layer-direction's recurrence (1: none)."""
    n = torch.get_num_threads()
    if n < 2 or not HAVE_MKL or dtype != torch.float32 or T * B * 4 * H * P < PARALLEL_MIN_MACS:
        return 1
    return max(1, min(n, _CPUS, B // ROW_MIN))


def prefers_rows(B: int, H: int, P: int) -> bool:
    """Whether a single layer's threads in inference share its batch rows (:func:`row_parts`) rather
    than its units: with weights that stay in each core's L2, or enough rows per thread to amortize
    reading all of them every step (T=200 H=512, 4 MB: rows 182 ms, units 188-193 ms at B=64;
    units 15 ms, rows 17-19 ms at B=16)."""
    return 4 * H * P <= ROW_MAX_WEIGHTS or B >= ROW_MIN_ROWS_LARGE


def stack_rows_parts(T: int, B: int, H: int, P: int, num_layers: int, D: int, dtype: torch.dtype) -> int:
    """Threads sharing the batch rows of a whole unidirectional stack in inference, each running its
    rows through every layer (``_numba_variants.stack_rows``), or 1: not this way. Up to
    ROWS_MAX_LAYERS layers: with the jobs on torch's OpenMP team, 2 layers measured 3.5-3.6 vs 3.8 ms
    (T=100 B=16 H=128) and 6.3-6.4 vs 7.3 ms (B=32) against the layer pipeline, 3 layers 5.3 vs
    4.9-5.1 ms (the pipeline keeps those)."""
    if D != 1 or num_layers > ROWS_MAX_LAYERS or not prefers_rows(B, H, P):
        return 1
    return row_parts(T, B, H, P, dtype)


def rows_train(T: int, B: int, I: int, H: int, P: int, dtype: torch.dtype, plain: bool, num_layers: int = 1) -> int:
    """Threads sharing the batch rows of a layer-direction in training, its input projection and
    weight products included (``_numba_variants.layer_rows_train``), or 0: not this way. Layers
    with variants take it with one part too where no thread would help (:func:`one_row_part`);
    plain layers with large steps (ROW_TRAIN_MIN_STEP_MACS), or as a single-layer stack with
    ROW_TRAIN_MIN_MACS of products.

    Measured against the other paths (2 threads, jobs on torch's OpenMP team, ms): every variant,
    T=100 B=16 H=128 L=2: layer norm 17-18 vs 22-24, peephole 14.1 vs 17.5, recurrent dropout 14.6
    vs 17.7, zoneout 15.0 vs 18.5, all of them 18-19 vs 26-29; T=50 B=64 H=256: peephole 37 vs 41-46,
    all 49-54 vs 60-63. Plain layers with large steps: T=50 B=64 H=256 33-35 vs 39.5-47, T=100 B=32
    H=256 proj=128 25-29 vs 30, T=200 B=64 H=512 516-522 vs 694-733, 2 layers T=50 B=64 H=256 73 vs
    83-89. Plain single layers (against the fused stack kernel, whose per-step work runs on one
    thread): T=100 B=64 I=16 H=32 3.6 vs 4.4, T=50 B=256 I=4 H=16 3.5 vs 4.9, T=100 B=64 I=16 H=64
    6.1 vs 9.3, T=100 B=16 I=32 H=128 5.5 vs 7.4, T=500 B=8 I=16 H=128 13.0 vs 18.2, T=100 B=8 I=32
    H=256 8.3 vs 10.4; below ~13M multiply-adds the fused kernel wins (T=100 B=8 I=16 H=32 1.64 vs
    1.22, T=100 B=12 I=8 H=48 2.2 vs 2.0). Deeper plain stacks with small steps keep the fused
    paths and their layer pipeline (T=100 B=8 H=64 L=2: 4.5 by rows vs 3.0; T=100 B=16 H=128 L=2
    even). One part, one thread, against the per-layer path (torch's input projection and layer
    norm, then the variant kernel): T=100 B=16 H=128 L=2 layer norm 25.3 vs 29.6, peephole 20.2 vs
    22.7, zoneout 21.4 vs 22.7, all 28.8 vs 32.4; T=50 B=64 H=256 all 79 vs 83; T=1000 B=1 H=128 even."""
    nparts = row_parts(T, B, H, P, dtype)
    if plain:
        big = B * 4 * H * P >= ROW_TRAIN_MIN_STEP_MACS or (
            num_layers == 1 and T * B * 4 * H * (I + P) >= ROW_TRAIN_MIN_MACS)
        return nparts if nparts > 1 and big else 0
    if nparts > 1 or one_row_part(T, B, I, H, P, dtype):
        return nparts
    return 0


def one_row_part(T: int, B: int, I: int, H: int, P: int, dtype: torch.dtype) -> bool:
    """Whether a layer with variants runs the row kernels as one part, on this thread: float32 with
    one thread, or too little work for several (below PARALLEL_MIN_MACS, where the other paths run
    single-threaded too). Their fused input projection and layer norm beat the per-layer path's
    torch ops (measured one thread, inference, ms: T=100 B=16 H=128 L=2 layer norm 7.2 vs 8.8, all
    7.2 vs 9.0; T=50 B=64 H=256 all 20.2 vs 26.6; the tutorial's T=10 B=5 H=5 L=2 all 0.21 vs 0.28;
    T=1000 B=1 H=128 all 5.5 vs 5.8)."""
    return dtype == torch.float32 and (torch.get_num_threads() < 2 or T * B * 4 * H * (I + P) < PARALLEL_MIN_MACS)


def even_bounds(n: int, nparts: int) -> list[int]:
    """nparts + 1 bounds splitting range(n) into nearly equal consecutive parts."""
    return [round(k * n / nparts) for k in range(nparts + 1)]


def run_rows(kernel: Callable[[int, int, int], None], B: int, nparts: int) -> None:
    """kernel(k, r0, r1) for nparts ranges of the B rows at once on the thread pool (one call
    kernel(0, 0, B) here when nparts is 1 or the pool is busy). The calls must touch only their
    rows (and part k's own accumulators)."""
    if nparts > 1:
        bounds = even_bounds(B, nparts)

        def job(k: int) -> Callable[[], None]:
            return lambda: kernel(k, bounds[k], bounds[k + 1])

        if _run_threads([job(k) for k in range(nparts)], np.zeros(1, np.int64)):
            return
    kernel(0, 0, B)


def _unit_bounds(H: int, nparts: int) -> list[int]:
    q = SPLIT_MIN_UNITS
    return [0] + [round(k * H / nparts / q) * q for k in range(1, nparts)] + [H]


def _layer_units(x: np.ndarray, views: tuple, h0: np.ndarray, c: np.ndarray, bs: np.ndarray, out: np.ndarray,
                 h_n: np.ndarray, nparts: int) -> bool:
    """A single unidirectional layer (no projection) on nparts threads, each owning a slice of the
    hidden units (``kernels.numba_parallel.layer_fwd_units``); c (B, H) is c0 on entry and c_n on
    return; out (T, B, H) and h_n (B, H) are written. False when the pool was busy."""
    T, B, _ = x.shape
    H = c.shape[1]
    bounds = _unit_bounds(H, nparts)
    bias = (views[2] + views[3]).reshape(4 * H, 1) if len(views) == 4 else None
    parts = []
    for k in range(nparts):
        u0, u1 = bounds[k], bounds[k + 1]
        b = KP.gather_units(bias, u0, u1).reshape(-1) if bias is not None else np.zeros(0, x.dtype)
        parts.append((u0, u1, KP.gather_units(views[0], u0, u1), KP.gather_units(views[1], u0, u1), b))
    hbuf = np.empty((2, B, H), x.dtype)
    hbuf[0] = h0
    flags = np.zeros(nparts + 1, np.int64)
    with PackScratch() as pk:
        with serial_blas(True):
            packs = [pk.pack(w_hh, B, True) for _, _, _, w_hh, _ in parts]

        def job(k: int) -> Callable[[], None]:
            u0, u1, w_ih, w_hh, b = parts[k]

            def run() -> None:
                KP.layer_fwd_units(SGEMM, True, SCHED_YIELD, flags, k, u0, u1, x, w_ih, w_hh, packs[k], b, hbuf, c,
                                   bs, out)
            return run

        if not _run_threads([job(k) for k in range(nparts)], flags[nparts:]):
            return False
    h_n[:] = hbuf[T % 2]
    return True


def pipe_chunk(T: int, B: int) -> int:
    """Steps per pipeline chunk: enough rows for an efficient input product, a short pipeline fill."""
    return max(1, min(T, max(-(-PIPE_MIN_ROWS // B), -(-T // PIPE_MAX_CHUNKS))))


def _run_threads(jobs: Sequence[Callable[[], None]], abort: np.ndarray) -> bool:
    """Run the jobs at once, jobs[0] on this thread; False (nothing run) when another call is using the
    pool. A job that raises sets ``abort``, so that jobs waiting for it return, then its error is
    raised here.

    The jobs run on torch's own OpenMP threads when they can (:func:`_omp_run`), else on a small
    pool of Python threads."""
    global _pool, _pool_pid
    if not _pool_lock.acquire(blocking=False):
        return False
    try:
        if _omp_run(jobs, abort):
            return True
        workers = len(jobs) - 1
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:
            # a pool inherited through fork has no threads: start a new one
            _pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lstmkit")
            _pool_pid = os.getpid()

        def guarded(job: Callable[[], None]) -> None:
            try:
                with serial_blas(True):
                    job()
            except BaseException:
                abort[0] = 1
                raise

        futures = [_pool.submit(guarded, job) for job in jobs[1:]]
        try:
            guarded(jobs[0])
        finally:
            for f in futures:
                f.result()
    finally:
        _pool_lock.release()
    return True


# --- torch's OpenMP threads -------------------------------------------------------------------
# After each parallel torch op, torch's OpenMP threads keep spinning for a few milliseconds waiting
# for more work (GNU libgomp's default), each on a core; a Python thread of lstmkit's own woken
# then shares a core with one of them, and measured starting up to ~3 ms late. Running the jobs on
# those very threads (GOMP_parallel of the libgomp torch loaded, the jobs as a ctypes callback that
# takes the GIL only to start a job: the kernels release it) avoids that: training with the
# threaded paths measured 8-20% faster (2 layers T=100 B=16 H=128: 16.9-18.5 -> 13.9 ms).
# Linux with torch's OpenMP backend only; never in a forked child (libgomp is not fork-safe);
# LSTMKIT_OPENMP=0 turns it off. The jobs run only when the team has one thread per job (some jobs
# meet every step), else nothing runs and the Python threads take them.

_omp: Optional[tuple] = None          # (GOMP_parallel, omp_get_thread_num, omp_get_num_threads, callback)
_omp_found = False
# libgomp is not fork-safe (in a child forked after the parent ran an OpenMP region, torch's own
# torch.mm hangs): never used in a process forked after this module was imported
_OMP_PID = os.getpid()
_omp_call: list = []                  # [jobs, abort, errors, short-team flag] of the running call


def _omp_callback(_data) -> None:
    jobs, abort, errors, short = _omp_call
    omp = _omp
    if omp[2]() != len(jobs):
        short.append(True)            # fewer threads than jobs: run none here
        return
    try:
        with serial_blas(True):
            jobs[omp[1]()]()
    except BaseException as e:  # noqa: BLE001 -- raised again by the calling thread
        abort[0] = 1
        errors.append(e)


def _find_omp() -> Optional[tuple]:
    """GOMP_parallel and friends from the libgomp that torch loaded, or None."""
    if os.environ.get("LSTMKIT_OPENMP", "1") == "0" or not os.path.exists("/proc/self/maps"):
        return None
    import ctypes

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = os.path.dirname(torch.__file__)
    with open("/proc/self/maps") as fh:
        paths = {line.split()[-1] for line in fh if "libgomp" in line}
    ours = [p for p in paths if p.startswith(torch_dir)] or sorted(paths)
    if len(ours) != 1:
        return None
    try:
        lib = ctypes.CDLL(ours[0])
        cb_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        gomp = lib.GOMP_parallel
        gomp.argtypes = [cb_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.restype = None
        num = lib.omp_get_thread_num
        size = lib.omp_get_num_threads
        num.restype = size.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return gomp, num, size, cb_type(_omp_callback)


def _omp_team() -> Optional[tuple]:
    """:func:`_find_omp`'s answer, found once; None in a process forked after import (libgomp would
    hang there: the Python threads take the jobs)."""
    global _omp, _omp_found
    if os.getpid() != _OMP_PID:
        return None
    if not _omp_found:
        _omp, _omp_found = _find_omp(), True
    return _omp


def _omp_run(jobs: Sequence[Callable[[], None]], abort: np.ndarray) -> bool:
    """Run the jobs on torch's OpenMP threads (one per job, jobs[0] on this thread); False when that
    is not possible (nothing ran). The caller holds ``_pool_lock``."""
    global _omp_call
    if len(jobs) < 2 or _omp_team() is None:
        return False
    errors: list = []
    short: list = []
    _omp_call = [list(jobs), abort, errors, short]
    try:
        _omp[0](_omp[3], None, len(jobs), 0)
    finally:
        _omp_call = []
    if errors:
        raise errors[0]
    return not short


def _stack_parallel(x: np.ndarray, views: tuple, packed: tuple, num_layers: int, D: int, has_bias: bool,
                    has_proj: bool, bs: np.ndarray, out: np.ndarray, h: np.ndarray, c: np.ndarray,
                    ys: Optional[np.ndarray], gates: Optional[np.ndarray], cs: Optional[np.ndarray],
                    nthreads: int) -> bool:
    """A stacked LSTM forward on nthreads threads; h, c (L*D, B, *) hold h0, c0 on entry and h_n,
    c_n on return; out (T, B, Q) is written. With ys (L, T, B, Q), gates (L*D, T, B, G) and
    cs (L*D, T, B, H), every layer's output and what backward needs are saved (then out is
    ys[L-1]). False when the thread pool was busy: nothing was computed."""
    T, B, _ = x.shape
    P = h.shape[2]
    H = c.shape[2]
    G = 4 * H
    Q = D * P
    dt = x.dtype
    abort = np.zeros(1, np.int64)
    if D == 1:
        sched = np.zeros(2 * num_layers, np.int64)
        keep = ys is None
        if keep:
            ys = np.empty((num_layers, T, B, P), dt)
            gates = np.empty((num_layers, 0, B, G), dt)
            cs = np.empty((num_layers, 0, B, H), dt)

        def run() -> None:
            KP.stack_fwd_tasks(SGEMM, True, SCHED_YIELD, sched, abort, pipe_chunk(T, B), x, views, packed, num_layers,
                               has_bias, has_proj, bs, h, c, ys, gates, cs)

        if not _run_threads([run] * nthreads, abort):
            return False
        if keep:
            out[:] = ys[-1]
        return True
    per = 2 + 2 * has_bias + has_proj
    no_bias = np.zeros(0, dt)
    no_proj = np.zeros((0, H), dt)
    save = gates is not None
    no_g = np.empty((0, B, G), dt)
    no_c = np.empty((0, B, H), dt)
    bias = []
    for idx in range(num_layers * D):
        k = idx * per
        bias.append(views[k + 2][0] + views[k + 3][0] if has_bias else no_bias)

    def args(idx: int):
        k = idx * per
        w_hr = views[k + per - 1] if has_proj else no_proj
        w_hr_p = packed[k + per - 1] if has_proj else packed[k + 1]
        return (views[k], packed[k], bias[idx], views[k + 1], packed[k + 1], w_hr, w_hr_p, h[idx], c[idx], bs)

    def dst(layer: int) -> np.ndarray:
        if ys is not None:
            return ys[layer]
        return out if layer == num_layers - 1 else np.empty((T, B, Q), dt)

    inp = x
    for layer in range(num_layers):
        o = dst(layer)

        def job(d: int, layer: int = layer, inp: np.ndarray = inp, o: np.ndarray = o) -> Callable[[], None]:
            def run() -> None:
                idx = layer * D + d
                KP.direction_fwd(SGEMM, True, inp, *args(idx), d == 1, o, d * P,
                                 gates[idx] if save else no_g, cs[idx] if save else no_c)
            return run

        if not _run_threads([job(0), job(1)], abort):
            if layer == 0:
                return False
            for d in range(2):  # the pool was taken between two layers: finish here
                with serial_blas(True):
                    job(d)()
        inp = o
    return True


def _directions_bwd(x: np.ndarray, h0: np.ndarray, c0: np.ndarray, views: tuple, wpbs: tuple, num_layers: int,
                    has_bias: bool, has_proj: bool, bs: np.ndarray, ys: np.ndarray, gates: np.ndarray,
                    cs: np.ndarray, grad_out: np.ndarray, grad_h: np.ndarray, grad_c: np.ndarray, dx: np.ndarray,
                    dh0: np.ndarray, dc0: np.ndarray, dws: tuple) -> bool:
    """Backward of a bidirectional stack run by :func:`_stack_parallel` (with saves): layer by layer
    from the top, the two directions side by side. Writes dx, dh0, dc0 and dws (as
    ``numba_stack.stack_train_bwd``); False when the thread pool was busy: nothing was computed."""
    D = 2
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    G = 4 * H
    per = 2 + 2 * has_bias + has_proj
    dt = x.dtype
    no_proj = np.zeros((0, H), dt)
    no_pack = np.zeros(0, dt)
    abort = np.zeros(1, np.int64)
    dh0[:] = grad_h
    dc0[:] = grad_c

    def scratch():
        n_proj = T if has_proj else 0
        return (np.empty((T, B, G), dt), np.empty((n_proj, B, P), dt), np.empty((n_proj, B, H), dt),
                np.empty((T, B, P), dt))

    def grads(idx: int) -> tuple:
        k = idx * per
        return (dws[k], dws[k + 1], dws[k + 2] if has_bias else dws[k], dws[k + 3] if has_bias else dws[k], has_bias,
                dws[k + per - 1])

    def rec(idx: int) -> tuple:
        k = idx * per
        if has_proj:
            return views[k], views[k + 1], wpbs[k + 1], views[k + per - 1], wpbs[k + per - 1]
        return views[k], views[k + 1], wpbs[k + 1], no_proj, no_pack

    dy = grad_out
    for layer in range(num_layers - 1, -1, -1):
        inp = x if layer == 0 else ys[layer - 1]
        dinps = [np.empty(inp.shape, dt) for _ in range(D)]

        def job(d: int, layer: int = layer, inp: np.ndarray = inp, dy: np.ndarray = dy,
                dinps: list = dinps) -> Callable[[], None]:
            def run() -> None:
                idx = layer * D + d
                dgates, dhs, hps, hprev = scratch()
                KP.direction_bwd(SGEMM, True, inp, ys[layer], d * P, h0[idx], c0[idx], *rec(idx), gates[idx],
                                 cs[idx], bs, d == 1, np.ascontiguousarray(dy[:, :, d * P:(d + 1) * P]), dh0[idx],
                                 dc0[idx], dinps[d], dgates, dhs, hps, hprev, *grads(idx))
            return run

        if not _run_threads([job(0), job(1)], abort):
            if layer == num_layers - 1:
                return False
            for d in range(2):  # the pool was taken between two layers: finish here
                with serial_blas(True):
                    job(d)()
        if layer == 0:
            np.add(dinps[0], dinps[1], out=dx)
        else:
            dy = dinps[0]
            dy += dinps[1]
    return True


def step_runner(x_shape: tuple, h_shape: tuple, c_shape: tuple, dtype: torch.dtype, *, num_layers: int,
                has_biases: bool, proj_size: int) -> Callable[[Tensor, Tensor, Tensor, Sequence[Tensor]], tuple]:
    """The per-step function of a stream (``LSTM.step``, one-step ``forward`` calls): run(x, h0, c0,
    weights) -> (y, h_n, c_n) for CPU tensors of these shapes and this dtype (float32 or float64),
    no gradients; x (B, I), (1, B, I) or (B, 1, I), h0 (L, B, P), c0 (L, B, H), weights in
    torch.nn.LSTM's _flat_weights order (unidirectional). Everything that depends only on the
    shapes is worked out here, once per stream (the module keeps the function), so that a call
    costs the kernel and little else: at H=32 the kernel is ~2 us of a ~12 us call."""
    if dtype not in _DTYPES:
        raise RuntimeError(unavailable(torch.device("cpu"), dtype))
    I = x_shape[-1]
    _, B, P = h_shape
    H = c_shape[2]
    y_shape = tuple(x_shape[:-1]) + (P,)
    hn_shape = (num_layers, B, P)
    cn_shape = (num_layers, B, H)
    npdt = _NP_DTYPE[dtype]
    bias = bool(has_biases)
    proj = proj_size > 0
    work = B * 4 * H * max(I, P)  # multiply-adds of a layer's larger product
    may_split = B <= STEP_MAX_ROWS and work >= STEP_TEAM_MIN
    always = work >= STEP_TEAM_ALWAYS
    stack = B > STEP_MAX_ROWS or work > B * DOT_MAX_SIZE  # without the team: the general stack
    max_team = min(_CPUS, -(-H // STEP_TEAM_UNITS))
    # the last call's weights, their data pointers and addresses (a stream keeps its weights)
    last_weights: tuple = ()
    last_ptrs: tuple = ()
    addresses = None
    # the fastest one-thread and team steps of this stream so far (seconds): what a team step is
    # held to (:func:`_team_step_done`)
    best = [math.inf, math.inf]

    def run(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        nonlocal last_weights, last_ptrs, addresses
        global _last_step
        now = time.perf_counter()
        hot = now - _last_step < STEP_TEAM_HOT_S
        _last_step = now
        team = None
        if may_split and (nthreads := torch.get_num_threads()) > 1:
            team = _step_team(dtype)  # (the first call loads or compiles the team's kernels: a stream's first step)
            if not (hot or always) or now < _team_off_until:
                team = None
        if team is None and stack:
            out, h_n, c_n = lstm_stack(x.reshape(1, B, I), h0, c0, weights, num_layers=num_layers,
                                       bidirectional=False, has_biases=bias, proj_size=proj_size, batch_sizes=None)
            return out.view(y_shape), h_n, c_n
        ptrs = tuple(map(Tensor.data_ptr, weights))
        if (len(last_weights) != len(weights) or not all(map(operator.is_, weights, last_weights))
                or ptrs != last_ptrs):
            # another weight (replaced) or another storage (``.data`` set): the general lookup
            addresses = _weight_addresses(weights, dtype)
            last_weights, last_ptrs = tuple(weights), ptrs
        y = np.empty(y_shape, npdt)
        h_n = np.empty(hn_shape, npdt)
        c_n = np.empty(cn_shape, npdt)
        if addresses is None or not (x.is_contiguous() and h0.is_contiguous() and c0.is_contiguous()):
            K.stack_fwd_short(_np(x).reshape(1, B, I), _np(h0), _np(c0), _weight_views(weights, dtype), num_layers,
                              1, bias, proj, y.reshape(1, B, P), h_n, c_n)
        elif team is not None:
            t0 = time.perf_counter()
            KS.stack_step_team(team, min(nthreads, max_team), x.data_ptr(), h0.data_ptr(), c0.data_ptr(), addresses,
                               num_layers, B, I, H, P, bias, proj, y, h_n, c_n)
            _team_step_done(time.perf_counter() - t0, best, t0)
        else:
            t0 = time.perf_counter()
            K.stack_step_ptr(x.data_ptr(), h0.data_ptr(), c0.data_ptr(), addresses, num_layers, B, I, H, P, bias, proj,
                             y, h_n, c_n)
            t = time.perf_counter() - t0
            if t < best[0]:
                best[0] = t
        return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)

    return run


# A step of B rows splits over torch's OpenMP team (kernels.numba_step) by hidden units, each thread
# taking at least STEP_TEAM_UNITS of them. Measured at 2 threads, B=1, 2 layers, I=H (one step, us):
# H=64 4.6 alone / 4.3 split, H=96 7.2 / 5.7, H=128 11.6 / 8.1, H=256 240 / 68, H=512 720 / 364.
# Threads that waited longer than about a millisecond for work sleep, and waking them costs more
# than the split saves at H=128 (after idle gaps of 0.2 / 0.5 / 1 / 2 ms: 13.5 / 13.7 / 16 / 17 us
# alone, 11 / 14 / 18 / 23 us split): from B * 4H * max(I, P) >= STEP_TEAM_MIN multiply-adds per
# layer product the split is taken when the previous step call was less than STEP_TEAM_HOT_S ago
# (a streaming loop), from STEP_TEAM_ALWAYS always.
STEP_TEAM_MIN = 32 * 1024
STEP_TEAM_ALWAYS = 256 * 1024
STEP_TEAM_HOT_S = 200e-6
STEP_TEAM_UNITS = 32
# rows up to which a step runs the kernels above (their products read the weights once per row)
STEP_MAX_ROWS = 8
# A team step waits for its partner threads at every layer. With another process busy on a core, a
# partner is often descheduled and the step waits for the scheduler instead (measured at H=128, B=1,
# 2 layers, 2 threads: 530 steps/s and a p99 of 15-20 ms, against 28,700 steps/s alone). A team step
# that takes longer than STEP_TEAM_LATE times what the stream's steps take (the fastest one-thread
# step, or its fastest team step when that is less) plus STEP_TEAM_LATE_PAD_S turns the team off for
# every stream for a back-off time: STEP_TEAM_BACKOFF_S, doubled after each late retry up to
# STEP_TEAM_BACKOFF_MAX_S, back to the start after a step on time. A busy machine thus pays one late
# step per STEP_TEAM_BACKOFF_MAX_S at most; an idle one loses the split for a back-off time after a
# rare late step. The slack (3x + 50 us) lets a machine's ordinary jitter pass (2x + 10 us measured
# the idle p50 at 39 us instead of 26 on a loaded 2-core machine: most steps had gone to one thread),
# while a descheduled partner costs milliseconds. Measured there at H=128, 2 threads, p99 without /
# with a competing busy loop: 359 us / 19.9 ms before this rule, 105 / 186 us with it.
STEP_TEAM_LATE = 3.0
STEP_TEAM_LATE_PAD_S = 50e-6
STEP_TEAM_BACKOFF_S = 0.02
STEP_TEAM_BACKOFF_MAX_S = 1.0
_team_off_until = 0.0
_team_backoff = STEP_TEAM_BACKOFF_S
_last_step = 0.0
_CPUS = os.cpu_count() or 1  # never more threads than cores (read once: ~2 us a call)
_step_teams: dict = {}  # torch dtype -> team block; emptied in a forked child (libgomp would hang there)
os.register_at_fork(after_in_child=_step_teams.clear)


def _team_step_done(elapsed: float, best: list, start: float) -> None:
    """Hold a team step that took ``elapsed`` seconds from ``start`` to the stream's fastest steps
    ``best`` ([one-thread, team]); a late one turns the team off for a back-off time (above)."""
    global _team_off_until, _team_backoff
    if elapsed <= STEP_TEAM_LATE * min(best) + STEP_TEAM_LATE_PAD_S:
        if elapsed < best[1]:
            best[1] = elapsed
        _team_backoff = STEP_TEAM_BACKOFF_S
        return
    if best[1] == math.inf:  # the stream's first team step (it may have loaded the team): the yardstick
        best[1] = elapsed
        return
    _team_off_until = start + elapsed + _team_backoff
    _team_backoff = min(2 * _team_backoff, STEP_TEAM_BACKOFF_MAX_S)


def _step_team(dtype: torch.dtype) -> Optional[np.ndarray]:
    """The ``team`` block of ``numba_step.stack_step_team`` for ``dtype`` (addresses of libgomp's
    functions and of the dtype's step callback), or None where torch's OpenMP team cannot be used
    (:func:`_omp_team`)."""
    global KS
    block = _step_teams.get(dtype)
    if block is not None:  # every step of a stream: no further check (a fork empties the dict)
        return block
    omp = _omp_team()
    if omp is None:
        return None
    block = _step_teams.get(dtype)
    if block is None:
        import ctypes

        from ..kernels import numba_step as KS

        addresses = [ctypes.cast(f, ctypes.c_void_p).value for f in omp[:3]]
        block = _step_teams[dtype] = KS.team_block(*addresses, SCHED_YIELD, _NP_DTYPE[dtype])
    return block


KS = None  # kernels.numba_step, imported by _step_team


def _stack_pipeline_bwd(x: np.ndarray, h0: np.ndarray, c0: np.ndarray, views: tuple, wpbs: tuple, num_layers: int,
                        has_bias: bool, has_proj: bool, bs: np.ndarray, ys: np.ndarray, gates: np.ndarray,
                        cs: np.ndarray, grad_out: np.ndarray, grad_h: np.ndarray, grad_c: np.ndarray, dx: np.ndarray,
                        dh0: np.ndarray, dc0: np.ndarray, dws: tuple, nthreads: int) -> bool:
    """Backward of a unidirectional stack on nthreads threads: the recurrences as a pipeline of
    (layer, chunk) tasks, each layer's weight gradients as tasks once its recurrence is done
    (``kernels.numba_parallel.stack_bwd_tasks``). Writes what ``numba_stack.stack_train_bwd``
    writes; False when the pool was busy (nothing computed)."""
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    dt = x.dtype
    dh0[:] = grad_h
    dc0[:] = grad_c
    dys = np.empty((num_layers - 1, T, B, P), dt)
    dgates = np.empty((num_layers, T, B, 4 * H), dt)
    n_proj = T if has_proj else 0
    dhs = np.empty((num_layers, n_proj, B, P), dt)
    hps = np.empty((num_layers, n_proj, B, H), dt)
    sched = np.zeros(2 * num_layers, np.int64)
    wg = np.zeros(2 * num_layers, np.int64)
    abort = np.zeros(1, np.int64)
    chunk = pipe_chunk(T, B)

    def run() -> None:
        KP.stack_bwd_tasks(SGEMM, True, SCHED_YIELD, sched, wg, abort, chunk, x, ys, h0, views, wpbs, num_layers,
                           has_bias, has_proj, bs, c0, gates, cs, grad_out, dys, dx, dh0, dc0, dgates, dhs, hps, dws)

    return _run_threads([run] * nthreads, abort)


# weights (4H * max(I, P) elements) and T * B rows up to which a call without lengths runs the
# no-BLAS kernel of streaming calls (the tutorial's model: 38 -> 28 us; with more rows the
# sequence-wide input product wins: 200 x 64 rows, H=8: 2.6 ms against 1.1 ms)
TINY_WEIGHTS = 4 * 1024
TINY_ROWS = 64

_NO_PACKS: dict = {}


def _no_packs(n: int, dtype: torch.dtype) -> tuple:
    """A tuple of n empty arrays: no weight prepared."""
    key = (n, dtype)
    hit = _NO_PACKS.get(key)
    if hit is None:
        hit = _NO_PACKS[key] = (np.zeros(0, _NP_DTYPE[dtype]),) * n
    return hit


def lstm_cell_step(
    x: Tensor,                 # (B, I)
    h: Tensor,                 # (B, H)
    c: Tensor,                 # (B, H)
    w_ih: Tensor,              # (4H, I)
    w_hh: Tensor,              # (4H, H)
    b_ih: Optional[Tensor],    # (4H,)
    b_hh: Optional[Tensor],    # (4H,)
) -> tuple[Tensor, Tensor]:
    """One LSTMCell step without gradients: (h1 (B,H), c1 (B,H))."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise RuntimeError(unavailable(x.device, x.dtype))
    sync_threads()
    B = x.shape[0]
    ws = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
    views, packed = _prepared(ws, x.dtype, lambda: [0 if B <= WT_MAX_ROWS else B] * 2 + [0, 0][:len(ws) - 2])
    if b_ih is None:
        nob = np.zeros((0, w_ih.shape[0]), _NP_DTYPE[x.dtype])
        views = views + (nob, nob)
    h1, h1_np = _new(tuple(h.shape), x.dtype)
    c1, c1_np = _new(tuple(c.shape), x.dtype)
    with serial_blas(run_serial(B, w_ih.shape[0], max(w_ih.shape[1], w_hh.shape[1]))):
        K.cell_step(SGEMM, HAVE_MKL and x.dtype == torch.float32, _np(x), _np(h), _np(c), views[0],
                    packed[0], views[1], packed[1], views[2], views[3], h1_np, c1_np)
    return h1, c1


def lstm_stack_variants(*args, **kwargs):
    """A unidirectional stack with variants, inference, on several threads (``_numba_variants``)."""
    from . import _numba_variants

    return _numba_variants.lstm_stack_variants(*args, **kwargs)


def layer_rows_train(*args, **kwargs):
    """A differentiable layer-direction, its input projection included, its batch rows on several
    threads (``_numba_variants``); NotImplemented where :func:`rows_train` leaves it to the other
    paths."""
    from . import _numba_variants

    return _numba_variants.layer_rows_train(*args, **kwargs)


def stack_rows_train(*args, **kwargs):
    """A differentiable unidirectional stack with variants as one autograd node, its batch rows on
    several threads through every layer (``_numba_variants``); NotImplemented where
    :func:`rows_train` would not run each of its layers by rows."""
    from . import _numba_variants

    return _numba_variants.stack_rows_train(*args, **kwargs)


def prefers_stack_variants(*args) -> bool:
    from . import _numba_variants

    return _numba_variants.prefers_stack_variants(*args)


# --- training hook ----------------------------------------------------------------------------

_VIEWS: OrderedDict = OrderedDict()


def _weight_views(weights: Sequence[Tensor], dtype: torch.dtype) -> tuple:
    """2-D NumPy views of the weights (biases as (1, G)), cached by identity and storage.

    Views alias the parameters' memory, so unlike packed copies they cannot go stale through
    in-place or ``.data`` writes; a replaced storage or shape misses the cache."""
    return _weights_entry(weights, dtype)[1]


def _weight_addresses(weights: Sequence[Tensor], dtype: torch.dtype) -> Optional[np.ndarray]:
    """The weights' addresses as an int64 array (for ``stack_step_ptr``), or None when some weight
    is not contiguous; valid while the weights' storages are (the caller holds them)."""
    return _weights_entry(weights, dtype)[2]


def _weights_entry(weights: Sequence[Tensor], dtype: torch.dtype) -> tuple:
    """(data pointers, views, addresses or None): the cache entry of the weights (built on a miss)."""
    key = tuple(map(id, weights))
    ptrs = tuple(map(Tensor.data_ptr, weights))
    hit = _VIEWS.get(key)
    if hit is not None and hit[0] == ptrs and hit[3] == tuple(w.shape for w in weights):
        return hit
    cacheable = _check_weights(weights, dtype)
    entry = (ptrs, _views(weights, dtype, cacheable), np.array(ptrs, np.int64) if cacheable else None,
             tuple(w.shape for w in weights))
    if cacheable:
        _remember(_VIEWS, key, weights, entry)
    return entry


def _packs(views: Sequence[np.ndarray], rows: list[int], transpose: bool, pk: PackScratch) -> tuple:
    """Each weight prepared by ``pack_b`` for ``rows[i]``-row products (0: nothing), built on every
    call (writes through ``.data`` do not move version counters, so cached copies could be
    stale), and only where ``mm`` would otherwise call a GEMM per step: the hand-written loops of
    tiny products need no packed form. The backward's products are not transposed: only MKL's
    packed form helps them, and only on matrices worth its ~8 MB buffer."""
    return tuple(pk.pack(v, n, transpose) if _packed(v.size, v.dtype, n, transpose) else _EMPTY[v.dtype.type]
                 for v, n in zip(views, rows))


def _packed(size: int, dtype, n: int, transpose: bool) -> bool:
    """Whether :func:`_packs` prepares a weight of ``size`` elements for products of n rows."""
    if n == 0 or n * size <= SMALL_FLOPS_MKL:
        return False
    return transpose or (n > 1 and HAVE_MKL and dtype == np.float32 and size >= PACK_MIN_SIZE)


_EMPTY = {np.float32: np.zeros(0, np.float32), np.float64: np.zeros(0, np.float64)}


def _stack_threads(T: int, B: int, H: int, P: int, I: int) -> tuple[bool, np.ndarray]:
    """MKL threads of the stack kernels: (serial, (sequence-wide products, per-step products)).

    ``serial``: run the call under ``serial_blas`` (one thread unless the kernel switches). The
    kernel switches only when the two counts differ (0: leave MKL's setting alone): setting
    MKL's local thread count at all, even to its global value, measured ~12% slower products
    for the rest of the call. Small products run on the calling thread: waking OpenMP's threads
    costs more than they save."""
    n = torch.get_num_threads()
    wide = 1 if T * B * 4 * H * (max(I, P) + P) <= STACK_TRAIN_SERIAL_MACS else n
    step = 1 if run_serial(B, 4 * H, max(P, I)) else n
    if wide == step:
        return step == 1, np.zeros(2, np.int32)
    return True, np.array([wide, step], np.int32)


class _TrainPlan:
    """What a training call of one shape decides before it runs (made once per shape: the checks
    and choices below cost tens of microseconds a call, as much as a tiny model's kernels)."""

    __slots__ = ("num_layers", "D", "has_biases", "proj_size", "nthreads", "rows", "dt", "mkl", "serial",
                 "threads", "packs", "grad_shapes")

    def __init__(self, x_shape: tuple, h_shape: tuple, c_shape: tuple, dtype: torch.dtype, num_layers: int,
                 D: int, has_biases: bool, proj_size: int, nthreads: int):
        T, B, I = x_shape
        H, P = c_shape[2], h_shape[2]
        self.num_layers, self.D, self.has_biases, self.proj_size = num_layers, D, has_biases, proj_size
        self.nthreads = nthreads
        # w_hh and w_hr serve T products of B rows: prepared when T > 1; w_ih serves one product
        one = [0, B] + [0, 0] * has_biases + [B] * (proj_size > 0)
        self.rows = one * (num_layers * D) if T > 1 else [0] * (len(one) * num_layers * D)
        self.dt = _NP_DTYPE[dtype]
        self.mkl = HAVE_MKL and dtype == torch.float32
        self.serial, self.threads = _stack_threads(T, B, H, P, I)
        # the weights' shapes in _flat_weights order (of their gradients)
        shapes = []
        for layer in range(num_layers):
            K = I if layer == 0 else D * P
            for _ in range(D):
                shapes += [(4 * H, K), (4 * H, P)] + [(4 * H,), (4 * H,)] * has_biases + [(P, H)] * (proj_size > 0)
        self.grad_shapes = tuple(shapes)
        # whether _packs prepares any weight (forward, backward)
        self.packs = tuple(any(_packed(math.prod(shape), self.dt, n, t) for shape, n in zip(shapes, self.rows))
                           for t in (True, False))


_PLANS: dict = {}


def _train_plan(x_shape: tuple, h_shape: tuple, c_shape: tuple, dtype: torch.dtype, num_layers: int, D: int,
                has_biases: bool, proj_size: int) -> Optional[_TrainPlan]:
    """The plan of a fused training call of these shapes (x time-first), or None: not this path
    (the per-layer one). Remembered per shape and thread count."""
    key = (x_shape, h_shape, c_shape, dtype, num_layers, D, has_biases, proj_size, torch.get_num_threads())
    plan = _PLANS.get(key, _NO_PLAN)
    if plan is not _NO_PLAN:
        return plan
    T, B, I = x_shape
    H, P = c_shape[2], h_shape[2]
    plan = None
    # rows_train: the per-layer path runs each layer by rows (layer_rows_train)
    if D != 1 or not rows_train(T, B, I, H, P, dtype, True, num_layers):
        nthreads = parallel_threads(T, B, I, H, P, num_layers, D, dtype, training=True)
        if nthreads > 1 or prefers_stack_train(T, B, I, H, P):
            plan = _TrainPlan(tuple(x_shape), tuple(h_shape), tuple(c_shape), dtype, num_layers, D, has_biases,
                              proj_size, nthreads)
    if len(_PLANS) >= 64:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


_NO_PLAN = object()


def _stack_reference(ctx) -> tuple:
    x, h0, c0, _, *weights = ctx.saved_tensors
    plan, bs = ctx.saved[0], ctx.batch_sizes

    def fn(_plan, _bs, x, h0, c0, *weights):
        return reference.stack(x, h0, c0, weights, num_layers=plan.num_layers, D=plan.D,
                               has_biases=plan.has_biases, proj_size=plan.proj_size, batch_sizes=bs)

    return (plan, bs, x, h0, c0, *weights), fn


class _StackFn(torch.autograd.Function):
    """A whole stacked LSTM: forward one compiled call, backward one compiled call."""

    @staticmethod
    def forward(ctx, plan, batch_sizes, x, h0, c0, *weights):
        num_layers, D, P, nthreads = plan.num_layers, plan.D, h0.shape[2], plan.nthreads
        T, B = x.shape[0], x.shape[1]
        LD = num_layers * D
        has_biases, has_proj = plan.has_biases, plan.proj_size > 0
        views = _weight_views(weights, x.dtype)
        dt = plan.dt
        ys = np.empty((num_layers, T, B, D * P), dt)
        gates = np.empty((LD, T, B, 4 * c0.shape[2]), dt)
        cs = np.empty((LD, T, B, c0.shape[2]), dt)
        h_n, h_np = _new(tuple(h0.shape), x.dtype)
        c_n, c_np = _new(tuple(c0.shape), x.dtype)
        x_np, h0_np, c0_np = _np(x), _np(h0), _np(c0)
        bs = _bs_np(batch_sizes)
        done = False
        if nthreads > 1:
            h_np[:] = h0_np
            c_np[:] = c0_np
            with serial_blas(True), PackScratch() as pk:
                done = _stack_parallel(x_np, views, _packs(views, plan.rows, True, pk), num_layers, D, has_biases,
                                       has_proj, bs, ys[-1], h_np, c_np, ys, gates, cs, nthreads)
        if not done:
            with serial_blas(plan.serial), PackScratch() as pk:
                packed = _packs(views, plan.rows, True, pk) if plan.packs[0] else _no_packs(len(views), x.dtype)
                S.stack_train_fwd(SGEMM, plan.mkl, SET_THREADS, plan.threads, x_np, h0_np, c0_np, views, packed,
                                  num_layers, D, has_biases, has_proj, bs, h_np, c_np, ys, gates, cs)
        out = torch.from_numpy(ys[-1])
        # saved for autograd's checks against in-place changes; backward uses the NumPy views
        ctx.save_for_backward(x, h0, c0, out, *weights)
        ctx.saved = (plan, views, x_np, h0_np, c0_np, bs, ys, gates, cs)
        ctx.batch_sizes = batch_sizes
        return out, h_n, c_n

    @staticmethod
    @differentiable(_stack_reference)
    def backward(ctx, grad_out, grad_h, grad_c):
        _ = ctx.saved_tensors  # unpacking raises if an input was changed in place since forward
        plan, views, x_np, h0_np, c0_np, bs, ys, gates, cs = ctx.saved
        num_layers, D, nthreads = plan.num_layers, plan.D, plan.nthreads
        has_biases, has_proj = plan.has_biases, plan.proj_size > 0
        sync_threads()
        dx, dx_np = _new(tuple(x_np.shape), grad_out.dtype)
        dh0, dh0_np = _new(tuple(h0_np.shape), grad_out.dtype)
        dc0, dc0_np = _new(tuple(c0_np.shape), grad_out.dtype)
        gw = [np.empty(shape, plan.dt) for shape in plan.grad_shapes]
        dws = tuple(g.reshape(1, -1) if g.ndim == 1 else g for g in gw)
        done = False
        if nthreads > 1 and D == 1:
            with PackScratch() as pk:
                with serial_blas(True):
                    wpbs = _packs(views, plan.rows, False, pk)
                done = _stack_pipeline_bwd(x_np, h0_np, c0_np, views, wpbs, num_layers, has_biases, has_proj, bs,
                                           ys, gates, cs, _np(grad_out), _np(grad_h), _np(grad_c), dx_np, dh0_np,
                                           dc0_np, dws, nthreads)
        elif nthreads > 1:
            with serial_blas(True), PackScratch() as pk:
                done = _directions_bwd(x_np, h0_np, c0_np, views, _packs(views, plan.rows, False, pk), num_layers,
                                       has_biases, has_proj, bs, ys, gates, cs, _np(grad_out), _np(grad_h),
                                       _np(grad_c), dx_np, dh0_np, dc0_np, dws)
        if not done:
            with serial_blas(plan.serial), PackScratch() as pk:
                wpbs = _packs(views, plan.rows, False, pk) if plan.packs[1] else _no_packs(len(views), grad_out.dtype)
                S.stack_train_bwd(SGEMM, plan.mkl, SET_THREADS, plan.threads, x_np, h0_np, c0_np, views, wpbs,
                                  num_layers, D, has_biases, has_proj, bs, ys, gates, cs, _np(grad_out), _np(grad_h),
                                  _np(grad_c), dx_np, dh0_np, dc0_np, dws)
        return (None, None, dx, dh0, dc0, *map(torch.from_numpy, gw))


# autograd.Function.apply without its Python wrapper (which only matters under functorch transforms)
_stack_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _StackFn)


def lstm_stack_train(
    x: Tensor,                        # (T, B, I)
    h0: Tensor,                       # (L*D, B, P)
    c0: Tensor,                       # (L*D, B, H)
    weights: Sequence[Tensor],        # torch.nn.LSTM's _flat_weights order
    *,
    num_layers: int,
    bidirectional: bool,
    has_biases: bool,
    proj_size: int,
    batch_sizes: Optional[Tensor],    # (T,) int64 or None
) -> tuple[Tensor, Tensor, Tensor]:
    """A differentiable stacked LSTM: (out (T,B,D*P), h_n, c_n) from one autograd node whose
    forward and backward are one compiled call each (``kernels.numba_stack``); NotImplemented
    where :func:`prefers_stack_train` leaves the shape to the per-layer path."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise RuntimeError(unavailable(x.device, x.dtype))
    if h0.dtype is not x.dtype or c0.dtype is not x.dtype:
        for name, t in (("h0", h0), ("c0", c0)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {x.dtype}, got {t.dtype}")
    plan = _train_plan(x.shape, h0.shape, c0.shape, x.dtype, num_layers, 2 if bidirectional else 1,
                       bool(has_biases), proj_size)
    if plan is None:
        return NotImplemented
    return _train_call(plan, batch_sizes, x, h0, c0, weights)


def _train_call(plan: _TrainPlan, batch_sizes: Optional[Tensor], x: Tensor, h0: Tensor, c0: Tensor,
                weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    sync_threads()
    if torch._C._are_functorch_transforms_active():
        return _StackFn.apply(plan, batch_sizes, x, h0, c0, *weights)
    return _stack_apply(plan, batch_sizes, x, h0, c0, *weights)


def call_runner(x_shape: tuple, h_shape: tuple, c_shape: tuple, dtype: torch.dtype, *, num_layers: int,
                bidirectional: bool, has_biases: bool, proj_size: int, batch_first: bool,
                grad: bool) -> Optional[Callable[[Tensor, Tensor, Tensor, Sequence[Tensor]], tuple]]:
    """The module's function for plain calls of these shapes (``LSTM.forward`` of a batched CPU
    tensor, ``LSTM.step``, ``LSTMCell.forward`` as a one-layer step of h0, c0 (1, B, H) without
    gradients; the modules pass zeros for a missing state): run(x, h0, c0, weights) -> (output in
    x's layout, h_n, c_n), or None where the general path is the one to take. x is (T, B, I), or (B,
    T, I) when batch_first, or (B, I) for one step; ``grad``: the call needs gradients. The choices
    that depend only on the shapes and the thread count are made here, once (on a tiny model they
    cost as much as its kernels): the module asks again for another thread count."""
    if dtype not in _DTYPES:
        raise RuntimeError(unavailable(torch.device("cpu"), dtype))
    D = 2 if bidirectional else 1
    if len(x_shape) == 2 or (not grad and D == 1 and x_shape[1 if batch_first else 0] == 1):
        if grad or (len(x_shape) == 2 and x_shape[0] > SHORT_CALL_ROWS):
            # a (B, I) step of many rows: the general paths (LSTMCell's prepared weights; measured
            # B=256 H=64: 168 us a step there against 394 through the stack's threaded rows)
            return None
        return step_runner(x_shape, h_shape, c_shape, dtype, num_layers=num_layers, has_biases=has_biases,
                           proj_size=proj_size)
    tb_shape = (x_shape[1], x_shape[0], x_shape[2]) if batch_first else tuple(x_shape)
    bias = bool(has_biases)
    if not grad:
        def run(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
            out, h_n, c_n = lstm_stack(x.transpose(0, 1) if batch_first else x, h0, c0, weights,
                                       num_layers=num_layers, bidirectional=bidirectional, has_biases=bias,
                                       proj_size=proj_size, batch_sizes=None)
            return (out.transpose(0, 1) if batch_first else out), h_n, c_n

        return run
    plan = _train_plan(tb_shape, h_shape, c_shape, dtype, num_layers, D, bias, proj_size)
    if plan is None:
        return None

    def run_train(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        out, h_n, c_n = _train_call(plan, None, x.transpose(0, 1) if batch_first else x, h0, c0, weights)
        return (out.transpose(0, 1) if batch_first else out), h_n, c_n

    return run_train


# MACs of one layer-direction's sequence-wide products (input projection, input and weight
# gradients) up to which running them on one thread costs little (~100 us)
STACK_TRAIN_SERIAL_MACS = 8 * 1024 * 1024


def prefers_stack_train(T: int, B: int, I: int, H: int, P: int) -> bool:
    """Whether the fused training path is taken for a shape the threaded paths do not run
    (:func:`parallel_threads`), rather than the per-layer one (torch GEMMs around ``layer``).

    Single-threaded they run the same products and the fused path saves the per-layer overhead.
    With more threads and a small per-step product (``run_serial``), the fused call switches MKL
    between one thread (per step) and all (sequence-wide products, ``_stack_threads``); measured
    about even with the per-layer path on such shapes, which therefore stay there unless their
    sequence-wide products are small."""
    if torch.get_num_threads() == 1 or not run_serial(B, 4 * H, max(P, I)):
        return True
    return T * B * 4 * H * (max(I, P) + P) <= STACK_TRAIN_SERIAL_MACS
