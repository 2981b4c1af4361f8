"""The Numba backend's threaded paths (``kernels/numba_parallel.py``): a unidirectional stack as a
pipeline of (layer, chunk) tasks, the two directions of bidirectional layers side by side, a single
layer's hidden units shared by the threads. Forced on small shapes (thresholds 0, two threads) and
compared with torch.nn.LSTM (the oracle)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import types

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstm_oracle import graph_nodes
from lstmkit.backends import numba_cpu as nb
from tolerances import TOL, TOL_NORMALIZED, assert_close

pytestmark = pytest.mark.skipif(not nb.HAVE_MKL, reason="the threaded paths need MKL (float32)")


@pytest.fixture
def two_threads():
    """torch.get_num_threads() == 2 during the test."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def threaded(monkeypatch, two_threads):
    """Two threads, and the threaded paths taken at any size; records which ran."""
    monkeypatch.setattr(nb, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(nb, "SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(nb, "TINY_WEIGHTS", 0)  # these small models would take the no-BLAS kernel
    monkeypatch.setattr(nb, "SHORT_CALL_ROWS", 0)  # ... and these short calls the unthreaded one
    monkeypatch.setattr(nb, "call_runner", None)  # plain calls through the general path (one-step ones: the stack)
    monkeypatch.setattr(nb, "PIPE_MIN_ROWS", 1)  # many small chunks: every task ordering gets exercised
    ran = []
    real = nb._run_threads

    def spy(jobs, abort):
        ok = real(jobs, abort)
        ran.append((len(jobs), ok))
        return ok

    monkeypatch.setattr(nb, "_run_threads", spy)
    return ran


def _models(I, H, L, bid, proj, bias, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(I, H, L, bias=bias, bidirectional=bid, proj_size=proj)
    ours = lstmkit.LSTM(I, H, L, bias=bias, bidirectional=bid, proj_size=proj, backend="numba")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(T, B, I, H, L, D, P, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, I, generator=g), torch.randn(L * D, B, P, generator=g),
            torch.randn(L * D, B, H, generator=g))


def _forward(model, x, h0, c0, lengths):
    if lengths is None:
        out, (h, c) = model(x, (h0, c0))
        return out, h, c
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, (h, c) = model(packed, (h0, c0))
    return pad_packed_sequence(out, total_length=x.shape[0])[0], h, c


def _check_inference(T, B, I, H, L, bid, proj, bias, lengths):
    """Output, h_n and c_n without gradients, against torch.nn.LSTM with the same weights."""
    ref, ours = _models(I, H, L, bid, proj, bias)
    x, h0, c0 = _inputs(T, B, I, H, L, 2 if bid else 1, proj or H)
    with torch.no_grad():
        want = _forward(ref, x, h0, c0, lengths)  # oracle
        got = _forward(ours, x, h0, c0, lengths)
    for a, b, name in zip(got, want, ("output", "h_n", "c_n")):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("T,B,I,H,L,bid,proj,bias,lengths", [
    (9, 3, 4, 8, 2, False, 0, True, None),
    (9, 3, 4, 8, 3, False, 0, False, None),          # three layers on two threads
    (8, 4, 5, 8, 2, False, 3, True, None),           # projections
    (7, 4, 3, 6, 2, False, 0, True, [7, 2, 5, 1]),   # variable lengths
    (9, 3, 4, 8, 2, True, 0, True, None),
    (6, 5, 4, 6, 3, True, 2, True, [4, 6, 2, 6, 1]),
    (1, 3, 4, 8, 2, False, 0, True, None),
])
def test_threaded_inference_matches_torch(threaded, T, B, I, H, L, bid, proj, bias, lengths):
    _check_inference(T, B, I, H, L, bid, proj, bias, lengths)
    assert threaded and all(ok for _, ok in threaded), "the threaded path did not run"


@pytest.mark.parametrize("T,B,I,H,L,proj,bias,lengths", [
    (9, 3, 4, 8, 2, 0, True, None),
    (6, 5, 4, 6, 3, 2, False, [4, 6, 2, 6, 1]),
])
def test_threaded_bidirectional_training_matches_torch(threaded, T, B, I, H, L, proj, bias, lengths):
    _check_training(T, B, I, H, L, True, proj, bias, lengths)
    assert len(threaded) == 2 * L, "forward and backward should each run the layers' directions on two threads"


def _check_training(T, B, I, H, L, bid, proj, bias, lengths):
    """Outputs and every gradient of a random projection of them, against torch.nn.LSTM."""
    ref, ours = _models(I, H, L, bid, proj, bias)
    x, h0, c0 = _inputs(T, B, I, H, L, 2 if bid else 1, proj or H)
    results = []
    for model in (ref, ours):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        outs = _forward(model, xs, hs, cs, lengths)
        g = torch.Generator().manual_seed(5)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in outs)
        params = [p for _, p in sorted(model.named_parameters())]
        results.append((outs, torch.autograd.grad(loss, [xs, hs, cs, *params])))
    (want, want_g), (got, got_g) = results
    for a, b, name in zip(got, want, ("output", "h_n", "c_n")):
        assert_close(a, b, msg=name)
    names = ["d input", "d h0", "d c0"] + [n for n, _ in sorted(ours.named_parameters())]
    for a, b, name in zip(got_g, want_g, names):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("T,B,I,H,bias,lengths", [
    (9, 3, 4, 48, True, None),            # 32 + 16 units
    (12, 1, 5, 32, False, None),
    (8, 4, 3, 64, True, [8, 2, 5, 1]),
    (3, 3, 3, 32, True, None),
])
def test_single_layer_units_on_threads_match_torch(threaded, T, B, I, H, bias, lengths):
    """A single layer in inference: its hidden units shared by two threads meeting every step."""
    _check_inference(T, B, I, H, 1, False, 0, bias, lengths)
    assert threaded == [(2, True)], "the units were not shared by two threads"


def _spy_row_ranges(monkeypatch, kernel: str) -> list:
    """Record the row range (its last two arguments) of every call of a rows kernel."""
    from lstmkit.kernels import numba_parallel as KP

    seen = []
    real = getattr(KP, kernel)

    def spy(*args):
        seen.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(KP, kernel, spy)
    return seen


@pytest.fixture
def row_parts_seen(monkeypatch):
    """The row ranges of every ``layer_rows_fwd`` call (one per thread's share)."""
    return _spy_row_ranges(monkeypatch, "layer_rows_fwd")


@pytest.mark.parametrize("T,B,I,H,proj,bias,lengths", [
    (9, 9, 4, 8, 0, True, None),                          # rows 0..4 and 4..9
    (7, 8, 3, 6, 2, False, [7, 2, 5, 1, 7, 3, 6, 4]),     # projections, variable lengths
    (1, 8, 3, 8, 0, True, None),
])
def test_single_layer_rows_on_threads_match_torch(threaded, row_parts_seen, T, B, I, H, proj, bias, lengths):
    """A single layer in inference with enough rows: its batch rows shared by two threads, each
    with its own input projections and recurrence."""
    _check_inference(T, B, I, H, 1, False, proj, bias, lengths)
    assert threaded == [(2, True)], "the rows were not shared by two threads"
    assert sorted(row_parts_seen) == [(0, B // 2), (B // 2, B)] or sorted(row_parts_seen) == [(0, (B + 1) // 2),
                                                                                             ((B + 1) // 2, B)]


def test_single_layer_rows_busy_pool(threaded, row_parts_seen):
    """A call finding the pool in use runs all the rows on its own thread, with the same numbers."""
    ref, ours = _models(4, 8, 1, False, 0, True)
    x, h0, c0 = _inputs(6, 8, 4, 8, 1, 1, 8)
    with nb._pool_lock, torch.no_grad():
        got = _forward(ours, x, h0, c0, None)
    with torch.no_grad():
        want = _forward(ref, x, h0, c0, None)  # oracle
    for a, b in zip(got, want):
        assert_close(a, b)
    assert threaded == [(2, False)] and row_parts_seen == [(0, 8)]


def test_row_choice(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    f32 = torch.float32
    assert nb.row_parts(50, 64, 256, 256, f32) == 2
    assert nb.row_parts(50, 7, 256, 256, f32) == 1            # fewer than ROW_MIN rows a thread
    assert nb.row_parts(2, 8, 8, 8, f32) == 1                 # too little work
    assert nb.row_parts(50, 64, 256, 256, torch.float64) == 1
    assert nb.prefers_rows(16, 256, 256) and not nb.prefers_rows(16, 512, 512)   # 1 MB of weights, not 4 MB
    assert nb.prefers_rows(64, 512, 512)                                        # unless rows are many
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert nb.row_parts(50, 64, 256, 256, f32) == 1


@pytest.mark.parametrize("T,B,I,H,L,proj,bias,lengths", [
    (9, 3, 4, 8, 2, 0, True, None),
    (7, 4, 3, 6, 3, 2, False, [7, 2, 5, 1]),
])
def test_threaded_unidirectional_training_matches_torch(threaded, T, B, I, H, L, proj, bias, lengths):
    """Training a unidirectional stack: forward and backward recurrences run as threaded pipelines
    (the weight gradients after, on MKL's threads); every gradient is torch's."""
    _check_training(T, B, I, H, L, False, proj, bias, lengths)
    assert threaded == [(2, True), (2, True)], "forward and backward should each run on two threads"


def test_busy_pool_falls_back_to_one_thread(threaded):
    """A call that finds the pool in use by another call computes on its own thread."""
    ref, ours = _models(4, 8, 2, True, 0, True)
    x, h0, c0 = _inputs(9, 3, 4, 8, 2, 2, 8)
    with nb._pool_lock:  # as if another thread were running a threaded call
        with torch.no_grad():
            got = _forward(ours, x, h0, c0, None)
    with torch.no_grad():
        want = _forward(ref, x, h0, c0, None)  # oracle
    for a, b in zip(got, want):
        assert_close(a, b)
    assert threaded == [(2, False)]


def test_concurrent_calls_from_threads(threaded):
    """Python threads calling the same model at once (some get the pool, some fall back) all get
    the right numbers."""
    ref, ours = _models(4, 8, 2, False, 0, True)
    inputs = [_inputs(12, 3, 4, 8, 2, 1, 8, seed=s) for s in range(6)]
    with torch.no_grad():
        want = [_forward(ref, *inp, None) for inp in inputs]  # oracle
    got = [None] * len(inputs)

    def work(i):
        with torch.no_grad():
            got[i] = _forward(ours, *inputs[i], None)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a threaded call hung"
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert_close(a, b)


def test_failing_job_aborts_the_others():
    """A job that raises sets the abort flag, so a job waiting for it returns, and its error reaches the caller."""
    abort = np.zeros(1, np.int64)
    seen = []

    def waits():
        while abort[0] == 0:
            pass
        seen.append("aborted")

    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        nb._run_threads([fails, waits], abort)
    assert seen == ["aborted"]


def _child(queue):
    torch.set_num_threads(2)
    nb.PARALLEL_MIN_MACS = 0
    nb.TINY_WEIGHTS = 0
    _, ours = _models(4, 8, 2, True, 0, True)
    with torch.no_grad():
        out, _ = ours(torch.randn(9, 3, 4))
    queue.put(tuple(out.shape))


@pytest.mark.parametrize("parent_ran_threads", [True, False])
def test_threaded_path_after_fork(threaded, parent_ran_threads):
    """A process forked after the threads started gets a new pool (the inherited one has no
    threads), and never torch's OpenMP team: in a child forked after an OpenMP region, libgomp
    hangs (even torch.mm does), also when the parent's region was torch's own."""
    if parent_ran_threads:
        _, ours = _models(4, 8, 2, True, 0, True)
        with torch.no_grad():
            ours(torch.randn(9, 3, 4))
        assert threaded and threaded[-1][1]
    else:
        torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # an OpenMP region of torch's only
    assert _in_forked_child(_child, "a threaded call") == (9, 3, 16)


def _in_forked_child(target, what: str):
    """Run target(queue) in a forked child and return what it put; fail if it hung or died."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue,))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"the forked child hung in {what}")
    assert proc.exitcode == 0
    return queue.get(timeout=5)


def test_parallel_threads_choice(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert nb.unit_parts(50, 64, 128, 256, 256, 1, 1, torch.float32) == 2
    assert nb.unit_parts(50, 64, 128, 256, 128, 1, 1, torch.float32) == 1     # projection
    assert nb.unit_parts(50, 64, 128, 256, 256, 2, 1, torch.float32) == 1     # stacks: the pipeline
    assert nb.unit_parts(100, 1, 32, 64, 64, 1, 1, torch.float32) == 1        # too small a step
    assert nb._unit_bounds(48, 2) == [0, 32, 48] and nb._unit_bounds(512, 2) == [0, 256, 512]
    assert nb.unit_parts(1000, 1, 16, 128, 128, 1, 1, torch.float32) == 2       # 64K multiply-adds a step
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(nb, "_CPUS", 2)                                         # never more than the cores
    assert nb.unit_parts(50, 64, 128, 256, 256, 1, 1, torch.float32) == 2
    assert nb.parallel_threads(100, 16, 32, 128, 128, 4, 1, torch.float32) == 2
    monkeypatch.setattr(nb, "_CPUS", 16)
    assert nb.unit_parts(1000, 1, 16, 128, 128, 1, 1, torch.float32) == 2       # parts of >= 24K each
    assert nb.unit_parts(50, 64, 128, 256, 256, 1, 1, torch.float32) == 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    f32 = torch.float32
    assert nb.parallel_threads(100, 16, 32, 128, 128, 2, 1, f32) == 2          # layer pipeline
    assert nb.parallel_threads(100, 32, 64, 128, 128, 2, 2, f32) == 2          # directions
    assert nb.parallel_threads(100, 32, 64, 128, 128, 2, 2, f32, training=True) == 2
    assert nb.parallel_threads(100, 16, 32, 128, 128, 2, 1, f32, training=True) == 2   # forward pipeline
    assert nb.parallel_threads(100, 16, 32, 128, 128, 1, 1, f32) == 1          # one layer-direction
    assert nb.parallel_threads(50, 64, 128, 256, 256, 2, 1, f32) == 1          # products threaded anyway
    assert nb.parallel_threads(10, 5, 3, 5, 5, 2, 1, f32) == 1                 # too small
    assert nb.parallel_threads(100, 32, 64, 128, 128, 2, 2, torch.float64) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert nb.parallel_threads(100, 32, 64, 128, 128, 2, 2, f32) == 1


VARIANT_KW = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.3, 0.2)),
    "all": dict(layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=0.1),
}


def _check_variant_inference(variant, train_mode, L, B, proj, lengths):
    """A numba LSTM with a variant, without gradients, against the reference backend with the same
    (perturbed) parameters and, in training mode, the same seeded masks."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 8, L, proj_size=proj, backend="numba", **VARIANT_KW[variant])
    ref = lstmkit.LSTM(4, 8, L, proj_size=proj, backend="reference", **VARIANT_KW[variant])
    with torch.no_grad():
        for p in ours.parameters():  # gains off 1, biases and peepholes off 0
            p.add_(0.3 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    ours.train(train_mode)
    ref.train(train_mode)
    x, h0, c0 = _inputs(9, B, 4, 8, L, 1, proj or 8)
    with torch.no_grad():
        torch.manual_seed(7)
        want = _forward(ref, x, h0, c0, lengths)  # oracle: the reference backend
        torch.manual_seed(7)
        got = _forward(ours, x, h0, c0, lengths)
    for a, b, name in zip(got, want, ("output", "h_n", "c_n")):
        assert_close(a, b, msg=name, table=TOL_NORMALIZED if variant in ("layer_norm", "all") else TOL)


@pytest.mark.parametrize("variant", list(VARIANT_KW))
@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("proj,lengths", [(0, None), (3, [9, 4, 7])])
def test_threaded_variants_inference_matches_reference(threaded, variant, train_mode, proj, lengths):
    """Variants of a unidirectional stack without gradients run as the threaded pipeline and give
    the reference backend's numbers (in training mode with the same seeded masks)."""
    _check_variant_inference(variant, train_mode, 3, 3, proj, lengths)
    assert threaded and all(ok for _, ok in threaded), "the threaded path did not run"


@pytest.mark.parametrize("variant", list(VARIANT_KW))
@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("proj,lengths", [(0, None), (3, [9, 4, 7, 9, 1, 8, 2, 5, 6])])
def test_single_layer_variants_rows_match_reference(threaded, row_parts_seen, variant, train_mode, proj, lengths):
    """A single layer with variants, without gradients: its rows shared by two threads (input
    layer norm included), the reference backend's numbers."""
    _check_variant_inference(variant, train_mode, 1, 9, proj, lengths)
    assert threaded == [(2, True)] and len(row_parts_seen) == 2, "the rows were not shared by two threads"


@pytest.fixture
def rows_train_seen(monkeypatch):
    """Row ranges of every ``layer_rows_bwd`` call (a training layer's backward, per thread)."""
    return _spy_row_ranges(monkeypatch, "layer_rows_bwd")


@pytest.mark.parametrize("kw", [dict(layer_norm=True),
                                dict(peephole=True, recurrent_dropout=0.25, zoneout=(0.2, 0.1)),
                                dict(layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=(0.2, 0.1))])
@pytest.mark.parametrize("L,bid,proj,bias,lengths", [
    (2, False, 0, True, None),
    (1, True, 0, False, [11, 2, 5, 1, 11, 3, 9, 4, 11]),   # reverse direction, variable lengths
    (2, False, 3, True, [11, 6, 5, 11, 1, 3, 2, 9, 11]),   # projections
])
def test_variant_training_rows_match_reference(threaded, rows_train_seen, kw, L, bid, proj, bias, lengths):
    """Training with variants: each layer-direction (its input projection and input layer norm
    included) runs its batch rows on two threads, forward and backward, the weight products split
    by steps; the output and every gradient are the reference backend's. H=16: with these perturbed
    gains, a layer norm over 8 cell units amplifies float32 rounding of the input projections
    (~3e-7) into differences of ~1e-5 in the output and ~1e-3 in gradients between any two float32
    computations (measured with noise of that size added to the per-layer path's projections); over
    16 units the largest difference seen in 36 seeded cases was half the tolerance."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 16, L, bias=bias, bidirectional=bid, proj_size=proj, backend="numba", **kw)
    ref = lstmkit.LSTM(4, 16, L, bias=bias, bidirectional=bid, proj_size=proj, backend="reference", **kw)
    with torch.no_grad():
        for p in ours.parameters():  # gains off 1, biases and peepholes off 0
            p.add_(0.3 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    D = 2 if bid else 1
    x, h0, c0 = _inputs(11, 9, 4, 16, L, D, proj or 16)  # two chunks of steps (ROWS_CHUNK 8)
    results = []
    for m in (ref, ours):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        torch.manual_seed(7)  # the same dropout and zoneout masks
        lens = None if lengths is None else torch.tensor(lengths)
        out, (h, c) = m(xs, (hs, cs), lengths=lens)
        (out.square().sum() + h.sin().sum() + c.cos().sum()).backward()
        results.append([out, h, c, xs.grad, hs.grad, cs.grad] + [p.grad for p in m.parameters()])
    names = ["output", "h_n", "c_n", "d input", "d h0", "d c0"] + [n for n, _ in ours.named_parameters()]
    for want, got, name in zip(*results, names):  # results[0]: the oracle (reference backend)
        assert_close(got, want, msg=name, table=TOL_NORMALIZED if "layer_norm" in kw else TOL)
    assert len(rows_train_seen) == 2 * L * D and (0, 4) in rows_train_seen and (4, 9) in rows_train_seen


def _variant_training_pair(L, kw, seed=0, **extra):
    """A numba and a reference LSTM (4 -> 16, L layers) with the variants in kw and the same
    perturbed parameters."""
    torch.manual_seed(seed)
    ours = lstmkit.LSTM(4, 16, L, backend="numba", **kw, **extra)
    ref = lstmkit.LSTM(4, 16, L, backend="reference", **kw, **extra)
    with torch.no_grad():
        for p in ours.parameters():  # gains off 1, biases and peepholes off 0
            p.add_(0.3 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _train_step(m, x, h0, c0, lengths, x_grad=True):
    """Output, final state and every gradient of one seeded training step (the same masks)."""
    xs, hs, cs = x.clone().requires_grad_(x_grad), h0.clone().requires_grad_(), c0.clone().requires_grad_()
    torch.manual_seed(7)
    out, (h, c) = m(xs, (hs, cs), lengths=None if lengths is None else torch.tensor(lengths))
    (out.square().sum() + h.sin().sum() + c.cos().sum()).backward()
    return out, [out, h, c, xs.grad, hs.grad, cs.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("kw,proj,bias,lengths,x_grad", [
    (dict(recurrent_dropout=0.25), 0, True, None, True),
    (dict(layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=(0.2, 0.1)), 3, False,
     [11, 6, 5, 11, 1, 3, 2, 9, 11], False),
    (dict(peephole=True, zoneout=0.1), 0, True, [11, 2, 5, 1, 11, 3, 9, 4, 11], True),
])
def test_variant_stack_trains_as_one_node(threaded, rows_train_seen, kw, proj, bias, lengths, x_grad):
    """A 3-layer unidirectional stack with variants in training is one autograd node by rows: one
    threaded call forward (each thread its rows through every layer), two backward (the
    recurrences of every layer, last first, passing each layer's input gradient down by rows; then
    every layer's weight products); its numbers and gradients are the reference backend's, the
    input's gradient absent when the input needs none."""
    ours, ref = _variant_training_pair(3, kw, proj_size=proj, bias=bias)
    x, h0, c0 = _inputs(11, 9, 4, 16, 3, 1, proj or 16)
    want = _train_step(ref, x, h0, c0, lengths, x_grad)[1]
    threaded.clear()
    out, got = _train_step(ours, x, h0, c0, lengths, x_grad)
    names = ["output", "h_n", "c_n", "d input", "d h0", "d c0"] + [n for n, _ in ours.named_parameters()]
    for w, g, name in zip(want, got, names):
        if w is None:
            assert g is None, name
        else:
            assert_close(g, w, msg=name, table=TOL_NORMALIZED if "layer_norm" in kw else TOL)
    nodes = graph_nodes(out)
    assert nodes.count("_RowsStackFnBackward") == 1 and "_RowsLayerFnBackward" not in nodes
    assert threaded == [(2, True)] * 3
    assert sorted(rows_train_seen) == [(0, 4)] * 3 + [(4, 9)] * 3


@pytest.mark.parametrize("extra", [dict(dropout=0.3), dict(bidirectional=True)])
def test_variant_stack_node_leaves_what_it_cannot_run(threaded, extra):
    """Dropout between layers in training, and bidirectional stacks, keep one node per
    layer-direction (each by rows), with the reference backend's numbers under the same seed."""
    ours, ref = _variant_training_pair(2, dict(recurrent_dropout=0.25), **extra)
    D = 2 if extra.get("bidirectional") else 1
    x, h0, c0 = _inputs(11, 9, 4, 16, 2, D, 16)
    want = _train_step(ref, x, h0, c0, None)[1]
    out, got = _train_step(ours, x, h0, c0, None)
    for w, g in zip(want, got):
        assert_close(g, w)
    nodes = graph_nodes(out)
    assert "_RowsStackFnBackward" not in nodes and nodes.count("_RowsLayerFnBackward") == 2 * D
    assert threaded.count((2, True)) == 3 * 2 * D  # three threaded calls per layer-direction


def test_variant_stack_masks_drawn_once_when_left_to_layers(threaded, monkeypatch):
    """When the stack node declines a shape (NotImplemented), the per-layer path runs with the
    dropout and zoneout masks already drawn for it, not new ones: the reference's numbers under the
    same seed. The same holds for inference in training mode when the threaded stack declines."""
    from lstmkit.backends import _numba_variants as nv

    kw = dict(recurrent_dropout=0.25, zoneout=0.2)
    monkeypatch.setattr(nv, "stack_rows_train", lambda *a, **k: NotImplemented)
    ours, ref = _variant_training_pair(2, kw)
    x, h0, c0 = _inputs(11, 9, 4, 16, 2, 1, 16)
    want = _train_step(ref, x, h0, c0, None)[1]
    out, got = _train_step(ours, x, h0, c0, None)
    for w, g in zip(want, got):
        assert_close(g, w)
    assert graph_nodes(out).count("_RowsLayerFnBackward") == 2
    monkeypatch.setattr(nv, "lstm_stack_variants", lambda *a, **k: NotImplemented)
    results = []
    for m in (ref, ours):
        torch.manual_seed(7)
        with torch.no_grad():
            results.append(m(x, (h0, c0)))
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1][1], results[0][1][1])


def test_variant_stack_training_with_busy_pool(threaded):
    """A stack with variants trained while the pool is in use elsewhere runs its node on this
    thread alone (all rows, then every span of steps): the reference backend's numbers."""
    ours, ref = _variant_training_pair(2, dict(layer_norm=True, recurrent_dropout=0.25))
    x, h0, c0 = _inputs(11, 9, 4, 16, 2, 1, 16)
    want = _train_step(ref, x, h0, c0, None)[1]
    with nb._pool_lock:  # as if another call held the pool
        out, got = _train_step(ours, x, h0, c0, None)
    for w, g in zip(want, got):
        assert_close(g, w, table=TOL_NORMALIZED)
    assert graph_nodes(out).count("_RowsStackFnBackward") == 1
    assert threaded and all(not ok for _, ok in threaded)


def test_rows_training_choice(threaded, rows_train_seen, monkeypatch):
    """Plain layers with small steps train on the fused paths: no row threads; every variant trains
    by rows."""
    m = lstmkit.LSTM(4, 8, 1, backend="numba")
    m(torch.randn(5, 9, 4))[0].sum().backward()
    assert rows_train_seen == []
    m = lstmkit.LSTM(4, 8, 2, peephole=True, zoneout=0.1, backend="numba")
    m(torch.randn(5, 9, 4))[0].sum().backward()
    assert len(rows_train_seen) == 4 and m.weight_ih_l0.grad is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    f32 = torch.float32
    assert nb.rows_train(50, 64, 128, 256, 256, f32, True) == 2       # plain, 16M multiply-adds a step
    assert nb.rows_train(200, 64, 512, 512, 512, f32, True) == 2
    assert nb.rows_train(100, 16, 32, 128, 128, f32, True, 2) == 0    # plain, 1M a step, 2 layers: fused
    assert nb.rows_train(100, 16, 32, 128, 128, f32, True, 1) == 2    # ... one layer: 131M in all
    assert nb.rows_train(100, 8, 16, 32, 32, f32, True, 1) == 0       # one layer, 5M in all: fused
    assert nb.rows_train(100, 16, 32, 128, 128, f32, False) == 2      # variants
    assert nb.rows_train(50, 64, 128, 256, 256, torch.float64, False) == 0


def test_plain_single_layer_trains_by_rows(two_threads, rows_train_seen):
    """A plain single-layer stack with enough work (ROW_TRAIN_MIN_MACS) trains by rows on two
    threads, with torch.nn.LSTM's output and gradients; a second layer sends the same shape back
    to the fused paths."""
    torch.manual_seed(2)
    ours = lstmkit.LSTM(16, 32, 1, backend="numba")
    ref = torch.nn.LSTM(16, 32, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(100, 64, 16)
    got = []
    for m in (ref, ours):
        xs = x.clone().requires_grad_()
        out, (h, c) = m(xs)
        (out.square().sum() + h.sum() + c.sin().sum()).backward()
        got.append([out, h, c, xs.grad] + [p.grad for p in m.parameters()])
    for want, have in zip(*got):  # got[0]: the oracle
        assert_close(have, want)
    assert sorted(rows_train_seen) == [(0, 32), (32, 64)]
    rows_train_seen.clear()
    two = lstmkit.LSTM(16, 32, 2, backend="numba")
    two(x)[0].sum().backward()
    assert rows_train_seen == []


def test_variants_one_row_part_choice(monkeypatch):
    """Layers with variants take the row kernels as one part (this thread) where no thread would
    help: one thread, or too little work for several; float32 only."""
    f32 = torch.float32
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert nb.rows_train(100, 1, 128, 128, 128, f32, False) == 0      # one row: the per-layer path's threads
    assert nb.rows_train(10, 5, 3, 5, 5, f32, False) == 1             # variants, tiny: one part, this thread
    assert nb.rows_train(10, 5, 3, 5, 5, f32, True) == 0              # plain: the fused paths
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert nb.rows_train(100, 1, 128, 128, 128, f32, False) == 1      # one thread: one part whatever the size
    assert nb.rows_train(50, 64, 128, 256, 256, f32, False) == 1
    assert nb.rows_train(50, 64, 128, 256, 256, torch.float64, False) == 0
    assert nb.rows_train(100, 64, 16, 32, 32, f32, True) == 0         # plain, one thread: never by rows


@pytest.mark.parametrize("train", [False, True])
def test_variants_one_row_part_on_one_thread(train, monkeypatch):
    """With one thread, float32 layers with variants run the row kernels as one part on this thread
    (input projection and layer norm fused), in inference through every layer of the stack, in
    training per layer, with the reference backend's numbers and gradients."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = _spy_row_ranges(monkeypatch, "layer_rows_bwd" if train else "layer_rows_fwd")
        torch.manual_seed(3)
        kw = dict(layer_norm=True, peephole=True, zoneout=(0.2, 0.1))
        ours = lstmkit.LSTM(5, 12, 2, backend="numba", **kw).train(train)
        ref = lstmkit.LSTM(5, 12, 2, backend="reference", **kw).train(train)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(7, 6, 5)
        got = []
        for m in (ref, ours):
            xs = x.clone().requires_grad_(train)
            torch.manual_seed(8)
            with torch.set_grad_enabled(train):
                out, (h, c) = m(xs)
            if train:
                (out.square().sum() + c.sum()).backward()
                got.append([out, h, c, xs.grad] + [p.grad for p in m.parameters()])
            else:
                got.append([out, h, c])
        for want, have in zip(*got):  # got[0]: the oracle (reference backend)
            assert_close(have, want, table=TOL_NORMALIZED)
        assert seen == [(0, 6), (0, 6)], "each layer's rows should run as one part"
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("T,B,I,H,L,proj,bias,lengths", [
    (11, 9, 4, 8, 1, 0, True, None),                       # two chunks of steps (ROWS_CHUNK 8)
    (6, 8, 3, 6, 1, 2, False, [6, 2, 5, 1, 6, 3, 4, 4]),
    (5, 8, 3, 8, 2, 0, True, [5, 2, 5, 1, 3, 3, 4, 4]),
])
def test_plain_training_rows_match_torch(threaded, rows_train_seen, monkeypatch, T, B, I, H, L, proj, bias, lengths):
    """Training plain unidirectional layers with large steps: each layer's batch rows on two threads,
    forward and backward; the output and every gradient are torch.nn.LSTM's."""
    monkeypatch.setattr(nb, "ROW_TRAIN_MIN_STEP_MACS", 0)
    _check_training(T, B, I, H, L, False, proj, bias, lengths)
    half = (B + 1) // 2 if sorted(rows_train_seen)[-1][0] == (B + 1) // 2 else B // 2
    assert sorted(rows_train_seen) == [(0, half)] * L + [(half, B)] * L


def test_stack_rows_two_layers_match_torch(threaded, row_parts_seen):
    """``stack_rows`` runs each thread's rows through every layer of a stack (the module uses it for
    single layers; a stack measured about even with the pipeline): torch.nn.LSTM's numbers."""
    from lstmkit.backends import _numba_variants as NV

    ref, ours = _models(4, 8, 2, False, 3, True)
    T, B = 6, 9
    x, h0, c0 = _inputs(T, B, 4, 8, 2, 1, 3)
    views, packed = nb._prepared(list(ours._flat_weights), torch.float32, lambda: [T * B, B, 0, 0, B] * 2)
    h, c = h0.numpy().copy(), c0.numpy().copy()
    out = np.empty((T, B, 3), np.float32)
    NV.plain_stack_rows(x, views, packed, 2, True, True, np.zeros(0, np.int64), h, c, out, 2)
    with torch.no_grad():
        want, (h_n, c_n) = ref(x, (h0, c0))  # oracle
    for a, b, name in ((out, want, "output"), (h, h_n, "h_n"), (c, c_n, "c_n")):
        assert_close(torch.from_numpy(a), b, msg=name)
    assert sorted(row_parts_seen) == [(0, 4), (0, 4), (4, 9), (4, 9)]


def _thread_names(n=2):
    names = [None] * n

    def job(k):
        def run():
            names[k] = threading.current_thread().name
        return run

    abort = np.zeros(1, np.int64)
    assert nb._run_threads([job(k) for k in range(n)], abort)
    return names


@pytest.mark.skipif(nb._find_omp() is None, reason="torch's OpenMP runtime not found (not Linux/OpenMP)")
def test_jobs_run_on_torchs_openmp_threads(monkeypatch):
    """The threaded paths run on torch's own OpenMP team (no second set of threads competing with
    its spinning ones); with LSTMKIT_OPENMP=0, or a team with fewer threads than jobs, on lstmkit's
    Python threads; a job's error is raised in the caller either way."""
    names = _thread_names()
    assert names[0] == threading.current_thread().name and not names[1].startswith("lstmkit")
    # a team smaller than the jobs: nothing runs there, the Python threads take all of them
    gomp, num, _size, cb = nb._omp
    monkeypatch.setattr(nb, "_omp", (gomp, num, lambda: 1, cb))
    assert _thread_names()[1].startswith("lstmkit")
    monkeypatch.setattr(nb, "_omp", None)  # as found with LSTMKIT_OPENMP=0
    monkeypatch.setenv("LSTMKIT_OPENMP", "0")
    assert nb._find_omp() is None
    assert _thread_names()[1].startswith("lstmkit")
    monkeypatch.undo()

    def bad():
        raise ValueError("job failed")

    abort = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="job failed"):
        nb._run_threads([lambda: None, bad], abort)
    assert abort[0] == 1


@pytest.mark.parametrize("variant", [None, "all"])
def test_two_layer_inference_by_rows(threaded, row_parts_seen, variant):
    """A 2-layer unidirectional stack in inference with enough rows: each thread runs its rows
    through both layers (torch.nn.LSTM's numbers; with variants, the reference backend's)."""
    if variant is not None:
        _check_variant_inference(variant, False, 2, 9, 0, [9, 4, 7, 9, 1, 8, 2, 5, 6])
    else:
        _check_inference(9, 9, 4, 8, 2, False, 0, True, None)
    assert sorted(row_parts_seen) == [(0, 4), (0, 4), (4, 9), (4, 9)]
    assert nb.stack_rows_parts(100, 16, 128, 128, 3, 1, torch.float32) == 1   # deeper: the pipeline


def test_rows_training_batch_first(threaded, rows_train_seen):
    """Training by rows from a batch-first (non-contiguous time-first) input: the input gradient
    reaches the batch-first tensor; every number is the reference backend's."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 16, 1, batch_first=True, peephole=True, backend="numba")
    ref = lstmkit.LSTM(4, 16, 1, batch_first=True, peephole=True, backend="reference")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(9, 6, 4)  # (B, T, I)
    results = []
    for m in (ref, ours):
        xs = x.clone().requires_grad_()
        out, (h, c) = m(xs)
        (out.square().sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c, xs.grad] + [p.grad for p in m.parameters()])
    for want, got in zip(*results):  # results[0]: the oracle (reference backend)
        assert_close(got, want)
    assert len(rows_train_seen) == 2


# -- one step on torch's OpenMP team (kernels.numba_step) -------------------------------------------
needs_team = pytest.mark.skipif(nb._step_team(torch.float32) is None, reason="torch's OpenMP runtime not found")


def _spy_team(monkeypatch) -> list:
    """Record the team size of every ``stack_step_team`` call."""
    from lstmkit.kernels import numba_step

    seen = []
    real = numba_step.stack_step_team
    monkeypatch.setattr(numba_step, "stack_step_team", lambda team, n, *a: seen.append(n) or real(team, n, *a))
    return seen


@pytest.fixture
def team_steps(monkeypatch, two_threads):
    """Two threads, the team split taken at any size and idle gap; records the team sizes asked for."""
    monkeypatch.setattr(nb, "STEP_TEAM_MIN", 0)
    monkeypatch.setattr(nb, "STEP_TEAM_HOT_S", 1e9)
    monkeypatch.setattr(nb, "STEP_TEAM_UNITS", 1)
    return _spy_team(monkeypatch)


@needs_team
@pytest.mark.parametrize("B,I,H,proj,bias,dtype", [
    (1, 5, 7, 0, True, torch.float32),     # units split 3 + 4
    (2, 6, 33, 0, False, torch.float32),
    (8, 4, 10, 3, True, torch.float32),    # projection: a second meeting per layer, 8 rows
    (3, 9, 12, 5, True, torch.float64),
    (1, 130, 128, 0, True, torch.float32),  # the streaming benchmark's size
])
def test_step_on_team_matches_torch(team_steps, B, I, H, proj, bias, dtype):
    """step() and one-step forward() split over the team give torch.nn.LSTM's numbers, step after
    step with the state carried, for 1 to 3 layers."""
    for L in (1, 3):
        torch.manual_seed(L)
        ref = torch.nn.LSTM(I, H, L, proj_size=proj, bias=bias, dtype=dtype)
        ours = lstmkit.LSTM(I, H, L, proj_size=proj, bias=bias, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(4, B, I, dtype=dtype)
        state = want = (torch.randn(L, B, proj or H, dtype=dtype), torch.randn(L, B, H, dtype=dtype))
        team_steps.clear()
        with torch.no_grad():
            for t in range(4):
                y, state = ours.step(x[t], state) if t % 2 else ours(x[t:t + 1], state)
                y_ref, want = ref(x[t:t + 1], want)  # oracle
                assert_close(y.reshape(B, -1), y_ref[0])
        assert_close(state[0], want[0])
        assert_close(state[1], want[1])
        assert team_steps == [2] * 4


@needs_team
@pytest.mark.parametrize("nthreads", [1, 3])
def test_step_team_of_other_sizes(nthreads):
    """The kernel on a team of one thread and of three (more threads than cores; uneven unit and
    projection splits; every thread must wait for the others at each meeting)."""
    from lstmkit.kernels import numba_step

    torch.manual_seed(7)
    B, I, H, P, L = 2, 5, 11, 4, 3
    ref = torch.nn.LSTM(I, H, L, proj_size=P)
    ours = lstmkit.LSTM(I, H, L, proj_size=P)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, I)
    h0, c0 = torch.randn(L, B, P), torch.randn(L, B, H)
    y = np.empty((B, P), np.float32)
    h_n = np.empty((L, B, P), np.float32)
    c_n = np.empty((L, B, H), np.float32)
    addresses = nb._weight_addresses(ours._flat_weights, torch.float32)
    team = nb._step_team(torch.float32)
    numba_step.stack_step_team(team, nthreads, x.data_ptr(), h0.data_ptr(), c0.data_ptr(), addresses,
                               L, B, I, H, P, True, True, y, h_n, c_n)
    with torch.no_grad():
        want, (wh, wc) = ref(x[None], (h0, c0))  # oracle
    assert_close(torch.from_numpy(y), want[0])
    assert_close(torch.from_numpy(h_n), wh)
    assert_close(torch.from_numpy(c_n), wc)


def test_step_team_choice(monkeypatch, two_threads):
    """The split is taken for large steps always, for medium ones only in a streaming loop (the
    previous step call moments ago: the team's threads still spin), never for small ones or one thread."""
    if nb._step_team(torch.float32) is None:
        pytest.skip("torch's OpenMP runtime not found")
    seen = _spy_team(monkeypatch)
    clock = [1000.0]  # the backend's clock, advanced by each step's idle time before it
    monkeypatch.setattr(nb, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(nb, "_last_step", 0.0)  # restored after: later steps see the real clock
    small, medium, large = (lstmkit.LSTM(H, H, 2).eval() for H in (32, 128, 256))

    def step(m, idle_s=50e-6):
        H = m.hidden_size
        clock[0] += idle_s
        with torch.no_grad():
            m.step(torch.randn(1, H), (torch.zeros(2, 1, H), torch.zeros(2, 1, H)))
        return seen.pop() if seen else None

    step(small)
    assert step(small) is None
    step(medium)
    assert step(medium) == 2
    assert step(medium, idle_s=0.01) is None
    assert step(large, idle_s=0.01) == 2
    torch.set_num_threads(4)
    assert step(large) == min(4, os.cpu_count())  # never more threads than cores
    torch.set_num_threads(1)
    assert step(large) is None


def _step_child(queue):
    torch.set_num_threads(2)
    m = lstmkit.LSTM(256, 256, 2).eval()
    with torch.no_grad():
        y, _ = m.step(torch.randn(1, 256), (torch.zeros(2, 1, 256), torch.zeros(2, 1, 256)))
    queue.put((tuple(y.shape), nb._step_team(torch.float32) is None))


@needs_team
def test_step_after_fork(two_threads):
    """A process forked after the parent's steps ran on the team never enters libgomp (it would hang)."""
    m = lstmkit.LSTM(256, 256, 2).eval()
    with torch.no_grad():
        m.step(torch.randn(1, 256), (torch.zeros(2, 1, 256), torch.zeros(2, 1, 256)))
    assert _in_forked_child(_step_child, "a step") == ((1, 256), True)
