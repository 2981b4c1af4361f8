"""The Triton backend: fused forward and backward kernels for CUDA tensors.

One layer-direction (see ``_contract.py``) runs in one of four kernel shapes (``_Cfg`` picks; the
thresholds are below):

* registers: one persistent launch over all T steps, each program owning 16 batch rows and all
  hidden units, W_hh (and W_hr) loaded once into registers; the recurrent GEMM is on chip;
* split: one persistent launch whose programs each own a slice of the hidden units (so a small
  batch still fills many SMs), meeting at a barrier every step (no projection, no layer norm);
* stream: like registers, but W_hh is streamed from L2 in chunks every step (mid-size H);
* per step: one cuBLAS GEMM ``h W_hh^T`` (plus the projection GEMM) and one fused Triton
  pointwise kernel per step, for sizes nothing above fits.

The backward has the same shapes, run backwards over T, producing the gate gradients of every step;
the weight gradients ``dW_hh`` and ``dW_hr`` are single GEMMs over all steps after the sequential
loop, and the variant parameters' gradients are per-program partial sums.

The input projections of all steps (one GEMM) are the functional layer's: ``xg`` arrives with
them. Arithmetic is float32 for every dtype; float32 GEMMs use IEEE precision (never TF32).

Triton is optional (``pip install lstmkit[gpu]``): this module imports without it and
:func:`unavailable` names what is missing. CPU tensors are served only under
``TRITON_INTERPRET=1`` (the kernels' tests in CI); ``backend="auto"`` picks this backend only
for CUDA tensors (:data:`AUTO_DEVICE_TYPES`).

Dimension legend: T steps, B batch rows, H hidden size, P = proj_size or H.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import Tensor

from . import reference
from ._contract import LN_EPS, LayerOptions
from ._twice import differentiable

NAME = "triton"
AUTO_DEVICE_TYPES = ("cuda",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Which kernel shape runs, by the padded sizes BLOCK_H, BLOCK_P (next powers of two >= 16):
# * 4 * BLOCK_H * BLOCK_P <= PERSISTENT_MAX_ELEMS (float32) or PERSISTENT_MAX_ELEMS_16 (16-bit):
#   persistent, W_hh (and W_hr) held in registers;
# * else, without projection and layer norm, on a GPU whose SMs can hold the grid (SPLIT "auto"):
#   the split kernels, a step's hidden units spread over several programs that meet at a barrier;
# * else max(BLOCK_H, BLOCK_P) <= STREAM_MAX_BLOCK: persistent, W_hh streamed from L2 every step
#   (one launch; the program's 4 x BLOCK_B x BLOCK_H gate accumulators still fit in registers);
# * else one cuBLAS GEMM plus one fused pointwise kernel per step.
# The tests set them to force each shape on tiny sizes. The defaults come from compiling for sm_90
# without a GPU (ptxas: no or few spills: float32 H <= 64 and 16-bit H <= 128 at 16 warps); timing
# them on a GPU is pending.
PERSISTENT_MAX_ELEMS = int(os.environ.get("LSTMKIT_TRITON_PERSISTENT_MAX", 4 * 64 * 64))
PERSISTENT_MAX_ELEMS_16 = int(os.environ.get("LSTMKIT_TRITON_PERSISTENT_MAX_16", 4 * 128 * 128))
STREAM_MAX_BLOCK = int(os.environ.get("LSTMKIT_TRITON_STREAM_MAX", 256))
SPLIT = os.environ.get("LSTMKIT_TRITON_SPLIT", "auto")    # "auto", "off" or "force" (tests)

_kernels = None
_import_error: Optional[str] = None


def _load_kernels():
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from ..kernels import triton_lstm
        except ImportError as exc:
            _import_error = f"triton is not installed ({exc}); install lstmkit[gpu]"
        else:
            _kernels = triton_lstm
    return _kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions] = None) -> Optional[str]:
    device = torch.device(device)
    if dtype not in DTYPES:
        return f"dtype {dtype}: the triton backend runs {', '.join(str(d) for d in DTYPES)}"
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"device {device}: needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    if _load_kernels() is None:
        return _import_error
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return f"dtype {dtype} on {torch.cuda.get_device_name(device)}: needs compute capability 8.0 or newer"
    return None


def _p2(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def _zone_mode(z: Union[Tensor, float, None]) -> tuple[int, Optional[Tensor], float]:
    if z is None or (isinstance(z, float) and z == 0.0):
        return 0, None, 0.0
    if isinstance(z, Tensor):
        return 1, z.contiguous(), 0.0
    return 2, None, float(z)


class _Cfg:
    """Everything about one call that is not a differentiable tensor."""

    def __init__(self, T, B, H, P, reverse, batch_sizes, opts, device, dtype=torch.float32, has_proj=False):
        self.T, self.B, self.H, self.P = T, B, H, P
        self.reverse = bool(reverse)
        self.bs = None
        if batch_sizes is not None and T > 0 and int(batch_sizes.min()) < B:
            self.bs = batch_sizes.to(device=device, dtype=torch.int32)
            self.act = (torch.arange(B).unsqueeze(0) < batch_sizes.cpu().unsqueeze(1)).to(device)  # (T, B)
        self.rm = opts.rec_mask.contiguous() if opts.rec_mask is not None else None
        self.zc_mode, self.zc, self.zc_p = _zone_mode(opts.zoneout_c)
        self.zh_mode, self.zh, self.zh_p = _zone_mode(opts.zoneout_h)
        bh, bp = _p2(H), _p2(P)
        self.block_h, self.block_p = bh, bp
        w_elems = 4 * bh * bp
        on_chip = w_elems <= (PERSISTENT_MAX_ELEMS if dtype == torch.float32 else PERSISTENT_MAX_ELEMS_16)
        self.split = False
        if not on_chip and SPLIT != "off" and not has_proj and opts.ln_hh is None and opts.ln_cell_w is None:
            self._plan_split(B, H, torch.device(device))
        if self.split:
            return
        self.w_stream = not on_chip and max(bh, bp) <= STREAM_MAX_BLOCK
        self.persistent = on_chip or self.w_stream
        self.block_k = 16 if min(bh, bp) <= 16 else 32
        if self.persistent:
            self.block_b = 16  # tl.dot needs M >= 16
            self.num_warps = 16 if self.w_stream else (4 if w_elems <= 4096 else 8 if w_elems <= 8192 else 16)
        else:
            self.block_b = max(1, min(16, 4096 // (4 * bh)))
            self.num_warps = 4 if bh <= 256 else 8
        self.grid = (triton_cdiv(B, self.block_b),)

    def _plan_split(self, B: int, H: int, device: torch.device) -> None:
        # Fewest units per program (most SMs busy) such that every program is resident at once, which
        # the barrier needs. Under "force" (the interpreter's tests) any grid does.
        n_rows = triton_cdiv(B, 16)
        if SPLIT == "force":
            sms = 1 << 30
        elif device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            return
        for bhc in (16, 32, 64):
            n_j = triton_cdiv(H, bhc)
            if n_j * n_rows <= sms:
                self.split, self.persistent, self.w_stream = True, True, False
                self.block_b, self.block_hc, self.num_warps = 16, bhc, 4
                self.block_k = 32 if H > 16 else 16
                self.grid = (n_j, n_rows)
                return


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _flags(cfg: _Cfg, f32: bool, peephole, ln_hh, ln_cell_w, w_hr) -> dict:
    return dict(
        REVERSE=cfg.reverse, PERSISTENT=cfg.persistent, F32_DOT=f32, HAS_BS=cfg.bs is not None,
        HAS_PROJ=w_hr is not None, HAS_PEEP=peephole is not None, HAS_LNH=ln_hh is not None,
        HAS_LNC=ln_cell_w is not None, HAS_RM=cfg.rm is not None, ZC=cfg.zc_mode, ZH=cfg.zh_mode,
        W_STREAM=cfg.w_stream, BLOCK_K=cfg.block_k, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h,
        BLOCK_P=cfg.block_p, num_warps=cfg.num_warps,
        enable_fp_fusion=True,  # FMA contraction, stated (Triton 3.9 warns when it is left to its default)
    )


def _f32_dot(dtype: torch.dtype) -> bool:
    """Whether the on-chip GEMMs run in float32 (IEEE) rather than on 16-bit operands.

    float32 inputs always do (no TF32). The Triton 3.9 interpreter's tl.dot on bfloat16 operands
    returns garbage (it multiplies their uint16 storage), so under the interpreter bfloat16 weights
    are upcast; on CUDA the bfloat16 and float16 GEMMs use the tensor cores with float32 accumulation.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    return dummy if t is None else t


