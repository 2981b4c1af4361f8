"""``lstmkit bench --suite first-use``: what a new user waits for, and the step API on a busy machine.

first calls  In a fresh process with an empty kernel cache (``NUMBA_CACHE_DIR`` a new temporary
             directory), ``backend="auto"``, as a new install meets it: the time of ``import
             lstmkit`` beyond ``import torch``, of the first forward and of the first forward +
             backward, for the tutorial's model (LSTM(3, 5, 2) on (10, 4, 3)) and LSTM(32, 128, 2) at
             T=50 B=16; the backend that answered and the largest deviation of outputs and
             gradients from ``torch.nn.LSTM`` with the same weights. Then the same in a second
             process once the background compile has finished (the cache warm).
step latency ``LSTM.step`` at H=128, B=1, 2 layers (each call timed apart: p50 and p99) against
             ``torch.nn.LSTM`` called one step at a time, side by side in one process; on an idle
             machine, then with a competing busy process (a Python loop) running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

__all__ = ["first_calls", "step_latency", "main"]

_FIRST_CALLS = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import lstmkit
t2 = time.perf_counter()
I, H, L, T, B = {shape!r}
torch.manual_seed(0)
m = lstmkit.LSTM(I, H, L)
ref = torch.nn.LSTM(I, H, L)
ref.load_state_dict(m.state_dict())
x = torch.randn(T, B, I)
t3 = time.perf_counter()
y, (h, c) = m(x)
t4 = time.perf_counter()
(y.sum() + h.sum() + c.sum()).backward()
t5 = time.perf_counter()
yr, (hr, cr) = ref(x)
(yr.sum() + hr.sum() + cr.sum()).backward()
dev = max((y - yr).abs().max().item(), (h - hr).abs().max().item(), (c - cr).abs().max().item())
gdev = max((p.grad - q.grad).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
from lstmkit import _warmup
print(json.dumps(dict(import_torch_s=t1 - t0, import_lstmkit_s=t2 - t1, construct_s=t3 - t2, first_forward_s=t4 - t3,
                      first_forward_backward_s=t5 - t3, backend=m.resolved_backend(), max_dev=dev, max_grad_dev=gdev,
                      background_pids=[p.pid for p in _warmup._procs.values()])))
"""

SHAPES = {"tutorial LSTM(3, 5, 2) T=10 B=4": (3, 5, 2, 10, 4), "LSTM(32, 128, 2) T=50 B=16": (32, 128, 2, 50, 16)}


def _probe(code: str, env: dict, timeout: float = 900) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"rc {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def first_calls(wait_s: float = 1800) -> dict:
    """First calls in fresh processes with an empty kernel cache; then, once the background compile
    that the first started has written its marker (at most ``wait_s`` later), again with the cache
    it filled. Background processes still running at the end are stopped."""
    res: dict = {}
    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="lstmkit-cold-") as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        env.pop("LSTMKIT_BACKGROUND_COMPILE", None)
        env.pop("LSTMKIT_CACHE_DIR", None)
        try:
            for name, shape in SHAPES.items():
                r = res.setdefault(name, {})["cold"] = _probe(_FIRST_CALLS.format(shape=shape), env)
                pids += r.get("background_pids", [])
            t0 = time.perf_counter()

            def marked() -> bool:
                return any(f.startswith("lstmkit-warm-plain-float32-") and f.endswith(".json") for f in os.listdir(d))

            while not marked() and time.perf_counter() - t0 < wait_s and any(map(_alive, pids)):
                time.sleep(0.5)
            res["background_compile_s_after_the_cold_calls"] = time.perf_counter() - t0
            res["cache_warm"] = marked()
            if res["cache_warm"]:
                for name, shape in SHAPES.items():
                    res[name]["warm"] = _probe(_FIRST_CALLS.format(shape=shape), env)
        finally:
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGTERM)
            for pid in pids:
                for _ in range(100):
                    if not _alive(pid):
                        break
                    time.sleep(0.05)
    return res


def _percentiles(ts: list[float]) -> dict:
    ts = sorted(ts)
    n = len(ts)
    return {"p50_us": 1e6 * ts[n // 2], "p99_us": 1e6 * ts[min(n - 1, (99 * n) // 100)],
            "steps_per_s": n / sum(ts)}


def _step_times(fn, steps: int) -> list[float]:
    pc = time.perf_counter
    out = []
    for _ in range(steps):
        t = pc()
        fn()
        out.append(pc() - t)
    return out


def step_latency(steps: int = 20000, H: int = 128, layers: int = 2, threads: Optional[int] = None) -> dict:
    """p50 / p99 of one ``LSTM.step`` (B=1) and of one-step ``torch.nn.LSTM`` calls, idle and with a
    competing busy process, interleaved in blocks of 1000 calls."""
    import torch

    import lstmkit

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H, layers)
    ours = lstmkit.LSTM(H, H, layers, backend="numba")
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(64, 1, H)
    st = {"ours": None, "ref": None, "i": 0}

    def ours_step():
        st["i"] = (st["i"] + 1) & 63
        _, st["ours"] = ours.step(xs[st["i"]], st["ours"])

    def ref_step():
        st["i"] = (st["i"] + 1) & 63
        _, st["ref"] = ref(xs[st["i"]][None], st["ref"])

    res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "H": H, "layers": layers, "B": 1}
    with torch.no_grad():
        for _ in range(2000):  # warm-up (kernels loaded, caches filled)
            ours_step()
            ref_step()
        for load in ("idle", "busy"):
            busy = None
            if load == "busy":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                t_ours: list[float] = []
                t_ref: list[float] = []
                for _ in range(max(1, steps // 1000)):
                    t_ours += _step_times(ours_step, 1000)
                    t_ref += _step_times(ref_step, 1000)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            res[load] = {"lstmkit": _percentiles(t_ours), "torch": _percentiles(t_ref)}
            r = res[load]
            r["p99_ratio_torch_over_lstmkit"] = r["torch"]["p99_us"] / r["lstmkit"]["p99_us"]
    res["busy_over_idle_p99"] = res["busy"]["lstmkit"]["p99_us"] / res["idle"]["lstmkit"]["p99_us"]
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit bench --suite first-use", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["first-calls", "step-latency", "all"], default="all")
    ap.add_argument("--steps", type=int, default=20000, help="timed step calls per framework and load")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the step latency (default: torch's)")
    ap.add_argument("--wait-s", type=float, default=1800,
                    help="longest wait for the background compile before the warm-cache calls")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    res: dict = {}
    if args.part in ("first-calls", "all"):
        res["first_calls"] = first_calls(args.wait_s)
        print(json.dumps(res["first_calls"], indent=1), flush=True)
    if args.part in ("step-latency", "all"):
        res["step_latency"] = step_latency(args.steps, threads=args.threads)
        print(json.dumps(res["step_latency"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
