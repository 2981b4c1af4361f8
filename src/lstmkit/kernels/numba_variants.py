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
      signature per dtype. Absent zoneout is a zero ``fill`` row.
    * A zoneout mask ``z*`` (T, B, X) is used when present; otherwise the row ``z*_fill`` (X,)
      (the evaluation probability p, or zeros) applies to every row and step.
    * Layer norms are two-pass (mean, then the mean of squared deviations), biased variance,
      eps = ``LN_EPS``. Forward saves the raw recurrent pre-activations r and two statistics per
      row; backward recomputes the normalized values from them, and the cell-state normalization
      from c~ (H values per row).
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

import numpy as np
from numba import njit

from .._gates import LN_EPS
from ._cache import tie_module
from .numba_blas import keep, unowned, wide_vectors
from .numba_lstm import act_sigmoid, act_tanh, mm

_JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)


# --- the elementwise part of one step --------------------------------------------------------
# Each helper loops over the first nb rows with a body free of branches; the options choose among
# whole row loops. (Measured: a branch between two row bodies inside the row loop cost 30% of the
# step's elementwise time, B=16, H=128; the same branch around the row loop costs nothing.)

@njit(inline="always", **_JIT)
def _mean_rstd(v, eps=LN_EPS):
    """Mean and 1 / std of one row (X,): a layer norm's statistics (two passes in the row's dtype)."""
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
    return mu, one / math.sqrt(q * inv + v.dtype.type(eps))


@njit(**_JIT)
def _act_coefficients(H, dtype_like):
    """(3, G): s, a, o such that a * tanh(s * x) + o is each gate's activation:
    sigmoid(x) = 0.5 tanh(0.5 x) + 0.5 (i, f, o), tanh(x) (g). dtype_like: an array of the dtype."""
    co = np.empty((3, 4 * H), dtype_like.dtype)
    for j in range(4 * H):
        half = not (2 * H <= j < 3 * H)
        co[0, j] = 0.5 if half else 1.0
        co[1, j] = 0.5 if half else 1.0
        co[2, j] = 0.5 if half else 0.0
    return co


@njit(inline="always", **_JIT)
def _ln_rec_rows(zraw, za, ln_g, st, nb):
    """LN_h(r) = (r * rstd + nmr) * ln_g of nb rows, nmr = -mean * rstd.

    zraw (B, G) raw r = (h * m) W_hh^T;  za (B, G) written: LN_h(r);  ln_g (G,) gain
    st   (B, 2) written: nmr and rstd of every row (saved for backward)
    """
    G = ln_g.shape[0]
    for b in range(nb):
        rr = zraw[b]
        zb = za[b]
        mu, rstd = _mean_rstd(rr)
        nmr = -mu * rstd
        for j in range(G):
            zb[j] = (rr[j] * rstd + nmr) * ln_g[j]
        st[b, 0] = nmr
        st[b, 1] = rstd