def _forward(xg, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b, cfg: _Cfg, store: bool):
    K = _load_kernels()
    T, B, H, P = cfg.T, cfg.B, cfg.H, cfg.P
    dev, f32 = xg.device, torch.float32
    xg = xg.contiguous()
    w_hh = w_hh.contiguous()
    w_hr = w_hr.contiguous() if w_hr is not None else None
    hs = torch.empty((T + 1, B, P), device=dev, dtype=f32)
    cs = torch.empty((T + 1, B, H), device=dev, dtype=f32)
    init = T if cfg.reverse else 0
    hs[init] = h0
    cs[init] = c0
    out = torch.empty((T, B, P), device=dev, dtype=xg.dtype)
    dummy = torch.empty(1, device=dev, dtype=f32)
    gates = torch.empty((T, B, 4 * H), device=dev, dtype=f32) if store else None
    proj_on_host = w_hr is not None and not cfg.persistent
    store_hh = w_hr is not None and (store or proj_on_host or cfg.w_stream)
    hh = torch.empty((T, B, H), device=dev, dtype=f32) if store_hh else None
    r = torch.empty((T, B, 4 * H), device=dev, dtype=f32) if store and ln_hh is not None else None
    lnh_st = torch.empty((T, B, 2), device=dev, dtype=f32) if store and ln_hh is not None else None
    lnc_st = torch.empty((T, B, 2), device=dev, dtype=f32) if store and ln_cell_w is not None else None
    args = [xg, None, w_hh, _or(w_hr, dummy), hs, cs, out, _or(gates, dummy), _or(hh, dummy),
            _or(r, dummy), _or(lnh_st, dummy), _or(lnc_st, dummy), _or(cfg.bs, dummy),
            _or(peephole, dummy), _or(ln_hh, dummy), _or(ln_cell_w, dummy), _or(ln_cell_b, dummy),
            _or(cfg.rm, dummy), _or(cfg.zc, dummy), _or(cfg.zh, dummy), cfg.zc_p, cfg.zh_p,
            T, B, H, P]
    if cfg.split:
        _forward_split(K, xg, w_hh, hs, cs, out, gates, peephole, cfg, dummy, store)
    else:
        _forward_one(K, args, xg, w_hh, w_hr, hs, hh, out, peephole, ln_hh, ln_cell_w, proj_on_host, store,
                     store_hh, cfg)
    fin = 0 if cfg.reverse else T
    h_n = hs[fin].to(xg.dtype, copy=True)
    c_n = cs[fin].to(xg.dtype, copy=True)
    saved = dict(hs=hs, cs=cs, gates=gates, hh=hh, r=r, lnh_st=lnh_st, lnc_st=lnc_st)
    return out, h_n, c_n, saved


