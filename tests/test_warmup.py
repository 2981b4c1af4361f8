"""The first use without a wait: ``backend="auto"`` on the reference math while the numba kernels
compile in a background process, the warm-up markers, ``lstmkit.warmup`` and the cache location.

Fresh processes (``subprocess``) with an empty ``NUMBA_CACHE_DIR`` where the behaviour depends on
what a process has imported or compiled; no test waits for a whole background compile (minutes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lstmkit
from lstmkit import _warmup, backends
from tolerances import assert_close

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _run(code: str, cache: str, background: bool = True, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, NUMBA_CACHE_DIR=str(cache), LSTMKIT_BACKGROUND_COMPILE="1" if background else "0",
             PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    e.pop("LSTMKIT_CACHE_DIR", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=600)
    assert p.returncode == 0, p.stderr
    return p


_COLD = r"""
import json, sys, torch
import lstmkit
from lstmkit import _warmup
from numba.core.dispatcher import Dispatcher
torch.manual_seed(0)
m = lstmkit.LSTM(3, 5, 2)
ref = torch.nn.LSTM(3, 5, 2)
ref.load_state_dict(m.state_dict())
x = torch.randn(10, 4, 3)
y, (h, c) = m(x)
(y.sum() + h.sum() + c.sum()).backward()
yr, (hr, cr) = ref(x)
(yr.sum() + hr.sum() + cr.sum()).backward()
with torch.no_grad():
    s1 = m.step(torch.randn(4, 3))
cell = lstmkit.LSTMCell(3, 5)
ref_cell = torch.nn.LSTMCell(3, 5)
ref_cell.load_state_dict(cell.state_dict())
xc = torch.randn(4, 3)
cdev = max((a - b).abs().max().item() for a, b in zip(cell(xc), ref_cell(xc)))
compiled = [f"{mod}.{k}" for mod, v in sys.modules.items() if mod.startswith("lstmkit.kernels")
            for k, d in vars(v).items() if isinstance(d, Dispatcher) and d.signatures]
procs = list(_warmup._procs.items())
for _, p in procs:  # the test does not wait for the whole compile
    p.kill()
    p.wait()
