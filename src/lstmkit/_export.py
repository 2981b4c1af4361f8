"""lstmkit's LSTM under torch.jit.trace, torch.export and ONNX export (both exporters).

The eager paths run Numba/Triton kernels on NumPy views or raw pointers, which a tracer cannot see:
traced as they are, they would bake the traced input's answer into the graph as a constant. While a
graph is captured (:func:`exporting`), :func:`lstmkit.functional.lstm` and ``lstm_cell`` hand their
call to :func:`lstm` here, which emits one of

- ONNX export (``torch.onnx.export``): ONNX's own ``LSTM`` operator, one node per layer (both
  directions in one node), torch's weights converted to ONNX's layout (gates i, o, f, c; the
  peephole rows i, o, f). The dynamo exporter gets it through ``torch.onnx.ops.symbolic_multi_out``,
  the TorchScript-based (legacy) exporter through an autograd function's ``symbolic``. What ONNX's
  LSTM cannot compute (projections, layer norm, zoneout) the dynamo exporter writes as an ONNX
  ``Scan`` of the reference backend's step; the legacy exporter raises, naming the option.
- anything else (``torch.jit.trace``, ``torch.export``): one call of the custom operator
  ``lstmkit::lstm`` (below), whose eager kernel is ``functional.lstm`` on lstmkit's backends and
  whose fake kernel gives the output shapes for any batch and sequence length.

Calls whose randomness a graph cannot hold (inter-layer dropout, recurrent dropout and zoneout in
training mode) and variable lengths (``lengths=``, PackedSequence) raise instead of tracing a
constant mask or lengths. ``torch.jit.script`` is refused with the alternatives named
(:func:`refuse_script`). docs/export.md lists what exports how.

Dimension legend
    T  time steps   B  batch rows   I  input features of a layer
    H  hidden size  P  proj_size if > 0 else H    L  layers   D  directions (1 or 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from ._gates import GATE_ORDER
from .backends._contract import LayerOptions

__all__ = ["exporting", "lstm", "lstm_cell", "check_module", "refuse_lengths", "refuse_script"]

# ONNX's LSTM stacks its gates as i, o, f, c (c: torch's g); torch's order is GATE_ORDER
_ONNX_GATES = tuple(GATE_ORDER.index(g) for g in ("i", "o", "f", "g"))
# lstmkit's peephole rows are p_i, p_f, p_o; ONNX's P is p_i, p_o, p_f
_ONNX_PEEPHOLE = (0, 2, 1)


def exporting() -> bool:
    """True while torch.jit.trace, torch.export or an ONNX exporter captures a graph (the legacy ONNX
    exporter traces with torch.jit; the dynamo one runs torch.export)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export(), also under Dynamo (torch.export(strict=True), a fallback of the
    dynamo exporter), which folds that function to False; the exporter's own flag says the truth."""
    if torch.onnx.is_in_onnx_export():
        return True
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # another torch layout: the public answer stands
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def _how() -> str:
    if _in_onnx_export():
        return "ONNX export (torch.onnx.export)"
    return "torch.jit.trace" if torch.jit.is_tracing() else "torch.export"


def check_module(module) -> None:
    """Raise for a module whose call draws random masks in training mode (dropout between layers,
    recurrent dropout, zoneout): a captured graph would keep the traced call's masks. Called by
    lstmkit.LSTM / LSTMCell while :func:`exporting`."""
    if not module.training:
        return
    v = module.variants
    opts = []
    if getattr(module, "dropout", 0) > 0 and getattr(module, "num_layers", 1) > 1:
        opts.append(f"dropout={module.dropout}")
    if v.recurrent_dropout > 0:
        opts.append(f"recurrent_dropout={v.recurrent_dropout}")
    if v.zoneout_cell > 0 or v.zoneout_hidden > 0:
        opts.append(f"zoneout={(v.zoneout_cell, v.zoneout_hidden)}")
    if opts:
        raise RuntimeError(
            f"{_how()} of {type(module).__name__} in training mode with {', '.join(opts)}: the random masks "
            "drawn per call cannot be captured in a graph; call model.eval() before exporting"
        )