def _sync_flags(cfg: _Cfg, f32: bool, peephole) -> dict:
    return dict(REVERSE=cfg.reverse, F32_DOT=f32, HAS_BS=cfg.bs is not None, HAS_PEEP=peephole is not None,
                HAS_RM=cfg.rm is not None, ZC=cfg.zc_mode, ZH=cfg.zh_mode, BLOCK_K=cfg.block_k,
                BLOCK_B=cfg.block_b, BLOCK_HC=cfg.block_hc, num_warps=cfg.num_warps, enable_fp_fusion=True)


def _forward_split(K, xg, w_hh, hs, cs, out, gates, peephole, cfg: _Cfg, dummy, store: bool):
    T, B, H = cfg.T, cfg.B, cfg.H
    sync = torch.zeros(cfg.grid[1], device=xg.device, dtype=torch.int32)
    args = [xg, w_hh, hs, cs, out, _or(gates, dummy), _or(cfg.bs, dummy), _or(peephole, dummy), _or(cfg.rm, dummy),
            _or(cfg.zc, dummy), _or(cfg.zh, dummy), cfg.zc_p, cfg.zh_p, sync, T, B, H, H]
    flags = _sync_flags(cfg, _f32_dot(xg.dtype), peephole)
    if xg.device.type == "cuda":   # one launch, siblings meet at a barrier every step
        K.lstm_fwd_split_kernel[cfg.grid](*args, 0, T, STORE=store, SYNC=True, **flags)
    else:                          # the interpreter runs programs one by one: one launch per step
        for k in range(T):
            K.lstm_fwd_split_kernel[cfg.grid](*args, k, 1, STORE=store, SYNC=False, **flags)


