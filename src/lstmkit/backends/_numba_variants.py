"""The Numba backend's LSTM variants: one layer-direction with peepholes, layer norm, recurrent
dropout and zoneout (any combination, with projection, reverse and variable lengths).

``numba_cpu.layer`` hands every non-plain ``LayerOptions`` here. Forward is one compiled call over
all steps (``kernels.numba_variants.layer_fwd``); backward is one compiled call for the gradient
of every step's pre-activations, of the initial state and of the small variant parameters
(peepholes, layer-norm gains and bias), then one large GEMM each for dW_hh and dW_hr over all
T*B rows, as in the plain backend.

Eager autograd only (a ``torch.autograd.Function``); under ``torch.compile`` :func:`layer` is
excluded from the graph (``torch.compiler.disable``) and runs eagerly.

Dimension legend: T steps, B batch rows, H hidden size, G = 4H, P = proj_size or H.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..kernels import numba_parallel as KP
from ..kernels import numba_variants as KV
from ..kernels.numba_blas import HAVE_MKL, SGEMM, PackScratch, serial_blas
from . import numba_cpu as _plain  # attributes looked up at call time: numba_cpu imports this module
from . import reference
from ._contract import LN_EPS, LayerOptions
from ._twice import differentiable

_Zone = Union[Tensor, float, None]


def _zone_np(d: _Zone, T: int, B: int, n: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(mask (T, B, n) or (0, B, n), fill (n,)) for the kernels from a zoneout option."""
    npd = _plain._NP_DTYPE[dtype]
    if isinstance(d, Tensor):
        if d.dim() == 0:
            return np.zeros((0, B, n), npd), np.full(n, float(d), npd)
        if tuple(d.shape) != (T, B, n):
            raise ValueError(f"zoneout mask: expected shape {(T, B, n)}, got {tuple(d.shape)}")
        return _plain._np(d.to(dtype)), np.zeros(n, npd)
    return np.zeros((0, B, n), npd), np.full(n, 0.0 if d is None else float(d), npd)


class _Opts:
    """The options of one call as the kernels take them (NumPy views, absent ones as empty arrays)."""

    def __init__(self, o: LayerOptions, T: int, B: int, H: int, P: int, dtype: torch.dtype):
        npd = _plain._NP_DTYPE[dtype]
        G = 4 * H
        for name in ("peephole", "ln_hh", "ln_cell_w", "ln_cell_b", "rec_mask"):
            t = getattr(o, name)
            if t is not None and t.dtype != dtype:
                raise TypeError(f"opts.{name}: expected dtype {dtype}, got {t.dtype}")
        for name, shape in (("peephole", (3, H)), ("ln_hh", (G,)), ("ln_cell_w", (H,)), ("ln_cell_b", (H,)),
                            ("rec_mask", (B, P))):
            t = getattr(o, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"opts.{name}: expected shape {shape}, got {tuple(t.shape)}")
        self.mask = _plain._np(o.rec_mask) if o.rec_mask is not None else np.zeros((0, P), npd)
        self.pe = _plain._np(o.peephole) if o.peephole is not None else np.zeros((0, H), npd)
        self.ln_g = _plain._np(o.ln_hh) if o.ln_hh is not None else np.zeros(0, npd)
        if o.ln_cell_w is not None:
            self.lnc_w = _plain._np(o.ln_cell_w)
            self.lnc_b = _plain._np(o.ln_cell_b) if o.ln_cell_b is not None else np.zeros(H, npd)
        else:
            self.lnc_w = self.lnc_b = np.zeros(0, npd)
        self.zc, self.zc_fill = _zone_np(o.zoneout_c, T, B, H, dtype)
        self.zh, self.zh_fill = _zone_np(o.zoneout_h, T, B, P, dtype)
        # c~ differs from the kept c_t only with cell zoneout
        self.cell_zone = self.zc.shape[0] > 0 or bool(self.zc_fill.any())

    def args(self) -> tuple:
        return (self.mask, self.pe, self.ln_g, self.lnc_w, self.lnc_b, self.zc, self.zc_fill, self.zh,
                self.zh_fill)


