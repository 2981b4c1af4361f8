"""Export of lstmkit.LSTM / LSTMCell: torch.jit.trace, torch.jit.script (refused), torch.export and ONNX
through both exporters, each checked against torch.nn.LSTM / LSTMCell with copied weights at shapes
and values other than the exported ones (docs/export.md lists what exports how)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.export import Dim

import lstmkit
from lstmkit import _export
from tolerances import assert_close

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # the extra lstmkit[export]; trace and torch.export need neither
    onnx = ort = None
needs_onnx = pytest.mark.skipif(onnx is None, reason="needs onnx and onnxruntime: pip install 'lstmkit[export]'")

pytestmark = [
    # torch deprecates torch.jit.trace and the TorchScript-based ONNX exporter, which these tests exercise
    pytest.mark.filterwarnings("ignore:.*torch\\.jit\\.\\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
    # the dynamo exporter names one axis per torch.export Dim shared by several inputs
    pytest.mark.filterwarnings("ignore:# The axis name.*will not be used:UserWarning"),
    # the modules' argument checks compare traced sizes; the trace keeps them as constants, which is right
    # for the checks (the LSTM itself is one recorded op call: the new-shape comparisons below show it)
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

I, H = 4, 5
EXPORTED = (3, 2)  # (T, B) of the example input every export sees
NEW = ((7, 5), (1, 3), (4, 1))  # other (T, B) the exported graph must answer for

# name -> (LSTM kwargs, given initial state, unbatched)
CASES = {
    "2-layer": (dict(num_layers=2), False, False),
    "bidirectional-2-layer-state": (dict(num_layers=2, bidirectional=True), True, False),
    "batch_first-no-bias-state": (dict(batch_first=True, bias=False), True, False),
    "bidirectional-unbatched-state": (dict(bidirectional=True), True, True),
}
# name -> (LSTMCell kwargs, given state, unbatched)
CELL_CASES = {
    "batched": ({}, False, False),
    "batched-state": ({}, True, False),
    "no-bias-unbatched-state": (dict(bias=False), True, True),
}


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ours = lstmkit.LSTM(I, H, **kw).eval()
    ref = torch.nn.LSTM(I, H, **kw).eval()  # the oracle
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _cell_pair(seed=0, **kw):
    torch.manual_seed(seed)
    ours = lstmkit.LSTMCell(I, H, **kw).eval()
    ref = torch.nn.LSTMCell(I, H, **kw)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _args(m, T, B, state, unbatched, seed=1):
    """Example arguments of an LSTM call: (x,) or (x, (h0, c0))."""
    g = torch.Generator().manual_seed(seed + 97 * T + B)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    if unbatched:
        x = torch.randn(T, I, generator=g)
        sh, sc = (m.num_layers * D, P), (m.num_layers * D, m.hidden_size)
    else:
        x = torch.randn(*((B, T) if m.batch_first else (T, B)), I, generator=g)
        sh, sc = (m.num_layers * D, B, P), (m.num_layers * D, B, m.hidden_size)
    if not state:
        return (x,)
    return x, (torch.randn(sh, generator=g), torch.randn(sc, generator=g))


def _cell_args(B, state, unbatched, seed=1):
    g = torch.Generator().manual_seed(seed + B)
    lead = () if unbatched else (B,)
    x = torch.randn(*lead, I, generator=g)
    if not state:
        return (x,)
    return x, (torch.randn(*lead, H, generator=g), torch.randn(*lead, H, generator=g))


def _dims(m, state, unbatched):
    """torch.export dynamic shapes for _args: batch and sequence length dynamic."""
    T, B = Dim("T", min=1), Dim("B", min=1)
    if unbatched:
        return ({0: T},) + ((({}, {}),) if state else ())
    x = {0: B, 1: T} if m.batch_first else {0: T, 1: B}
    return (x,) + ((({1: B}, {1: B}),) if state else ())


def _cell_dims(state, unbatched):
    if unbatched:
        return ({},) + ((({}, {}),) if state else ())
    B = Dim("B", min=1)
    return ({0: B},) + ((({0: B}, {0: B}),) if state else ())


def _flat(out):
    """(y, (h, c)) or (h, c) -> a flat list of tensors."""
    return [out[0], *out[1]] if isinstance(out[1], tuple) else list(out)


def _check(actual, expected, msg=""):
    for a, e in zip(_flat(actual), _flat(expected), strict=True):
        assert_close(a.detach(), e.detach(), dtype=torch.float32, msg=msg)


def _unbatched_shapes(unbatched):
    return [(T, 1) for T, _ in NEW] if unbatched else list(NEW)


# --- eager calls never take the export path -------------------------------------------------------

def test_eager_calls_do_not_take_the_export_path(monkeypatch):
    """Outside a graph capture, calls run the backends as before: the export entry points are never
    reached (they would raise here), on the fast path and on the autograd path."""
    def boom(*a, **k):
        raise AssertionError("the export path ran in eager mode")

    monkeypatch.setattr(_export, "lstm", boom)
    monkeypatch.setattr(_export, "lstm_cell", boom)
    ours, ref = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, I)
    with torch.no_grad():
        _check(ours(x), ref(x))
    _check(ours(x), ref(x))
    cell, cref = _cell_pair()
    xc = torch.randn(3, I)
    with torch.no_grad():
        _check(cell(xc), cref(xc))
    _check(cell(xc), cref(xc))
    assert not _export.exporting()


# --- torch.jit.trace ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_trace_lstm_answers_new_inputs(case):
    kw, state, unbatched = CASES[case]
    ours, ref = _pair(**kw)
    traced = torch.jit.trace(ours, _args(ours, *EXPORTED, state, unbatched))
    assert "lstmkit::lstm" in str(traced.inlined_graph)  # an op call, not a constant
    for T, B in _unbatched_shapes(unbatched):
        args = _args(ours, T, B, state, unbatched, seed=5)
        with torch.no_grad():
            _check(traced(*args), ref(*args), msg=f"{case} at T={T}, B={B}")


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_trace_cell_answers_new_inputs(case):
    kw, state, unbatched = CELL_CASES[case]
    ours, ref = _cell_pair(**kw)
    traced = torch.jit.trace(ours, _cell_args(2, state, unbatched))
    assert "lstmkit::lstm" in str(traced.inlined_graph)
    for B in (1, 6) if not unbatched else (1,):
        args = _cell_args(B, state, unbatched, seed=9)
        with torch.no_grad():
            _check(traced(*args), ref(*args), msg=f"{case} at B={B}")


def test_saved_trace_and_exported_program_answer_new_inputs():
    """A traced module and an ExportedProgram keep their op call through torch.jit.save / load and
    torch.export.save / load (the op is registered by ``import lstmkit``); torch.export in strict
    mode (Dynamo) records the same op."""
    ours, ref = _pair(num_layers=2, bidirectional=True)
    args = _args(ours, *EXPORTED, False, False)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, args), buf)
    buf.seek(0)
    traced = torch.jit.load(buf)
    ep_buf = io.BytesIO()
    torch.export.save(torch.export.export(ours, args, dynamic_shapes=_dims(ours, False, False), strict=True), ep_buf)
    ep_buf.seek(0)
    run = torch.export.load(ep_buf).module()
    for T, B in NEW:
        new = _args(ours, T, B, False, False, seed=11)
        with torch.no_grad():
            _check(traced(*new), ref(*new))
            _check(run(*new), ref(*new))


def test_trace_gradients_match_torch():
    """The recorded op is differentiable: a traced model trains with torch's gradients."""
    ours, ref = _pair(num_layers=2, bidirectional=True)
    x, (h0, c0) = _args(ours, *EXPORTED, True, False)
    traced = torch.jit.trace(ours, (x, (h0, c0)))
    x, (h0, c0) = _args(ours, 6, 4, True, False, seed=3)
    xs = [x.clone().requires_grad_(), h0.clone().requires_grad_(), c0.clone().requires_grad_()]
    xr = [t.detach().clone().requires_grad_() for t in xs]
    out, (h, c) = traced(xs[0], (xs[1], xs[2]))
    rout, (rh, rc) = ref(xr[0], (xr[1], xr[2]))
    (out.square().sum() + h.sum() + c.sum()).backward()
    (rout.square().sum() + rh.sum() + rc.sum()).backward()
    for a, e in zip(xs, xr):
        assert_close(a.grad, e.grad, dtype=torch.float32)
    for name, p in ref.named_parameters():
        assert_close(ours.get_parameter(name).grad, p.grad, dtype=torch.float32, msg=name)


