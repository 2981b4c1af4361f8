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
      signature per dtype; the kernels use zero peephole weights (3, H) in its place, which keeps
      the gate loops free of branches. Absent zoneout is a zero ``fill`` row.
    * A zoneout mask ``z*`` (T, B, X) is used when present; otherwise the row ``z*_fill`` (X,)
      (the evaluation probability p, or zeros) applies to every row and step.
    * Layer norms are two-pass (mean, then the mean of squared deviations), biased variance,
      eps = ``LN_EPS``. The recurrent one is folded into the gate activations (no pass writes
      LN_h(r)); forward saves the raw r and two statistics per row, backward recomputes the
      normalized values from them, and the cell-state normalization from c~ (H values per row).
    * Saved results are written in place (the GEMM into ``lnr[t]``, the activations into
      ``gates[t]``, c~ into ``cts[t]``); without saving the same code runs on scratch rows, so
      both paths round alike.
    * Loops run over 0-based slices (``zr[:H]``, ``zr[H:2H]``, ...), one result per loop: Numba's
      negative-index wraparound hides the affine access of a loop that starts at a non-zero
      index, and a loop writing several arrays exceeds the compiler's overlap checks; either
      stays scalar (see ``numba_lstm``).
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
def _mean_rstd(v):
    """Mean and 1 / std of one row (X,): a layer norm's statistics."""
    X = v.shape[0]
    one = v.dtype.type(1.0)
    inv = one / v.dtype.type(X)  # stays float32: an int divisor would promote the row to float64
    s = v.dtype.type(0.0)
    for j in range(X):
        s += v[j]
    mu = s * inv
    q = v.dtype.type(0.0)
    for j in range(X):
        dv = v[j] - mu
        q += dv * dv
    return mu, one / math.sqrt(q * inv + v.dtype.type(LN_EPS))


