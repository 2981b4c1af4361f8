"""The Numba backend: its layer against the reference backend, its inference hooks against
torch.nn.LSTM / LSTMCell (the oracle), gradcheck, the custom operators and torch.compile."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstm_oracle import spy_step_runs
from lstmkit.backends import LayerOptions
from lstmkit.backends import numba_cpu as nb
from lstmkit.backends import reference as ref
from lstmkit.kernels import numba_lstm as K
from tolerances import assert_close

DTYPES = (torch.float32, torch.float64)


def _batch_sizes(lengths, T):
    lengths = torch.tensor(sorted(lengths, reverse=True))
    return (lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)


def _layer_case(dtype, T, B, H, P, proj, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    s = 1 / math.sqrt(H)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * scale).requires_grad_()

    if noncontig:  # a transposed view of a (B, T, 4H) tensor
        xg = (torch.randn(B, T, 4 * H, dtype=dtype, generator=g)).transpose(0, 1).requires_grad_()
        assert not xg.is_contiguous()
    else:
        xg = r(T, B, 4 * H)
    w_hh = r(4 * H, P, scale=s)
    w_hr = r(P, H, scale=s) if proj else None
    h0 = r(B, P)
    c0 = r(B, H)
    return xg, w_hh, w_hr, h0, c0


def _run_layer(backend, case, batch_sizes, reverse, seed=1):
    xg, w_hh, w_hr, h0, c0 = case
    out, h, c = backend.layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, None)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t in (out, h, c))
    inputs = [t for t in case if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    return (out, h, c), grads


LAYER_GRID = [
    # T, B, H, P, proj, lengths
    (6, 3, 4, 4, False, None),
    (6, 3, 4, 2, True, None),
    (7, 5, 3, 3, False, [7, 1, 4, 7, 2]),
    (7, 5, 6, 2, True, [1, 7, 3, 3, 5]),
    (30, 4, 8, 8, False, [30, 1, 2, 29]),     # very different lengths
    (5, 3, 4, 4, False, [5, 0, 2]),           # an empty row
    (1, 2, 3, 3, False, None),                # T = 1
    (5, 1, 3, 3, False, None),                # B = 1
    (5, 3, 1, 1, False, [5, 2, 4]),           # H = 1
    (12, 9, 40, 40, False, [12, 12, 11, 9, 9, 5, 3, 2, 1]),  # large enough for the BLAS path
    (12, 9, 40, 24, True, None),
    (4, 2, 64, 64, False, [4, 3]),            # few rows on mid-size weights: the transposed-copy loops
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,H,P,proj,lengths", LAYER_GRID)
def test_layer_matches_reference(T, B, H, P, proj, lengths, reverse, dtype):
    case = _layer_case(dtype, T, B, H, P, proj)
    bs = None if lengths is None else _batch_sizes(lengths, T)
    (o1, h1, c1), g1 = _run_layer(nb, case, bs, reverse)
    (o2, h2, c2), g2 = _run_layer(ref, case, bs, reverse)
    assert_close(o1, o2, msg="out")
    assert_close(h1, h2, msg="h_n")
    assert_close(c1, c2, msg="c_n")
    names = ["xg", "w_hh", "w_hr", "h0", "c0"] if proj else ["xg", "w_hh", "h0", "c0"]
    for name, a, b in zip(names, g1, g2):
        assert_close(a, b, msg=f"grad of {name}")
    if lengths is not None:  # zeros past each length
        for t in range(T):
            assert torch.all(o1[t, int(bs[t]):] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_noncontiguous_and_no_grad(dtype):
    case = _layer_case(dtype, 6, 4, 5, 5, False, noncontig=True)
    (o1, h1, c1), g1 = _run_layer(nb, case, None, False)
    (o2, h2, c2), g2 = _run_layer(ref, case, None, False)
    for a, b in zip((o1, h1, c1, *g1), (o2, h2, c2, *g2)):
        assert_close(a, b)
    with torch.no_grad():  # the path that saves nothing gives the same numbers
        o3, h3, c3 = nb.layer(*case, None, False, None)
    assert torch.equal(o3, o1.detach()) and torch.equal(h3, h1.detach()) and torch.equal(c3, c1.detach())


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [False, True])
def test_layer_gradcheck(proj, reverse):
    case = _layer_case(torch.float64, 4, 3, 3, 2 if proj else 3, proj, seed=3)
    bs = _batch_sizes([4, 1, 3], 4)

    def fn(*ins):
        if proj:
            xg, w_hh, w_hr, h0, c0 = ins
        else:
            (xg, w_hh, h0, c0), w_hr = ins, None
        return nb.layer(xg, w_hh, w_hr, h0, c0, bs, reverse, None)

    assert torch.autograd.gradcheck(fn, tuple(t for t in case if t is not None), eps=1e-6, atol=1e-7)


# --- the inference hooks against torch.nn.LSTM ------------------------------------------------

STACK_GRID = list(itertools.product((1, 2), (False, True), (0, 3), (True, False)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias", STACK_GRID)
@pytest.mark.parametrize("lengths", [None, [6, 2, 5, 1]])
def test_lstm_stack_matches_torch(num_layers, bidirectional, proj_size, bias, lengths, dtype):
    torch.manual_seed(0)
    T, B, I, H = 6, 4, 3, 5
    m = torch.nn.LSTM(I, H, num_layers, bias=bias, bidirectional=bidirectional,
                      proj_size=proj_size, dtype=dtype)
    D = 2 if bidirectional else 1
    P = proj_size or H
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(num_layers * D, B, P, dtype=dtype)
    c0 = torch.randn(num_layers * D, B, H, dtype=dtype)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, has_biases=bias, proj_size=proj_size)
    with torch.no_grad():
        if lengths is None:
            want_out, (want_h, want_c) = m(x, (h0, c0))  # oracle
            out, h, c = nb.lstm_stack(x, h0, c0, m._flat_weights, batch_sizes=None, **kw)
        else:
            order = torch.argsort(torch.tensor(lengths), descending=True)
            xs, h0s, c0s = x[:, order], h0[:, order], c0[:, order]
            sorted_len = torch.tensor(lengths)[order]
            packed = pack_padded_sequence(xs, sorted_len)
            want, (want_h, want_c) = m(packed, (h0s, c0s))  # oracle
            want_out = pad_packed_sequence(want, total_length=T)[0]
            out, h, c = nb.lstm_stack(xs, h0s, c0s, m._flat_weights,
                                      batch_sizes=_batch_sizes(lengths, T), **kw)
    assert_close(out, want_out, msg="output")
    assert_close(h, want_h, msg="h_n")
    assert_close(c, want_c, msg="c_n")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 7, 40), (9, 6, 33, 64), (3, 1, 1, 1), (4, 1, 8, 80)])
def test_lstm_stack_shapes_noncontiguous(T, B, I, H, dtype):
    torch.manual_seed(1)
    m = torch.nn.LSTM(I, H, 2, dtype=dtype)
    x = torch.randn(B, T, I, dtype=dtype).transpose(0, 1)  # non-contiguous time-first view
    h0 = torch.randn(2, B, H, dtype=dtype)
    c0 = torch.randn(2, B, H, dtype=dtype)
    with torch.no_grad():
        want_out, (want_h, want_c) = m(x, (h0, c0))  # oracle
        out, h, c = nb.lstm_stack(x, h0, c0, m._flat_weights, num_layers=2, bidirectional=False,
                                  has_biases=True, proj_size=0, batch_sizes=None)
    for a, b in ((out, want_out), (h, want_h), (c, want_c)):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias", [
    (1, False, 0, True), (2, False, 0, False), (2, True, 0, True), (2, True, 3, True), (3, False, 2, False)])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 5, 7), (3, 2, 4, 6), (7, 2, 9, 33), (1, 1, 150, 130), (10, 5, 3, 5),
                                     (8, 8, 4, 6)])
def test_lstm_stack_short_calls(T, B, I, H, num_layers, bidirectional, proj_size, bias, dtype):
    """Streaming-size calls (few steps, one or two rows) and tiny models (the tutorial's) take the
    no-BLAS kernel on small weights (``stack_fwd_short``), and streaming calls the live-weights path
    of ``stack_fwd`` on larger ones (H=130)."""
    torch.manual_seed(11)
    m = torch.nn.LSTM(I, H, num_layers, bias=bias, bidirectional=bidirectional, proj_size=proj_size,
                      dtype=dtype)
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(num_layers * D, B, proj_size or H, dtype=dtype)
    c0 = torch.randn(num_layers * D, B, H, dtype=dtype)
    with torch.no_grad():
        want_out, (want_h, want_c) = m(x, (h0, c0))  # oracle
        out, h, c = nb.lstm_stack(x, h0, c0, m._flat_weights, num_layers=num_layers, bidirectional=bidirectional,
                                  has_biases=bias, proj_size=proj_size, batch_sizes=None)
    for a, b, name in ((out, want_out, "output"), (h, want_h, "h_n"), (c, want_c, "c_n")):
        assert_close(a, b, msg=name)


def test_lstm_stack_sees_weight_updates():
    """The cached weight views follow in-place updates and replaced parameters."""
    torch.manual_seed(2)
    m = torch.nn.LSTM(3, 4, 1)
    x = torch.randn(5, 2, 3)
    z = torch.zeros(1, 2, 4)
    kw = dict(num_layers=1, bidirectional=False, has_biases=True, proj_size=0, batch_sizes=None)
    with torch.no_grad():
        for step in range(3):
            if step == 1:
                m.weight_hh_l0.mul_(0.5)            # in place, like an optimizer step
            if step == 2:
                m.weight_ih_l0.data = torch.randn(16, 3)  # a new storage
            want = m(x, (z, z))[0]  # oracle
            got = nb.lstm_stack(x, z, z, m._flat_weights, **kw)[0]
            assert_close(got, want, msg=f"step {step}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,I,H", [(3, 4, 5), (1, 64, 128)])
def test_cell_step_matches_torch(B, I, H, bias, dtype):
    torch.manual_seed(3)
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    x = torch.randn(B, I, dtype=dtype)
    h = torch.randn(B, H, dtype=dtype)
    c = torch.randn(B, H, dtype=dtype)
    with torch.no_grad():
        want_h, want_c = cell(x, (h, c))  # oracle
        got_h, got_c = nb.lstm_cell_step(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                         cell.bias_hh)
    assert_close(got_h, want_h)
    assert_close(got_c, want_c)


# --- through lstmkit.LSTM ---------------------------------------------------------------------

def test_module_inference_uses_the_stack_hook(monkeypatch):
    """Inference calls go to the backend's lstm_stack; one-step calls (streaming, from zeros or a
    given state) to its per-step function."""
    calls = []
    real = nb.lstm_stack
    monkeypatch.setattr(nb, "lstm_stack", lambda *a, **kw: calls.append("lstm_stack") or real(*a, **kw))
    spy_step_runs(monkeypatch, calls)
    torch.manual_seed(4)
    ours = lstmkit.LSTM(3, 5, 2, backend="numba")
    oracle = torch.nn.LSTM(3, 5, 2)
    oracle.load_state_dict(ours.state_dict())
    x = torch.randn(10, 5, 3)
    state = None
    want_state = None
    with torch.no_grad():
        for t in range(3):  # streaming: one step at a time, carrying the state
            y, state = ours(x[t:t + 1], state)
            want_y, want_state = oracle(x[t:t + 1], want_state)
            assert_close(y, want_y)
        y, state = ours(x[3:], state)
        want_y, want_state = oracle(x[3:], want_state)
        assert_close(y, want_y)
    assert_close(state[0], want_state[0])
    assert_close(state[1], want_state[1])
    assert calls == ["lstm_step", "lstm_step", "lstm_step", "lstm_stack"]


@pytest.mark.parametrize("bias", [True, False])
def test_module_cell_uses_the_step_function_or_the_cell_hook(bias, monkeypatch):
    """LSTMCell calls without gradients: up to SHORT_CALL_ROWS rows through the backend's one-step
    function for their shapes (made once; zeros for a missing state), more rows through its
    lstm_cell_step; torch.nn.LSTMCell's numbers either way. Pickling drops the kept functions."""
    import pickle

    calls = []
    real = nb.lstm_cell_step
    monkeypatch.setattr(nb, "lstm_cell_step", lambda *a, **kw: calls.append("cell") or real(*a, **kw))
    spy_step_runs(monkeypatch, calls, "step")
    torch.manual_seed(5)
    ours = lstmkit.LSTMCell(4, 6, bias=bias, backend="numba")
    oracle = torch.nn.LSTMCell(4, 6, bias=bias)
    oracle.load_state_dict(ours.state_dict())
    rows = nb.SHORT_CALL_ROWS
    with torch.no_grad():
        for B, hc in ((3, True), (3, False), (rows + 1, True)):
            x = torch.randn(B, 4)
            state = (torch.randn(B, 6), torch.randn(B, 6)) if hc else None
            got = ours(x, state)
            want = oracle(x, state)  # oracle
            assert_close(got[0], want[0])
            assert_close(got[1], want[1])
    assert calls == ["step", "step", "cell"]
    assert len(ours._runners) == 2 and pickle.loads(pickle.dumps(ours))._runners == {}