dev = max((y - yr).abs().max().item(), (h - hr).abs().max().item(), (c - cr).abs().max().item())
gdev = max((p.grad - q.grad).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
print(json.dumps(dict(backend=m.resolved_backend(), compiled=compiled, kinds=[f"{k[1]}-{k[0]}" for k, _ in procs],
                      dev=dev, gdev=gdev, cdev=cdev)))
"""


def test_first_call_with_an_empty_cache_runs_the_reference_math_and_compiles_in_the_background(tmp_path):
    p = _run(_COLD, tmp_path)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["backend"] == "reference"
    assert r["compiled"] == []  # no kernel compiled (nor loaded) in the calling process
    assert r["kinds"] == ["plain-torch.float32"]  # one background process, for what was called
    assert r["dev"] < 1e-5 and r["gdev"] < 1e-4 and r["cdev"] < 1e-5  # torch's numbers (float32)
    notices = [ln for ln in p.stderr.splitlines() if ln.startswith("lstmkit: compiling")]
    assert len(notices) == 1 and str(tmp_path) in notices[0], p.stderr
    assert os.path.exists(os.path.join(tmp_path, "lstmkit-warm-plain-float32.log"))


def test_background_compile_off_picks_numba_at_once(tmp_path):
    code = ("import lstmkit, torch\nfrom lstmkit import _warmup\nm = lstmkit.LSTM(3, 5, 2)\n"
            "print(m.resolved_backend(), len(_warmup._procs))")
    p = _run(code, tmp_path, background=False)
    assert p.stdout.split() == ["numba", "0"]
    assert "lstmkit: compiling" not in p.stderr


def test_a_warm_marker_makes_auto_pick_numba_without_a_background_process(tmp_path):
    code = ("import torch, lstmkit\nfrom lstmkit import _warmup\n"
            "_warmup._write_marker(torch.float32, 'plain', True, 0.0)\n")
    _run(code, tmp_path)
    code = ("import torch, lstmkit\nfrom lstmkit import _warmup, backends\nm = lstmkit.LSTM(3, 5, 2)\n"
            "print(m.resolved_backend(), backends.resolve('auto', torch.device('cpu'), torch.float64).NAME,"
            " len(_warmup._procs))\n"
            "[p.kill() for p in _warmup._procs.values()]")
    p = _run(code, tmp_path)
    # float32 is marked warm: numba; float64 is not: the reference math and one background process
    assert p.stdout.split() == ["numba", "reference", "1"]
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("lstmkit: compiling")] == [
        ln for ln in p.stderr.splitlines() if "plain-float64" in ln]


def test_markers_are_keyed_by_the_cpu(tmp_path):
    code = "from lstmkit import _warmup\nimport torch\nprint(_warmup.marker_path(torch.float32))"
    a = _run(code, tmp_path).stdout.strip()
    b = _run(code, tmp_path, NUMBA_CPU_NAME="generic").stdout.strip()
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == str(tmp_path)


def test_lstmkit_cache_dir_sets_numba_cache_dir(tmp_path):
    e = dict(os.environ, LSTMKIT_CACHE_DIR=str(tmp_path / "kc"), PYTHONPATH=SRC)
    e.pop("NUMBA_CACHE_DIR", None)
    code = ("import lstmkit, numba.core.config as c\nfrom lstmkit import _warmup\n"
            "print(c.CACHE_DIR)\nprint(_warmup.cache_dir())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(tmp_path / "kc")] * 2


def test_import_lstmkit_imports_neither_numba_nor_scipy(tmp_path):
    code = "import sys, lstmkit\nprint(sorted(m for m in ('numba', 'scipy', 'triton', 'llvmlite') if m in sys.modules))"
    assert _run(code, tmp_path).stdout.strip() == "[]"


def test_module_switches_to_numba_once_the_kernels_are_ready(monkeypatch):
    """A module's remembered function for a shape runs the reference math while the kernels are not
    ready and numba's from the first call after (without a background process: ready() is faked)."""
    nb = backends._load("numba")
    state = {"ready": False}
    monkeypatch.setenv(_warmup.ENV_BACKGROUND, "1")
    monkeypatch.setattr(_warmup, "ready", lambda dtype, kind="plain": state["ready"])
    monkeypatch.setattr(_warmup, "start_background", lambda dtype, kind="plain": True)
    monkeypatch.setattr(backends, "_plain_choice", {})
    import lstmkit._modules as mods

    monkeypatch.setattr(mods, "_CALL_BACKENDS", {})
    made = []
    real = nb.call_runner

    def spy(*a, **k):
        made.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(nb, "call_runner", spy)
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, 2)
    ref = torch.nn.LSTM(3, 5, 2)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(10, 4, 3)
    with torch.no_grad():
        assert m.resolved_backend() == "reference"
        y0, _ = m(x)
        assert made == []
        state["ready"] = True
        y1, _ = m(x)
        assert made == [(10, 4, 3)]  # the same module and shape: numba's function, made once
        y2, _ = m(x)
        assert made == [(10, 4, 3)]
        yr, _ = ref(x)
    assert m.resolved_backend() == "numba"
    assert_close(y0, yr)
    assert_close(y1, yr)
    assert_close(y2, yr)


def test_cold_runner_trains_with_torch_gradients(monkeypatch):
    monkeypatch.setenv(_warmup.ENV_BACKGROUND, "1")
    monkeypatch.setattr(_warmup, "ready", lambda dtype, kind="plain": False)
    monkeypatch.setattr(_warmup, "start_background", lambda dtype, kind="plain": True)
    monkeypatch.setattr(backends, "_plain_choice", {})
    import lstmkit._modules as mods

    monkeypatch.setattr(mods, "_CALL_BACKENDS", {})
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, 2, batch_first=True)
    ref = torch.nn.LSTM(3, 5, 2, batch_first=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 7, 3)
    y, (h, c) = m(x)
    (y.sum() + h.sum() + c.sum()).backward()
    yr, (hr, cr) = ref(x)
    (yr.sum() + hr.sum() + cr.sum()).backward()
    for a, b in ((y, yr), (h, hr), (c, cr)):
        assert_close(a, b)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=name, table={torch.float32: (1e-4, 1e-5)})
    with torch.no_grad():  # one step, through the stream API: the reference math too
        ys, (hs, cs) = m.step(x[:, 0])
        yrs, (hrs, crs) = ref(x[:, :1])
    assert_close(ys, yrs[:, 0])
    assert_close(hs, hrs)


def test_failed_background_compile_falls_back_to_compiling_on_first_use(monkeypatch, capsys, tmp_path):
    class Failed:
        returncode = 3

        def poll(self):
            return self.returncode

    monkeypatch.setenv(_warmup.ENV_BACKGROUND, "1")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # no marker there
    k = (torch.float64, "variants")
    monkeypatch.setitem(_warmup._procs, k, Failed())
    monkeypatch.setattr(_warmup, "_checked", {})
    monkeypatch.setattr(_warmup, "_gave_up", set())
    monkeypatch.setattr(_warmup, "_ready", set())
    assert _warmup.ready(*k) is True
    assert "failed (exit 3" in capsys.readouterr().err
    # finished without failing but without this process's marker (the kernel sources changed meanwhile):
    # no second background compile, the kernels compile on first use, nothing printed
    Failed.returncode = 0
    k = (torch.float32, "variants")
    monkeypatch.setitem(_warmup._procs, k, Failed())
    assert _warmup.ready(*k) is True and k in _warmup._gave_up
    assert capsys.readouterr().err == ""


