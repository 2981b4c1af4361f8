"""Fused LSTM kernels for the CPU, compiled with Numba: plain functions on NumPy arrays.

Dimension legend
    T  time steps            B  batch rows             I  input features of a layer
    H  hidden size           G  = 4H gate pre-activations, gate order i, f, g, o (``_gates.py``)
    P  output size of a step: proj_size if > 0, else H
    L  layers                D  directions (1 or 2)    Q  = D * P, the output width of a layer

Conventions
    * ``bs`` (T,) int64 is the number of active rows at each step (rows are sorted by length,
      PackedSequence order); an empty array means every row is active at every step.
    * An absent optional matrix (no projection, no bias, nothing saved) is passed as an array with
      a zero-sized first dimension, so every kernel has a single signature per dtype.
    * float32 uses a clamped rational approximation of tanh that vectorizes (``math.tanh`` is a
      scalar libm call; max error 2.6e-7); float64 uses the exact functions. Every gate activation
      is one tanh: sigmoid(x) = 0.5 tanh(0.5 x) + 0.5. Backward recomputes tanh(c) with the same
      function as forward, so the gradients are those of the function actually computed.
    * Products (:func:`mm`): tiny ones and those of one or two rows are hand-written loops over a
      transposed copy of the weights; the rest call MKL's ``cblas_sgemm_compute`` from torch's
      library (float32; weights packed once per sequence, ``numba_blas``) or ``np.dot`` (SciPy's
      BLAS: float64, and float32 where MKL is missing).
    * Kernels with per-step loops (here, in ``numba_stack``, ``numba_parallel`` and
      ``numba_variants``) first rebind the arrays their loops take views of or pass on at every
      step or chunk, and their own step buffers, to ``numba_blas.unowned`` views: Numba counts a
      reference, atomically, on the owner of every view a loop takes and of every array argument
      a compiled callee receives, which costs more than a small step's arithmetic and, on arrays
      the threads share, contends between the cores. The callers keep the arguments alive; a
      kernel's own buffers are kept alive to its end (``numba_blas.keep``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic, overload

from ._cache import tie_module
from .numba_blas import NO_TRANS, PACKED, ROW_MAJOR, TRANS, WT_MAX_ROWS, call_sgemm, keep, unowned, wide_vectors

_JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)
# The activations are inlined at Numba's level: calls into separately cached functions cannot be
# inlined by LLVM, and a call per element keeps the loops scalar (5.5 ns against 1.8 ns a cell).

# multiply-adds below which a hand-written loop beats a call to SciPy's BLAS / to MKL
SMALL_FLOPS = 24 * 1024
SMALL_FLOPS_MKL = 2 * 1024
# ... and below which a loop over a transposed copy of the weights does (it vectorizes)
SMALL_FLOPS_WT = 32 * 1024
# weights (N*K elements) up to which products of at most WT_MAX_ROWS rows on the weights as stored
# run as hand-written dot products rather than a BLAS call
DOT_MAX_SIZE = 64 * 1024
# hidden sizes from which the elementwise step goes row by row (L1-resident rows)
ROW_MIN_H = 64
_ZERO32 = np.float32(0.0)


@intrinsic
def address_as(typingctx, addr, like):
    """A pointer of ``like``'s dtype to the integer address ``addr`` (for ``numba.carray``)."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(types.intp, like), codegen


# Eigen's rational approximation of tanh (float32): odd numerator of degree 13, even denominator
# of degree 6, exact to a few ulp on the clamped range; beyond it tanh rounds to +-1 in float32.
_CLAMP = np.float32(7.90531110763549805)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)
_HALF32 = np.float32(0.5)


def act_tanh(x):
    """tanh as the kernels compute it (the Python form is only for typing; see the overload)."""
    return math.tanh(x)


def act_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(inline="always", **_JIT)
def _tanh32(x):
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


