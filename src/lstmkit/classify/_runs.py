"""Training runs as the command line drives them: data source, run folder, checkpoints, resume,
metrics and figures. Only rank 0 writes when several processes train together.

Everything a run needs is checked before its folder is created: the options, the device and
backend, the data (readable, finite unless imputed, one feature count, at least two classes, test
labels known to the training data). A run that fails before its first checkpoint removes its folder;
one that fails later keeps it for ``--resume``. Errors name the file, line and sequence, and say what
to do in the command line's terms.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import _distributed as D
from ._checkpoint import read_json, write_json
from ._datasets import canonical_name, load_dataset
from ._defaults import DEFAULTS
from ._estimator import LSTMSequenceClassifier, ParamError, _unique_labels
from ._io import Cases, DataFileError, read_cases

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVE_FILE = "learning_curve.png"
CONFUSION_FILE = "confusion_matrix.png"
#: what a finished run folder holds besides RUN_FILE and CHECKPOINT_FILE; METRICS_FILE is written last
OUTPUT_FILES = ("model.safetensors", "model.json", CURVE_FILE, CONFUSION_FILE, METRICS_FILE)

IMPUTE_HINT = (
    "clean the data or pass --impute zero (the feature's training mean) or --impute ffill (the last finite value)"
)


class RunError(ValueError):
    """A run folder problem (exists already, is not a run, cannot be resumed)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``resumable`` tells whether a checkpoint in ``run_dir`` lets it continue."""

    def __init__(self, run_dir: Path, resumable: bool):
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.resumable = resumable


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """``1 epoch``, ``2 epochs``; ``words`` where the plural is not ``word + "s"``."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


# ---------------------------------------------------------------------------------------------- data


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

    def checked(self) -> DataSpec:
        """This spec with the dataset's registry name and absolute file paths (so that ``--resume`` works
        from any directory); ValueError naming the option for anything out of range."""
        if (self.dataset is None) == (self.data is None):
            raise ValueError("give one of --dataset NAME or --data FILE")
        if self.test_data is not None and self.data is None:
            raise ValueError("--test-data needs --data (bundled datasets have their own test split)")
        tf = self.test_fraction
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
            raise ValueError(f"--test-fraction: expected a number between 0 and 1 (exclusive), got {tf!r}")
        if not isinstance(self.channels_first, bool):
            raise ValueError(f"channels_first: expected True or False, got {self.channels_first!r}")
        if self.dataset is not None:
            try:
                name = canonical_name(self.dataset)
            except ValueError as exc:
                raise ValueError(f"--{exc}; see 'lstmkit datasets'") from None
            return DataSpec(dataset=name, test_fraction=tf)
        absolute = {k: None if v is None else str(Path(v).expanduser().absolute())
                    for k, v in (("data", self.data), ("test_data", self.test_data))}
        return DataSpec(dataset=None, **absolute, test_fraction=tf, channels_first=self.channels_first)

    @classmethod
    def from_json(cls, obj, where: str) -> DataSpec:
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or set(obj) - set(names):
            raise RunError(f"{where}: data: expected an object with keys from {names}, got {obj!r}")
        for key in ("dataset", "data", "test_data"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise RunError(f"{where}: data.{key}: expected a string or null, got {obj[key]!r}")
        try:
            return cls(**obj).checked()
        except ValueError as exc:
            raise RunError(f"{where}: data: {exc}") from None


def load_bundled(name: str, split: str) -> Cases:
    X, y = load_dataset(name, split)
    return Cases(X, y, list(range(len(X))), f"{canonical_name(name)} ({split})")


def load_split(spec: DataSpec, seed: int) -> tuple[Cases, Cases]:
    """The (train, test) cases of ``spec``; a ``--test-fraction`` split is stratified and seeded."""
    if spec.data is None:
        return load_bundled(spec.dataset, "train"), load_bundled(spec.dataset, "test")
    train = read_cases(spec.data, channels_first=spec.channels_first)
    if spec.test_data is not None:
        return train, read_cases(spec.test_data, channels_first=spec.channels_first)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(train))
    _, counts = np.unique(train.y.astype(str), return_counts=True)
    n_test = int(round(spec.test_fraction * len(idx)))
    if n_test < 1 or n_test >= len(idx):
        raise ValueError(
            f"--test-fraction {spec.test_fraction} leaves {n_test} test cases of {len(idx)} in {spec.data}; "
            "pass --test-data FILE or another --test-fraction"
        )
    stratify = train.y if counts.min() >= 2 and n_test >= len(counts) else None
    tr, te = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    return train.subset(np.sort(tr)), train.subset(np.sort(te))


