"""A model's life beyond one call: weights that are not plain Parameters of the module
(parametrizations, weight_norm in both APIs, spectral_norm, AWD-LSTM's WeightDrop) and whole
pickled modules (``torch.save(model)``, ``torch.load(..., weights_only=True)``).

The oracle is torch.nn.LSTM / LSTMCell with the same weights and the same parametrization.
"""

from __future__ import annotations

import copy
import io
import pickletools
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from tolerances import assert_close

DTYPES = [torch.float32, torch.float64]
LSTM_CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, proj_size=3), dict(bias=False, batch_first=True)]


def _pair(kind: str, dtype, **kw):
    """lstmkit's module and torch's, same weights."""
    torch.manual_seed(0)
    if kind == "LSTM":
        ours, ref = lstmkit.LSTM(3, 5, dtype=dtype, **kw), torch.nn.LSTM(3, 5, dtype=dtype, **kw)
    else:
        ours, ref = lstmkit.LSTMCell(3, 5, dtype=dtype, **kw), torch.nn.LSTMCell(3, 5, dtype=dtype, **kw)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _inputs(kind: str, m, dtype, B: int = 4, T: int = 6):
    torch.manual_seed(1)
    if kind == "LSTMCell":
        return (torch.randn(B, 3, dtype=dtype),)
    x = torch.randn(B, T, 3, dtype=dtype) if m.batch_first else torch.randn(T, B, 3, dtype=dtype)
    return (x,)


def _outputs_and_grads(m, args, seed: int = 2):
    """Every output, and the gradients of a random projection of them with respect to the input
    and every parameter (a parametrization's own parameters included)."""
    args = [a.detach().requires_grad_() for a in args]
    outs = [t for t in torch.utils._pytree.tree_leaves(m(*args))]
    torch.manual_seed(seed)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    params = [p for _, p in sorted(m.named_parameters())]
    grads = torch.autograd.grad(loss, args + params)
    return outs, grads, [n for n, _ in sorted(m.named_parameters())]


def _assert_same(ours, ref, args, dtype):
    o1, g1, n1 = _outputs_and_grads(ours, args)
    o2, g2, n2 = _outputs_and_grads(ref, args)
    assert n1 == n2
    for a, b in zip(o1, o2):
        assert_close(a, b, dtype=dtype, msg="output")
    for name, a, b in zip(["input"] + n1, g1, g2):
        assert_close(a, b, dtype=dtype, msg=f"gradient of {name}")


def _fast_path_taken(m) -> bool:
    # the per-shape backend functions a module keeps are made only on its fast path
    return any(run is not None for run in m._runners.values())


# -- parametrizations -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", LSTM_CONFIGS, ids=["plain", "2l-bi-proj", "nobias-bf"])
@pytest.mark.parametrize("names", [("weight_hh_l0",), ("weight_ih_l0", "weight_hh_l0")], ids=["hh", "ih+hh"])
def test_lstm_weight_norm_parametrization(dtype, kw, names):
    ours, ref = _pair("LSTM", dtype, **kw)
    for m in (ours, ref):
        for n in names:
            parametrizations.weight_norm(m, n)
    args = _inputs("LSTM", ours, dtype)
    _assert_same(ours, ref, args, dtype)
    with torch.no_grad():
        out = ours(*args)
        assert _fast_path_taken(ours)
        assert_close(out[0], ref(*args)[0], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cell_weight_norm_parametrization(dtype):
    ours, ref = _pair("LSTMCell", dtype)
    for m in (ours, ref):
        parametrizations.weight_norm(m, "weight_hh")
        parametrizations.weight_norm(m, "weight_ih")
    args = _inputs("LSTMCell", ours, dtype)
    _assert_same(ours, ref, args, dtype)
    with torch.no_grad():
        h, _ = ours(*args)
        assert _fast_path_taken(ours)
        assert_close(h, ref(*args)[0], dtype=dtype)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_spectral_norm_eval_mode(kind):
    dtype = torch.float64
    ours, ref = _pair(kind, dtype)
    name = "weight_hh_l0" if kind == "LSTM" else "weight_hh"
    for m in (ours, ref):
        parametrizations.spectral_norm(m, name)
    ref.parametrizations[name].load_state_dict(ours.parametrizations[name].state_dict())
    ours.eval()
    ref.eval()
    _assert_same(ours, ref, _inputs(kind, ours, dtype), dtype)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_spectral_norm_training_one_power_iteration_per_call(kind):
    """In training mode spectral_norm runs a power iteration each time the weight is read; lstmkit
    reads it once per call (as nn.Linear does), torch.nn.LSTM several times, so torch's module is
    run under ``parametrize.cached()`` (one read per call) to compare."""
    dtype = torch.float64
    ours, ref = _pair(kind, dtype)
    name = "weight_hh_l0" if kind == "LSTM" else "weight_hh"
    for m in (ours, ref):
        parametrizations.spectral_norm(m, name)
    ref.parametrizations[name].load_state_dict(ours.parametrizations[name].state_dict())
    args = _inputs(kind, ours, dtype)
    for _ in range(3):  # the power iteration's vectors move on each call, the same way
        o1, g1, _ = _outputs_and_grads(ours, args)
        with parametrize.cached():
            o2, g2, _ = _outputs_and_grads(ref, args)
        for a, b in zip(o1 + list(g1), o2 + list(g2)):
            assert_close(a, b)
        u1, u2 = ours.parametrizations[name][0]._u, ref.parametrizations[name][0]._u
        assert_close(u1, u2)


class _Scale(nn.Module):
    """A parametrization with a parameter of its own (its gradient is checked too)."""

    def __init__(self, rows: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, rows, dtype=torch.float64))

    def forward(self, w):
        return w * self.scale.to(w.dtype).unsqueeze(1)


