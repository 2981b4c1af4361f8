"""The ``lstmkit`` command line: a thin argparse layer over :mod:`lstmkit.classify` and ``lstmkit.bench``.

    lstmkit train                       # JapaneseVowels (bundled), default settings
    lstmkit train --data train.csv --test-data test.csv --out runs/mine
    lstmkit train --resume runs/mine    # continue an interrupted run
    lstmkit evaluate runs/mine --dataset JapaneseVowels
    lstmkit predict runs/mine --data new.ts --out predictions.csv
    lstmkit datasets
    torchrun --nproc-per-node 2 -m lstmkit train      # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def int_or_auto(value: str):
    return value if value == "auto" else int(value)


# options that map one-to-one onto estimator parameters: (flag, parameter, type, help)
_HYPER = [
    ("--hidden-size", "hidden_size", int, "LSTM hidden size"),
    ("--num-layers", "num_layers", int, "LSTM layers"),
    ("--pooling", "pooling", str, "sequence readout: last, mean, max or last+mean (valid steps only)"),
    ("--dropout", "dropout", float, "dropout between layers and before the head"),
    ("--lr", "lr", float, "AdamW learning rate (cosine decay to lr/100)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--epochs", "epochs", int_or_auto,
     "most epochs (early stopping may end sooner); auto: >= 60 epochs and >= 500 optimizer steps"),
    ("--batch-size", "batch_size", int, "cases per step (global, across processes)"),
    ("--validation-fraction", "validation_fraction", float, "share held out for early stopping (0: none)"),
    ("--patience", "patience", int, "epochs without improvement before stopping"),
    ("--monitor", "monitor", str, "validation score to keep the best weights of: loss or acc"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clip (0: off)"),
    ("--noise", "noise", float, "std of Gaussian noise on standardized training inputs (0: off)"),
    ("--impute", "impute", str, "replace NaN/inf: zero (training mean) or ffill (else they are an error)"),
    ("--seed", "seed", int, "seed for weights, splits and shuffling"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--backend", "backend", str, "lstmkit LSTM backend (auto picks the fastest)"),
    ("--threads", "num_threads", int, "torch CPU threads per process (default 1: small LSTMs gain nothing from more)"),
]


class CLIError(Exception):
    pass


def _defaults_help() -> dict:
    from lstmkit.classify import DEFAULTS

    return DEFAULTS


def _add_data_args(p: argparse.ArgumentParser, *, required_labels: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", help="a bundled dataset (see 'lstmkit datasets'); default JapaneseVowels")
    g.add_argument("--data", help="a .ts, .npz or .csv (long format) file")
    p.add_argument(
        "--channels-first", action="store_true",
        help=".npz X is (n_cases, n_channels, n_timepoints) (aeon/sktime layout) instead of "
        "(n_cases, n_steps, n_features)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstmkit", description="Sequence classification with lstmkit's LSTM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train a classifier and write a run folder",
        description="Train an LSTM sequence classifier. With no arguments: JapaneseVowels, default settings.",
    )
    _add_data_args(t)
    t.add_argument("--test-data", help="test file for --data (default: hold out --test-fraction of --data)")
    t.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out test share when --data has no --test-data")
    t.add_argument("--out", help="run folder to create (default runs/<data>-<timestamp>); must not exist")
    t.add_argument("--resume", metavar="RUN",
                   help="continue the interrupted run in folder RUN from its last checkpoint")
    for flag, dest, typ, helptext in _HYPER:
        t.add_argument(flag, dest=dest, type=typ, default=None, help=helptext)
    t.add_argument("--bidirectional", dest="bidirectional", action="store_true", default=None,
                   help="bidirectional LSTM")
    t.add_argument("--unidirectional", dest="bidirectional", action="store_false", help="one direction only")
    t.add_argument("--class-weight", dest="class_weight", choices=["balanced"], default=None,
                   help="weight the loss by inverse class frequency")
    t.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                   help="do not standardize features")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")

    e = sub.add_parser("evaluate", help="accuracy and confusion matrix of a trained model on labelled data")
    e.add_argument("model", help="a run folder or a folder written by LSTMSequenceClassifier.save")
    _add_data_args(e)
    e.add_argument("--split", choices=["train", "test"], default="test", help="split of --dataset (default test)")
    e.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    e.add_argument("--impute", choices=["zero", "ffill"], help="replace NaN/inf instead of refusing them")

    p = sub.add_parser("predict", help="predict labels for sequences")
    p.add_argument("model", help="a run folder or a folder written by LSTMSequenceClassifier.save")
    _add_data_args(p)
    p.add_argument("--split", choices=["train", "test"], default="test", help="split of --dataset (default test)")
    p.add_argument("--out", help="write predictions as CSV here (default: stdout)")
    p.add_argument("--impute", choices=["zero", "ffill"], help="replace NaN/inf instead of refusing them")

    sub.add_parser("datasets", help="list the bundled datasets")

    b = sub.add_parser("bench", help="the benchmark suite (lstmkit.bench)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -------------------------------------------------------------------------------------------- train


def _cmd_train(args) -> int:
    from lstmkit.memory import keep_freed_memory

    keep_freed_memory()  # this process is a training loop: no page faults on each step's buffers (lstmkit.memory)
    from lstmkit.classify import _distributed as D
    from lstmkit.classify._runs import DataSpec, train_run

    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _HYPER}
    overrides.update(bidirectional=args.bidirectional, class_weight=args.class_weight, standardize=args.standardize)
    if args.resume is not None:
        given = ["--" + k.replace("_", "-") for k, v in overrides.items()
                 if v is not None and k not in ("device", "num_threads")]
        given += [f for f, v in (("--data", args.data), ("--dataset", args.dataset), ("--out", args.out),
                                 ("--test-data", args.test_data)) if v is not None]
        if given:
            raise CLIError(
                f"--resume takes the data and options from {args.resume}/run.json; drop {', '.join(given)}"
            )
    if args.test_data is not None and args.data is None:
        raise CLIError("--test-data needs --data (bundled datasets have their own test split)")
    spec = DataSpec(
        dataset=args.dataset or ("JapaneseVowels" if args.data is None else None),
        data=args.data, test_data=args.test_data, test_fraction=args.test_fraction,
        channels_first=args.channels_first,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    D.init_from_env(overrides.get("device") or "auto")
    try:
        result = train_run(spec, params=overrides, run_dir=args.out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        if D.is_main():
            where = args.resume or args.out or "the run folder printed above"
            print(
                f"\ninterrupted; the last finished epoch is checkpointed. Continue with: "
                f"lstmkit train --resume {where}",
                file=sys.stderr,
            )
        return 130
    finally:
        D.shutdown()
    del result
    return 0


# ---------------------------------------------------------------------------------- evaluate/predict


def _load_model(path: str, impute: Optional[str]):
    from lstmkit.classify import LSTMSequenceClassifier

    clf = LSTMSequenceClassifier.load(path)
    if impute is not None:
        clf.impute = impute
    return clf


def _read(args, labels: bool):
    from lstmkit.classify import load_dataset, read_data

    if args.data is not None:
        return read_data(args.data, labels=labels, channels_first=args.channels_first), args.data
    name = args.dataset or "JapaneseVowels"
    return load_dataset(name, args.split), f"{name} ({args.split})"


def _cmd_evaluate(args) -> int:
    import numpy as np

    from lstmkit.classify._checkpoint import write_json
    from lstmkit.classify._runs import align_labels, metrics_for, to_json

    clf = _load_model(args.model, args.impute)
    (X, y), source = _read(args, labels=True)
    y = align_labels(np.asarray(y), clf.classes_, source)
    m = metrics_for(clf, X, y)
    m["data"] = source
    print(f"accuracy: {m['accuracy']:.4f} ({m['n_cases']} cases, {source})")
    print(to_json(m))
    if args.json_out:
        write_json(args.json_out, m)
    return 0


def _cmd_predict(args) -> int:
    import csv

    from lstmkit.classify._checkpoint import atomic_write

    clf = _load_model(args.model, args.impute)
    (X, _), source = _read(args, labels=False)
    proba = clf.predict_proba(X)
    pred = clf.classes_[proba.argmax(1)]
    header = ["case", "prediction", *[f"p_{c}" for c in clf.classes_.tolist()]]
    rows = [[i, p, *[f"{v:.6f}" for v in row]] for i, (p, row) in enumerate(zip(pred.tolist(), proba))]

    def write(fh):
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)

    if args.out:
        def to_file(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                write(fh)

        atomic_write(args.out, to_file)
        print(f"wrote {len(rows)} predictions for {source} to {args.out}", file=sys.stderr)
    else:
        write(sys.stdout)
    return 0


# ----------------------------------------------------------------------------------- datasets/bench


def _cmd_datasets(args) -> int:
    from lstmkit.classify import DATASETS, load_dataset

    print(f"{'name':<18} {'train':>5} {'test':>5} {'chan':>4} {'length':>8} {'classes':>7}  description")
    for name, info in DATASETS.items():
        Xtr, ytr = load_dataset(name, "train")
        Xte, _ = load_dataset(name, "test")
        lengths = [len(c) for c in Xtr + Xte]
        span = f"{min(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
        print(f"{name:<18} {len(Xtr):>5} {len(Xte):>5} {Xtr[0].shape[1]:>4} {span:>8} "
              f"{len(set(ytr.tolist())):>7}  {info.description}")
    print("\nAlso: --data FILE with .ts (UEA/UCR), .npz (X, y, optional lengths) or long-format .csv.")
    return 0


def _cmd_bench(args) -> int:
    try:
        from lstmkit import bench
    except ImportError as exc:
        raise CLIError(f"'lstmkit bench' needs the benchmark suite lstmkit.bench, not available here ({exc})") from exc
    rc = bench.main(args.args)
    return int(rc or 0)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``lstmkit`` console script and ``python -m lstmkit``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":  # everything after 'bench' belongs to lstmkit.bench
        args = argparse.Namespace(command="bench", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {
        "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
        "datasets": _cmd_datasets, "bench": _cmd_bench,
    }[args.command]
    try:
        return handler(args)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("sklearn", "aeon", "safetensors", "tqdm", "matplotlib"):
            print(f"lstmkit {args.command}: needs the 'classify' extra: pip install 'lstmkit[classify]' ({exc})",
                  file=sys.stderr)
            return 1
        raise
    except (CLIError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"lstmkit {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CLIError) else 1


if __name__ == "__main__":
    sys.exit(main())
