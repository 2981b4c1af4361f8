"""The lstmkit command line end to end on a tiny dataset: train, evaluate, predict, datasets, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lstmkit.classify import LSTMSequenceClassifier, write_csv
from lstmkit.cli import main
from test_classify_helpers import make_sequences

FAST = ["--hidden-size", "8", "--epochs", "15", "--batch-size", "16", "--lr", "0.02", "--backend", "reference",
        "--no-progress"]


TEST_IDS = [f"t{i:02d}" for i in range(45)][::-1]  # the input's own sequence ids, not positions


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    X, y = make_sequences(90, seed=0)
    Xt, yt = make_sequences(45, seed=1)
    write_csv(d / "train.csv", X, y)
    write_csv(d / "test.csv", Xt, yt, ids=TEST_IDS)
    return d


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    rc = main(["train", "--data", str(files / "train.csv"), "--test-data", str(files / "test.csv"),
               "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_train_writes_the_run_folder(run, capsys):
    names = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "model.json", "metrics.json", "learning_curve.png", "confusion_matrix.png",
            "run.json", "checkpoint.pt"} == names
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.8 and metrics["test"]["n_cases"] == 45
    assert metrics["epochs_run"] == 15
    # one session: its epoch times are the run's; the threads are those the training used
    assert metrics["train_seconds_this_session"] == pytest.approx(metrics["train_seconds_total"])
    assert metrics["torch_threads"] == metrics["params"]["num_threads"] == 1
    assert metrics["best_epoch"] is None  # no validation data: nothing was chosen or restored
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 45 and np.trace(cm) / 45 == pytest.approx(metrics["test_accuracy"])
    config = json.loads((run / "model.json").read_text())
    assert config["classes"] == ["fast", "mid", "slow"]
    assert len(config["preprocessing"]["mean"]) == 2
    for png in ("learning_curve.png", "confusion_matrix.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(load_file(run / "model.safetensors")) == set(LSTMSequenceClassifier.load(run).model_.state_dict())


def test_evaluate_and_predict(run, files, tmp_path, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run), "--data", str(files / "test.csv"), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {metrics['test_accuracy']:.4f}   macro F1 {metrics['test']['macro_f1']:.4f}   (45 cases" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["accuracy"] == metrics["test_accuracy"]
    assert [r["label"] for r in saved["per_class"]] == ["fast", "mid", "slow"]
    assert sum(r["support"] for r in saved["per_class"]) == 45

    assert main(["predict", str(run), "--data", str(files / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    clf = LSTMSequenceClassifier.load(run)
    from lstmkit.classify import read_data

    Xt, _ = read_data(files / "test.csv")
    assert [r["sequence_id"] for r in rows] == TEST_IDS  # keyed by the file's ids, in the file's order
    assert [r["prediction"] for r in rows] == clf.predict(Xt).tolist()
    assert float(rows[0]["p_fast"]) == pytest.approx(clf.predict_proba(Xt[:1])[0, 0], abs=1e-6)


def test_evaluate_prints_a_table_and_json_on_request(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2].split() == ["class", "precision", "recall", "f1", "support"]
    assert [ln.split()[0] for ln in lines[3:6]] == ["fast", "mid", "slow"]
    assert "confusion matrix (rows: true class, columns: predicted)" in out
    assert len(lines) < 15  # a table, not a one-number-per-line JSON dump
    assert main(["evaluate", str(run), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["n_cases"] == 45


def test_evaluate_and_predict_default_to_the_runs_own_data(run, files, capsys):
    """Not JapaneseVowels: the run's own test split (this run's labels are fast/mid/slow)."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run), "--json", "-"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["accuracy"], m["n_cases"]) == (metrics["test_accuracy"], 45)
    assert "the run's test split" in m["data"]
    assert main(["evaluate", str(run), "--split", "train", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["n_cases"] == 90
    assert main(["predict", str(run)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["sequence_id"] for r in rows] == TEST_IDS


def test_a_held_out_split_is_the_same_at_evaluate(files, tmp_path, capsys):
    out = tmp_path / "frac"
    fast = [a if a != "15" else "2" for a in FAST]
    assert main(["train", "--data", str(files / "train.csv"), "--test-fraction", "0.3", "--out", str(out), *fast]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", "-"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_cases"] == metrics["test"]["n_cases"] == 27
    assert m["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    assert main(["predict", str(out)]) == 0
    ids = [r["sequence_id"] for r in csv.DictReader(capsys.readouterr().out.splitlines())]
    assert len(ids) == 27 and set(ids) <= {str(i) for i in range(90)}


def test_evaluate_refuses_unseen_labels(run, files, tmp_path, capsys):
    X, _ = make_sequences(6, seed=5)
    write_csv(tmp_path / "odd.csv", X, ["slow", "mid", "weird", "slow", "mid", "weird"])
    assert main(["evaluate", str(run), "--data", str(tmp_path / "odd.csv")]) == 1
    assert "labels ['weird'] were never seen in training" in capsys.readouterr().err


def test_train_refuses_an_existing_run_folder(run, files, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["train", "--data", str(files / "train.csv"), "--out", str(run), *FAST]) == 1
    assert "already exists; pass another --out, replace it with --overwrite" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in run.iterdir()}  # nothing touched


def test_overwrite_replaces_a_run_folder_only(files, tmp_path, capsys):
    out = tmp_path / "again"
    fast = [a if a != "15" else "1" for a in FAST]
    args = ["train", "--data", str(files / "train.csv"), "--test-data", str(files / "test.csv"), "--out", str(out)]
    assert main([*args, *fast]) == 0
    (out / "stale.txt").write_text("from the old run")
    assert main([*args, *fast, "--overwrite", "--epochs", "2"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    # a bad option with --overwrite fails before the old run is touched
    assert main([*args, *fast, "--overwrite", "--hidden-size", "0"]) == 1
    assert (out / "metrics.json").is_file()
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    capsys.readouterr()
    assert main(["train", "--data", str(files / "train.csv"), "--out", str(other), "--overwrite", *fast]) == 1
    assert "is not a run folder (run.json is missing); not replacing it" in capsys.readouterr().err
    assert (other / "precious.txt").is_file()


def test_malformed_data_file_reports_the_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    lines = (files / "train.csv").read_text().splitlines()
    lines[4] = "0,4,1.0"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "bad.csv:5: expected 5 columns (as the header), got 3" in err
    assert not (tmp_path / "r").exists()


def test_default_train_uses_bundled_japanese_vowels(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--no-progress"]) == 0  # the default backend
    out = capsys.readouterr().out
    assert "JapaneseVowels (bundled); 270 train / 370 test cases, 12 features" in out
    assert "test accuracy: " in out and "; 1 epoch in " in out and "1 epochs" not in out
    (run,) = list((tmp_path / "runs").iterdir())
    assert run.name.startswith("JapaneseVowels-")
    assert json.loads((run / "metrics.json").read_text())["test"]["n_cases"] == 370


def test_datasets_lists_bundled_sets(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("JapaneseVowels"))
    assert line.split()[1:6] == ["270", "370", "12", "7-29", "9"]


def test_python_dash_m_and_console_script():
    r = subprocess.run([sys.executable, "-m", "lstmkit", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "datasets" in r.stdout


def test_version(capsys):
    import lstmkit

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lstmkit {lstmkit.__version__}"


def test_train_help_shows_defaults_and_choices(capsys):
    from lstmkit.classify import DEFAULTS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:"):]
    for flag, dest in (("--hidden-size", "hidden_size"), ("--lr", "lr"), ("--batch-size", "batch_size"),
                       ("--epochs", "epochs"), ("--threads", "num_threads"), ("--pooling", "pooling")):
        section = options[options.index(f"{flag} "):]
        assert f"(default: {DEFAULTS[dest]})" in section[:300], flag
    assert "--pooling {last,mean,max,last+mean}" in text and "--monitor {loss,acc}" in text
    assert "--impute {zero,ffill}" in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--impute {zero,ffill}" in " ".join(capsys.readouterr().out.split())


def test_bench_delegates_to_lstmkit_bench(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("lstmkit.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "lstmkit.bench", fake)
    import lstmkit

    monkeypatch.setattr(lstmkit, "bench", fake, raising=False)
    assert main(["bench", "cpu", "--quick"]) == 0
    assert seen["argv"] == ["cpu", "--quick"]
    monkeypatch.setitem(sys.modules, "lstmkit.bench", None)
    monkeypatch.delattr(lstmkit, "bench")
    assert main(["bench"]) == 2
    assert "needs the benchmark suite lstmkit.bench" in capsys.readouterr().err


def _interrupt_after(epoch: int, monkeypatch):
    real_fit = LSTMSequenceClassifier.fit

    def fit(self, X, y, **kw):
        def stop(e, history):
            if e == epoch:
                raise KeyboardInterrupt

        return real_fit(self, X, y, **{**kw, "on_epoch_end": stop})

    monkeypatch.setattr(LSTMSequenceClassifier, "fit", fit)


def test_resume_continues_an_interrupted_run_exactly(files, tmp_path, monkeypatch, capsys):
    args = ["--data", str(files / "train.csv"), "--test-data", str(files / "test.csv"), *FAST,
            "--validation-fraction", "0.2", "--patience", "50", "--dropout", "0.2", "--epochs", "8"]
    assert main(["train", "--out", str(tmp_path / "full"), *args]) == 0

    with monkeypatch.context() as m:
        _interrupt_after(3, m)
        assert main(["train", "--out", str(tmp_path / "cut"), *args]) == 130
    assert "lstmkit train --resume" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and not (tmp_path / "cut" / "model.json").exists()
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.endswith(".tmp")]

    assert main(["train", "--resume", str(tmp_path / "cut"), "--lr", "0.5"]) == 2  # options come from run.json
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    full = json.loads((tmp_path / "full" / "model.json").read_text())["history"]
    cut = json.loads((tmp_path / "cut" / "model.json").read_text())["history"]
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert 0 < m["train_seconds_this_session"] < m["train_seconds_total"]  # 5 of the 8 epochs ran here
    assert m["train_seconds_this_session"] == pytest.approx(sum(cut["seconds"][3:]))
    for k in ("loss", "acc", "val_loss", "val_acc", "lr", "best_epoch"):
        assert cut[k] == full[k], k
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_train_pooling_option_reaches_the_saved_model(files, tmp_path, capsys):
    out = tmp_path / "pooled"
    fast = [a if a != "15" else "2" for a in FAST]
    rc = main(["train", "--data", str(files / "train.csv"), "--test-data", str(files / "test.csv"),
               "--out", str(out), "--pooling", "max", *fast])
    assert rc == 0
    config = json.loads((out / "model.json").read_text())
    assert config["params"]["pooling"] == "max" and config["model"]["pooling"] == "max"
    loaded = LSTMSequenceClassifier.load(out)
    assert loaded.pooling == "max" and loaded.model_.pooling == "max"


def test_warmup_command_is_lstmkit_warmup(capsys):
    """`lstmkit warmup` is lstmkit.warmup's command line: its options and their checks."""
    from lstmkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["warmup", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lstmkit warmup") and "--dtypes" in out and "--variants" in out
    with pytest.raises(SystemExit) as exc:
        main(["warmup", "--dtypes", "float16"])
    assert exc.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err
