"""A saved model folder checked against its schema before anything in it reaches the process.

``model.json`` holds the classes, the preprocessing statistics, the hyper-parameters and the training
history; ``model.safetensors`` the weights. :func:`read_config` checks every field's type, range and
the fields' agreement with each other; :func:`read_weights` checks the weight file's names, shapes
and dtypes against the model the config describes (from its header, before reading any tensor) and
that every value is finite. Errors are :class:`ModelFileError` naming the file and the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._checkpoint import read_json
from ._defaults import CHOICES, MAX_SIZES

FORMAT = "lstmkit.classify/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"

#: the numpy dtype kinds a saved class list may have, besides "object"
CLASS_DTYPE_KINDS = "Uiufb"


class ModelFileError(ValueError):
    """A saved model folder is missing a file, or a file does not match the schema; the message names
    the file and the field."""


def check_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelFileError(
            f"{str(path)!r} is a file, not a model folder (a run folder of 'lstmkit train' or a folder "
            "written by LSTMSequenceClassifier.save)"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ModelFileError(f"{str(path)!r} is not a saved model: {name} is missing")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, float) or _is_int(v)) and math.isfinite(v)


class _Checker:
    def __init__(self, file: Path):
        self.file = file

    def fail(self, field: str, message: str):
        raise ModelFileError(f"{self.file}: {field}: {message}")

    def obj(self, value: Any, field: str, keys: tuple, optional: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"expected an object, got {type(value).__name__}")
        missing = [k for k in keys if k not in value]
        if missing:
            self.fail(field, f"missing key(s) {missing}")
        extra = sorted(set(value) - set(keys) - set(optional))
        if extra:
            self.fail(field, f"unknown key(s) {extra}; expected {list(keys) + list(optional)}")
        return value

    def int_in(self, value: Any, field: str, lo: int, hi: int) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            self.fail(field, f"expected an integer in [{lo}, {hi}], got {value!r}")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {value!r}")
        return value

    def choice(self, value: Any, field: str, allowed: tuple) -> Any:
        if not (value is None or isinstance(value, str)) or value not in allowed:
            self.fail(field, f"expected one of {list(allowed)}, got {value!r}")
        return value

    def reals(self, value: Any, field: str, n: int, *, positive: bool = False) -> list:
        if not isinstance(value, list):
            self.fail(field, f"expected a list of {n} numbers, got {type(value).__name__}")
        if len(value) != n:
            self.fail(field, f"expected {n} numbers (one per input feature, model.input_size), got {len(value)}")
        for i, v in enumerate(value):
            if not _is_real(v):
                self.fail(f"{field}[{i}]", f"expected a finite number, got {v!r}")
            if positive and not v > 0:
                self.fail(f"{field}[{i}]", f"expected a number > 0 (a standard deviation), got {v!r}")
        return value


def read_config(folder: Path) -> dict:
    """``folder/model.json``, checked against the schema :meth:`LSTMSequenceClassifier.save` writes."""
    import numpy as np

    file = folder / CONFIG_FILE
    c = _Checker(file)
    config = read_json(file)
    c.obj(config, "top level", ("format", "model", "classes", "classes_dtype", "preprocessing", "params"),
          optional=("history",))
    if config["format"] != FORMAT:
        c.fail("format", f"expected {FORMAT!r}, got {config['format']!r}")

    m = c.obj(config["model"], "model",
              ("input_size", "hidden_size", "num_layers", "output_size", "bidirectional", "pooling", "dropout"))
    for key in ("input_size", "hidden_size", "num_layers"):
        c.int_in(m[key], f"model.{key}", 1, MAX_SIZES[key])
    c.int_in(m["output_size"], "model.output_size", 2, MAX_SIZES["output_size"])
    c.boolean(m["bidirectional"], "model.bidirectional")
    c.choice(m["pooling"], "model.pooling", CHOICES["pooling"])
    if not _is_real(m["dropout"]) or not 0 <= m["dropout"] < 1:
        c.fail("model.dropout", f"expected a number in [0, 1), got {m['dropout']!r}")

    classes = config["classes"]
    if not isinstance(classes, list):
        c.fail("classes", f"expected a list of labels, got {type(classes).__name__}")
    if len(classes) != m["output_size"]:
        c.fail("classes", f"expected {m['output_size']} labels (model.output_size), got {len(classes)}")
    for i, v in enumerate(classes):
        if not isinstance(v, (str, int, float, bool)):
            c.fail(f"classes[{i}]", f"expected a string, number or boolean, got {v!r}")
    if len({(type(v), v) for v in classes}) != len(classes):
        c.fail("classes", "labels repeat; each class appears once")
    dtype = config["classes_dtype"]
    if dtype != "object":
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            np_dtype = None
        if np_dtype is None or np_dtype.kind not in CLASS_DTYPE_KINDS:
            c.fail("classes_dtype", f"expected 'object' or a numpy dtype of kind {list(CLASS_DTYPE_KINDS)}, "
                                    f"got {dtype!r}")
        try:
            same = np.asarray(classes, dtype=np_dtype).tolist() == classes
        except (TypeError, ValueError, OverflowError):
            same = False
        if not same:
            c.fail("classes_dtype", f"the labels do not survive conversion to {dtype!r}")

    pre = c.obj(config["preprocessing"], "preprocessing", ("standardize", "mean", "scale", "impute", "channels_first"))
    c.boolean(pre["standardize"], "preprocessing.standardize")
    c.reals(pre["mean"], "preprocessing.mean", m["input_size"])
    c.reals(pre["scale"], "preprocessing.scale", m["input_size"], positive=True)
    c.choice(pre["impute"], "preprocessing.impute", CHOICES["impute"])
    c.boolean(pre["channels_first"], "preprocessing.channels_first")

    from ._estimator import LSTMSequenceClassifier, ParamError, check_params

    params = config["params"]
    valid = LSTMSequenceClassifier().get_params()
    if not isinstance(params, dict):
        c.fail("params", f"expected an object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(valid))
    if unknown:
        c.fail("params", f"unknown parameter(s) {unknown}")
    try:
        check_params(params)
    except ParamError as exc:
        c.fail(f"params.{exc.param}", exc.detail)
    for key in ("hidden_size", "num_layers", "bidirectional", "pooling", "dropout"):
        if key in params and params[key] != m[key]:
            c.fail(f"params.{key}", f"{params[key]!r} disagrees with model.{key} ({m[key]!r})")
    for key in ("standardize", "impute", "channels_first"):
        if key in params and params[key] != pre[key]:
            c.fail(f"params.{key}", f"{params[key]!r} disagrees with preprocessing.{key} ({pre[key]!r})")

    from ._train import HISTORY_KEYS

    history = config.get("history")
    if history is not None:
        h = c.obj(history, "history", HISTORY_KEYS, optional=("best_epoch",))
        n = len(h["epoch"]) if isinstance(h["epoch"], list) else -1
        for key in HISTORY_KEYS:
            if not isinstance(h[key], list) or len(h[key]) != n:
                c.fail(f"history.{key}", f"expected a list as long as history.epoch ({n})")
            if not all(v is None or _is_real(v) for v in h[key]):
                c.fail(f"history.{key}", "expected numbers or null")
        if "best_epoch" in h:
            c.int_in(h["best_epoch"], "history.best_epoch", -1, max(n, 0))
    return config


def read_weights(folder: Path, expected: dict[str, tuple]) -> dict:
    """``folder/model.safetensors`` as tensors, after checking its names, shapes and dtypes against
    ``expected`` ({name: shape}) from the header alone, and its values for NaN and inf."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = folder / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelFileError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"{file}: the tensors do not match the model in {CONFIG_FILE} (missing {missing[:4]}, unexpected "
            f"{extra[:4]}); the two files come from different models"
        )
    for name, shape in expected.items():
        got, dtype = header[name]
        if got != tuple(shape):
            raise ModelFileError(
                f"{file}: tensor {name!r} has shape {list(got)} but {CONFIG_FILE} describes {list(shape)}; "
                "the two files come from different models"
            )
        if dtype != "F32":
            raise ModelFileError(f"{file}: tensor {name!r} has dtype {dtype}, expected F32")
    try:
        tensors = load_file(str(file))
    except Exception as exc:
        raise ModelFileError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{file}: tensor {name!r} holds NaN or inf values")
    return tensors
