"""backend="auto": which backend answers a call, and the numbers it gives."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from lstm_oracle import graph_nodes
from lstmkit.backends import numba_cpu as nb
from tolerances import assert_close

F64 = torch.float64


@pytest.mark.parametrize("B,H,fused", [(5, 5, True), (16, 64, False), (2, nb.F64_MAX_UNITS // 2, True)])
@pytest.mark.parametrize("cell", [False, True])
def test_auto_float64_leaves_large_steps_to_the_reference_math(B, H, fused, cell, monkeypatch):
    """float64 steps of more than F64_MAX_UNITS rows x units run on torch's vectorized ops (the exact
    scalar exp / tanh of the fused kernels cost more there); smaller ones on the fused kernels; both
    give torch's numbers. An explicit backend="numba" keeps the kernels."""
    torch.manual_seed(0)
    if cell:
        ours, ref, explicit = (cls(3, H, dtype=F64, **kw) for cls, kw in (
            (lstmkit.LSTMCell, {}), (torch.nn.LSTMCell, {}), (lstmkit.LSTMCell, {"backend": "numba"})))
        x = torch.randn(B, 3, dtype=F64)
    else:
        ours, ref, explicit = (cls(3, H, 2, dtype=F64, **kw) for cls, kw in (
            (lstmkit.LSTM, {}), (torch.nn.LSTM, {}), (lstmkit.LSTM, {"backend": "numba"})))
        x = torch.randn(4, B, 3, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    explicit.load_state_dict(ref.state_dict())
    out, want = ours(x)[0], ref(x)[0]
    assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)
    fused_nodes = {"_StackFnBackward", "_LayerFnBackward", "_RowsLayerFnBackward"}
    assert bool(set(graph_nodes(out)) & fused_nodes) == fused
    assert set(graph_nodes(explicit(x)[0])) & fused_nodes
    if not fused:  # inference: the same choice (the module's per-shape functions included)
        for name in ("lstm_stack", "lstm_cell_step", "call_runner", "step_runner", "layer"):
            monkeypatch.setattr(nb, name, lambda *a, _name=name, **k: pytest.fail(f"numba's {_name} ran"))
    with torch.no_grad():
        for _ in range(2):
            assert_close(ours(x)[0], want)
