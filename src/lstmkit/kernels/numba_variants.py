"""Fused CPU kernels for the LSTM variants (peephole, layer norm, recurrent dropout, zoneout).

The equations are those of ``backends/_contract.py`` (``backends/reference.py`` is their executable
form); the plain kernels of ``numba_lstm.py`` are the special case with every option off. These
kernels reuse its GEMM (:func:`numba_lstm.mm`, MKL or SciPy's BLAS) and its activations
(a vectorizing rational tanh for float32, the exact functions for float64).

Dimension legend
    T  time steps            B  batch rows             H  hidden size
    G  = 4H gate pre-activations, gate order i, f, g, o (``_gates.py``)
    P  output size of a step: proj_size if > 0, else H
    S  size of an MKL-packed weight buffer (``numba_blas.pack_b``)

Conventions (as in ``numba_lstm.py``)
    * ``bs`` (T,) int64: active rows per step (PackedSequence order), or (0,) for all rows.
    * An absent option is an array with a zero-sized first dimension, so every kernel has one
      signature per dtype. Exceptions, to keep the inner loops free of branches: absent peephole
      weights are zeros (3, H); absent zoneout is a zero ``fill`` row (d = 0 keeps nothing).
    * A zoneout mask ``z*`` (T, B, X) is used when present; otherwise the row ``z*_fill`` (X,)
      (the evaluation probability p, or zeros) applies to every row and step.
    * Layer norms are two-pass (mean, then the mean of squared deviations), biased variance,
      eps = ``LN_EPS``. Backward recomputes the cell-state normalization from c~ (H values per
      row); the normalized recurrent pre-activations (G per row) are saved by forward instead.
    * Loops run over 0-based slices (``zr[:H]``, ``zr[H:2H]``, ...): Numba's negative-index
      wraparound hides the affine access of a loop that starts at a non-zero index, which then
      stays scalar (see ``numba_lstm._cell_fwd``).
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

from ..backends import _contract
from ..backends._contract import LN_EPS
from . import numba_blas, numba_lstm
from .numba_lstm import act_sigmoid, act_tanh, mm

_JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)


# --- one row of one step ----------------------------------------------------------------------

@njit(inline="always", **_JIT)
def _ln_rec(zr, gain, nr):
    """Layer norm of one row of recurrent pre-activations, in place; returns 1 / std.

    zr    (G,)  (h * m) W_hh^T in, gain * normalized out
    gain  (G,)
    nr    (G,)  the normalized values, written (forward saves them for backward)
    """
    G = zr.shape[0]
    s = zr.dtype.type(0.0)
    for j in range(G):
        s += zr[j]
    inv = zr.dtype.type(1.0) / zr.dtype.type(G)  # stays float32: an int divisor would promote
    mu = s * inv
    v = zr.dtype.type(0.0)
    for j in range(G):
        dv = zr[j] - mu
        v += dv * dv
    rstd = zr.dtype.type(1.0) / math.sqrt(v * inv + zr.dtype.type(LN_EPS))
    for j in range(G):
        n = (zr[j] - mu) * rstd
        nr[j] = n
        zr[j] = n * gain[j]
    return rstd


@njit(inline="always", **_JIT)
def _mean_rstd(ct):
    """Mean and 1 / std of one row of c~ (H,), for the cell-state layer norm."""
    H = ct.shape[0]
    s = ct.dtype.type(0.0)
    for j in range(H):
        s += ct[j]
    inv = ct.dtype.type(1.0) / ct.dtype.type(H)
    mu = s * inv
    v = ct.dtype.type(0.0)
    for j in range(H):
        dv = ct[j] - mu
        v += dv * dv
    return mu, ct.dtype.type(1.0) / math.sqrt(v * inv + ct.dtype.type(LN_EPS))


@njit(inline="always", **_JIT)
def _row_fwd(xr, zr, cp, ct, hpr, pe, lnc_w, lnc_b):
    """Gate activations, c~ and o * tanh(LN_c(c~)) of one row.

    xr     (G,)  input projections
    zr     (G,)  recurrent pre-activations in, gate activations i, f, g, o out
    cp     (H,)  c_{t-1}
    ct     (H,)  c~_t, written
    hpr    (H,)  o * tanh(LN_c(c~)), written
    pe     (3, H) peephole weights (zeros when absent)
    lnc_w  (H,)  cell layer-norm gain, or (0,) for none
    lnc_b  (H,)  its bias
    """
    H = cp.shape[0]
    zi = zr[:H]
    zf = zr[H:2 * H]
    zg = zr[2 * H:3 * H]
    zo = zr[3 * H:]
    xi = xr[:H]
    xf = xr[H:2 * H]
    xc = xr[2 * H:3 * H]
    xo = xr[3 * H:]
    pi = pe[0]
    pf = pe[1]
    po = pe[2]
    for j in range(H):
        zi[j] = act_sigmoid(xi[j] + zi[j] + pi[j] * cp[j])
    for j in range(H):
        zf[j] = act_sigmoid(xf[j] + zf[j] + pf[j] * cp[j])
    for j in range(H):
        zg[j] = act_tanh(xc[j] + zg[j])
    for j in range(H):
        ct[j] = zf[j] * cp[j] + zi[j] * zg[j]
    for j in range(H):
        zo[j] = act_sigmoid(xo[j] + zo[j] + po[j] * ct[j])
    if lnc_w.shape[0] > 0:
        mu, rstd = _mean_rstd(ct)
        for j in range(H):
            hpr[j] = zo[j] * act_tanh((ct[j] - mu) * rstd * lnc_w[j] + lnc_b[j])
    else:
        for j in range(H):
            hpr[j] = zo[j] * act_tanh(ct[j])


@njit(inline="always", **_JIT)
def _row_bwd(gr, cp, ct, dhp, dcr, dz, pe, lnc_w, lnc_b, dgr, hpr, tmp, dpe, dlnc_w, dlnc_b):
    """Backward of :func:`_row_fwd` and of the cell zoneout for one row.

    gr      (G,)  saved gate activations i, f, g, o
    cp      (H,)  c_{t-1}
    ct      (H,)  c~_t
    dhp     (H,)  gradient of o * tanh(LN_c(c~))
    dcr     (H,)  gradient of c_t in, of c_{t-1} out
    dz      (H,)  cell zoneout d of this row and step (zeros when absent)
    pe      (3, H) peephole weights (zeros when absent)
    lnc_w   (H,)  cell layer-norm gain, or (0,);  lnc_b (H,) its bias
    dgr     (G,)  gradient of the gate pre-activations, written
    hpr     (H,)  o * tanh(LN_c(c~)), written (the projection's input, for dW_hr)
    tmp     (H,)  scratch
    dpe     (3, H) peephole gradient, accumulated
    dlnc_w  (H,)  cell layer-norm gain / bias gradients, accumulated (or (0,))
    dlnc_b  (H,)
    """
    H = cp.shape[0]
    one = gr.dtype.type(1.0)
    ig = gr[:H]
    fg = gr[H:2 * H]
    gg = gr[2 * H:3 * H]
    og = gr[3 * H:]
    dgi = dgr[:H]
    dgf = dgr[H:2 * H]
    dgg = dgr[2 * H:3 * H]
    dgo = dgr[3 * H:]
    pi = pe[0]
    pf = pe[1]
    po = pe[2]
    dpi = dpe[0]
    dpf = dpe[1]
    dpo = dpe[2]
    if lnc_w.shape[0] > 0:
        mu, rstd = _mean_rstd(ct)
        s1 = gr.dtype.type(0.0)
        s2 = gr.dtype.type(0.0)
        for j in range(H):
            xh = (ct[j] - mu) * rstd
            tc = act_tanh(xh * lnc_w[j] + lnc_b[j])
            o = og[j]
            dn = dhp[j] * o * (one - tc * tc)
            dgo[j] = dhp[j] * tc * o * (one - o)
            hpr[j] = o * tc
            dlnc_w[j] += dn * xh
            dlnc_b[j] += dn
            dx = dn * lnc_w[j]
            tmp[j] = dx
            s1 += dx
            s2 += dx * xh
        inv = one / gr.dtype.type(H)
        m1 = s1 * inv
        m2 = s2 * inv
        for j in range(H):
            tmp[j] = rstd * (tmp[j] - m1 - (ct[j] - mu) * rstd * m2)
    else:
        for j in range(H):
            tc = act_tanh(ct[j])
            o = og[j]
            tmp[j] = dhp[j] * o * (one - tc * tc)
            dgo[j] = dhp[j] * tc * o * (one - o)
            hpr[j] = o * tc
    # tmp: gradient of c~ through h; add the paths through c_t and the output peephole
    for j in range(H):
        tmp[j] += (one - dz[j]) * dcr[j] + dgo[j] * po[j]
    for j in range(H):
        i = ig[j]
        dgi[j] = tmp[j] * gg[j] * i * (one - i)
    for j in range(H):
        f = fg[j]
        dgf[j] = tmp[j] * cp[j] * f * (one - f)
    for j in range(H):
        g = gg[j]
        dgg[j] = tmp[j] * ig[j] * (one - g * g)
    for j in range(H):
        dcr[j] = dz[j] * dcr[j] + tmp[j] * fg[j] + dgi[j] * pi[j] + dgf[j] * pf[j]
    for j in range(H):
        dpi[j] += dgi[j] * cp[j]
    for j in range(H):
        dpf[j] += dgf[j] * cp[j]
    for j in range(H):
        dpo[j] += dgo[j] * ct[j]


@njit(inline="always", **_JIT)
def _ln_rec_bwd(dzr, nr, rstd, gain, drr, dgain):
    """Backward of :func:`_ln_rec` for one row.

    dzr    (G,)  gradient of the normalized-and-scaled pre-activations
    nr     (G,)  the saved normalized values
    rstd         the saved 1 / std
    gain   (G,)
    drr    (G,)  gradient of the raw (h * m) W_hh^T, written
    dgain  (G,)  gain gradient, accumulated
    """
    G = dzr.shape[0]
    s1 = dzr.dtype.type(0.0)
    s2 = dzr.dtype.type(0.0)
    for j in range(G):
        dy = dzr[j] * gain[j]
        dgain[j] += dzr[j] * nr[j]
        s1 += dy
        s2 += dy * nr[j]
    inv = dzr.dtype.type(1.0) / dzr.dtype.type(G)
    m1 = s1 * inv
    m2 = s2 * inv
    for j in range(G):
        drr[j] = rstd * (dzr[j] * gain[j] - m1 - nr[j] * m2)


# --- one layer-direction over all steps -------------------------------------------------------

@njit(**_JIT)
def layer_fwd(sgemm, mkl, xg, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse, out,
              mask, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill, gates, cs, cts, lnr, lns):
    """One layer-direction with variants over all steps; the state (h, c) is updated in place.

    sgemm, mkl          the GEMM (see :func:`numba_lstm.mm`)
    xg      (T, B, G)   input projections with biases (input layer norm applied), C-contiguous
    w_hh    (G, P)      recurrent weights
    w_hh_p  (S,)        w_hh packed for ``h @ w_hh.T``, or (0,)
    w_hr    (P, H)      projection weights, or (0, H)
    w_hr_p  (S,)        w_hr packed for ``hp @ w_hr.T``, or (0,)
    h       (B, P)      initial hidden state in, final out
    c       (B, H)      initial cell state in, final out
    bs      (T,)        active rows per step, or (0,)
    reverse             run t = T-1 .. 0
    out     (T, B, P)   h of every step, written; zeros at inactive rows
    mask    (B, P)      recurrent-dropout mask on h_{t-1}, or (0, P)
    pe      (3, H)      peephole weights p_i, p_f, p_o (zeros when absent)
    ln_g    (G,)        recurrent layer-norm gain, or (0,)
    lnc_w   (H,)        cell layer-norm gain, or (0,)
    lnc_b   (H,)        cell layer-norm bias (zeros if absent), or (0,)
    zc      (T, B, H)   cell zoneout mask, or (0, B, H) to use zc_fill
    zc_fill (H,)        cell zoneout d for every row and step (p in evaluation, else zeros)
    zh      (T, B, P)   hidden zoneout mask, or (0, B, P) to use zh_fill
    zh_fill (P,)        hidden zoneout d for every row and step
    gates   (T, B, G)   written: gate activations for backward, or (0, B, G) to save nothing
    cs      (T, B, H)   written: c_t after every step (every row), or (0, B, H)
    cts     (T, B, H)   written: c~_t (saved when it differs from c_t: cell zoneout), or (0, B, H)
    lnr     (T, B, G)   written: normalized recurrent pre-activations (with ln_g), or (0, B, G)
    lns     (T, B)      written: their 1 / std, or (0, B)
    """
    T, B, G = xg.shape
    H = G // 4
    P = h.shape[1]
    save = gates.shape[0] > 0
    save_ct = cts.shape[0] > 0
    save_ln = lnr.shape[0] > 0
    proj = w_hr.shape[0] > 0
    masked = mask.shape[0] > 0
    lnh = ln_g.shape[0] > 0
    zc_arr = zc.shape[0] > 0
    zh_arr = zh.shape[0] > 0
    z = np.empty((B, G), xg.dtype)        # recurrent pre-activations, then gate activations
    ct = np.empty((B, H), xg.dtype)       # c~
    hp = np.empty((B, H), xg.dtype)       # o * tanh(LN_c(c~)) before the projection
    hr = np.empty((B, P), xg.dtype)       # projected h~
    hin = np.empty((B, P), xg.dtype)      # h_{t-1} * mask
    nr = np.empty(G if lnh else 0, xg.dtype)  # normalized recurrent pre-activations of a row
    for s in range(T):
        t = T - 1 - s if reverse else s
        nb = B if bs.shape[0] == 0 else bs[t]
        for b in range(nb, B):
            for j in range(P):
                out[t, b, j] = 0
        if nb > 0:
            if masked:
                for b in range(nb):
                    hb = h[b]
                    mb = mask[b]
                    ib = hin[b]
                    for j in range(P):
                        ib[j] = hb[j] * mb[j]
                mm(sgemm, mkl, hin[:nb], w_hh, w_hh_p, True, z[:nb])
            else:
                mm(sgemm, mkl, h[:nb], w_hh, w_hh_p, True, z[:nb])
            xt = xg[t]
            for b in range(nb):
                if lnh:
                    # one call site, saving or not: the same code, so the same rounding
                    rstd = _ln_rec(z[b], ln_g, nr)
                    if save_ln:
                        lnr[t, b] = nr
                        lns[t, b] = rstd
                cb = c[b]
                cw = ct[b]
                _row_fwd(xt[b], z[b], cb, cw, hp[b], pe, lnc_w, lnc_b)
                d = zc[t, b] if zc_arr else zc_fill
                for j in range(H):
                    cb[j] = cw[j] + d[j] * (cb[j] - cw[j])
            if proj:
                mm(sgemm, mkl, hp[:nb], w_hr, w_hr_p, True, hr[:nb])
                src = hr
            else:
                src = hp
            ot = out[t]
            for b in range(nb):
                d = zh[t, b] if zh_arr else zh_fill
                hb = h[b]
                sb = src[b]
                ob = ot[b]
                for j in range(P):
                    v = sb[j] + d[j] * (hb[j] - sb[j])
                    hb[j] = v
                    ob[j] = v
            if save:
                gates[t, :nb] = z[:nb]
            if save_ct:
                cts[t, :nb] = ct[:nb]
        if save:
            cs[t] = c


@njit(**_JIT)
def layer_bwd(sgemm, mkl, gates, cs, cts, lnr, lns, c0, w_hh, w_hh_p, w_hr, w_hr_p,
              mask, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill, grad_out, dh, dc, bs, reverse,
              dgates, drs, dhs, hps, dpe, dln_g, dlnc_w, dlnc_b):
    """Backward of :func:`layer_fwd` through all steps (the recurrent part).

    gates ... lns       saved by :func:`layer_fwd` (cts, lnr, lns may be (0, ...) as there)
    c0      (B, H)      initial cell state
    w_hh    (G, P)      recurrent weights
    w_hh_p  (S,)        w_hh packed for ``dr @ w_hh``, or (0,)
    w_hr    (P, H)      projection weights, or (0, H)
    w_hr_p  (S,)        w_hr packed for ``dh @ w_hr``, or (0,)
    mask ... zh_fill    the options, as for :func:`layer_fwd`
    grad_out (T, B, P)  gradient of the outputs
    dh      (B, P)      gradient of h_n in, of h0 out
    dc      (B, H)      gradient of c_n in, of c0 out
    bs      (T,)        active rows per step, or (0,)
    reverse             the forward ran t = T-1 .. 0
    dgates  (T, B, G)   written: gradient of the gate pre-activations (= of xg); zeros at inactive rows
    drs     (T, B, G)   written with ln_g: gradient of (h * m) W_hh^T before its layer norm, else (0, B, G)
                        (without layer norm that gradient is dgates)
    dhs     (T, B, P)   written when projecting: gradient of each step's projected h~, else (0, B, P)
    hps     (T, B, H)   written when projecting: o * tanh(LN_c(c~)) of each step, else (0, B, H)
    dpe     (3, H)      peephole gradient, accumulated (ignored when there are no peepholes)
    dln_g   (G,)        recurrent layer-norm gain gradient, accumulated, or (0,)
    dlnc_w  (H,)        cell layer-norm gain and bias gradients, accumulated, or (0,)
    dlnc_b  (H,)
    """
    T, B, G = gates.shape
    H = G // 4
    P = dh.shape[1]
    proj = w_hr.shape[0] > 0
    masked = mask.shape[0] > 0
    lnh = ln_g.shape[0] > 0
    sep_ct = cts.shape[0] > 0
    zc_arr = zc.shape[0] > 0
    zh_arr = zh.shape[0] > 0
    dht = np.empty((B, P), gates.dtype)    # gradient of h~ (after the hidden zoneout)
    keep = np.empty((B, P), gates.dtype)   # the part of dh_t that goes straight to h_{t-1}
    dhp = np.empty((B, H), gates.dtype)
    dhin = np.empty((B, P), gates.dtype)
    hp = np.empty(H, gates.dtype)
    tmp = np.empty(H, gates.dtype)
    for s in range(T):
        t = s if reverse else T - 1 - s
        nb = B if bs.shape[0] == 0 else bs[t]
        for b in range(nb, B):
            for j in range(G):
                dgates[t, b, j] = 0
        if lnh:
            for b in range(nb, B):
                for j in range(G):
                    drs[t, b, j] = 0
        if proj:
            for b in range(nb, B):
                for j in range(P):
                    dhs[t, b, j] = 0
                for j in range(H):
                    hps[t, b, j] = 0
        if nb == 0:
            continue
        for b in range(nb):
            d = zh[t, b] if zh_arr else zh_fill
            go = grad_out[t, b]
            db = dh[b]
            kb = keep[b]
            tb = dht[b]
            for j in range(P):
                v = db[j] + go[j]
                kb[j] = d[j] * v
                tb[j] = v - d[j] * v
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
        ctil = cts[t] if sep_ct else cs[t]
        gt = gates[t]
        dg = dgates[t]
        for b in range(nb):
            d = zc[t, b] if zc_arr else zc_fill
            hpr = hps[t, b] if proj else hp
            _row_bwd(gt[b], cprev[b], ctil[b], src[b], dc[b], d, pe, lnc_w, lnc_b, dg[b], hpr, tmp,
                     dpe, dlnc_w, dlnc_b)
            if lnh:
                _ln_rec_bwd(dg[b], lnr[t, b], lns[t, b], ln_g, drs[t, b], dln_g)
        dr = drs[t] if lnh else dg
        mm(sgemm, mkl, dr[:nb], w_hh, w_hh_p, False, dhin[:nb])
        if masked:
            for b in range(nb):
                db = dh[b]
                kb = keep[b]
                ib = dhin[b]
                mb = mask[b]
                for j in range(P):
                    db[j] = kb[j] + mb[j] * ib[j]
        else:
            for b in range(nb):
                db = dh[b]
                kb = keep[b]
                ib = dhin[b]
                for j in range(P):
                    db[j] = kb[j] + ib[j]


# --- cache freshness --------------------------------------------------------------------------
# Numba's on-disk cache checks only the source file of the function it compiled, but the kernels
# above have ``numba_lstm``'s GEMM and activations (and constants of ``numba_blas`` and
# ``_contract``) compiled into them: after an edit there, a cached kernel would run the old code
# against new conventions (seen: garbage from a changed packed-weight format). Adding those files'
# stamps to the index stamp makes such an entry stale, so it is recompiled.

def _tie_cache_to_dependencies(*dispatchers) -> None:
    deps = tuple((os.stat(m.__file__).st_mtime, os.stat(m.__file__).st_size)
                 for m in (numba_lstm, numba_blas, _contract))
    for d in dispatchers:
        cache_file = getattr(getattr(d, "_cache", None), "_cache_file", None)
        if cache_file is not None and hasattr(cache_file, "_source_stamp"):
            cache_file._source_stamp = (cache_file._source_stamp, deps)


_tie_cache_to_dependencies(layer_fwd, layer_bwd)
