"""Autograd beyond one backward pass, against torch.nn.LSTM / LSTMCell (the oracle) or the reference
backend: second-order gradients through every fused autograd node, torch.func transforms, batched
gradients, and the parameter gradients of torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import lstmkit
from lstm_oracle import graph_nodes
from lstmkit.backends import numba_cpu as nb
from tolerances import assert_close

F64 = torch.float64


def _penalty_grads(model, x, state=None, cell=False):
    """Parameter and input gradients of loss + |d loss / d (params, x)|^2 (a gradient penalty, which
    needs the gradients' own graph), and the node names of the forward graph."""
    x = x.detach().clone().requires_grad_()
    params = [p for _, p in sorted(model.named_parameters())]
    if cell:
        h, c = model(x, state)
        outs = (h, c)
    else:
        out, (h, c) = model(x, state)
        outs = (out, h, c)
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in outs)
    firsts = torch.autograd.grad(loss, [x, *params], create_graph=True)
    assert all(f.requires_grad for f in firsts), "first-order gradients carry no graph"
    penalty = sum((f ** 2).sum() for f in firsts)
    seconds = torch.autograd.grad(loss + penalty, [x, *params])
    return firsts, seconds, graph_nodes(outs[0])


def _pair(cls_ours, cls_ref, *args, dtype=F64, **kw):
    torch.manual_seed(0)
    ours = cls_ours(*args, dtype=dtype, **kw)
    ref = cls_ref(*args, dtype=dtype, **{k: v for k, v in kw.items() if k != "backend"})
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kw,node", [
    (dict(num_layers=2), "_StackFnBackward"),
    (dict(num_layers=2, bidirectional=True, proj_size=2), "_StackFnBackward"),
    (dict(num_layers=1, bias=False), "_StackFnBackward"),
])
def test_gradient_penalty_matches_torch_lstm(kw, node, dtype):
    """Second-order gradients of the fused stack node are torch's (they were silently zero)."""
    ours, ref = _pair(lstmkit.LSTM, torch.nn.LSTM, 3, 4, dtype=dtype, backend="numba", **kw)
    x = torch.randn(5, 2, 3, dtype=dtype)
    f_ours, s_ours, nodes = _penalty_grads(ours, x)
    f_ref, s_ref, _ = _penalty_grads(ref, x)
    assert node in nodes
    for a, b in zip(f_ours, f_ref):
        assert_close(a, b)
    for a, b in zip(s_ours, s_ref):
        assert_close(a, b, table={torch.float32: (1e-4, 1e-4), F64: (1e-9, 1e-9)})


def _check_cell_second_order(ours, ref, dtype=F64, tol=1e-9):
    """ours (an lstmkit.LSTMCell) runs a fused layer node and gives ref's first- and second-order
    gradients of a gradient penalty."""
    x = torch.randn(2, 3, dtype=dtype)
    state = (torch.randn(2, 4, dtype=dtype), torch.randn(2, 4, dtype=dtype))
    f_ours, s_ours, nodes = _penalty_grads(ours, x, state, cell=True)
    f_ref, s_ref, _ = _penalty_grads(ref, x, state, cell=True)
    assert "_LayerFnBackward" in nodes
    for a, b in zip(f_ours + s_ours, f_ref + s_ref):
        assert_close(a, b, table={dtype: (tol, tol)})


def test_gradient_penalty_matches_torch_lstm_cell():
    """LSTMCell with gradients runs the per-layer node (``numba_cpu._LayerFn``)."""
    _check_cell_second_order(*_pair(lstmkit.LSTMCell, torch.nn.LSTMCell, 3, 4, backend="numba"))


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


VARIANTS = dict(layer_norm=True, peephole=True, zoneout=(0.2, 0.1))