# --- kernels, options, operators --------------------------------------------------------------

def test_tanh_approximation_error():
    """The float32 tanh the kernels use (compiled with their flags) stays within a few ulp."""
    x = np.linspace(-12, 12, 20_001).astype(np.float32)
    y = np.array([K._tanh32(v) for v in x], dtype=np.float64)
    err = np.abs(y - np.tanh(x.astype(np.float64)))
    assert float(err.max()) < 4e-7
    assert np.all(np.abs(y) <= 1)
    assert float(np.abs(y[np.abs(x) > 9] - np.sign(x[np.abs(x) > 9])).max()) < 3e-7  # saturates


@pytest.mark.parametrize("use_mkl", [True, False])
def test_gemm_paths(use_mkl, monkeypatch):
    """float32 through MKL (packed and unpacked) and through SciPy's BLAS (builds without MKL),
    on products large enough to leave the hand-written loops."""
    monkeypatch.setattr(nb, "HAVE_MKL", use_mkl and nb.HAVE_MKL)
    case = _layer_case(torch.float32, 5, 70, 48, 40, True, seed=8)
    bs = _batch_sizes([5] * 30 + [4] * 20 + [1] * 20, 5)
    for reverse in (False, True):
        (o1, h1, c1), g1 = _run_layer(nb, case, bs, reverse)
        (o2, h2, c2), g2 = _run_layer(ref, case, bs, reverse)
        for a, b in zip((o1, h1, c1, *g1), (o2, h2, c2, *g2)):
            assert_close(a, b)
    torch.manual_seed(9)
    m = torch.nn.LSTM(150, 48, 2)
    x = torch.randn(3, 70, 150)
    z = torch.zeros(2, 70, 48)
    with torch.no_grad():
        want = m(x, (z, z))  # oracle
        got = nb.lstm_stack(x, z, z, m._flat_weights, num_layers=2, bidirectional=False, has_biases=True,
                            proj_size=0, batch_sizes=None)
    for a, b in zip(got, (want[0], *want[1])):
        assert_close(a, b)