@njit(inline="always", **_JIT)
def _row_fwd(xr, rr, zr, ln, nmr, rstd, lng, cp, ct, hpr, pe, lnc_w, lnc_b):
    """Gate activations, c~ and o * tanh(LN_c(c~)) of one row.

    xr     (G,)  input projections
    rr     (G,)  with ``ln``: the raw recurrent pre-activations (h * m) W_hh^T (else unused)
    zr     (G,)  written: gate activations i, f, g, o (without ``ln``: recurrent pre-activations in)
    ln           normalize rr: LN_h(r) = (r * rstd + nmr) * lng, nmr = -mean * rstd
    lng    (G,)  recurrent layer-norm gain (with ``ln``)
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
    if ln:
        # the normalization folded into the activations: no pass that writes LN_h(r)
        ri = rr[:H]
        rf = rr[H:2 * H]
        rg = rr[2 * H:3 * H]
        ro = rr[3 * H:]
        gi = lng[:H]
        gf = lng[H:2 * H]
        gc = lng[2 * H:3 * H]
        go = lng[3 * H:]
        for j in range(H):
            zi[j] = act_sigmoid(xi[j] + (ri[j] * rstd + nmr) * gi[j] + pi[j] * cp[j])
        for j in range(H):
            zf[j] = act_sigmoid(xf[j] + (rf[j] * rstd + nmr) * gf[j] + pf[j] * cp[j])
        for j in range(H):
            zg[j] = act_tanh(xc[j] + (rg[j] * rstd + nmr) * gc[j])
        for j in range(H):
            ct[j] = zf[j] * cp[j] + zi[j] * zg[j]
        for j in range(H):
            zo[j] = act_sigmoid(xo[j] + (ro[j] * rstd + nmr) * go[j] + po[j] * ct[j])
    else:
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
        mu, rs = _mean_rstd(ct)
        for j in range(H):
            hpr[j] = zo[j] * act_tanh((ct[j] - mu) * rs * lnc_w[j] + lnc_b[j])
    else:
        for j in range(H):
            hpr[j] = zo[j] * act_tanh(ct[j])


@njit(inline="always", **_JIT)
def _row_bwd(gr, cp, ct, dhp, dcr, zone, dz, pe, lnc_w, lnc_b, dgr, hpr, scr, peep, dpe, dlnc_w, dlnc_b):
    """Backward of :func:`_row_fwd` and of the cell zoneout for one row.

    gr      (G,)  saved gate activations i, f, g, o
    cp      (H,)  c_{t-1}
    ct      (H,)  c~_t
    dhp     (H,)  gradient of o * tanh(LN_c(c~))
    dcr     (H,)  gradient of c_t in, of c_{t-1} out
    zone          cell zoneout present
    dz      (H,)  its d for this row and step
    pe      (3, H) peephole weights (zeros when absent)
    lnc_w   (H,)  cell layer-norm gain, or (0,);  lnc_b (H,) its bias
    dgr     (G,)  gradient of the gate pre-activations, written
    hpr     (H,)  o * tanh(LN_c(c~)), written (the projection's input, for dW_hr), or (0,) to skip
    scr     (3, H) scratch
    peep          accumulate the peephole gradient
    dpe     (3, H) peephole gradient, accumulated (with ``peep``)
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
    tc = scr[0]    # tanh(LN_c(c~))
    dct = scr[1]   # gradient of c~
    xh = scr[2]    # normalized c~
    # one short loop per result: each reads few arrays, so the compiler's overlap checks stay
    # within its limit and the loop vectorizes (see numba_lstm._step_bwd)
    if lnc_w.shape[0] > 0:
        mu, rstd = _mean_rstd(ct)
        for j in range(H):
            xh[j] = (ct[j] - mu) * rstd
        for j in range(H):
            tc[j] = act_tanh(xh[j] * lnc_w[j] + lnc_b[j])
    else:
        for j in range(H):
            tc[j] = act_tanh(ct[j])
    for j in range(H):
        dgo[j] = dhp[j] * tc[j] * og[j] * (one - og[j])
    if hpr.shape[0] > 0:
        for j in range(H):
            hpr[j] = og[j] * tc[j]
    for j in range(H):
        dct[j] = dhp[j] * og[j] * (one - tc[j] * tc[j])
    if lnc_w.shape[0] > 0:
        # dct holds the gradient of LN_c(c~) here
        for j in range(H):
            dlnc_w[j] += dct[j] * xh[j]
        for j in range(H):
            dlnc_b[j] += dct[j]
        s1 = gr.dtype.type(0.0)
        s2 = gr.dtype.type(0.0)
        for j in range(H):
            dx = dct[j] * lnc_w[j]
            s1 += dx
            s2 += dx * xh[j]
        inv = one / gr.dtype.type(H)
        m1 = s1 * inv
        m2 = s2 * inv
        for j in range(H):
            dct[j] = rstd * (dct[j] * lnc_w[j] - m1 - xh[j] * m2)
    # add the paths through c_t and the output peephole
    if zone:
        for j in range(H):
            dct[j] += (one - dz[j]) * dcr[j] + dgo[j] * po[j]
    else:
        for j in range(H):
            dct[j] += dcr[j] + dgo[j] * po[j]
    for j in range(H):
        dgi[j] = dct[j] * gg[j] * ig[j] * (one - ig[j])
    for j in range(H):
        dgf[j] = dct[j] * cp[j] * fg[j] * (one - fg[j])
    for j in range(H):
        dgg[j] = dct[j] * ig[j] * (one - gg[j] * gg[j])
    if zone:
        for j in range(H):
            dcr[j] = dz[j] * dcr[j] + dct[j] * fg[j] + dgi[j] * pi[j] + dgf[j] * pf[j]
    else:
        for j in range(H):
            dcr[j] = dct[j] * fg[j] + dgi[j] * pi[j] + dgf[j] * pf[j]
    if peep:
        dpi = dpe[0]
        dpf = dpe[1]
        dpo = dpe[2]
        for j in range(H):
            dpi[j] += dgi[j] * cp[j]
        for j in range(H):
            dpf[j] += dgf[j] * cp[j]
        for j in range(H):
            dpo[j] += dgo[j] * ct[j]


@njit(inline="always", **_JIT)
def _ln_rec_bwd(dzr, rr, nmr, rstd, gain, drr, dgain):
    """Backward of the recurrent layer norm LN_h(r) = (r * rstd + nmr) * gain for one row.

    dzr    (G,)  gradient of LN_h(r)
    rr     (G,)  the saved raw pre-activations r = (h * m) W_hh^T
    nmr          the saved -mean * rstd
    rstd         the saved 1 / std
    gain   (G,)
    drr    (G,)  gradient of r, written
    dgain  (G,)  gain gradient, accumulated
    """
    G = dzr.shape[0]
    for j in range(G):
        dgain[j] += dzr[j] * (rr[j] * rstd + nmr)
    s1 = dzr.dtype.type(0.0)
    s2 = dzr.dtype.type(0.0)
    for j in range(G):
        dy = dzr[j] * gain[j]
        s1 += dy
        s2 += dy * (rr[j] * rstd + nmr)
    inv = dzr.dtype.type(1.0) / dzr.dtype.type(G)
    m1 = s1 * inv
    m2 = s2 * inv
    for j in range(G):
        drr[j] = rstd * (dzr[j] * gain[j] - m1 - (rr[j] * rstd + nmr) * m2)


@njit(inline="always", **_JIT)
def _any_nonzero(fill):
    """Whether a zoneout fill row (X,) keeps anything."""
    for j in range(fill.shape[0]):
        if fill[j] != 0:
            return True
    return False


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
    pe      (3, H)      peephole weights p_i, p_f, p_o, or (0, H)
    ln_g    (G,)        recurrent layer-norm gain, or (0,)
    lnc_w   (H,)        cell layer-norm gain, or (0,)
    lnc_b   (H,)        cell layer-norm bias (zeros if absent), or (0,)
    zc      (T, B, H)   cell zoneout mask, or (0, B, H) to use zc_fill
    zc_fill (H,)        cell zoneout d for every row and step (p in evaluation, else zeros)
    zh      (T, B, P)   hidden zoneout mask, or (0, B, P) to use zh_fill
    zh_fill (P,)        hidden zoneout d for every row and step
    gates   (T, B, G)   written: gate activations for backward (active rows), or (0, B, G) to save nothing
    cs      (T, B, H)   written: c_t after every step (every row), or (0, B, H)
    cts     (T, B, H)   written: c~_t (active rows; saved when it differs from c_t: cell zoneout), or
                        (0, B, H)
    lnr     (T, B, G)   written: raw recurrent pre-activations (h * m) W_hh^T (active rows, with
                        ln_g), or (0, B, G)
    lns     (T, B, 2)   written: their layer norm's -mean / std and 1 / std, or (0, B, 2)
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
    pe3 = pe if pe.shape[0] > 0 else np.zeros((3, H), xg.dtype)
    zc_arr = zc.shape[0] > 0
    zh_arr = zh.shape[0] > 0
    zone_c = zc_arr or _any_nonzero(zc_fill)
    zone_h = zh_arr or _any_nonzero(zh_fill)
    one = xg.dtype.type(1.0)
    z = np.empty((B, G), xg.dtype)        # gate activations when not saving them
    zr = np.empty((B if lnh else 0, G), xg.dtype)  # raw (h * m) W_hh^T when not saving it
    ct = np.empty((B, H), xg.dtype)       # c~ when not saving it
    hp = np.empty((B, H), xg.dtype)       # o * tanh(LN_c(c~)) before the projection
    hr = np.empty((B, P), xg.dtype)       # projected h~
    hin = np.empty((B, P), xg.dtype)      # h_{t-1} * mask
    for s in range(T):
        t = T - 1 - s if reverse else s
        nb = B if bs.shape[0] == 0 else bs[t]
        for b in range(nb, B):
            for j in range(P):
                out[t, b, j] = 0
        if nb > 0:
            hsrc = h
            if masked:
                for b in range(nb):
                    hb = h[b]
                    mb = mask[b]
                    ib = hin[b]
                    for j in range(P):
                        ib[j] = hb[j] * mb[j]
                hsrc = hin
            # results go straight into the saved arrays when saving (no copies); saving or not,
            # the same code runs on them, so both round alike
            za = gates[t] if save else z
            zraw = (lnr[t] if save_ln else zr) if lnh else za
            mm(sgemm, mkl, hsrc[:nb], w_hh, w_hh_p, True, zraw[:nb])
            xt = xg[t]
            for b in range(nb):
                rr = zraw[b]
                nmr = xg.dtype.type(0.0)
                rstd = one
                if lnh:
                    mu, rstd = _mean_rstd(rr)
                    nmr = -mu * rstd
                    if save_ln:
                        lns[t, b, 0] = nmr
                        lns[t, b, 1] = rstd
                cb = c[b]
                cw = cts[t, b] if save_ct else ct[b]
                _row_fwd(xt[b], rr, za[b], lnh, nmr, rstd, ln_g, cb, cw, hp[b], pe3, lnc_w, lnc_b)
                if zone_c:
                    d = zc[t, b] if zc_arr else zc_fill
                    for j in range(H):
                        cb[j] = cw[j] + d[j] * (cb[j] - cw[j])
                else:
                    for j in range(H):
                        cb[j] = cw[j]
            if proj:
                mm(sgemm, mkl, hp[:nb], w_hr, w_hr_p, True, hr[:nb])
                src = hr
            else:
                src = hp
            ot = out[t]
            for b in range(nb):
                hb = h[b]
                sb = src[b]
                ob = ot[b]
                if zone_h:
                    d = zh[t, b] if zh_arr else zh_fill
                    for j in range(P):
                        v = sb[j] + d[j] * (hb[j] - sb[j])
                        hb[j] = v
                        ob[j] = v
                else:
                    for j in range(P):
                        v = sb[j]
                        hb[j] = v
                        ob[j] = v
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
    dpe     (3, H)      peephole gradient, accumulated, or (0, H) without peepholes
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
    zone_c = zc_arr or _any_nonzero(zc_fill)
    zone_h = zh_arr or _any_nonzero(zh_fill)
    peep = pe.shape[0] > 0
    pe3 = pe if peep else np.zeros((3, H), gates.dtype)
    dht = np.empty((B, P), gates.dtype)    # gradient of h~ (after the hidden zoneout)
    keep = np.empty((B, P), gates.dtype)   # the part of dh_t that goes straight to h_{t-1}
    dhp = np.empty((B, H), gates.dtype)
    dhin = np.empty((B, P), gates.dtype)
    no_hp = np.empty(0, gates.dtype)
    scr = np.empty((3, H), gates.dtype)
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
            go = grad_out[t, b]
            db = dh[b]
            tb = dht[b]
            for j in range(P):
                tb[j] = db[j] + go[j]
        if zone_h:
            for b in range(nb):
                d = zh[t, b] if zh_arr else zh_fill
                kb = keep[b]
                tb = dht[b]
                for j in range(P):
                    kb[j] = d[j] * tb[j]
                for j in range(P):
                    tb[j] -= kb[j]
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
            hpr = hps[t, b] if proj else no_hp
            _row_bwd(gt[b], cprev[b], ctil[b], src[b], dc[b], zone_c, d, pe3, lnc_w, lnc_b, dg[b], hpr,
                     scr, peep, dpe, dlnc_w, dlnc_b)
            if lnh:
                _ln_rec_bwd(dg[b], lnr[t, b], lns[t, b, 0], lns[t, b, 1], ln_g, drs[t, b], dln_g)
        dr = drs[t] if lnh else dg
        if not (masked or zone_h):
            mm(sgemm, mkl, dr[:nb], w_hh, w_hh_p, False, dh[:nb])
            continue
        mm(sgemm, mkl, dr[:nb], w_hh, w_hh_p, False, dhin[:nb])
        for b in range(nb):
            db = dh[b]
            ib = dhin[b]
            if masked:
                mb = mask[b]
                for j in range(P):
                    ib[j] *= mb[j]
            if zone_h:
                kb = keep[b]
                for j in range(P):
                    db[j] = kb[j] + ib[j]
            else:
                for j in range(P):
                    db[j] = ib[j]


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
