"""lstmkit.LSTM against torch.nn.LSTM (the oracle) over the option grid, for every CPU backend."""

import pytest
import torch

import lstmkit
from lstm_oracle import ARCHS, DTYPES, FORMS, check_lstm_parity

CPU_BACKENDS = [b for b in lstmkit.available_backends() if b in ("reference", "numba")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias", ARCHS)
def test_grid(backend, form, num_layers, bidirectional, proj_size, bias, dtype):
    check_lstm_parity(backend, form, num_layers, bidirectional, proj_size, bias, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "T,B,I,H,form",
    [
        (1, 1, 1, 1, "time_first"),     # T = B = H = 1
        (1, 4, 2, 3, "packed"),         # a single step
        (7, 1, 3, 1, "lengths"),        # H = 1
        (9, 13, 5, 6, "lengths"),       # batch not a multiple of any block size
        (30, 5, 2, 3, "packed"),        # very different lengths in one batch
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_shapes(backend, T, B, I, H, form, dtype):
    lengths = None
    if T == 30:
        lengths = [1, 30, 2, 29, 15]
    check_lstm_parity(backend, form, 2, True, 0, True, dtype, T=T, B=B, I=I, H=H, lengths=lengths)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["time_first", "batch_first", "lengths"])
def test_noncontiguous_input(backend, form):
    check_lstm_parity(backend, form, 2, True, 2, True, torch.float32, noncontig=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["time_first", "packed"])
def test_gradcheck(backend, form):
    torch.manual_seed(0)
    m = lstmkit.LSTM(2, 3, 2, bidirectional=True, proj_size=2, dtype=torch.float64, backend=backend)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def fn(x, h0, c0, *ps):
        for p, v in zip(params, ps):
            p.data = v.detach()
        sd = {n: v for (n, _), v in zip(m.named_parameters(), ps)}
        if form == "packed":
            xin = torch.nn.utils.rnn.pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False)
            out, (h, c) = torch.func.functional_call(m, sd, (xin, (h0, c0)))
            return out.data, h, c
        out, (h, c) = torch.func.functional_call(m, sd, (x, (h0, c0)))
        return out, h, c

    inputs = (x, h0, c0, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hx_none_is_zeros(backend):
    m = lstmkit.LSTM(3, 4, 2, bidirectional=True, backend=backend)
    x = torch.randn(5, 2, 3)
    out1, (h1, c1) = m(x)
    out2, (h2, c2) = m(x, (torch.zeros(4, 2, 4), torch.zeros(4, 2, 4)))
    assert torch.equal(out1, out2) and torch.equal(h1, h2) and torch.equal(c1, c2)
    assert out1.abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_matches_training_path(backend):
    """Under no_grad a backend may take a fused inference path; it must give the same numbers."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 6, 2, bidirectional=True, proj_size=3, backend=backend)
    x = torch.randn(8, 5, 3)
    lengths = [8, 3, 5, 1, 7]
    out_g, (h_g, c_g) = m(x, lengths=lengths)
    with torch.no_grad():
        out_n, (h_n, c_n) = m(x, lengths=lengths)
    for a, b in ((out_g, out_n), (h_g, h_n), (c_g, c_n)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


def _graph_ops(roots) -> list[str]:
    """The names of every autograd node reachable from the given grad_fns."""
    seen, names, todo = set(), [], [r for r in roots if r is not None]
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions if f is not None)
    return names


@pytest.mark.parametrize("variant", [{}, {"layer_norm": True, "zoneout": 0.1}])
def test_reference_takes_steps_with_one_unbind(variant):
    """The reference loop reads each step of the input projection from one ``unbind``: indexing
    it per step gives every step's backward a zero-filled gradient of the whole sequence to add
    (O(T^2) work: 10x torch.nn.LSTM's training step at T=200, B=64, H=512)."""
    T = 6
    m = lstmkit.LSTM(3, 4, 1, backend="reference", **variant).train()
    out, (h, c) = m(torch.randn(T, 2, 3))
    ops = _graph_ops([out.grad_fn, h.grad_fn, c.grad_fn])
    assert ops.count("UnbindBackward0") == 1
    assert "SelectBackward0" not in ops