def check_finite(cases: Cases, impute: Optional[str]) -> None:
    """DataFileError naming the file, line and sequence of the first NaN or inf, unless ``impute``."""
    if impute is not None:
        return
    for i, x in enumerate(cases.X):
        bad = ~np.isfinite(x)
        if bad.any():
            t, f = (int(v) for v in np.argwhere(bad)[0])
            what = "NaN" if np.isnan(x[t, f]) else "inf"
            raise DataFileError(
                f"{cases.where(i, t)}: {what} at step {t}, feature {cases.feature_name(f)}; {IMPUTE_HINT}"
            )


def check_features(cases: Cases, n_features: int, trained_on: str) -> None:
    if cases.n_features != n_features:
        hint = ""
        if cases.source.lower().endswith(".npz"):
            hint = "; for X stored as (n_cases, n_channels, n_timepoints) pass --channels-first"
        raise DataFileError(
            f"{cases.source}: {cases.n_features} features per time step, but {trained_on} has {n_features}{hint}"
        )


def check_training_data(train: Cases, test: Cases, impute: Optional[str]) -> None:
    """Everything about the data that would otherwise fail during or after training."""
    check_finite(train, impute)
    check_finite(test, impute)
    check_features(test, train.n_features, f"the training data ({train.source})")
    for cases in (train, test):
        y = np.asarray(cases.y)
        if y.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(y) | (np.mod(np.nan_to_num(y), 1) != 0))
            if len(bad):
                raise DataFileError(
                    f"{cases.where(int(bad[0]))}: label {y[bad[0]].item()!r} is not a class label (labels are "
                    "strings or integers; a classifier cannot learn a continuous target)"
                )
    classes = _unique_labels(np.asarray(train.y))
    if len(classes) < 2:
        raise DataFileError(
            f"{train.source}: every case has label {classes.tolist()[0]!r}; a classifier needs at least 2 classes"
        )
    align_labels(np.asarray(test.y), classes, test.source, known_as=f"the training data ({train.source})")


def align_labels(y: np.ndarray, classes: np.ndarray, source: str, known_as: str = "training") -> np.ndarray:
    """Map file labels onto the model's classes (by value, else by text: '1' matches 1); raise for labels
    the model never saw."""
    known = set(classes.tolist())
    if all(v in known for v in y.tolist()):
        return y
    by_text = {str(c): c for c in classes.tolist()}
    unseen = sorted({str(v) for v in y.tolist() if str(v) not in by_text})
    if unseen:
        if known_as == "training":
            raise ValueError(
                f"{source}: labels {unseen[:10]} were never seen in training (the model knows "
                f"{[str(c) for c in classes.tolist()]})"
            )
        raise ValueError(
            f"{source}: labels {unseen[:10]} do not occur in {known_as}, which has "
            f"{[str(c) for c in classes.tolist()]}"
        )
    out = np.empty(len(y), dtype=classes.dtype)
    out[:] = [by_text[str(v)] for v in y.tolist()]
    return out


# ------------------------------------------------------------------------------------------- metrics


def metrics_for(clf: LSTMSequenceClassifier, X, y) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    pred = clf.predict(X)
    labels = clf.classes_
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "n_cases": len(y),
        "labels": [str(v) for v in labels.tolist()],
        "per_class": [
            {"label": str(c), "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
            for c, pi, ri, fi, si in zip(labels.tolist(), p, r, f, s)
        ],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def format_metrics(m: dict, source: str, max_matrix: int = 12) -> str:
    """The terminal view of :func:`metrics_for`: a headline, a per-class table, the confusion matrix
    (up to ``max_matrix`` classes)."""
    lines = [f"accuracy {m['accuracy']:.4f}   macro F1 {m['macro_f1']:.4f}   ({plural(m['n_cases'], 'case')}, "
             f"{source})", ""]
    width = max(5, *(len(r["label"]) for r in m["per_class"]))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for r in m["per_class"]:
        lines.append(f"{r['label']:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:6.3f}  "
                     f"{r['support']:7d}")
    cm = m["confusion_matrix"]
    if len(cm) <= max_matrix:
        cell = max(4, *(len(str(v)) + 1 for row in cm for v in row), *(len(lab) + 1 for lab in m["labels"]))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * width + "".join(f"{lab:>{cell}}" for lab in m["labels"])]
        lines += [f"{lab:<{width}}" + "".join(f"{v:>{cell}}" for v in row) for lab, row in zip(m["labels"], cm)]
    else:
        lines += ["", f"confusion matrix: {len(cm)} classes, too many to show here; pass --json FILE to keep it"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)