class _Count(nn.Module):
    calls = 0

    def forward(self, w):
        _Count.calls += 1
        return w


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_register_parametrization(kind):
    dtype = torch.float64
    ours, ref = _pair(kind, dtype)
    names = ["weight_ih_l0", "bias_hh_l0"] if kind == "LSTM" else ["weight_ih", "bias_hh"]
    for m in (ours, ref):
        parametrize.register_parametrization(m, names[0], _Scale(20))
        parametrize.register_parametrization(m, names[1], nn.Identity())
    _assert_same(ours, ref, _inputs(kind, ours, dtype), dtype)


def _calls(fn) -> int:
    _Count.calls = 0
    fn()
    return _Count.calls


def test_each_parametrized_weight_is_computed_once_per_call():
    m = lstmkit.LSTM(3, 5, 2)
    for n in ("weight_ih_l0", "weight_hh_l1"):
        parametrize.register_parametrization(m, n, _Count())
    x = torch.randn(6, 4, 3)
    lens = [6, 2, 5, 3]
    with torch.no_grad():
        assert _calls(lambda: m(x)) == 2  # the fast path
        assert _calls(lambda: m(x[:, 0])) == 2  # unbatched
        assert _calls(lambda: m(x, lengths=lens)) == 2
        assert _calls(lambda: m(pack_padded_sequence(x, lens, enforce_sorted=False))) == 2
        assert _calls(lambda: m.step(x[0])) == 2
    assert _calls(lambda: m(x)[0].sum().backward()) == 2  # with gradients
    m.train()
    m.dropout = 0.5
    assert _calls(lambda: m(x)) == 2  # dropout between the layers: the general path
    cell = lstmkit.LSTMCell(3, 5)
    parametrize.register_parametrization(cell, "weight_hh", _Count())
    with torch.no_grad():
        assert _calls(lambda: cell(x[0])) == 1
    assert _calls(lambda: cell(x[0, 0])) == 1


