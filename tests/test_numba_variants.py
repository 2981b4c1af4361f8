"""The Numba backend's variants (``backends/_numba_variants.py``): one layer-direction with
peepholes, layer norms, recurrent dropout and zoneout against the reference backend, on outputs,
final states and every gradient; gradcheck in float64.

The reference runs in float64 on the same (upcast) inputs, so a float32 comparison measures the
Numba kernels' own error: a float32 reference through a layer norm of a low-variance row is itself
off by more than ``TOL_NORMALIZED`` in some of these cases (seen: 1.5x), while the kernels stay
within it."""

from __future__ import annotations

import math

import pytest
import torch

from lstmkit.backends import LayerOptions
from lstmkit.backends import _numba_variants as nv
from lstmkit.backends import reference as ref
from tolerances import TOL, TOL_NORMALIZED, assert_close

DTYPES = (torch.float32, torch.float64)
PARAMS = ("peephole", "ln_hh", "ln_cell_w", "ln_cell_b")


def _batch_sizes(lengths, T):
    lengths = torch.tensor(sorted(lengths, reverse=True))
    return (lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)


def _opts(spec: set, T, B, H, P, dtype, g) -> LayerOptions:
    """LayerOptions with the variants named in ``spec``; parameters require grad, masks do not."""
    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * scale + shift).requires_grad_()

    def bern(shape, p):
        return torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=g)

    o = LayerOptions()
    if "peephole" in spec:
        o.peephole = r(3, H, scale=0.5)
    if "ln_hh" in spec:
        o.ln_hh = r(4 * H, scale=0.2, shift=1.0)
    if "ln_cell" in spec or "ln_cell_no_bias" in spec:
        o.ln_cell_w = r(H, scale=0.2, shift=1.0)
        o.ln_cell_b = r(H, scale=0.2) if "ln_cell" in spec else None
    if "rec_mask" in spec:
        o.rec_mask = bern((B, P), 0.7) / 0.7
    if "zoneout_train" in spec:
        o.zoneout_c = bern((T, B, H), 0.25)
        o.zoneout_h = bern((T, B, P), 0.4)
    if "zoneout_c_train" in spec:
        o.zoneout_c = bern((T, B, H), 0.5)
    if "zoneout_eval" in spec:
        o.zoneout_c, o.zoneout_h = 0.25, 0.4
    if "zoneout_h_eval" in spec:
        o.zoneout_h = 0.3
    return o


VARIANTS = {
    "peephole": {"peephole"},
    "ln_hh": {"ln_hh"},
    "ln_cell": {"ln_cell"},
    "ln_cell_no_bias": {"ln_cell_no_bias"},
    "layer_norm": {"ln_hh", "ln_cell"},
    "rec_mask": {"rec_mask"},
    "zoneout_train": {"zoneout_train"},
    "zoneout_c_train": {"zoneout_c_train"},
    "zoneout_eval": {"zoneout_eval"},
    "zoneout_h_eval": {"zoneout_h_eval"},
    "all_train": {"peephole", "ln_hh", "ln_cell", "rec_mask", "zoneout_train"},
    "all_eval": {"peephole", "ln_hh", "ln_cell", "zoneout_eval"},
}

CASES = [
    # T, B, H, P, proj, lengths
    (6, 3, 4, 4, False, None),
    (7, 5, 6, 3, True, [7, 1, 4, 7, 2]),
    (5, 3, 4, 4, False, [5, 0, 2]),            # an empty row
    (1, 2, 3, 3, False, None),                 # T = 1
    (5, 1, 2, 1, True, None),                  # B = 1, P = 1
    (12, 9, 40, 24, True, [12, 12, 11, 9, 9, 5, 3, 2, 1]),  # large enough for the BLAS path
]


def _case(dtype, T, B, H, P, proj, variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 1 / math.sqrt(H)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, generator=g) * scale).requires_grad_()

    xg = r(T, B, 4 * H)
    w_hh = r(4 * H, P, scale=s)
    w_hr = r(P, H, scale=s) if proj else None
    h0 = r(B, P)
    c0 = r(B, H)
    return (xg, w_hh, w_hr, h0, c0), _opts(VARIANTS[variant], T, B, H, P, dtype, g)


