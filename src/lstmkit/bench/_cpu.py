"""The CPU benchmark suite: ``lstmkit.LSTM(backend="numba")`` against ``torch.nn.LSTM``.

Both models hold the same weights (copied from the torch model) and run the same inputs in one
process, interleaved (alternating which goes first), warm-up first; each figure is the median over
``--repeats`` samples, a sample being enough back-to-back calls to take ``--sample-ms``. The ratio
is torch time / lstmkit time: above 1.0 lstmkit is faster.

Modes
    inference  forward under ``torch.no_grad()``
    training   forward + backward of the output and final state (parameters require grad)
    streaming  B=1, 2 layers, one step (T=1) per call, the state carried through the plain module
               call ``y, (h, c) = lstm(x_t, (h, c))`` under ``torch.no_grad()``

Shapes: the issue's grid (``GRID``), or with ``--grid small-h`` small hidden sizes with large batches
(``SMALL_H_GRID``, the shapes of time-series classification; no probes).

Also measured in the same run: the machine's SGEMM peak (``torch.mm``), GFLOP/s of lstmkit on every
shape and its fraction of that peak, the first-call (JIT) time apart from the steady state, a cold
Numba compile in a fresh process with an empty cache, and the peak training memory of the largest
shape for each framework, each in its own fresh subprocess: the peak resident set size during one
forward + backward step (``VmHWM``, reset just before the step through ``/proc/self/clear_refs``)
minus the resident set size before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..memory import keep_freed_memory


@dataclass(frozen=True)
class Case:
    T: int
    B: int
    I: int
    H: int
    layers: int
    bidirectional: bool = False
    proj_size: int = 0
    note: str = ""

    @property
    def name(self) -> str:
        s = f"T={self.T} B={self.B} I={self.I} H={self.H} L={self.layers}"
        if self.bidirectional:
            s += " bidir"
        if self.proj_size:
            s += f" proj={self.proj_size}"
        return s

    def flops(self, training: bool) -> float:
        """Multiply-adds x 2 of the GEMMs (input projections, recurrent and projection products)."""
        D = 2 if self.bidirectional else 1
        P = self.proj_size or self.H
        total = 0.0
        for layer in range(self.layers):
            i = self.I if layer == 0 else D * P
            per = 2 * self.T * self.B * 4 * self.H * (i + P)
            if self.proj_size:
                per += 2 * self.T * self.B * self.H * P
            total += D * per
        return 3 * total if training else total


GRID = [
    Case(10, 5, 3, 5, 2, note="tutorial"),
    Case(100, 1, 32, 64, 1),
    Case(100, 16, 32, 128, 2),
    Case(50, 64, 128, 256, 1, note="large"),
    Case(200, 64, 512, 512, 1, note="large"),
    Case(1000, 1, 16, 128, 1),
    Case(100, 32, 64, 128, 2, bidirectional=True),
    Case(100, 32, 64, 256, 1, proj_size=128),
]
# ``--grid small-h``: small hidden sizes with large batches (time-series classification), outside the
# issue's grid; BENCHMARKS.md keeps their figures
SMALL_H_GRID = [
    Case(100, 64, 16, 32, 1),
    Case(50, 256, 4, 16, 1),
    Case(100, 64, 16, 64, 1),
    Case(100, 128, 8, 32, 2),
    Case(200, 32, 8, 32, 1),
    Case(100, 64, 32, 64, 2),
]
STREAM_H = (32, 128, 512)
LARGEST = GRID[4]


def _models(case: Case, dtype: torch.dtype, seed: int = 0):
    import lstmkit

    torch.manual_seed(seed)
    base = torch.nn.LSTM(case.I, case.H, case.layers, bidirectional=case.bidirectional,  # baseline
                         proj_size=case.proj_size, dtype=dtype)
    ours = lstmkit.LSTM(case.I, case.H, case.layers, bidirectional=case.bidirectional,
                        proj_size=case.proj_size, dtype=dtype, backend="numba")
    ours.load_state_dict(base.state_dict())
    return base, ours


def _inputs(case: Case, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if case.bidirectional else 1
    P = case.proj_size or case.H
    x = torch.randn(case.T, case.B, case.I, dtype=dtype, generator=g)
    h0 = torch.randn(case.layers * D, case.B, P, dtype=dtype, generator=g)
    c0 = torch.randn(case.layers * D, case.B, case.H, dtype=dtype, generator=g)
    return x, h0, c0


def _inference_fn(model, x, h0, c0) -> Callable[[], None]:
    def f():
        with torch.no_grad():
            model(x, (h0, c0))
    return f


def _training_fn(model, x, h0, c0) -> Callable[[], None]:
    params = list(model.parameters())
    g = torch.Generator().manual_seed(2)

    def f():
        for p in params:
            p.grad = None
        out, (h, c) = model(x, (h0, c0))
        if not hasattr(f, "grads"):
            f.grads = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in (out, h, c)]
        torch.autograd.backward([out, h, c], f.grads)
    return f


class _Nothing(torch.autograd.Function):
    """An LSTM node that computes nothing: outputs of the right shapes, uninitialized, and
    uninitialized gradients for the inputs that need them (see :func:`autograd_floor`)."""

    @staticmethod
    def forward(ctx, out_shape, x, h0, c0, *weights):
        ctx.save_for_backward(x, h0, c0, *weights)
        return x.new_empty(out_shape), torch.empty_like(h0), torch.empty_like(c0)

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c):
        need = ctx.needs_input_grad[1:]
        return (None, *(torch.empty_like(t) if n else None for t, n in zip(ctx.saved_tensors, need)))


# the C-level apply, as lstmkit's fused node uses it (no Python wrapper)
_nothing_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Nothing)


class _NothingLSTM(torch.nn.Module):
    """The autograd cost of one LSTM node without its work: ``model``'s parameters (shared) into
    :class:`_Nothing`, called like ``torch.nn.LSTM``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.weights = torch.nn.ParameterList(model.parameters())
        self.out_size = (2 if model.bidirectional else 1) * (model.proj_size or model.hidden_size)

    def forward(self, x, hx):
        out, h, c = _nothing_apply((x.shape[0], x.shape[1], self.out_size), x, hx[0], hx[1], *self.weights)
        return out, (h, c)