def _forward(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
             batch_sizes: Optional[Tensor], reverse: bool, ko: _Opts, save: bool):
    """(out (T,B,P), h_n (B,P), c_n (B,H), saved): saved = (gates, cs, cts, lnr, lns), each
    (0, ...) when not needed."""
    _plain._check(xg, w_hh, w_hr, h0, c0)
    _plain.sync_threads()
    T, B, G = xg.shape
    H = G // 4
    P = w_hh.shape[1]
    out = xg.new_empty((T, B, P))
    h_n = h0.detach().clone(memory_format=torch.contiguous_format)
    c_n = c0.detach().clone(memory_format=torch.contiguous_format)
    n = T if save else 0
    gates = xg.new_empty((n, B, G))
    cs = xg.new_empty((n, B, H))
    cts = xg.new_empty((n if ko.cell_zone else 0, B, H))
    lnr = xg.new_empty((n if ko.ln_g.shape[0] else 0, B, G))
    lns = xg.new_empty((lnr.shape[0], B, 2))
    w_hh_np = _plain._np(w_hh)
    w_hr_np = _plain._np(w_hr) if w_hr is not None else np.zeros((0, H), _plain._NP_DTYPE[xg.dtype])
    mkl = HAVE_MKL and xg.dtype == torch.float32
    n_pack = B if T > 1 else 0
    with PackScratch() as pk:
        KV.layer_fwd(SGEMM, mkl, _plain._np(xg), w_hh_np, pk.pack(w_hh_np, n_pack, True), w_hr_np,
                     pk.pack(w_hr_np, n_pack, True), h_n.numpy(), c_n.numpy(), _plain._bs_np(batch_sizes),
                     bool(reverse), out.numpy(), *ko.args(), gates.numpy(), cs.numpy(), cts.numpy(),
                     lnr.numpy(), lns.numpy(), 0, B)
    return out, h_n, c_n, (gates, cs, cts, lnr, lns)


def _backward(saved, out: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
              batch_sizes: Optional[Tensor], reverse: bool, ko: _Opts, mask: Optional[Tensor],
              grad_out: Tensor, grad_h: Tensor, grad_c: Tensor):
    """(d xg, d w_hh, d w_hr or None, d h0, d c0, d peephole (3,H) or (0,H), d ln_hh (G,) or (0,),
    d ln_cell_w (H,) or (0,), d ln_cell_b (H,) or (0,))."""
    _plain.sync_threads()
    gates, cs, cts, lnr, lns = saved
    T, B, G = gates.shape
    H = G // 4
    P = w_hh.shape[1]
    proj = w_hr is not None
    lnh = ko.ln_g.shape[0] > 0
    dgates = gates.new_empty((T, B, G))
    drs = gates.new_empty((T if lnh else 0, B, G))
    dh = grad_h.detach().clone(memory_format=torch.contiguous_format)
    dc = grad_c.detach().clone(memory_format=torch.contiguous_format)
    dhs = gates.new_empty((T if proj else 0, B, P))
    hps = gates.new_empty((T if proj else 0, B, H))
    dpe = gates.new_zeros(ko.pe.shape)
    dln_g = gates.new_zeros(ko.ln_g.shape)
    dlnc_w = gates.new_zeros(ko.lnc_w.shape)
    dlnc_b = gates.new_zeros(ko.lnc_b.shape)
    w_hh_np = _plain._np(w_hh)
    w_hr_np = _plain._np(w_hr) if proj else np.zeros((0, H), _plain._NP_DTYPE[gates.dtype])
    mkl = HAVE_MKL and gates.dtype == torch.float32
    n_pack = B if T > 1 else 0
    with PackScratch() as pk:
        KV.layer_bwd(SGEMM, mkl, gates.numpy(), cs.numpy(), cts.numpy(), lnr.numpy(), lns.numpy(),
                     _plain._np(c0), w_hh_np, pk.pack(w_hh_np, n_pack, False), w_hr_np,
                     pk.pack(w_hr_np, n_pack, False), *ko.args(), _plain._np(grad_out), dh.numpy(),
                     dc.numpy(), _plain._bs_np(batch_sizes), bool(reverse), dgates.numpy(), drs.numpy(),
                     dhs.numpy(), hps.numpy(), dpe.numpy(), dln_g.numpy(), dlnc_w.numpy(), dlnc_b.numpy(), 0, B)
    dw_hh = _plain.prev_h_product(drs if lnh else dgates, out, h0, mask, batch_sizes, reverse)
    dw_hr = torch.mm(dhs.reshape(-1, P).t(), hps.reshape(-1, H)) if proj else None
    return dgates, dw_hh, dw_hr, dh, dc, dpe, dln_g, dlnc_w, dlnc_b


def _with_params(opts: LayerOptions, peephole, ln_hh, ln_cell_w, ln_cell_b) -> LayerOptions:
    """opts with its parameters replaced by the given tensors (the node's inputs as saved)."""
    return replace(opts, peephole=peephole, ln_hh=ln_hh, ln_cell_w=ln_cell_w, ln_cell_b=ln_cell_b)


def _layer_reference(ctx) -> tuple:
    xg, pe, ln_hh, lnc_w, lnc_b, out, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors[:11]

    def fn(xg, w_hh, w_hr, h0, c0, pe, ln_hh, lnc_w, lnc_b, batch_sizes, reverse, opts):
        return reference.layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, _with_params(opts, pe, ln_hh, lnc_w,
                                                                                           lnc_b))

    return (xg, w_hh, w_hr, h0, c0, pe, ln_hh, lnc_w, lnc_b, batch_sizes, ctx.reverse, ctx.opts), fn