def test_trace_variants_answer_new_inputs():
    """Variants in evaluation mode trace as the same op: the traced model gives the eager model's
    numbers at other shapes."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, 2, bidirectional=True, proj_size=3, layer_norm=True, peephole=True,
                     zoneout=(0.2, 0.1)).eval()
    traced = torch.jit.trace(m, _args(m, *EXPORTED, False, False))
    for T, B in NEW:
        (x,) = _args(m, T, B, False, False, seed=4)
        with torch.no_grad():
            _check(traced(x), m(x))
    cell = lstmkit.LSTMCell(I, H, layer_norm=True, peephole=True).eval()
    traced = torch.jit.trace(cell, _cell_args(2, True, False))
    args = _cell_args(5, True, False, seed=4)
    with torch.no_grad():
        _check(traced(*args), cell(*args))


@pytest.mark.parametrize("option, kw", [
    ("dropout=0.5", dict(num_layers=2, dropout=0.5)),
    ("recurrent_dropout=0.3", dict(recurrent_dropout=0.3)),
    ("zoneout=", dict(zoneout=0.2)),
])
def test_trace_refuses_random_masks_in_training(option, kw):
    m = lstmkit.LSTM(I, H, **kw).train()
    with pytest.raises(RuntimeError, match=f"torch.jit.trace.*{option}.*model.eval"):
        torch.jit.trace(m, _args(m, *EXPORTED, False, False))
    cell = lstmkit.LSTMCell(I, H, **{k: v for k, v in kw.items() if k not in ("num_layers", "dropout")})
    if kw.get("dropout"):
        return
    with pytest.raises(RuntimeError, match=f"torch.jit.trace.*{option}.*model.eval"):
        torch.jit.trace(cell, _cell_args(2, False, False))


def test_trace_refuses_lengths():
    m = lstmkit.LSTM(I, H).eval()
    x = torch.randn(4, 2, I)
    for lengths in (torch.tensor([4, 4]), torch.tensor([2, 4])):  # all full, and not
        with pytest.raises(RuntimeError, match="torch.jit.trace.*lengths="):
            torch.jit.trace(lambda x, n: m(x, lengths=n)[0], (x, lengths))


# --- torch.jit.script -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: lstmkit.LSTM(I, H), lambda: lstmkit.LSTMCell(I, H)])
def test_script_refuses_with_the_alternatives(make):
    m = make()
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile lstmkit.{type(m).__name__}.*"
                                           "torch.jit.trace.*torch.export"):
        torch.jit.script(m)
    parent = torch.nn.Sequential(m)  # scripting a model that holds one: the same answer
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile"):
        torch.jit.script(parent)


# --- torch.export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_torch_export_dynamic_batch_and_length(case):
    kw, state, unbatched = CASES[case]
    ours, ref = _pair(**kw)
    ep = torch.export.export(ours, _args(ours, *EXPORTED, state, unbatched), dynamic_shapes=_dims(ours, state,
                                                                                                 unbatched))
    targets = [str(n.target) for n in ep.graph.nodes]
    assert "lstmkit.lstm.default" in targets
    run = ep.module()
    for T, B in _unbatched_shapes(unbatched):
        args = _args(ours, T, B, state, unbatched, seed=6)
        with torch.no_grad():
            _check(run(*args), ref(*args), msg=f"{case} at T={T}, B={B}")


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_torch_export_cell_dynamic_batch(case):
    kw, state, unbatched = CELL_CASES[case]
    ours, ref = _cell_pair(**kw)
    ep = torch.export.export(ours, _cell_args(2, state, unbatched), dynamic_shapes=_cell_dims(state, unbatched))
    run = ep.module()
    for B in (1, 6) if not unbatched else (1,):
        args = _cell_args(B, state, unbatched, seed=8)
        with torch.no_grad():
            _check(run(*args), ref(*args), msg=f"{case} at B={B}")


def test_torch_export_variants_and_projection():
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, 2, bidirectional=True, proj_size=3, layer_norm=True, peephole=True,
                     zoneout=0.1).eval()
    ep = torch.export.export(m, _args(m, *EXPORTED, False, False), dynamic_shapes=_dims(m, False, False))
    for T, B in NEW:
        (x,) = _args(m, T, B, False, False, seed=2)
        with torch.no_grad():
            _check(ep.module()(x), m(x))


def test_torch_export_refuses_random_masks_in_training():
    m = lstmkit.LSTM(I, H, recurrent_dropout=0.2).train()
    with pytest.raises(RuntimeError, match="torch.export.*recurrent_dropout=0.2.*model.eval"):
        torch.export.export(m, _args(m, *EXPORTED, False, False))


# --- ONNX -----------------------------------------------------------------------------------------

def _onnx_dynamo(model, args, dynamic_shapes):
    prog = torch.onnx.export(model, args, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    return prog.model_proto


def _onnx_legacy(model, args, dynamic_axes_for):
    names = [f"in{i}" for i in range(len(torch.utils._pytree.tree_leaves(args)))]
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False, input_names=names, dynamic_axes=dynamic_axes_for(names))
    return onnx.load_from_string(f.getvalue())


def _legacy_axes(m, unbatched):
    def axes(names):
        if unbatched:
            return {names[0]: {0: "T"}}
        x = {0: "B", 1: "T"} if m.batch_first else {0: "T", 1: "B"}
        return {names[0]: x, **{n: {1: "B"} for n in names[1:]}}
    return axes


def _run_onnx(model_proto, args):
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), torch.utils._pytree.tree_leaves(args))}
    outs = [torch.from_numpy(a) for a in sess.run(None, feeds)]
    return outs[0], (outs[1], outs[2])


def _ops(model_proto):
    return [n.op_type for n in model_proto.graph.node]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("case", list(CASES))
@needs_onnx
def test_onnx_lstm_operator_at_new_shapes(exporter, case):
    """A plain LSTM becomes ONNX's own LSTM operator (one per layer); onnxruntime gives torch's numbers
    at other batch sizes, sequence lengths and values."""
    kw, state, unbatched = CASES[case]
    ours, ref = _pair(**kw)
    args = _args(ours, *EXPORTED, state, unbatched)
    if exporter == "dynamo":
        model = _onnx_dynamo(ours, args, _dims(ours, state, unbatched))
    else:
        model = _onnx_legacy(ours, args, _legacy_axes(ours, unbatched))
    assert _ops(model).count("LSTM") == ours.num_layers
    assert "Scan" not in _ops(model) and "Loop" not in _ops(model)
    consts = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # W, R (and B) converted once, at export: initializers
        if node.op_type == "LSTM":
            assert all(name in consts for name in node.input[1:4] if name), node.input
    for T, B in _unbatched_shapes(unbatched):
        new = _args(ours, T, B, state, unbatched, seed=7)
        y, (h, c) = _run_onnx(model, new)
        with torch.no_grad():
            ry, (rh, rc) = ref(*new)
        _check((y, (h, c)), (ry, (rh, rc)), msg=f"{exporter} {case} at T={T}, B={B}")


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("case", list(CELL_CASES))
@needs_onnx
def test_onnx_cell_lstm_operator(exporter, case):
    kw, state, unbatched = CELL_CASES[case]
    ours, ref = _cell_pair(**kw)
    args = _cell_args(2, state, unbatched)
    if exporter == "dynamo":
        model = _onnx_dynamo(ours, args, _cell_dims(state, unbatched))
    else:
        names = [f"in{i}" for i in range(len(torch.utils._pytree.tree_leaves(args)))]
        axes = {} if unbatched else {n: {0: "B"} for n in names}
        f = io.BytesIO()
        torch.onnx.export(ours, args, f, dynamo=False, input_names=names, dynamic_axes=axes)
        model = onnx.load_from_string(f.getvalue())
    assert _ops(model).count("LSTM") == 1
    for B in (1, 6) if not unbatched else (1,):
        new = _cell_args(B, state, unbatched, seed=3)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), torch.utils._pytree.tree_leaves(new))}
        h, c = (torch.from_numpy(a) for a in sess.run(None, feeds))
        with torch.no_grad():
            _check((h, c), ref(*new), msg=f"{exporter} {case} at B={B}")


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@needs_onnx
def test_onnx_peephole_is_the_lstm_operator(exporter):
    """Peephole connections are ONNX LSTM's P input (rows reordered to i, o, f)."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, 2, bidirectional=True, peephole=True).eval()
    args = _args(m, *EXPORTED, True, False)
    model = (_onnx_dynamo(m, args, _dims(m, True, False)) if exporter == "dynamo"
             else _onnx_legacy(m, args, _legacy_axes(m, False)))
    assert _ops(model).count("LSTM") == 2
    for T, B in NEW:
        new = _args(m, T, B, True, False, seed=2)
        with torch.no_grad():
            _check(_run_onnx(model, new), m(*new))