def refuse_script(module) -> None:
    """``__prepare_scriptable__`` of lstmkit's modules: TorchScript cannot compile their Python
    dispatch to Numba/Triton kernels."""
    name = type(module).__name__
    raise RuntimeError(
        f"torch.jit.script cannot compile lstmkit.{name} (its forward dispatches to Numba/Triton kernels "
        f"from Python). Use torch.jit.trace(model, example_inputs): a traced lstmkit.{name} calls the "
        "lstmkit::lstm operator and takes any batch size and sequence length; or torch.export.export, "
        "or torch.onnx.export (ONNX's LSTM operator)"
    )


def refuse_lengths() -> None:
    raise RuntimeError(f"{_how()} of an LSTM with lengths= or a PackedSequence input is not supported: a graph "
                       "would keep the traced call's lengths as constants; export padded input without lengths")


# --- what a call uses ---------------------------------------------------------------------------

class _Variants:
    """The variants of a call, read from its per layer-direction LayerOptions: the flags, the
    evaluation zoneout probabilities and the variant tensors in one flat list (per layer-direction:
    ln_ih, ln_hh, ln_cell_w, ln_cell_b with layer norm, then the peephole weights)."""

    def __init__(self, opts: list[Optional[LayerOptions]], ln_ih: Optional[Sequence[Tensor]]):
        first = opts[0] or LayerOptions()
        self.opts, self.ln_ih = opts, ln_ih
        self.layer_norm = ln_ih is not None
        self.peephole = first.peephole is not None
        for o in opts:
            o = o or LayerOptions()
            if o.rec_mask is not None:
                raise RuntimeError(f"{_how()}: recurrent_dropout in training mode draws a random mask per call, "
                                   "which cannot be captured in a graph; call model.eval() before exporting")
            if isinstance(o.zoneout_c, Tensor) or isinstance(o.zoneout_h, Tensor):
                raise RuntimeError(f"{_how()}: zoneout in training mode draws random masks per call, which "
                                   "cannot be captured in a graph; call model.eval() before exporting")
        self.zoneout_c = float(first.zoneout_c or 0.0)
        self.zoneout_h = float(first.zoneout_h or 0.0)
        self.tensors: list[Tensor] = []
        for idx, o in enumerate(opts):
            o = o or LayerOptions()
            if self.layer_norm:
                self.tensors += [ln_ih[idx], o.ln_hh, o.ln_cell_w, o.ln_cell_b]  # type: ignore[index]
            if self.peephole:
                self.tensors.append(o.peephole)

    def names(self) -> list[str]:
        out = []
        if self.layer_norm:
            out.append("layer_norm=True")
        if self.zoneout_c or self.zoneout_h:
            out.append(f"zoneout={(self.zoneout_c, self.zoneout_h)}")
        return out


def _options(variant_weights: Sequence[Tensor], n: int, layer_norm: bool, peephole: bool, zoneout_c: float,
             zoneout_h: float) -> tuple[Optional[list[LayerOptions]], Optional[list[Tensor]]]:
    """The inverse of _Variants: per layer-direction LayerOptions and input layer-norm gains, or
    (None, None) for a plain LSTM."""
    if not (layer_norm or peephole or zoneout_c or zoneout_h):
        return None, None
    per = (4 if layer_norm else 0) + (1 if peephole else 0)
    opts, ln_ih = [], []
    for idx in range(n):
        w = variant_weights[idx * per:(idx + 1) * per]
        o = LayerOptions(zoneout_c=zoneout_c or None, zoneout_h=zoneout_h or None)
        if layer_norm:
            ln_ih.append(w[0])
            o.ln_hh, o.ln_cell_w, o.ln_cell_b = w[1], w[2], w[3]
        if peephole:
            o.peephole = w[-1]
        opts.append(o)
    return opts, (ln_ih if layer_norm else None)


# --- the custom operator (torch.jit.trace, torch.export) ----------------------------------------