@njit(inline="always", **_JIT)
def _gates_rows(xt, za, co, peep, pe, c, ct, nb):
    """Gate activations and c~ of nb rows.

    xt (B, G) input projections;  za (B, G) recurrent pre-activations in, activations i, f, g, o out
    co (3, G) :func:`_act_coefficients`;  peep: add the peephole terms of pe (3, H)
    c  (B, H) c_{t-1};  ct (B, H) written: c~
    """
    H = c.shape[1]
    if peep:
        pi = pe[0]
        pf = pe[1]
        po = pe[2]
        for b in range(nb):
            xr = xt[b]
            zr = za[b]
            cp = c[b]
            cw = ct[b]
            zi = zr[:H]
            zf = zr[H:2 * H]
            zg = zr[2 * H:3 * H]
            zo = zr[3 * H:]
            xi = xr[:H]
            xf = xr[H:2 * H]
            xc = xr[2 * H:3 * H]
            xo = xr[3 * H:]
            for j in range(H):
                zi[j] = act_sigmoid(xi[j] + zi[j] + pi[j] * cp[j])
            for j in range(H):
                zf[j] = act_sigmoid(xf[j] + zf[j] + pf[j] * cp[j])
            for j in range(H):
                zg[j] = act_tanh(xc[j] + zg[j])
            for j in range(H):
                cw[j] = zf[j] * cp[j] + zi[j] * zg[j]
            for j in range(H):
                zo[j] = act_sigmoid(xo[j] + zo[j] + po[j] * cw[j])
    else:
        # all four gates in one loop (faster than four short ones, as in numba_lstm)
        s = co[0]
        a = co[1]
        o = co[2]
        for b in range(nb):
            xr = xt[b]
            zr = za[b]
            cp = c[b]
            cw = ct[b]
            for j in range(4 * H):
                zr[j] = a[j] * act_tanh(s[j] * (xr[j] + zr[j])) + o[j]
            zi = zr[:H]
            zf = zr[H:2 * H]
            zg = zr[2 * H:3 * H]
            for j in range(H):
                cw[j] = zf[j] * cp[j] + zi[j] * zg[j]


@njit(inline="always", **_JIT)
def _hp_rows(za, ct, lnc_w, lnc_b, hp, nb):
    """hp = o * tanh(LN_c(c~)) of nb rows: za (B, G) activations, ct (B, H) c~, hp (B, H) written;
    lnc_w, lnc_b (H,) the cell layer norm, or (0,) for none."""
    H = ct.shape[1]
    if lnc_w.shape[0] > 0:
        for b in range(nb):
            zo = za[b, 3 * H:]
            cw = ct[b]
            hr = hp[b]
            mu, rs = _mean_rstd(cw)
            for j in range(H):
                hr[j] = zo[j] * act_tanh((cw[j] - mu) * rs * lnc_w[j] + lnc_b[j])
    else:
        for b in range(nb):
            zo = za[b, 3 * H:]
            cw = ct[b]
            hr = hp[b]
            for j in range(H):
                hr[j] = zo[j] * act_tanh(cw[j])


@njit(inline="always", **_JIT)
def _zone_rows(old, new, zt, fill, nb):
    """old = new + d * (old - new) of nb rows (zoneout: d = 1 keeps old), in place.

    old (B, X);  new (B, X);  zt (B, X) this step's mask, or (0, X) to use fill (X,) everywhere
    """
    X = old.shape[1]
    if zt.shape[0] > 0:
        for b in range(nb):
            ob = old[b]
            nw = new[b]
            d = zt[b]
            for j in range(X):
                ob[j] = nw[j] + d[j] * (ob[j] - nw[j])
    else:
        for b in range(nb):
            ob = old[b]
            nw = new[b]
            for j in range(X):
                ob[j] = nw[j] + fill[j] * (ob[j] - nw[j])


@njit(inline="always", **_JIT)
def ln_bwd_row(dy, nrm, gain, rstd, out, dgain):
    """Backward of one row of a layer norm y = nrm * gain (+ bias), nrm = (v - mean) * rstd:
    dgain (X,) += dy * nrm, and out (X,) = the gradient of v (out may be dy itself)."""
    X = dy.shape[0]
    inv = dy.dtype.type(1.0) / dy.dtype.type(X)
    for j in range(X):
        dgain[j] += dy[j] * nrm[j]
    s1 = dy.dtype.type(0.0)
    s2 = dy.dtype.type(0.0)
    for j in range(X):
        dx = dy[j] * gain[j]
        s1 += dx
        s2 += dx * nrm[j]
    m1 = s1 * inv
    m2 = s2 * inv
    for j in range(X):
        out[j] = rstd * (dy[j] * gain[j] - m1 - nrm[j] * m2)