@pytest.mark.parametrize("kw,threads,node,dtype", [
    (dict(num_layers=2), 1, "_RowsStackFnBackward", torch.float32),   # a stack with variants: one node by rows
    (dict(num_layers=1, bidirectional=True), 1, "_RowsLayerFnBackward", torch.float32),
    (dict(num_layers=2, proj_size=2), 2, "_RowsStackFnBackward", torch.float32),
    (dict(num_layers=2, bidirectional=True), 1, "_LayerFnBackward", F64),  # float64: the variant layer node
])
def test_variants_second_order_match_reference(kw, threads, node, dtype, monkeypatch):
    """The variant nodes' second-order gradients are the reference backend's (eval mode: zoneout
    as its expectation, deterministic). float32 through layer norm over 4 units: see TOL_NORMALIZED."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(nb, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(nb, "ROW_MIN", 1)
    torch.manual_seed(0)
    ours = lstmkit.LSTM(3, 4, dtype=dtype, backend="numba", **VARIANTS, **kw).eval()
    ref = lstmkit.LSTM(3, 4, dtype=dtype, backend="reference", **VARIANTS, **kw).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 9, 3, dtype=dtype)
    f_ours, s_ours, nodes = _penalty_grads(ours, x)
    f_ref, s_ref, _ = _penalty_grads(ref, x)
    assert node in nodes
    for a, b in zip(f_ours + s_ours, f_ref + s_ref):
        assert_close(a, b, table={torch.float32: (2e-3, 2e-3), F64: (1e-9, 1e-9)})


def test_variant_cell_second_order_matches_reference():
    """LSTMCell with variants: the variant layer node (``_numba_variants._LayerFn``)."""
    torch.manual_seed(0)
    ours = lstmkit.LSTMCell(3, 4, dtype=F64, backend="numba", layer_norm=True, peephole=True).eval()
    ref = lstmkit.LSTMCell(3, 4, dtype=F64, backend="reference", layer_norm=True, peephole=True).eval()
    ref.load_state_dict(ours.state_dict())
    _check_cell_second_order(ours, ref)


def _as_function(model):
    names = [n for n, _ in model.named_parameters()]

    def fn(x, h0, c0, *params):
        out, (h, c) = functional_call(model, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    return fn, [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]


@pytest.mark.parametrize("kw", [pytest.param(dict(num_layers=2), marks=pytest.mark.slow),
                                dict(bidirectional=True, proj_size=2),
                                pytest.param(VARIANTS, marks=pytest.mark.slow)])
def test_gradgradcheck(kw):
    torch.manual_seed(0)
    model = lstmkit.LSTM(2, 3, dtype=F64, backend="numba", **kw).eval()
    fn, params = _as_function(model)
    D = 2 if kw.get("bidirectional") else 1
    P = kw.get("proj_size") or 3
    L = kw.get("num_layers", 1)
    x = torch.randn(2, 1, 2, dtype=F64, requires_grad=True)  # small: gradgradcheck perturbs every element
    h0 = torch.randn(L * D, 1, P, dtype=F64, requires_grad=True)
    c0 = torch.randn(L * D, 1, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *params))


def test_cell_gradcheck_batched():
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(2, 3, dtype=F64, backend="numba")
    names = [n for n, _ in cell.named_parameters()]

    def fn(x, h, c, *params):
        return functional_call(cell, dict(zip(names, params)), (x, (h, c)))

    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    args = [torch.randn(2, n, dtype=F64, requires_grad=True) for n in (2, 3, 3)]
    assert torch.autograd.gradcheck(fn, (*args, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, (*args, *params))


def test_torch_func_transforms_match_torch():
    """jacrev, grad over functional_call, and vmap over inputs: torch.nn.LSTM's numbers."""
    ours, ref = _pair(lstmkit.LSTM, torch.nn.LSTM, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=F64)

    def loss(model):
        def f(params, x):
            out, (h, c) = functional_call(model, params, (x,))
            return (out ** 2).sum() + h.sum()
        return f

    params_o = {k: v.detach() for k, v in ours.named_parameters()}
    params_r = {k: v.detach() for k, v in ref.named_parameters()}
    g_o, g_r = grad(loss(ours))(params_o, x), grad(loss(ref))(params_r, x)
    for k in g_r:
        assert_close(g_o[k], g_r[k])

    def out_of(model):
        return lambda x: model(x)[0]

    assert_close(jacrev(out_of(ours))(x), jacrev(out_of(ref))(x))
    xs = torch.randn(4, 5, 2, 3, dtype=F64)  # a batch of inputs, vmapped (torch.nn.LSTM has no batching rule)
    assert_close(vmap(out_of(ours))(xs), torch.stack([ref(x)[0] for x in xs]))
    cell_o, cell_r = _pair(lstmkit.LSTMCell, torch.nn.LSTMCell, 3, 4)
    xc = torch.randn(2, 3, dtype=F64)
    assert_close(jacrev(lambda x: cell_o(x)[0])(xc), jacrev(lambda x: cell_r(x)[0])(xc))


