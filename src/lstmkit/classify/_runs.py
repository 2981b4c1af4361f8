"""Training runs as the command line drives them: data source, run folder, checkpoints, resume,
metrics and figures. Only rank 0 writes when several processes train together."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import _distributed as D
from ._checkpoint import read_json, write_json
from ._datasets import load_dataset
from ._defaults import DEFAULTS
from ._estimator import LSTMSequenceClassifier
from ._io import read_data

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVE_FILE = "learning_curve.png"
CONFUSION_FILE = "confusion_matrix.png"


class RunError(ValueError):
    """A run folder problem (exists already, is not a run, cannot be resumed)."""


@dataclass
class DataSpec:
    """Where a run's data comes from: a bundled dataset, or files."""

    dataset: Optional[str] = "JapaneseVowels"
    data: Optional[str] = None
    test_data: Optional[str] = None
    test_fraction: float = 0.2
    channels_first: bool = False

    def describe(self) -> str:
        if self.data is None:
            return f"{self.dataset} (bundled)"
        test = self.test_data or f"{self.test_fraction:.0%} of the data, stratified"
        return f"{self.data} (test: {test})"


def load_split(spec: DataSpec, seed: int):
    """(X_train, y_train, X_test, y_test) for ``spec``."""
    if spec.data is None:
        Xtr, ytr = load_dataset(spec.dataset, "train")
        Xte, yte = load_dataset(spec.dataset, "test")
        return Xtr, ytr, Xte, yte
    Xtr, ytr = read_data(spec.data, channels_first=spec.channels_first)
    if spec.test_data is not None:
        Xte, yte = read_data(spec.test_data, channels_first=spec.channels_first)
        return Xtr, ytr, Xte, yte
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(Xtr))
    _, counts = np.unique(ytr.astype(str), return_counts=True)
    n_test = int(round(spec.test_fraction * len(idx)))
    if n_test < 1 or n_test >= len(idx):
        raise ValueError(
            f"--test-fraction {spec.test_fraction} leaves {n_test} test cases of {len(idx)}; "
            "pass --test-data or change --test-fraction"
        )
    stratify = ytr if counts.min() >= 2 and n_test >= len(counts) else None
    tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    return [Xtr[i] for i in tr], ytr[tr], [Xtr[i] for i in te], ytr[te]


def default_run_dir(spec: DataSpec, root: str = "runs") -> Path:
    name = spec.dataset if spec.data is None else Path(spec.data).stem
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{name}-{stamp}"


def align_labels(y: np.ndarray, classes: np.ndarray, source: str) -> np.ndarray:
    """Map file labels onto the model's classes (by value, else by text: '1' matches 1); raise for labels
    the model never saw."""
    known = set(classes.tolist())
    if all(v in known for v in y.tolist()):
        return y
    by_text = {str(c): c for c in classes.tolist()}
    unseen = sorted({str(v) for v in y.tolist() if str(v) not in by_text})
    if unseen:
        raise ValueError(
            f"{source}: labels {unseen[:10]} were never seen in training (the model knows "
            f"{[str(c) for c in classes.tolist()]})"
        )
    out = np.empty(len(y), dtype=classes.dtype)
    out[:] = [by_text[str(v)] for v in y.tolist()]
    return out


def metrics_for(clf: LSTMSequenceClassifier, X, y) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pred = clf.predict(X)
    labels = clf.classes_
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "n_cases": len(y),
        "labels": [str(v) for v in labels.tolist()],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)


def _params_from(overrides: dict) -> dict:
    params = {k: v for k, v in DEFAULTS.items()}
    params.update({k: v for k, v in overrides.items() if v is not None})
    params.pop("channels_first", None)  # files are read into (n_steps, n_features) cases
    return params