class _LayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b,
                batch_sizes, reverse, opts):
        T, B, G = xg.shape
        ko = _Opts(opts, T, B, G // 4, w_hh.shape[1], xg.dtype)
        out, h_n, c_n, saved = _forward(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, ko, True)
        ctx.save_for_backward(xg, peephole, ln_hh, ln_cell_w, ln_cell_b, out, h0, c0, w_hh, w_hr, batch_sizes,
                              *saved)
        ctx.reverse = reverse
        ctx.ko = ko
        ctx.opts = opts
        return out, h_n, c_n

    @staticmethod
    @differentiable(_layer_reference)
    def backward(ctx, grad_out, grad_h, grad_c):
        out, h0, c0, w_hh, w_hr, batch_sizes, *saved = ctx.saved_tensors[5:]
        dxg, dw_hh, dw_hr, dh0, dc0, dpe, dln_g, dlnc_w, dlnc_b = _backward(
            saved, out, h0, c0, w_hh, w_hr, batch_sizes, ctx.reverse, ctx.ko, ctx.opts.rec_mask,
            grad_out, grad_h, grad_c)
        ng = ctx.needs_input_grad
        return (dxg, dw_hh, dw_hr, dh0, dc0,
                dpe if ng[5] else None, dln_g if ng[6] else None,
                dlnc_w if ng[7] else None, dlnc_b if ng[8] else None,
                None, None, None)


@torch.compiler.disable
def layer(
    xg: Tensor,                      # (T, B, 4H)
    w_hh: Tensor,                    # (4H, P)
    w_hr: Optional[Tensor],          # (P, H) or None
    h0: Tensor,                      # (B, P)
    c0: Tensor,                      # (B, H)
    batch_sizes: Optional[Tensor],   # (T,) int64, non-increasing, or None
    reverse: bool,
    opts: LayerOptions,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer-direction with the variants in ``opts`` (the contract of ``_contract.py``)."""
    params = (opts.peephole, opts.ln_hh, opts.ln_cell_w, opts.ln_cell_b)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xg, w_hh, w_hr, h0, c0, *params)
    ):
        return _LayerFn.apply(xg, w_hh, w_hr, h0, c0, *params, batch_sizes, bool(reverse), opts)
    T, B, G = xg.shape
    ko = _Opts(opts, T, B, G // 4, w_hh.shape[1], xg.dtype)
    out, h_n, c_n, _ = _forward(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, ko, False)
    return out, h_n, c_n


def stack_rows(x: Tensor, views: tuple, packed: tuple, num_layers: int, has_bias: bool, has_proj: bool,
               ln: np.ndarray, kos: list, bs: np.ndarray, h: np.ndarray, c: np.ndarray, out: np.ndarray,
               nparts: int) -> None:
    """A unidirectional stack without gradients, its batch rows shared by nparts threads, each running
    its rows through every layer (input projections and recurrence,
    ``kernels.numba_parallel.layer_rows_fwd``): rows are independent at every layer, so the threads
    never wait for each other. With every option off, the plain LSTM. Used for stacks of up to
    ``numba_cpu.ROWS_MAX_LAYERS`` layers (:func:`numba_cpu.stack_rows_parts`).

    views, packed: the weights as ``numba_cpu._prepared`` returns them; ln (L, G) or (L, 0) input
    layer-norm gains; kos: per-layer :class:`_Opts`; h (L, B, P) and c (L, B, H) hold h0, c0 on entry
    and h_n, c_n on return; out (T, B, P) is written."""
    T, B, _ = x.shape
    H = c.shape[2]
    P = h.shape[2]
    G = 4 * H
    npd = _plain._NP_DTYPE[x.dtype]
    per = 2 + 2 * has_bias + has_proj
    no_hr = np.zeros((0, H), npd)
    layers = []
    for layer in range(num_layers):
        w = views[layer * per:(layer + 1) * per]
        wp = packed[layer * per:(layer + 1) * per]
        bias = w[2][0] + w[3][0] if has_bias else np.zeros(0, npd)
        layers.append((w[0], wp[0], bias, ln[layer], w[1], wp[1], w[-1] if has_proj else no_hr,
                       wp[-1] if has_proj else wp[1]))
    ys = [np.empty((T, B, P), npd) for _ in range(num_layers - 1)] + [out]
    x_np = _plain._np(x)
    no_g, no_c, no_s = np.empty((0, B, G), npd), np.empty((0, B, H), npd), np.empty((0, B, 2), npd)
    no_r = np.empty((0, B), npd)
    mkl = HAVE_MKL and x.dtype == torch.float32

    def part(k: int, r0: int, r1: int) -> None:
        for layer, (w_ih, w_ih_p, bias, ln_g, w_hh, w_hh_p, w_hr, w_hr_p) in enumerate(layers):
            KP.layer_rows_fwd(SGEMM, mkl, x_np if layer == 0 else ys[layer - 1], w_ih, w_ih_p, bias, ln_g, LN_EPS,
                              w_hh, w_hh_p, w_hr, w_hr_p, h[layer], c[layer], bs, False, ys[layer],
                              *kos[layer].args(), no_g, no_c, no_c, no_g, no_s, no_g, no_r, r0, r1)

    _plain.run_rows(part, B, nparts)


class _Rows:
    """One layer-direction for the row kernels (``kernels.numba_parallel.layer_rows_fwd``,
    ``layer_rows_bwd``, ``layer_rows_grads``): its input and weights as NumPy views, its options,
    what forward saves for backward, then backward's buffers and each part's partial sums.

    x (T, B, I) NumPy; the tensors as :func:`layer_rows_train` takes them; bs from ``_bs_np``."""

    def __init__(self, x: np.ndarray, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                 ln_ih: Optional[Tensor], w_hh: Tensor, w_hr: Optional[Tensor], opts: LayerOptions, bs: np.ndarray,
                 reverse: bool):
        T, B, _ = x.shape
        G = w_ih.shape[0]
        H = G // 4
        P = w_hh.shape[1]
        npd = _plain._NP_DTYPE[w_ih.dtype]
        self.ko = ko = _Opts(opts, T, B, H, P, w_ih.dtype)
        self.x, self.w_ih, self.w_hh = x, _plain._np(w_ih), _plain._np(w_hh)
        self.proj = w_hr is not None
        self.w_hr = _plain._np(w_hr) if w_hr is not None else np.zeros((0, H), npd)
        self.has_bias = b_ih is not None
        self.bias = _plain._np(b_ih + b_hh) if b_ih is not None else np.zeros(0, npd)
        self.ln = _plain._np(ln_ih) if ln_ih is not None else np.zeros(0, npd)
        self.bs, self.reverse = bs, bool(reverse)
        self.lnh = ko.ln_g.shape[0] > 0
        self.gates = np.empty((T, B, G), npd)
        self.cs = np.empty((T, B, H), npd)
        self.cts = np.empty((T if ko.cell_zone else 0, B, H), npd)
        self.lnr = np.empty((T if self.lnh else 0, B, G), npd)
        self.lns = np.empty((self.lnr.shape[0], B, 2), npd)
        self.xn = np.empty((T if self.ln.shape[0] else 0, B, G), npd)
        self.xr = np.empty((self.xn.shape[0], B), npd)

    def fwd_args(self, pk: PackScratch, h: np.ndarray, c: np.ndarray, out: np.ndarray) -> tuple:
        """layer_rows_fwd's arguments but the row range: h (B, P) and c (B, H) hold h0, c0 and get
        h_n, c_n; out (T, B, P) is written. The packed weights live as long as ``pk``'s block."""
        B = self.x.shape[1]
        with serial_blas(True):  # no OpenMP region (spinning threads) right before the row threads
            packs = [pk.pack(w, B if w.shape[0] else 0, True) for w in (self.w_ih, self.w_hh, self.w_hr)]
        return (self.x, self.w_ih, packs[0], self.bias, self.ln, LN_EPS, self.w_hh, packs[1], self.w_hr, packs[2],
                h, c, self.bs, self.reverse, out, *self.ko.args(), self.gates, self.cs, self.cts, self.lnr, self.lns,
                self.xn, self.xr)

    def bwd_args(self, pk: PackScratch, h0: np.ndarray, c0: np.ndarray, out: np.ndarray, grad_out: np.ndarray,
                 dh: np.ndarray, dc: np.ndarray, nparts: int) -> tuple:
        """layer_rows_bwd's arguments but each part's sums (``self.acc[k]``) and the row range: out
        the forward's output; dh (B, P), dc (B, H) hold the gradients of h_n, c_n and get those of
        h0, c0. Allocates the buffers the weight products read."""
        T, B, G = self.gates.shape
        H = G // 4
        P = self.w_hh.shape[1]
        npd = self.gates.dtype
        self.dgates = np.empty((T, B, G), npd)
        self.drs = np.empty((T if self.lnh else 0, B, G), npd)
        self.dhs = np.empty((T if self.proj else 0, B, P), npd)
        self.hps = np.empty((T if self.proj else 0, B, H), npd)
        self.hprev = np.empty((T, B, P), npd)
        self.dp = np.empty((T, B, G), npd) if self.ln.shape[0] else self.dgates
        ko = self.ko
        shapes = (ko.pe.shape, ko.ln_g.shape, ko.lnc_w.shape, ko.lnc_b.shape, self.ln.shape,
                  (G,) if self.has_bias else (0,))
        self.acc = [[np.zeros(sh, npd) for sh in shapes] for _ in range(nparts)]
        with serial_blas(True):
            wp_hh = pk.pack(self.w_hh, B, False)
            wp_hr = pk.pack(self.w_hr, B if self.proj else 0, False)
        return (self.gates, self.cs, self.cts, self.lnr, self.lns, h0, c0, self.w_hh, wp_hh, self.w_hr, wp_hr,
                *ko.args(), grad_out, dh, dc, self.bs, self.reverse, out, self.dgates, self.drs, self.dhs, self.hps,
                self.ln, self.xn, self.xr, self.dp, self.hprev)

    def grads_args(self, spans: list) -> tuple:
        """layer_rows_grads's arguments before dx; allocates each span's weight sums (``self.dws``)."""
        G, I = self.w_ih.shape
        P = self.w_hh.shape[1]
        H = G // 4
        npd = self.gates.dtype
        self.dws = [(np.zeros((G, I), npd), np.zeros((G, P), npd), np.zeros((P, H) if self.proj else (0, 0), npd))
                    for _ in spans]
        return (self.x, self.w_ih, self.dp, self.drs if self.lnh else self.dgates, self.hprev, self.dhs, self.hps)

    def grads(self) -> tuple:
        """(d w_ih, d b_ih, d b_hh, d ln_ih, d w_hh, d w_hr, d peephole, d ln_hh, d ln_cell_w, d ln_cell_b)
        from the parts' sums; None for what the layer does not have."""
        dw_ih, dw_hh, dw_hr = (torch.from_numpy(sum(parts[1:], parts[0])) for parts in zip(*self.dws))
        dpe, dln_g, dlnc_w, dlnc_b, dln_ih, db = (torch.from_numpy(sum(parts[1:], parts[0]))
                                                  for parts in zip(*self.acc))
        ko = self.ko
        return (dw_ih, db if self.has_bias else None,
                db.clone() if self.has_bias else None,  # b_ih and b_hh get the same gradient, not one tensor
                dln_ih if self.ln.shape[0] else None, dw_hh, dw_hr if self.proj else None,
                dpe if ko.pe.shape[0] else None, dln_g if self.lnh else None,
                dlnc_w if ko.lnc_w.shape[0] else None, dlnc_b if ko.lnc_w.shape[0] else None)


def _time_spans(T: int, nparts: int) -> list:
    bounds = _plain.even_bounds(T, nparts)
    return [(t0, t1) for t0, t1 in zip(bounds, bounds[1:]) if t1 > t0]


def _run_spans(job: Callable[[int], None], n: int) -> None:
    """job(k) for k < n at once on the thread pool (one after another here when the pool is busy)."""
    if n < 2 or not _plain._run_threads([lambda k=k: job(k) for k in range(n)], np.zeros(1, np.int64)):
        for k in range(n):
            job(k)


def _rows_layer_reference(ctx) -> tuple:
    x, w_ih, b_ih, ln_ih, w_hh, w_hr, h0, c0, _, pe, ln_hh, lnc_w, lnc_b, b_hh = ctx.saved_tensors

    def fn(x, w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, h0, c0, pe, ln_hh, lnc_w, lnc_b, batch_sizes, reverse, opts, _):
        xg = reference.input_projection(x, w_ih, b_ih, b_hh, ln_ih)
        return reference.layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, _with_params(opts, pe, ln_hh, lnc_w,
                                                                                           lnc_b))

    return (x, w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, h0, c0, pe, ln_hh, lnc_w, lnc_b, *ctx.meta), fn


class _RowsLayerFn(torch.autograd.Function):
    """A layer-direction with variants and its input projection (input layer norm and biases
    included), its batch rows shared by several threads, forward and backward
    (``kernels.numba_parallel.layer_rows_fwd`` / ``layer_rows_bwd``; the weight products after
    the backward recurrence split by steps, ``layer_rows_grads``). Every product runs on the
    threads' own MKL: no OpenMP region of torch's runs between two such layers, whose idle
    threads would keep spinning on the cores the row threads need."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b,
                batch_sizes, reverse, opts, nparts):
        T, B, _ = x.shape
        r = _Rows(_plain._np(x), w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, opts, _plain._bs_np(batch_sizes), reverse)
        out, out_np = _plain._new((T, B, w_hh.shape[1]), x.dtype)
        h_n = h0.detach().clone(memory_format=torch.contiguous_format)
        c_n = c0.detach().clone(memory_format=torch.contiguous_format)
        mkl = HAVE_MKL and x.dtype == torch.float32
        with PackScratch() as pk:
            args = r.fwd_args(pk, h_n.numpy(), c_n.numpy(), out_np)
            _plain.run_rows(lambda k, r0, r1: KP.layer_rows_fwd(SGEMM, mkl, *args, r0, r1), B, nparts)
        ctx.save_for_backward(x, w_ih, b_ih, ln_ih, w_hh, w_hr, h0, c0, out, peephole, ln_hh, ln_cell_w, ln_cell_b,
                              b_hh)
        ctx.rows, ctx.nparts = r, nparts
        ctx.meta = (batch_sizes, reverse, opts, nparts)
        return out, h_n, c_n

    @staticmethod
    @differentiable(_rows_layer_reference)
    def backward(ctx, grad_out, grad_h, grad_c):
        h0, c0, out = ctx.saved_tensors[6:9]
        r, nparts = ctx.rows, ctx.nparts
        T, B, I = r.x.shape
        dh = grad_h.detach().clone(memory_format=torch.contiguous_format)
        dc = grad_c.detach().clone(memory_format=torch.contiguous_format)
        mkl = HAVE_MKL and grad_out.dtype == torch.float32
        with PackScratch() as pk:
            args = r.bwd_args(pk, _plain._np(h0), _plain._np(c0), out.numpy(), _plain._np(grad_out), dh.numpy(),
                              dc.numpy(), nparts)
            _plain.run_rows(lambda k, r0, r1: KP.layer_rows_bwd(SGEMM, mkl, *args, *r.acc[k], r0, r1), B, nparts)
        # the weight products, split by steps among the threads (each its own partial sums)
        ng = ctx.needs_input_grad
        dx, dx_np = _plain._new((T, B, I) if ng[0] else (0, B, I), grad_out.dtype)
        spans = _time_spans(T, nparts)
        gargs = r.grads_args(spans)
        _run_spans(lambda k: KP.layer_rows_grads(SGEMM, mkl, *gargs, dx_np, *r.dws[k], *spans[k]), len(spans))
        dw_ih, db, db2, dln_ih, dw_hh, dw_hr, dpe, dln_g, dlnc_w, dlnc_b = r.grads()
        return (dx if ng[0] else None, dw_ih, db, db2, dln_ih, dw_hh, dw_hr, dh, dc,
                dpe if ng[9] else None, dln_g if ng[10] else None, dlnc_w if ng[11] else None,
                dlnc_b if ng[12] else None, None, None, None, None)


# the tensors of one layer in _RowsStackFn's inputs, in this order
_STACK_SLOTS = ("w_ih", "b_ih", "b_hh", "ln_ih", "w_hh", "w_hr", "peephole", "ln_hh", "ln_cell_w", "ln_cell_b")


def _rows_stack_reference(ctx) -> tuple:
    x, h0, c0, _, *params = ctx.saved_tensors
    n = len(_STACK_SLOTS)

    def fn(meta, x, h0, c0, *params):
        opts, batch_sizes, _ = meta
        weights, lns, layer_opts = [], [], []
        for layer, o in enumerate(opts):
            w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, pe, ln_hh, lnc_w, lnc_b = params[layer * n:(layer + 1) * n]
            weights += [w for w in (w_ih, w_hh, b_ih, b_hh, w_hr) if w is not None]
            lns.append(ln_ih)
            layer_opts.append(_with_params(o, pe, ln_hh, lnc_w, lnc_b))
        return reference.stack(x, h0, c0, weights, num_layers=len(opts), D=1, has_biases=params[1] is not None,
                               proj_size=int(params[5] is not None), batch_sizes=batch_sizes, opts=layer_opts,
                               ln_ih=lns)

    return (ctx.meta, x, h0, c0, *params), fn


class _RowsStackFn(torch.autograd.Function):
    """A unidirectional stack with variants as one autograd node, its batch rows shared by several
    threads through every layer: forward is one threaded call (each part runs its rows through all
    layers, ``layer_rows_fwd``: rows are independent at every layer); backward is one threaded call
    for the recurrences of all layers, last first, each part passing the gradient of its rows of a
    layer's input to the layer below (``layer_rows_bwd``, ``rows_input_grad``), then one for every
    layer's weight products, split by steps (``layer_rows_grads``): three threaded calls in all,
    where a node per layer (:class:`_RowsLayerFn`) takes three a layer, and the Python around them.

    Inputs: (meta, x (T, B, I), h0 (L, B, P), c0 (L, B, H), then per layer the tensors named in
    ``_STACK_SLOTS``, None where absent); meta = (opts per layer, batch_sizes, nparts)."""

    @staticmethod
    def forward(ctx, meta, x, h0, c0, *params):
        opts, batch_sizes, nparts = meta
        T, B, _ = x.shape
        L, _, P = h0.shape
        dt = x.dtype
        n = len(_STACK_SLOTS)
        bs = _plain._bs_np(batch_sizes)
        out, out_np = _plain._new((T, B, P), dt)
        ys = [np.empty((T, B, P), _plain._NP_DTYPE[dt]) for _ in range(L - 1)] + [out_np]
        layers = []
        for layer in range(L):
            p = params[layer * n:(layer + 1) * n]
            layers.append(_Rows(_plain._np(x) if layer == 0 else ys[layer - 1], *p[:6], opts[layer], bs, False))
        h_n = h0.detach().clone(memory_format=torch.contiguous_format)
        c_n = c0.detach().clone(memory_format=torch.contiguous_format)
        h_np, c_np = h_n.numpy(), c_n.numpy()
        mkl = HAVE_MKL and dt == torch.float32
        with PackScratch() as pk:
            args = [r.fwd_args(pk, h_np[layer], c_np[layer], ys[layer]) for layer, r in enumerate(layers)]

            def part(k: int, r0: int, r1: int) -> None:
                for a in args:
                    KP.layer_rows_fwd(SGEMM, mkl, *a, r0, r1)

            _plain.run_rows(part, B, nparts)
        ctx.save_for_backward(x, h0, c0, out, *params)
        ctx.layers, ctx.ys, ctx.nparts, ctx.meta = layers, ys, nparts, meta
        return out, h_n, c_n

    @staticmethod
    @differentiable(_rows_stack_reference)
    def backward(ctx, grad_out, grad_h, grad_c):
        x, h0, c0 = ctx.saved_tensors[:3]
        layers, ys, nparts = ctx.layers, ctx.ys, ctx.nparts
        T, B, I = x.shape
        L = len(layers)
        dt = grad_out.dtype
        npd = _plain._NP_DTYPE[dt]
        ng = ctx.needs_input_grad
        dh = grad_h.detach().clone(memory_format=torch.contiguous_format)
        dc = grad_c.detach().clone(memory_format=torch.contiguous_format)
        dh_np, dc_np, h0_np, c0_np = dh.numpy(), dc.numpy(), _plain._np(h0), _plain._np(c0)
        gys = [np.empty(y.shape, npd) for y in ys[:-1]] + [_plain._np(grad_out)]  # gradients of the outputs
        mkl = HAVE_MKL and dt == torch.float32
        with PackScratch() as pk:
            work = []
            for layer in reversed(range(L)):
                r = layers[layer]
                args = r.bwd_args(pk, h0_np[layer], c0_np[layer], ys[layer], gys[layer], dh_np[layer], dc_np[layer],
                                  nparts)
                if layer > 0:
                    with serial_blas(True):
                        wp_ih = pk.pack(r.w_ih, B, False)
                work.append((r, args, wp_ih if layer > 0 else None, gys[layer - 1] if layer > 0 else None))

            def part(k: int, r0: int, r1: int) -> None:
                for r, args, wp_ih, gx in work:
                    KP.layer_rows_bwd(SGEMM, mkl, *args, *r.acc[k], r0, r1)
                    if gx is not None:
                        KP.rows_input_grad(SGEMM, mkl, r.dp, r.w_ih, wp_ih, gx, r0, r1)

            _plain.run_rows(part, B, nparts)
        # every layer's weight products, split by steps (dx of the stack's input with the first layer's)
        dx, dx_np = _plain._new((T, B, I) if ng[1] else (0, B, I), dt)
        spans = _time_spans(T, nparts)
        gargs = [(r, r.grads_args(spans), dx_np if layer == 0 else np.empty((0, B, r.x.shape[2]), npd))
                 for layer, r in enumerate(layers)]

        def grads(k: int) -> None:
            for r, a, dxl in gargs:
                KP.layer_rows_grads(SGEMM, mkl, *a, dxl, *r.dws[k], *spans[k])

        _run_spans(grads, len(spans))
        dparams = []
        for r in layers:
            dparams.extend(r.grads())
        dparams = [d if need else None for d, need in zip(dparams, ng[4:])]
        return (None, dx if ng[1] else None, dh, dc, *dparams)


def stack_rows_train(x: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor], opts: list[LayerOptions],
                     ln_ih: Optional[list[Tensor]], *, num_layers: int, has_biases: bool, proj_size: int,
                     batch_sizes: Optional[Tensor]):
    """A differentiable unidirectional stack with variants as one autograd node, by batch rows on
    several threads (:class:`_RowsStackFn`): (out (T,B,P), h_n (L,B,P), c_n (L,B,H)), or
    NotImplemented where :func:`numba_cpu.rows_train` would not run every layer by rows with the
    same number of threads (the per-layer path decides then).

    weights: torch.nn.LSTM's _flat_weights order; opts, ln_ih: per layer."""
    T, B, I = x.shape
    H = c0.shape[2]
    P = h0.shape[2]
    opts = [o if o is not None else LayerOptions() for o in opts]
    parts = {_plain.rows_train(T, B, K, H, P, x.dtype, False, num_layers) for K in (I, P)}  # layer 0, the others
    if len(parts) != 1 or min(parts) < 1:
        return NotImplemented
    for name, t in (("h0", h0), ("c0", c0), *((f"weights[{k}]", w) for k, w in enumerate(weights))):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype}, got {t.dtype}")
    per = len(weights) // num_layers
    params: list = []
    for layer in range(num_layers):
        w = weights[layer * per:(layer + 1) * per]
        o = opts[layer]
        params += [w[0], w[2] if has_biases else None, w[3] if has_biases else None,
                   ln_ih[layer] if ln_ih is not None else None, w[1], w[-1] if proj_size > 0 else None,
                   o.peephole, o.ln_hh, o.ln_cell_w, o.ln_cell_b]
    return _RowsStackFn.apply((opts, batch_sizes, min(parts)), x, h0, c0, *params)


