"""A deleted model's weights (and the prepared copies the backend caches for them) are freed at once."""

from __future__ import annotations

import weakref

import pytest
import torch

import lstmkit
from lstmkit.backends import numba_cpu as nb


@pytest.mark.parametrize("T,B", [(1, 2), (20, 16)])  # a short call (live views), a long one (prepared copies)
@pytest.mark.parametrize("grad", [False, True])
def test_deleted_model_frees_its_weights(T, B, grad):
    model = lstmkit.LSTM(8, 16, 2, backend="numba")
    x = torch.randn(T, B, 8)
    with torch.set_grad_enabled(grad):
        out, state = model(x)
        out.sum().backward() if grad else None
        lstmkit.functional.lstm(x, torch.zeros(2, B, 16), torch.zeros(2, B, 16), model._flat_weights, num_layers=2)
    refs = [weakref.ref(p) for p in model.parameters()]
    before = len(nb._WCACHE) + len(nb._VIEWS)
    del model, out, state  # (a graph's outputs keep their parameters, as in torch)
    assert all(r() is None for r in refs), "a cache keeps a deleted model's weights"
    assert len(nb._WCACHE) + len(nb._VIEWS) <= before


def test_many_models_created_and_deleted_hold_nothing():
    """Rounds of create / infer / delete: no model's weights outlive it (the cache held up to 16)."""
    refs = []
    before = set(nb._WCACHE)  # entries of models other tests keep alive
    for _ in range(20):
        model = lstmkit.LSTM(16, 32, 2).eval()
        with torch.no_grad():
            model(torch.randn(12, 8, 16))
        refs.append(weakref.ref(model.weight_hh_l1))
        del model
    assert sum(r() is not None for r in refs) == 0
    assert set(nb._WCACHE) <= before


def test_cached_weights_follow_in_place_and_replaced_values():
    """The cache stays correct: in-place updates, .data writes and replaced parameters are seen."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 8, backend="numba").eval()
    ref = torch.nn.LSTM(4, 8).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(12, 16, 4)
    with torch.no_grad():
        for step in range(3):
            if step == 1:
                for p, q in zip(ours.parameters(), ref.parameters()):
                    p.data.mul_(0.5)
                    q.data.mul_(0.5)
            if step == 2:
                ours.weight_hh_l0 = torch.nn.Parameter(torch.randn(32, 8))
                ref.weight_hh_l0 = torch.nn.Parameter(ours.weight_hh_l0.detach().clone())
            torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
