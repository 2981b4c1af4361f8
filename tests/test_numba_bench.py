"""The CPU benchmark suite runs end to end on a tiny grid and writes what it promises (no timings
are asserted)."""

import json

import pytest
import torch

from lstmkit import bench
from lstmkit.bench import _cpu


def test_flops_counts_every_gemm():
    c = _cpu.Case(T=2, B=3, I=4, H=5, layers=1)
    assert c.flops(False) == 2 * 2 * 3 * 20 * (4 + 5)
    assert c.flops(True) == 3 * c.flops(False)
    p = _cpu.Case(T=1, B=1, I=2, H=4, layers=2, bidirectional=True, proj_size=3)
    layer0 = 2 * (2 * 16 * (2 + 3) + 2 * 4 * 3)
    layer1 = 2 * (2 * 16 * (6 + 3) + 2 * 4 * 3)
    assert p.flops(False) == layer0 + layer1


def test_suite_runs_on_a_tiny_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu, "GRID", [_cpu.Case(3, 2, 3, 4, 2), _cpu.Case(2, 2, 3, 4, 1, True, 2)])
    monkeypatch.setattr(_cpu, "STREAM_H", (4,))
    monkeypatch.setattr(_cpu, "sgemm_peak", lambda repeats: {"gflops": 1.0, "shape": [1, 1, 1]})
    threads = torch.get_num_threads()
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    try:
        assert bench.main(["--quick", "--repeats", "1", "--sample-ms", "1", "--json", str(out),
                           "--markdown", str(md)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["rows"]] == ["inference"] * 2 + ["training"] * 2 + ["streaming"]
    for r in res["rows"]:
        assert r["torch_s"] > 0 and r["lstmkit_s"] > 0
        assert r["ratio"] == pytest.approx(r["torch_s"] / r["lstmkit_s"])
    assert set(res["summary"]) == {"inference", "training", "streaming"}
    floor = res["autograd_floor"]
    assert floor["case"] == _cpu.GRID[0].name and floor["floor_s"] > 0
    assert floor["max_ratio"] == pytest.approx(floor["torch_s"] / floor["floor_s"])
    assert "| training |" in md.read_text() and "autograd floor, training" in md.read_text()


@pytest.mark.parametrize("kw", [{}, {"bidirectional": True, "proj_size": 2}])
def test_autograd_floor_node_has_the_lstm_interface(kw):
    """The floor's node takes the LSTM's inputs and parameters and hands every parameter (and any
    input that needs one) a gradient of its shape, so the step it times pays the same autograd
    bookkeeping as a real single-node LSTM."""
    import lstmkit

    model = lstmkit.LSTM(3, 4, 2, **kw)
    floor = _cpu._NothingLSTM(model)
    D, P = (2 if model.bidirectional else 1), model.proj_size or 4
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, (h, c) = floor(x, (torch.zeros(2 * D, 2, P), torch.zeros(2 * D, 2, 4)))
    assert out.shape == (5, 2, D * P) and h.shape == (2 * D, 2, P) and c.shape == (2 * D, 2, 4)
    torch.autograd.backward([out, h, c], [torch.ones_like(out), torch.ones_like(h), torch.ones_like(c)])
    params = list(model.parameters())
    assert len(list(floor.parameters())) == len(params)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert x.grad is not None and x.grad.shape == x.shape


def test_small_h_grid_runs_its_shapes_without_probes(tmp_path, monkeypatch):
    """``--grid small-h`` measures the small-hidden-size shapes (here replaced by tiny ones), not the
    issue's grid, and runs no compile or memory probe."""
    monkeypatch.setattr(_cpu, "SMALL_H_GRID", [_cpu.Case(3, 8, 2, 3, 1), _cpu.Case(2, 8, 2, 3, 2)])
    monkeypatch.setattr(_cpu, "GRID", [])
    monkeypatch.setattr(_cpu, "sgemm_peak", lambda repeats: {"gflops": 1.0, "shape": [1, 1, 1]})

    def no_probe(*args):
        raise AssertionError("no probe with --grid small-h")

    monkeypatch.setattr(_cpu, "compile_probe", no_probe)
    monkeypatch.setattr(_cpu, "memory_probe", no_probe)
    threads = torch.get_num_threads()
    out = tmp_path / "s.json"
    try:
        assert bench.main(["--grid", "small-h", "--mode", "training", "--repeats", "1", "--sample-ms", "1",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["grid"] == "small-h"
    assert [(r["shape"]["B"], r["shape"]["layers"]) for r in res["rows"]] == [(8, 1), (8, 2)]


def test_cuda_delegation_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench.main(["--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_variants_suite_runs_and_bounds_the_speed_ups_by_the_peak(tmp_path, monkeypatch):
    """``--suite variants`` on a tiny shape: every variant in both modes and the step API, with
    lstmkit's share of the SGEMM peak and the speed-up over the loop at 100% of it computed from
    the GEMM work (Case.flops) and the measured peak."""
    from lstmkit.bench import variants

    monkeypatch.setattr(variants, "SHAPES", [(6, 3, 4, 8, 2)])
    monkeypatch.setattr(variants, "STREAM_H", (8,))
    monkeypatch.setattr(variants, "sgemm_peak", lambda repeats: {"gflops": 2.0, "shape": [1, 1, 1]})
    threads = torch.get_num_threads()
    out, md = tmp_path / "v.json", tmp_path / "v.md"
    try:
        assert variants.main(["--repeats", "1", "--sample-ms", "1", "--json", str(out), "--markdown", str(md)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert [(r["variant"], r["mode"]) for r in res["variants"]] == [
        (v, m) for v in variants.VARIANTS for m in ("inference", "training")]
    for r in res["variants"]:
        peak_s = _cpu.Case(6, 3, 4, 8, 2).flops(r["mode"] == "training") / 2e9
        assert r["pct_of_peak"] == pytest.approx(100 * peak_s / r["lstmkit_s"])
        assert r["speedup_at_peak"] == pytest.approx(r["loop_s"] / peak_s)
        assert r["speedup_vs_loop"] == pytest.approx(r["loop_s"] / r["lstmkit_s"])
    assert [r["H"] for r in res["streaming"]] == [8]
    for r in res["streaming"]:
        assert r["step_us"] > 0 and r["lstmkit_cell_step_us"] > 0 and r["lstmkit_cell_ratio_vs_cell"] > 0
        # 2 layers of H=8, input 8: 4H x (8 + 8) weights and two 4H biases each, float32
        assert r["weights_mb"] == pytest.approx(2 * (32 * 16 + 2 * 32) * 4 / 2**20)
        read = r["weights_read_us"]
        assert read >= 0
        for bound, torch_us in (("bound_vs_lstm", "torch_lstm_step_us"), ("bound_vs_cell", "torch_cell_step_us")):
            assert r[bound] == (pytest.approx(r[torch_us] / read) if read > 0 else float("inf"))
    text = md.read_text()
    assert "2.0 GFLOP/s" in text and "speed-up at 100% of peak" in text and "lstmkit.LSTMCell x2" in text
    assert "weights read once us" in text
