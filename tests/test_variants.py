"""The variants torch lacks (layer norm, peepholes, recurrent dropout, zoneout, forget-gate bias),
lengths= without packing, and streaming — each against an independent per-step implementation
written here from the papers' equations."""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstm_oracle import spy_step_runs
from lstmkit import _variants, backends
from lstmkit.backends import LayerOptions
from tolerances import TOL, TOL_NORMALIZED, assert_close

CPU = torch.device("cpu")


def _supports_variants(name):
    try:
        backends.resolve(name, CPU, torch.float32, LayerOptions(peephole=torch.zeros(3, 1)))
        return True
    except RuntimeError:
        return False


VARIANT_BACKENDS = [b for b in lstmkit.available_backends() if b in ("reference", "numba") and _supports_variants(b)]

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "zoneout": dict(zoneout=0.2),
    "zoneout_pair": dict(zoneout=(0.1, 0.4)),
    "forget_bias": dict(forget_bias=1.0),
    "all": dict(layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=(0.15, 0.3), forget_bias=0.5),
}


# -- the independent implementation --------------------------------------------------------------
def _ln(v, gain, bias=None, eps=1e-5):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    out = (v - mu) / torch.sqrt(var + eps) * gain
    return out + bias if bias is not None else out


def naive_lstm(m, x, h0, c0, lengths=None, masks=None):
    """Per-step loop of torch ops over a time-first (T, B, I) batch; masks[(layer, d)] = LayerOptions
    recorded from the module's own draw (training) or None (evaluation: zoneout's expectation)."""
    T, B, _ = x.shape
    D = 2 if m.bidirectional else 1
    v = m.variants
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    inp = x
    hn, cn = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")

            def p(name, sfx=sfx):
                return getattr(m, name + sfx, None)

            rec = masks.get((layer, d)) if masks else None
            h, c = h0[layer * D + d], c0[layer * D + d]
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h_in = h * rec.rec_mask if rec is not None and rec.rec_mask is not None else h
                a = inp[t] @ p("weight_ih").T
                r = h_in @ p("weight_hh").T
                if v.layer_norm:
                    a, r = _ln(a, p("ln_ih_weight")), _ln(r, p("ln_hh_weight"))
                z = a + r
                if m.bias:
                    z = z + p("bias_ih") + p("bias_hh")
                zi, zf, zg, zo = z.chunk(4, 1)
                if v.peephole:
                    zi = zi + p("weight_peephole")[0] * c
                    zf = zf + p("weight_peephole")[1] * c
                c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
                if v.peephole:
                    zo = zo + p("weight_peephole")[2] * c_new
                cc = _ln(c_new, p("ln_cell_weight"), p("ln_cell_bias")) if v.layer_norm else c_new
                h_new = torch.sigmoid(zo) * torch.tanh(cc)
                if m.proj_size:
                    h_new = h_new @ p("weight_hr").T
                if v.zoneout_cell:
                    dc = rec.zoneout_c[t] if rec is not None else v.zoneout_cell
                    c_new = dc * c + (1 - dc) * c_new
                if v.zoneout_hidden:
                    dh = rec.zoneout_h[t] if rec is not None else v.zoneout_hidden
                    h_new = dh * h + (1 - dh) * h_new
                active = (t < lengths).unsqueeze(1)
                h = torch.where(active, h_new, h)
                c = torch.where(active, c_new, c)
                ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
            outs.append(torch.stack(ys))
            hn.append(h)
            cn.append(c)
        inp = torch.cat(outs, 2)
    return inp, torch.stack(hn), torch.stack(cn)


def _record_masks(monkeypatch):
    """Keep the LayerOptions the module draws, in call order (layer-major, then direction)."""
    seen = []
    orig = _variants.Variants.layer_options

    def spy(self, *a, **k):
        o = orig(self, *a, **k)
        seen.append(o)
        return o

    monkeypatch.setattr(_variants.Variants, "layer_options", spy)
    return seen