@overload(act_tanh, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _ov_tanh(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def tanh32(x):
            return _tanh32(x)
        return tanh32
    return lambda x: math.tanh(x)


@overload(act_sigmoid, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _ov_sigmoid(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def sig32(x):
            return _HALF32 * _tanh32(_HALF32 * x) + _HALF32
        return sig32
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@njit(inline="always", **_JIT)
def _dot_rows(a, w, out):
    """out = a @ w.T for a few rows of a, on w as stored: four rows of w at a time, each a
    contiguous dot product with the row of a (vectorized reductions; ~3x a BLAS call on a
    (1, 32) @ (32, 128) product, as fast up to (1, 128) @ (128, 512))."""
    n, K = a.shape
    N = out.shape[1]
    zero = out.dtype.type(0.0)
    for r in range(n):
        ar = a[r]
        orow = out[r]
        j = 0
        while j + 4 <= N:
            w0 = w[j]
            w1 = w[j + 1]
            w2 = w[j + 2]
            w3 = w[j + 3]
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            for k in range(K):
                av = ar[k]
                a0 += av * w0[k]
                a1 += av * w1[k]
                a2 += av * w2[k]
                a3 += av * w3[k]
            orow[j] = a0
            orow[j + 1] = a1
            orow[j + 2] = a2
            orow[j + 3] = a3
            j += 4
        while j < N:
            wr = w[j]
            acc = zero
            for k in range(K):
                acc += ar[k] * wr[k]
            orow[j] = acc
            j += 1


@njit(inline="always", **_JIT)
def _row_sums(a, w, out):
    """out = a @ w for a few rows of a, w (K, N) with contiguous rows (the transposed copy of a
    weight): each output row the sum of the rows of w scaled by a's entries, four rows of w a pass
    (the inner loop over N vectorizes, and the output row is loaded and stored a quarter as often
    as one row a pass). For w as stored in the backward's a @ w, MKL's call measured faster (T=1000
    B=1 H=128 training, 2 threads: 7.7 ms against 8.8)."""
    n, K = a.shape
    N = out.shape[1]
    for r in range(n):
        orow = out[r]
        ar = a[r]
        for j in range(N):
            orow[j] = 0
        k = 0
        while k + 4 <= K:
            a0 = ar[k]
            a1 = ar[k + 1]
            a2 = ar[k + 2]
            a3 = ar[k + 3]
            w0 = w[k]
            w1 = w[k + 1]
            w2 = w[k + 2]
            w3 = w[k + 3]
            for j in range(N):
                orow[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
            k += 4
        while k < K:
            av = ar[k]
            wrow = w[k]
            for j in range(N):
                orow[j] += av * wrow[j]
            k += 1


@njit(**_JIT)
def mm(sgemm, mkl, a, w, wp, trans, out):
    """out = a @ w.T if trans else a @ w.

    sgemm      the address of MKL's cblas_sgemm_compute (``numba_blas.SGEMM``), called only when ``mkl``
    mkl        float32 with MKL present: use sgemm, else np.dot (SciPy's BLAS)
    a   (n, K) C-contiguous rows
    w   (N, K) if trans else (K, N), C-contiguous
    wp  (S,)   ``numba_blas.pack_b(w, ..)``: w.T as a (K, N) copy (S = K*N + 1), w packed by
               MKL (other S > 0), or nothing (S = 0)
    out (n, N) written, C-contiguous rows
    """
    n, K = a.shape
    N = out.shape[1]
    if n == 0 or N == 0:
        return
    flops = n * N * K
    wt_copy = trans and wp.shape[0] == K * N + 1
    if wt_copy and (flops <= SMALL_FLOPS_WT or n <= WT_MAX_ROWS):
        _row_sums(a, wp[:K * N].reshape(K, N), out)  # rows of w.T are contiguous
    elif trans and n <= WT_MAX_ROWS and N * K <= DOT_MAX_SIZE:
        _dot_rows(a, w, out)
    elif flops <= (SMALL_FLOPS_MKL if mkl else SMALL_FLOPS):
        if trans:
            _dot_rows(a, w, out)  # four independent sums at a time (one would wait on each add)
        else:
            for r in range(n):
                orow = out[r]
                for j in range(N):
                    orow[j] = 0
                for k in range(K):
                    av = a[r, k]
                    wrow = w[k]
                    for j in range(N):
                        orow[j] += av * wrow[j]
    elif mkl:
        if wp.shape[0] > 0 and not wt_copy:
            call_sgemm(sgemm, ROW_MAJOR, NO_TRANS, PACKED, n, N, K, a.ctypes.data, K, wp.ctypes.data, N,
                       _ZERO32, out.ctypes.data, N)
        elif wt_copy:
            # the transposed copy, not w as stored: MKL measured (64x32)@(32x128) 3.4 against 3.7 us,
            # (16x32)@(32x128) 0.9 against 1.3 us
            call_sgemm(sgemm, ROW_MAJOR, NO_TRANS, NO_TRANS, n, N, K, a.ctypes.data, K, wp.ctypes.data, N,
                       _ZERO32, out.ctypes.data, N)
        else:
            call_sgemm(sgemm, ROW_MAJOR, NO_TRANS, TRANS if trans else NO_TRANS, n, N, K, a.ctypes.data, K,
                       w.ctypes.data, w.shape[1], _ZERO32, out.ctypes.data, N)
    elif trans:
        np.dot(a, w.T, out)
    else:
        np.dot(a, w, out)


@njit(**_JIT)
def act_coefficients(B, H, bias):
    """Per-element coefficients that make every gate activation one tanh, bias included:
    act = a * tanh(s * (x + bias)) + o.

    sigmoid(x) = 0.5 tanh(0.5 x) + 0.5 (gates i, f, o), tanh(x) = 1 tanh(1 x) + 0 (gate g).
    bias     (G,) added to the pre-activations, or (0,) for none
    returns  (4, B * G): s, a, o, bias tiled over B rows of G = 4H columns
    """
    G = 4 * H
    co = np.empty((4, B * G), bias.dtype)
    for b in range(B):
        for j in range(G):
            half = not (2 * H <= j < 3 * H)
            co[0, b * G + j] = 0.5 if half else 1.0
            co[1, b * G + j] = 0.5 if half else 1.0
            co[2, b * G + j] = 0.5 if half else 0.0
            co[3, b * G + j] = bias[j] if bias.shape[0] > 0 else 0.0
    return co


@njit(inline="always", **_JIT)
def _cell_row(zr, cr, hr, tr, H):
    """c~ = f c + i g, then o * tanh(c~), for one row.

    zr  (G,)  gate activations; cr (H,) c in, c~ out; hr (H,) o * tanh(c~) out; tr (H,) scratch
    """
    zi = zr[:H]
    zfg = zr[H:2 * H]
    zg = zr[2 * H:3 * H]
    zo = zr[3 * H:]
    for j in range(H):
        cr[j] = zfg[j] * cr[j] + zi[j] * zg[j]
    for j in range(H):
        tr[j] = act_tanh(cr[j])
    for j in range(H):
        hr[j] = zo[j] * tr[j]


@njit(inline="always", **_JIT)
def _step_fwd(xt, z, c, hp, tc, co, nb):
    """The elementwise part of one step for the first nb rows.

    xt  (B, G)      input projections of the step
    z   (B, G)      recurrent pre-activations in, gate activations (i, f, g, o) out
    c   (B, H)      c in, c~ out
    hp  (B, H)      o * tanh(c~) out
    tc  (B * H,)    scratch
    co  (4, B * G)  :func:`act_coefficients` ((4, G), one row of it, when H >= ROW_MIN_H)
    """
    G = z.shape[1]
    H = c.shape[1]
    # Short loops over 0-based slices vectorize; a loop that reads and writes z at offsets H apart,
    # or starts at a non-zero index (Numba's negative-index wraparound then hides the affine
    # access), stays scalar. Wide rows are finished one at a time while they sit in L1; narrow
    # ones go through flat loops over all rows, which vectorize even when H is tiny.
    if H >= ROW_MIN_H:
        s = co[0, :G]
        a = co[1, :G]
        o = co[2, :G]
        bb = co[3, :G]
        for b in range(nb):
            xr = xt[b]
            zr = z[b]
            for j in range(G):
                zr[j] = a[j] * act_tanh(s[j] * (xr[j] + zr[j] + bb[j])) + o[j]
            _cell_row(zr, c[b], hp[b], tc[:H], H)
        return
    xf = xt.reshape(xt.size)
    zf = z.reshape(z.size)
    s = co[0]
    a = co[1]
    o = co[2]
    bb = co[3]
    for i in range(nb * G):
        zf[i] = a[i] * act_tanh(s[i] * (xf[i] + zf[i] + bb[i])) + o[i]
    for b in range(nb):
        zr = z[b]
        zi = zr[:H]
        zfg = zr[H:2 * H]
        zg = zr[2 * H:3 * H]
        cr = c[b]
        for j in range(H):
            cr[j] = zfg[j] * cr[j] + zi[j] * zg[j]
    cf = c.reshape(c.size)
    for i in range(nb * H):
        tc[i] = act_tanh(cf[i])
    for b in range(nb):
        zo = z[b, 3 * H:]
        hr = hp[b]
        tr = tc[b * H:(b + 1) * H]
        for j in range(H):
            hr[j] = zo[j] * tr[j]


@njit(**_JIT)
def layer_fwd(sgemm, mkl, xg, bias, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse, out, col0, gates, cs):
    """One layer-direction over all steps; the state (h, c) is updated in place.

    sgemm, mkl         the GEMM (see :func:`mm`)
    xg     (T, B, G)   input projections, C-contiguous
    bias   (G,)        added to xg (b_ih + b_hh), or (0,) when xg includes the biases
    w_hh   (G, P)      recurrent weights
    w_hh_p (S,)        w_hh packed for ``h @ w_hh.T``, or (0,)
    w_hr   (P, H)      projection weights, or (0, H) for none
    w_hr_p (S,)        w_hr packed for ``hp @ w_hr.T``, or (0,)
    h      (B, P)      initial hidden state in, final (h_n) out
    c      (B, H)      initial cell state in, final (c_n) out
    bs     (T,)        active rows per step, or (0,) for all
    reverse            run t = T-1 .. 0
    out    (T, B, Q)   h of every step written to columns col0 .. col0+P; zeros at inactive rows
    col0               first output column (D*P wide outputs of bidirectional layers)
    gates  (T, B, G)   i, f, g, o activations saved for backward, or (0, B, G) to save nothing
    cs     (T, B, H)   c after every step (every row: inactive rows carry theirs), or (0, B, H)
    """
    wide_vectors()
    xg, w_hh, w_hr, h, c, out, gates, cs = (unowned(xg), unowned(w_hh), unowned(w_hr), unowned(h), unowned(c),
                                            unowned(out), unowned(gates), unowned(cs))
    T, B, G = xg.shape
    H = G // 4
    P = h.shape[1]
    save = gates.shape[0] > 0
    proj = w_hr.shape[0] > 0
    z = np.empty((B, G), xg.dtype)        # recurrent pre-activations, then gate activations
    hp = np.empty((B, H), xg.dtype)       # o * tanh(c) before the projection
    hr = np.empty((B, P), xg.dtype)       # projected h
    tc = np.empty(B * H, xg.dtype)
    co = act_coefficients(B if H < ROW_MIN_H else 1, H, bias)  # rows of H >= ROW_MIN_H read one row of it
    own = (z, hp, hr, tc, co)             # kept alive to the end: their views below are unowned
    z, hp, hr, tc, co = unowned(z), unowned(hp), unowned(hr), unowned(tc), unowned(co)
    for s in range(T):
        t = T - 1 - s if reverse else s
        nb = B if bs.shape[0] == 0 else bs[t]
        for b in range(nb, B):
            out[t, b, col0:col0 + P] = 0
        if nb > 0:
            zt = z[:nb]
            mm(sgemm, mkl, h[:nb], w_hh, w_hh_p, True, zt)
            _step_fwd(xg[t], z, c, hp, tc, co, nb)
            if proj:
                mm(sgemm, mkl, hp[:nb], w_hr, w_hr_p, True, hr[:nb])
                src = hr
            else:
                src = hp
            for b in range(nb):
                orow = out[t, b, col0:col0 + P]
                hrow = h[b]
                srow = src[b]
                for j in range(P):
                    v = srow[j]
                    hrow[j] = v
                    orow[j] = v
            if save:
                gates[t, :nb] = zt
        if save:
            for b in range(nb, B):
                for j in range(G):
                    gates[t, b, j] = 0
            cs[t] = c
    keep(own)


@njit(inline="always", **_JIT)
def _step_bwd(gt, ct, cprev, dhs, dc, dg, tc, nb):
    """The elementwise backward of one step for the first nb rows.

    gt     (B, G)   saved gate activations i, f, g, o
    ct     (B, H)   saved c~ of the step
    cprev  (B, H)   c before the step
    dhs    (B, H)   gradient of o * tanh(c~)
    dc     (B, H)   gradient of c~ from the later steps in, gradient of c before the step out
    dg     (B, G)   written: gradient of the pre-activations
    tc     (B * H,) written: tanh(c~)
    """
    H = ct.shape[1]
    one = gt.dtype.type(1.0)
    cf = ct.reshape(ct.size)
    for i in range(nb * H):
        tc[i] = act_tanh(cf[i])
    # one short loop per result: each reads few arrays, so the compiler's overlap checks stay
    # within its limit and the loop vectorizes (one fused loop stays scalar)
    for b in range(nb):
        g = gt[b]
        gi = g[:H]
        gf = g[H:2 * H]
        gg = g[2 * H:3 * H]
        go = g[3 * H:]
        d = dg[b]
        di = d[:H]
        df = d[H:2 * H]
        dgg = d[2 * H:3 * H]
        do = d[3 * H:]
        tr = tc[b * H:(b + 1) * H]
        dhr = dhs[b]
        dcr = dc[b]
        cp = cprev[b]
        for j in range(H):
            do[j] = dhr[j] * tr[j] * go[j] * (one - go[j])
        for j in range(H):
            dcr[j] += dhr[j] * go[j] * (one - tr[j] * tr[j])
        for j in range(H):
            di[j] = dcr[j] * gg[j] * gi[j] * (one - gi[j])
        for j in range(H):
            df[j] = dcr[j] * cp[j] * gf[j] * (one - gf[j])
        for j in range(H):
            dgg[j] = dcr[j] * gi[j] * (one - gg[j] * gg[j])
        for j in range(H):
            dcr[j] *= gf[j]


@njit(**_JIT)
def layer_bwd(sgemm, mkl, gates, cs, c0, w_hh, w_hh_p, w_hr, w_hr_p, grad_out, dh, dc, bs, reverse,
              dgates, dhs, hps):
    """Backward of :func:`layer_fwd` through all steps (the recurrent part).

    gates    (T, B, G)   saved activations
    cs       (T, B, H)   saved c after every step
    c0       (B, H)      initial cell state
    w_hh     (G, P)      recurrent weights
    w_hh_p   (S,)        w_hh packed for ``dgates @ w_hh``, or (0,)
    w_hr     (P, H)      projection weights, or (0, H)
    w_hr_p   (S,)        w_hr packed for ``dh @ w_hr``, or (0,)
    grad_out (T, B, P)   gradient of the outputs
    dh       (B, P)      gradient of h_n in, of h0 out
    dc       (B, H)      gradient of c_n in, of c0 out
    bs       (T,)        active rows per step, or (0,)
    reverse              the forward ran t = T-1 .. 0
    dgates   (T, B, G)   written: gradient of the pre-activations (= of xg); zeros at inactive rows
    dhs      (T, B, P)   written when projecting: gradient of each step's projected h, else (0, B, P)
    hps      (T, B, H)   written when projecting: o * tanh(c) of each step, else (0, B, H)
    """
    wide_vectors()
    gates, cs, c0, w_hh, w_hr, grad_out, dh, dc, dgates, dhs, hps = (
        unowned(gates), unowned(cs), unowned(c0), unowned(w_hh), unowned(w_hr), unowned(grad_out), unowned(dh),
        unowned(dc), unowned(dgates), unowned(dhs), unowned(hps))
    T, B, G = gates.shape
    H = G // 4
    P = dh.shape[1]
    proj = w_hr.shape[0] > 0
    own = (np.empty((B, P), gates.dtype), np.empty((B, H), gates.dtype), np.empty(B * H, gates.dtype))
    dht, dhp, tcb = unowned(own[0]), unowned(own[1]), unowned(own[2])  # own: kept alive to the end
    for s in range(T):
        t = s if reverse else T - 1 - s
        nb = B if bs.shape[0] == 0 else bs[t]
        for b in range(nb, B):
            for j in range(G):
                dgates[t, b, j] = 0
        if proj:
            for b in range(nb, B):
                for j in range(P):
                    dhs[t, b, j] = 0
                for j in range(H):
                    hps[t, b, j] = 0
        if nb == 0:
            continue
        for b in range(nb):
            for j in range(P):
                dht[b, j] = dh[b, j] + grad_out[t, b, j]
        if proj:
            dhs[t, :nb] = dht[:nb]
            mm(sgemm, mkl, dht[:nb], w_hr, w_hr_p, False, dhp[:nb])
            src = dhp
        else:
            src = dht
        if reverse:
            cprev = c0 if t == T - 1 else cs[t + 1]
        else:
            cprev = c0 if t == 0 else cs[t - 1]
        _step_bwd(gates[t], cs[t], cprev, src, dc, dgates[t], tcb, nb)
        if proj:
            for b in range(nb):
                go = gates[t, b, 3 * H:]
                tr = tcb[b * H:(b + 1) * H]
                hr = hps[t, b]
                for j in range(H):
                    hr[j] = go[j] * tr[j]
        mm(sgemm, mkl, dgates[t, :nb], w_hh, w_hh_p, False, dh[:nb])
    keep(own)


@njit(**_JIT)
def stack_fwd(sgemm, mkl, x, h0, c0, ws, wps, num_layers, num_dirs, has_bias, has_proj, bs, out, h_n, c_n):
    """A whole stacked (bidirectional) LSTM forward without saving anything, in one call.

    x      (T, B, I)        input, C-contiguous
    h0     (L*D, B, P)      initial hidden states
    c0     (L*D, B, H)      initial cell states
    ws     tuple of 2-D C-contiguous arrays in torch.nn.LSTM's _flat_weights order, biases as
           (1, G): per layer and direction w_ih (G, I or Q), w_hh (G, P), [b_ih, b_hh], [w_hr (P, H)]
    wps    tuple of 1-D arrays, one per entry of ws: that matrix packed for ``a @ w.T``, or (0,)
    bs     (T,)             active rows per step, or (0,)
    out    (T, B, Q)        written: the last layer's outputs
    h_n    (L*D, B, P)      written
    c_n    (L*D, B, H)      written
    """
    wide_vectors()
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    G = 4 * H
    Q = num_dirs * P
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    no_save_g = np.empty((0, B, G), x.dtype)
    no_save_c = np.empty((0, B, H), x.dtype)
    no_proj = np.empty((0, H), x.dtype)
    no_bias = np.empty(0, x.dtype)
    xg = np.empty((T, B, G), x.dtype)
    inp = x.reshape(T * B, x.shape[2])
    for layer in range(num_layers):
        dst = out if layer == num_layers - 1 else np.empty((T, B, Q), x.dtype)
        for d in range(num_dirs):
            k = (layer * num_dirs + d) * per
            w_ih = ws[k]
            w_hh = ws[k + 1]
            xg2 = xg.reshape(T * B, G)
            mm(sgemm, mkl, inp, w_ih, wps[k], True, xg2)
            if has_bias:
                bias = ws[k + 2][0] + ws[k + 3][0]
            else:
                bias = no_bias
            w_hr = ws[k + per - 1] if has_proj else no_proj
            w_hr_p = wps[k + per - 1] if has_proj else wps[k + 1]
            idx = layer * num_dirs + d
            h_n[idx] = h0[idx]
            c_n[idx] = c0[idx]
            layer_fwd(sgemm, mkl, xg, bias, w_hh, wps[k + 1], w_hr, w_hr_p, h_n[idx], c_n[idx], bs, d == 1,
                      dst, d * P, no_save_g, no_save_c)
        inp = dst.reshape(T * B, Q)


@njit(**_JIT)
def stack_fwd_short(x, h0, c0, ws, num_layers, num_dirs, has_bias, has_proj, out, h_n, c_n):
    """:func:`stack_fwd` for short calls of few rows on small weights (streaming): every product is
    a loop of dot products on the weights as stored (:func:`_dot_rows`, no BLAS, nothing
    prepared), biases added per step, no (T, B, G) projection buffer. Same arguments as
    :func:`stack_fwd` without the GEMM, the prepared weights and ``bs`` (every row active)."""
    x, h0, c0, out, h_n, c_n = unowned(x), unowned(h0), unowned(c0), unowned(out), unowned(h_n), unowned(c_n)
    T, B, _ = x.shape
    P = h0.shape[2]
    H = c0.shape[2]
    Q = num_dirs * P
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    own = _short_buffers(B, H, P, x.dtype)  # kept alive to the end: their views below are unowned
    bufs = (unowned(own[0]), unowned(own[1]), unowned(own[2]), unowned(own[3]))
    inp = x
    for layer in range(num_layers):
        dst = out if layer == num_layers - 1 else np.empty((T, B, Q), x.dtype)
        for d in range(num_dirs):
            k = (layer * num_dirs + d) * per
            idx = layer * num_dirs + d
            h = h_n[idx]
            c = c_n[idx]
            h[:] = h0[idx]
            c[:] = c0[idx]
            _short_layer(inp, ws[k], ws[k + 1], ws[k + 2 if has_bias else 0][0], ws[k + 3 if has_bias else 0][0],
                         ws[k + per - 1], has_bias, has_proj, d == 1, h, c, dst[:, :, d * P:(d + 1) * P], bufs)
        inp = dst
    keep(own)


@njit(**_JIT)
def stack_step_ptr(x, h0, c0, wptr, num_layers, B, I, H, P, has_bias, has_proj, y, h_n, c_n):
    """One step of a unidirectional stack (``LSTM.step``) on raw addresses: what
    :func:`stack_fwd_short` computes for T=1, without building NumPy views of the inputs and
    weights in Python (their conversions cost more than the step at small sizes).

    x, h0, c0   addresses (``Tensor.data_ptr``) of C-contiguous (B, I), (L, B, P), (L, B, H)
    wptr (L * per,) int64 addresses of the weights in torch.nn.LSTM's ``_flat_weights`` order,
                each C-contiguous (per = 2 + 2 biases + 1 projection)
    y (B, P) or (1, B, P) or (B, 1, P), h_n (L, B, P), c_n (L, B, H) written (C-contiguous)
    """
    G = 4 * H
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    xs = carray(address_as(x, y), (1, B, I))
    h0s = carray(address_as(h0, y), (num_layers, B, P))
    c0s = carray(address_as(c0, y), (num_layers, B, H))
    own = _short_buffers(B, H, P, y.dtype)  # kept alive to the end: their views below are unowned
    bufs = (unowned(own[0]), unowned(own[1]), unowned(own[2]), unowned(own[3]))
    y, h_n, c_n = unowned(y), unowned(h_n), unowned(c_n)
    nob = y.reshape(-1)[:0]
    inp = xs
    for layer in range(num_layers):
        k = layer * per
        K = I if layer == 0 else P
        w_ih = carray(address_as(wptr[k], y), (G, K))
        w_hh = carray(address_as(wptr[k + 1], y), (G, P))
        b_ih = carray(address_as(wptr[k + 2], y), (G,)) if has_bias else nob
        b_hh = carray(address_as(wptr[k + 3], y), (G,)) if has_bias else nob
        w_hr = carray(address_as(wptr[k + per - 1], y), (P, H)) if has_proj else w_hh[:0]
        h = h_n[layer]
        c = c_n[layer]
        h[:] = h0s[layer]
        c[:] = c0s[layer]
        dst = y.reshape(1, B, P) if layer == num_layers - 1 else np.empty((1, B, P), y.dtype)
        _short_layer(inp, w_ih, w_hh, b_ih, b_hh, w_hr, has_bias, has_proj, False, h, c, dst, bufs)
        inp = dst
    keep(own)


@njit(inline="always", **_JIT)
def _short_buffers(B, H, P, dt):
    """Scratch rows of :func:`_short_layer`: input and recurrent pre-activations, h before projection."""
    return np.empty((B, 4 * H), dt), np.empty((B, 4 * H), dt), np.empty((B, H), dt), np.empty((B, P), dt)


@njit(inline="always", **_JIT)
def _short_layer(inp, w_ih, w_hh, b_ih, b_hh, w_hr, has_bias, has_proj, reverse, h, c, dst, bufs):
    """One layer-direction over all steps of ``inp`` (T, B, K) with products as dot-product loops:
    h (B, P), c (B, H) hold the initial state and end as the final one; dst (T, B, P) receives h."""
    T, B, _ = inp.shape
    H = c.shape[1]
    P = h.shape[1]
    G = 4 * H
    z, zh, hp, hr = bufs
    for s in range(T):
        t = T - 1 - s if reverse else s
        _dot_rows(inp[t], w_ih, z)
        _dot_rows(h, w_hh, zh)
        for b in range(B):
            zr = z[b]
            zhr = zh[b]
            if has_bias:
                for j in range(G):
                    zr[j] = zr[j] + zhr[j] + (b_ih[j] + b_hh[j])
            else:
                for j in range(G):
                    zr[j] = zr[j] + zhr[j]
            for j in range(H):
                ig = act_sigmoid(zr[j])
                fg = act_sigmoid(zr[H + j])
                gg = act_tanh(zr[2 * H + j])
                og = act_sigmoid(zr[3 * H + j])
                cv = fg * c[b, j] + ig * gg
                c[b, j] = cv
                hp[b, j] = og * act_tanh(cv)
        if has_proj:
            _dot_rows(hp, w_hr, hr)
            src = hr
        else:
            src = hp
        for b in range(B):
            orow = dst[t, b]
            for j in range(P):
                v = src[b, j]
                h[b, j] = v
                orow[j] = v


@njit(**_JIT)
def cell_step(sgemm, mkl, x, h, c, w_ih, w_ih_p, w_hh, w_hh_p, b_ih, b_hh, h1, c1):
    """One LSTMCell step.

    x     (B, I)
    h     (B, H)
    c     (B, H)
    w_ih  (G, I)
    w_ih_p (S,)    w_ih packed for ``x @ w_ih.T``, or (0,)
    w_hh  (G, H)
    w_hh_p (S,)    w_hh packed for ``h @ w_hh.T``, or (0,)
    b_ih  (1, G) or (0, G) for no biases
    b_hh  (1, G) or (0, G)
    h1    (B, H)   written
    c1    (B, H)   written
    """
    x, h, c, w_ih, w_ih_p, w_hh, w_hh_p, b_ih, b_hh, h1, c1 = (
        unowned(x), unowned(h), unowned(c), unowned(w_ih), unowned(w_ih_p), unowned(w_hh), unowned(w_hh_p),
        unowned(b_ih), unowned(b_hh), unowned(h1), unowned(c1))
    B = x.shape[0]
    H = h.shape[1]
    G = 4 * H
    z = np.empty((B, G), x.dtype)
    zh = np.empty((B, G), x.dtype)
    mm(sgemm, mkl, x, w_ih, w_ih_p, True, z)
    mm(sgemm, mkl, h, w_hh, w_hh_p, True, zh)
    bias = b_ih.shape[0] > 0
    for b in range(B):
        for j in range(G):
            v = z[b, j] + zh[b, j]
            if bias:
                v += b_ih[0, j] + b_hh[0, j]
            z[b, j] = v
        for j in range(H):
            ig = act_sigmoid(z[b, j])
            fg = act_sigmoid(z[b, H + j])
            gg = act_tanh(z[b, 2 * H + j])
            og = act_sigmoid(z[b, 3 * H + j])
            cv = fg * c[b, j] + ig * gg
            c1[b, j] = cv
            h1[b, j] = og * act_tanh(cv)


# the on-disk cache follows edits of the kernel files compiled into these kernels (``_cache``)
tie_module(globals())