def layer_rows_train(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], ln_ih: Optional[Tensor],
                     w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, batch_sizes: Optional[Tensor],
                     reverse: bool, opts: Optional[LayerOptions], *, num_layers: int = 1):
    """A differentiable layer-direction from its input (projection included), its rows on several
    threads (:class:`_RowsLayerFn`): (out (T,B,P), h_n, c_n), or NotImplemented where
    :func:`numba_cpu.rows_train` leaves it to the other paths (num_layers: of the stack it is in)."""
    T, B, I = x.shape
    H = c0.shape[1]
    P = w_hh.shape[1]
    nparts = _plain.rows_train(T, B, I, H, P, x.dtype, opts is None and ln_ih is None, num_layers)
    if nparts < 1:
        return NotImplemented
    for name, t in (("w_ih", w_ih), ("w_hh", w_hh), ("h0", h0), ("c0", c0)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype}, got {t.dtype}")
    o = opts if opts is not None else LayerOptions()
    return _RowsLayerFn.apply(x, w_ih, b_ih, b_hh, ln_ih, w_hh, w_hr, h0, c0, o.peephole, o.ln_hh, o.ln_cell_w,
                              o.ln_cell_b, batch_sizes, bool(reverse), o, nparts)


def plain_stack_rows(x: Tensor, views: tuple, packed: tuple, num_layers: int, has_bias: bool, has_proj: bool,
                     bs: np.ndarray, h: np.ndarray, c: np.ndarray, out: np.ndarray, nparts: int) -> None:
    """:func:`stack_rows` for the plain LSTM (every option off)."""
    T, B, _ = x.shape
    ko = _Opts(LayerOptions(), T, B, c.shape[2], h.shape[2], x.dtype)
    stack_rows(x, views, packed, num_layers, has_bias, has_proj, np.zeros((num_layers, 0), _plain._NP_DTYPE[x.dtype]),
               [ko] * num_layers, bs, h, c, out, nparts)


