"""The step API's threaded path gives way when waiting for its partner threads costs more than the
split saves (``numba_cpu._team_step_done``): a late team step turns the team off for a back-off
time, during which steps run on the calling thread, with the same numbers. No timing is asserted:
lateness is forced through the thresholds."""

import math
import os

import pytest
import torch

import lstmkit
from tolerances import assert_close

nb = pytest.importorskip("lstmkit.backends.numba_cpu")


@pytest.fixture
def policy(monkeypatch):
    """The lateness rule at its shipped thresholds (tests/conftest.py turns it off elsewhere)."""
    monkeypatch.setattr(nb, "STEP_TEAM_LATE", 3.0)
    monkeypatch.setattr(nb, "STEP_TEAM_LATE_PAD_S", 50e-6)
    monkeypatch.setattr(nb, "_team_off_until", 0.0)
    monkeypatch.setattr(nb, "_team_backoff", nb.STEP_TEAM_BACKOFF_S)
    return nb


def test_on_time_team_steps_keep_the_team_and_set_the_yardstick(policy):
    best = [10e-6, math.inf]
    nb._team_step_done(8e-6, best, 1.0)
    assert best == [10e-6, 8e-6] and nb._team_off_until == 0.0
    nb._team_step_done(60e-6, best, 2.0)  # 60 us <= 3 * 8 us + 50 us: on time
    assert best == [10e-6, 8e-6] and nb._team_off_until == 0.0


def test_late_team_steps_back_off_doubling_up_to_the_bound(policy):
    best = [10e-6, 8e-6]
    expected = nb.STEP_TEAM_BACKOFF_S
    start = 100.0
    for _ in range(12):
        nb._team_step_done(5e-3, best, start)
        assert nb._team_off_until == pytest.approx(start + 5e-3 + expected)
        expected = min(2 * expected, nb.STEP_TEAM_BACKOFF_MAX_S)
        start += 10.0
    assert nb._team_backoff == nb.STEP_TEAM_BACKOFF_MAX_S
    nb._team_step_done(9e-6, best, start)  # on time again: the next late step backs off briefly
    assert nb._team_backoff == nb.STEP_TEAM_BACKOFF_S


def test_a_streams_first_team_step_is_its_yardstick_not_a_late_step(policy):
    best = [10e-6, math.inf]
    nb._team_step_done(50e-3, best, 1.0)  # e.g. the team's kernels loaded on this step
    assert best == [10e-6, 50e-3] and nb._team_off_until == 0.0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the step team needs two cores")
def test_a_late_team_step_moves_the_stream_to_one_thread_with_the_same_numbers(policy, monkeypatch):
    if nb._omp_team() is None:
        pytest.skip("torch's OpenMP team is not usable here")
    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(nb, "STEP_TEAM_HOT_S", 1e9)  # every step of the loop counts as streaming
        monkeypatch.setattr(nb, "STEP_TEAM_LATE", math.inf)  # no step late until said (a busy test machine)
        torch.manual_seed(0)
        H = 128
        ours = lstmkit.LSTM(H, H, 2, backend="numba")
        ref = torch.nn.LSTM(H, H, 2)
        ref.load_state_dict(ours.state_dict())
        xs = torch.randn(40, 1, H)
        with torch.no_grad():
            _, st = ours.step(xs[0])  # loads the team's kernels (nb.KS)
            _, st_ref = ref(xs[:1])
        calls = {"team": 0, "one": 0}
        team_fn, one_fn = nb.KS.stack_step_team, nb.K.stack_step_ptr

        def team(*a):
            calls["team"] += 1
            return team_fn(*a)

        def one(*a):
            calls["one"] += 1
            return one_fn(*a)

        monkeypatch.setattr(nb.KS, "stack_step_team", team)
        monkeypatch.setattr(nb.K, "stack_step_ptr", one)

        def steps(lo, hi):
            nonlocal st, st_ref
            with torch.no_grad():
                for t in range(lo, hi):
                    y, st = ours.step(xs[t], st)
                    y_ref, st_ref = ref(xs[t:t + 1], st_ref)
                    assert_close(y, y_ref[0])
            assert_close(st[0], st_ref[0])
            assert_close(st[1], st_ref[1])

        steps(1, 10)
        assert calls["team"] == 9  # a stream of hot steps, none late: all on the team
        # from here every team step is late (no slack), and the back-off outlasts the test
        monkeypatch.setattr(nb, "STEP_TEAM_LATE", 0.0)
        monkeypatch.setattr(nb, "STEP_TEAM_LATE_PAD_S", -1.0)
        monkeypatch.setattr(nb, "_team_backoff", 3600.0)
        steps(10, 40)
        assert calls["team"] == 10 and calls["one"] == 29  # one late team step, then one thread
        assert nb._team_off_until > 1000.0
    finally:
        torch.set_num_threads(n0)
