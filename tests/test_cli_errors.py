"""The command line's user errors: one line on stderr naming what, where and how to fix it in the command
line's terms, no traceback, and no run folder left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lstmkit.classify import LSTMSequenceClassifier, write_csv
from lstmkit.cli import main
from test_classify_helpers import make_sequences

FAST = ["--hidden-size", "8", "--epochs", "2", "--batch-size", "16", "--backend", "reference", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    X, y = make_sequences(30, seed=0)
    Xt, yt = make_sequences(12, seed=1)
    write_csv(d / "train.csv", X, y, ids=[f"s{i}" for i in range(30)])
    write_csv(d / "test.csv", Xt, yt)
    X3 = [np.concatenate([c, c[:, :1]], 1) for c in Xt]
    write_csv(d / "three.csv", X3, yt)
    write_csv(d / "odd_labels.csv", Xt, ["slow", "mid", "weird"] * 4)
    # the rows of sequence s7, step 2 hold a NaN in feature 1
    Xn = [c.copy() for c in X]
    Xn[7][2, 1] = np.nan
    write_csv(d / "nan.csv", Xn, y, ids=[f"s{i}" for i in range(30)])
    Xp = np.stack([c[:5] for c in X])
    np.savez(d / "continuous.npz", X=Xp, y=np.linspace(0.5, 3.5, 30))
    # no label column: the last column is a feature
    (d / "nolabel.csv").write_text("".join(
        ln.rsplit(",", 1)[0] + "\n" for ln in (d / "train.csv").read_text().splitlines()
    ))
    return d


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--data", str(files / "train.csv"), "--test-data", str(files / "test.csv"),
                 "--out", str(out), *FAST]) == 0
    return out


def _one_line_error(capsys, command="train") -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lstmkit {command}: error: ") and "Traceback" not in err
    return lines[0]


def _nan_line(files) -> int:
    """The CSV line of sequence s7's step 2."""
    for n, line in enumerate((files / "nan.csv").read_text().splitlines(), start=1):
        if line.startswith("s7,2,"):
            return n
    raise AssertionError("no row s7,2")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "{d}/missing.csv"], "data file '{d}/missing.csv' does not exist"),
        (["--data", "{d}/nan.csv"], "nan.csv:{nan_line}: sequence 's7': NaN at step 2, feature 1 ('f1'); clean the "
                                    "data or pass --impute zero"),
        (["--epochs", "0"], "--epochs: expected a positive integer or 'auto', got 0"),
        (["--hidden-size", "-5"], "--hidden-size: expected an integer in [1, 65536], got -5"),
        (["--threads", "0"], "--threads: expected an integer in [1, 1024], got 0"),
        (["--threads", "1000000"], "--threads: expected an integer in [1, 1024], got 1000000"),
        (["--lr", "-1"], "--lr: expected a positive number, got -1.0"),
        (["--dropout", "1"], "--dropout: expected a number in [0, 1), got 1.0"),
        (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295], got -1"),
        (["--dataset", "Nope"], "--dataset: expected one of ['JapaneseVowels', 'BasicMotions', 'GunPoint', "
                                "'ArrowHead', 'ItalyPowerDemand', 'OSULeaf'], got 'Nope'; see 'lstmkit datasets'"),
        (["--data", "{d}/train.csv", "--test-fraction", "1.5"],
         "--test-fraction: expected a number between 0 and 1 (exclusive), got 1.5"),
        (["--data", "{d}/nolabel.csv"], "the last column, 'f1', is read as the label but sequence 's0' has"),
        (["--data", "{d}/train.csv", "--test-data", "{d}/three.csv"],
         "three.csv: 3 features per time step, but the training data ({d}/train.csv) has 2"),
        (["--data", "{d}/train.csv", "--test-data", "{d}/odd_labels.csv"],
         "odd_labels.csv: labels ['weird'] do not occur in the training data"),
        (["--data", "{d}"], "data file '{d}' is a folder, not a file"),
        (["--data", "{d}/continuous.npz"], "continuous.npz: case 0: label 0.5 is not a class label"),
    ],
    ids=["missing-file", "nan", "epochs-0", "hidden-negative", "threads-0", "threads-huge", "lr", "dropout", "seed",
         "unknown-dataset", "test-fraction", "no-label-column", "feature-count", "unseen-test-labels",
         "folder-as-data", "continuous-labels"],
)
def test_train_errors_are_one_line_and_leave_no_folder(files, tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    d = str(files)
    args = [a.format(d=d) for a in args]
    fast = _without(FAST, args)
    out = tmp_path / "run"
    rc = main(["train", *args, "--out", str(out), *fast])
    line = _one_line_error(capsys)
    assert rc in (1, 2)
    assert expected.format(d=d, nan_line=_nan_line(files)) in line
    assert not out.exists() and not (tmp_path / "runs").exists()


def _without(defaults: list[str], given: list[str]) -> list[str]:
    """FAST less the options ``given`` sets itself."""
    out, skip = [], False
    for i, a in enumerate(defaults):
        if skip:
            skip = False
            continue
        if a in given:
            skip = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
            continue
        out.append(a)
    return out


@pytest.mark.parametrize("args, expected", [
    (["--pooling", "sum"], "argument --pooling: invalid choice: 'sum'"),
    (["--monitor", "f1"], "argument --monitor: invalid choice: 'f1'"),
    (["--impute", "mean"], "argument --impute: invalid choice: 'mean'"),
    (["--epochs", "many"], "argument --epochs: expected a positive integer or 'auto', got 'many'"),
])
def test_misused_options_are_one_line(capsys, args, expected):
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    line = _one_line_error(capsys)
    assert expected in line and line.endswith("see 'lstmkit train --help'")


def test_triton_on_a_cpu_machine_is_one_line(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "lstmkit", "train", "--data", str(files / "train.csv"), "--out",
           str(tmp_path / "r"), "--backend", "triton", "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("lstmkit train: error: --backend: backend 'triton' cannot run device=cpu")
    assert "backends that can: ['numba', 'reference']" in r.stderr
    assert not (tmp_path / "r").exists()


def test_rerun_after_a_failed_run_needs_no_cleanup(files, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--data", str(files / "nan.csv"), "--out", out, *FAST]) == 1
    capsys.readouterr()
    assert main(["train", "--data", str(files / "nan.csv"), "--out", out, "--impute", "zero", *FAST]) == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["params"]["impute"] == "zero"


def test_a_failure_before_the_first_checkpoint_removes_the_folder(files, tmp_path, monkeypatch, capsys):
    def broken_fit(self, X, y, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(LSTMSequenceClassifier, "fit", broken_fit)
    assert main(["train", "--data", str(files / "train.csv"), "--out", str(tmp_path / "r"), *FAST]) == 130
    assert "interrupted before the first epoch finished; nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

    def crash(self, X, y, **kw):
        raise MemoryError("simulated")

    monkeypatch.setattr(LSTMSequenceClassifier, "fit", crash)
    with pytest.raises(MemoryError):
        main(["train", "--data", str(files / "train.csv"), "--out", str(tmp_path / "r"), *FAST])
    assert not (tmp_path / "r").exists()


def test_resume_from_another_directory(files, tmp_path, monkeypatch, capsys):
    """run.json keeps absolute data paths: a run started with relative ones resumes from anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(files / "train.csv", work / "train.csv")
    monkeypatch.chdir(work)
    real_fit = LSTMSequenceClassifier.fit

    def stop_after_one(self, X, y, **kw):
        def stop(epoch, history):
            raise KeyboardInterrupt

        return real_fit(self, X, y, **{**kw, "on_epoch_end": stop})

    with monkeypatch.context() as m:
        m.setattr(LSTMSequenceClassifier, "fit", stop_after_one)
        assert main(["train", "--data", "train.csv", "--test-fraction", "0.3", "--out", "r", *FAST]) == 130
    saved = json.loads((work / "r" / "run.json").read_text())
    assert saved["data"]["data"] == str(work / "train.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(work / "r"), "--no-progress"]) == 0
    assert json.loads((work / "r" / "metrics.json").read_text())["epochs_run"] == 2


def test_resume_of_a_finished_run_is_refused(run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", "--resume", str(run)]) == 1
    line = _one_line_error(capsys)
    assert f"run '{run}' is finished (test accuracy " in line and f"'lstmkit evaluate {run}'" in line
    assert before == {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_a_file_where_a_folder_is_expected(files, tmp_path, capsys):
    f = str(files / "train.csv")
    assert main(["evaluate", f]) == 1
    assert f"'{f}' is a file, not a model folder" in _one_line_error(capsys, "evaluate")
    assert main(["train", "--resume", f]) == 1
    assert f"'{f}' is a file, not a run folder" in _one_line_error(capsys)
    assert main(["train", "--data", f, "--out", f, *FAST]) == 1
    assert f"--out '{f}' is a file" in _one_line_error(capsys)
    assert main(["predict", str(tmp_path / "nothing")]) == 1
    assert f"model folder '{tmp_path / 'nothing'}' does not exist" in _one_line_error(capsys, "predict")


def test_evaluate_and_predict_errors_name_the_file(run, files, tmp_path, capsys):
    assert main(["evaluate", str(run), "--data", str(files / "three.csv")]) == 1
    line = _one_line_error(capsys, "evaluate")
    assert f"three.csv: 3 features per time step, but the model in {run} has 2" in line
    assert main(["predict", str(run), "--data", str(files / "nan.csv")]) == 1
    assert f"nan.csv:{_nan_line(files)}: sequence 's7': NaN at step 2" in _one_line_error(capsys, "predict")
    assert main(["predict", str(run), "--data", str(files / "nan.csv"), "--impute", "ffill"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(files / "test.csv"), "--split", "train"]) == 2
    assert "--split applies to --dataset and to the run's own data" in _one_line_error(capsys, "evaluate")


def test_a_run_whose_data_moved_says_so(files, tmp_path, capsys):
    shutil.copy(files / "train.csv", tmp_path / "train.csv")
    out = tmp_path / "r"
    assert main(["train", "--data", str(tmp_path / "train.csv"), "--out", str(out), *FAST]) == 0
    (tmp_path / "train.csv").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 1
    line = _one_line_error(capsys, "evaluate")
    assert f"data file '{tmp_path / 'train.csv'}' does not exist (the run's own data, named in {out / 'run.json'}; " \
           "pass --data FILE or --dataset NAME)" in line


def test_saved_model_without_a_run_needs_data(run, tmp_path, capsys):
    LSTMSequenceClassifier.load(run).save(tmp_path / "m")
    assert main(["evaluate", str(tmp_path / "m")]) == 2
    assert "has no data of its own; pass --data FILE or --dataset NAME" in _one_line_error(capsys, "evaluate")


def test_output_paths_are_checked_first_and_no_temp_name_leaks(run, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "m.json"
    assert main(["evaluate", str(run), "--json", str(target)]) == 2
    line = _one_line_error(capsys, "evaluate")
    assert f"--json {target}: the folder '{target.parent}' does not exist" in line
    assert capsys.readouterr().out == ""  # refused before any work
    assert main(["predict", str(run), "--out", str(tmp_path)]) == 2
    assert "is a folder; pass a file path" in _one_line_error(capsys, "predict")


def test_atomic_write_errors_name_the_target(tmp_path):
    from lstmkit.classify._checkpoint import write_json

    target = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError) as exc:
        write_json(target, {})
    assert exc.value.filename == str(target) and ".tmp" not in str(exc.value)
    (tmp_path / "d.json").mkdir()  # replacing a folder fails after the temporary file was written
    with pytest.raises(OSError) as exc:
        write_json(tmp_path / "d.json", {})
    assert exc.value.filename == str(tmp_path / "d.json") and ".tmp" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    from lstmkit.classify._checkpoint import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_run_files_are_readable_by_others_under_umask_022(run):
    # the run fixture wrote under the test process's umask; compare with what open() would give
    probe = run.parent / "probe"
    probe.write_text("")
    expected = probe.stat().st_mode & 0o777
    probe.unlink()
    for name in ("run.json", "model.json", "model.safetensors", "metrics.json", "checkpoint.pt",
                 "learning_curve.png", "confusion_matrix.png"):
        assert (run / name).stat().st_mode & 0o777 == expected, name
