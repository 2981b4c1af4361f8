"""lstmkit.LSTM(backend="triton") against torch.nn.LSTM with copied weights.

The oracle runs on the CPU in float64; lstmkit runs float32 on CUDA when present, else on CPU
tensors under TRITON_INTERPRET=1 (tiny shapes). Outputs, final states and every gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytest.importorskip("triton")

import lstmkit  # noqa: E402
from lstmkit.backends import triton_gpu  # noqa: E402
from tolerances import assert_close  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)


def _check(form, num_layers, bidirectional, proj_size, bias, T=5, B=3, I=3, H=4, seed=0):
    torch.manual_seed(seed)
    ours = lstmkit.LSTM(I, H, num_layers, bias=bias, batch_first=form == "batch_first",
                        bidirectional=bidirectional, proj_size=proj_size, backend="triton").to(DEVICE)
    oracle = torch.nn.LSTM(I, H, num_layers, bias=bias, batch_first=form == "batch_first",
                           bidirectional=bidirectional, proj_size=proj_size, dtype=torch.float64)
    oracle.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    D, P = (2 if bidirectional else 1), (proj_size or H)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*((B, T, I) if form == "batch_first" else (T, B, I)), generator=g)
    h0 = torch.randn(num_layers * D, B, P, generator=g)
    c0 = torch.randn(num_layers * D, B, H, generator=g)
    lengths = torch.tensor([2, T, 1][:B] + [T] * max(0, B - 3))
    results = []
    for model, dtype, dev in ((ours, torch.float32, DEVICE), (oracle, torch.float64, torch.device("cpu"))):
        xi, hi, ci = (t.to(dev, dtype).detach().clone().requires_grad_() for t in (x, h0, c0))
        if form == "packed":
            out, (hn, cn) = model(pack_padded_sequence(xi, lengths, enforce_sorted=False), (hi, ci))
            out = pad_packed_sequence(out, total_length=T)[0]
        elif form == "lengths" and model is ours:
            out, (hn, cn) = model(xi, (hi, ci), lengths=lengths)
        elif form == "lengths":
            out, (hn, cn) = model(pack_padded_sequence(xi, lengths, enforce_sorted=False), (hi, ci))
            out = pad_packed_sequence(out, total_length=T)[0]
        else:
            out, (hn, cn) = model(xi, (hi, ci))
        gen = torch.Generator().manual_seed(seed + 2)
        loss = sum((r * torch.randn(r.shape, generator=gen).to(dev, dtype)).sum() for r in (out, hn, cn))
        loss.backward()
        grads = [xi.grad, hi.grad, ci.grad] + [p.grad for p in model.parameters()]
        results.append(([out, hn, cn], grads))
    (r1, g1), (r2, g2) = results
    for name, a, b in zip(["output", "h_n", "c_n"], r1, r2):
        assert a.shape == b.shape, name
        assert_close(a.double().cpu(), b, dtype=torch.float32, msg=name)
    names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    assert len(g1) == len(g2) == len(names)
    for name, a, b in zip(names, g1, g2):
        assert a is not None, f"no gradient for {name}"
        assert_close(a.double().cpu(), b, dtype=torch.float32, msg=f"grad of {name}")


@pytest.mark.parametrize("path", ["registers", "stream", "per_step", "split"])
@pytest.mark.parametrize(
    "form,num_layers,bidirectional,proj_size,bias",
    [
        ("time_first", 1, False, 0, True),
        ("batch_first", 2, True, 2, False),
        ("packed", 2, True, 0, True),
        ("lengths", 1, True, 2, True),
    ],
)
def test_module_matches_torch(monkeypatch, path, form, num_layers, bidirectional, proj_size, bias):
    for knob in ("PERSISTENT_MAX_ELEMS", "PERSISTENT_MAX_ELEMS_16"):
        monkeypatch.setattr(triton_gpu, knob, 1 << 30 if path == "registers" else 0)
    monkeypatch.setattr(triton_gpu, "STREAM_MAX_BLOCK", 1 << 30 if path == "stream" else 0)
    monkeypatch.setattr(triton_gpu, "SPLIT", "force" if path == "split" else "off")
    _check(form, num_layers, bidirectional, proj_size, bias)


_VARIANT_KWARGS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "zoneout": dict(zoneout=(0.2, 0.1)),
    "all": dict(layer_norm=True, peephole=True, recurrent_dropout=0.3, zoneout=0.1),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("variant", list(_VARIANT_KWARGS))
def test_module_variants_match_reference_backend(variant, training):
    """lstmkit.LSTM with a variant: the triton backend against the reference backend, same weights and masks."""
    import inspect

    kw = _VARIANT_KWARGS[variant]
    if not set(kw) <= set(inspect.signature(lstmkit.LSTM).parameters):
        pytest.skip(f"lstmkit.LSTM has no {sorted(kw)} arguments here")
    torch.manual_seed(0)
    ours = lstmkit.LSTM(3, 6, bidirectional=True, backend="triton", **kw).to(DEVICE)
    ref = lstmkit.LSTM(3, 6, bidirectional=True, backend="reference", **kw).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 3, generator=g)
    lengths = torch.tensor([4, 2, 3])
    up = [torch.randn(4, 3, 12, generator=g), torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)]
    results = []
    for model in (ours, ref):
        model.train(training)
        xi = x.to(DEVICE).requires_grad_()
        torch.manual_seed(2)  # the same dropout / zoneout masks for both
        out, (hn, cn) = model(xi, lengths=lengths)
        loss = sum((r * u.to(DEVICE)).sum() for r, u in zip((out, hn, cn), up))
        loss.backward()
        results.append(([out, hn, cn], [xi.grad] + [p.grad for p in model.parameters()]))
    (r1, g1), (r2, g2) = results
    for name, a, b in zip(["output", "h_n", "c_n"], r1, r2):
        assert_close(a, b, msg=name)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g1, g2):
        assert a is not None and b is not None, f"no gradient for {name}"
        scale = max(1.0, float(b.abs().max()))
        assert_close(a / scale, b / scale, msg=f"grad of {name}")


def test_lstm_cell_matches_torch():
    torch.manual_seed(0)
    ours = lstmkit.LSTMCell(3, 5, backend="triton").to(DEVICE)
    oracle = torch.nn.LSTMCell(3, 5, dtype=torch.float64)
    oracle.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x, h, c = (torch.randn(4, n, generator=g) for n in (3, 5, 5))
    res = []
    for model, dtype, dev in ((ours, torch.float32, DEVICE), (oracle, torch.float64, torch.device("cpu"))):
        xi, hi, ci = (t.to(dev, dtype).detach().clone().requires_grad_() for t in (x, h, c))
        h1, c1 = model(xi, (hi, ci))
        (h1.sum() * 0.7 + (c1 * c1).sum()).backward()
        res.append([h1, c1, xi.grad, hi.grad, ci.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*res):
        assert_close(a.detach().double().cpu(), b.detach(), dtype=torch.float32)
