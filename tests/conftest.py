import importlib
import math
import os
import sys

import pytest
import torch

# Triton kernels run under the interpreter on CPU tensors when no GPU is present; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

# backend="auto" picks numba in tests (and in the processes they start), compiling in the foreground
# as an explicit backend="numba" does; tests/test_warmup.py turns the background compile on in fresh
# processes with an empty cache directory
os.environ["LSTMKIT_BACKGROUND_COMPILE"] = "0"


def pytest_terminal_summary(terminalreporter):
    """Report the largest deviation from torch.nn.LSTM seen by the parity tests (this process only)."""
    oracle = sys.modules.get("lstm_oracle")
    if oracle is not None and oracle.MAX_DEV:
        devs = ", ".join(f"{str(k).replace('torch.', '')} {v:.2e}" for k, v in oracle.MAX_DEV.items())
        terminalreporter.write_line(f"largest deviation from torch.nn.LSTM (outputs, states, gradients): {devs}")


@pytest.fixture(autouse=True)
def _no_remembered_plans(monkeypatch):
    """Tests change the numba backend's thresholds (monkeypatch): each starts with no per-shape
    plan remembered from another. A team step made late by a busy test machine would move later
    steps to one thread (``numba_cpu._team_step_done``): that is off unless a test turns it on."""
    nb = sys.modules.get("lstmkit.backends.numba_cpu")
    if nb is None:
        try:
            nb = importlib.import_module("lstmkit.backends.numba_cpu")
        except ImportError:
            return
    nb._PLANS.clear()
    monkeypatch.setattr(nb, "STEP_TEAM_LATE", math.inf)
    monkeypatch.setattr(nb, "_team_off_until", 0.0)