def autograd_floor(case: Case, dtype: torch.dtype, repeats: int, sample_s: float) -> dict:
    """The training step of ``case`` through one autograd node that computes nothing, against
    torch.nn.LSTM's, side by side: what any implementation as one autograd.Function (lstmkit's
    fused node) pays for the node, the engine and the parameters' gradient accumulation. torch time
    / this time bounds the training ratio such an implementation can reach on the shape."""
    base, ours = _models(case, dtype)
    x, h0, c0 = _inputs(case, dtype)
    r = time_pair(_training_fn(base, x, h0, c0), _training_fn(_NothingLSTM(ours), x, h0, c0), repeats, sample_s)
    return {"case": case.name, "torch_s": r["torch_s"], "floor_s": r["lstmkit_s"], "max_ratio": r["ratio"]}


def _streaming_fn(model, xs, h0, c0) -> Callable[[], None]:
    def f():
        h, c = h0, c0
        with torch.no_grad():
            for x_t in xs:
                _, (h, c) = model(x_t, (h, c))
    return f


def _sample(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_pair(base: Callable[[], None], ours: Callable[[], None], repeats: int, sample_s: float,
              warmup: int = 2) -> dict:
    """Seconds per call (median of samples) of both, interleaved, after warm-up; first calls apart."""
    t0 = time.perf_counter()
    ours()
    first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base()
    first_base = time.perf_counter() - t0
    per = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        base()
        ours()
        per.append(time.perf_counter() - t0)
    # calls per sample so that one sample of the slower side takes about sample_s
    n = max(1, int(sample_s / max(min(per), 1e-7) * 2))
    tb, to = [], []
    for r in range(repeats):
        order = ((base, tb), (ours, to)) if r % 2 == 0 else ((ours, to), (base, tb))
        for fn, acc in order:
            acc.append(_sample(fn, n))
    mb, mo = statistics.median(tb), statistics.median(to)
    return {"torch_s": mb, "lstmkit_s": mo, "ratio": mb / mo, "calls_per_sample": n,
            "lstmkit_first_call_s": first_ours, "torch_first_call_s": first_base}


def sgemm_peak(repeats: int) -> dict:
    """Best GFLOP/s of torch.mm (float32) over a few shapes, including the largest LSTM's GEMMs."""
    best = {"gflops": 0.0}
    for m, k, n in ((2048, 2048, 2048), (12800, 512, 2048), (64, 512, 2048)):
        a = torch.randn(m, k)
        b = torch.randn(k, n)
        c = torch.empty(m, n)
        torch.mm(a, b, out=c)
        reps = max(3, int(2e9 / (2 * m * k * n)))
        times = []
        for _ in range(max(3, repeats)):
            times.append(_sample(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), reps))
        g = 2 * m * k * n / min(times) / 1e9
        if g > best["gflops"]:
            best = {"gflops": g, "shape": [m, k, n]}
    return best


