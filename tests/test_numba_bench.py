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
    assert "| training |" in md.read_text()


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
    text = md.read_text()
    assert "2.0 GFLOP/s" in text and "speed-up at 100% of peak" in text and "lstmkit.LSTMCell x2" in text
