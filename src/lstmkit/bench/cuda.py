"""``lstmkit bench --device cuda``: the Triton backend against cuDNN and the straightforward loop.

Two tables, both measured in one process, baseline and lstmkit interleaved, warm-up first, median of
repeats timed with CUDA events, reported as ratio = baseline time / lstmkit time (above 1.0 lstmkit
is faster):

* plain LSTM: ``torch.nn.LSTM`` (cuDNN) against ``lstmkit.LSTM(backend="triton")`` with the same
  weights, one layer, input size = hidden size, over T x B x H, inference (forward under
  ``torch.inference_mode``) and training (forward + backward of every output);
* variants (layer_norm, peephole, recurrent_dropout, zoneout, lengths): the reference backend
  (the straightforward per-step torch loop, differentiated by autograd) against the Triton
  backend, one layer-direction including the input-projection GEMM.

Targets (issue 6): >= 1.0x cuDNN for B <= 16 and H <= 256, >= 0.7x elsewhere; variants >= 10x.
JIT compile time (the first call) is reported separately from the steady state.

float32 runs both sides without TF32 by default (lstmkit's float32 GEMMs are IEEE), so the two
compute the same thing; ``--tf32-baseline`` lets cuDNN use TF32 as torch does by default.

Run ``python -m lstmkit.bench.cuda --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("layer_norm", "peephole", "recurrent_dropout", "zoneout", "lengths", "all")
_DEV = torch.device("cuda")


def _target(B: int, H: int) -> float:
    return 1.0 if B <= 16 and H <= 256 else 0.7


def _elapsed_ms(fn: Callable[[], None]) -> float:
    if not _DEV.type == "cuda":  # the CPU smoke run (TRITON_INTERPRET=1): wall time, meaningless
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_pair(baseline: Callable[[], None], ours: Callable[[], None], warmup: int, repeats: int) -> dict:
    """Median milliseconds of both, interleaved (alternating which goes first), after warm-up."""
    first_call_ms = _elapsed_ms(ours)           # includes Triton's JIT compile on a cold cache
    _elapsed_ms(baseline)
    for _ in range(warmup):
        baseline()
        ours()
    if _DEV.type == "cuda":
        torch.cuda.synchronize()
    tb, to = [], []
    for r in range(repeats):
        pair = ((baseline, tb), (ours, to)) if r % 2 == 0 else ((ours, to), (baseline, tb))
        for fn, acc in pair:
            acc.append(_elapsed_ms(fn))
    mb, mo = statistics.median(tb), statistics.median(to)
    return {"baseline_ms": mb, "lstmkit_ms": mo, "ratio": mb / mo, "lstmkit_first_call_ms": first_call_ms}


def _plain_case(T: int, B: int, H: int, dtype: torch.dtype, mode: str, warmup: int, repeats: int) -> dict:
    import lstmkit

    dev = _DEV
    torch.manual_seed(0)
    base = torch.nn.LSTM(H, H, device=dev, dtype=dtype)  # baseline
    ours = lstmkit.LSTM(H, H, device=dev, dtype=dtype, backend="triton")
    ours.load_state_dict(base.state_dict())
    x = torch.randn(T, B, H, device=dev, dtype=dtype)
    if mode == "inference":
        def run(model):
            def f():
                with torch.inference_mode():
                    model(x)
            return f
    else:
        xr = x.clone().requires_grad_()
        gout = torch.randn(T, B, H, device=dev, dtype=dtype)

        def run(model):
            def f():
                model.zero_grad(set_to_none=True)
                xr.grad = None
                out, _ = model(xr)
                out.backward(gout)
            return f
    res = time_pair(run(base), run(ours), warmup, repeats)
    res.update(table="plain", T=T, B=B, H=H, dtype=str(dtype).replace("torch.", ""), mode=mode,
               baseline="torch.nn.LSTM (cuDNN)", target=_target(B, H))
    res["meets_target"] = res["ratio"] >= res["target"]
    return res


def _variant_case(variant: str, T: int, B: int, H: int, dtype: torch.dtype, mode: str,
                  warmup: int, repeats: int) -> dict:
    from lstmkit.backends import reference, triton_gpu
    from lstmkit.backends._contract import LayerOptions

    dev = _DEV
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        t = (scale * torch.randn(*shape, generator=g)).to(dev, dtype)
        return t.requires_grad_(grad and mode == "training")

    k = H ** -0.5
    x = rnd(T, B, H)
    w_ih = rnd(4 * H, H, scale=k, grad=True)
    b = rnd(4 * H, scale=k, grad=True)
    w_hh = rnd(4 * H, H, scale=k, grad=True)
    h0, c0 = rnd(B, H), rnd(B, H)
    opts, bs = LayerOptions(), None
    every = variant == "all"
    if variant == "layer_norm" or every:
        opts.ln_hh = (1 + rnd(4 * H, scale=0.1)).detach().requires_grad_(mode == "training")
        opts.ln_cell_w = (1 + rnd(H, scale=0.1)).detach().requires_grad_(mode == "training")
        opts.ln_cell_b = rnd(H, scale=0.1, grad=True)
    if variant == "peephole" or every:
        opts.peephole = rnd(3, H, scale=0.1, grad=True)
    if variant == "recurrent_dropout" or every:
        opts.rec_mask = ((torch.rand(B, H, generator=g) < 0.75).to(dev, dtype) / 0.75)
    if variant == "zoneout" or every:
        opts.zoneout_c = (torch.rand(T, B, H, generator=g) < 0.1).to(dev, dtype)
        opts.zoneout_h = (torch.rand(T, B, H, generator=g) < 0.1).to(dev, dtype)
    if variant == "lengths" or every:
        lengths = torch.sort(torch.randint(1, T + 1, (B,), generator=g), descending=True).values
        lengths[0] = T
        bs = (lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    params = [w_ih, b, w_hh] + [p for p in (opts.peephole, opts.ln_hh, opts.ln_cell_w, opts.ln_cell_b)
                                if p is not None]
    gout = torch.randn(T, B, H, device=dev, dtype=dtype)

    def run(mod):
        def f():
            with torch.inference_mode(mode == "inference"):
                xg = torch.addmm(b, x.reshape(T * B, H), w_ih.t()).reshape(T, B, 4 * H)
                out, _, _ = mod.layer(xg, w_hh, None, h0, c0, bs, False, opts)
                if mode == "training":
                    torch.autograd.grad(out, params, gout)
        return f

    res = time_pair(run(reference), run(triton_gpu), warmup, repeats)  # reference = baseline
    res.update(table="variants", variant=variant, T=T, B=B, H=H, dtype=str(dtype).replace("torch.", ""),
               mode=mode, baseline="torch per-step loop (reference backend)", target=10.0)
    res["meets_target"] = res["ratio"] >= res["target"]
    return res


def machine_info() -> dict:
    import triton

    if _DEV.type != "cuda":
        return {"gpu": "none (CPU smoke run under TRITON_INTERPRET=1; times are meaningless)", "sm_count": 0,
                "torch": torch.__version__, "cuda": None, "cudnn": None, "triton": triton.__version__,
                "python": platform.python_version(), "cudnn_allow_tf32": None}
    p = torch.cuda.get_device_properties(_DEV)
    return {
        "gpu": torch.cuda.get_device_name(_DEV),
        "gpu_memory_gib": round(p.total_memory / 2**30, 1),
        "sm_count": p.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"GPU: {info['gpu']} ({info['sm_count']} SMs); torch {info['torch']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}, Triton {info['triton']}; cuDNN TF32: {info['cudnn_allow_tf32']}.", ""]
    plain = [r for r in rows if r["table"] == "plain"]
    if plain:
        lines += ["| dtype | mode | T | B | H | cuDNN ms | lstmkit ms | ratio | target | first call ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in plain:
            lines.append(f"| {r['dtype']} | {r['mode']} | {r['T']} | {r['B']} | {r['H']} | {r['baseline_ms']:.3f} "
                         f"| {r['lstmkit_ms']:.3f} | {r['ratio']:.2f}x | {r['target']}x"
                         f"{'' if r['meets_target'] else ' (missed)'} | {r['lstmkit_first_call_ms']:.0f} |")
        lines.append("")
    var = [r for r in rows if r["table"] == "variants"]
    if var:
        lines += ["| variant | dtype | mode | T | B | H | torch loop ms | lstmkit ms | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in var:
            lines.append(f"| {r['variant']} | {r['dtype']} | {r['mode']} | {r['T']} | {r['B']} | {r['H']} "
                         f"| {r['baseline_ms']:.3f} | {r['lstmkit_ms']:.3f} | {r['ratio']:.1f}x"
                         f"{'' if r['meets_target'] else ' (missed)'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit bench --device cuda", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda",
                    help="cuda or cuda:N; cpu only as a smoke run of this script under TRITON_INTERPRET=1")
    ap.add_argument("-T", "--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="variants to time (none: skip the variants table)")
    ap.add_argument("--variant-batch", type=int, default=64)
    ap.add_argument("--variant-hidden", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tf32-baseline", action="store_true", help="let cuDNN use TF32 (torch's default)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write the tables here")
    args = ap.parse_args(argv)

    global _DEV
    try:
        _DEV = torch.device(args.device)
    except RuntimeError:
        _DEV = torch.device("meta")
    if _DEV.type not in ("cuda", "cpu"):
        print(f"lstmkit bench --device cuda: --device must be cuda, cuda:N or cpu, got {args.device!r}",
              file=sys.stderr)
        return 2
    if _DEV.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("lstmkit bench --device cuda: --device cpu is a smoke run and needs TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("lstmkit bench --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("lstmkit bench --device cuda: triton is not installed (pip install lstmkit[gpu])", file=sys.stderr)
        return 2
    if _DEV.type == "cuda":
        torch.cuda.set_device(_DEV)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32_baseline)
    torch.backends.cuda.matmul.allow_tf32 = False
    info = machine_info()
    print(json.dumps(info))
    rows: list[dict] = []
    failed: list[dict] = []
    t_start = time.time()

    def record(fn, *a, **where):
        # one failing cell (an error in a kernel, out of memory) must not lose the others
        try:
            r = fn(*a)
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            r = dict(where, error=f"{type(exc).__name__}: {exc}")
            failed.append(r)
            if _DEV.type == "cuda":
                torch.cuda.empty_cache()
        else:
            rows.append(r)
        print(json.dumps(r), flush=True)
        save()   # after every cell: a run cut short keeps what it measured

    def save():
        md = _markdown(info, rows)
        if failed:
            md += "\nFailed cells:\n\n" + "\n".join(f"- {json.dumps(r)}" for r in failed) + "\n"
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "results": rows, "failed": failed}, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(md)
        return md

    for dname in args.dtype:
        dtype = DTYPES[dname]
        for H in args.hidden:
            for B in args.batch:
                for mode in args.modes:
                    record(_plain_case, args.seq_len, B, H, dtype, mode, args.warmup, args.repeats,
                           table="plain", B=B, H=H, dtype=dname, mode=mode)
        for variant in args.variants:
            for H in args.variant_hidden:
                for mode in args.modes:
                    record(_variant_case, variant, args.seq_len, args.variant_batch, H, dtype, mode,
                           args.warmup, args.repeats, table="variants", variant=variant, H=H, dtype=dname, mode=mode)
    print(save())
    print(f"total {time.time() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
