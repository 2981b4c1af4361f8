"""The Triton backend against the reference backend (layer level) and torch.nn.LSTM (module level).

On a machine with CUDA the tensors are CUDA tensors; without one they are CPU tensors and the
kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported), so shapes stay
tiny. Every case runs both kernel shapes: the persistent kernel (W_hh on chip) and the per-step
path (host GEMM + fused pointwise kernel).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from lstmkit.backends import reference, resolve, triton_gpu  # noqa: E402
from lstmkit.backends._contract import LayerOptions  # noqa: E402
from tolerances import assert_close  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

PATHS = ["registers", "stream", "per_step", "split"]
VARIANTS = ["plain", "peephole", "layer_norm", "ln_hh", "ln_cell", "rec_dropout", "zoneout",
            "zoneout_eval", "all"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force one kernel shape: W_hh in registers, W_hh streamed by a persistent kernel, per step, or
    split over programs (which serves neither projection nor layer norm: those cases run per step)."""
    _force(monkeypatch, request.param)
    return request.param


def _per_step_duplicate(path, proj, variant):
    """The split kernels serve neither projection nor layer norm; such cases run per step, as tested."""
    if path == "split" and (proj or variant in ("layer_norm", "ln_hh", "ln_cell", "all")):
        pytest.skip("runs the per-step kernels under the split path: the per_step case covers it")


def _force(monkeypatch, path):
    for knob in ("PERSISTENT_MAX_ELEMS", "PERSISTENT_MAX_ELEMS_16"):
        monkeypatch.setattr(triton_gpu, knob, 1 << 30 if path == "registers" else 0)
    monkeypatch.setattr(triton_gpu, "STREAM_MAX_BLOCK", 1 << 30 if path == "stream" else 0)
    monkeypatch.setattr(triton_gpu, "SPLIT", "force" if path == "split" else "off")


def _opts(variant: str, T: int, B: int, H: int, P: int, g: torch.Generator) -> LayerOptions:
    """LayerOptions of one variant; parameters are float32 leaves on DEVICE that require grad."""

    def param(*shape, base=0.0):
        return (base + 0.5 * torch.randn(*shape, generator=g)).to(DEVICE).requires_grad_()

    def mask(*shape, p):
        return (torch.rand(*shape, generator=g) < p).float().to(DEVICE)

    o = LayerOptions()
    if variant in ("peephole", "all"):
        o.peephole = param(3, H)
    if variant in ("layer_norm", "ln_hh", "all"):
        o.ln_hh = param(4 * H, base=1.0)
    if variant in ("layer_norm", "ln_cell", "all"):
        o.ln_cell_w = param(H, base=1.0)
        o.ln_cell_b = param(H)
    if variant in ("rec_dropout", "all"):
        o.rec_mask = mask(B, P, p=0.7) / 0.7
    if variant in ("zoneout", "all"):
        o.zoneout_c = mask(T, B, H, p=0.3)
        o.zoneout_h = mask(T, B, P, p=0.4)
    if variant == "zoneout_eval":
        o.zoneout_c, o.zoneout_h = 0.3, 0.2
    return o


def _param_names(o: LayerOptions) -> list[str]:
    return [n for n in ("peephole", "ln_hh", "ln_cell_w", "ln_cell_b") if getattr(o, n) is not None]


def _run(mod, xg, w_hh, w_hr, h0, c0, bs, reverse, opts, upstream, dtype):
    """Outputs and gradients of one layer call; inputs are cast to ``dtype`` inside the graph."""
    leaves = [xg, w_hh, w_hr, h0, c0] + [getattr(opts, n) for n in _param_names(opts)]
    cast = [None if t is None else t.to(dtype) for t in (xg, w_hh, w_hr, h0, c0)]
    o = LayerOptions(**{k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in vars(opts).items()})
    out, h_n, c_n = mod.layer(*cast, bs, reverse, o)
    loss = sum((r.float() * u).sum() for r, u in zip((out, h_n, c_n), upstream))
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, want)
    return [out.float(), h_n.float(), c_n.float()], list(grads)


def _case(T, B, H, P, proj, variant, seed=0, batch_sizes=None):
    g = torch.Generator().manual_seed(seed)
    Pw = P if proj else H

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE).requires_grad_()

    xg = leaf(T, B, 4 * H)
    w_hh = leaf(4 * H, Pw, scale=0.5)
    w_hr = leaf(Pw, H, scale=0.5) if proj else None
    h0 = leaf(B, Pw)
    c0 = leaf(B, H)
    opts = _opts(variant, T, B, H, Pw, g)
    upstream = [torch.randn(T, B, Pw, generator=g).to(DEVICE), torch.randn(B, Pw, generator=g).to(DEVICE),
                torch.randn(B, H, generator=g).to(DEVICE)]
    bs = None if batch_sizes is None else torch.tensor(batch_sizes, dtype=torch.int64)
    return (xg, w_hh, w_hr, h0, c0, bs), opts, upstream


