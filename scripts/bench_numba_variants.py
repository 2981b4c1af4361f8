"""Layer-level timings of the Numba variants (``backends/_numba_variants.py``), one layer-direction.

For each variant and mode: cost against the plain Numba layer (variant time / plain time, target
<= 1.3) and speed-up against the reference backend's per-step torch loop (loop time / variant
time, target >= 4), side by side in one process (``lstmkit.bench._cpu.time_pair``: interleaved,
warm-up first, median of repeats). The official figures, through ``lstmkit.LSTM``, come from
``python -m lstmkit.bench --suite variants``.

    python scripts/bench_numba_variants.py [--threads 2] [--repeats 7] [--sample-s 0.05]
"""

from __future__ import annotations

import argparse

import torch

from lstmkit.backends import LayerOptions
from lstmkit.backends import _numba_variants as nv
from lstmkit.backends import numba_cpu as plain
from lstmkit.backends import reference as ref
from lstmkit.bench._cpu import time_pair

SHAPES = [(100, 16, 128), (50, 64, 256)]  # (T, B, H) of the bench suite's (T, B, I, H, layers) shapes
VARIANTS = ["peephole", "layer_norm", "rec_mask", "zoneout", "all"]


def _case(T, B, H, variant, training, g):
    G = 4 * H
    xg = torch.randn(T, B, G, generator=g).requires_grad_(training)
    w_hh = (torch.randn(G, H, generator=g) / H ** 0.5).requires_grad_(training)
    h0 = torch.zeros(B, H).requires_grad_(training)
    c0 = torch.zeros(B, H).requires_grad_(training)
    o = LayerOptions()
    if variant in ("peephole", "all"):
        o.peephole = (0.1 * torch.randn(3, H, generator=g)).requires_grad_(training)
    if variant in ("layer_norm", "all"):
        o.ln_hh = torch.ones(G).requires_grad_(training)
        o.ln_cell_w = torch.ones(H).requires_grad_(training)
        o.ln_cell_b = torch.zeros(H).requires_grad_(training)
    if variant in ("rec_mask", "all") and training:
        o.rec_mask = torch.bernoulli(torch.full((B, H), 0.75), generator=g) / 0.75
    if variant in ("zoneout", "all"):
        if training:
            o.zoneout_c = torch.bernoulli(torch.full((T, B, H), 0.1), generator=g)
            o.zoneout_h = torch.bernoulli(torch.full((T, B, H), 0.1), generator=g)
        else:
            o.zoneout_c = o.zoneout_h = 0.1
    return (xg, w_hh, None, h0, c0), o


def _fn(layer, core, opts, training):
    params = [t for t in (*core, opts.peephole, opts.ln_hh, opts.ln_cell_w, opts.ln_cell_b)
              if t is not None and t.requires_grad]

    if not training:
        def infer():
            with torch.no_grad():
                layer(*core, None, False, opts)
        return infer

    def train():
        out, h, c = layer(*core, None, False, opts)
        torch.autograd.grad([out, h, c], params, [torch.ones_like(out), torch.ones_like(h), torch.ones_like(c)])
    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-s", type=float, default=0.05)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| (T,B,H) | variant | mode | variant ms | plain ms | cost vs plain | loop ms | speed-up vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for T, B, H in SHAPES:
        for variant in a.variants.split(","):
            for mode in ("inference", "training"):
                training = mode == "training"
                g = torch.Generator().manual_seed(0)
                core, opts = _case(T, B, H, variant, training, g)
                f_var = _fn(nv.layer, core, opts, training)
                f_plain = _fn(plain.layer, core, LayerOptions(), training)
                f_loop = _fn(ref.layer, core, opts, training)
                cost = time_pair(f_plain, f_var, a.repeats, a.sample_s)
                speed = time_pair(f_loop, f_var, a.repeats, a.sample_s)
                print(f"| ({T},{B},{H}) | {variant} | {mode} | {1e3 * cost['lstmkit_s']:.2f} | "
                      f"{1e3 * cost['torch_s']:.2f} | {1 / cost['ratio']:.2f}x | {1e3 * speed['torch_s']:.2f} | "
                      f"{speed['ratio']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
