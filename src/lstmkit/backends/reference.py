"""The reference backend: the LSTM equations of ``_contract.py`` as plain torch ops in a time loop.

This is the numerical spec every other backend is tested against. Autograd differentiates it.
It never calls torch's recurrent kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@torch.library.custom_op("lstmkit::grad_copies", mutates_args=())
def _grad_copies(g: Tensor) -> tuple[Tensor, Tensor]:
    return g.clone(), g.clone()


@_grad_copies.register_fake
def _(g):
    return torch.empty_like(g), torch.empty_like(g)


@torch.library.custom_op("lstmkit::bias_sum", mutates_args=())
def _bias_sum_op(b_ih: Tensor, b_hh: Tensor) -> Tensor:
    return b_ih + b_hh


@_bias_sum_op.register_fake
def _(b_ih, b_hh):
    return torch.empty_like(b_ih)


_bias_sum_op.register_autograd(lambda ctx, g: torch.ops.lstmkit.grad_copies(g))


def _bias_sum(b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """b_ih + b_hh. Under torch.compile an opaque op whose gradients are two distinct tensors: the
    compiled backward of a plain sum returns one tensor as both parameters' gradients, which
    accumulation and in-place clipping then count twice. Not while exporting (torch.export, ONNX):
    such a graph holds no backward, and the ONNX exporters know no such op."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.ops.lstmkit.bias_sum(b_ih, b_hh)
    return b_ih + b_hh


def layer_weights(weights: Sequence[Tensor], has_biases: bool, proj_size: int, D: int, layer: int, d: int):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer-direction from torch.nn.LSTM's _flat_weights order
    (None where absent)."""
    per = 2 + (2 if has_biases else 0) + (1 if proj_size > 0 else 0)
    w = weights[(layer * D + d) * per:(layer * D + d + 1) * per]
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    w_hr = w[-1] if proj_size > 0 else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def input_projection(
    x: Tensor,                 # (T, B, I)
    w_ih: Tensor,              # (4H, I)
    b_ih: Optional[Tensor],    # (4H,)
    b_hh: Optional[Tensor],    # (4H,)
    ln_ih: Optional[Tensor],   # (4H,) layer-norm gain, or None
) -> Tensor:                   # (T, B, 4H)
    """The input projections of every step at once: xg = x W_ih^T + b_ih + b_hh (with layer norm:
    LN_x(x W_ih^T) * gain + b_ih + b_hh)."""
    T, B, _ = x.shape
    x2 = x.reshape(T * B, x.shape[2])
    if ln_ih is not None:
        xg = F.layer_norm(x2 @ w_ih.t(), (w_ih.shape[0],), ln_ih, None, LN_EPS)
        if b_ih is not None:
            xg = xg + _bias_sum(b_ih, b_hh)
    elif b_ih is not None:
        xg = torch.addmm(_bias_sum(b_ih, b_hh), x2, w_ih.t())
    else:
        xg = x2 @ w_ih.t()
    return xg.view(T, B, w_ih.shape[0])


def stack_layers(
    x: Tensor,                                               # (T, B, I)
    num_layers: int,
    D: int,
    run: Callable[[Tensor, int, int], tuple[Tensor, Tensor, Tensor]],
    between: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Layers and directions stacked: ``run(x, layer, d) -> (out, h, c)`` runs one layer-direction
    on its input x; a layer's input is the concatenation of the directions' outputs below it, after
    ``between`` (dropout) where given. Returns (out (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, H))."""
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for lay in range(num_layers):
        outs = []
        for d in range(D):
            out, h, c = run(x, lay, d)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, 2)
        if between is not None and lay < num_layers - 1:
            x = between(x)
    return x, torch.stack(h_n), torch.stack(c_n)


def stack(
    x: Tensor,                                   # (T, B, I)
    h0: Tensor,                                  # (L*D, B, P)
    c0: Tensor,                                  # (L*D, B, H)
    weights: Sequence[Tensor],                   # torch.nn.LSTM's _flat_weights order
    *,
    num_layers: int,
    D: int,
    has_biases: bool,
    proj_size: int,
    batch_sizes: Optional[Tensor],
    opts: Optional[Sequence[Optional[LayerOptions]]] = None,   # per layer-direction
    ln_ih: Optional[Sequence[Optional[Tensor]]] = None,        # per layer-direction
) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked LSTM without dropout between layers on the reference math: (out, h_n, c_n). The
    recomputation behind differentiable backward passes of the fused backends' stack nodes."""

    def run(x: Tensor, lay: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = lay * D + d
        w_ih, w_hh, b_ih, b_hh, w_hr = layer_weights(weights, has_biases, proj_size, D, lay, d)
        xg = input_projection(x, w_ih, b_ih, b_hh, None if ln_ih is None else ln_ih[idx])
        return layer(xg, w_hh, w_hr, h0[idx], c0[idx], batch_sizes, d == 1, None if opts is None else opts[idx])

    return stack_layers(x, num_layers, D, run)