def _forward_one(K, args, xg, w_hh, w_hr, hs, hh, out, peephole, ln_hh, ln_cell_w, proj_on_host, store, store_hh,
                 cfg: _Cfg):
    T = cfg.T
    flags = _flags(cfg, _f32_dot(xg.dtype), peephole, ln_hh, ln_cell_w, w_hr)
    flags.update(H_IN_KERNEL=not proj_on_host, STORE=store, STORE_HH=store_hh)
    if cfg.persistent:
        args[1] = args[3]  # rec_ptr is unused: any tensor
        K.lstm_fwd_kernel[cfg.grid](*args, 0, T, LN_EPS, **flags)
    else:
        w_t = w_hh.t()
        for k in range(T):
            t = T - 1 - k if cfg.reverse else k
            prev = t + 1 if cfg.reverse else t
            new = t if cfg.reverse else t + 1
            h_in = hs[prev] if cfg.rm is None else hs[prev] * cfg.rm
            args[1] = torch.mm(h_in.to(w_hh.dtype), w_t)                    # (B, 4H)
            K.lstm_fwd_kernel[cfg.grid](*args, k, 1, LN_EPS, **flags)
            if proj_on_host:
                ht = torch.mm(hh[t].to(w_hr.dtype), w_hr.t()).float()       # (B, P)
                h_prev = hs[prev]
                if cfg.zh_mode == 1:
                    ht = torch.lerp(ht, h_prev, cfg.zh[t].float())
                elif cfg.zh_mode == 2:
                    ht = torch.lerp(ht, h_prev, cfg.zh_p)
                if cfg.bs is not None:
                    a = cfg.act[t].unsqueeze(1)
                    hs[new] = torch.where(a, ht, h_prev)
                    out[t] = torch.where(a, ht, 0.0)
                else:
                    hs[new] = ht
                    out[t] = ht


