"""lstmkit.LSTM / LSTMCell as torch.nn.LSTM / LSTMCell drop-ins: parameters, state dicts, cell parity,
dropout, backend selection and every argument check."""

import os
import pickle
import sys

import pytest
import torch

import lstmkit
from tolerances import assert_close

CPU_BACKENDS = [b for b in lstmkit.available_backends() if b in ("reference", "numba")]


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=3, bidirectional=True, proj_size=2), dict(bias=False)])
def test_same_parameters_and_init_as_torch(kw):
    torch.manual_seed(3)
    ours = lstmkit.LSTM(5, 4, **kw)
    torch.manual_seed(3)
    ref = torch.nn.LSTM(5, 4, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), n
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in ref.all_weights]
    assert repr(ours) == repr(ref)


def test_state_dict_round_trips_both_ways():
    ref = torch.nn.LSTM(3, 6, 2, bidirectional=True, proj_size=4)
    ours = lstmkit.LSTM(3, 6, 2, bidirectional=True, proj_size=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.LSTM(3, 6, 2, bidirectional=True, proj_size=4)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = torch.randn(4, 2, 3)
    assert_close(ours(x)[0], back(x)[0])


def test_pickle_and_deepcopy_round_trip():
    m = lstmkit.LSTM(3, 4, 2)
    m2 = pickle.loads(pickle.dumps(m))
    x = torch.randn(5, 2, 3)
    assert torch.equal(m(x)[0], m2(x)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cell_parity(backend, dtype, batched, bias, with_hx):
    torch.manual_seed(0)
    ours = lstmkit.LSTMCell(3, 5, bias=bias, dtype=dtype, backend=backend)
    ref = torch.nn.LSTMCell(3, 5, bias=bias, dtype=dtype)  # oracle
    ref.load_state_dict(ours.state_dict())
    shape = (4, 3) if batched else (3,)
    hshape = (4, 5) if batched else (5,)
    x = torch.randn(shape, dtype=dtype)
    hx = (torch.randn(hshape, dtype=dtype), torch.randn(hshape, dtype=dtype)) if with_hx else None
    res = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        hxi = tuple(t.clone().requires_grad_() for t in hx) if hx else None
        h, c = m(xi, hxi)
        (h.sum() * 2 + (c * c).sum()).backward()
        grads = [xi.grad] + ([t.grad for t in hxi] if hxi else []) + [p.grad for p in m.parameters()]
        res.append((h, c, grads))
    assert res[0][0].shape == res[1][0].shape
    assert_close(res[0][0], res[1][0])
    assert_close(res[0][1], res[1][1])
    for a, b in zip(res[0][2], res[1][2]):
        assert_close(a, b)


def test_cell_state_dict_both_ways():
    ref = torch.nn.LSTMCell(3, 4)
    ours = lstmkit.LSTMCell(3, 4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


# -- dropout -------------------------------------------------------------------------------------
def test_dropout_only_in_training_and_deterministic_under_seed():
    torch.manual_seed(0)
    ours = lstmkit.LSTM(3, 8, 3, dropout=0.5)
    ref = torch.nn.LSTM(3, 8, 3, dropout=0.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 3)
    ours.eval()
    ref.eval()
    assert_close(ours(x)[0], ref(x)[0])  # eval: no dropout
    ours.train()
    torch.manual_seed(1)
    a = ours(x)[0]
    torch.manual_seed(1)
    b = ours(x)[0]
    torch.manual_seed(2)
    c = ours(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    ours.eval()
    assert not torch.allclose(a, ours(x)[0])  # training output differs from the dropout-free one


def test_dropout_one_drops_everything_between_layers():
    m = lstmkit.LSTM(3, 4, 2, dropout=1.0, bias=False).train()
    # layer 2 sees zeros and has no bias: its output is exactly zero
    out, _ = m(torch.randn(5, 2, 3))
    assert torch.equal(out, torch.zeros_like(out))


# -- backends ------------------------------------------------------------------------------------
def test_available_backends_and_unknown_name():
    assert "reference" in lstmkit.available_backends()
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of .*'reference'.*got 'nope'"):
        lstmkit.LSTM(3, 4, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        lstmkit.LSTMCell(3, 4, backend="cudnn")


def test_explicit_backend_that_cannot_serve_raises():
    m = lstmkit.LSTM(3, 4, backend="reference", dtype=torch.float16)
    from lstmkit import backends
    with pytest.raises(RuntimeError, match="backend 'reference' cannot run"):
        backends.resolve("reference", torch.device("cpu"), torch.int32)
    assert m.backend == "reference"


def test_no_torch_recurrent_kernel_is_called(monkeypatch):
    """The math is lstmkit's own: break torch's LSTM kernels and lstmkit must still run."""
    import torch._VF as VF

    def boom(*a, **k):
        raise AssertionError("torch's recurrent kernel was called")

    for name in ("lstm", "lstm_cell"):
        monkeypatch.setattr(VF, name, boom, raising=False)
    monkeypatch.setattr(torch, "lstm", boom)
    monkeypatch.setattr(torch, "lstm_cell", boom)
    for backend in CPU_BACKENDS:
        m = lstmkit.LSTM(3, 4, 2, bidirectional=True, backend=backend)
        out, _ = m(torch.randn(5, 2, 3))
        out.sum().backward()
        c = lstmkit.LSTMCell(3, 4, backend=backend)
        c(torch.randn(2, 3))[0].sum().backward()


# -- argument checks: same exception type as torch, message names argument, expected, got -------
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(dropout=1.5), ValueError, r"dropout should be a number in range \[0, 1\].*got 1.5"),
        (dict(dropout="0.1"), ValueError, r"dropout.*got '0.1'"),
        (dict(dropout=True), ValueError, r"dropout.*got True"),
        (dict(hidden_size=0), ValueError, r"hidden_size must be greater than zero, got 0"),
        (dict(hidden_size=-3), ValueError, r"hidden_size must be greater than zero, got -3"),
        (dict(hidden_size=4.0), TypeError, r"hidden_size should be of type int, got: float"),
        (dict(input_size=0), ValueError, r"input_size must be greater than zero, got 0"),
        (dict(input_size="3"), TypeError, r"input_size should be of type int, got: str"),
        (dict(num_layers=0), ValueError, r"num_layers must be greater than zero, got 0"),
        (dict(num_layers=1.5), TypeError, r"num_layers should be of type int, got: float"),
        (dict(proj_size=-1), ValueError, r"proj_size should be a positive integer or zero.*got -1"),
        (dict(proj_size=4), ValueError, r"proj_size has to be smaller than hidden_size, got proj_size=4"),
        (dict(bias=1), TypeError, r"bias should be of type bool, got: int"),
        (dict(batch_first="yes"), TypeError, r"batch_first should be of type bool, got: str"),
        (dict(bidirectional=None), TypeError, r"bidirectional should be of type bool, got: NoneType"),
    ],
)
def test_constructor_errors(kwargs, exc, pattern):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        lstmkit.LSTM(**args)


def test_constructor_errors_match_torch_types():
    for kwargs in (dict(dropout=2.0), dict(hidden_size=0), dict(hidden_size=2.5), dict(proj_size=4),
                   dict(num_layers=0), dict(bias=1)):
        args = dict(input_size=3, hidden_size=4)
        args.update(kwargs)
        with pytest.raises(Exception) as theirs:
            torch.nn.LSTM(**args)
        with pytest.raises(Exception) as ours:
            lstmkit.LSTM(**args)
        assert type(ours.value) is type(theirs.value), kwargs


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match=r"non-zero dropout expects num_layers greater than 1.*dropout=0.2"):
        lstmkit.LSTM(3, 4, 1, dropout=0.2)


def _forward_error_cases():
    m = dict(input_size=3, hidden_size=4, num_layers=2)
    z = torch.zeros
    return [
        ("rank", m, lambda: (z(2, 3, 4, 3),), ValueError, r"Expected input to be 2D or 3D, got 4D"),
        ("input_size", m, lambda: (z(5, 2, 7),), RuntimeError,
         r"input.size\(-1\) must be equal to input_size. Expected 3, got 7"),
        ("dtype", m, lambda: (z(5, 2, 3, dtype=torch.float64),), ValueError,
         r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
        ("empty", m, lambda: (z(0, 2, 3),), RuntimeError, r"sequence length to be larger than 0"),
        ("hx rank batched", m, lambda: (z(5, 2, 3), (z(2, 4), z(2, 4))), RuntimeError,
         r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\) tensors"),
        ("hx rank unbatched", m, lambda: (z(5, 3), (z(2, 1, 4), z(2, 1, 4))), RuntimeError,
         r"For unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 3-D\) tensors"),
        ("h0 size", m, lambda: (z(5, 2, 3), (z(2, 3, 4), z(2, 2, 4))), RuntimeError,
         r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]"),
        ("c0 size", m, lambda: (z(5, 2, 3), (z(2, 2, 4), z(1, 2, 4))), RuntimeError,
         r"Expected hidden\[1\] size \(2, 2, 4\), got \[1, 2, 4\]"),
        ("hx type", m, lambda: (z(5, 2, 3), z(2, 2, 4)), TypeError, r"hx: expected a tuple \(h_0, c_0\)"),
        ("hx dtype", m, lambda: (z(5, 2, 3), (z(2, 2, 4, dtype=torch.float64), z(2, 2, 4))), ValueError,
         r"hx\[0\] \(h_0\): expected dtype torch.float32 \(the input's\), got torch.float64"),
        ("lengths count", m, lambda: (z(5, 2, 3), None, [5]), ValueError,
         r"lengths: expected a 1-D sequence of 2 lengths.*got shape \(1,\)"),
        ("lengths too long", m, lambda: (z(5, 2, 3), None, [6, 2]), ValueError,
         r"lengths: expected every length in \[1, 5\].*max 6"),
        ("lengths zero", m, lambda: (z(5, 2, 3), None, [0, 2]), ValueError,
         r"lengths: expected every length in \[1, 5\].*min 0"),
        ("lengths float", m, lambda: (z(5, 2, 3), None, torch.tensor([2.0, 1.0])), TypeError,
         r"lengths: expected integers"),
        ("lengths unbatched", m, lambda: (z(5, 3), None, [5]), ValueError, r"lengths: only valid for batched"),
    ]


@pytest.mark.parametrize("case", _forward_error_cases(), ids=lambda c: c[0])
def test_forward_errors(case):
    _, kwargs, args, exc, pattern = case
    m = lstmkit.LSTM(**kwargs)
    a = args()
    with pytest.raises(exc, match=pattern):
        if len(a) == 3:
            m(a[0], a[1], lengths=a[2])
        else:
            m(*a)


def test_device_mismatch():
    m = lstmkit.LSTM(3, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"Input and parameter tensors are not at the same device, found input "
                                           r"tensor at cpu and parameter tensor at meta"):
        m(torch.zeros(5, 2, 3))
    m = lstmkit.LSTM(3, 4)
    with pytest.raises(RuntimeError, match=r"Input and hidden tensors are not at the same device, found input tensor "
                                           r"at cpu and hidden tensor at meta \(hidden tensor: hx\[0\] \(h_0\)\)"):
        m(torch.zeros(5, 2, 3), (torch.zeros(1, 2, 4, device="meta"), torch.zeros(1, 2, 4)))


def test_forward_error_types_match_torch():
    z = torch.zeros
    for args in [(z(2, 3, 4, 3),), (z(5, 2, 7),), (z(5, 2, 3, dtype=torch.float64),), (z(0, 2, 3),),
                 (z(5, 2, 3), (z(2, 4), z(2, 4))), (z(5, 2, 3), (z(2, 3, 4), z(2, 2, 4)))]:
        with pytest.raises(Exception) as theirs:
            torch.nn.LSTM(3, 4, 2)(*args)
        with pytest.raises(Exception) as ours:
            lstmkit.LSTM(3, 4, 2)(*args)
        assert type(ours.value) is type(theirs.value), [tuple(a.shape) for a in args if hasattr(a, "shape")]


@pytest.mark.parametrize(
    "args,exc,pattern",
    [
        ((torch.zeros(2, 3, 3),), ValueError, r"LSTMCell: Expected input to be 1D or 2D, got 3D"),
        ((torch.zeros(2, 4),), RuntimeError, r"inconsistent input_size: got 4 expected 3"),
        ((torch.zeros(2, 3), (torch.zeros(3, 5), torch.zeros(2, 5))), RuntimeError,
         r"Input batch size 2 doesn't match hidden0 batch size 3"),
        ((torch.zeros(2, 3), (torch.zeros(2, 5), torch.zeros(2, 4))), RuntimeError,
         r"hidden1 has inconsistent hidden_size: got 4, expected 5"),
        ((torch.zeros(2, 3), (torch.zeros(1, 2, 5), torch.zeros(2, 5))), ValueError,
         r"Expected hx\[0\] to be 1D or 2D, got 3D"),
        ((torch.zeros(2, 3, dtype=torch.float64),), ValueError,
         r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
    ],
)
def test_cell_errors(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lstmkit.LSTMCell(3, 5)(*args)


def test_keep_freed_memory_arguments_and_environment(monkeypatch):
    from lstmkit import memory

    with pytest.raises(ValueError, match=r"mmap_bytes: expected an int in \(0, 33554432\], got 67108864"):
        memory.keep_freed_memory(mmap_bytes=64 * 1024 * 1024)
    with pytest.raises(ValueError, match=r"trim_bytes: expected an int in \(0, 2\*\*31\), got -1"):
        memory.keep_freed_memory(trim_bytes=-1)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert memory.keep_freed_memory() is False  # the user's own setting wins


_FAULTS_CHILD = r"""
import resource, sys, torch, lstmkit
from lstmkit.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(2)
m = lstmkit.LSTM(32, 128, 2)
x = torch.randn(100, 16, 32)
def step():
    out, (h, c) = m(x)
    torch.autograd.backward([out, h, c], [torch.ones_like(out), torch.ones_like(h), torch.ones_like(c)])
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_training_steps():
    """With freed memory kept, a training step of a 2-layer LSTM reuses the previous step's buffers:
    (almost) no page faults, where glibc's defaults measured ~1900 a step on the project's machine."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, "keep"], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) < 100