@needs_onnx
def test_onnx_dynamo_scan_for_projection_and_variants():
    """What ONNX's LSTM cannot compute (projections, layer norm, zoneout) the dynamo exporter writes as
    an ONNX Scan of plain ops over the steps: torch's numbers (projection) or the eager model's
    (variants) at other shapes."""
    ours, ref = _pair(bidirectional=True, proj_size=3)
    model = _onnx_dynamo(ours, _args(ours, *EXPORTED, True, False), _dims(ours, True, False))
    assert "Scan" in _ops(model) and "LSTM" not in _ops(model)
    for T, B in NEW:
        new = _args(ours, T, B, True, False, seed=2)
        with torch.no_grad():
            _check(_run_onnx(model, new), ref(*new))
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, 2, layer_norm=True, peephole=True, zoneout=(0.2, 0.1)).eval()
    model = _onnx_dynamo(m, _args(m, *EXPORTED, False, False), _dims(m, False, False))
    for T, B in NEW:
        new = _args(m, T, B, False, False, seed=2)
        with torch.no_grad():
            _check(_run_onnx(model, new), m(*new))


@pytest.mark.parametrize("option, kw", [("proj_size=3", dict(proj_size=3)), ("layer_norm=True", dict(layer_norm=True)),
                                        ("zoneout=", dict(zoneout=0.1))])