def test_unavailable():
    assert nb.unavailable(torch.device("cpu"), torch.float32, None) is None
    assert nb.unavailable(torch.device("cpu"), torch.float64, LayerOptions()) is None
    assert "float16" in nb.unavailable(torch.device("cpu"), torch.float16, None)
    assert "CPU" in nb.unavailable(torch.device("meta"), torch.float32, None)
    # the variants are served too (by backends/_numba_variants.py)
    assert nb.unavailable(torch.device("cpu"), torch.float32, LayerOptions(peephole=torch.zeros(3, 4))) is None


def test_custom_ops_opcheck():
    case = _layer_case(torch.float64, 4, 3, 3, 2, True, seed=5)
    bs = _batch_sizes([4, 2, 1], 4)
    torch.library.opcheck(torch.ops.lstmkit.numba_layer_fwd.default, (*case, bs, True))
    torch.library.opcheck(torch.ops.lstmkit.numba_layer_fwd.default, (*case, None, False))


def test_custom_op_matches_eager_path():
    """The custom operator (compile path) and the autograd.Function (eager path) agree exactly."""
    case = _layer_case(torch.float32, 5, 3, 4, 4, False, seed=6)
    bs = _batch_sizes([5, 3, 2], 5)
    (o1, h1, c1), g1 = _run_layer(nb, case, bs, True)

    class OpBackend:
        @staticmethod
        def layer(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse, opts):
            return torch.ops.lstmkit.numba_layer_fwd(xg, w_hh, w_hr, h0, c0, batch_sizes, reverse)[:3]

    (o2, h2, c2), g2 = _run_layer(OpBackend, case, bs, True)
    for a, b in zip((o1, h1, c1, *g1), (o2, h2, c2, *g2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiler", [
    "aot_eager",                                      # traces fwd + bwd graphs, no codegen
    # C++ codegen: ~30 s on 2 cores; inductor itself uses the deprecated torch.jit.script_method
    pytest.param("inductor", marks=[pytest.mark.slow,
                                    pytest.mark.filterwarnings("ignore::DeprecationWarning")]),
])
def test_torch_compile_fullgraph_matches_eager(compiler):
    torch.manual_seed(7)
    m = lstmkit.LSTM(3, 4, 2, bidirectional=True, backend="numba")
    x = torch.randn(5, 2, 3)
    m(x)  # resolve the backend eagerly (the registry imports it lazily)
    compiled = torch.compile(m, fullgraph=True, backend=compiler)

    def run(fn):
        xi = x.clone().requires_grad_()
        m.zero_grad()
        out, (h, c) = fn(xi)
        (out.sum() + h.square().sum() + c.sum()).backward()
        return [out, h, c, xi.grad] + [p.grad.clone() for p in m.parameters()]

    for a, b in zip(run(m), run(compiled)):
        assert_close(a, b)