def _compare(T, B, H, P, proj, variant, reverse, batch_sizes=None, dtype=torch.float32, seed=0):
    (xg, w_hh, w_hr, h0, c0, bs), opts, up = _case(T, B, H, P, proj, variant, seed, batch_sizes)
    ours, ours_g = _run(triton_gpu, xg, w_hh, w_hr, h0, c0, bs, reverse, opts, up, dtype)
    # the spec in float32 (for float16/bfloat16 inputs too: the kernels accumulate in float32)
    ref, ref_g = _run(reference, xg, w_hh, w_hr, h0, c0, bs, reverse, opts, up, torch.float32)
    names = ["xg", "w_hh"] + (["w_hr"] if proj else []) + ["h0", "c0"] + _param_names(opts)
    for name, a, b in zip(["out", "h_n", "c_n"], ours, ref):
        assert a.shape == b.shape, name
        assert_close(a, b, dtype=dtype, msg=name)
    assert len(ours_g) == len(ref_g) == len(names)
    for name, a, b in zip(names, ours_g, ref_g):
        assert a.dtype == b.dtype, f"grad of {name}: dtype {a.dtype}"
        # float32 rounding in a gradient grows with its magnitude (on these shapes the float32 reference
        # itself is more than 1e-5 off a float64 run): compare relative to the largest entry
        scale = max(1.0, float(b.abs().max()))
        assert_close(a / scale, b / scale, dtype=dtype, msg=f"grad of {name}")


# -- the plain LSTM: projection, direction, variable lengths -------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
@pytest.mark.parametrize("batch_sizes", [None, [3, 3, 2, 1, 1]], ids=["full", "packed"])
def test_plain(path, reverse, proj, batch_sizes):
    _per_step_duplicate(path, proj, "plain")
    _compare(5, 3, 8, 5, proj, "plain", reverse, batch_sizes)


@pytest.mark.parametrize(
    "T,B,H,P,proj,batch_sizes",
    [
        (1, 1, 1, 1, False, None),              # T = B = H = 1
        (3, 17, 3, 2, True, [17, 9, 1]),        # B beyond one block of rows (two programs)
        (4, 2, 5, 5, False, [2, 0, 0, 0]),      # steps where no row is active
        (3, 2, 40, 36, True, [2, 1, 1]),        # several BLOCK_K chunks over P, H and 4H when streamed
    ],
)
def test_edge_shapes(path, T, B, H, P, proj, batch_sizes):
    _compare(T, B, H, P, proj, "plain", False, batch_sizes)
    # a layer norm over H = 1 column is degenerate (its output is exactly its bias)
    _compare(T, B, H, P, proj, "all" if H > 1 else "peephole", True, batch_sizes)


# -- the variants ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_variant(path, variant):
    _per_step_duplicate(path, False, variant)
    _compare(4, 3, 6, 4, False, variant, False, [3, 2, 2, 1])


@pytest.mark.parametrize("variant", ["layer_norm", "zoneout", "all"])
def test_variant_proj_reverse(path, variant):
    _per_step_duplicate(path, True, variant)
    _compare(4, 3, 6, 4, True, variant, True, [3, 3, 2, 1])


@pytest.mark.parametrize("variant", ["plain", "peephole", "rec_dropout", "zoneout", "zoneout_eval"])
def test_split_over_several_programs(monkeypatch, variant):
    """H = 40 over three programs of 16 units, B = 17 over two row blocks: siblings exchange h / dz."""
    _force(monkeypatch, "split")
    cfg = triton_gpu._Cfg(3, 17, 40, 40, True, None, LayerOptions(), DEVICE)
    assert cfg.split and cfg.grid == (3, 2)
    _compare(3, 17, 40, 40, False, variant, True, [17, 10, 3])


# -- half precision (float32 accumulation), against the float32 spec ---------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_half_precision(path, dtype, variant):
    _per_step_duplicate(path, variant == "all", variant)
    _compare(4, 3, 8, 5, variant == "all", variant, False, [3, 2, 2, 1], dtype=dtype)


# -- inference path, inputs, dispatch -------------------------------------------------------------