def _make(backend, variant, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    args = dict(num_layers=2, bidirectional=True, proj_size=0)
    args.update(kw)
    m = lstmkit.LSTM(3, 5, dtype=dtype, backend=backend, **args, **VARIANTS[variant])
    with torch.no_grad():  # move gains and biases off their trivial init, so the test sees them
        for n, prm in m.named_parameters():
            if n.startswith("ln_") or n.startswith("weight_peephole"):
                prm.add_(0.3 * torch.randn_like(prm))
    return m


def _compare(m, x, h0, c0, lengths, masks, dtype):
    tol = TOL_NORMALIZED if m.variants.layer_norm else TOL
    params = list(m.parameters())
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hs = [h0.clone().requires_grad_() for _ in range(2)]
    cs = [c0.clone().requires_grad_() for _ in range(2)]
    got = m(xs[0], (hs[0], cs[0]), lengths=lengths)
    out, (hn, cn) = got
    exp_out, exp_h, exp_c = naive_lstm(m, xs[1], hs[1], cs[1], lengths, masks)
    assert_close(out, exp_out, dtype=dtype, msg="output", table=tol)
    assert_close(hn, exp_h, dtype=dtype, msg="h_n", table=tol)
    assert_close(cn, exp_c, dtype=dtype, msg="c_n", table=tol)
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(t.shape, dtype=dtype, generator=g) for t in (out, hn, cn)]
    ours = torch.autograd.grad(sum((a * b).sum() for a, b in zip((out, hn, cn), w)), [xs[0], hs[0], cs[0], *params])
    theirs = torch.autograd.grad(sum((a * b).sum() for a, b in zip((exp_out, exp_h, exp_c), w)),
                                 [xs[1], hs[1], cs[1], *params], allow_unused=True)
    names = ["input", "h0", "c0"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, ours, theirs):
        assert_close(a, b, dtype=dtype, msg=f"grad of {n}", table=tol)


@pytest.mark.parametrize("backend", VARIANT_BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_variant_matches_naive(backend, variant, training, proj_size, dtype, monkeypatch):
    m = _make(backend, variant, dtype, proj_size=proj_size).train(training)
    T, B = 6, 4
    P = proj_size or 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, 3, dtype=dtype, generator=g)
    h0 = torch.randn(4, B, P, dtype=dtype, generator=g)
    c0 = torch.randn(4, B, 5, dtype=dtype, generator=g)
    # training masks are drawn in the module's internal (length-sorted) row order; lengths= in training
    # is covered by the gradcheck below and by test_lengths_equal_packing
    lengths = None if training else [3, 6, 1, 5]
    seen = _record_masks(monkeypatch)
    m(x, (h0, c0), lengths=lengths)  # record this call's masks
    masks = None
    if training and seen and seen[0] is not None:
        masks = {(i // 2, i % 2): o for i, o in enumerate(seen)}
        # replay exactly these masks in the checked call
        replay = iter(seen)
        monkeypatch.setattr(_variants.Variants, "layer_options", lambda self, *a, **k: next(replay))
    _compare(m, x, h0, c0, lengths, masks, dtype)


@pytest.mark.parametrize("backend", VARIANT_BACKENDS)
def test_gradcheck_all_variants(backend):
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 3, 1, bidirectional=True, proj_size=2, dtype=torch.float64, backend=backend,
                     **VARIANTS["all"])
    params = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    for training in (False, True):
        m.train(training)

        def fn(x, *ps):
            torch.manual_seed(7)  # the same dropout and zoneout masks at every evaluation
            out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,), {"lengths": [3, 2]})
            return out, h, c

        assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]),
                                        eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("variant", ["recurrent_dropout", "zoneout", "all"])
def test_stochastic_variants_seeded_and_off_in_eval(variant):
    m = _make("auto", variant).train()
    x = torch.randn(6, 3, 3)
    torch.manual_seed(11)
    a = m(x)[0]
    torch.manual_seed(11)
    b = m(x)[0]
    torch.manual_seed(12)
    c = m(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    m.eval()
    e1, e2 = m(x)[0], m(x)[0]
    assert torch.equal(e1, e2)  # evaluation is deterministic


def test_recurrent_dropout_inactive_in_eval():
    torch.manual_seed(0)
    rd = lstmkit.LSTM(3, 5, 2, recurrent_dropout=0.5).eval()
    plain = lstmkit.LSTM(3, 5, 2).eval()
    plain.load_state_dict(rd.state_dict())
    x = torch.randn(7, 2, 3)
    assert torch.equal(rd(x)[0], plain(x)[0])


def test_zoneout_eval_is_expectation_not_identity():
    torch.manual_seed(0)
    z = lstmkit.LSTM(3, 5, zoneout=0.5).eval()
    plain = lstmkit.LSTM(3, 5).eval()
    plain.load_state_dict(z.state_dict())
    x = torch.randn(7, 2, 3)
    assert not torch.allclose(z(x)[0], plain(x)[0])
    assert_close(z(x)[0], naive_lstm(z, x, torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))[0])