def test_parametrized_dtype_and_size_errors_name_torchs_wording():
    m = lstmkit.LSTM(3, 5)
    parametrizations.weight_norm(m, "weight_ih_l0")
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float64\) does not match weight dtype"):
        m(torch.randn(4, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 4"):
        m(torch.randn(4, 2, 4))


# -- the legacy weight_norm and plain-tensor weights -------------------------------------------------
def _legacy_weight_norm(m, name):
    with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(m, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_legacy_weight_norm(kind, dtype):
    ours, ref = _pair(kind, dtype, **({"num_layers": 2} if kind == "LSTM" else {}))
    name = "weight_hh_l0" if kind == "LSTM" else "weight_hh"
    for m in (ours, ref):
        _legacy_weight_norm(m, name)
    args = _inputs(kind, ours, dtype)
    _assert_same(ours, ref, args, dtype)
    with torch.no_grad():  # the hook recomputes the weight before every call
        for m in (ours, ref):
            getattr(m, name + "_g").mul_(0.5)
        assert_close(ours(*args)[0], ref(*args)[0], dtype=dtype)
        assert _fast_path_taken(ours)


class WeightDrop(nn.Module):
    """AWD-LSTM's DropConnect on the recurrent weights (Merity et al. 2018): the weight is deleted from
    the wrapped module and set before every call as a plain tensor, a dropout of a raw Parameter."""

    def __init__(self, module: nn.Module, names: list[str], p: float):
        super().__init__()
        self.module, self.names, self.p = module, names, p
        for n in names:
            w = getattr(module, n)
            del module._parameters[n]
            module.register_parameter(n + "_raw", nn.Parameter(w.detach().clone()))

    def forward(self, *args):
        for n in self.names:
            setattr(self.module, n, F.dropout(getattr(self.module, n + "_raw"), self.p, self.training))
        return self.module(*args)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_weight_drop(kind):
    dtype = torch.float64
    ours, ref = _pair(kind, dtype, **({"num_layers": 2, "bidirectional": True} if kind == "LSTM" else {}))
    names = ["weight_hh_l0", "weight_hh_l1_reverse"] if kind == "LSTM" else ["weight_hh"]
    ours, ref = WeightDrop(ours, names, 0.3), WeightDrop(ref, names, 0.3)
    args = _inputs(kind, ours.module, dtype)
    # training: a new DropConnect mask per call, the same for both (same seed); then evaluation
    for seed, training in ((0, True), (1, True), (2, False)):
        for m in (ours, ref):
            m.train(training)
        torch.manual_seed(seed)
        o1, g1, _ = _outputs_and_grads(ours, args)
        torch.manual_seed(seed)
        o2, g2, _ = _outputs_and_grads(ref, args)
        for a, b in zip(o1 + list(g1), o2 + list(g2)):
            assert_close(a, b)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


# -- pickling ---------------------------------------------------------------------------------------
def _pickled_globals(obj) -> set[str]:
    """The globals (module.name) a torch.save pickle refers to."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    names = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(f"{ops[i - 2][1]}.{ops[i - 1][1]}")
    return names


def _round_trip(obj, weights_only: bool = True):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(lstmkit.safe_globals()):
        return torch.load(buf, weights_only=weights_only)


MODELS = {
    "LSTM": lambda: lstmkit.LSTM(3, 5, 2, bidirectional=True, proj_size=2),
    "LSTM-variants": lambda: lstmkit.LSTM(3, 5, 2, layer_norm=True, peephole=True, zoneout=(0.1, 0.2),
                                          recurrent_dropout=0.25, forget_bias=1.0),
    "LSTMCell": lambda: lstmkit.LSTMCell(3, 5, bias=False),
    "LSTMCell-variants": lambda: lstmkit.LSTMCell(3, 5, layer_norm=True, recurrent_dropout=0.3),
    "LSTMClassifier": lambda: lstmkit.LSTMClassifier(3, 5, 2, output_size=4, dropout=0.1),
}
ALLOWED = {"collections.OrderedDict", "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2",
           "torch.FloatStorage", "torch.DoubleStorage", "__builtin__.set", "builtins.set"}


def _run(m):
    x = torch.linspace(-2, 2, 36).view(6, 2, 3)
    return m(x[0]) if isinstance(m, lstmkit.LSTMCell) else m(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_pickle_holds_parameters_options_and_public_classes_only(name):
    m = MODELS[name]()
    torch.manual_seed(0)
    _run(m)  # per-shape functions and masks made: they must not travel
    public = {f"{c.__module__}.{c.__qualname__}" for c in lstmkit.safe_globals()}
    found = _pickled_globals(m)
    assert found - ALLOWED <= public, found - ALLOWED - public
    assert f"{type(m).__module__}.{type(m).__qualname__}" in found
    for module in m.modules():
        if isinstance(module, (lstmkit.LSTM, lstmkit.LSTMCell)):
            state = module.__getstate__()
            assert not {"_runners", "_flat_getter", "_weights_getter", "_rec_mask"} & set(state)
            assert isinstance(state["variants"], dict)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_load_weights_only(name):
    m = MODELS[name]().eval()
    torch.manual_seed(0)
    out = _run(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    with pytest.raises(Exception, match=rf"{type(m).__module__}\.{type(m).__name__}"):
        torch.load(buf, weights_only=True)  # not registered: refused, naming the class, as any custom module
    copy_ = _round_trip(m, weights_only=True)
    assert type(copy_) is type(m) and not copy_.training
    assert repr(copy_) == repr(m)
    for (n, a), (n2, b) in zip(m.state_dict().items(), copy_.state_dict().items()):
        assert n == n2 and torch.equal(a, b)
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(_run(copy_))):
        assert torch.equal(a, b)
    inner = [mod for mod in copy_.modules() if isinstance(mod, (lstmkit.LSTM, lstmkit.LSTMCell))]
    assert [mod.variants for mod in inner] == [mod.variants for mod in m.modules()
                                               if isinstance(mod, (lstmkit.LSTM, lstmkit.LSTMCell))]


def test_safe_globals_is_public_and_covers_the_modules():
    assert "safe_globals" in lstmkit.__all__
    classes = lstmkit.safe_globals()
    assert {lstmkit.LSTM, lstmkit.LSTMCell, lstmkit.LSTMClassifier} <= set(classes)
    assert all(isinstance(c, type) and not c.__name__.startswith("_") for c in classes)


def test_training_mode_pickle_and_deepcopy_start_fresh():
    """Mid-sequence state (a cell's recurrent-dropout mask) and per-shape functions are not copied:
    the copy draws its own mask and makes its own functions."""
    cell = lstmkit.LSTMCell(3, 5, recurrent_dropout=0.5)
    cell(torch.randn(2, 3))
    assert cell._rec_mask is not None
    for c in (copy.deepcopy(cell), _round_trip(cell)):
        assert c._rec_mask is None and c._runners == {}
        assert c.training and c.variants == cell.variants
    m = lstmkit.LSTM(3, 5)
    with torch.no_grad():
        m(torch.randn(4, 2, 3))
    assert m._runners
    m2 = copy.deepcopy(m)
    assert m2._runners == {} and m2._flat_getter is not m._flat_getter
    x = torch.randn(4, 2, 3)
    assert torch.equal(m(x)[0], m2(x)[0])
