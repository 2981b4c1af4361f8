"""What every backend implements: one layer-direction of an LSTM over a whole sequence.

Dimension legend
    T  time steps          B  batch rows        H  hidden size
    P  output size of a step: proj_size if proj_size > 0, else H

A backend module exposes

    NAME: str
    def unavailable(device, dtype, opts: LayerOptions | None) -> str | None
        None when the backend can run tensors of this device and dtype, else the reason.
    def layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, opts) -> (out, h_n, c_n)

with the arguments

    xg          (T, B, 4H)  input projections of every step, biases included, gate order i, f, g, o
                            (with layer_norm: LN_x(x W_ih^T) * gain + b_ih + b_hh)
    w_hh        (4H, P)     recurrent weights
    w_hr        (P, H)      projection weights, or None
    h0          (B, P)      initial hidden state
    c0          (B, H)      initial cell state
    batch_sizes (T,) int64 CPU tensor, non-increasing, or None (all rows active at all steps):
                            row b is active at step t iff b < batch_sizes[t] (PackedSequence order)
    reverse     bool        run t = T-1 .. 0 instead of 0 .. T-1
    opts        LayerOptions or None: the variants (peephole, layer norm, recurrent dropout, zoneout)

and the results

    out         (T, B, P)   h of every step; zeros where a row is inactive
    h_n         (B, P)      each row's state after its last active step
    c_n         (B, H)      (for reverse: after step 0)

Inactive rows keep their state unchanged. Every result is differentiable with respect to
xg, w_hh, w_hr, h0, c0 and the tensors in opts that are parameters.

Optional hooks, for speed (each documented where the numba backend defines it; without them the
callers build everything from ``layer``):

    lstm_stack, lstm_stack_train, lstm_stack_variants, stack_rows_train, layer_rows_train
                                                    whole stacks or layers (``functional.lstm``;
                                                    NotImplemented: not here)
    lstm_cell_step                                  one LSTMCell step (``functional.lstm_cell``)
    call_runner(x_shape, h_shape, c_shape, dtype, *, num_layers, bidirectional, has_biases,
                proj_size, batch_first, grad) -> run(x, h0, c0, weights) or None
                                                    plain ``LSTM.forward`` / ``LSTM.step`` calls of
                                                    one shape; the module keeps the function

The equations (reference.py is their executable form):

    z_t  = xg_t + LN_h((h_{t-1} * m) W_hh^T)              m: recurrent-dropout mask, LN_h optional
    i_t  = sigmoid(z_i + p_i * c_{t-1})                   p_*: peephole weights, optional
    f_t  = sigmoid(z_f + p_f * c_{t-1})
    g_t  = tanh(z_g)
    c~_t = f_t * c_{t-1} + i_t * g_t
    o_t  = sigmoid(z_o + p_o * c~_t)
    h~_t = (o_t * tanh(LN_c(c~_t))) W_hr^T                LN_c, W_hr optional
    c_t  = d_c * c_{t-1} + (1 - d_c) * c~_t               d_*: zoneout masks (train) or
    h_t  = d_h * h_{t-1} + (1 - d_h) * h~_t                    probabilities (eval), optional
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

from .._gates import LN_EPS  # noqa: F401  (re-exported: the backends' equations use it)


@dataclass
class LayerOptions:
    """The variant tensors of one layer-direction; every field None means plain LSTM.

    peephole   (3, H)     weights of c into the i, f and o gates (rows in that order)
    ln_hh      (4H,)      gain of the layer norm of the recurrent pre-activations
    ln_cell_w  (H,)       gain of the layer norm of the cell state before its tanh
    ln_cell_b  (H,)       bias of that layer norm (ln_cell_w and ln_cell_b go together)
    rec_mask   (B, P)     recurrent-dropout mask, already scaled by 1 / (1 - p)
    zoneout_c  (T, B, H)  1 where the cell keeps its previous value (training), or a float
                          probability (evaluation: the expectation)
    zoneout_h  (T, B, P)  the same for the hidden state
    """

    peephole: Optional[Tensor] = None
    ln_hh: Optional[Tensor] = None
    ln_cell_w: Optional[Tensor] = None
    ln_cell_b: Optional[Tensor] = None
    rec_mask: Optional[Tensor] = None
    zoneout_c: Union[Tensor, float, None] = None
    zoneout_h: Union[Tensor, float, None] = None

    def is_plain(self) -> bool:
        return all(
            v is None or (isinstance(v, float) and v == 0.0)
            for v in (self.peephole, self.ln_hh, self.ln_cell_w, self.rec_mask,
                      self.zoneout_c, self.zoneout_h)
        )