def train_run(
    spec: DataSpec,
    *,
    params: Optional[dict] = None,
    run_dir: Optional[str | os.PathLike] = None,
    resume: Optional[str | os.PathLike] = None,
    progress: bool = False,
    on_epoch_end=None,
    log=print,
) -> RunResult:
    """Train, evaluate on the test split and write the run folder (rank 0 only).

    The folder gets ``run.json`` (data source and parameters, written first so that ``resume`` can
    rebuild the run), ``checkpoint.pt`` after every epoch, then the model (``model.safetensors`` +
    ``model.json``), ``metrics.json``, ``learning_curve.png`` and ``confusion_matrix.png``.
    """
    if resume is not None:
        run = Path(resume)
        if not (run / RUN_FILE).is_file():
            raise RunError(f"--resume {str(run)!r}: not a run folder ({RUN_FILE} is missing)")
        saved = read_json(run / RUN_FILE)
        spec = DataSpec(**saved["data"])
        # the data and training options are the run's; only where it runs may change
        params = {
            **saved["params"],
            **{k: v for k, v in (params or {}).items() if k in ("device", "num_threads") and v is not None},
        }
    else:
        params = _params_from(params or {})
        run = Path(run_dir) if run_dir is not None else default_run_dir(spec)
        if D.is_active():  # the timestamped default must be the same folder on every rank
            holder = [str(run)]
            torch.distributed.broadcast_object_list(holder, src=0)
            run = Path(holder[0])
        if D.is_main():
            if run.exists():
                raise RunError(
                    f"run folder {str(run)!r} already exists; pass another --out, or continue it with "
                    f"'lstmkit train --resume {run}'"
                )
            run.mkdir(parents=True)
            write_json(run / RUN_FILE, {"data": asdict(spec), "params": params})
        D.barrier()

    Xtr, ytr, Xte, yte = load_split(spec, int(params["seed"]))
    clf = LSTMSequenceClassifier(**params, progress=progress)
    ckpt = run / CHECKPOINT_FILE
    resuming = resume is not None and ckpt.is_file()
    if D.is_main():
        what = "resuming" if resuming else "training"
        log(
            f"{what}: {spec.describe()}; {len(Xtr)} train / {len(Xte)} test cases, "
            f"{Xtr[0].shape[1]} features; {D.world_size()} process(es); run folder {run}"
        )
    t0 = time.perf_counter()
    clf.fit(Xtr, ytr, checkpoint_path=ckpt, resume=resuming, on_epoch_end=on_epoch_end)
    train_seconds = time.perf_counter() - t0
    result = RunResult(run)
    if D.is_main():
        yte = align_labels(np.asarray(yte), clf.classes_, "test data")
        test = metrics_for(clf, Xte, yte)
        h = clf.history_
        best = h["best_epoch"]
        result.metrics = {
            "data": spec.describe(),
            "test": test,
            "test_accuracy": test["accuracy"],
            "train_seconds_this_session": train_seconds,
            "train_seconds_total": float(sum(h["seconds"])),
            "epochs_run": len(h["epoch"]),
            "best_epoch": best,
            "best_val_accuracy": h["val_acc"][best - 1] if best > 0 and h["val_acc"][best - 1] is not None else None,
            "processes": D.world_size(),
            "torch_threads": torch.get_num_threads(),
            "device": str(next(clf.model_.parameters()).device),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "params": params,
        }
        clf.save(run)
        write_json(run / METRICS_FILE, result.metrics)
        from ._plots import confusion_matrix_plot, learning_curve

        learning_curve(h, run / CURVE_FILE, title=spec.describe())
        confusion_matrix_plot(
            np.asarray(test["confusion_matrix"]), clf.classes_.tolist(), run / CONFUSION_FILE,
            title=f"test accuracy {test['accuracy']:.4f}",
        )
        log(
            f"test accuracy: {test['accuracy']:.4f} ({test['n_cases']} cases); "
            f"{len(h['epoch'])} epochs in {sum(h['seconds']):.1f} s, best epoch {best}"
        )
        log(f"wrote {run}/: model.safetensors, model.json, {METRICS_FILE}, {CURVE_FILE}, {CONFUSION_FILE}")
    D.barrier()
    return result


def load_model(path: str | os.PathLike, device: str = "cpu") -> LSTMSequenceClassifier:
    return LSTMSequenceClassifier.load(path, device=device)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2)
