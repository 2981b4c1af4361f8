"""The Triton kernels compile for a real GPU (sm_90, the H100/H200) without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so it cannot
see a construct the compiler rejects or an LLVM crash (one such: an SLP-vectorizer abort on an
earlier tanh form). This test runs the real pipeline (AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin
with the ptxas Triton ships) for the kernel configurations the backend launches, in a subprocess
because an LLVM assertion aborts the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lstmkit.backends import triton_gpu as tg
    from lstmkit.backends._contract import LayerOptions
    from lstmkit.kernels import triton_lstm as K

    F32_PTRS = {"hs_ptr", "cs_ptr", "gates_ptr", "hh_ptr", "r_ptr", "lnh_st_ptr", "lnc_st_ptr", "gh_ptr",
                "gc_ptr", "ghh_ptr", "dxg_ptr", "dr_ptr", "dht_ptr", "dpar_ptr"}
    TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def compile_kernel(fn, dtype, consts, num_warps):
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ("bs_ptr", "sync_ptr"):
                sig[n] = "*i32"
            elif n.endswith("_ptr"):
                sig[n] = "*fp32" if n in F32_PTRS else "*" + TY[dtype]
            elif n in ("zc_p", "zh_p", "eps"):
                sig[n] = "fp32"
            else:
                sig[n] = "i32"
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "enable_fp_fusion": True})
        assert ck.asm["cubin"], "no cubin"

    def case(H, P, dtype, variants, proj, split=False):
        o = LayerOptions()
        T, B = 4, 3
        if split:
            o.peephole, o.rec_mask = torch.ones(3, H), torch.ones(B, P)
            o.zoneout_c, o.zoneout_h = 0.1, torch.ones(T, B, H)
            tg.SPLIT = "force"
            cfg = tg._Cfg(T, B, H, P, True, torch.tensor([3, 2, 2, 1]), o, torch.device("cpu"), dtype)
            assert cfg.split
            flags = tg._sync_flags(cfg, tg._f32_dot(dtype), o.peephole)
            nw = flags.pop("num_warps")
            flags.pop("enable_fp_fusion")
            for fn, c in ((K.lstm_fwd_split_kernel, dict(flags, STORE=True, SYNC=True)),
                          (K.lstm_bwd_split_kernel, dict(flags, SYNC=True, PHASE_A=True, PHASE_B=True))):
                compile_kernel(fn, dtype, c, nw)
                print("compiled", fn.__name__, H, TY[dtype], flush=True)
            return
        if variants:
            o.peephole, o.ln_hh, o.ln_cell_w, o.ln_cell_b = (torch.ones(3, H), torch.ones(4 * H),
                                                             torch.ones(H), torch.zeros(H))
            o.rec_mask, o.zoneout_c, o.zoneout_h = torch.ones(B, P), torch.ones(T, B, H), 0.1
        bs = torch.tensor([3, 2, 2, 1]) if variants else None
        cfg = tg._Cfg(T, B, H, P, variants, bs, o, torch.device("cpu"), dtype)
        w_hr = torch.ones(P, H) if proj else None
        flags = tg._flags(cfg, tg._f32_dot(dtype), o.peephole, o.ln_hh, o.ln_cell_w, w_hr)
        nw = flags.pop("num_warps")
        flags.pop("enable_fp_fusion")
        on_host = proj and not cfg.persistent
        fwd = dict(flags, H_IN_KERNEL=not on_host, STORE=True, STORE_HH=proj)
        bwd = dict(flags, H_PART=not on_host)
        mode = "per_step" if not cfg.persistent else ("stream" if cfg.w_stream else "registers")
        for fn, c in ((K.lstm_fwd_kernel, fwd), (K.lstm_bwd_kernel, bwd)):
            name = f"{fn.__name__} H={H} P={P} {TY[dtype]} {mode} variants={variants} proj={proj}"
            compile_kernel(fn, dtype, c, nw)
            print("compiled", name, flush=True)

    which = sys.argv[1]
    if which == "registers":
        case(64, 64, torch.float32, False, False)
        case(128, 64, torch.bfloat16, True, True)
    elif which == "stream":
        case(256, 256, torch.float32, True, False)
    elif which == "split":
        case(256, 256, torch.float32, True, False, split=True)
        case(1024, 1024, torch.bfloat16, True, False, split=True)
    else:
        case(1024, 512, torch.float16, True, True)
    print("ok")
    """
)


def _nvidia_toolchain() -> bool:
    try:
        from triton import knobs
        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_toolchain(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("shape", ["registers", "stream", "per_step", "split"])
def test_kernels_compile_for_sm90(shape):
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, shape], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