def machine_info(threads: int) -> dict:
    import numba
    import numpy

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# --- subprocess probes ------------------------------------------------------------------------

_MEM_PROBE = r"""
import json, resource, sys, torch
sys.path[:0] = {path!r}
from lstmkit.bench._cpu import Case, _models, _inputs
torch.set_num_threads({threads})
case = Case(**{case!r})
which = {which!r}
# load libraries and JIT code on a short sequence of the same shape first (the same code paths),
# so the step below only allocates its tensors
small = Case(2, case.B, case.I, case.H, case.layers, case.bidirectional, case.proj_size)
base, ours = _models(small, torch.float32)
m = base if which == "torch" else ours
x, h0, c0 = _inputs(small, torch.float32)
out, (h, c) = m(x, (h0, c0)); (out.sum() + h.sum() + c.sum()).backward()
base, ours = _models(case, torch.float32)
m = base if which == "torch" else ours
x, h0, c0 = _inputs(case, torch.float32)
del base, ours
def status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
# forget the peak so far (imports, JIT, the warm-up step): the kernel then tracks it from here
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    how = "VmHWM after resetting it (clear_refs 5)"
except OSError:
    how = "ru_maxrss (lifetime peak, warm-up included)"
before = status_kib("VmRSS")
out, (h, c) = m(x, (h0, c0))
(out.sum() + h.sum() + c.sum()).backward()
peak = status_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_increase_mib": (peak - before) / 1024, "before_mib": before / 1024, "how": how}}))
"""

_COMPILE_PROBE = r"""
import json, sys, time, torch, warnings
sys.path[:0] = {path!r}
warnings.simplefilter("ignore")
torch.set_num_threads({threads})
import lstmkit
from lstmkit.bench._cpu import Case, _models, _inputs
res = {{}}
for dtype in (torch.float32, torch.float64):
    case = Case(5, 3, 4, 6, 2, True, 0)
    base, ours = _models(case, dtype)
    x, h0, c0 = _inputs(case, dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        ours(x, (h0, c0))
    t1 = time.perf_counter()
    out, (h, c) = ours(x, (h0, c0))
    (out.sum() + h.sum() + c.sum()).backward()
    t2 = time.perf_counter()
    res[str(dtype).replace("torch.", "")] = {{"inference_first_call_s": t1 - t0, "training_first_call_s": t2 - t1}}
print(json.dumps(res))
"""


def _run_probe(code: str, env: Optional[dict] = None, timeout: int = 900) -> Optional[dict]:
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory_probe(case: Case, threads: int) -> dict:
    res = {}
    for which in ("torch", "lstmkit"):
        code = _MEM_PROBE.format(path=sys.path, threads=threads, case=asdict(case), which=which)
        res[which] = _run_probe(code)
    return res


def compile_probe(threads: int) -> dict:
    """First calls in fresh processes: with an empty Numba cache (cold compile) and a warm one."""
    res = {}
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        code = _COMPILE_PROBE.format(path=sys.path, threads=threads)
        res["cold_cache"] = _run_probe(code, env)
        res["warm_cache"] = _run_probe(code, env)
    return res


# --- the suite --------------------------------------------------------------------------------

