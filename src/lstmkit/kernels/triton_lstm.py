"""Triton kernels for one LSTM layer-direction: forward and backward, plain and every variant.

Dimension legend
    T  time steps          B  batch rows          H  hidden size
    P  output size of a step (proj_size if > 0, else H)
    BB, BH, BP  block sizes (powers of two) covering a block of rows, all of H, all of P

Layouts (all contiguous, row-major)
    xg, gates, r, dxg, dr   (T, B, 4H)   gate blocks i, f, g, o of H columns each
    hs                      (T+1, B, P)  float32 h states, *time-slotted*: the state before time t is
    cs                      (T+1, B, H)  slot t (forward) or slot t+1 (reverse); the state after time t
                                         is slot t+1 (forward) or slot t (reverse). The host writes
                                         (h0, c0) into the initial slot (0 forward, T reverse).
    out                     (T, B, P)    h of every time, zero where a row is inactive

In lstm_fwd_kernel / lstm_bwd_kernel each program owns BB batch rows and *all* hidden units, so
the sequential dependency of a step on the previous one stays inside one program (no cross-program
synchronisation, which also keeps the kernels runnable under TRITON_INTERPRET=1). The split kernels
at the end spread the hidden units over programs instead (see the comment there).

Two modes, chosen by the constexpr PERSISTENT:
    PERSISTENT=True   one launch loops over all T steps with W_hh (and W_hr) held in registers;
                      the recurrent GEMM of each step is a tl.dot on chip. Used when 4H x P fits.
                      With W_STREAM=True the weights do not fit: each step streams them from
                      L2 in BLOCK_K chunks against the previous state re-read from global memory
                      (a CTA barrier makes the previous step's stores visible).
    PERSISTENT=False  one launch per step (k0 = that step, n_steps = 1); the host computes the
                      recurrent GEMM (and the projection GEMM) with cuBLAS and the kernel is the
                      one fused pointwise pass of that step.

The equations are those of ``lstmkit/backends/_contract.py``; all arithmetic is float32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# Compiled kernels take tanh from libdevice (accurate to 2 ulp). The interpreter has no libdevice, so
# there tanh is built from exp in a form with small *relative* error also near +-1, which the
# gradient's 1 - tanh^2 needs. (That form, compiled for sm_90, made LLVM's SLP vectorizer abort with
# Triton 3.9; 2 sigmoid(2x) - 1, which compiles, loses 3-4x accuracy in the gradients.)
_LIBDEVICE_TANH = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _tanh(x):
    if _LIBDEVICE_TANH:
        return libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, y, -y)


@triton.jit
def _ld(ptr, mask, F32: tl.constexpr):
    """A weight tile, upcast to float32 when the GEMMs run in float32."""
    w = tl.load(ptr, mask=mask, other=0.0)
    if F32:
        w = w.to(tl.float32)
    return w


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with float32 accumulation: IEEE float32, or 16-bit operands (tensor cores)."""
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _cell_fwd(
    zi, zf, zg, zo,         # (BB, BH) gate pre-activations without peepholes
    c,                      # (BB, BH) c_{t-1}
    p_i, p_f, p_o,          # (1, BH) peephole weights (HAS_PEEP)
    lnc_w, lnc_b,           # (1, BH) LN_c gain and bias (HAS_LNC)
    cmh,                    # (1, BH) 1.0 on the H real columns, 0.0 on padding
    H, eps,
    HAS_PEEP: tl.constexpr, HAS_LNC: tl.constexpr,
):
    if HAS_PEEP:
        zi = zi + p_i * c
        zf = zf + p_f * c
    i = _sigmoid(zi)
    f = _sigmoid(zf)
    g = _tanh(zg)
    cn = f * c + i * g
    if HAS_PEEP:
        zo = zo + p_o * cn
    o = _sigmoid(zo)
    mean = tl.sum(cn, axis=1) * 0.0     # (BB,)
    rstd = mean + 1.0
    ca = cn
    if HAS_LNC:
        mean = tl.sum(cn * cmh, axis=1) / H
        d = (cn - mean[:, None]) * cmh
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / H + eps)
        ca = d * rstd[:, None] * lnc_w + lnc_b
    tc = _tanh(ca)
    return i, f, g, o, cn, tc, mean, rstd


@triton.jit
def _cell_bwd(
    ghh,                    # (BB, BH) grad of hh = o * tanh(LN_c(c~)); zero on inactive rows
    gcn,                    # (BB, BH) grad of c~ through the cell state; zero on inactive rows
    i, f, g, o,             # (BB, BH) gate activations of the step
    c,                      # (BB, BH) c_{t-1}
    p_i, p_f, p_o,          # (1, BH) peephole weights (HAS_PEEP)
    lnc_w, lnc_b,           # (1, BH) LN_c gain and bias (HAS_LNC)
    mean, rstd,             # (BB,) LN_c statistics of the step (HAS_LNC)
    cmh,                    # (1, BH) column mask
    H,
    HAS_PEEP: tl.constexpr, HAS_LNC: tl.constexpr,
):
    cn = f * c + i * g
    n = cn
    ca = cn
    if HAS_LNC:
        n = (cn - mean[:, None]) * rstd[:, None] * cmh
        ca = n * lnc_w + lnc_b
    tc = _tanh(ca)
    g_o = ghh * tc
    g_ca = ghh * o * (1.0 - tc * tc)
    if HAS_LNC:
        gn = g_ca * lnc_w
        m1 = tl.sum(gn * cmh, axis=1) / H
        m2 = tl.sum(gn * n, axis=1) / H
        gcn = gcn + rstd[:, None] * (gn - m1[:, None] - n * m2[:, None]) * cmh
    else:
        gcn = gcn + g_ca
    g_ao = g_o * o * (1.0 - o)
    if HAS_PEEP:
        gcn = gcn + g_ao * p_o
    g_ai = gcn * g * i * (1.0 - i)
    g_af = gcn * c * f * (1.0 - f)
    g_zg = gcn * i * (1.0 - g * g)
    gc_prev = gcn * f
    if HAS_PEEP:
        gc_prev = gc_prev + g_ai * p_i + g_af * p_f
    return g_ai, g_af, g_zg, g_ao, gc_prev, g_ca, n, cn