def _inputs(core, opts):
    """(names, tensors) of everything differentiable in this case."""
    named = list(zip(("xg", "w_hh", "w_hr", "h0", "c0"), core)) + [(n, getattr(opts, n)) for n in PARAMS]
    named = [(n, t) for n, t in named if t is not None]
    return [n for n, _ in named], [t for _, t in named]


def _float64(core, opts):
    """Detached float64 leaf copies of a case (masks and probabilities converted, not leaves)."""
    def up(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    return [up(t) for t in core], LayerOptions(**{k: up(v) if isinstance(v, torch.Tensor) else v
                                                  for k, v in vars(opts).items()})


def _run(backend, core, opts, batch_sizes, reverse, seed=1):
    out, h, c = backend.layer(*core, batch_sizes, reverse, opts)
    g = torch.Generator().manual_seed(seed)  # the same loss weights in every dtype
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.dtype)).sum() for t in (out, h, c))
    _, inputs = _inputs(core, opts)
    return (out, h, c), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,H,P,proj,lengths", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_matches_reference(variant, T, B, H, P, proj, lengths, reverse, dtype):
    core, opts = _case(dtype, T, B, H, P, proj, variant)
    bs = None if lengths is None else _batch_sizes(lengths, T)
    (o1, h1, c1), g1 = _run(nv, core, opts, bs, reverse)
    (o2, h2, c2), g2 = _run(ref, *_float64(core, opts), bs, reverse)
    table = TOL_NORMALIZED if (opts.ln_hh is not None or opts.ln_cell_w is not None) else TOL
    assert o1.dtype == dtype and all(g.dtype == dtype for g in g1)
    assert_close(o1.double(), o2, dtype=dtype, msg="out", table=table)
    assert_close(h1.double(), h2, dtype=dtype, msg="h_n", table=table)
    assert_close(c1.double(), c2, dtype=dtype, msg="c_n", table=table)
    names, _ = _inputs(core, opts)
    assert len(g1) == len(names)
    for name, a, b in zip(names, g1, g2):
        assert_close(a.double(), b, dtype=dtype, msg=f"grad of {name}", table=table)
    if lengths is not None:  # zeros past each length
        for t in range(T):
            assert torch.all(o1[t, int(bs[t]):] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["all_train", "all_eval"])
def test_no_grad_path_gives_the_same_numbers(variant, dtype):
    core, opts = _case(dtype, 7, 5, 6, 3, True, variant, seed=4)
    bs = _batch_sizes([7, 1, 4, 7, 2], 7)
    o1, h1, c1 = nv.layer(*core, bs, True, opts)
    with torch.no_grad():  # the path that saves nothing
        o2, h2, c2 = nv.layer(*core, bs, True, opts)
    assert torch.equal(o1.detach(), o2) and torch.equal(h1.detach(), h2) and torch.equal(c1.detach(), c2)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", ["all_train", "all_eval"])
def test_gradcheck(variant, reverse):
    core, opts = _case(torch.float64, 4, 3, 3, 2, True, variant, seed=3)
    bs = _batch_sizes([4, 1, 3], 4)
    names, inputs = _inputs(core, opts)

    def fn(*ins):
        kw = dict(zip(names, ins))
        o = LayerOptions(**{**vars(opts), **{n: kw[n] for n in PARAMS if n in kw}})
        return nv.layer(kw["xg"], kw["w_hh"], kw.get("w_hr"), kw["h0"], kw["c0"], bs, reverse, o)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


def test_bad_options_raise():
    core, opts = _case(torch.float32, 4, 2, 3, 3, False, "peephole")
    bad = LayerOptions(peephole=opts.peephole.detach().double())
    with pytest.raises(TypeError, match="peephole"):
        nv.layer(*core, None, False, bad)
    with pytest.raises(ValueError, match="rec_mask"):
        nv.layer(*core, None, False, LayerOptions(rec_mask=torch.ones(3, 3)))
    with pytest.raises(ValueError, match="ln_hh"):
        nv.layer(*core, None, False, LayerOptions(ln_hh=torch.ones(3)))
    with pytest.raises(ValueError, match="zoneout"):
        nv.layer(*core, None, False, LayerOptions(zoneout_c=torch.ones(4, 2, 2)))