@njit(inline="always", **_JIT)
def _bwd_rows(gt, cprev, ctil, dhp, dc, zone, zt, fill, peep, pe, lnc_w, lnc_b, dg, hps, tc, dct, xh,
              rsb, dpe, dlnc_w, dlnc_b, nb):
    """Backward of :func:`_gates_rows`, :func:`_hp_rows` and the cell zoneout for nb rows.

    gt     (B, G)  saved gate activations i, f, g, o
    cprev  (B, H)  c_{t-1};  ctil (B, H) c~_t
    dhp    (B, H)  gradient of o * tanh(LN_c(c~))
    dc     (B, H)  gradient of c_t in, of c_{t-1} out
    zone           cell zoneout present: d from zt (B, H), or from fill (H,) when zt is (0, H)
    peep           peepholes present: pe (3, H) their weights, dpe (3, H) their gradient (accumulated)
    lnc_w, lnc_b   (H,) the cell layer norm, or (0,); dlnc_w, dlnc_b (H,) its gradients (accumulated)
    dg     (B, G)  written: gradient of the gate pre-activations
    hps    (B, H)  written when projecting: o * tanh(LN_c(c~)) (the projection's input), else (0, H)
    tc, dct, xh (B, H) scratch: tanh(LN_c(c~)), the gradient of c~, normalized c~
    rsb    (B,)    scratch: 1 / std of each row's c~
    """
    H = ctil.shape[1]
    one = gt.dtype.type(1.0)
    lnc = lnc_w.shape[0] > 0
    # one short loop per result: each reads few arrays, so the compiler's overlap checks stay
    # within its limit and the loop vectorizes (see numba_lstm._step_bwd)
    if lnc:
        for b in range(nb):
            ct = ctil[b]
            xr = xh[b]
            tr = tc[b]
            mu, rs = _mean_rstd(ct)
            for j in range(H):
                xr[j] = (ct[j] - mu) * rs
            for j in range(H):
                tr[j] = act_tanh(xr[j] * lnc_w[j] + lnc_b[j])
            rsb[b] = rs
    else:
        for b in range(nb):
            ct = ctil[b]
            tr = tc[b]
            for j in range(H):
                tr[j] = act_tanh(ct[j])
    for b in range(nb):
        og = gt[b, 3 * H:]
        dgo = dg[b, 3 * H:]
        tr = tc[b]
        dhr = dhp[b]
        for j in range(H):
            dgo[j] = dhr[j] * tr[j] * og[j] * (one - og[j])
    if hps.shape[0] > 0:
        for b in range(nb):
            og = gt[b, 3 * H:]
            tr = tc[b]
            hr = hps[b]
            for j in range(H):
                hr[j] = og[j] * tr[j]
    if lnc:
        for b in range(nb):
            og = gt[b, 3 * H:]
            tr = tc[b]
            dhr = dhp[b]
            dr = dct[b]
            xr = xh[b]
            rs = rsb[b]
            for j in range(H):
                dr[j] = dhr[j] * og[j] * (one - tr[j] * tr[j])  # gradient of LN_c(c~)
            for j in range(H):
                dlnc_b[j] += dr[j]
            ln_bwd_row(dr, xr, lnc_w, rs, dr, dlnc_w)
    else:
        for b in range(nb):
            og = gt[b, 3 * H:]
            tr = tc[b]
            dhr = dhp[b]
            dr = dct[b]
            for j in range(H):
                dr[j] = dhr[j] * og[j] * (one - tr[j] * tr[j])
    # add the paths through c_t and the output peephole
    if zone:
        for b in range(nb):
            dr = dct[b]
            dcr = dc[b]
            d = zt[b] if zt.shape[0] > 0 else fill
            for j in range(H):
                dr[j] += (one - d[j]) * dcr[j]
    else:
        for b in range(nb):
            dr = dct[b]
            dcr = dc[b]
            for j in range(H):
                dr[j] += dcr[j]
    if peep:
        po = pe[2]
        for b in range(nb):
            dr = dct[b]
            dgo = dg[b, 3 * H:]
            for j in range(H):
                dr[j] += dgo[j] * po[j]
    for b in range(nb):
        g = gt[b]
        ig = g[:H]
        fg = g[H:2 * H]
        gg = g[2 * H:3 * H]
        d = dg[b]
        dgi = d[:H]
        dgf = d[H:2 * H]
        dgg = d[2 * H:3 * H]
        dr = dct[b]
        cp = cprev[b]
        for j in range(H):
            dgi[j] = dr[j] * gg[j] * ig[j] * (one - ig[j])
        for j in range(H):
            dgf[j] = dr[j] * cp[j] * fg[j] * (one - fg[j])
        for j in range(H):
            dgg[j] = dr[j] * ig[j] * (one - gg[j] * gg[j])
    if zone:
        for b in range(nb):
            fg = gt[b, H:2 * H]
            dr = dct[b]
            dcr = dc[b]
            d = zt[b] if zt.shape[0] > 0 else fill
            for j in range(H):
                dcr[j] = d[j] * dcr[j] + dr[j] * fg[j]
    else:
        for b in range(nb):
            fg = gt[b, H:2 * H]
            dr = dct[b]
            dcr = dc[b]
            for j in range(H):
                dcr[j] = dr[j] * fg[j]
    if peep:
        pi = pe[0]
        pf = pe[1]
        dpi = dpe[0]
        dpf = dpe[1]
        dpo = dpe[2]
        for b in range(nb):
            dgi = dg[b, :H]
            dgf = dg[b, H:2 * H]
            dgo = dg[b, 3 * H:]
            dcr = dc[b]
            cp = cprev[b]
            ct = ctil[b]
            for j in range(H):
                dcr[j] += dgi[j] * pi[j] + dgf[j] * pf[j]
            for j in range(H):
                dpi[j] += dgi[j] * cp[j]
            for j in range(H):
                dpf[j] += dgf[j] * cp[j]
            for j in range(H):
                dpo[j] += dgo[j] * ct[j]