def _run(input: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor], variant_weights: Sequence[Tensor],
         num_layers: int, bidirectional: bool, has_biases: bool, proj_size: int, layer_norm: bool, peephole: bool,
         zoneout_c: float, zoneout_h: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from . import functional

    D = 2 if bidirectional else 1
    opts, ln_ih = _options(variant_weights, num_layers * D, layer_norm, peephole, zoneout_c, zoneout_h)
    opts_for = None if opts is None else (lambda layer, d, B, T: opts[layer * D + d])
    return functional.lstm(input, h0, c0, list(weights), num_layers=num_layers, bidirectional=bidirectional,
                           has_biases=has_biases, proj_size=proj_size, backend=backend, opts_for=opts_for,
                           ln_ih=ln_ih)


@torch.library.custom_op("lstmkit::lstm", mutates_args=())
def lstm_op(input: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor], variant_weights: list[Tensor],
            num_layers: int, bidirectional: bool, has_biases: bool, proj_size: int, layer_norm: bool,
            peephole: bool, zoneout_c: float, zoneout_h: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """A whole (evaluation-mode) LSTM stack over time-first input, as ``functional.lstm``: returns
    (output (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, H)). ``weights`` in torch.nn.LSTM's
    ``_flat_weights`` order; ``variant_weights`` as :class:`_Variants` lays them out."""
    with torch.no_grad():
        out, h_n, c_n = _run(input, h0, c0, weights, variant_weights, num_layers, bidirectional, has_biases,
                             proj_size, layer_norm, peephole, zoneout_c, zoneout_h, backend)
    return out.contiguous(), h_n.contiguous(), c_n.contiguous()


@lstm_op.register_fake
def _(input, h0, c0, weights, variant_weights, num_layers, bidirectional, has_biases, proj_size, layer_norm,
      peephole, zoneout_c, zoneout_h, backend):
    T, B = input.shape[0], input.shape[1]
    D = 2 if bidirectional else 1
    return input.new_empty((T, B, D * h0.shape[2])), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _op_setup(ctx, inputs, output) -> None:
    input, h0, c0, weights, variant_weights, *config = inputs
    ctx.save_for_backward(input, h0, c0, *weights, *variant_weights)
    ctx.counts = (len(weights), len(variant_weights))
    ctx.config = config


def _op_backward(ctx, g_out, g_h, g_c):
    """Gradients by recomputing the call with the reference backend (plain torch ops) under autograd;
    differentiable again where the caller asks for a graph (create_graph=True)."""
    n_w, n_v = ctx.counts
    saved = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in saved]
        x, h0, c0 = leaves[:3]
        w, v = leaves[3:3 + n_w], leaves[3 + n_w:]
        config = list(ctx.config)
        config[-1] = "reference"
        outs = _run(x, h0, c0, w, v, *config)
        grads = torch.autograd.grad(outs, leaves, (g_out, g_h, g_c), create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, saved)]
    return (grads[0], grads[1], grads[2], grads[3:3 + n_w], grads[3 + n_w:]) + (None,) * len(ctx.config)


lstm_op.register_autograd(_op_backward, setup_context=_op_setup)


# --- ONNX ---------------------------------------------------------------------------------------

def _onnx_gates(w: Tensor) -> Tensor:
    """(4H, ...) in torch's gate order -> ONNX's (i, o, f, c). Slices, not chunk: the exporters fold
    single-output ops on weights into constants, not ONNX's multi-output Split."""
    H = w.shape[0] // 4
    return torch.cat([w[k * H:(k + 1) * H] for k in _ONNX_GATES], 0)


class _LegacyOnnxLSTM(torch.autograd.Function):
    """ONNX's LSTM for the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the
    exporter writes ``symbolic``'s node; ``forward`` only gives the traced graph its shapes. (The
    hidden size comes from R's static shape: under torch.jit tracing every size read in Python is a
    traced value, not an int.)"""

    @staticmethod
    def forward(ctx, x, W, R, Bias, P, h0, c0, direction: str):
        D, H = R.shape[0], R.shape[2]
        return x.new_zeros((x.shape[0], D, x.shape[1], H)), h0.new_zeros(h0.shape), c0.new_zeros(c0.shape)

    @staticmethod
    def symbolic(g, x, W, R, Bias, P, h0, c0, direction: str):
        from torch.onnx import symbolic_helper

        none = symbolic_helper._optional_input_placeholder_tensor
        inputs = [x, W, R, none(g) if symbolic_helper._is_none(Bias) else Bias, none(g), h0, c0]
        if not symbolic_helper._is_none(P):
            inputs.append(P)
        hidden_size = symbolic_helper._get_tensor_dim_size(R, 2)
        return g.op("LSTM", *inputs, hidden_size_i=hidden_size, direction_s=direction, outputs=3)