# Shapes and the step index are runtime values (no recompile per T, B, step or H % 16).
_RUNTIME_INTS = ["T", "B", "H", "P", "k0", "n_steps"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lstm_fwd_kernel(
    xg_ptr,         # (T, B, 4H) input projections with biases, dtype of the layer
    rec_ptr,        # (B, 4H) h_in W_hh^T of step k0 (PERSISTENT=False only)
    w_hh_ptr,       # (4H, P) recurrent weights
    w_hr_ptr,       # (P, H) projection weights (HAS_PROJ)
    hs_ptr,         # (T+1, B, P) float32 h states, time-slotted
    cs_ptr,         # (T+1, B, H) float32 c states, time-slotted
    out_ptr,        # (T, B, P) outputs, dtype of the layer
    gates_ptr,      # (T, B, 4H) float32 i, f, g, o after activation (STORE)
    hh_ptr,         # (T, B, H) float32 o * tanh(LN_c(c~)), input of the projection (STORE_HH)
    r_ptr,          # (T, B, 4H) float32 recurrent pre-activations before LN_h (STORE and HAS_LNH)
    lnh_st_ptr,     # (T, B, 2) float32 mean, rstd of LN_h (STORE and HAS_LNH)
    lnc_st_ptr,     # (T, B, 2) float32 mean, rstd of LN_c (STORE and HAS_LNC)
    bs_ptr,         # (T,) int32 active rows per time (HAS_BS)
    peep_ptr,       # (3, H) peephole weights for i, f, o (HAS_PEEP)
    lnh_w_ptr,      # (4H,) LN_h gain (HAS_LNH)
    lnc_w_ptr,      # (H,) LN_c gain (HAS_LNC)
    lnc_b_ptr,      # (H,) LN_c bias (HAS_LNC)
    rm_ptr,         # (B, P) recurrent-dropout mask (HAS_RM)
    zc_ptr,         # (T, B, H) zoneout mask of c (ZC == 1)
    zh_ptr,         # (T, B, P) zoneout mask of h (ZH == 1)
    zc_p, zh_p,     # zoneout probabilities (ZC == 2, ZH == 2)
    T, B, H, P, k0, n_steps, eps,
    REVERSE: tl.constexpr, PERSISTENT: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_PROJ: tl.constexpr, H_IN_KERNEL: tl.constexpr,
    HAS_PEEP: tl.constexpr, HAS_LNH: tl.constexpr, HAS_LNC: tl.constexpr, HAS_RM: tl.constexpr,
    ZC: tl.constexpr, ZH: tl.constexpr, STORE: tl.constexpr, STORE_HH: tl.constexpr,
    W_STREAM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)          # (BB,)
    ch = tl.arange(0, BLOCK_H)                          # (BH,)
    cp = tl.arange(0, BLOCK_P)                          # (BP,)
    rmask = rb < B
    hmask = ch < H
    pmask = cp < P
    m_bh = rmask[:, None] & hmask[None, :]
    m_bp = rmask[:, None] & pmask[None, :]
    cmh = hmask.to(tl.float32)[None, :]                 # (1, BH)
    off_bh = rb[:, None] * H + ch[None, :]
    off_bp = rb[:, None] * P + cp[None, :]
    off_bg = rb[:, None] * (4 * H) + ch[None, :]
    G = 4 * H

    if PERSISTENT and not W_STREAM:
        # W_hh^T per gate, (BP, BH): element [p, j] = W_hh[gate * H + j, p]
        wmask = pmask[:, None] & hmask[None, :]
        w_base = w_hh_ptr + ch[None, :] * P + cp[:, None]
        w_i = tl.load(w_base, mask=wmask, other=0.0)
        w_f = tl.load(w_base + H * P, mask=wmask, other=0.0)
        w_g = tl.load(w_base + 2 * H * P, mask=wmask, other=0.0)
        w_o = tl.load(w_base + 3 * H * P, mask=wmask, other=0.0)
        if F32_DOT:
            w_i = w_i.to(tl.float32)
            w_f = w_f.to(tl.float32)
            w_g = w_g.to(tl.float32)
            w_o = w_o.to(tl.float32)
        if HAS_PROJ:
            # W_hr^T, (BH, BP): element [j, p] = W_hr[p, j]
            w_r = tl.load(w_hr_ptr + cp[None, :] * H + ch[:, None],
                          mask=hmask[:, None] & pmask[None, :], other=0.0)
            if F32_DOT:
                w_r = w_r.to(tl.float32)
    p_i = 0.0
    p_f = 0.0
    p_o = 0.0
    if HAS_PEEP:
        p_i = tl.load(peep_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        p_f = tl.load(peep_ptr + H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        p_o = tl.load(peep_ptr + 2 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LNH:
        a_i = tl.load(lnh_w_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_f = tl.load(lnh_w_ptr + H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_g = tl.load(lnh_w_ptr + 2 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_o = tl.load(lnh_w_ptr + 3 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    lnc_w = 0.0
    lnc_b = 0.0
    if HAS_LNC:
        lnc_w = tl.load(lnc_w_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        lnc_b = tl.load(lnc_b_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RM:
        rmk = tl.load(rm_ptr + off_bp, mask=m_bp, other=0.0).to(tl.float32)

    # state before the first step of this launch
    if REVERSE:
        slot0 = T - k0
    else:
        slot0 = k0
    h = tl.load(hs_ptr + slot0 * B * P + off_bp, mask=m_bp, other=0.0)
    c = tl.load(cs_ptr + slot0 * B * H + off_bh, mask=m_bh, other=0.0)

    for k in range(k0, k0 + n_steps):
        if REVERSE:
            t = T - 1 - k
            prev = t + 1
            new = t
        else:
            t = k
            prev = t
            new = t + 1
        xb = xg_ptr + t * B * G + off_bg
        zi = tl.load(xb, mask=m_bh, other=0.0).to(tl.float32)
        zf = tl.load(xb + H, mask=m_bh, other=0.0).to(tl.float32)
        zg = tl.load(xb + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        zo = tl.load(xb + 3 * H, mask=m_bh, other=0.0).to(tl.float32)
        if PERSISTENT and W_STREAM:
            tl.debug_barrier()      # the previous step's h stores are visible to every thread
            ri = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            rf = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            rg = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            ro = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for kk in range(0, P, BLOCK_K):
                ck = kk + tl.arange(0, BLOCK_K)                  # (BK,)
                kmask = ck < P
                am = rmask[:, None] & kmask[None, :]
                hc = tl.load(hs_ptr + prev * B * P + rb[:, None] * P + ck[None, :], mask=am, other=0.0)
                if HAS_RM:
                    hc = hc * tl.load(rm_ptr + rb[:, None] * P + ck[None, :], mask=am, other=0.0).to(tl.float32)
                wm = kmask[:, None] & hmask[None, :]
                wb = w_hh_ptr + ch[None, :] * P + ck[:, None]     # (BK, BH) chunk of W_hh^T
                ri += _dot(hc, _ld(wb, wm, F32_DOT), F32_DOT)
                rf += _dot(hc, _ld(wb + H * P, wm, F32_DOT), F32_DOT)
                rg += _dot(hc, _ld(wb + 2 * H * P, wm, F32_DOT), F32_DOT)
                ro += _dot(hc, _ld(wb + 3 * H * P, wm, F32_DOT), F32_DOT)
        elif PERSISTENT:
            hin = h
            if HAS_RM:
                hin = h * rmk
            if F32_DOT:
                ri = tl.dot(hin, w_i, input_precision="ieee")
                rf = tl.dot(hin, w_f, input_precision="ieee")
                rg = tl.dot(hin, w_g, input_precision="ieee")
                ro = tl.dot(hin, w_o, input_precision="ieee")
            else:
                hin16 = hin.to(w_i.dtype)
                ri = tl.dot(hin16, w_i)
                rf = tl.dot(hin16, w_f)
                rg = tl.dot(hin16, w_g)
                ro = tl.dot(hin16, w_o)
        else:
            rbp = rec_ptr + off_bg
            ri = tl.load(rbp, mask=m_bh, other=0.0).to(tl.float32)
            rf = tl.load(rbp + H, mask=m_bh, other=0.0).to(tl.float32)
            rg = tl.load(rbp + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
            ro = tl.load(rbp + 3 * H, mask=m_bh, other=0.0).to(tl.float32)
        if HAS_LNH:
            if STORE:
                rsb = r_ptr + t * B * G + off_bg
                tl.store(rsb, ri, mask=m_bh)
                tl.store(rsb + H, rf, mask=m_bh)
                tl.store(rsb + 2 * H, rg, mask=m_bh)
                tl.store(rsb + 3 * H, ro, mask=m_bh)
            mu = (tl.sum(ri * cmh, axis=1) + tl.sum(rf * cmh, axis=1)
                  + tl.sum(rg * cmh, axis=1) + tl.sum(ro * cmh, axis=1)) / G
            di = (ri - mu[:, None]) * cmh
            df = (rf - mu[:, None]) * cmh
            dg = (rg - mu[:, None]) * cmh
            do = (ro - mu[:, None]) * cmh
            var = (tl.sum(di * di, axis=1) + tl.sum(df * df, axis=1)
                   + tl.sum(dg * dg, axis=1) + tl.sum(do * do, axis=1)) / G
            rs = 1.0 / tl.sqrt(var + eps)
            if STORE:
                tl.store(lnh_st_ptr + (t * B + rb) * 2, mu, mask=rmask)
                tl.store(lnh_st_ptr + (t * B + rb) * 2 + 1, rs, mask=rmask)
            ri = di * rs[:, None] * a_i
            rf = df * rs[:, None] * a_f
            rg = dg * rs[:, None] * a_g
            ro = do * rs[:, None] * a_o
        i, f, g, o, cn, tc, lmu, lrs = _cell_fwd(
            zi + ri, zf + rf, zg + rg, zo + ro, c, p_i, p_f, p_o, lnc_w, lnc_b, cmh, H, eps,
            HAS_PEEP, HAS_LNC)
        hh = o * tc
        if HAS_BS:
            act = (rb < tl.load(bs_ptr + t))[:, None]
        else:
            act = rmask[:, None]
        if ZC == 1:
            dcm = tl.load(zc_ptr + t * B * H + off_bh, mask=m_bh, other=0.0).to(tl.float32)
            c_new = dcm * c + (1.0 - dcm) * cn
        elif ZC == 2:
            c_new = zc_p * c + (1.0 - zc_p) * cn
        else:
            c_new = cn
        c = tl.where(act, c_new, c)
        tl.store(cs_ptr + new * B * H + off_bh, c, mask=m_bh)
        if STORE:
            gb = gates_ptr + t * B * G + off_bg
            tl.store(gb, i, mask=m_bh)
            tl.store(gb + H, f, mask=m_bh)
            tl.store(gb + 2 * H, g, mask=m_bh)
            tl.store(gb + 3 * H, o, mask=m_bh)
            if HAS_LNC:
                tl.store(lnc_st_ptr + (t * B + rb) * 2, lmu, mask=rmask)
                tl.store(lnc_st_ptr + (t * B + rb) * 2 + 1, lrs, mask=rmask)
        if STORE_HH:
            tl.store(hh_ptr + t * B * H + off_bh, hh, mask=m_bh)
        if H_IN_KERNEL:
            if HAS_PROJ and W_STREAM:
                tl.debug_barrier()  # hh of this step (stored above) is visible
                ht = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
                for kk in range(0, H, BLOCK_K):
                    ck = kk + tl.arange(0, BLOCK_K)
                    kmask = ck < H
                    a = tl.load(hh_ptr + t * B * H + rb[:, None] * H + ck[None, :],
                                mask=rmask[:, None] & kmask[None, :], other=0.0)
                    w = _ld(w_hr_ptr + cp[None, :] * H + ck[:, None], kmask[:, None] & pmask[None, :], F32_DOT)
                    ht += _dot(a, w, F32_DOT)
            elif HAS_PROJ:
                ht = _dot(hh, w_r, F32_DOT)
            else:
                ht = hh
            if ZH == 1:
                dhm = tl.load(zh_ptr + t * B * P + off_bp, mask=m_bp, other=0.0).to(tl.float32)
                h_new = dhm * h + (1.0 - dhm) * ht
            elif ZH == 2:
                h_new = zh_p * h + (1.0 - zh_p) * ht
            else:
                h_new = ht
            h = tl.where(act, h_new, h)
            tl.store(hs_ptr + new * B * P + off_bp, h, mask=m_bp)
            tl.store(out_ptr + t * B * P + off_bp,
                     tl.where(act, h_new, 0.0).to(out_ptr.dtype.element_ty), mask=m_bp)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lstm_bwd_kernel(
    gout_ptr,       # (T, B, P) grad of out
    gh_ptr,         # (B, P) float32 in/out: grad of the h state; grad of h_n in, grad of h0 out
    gc_ptr,         # (B, H) float32 in/out: grad of the c state; grad of c_n in, grad of c0 out
    ghh_ptr,        # (B, H) float32 grad of hh of this step (GHH_IN: host did the projection part)
    w_hh_ptr,       # (4H, P) recurrent weights (PERSISTENT)
    w_hr_ptr,       # (P, H) projection weights (PERSISTENT and HAS_PROJ)
    hs_ptr,         # (T+1, B, P) float32 h states from the forward, time-slotted
    cs_ptr,         # (T+1, B, H) float32 c states from the forward, time-slotted
    gates_ptr,      # (T, B, 4H) float32 gate activations from the forward
    r_ptr,          # (T, B, 4H) float32 recurrent pre-activations before LN_h (HAS_LNH)
    lnh_st_ptr,     # (T, B, 2) float32 LN_h mean, rstd (HAS_LNH)
    lnc_st_ptr,     # (T, B, 2) float32 LN_c mean, rstd (HAS_LNC)
    bs_ptr,         # (T,) int32 active rows per time (HAS_BS)
    peep_ptr,       # (3, H) (HAS_PEEP)
    lnh_w_ptr,      # (4H,) (HAS_LNH)
    lnc_w_ptr,      # (H,) (HAS_LNC)
    lnc_b_ptr,      # (H,) (HAS_LNC)
    rm_ptr,         # (B, P) recurrent-dropout mask (HAS_RM)
    zc_ptr,         # (T, B, H) (ZC == 1)
    zh_ptr,         # (T, B, P) (ZH == 1)
    zc_p, zh_p,     # zoneout probabilities (ZC == 2, ZH == 2)
    dxg_ptr,        # (T, B, 4H) float32 out: grad of xg
    dr_ptr,         # (T, B, 4H) float32 out: grad of h_in W_hh^T (HAS_LNH; otherwise equal to dxg)
    dht_ptr,        # (T, B, P) float32 out: grad of the projection output h~ (HAS_PROJ and H_PART)
    dpar_ptr,       # (n_programs, 9H) float32 in/out: partial sums over this program's rows of the
                    #   grads of LN_h gain [0, 4H), peephole i, f, o [4H, 7H), LN_c gain [7H, 8H),
                    #   LN_c bias [8H, 9H)
    T, B, H, P, k0, n_steps,
    REVERSE: tl.constexpr, PERSISTENT: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_PROJ: tl.constexpr, H_PART: tl.constexpr,
    HAS_PEEP: tl.constexpr, HAS_LNH: tl.constexpr, HAS_LNC: tl.constexpr, HAS_RM: tl.constexpr,
    ZC: tl.constexpr, ZH: tl.constexpr, W_STREAM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # k counts backward steps: k = 0 is the forward's last step.
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    ch = tl.arange(0, BLOCK_H)
    cp = tl.arange(0, BLOCK_P)
    rmask = rb < B
    hmask = ch < H
    pmask = cp < P
    m_bh = rmask[:, None] & hmask[None, :]
    m_bp = rmask[:, None] & pmask[None, :]
    cmh = hmask.to(tl.float32)[None, :]
    off_bh = rb[:, None] * H + ch[None, :]
    off_bp = rb[:, None] * P + cp[None, :]
    off_bg = rb[:, None] * (4 * H) + ch[None, :]
    G = 4 * H

    if PERSISTENT and not W_STREAM:
        # W_hh per gate, (BH, BP): element [j, p] = W_hh[gate * H + j, p]
        wmask = hmask[:, None] & pmask[None, :]
        w_base = w_hh_ptr + ch[:, None] * P + cp[None, :]
        w_i = tl.load(w_base, mask=wmask, other=0.0)
        w_f = tl.load(w_base + H * P, mask=wmask, other=0.0)
        w_g = tl.load(w_base + 2 * H * P, mask=wmask, other=0.0)
        w_o = tl.load(w_base + 3 * H * P, mask=wmask, other=0.0)
        if F32_DOT:
            w_i = w_i.to(tl.float32)
            w_f = w_f.to(tl.float32)
            w_g = w_g.to(tl.float32)
            w_o = w_o.to(tl.float32)
        if HAS_PROJ:
            # W_hr, (BP, BH)
            w_r = tl.load(w_hr_ptr + cp[:, None] * H + ch[None, :],
                          mask=pmask[:, None] & hmask[None, :], other=0.0)
            if F32_DOT:
                w_r = w_r.to(tl.float32)
    p_i = 0.0
    p_f = 0.0
    p_o = 0.0
    if HAS_PEEP:
        p_i = tl.load(peep_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        p_f = tl.load(peep_ptr + H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        p_o = tl.load(peep_ptr + 2 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LNH:
        a_i = tl.load(lnh_w_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_f = tl.load(lnh_w_ptr + H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_g = tl.load(lnh_w_ptr + 2 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        a_o = tl.load(lnh_w_ptr + 3 * H + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    lnc_w = 0.0
    lnc_b = 0.0
    if HAS_LNC:
        lnc_w = tl.load(lnc_w_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
        lnc_b = tl.load(lnc_b_ptr + ch, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RM:
        rmk = tl.load(rm_ptr + off_bp, mask=m_bp, other=0.0).to(tl.float32)

    gh = tl.load(gh_ptr + off_bp, mask=m_bp, other=0.0)
    gc = tl.load(gc_ptr + off_bh, mask=m_bh, other=0.0)
    zero_h = tl.sum(gc, axis=0) * 0.0          # (BH,)
    acc_ai = zero_h                             # LN_h gain partials, per gate
    acc_af = zero_h
    acc_ag = zero_h
    acc_ao = zero_h
    acc_pi = zero_h                             # peephole partials
    acc_pf = zero_h
    acc_po = zero_h
    acc_lw = zero_h                             # LN_c gain and bias partials
    acc_lb = zero_h

    for k in range(k0, k0 + n_steps):
        if REVERSE:
            t = k
            prev = t + 1
        else:
            t = T - 1 - k
            prev = t
        if HAS_BS:
            actv = rb < tl.load(bs_ptr + t)
        else:
            actv = rmask
        act = actv[:, None]
        actf = act.to(tl.float32)
        if H_PART:
            gh = gh + tl.load(gout_ptr + t * B * P + off_bp, mask=m_bp & act, other=0.0).to(tl.float32)
            if ZH == 1:
                dhm = tl.load(zh_ptr + t * B * P + off_bp, mask=m_bp, other=0.0).to(tl.float32)
                ght = (1.0 - dhm) * gh * actf
                gh_keep = dhm * gh
            elif ZH == 2:
                ght = (1.0 - zh_p) * gh * actf
                gh_keep = zh_p * gh
            else:
                ght = gh * actf
                gh_keep = gh * 0.0
            if HAS_PROJ:
                tl.store(dht_ptr + t * B * P + off_bp, ght, mask=m_bp)
                if W_STREAM:
                    tl.debug_barrier()
                    ghh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    for kk in range(0, P, BLOCK_K):
                        ck = kk + tl.arange(0, BLOCK_K)
                        kmask = ck < P
                        a = tl.load(dht_ptr + t * B * P + rb[:, None] * P + ck[None, :],
                                    mask=rmask[:, None] & kmask[None, :], other=0.0)
                        w = _ld(w_hr_ptr + ck[:, None] * H + ch[None, :], kmask[:, None] & hmask[None, :],
                                F32_DOT)
                        ghh += _dot(a, w, F32_DOT)
                else:
                    ghh = _dot(ght, w_r, F32_DOT)
            else:
                ghh = ght
        else:
            ghh = tl.load(ghh_ptr + off_bh, mask=m_bh, other=0.0)
        if ZC == 1:
            dcm = tl.load(zc_ptr + t * B * H + off_bh, mask=m_bh, other=0.0).to(tl.float32)
            gcn = (1.0 - dcm) * gc * actf
            gc_keep = dcm * gc
        elif ZC == 2:
            gcn = (1.0 - zc_p) * gc * actf
            gc_keep = zc_p * gc
        else:
            gcn = gc * actf
            gc_keep = gc * 0.0
        gb = gates_ptr + t * B * G + off_bg
        i = tl.load(gb, mask=m_bh, other=0.0)
        f = tl.load(gb + H, mask=m_bh, other=0.0)
        g = tl.load(gb + 2 * H, mask=m_bh, other=0.0)
        o = tl.load(gb + 3 * H, mask=m_bh, other=0.0)
        c = tl.load(cs_ptr + prev * B * H + off_bh, mask=m_bh, other=0.0)
        lmu = tl.sum(c, axis=1) * 0.0
        lrs = lmu
        if HAS_LNC:
            lmu = tl.load(lnc_st_ptr + (t * B + rb) * 2, mask=rmask, other=0.0)
            lrs = tl.load(lnc_st_ptr + (t * B + rb) * 2 + 1, mask=rmask, other=0.0)
        g_ai, g_af, g_zg, g_ao, gc_prev, g_ca, n, cn = _cell_bwd(
            ghh, gcn, i, f, g, o, c, p_i, p_f, p_o, lnc_w, lnc_b, lmu, lrs, cmh, H,
            HAS_PEEP, HAS_LNC)
        if HAS_PEEP:
            acc_pi += tl.sum(g_ai * c, axis=0)
            acc_pf += tl.sum(g_af * c, axis=0)
            acc_po += tl.sum(g_ao * cn, axis=0)
        if HAS_LNC:
            acc_lw += tl.sum(g_ca * n, axis=0)
            acc_lb += tl.sum(g_ca, axis=0)
        db = dxg_ptr + t * B * G + off_bg
        tl.store(db, g_ai, mask=m_bh)
        tl.store(db + H, g_af, mask=m_bh)
        tl.store(db + 2 * H, g_zg, mask=m_bh)
        tl.store(db + 3 * H, g_ao, mask=m_bh)
        if HAS_LNH:
            rsb = r_ptr + t * B * G + off_bg
            mu = tl.load(lnh_st_ptr + (t * B + rb) * 2, mask=rmask, other=0.0)[:, None]
            rs = tl.load(lnh_st_ptr + (t * B + rb) * 2 + 1, mask=rmask, other=0.0)[:, None]
            ni = (tl.load(rsb, mask=m_bh, other=0.0) - mu) * rs * cmh
            nf = (tl.load(rsb + H, mask=m_bh, other=0.0) - mu) * rs * cmh
            ng = (tl.load(rsb + 2 * H, mask=m_bh, other=0.0) - mu) * rs * cmh
            no = (tl.load(rsb + 3 * H, mask=m_bh, other=0.0) - mu) * rs * cmh
            acc_ai += tl.sum(g_ai * ni, axis=0)
            acc_af += tl.sum(g_af * nf, axis=0)
            acc_ag += tl.sum(g_zg * ng, axis=0)
            acc_ao += tl.sum(g_ao * no, axis=0)
            ui = g_ai * a_i
            uf = g_af * a_f
            ug = g_zg * a_g
            uo = g_ao * a_o
            m1 = (tl.sum(ui, axis=1) + tl.sum(uf, axis=1) + tl.sum(ug, axis=1) + tl.sum(uo, axis=1)) / G
            m2 = (tl.sum(ui * ni, axis=1) + tl.sum(uf * nf, axis=1)
                  + tl.sum(ug * ng, axis=1) + tl.sum(uo * no, axis=1)) / G
            m1 = m1[:, None]
            m2 = m2[:, None]
            g_ri = rs * (ui - m1 - ni * m2) * cmh
            g_rf = rs * (uf - m1 - nf * m2) * cmh
            g_rg = rs * (ug - m1 - ng * m2) * cmh
            g_ro = rs * (uo - m1 - no * m2) * cmh
            drb = dr_ptr + t * B * G + off_bg
            tl.store(drb, g_ri, mask=m_bh)
            tl.store(drb + H, g_rf, mask=m_bh)
            tl.store(drb + 2 * H, g_rg, mask=m_bh)
            tl.store(drb + 3 * H, g_ro, mask=m_bh)
        else:
            g_ri = g_ai
            g_rf = g_af
            g_rg = g_zg
            g_ro = g_ao
        gc = tl.where(act, gc_keep + gc_prev, gc)
        if H_PART:
            if PERSISTENT and W_STREAM:
                tl.debug_barrier()  # this step's dr stores are visible
                ghin = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
                for kk in range(0, G, BLOCK_K):
                    ck = kk + tl.arange(0, BLOCK_K)
                    kmask = ck < G
                    a = tl.load(dr_ptr + t * B * G + rb[:, None] * G + ck[None, :],
                                mask=rmask[:, None] & kmask[None, :], other=0.0)
                    w = _ld(w_hh_ptr + ck[:, None] * P + cp[None, :], kmask[:, None] & pmask[None, :], F32_DOT)
                    ghin += _dot(a, w, F32_DOT)
                if HAS_RM:
                    ghin = ghin * rmk
                gh = tl.where(act, gh_keep + ghin, gh)
            elif PERSISTENT:
                if F32_DOT:
                    ghin = (tl.dot(g_ri, w_i, input_precision="ieee")
                            + tl.dot(g_rf, w_f, input_precision="ieee")
                            + tl.dot(g_rg, w_g, input_precision="ieee")
                            + tl.dot(g_ro, w_o, input_precision="ieee"))
                else:
                    ghin = (tl.dot(g_ri.to(w_i.dtype), w_i) + tl.dot(g_rf.to(w_i.dtype), w_f)
                            + tl.dot(g_rg.to(w_i.dtype), w_g) + tl.dot(g_ro.to(w_i.dtype), w_o))
                if HAS_RM:
                    ghin = ghin * rmk
                gh = tl.where(act, gh_keep + ghin, gh)
            else:
                # the host adds (dr[t] W_hh) * mask, which is zero on inactive rows
                gh = tl.where(act, gh_keep, gh)

    if H_PART:
        tl.store(gh_ptr + off_bp, gh, mask=m_bp)
    tl.store(gc_ptr + off_bh, gc, mask=m_bh)
    if HAS_LNH or HAS_PEEP or HAS_LNC:
        pb = dpar_ptr + pid * 9 * H + ch
        if HAS_LNH:
            tl.store(pb, tl.load(pb, mask=hmask, other=0.0) + acc_ai, mask=hmask)
            tl.store(pb + H, tl.load(pb + H, mask=hmask, other=0.0) + acc_af, mask=hmask)
            tl.store(pb + 2 * H, tl.load(pb + 2 * H, mask=hmask, other=0.0) + acc_ag, mask=hmask)
            tl.store(pb + 3 * H, tl.load(pb + 3 * H, mask=hmask, other=0.0) + acc_ao, mask=hmask)
        if HAS_PEEP:
            tl.store(pb + 4 * H, tl.load(pb + 4 * H, mask=hmask, other=0.0) + acc_pi, mask=hmask)
            tl.store(pb + 5 * H, tl.load(pb + 5 * H, mask=hmask, other=0.0) + acc_pf, mask=hmask)
            tl.store(pb + 6 * H, tl.load(pb + 6 * H, mask=hmask, other=0.0) + acc_po, mask=hmask)
        if HAS_LNC:
            tl.store(pb + 7 * H, tl.load(pb + 7 * H, mask=hmask, other=0.0) + acc_lw, mask=hmask)
            tl.store(pb + 8 * H, tl.load(pb + 8 * H, mask=hmask, other=0.0) + acc_lb, mask=hmask)


# ---------------------------------------------------------------------------------------------------
# Split kernels: the hidden units of a step spread over several programs (FlashRNN's idea), so a
# small batch uses many SMs. Program (j, b) owns units [j*BLOCK_HC, (j+1)*BLOCK_HC) of all four gates
# for batch rows block b; every step it needs the whole previous h (forward) or the whole gate
# gradient of the step (backward), written by its sibling programs. On a GPU one launch runs all
# steps with a barrier among the siblings (SYNC; an atomic counter per row block, all programs
# resident: the host keeps the grid within the SM count). Under the interpreter, which runs programs
# one after another, the host launches one step (forward) or one phase of a step (backward) at a time
# instead, so the barrier is the launch boundary. No projection, no layer norm (their row-wide
# reductions would need more barriers): those run in the other kernels.
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _sibling_barrier(sync_ptr, n_arrived):
    """Wait until `n_arrived` arrivals (this one included) are counted at sync_ptr (an int32).

    The pattern of cooperative groups' grid sync: CTA barrier, one release add per program (Triton
    issues scalar atomics from one thread), acquire polling, then a gpu-scope fence in every thread
    (so no load after it is served from a stale L1 line) and a CTA barrier.
    """
    tl.debug_barrier()                                   # every thread of this program has stored
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    while seen < n_arrived:
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lstm_fwd_split_kernel(
    xg_ptr,         # (T, B, 4H) input projections with biases, dtype of the layer
    w_hh_ptr,       # (4H, H) recurrent weights (P == H: no projection)
    hs_ptr,         # (T+1, B, H) float32 h states, time-slotted
    cs_ptr,         # (T+1, B, H) float32 c states, time-slotted
    out_ptr,        # (T, B, H) outputs, dtype of the layer
    gates_ptr,      # (T, B, 4H) float32 gate activations (STORE)
    bs_ptr,         # (T,) int32 active rows per time (HAS_BS)
    peep_ptr,       # (3, H) peephole weights (HAS_PEEP)
    rm_ptr,         # (B, H) recurrent-dropout mask (HAS_RM)
    zc_ptr,         # (T, B, H) zoneout mask of c (ZC == 1)
    zh_ptr,         # (T, B, H) zoneout mask of h (ZH == 1)
    zc_p, zh_p,     # zoneout probabilities (ZC == 2, ZH == 2)
    sync_ptr,       # (n_row_blocks,) int32 zeros: arrival counters (SYNC)
    T, B, H, P, k0, n_steps,
    REVERSE: tl.constexpr, F32_DOT: tl.constexpr, HAS_BS: tl.constexpr, HAS_PEEP: tl.constexpr,
    HAS_RM: tl.constexpr, ZC: tl.constexpr, ZH: tl.constexpr, STORE: tl.constexpr, SYNC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_HC: tl.constexpr,
):
    pj = tl.program_id(0)
    pb = tl.program_id(1)
    n_j = tl.num_programs(0)
    rb = pb * BLOCK_B + tl.arange(0, BLOCK_B)           # (BB,) rows
    cj = pj * BLOCK_HC + tl.arange(0, BLOCK_HC)         # (BHC,) this program's units
    rmask = rb < B
    jmask = cj < H
    m = rmask[:, None] & jmask[None, :]
    off = rb[:, None] * H + cj[None, :]
    off_g = rb[:, None] * (4 * H) + cj[None, :]
    G = 4 * H
    p_i = 0.0
    p_f = 0.0
    p_o = 0.0
    if HAS_PEEP:
        p_i = tl.load(peep_ptr + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
        p_f = tl.load(peep_ptr + H + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
        p_o = tl.load(peep_ptr + 2 * H + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
    if REVERSE:
        slot0 = T - k0
    else:
        slot0 = k0
    h = tl.load(hs_ptr + slot0 * B * H + off, mask=m, other=0.0)
    c = tl.load(cs_ptr + slot0 * B * H + off, mask=m, other=0.0)
    for k in range(k0, k0 + n_steps):
        if REVERSE:
            t = T - 1 - k
            prev = t + 1
            new = t
        else:
            t = k
            prev = t
            new = t + 1
        ri = tl.zeros((BLOCK_B, BLOCK_HC), dtype=tl.float32)
        rf = tl.zeros((BLOCK_B, BLOCK_HC), dtype=tl.float32)
        rg = tl.zeros((BLOCK_B, BLOCK_HC), dtype=tl.float32)
        ro = tl.zeros((BLOCK_B, BLOCK_HC), dtype=tl.float32)
        for kk in range(0, H, BLOCK_K):
            ck = kk + tl.arange(0, BLOCK_K)
            kmask = ck < H
            am = rmask[:, None] & kmask[None, :]
            # written by the siblings in the previous step (ordered by the barrier); .cg: prefer L2
            hc = tl.load(hs_ptr + prev * B * H + rb[:, None] * H + ck[None, :], mask=am, other=0.0,
                         cache_modifier=".cg")
            if HAS_RM:
                hc = hc * tl.load(rm_ptr + rb[:, None] * H + ck[None, :], mask=am, other=0.0).to(tl.float32)
            wm = kmask[:, None] & jmask[None, :]
            wb = w_hh_ptr + cj[None, :] * H + ck[:, None]     # (BK, BHC) chunk of W_hh^T, gate i
            ri += _dot(hc, _ld(wb, wm, F32_DOT), F32_DOT)
            rf += _dot(hc, _ld(wb + H * H, wm, F32_DOT), F32_DOT)
            rg += _dot(hc, _ld(wb + 2 * H * H, wm, F32_DOT), F32_DOT)
            ro += _dot(hc, _ld(wb + 3 * H * H, wm, F32_DOT), F32_DOT)
        xb = xg_ptr + t * B * G + off_g
        zi = tl.load(xb, mask=m, other=0.0).to(tl.float32) + ri
        zf = tl.load(xb + H, mask=m, other=0.0).to(tl.float32) + rf
        zg = tl.load(xb + 2 * H, mask=m, other=0.0).to(tl.float32) + rg
        zo = tl.load(xb + 3 * H, mask=m, other=0.0).to(tl.float32) + ro
        i, f, g, o, cn, tc, lmu, lrs = _cell_fwd(zi, zf, zg, zo, c, p_i, p_f, p_o, 0.0, 0.0, 0.0, H, 0.0,
                                                 HAS_PEEP, False)
        if HAS_BS:
            act = (rb < tl.load(bs_ptr + t))[:, None]
        else:
            act = rmask[:, None]
        if ZC == 1:
            dcm = tl.load(zc_ptr + t * B * H + off, mask=m, other=0.0).to(tl.float32)
            c_new = dcm * c + (1.0 - dcm) * cn
        elif ZC == 2:
            c_new = zc_p * c + (1.0 - zc_p) * cn
        else:
            c_new = cn
        ht = o * tc
        if ZH == 1:
            dhm = tl.load(zh_ptr + t * B * H + off, mask=m, other=0.0).to(tl.float32)
            h_new = dhm * h + (1.0 - dhm) * ht
        elif ZH == 2:
            h_new = zh_p * h + (1.0 - zh_p) * ht
        else:
            h_new = ht
        c = tl.where(act, c_new, c)
        h = tl.where(act, h_new, h)
        tl.store(cs_ptr + new * B * H + off, c, mask=m)
        tl.store(hs_ptr + new * B * H + off, h, mask=m)
        tl.store(out_ptr + t * B * H + off, tl.where(act, h_new, 0.0).to(out_ptr.dtype.element_ty), mask=m)
        if STORE:
            gb = gates_ptr + t * B * G + off_g
            tl.store(gb, i, mask=m)
            tl.store(gb + H, f, mask=m)
            tl.store(gb + 2 * H, g, mask=m)
            tl.store(gb + 3 * H, o, mask=m)
        if SYNC:
            _sibling_barrier(sync_ptr + pb, (k - k0 + 1) * n_j)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def lstm_bwd_split_kernel(
    gout_ptr,       # (T, B, H) grad of out
    gh_ptr,         # (B, H) float32 in/out: grad of the h state
    gc_ptr,         # (B, H) float32 in/out: grad of the c state
    w_hh_ptr,       # (4H, H) recurrent weights
    hs_ptr,         # (T+1, B, H) float32 h states from the forward (unused; kept for symmetry)
    cs_ptr,         # (T+1, B, H) float32 c states from the forward, time-slotted
    gates_ptr,      # (T, B, 4H) float32 gate activations from the forward
    bs_ptr,         # (T,) int32 (HAS_BS)
    peep_ptr,       # (3, H) (HAS_PEEP)
    rm_ptr,         # (B, H) (HAS_RM)
    zc_ptr,         # (T, B, H) (ZC == 1)
    zh_ptr,         # (T, B, H) (ZH == 1)
    zc_p, zh_p,
    dxg_ptr,        # (T, B, 4H) float32 out: grad of xg (= grad of h_in W_hh^T: no layer norm here)
    dpar_ptr,       # (n_row_blocks, 9H) float32 in/out: partial parameter grads (peephole at [4H, 7H))
    sync_ptr,       # (n_row_blocks,) int32 zeros (SYNC)
    T, B, H, P, k0, n_steps,
    REVERSE: tl.constexpr, F32_DOT: tl.constexpr, HAS_BS: tl.constexpr, HAS_PEEP: tl.constexpr,
    HAS_RM: tl.constexpr, ZC: tl.constexpr, ZH: tl.constexpr, SYNC: tl.constexpr,
    PHASE_A: tl.constexpr, PHASE_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_HC: tl.constexpr,
):
    # PHASE_A: the cell's backward for this program's units (stores dxg, updates gc, keeps the
    # h-state part of gh); PHASE_B: gh += (dxg[t] W_hh)[:, own units] * mask, which reads every
    # sibling's dxg. Both with SYNC on a GPU; one at a time per launch under the interpreter.
    pj = tl.program_id(0)
    pb = tl.program_id(1)
    n_j = tl.num_programs(0)
    rb = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    cj = pj * BLOCK_HC + tl.arange(0, BLOCK_HC)
    rmask = rb < B
    jmask = cj < H
    m = rmask[:, None] & jmask[None, :]
    off = rb[:, None] * H + cj[None, :]
    off_g = rb[:, None] * (4 * H) + cj[None, :]
    G = 4 * H
    p_i = 0.0
    p_f = 0.0
    p_o = 0.0
    if HAS_PEEP:
        p_i = tl.load(peep_ptr + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
        p_f = tl.load(peep_ptr + H + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
        p_o = tl.load(peep_ptr + 2 * H + cj, mask=jmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RM:
        rmk = tl.load(rm_ptr + off, mask=m, other=0.0).to(tl.float32)
    gh = tl.load(gh_ptr + off, mask=m, other=0.0)
    gc = tl.load(gc_ptr + off, mask=m, other=0.0)
    zero_c = tl.sum(gc, axis=0) * 0.0
    acc_pi = zero_c
    acc_pf = zero_c
    acc_po = zero_c
    for k in range(k0, k0 + n_steps):
        if REVERSE:
            t = k
            prev = t + 1
        else:
            t = T - 1 - k
            prev = t
        if PHASE_A:
            if HAS_BS:
                act = (rb < tl.load(bs_ptr + t))[:, None]
            else:
                act = rmask[:, None]
            actf = act.to(tl.float32)
            gh = gh + tl.load(gout_ptr + t * B * H + off, mask=m & act, other=0.0).to(tl.float32)
            if ZH == 1:
                dhm = tl.load(zh_ptr + t * B * H + off, mask=m, other=0.0).to(tl.float32)
                ghh = (1.0 - dhm) * gh * actf
                gh_keep = dhm * gh
            elif ZH == 2:
                ghh = (1.0 - zh_p) * gh * actf
                gh_keep = zh_p * gh
            else:
                ghh = gh * actf
                gh_keep = gh * 0.0
            if ZC == 1:
                dcm = tl.load(zc_ptr + t * B * H + off, mask=m, other=0.0).to(tl.float32)
                gcn = (1.0 - dcm) * gc * actf
                gc_keep = dcm * gc
            elif ZC == 2:
                gcn = (1.0 - zc_p) * gc * actf
                gc_keep = zc_p * gc
            else:
                gcn = gc * actf
                gc_keep = gc * 0.0
            gb = gates_ptr + t * B * G + off_g
            i = tl.load(gb, mask=m, other=0.0)
            f = tl.load(gb + H, mask=m, other=0.0)
            g = tl.load(gb + 2 * H, mask=m, other=0.0)
            o = tl.load(gb + 3 * H, mask=m, other=0.0)
            c = tl.load(cs_ptr + prev * B * H + off, mask=m, other=0.0)
            g_ai, g_af, g_zg, g_ao, gc_prev, g_ca, n, cn = _cell_bwd(
                ghh, gcn, i, f, g, o, c, p_i, p_f, p_o, 0.0, 0.0, zero_c, zero_c, 0.0, H, HAS_PEEP, False)
            if HAS_PEEP:
                acc_pi += tl.sum(g_ai * c, axis=0)
                acc_pf += tl.sum(g_af * c, axis=0)
                acc_po += tl.sum(g_ao * cn, axis=0)
            db = dxg_ptr + t * B * G + off_g
            tl.store(db, g_ai, mask=m)
            tl.store(db + H, g_af, mask=m)
            tl.store(db + 2 * H, g_zg, mask=m)
            tl.store(db + 3 * H, g_ao, mask=m)
            gc = tl.where(act, gc_keep + gc_prev, gc)
            gh = tl.where(act, gh_keep, gh)
        if SYNC:
            _sibling_barrier(sync_ptr + pb, (k - k0 + 1) * n_j)
        if PHASE_B:
            ghin = tl.zeros((BLOCK_B, BLOCK_HC), dtype=tl.float32)
            for kk in range(0, G, BLOCK_K):
                ck = kk + tl.arange(0, BLOCK_K)
                kmask = ck < G
                a = tl.load(dxg_ptr + t * B * G + rb[:, None] * G + ck[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0.0, cache_modifier=".cg")
                w = _ld(w_hh_ptr + ck[:, None] * H + cj[None, :], kmask[:, None] & jmask[None, :], F32_DOT)
                ghin += _dot(a, w, F32_DOT)
            if HAS_RM:
                ghin = ghin * rmk
            gh = gh + ghin          # dxg rows of inactive rows are zero
    tl.store(gh_ptr + off, gh, mask=m)
    tl.store(gc_ptr + off, gc, mask=m)
    if HAS_PEEP and PHASE_A:
        pb_ptr = dpar_ptr + pb * 9 * H + 4 * H + cj
        tl.store(pb_ptr, tl.load(pb_ptr, mask=jmask, other=0.0) + acc_pi, mask=jmask)
        tl.store(pb_ptr + H, tl.load(pb_ptr + H, mask=jmask, other=0.0) + acc_pf, mask=jmask)
        tl.store(pb_ptr + 2 * H, tl.load(pb_ptr + 2 * H, mask=jmask, other=0.0) + acc_po, mask=jmask)
__all__ = ["lstm_fwd_kernel", "lstm_bwd_kernel", "lstm_fwd_split_kernel", "lstm_bwd_split_kernel"]
