"""``lstmkit bench --suite variants``: the LSTM variants and the streaming step API on CPU.

Three tables, each measured side by side in one process (interleaved, warm-up first, median of
repeats; :func:`lstmkit.bench._cpu.time_pair`):

* cost: each variant against plain lstmkit on the same backend (``auto``), as
  variant time / plain time (target <= 1.3);
* speed-up: each variant against the straightforward implementation of the same variant, a per-step
  loop of torch ops differentiated by autograd (lstmkit's ``reference`` backend), as
  loop time / lstmkit time (target >= 4); beside it lstmkit's share of the machine's SGEMM peak
  (GEMM work only, as in the CPU suite) and the speed-up it would have at 100% of the peak (loop
  time / the GEMM work's time at the peak): no implementation of the same products does better;
* streaming: one-step latency of ``LSTM.step`` (B=1, 2 layers) against one-step calls of
  ``torch.nn.LSTM`` (target >= 10x) and a stack of ``torch.nn.LSTMCell`` (target >= 3x); and the
  same stack of ``lstmkit.LSTMCell`` against torch's. Beside them the time to read the model's
  weights once (a sum over one copy of them, less the same call on one element): every step reads
  them all, so torch's time / that time bounds the step's ratio for any implementation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Optional

import torch

import lstmkit

from ._cpu import Case, add_malloc_option, apply_malloc_option, machine_info, machine_line, sgemm_peak, time_pair

# (T, B, I, H, layers)
SHAPES = [(100, 16, 32, 128, 2), (50, 64, 128, 256, 1)]
VARIANTS: dict[str, dict] = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "zoneout": dict(zoneout=0.1),
    "all": dict(layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=0.1),
    "lengths": {},  # plain LSTM on a padded batch with lengths= (a quarter of the rows at T/2)
}
STREAM_H = (32, 128, 512)


def _call(model: torch.nn.Module, x, lengths, training: bool) -> Callable[[], None]:
    model.train(training)
    params = list(model.parameters())
    if not training:
        def infer():
            with torch.no_grad():
                model(x, lengths=lengths)
        return infer

    def train():
        for p in params:
            p.grad = None
        out, (h, c) = model(x, lengths=lengths)
        torch.autograd.backward([out, h, c], [torch.ones_like(out), torch.ones_like(h), torch.ones_like(c)])
    return train


def variant_rows(repeats: int, sample_s: float, quick: bool, peak_gflops: float) -> list[dict]:
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for T, B, I, H, L in shapes:
        if quick:
            T = 20
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, B, I, generator=g)
        for name, kw in VARIANTS.items():
            lengths = None
            if name == "lengths":
                lengths = torch.full((B,), T)
                lengths[: B // 4] = T // 2
            torch.manual_seed(0)
            plain = lstmkit.LSTM(I, H, L)
            fast = lstmkit.LSTM(I, H, L, **kw)
            loop = lstmkit.LSTM(I, H, L, backend="reference", **kw)
            fast.load_state_dict(loop.state_dict())
            plain.load_state_dict({k: v for k, v in loop.state_dict().items() if k in plain.state_dict()})
            backend = fast.resolved_backend()
            for mode in ("inference", "training"):
                training = mode == "training"
                f_fast = _call(fast, x, lengths, training)
                cost = time_pair(_call(plain, x, None, training), f_fast, repeats, sample_s)
                speed = time_pair(_call(loop, x, lengths, training), f_fast, repeats, sample_s)
                peak_s = Case(T, B, I, H, L).flops(training) / (peak_gflops * 1e9)  # the GEMMs at the peak
                rows.append({"shape": [T, B, I, H, L], "variant": name, "mode": mode, "backend": backend,
                             "lstmkit_s": speed["lstmkit_s"], "plain_s": cost["torch_s"], "loop_s": speed["torch_s"],
                             "cost_vs_plain": 1.0 / cost["ratio"], "speedup_vs_loop": speed["ratio"],
                             "pct_of_peak": 100 * peak_s / speed["lstmkit_s"],
                             "speedup_at_peak": speed["torch_s"] / peak_s})
                print(_fmt_variant(rows[-1]), flush=True)
    return rows


def streaming_rows(repeats: int, sample_s: float, quick: bool, steps: int = 32) -> list[dict]:
    rows = []
    for H in STREAM_H[:1] if quick else STREAM_H:
        rows.append(_stream_row(H, repeats, sample_s, steps))
        print(_fmt_stream(rows[-1]), flush=True)
    return rows


def weights_read_s(model: torch.nn.Module, repeats: int, sample_s: float) -> float:
    """Seconds to read every parameter of ``model`` once: a sum over one contiguous copy of
    them (torch's threads), less the time of the same call on one element (its overhead)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    one = flat[:1].clone()
    r = time_pair(flat.sum, one.sum, repeats, sample_s)
    return max(r["torch_s"] - r["lstmkit_s"], 0.0)


def _stream_row(H: int, repeats: int, sample_s: float, steps: int) -> dict:
    I, L = H, 2
    torch.manual_seed(0)
    ours = lstmkit.LSTM(I, H, L).eval()
    ref = torch.nn.LSTM(I, H, L).eval()  # baseline
    ref.load_state_dict(ours.state_dict())
    cells = [torch.nn.LSTMCell(I, H).eval(), torch.nn.LSTMCell(H, H).eval()]  # baseline
    our_cells = [lstmkit.LSTMCell(I, H).eval(), lstmkit.LSTMCell(H, H).eval()]
    for k, (cell, our_cell) in enumerate(zip(cells, our_cells)):
        cell.load_state_dict({n[:-3]: v for n, v in ours.state_dict().items() if n.endswith(f"_l{k}")})
        our_cell.load_state_dict(cell.state_dict())
    xs = torch.randn(steps, 1, I)

    def f_ours():
        with torch.no_grad():
            state = None
            for t in range(steps):
                _, state = ours.step(xs[t], state)

    def f_lstm():
        with torch.no_grad():
            h = c = torch.zeros(L, 1, H)
            for t in range(steps):
                _, (h, c) = ref(xs[t : t + 1], (h, c))

    def cells_loop(stack: list) -> Callable[[], None]:
        def f():
            with torch.no_grad():
                state = [(torch.zeros(1, H), torch.zeros(1, H)) for _ in stack]
                for t in range(steps):
                    inp = xs[t]
                    for k, cell in enumerate(stack):
                        state[k] = cell(inp, state[k])
                        inp = state[k][0]
        return f

    vs_lstm = time_pair(f_lstm, f_ours, repeats, sample_s)
    vs_cell = time_pair(cells_loop(cells), f_ours, repeats, sample_s)
    cell_vs_cell = time_pair(cells_loop(cells), cells_loop(our_cells), repeats, sample_s)
    read_us = 1e6 * weights_read_s(ours, repeats, sample_s)
    return {"weights_mb": sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**20,
            "weights_read_us": read_us,
            "bound_vs_lstm": 1e6 * vs_lstm["torch_s"] / steps / read_us if read_us > 0 else float("inf"),
            "bound_vs_cell": 1e6 * vs_cell["torch_s"] / steps / read_us if read_us > 0 else float("inf"),
            "H": H, "layers": L, "B": 1, "step_us": 1e6 * vs_lstm["lstmkit_s"] / steps,
            "torch_lstm_step_us": 1e6 * vs_lstm["torch_s"] / steps,
            "torch_cell_step_us": 1e6 * vs_cell["torch_s"] / steps,
            "ratio_vs_lstm": vs_lstm["ratio"], "ratio_vs_cell": vs_cell["ratio"],
            "lstmkit_cell_step_us": 1e6 * cell_vs_cell["lstmkit_s"] / steps,
            "lstmkit_cell_ratio_vs_cell": cell_vs_cell["ratio"]}


def _fmt_variant(r: dict) -> str:
    T, B, I, H, L = r["shape"]
    return (f"| ({T},{B},{I},{H},{L}) | {r['variant']} | {r['mode']} | {r['backend']} | {1e3 * r['lstmkit_s']:.2f} | "
            f"{r['cost_vs_plain']:.2f}x | {r['speedup_vs_loop']:.1f}x | {r['pct_of_peak']:.0f}% | "
            f"{r['speedup_at_peak']:.1f}x |")


def _fmt_stream(r: dict) -> str:
    return (f"| {r['H']} | {r['step_us']:.1f} | {r['torch_lstm_step_us']:.1f} | {r['ratio_vs_lstm']:.1f}x | "
            f"{r['torch_cell_step_us']:.1f} | {r['ratio_vs_cell']:.1f}x | {r['lstmkit_cell_step_us']:.1f} | "
            f"{r['lstmkit_cell_ratio_vs_cell']:.1f}x | {r['weights_read_us']:.1f} ({r['weights_mb']:.2f} MiB) | "
            f"{r['bound_vs_lstm']:.1f}x / {r['bound_vs_cell']:.1f}x |")


def markdown(res: dict) -> str:
    lines = [machine_line(res["machine"], res["sgemm_peak_gflops"]), "",
             "| shape (T,B,I,H,layers) | variant | mode | backend | lstmkit ms | cost vs plain lstmkit "
             "(<= 1.3) | speed-up vs torch loop (>= 4) | % of SGEMM peak | speed-up at 100% of peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_fmt_variant(r) for r in res["variants"]]
    lines += ["", "Streaming, B=1, 2 layers, input size = H, per step (`LSTM.step`):", "",
              "| H | lstmkit us | torch.nn.LSTM us | ratio (>= 10) | torch.nn.LSTMCell x2 us | ratio (>= 3) | "
              "lstmkit.LSTMCell x2 us | its ratio to torch's | weights read once us | "
              "ratio bound at that time (vs LSTM / cells) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_fmt_stream(r) for r in res["streaming"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit bench --suite variants", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-ms", type=float, default=100, help="length of one timing sample")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="one small shape, for a smoke run")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write the markdown table here")
    add_malloc_option(ap)
    a = ap.parse_args(argv)
    malloc_fixed = apply_malloc_option(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    res = {"machine": {**machine_info(threads), "freed_memory_kept": malloc_fixed}}
    res["sgemm_peak_gflops"] = sgemm_peak(3)["gflops"]
    print(f"# SGEMM peak (torch.mm): {res['sgemm_peak_gflops']:.1f} GFLOP/s")
    print("| shape | variant | mode | backend | lstmkit ms | cost vs plain | speed-up vs loop | % of peak | at peak |")
    res["variants"] = variant_rows(a.repeats, a.sample_ms / 1e3, a.quick, res["sgemm_peak_gflops"])
    print("| H | step us | torch.nn.LSTM us | ratio | LSTMCell x2 us | ratio | lstmkit cells us | ratio "
          "| weights read us | bound |")
    res["streaming"] = streaming_rows(a.repeats, a.sample_ms / 1e3, a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(res) + "\n")
    return 0