@pytest.mark.parametrize("T,B,H", [(1, 1, 32), (1, 1, 128), (4, 8, 128), (3, 2, 5)])
def test_inference_sees_writes_through_data(T, B, H):
    """``p.data`` writes move neither version counter nor storage: cached packed weight copies must
    still never be used stale."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(H, H, 2, backend="numba").eval()
    ref = torch.nn.LSTM(H, H, 2).eval()  # oracle
    x = torch.randn(T, B, H)
    with torch.no_grad():
        m(x)  # fills the cache
        for p in m.parameters():
            p.data.mul_(-0.5)  # a hand-written update, invisible to the version counter
        ref.load_state_dict(m.state_dict())
        assert_close(m(x)[0], ref(x)[0])
        m.weight_hh_l1.data.copy_(torch.randn_like(m.weight_hh_l1))
        ref.load_state_dict(m.state_dict())
        assert_close(m(x)[0], ref(x)[0])


@pytest.mark.parametrize("T,B,L,proj", [(1, 16, 2, 0), (4, 16, 1, 3), (7, 9, 2, 0), (1, 5, 2, 4)])
def test_short_calls_use_live_weights(T, B, L, proj, monkeypatch):
    """Short calls of up to SHORT_CALL_ROWS rows in all (streaming chunks of a batch) compute on the
    weights as stored: no prepared copy to check against the weights (which cost more than the call)."""
    prepared = []
    real = nb._prepared
    monkeypatch.setattr(nb, "_prepared", lambda *a, **k: prepared.append(1) or real(*a, **k))
    torch.manual_seed(8)
    ref = torch.nn.LSTM(40, 48, L, proj_size=proj)
    ours = lstmkit.LSTM(40, 48, L, proj_size=proj)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, 40)
    state = (torch.randn(L, B, proj or 48), torch.randn(L, B, 48))
    with torch.no_grad():
        got, (h, c) = ours(x, state)
        want, (wh, wc) = ref(x, state)  # oracle
    assert_close(got, want)
    assert_close(h, wh)
    assert_close(c, wc)
    assert not prepared


def test_tiny_model_takes_the_no_blas_kernel(monkeypatch):
    """The tutorial's model (T=10, B=5, H=5, 2 layers) runs on the dot-product kernel with no BLAS call
    and nothing prepared (the fastest for tiny weights at any batch size), with torch's numbers."""
    from lstmkit.kernels import numba_lstm as K

    seen = []
    real = K.stack_fwd_short
    monkeypatch.setattr(K, "stack_fwd_short", lambda *a: seen.append(a[0].shape) or real(*a))
    torch.manual_seed(9)
    ref = torch.nn.LSTM(3, 5, 2)
    ours = lstmkit.LSTM(3, 5, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(10, 5, 3)
    with torch.no_grad():
        got, (h, c) = ours(x)
        want, (wh, wc) = ref(x)  # oracle
    assert_close(got, want)
    assert_close(c, wc)
    assert seen == [(10, 5, 3)]


def test_prepared_weights_start_on_a_cache_line():
    """The weight copies the per-step loops stream through start on a 64-byte boundary (a vector
    load never straddles two lines), whatever NumPy's allocation gave, with the same contents."""
    from lstmkit.kernels import numba_blas

    w = np.arange(512 * 128, dtype=np.float32).reshape(512, 128)
    for _ in range(8):  # several allocations: NumPy's own alignment varies among them
        wt = numba_blas.pack_b(w, 1, True)
        assert wt.ctypes.data % 64 == 0 and wt.shape == (w.size + 1,)
        assert np.array_equal(wt[:-1].reshape(128, 512), w.T)
        a = numba_blas.aligned_empty(1000 + _, np.float64)
        assert a.ctypes.data % 64 == 0 and a.shape == (1000 + _,)


def test_kernel_caches_follow_every_kernel_source():
    """Every cached kernel's on-disk cache entry is stamped with all kernel source files (and
    _gates.py), so an edit to a function compiled into it (numba_lstm's mm, say) makes the
    entry stale; Numba alone checks only the kernel's own file, and a kernel kept an edited
    function's old code."""
    from numba.core.dispatcher import Dispatcher

    from lstmkit.kernels import (
        _cache,
        numba_blas,
        numba_lstm,
        numba_parallel,
        numba_stack,
        numba_step,
        numba_variants,
    )

    names = {s[0] for s in _cache._STAMPS}
    assert {"numba_lstm.py", "numba_blas.py", "numba_stack.py", "numba_parallel.py", "numba_variants.py",
            "numba_step.py", "_gates.py"} <= names
    for mod in (numba_blas, numba_lstm, numba_stack, numba_parallel, numba_variants, numba_step):
        cached = [v for v in vars(mod).values() if isinstance(v, Dispatcher) and v.py_func.__module__ == mod.__name__
                  and getattr(v._cache, "_cache_file", None) is not None]
        assert cached, mod.__name__
        for d in cached:
            assert d._cache._cache_file._source_stamp[1] == _cache._STAMPS, (mod.__name__, d.py_func.__name__)
    block = numba_step.team_block(0, 0, 0, 0, np.float64)  # compiles (or loads) the float64 step callback
    cb = numba_step._compiled[np.float64]
    assert block[-1] == cb.address and cb._cache._cache_file._source_stamp[1] == _cache._STAMPS


def test_wide_vectors_marks_the_calling_kernel():
    """wide_vectors() gives the function being compiled the attribute that lets LLVM use 512-bit
    vectors (the default tuning of AVX-512 Intel CPUs prefers 256-bit ones); functions without the
    call keep LLVM's choice. The same results either way, to float32 rounding."""
    from numba import njit

    from lstmkit.kernels import _cache
    from lstmkit.kernels.numba_blas import wide_vectors

    @njit(fastmath=True)
    def wide(a, out):
        wide_vectors()
        for i in range(a.shape[0]):
            out[i] = math.tanh(a[i]) * 0.5 + a[i]

    @njit(fastmath=True)
    def plain(a, out):
        for i in range(a.shape[0]):
            out[i] = math.tanh(a[i]) * 0.5 + a[i]

    a = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    o1, o2 = np.empty_like(a), np.empty_like(a)
    wide(a, o1)
    plain(a, o2)
    np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6)
    attr = '"prefer-vector-width"="512"'
    assert (attr in wide.inspect_llvm(wide.signatures[0])) == _cache.WIDE_VECTORS
    assert attr not in plain.inspect_llvm(plain.signatures[0])


def test_unowned_views_alias_the_argument_without_its_owner():
    """numba_blas.unowned(a): the same memory with the same strides (a non-contiguous argument
    too), writes through it and its views land in a, and it holds no reference to a's owner (a
    NULL meminfo, so its views skip the atomic reference counts; returned to Python it owns
    nothing, where a view of a keeps a alive)."""
    from numba import njit

    from lstmkit.kernels.numba_blas import unowned

    @njit
    def fill(a):
        u = unowned(a)
        for i in range(u.shape[0]):
            row = u[i]
            for j in range(row.shape[0]):
                row[j] = i * 10 + j
        return u

    @njit
    def view(a):
        return a[:]

    base = np.zeros((3, 8))
    a = base[:, 1::2]  # strided
    got = fill(a)
    want = np.add.outer(np.arange(3) * 10, np.arange(4)).astype(float)
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(base[:, ::2], 0)  # nothing written between the strided columns
    assert got.strides == a.strides and np.shares_memory(got, base)
    assert got.base is None and view(a).base is not None
