"""Shared parity machinery: run lstmkit.LSTM and torch.nn.LSTM (the oracle) on the same weights and
inputs, in every input form, and compare outputs, final states and every gradient.

Every backend's test file parametrizes :func:`check_lstm_parity` over the same grid.
"""

from __future__ import annotations

import itertools

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from tolerances import assert_close, max_dev

FORMS = ("time_first", "batch_first", "unbatched", "packed", "lengths")
# (num_layers, bidirectional, proj_size, bias)
ARCHS = list(itertools.product((1, 2), (False, True), (0, 2), (True, False)))
DTYPES = (torch.float32, torch.float64)

# largest deviation from torch seen per dtype, reported by the test session
MAX_DEV: dict[torch.dtype, float] = {}


def _record(dtype, *pairs):
    for a, b in pairs:
        MAX_DEV[dtype] = max(MAX_DEV.get(dtype, 0.0), max_dev(a, b))


def make_pair(backend, dtype, *, input_size=3, hidden_size=4, seed=0, **kw):
    torch.manual_seed(seed)
    ours = lstmkit.LSTM(input_size, hidden_size, dtype=dtype, backend=backend, **kw)
    ref = torch.nn.LSTM(input_size, hidden_size, dtype=dtype, **kw)  # oracle
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def check_lstm_parity(backend, form, num_layers, bidirectional, proj_size, bias, dtype,
                      T=5, B=3, I=3, H=4, lengths=None, seed=0, noncontig=False):
    batch_first = form == "batch_first"
    ours, ref = make_pair(backend, dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                          bidirectional=bidirectional, proj_size=proj_size, bias=bias,
                          batch_first=batch_first, seed=seed)
    D = 2 if bidirectional else 1
    P = proj_size or H
    g = torch.Generator().manual_seed(seed + 1)
    if form == "unbatched":
        B = 1
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[B // 2] = T  # the longest sequence in the middle
    lengths = torch.as_tensor(lengths)

    shape = (B, T, I) if batch_first else (T, B, I)
    if form == "unbatched":
        shape = (T, I)
    if noncontig:  # a strided view of a bigger tensor
        x = torch.randn(*shape[:-1], 2 * I, dtype=dtype, generator=g)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, dtype=dtype, generator=g)
    hshape = (num_layers * D, P) if form == "unbatched" else (num_layers * D, B, P)
    cshape = (num_layers * D, H) if form == "unbatched" else (num_layers * D, B, H)
    h0 = torch.randn(*hshape, dtype=dtype, generator=g)
    c0 = torch.randn(*cshape, dtype=dtype, generator=g)

    results = []
    for model in (ours, ref):
        xi = x.detach().clone().requires_grad_()
        hi = h0.detach().clone().requires_grad_()
        ci = c0.detach().clone().requires_grad_()
        if form == "packed":
            packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
            out, (hn, cn) = model(packed, (hi, ci))
            out = pad_packed_sequence(out, total_length=T)[0]
        elif form == "lengths":
            if model is ours:
                out, (hn, cn) = model(xi, (hi, ci), lengths=lengths)
            else:
                packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
                out, (hn, cn) = model(packed, (hi, ci))
                out = pad_packed_sequence(out, total_length=T)[0]
        else:
            out, (hn, cn) = model(xi, (hi, ci))
        gen = torch.Generator().manual_seed(seed + 2)
        loss = sum((t * torch.randn(t.shape, dtype=dtype, generator=gen)).sum() for t in (out, hn, cn))
        loss.backward()
        grads = [xi.grad, hi.grad, ci.grad] + [p.grad for p in model.parameters()]
        results.append((out, hn, cn, grads))

    (o1, h1, c1, g1), (o2, h2, c2, g2) = results
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape
    assert_close(o1, o2, msg="output")
    assert_close(h1, h2, msg="h_n")
    assert_close(c1, c2, msg="c_n")
    names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    assert len(g1) == len(g2) == len(names)
    for name, a, b in zip(names, g1, g2):
        assert a is not None, f"no gradient for {name}"
        assert_close(a, b, msg=f"grad of {name}")
    _record(dtype, (o1, o2), (h1, h2), (c1, c2), *zip(g1, g2))


def spy_step_runs(monkeypatch, calls: list, name="lstm_step") -> None:
    """Append ``name`` to ``calls`` on every call of a per-step function the numba backend makes
    (``numba_cpu.step_runner``: the path of streaming steps), from now on."""
    from lstmkit.backends import numba_cpu

    real = numba_cpu.step_runner

    def make(*args, **kwargs):
        run = real(*args, **kwargs)

        def spy(*a):
            calls.append(name)
            return run(*a)

        return spy

    monkeypatch.setattr(numba_cpu, "step_runner", make)


def graph_nodes(t: torch.Tensor) -> list[str]:
    """The class names of every node in t's autograd graph (which autograd nodes a call built)."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names