def _onnx_node(x: Tensor, W: Tensor, R: Tensor, Bias: Optional[Tensor], P: Optional[Tensor], h0: Tensor,
               c0: Tensor, direction: str) -> tuple[Tensor, Tensor, Tensor]:
    """One ONNX LSTM node: x (T, B, I), W (D, 4H, I), R (D, 4H, H), Bias (D, 8H), P (D, 3H) or None,
    h0, c0 (D, B, H) -> Y (T, D, B, H), Y_h (D, B, H), Y_c (D, B, H)."""
    if torch.jit.is_tracing():  # the TorchScript-based exporter
        return _LegacyOnnxLSTM.apply(x, W, R, Bias, P, h0, c0, direction)
    T, B, D, H = x.shape[0], x.shape[1], R.shape[0], R.shape[2]
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM", [x, W, R, Bias, None, h0, c0, P], {"hidden_size": H, "direction": direction},
        dtypes=[x.dtype] * 3, shapes=[[T, D, B, H], [D, B, H], [D, B, H]],
    )
    return y, y_h, y_c


def _onnx(input: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor], num_layers: int, bidirectional: bool,
          has_biases: bool, proj_size: int, variants: _Variants) -> tuple[Tensor, Tensor, Tensor]:
    """The stack as ONNX: one LSTM node per layer where ONNX's LSTM computes it (plain or peephole),
    else (projections, layer norm, zoneout) a Scan over the steps of plain ops per layer-direction,
    which only the dynamo exporter can write."""
    from .functional import _layer_weights

    legacy = torch.jit.is_tracing()  # the TorchScript-based exporter traces with torch.jit
    scanned = ([f"proj_size={proj_size}"] if proj_size > 0 else []) + variants.names()
    if scanned and legacy:
        raise RuntimeError(
            f"ONNX export of an LSTM with {', '.join(scanned)} by the TorchScript-based exporter (dynamo=False): "
            "ONNX's LSTM operator has no projection, layer norm or zoneout, and a loop traced by torch.jit "
            "would fix the sequence length. Use torch.onnx.export(..., dynamo=True) (the default), which "
            "writes them as an ONNX Scan over the steps"
        )
    D = 2 if bidirectional else 1
    x = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        sl = slice(layer * D, (layer + 1) * D)
        lw = [_layer_weights(weights, has_biases, proj_size, D, layer, d) for d in range(D)]
        if scanned:
            outs = []
            for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(lw):
                idx = layer * D + d
                out, h, c = _scan_layer(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0[idx], c0[idx], d == 1,
                                        variants.opts[idx], None if variants.ln_ih is None else variants.ln_ih[idx])
                outs.append(out)
                h_n.append(h[None])
                c_n.append(c[None])
            x = outs[0] if D == 1 else torch.cat(outs, 2)
            continue
        W = torch.stack([_onnx_gates(w[0]) for w in lw])
        R = torch.stack([_onnx_gates(w[1]) for w in lw])
        Bias = torch.stack([torch.cat([_onnx_gates(w[2]), _onnx_gates(w[3])]) for w in lw]) if has_biases else None
        P = None
        if variants.peephole:  # (3, H) each: lstmkit's rows p_i, p_f, p_o
            ps = [variants.opts[layer * D + d].peephole for d in range(D)]  # type: ignore[union-attr]
            P = torch.stack([torch.cat([p[k] for k in _ONNX_PEEPHOLE]) for p in ps])
        y, y_h, y_c = _onnx_node(x, W, R, Bias, P, h0[sl], c0[sl], "bidirectional" if bidirectional else "forward")
        x = y.transpose(1, 2).flatten(2)  # (T, D, B, H) -> (T, B, D*H)
        h_n.append(y_h)
        c_n.append(y_c)
    return x, torch.cat(h_n), torch.cat(c_n)