def test_no_grad_matches_grad_path(path):
    (xg, w_hh, w_hr, h0, c0, bs), opts, _ = _case(4, 3, 6, 4, True, "all", batch_sizes=[3, 2, 2, 1])
    with_grad = triton_gpu.layer(xg, w_hh, w_hr, h0, c0, bs, True, opts)
    with torch.no_grad():
        without = triton_gpu.layer(xg, w_hh, w_hr, h0, c0, bs, True, opts)
    for a, b in zip(with_grad, without):
        assert not b.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_noncontiguous_inputs(path):
    (xg, w_hh, w_hr, h0, c0, bs), opts, _ = _case(4, 3, 6, 4, False, "plain")
    xg_nc = xg.detach().transpose(0, 1).contiguous().transpose(0, 1)   # (T, B, 4H) with B-major strides
    w_nc = w_hh.detach().t().contiguous().t()
    assert not xg_nc.is_contiguous() and not w_nc.is_contiguous()
    a = triton_gpu.layer(xg_nc, w_nc, None, h0.detach(), c0.detach(), None, False, None)
    b = reference.layer(xg.detach(), w_hh.detach(), None, h0.detach(), c0.detach(), None, False, None)
    for x, y in zip(a, b):
        assert_close(x, y)


def test_empty_sequence():
    xg = torch.zeros(0, 2, 12, device=DEVICE)
    out, h_n, c_n = triton_gpu.layer(xg, torch.zeros(12, 3, device=DEVICE), None,
                                     torch.ones(2, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE),
                                     None, False, None)
    assert out.shape == (0, 2, 3)
    assert torch.equal(h_n, torch.ones(2, 3, device=DEVICE)) and torch.equal(c_n, torch.ones(2, 3, device=DEVICE))


def test_unavailable_reasons(monkeypatch):
    assert triton_gpu.unavailable(DEVICE, torch.float32) is None
    assert "dtype" in triton_gpu.unavailable(DEVICE, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in triton_gpu.unavailable(torch.device("cpu"), torch.float32)


def test_auto_picks_triton_only_for_cuda():
    assert resolve("auto", torch.device("cpu"), torch.float32).NAME != "triton"
    if ON_CUDA:
        assert resolve("auto", DEVICE, torch.float32).NAME == "triton"
    assert resolve("triton", DEVICE, torch.float32) is triton_gpu


def test_missing_triton_is_a_clear_error_only_when_asked_for():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lstmkit\n"
        "from lstmkit.backends import triton_gpu, resolve\n"
        "r = triton_gpu.unavailable(torch.device('cuda'), torch.float32)\n"
        "assert r is not None and 'triton is not installed' in r, r\n"
        "assert resolve('auto', torch.device('cpu'), torch.float32).NAME != 'triton'\n"
        "try:\n"
        "    resolve('triton', torch.device('cuda'), torch.float32)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("H,P,dtype,mode", [
    (8, 8, torch.float32, "registers"), (64, 64, torch.float32, "registers"), (100, 100, torch.float32, "stream"),
    (128, 128, torch.bfloat16, "registers"), (256, 128, torch.float16, "stream"),
    (256, 128, torch.float32, "stream"), (1024, 1024, torch.float32, "per_step"), (512, 64, torch.bfloat16, "per_step"),
])
def test_kernel_shape_choice(monkeypatch, H, P, dtype, mode):
    """The default thresholds: W_hh on chip up to H = 64 (16-bit: 128), streamed up to 256, per-step above."""
    monkeypatch.setattr(triton_gpu, "SPLIT", "auto")   # CPU tensors: never split under "auto"
    cfg = triton_gpu._Cfg(2, 3, H, P, False, None, LayerOptions(), torch.device("cpu"), dtype)
    got = "per_step" if not cfg.persistent else ("stream" if cfg.w_stream else "registers")
    assert got == mode and not cfg.split


@pytest.mark.parametrize("proj,variant,split", [(False, "plain", True), (False, "zoneout", True),
                                                (True, "plain", False), (False, "ln_hh", False),
                                                (False, "ln_cell", False)])
def test_split_serves_no_projection_nor_layer_norm(monkeypatch, proj, variant, split):
    monkeypatch.setattr(triton_gpu, "SPLIT", "force")
    g = torch.Generator().manual_seed(0)
    cfg = triton_gpu._Cfg(2, 3, 128, 64 if proj else 128, False, None, _opts(variant, 2, 3, 128, 128, g),
                          torch.device("cpu"), torch.float32, has_proj=proj)
    assert cfg.split == split