def run_suite(modes: list[str], repeats: int, sample_s: float, quick: bool, threads: int,
              log: Callable[[str], None], grid: str = "issue") -> dict:
    dtype = torch.float32
    info = machine_info(threads)
    log(f"# {info['cpu']}, {info['cores']} cores, {threads} threads; torch {info['torch']}, "
        f"numba {info['numba']}")
    peak = sgemm_peak(repeats)
    log(f"# SGEMM peak (torch.mm): {peak['gflops']:.1f} GFLOP/s at {peak['shape']}")
    rows = []
    for mode in modes:
        if mode == "streaming":
            for H in STREAM_H:
                case = Case(1, 1, H, H, 2, note="streaming")
                base, ours = _models(case, dtype)
                _, h0, c0 = _inputs(case, dtype)
                steps = 20
                xs = [t.unsqueeze(0) for t in torch.randn(steps, 1, H, dtype=dtype)]
                r = time_pair(_streaming_fn(base, xs, h0, c0), _streaming_fn(ours, xs, h0, c0),
                              repeats, sample_s)
                for k in ("torch_s", "lstmkit_s"):
                    r[k] /= steps  # per one-step call
                row = {"mode": mode, "case": f"T=1 B=1 I={H} H={H} L=2 (one step per call)",
                       "shape": asdict(case), **r}
                rows.append(row)
                log(_fmt(row))
            continue
        for case in SMALL_H_GRID if grid == "small-h" else GRID:
            if quick and mode == "training" and case is LARGEST:
                continue
            base, ours = _models(case, dtype)
            x, h0, c0 = _inputs(case, dtype)
            make = _inference_fn if mode == "inference" else _training_fn
            r = time_pair(make(base, x, h0, c0), make(ours, x, h0, c0), repeats, sample_s)
            gf = case.flops(mode == "training") / r["lstmkit_s"] / 1e9
            row = {"mode": mode, "case": case.name, "shape": asdict(case), **r,
                   "lstmkit_gflops": gf, "torch_gflops": case.flops(mode == "training") / r["torch_s"] / 1e9,
                   "fraction_of_peak": gf / peak["gflops"]}
            rows.append(row)
            log(_fmt(row))
    floor = None
    if "training" in modes and grid == "issue":
        floor = autograd_floor(GRID[0], dtype, repeats, sample_s)
        log(f"# autograd floor, training {floor['case']}: torch {1e3 * floor['torch_s']:.3f} ms, one node that "
            f"computes nothing {1e3 * floor['floor_s']:.3f} ms (ratio bound {floor['max_ratio']:.2f})")
    summary = {}
    for mode in modes:
        ratios = [r["ratio"] for r in rows if r["mode"] == mode]
        if ratios:
            summary[mode] = {"geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                             "min": min(ratios), "n": len(ratios)}
    res = {"machine": info, "sgemm_peak": peak, "rows": rows, "summary": summary}
    if floor is not None:
        res["autograd_floor"] = floor
    return res


def _fmt(row: dict) -> str:
    s = (f"{row['mode']:<10} {row['case']:<42} torch {1e3 * row['torch_s']:9.3f} ms  "
         f"lstmkit {1e3 * row['lstmkit_s']:9.3f} ms  ratio {row['ratio']:6.2f}")
    if "lstmkit_gflops" in row:
        s += f"  {row['lstmkit_gflops']:6.1f} GFLOP/s ({100 * row['fraction_of_peak']:.0f}% of peak)"
    return s


def add_malloc_option(ap: argparse.ArgumentParser) -> None:
    """The suites' ``--default-malloc`` flag (see :func:`apply_malloc_option`)."""
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's thresholds as they are (see lstmkit.memory; default: keep freed memory)")


def apply_malloc_option(args: argparse.Namespace) -> bool:
    """Keep freed memory in this process for both frameworks unless ``--default-malloc``; whether it
    was applied (recorded with the machine)."""
    return False if args.default_malloc else keep_freed_memory()


def _malloc_note(machine: dict) -> str:
    kept = machine.get("freed_memory_kept")
    if kept is None:
        return ""
    return ("Freed memory kept in the process (`lstmkit.memory.keep_freed_memory`), for both frameworks."
            if kept else "glibc's default malloc thresholds (`--default-malloc`).")


def machine_line(m: dict, peak_gflops: float) -> str:
    """The markdown tables' first line: the machine, versions, load, SGEMM peak and allocator."""
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}, "
            f"numba {m['numba']}, numpy {m['numpy']}, Python {m['python']}; 1-min load average at start "
            f"{m['load_avg_1min']}. SGEMM peak measured in the same run (torch.mm): "
            f"{peak_gflops:.1f} GFLOP/s. {_malloc_note(m)}")


