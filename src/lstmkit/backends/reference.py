"""The reference backend: the LSTM equations of ``_contract.py`` as plain torch ops in a time loop.

This is the numerical spec every other backend is tested against. Autograd differentiates it.
It never calls torch's recurrent kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._contract import LN_EPS, LayerOptions

NAME = "reference"


def unavailable(device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions] = None) -> Optional[str]:
    if not dtype.is_floating_point:
        return f"dtype {dtype} is not a floating-point type"
    return None


def _zone(d, old: Tensor, new: Tensor, t: int) -> Tensor:
    if d is None:
        return new
    d_t = d[t] if isinstance(d, Tensor) else d
    return d_t * old + (1 - d_t) * new


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
    T, B, G = xg.shape
    H = G // 4
    o = opts if opts is not None else LayerOptions()
    if o.peephole is not None:
        p_i, p_f, p_o = o.peephole.unbind(0)  # (H,) each
    rows = torch.arange(B, device=xg.device).unsqueeze(1)  # (B, 1)
    h, c = h0, c0
    # one view per step from one unbind: autograd then stacks the steps' gradients once, where
    # indexing xg[t] would give every step's backward a zero-filled (T, B, 4H) gradient to add
    # (O(T^2) memory traffic: 10x torch.nn.LSTM's training step at T=200, B=64, H=512)
    xs = xg.unbind(0)
    outs: list[Optional[Tensor]] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_in = h * o.rec_mask if o.rec_mask is not None else h
        rec = h_in @ w_hh.t()  # (B, 4H)
        if o.ln_hh is not None:
            rec = F.layer_norm(rec, (G,), o.ln_hh, None, LN_EPS)
        z = xs[t] + rec
        zi, zf, zg, zo = z.chunk(4, 1)
        if o.peephole is not None:
            zi = zi + p_i * c
            zf = zf + p_f * c
        c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        if o.peephole is not None:
            zo = zo + p_o * c_new
        c_act = c_new
        if o.ln_cell_w is not None:
            c_act = F.layer_norm(c_new, (H,), o.ln_cell_w, o.ln_cell_b, LN_EPS)
        h_new = torch.sigmoid(zo) * torch.tanh(c_act)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        c_new = _zone(o.zoneout_c, c, c_new, t)
        h_new = _zone(o.zoneout_h, h, h_new, t)
        if batch_sizes is not None and int(batch_sizes[t]) < B:
            active = rows < int(batch_sizes[t])  # (B, 1)
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c)
            outs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        else:
            h, c = h_new, c_new
            outs[t] = h
    if T == 0:
        return xg.new_zeros((0, B, h0.shape[1])), h, c
    return torch.stack(outs), h, c  # type: ignore[arg-type]