@needs_onnx
def test_onnx_legacy_refuses_what_the_lstm_operator_lacks(option, kw):
    m = lstmkit.LSTM(I, H, **kw).eval()
    with pytest.raises(RuntimeError, match=f"{option}.*dynamo=False.*dynamo=True"):
        torch.onnx.export(m, _args(m, *EXPORTED, False, False), io.BytesIO(), dynamo=False)


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode:UserWarning")
@needs_onnx
def test_onnx_refuses_lengths_and_training_masks_exports_dropout_in_eval():
    m = lstmkit.LSTM(I, H, num_layers=2, dropout=0.3).train()
    with pytest.raises(RuntimeError, match="ONNX export.*dropout=0.3.*model.eval"):
        torch.onnx.export(m, _args(m, *EXPORTED, False, False), dynamo=True, verbose=False)
    m = lstmkit.LSTM(I, H, num_layers=2, dropout=0.3, recurrent_dropout=0.2).eval()  # no-ops in evaluation
    model = _onnx_legacy(m, _args(m, *EXPORTED, False, False), _legacy_axes(m, False))
    assert _ops(model).count("LSTM") == 2
    (x,) = _args(m, 6, 3, False, False)
    with torch.no_grad():
        _check(_run_onnx(model, (x,)), m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="lengths="):
            torch.onnx.export(m, (x, None, torch.tensor([4, 2])), io.BytesIO(), dynamo=False)