def test_all_off_is_torch():
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, 2, layer_norm=False, peephole=False, recurrent_dropout=0.0, zoneout=0.0)
    ref = torch.nn.LSTM(3, 5, 2)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(4, 2, 3)
    assert_close(m(x)[0], ref(x)[0])


def test_forget_bias_init_and_layout():
    m = lstmkit.LSTM(3, 4, 2, bidirectional=True, forget_bias=1.0)
    ref = torch.nn.LSTM(3, 4, 2, bidirectional=True)
    assert m.state_dict().keys() == ref.state_dict().keys()
    for n, p in m.named_parameters():
        if n.startswith("bias_ih"):
            assert torch.equal(p[4:8], torch.ones(4)), n
            assert p[:4].abs().max() <= 1 / math.sqrt(4)
        if n.startswith("bias_hh"):
            assert torch.equal(p[4:8], torch.zeros(4)), n
    c = lstmkit.LSTMCell(3, 4, forget_bias=2.0)
    assert torch.equal(c.bias_ih[4:8] + c.bias_hh[4:8], torch.full((4,), 2.0))


def test_layer_norm_parameter_names_and_init():
    m = lstmkit.LSTM(3, 4, 1, bidirectional=True, layer_norm=True, peephole=True)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["ln_ih_weight_l0"] == (16,) and shapes["ln_hh_weight_l0_reverse"] == (16,)
    assert shapes["ln_cell_weight_l0"] == (4,) and shapes["ln_cell_bias_l0"] == (4,)
    assert shapes["weight_peephole_l0_reverse"] == (3, 4)
    assert torch.equal(m.ln_hh_weight_l0, torch.ones(16)) and torch.equal(m.ln_cell_bias_l0, torch.zeros(4))


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(recurrent_dropout=1.0), ValueError, r"recurrent_dropout: expected a probability in \[0, 1\), got 1.0"),
        (dict(zoneout=-0.1), ValueError, r"zoneout: expected a probability in \[0, 1\), got -0.1"),
        (dict(zoneout=(0.1, 0.2, 0.3)), ValueError, r"zoneout: expected a probability or a pair"),
        (dict(zoneout=(0.1, 2)), ValueError, r"zoneout\[1\]: expected a probability"),
        (dict(layer_norm=1), TypeError, r"layer_norm should be of type bool, got: int"),
        (dict(forget_bias=1.0, bias=False), ValueError, r"forget_bias: needs bias=True"),
        (dict(forget_bias=float("nan")), ValueError, r"forget_bias: expected a finite number"),
    ],
)
def test_variant_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lstmkit.LSTM(3, 4, **kwargs)
    with pytest.raises(exc, match=pattern):
        lstmkit.LSTMCell(3, 4, **kwargs)