def test_explicit_fused_backend_refuses_torch_func():
    model = lstmkit.LSTM(3, 4, backend="numba")
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        jacrev(lambda x: model(x)[0])(torch.randn(2, 1, 3))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch\\.jit\\.\\w+` is deprecated:DeprecationWarning")  # importing inductor
def test_compile_parameter_gradients_distinct_and_equal_to_eager():
    """Under torch.compile the two biases' gradients are distinct tensors (a compiled sum returned one
    tensor for both: accumulation and in-place clipping counted it twice); gradients accumulated over
    two steps and clipped in place equal eager's."""
    torch.manual_seed(0)
    eager = lstmkit.LSTM(3, 5, 2)
    compiled_model = lstmkit.LSTM(3, 5, 2)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    xs = [torch.randn(4, 2, 3) for _ in range(2)]
    for model, run in ((eager, eager), (compiled_model, compiled)):
        for x in xs:
            out, (h, c) = run(x)
            (out.sum() + h.pow(2).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    for layer in (0, 1):
        b_ih = getattr(compiled_model, f"bias_ih_l{layer}").grad
        b_hh = getattr(compiled_model, f"bias_hh_l{layer}").grad
        assert b_ih.data_ptr() != b_hh.data_ptr()
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, msg=name)


def test_threaded_training_paths_are_differentiable_twice(two_threads, monkeypatch):
    """Plain training by rows (large steps) also keeps second order: torch's numbers."""
    monkeypatch.setattr(nb, "ROW_TRAIN_MIN_STEP_MACS", 0)
    monkeypatch.setattr(nb, "ROW_MIN", 1)
    ours, ref = _pair(lstmkit.LSTM, torch.nn.LSTM, 3, 8, num_layers=1, backend="numba")
    x = torch.randn(4, 8, 3, dtype=F64)
    f_ours, s_ours, nodes = _penalty_grads(ours, x)
    f_ref, s_ref, _ = _penalty_grads(ref, x)
    for a, b in zip(f_ours + s_ours, f_ref + s_ref):
        assert_close(a, b, table={F64: (1e-9, 1e-9)})


def test_triton_layer_second_order_matches_reference():
    """The Triton layer node (under Triton's interpreter on CPU tensors) gives the reference
    backend's second-order gradients, variants included (it was once-differentiable: zeros)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    kw = dict(peephole=True, layer_norm=True)
    ours = lstmkit.LSTMCell(3, 4, backend="triton", **kw).eval()
    ref = lstmkit.LSTMCell(3, 4, backend="reference", **kw).eval()
    ref.load_state_dict(ours.state_dict())
    _check_cell_second_order(ours, ref, torch.float32, 2e-3)


@pytest.mark.slow
def test_compile_fullgraph_with_background_compile_on(tmp_path):
    """torch.compile(fullgraph=True) of a plain LSTM in a process where ``auto`` may answer with the
    reference math while kernels compile (the default outside tests): the graph holds numba's ops."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, lstmkit, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "m = lstmkit.LSTM(3, 5, 2)\n"
        "ref = torch.nn.LSTM(3, 5, 2); ref.load_state_dict(m.state_dict())\n"
        "x = torch.randn(4, 2, 3)\n"
        "out, _ = torch.compile(m, fullgraph=True)(x)\n"
        "out.sum().backward(); ref(x)[0].sum().backward()\n"
        "torch.testing.assert_close(out, ref(x)[0], rtol=1e-5, atol=1e-5)\n"
        "torch.testing.assert_close(m.weight_hh_l1.grad, ref.weight_hh_l1.grad, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LSTMKIT_BACKGROUND_COMPILE"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
