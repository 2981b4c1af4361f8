"""The Numba backend's fused training path (``numba_cpu.lstm_stack_train``): one autograd node for
the whole stack, against torch.nn.LSTM with copied weights (the oracle), gradcheck, and dispatch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit.backends import numba_cpu as nb
from tolerances import assert_close

GRID = [
    # T, B, I, H, layers, bidirectional, proj_size, bias, lengths
    (5, 3, 4, 6, 1, False, 0, True, None),
    (5, 3, 4, 6, 2, False, 0, True, None),
    (4, 2, 3, 5, 3, True, 0, True, None),
    (5, 3, 4, 6, 2, False, 3, True, None),
    (5, 3, 4, 6, 2, True, 2, False, None),
    (1, 1, 2, 1, 2, True, 0, True, None),
    (6, 4, 4, 6, 2, True, 0, True, [6, 3, 3, 1]),
    (6, 5, 4, 6, 2, True, 3, True, [4, 6, 2, 6, 1]),    # longest in the middle (unsorted)
    (7, 4, 3, 5, 1, False, 0, False, [7, 2, 2, 1]),
    (20, 9, 24, 40, 2, True, 24, True, [20, 19, 15, 15, 11, 9, 4, 2, 1]),
    (12, 16, 32, 64, 2, False, 0, True, None),         # large enough for GEMM calls
]


def _models(I, H, L, bid, proj, bias, dtype, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(I, H, L, bias=bias, bidirectional=bid, proj_size=proj).to(dtype)
    ours = lstmkit.LSTM(I, H, L, bias=bias, bidirectional=bid, proj_size=proj, backend="numba").to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(model, x, h0, c0, lengths, T, seed=1):
    """(out, h_n, c_n) and the gradients of a random projection of them w.r.t. x, h0, c0 and
    every parameter."""
    x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_()
    c0 = c0.detach().clone().requires_grad_()
    if lengths is None:
        out, (h, c) = model(x, (h0, c0))
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        out, (h, c) = model(packed, (h0, c0))
        out, _ = pad_packed_sequence(out, total_length=T)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in (out, h, c))
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad(loss, [x, h0, c0, *params])
    return (out, h, c), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", GRID)
def test_stack_train_matches_torch(case, dtype, monkeypatch):
    T, B, I, H, L, bid, proj, bias, lengths = case
    D = 2 if bid else 1
    P = proj or H
    ref, ours = _models(I, H, L, bid, proj, bias, dtype)
    calls = []
    real = nb._train_call  # where the module's runner and lstm_stack_train meet

    def counted(*a, **k):
        calls.append(True)
        return real(*a, **k)

    monkeypatch.setattr(nb, "_train_call", counted)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, dtype=dtype, generator=g)
    h0 = torch.randn(L * D, B, P, dtype=dtype, generator=g)
    c0 = torch.randn(L * D, B, H, dtype=dtype, generator=g)
    got, got_grads = _run(ours, x, h0, c0, lengths, T)
    want, want_grads = _run(ref, x, h0, c0, lengths, T)
    assert calls == [True], "the fused training path was not taken"
    names = ["out", "h_n", "c_n"]
    for a, b, name in zip(got, want, names):
        assert_close(a, b, msg=name)
    pnames = [n for n, _ in sorted(ours.named_parameters())]
    for a, b, name in zip(got_grads, want_grads, ["d input", "d h0", "d c0", *pnames]):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("bid,proj,bias,lengths", [(False, 0, True, None), (True, 2, True, [3, 2, 2]),
                                                   (True, 0, False, [3, 3, 1])])
def test_stack_train_gradcheck(bid, proj, bias, lengths):
    T, B, I, H, L = 3, 3, 2, 3, 2
    D = 2 if bid else 1
    P = proj or H
    _, ours = _models(I, H, L, bid, proj, bias, torch.float64)
    weights = [w.detach().clone().requires_grad_() for w in ours._flat_weights]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=g, requires_grad=True)
    h0 = torch.randn(L * D, B, P, dtype=torch.float64, generator=g, requires_grad=True)
    c0 = torch.randn(L * D, B, H, dtype=torch.float64, generator=g, requires_grad=True)
    bs = None
    if lengths is not None:
        bs = (torch.tensor(lengths).unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)

    def f(x, h0, c0, *ws):
        return nb.lstm_stack_train(x, h0, c0, list(ws), num_layers=L, bidirectional=bid,
                                   has_biases=bias, proj_size=proj, batch_sizes=bs)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("with_state", [False, True])  # the general path; the module's function for the shapes
def test_stack_train_in_place_change_is_detected(with_state):
    _, ours = _models(3, 4, 2, False, 0, True, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = ours(x, (torch.zeros(2, 2, 4, dtype=torch.float64),) * 2 if with_state else None)
    with torch.no_grad():
        ours.weight_hh_l1.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("batch_first,bid", [(False, False), (True, False), (True, True)])
def test_module_training_calls_go_through_the_function_of_their_shapes(batch_first, bid, monkeypatch):
    """A plain training call with a state reaches the fused node through the backend's function for
    its shapes (``call_runner``), made once per shape and thread count; torch's numbers, every
    gradient, in either layout."""
    made = []
    real_make = nb.call_runner
    monkeypatch.setattr(nb, "call_runner", lambda *a, **k: made.append((tuple(a[0]), k["grad"])) or real_make(*a, **k))
    calls = []
    real = nb._train_call
    monkeypatch.setattr(nb, "_train_call", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, 2, batch_first=batch_first, bidirectional=bid)
    ours = lstmkit.LSTM(3, 5, 2, batch_first=batch_first, bidirectional=bid, backend="numba")
    ours.load_state_dict(ref.state_dict())
    D = 2 if bid else 1
    shape = (4, 10, 3) if batch_first else (10, 4, 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, h0, c0 = (torch.randn(s, generator=g) for s in (shape, (2 * D, 4, 5), (2 * D, 4, 5)))
        got, got_grads = _run(ours, x, h0, c0, None, 10)
        want, want_grads = _run(ref, x, h0, c0, None, 10)
        for a, b in zip(got + got_grads, want + want_grads):
            assert_close(a, b)
    assert made == [(shape, True)] and calls == [1, 1, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # another thread count: made again
    _run(ours, x, h0, c0, None, 10)
    assert made == [(shape, True)] * 2 and calls == [1] * 4


def test_inference_does_not_take_training_path(monkeypatch):
    _, ours = _models(3, 4, 2, False, 0, True, torch.float32)
    monkeypatch.setattr(nb, "lstm_stack_train", lambda *a, **k: pytest.fail("training path under no_grad"))
    with torch.no_grad():
        out, _ = ours(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 4)


def test_stack_train_leaves_large_multithreaded_shapes_to_the_per_layer_path(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert nb.prefers_stack_train(100, 16, 32, 128, 128)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert nb.prefers_stack_train(10, 5, 3, 5, 5)
    assert not nb.prefers_stack_train(100, 16, 32, 128, 128)   # serial recurrence, big GEMMs
    assert nb.prefers_stack_train(50, 64, 128, 256, 256)       # threaded recurrence anyway
    x = torch.randn(100, 16, 32)
    h0 = torch.zeros(1, 16, 128)
    c0 = torch.zeros(1, 16, 128)
    weights = [torch.randn(512, 32), torch.randn(512, 128)]
    assert nb.lstm_stack_train(x, h0, c0, weights, num_layers=1, bidirectional=False, has_biases=False,
                               proj_size=0, batch_sizes=None) is NotImplemented


def test_stack_train_second_derivative_matches_torch():
    """The fused node is differentiable twice: with create_graph=True its input gradient carries a
    graph, and differentiating it again gives torch's second derivatives (w.r.t. x and a weight)."""
    ref, ours = _models(3, 4, 2, False, 0, True, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    state = (torch.zeros(2, 2, 4, dtype=torch.float64),) * 2
    got, want = [], []
    for model, dst in ((ours, got), (ref, want)):
        (gx,) = torch.autograd.grad(model(x, state)[0].pow(2).sum(), x, create_graph=True)
        dst += [gx, *torch.autograd.grad(gx.pow(2).sum(), [x, model.weight_hh_l1])]
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_calls_without_a_state_take_the_same_functions(batch_first, monkeypatch):
    """``lstm(x)`` (no state) on CPU: zeros, then the same per-shape functions as a given state, in
    inference and in training; torch's numbers and gradients."""
    made = []
    real_make = nb.call_runner
    monkeypatch.setattr(nb, "call_runner", lambda *a, **k: made.append(k["grad"]) or real_make(*a, **k))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, 2, batch_first=batch_first)
    ours = lstmkit.LSTM(3, 5, 2, batch_first=batch_first, backend="numba")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 3, requires_grad=True)
    with torch.no_grad():
        for a, b in zip(ours(x)[0:1] + ours(x)[1], ref(x)[0:1] + ref(x)[1]):
            assert_close(a, b)
    out, (h, c) = ours(x)
    (gx,) = torch.autograd.grad((out.sum() + h.sum() + c.sum()), x)
    out, (h, c) = ref(x)
    (want,) = torch.autograd.grad((out.sum() + h.sum() + c.sum()), x)
    assert_close(gx, want)
    assert made == [False, True]
