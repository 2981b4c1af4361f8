"""Two CPU processes under torchrun (gloo, loopback) train to the single-process quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lstmkit.classify import write_csv
from lstmkit.cli import main
from test_classify_helpers import make_sequences

ARGS = ["--hidden-size", "8", "--epochs", "20", "--batch-size", "16", "--lr", "0.02", "--backend", "reference",
        "--validation-fraction", "0.1", "--no-progress"]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    X, y = make_sequences(120, seed=0)
    Xt, yt = make_sequences(60, seed=1)
    write_csv(tmp_path / "train.csv", X, y)
    write_csv(tmp_path / "test.csv", Xt, yt)
    data = ["--data", str(tmp_path / "train.csv"), "--test-data", str(tmp_path / "test.csv")]

    assert main(["train", *data, "--out", str(tmp_path / "single"), *ARGS]) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lstmkit", "train", *data, "--out", str(tmp_path / "ddp"), *ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())

    assert ddp["processes"] == 2 and single["processes"] == 1
    # one writer: rank 0 printed the summary once and wrote one set of files
    assert r.stdout.count("test accuracy:") == 1
    assert "; 2 processes; run folder" in r.stdout
    names = {run: sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("ddp", "single")}
    assert names["ddp"] == names["single"]
    # each process sees half of every global batch; the result is as good as one process's
    assert ddp["epochs_run"] == 20
    assert single["test_accuracy"] >= 0.8
    assert ddp["test_accuracy"] >= single["test_accuracy"] - 0.07, (ddp["test_accuracy"], single["test_accuracy"])
