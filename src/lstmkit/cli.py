"""The ``lstmkit`` command line: a thin argparse layer over :mod:`lstmkit.classify` and ``lstmkit.bench``.

    lstmkit train                       # JapaneseVowels (bundled), default settings
    lstmkit train --data train.csv --test-data test.csv --out runs/mine
    lstmkit train --resume runs/mine    # continue an interrupted run
    lstmkit evaluate runs/mine          # the run's own test split; or --data FILE / --dataset NAME
    lstmkit predict runs/mine --data new.csv --out predictions.csv
    lstmkit datasets
    torchrun --nproc-per-node 2 -m lstmkit train      # DistributedDataParallel

Building the parser, ``--help``, ``--version`` and ``datasets`` import nothing heavy (no torch,
scikit-learn or aeon): the commands import what they use when they run. Every user error is one
line on stderr, ``lstmkit COMMAND: error: what, where; how to fix``, with exit status 1 (2 for
misused options), and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from lstmkit import __version__
from lstmkit.classify._defaults import CHOICES, DEFAULTS

# options that map one-to-one onto estimator parameters: (flag, parameter, type, help); the allowed
# values and ranges are the estimator's (lstmkit.classify._estimator.check_params), its errors are
# reported with these flags
_HYPER = [
    ("--hidden-size", "hidden_size", int, "LSTM hidden size"),
    ("--num-layers", "num_layers", int, "LSTM layers"),
    ("--pooling", "pooling", str, "sequence readout over each case's valid steps"),
    ("--dropout", "dropout", float, "dropout between layers and before the head, in [0, 1)"),
    ("--lr", "lr", float, "AdamW learning rate (cosine decay to lr/100)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--epochs", "epochs", "int_or_auto",
     "most epochs (early stopping may end sooner); auto: >= 60 epochs and >= 500 optimizer steps"),
    ("--batch-size", "batch_size", int, "cases per step (global, across processes)"),
    ("--validation-fraction", "validation_fraction", float,
     "share held out for early stopping, in [0, 1) (0: none, train on everything)"),
    ("--patience", "patience", int, "epochs without improvement before stopping"),
    ("--monitor", "monitor", str, "validation score whose best weights are kept"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clip (0: off)"),
    ("--noise", "noise", float, "std of Gaussian noise on standardized training inputs (0: off)"),
    ("--impute", "impute", str,
     "replace NaN/inf: zero (the feature's training mean) or ffill (the last finite value); "
     "without it they are an error"),
    ("--seed", "seed", int, "seed for weights, splits and shuffling"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--backend", "backend", str, "lstmkit LSTM backend (auto picks the fastest that can run on the device)"),
    ("--threads", "num_threads", int, "torch CPU threads per process (small LSTMs gain nothing from more)"),
]
#: estimator parameter -> the flag that sets it, for error messages
_FLAGS = {dest: flag for flag, dest, _, _ in _HYPER} | {
    "bidirectional": "--bidirectional/--unidirectional", "class_weight": "--class-weight",
    "standardize": "--no-standardize", "channels_first": "--channels-first", "progress": "--progress",
}
_EXTRA_MODULES = ("sklearn", "aeon", "safetensors", "tqdm", "matplotlib")


class CLIError(Exception):
    """Options that do not go together; reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) that point to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def int_or_auto(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def _choices(dest: str) -> Optional[list]:
    allowed = CHOICES.get(dest)
    return None if allowed is None else [v for v in allowed if v is not None]


def _default_text(dest: str) -> str:
    value = DEFAULTS.get(dest)
    return "none" if value is None else str(value)


def _add_data_args(p: argparse.ArgumentParser, *, model_command: bool) -> None:
    g = p.add_mutually_exclusive_group()
    if model_command:
        g.add_argument("--dataset", help="a bundled dataset (see 'lstmkit datasets') instead of the run's own data")
        g.add_argument("--data", help="a .ts, .npz or .csv (long format) file instead of the run's own data")
        p.add_argument("--split", choices=["train", "test"],
                       help="split of --dataset or of the run's own data (default: test)")
    else:
        g.add_argument("--dataset", help="a bundled dataset (see 'lstmkit datasets'; default: JapaneseVowels)")
        g.add_argument("--data", help="a .ts, .npz or .csv (long format) file")
    p.add_argument(
        "--channels-first", action="store_true",
        help=".npz X is (n_cases, n_channels, n_timepoints) (aeon/sktime layout) instead of "
        "(n_cases, n_steps, n_features)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lstmkit", description="Sequence classification with lstmkit's LSTM.",
        epilog="'lstmkit COMMAND --help' describes each command. Guide: docs/classify.md",
    )
    parser.add_argument("--version", action="version", version=f"lstmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a classifier and write a run folder",
        description="Train an LSTM sequence classifier and write a run folder (model, metrics, plots). With no "
        "arguments: the bundled JapaneseVowels, default settings. Everything is checked before the folder is "
        "created; a run that fails before its first epoch leaves no folder.",
    )
    _add_data_args(t, model_command=False)
    t.add_argument("--test-data", help="test file for --data (default: hold out --test-fraction of --data)")
    t.add_argument("--test-fraction", type=float, default=None,
                   help="held-out test share of --data when there is no --test-data, between 0 and 1 (default: 0.2)")
    t.add_argument("--out", help="run folder to create (default: runs/<data>-<timestamp>); must not exist")
    t.add_argument("--overwrite", action="store_true", help="replace the run folder --out if it exists")
    t.add_argument("--resume", metavar="RUN",
                   help="continue the interrupted run in folder RUN from its last checkpoint")
    for flag, dest, typ, helptext in _HYPER:
        t.add_argument(flag, dest=dest, type=int_or_auto if typ == "int_or_auto" else typ, default=None,
                       choices=_choices(dest), help=f"{helptext} (default: {_default_text(dest)})")
    t.add_argument("--bidirectional", dest="bidirectional", action="store_true", default=None,
                   help=f"bidirectional LSTM (default: {DEFAULTS['bidirectional']})")
    t.add_argument("--unidirectional", dest="bidirectional", action="store_false", help="one direction only")
    t.add_argument("--class-weight", dest="class_weight", choices=["balanced"], default=None,
                   help="weight the loss by inverse class frequency (default: unweighted)")
    t.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                   help="do not standardize features (default: standardize with the training mean and std)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")

    e = sub.add_parser(
        "evaluate", help="accuracy, macro F1, per-class scores and confusion matrix of a trained model",
        description="Score a trained model on labelled data: by default the test split of the data its run "
        "was trained on.",
    )
    e.add_argument("model", help="a run folder, or a folder written by LSTMSequenceClassifier.save")
    _add_data_args(e, model_command=True)
    e.add_argument("--json", dest="json_out", metavar="FILE",
                   help="write the metrics as JSON to FILE ('-': print JSON instead of the table)")
    e.add_argument("--impute", choices=_choices("impute"),
                   help="replace NaN/inf: zero or ffill (default: the model's own setting)")

    p = sub.add_parser(
        "predict", help="predict labels for sequences",
        description="Predict labels and class probabilities, one row per sequence, keyed by the input's "
        "sequence_id (CSV), ids (.npz) or position (.ts, bundled sets).",
    )
    p.add_argument("model", help="a run folder, or a folder written by LSTMSequenceClassifier.save")
    _add_data_args(p, model_command=True)
    p.add_argument("--out", help="write predictions as CSV here (default: stdout)")
    p.add_argument("--impute", choices=_choices("impute"),
                   help="replace NaN/inf: zero or ffill (default: the model's own setting)")

    sub.add_parser("datasets", help="list the bundled datasets", description="List the bundled datasets.")

    b = sub.add_parser("bench", help="the benchmark suite (lstmkit.bench)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    w = sub.add_parser("warmup", help="compile the CPU kernels into the on-disk cache (images, CI caches)",
                       add_help=False)
    w.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -------------------------------------------------------------------------------------------- train