def default_run_dir(spec: DataSpec, root: str = "runs") -> Path:
    name = spec.dataset if spec.data is None else Path(spec.data).stem
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{name}-{stamp}"


def _params_from(overrides: dict) -> dict:
    params = {k: v for k, v in DEFAULTS.items()}
    params.update({k: v for k, v in overrides.items() if v is not None})
    params.pop("channels_first", None)  # files are read into (n_steps, n_features) cases
    return params


def _check_params(params: dict, where: Optional[str] = None) -> LSTMSequenceClassifier:
    """An estimator for ``params`` with every parameter, the device and the backend checked."""
    valid = LSTMSequenceClassifier().get_params()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise RunError(f"{where}: params: unknown parameter(s) {unknown}")
    clf = LSTMSequenceClassifier(**params)
    try:
        clf._check_params()
        clf._check_device()
    except ParamError as exc:
        if where is None:
            raise
        raise RunError(f"{where}: params.{exc.param}: {exc.detail}") from None
    return clf


def read_run(run: Path) -> tuple[DataSpec, dict]:
    """The data spec and parameters stored in ``run/run.json``, checked."""
    if not run.exists():
        raise RunError(f"run folder {str(run)!r} does not exist")
    if not run.is_dir():
        raise RunError(f"{str(run)!r} is a file, not a run folder")
    if not (run / RUN_FILE).is_file():
        raise RunError(f"{str(run)!r} is not a run folder ({RUN_FILE} is missing)")
    where = str(run / RUN_FILE)
    saved = read_json(run / RUN_FILE)
    if not isinstance(saved, dict) or set(saved) != {"data", "params"}:
        raise RunError(f"{where}: expected an object with keys 'data' and 'params'")
    if not isinstance(saved["params"], dict):
        raise RunError(f"{where}: params: expected an object, got {saved['params']!r}")
    spec = DataSpec.from_json(saved["data"], where)
    _check_params(saved["params"], where)
    return spec, saved["params"]


def run_data(run: Path, split: str) -> tuple[Cases, str]:
    """The ``split`` ("train" or "test") of the data a run was trained on (evaluate/predict's default),
    and a description of it."""
    spec, params = read_run(run)
    try:
        train, test = load_split(spec, int(params.get("seed", DEFAULTS["seed"])))
    except DataFileError as exc:
        raise DataFileError(
            f"{exc} (the run's own data, named in {run / RUN_FILE}; pass --data FILE or --dataset NAME)"
        ) from None
    cases = train if split == "train" else test
    if spec.data is not None and spec.test_data is None:
        part = "its held-out test cases" if split == "test" else "its training cases"
        return cases, f"{spec.data}, {part} (the run's {split} split)"
    return cases, f"{cases.source} (the run's {split} split)"


def _finished_message(run: Path) -> str:
    try:
        acc = f"test accuracy {float(read_json(run / METRICS_FILE)['test_accuracy']):.4f}"
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        acc = "see its metrics.json"
    return (
        f"run {str(run)!r} is finished ({acc}); nothing to resume. Evaluate it with 'lstmkit evaluate {run}', "
        "or train again with another --out"
    )


def _prepare_folder(run: Path, overwrite: bool) -> None:
    """Fail if ``run`` cannot become the new run's folder; with ``overwrite`` an old run (or an empty
    folder) may be replaced, never a folder that holds other things."""
    if not run.exists():
        return
    if not run.is_dir():
        raise RunError(f"--out {str(run)!r} is a file; pass a folder path that does not exist")
    if not overwrite:
        raise RunError(
            f"run folder {str(run)!r} already exists; pass another --out, replace it with --overwrite, or "
            f"continue it with 'lstmkit train --resume {run}'"
        )
    is_run = (run / RUN_FILE).is_file() or not any(run.iterdir())
    if not is_run:
        raise RunError(f"--overwrite: {str(run)!r} is not a run folder ({RUN_FILE} is missing); not replacing it")