@njit(inline="always", **_JIT)
def _ln_rec_bwd_rows(dg, zraw, st, ln_g, dr, dln_g, nb):
    """Backward of :func:`_ln_rec_rows` for nb rows.

    dg    (B, G)  gradient of LN_h(r);  zraw (B, G) the saved raw r;  st (B, 2) the saved nmr, rstd
    dr    (B, G)  written: gradient of r;  dln_g (G,) gain gradient, accumulated
    """
    G = ln_g.shape[0]
    inv = dg.dtype.type(1.0) / dg.dtype.type(G)
    for b in range(nb):
        dz = dg[b]
        rr = zraw[b]
        drr = dr[b]
        nmr = st[b, 0]
        rstd = st[b, 1]
        s1 = dg.dtype.type(0.0)
        s2 = dg.dtype.type(0.0)
        for j in range(G):
            n = rr[j] * rstd + nmr
            dln_g[j] += dz[j] * n
            dy = dz[j] * ln_g[j]
            s1 += dy
            s2 += dy * n
        m1 = s1 * inv
        m2 = s2 * inv
        for j in range(G):
            drr[j] = rstd * (dz[j] * ln_g[j] - m1 - (rr[j] * rstd + nmr) * m2)


@njit(inline="always", **_JIT)
def _any_nonzero(fill):
    """Whether a zoneout fill row (X,) keeps anything."""
    for j in range(fill.shape[0]):
        if fill[j] != 0:
            return True
    return False


# --- random masks ----------------------------------------------------------------------------

@njit(**_JIT)
def bernoulli_fill(out, p, seed):
    """out (n,) = 1 with probability p, else 0: element i from the SplitMix64 output number i of
    the stream that starts at ``seed`` (Steele, Lea and Flood 2014), its top 53 bits against p.
    About 0.4 ns an element here against 3-5 ns for torch's CPU generator, which made the
    zoneout masks of a training call cost more than a layer's recurrence."""
    wide_vectors()
    th = np.uint64(p * 9007199254740992.0)  # p * 2**53
    one = out.dtype.type(1.0)
    zero = out.dtype.type(0.0)
    s = np.uint64(seed)
    for i in range(out.shape[0]):
        z = s + np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        out[i] = one if (z >> np.uint64(11)) < th else zero