def _backward(g_out, g_hn, g_cn, xg_dtype, w_hh, w_hr, peephole, ln_hh, ln_cell_w, ln_cell_b,
              cfg: _Cfg, sv: dict):
    K = _load_kernels()
    T, B, H, P = cfg.T, cfg.B, cfg.H, cfg.P
    dev, f32 = w_hh.device, torch.float32
    w_hh = w_hh.contiguous()
    w_hr = w_hr.contiguous() if w_hr is not None else None
    g_out = g_out.contiguous()
    gh = g_hn.to(f32).contiguous().clone()
    gc = g_cn.to(f32).contiguous().clone()
    dummy = torch.empty(1, device=dev, dtype=f32)
    dxg = torch.empty((T, B, 4 * H), device=dev, dtype=f32)
    dr = torch.empty_like(dxg) if ln_hh is not None else dxg
    dht = torch.empty((T, B, P), device=dev, dtype=f32) if w_hr is not None else None
    has_par = peephole is not None or ln_hh is not None or ln_cell_w is not None
    dpar = torch.zeros((cfg.grid[-1], 9 * H), device=dev, dtype=f32) if has_par else dummy
    proj_on_host = w_hr is not None and not cfg.persistent
    ghh = torch.empty((B, H), device=dev, dtype=f32) if proj_on_host else dummy
    args = [g_out, gh, gc, ghh, w_hh, _or(w_hr, dummy), sv["hs"], sv["cs"], sv["gates"],
            _or(sv["r"], dummy), _or(sv["lnh_st"], dummy), _or(sv["lnc_st"], dummy), _or(cfg.bs, dummy),
            _or(peephole, dummy), _or(ln_hh, dummy), _or(ln_cell_w, dummy), _or(ln_cell_b, dummy),
            _or(cfg.rm, dummy), _or(cfg.zc, dummy), _or(cfg.zh, dummy), cfg.zc_p, cfg.zh_p,
            dxg, dr, _or(dht, dummy), dpar, T, B, H, P]
    if cfg.split:
        sync = torch.zeros(cfg.grid[1], device=dev, dtype=torch.int32)
        sargs = [g_out, gh, gc, w_hh, sv["hs"], sv["cs"], sv["gates"], _or(cfg.bs, dummy), _or(peephole, dummy),
                 _or(cfg.rm, dummy), _or(cfg.zc, dummy), _or(cfg.zh, dummy), cfg.zc_p, cfg.zh_p, dxg, dpar, sync,
                 T, B, H, P]
        sflags = _sync_flags(cfg, _f32_dot(w_hh.dtype), peephole)
        if dev.type == "cuda":
            K.lstm_bwd_split_kernel[cfg.grid](*sargs, 0, T, SYNC=True, PHASE_A=True, PHASE_B=True, **sflags)
        else:  # the interpreter: the two halves of each step as separate launches
            for k in range(T):
                for a, b in ((True, False), (False, True)):
                    K.lstm_bwd_split_kernel[cfg.grid](*sargs, k, 1, SYNC=False, PHASE_A=a, PHASE_B=b, **sflags)
    elif cfg.persistent:
        flags = dict(_flags(cfg, _f32_dot(w_hh.dtype), peephole, ln_hh, ln_cell_w, w_hr), H_PART=True)
        K.lstm_bwd_kernel[cfg.grid](*args, 0, T, **flags)
    else:
        flags = dict(_flags(cfg, _f32_dot(w_hh.dtype), peephole, ln_hh, ln_cell_w, w_hr), H_PART=not proj_on_host)
        w_hh32 = w_hh.float()
        w_hr32 = w_hr.float() if w_hr is not None else None
        for k in range(T):
            t = k if cfg.reverse else T - 1 - k
            if proj_on_host:
                a = cfg.act[t].unsqueeze(1) if cfg.bs is not None else None
                g = gh + (g_out[t].float() if a is None else torch.where(a, g_out[t].float(), 0.0))
                if cfg.zh_mode == 1:
                    keep = cfg.zh[t].float()
                    ght, gkeep = (1 - keep) * g, keep * g
                elif cfg.zh_mode == 2:
                    ght, gkeep = (1 - cfg.zh_p) * g, cfg.zh_p * g
                else:
                    ght, gkeep = g, torch.zeros_like(g)
                if a is not None:
                    ght = torch.where(a, ght, 0.0)
                    gkeep = torch.where(a, gkeep, g)
                dht[t] = ght
                torch.mm(ght, w_hr32, out=ghh)
                gh.copy_(gkeep)
            K.lstm_bwd_kernel[cfg.grid](*args, k, 1, **flags)
            ghin = torch.mm(dr[t], w_hh32)                                   # (B, P)
            if cfg.rm is not None:
                ghin *= cfg.rm
            gh += ghin
    # weight gradients: one GEMM each over all steps
    hs = sv["hs"]
    h_prev = hs[1:] if cfg.reverse else hs[:-1]                                # (T, B, P)
    if cfg.rm is not None:
        h_prev = h_prev * cfg.rm
    d_w_hh = torch.mm(dr.reshape(T * B, 4 * H).t(), h_prev.reshape(T * B, P)).to(w_hh.dtype)
    d_w_hr = None
    if w_hr is not None:
        d_w_hr = torch.mm(dht.reshape(T * B, P).t(), sv["hh"].reshape(T * B, H)).to(w_hr.dtype)
    d_peep = d_lnh = d_lncw = d_lncb = None
    if has_par:
        tot = dpar.sum(0)
        if ln_hh is not None:
            d_lnh = tot[:4 * H].to(ln_hh.dtype)
        if peephole is not None:
            d_peep = tot[4 * H:7 * H].reshape(3, H).to(peephole.dtype)
        if ln_cell_w is not None:
            d_lncw = tot[7 * H:8 * H].to(ln_cell_w.dtype)
            d_lncb = tot[8 * H:9 * H].to(ln_cell_b.dtype)
    return dxg.to(xg_dtype), d_w_hh, d_w_hr, gh, gc, d_peep, d_lnh, d_lncw, d_lncb