def train_run(
    spec: DataSpec,
    *,
    params: Optional[dict] = None,
    run_dir: Optional[str | os.PathLike] = None,
    resume: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    progress: bool = False,
    on_epoch_end=None,
    log=print,
) -> RunResult:
    """Check everything, then train, evaluate on the test split and write the run folder (rank 0 only).

    The folder gets ``run.json`` (data source with absolute paths, and parameters; written once the
    data has been read and checked, so that ``resume`` can rebuild the run), ``checkpoint.pt`` after
    every epoch, then the model (``model.safetensors`` + ``model.json``), the figures and, last,
    ``metrics.json``. A failure before the first checkpoint removes the folder; Ctrl-C raises
    :class:`RunInterrupted`.
    """
    if resume is not None:
        run = Path(resume)
        spec, saved_params = read_run(run)
        if (run / METRICS_FILE).is_file():
            raise RunError(_finished_message(run))
        # the data and training options are the run's; only where it runs may change
        params = {
            **saved_params,
            **{k: v for k, v in (params or {}).items() if k in ("device", "num_threads") and v is not None},
        }
        clf = _check_params(params)
    else:
        params = _params_from(params or {})
        clf = _check_params(params)
        spec = spec.checked()
        run = Path(run_dir) if run_dir is not None else default_run_dir(spec)
        if D.is_active():  # the timestamped default must be the same folder on every rank
            holder = [str(run)]
            torch.distributed.broadcast_object_list(holder, src=0)
            run = Path(holder[0])
        if D.is_main():
            _prepare_folder(run, overwrite)
    clf.set_params(progress=progress)

    train, test = load_split(spec, int(params["seed"]))
    check_training_data(train, test, params.get("impute"))

    if resume is None:
        if D.is_main():
            if run.exists():
                shutil.rmtree(run)  # --overwrite, checked above
            run.mkdir(parents=True)
            write_json(run / RUN_FILE, {"data": asdict(spec), "params": params})
        D.barrier()

    ckpt = run / CHECKPOINT_FILE
    resuming = resume is not None and ckpt.is_file()
    if D.is_main():
        what = "resuming" if resuming else "training"
        log(
            f"{what}: {spec.describe()}; {len(train)} train / {len(test)} test cases, "
            f"{plural(train.n_features, 'feature')}; {plural(D.world_size(), 'process', 'processes')}; run folder {run}"
        )
    session_seconds = []

    def epoch_done(epoch: int, history: dict) -> None:
        session_seconds.append(history["seconds"][-1])
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)

    try:
        clf.fit(train.X, train.y, checkpoint_path=ckpt, resume=resuming, on_epoch_end=epoch_done)
    except BaseException as exc:
        resumable = ckpt.is_file()
        if D.is_main() and resume is None and not resumable and run.is_dir():
            shutil.rmtree(run, ignore_errors=True)  # nothing to resume: leave nothing behind
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(run, resumable) from None
        raise
    result = RunResult(run)
    if D.is_main():
        y_test = align_labels(np.asarray(test.y), clf.classes_, test.source)
        metrics = metrics_for(clf, test.X, y_test)
        h = clf.history_
        best = h["best_epoch"]
        has_val = any(v is not None for v in h["val_loss"])
        result.metrics = {
            "data": spec.describe(),
            "test": metrics,
            "test_accuracy": metrics["accuracy"],
            # both sums of per-epoch times: this session's epochs, and every epoch of the run
            "train_seconds_this_session": float(sum(session_seconds)),
            "train_seconds_total": float(sum(h["seconds"])),
            "epochs_run": len(h["epoch"]),
            "best_epoch": best if has_val else None,
            "best_val_accuracy": h["val_acc"][best - 1] if has_val and best > 0 else None,
            "processes": D.world_size(),
            # the threads the training used (the estimator's num_threads, else torch's setting)
            "torch_threads": int(clf.num_threads) if clf.num_threads is not None else torch.get_num_threads(),
            "device": str(next(clf.model_.parameters()).device),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "params": params,
        }
        clf.save(run)
        from ._plots import confusion_matrix_plot, learning_curve

        learning_curve(h, run / CURVE_FILE, title=f"{run.name}: {spec.describe()}")
        confusion_matrix_plot(
            np.asarray(metrics["confusion_matrix"]), clf.classes_.tolist(), run / CONFUSION_FILE,
            title=f"{run.name}: test accuracy {metrics['accuracy']:.4f}",
        )
        write_json(run / METRICS_FILE, result.metrics)  # last: its presence marks the run finished
        n_epochs = len(h["epoch"])
        restored = f", best epoch {best} restored" if has_val else ""
        log(
            f"test accuracy: {metrics['accuracy']:.4f} ({plural(metrics['n_cases'], 'case')}); "
            f"{plural(n_epochs, 'epoch')} in {sum(h['seconds']):.1f} s{restored}"
        )
        log(f"wrote {run}/: {', '.join(OUTPUT_FILES)}")
    D.barrier()
    return result


def load_model(path: str | os.PathLike, device: str = "cpu") -> LSTMSequenceClassifier:
    return LSTMSequenceClassifier.load(path, device=device)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2)