def markdown(res: dict) -> str:
    lines = [
        machine_line(res["machine"], res["sgemm_peak"]["gflops"]),
        "",
        "| mode | shape | torch ms | lstmkit ms | ratio | lstmkit GFLOP/s | % of SGEMM peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        gf = f"{r['lstmkit_gflops']:.1f}" if "lstmkit_gflops" in r else ""
        fr = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else ""
        lines.append(f"| {r['mode']} | {r['case']} | {1e3 * r['torch_s']:.3f} | {1e3 * r['lstmkit_s']:.3f} "
                     f"| {r['ratio']:.2f} | {gf} | {fr} |")
    lines.append("")
    for mode, s in res["summary"].items():
        lines.append(f"- {mode}: geomean ratio {s['geomean']:.2f}, min {s['min']:.2f} ({s['n']} shapes)")
    if "autograd_floor" in res:
        f = res["autograd_floor"]
        lines.append(f"- autograd floor, training {f['case']}: one autograd node that computes nothing (same inputs, "
                     f"outputs and parameter gradients) {1e3 * f['floor_s']:.3f} ms a step against torch's "
                     f"{1e3 * f['torch_s']:.3f} ms, side by side: no single-node implementation exceeds "
                     f"{f['max_ratio']:.2f}x there")
    if "compile" in res:
        c = res["compile"]
        lines.append(f"- first call in a fresh process (JIT), cold Numba cache: {json.dumps(c.get('cold_cache'))}; "
                     f"warm cache: {json.dumps(c.get('warm_cache'))}")
    if "memory" in res:
        mem = res["memory"]
        lines.append(f"- peak training memory, {LARGEST.name} (RSS growth over one step, fresh subprocess "
                     f"each): torch {json.dumps(mem.get('torch'))}, lstmkit {json.dumps(mem.get('lstmkit'))}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="all", choices=["inference", "training", "streaming", "all"])
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats, shorter samples, no training run of the largest shape, no probes")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write the table here")
    ap.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 7, quick 3)")
    ap.add_argument("--sample-ms", type=float, default=None, help="length of one sample (default 200, quick 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and BLAS) threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (this suite) or cuda (lstmkit.bench.cuda)")
    ap.add_argument("--no-probes", action="store_true", help="skip the compile and memory subprocesses")
    ap.add_argument("--grid", default="issue", choices=["issue", "small-h"],
                    help="the shapes: the issue's grid (default), or small hidden sizes with large batches "
                         "(small-h; no probes)")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    malloc_fixed = apply_malloc_option(args)
    if args.device != "cpu":
        ap.error(f"--device {args.device}: this suite is for the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats = args.repeats or (3 if args.quick else 7)
    sample_s = (args.sample_ms or (50 if args.quick else 200)) / 1e3
    modes = ["inference", "training", "streaming"] if args.mode == "all" else [args.mode]

    import warnings

    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

    def log(s: str) -> None:
        print(s, flush=True)

    res: dict = {}
    probes = not (args.quick or args.no_probes or args.grid != "issue")
    if probes:
        log("# compile probe (fresh processes, empty then warm Numba cache) ...")
        res_compile = compile_probe(threads)
        log(f"# first calls: {json.dumps(res_compile)}")
    res = run_suite(modes, repeats, sample_s, args.quick, threads, log, args.grid)
    res["machine"]["freed_memory_kept"] = malloc_fixed
    res["grid"] = args.grid
    if probes:
        res["compile"] = res_compile
        if "training" in modes:
            log(f"# memory probe, training {LARGEST.name} ...")
            res["memory"] = memory_probe(LARGEST, threads)
            log(f"# memory: {json.dumps(res['memory'])}")
    for mode, s in res["summary"].items():
        log(f"# {mode}: geomean {s['geomean']:.2f}, min {s['min']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(res) + "\n")
    return 0