def _cmd_train(args) -> int:
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _HYPER}
    overrides.update(bidirectional=args.bidirectional, class_weight=args.class_weight, standardize=args.standardize)
    if args.resume is not None:
        given = ["--" + k.replace("_", "-") for k, v in overrides.items()
                 if v is not None and k not in ("device", "num_threads")]
        given += [f for f, v in (("--data", args.data), ("--dataset", args.dataset), ("--out", args.out),
                                 ("--test-data", args.test_data), ("--test-fraction", args.test_fraction))
                  if v is not None]
        given += ["--overwrite"] if args.overwrite else []
        given += ["--channels-first"] if args.channels_first else []
        if given:
            raise CLIError(
                f"--resume takes the data and options from {args.resume}/run.json; drop {', '.join(given)}"
            )
    if args.test_data is not None and args.data is None:
        raise CLIError("--test-data needs --data (bundled datasets have their own test split)")
    if args.test_fraction is not None and (args.data is None or args.test_data is not None):
        raise CLIError("--test-fraction applies only to --data without --test-data")

    from lstmkit.classify import _distributed as D
    from lstmkit.classify._runs import DataSpec, RunInterrupted, train_run
    from lstmkit.memory import keep_freed_memory

    keep_freed_memory()  # this process is a training loop: no page faults on each step's buffers (lstmkit.memory)
    spec = DataSpec(
        dataset=args.dataset or ("JapaneseVowels" if args.data is None else None),
        data=args.data, test_data=args.test_data,
        channels_first=args.channels_first,
        **({} if args.test_fraction is None else {"test_fraction": args.test_fraction}),
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    D.init_from_env(overrides.get("device") or "auto")
    try:
        train_run(spec, params=overrides, run_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                  progress=progress)
    except RunInterrupted as exc:
        if D.is_main():
            if exc.resumable:
                print(f"\ninterrupted; the last finished epoch is checkpointed. Continue with: "
                      f"lstmkit train --resume {exc.run_dir}", file=sys.stderr)
            elif args.resume is None:
                print(f"\ninterrupted before the first epoch finished; nothing to resume, {exc.run_dir} removed",
                      file=sys.stderr)
            else:
                print("\ninterrupted before the first epoch finished", file=sys.stderr)
        return 130
    finally:
        D.shutdown()
    return 0


# ---------------------------------------------------------------------------------- evaluate/predict


def _check_output(path: Optional[str], flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if path is None or path == "-":
        return
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; pass a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: the folder {str(parent)!r} does not exist; create it or pass another path")


def _load_model(args):
    from pathlib import Path

    from lstmkit.classify import LSTMSequenceClassifier
    from lstmkit.classify._runs import CHECKPOINT_FILE, RUN_FILE

    path = Path(args.model)
    if path.is_dir() and (path / RUN_FILE).is_file() and not (path / "model.json").is_file():
        state = "was interrupted" if (path / CHECKPOINT_FILE).is_file() else "has not finished"
        raise CLIError(f"run {str(path)!r} {state}: it has no model yet; continue it with "
                       f"'lstmkit train --resume {path}'")
    clf = LSTMSequenceClassifier.load(path)
    if args.impute is not None:
        clf.impute = args.impute
    return clf


def _read(args, clf, labels: bool):
    """The cases to score (with labels) or predict, and a description: --data, --dataset, else the run's
    own data; checked against the model (features) and for NaN/inf."""
    from pathlib import Path

    from lstmkit.classify._io import read_cases
    from lstmkit.classify._runs import RUN_FILE, check_features, check_finite, load_bundled, run_data

    if args.data is not None:
        if args.split is not None:
            raise CLIError("--split applies to --dataset and to the run's own data, not to --data FILE")
        cases = read_cases(args.data, labels=labels, channels_first=args.channels_first)
        description = args.data
    elif args.dataset is not None:
        cases = load_bundled(args.dataset, args.split or "test")
        description = cases.source
    elif (Path(args.model) / RUN_FILE).is_file():
        cases, description = run_data(Path(args.model), args.split or "test")
    else:
        raise CLIError(f"{args.model} is a saved model without the {RUN_FILE} of a run, so it has no data of "
                       "its own; pass --data FILE or --dataset NAME")
    check_features(cases, clf.n_features_in_, f"the model in {args.model}")
    check_finite(cases, clf.impute)
    return cases, description


def _cmd_evaluate(args) -> int:
    import json

    import numpy as np

    from lstmkit.classify._checkpoint import write_json
    from lstmkit.classify._runs import align_labels, format_metrics, metrics_for

    _check_output(args.json_out, "--json")
    clf = _load_model(args)
    cases, description = _read(args, clf, labels=True)
    y = align_labels(np.asarray(cases.y), clf.classes_, cases.source)
    m = metrics_for(clf, cases.X, y)
    m["data"] = description
    if args.json_out == "-":
        print(json.dumps(m, indent=2))
        return 0
    print(format_metrics(m, description))
    if args.json_out:
        write_json(args.json_out, m)
        print(f"\nwrote {args.json_out}")
    return 0


def _cmd_predict(args) -> int:
    import csv

    from lstmkit.classify._checkpoint import atomic_write

    _check_output(args.out, "--out")
    clf = _load_model(args)
    cases, description = _read(args, clf, labels=False)
    proba = clf.predict_proba(cases.X)
    pred = clf.classes_[proba.argmax(1)]
    header = ["sequence_id", "prediction", *[f"p_{c}" for c in clf.classes_.tolist()]]
    rows = [[sid, p, *[f"{v:.6f}" for v in row]] for sid, p, row in zip(cases.ids, pred.tolist(), proba)]

    def write(fh):
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)

    if args.out:
        def to_file(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                write(fh)

        atomic_write(args.out, to_file)
        print(f"wrote {len(rows)} predictions for {description} to {args.out}", file=sys.stderr)
    else:
        write(sys.stdout)
    return 0


# ----------------------------------------------------------------------------------- datasets/bench


def _cmd_datasets(args) -> int:
    from lstmkit.classify._datasets import DATASETS

    print(f"{'name':<18} {'train':>5} {'test':>5} {'chan':>4} {'length':>8} {'classes':>7}  description")
    for name, info in DATASETS.items():
        lo, hi = info.lengths
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        print(f"{name:<18} {info.n_train:>5} {info.n_test:>5} {info.n_channels:>4} {span:>8} "
              f"{info.n_classes:>7}  {info.description}")
    print("\nAlso: --data FILE with .ts (UEA/UCR), .npz (X, y, optional lengths and ids) or long-format .csv.")
    return 0


def _cmd_warmup(args) -> int:
    from lstmkit import _warmup

    return int(_warmup.main(args.args, prog="lstmkit warmup") or 0)


def _cmd_bench(args) -> int:
    try:
        from lstmkit import bench
    except ImportError as exc:
        raise CLIError(f"'lstmkit bench' needs the benchmark suite lstmkit.bench, not available here ({exc})") from exc
    rc = bench.main(args.args)
    return int(rc or 0)


# ------------------------------------------------------------------------------------------------ main


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _message(exc: BaseException) -> str:
    estimator = sys.modules.get("lstmkit.classify._estimator")  # a ParamError exists only once it is imported
    if estimator is not None and isinstance(exc, estimator.ParamError):
        flag = _FLAGS.get(exc.param)
        return str(exc) if flag is None else f"{flag}: {exc.detail.replace('None or ', '')}"
    if isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.filename}: no such file or folder"
    return str(exc)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``lstmkit`` console script and ``python -m lstmkit``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("bench", "warmup"):  # everything after it belongs to lstmkit.bench / warmup
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {
        "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
        "datasets": _cmd_datasets, "bench": _cmd_bench, "warmup": _cmd_warmup,
    }[args.command]
    prefix = f"lstmkit {args.command}: error:"
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"\nlstmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (lstmkit predict ... | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in _EXTRA_MODULES:
            print(f"{prefix} needs the 'classify' extra: pip install 'lstmkit[classify]' ({_one_line(exc)})",
                  file=sys.stderr)
            return 1
        raise
    except CLIError as exc:
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, TypeError) as exc:
        if os.environ.get("LSTMKIT_TRACEBACK"):
            raise
        print(f"{prefix} {_one_line(_message(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