def _layer_reference(ctx) -> tuple:
    w_hh, w_hr, peephole, ln_hh, ln_cell_w, ln_cell_b, xg, h0, c0 = ctx.saved_tensors
    batch_sizes, reverse, opts = ctx.call

    def fn(xg, w_hh, w_hr, h0, c0, pe, ln_hh, lnc_w, lnc_b, _cfg):
        o = replace(opts, peephole=pe, ln_hh=ln_hh, ln_cell_w=lnc_w, ln_cell_b=lnc_b)
        return reference.layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, o)

    return (xg, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b, None), fn


class _LayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b, cfg, call):
        out, h_n, c_n, saved = _forward(xg, w_hh, w_hr, h0, c0, peephole, ln_hh, ln_cell_w, ln_cell_b,
                                        cfg, store=True)
        ctx.cfg, ctx.saved, ctx.xg_dtype = cfg, saved, xg.dtype
        ctx.h0_dtype, ctx.c0_dtype = h0.dtype, c0.dtype
        ctx.call = call  # (batch_sizes, reverse, opts): the call as the reference math takes it
        ctx.save_for_backward(w_hh, w_hr, peephole, ln_hh, ln_cell_w, ln_cell_b, xg, h0, c0)
        return out, h_n, c_n

    @staticmethod
    @differentiable(_layer_reference)
    def backward(ctx, g_out, g_hn, g_cn):
        w_hh, w_hr, peephole, ln_hh, ln_cell_w, ln_cell_b = ctx.saved_tensors[:6]
        dxg, dw_hh, dw_hr, dh0, dc0, dpeep, dlnh, dlncw, dlncb = _backward(
            g_out, g_hn, g_cn, ctx.xg_dtype, w_hh, w_hr, peephole, ln_hh, ln_cell_w, ln_cell_b,
            ctx.cfg, ctx.saved)
        ctx.saved = None
        return (dxg, dw_hh, dw_hr, dh0.to(ctx.h0_dtype), dc0.to(ctx.c0_dtype),
                dpeep, dlnh, dlncw, dlncb, None, None)


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
    reason = unavailable(xg.device, xg.dtype, opts)
    if reason is not None:
        raise RuntimeError(f"triton backend: {reason}")
    T, B, G = xg.shape
    H, P = G // 4, w_hh.shape[1]
    o = opts if opts is not None else LayerOptions()
    if T == 0 or B == 0:
        return xg.new_zeros((T, B, P)), h0, c0
    if (o.ln_cell_w is None) != (o.ln_cell_b is None):
        raise ValueError("ln_cell_w and ln_cell_b go together")
    cfg = _Cfg(T, B, H, P, reverse, batch_sizes, o, xg.device, xg.dtype, has_proj=w_hr is not None)
    params = (o.peephole, o.ln_hh, o.ln_cell_w, o.ln_cell_b)
    params = tuple(p.contiguous() if p is not None else None for p in params)
    tensors = (xg, w_hh, w_hr, h0, c0) + params
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LayerFn.apply(xg, w_hh, w_hr, h0, c0, *params, cfg, (batch_sizes, bool(reverse), o))
    out, h_n, c_n, _ = _forward(xg, w_hh, w_hr, h0, c0, *params, cfg, store=False)
    return out, h_n, c_n
