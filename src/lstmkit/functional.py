"""The functional layer: a whole (multi-layer, bidirectional) LSTM from one layer-direction kernel.

It owns everything around the backends' unit of work (see ``backends/_contract.py``): the input
projection GEMM of every step at once, stacking layers and directions, dropout between layers,
variable lengths (as PackedSequence-style per-step batch sizes), and backend dispatch.

Dimension legend
    T  time steps   B  batch rows   I  input features of a layer
    H  hidden size  P  proj_size if > 0 else H    L  layers   D  directions (1 or 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends._contract import LayerOptions
from .backends.reference import input_projection as _input_projection
from .backends.reference import layer_weights as _layer_weights
from .backends.reference import stack_layers as _stack_layers

__all__ = ["lstm", "lstm_cell", "lengths_to_batch_sizes", "padded_to_packed", "packed_to_padded"]

# opts_for(layer, direction, B, T) -> LayerOptions or None; built by the module (variants)
OptsFn = Callable[[int, int, int, int], Optional[LayerOptions]]


# bound once: these run on every plain call (0.4 us together, against 1.9 us through torch.jit's wrappers)
_compiling = torch.compiler.is_compiling
_tracing = torch._C._is_tracing
_transformed = torch._C._are_functorch_transforms_active


def direct_calls_ok() -> bool:
    """Whether a call may run kernels outside torch's dispatcher (NumPy and Numba calls, which record
    nothing): not while torch.compile, torch.export or torch.jit.trace record the call, nor under a
    torch.func transform (jacrev, vmap, grad), none of which would see them."""
    return not (_compiling() or _tracing() or _transformed())


def needs_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def lengths_to_batch_sizes(sorted_lengths: Tensor, T: int) -> Tensor:
    """Per-step active-row counts (T,) int64 for lengths sorted in descending order."""
    steps = torch.arange(T, dtype=torch.int64)
    return (sorted_lengths.to("cpu", torch.int64).unsqueeze(0) > steps.unsqueeze(1)).sum(1)


def _active_mask(batch_sizes: Tensor, B: int, device: torch.device) -> Tensor:
    # (T, B) bool, True where row b is active at step t; row-major order is packed order.
    rows = torch.arange(B, dtype=torch.int64)
    return (rows.unsqueeze(0) < batch_sizes.unsqueeze(1)).to(device)


def packed_to_padded(data: Tensor, batch_sizes: Tensor) -> Tensor:
    """PackedSequence data (N, *) -> zero-padded (T, B, *) in sorted (packed) row order."""
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    mask = _active_mask(batch_sizes, B, data.device)
    out = data.new_zeros((T, B) + tuple(data.shape[1:]))
    return out.index_put((mask,), data)


def padded_to_packed(padded: Tensor, batch_sizes: Tensor) -> Tensor:
    """Inverse of :func:`packed_to_padded`: (T, B, *) -> (N, *)."""
    mask = _active_mask(batch_sizes, padded.shape[1], padded.device)
    return padded[mask]


def lstm(
    input: Tensor,                        # (T, B, I), time-first, padded in sorted order if batch_sizes
    h0: Tensor,                           # (L*D, B, P)
    c0: Tensor,                           # (L*D, B, H)
    weights: Sequence[Tensor],            # torch.nn.LSTM's _flat_weights order
    *,
    num_layers: int,
    bidirectional: bool = False,
    has_biases: bool = True,
    proj_size: int = 0,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Optional[Tensor] = None,  # (T,) int64 non-increasing, or None
    backend: str = "auto",
    opts_for: Optional[OptsFn] = None,
    ln_ih: Optional[Sequence[Tensor]] = None,  # per layer-direction input layer-norm gains
) -> tuple[Tensor, Tensor, Tensor]:
    """Run a stacked LSTM over time-first input; returns (output (T, B, D*P), h_n, c_n).

    The same computation as torch.nn.LSTM on time-first input, done by lstmkit's backends.
    """
    if torch.jit.is_tracing() or torch.compiler.is_exporting():  # a graph capture: an op call or ONNX nodes
        from . import _export

        return _export.lstm(input, h0, c0, weights, num_layers=num_layers, bidirectional=bidirectional,
                            has_biases=has_biases, proj_size=proj_size, dropout=dropout, training=training,
                            batch_sizes=batch_sizes, backend=backend, opts_for=opts_for, ln_ih=ln_ih)
    T, B = input.shape[0], input.shape[1]
    D = 2 if bidirectional else 1
    plain = opts_for is None and ln_ih is None
    first_opts = None if opts_for is None else opts_for(0, 0, B, T)
    be = backends.resolve(backend, input.device, input.dtype, first_opts, units=B * c0.shape[2])
    inter_dropout = dropout > 0 and training and num_layers > 1

    fast = getattr(be, "lstm_stack", None)
    if (
        fast is not None and plain and not inter_dropout
        and not needs_grad([input, h0, c0, *weights])
        and not torch.compiler.is_compiling()
    ):
        return fast(input, h0, c0, list(weights), num_layers=num_layers, bidirectional=bidirectional,
                    has_biases=has_biases, proj_size=proj_size, batch_sizes=batch_sizes)
    # Variants without gradients: a backend may run a unidirectional stack on several threads
    prefers_v = getattr(be, "prefers_stack_variants", None)
    if (
        prefers_v is not None and not plain and not inter_dropout and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and prefers_v(T, B, input.shape[2], c0.shape[2], h0.shape[2], num_layers, bidirectional, input.dtype)
    ):
        opts = [first_opts] + [opts_for(layer, 0, B, T) for layer in range(1, num_layers)]
        res = be.lstm_stack_variants(input, h0, c0, list(weights), opts, ln_ih, num_layers=num_layers,
                                     has_biases=has_biases, proj_size=proj_size, batch_sizes=batch_sizes)
        if res is not NotImplemented:
            return res
        opts_for = (lambda layer, d, B, T, opts=opts: opts[layer]) if opts_for is not None else None
    # Training with plain options: a backend may run the whole stack as one autograd node
    # (``lstm_stack_train``, e.g. numba); it returns NotImplemented for shapes it leaves to the
    # per-layer path below.
    fused = getattr(be, "lstm_stack_train", None)
    if fused is not None and plain and not inter_dropout and not torch.compiler.is_compiling():
        res = fused(input, h0, c0, list(weights), num_layers=num_layers, bidirectional=bidirectional,
                    has_biases=has_biases, proj_size=proj_size, batch_sizes=batch_sizes)
        if res is not NotImplemented:
            return res

    # Training: a backend may run each layer-direction, its input projection included, as one
    # autograd node on several threads (``layer_rows_train``; NotImplemented: not this shape), or
    # a unidirectional stack with variants as one such node (``stack_rows_train``)
    rows = getattr(be, "layer_rows_train", None)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        rows = None
    stack_rows = getattr(be, "stack_rows_train", None)
    if rows is not None and stack_rows is not None and not plain and D == 1 and num_layers > 1 and not inter_dropout:
        opts = [first_opts] + [opts_for(layer, 0, B, T) for layer in range(1, num_layers)]
        res = stack_rows(input, h0, c0, list(weights), opts, ln_ih, num_layers=num_layers, has_biases=has_biases,
                         proj_size=proj_size, batch_sizes=batch_sizes)
        if res is not NotImplemented:
            return res
        opts_for = (lambda layer, d, B, T, opts=opts: opts[layer]) if opts_for is not None else None

    def run(x: Tensor, layer: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = layer * D + d
        w_ih, w_hh, b_ih, b_hh, w_hr = _layer_weights(weights, has_biases, proj_size, D, layer, d)
        ln = None if ln_ih is None else ln_ih[idx]
        opts = first_opts if idx == 0 else (None if opts_for is None else opts_for(layer, d, B, T))
        res = NotImplemented
        if rows is not None:
            res = rows(x, w_ih, b_ih, b_hh, ln, w_hh, w_hr, h0[idx], c0[idx], batch_sizes, d == 1, opts,
                       num_layers=num_layers)
        if res is NotImplemented:
            res = be.layer(_input_projection(x, w_ih, b_ih, b_hh, ln), w_hh, w_hr, h0[idx], c0[idx],
                           batch_sizes, d == 1, opts)
        return res

    between = (lambda x: F.dropout(x, dropout, training=True)) if inter_dropout else None
    return _stack_layers(input, num_layers, D, run, between)


def lstm_cell(
    input: Tensor,             # (B, I)
    h: Tensor,                 # (B, H)
    c: Tensor,                 # (B, H)
    w_ih: Tensor,              # (4H, I)
    w_hh: Tensor,              # (4H, H)
    b_ih: Optional[Tensor],    # (4H,)
    b_hh: Optional[Tensor],    # (4H,)
    *,
    backend: str = "auto",
    opts: Optional[LayerOptions] = None,
    ln_ih: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell``: returns (h', c')."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():  # a graph capture: an op call or ONNX nodes
        from . import _export

        return _export.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh, backend=backend, opts=opts, ln_ih=ln_ih)
    be = backends.resolve(backend, input.device, input.dtype, opts, units=input.shape[0] * c.shape[-1])
    fast = getattr(be, "lstm_cell_step", None)
    if (
        fast is not None and opts is None and ln_ih is None
        and not needs_grad([input, h, c, w_ih, w_hh, b_ih, b_hh])
        and not torch.compiler.is_compiling()
    ):
        return fast(input, h, c, w_ih, w_hh, b_ih, b_hh)
    xg = _input_projection(input.unsqueeze(0), w_ih, b_ih, b_hh, ln_ih)
    _, h1, c1 = be.layer(xg, w_hh, None, h, c, None, False, opts)
    return h1, c1