def test_warmup_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtypes: expected float32 or float64.*float16"):
        lstmkit.warmup(dtypes=[torch.float16])
    with pytest.raises(ValueError, match="variants: expected names among .*'dropout'"):
        lstmkit.warmup(variants=["dropout"])
    with pytest.raises(TypeError, match="training should be of type bool, got: str"):
        lstmkit.warmup(training="yes")
    with pytest.raises(ValueError, match="threads: expected positive ints, got 0"):
        lstmkit.warmup(threads=[0])


def test_warmup_module_entry_point(tmp_path):
    p = _run("import runpy, sys\nsys.argv = ['x', '--help']\n"
             "try:\n    runpy.run_module('lstmkit.warmup', run_name='__main__')\nexcept SystemExit as e:\n"
             "    assert e.code == 0\n"
             "import lstmkit, lstmkit.warmup\nprint(callable(lstmkit.warmup))", tmp_path)
    assert str(tmp_path) in "".join(p.stdout.split()) and "--dtypes" in p.stdout  # the cache dir, in the help
    assert p.stdout.strip().splitlines()[-1] == "True"


def test_first_use_bench_reports_cold_first_calls(monkeypatch):
    """``lstmkit bench --suite first-use``'s first-call part, without waiting for the background
    compile: every shape's cold first calls ran on the reference math with torch's numbers, and the
    background processes they started are stopped."""
    from lstmkit.bench import first_use

    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = first_use.first_calls(wait_s=0)
    assert set(first_use.SHAPES) <= set(r)
    pids = []
    for name in first_use.SHAPES:
        cold = r[name]["cold"]
        assert cold["backend"] == "reference", cold
        assert cold["max_dev"] < 1e-5 and cold["max_grad_dev"] < 1e-3
        assert cold["first_forward_s"] > 0 and cold["first_forward_backward_s"] >= cold["first_forward_s"]
        pids += cold["background_pids"]
    assert len(pids) == len(first_use.SHAPES) and not any(map(first_use._alive, pids))
    assert r["cache_warm"] is False


def test_first_use_bench_step_latency():
    from lstmkit.bench import first_use

    r = first_use.step_latency(steps=1000, H=16, layers=2)
    for load in ("idle", "busy"):
        for who in ("lstmkit", "torch"):
            s = r[load][who]
            assert 0 < s["p50_us"] <= s["p99_us"] and s["steps_per_s"] > 0
    assert r["busy_over_idle_p99"] > 0


def test_warmup_runs_each_part_under_each_thread_count_and_writes_its_marker(tmp_path, monkeypatch):
    """What ``lstmkit.warmup`` runs and records (the calls themselves replaced by a recorder: the
    real ones compile for minutes with an empty cache)."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(_warmup.ENV_BACKGROUND, "1")
    monkeypatch.setattr(_warmup, "_ready", set())
    monkeypatch.setattr(_warmup, "_checked", {})
    ran = []
    monkeypatch.setattr(_warmup, "_plain_calls", lambda dt, tr: ran.append(("plain", dt, tr, torch.get_num_threads())))
    monkeypatch.setattr(_warmup, "_variant_calls",
                        lambda dt, tr, vs: ran.append(("variants", dt, tr, torch.get_num_threads(), tuple(vs))))
    n0 = torch.get_num_threads()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    assert not _warmup.ready(torch.float64, "variants")
    r = lstmkit.warmup(dtypes=["float64"], training=False, variants=["peephole"], threads=[1, 2])
    assert torch.equal(torch.rand(3), want)  # the caller's random state untouched
    assert torch.get_num_threads() == n0
    assert ran == [("plain", torch.float64, False, 1), ("plain", torch.float64, False, 2),
                   ("variants", torch.float64, False, 1, ("peephole",)),
                   ("variants", torch.float64, False, 2, ("peephole",))]
    assert r["cache_dir"] == str(tmp_path) and set(r["seconds"]) == {"plain-float64", "variants-float64"}
    for kind in ("plain", "variants"):
        with open(_warmup.marker_path(torch.float64, kind)) as fh:
            assert json.load(fh)["training"] is False
        assert _warmup.ready(torch.float64, kind)
    assert not _warmup.ready(torch.float32, "plain")
