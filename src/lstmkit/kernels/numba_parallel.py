"""Layers and directions of a stacked LSTM run at once on several threads.

A single layer-direction's recurrence is sequential, but the units of work around it are not:

* the two directions of a bidirectional layer are independent: two threads run them side by
  side, each its own input projection and recurrence (:func:`direction_fwd`,
  :func:`direction_bwd`);
* layer l + 1 of a unidirectional stack can run step t as soon as layer l has produced its
  output for step t: the layers form a pipeline over time (a wavefront). The sequence is cut
  in chunks and every thread runs :func:`stack_fwd_tasks`, claiming (layer, chunk) tasks as
  they become ready;
* a single layer's step splits by hidden units: each thread multiplies the whole h_{t-1} with
  the weight rows of its units and finishes their gates, then the threads meet before the next
  step (:func:`layer_fwd_units`; h double-buffered so that no thread overwrites what another
  still reads);
* the batch rows of a layer are independent at every step: each thread runs its rows' input
  projections and recurrence without ever meeting the others (:func:`layer_rows_fwd`), and in
  training their backward (:func:`layer_rows_bwd`), the weight products then split by steps
  (:func:`layer_rows_grads`).

The threads (torch's OpenMP team, or Python threads; ``backends.numba_cpu._run_threads``) call
these kernels, which release the GIL; their MKL calls run on the calling thread alone. Shared
progress counters are int64 arrays accessed with atomic loads (acquire), stores (release) and
compare-and-swap; a thread with nothing ready spins, then yields its core (``sched_yield``), and
returns when the driver sets the abort flag (another thread failed).

Dimension legend: T steps, B rows, I input features of a layer, H hidden size, G = 4H,
P = proj_size or H, Q = D * P (a layer's output width).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import tie_module
from .numba_blas import call_int_void, unowned, wide_vectors
from .numba_lstm import _JIT, act_sigmoid, act_tanh, layer_bwd, layer_fwd, mm
from .numba_stack import grads_hh, grads_ih, mm_tn, weight_grads
from .numba_variants import _mean_rstd, ln_bwd_row
from .numba_variants import layer_bwd as variant_layer_bwd
from .numba_variants import layer_fwd as variant_layer_fwd


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] of an int64 array, read with acquire ordering (never hoisted out of a loop)."""
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """arr[idx] = val for an int64 array, with release ordering: writes before it are visible
    to a thread that reads the value with :func:`atomic_load`."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """arr[idx] = new if arr[idx] == expected (int64, atomically); True when it was swapped."""
    sig = types.boolean(arr, idx, expected, new)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        res = builder.cmpxchg(ptr, args[2], args[3], "acq_rel", "acquire")
        return builder.extract_value(res, 1)

    return sig, codegen


# spins of a thread with nothing to do before it yields its core at each further spin: a few
# microseconds; spinning longer takes the core from threads that have work (measured: a layer
# pipeline right after a torch op, whose OpenMP threads spin on, lost 20% with 20000 spins)
SPINS_BEFORE_YIELD = 200


@njit(inline="always", **_JIT)
def backoff(sched_yield, spins):
    """One more idle spin (returned): past SPINS_BEFORE_YIELD each spin yields the core."""
    spins += 1
    if spins > SPINS_BEFORE_YIELD:
        call_int_void(sched_yield)
    return spins


@njit(**_JIT)
def claim_task(sched, num_layers, nchunks):
    """Claim a ready (layer, chunk) task of a pipeline (see :func:`stack_fwd_tasks`): the highest
    ready layer first, which drains the pipeline; (-1, 0) when none is ready."""
    L = num_layers
    for cand in range(L - 1, -1, -1):
        k = atomic_load(sched, cand)
        if k >= nchunks or atomic_load(sched, L + cand) != k:
            continue  # layer finished, or its previous chunk still running
        if cand > 0 and atomic_load(sched, L + cand - 1) <= k:
            continue  # its input not there yet
        if atomic_cas(sched, cand, k, k + 1):
            return cand, k
    return -1, 0


@njit(**_JIT)
def wait_task(sched_yield, sched, abort, num_layers, nchunks):
    """Claim the next ready (layer, chunk) task, spinning then yielding while none is ready;
    (-1, 0) once the last layer is done or the abort flag is set."""
    spins = 0
    while atomic_load(sched, 2 * num_layers - 1) < nchunks:
        if atomic_load(abort, 0) != 0:
            break
        layer, k = claim_task(sched, num_layers, nchunks)
        if layer >= 0:
            return layer, k
        spins = backoff(sched_yield, spins)
    return -1, 0


@njit(**_JIT)
def next_chunk(sgemm, mkl, sched_yield, sched, abort, chunk, x, ys, ws, wps, has_bias, has_proj, bs, xg):
    """The next ready (layer, chunk) task of a pipeline (:func:`wait_task`) with the input projections
    of its steps done (x for layer 0, else the output of the layer below in ys; into xg):
    (layer, k, t0, t1, xc, bias, w_hh, w_hh_p, w_hr, w_hr_p, bs_c), with bias b_ih + b_hh or (0,),
    w_hr (0, H) and any prepared array without projection, bs_c the steps' active rows; layer < 0
    once every task is done or the abort flag is set."""
    T, B, _ = x.shape
    G = xg.shape[2]
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    no_bias = np.empty(0, x.dtype)
    no_proj = np.empty((0, G // 4), x.dtype)
    layer, k = wait_task(sched_yield, sched, abort, ys.shape[0], (T + chunk - 1) // chunk)
    if layer < 0:
        return layer, k, 0, 0, xg, no_bias, ws[0], wps[0], no_proj, wps[0], bs
    t0 = k * chunk
    t1 = min(T, t0 + chunk)
    n = t1 - t0
    w = layer * per
    inp = x[t0:t1] if layer == 0 else ys[layer - 1, t0:t1]
    xc = xg[:n]
    mm(sgemm, mkl, inp.reshape(n * B, inp.shape[2]), ws[w], wps[w], True, xc.reshape(n * B, G))
    bias = ws[w + 2][0] + ws[w + 3][0] if has_bias else no_bias
    w_hr = ws[w + per - 1] if has_proj else no_proj
    w_hr_p = wps[w + per - 1] if has_proj else wps[w + 1]
    bs_c = bs[t0:t1] if bs.shape[0] > 0 else bs
    return layer, k, t0, t1, xc, bias, ws[w + 1], wps[w + 1], w_hr, w_hr_p, bs_c


@njit(**_JIT)
def stack_fwd_tasks(sgemm, mkl, sched_yield, sched, abort, chunk, x, ws, wps, num_layers, has_bias, has_proj, bs, h,
                    c, ys, gates, cs):
    """A unidirectional stack as a pipeline of (layer, chunk) tasks, run by every calling thread.

    Task (l, k) is the input projection and the recurrence of layer l over steps k*chunk ..
    (k+1)*chunk; it can start once (l, k-1) and (l-1, k) are done. Each thread claims the highest
    ready task (compare-and-swap on ``sched``), runs it and publishes it, until the last layer is
    done; a thread slowed down (a core shared with another process's or OpenMP's spinning thread)
    simply runs fewer tasks.

    sched (2L,) int64   zeros on entry: sched[l] the next chunk of layer l to claim, sched[L + l]
                        the chunks of layer l done; shared by the threads
    abort (1,) int64    set by the driver when a thread failed: return
    x (T, B, I); ws, wps: the weights and their prepared forms as for ``numba_lstm.stack_fwd``
    h (L, B, P), c (L, B, H): h0, c0 on entry, h_n, c_n on return
    ys (L, T, B, P)     written: every layer's output (ys[L - 1] is the stack's)
    gates (L, T, B, G), cs (L, T, B, H): saved for backward, or (L, 0, B, *) to save nothing
    """
    wide_vectors()
    sched, abort, x, bs, h, c, ys, gates, cs = (
        unowned(sched), unowned(abort), unowned(x), unowned(bs), unowned(h), unowned(c), unowned(ys),
        unowned(gates), unowned(cs))
    B = x.shape[1]
    L = num_layers
    save = gates.shape[1] > 0
    xg = np.empty((chunk, B, 4 * c.shape[2]), x.dtype)
    while True:
        layer, k, t0, t1, xc, bias, w_hh, w_hh_p, w_hr, w_hr_p, bs_c = next_chunk(
            sgemm, mkl, sched_yield, sched, abort, chunk, x, ys, ws, wps, has_bias, has_proj, bs, xg)
        if layer < 0:
            return
        layer_fwd(sgemm, mkl, xc, bias, w_hh, w_hh_p, w_hr, w_hr_p, h[layer], c[layer], bs_c, False,
                  ys[layer, t0:t1], 0, gates[layer, t0:t1] if save else gates[layer],
                  cs[layer, t0:t1] if save else cs[layer])
        atomic_store(sched, L + layer, k + 1)


@njit(**_JIT)
def direction_fwd(sgemm, mkl, inp, w_ih, w_ih_p, bias, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse, out, col0,
                  gates, cs):
    """One direction of a bidirectional layer: its input projection and its recurrence.

    inp (T, B, I); w_ih (G, I) and w_ih_p (prepared for T * B rows, or (0,)); bias (G,) or (0,);
    the rest as for ``numba_lstm.layer_fwd``; out (T, B, Q) columns col0 .. col0 + P written.
    """
    wide_vectors()
    T, B, I = inp.shape
    G = w_ih.shape[0]
    xg = np.empty((T, B, G), inp.dtype)
    mm(sgemm, mkl, inp.reshape(T * B, I), w_ih, w_ih_p, True, xg.reshape(T * B, G))
    layer_fwd(sgemm, mkl, xg, bias, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse, out, col0, gates, cs)


@njit(**_JIT)
def direction_bwd(sgemm, mkl, inp, y, col0, h0, c0, w_ih, w_hh, w_hh_p, w_hr, w_hr_p, gates, cs, bs, reverse, dy, dh,
                  dc, dinp, dgates, dhs, hps, hprev, dw_ih, dw_hh, db_ih, db_hh, has_bias, dw_hr):
    """Backward of :func:`direction_fwd`: one direction of a bidirectional layer.

    y (T, B, Q) the layer's output (this direction's columns col0 .. col0 + P); dy (T, B, P) the
    gradient of those columns, C-contiguous; dinp (T, B, I) written: this direction's part of the
    gradient of the layer's input; the other arguments as for ``numba_lstm.layer_bwd``.
    """
    wide_vectors()
    T, B, I = inp.shape
    G = w_ih.shape[0]
    n = T * B
    layer_bwd(sgemm, mkl, gates, cs, c0, w_hh, w_hh_p, w_hr, w_hr_p, dy, dh, dc, bs, reverse, dgates, dhs, hps)
    mm(sgemm, mkl, dgates.reshape(n, G), w_ih, np.empty(0, inp.dtype), False, dinp.reshape(n, I))
    weight_grads(sgemm, mkl, dgates, inp.reshape(n, I), y, col0, h0, bs, reverse, hprev, dhs, hps, dw_ih, dw_hh,
                 db_ih, db_hh, has_bias, dw_hr)


@njit(**_JIT)
def _input_rows(xc, bias, ln_gain, eps):
    """xc (n, G) input projections: layer-normalized with gain ln_gain (G,) when given (no bias of
    its own), then b_ih + b_hh (bias (G,) or (0,)) added: the input side of a variant layer."""
    wide_vectors()
    n, G = xc.shape
    if ln_gain.shape[0] > 0:
        for r in range(n):
            row = xc[r]
            mean, rstd = _mean_rstd(row, eps)
            for j in range(G):
                row[j] = (row[j] - mean) * rstd * ln_gain[j]
    if bias.shape[0] > 0:
        for r in range(n):
            row = xc[r]
            for j in range(G):
                row[j] += bias[j]


@njit(**_JIT)
def stack_fwd_tasks_variants(sgemm, mkl, sched_yield, sched, abort, chunk, x, ws, wps, num_layers, has_bias, has_proj,
                             bs, h, c, ys, ln_ih, eps, masks, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill):
    """:func:`stack_fwd_tasks` for LSTM variants (inference: nothing saved), each task running
    ``numba_variants.layer_fwd`` over its chunk.

    Per-layer options, stacked over the L layers (an absent option has a zero-sized dimension,
    as ``numba_variants.layer_fwd`` takes it): ln_ih (L, G) input layer-norm gains (eps: its
    epsilon), masks (L, B, P), pe (L, 3, H), ln_g (L, G), lnc_w (L, H), lnc_b (L, H),
    zc (L, T, B, H), zc_fill (L, H), zh (L, T, B, P), zh_fill (L, P).
    """
    wide_vectors()
    B = x.shape[1]
    L = num_layers
    H = c.shape[2]
    G = 4 * H
    xg = np.empty((chunk, B, G), x.dtype)
    no_g = np.empty((0, B, G), x.dtype)
    no_c = np.empty((0, B, H), x.dtype)
    no_s = np.empty((0, B, 2), x.dtype)
    while True:
        layer, k, t0, t1, xc, bias, w_hh, w_hh_p, w_hr, w_hr_p, bs_c = next_chunk(
            sgemm, mkl, sched_yield, sched, abort, chunk, x, ys, ws, wps, has_bias, has_proj, bs, xg)
        if layer < 0:
            return
        _input_rows(xc.reshape(xc.shape[0] * B, G), bias, ln_ih[layer], eps)
        zcl = zc[layer, t0:t1] if zc.shape[1] > 0 else zc[layer]
        zhl = zh[layer, t0:t1] if zh.shape[1] > 0 else zh[layer]
        variant_layer_fwd(sgemm, mkl, xc, w_hh, w_hh_p, w_hr, w_hr_p, h[layer], c[layer], bs_c, False,
                          ys[layer, t0:t1], masks[layer], pe[layer], ln_g[layer], lnc_w[layer], lnc_b[layer], zcl,
                          zc_fill[layer], zhl, zh_fill[layer], no_g, no_c, no_c, no_g, no_s, 0, B)
        atomic_store(sched, L + layer, k + 1)


# steps whose input projections a row thread computes at once before their recurrence (its scratch:
# ROWS_CHUNK x B x 4H, instead of the whole sequence's projections)
ROWS_CHUNK = 8


@njit(**_JIT)
def layer_rows_fwd(sgemm, mkl, x, w_ih, w_ih_p, bias, ln_ih, eps, w_hh, w_hh_p, w_hr, w_hr_p, h, c, bs, reverse,
                   out, mask, pe, ln_g, lnc_w, lnc_b, zc, zc_fill, zh, zh_fill, gates, cs, cts, lnr, lns, xn, xr,
                   r0, r1):
    """One thread's share of a layer-direction with variants: batch rows r0 .. r1 of every step,
    their input projections included (:data:`ROWS_CHUNK` steps at a time, then their recurrence).
    Rows are independent, so the parts never wait for each other; each reads all of the weights.

    x      (T, B, I)     the input;  w_ih (G, I), w_ih_p its packed form for ``x @ w_ih.T`` or (0,)
    bias   (G,) or (0,)  b_ih + b_hh;  ln_ih (G,) or (0,) the input layer-norm gain (eps its epsilon)
    xn     (T, B, G)     written with ln_ih: the normalized projections (before the gain), else (0, B, G)
    xr     (T, B)        written with ln_ih: their 1 / std, else (0, B)
    the rest as ``numba_variants.layer_fwd`` takes them (h, c, out and the saved arrays: shared,
    each part its rows; gates ... lns of zero steps to save nothing)
    """
    wide_vectors()
    x, w_ih, w_ih_p, bias, ln_ih = unowned(x), unowned(w_ih), unowned(w_ih_p), unowned(bias), unowned(ln_ih)
    w_hh, w_hh_p, w_hr, w_hr_p, h = unowned(w_hh), unowned(w_hh_p), unowned(w_hr), unowned(w_hr_p), unowned(h)
    c, bs, out, mask, pe, ln_g = unowned(c), unowned(bs), unowned(out), unowned(mask), unowned(pe), unowned(ln_g)
    lnc_w, lnc_b, zc, zc_fill, zh = unowned(lnc_w), unowned(lnc_b), unowned(zc), unowned(zc_fill), unowned(zh)
    zh_fill, gates, cs, cts, lnr = unowned(zh_fill), unowned(gates), unowned(cs), unowned(cts), unowned(lnr)
    lns, xn, xr = unowned(lns), unowned(xn), unowned(xr)
    T = x.shape[0]
    B = x.shape[1]
    G = w_ih.shape[0]
    lni = ln_ih.shape[0] > 0
    save_n = xn.shape[0] > 0
    save = gates.shape[0] > 0
    C = min(T, ROWS_CHUNK)
    xgc = np.empty((C, B, G), x.dtype)  # this thread's rows only
    nch = (T + C - 1) // C
    for s in range(nch):
        k = nch - 1 - s if reverse else s
        t0 = k * C
        t1 = min(T, t0 + C)
        for t in range(t0, t1):
            xt = xgc[t - t0][r0:r1]
            mm(sgemm, mkl, x[t][r0:r1], w_ih, w_ih_p, True, xt)
            if lni:
                for b in range(r1 - r0):
                    row = xt[b]
                    mean, rstd = _mean_rstd(row, eps)  # as in _input_rows
                    if save_n:
                        nr = xn[t, r0 + b]
                        for j in range(G):
                            nr[j] = (row[j] - mean) * rstd
                        xr[t, r0 + b] = rstd
                        for j in range(G):
                            row[j] = nr[j] * ln_ih[j]
                    else:
                        for j in range(G):
                            row[j] = (row[j] - mean) * rstd * ln_ih[j]
            if bias.shape[0] > 0:
                for b in range(r1 - r0):
                    row = xt[b]
                    for j in range(G):
                        row[j] += bias[j]
        variant_layer_fwd(sgemm, mkl, xgc[:t1 - t0], w_hh, w_hh_p, w_hr, w_hr_p, h, c,
                          bs[t0:t1] if bs.shape[0] > 0 else bs, reverse, out[t0:t1], mask, pe, ln_g, lnc_w, lnc_b,
                          zc[t0:t1] if zc.shape[0] > 0 else zc, zc_fill, zh[t0:t1] if zh.shape[0] > 0 else zh,
                          zh_fill, gates[t0:t1] if save else gates, cs[t0:t1] if save else cs,
                          cts[t0:t1] if cts.shape[0] > 0 else cts, lnr[t0:t1] if lnr.shape[0] > 0 else lnr,
                          lns[t0:t1] if lns.shape[0] > 0 else lns, r0, r1)


@njit(**_JIT)
def layer_rows_bwd(sgemm, mkl, gates, cs, cts, lnr, lns, h0, c0, w_hh, w_hh_p, w_hr, w_hr_p, mask, pe, ln_g, lnc_w,
                   lnc_b, zc, zc_fill, zh, zh_fill, grad_out, dh, dc, bs, reverse, out, dgates, drs, dhs, hps,
                   ln_ih, xn, xr, dp, hprev, dpe, dln_g, dlnc_w, dlnc_b, dln_ih, db, r0, r1):
    """Backward of :func:`layer_rows_fwd` for batch rows r0 .. r1, all but the weight products
    (:func:`layer_rows_grads`, split by steps once every part is done).

    gates ... grad_out, dh, dc, dgates ... hps, and dpe ... dlnc_b as ``numba_variants.layer_bwd``
    takes them (dpe ... dlnc_b, dln_ih and db: this part's own accumulators)
    h0     (B, P)      the initial h;  out (T, B, P) the forward's output
    ln_ih, xn, xr      as :func:`layer_rows_fwd` took and saved them
    dp     (T, B, G)   written with ln_ih: the gradient of the raw input projections (else dgates is)
    hprev  (T, B, P)   written: the h each step started from, times the dropout mask (zeros at
                       inactive rows), for dW_hh
    dln_ih (G,)        input layer-norm gain gradient, accumulated, or (0,)
    db     (G,)        bias gradient (sum of dgates), accumulated, or (0,)
    """
    wide_vectors()
    # the arrays the loop below takes views of (variant_layer_bwd, called once, unowns its own)
    dgates, xn, dp, h0, out, hprev, mask = (unowned(dgates), unowned(xn), unowned(dp), unowned(h0), unowned(out),
                                            unowned(hprev), unowned(mask))
    variant_layer_bwd(sgemm, mkl, gates, cs, cts, lnr, lns, c0, w_hh, w_hh_p, w_hr, w_hr_p, mask, pe, ln_g, lnc_w,
                      lnc_b, zc, zc_fill, zh, zh_fill, grad_out, dh, dc, bs, reverse, dgates, drs, dhs, hps, dpe,
                      dln_g, dlnc_w, dlnc_b, r0, r1)
    T, B, G = dgates.shape
    P = hprev.shape[2]
    lni = ln_ih.shape[0] > 0
    masked = mask.shape[0] > 0
    for t in range(T):
        nb = B if bs.shape[0] == 0 else bs[t]
        hi = min(nb, r1)
        for row in range(r0, hi):
            dg = dgates[t, row]
            if db.shape[0] > 0:
                for j in range(G):
                    db[j] += dg[j]
            if lni:
                ln_bwd_row(dg, xn[t, row], ln_ih, xr[t, row], dp[t, row], dln_ih)
            # the h step t started from: h0 at the row's first step, else the output of the step
            # before in processing order
            if reverse:
                first = t == T - 1 or row >= (B if bs.shape[0] == 0 else bs[t + 1])
                src = h0[row] if first else out[t + 1, row]
            else:
                src = h0[row] if t == 0 else out[t - 1, row]
            hr = hprev[t, row]
            if masked:
                mr = mask[row]
                for j in range(P):
                    hr[j] = src[j] * mr[j]
            else:
                for j in range(P):
                    hr[j] = src[j]
        for row in range(max(hi, r0), r1):
            hprev[t, row] = 0
            if lni:
                dp[t, row] = 0


@njit(**_JIT)
def layer_rows_grads(sgemm, mkl, x, w_ih, dp, dr, hprev, dhs, hps, dx, dw_ih, dw_hh, dw_hr, t0, t1):
    """The weight products of :func:`layer_rows_bwd` over steps t0 .. t1 (all rows): dw_ih, dw_hh
    and dw_hr (when projecting: dhs, hps of t1 > t0 steps) written with this range's sums, and
    dx[t0:t1] (unless dx has zero steps).

    x (T, B, I) the input; w_ih (G, I); dp (T, B, G) gradient of the raw input projections;
    dr (T, B, G) gradient of the recurrent pre-activations; hprev (T, B, P) from layer_rows_bwd
    """
    wide_vectors()
    B = x.shape[1]
    I = x.shape[2]
    G = dp.shape[2]
    P = hprev.shape[2]
    n = (t1 - t0) * B
    dp2 = dp[t0:t1].reshape(n, G)
    mm_tn(sgemm, mkl, dp2, x[t0:t1].reshape(n, I), dw_ih, False)
    mm_tn(sgemm, mkl, dr[t0:t1].reshape(n, G), hprev[t0:t1].reshape(n, P), dw_hh, False)
    if dhs.shape[0] > 0:
        H = hps.shape[2]
        mm_tn(sgemm, mkl, dhs[t0:t1].reshape(n, P), hps[t0:t1].reshape(n, H), dw_hr, False)
    if dx.shape[0] > 0:
        mm(sgemm, mkl, dp2, w_ih, np.empty(0, x.dtype), False, dx[t0:t1].reshape(n, I))


@njit(**_JIT)
def rows_input_grad(sgemm, mkl, dp, w_ih, w_ih_p, dx, r0, r1):
    """dx[t, r0:r1] = dp[t, r0:r1] @ w_ih at every step: one thread's rows of the gradient of a
    layer's input (the output of the layer below it in a stack run by rows), after
    :func:`layer_rows_bwd` of the same rows.

    dp (T, B, G) the gradient of the layer's raw input projections; w_ih (G, I); w_ih_p its packed
    form for ``a @ w_ih`` or (0,); dx (T, B, I) written at rows r0 .. r1 (inactive rows included:
    dp is zero there)
    """
    wide_vectors()
    dp, w_ih, w_ih_p, dx = unowned(dp), unowned(w_ih), unowned(w_ih_p), unowned(dx)
    for t in range(dp.shape[0]):
        mm(sgemm, mkl, dp[t][r0:r1], w_ih, w_ih_p, False, dx[t][r0:r1])


@njit(**_JIT)
def gather_units(w, u0, u1):
    """The rows of w (G, K) for hidden units u0 .. u1 of all four gates (a bias as (G, 1)),
    gate-major: (4 (u1 - u0), K), blocks i, f, g, o of u1 - u0 rows each."""
    G, K = w.shape
    H = G // 4
    hk = u1 - u0
    out = np.empty((4 * hk, K), w.dtype)
    for g in range(4):
        out[g * hk:(g + 1) * hk] = w[g * H + u0:g * H + u1]
    return out


@njit(**_JIT)
def layer_fwd_units(sgemm, mkl, sched_yield, flags, part, u0, u1, x, w_ih, w_hh, w_hh_p, bias, hbuf, c, bs, out):
    """One thread's share of a single unidirectional layer without projection (inference): hidden
    units u0 .. u1 of every step. All parts run at once and meet after every step.

    flags  (nparts + 1,) int64   zeros on entry: each part's finished steps, then an abort flag
    x      (T, B, I)             the input
    w_ih   (4 Hk, I), w_hh (4 Hk, H)   :func:`gather_units` of the weights for u0 .. u1
    w_hh_p (S,)                  w_hh prepared by ``pack_b`` for ``h @ w_hh.T``, or (0,)
    bias   (4 Hk,) or (0,)       the gathered b_ih + b_hh
    hbuf   (2, B, H)             h0 in hbuf[0]; step s reads hbuf[s % 2] and writes hbuf[(s+1) % 2]
                                 (so a part ahead never overwrites the h another part still
                                 reads); h_n ends in hbuf[T % 2]; shared
    c      (B, H)                c0 in, c_n out (each part its own columns); shared
    bs     (T,)                  active rows per step, or (0,)
    out    (T, B, H)             columns u0 .. u1 written; zeros at inactive rows
    """
    flags, x, w_ih, w_hh, w_hh_p, bias, hbuf, c, bs, out = (
        unowned(flags), unowned(x), unowned(w_ih), unowned(w_hh), unowned(w_hh_p), unowned(bias), unowned(hbuf),
        unowned(c), unowned(bs), unowned(out))
    T, B, I = x.shape
    hk = u1 - u0
    G4 = 4 * hk
    xg = np.empty((T, B, G4), x.dtype)
    mm(sgemm, mkl, x.reshape(T * B, I), w_ih, np.empty(0, x.dtype), True, xg.reshape(T * B, G4))
    if bias.shape[0] > 0:
        for t in range(T):
            for b in range(B):
                xr = xg[t, b]
                for j in range(G4):
                    xr[j] += bias[j]
    z = np.empty((B, G4), x.dtype)
    tc = np.empty(hk, x.dtype)
    nparts = flags.shape[0] - 1
    for t in range(T):
        nb = B if bs.shape[0] == 0 else bs[t]
        cur = hbuf[t % 2]
        nxt = hbuf[(t + 1) % 2]
        for b in range(nb, B):  # finished rows keep their h; their outputs are zero
            nxt[b, u0:u1] = cur[b, u0:u1]
            out[t, b, u0:u1] = 0
        if nb > 0:
            mm(sgemm, mkl, cur[:nb], w_hh, w_hh_p, True, z[:nb])
            for b in range(nb):
                zr = z[b]
                xr = xg[t, b]
                # short loops over few arrays each: they vectorize (see numba_lstm._step_bwd)
                for j in range(G4):
                    zr[j] += xr[j]
                zi = zr[:hk]
                for j in range(hk):
                    zi[j] = act_sigmoid(zi[j])
                zf = zr[hk:2 * hk]
                for j in range(hk):
                    zf[j] = act_sigmoid(zf[j])
                zg = zr[2 * hk:3 * hk]
                for j in range(hk):
                    zg[j] = act_tanh(zg[j])
                zo = zr[3 * hk:]
                for j in range(hk):
                    zo[j] = act_sigmoid(zo[j])
                cr = c[b, u0:u1]
                for j in range(hk):
                    cr[j] = zf[j] * cr[j] + zi[j] * zg[j]
                for j in range(hk):
                    tc[j] = act_tanh(cr[j])
                hn = nxt[b, u0:u1]
                for j in range(hk):
                    hn[j] = zo[j] * tc[j]
                out[t, b, u0:u1] = hn
        # meet the other parts: publish this step, wait for theirs
        atomic_store(flags, part, t + 1)
        spins = 0
        for q in range(nparts):
            while atomic_load(flags, q) < t + 1:
                if atomic_load(flags, nparts) != 0:
                    return
                spins = backoff(sched_yield, spins)


@njit(**_JIT)
def claim_grads(sched, wg, num_layers, nchunks):
    """Claim a weight-gradient task of :func:`stack_bwd_tasks` whose layer's recurrence is done:
    its index j (layer j // 2; j % 2 == 0: dW_hh, 1: dW_ih, biases, dW_hr); -1 when none is
    ready now, -2 when every one is claimed."""
    L = num_layers
    left = False
    for j in range(2 * L):
        if atomic_load(wg, j) != 0:
            continue
        left = True
        pos = L - 1 - j // 2
        if atomic_load(sched, L + pos) >= nchunks and atomic_cas(wg, j, 0, 1):
            return j
    return -1 if left else -2


@njit(**_JIT)
def stack_bwd_tasks(sgemm, mkl, sched_yield, sched, wg, abort, chunk, x, ys, h0, ws, wpbs, num_layers, has_bias,
                    has_proj, bs, c0, gates, cs, grad_out, dys, dx, dh, dc, dgates, dhs, hps, dws):
    """The backward of a unidirectional stack as tasks, run by every calling thread.

    Recurrence tasks (l, k): chunks from the last step back, the top layer ahead; each runs
    ``numba_lstm.layer_bwd`` over its steps and the gradient of the layer's input there
    (dgates @ W_ih), which task (l - 1, k) needs. Weight-gradient tasks (two per layer, see
    :func:`claim_grads`) become ready when their layer's recurrence is done, so the top layers'
    sequence-wide products overlap the lower layers' recurrences; each thread runs them with its
    own single-threaded MKL (no OpenMP threads left spinning into the next step).

    wg (2L,) int64        zeros on entry: the weight-gradient tasks claimed
    x (T, B, I), ys (L, T, B, P), h0 (L, B, P): the forward's input, outputs and initial h
    dws                   written: the gradient of each weight (as ``numba_stack.stack_train_bwd``)

    sched (2L,) int64   as :func:`stack_fwd_tasks`, with position p = L - 1 - l (the top layer is
                        position 0, the one without an input to wait for)
    ws, wpbs            the weights and their ``pack_b(..., transpose=False)`` forms
    c0 (L, B, H); gates (L, T, B, G), cs (L, T, B, H): what the forward saved
    grad_out (T, B, P)  gradient of the top layer's output
    dys (L - 1, T, B, P)  written: gradient of every other layer's output
    dx (T, B, I)        written: gradient of the input
    dh (L, B, P), dc (L, B, H)  gradients of h_n, c_n in; of h0, c0 out
    dgates (L, T, B, G) written; dhs (L, T, B, P), hps (L, T, B, H) written when projecting,
                        else (L, 0, B, *)
    """
    wide_vectors()
    sched, wg, abort, x, ys, h0, bs, c0, gates, cs, grad_out, dys, dx, dh, dc, dgates, dhs, hps = (
        unowned(sched), unowned(wg), unowned(abort), unowned(x), unowned(ys), unowned(h0), unowned(bs),
        unowned(c0), unowned(gates), unowned(cs), unowned(grad_out), unowned(dys), unowned(dx), unowned(dh),
        unowned(dc), unowned(dgates), unowned(dhs), unowned(hps))
    L = num_layers
    T, B, _ = grad_out.shape
    per = 2 + (2 if has_bias else 0) + (1 if has_proj else 0)
    nchunks = (T + chunk - 1) // chunk
    no_proj = np.empty((0, c0.shape[2]), grad_out.dtype)
    no_pack = np.empty(0, grad_out.dtype)
    hprev = np.empty((T, B, h0.shape[2]), grad_out.dtype)
    spins = 0
    while atomic_load(abort, 0) == 0:
        pos, k = claim_task(sched, L, nchunks)
        if pos < 0:
            j = claim_grads(sched, wg, L, nchunks)
            if j == -2:
                return
            if j == -1:
                spins = backoff(sched_yield, spins)
                continue
            spins = 0
            layer = j // 2
            w = layer * per
            if j % 2 == 0:
                grads_hh(sgemm, mkl, dgates[layer], ys[layer], 0, h0[layer], bs, False, hprev, dws[w + 1])
            else:
                inp = x if layer == 0 else ys[layer - 1]
                grads_ih(sgemm, mkl, dgates[layer], inp.reshape(T * B, inp.shape[2]), dhs[layer], hps[layer],
                         dws[w], dws[w + 2] if has_bias else dws[w], dws[w + 3] if has_bias else dws[w], has_bias,
                         dws[w + per - 1])
            continue
        spins = 0
        layer = L - 1 - pos
        t1 = T - k * chunk
        t0 = max(0, t1 - chunk)
        w = layer * per
        w_hr = ws[w + per - 1] if has_proj else no_proj
        w_hr_p = wpbs[w + per - 1] if has_proj else no_pack
        dy = grad_out if layer == L - 1 else dys[layer]
        c_before = c0[layer] if t0 == 0 else cs[layer, t0 - 1]
        bs_c = bs[t0:t1] if bs.shape[0] > 0 else bs
        proj_rows = dhs.shape[1] > 0
        layer_bwd(sgemm, mkl, gates[layer, t0:t1], cs[layer, t0:t1], c_before, ws[w + 1], wpbs[w + 1], w_hr, w_hr_p,
                  dy[t0:t1], dh[layer], dc[layer], bs_c, False, dgates[layer, t0:t1],
                  dhs[layer, t0:t1] if proj_rows else dhs[layer], hps[layer, t0:t1] if proj_rows else hps[layer])
        dinp = dx[t0:t1] if layer == 0 else dys[layer - 1, t0:t1]
        n = (t1 - t0) * B
        w_ih = ws[w]
        mm(sgemm, mkl, dgates[layer, t0:t1].reshape(n, w_ih.shape[0]), w_ih, no_pack, False,
           dinp.reshape(n, w_ih.shape[1]))
        atomic_store(sched, L + pos, k + 1)


# the on-disk cache follows edits of the kernel files compiled into these kernels (``_cache``)
tie_module(globals())
