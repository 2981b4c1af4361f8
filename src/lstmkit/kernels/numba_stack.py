"""A whole stacked LSTM for training in two compiled calls: forward (saving what backward needs)
and backward (gradients of the input, the initial state and every weight).

The per-layer kernels of ``numba_lstm`` do the recurrences; this module adds the input
projections, the weight gradients and the walk over layers and directions, so that a training
step costs one call into compiled code each way instead of a dozen autograd nodes per layer.

Dimension legend
    T  time steps     B  batch rows     I  input features of a layer (the first: the input's,
    H  hidden size    G  = 4H           later: Q)
    P  proj_size if > 0, else H         Q  = D * P, the output width of a layer
    L  layers         D  directions     n  = T * B rows of the flattened products

Weights come as in ``numba_lstm.stack_fwd``: a tuple of 2-D C-contiguous arrays in
torch.nn.LSTM's _flat_weights order, biases as (1, G); per layer and direction
w_ih (G, I), w_hh (G, P), [b_ih (1, G), b_hh (1, G)], [w_hr (P, H)].
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._cache import tie_module
from .numba_blas import NO_TRANS, ROW_MAJOR, TRANS, call_int_int, call_sgemm, unowned, wide_vectors
from .numba_lstm import _JIT, SMALL_FLOPS, SMALL_FLOPS_MKL, layer_bwd, layer_fwd, mm

_ZERO32 = np.float32(0.0)
_ONE32 = np.float32(1.0)


@njit(**_JIT)
def mm_tn(sgemm, mkl, a, b, out, acc):
    """out = a.T @ b, or out += a.T @ b when ``acc`` (a weight gradient summed over rows).

    a   (n, M) C-contiguous     b (n, N) C-contiguous     out (M, N) C-contiguous
    """
    wide_vectors()
    n, M = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    if n * M * N <= (SMALL_FLOPS_MKL if mkl else SMALL_FLOPS):
        if not acc:
            out[:] = 0
        for r in range(n):
            arow = a[r]
            brow = b[r]
            for i in range(M):
                av = arow[i]
                orow = out[i]
                for j in range(N):
                    orow[j] += av * brow[j]
    elif mkl:
        call_sgemm(sgemm, ROW_MAJOR, TRANS, NO_TRANS, M, N, n, a.ctypes.data, M, b.ctypes.data, N,
                   _ONE32 if acc else _ZERO32, out.ctypes.data, N)
    elif acc:
        out += np.dot(a.T, b)
    else:
        np.dot(a.T, b, out)


@njit(**_JIT)
def stack_train_fwd(sgemm, mkl, set_threads, threads, x, h0, c0, ws, wps, num_layers, num_dirs, has_bias, has_proj,
                    bs, h_n, c_n, ys, gates, cs):
    """The forward of a stacked (bidirectional) LSTM, saving what :func:`stack_train_bwd` needs.

    set_threads, threads  with MKL, sequence-wide products run on ``threads[0]`` threads and the
                          per-step ones on ``threads[1]`` (``set_threads``: the address
                          ``numba_blas.SET_THREADS``); 0 leaves MKL's setting as it is

    x      (T, B, I)          input, C-contiguous
    h0     (L*D, B, P)        initial hidden states
    c0     (L*D, B, H)        initial cell states
    ws     tuple              the weights (module docstring)
    wps    tuple of 1-D       one per entry of ws: that matrix packed for ``a @ w.T``, or (0,)
    bs     (T,)               active rows per step, or (0,)
    h_n    (L*D, B, P)        written
    c_n    (L*D, B, H)        written
    ys     (L, T, B, Q)       written: every layer's output (ys[L-1] is the stack's output)
    gates  (L*D, T, B, G)     written: gate activations of every layer-direction
    cs     (L*D, T, B, H)     written: cell states after every step
    """
    wide_vectors()
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    G = 4 * H
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    no_proj = np.empty((0, H), x.dtype)
    no_bias = np.empty(0, x.dtype)
    xg = np.empty((T, B, G), x.dtype)
    xg2 = xg.reshape(T * B, G)
    inp = x.reshape(T * B, x.shape[2])
    for layer in range(num_layers):
        dst = ys[layer]
        for d in range(num_dirs):
            k = (layer * num_dirs + d) * per
            idx = layer * num_dirs + d
            if mkl and threads[0] > 0:
                call_int_int(set_threads, threads[0])
            mm(sgemm, mkl, inp, ws[k], wps[k], True, xg2)
            if mkl and threads[1] > 0:
                call_int_int(set_threads, threads[1])
            bias = ws[k + 2][0] + ws[k + 3][0] if has_bias else no_bias
            w_hr = ws[k + per - 1] if has_proj else no_proj
            w_hr_p = wps[k + per - 1] if has_proj else wps[k + 1]
            h_n[idx] = h0[idx]
            c_n[idx] = c0[idx]
            layer_fwd(sgemm, mkl, xg, bias, ws[k + 1], wps[k + 1], w_hr, w_hr_p, h_n[idx], c_n[idx], bs,
                      d == 1, dst, d * P, gates[idx], cs[idx])
        inp = dst.reshape(T * B, dst.shape[2])


@njit(**_JIT)
def _prev_h(y, col0, h0, bs, reverse, hprev):
    """hprev[t, b] = the h that step t of row b started from: h0 at the row's first step, else
    the direction's output at the step before in processing order; zeros at inactive rows.

    y (T, B, Q), its columns col0 .. col0+P; h0 (B, P); hprev (T, B, P) written
    """
    wide_vectors()
    y, h0, bs, hprev = unowned(y), unowned(h0), unowned(bs), unowned(hprev)
    T, B, P = hprev.shape
    for t in range(T):
        nb = B if bs.shape[0] == 0 else bs[t]
        if reverse:
            nxt = 0 if t == T - 1 else (B if bs.shape[0] == 0 else bs[t + 1])
        else:
            nxt = 0 if t == 0 else nb  # active at t means active at t - 1
        for b in range(nb):
            hr = hprev[t, b]
            if b < nxt:
                src = y[t + 1, b, col0:col0 + P] if reverse else y[t - 1, b, col0:col0 + P]
                for j in range(P):
                    hr[j] = src[j]
            else:
                h0r = h0[b]
                for j in range(P):
                    hr[j] = h0r[j]
        for b in range(nb, B):
            hprev[t, b] = 0


@njit(**_JIT)
def weight_grads(sgemm, mkl, dgates, inp, y, col0, h0, bs, reverse, hprev, dhs, hps, dw_ih, dw_hh, db_ih, db_hh,
                 has_bias, dw_hr):
    """The weight gradients of one layer-direction, one product each over all T * B rows.

    dgates (T, B, G)   gradient of the pre-activations (zeros at inactive rows)
    inp    (T*B, I)    the layer's input
    y      (T, B, Q)   the layer's output, the direction's columns col0 .. col0 + P
    h0     (B, P)      the direction's initial h
    hprev  (T, B, P)   scratch
    dhs, hps           from ``numba_lstm.layer_bwd`` when projecting ((0, B, *) otherwise)
    dw_ih (G, I), dw_hh (G, P), db_ih (1, G), db_hh (1, G), dw_hr (P, H): written (the biases
    only with has_bias, dw_hr only when projecting)
    """
    wide_vectors()
    grads_hh(sgemm, mkl, dgates, y, col0, h0, bs, reverse, hprev, dw_hh)
    grads_ih(sgemm, mkl, dgates, inp, dhs, hps, dw_ih, db_ih, db_hh, has_bias, dw_hr)


@njit(**_JIT)
def grads_hh(sgemm, mkl, dgates, y, col0, h0, bs, reverse, hprev, dw_hh):
    """dw_hh of :func:`weight_grads`: sum over steps of dgates_t^T h_{t-1}."""
    wide_vectors()
    T, B, G = dgates.shape
    P = hprev.shape[2]
    _prev_h(y, col0, h0, bs, reverse, hprev)
    mm_tn(sgemm, mkl, dgates.reshape(T * B, G), hprev.reshape(T * B, P), dw_hh, False)


@njit(**_JIT)
def grads_ih(sgemm, mkl, dgates, inp, dhs, hps, dw_ih, db_ih, db_hh, has_bias, dw_hr):
    """dw_ih, the biases and dw_hr of :func:`weight_grads`."""
    wide_vectors()
    dgates, inp, dhs, hps, dw_ih, db_ih, db_hh, dw_hr = (
        unowned(dgates), unowned(inp), unowned(dhs), unowned(hps), unowned(dw_ih), unowned(db_ih), unowned(db_hh),
        unowned(dw_hr))
    T, B, G = dgates.shape
    n = T * B
    dg2 = dgates.reshape(n, G)
    mm_tn(sgemm, mkl, dg2, inp, dw_ih, False)
    if has_bias:
        db = db_ih[0]
        db[:] = 0
        for r in range(n):
            dgr = dg2[r]
            for j in range(G):
                db[j] += dgr[j]
        db_hh[0] = db
    if dhs.shape[0] > 0:
        mm_tn(sgemm, mkl, dhs.reshape(n, dhs.shape[2]), hps.reshape(n, hps.shape[2]), dw_hr, False)


@njit(**_JIT)
def stack_train_bwd(sgemm, mkl, set_threads, threads, x, h0, c0, ws, wpbs, num_layers, num_dirs, has_bias, has_proj,
                    bs, ys, gates, cs, grad_out, grad_hn, grad_cn, dx, dh0, dc0, dws):
    """Backward of :func:`stack_train_fwd` (``set_threads``, ``threads`` as there).

    x, h0, c0, ws, bs      as given to the forward; ys, gates, cs: what it saved
    wpbs     tuple of 1-D  one per entry of ws: that matrix packed for ``a @ w`` (``pack_b`` with
                           transpose=False), or (0,)
    grad_out (T, B, Q)     gradient of the stack's output
    grad_hn  (L*D, B, P)   gradient of h_n
    grad_cn  (L*D, B, H)   gradient of c_n
    dx       (T, B, I)     written
    dh0      (L*D, B, P)   written
    dc0      (L*D, B, H)   written
    dws      tuple         written: the gradient of each entry of ws, same shapes
    """
    wide_vectors()
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    G = 4 * H
    Q = num_dirs * P
    n = T * B
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    no_proj = np.empty((0, H), x.dtype)
    no_pack = np.empty(0, x.dtype)
    dgates = np.empty((T, B, G), x.dtype)
    dg2 = dgates.reshape(n, G)
    gout = np.empty((T, B, P), x.dtype)
    hprev = np.empty((T, B, P), x.dtype)
    dhs = np.empty((T if has_proj else 0, B, P), x.dtype)
    hps = np.empty((T if has_proj else 0, B, H), x.dtype)
    dy = grad_out.reshape(n, Q)               # gradient of this layer's output
    for layer in range(num_layers - 1, -1, -1):
        if layer == 0:
            inp = x.reshape(n, x.shape[2])
            dinp = dx.reshape(n, x.shape[2])
        else:
            inp = ys[layer - 1].reshape(n, Q)
            dinp = np.empty((n, Q), x.dtype)
        tmp = np.empty((n if num_dirs > 1 else 0, dinp.shape[1]), x.dtype)
        for d in range(num_dirs):
            k = (layer * num_dirs + d) * per
            idx = layer * num_dirs + d
            w_ih = ws[k]
            w_hh = ws[k + 1]
            if has_proj:
                w_hr = ws[k + per - 1]
                w_hr_p = wpbs[k + per - 1]
            else:
                w_hr = no_proj
                w_hr_p = no_pack
            g2 = gout.reshape(n, P)
            for r in range(n):
                g2[r] = dy[r, d * P:(d + 1) * P]
            dh = dh0[idx]
            dc = dc0[idx]
            dh[:] = grad_hn[idx]
            dc[:] = grad_cn[idx]
            if mkl and threads[1] > 0:
                call_int_int(set_threads, threads[1])
            layer_bwd(sgemm, mkl, gates[idx], cs[idx], c0[idx], w_hh, wpbs[k + 1], w_hr, w_hr_p, gout, dh, dc,
                      bs, d == 1, dgates, dhs, hps)
            if mkl and threads[0] > 0:
                call_int_int(set_threads, threads[0])
            weight_grads(sgemm, mkl, dgates, inp, ys[layer], d * P, h0[idx], bs, d == 1, hprev, dhs, hps,
                         dws[k], dws[k + 1], dws[k + 2] if has_bias else dws[k], dws[k + 3] if has_bias else dws[k],
                         has_bias, dws[k + per - 1])
            # gradient of the layer's input
            if d == 0:
                mm(sgemm, mkl, dg2, w_ih, no_pack, False, dinp)
            else:
                mm(sgemm, mkl, dg2, w_ih, no_pack, False, tmp)
                dinp += tmp
        dy = dinp


# the on-disk cache follows edits of the kernel files compiled into these kernels (``_cache``)
tie_module(globals())