def lstm_stack_variants(
    x: Tensor,                                  # (T, B, I)
    h0: Tensor,                                 # (L, B, P)
    c0: Tensor,                                 # (L, B, H)
    weights: list[Tensor],                      # torch.nn.LSTM's _flat_weights order (unidirectional)
    opts: list[LayerOptions],                   # per layer
    ln_ih: Optional[list[Tensor]],              # per layer input layer-norm gains, or None
    *,
    num_layers: int,
    has_biases: bool,
    proj_size: int,
    batch_sizes: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """A unidirectional stack with variants, without gradients: by batch rows (:func:`stack_rows`,
    on several threads, or as one part on this thread where none would help:
    ``numba_cpu.one_row_part``) or as a pipeline of (layer, chunk) tasks on several threads
    (``kernels.numba_parallel.stack_fwd_tasks_variants``): (out, h_n, c_n)."""
    dtype = x.dtype
    T, B, I = x.shape
    H = c0.shape[2]
    P = h0.shape[2]
    npd = _plain._NP_DTYPE[dtype]
    kos = [_Opts(o, T, B, H, P, dtype) for o in opts]
    per = [T * B, B] + [0, 0] * bool(has_biases) + [B] * (proj_size > 0)
    views, packed = _plain._prepared(weights, dtype, lambda: per * num_layers)
    stacked = [np.stack([ko.args()[i] for ko in kos]) for i in range(9)]
    ln = np.stack([_plain._np(g) for g in ln_ih]) if ln_ih is not None else np.zeros((num_layers, 0), npd)
    out, out_np = _plain._new((T, B, P), dtype)
    h_n, h_np = _plain._new(tuple(h0.shape), dtype)
    c_n, c_np = _plain._new(tuple(c0.shape), dtype)
    h_np[:] = _plain._np(h0)
    c_np[:] = _plain._np(c0)
    bs = _plain._bs_np(batch_sizes)
    nparts = _plain.stack_rows_parts(T, B, H, P, num_layers, 1, dtype)
    if nparts > 1 or num_layers == 1 or _plain.parallel_threads(T, B, I, H, P, num_layers, 1, dtype) < 2:
        stack_rows(x, views, packed, num_layers, bool(has_biases), proj_size > 0, ln, kos, bs, h_np, c_np, out_np,
                   nparts)
        return out, h_n, c_n
    ys = np.empty((num_layers, T, B, P), npd)
    sched = np.zeros(2 * num_layers, np.int64)
    abort = np.zeros(1, np.int64)
    chunk = _plain.pipe_chunk(T, B)

    def run() -> None:
        KP.stack_fwd_tasks_variants(SGEMM, True, _plain.SCHED_YIELD, sched, abort, chunk, _plain._np(x), views, packed,
                                    num_layers, bool(has_biases), proj_size > 0, bs, h_np, c_np, ys, ln, LN_EPS,
                                    *stacked)

    if not _plain._run_threads([run] * _plain.parallel_threads(T, B, I, H, P, num_layers, 1, dtype), abort):
        return NotImplemented
    out_np[:] = ys[-1]
    return out, h_n, c_n


def prefers_stack_variants(T: int, B: int, I: int, H: int, P: int, num_layers: int, bidirectional: bool,
                           dtype: torch.dtype) -> bool:
    """Whether :func:`lstm_stack_variants` runs this shape (several threads pay off, or its row
    kernels as one part beat the per-layer path: ``numba_cpu.one_row_part``)."""
    if bidirectional:
        return False
    if _plain.stack_rows_parts(T, B, H, P, num_layers, 1, dtype) > 1 or _plain.one_row_part(T, B, I, H, P, dtype):
        return True
    return num_layers > 1 and _plain.parallel_threads(T, B, I, H, P, num_layers, 1, dtype) > 1