def _scan_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, reverse: bool, opts: Optional[LayerOptions],
                ln_ih: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One layer-direction as torch's scan (the dynamo exporter writes an ONNX Scan) of the reference
    backend's step: x (T, B, I) -> out (T, B, P), h (B, P), c (B, H)."""
    from torch._higher_order_ops.scan import scan  # torch's prototype scan; ONNX Scan under export

    from .backends import reference
    from .functional import _input_projection

    xg = _input_projection(x, w_ih, None, None, ln_ih)  # (T, B, 4H)
    if b_ih is not None:  # added here: plain ops, where the projection may call an op for torch.compile
        xg = xg + (b_ih + b_hh)
    # ONNX is inference only. Detached, the scan skips torch's autograd wrapper of scan, which fails on
    # dynamic shapes when the ONNX exporter re-runs the graph (a SymInt among the stacked outputs), and
    # Dynamo, tracing the step, finds leaves (it reads .grad of what the step closes over: a warning)
    xg, w_hh, h0, c0 = xg.detach(), w_hh.detach(), h0.detach(), c0.detach()
    w_hr = None if w_hr is None else w_hr.detach()
    if opts is not None:
        opts = dataclasses.replace(opts, **{f.name: getattr(opts, f.name).detach() for f in dataclasses.fields(opts)
                                            if isinstance(getattr(opts, f.name), Tensor)})

    def step(carry, xg_t):
        h, c = carry
        out, h1, c1 = reference.layer(xg_t[None], w_hh, w_hr, h, c, None, False, opts)
        return (h1.clone(), c1.clone()), out[0].clone()  # scan's outputs must not alias

    (h, c), out = scan(step, (h0, c0), xg, reverse=reverse)
    return out, h, c


# --- the entry points -----------------------------------------------------------------------------

OptsFn = Callable[[int, int, int, int], Optional[LayerOptions]]


def lstm(input: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tensor], *, num_layers: int,
         bidirectional: bool, has_biases: bool, proj_size: int, dropout: float, training: bool,
         batch_sizes: Optional[Tensor], backend: str, opts_for: Optional[OptsFn],
         ln_ih: Optional[Sequence[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``functional.lstm`` while a graph is captured (its arguments): an ONNX LSTM per layer under
    ONNX export, else one ``lstmkit::lstm`` call."""
    if batch_sizes is not None:
        refuse_lengths()
    if dropout > 0 and training and num_layers > 1:
        raise RuntimeError(f"{_how()}: dropout={dropout} between layers in training mode draws a random mask "
                           "per call, which cannot be captured in a graph; call model.eval() before exporting")
    D = 2 if bidirectional else 1
    T, B = input.shape[0], input.shape[1]
    opts = [None if opts_for is None else opts_for(layer, d, B, T) for layer in range(num_layers) for d in range(D)]
    variants = _Variants(opts, ln_ih)
    if _in_onnx_export():
        return _onnx(input, h0, c0, weights, num_layers, bidirectional, has_biases, proj_size, variants)
    return torch.ops.lstmkit.lstm(input, h0, c0, list(weights), variants.tensors, num_layers, bidirectional,
                                  has_biases, proj_size, variants.layer_norm, variants.peephole, variants.zoneout_c,
                                  variants.zoneout_h, backend)


def lstm_cell(input: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], *, backend: str, opts: Optional[LayerOptions],
              ln_ih: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``functional.lstm_cell`` while a graph is captured: a one-step, one-layer :func:`lstm`."""
    has_biases = b_ih is not None
    weights = [w_ih, w_hh] + ([b_ih, b_hh] if has_biases else [])
    _, h1, c1 = lstm(input.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0), weights, num_layers=1,  # type: ignore[list-item]
                     bidirectional=False, has_biases=has_biases, proj_size=0, dropout=0.0, training=False,
                     batch_sizes=None, backend=backend, opts_for=None if opts is None else (lambda *a: opts),
                     ln_ih=None if ln_ih is None else [ln_ih])
    return h1[0], c1[0]