# -- LSTMCell with variants --------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["layer_norm", "peephole", "zoneout", "all"])
def test_cell_variant_equals_one_step_of_lstm(variant):
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(3, 5, **VARIANTS[variant]).eval()
    lstm = lstmkit.LSTM(3, 5, **VARIANTS[variant]).eval()
    lstm.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    x, h, c = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 5)
    h1, c1 = cell(x, (h, c))
    _, (h2, c2) = lstm(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
    assert_close(h1, h2[0])
    assert_close(c1, c2[0])


def test_cell_recurrent_dropout_keeps_one_mask_per_sequence():
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(3, 64, recurrent_dropout=0.5).train()
    h = c = torch.ones(2, 64)
    x = torch.zeros(2, 3)
    cell(x, (h, c))
    m1 = cell._rec_mask.clone()
    cell(x, (h, c))
    assert torch.equal(m1, cell._rec_mask)
    cell.reset_dropout_mask()
    cell(x, (h, c))
    assert not torch.equal(m1, cell._rec_mask)
    assert set(torch.unique(m1).tolist()) <= {0.0, 2.0}


# -- lengths= without packing --------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in lstmkit.available_backends() if b in ("reference", "numba")])
@pytest.mark.parametrize("variant", [None, "all"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_equal_packing(backend, variant, batch_first):
    if variant is not None and backend not in VARIANT_BACKENDS:
        pytest.skip(f"{backend} does not run variants")
    torch.manual_seed(0)
    kw = VARIANTS[variant] if variant else {}
    m = lstmkit.LSTM(3, 5, 2, bidirectional=True, batch_first=batch_first, backend=backend, **kw).eval()
    lengths = [2, 7, 4, 7, 1]
    x = torch.randn(5, 7, 3) if batch_first else torch.randn(7, 5, 3)
    out_l, (h_l, c_l) = m(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out_p, (h_p, c_p) = m(packed)
    out_p = pad_packed_sequence(out_p, batch_first=batch_first, total_length=7)[0]
    assert_close(out_l, out_p)
    assert_close(h_l, h_p)
    assert_close(c_l, c_p)
    tmask = torch.arange(7).unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)  # (T, B) past the end
    if batch_first:
        tmask = tmask.T
    assert torch.equal(out_l[tmask], torch.zeros_like(out_l[tmask]))


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [None, "layer_norm", "peephole", "zoneout"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_step_and_chunks_equal_one_call(variant, proj_size):
    torch.manual_seed(0)
    kw = VARIANTS[variant] if variant else {}
    m = lstmkit.LSTM(3, 5, 2, proj_size=proj_size, **kw).eval()
    x = torch.randn(9, 2, 3)
    full, (h_f, c_f) = m(x)
    state = None
    ys = []
    for t in range(9):
        y, state = m.step(x[t], state)
        ys.append(y)
    assert_close(torch.stack(ys), full)
    assert_close(state[0], h_f)
    assert_close(state[1], c_f)
    state = None
    chunks = []
    for s in (slice(0, 4), slice(4, 5), slice(5, 9)):
        y, state = m(x[s], state)
        chunks.append(y)
    assert_close(torch.cat(chunks), full)
    assert_close(state[1], c_f)
    # unbatched steps
    y0, st = m.step(x[0, 1])
    assert_close(y0, full[0, 1])
    assert st[0].shape == (2, proj_size or 5)


def test_reset_state_rows_starts_new_sequences():
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, 2).eval()
    x = torch.randn(6, 3, 3)
    _, state = m(x[:3])
    fresh = m.reset_state(state, [1])
    assert torch.equal(fresh[0][:, 1], torch.zeros(2, 4)) and torch.equal(fresh[0][:, 0], state[0][:, 0])
    y, _ = m(x[3:], fresh)
    y_new, _ = m(x[3:, 1:2])  # row 1 restarted from zeros
    assert_close(y[:, 1:2], y_new)
    y_old, _ = m(x[:, 0:1])   # row 0 continued
    assert_close(y[:, 0:1], y_old[3:])
    mask_reset = m.reset_state(state, torch.tensor([True, False, True]))
    assert torch.equal(mask_reset[1][:, 2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"rows: expected a bool mask of shape \(3,\)"):
        m.reset_state(state, torch.tensor([True, False]))
    with pytest.raises(IndexError, match=r"rows: expected indices in \[0, 3\)"):
        m.reset_state(state, [5])


def test_step_errors():
    with pytest.raises(RuntimeError, match="step: a bidirectional LSTM needs the whole sequence"):
        lstmkit.LSTM(3, 4, bidirectional=True).step(torch.zeros(2, 3))
    m = lstmkit.LSTM(3, 4, 2)
    with pytest.raises(ValueError, match=r"step: expected x of shape \(batch, input_size\)"):
        m.step(torch.zeros(1, 2, 3))
    with pytest.raises(RuntimeError, match=r"input_size. Expected 3, got 5"):
        m.step(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 4\), got \[1, 2, 4\] \(state\[0\]\)"):
        m.step(torch.zeros(2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))


@pytest.mark.parametrize("B,I,H,proj_size,bias", [(1, 3, 5, 0, True), (2, 4, 6, 3, False), (3, 4, 6, 0, True),
                                                   (1, 150, 130, 0, True)])
def test_step_without_grad_matches_torch(B, I, H, proj_size, bias, monkeypatch):
    """step() under no_grad (the streaming fast path: straight into the backend's per-step function) gives
    torch.nn.LSTM's numbers, one step at a time, for small and large weights and batches."""
    calls = []
    spy_step_runs(monkeypatch, calls)
    torch.manual_seed(4)
    ref = torch.nn.LSTM(I, H, 2, proj_size=proj_size, bias=bias)
    m = lstmkit.LSTM(I, H, 2, proj_size=proj_size, bias=bias)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, B, I)
    state = want_state = None
    with torch.no_grad():
        for t in range(5):
            y, state = m.step(x[t], state)
            want, want_state = ref(x[t:t + 1], want_state)  # oracle
            assert_close(y, want[0])
    assert_close(state[0], want_state[0])
    assert_close(state[1], want_state[1])
    assert len(calls) == 5, "every step (the first from zeros) should take the per-step fast path"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype,proj_size,bias", [(torch.float32, 0, True), (torch.float64, 3, False)])
def test_one_step_forward_takes_step_path(batch_first, dtype, proj_size, bias, monkeypatch):
    """forward() of one-step chunks with a state (streaming loops through the plain module call)
    goes straight into the backend's per-step function, in either layout, and gives
    torch.nn.LSTM's numbers and shapes."""
    calls = []
    spy_step_runs(monkeypatch, calls)
    torch.manual_seed(5)
    kw = dict(proj_size=proj_size, bias=bias, batch_first=batch_first, dtype=dtype)
    ref = torch.nn.LSTM(4, 6, 2, **kw)
    m = lstmkit.LSTM(4, 6, 2, **kw)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 4, dtype=dtype)  # (B, T, I) if batch_first else (T, B, I)
    state = want_state = (torch.zeros(2, 5 if not batch_first else 3, proj_size or 6, dtype=dtype),
                          torch.zeros(2, 5 if not batch_first else 3, 6, dtype=dtype))
    with torch.no_grad():
        for t in range(5 if batch_first else 3):
            xt = x[:, t:t + 1] if batch_first else x[t:t + 1]
            y, state = m(xt, state)
            want, want_state = ref(xt, want_state)  # oracle
            assert y.shape == want.shape
            assert_close(y, want)
    assert_close(state[0], want_state[0])
    assert_close(state[1], want_state[1])
    assert len(calls) == (5 if batch_first else 3)


def test_step_path_follows_replaced_and_noncontiguous_weights():
    """The step path's cached weight addresses follow a parameter whose storage is replaced, and
    weights that are not contiguous are read through their strides, not their addresses."""
    torch.manual_seed(6)
    ref = torch.nn.LSTM(4, 6, 2)
    m = lstmkit.LSTM(4, 6, 2)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4)
    st = (torch.randn(2, 2, 6), torch.randn(2, 2, 6))
    with torch.no_grad():
        m.step(x, st)
        wt = torch.randn(6, 24) * 0.3  # read through its strides (its transpose differs)
        for mod in (ref, m):
            mod.weight_hh_l1.data = wt.t()  # a new, non-contiguous storage
        y, (h, c) = m.step(x, st)
        want, (wh, wc) = ref(x[None], st)  # oracle
        assert_close(y, want[0])
        assert_close(c, wc)
        new = torch.randn(24, 6)
        for mod in (ref, m):
            mod.weight_hh_l1.data = new.clone()  # contiguous again, another storage
        y, (h, c) = m.step(x, st)
        want, (wh, wc) = ref(x[None], st)
        assert_close(y, want[0])
        assert_close(h, wh)
        # a new parameter on the same memory, read in another order: the same data pointers as the
        # weights the stream saw, so only their identity tells the cached addresses stale
        for mod in (ref, m):
            w = mod.weight_hh_l1.detach()
            mod.weight_hh_l1 = torch.nn.Parameter(w.as_strided((24, 6), (1, 24)))
        assert m.weight_hh_l1.data_ptr() == w.data_ptr()
        y, (h, c) = m.step(x, st)
        want, (wh, wc) = ref(x[None], st)
        assert_close(y, want[0])
        assert_close(h, wh)


def test_step_functions_kept_per_stream_shape(monkeypatch):
    """The per-step functions the module keeps (one per input and state shape, dtype and backend)
    are made once per stream, bounded in number, dropped by pickling and copying, and follow a
    change of backend."""
    import copy
    import io
    import pickle

    made = []
    from lstmkit.backends import numba_cpu

    real = numba_cpu.step_runner
    monkeypatch.setattr(numba_cpu, "step_runner", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    torch.manual_seed(7)
    ref = torch.nn.LSTM(3, 5, 2)
    m = lstmkit.LSTM(3, 5, 2)
    m.load_state_dict(ref.state_dict())
    with torch.no_grad():
        st = None
        for _ in range(4):
            y, st = m.step(torch.randn(2, 3), st)
        assert made == [(2, 3)]
        for b in range(1, 41):  # many batch sizes: a bounded number of functions kept
            m.step(torch.randn(b, 3))
        assert len(made) == 40 and len(m._runners) <= 16  # B=2 was kept
        x = torch.randn(4, 3)
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert clone._runners == {}
            y, (h, c) = clone.step(x)
            want, (wh, wc) = ref(x[None])  # oracle
            assert_close(y, want[0])
            assert_close(c, wc)
        buf = io.BytesIO()
        torch.save(m, buf)  # whole-module checkpoints after streaming
        n = len(made)
        m.backend = "reference"
        y, (h, c) = m.step(x)
        assert len(made) == n, "the reference backend has no per-step function: the general path"
        assert_close(y, want[0])


def test_step_in_training_mode_keeps_dropout_between_layers():
    """Without gradients but in training mode, step() and one-step forward() still apply the dropout
    between layers (they must not take the plain step path, which has none)."""
    m = lstmkit.LSTM(4, 8, 2, dropout=0.5).train()
    x = torch.randn(3, 4)
    st = (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    with torch.no_grad():
        torch.manual_seed(1)
        a, _ = m.step(x, st)
        torch.manual_seed(2)
        b, _ = m.step(x, st)
        torch.manual_seed(1)
        a2, _ = m(x[None], st)
        m.eval()
        e, _ = m.step(x, st)
        e2, _ = m(x[None], st)
    assert not torch.equal(a, b), "different seeds should draw different dropout masks"
    assert_close(a2[0], a)  # the same mask under the same seed
    assert not torch.equal(a, e)
    assert_close(e2[0], e)


def test_step_state_errors():
    m = lstmkit.LSTM(3, 4, 2)
    x = torch.zeros(2, 3)
    good = (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"state\[0\] \(h\): expected dtype torch.float32"):
            m.step(x, (good[0].double(), good[1]))
        with pytest.raises(RuntimeError, match=r"Input and hidden tensors are not at the same device.*"
                                               r"\(hidden tensor: state\[1\] \(c\)\)"):
            m.step(x, (good[0], torch.zeros(2, 2, 4, device="meta")))
        with pytest.raises(RuntimeError, match=r"state: expected \(3-D h, c\)"):
            m.step(x, (torch.zeros(2, 8), torch.zeros(2, 8)))
        with pytest.raises(TypeError, match=r"state: expected a tuple \(h, c\) of two Tensors, got list of length 1"):
            m.step(x, [good[0]])


def test_bernoulli_masks_seeded_and_distributed():
    """The CPU dropout / zoneout masks: fixed by torch.manual_seed, 0 or 1 with the asked
    probability, neighbours uncorrelated, in the dtype asked for."""
    from lstmkit._variants import bernoulli

    like = torch.empty(0)
    torch.manual_seed(3)
    a = bernoulli((400, 50, 50), 0.3, like)
    torch.manual_seed(3)
    b = bernoulli((400, 50, 50), 0.3, like)
    torch.manual_seed(4)
    c = bernoulli((400, 50, 50), 0.3, like)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.3) < 0.003  # 1M draws: standard deviation 0.00046
    f = a.reshape(-1) - 0.3
    assert abs((f[1:] * f[:-1]).mean().item()) < 0.003  # consecutive elements independent
    assert not torch.equal(bernoulli((1000,), 0.5, like), bernoulli((1000,), 0.5, like))  # fresh draws
    assert bernoulli((64,), 0.0, like).sum() == 0 and bernoulli((64,), 1.0, like).sum() == 64
    d = bernoulli((2, 3), 0.5, torch.empty(0, dtype=torch.float64))
    assert d.dtype == torch.float64 and d.shape == (2, 3)