# --- one layer-direction over all steps -------------------------------------------------------

@njit(**_JIT)
def layer_fwd(sgemm, mkl, xg, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse, out,
              mask, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill, gates, cs, cts, lnr, lns, r0, r1):
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
    r0, r1              the batch rows [r0, r1) this call runs (0, B: all). Rows are independent and
                        every array is read and written only at the call's rows, so calls on disjoint
                        row ranges may run at once on different threads.
    """
    wide_vectors()
    xg, w_hh, w_hh_p, w_hr, w_hr_p = unowned(xg), unowned(w_hh), unowned(w_hh_p), unowned(w_hr), unowned(w_hr_p)
    h, c, bs, out, mask, pe = unowned(h), unowned(c), unowned(bs), unowned(out), unowned(mask), unowned(pe)
    ln_g, lnc_w, lnc_b, zc, zc_fill = unowned(ln_g), unowned(lnc_w), unowned(lnc_b), unowned(zc), unowned(zc_fill)
    zh, zh_fill, gates, cs, cts = unowned(zh), unowned(zh_fill), unowned(gates), unowned(cs), unowned(cts)
    lnr, lns = unowned(lnr), unowned(lns)
    T, B, G = xg.shape
    H = G // 4
    P = h.shape[1]
    save = gates.shape[0] > 0
    save_ct = cts.shape[0] > 0
    save_ln = lnr.shape[0] > 0
    proj = w_hr.shape[0] > 0
    masked = mask.shape[0] > 0
    lnh = ln_g.shape[0] > 0
    peep = pe.shape[0] > 0
    zc_arr = zc.shape[0] > 0
    zh_arr = zh.shape[0] > 0
    zone_c = zc_arr or _any_nonzero(zc_fill)
    zone_h = zh_arr or _any_nonzero(zh_fill)
    R = r1 - r0
    z = np.empty((R, G), xg.dtype)        # gate activations when not saving them
    zr = np.empty((R if lnh else 0, G), xg.dtype)  # raw (h * m) W_hh^T when not saving it
    st = np.empty((R, 2), xg.dtype)       # layer-norm statistics when not saving them
    ct = np.empty((R, H), xg.dtype)       # c~ when not saving it
    hp = np.empty((R, H), xg.dtype)       # o * tanh(LN_c(c~)) before the projection
    hr = np.empty((R, P), xg.dtype)       # projected h~
    hin = np.empty((R, P), xg.dtype)      # h_{t-1} * mask
    own = (z, zr, st, ct, hp, hr, hin)      # kept alive to the end: their views below are unowned
    z, zr, st, ct = unowned(z), unowned(zr), unowned(st), unowned(ct)
    hp, hr, hin = unowned(hp), unowned(hr), unowned(hin)
    # this call's rows; below, row b is batch row r0 + b
    hv = h[r0:r1]
    cv = c[r0:r1]
    mv = mask[r0:r1] if masked else mask
    co = _act_coefficients(H, xg)
    no_zc = np.empty((0, H), xg.dtype)
    no_zh = np.empty((0, P), xg.dtype)
    for s in range(T):
        t = T - 1 - s if reverse else s
        nb = R if bs.shape[0] == 0 else min(max(bs[t] - r0, 0), R)
        ot = out[t][r0:r1]
        for b in range(nb, R):
            for j in range(P):
                ot[b, j] = 0
        if nb > 0:
            hsrc = hv
            if masked:
                for b in range(nb):
                    hb = hv[b]
                    mb = mv[b]
                    ib = hin[b]
                    for j in range(P):
                        ib[j] = hb[j] * mb[j]
                hsrc = hin
            # results go straight into the saved arrays when saving (no copies); saving or not,
            # the same code runs on them, so both round alike
            za = gates[t][r0:r1] if save else z
            ctt = cts[t][r0:r1] if save_ct else ct
            zraw = (lnr[t][r0:r1] if save_ln else zr) if lnh else za
            mm(sgemm, mkl, hsrc[:nb], w_hh, w_hh_p, True, zraw[:nb])
            if lnh:
                _ln_rec_rows(zraw, za, ln_g, lns[t][r0:r1] if save_ln else st, nb)
            _gates_rows(xg[t][r0:r1], za, co, peep, pe, cv, ctt, nb)
            _hp_rows(za, ctt, lnc_w, lnc_b, hp, nb)
            if zone_c:
                _zone_rows(cv, ctt, zc[t][r0:r1] if zc_arr else no_zc, zc_fill, nb)
            else:
                cv[:nb] = ctt[:nb]
            if proj:
                mm(sgemm, mkl, hp[:nb], w_hr, w_hr_p, True, hr[:nb])
                src = hr
            else:
                src = hp
            if zone_h:
                _zone_rows(hv, src, zh[t][r0:r1] if zh_arr else no_zh, zh_fill, nb)
            else:
                hv[:nb] = src[:nb]
            ot[:nb] = hv[:nb]
        if save:
            cs[t][r0:r1] = cv
    keep(own)


@njit(**_JIT)
def layer_bwd(sgemm, mkl, gates, cs, cts, lnr, lns, c0, w_hh, w_hh_p, w_hr, w_hr_p,
              mask, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill, grad_out, dh, dc, bs, reverse,
              dgates, drs, dhs, hps, dpe, dln_g, dlnc_w, dlnc_b, r0, r1):
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
    r0, r1              the batch rows [r0, r1) this call runs, as for :func:`layer_fwd` (calls on
                        disjoint rows at once need their own dpe ... dlnc_b)
    """
    wide_vectors()
    gates, cs, cts, lnr, lns, c0 = unowned(gates), unowned(cs), unowned(cts), unowned(lnr), unowned(lns), unowned(c0)
    w_hh, w_hh_p, w_hr, w_hr_p, mask = unowned(w_hh), unowned(w_hh_p), unowned(w_hr), unowned(w_hr_p), unowned(mask)
    pe, ln_g, lnc_w, lnc_b, zc = unowned(pe), unowned(ln_g), unowned(lnc_w), unowned(lnc_b), unowned(zc)
    zc_fill, zh, zh_fill, grad_out, dh = unowned(zc_fill), unowned(zh), unowned(zh_fill), unowned(grad_out), unowned(dh)
    dc, bs, dgates, drs, dhs, hps = unowned(dc), unowned(bs), unowned(dgates), unowned(drs), unowned(dhs), unowned(hps)
    dpe, dln_g, dlnc_w, dlnc_b = unowned(dpe), unowned(dln_g), unowned(dlnc_w), unowned(dlnc_b)
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
    R = r1 - r0
    dht = np.empty((R, P), gates.dtype)    # gradient of h~ (after the hidden zoneout)
    dkeep = np.empty((R, P), gates.dtype)  # the part of dh_t that goes straight to h_{t-1}
    dhp = np.empty((R, H), gates.dtype)
    dhin = np.empty((R, P), gates.dtype)
    no_hp = np.empty((0, H), gates.dtype)
    no_zc = np.empty((0, H), gates.dtype)
    no_zh = np.empty((0, P), gates.dtype)
    tc = np.empty((R, H), gates.dtype)
    dct = np.empty((R, H), gates.dtype)
    xh = np.empty((R, H), gates.dtype)
    rsb = np.empty(R, gates.dtype)
    own = (dht, dkeep, dhp, dhin, tc, dct, xh, rsb)  # kept alive to the end: their views below are unowned
    dht, dkeep, dhp, dhin = unowned(dht), unowned(dkeep), unowned(dhp), unowned(dhin)
    tc, dct, xh, rsb = unowned(tc), unowned(dct), unowned(xh), unowned(rsb)
    # this call's rows; below, row b is batch row r0 + b
    dhv = dh[r0:r1]
    dcv = dc[r0:r1]
    c0v = c0[r0:r1]
    mv = mask[r0:r1] if masked else mask
    for s in range(T):
        t = s if reverse else T - 1 - s
        nb = R if bs.shape[0] == 0 else min(max(bs[t] - r0, 0), R)
        dg = dgates[t][r0:r1]
        for b in range(nb, R):
            for j in range(G):
                dg[b, j] = 0
        dr = drs[t][r0:r1] if lnh else dg
        if lnh:
            for b in range(nb, R):
                for j in range(G):
                    dr[b, j] = 0
        dhst = dhs[t][r0:r1] if proj else no_hp
        hpst = hps[t][r0:r1] if proj else no_hp
        if proj:
            for b in range(nb, R):
                for j in range(P):
                    dhst[b, j] = 0
                for j in range(H):
                    hpst[b, j] = 0
        if nb == 0:
            continue
        got = grad_out[t][r0:r1]
        if zone_h:
            zht = zh[t][r0:r1] if zh_arr else no_zh
            for b in range(nb):
                d = zht[b] if zh_arr else zh_fill
                go = got[b]
                db = dhv[b]
                kb = dkeep[b]
                tb = dht[b]
                for j in range(P):
                    kb[j] = d[j] * (db[j] + go[j])
                for j in range(P):
                    tb[j] = db[j] + go[j] - kb[j]
        else:
            for b in range(nb):
                go = got[b]
                db = dhv[b]
                tb = dht[b]
                for j in range(P):
                    tb[j] = db[j] + go[j]
        if proj:
            dhst[:nb] = dht[:nb]
            mm(sgemm, mkl, dht[:nb], w_hr, w_hr_p, False, dhp[:nb])
            src = dhp
        else:
            src = dht
        if reverse:
            cprev = c0v if t == T - 1 else cs[t + 1][r0:r1]
        else:
            cprev = c0v if t == 0 else cs[t - 1][r0:r1]
        ctil = cts[t][r0:r1] if sep_ct else cs[t][r0:r1]
        _bwd_rows(gates[t][r0:r1], cprev, ctil, src, dcv, zone_c, zc[t][r0:r1] if zc_arr else no_zc, zc_fill,
                  peep, pe, lnc_w, lnc_b, dg, hpst, tc, dct, xh, rsb, dpe, dlnc_w, dlnc_b, nb)
        if lnh:
            _ln_rec_bwd_rows(dg, lnr[t][r0:r1], lns[t][r0:r1], ln_g, dr, dln_g, nb)
        if not (masked or zone_h):
            mm(sgemm, mkl, dr[:nb], w_hh, w_hh_p, False, dhv[:nb])
            continue
        mm(sgemm, mkl, dr[:nb], w_hh, w_hh_p, False, dhin[:nb])
        if masked and zone_h:
            for b in range(nb):
                db = dhv[b]
                ib = dhin[b]
                mb = mv[b]
                kb = dkeep[b]
                for j in range(P):
                    db[j] = kb[j] + mb[j] * ib[j]
        elif masked:
            for b in range(nb):
                db = dhv[b]
                ib = dhin[b]
                mb = mv[b]
                for j in range(P):
                    db[j] = mb[j] * ib[j]
        else:
            for b in range(nb):
                db = dhv[b]
                ib = dhin[b]
                kb = dkeep[b]
                for j in range(P):
                    db[j] = kb[j] + ib[j]
    keep(own)


# the cache of the kernels above follows edits of the files compiled into them (``_cache``)
tie_module(globals())
