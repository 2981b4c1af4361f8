"""LSTMSequenceClassifier: a scikit-learn estimator for labelled sequences on lstmkit.LSTMClassifier."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from . import _distributed as D
from ._checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from ._data import Standardizer, as_cases, check_finite, pad
from ._defaults import AUTO_MIN_EPOCHS, AUTO_MIN_STEPS, CHOICES, DEFAULTS, MAX_SIZES, MAX_THREADS
from ._modelfile import CONFIG_FILE, FORMAT, WEIGHTS_FILE, check_folder, read_config, read_weights
from ._train import Batches, TrainConfig, train


def _unique_labels(y: np.ndarray) -> np.ndarray:
    try:
        return np.unique(y)
    except TypeError:  # labels of mixed, unorderable types: keep first-appearance order
        seen: dict = {}
        for v in y:
            seen.setdefault(v, None)
        out = np.empty(len(seen), dtype=object)
        out[:] = list(seen)
        return out


def _plain(v):
    """A NumPy scalar as the Python value JSON can hold."""
    return v.item() if isinstance(v, np.generic) else v


@contextmanager
def _torch_threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` inside the block (None: unchanged), then restored."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", "0")) if D.is_active() else torch.cuda.current_device()
            return torch.device("cuda", index)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} requested but there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is None and D.is_active():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


class ParamError(ValueError):
    """A parameter outside its type or range; ``param`` is its name, ``detail`` what was expected."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


def check_params(params: dict) -> None:
    """Check estimator parameters (a ``get_params()`` mapping; missing names are not checked).

    Raises :class:`ParamError` naming the parameter, the expected values and the value given.
    """

    def fail(name, expected):
        raise ParamError(name, f"expected {expected}, got {params[name]!r}")

    def check(name, ok, expected):
        if name in params and not ok(params[name]):
            fail(name, expected)

    def int_in(lo, hi=None):
        return lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi)

    def real_in(lo, hi, *, lo_open=False, hi_open=False):
        def ok(v):
            if not _is_real(v):
                return False
            v = float(v)
            return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

        return ok

    def boolean(v):
        return isinstance(v, (bool, np.bool_))

    for name, hi in (("hidden_size", MAX_SIZES["hidden_size"]), ("num_layers", MAX_SIZES["num_layers"]),
                     ("batch_size", None)):
        check(name, int_in(1, hi), "a positive integer" if hi is None else f"an integer in [1, {hi}]")
    check("epochs", lambda v: v == "auto" or int_in(1)(v), "a positive integer or 'auto'")
    check("dropout", real_in(0.0, 1.0, hi_open=True), "a number in [0, 1)")
    check("lr", real_in(0.0, None, lo_open=True), "a positive number")
    check("weight_decay", real_in(0.0, None), "a number >= 0")
    check("validation_fraction", real_in(0.0, 1.0, hi_open=True), "a number in [0, 1)")
    check("patience", lambda v: v is None or int_in(1)(v), "None or a positive integer")
    check("grad_clip", lambda v: v is None or real_in(0.0, None)(v), "None or a number >= 0 (0: off)")
    check("noise", real_in(0.0, None), "a number >= 0")
    check("seed", int_in(0, 2**32 - 1), f"an integer in [0, {2**32 - 1}]")
    check("num_threads", lambda v: v is None or int_in(1, MAX_THREADS)(v),
          f"None or an integer in [1, {MAX_THREADS}]")
    for name in ("bidirectional", "standardize", "channels_first", "progress"):
        check(name, boolean, "True or False")
    for name, allowed in CHOICES.items():
        check(name, lambda v, allowed=allowed: isinstance(v, (str, type(None))) and v in allowed,
              f"one of {list(allowed)}")
    check("device", lambda v: isinstance(v, str), "'auto', 'cpu', 'cuda' or 'cuda:N'")

    def class_weight_ok(v):
        if v is None or v == "balanced":
            return True
        return isinstance(v, dict) and all(_is_real(w) and float(w) >= 0 for w in v.values())

    check("class_weight", class_weight_ok, "None, 'balanced' or a dict {label: weight >= 0}")


class LSTMSequenceClassifier(ClassifierMixin, BaseEstimator):
    """Sequence classifier: standardize, pad with lengths, train an :class:`lstmkit.LSTMClassifier`.

    X is a list of ``(n_steps, n_features)`` arrays (lengths may differ), a 3-D array
    ``(n_cases, n_steps, n_features)`` or a 2-D array ``(n_cases, n_steps)`` of univariate series.
    With ``channels_first=True`` each case is ``(n_channels, n_timepoints)`` (the aeon/sktime layout).
    y holds any hashable labels. Padding is never read: only each case's valid steps feed the head.

    Args:
        hidden_size, num_layers, bidirectional, dropout: the LSTM (dropout between layers).
        pooling: how a case's outputs become one vector for the head: ``"max"`` (default) or ``"mean"``
            over its valid steps, ``"last"`` (the last valid step), ``"last+mean"`` (both, concatenated).
        lr, weight_decay: AdamW; the learning rate decays on a cosine to lr/100 over ``epochs``.
        epochs: the most epochs (early stopping may end sooner), or ``"auto"``: at least 60 epochs and
            at least 500 optimizer steps (small training sets get more epochs).
        batch_size: cases per optimizer step (the global batch under distributed training).
        validation_fraction: share of the training cases held out (stratified) for early stopping;
            0 trains on everything for ``epochs`` epochs.
        patience: epochs without a better validation score before stopping; None never stops early.
            The weights of the best validation score are restored at the end.
        monitor: the validation score: ``"loss"`` (lowest loss) or ``"acc"`` (highest accuracy,
            ties to the lowest loss).
        grad_clip: gradient-norm clipping (None or 0: off).
        noise: standard deviation of Gaussian noise added to the standardized training inputs
            (augmentation; 0: off).
        class_weight: None, ``"balanced"`` or ``{label: weight}`` for the training loss.
        standardize: scale each feature with the training set's mean and standard deviation.
        impute: None (NaN/inf in X raises, naming the case), ``"zero"`` (missing values take the
            feature's training mean) or ``"ffill"`` (last finite value of the case, else the mean).
        channels_first: read cases as ``(n_channels, n_timepoints)``.
        seed: seeds weights, the validation split and shuffling.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        backend: lstmkit LSTM backend (``"auto"`` picks the fastest for the device).
        num_threads: torch CPU threads while fitting and predicting (restored afterwards); None keeps
            torch's setting. The default 1 suits small LSTMs, whose per-step products are too small
            to split across cores (2 threads ran 5-20x slower on a busy 2-core machine); raise it
            for a large ``hidden_size``.
        progress: show a tqdm progress bar on stderr while training.

    Example::

        >>> from lstmkit.classify import LSTMSequenceClassifier, load_dataset
        >>> X, y = load_dataset("JapaneseVowels", "train")
        >>> clf = LSTMSequenceClassifier().fit(X, y)
        >>> Xt, yt = load_dataset("JapaneseVowels", "test")
        >>> clf.score(Xt, yt)  # doctest: +SKIP
        0.98...
    """

    def __init__(
        self,
        hidden_size: int = DEFAULTS["hidden_size"],
        num_layers: int = DEFAULTS["num_layers"],
        bidirectional: bool = DEFAULTS["bidirectional"],
        pooling: str = DEFAULTS["pooling"],
        dropout: float = DEFAULTS["dropout"],
        lr: float = DEFAULTS["lr"],
        weight_decay: float = DEFAULTS["weight_decay"],
        epochs: int | str = DEFAULTS["epochs"],
        batch_size: int = DEFAULTS["batch_size"],
        validation_fraction: float = DEFAULTS["validation_fraction"],
        patience: Optional[int] = DEFAULTS["patience"],
        monitor: str = DEFAULTS["monitor"],
        grad_clip: Optional[float] = DEFAULTS["grad_clip"],
        noise: float = DEFAULTS["noise"],
        class_weight=DEFAULTS["class_weight"],
        standardize: bool = DEFAULTS["standardize"],
        impute: Optional[str] = DEFAULTS["impute"],
        channels_first: bool = DEFAULTS["channels_first"],
        seed: int = DEFAULTS["seed"],
        device: str = DEFAULTS["device"],
        backend: str = DEFAULTS["backend"],
        num_threads: Optional[int] = DEFAULTS["num_threads"],
        progress: bool = False,
    ):
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.pooling = pooling
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.monitor = monitor
        self.grad_clip = grad_clip
        self.noise = noise
        self.class_weight = class_weight
        self.standardize = standardize
        self.impute = impute
        self.channels_first = channels_first
        self.seed = seed
        self.device = device
        self.backend = backend
        self.num_threads = num_threads
        self.progress = progress

    # ------------------------------------------------------------------------------ checks

    def _check_params(self) -> None:
        """Check every parameter's type and range; :class:`ParamError` names the first bad one."""
        check_params(self.get_params())

    def _check_device(self) -> torch.device:
        """The device to train on, checked along with the backend's ability to run there."""
        try:
            device = _resolve_device(self.device)
        except ValueError as exc:
            raise ParamError("device", str(exc).removeprefix("device: ")) from None
        from lstmkit.backends import resolve

        try:
            resolve(self.backend, device, torch.float32)
        except (RuntimeError, ValueError) as exc:
            raise ParamError("backend", str(exc).removeprefix("backend: ")) from None
        return device

    def _cases(self, X, name: str = "X") -> list[np.ndarray]:
        cases = as_cases(X, channels_first=self.channels_first, name=name)
        if hasattr(self, "n_features_in_") and cases[0].shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {cases[0].shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input (per time step)"
            )
        check_finite(cases, self.impute, name)
        return cases

    @staticmethod
    def _labels(y, n_cases: int) -> np.ndarray:
        if y is None:
            raise ValueError(f"{LSTMSequenceClassifier.__name__} requires y to be passed, but the target y is None")
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            from sklearn.utils.validation import column_or_1d

            y = column_or_1d(y, warn=True)
        if y.ndim != 1:
            raise ValueError(f"y: expected a 1-D array of labels, got shape {y.shape}")
        if y.dtype.kind in "fc" and len(y) and np.isfinite(y).all() and not np.all(np.mod(y, 1) == 0):
            raise ValueError(
                "Unknown label type: continuous (y holds non-integer floats; a classifier needs class labels)"
            )
        if len(y) != n_cases:
            raise ValueError(f"y: expected {n_cases} labels (one per case of X), got {len(y)}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError(f"y contains NaN or inf (first at index {int(np.flatnonzero(~np.isfinite(y))[0])})")
        return y

    # ------------------------------------------------------------------------------ model

    def _build_model(self, n_features: int, n_classes: int) -> torch.nn.Module:
        from lstmkit import LSTMClassifier

        return LSTMClassifier(
            n_features,
            int(self.hidden_size),
            int(self.num_layers),
            n_classes,
            bidirectional=bool(self.bidirectional),
            dropout=float(self.dropout),
            pooling=str(self.pooling),
            batch_first=True,
            backend=self.backend,
        )

    def _class_weights(self, y_idx: np.ndarray) -> Optional[torch.Tensor]:
        k = len(self.classes_)
        if self.class_weight is None:
            return None
        if self.class_weight == "balanced":
            counts = np.bincount(y_idx, minlength=k).astype(np.float64)
            w = np.where(counts > 0, len(y_idx) / (k * np.maximum(counts, 1)), 0.0)
            return torch.tensor(w, dtype=torch.float32)
        w = np.ones(k)
        lookup = {c: i for i, c in enumerate(self.classes_.tolist())}
        for label, weight in self.class_weight.items():
            if label not in lookup:
                raise ValueError(f"class_weight: label {label!r} is not among the classes {self.classes_.tolist()}")
            w[lookup[label]] = float(weight)
        return torch.tensor(w, dtype=torch.float32)

    def _split(self, y_idx: np.ndarray):
        n = len(y_idx)
        n_val = int(round(float(self.validation_fraction) * n))
        if n_val < 1 or n - n_val < 1:
            return np.arange(n), np.arange(0)
        from sklearn.model_selection import train_test_split

        counts = np.bincount(y_idx)
        stratify = y_idx if counts[counts > 0].min() >= 2 and n_val >= (counts > 0).sum() else None
        tr, va = train_test_split(np.arange(n), test_size=n_val, random_state=self.seed, stratify=stratify)
        return np.sort(tr), np.sort(va)

    # ------------------------------------------------------------------------------ fit

    def fit(
        self,
        X,
        y,
        *,
        checkpoint_path: Optional[str | os.PathLike] = None,
        resume: bool = False,
        on_epoch_end: Optional[Callable[[int, dict], None]] = None,
    ) -> LSTMSequenceClassifier:
        """Fit on X, y.

        Args:
            checkpoint_path: write a training checkpoint there after every epoch (atomically).
            resume: continue from ``checkpoint_path`` (it must exist and match X, y and the parameters).
            on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each epoch's checkpoint.
        """
        self._check_params()  # before anything else: num_threads reaches torch below
        device = self._check_device()
        with _torch_threads(self.num_threads):
            return self._fit(X, y, checkpoint_path, resume, on_epoch_end, device)

    def _fit(self, X, y, checkpoint_path, resume, on_epoch_end, device) -> LSTMSequenceClassifier:
        cases = as_cases(X, channels_first=self.channels_first)
        check_finite(cases, self.impute)
        y = self._labels(y, len(cases))
        for attr in ("n_features_in_", "classes_", "model_", "standardizer_", "history_"):
            self.__dict__.pop(attr, None)
        self.classes_ = _unique_labels(y)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y: expected at least 2 classes, got {len(self.classes_)} class ({self.classes_.tolist()})"
            )
        lookup = {c: i for i, c in enumerate(self.classes_.tolist())}
        y_idx = np.asarray([lookup[v] for v in y.tolist()], dtype=np.int64)
        self.n_features_in_ = cases[0].shape[1]

        state = None
        if resume:
            if checkpoint_path is None:
                raise ValueError("resume=True needs checkpoint_path")
            state = load_checkpoint(checkpoint_path)
            if state.get("fingerprint") != self._fingerprint(cases, y_idx):
                raise ValueError(
                    f"checkpoint {str(checkpoint_path)!r} was written for other data or parameters; "
                    "resume with the same data and options"
                )
        tr, va = self._split(y_idx)
        self.standardizer_ = Standardizer.fit([cases[i] for i in tr], enabled=bool(self.standardize))
        z = self.standardizer_.transform(cases, self.impute)
        x_all, len_all = pad(z)
        y_all = torch.from_numpy(y_idx)
        train_data = Batches(x_all[tr], len_all[tr], y_all[tr])
        val_data = Batches(x_all[va], len_all[va], y_all[va]) if len(va) else None

        torch.manual_seed(self.seed)
        model = self._build_model(self.n_features_in_, len(self.classes_)).to(device)
        fingerprint = self._fingerprint(cases, y_idx)

        def write(ckpt: dict) -> None:
            ckpt["fingerprint"] = fingerprint
            save_checkpoint(checkpoint_path, ckpt)

        if self.epochs == "auto":
            steps_per_epoch = math.ceil(len(tr) / int(self.batch_size))
            epochs = max(AUTO_MIN_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps_per_epoch))
        else:
            epochs = int(self.epochs)
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=int(self.batch_size),
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            patience=None if self.patience is None else int(self.patience),
            grad_clip=float(self.grad_clip) if self.grad_clip else None,
            seed=int(self.seed),
            monitor=self.monitor,
            noise=float(self.noise),
        )
        self.history_ = train(
            model,
            train_data,
            val_data,
            cfg,
            device=device,
            class_weights=self._class_weights(y_idx[tr]),
            progress=bool(self.progress),
            resume_state=state,
            checkpoint=write if checkpoint_path is not None else None,
            on_epoch_end=on_epoch_end,
        )
        self.model_ = model.eval()
        return self

    def _fingerprint(self, cases: list[np.ndarray], y_idx: np.ndarray) -> str:
        """Identifies data and parameters, so that a resumed run continues the same training."""
        import hashlib

        h = hashlib.sha256()
        for c in cases:
            h.update(np.ascontiguousarray(c).tobytes())
            h.update(b"|")
        h.update(y_idx.tobytes())
        params = {
            k: v for k, v in self.get_params().items() if k not in ("progress", "device", "epochs", "num_threads")
        }
        h.update(json.dumps(params, sort_keys=True, default=repr).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------------------ predict

    def _device_for_inference(self) -> torch.device:
        return next(self.model_.parameters()).device

    def predict_proba(self, X, batch_size: int = 512) -> np.ndarray:
        """Class probabilities ``(n_cases, n_classes)``, columns in the order of ``classes_``."""
        check_is_fitted(self, "model_")
        check_params({k: getattr(self, k) for k in ("num_threads", "impute", "channels_first")})
        cases = self._cases(X)
        z = self.standardizer_.transform(cases, self.impute)
        device = self._device_for_inference()
        out = []
        self.model_.eval()
        with torch.no_grad(), _torch_threads(self.num_threads):
            for start in range(0, len(z), batch_size):
                x, lengths = pad(z[start : start + batch_size])
                logits = self.model_(x.to(device), lengths)
                out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        return np.concatenate(out, axis=0)

    def predict(self, X) -> np.ndarray:
        """Predicted labels ``(n_cases,)`` taken from ``classes_``."""
        check_is_fitted(self, "model_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.input_tags.allow_nan = self.impute is not None
        return tags

    # ------------------------------------------------------------------------------ persistence

    def _config(self) -> dict:
        classes = self.classes_
        values = classes.tolist()
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise TypeError(
                    f"save: labels must be str, int, float or bool to be stored in JSON, got {type(v).__name__} "
                    f"({v!r}); pickle the estimator instead"
                )
        # the network as fitted (set_params after fit changes the parameters, not the weights)
        lstm = self.model_.lstm
        network = {
            "hidden_size": int(lstm.hidden_size),
            "num_layers": int(lstm.num_layers),
            "bidirectional": bool(lstm.bidirectional),
            "pooling": str(self.model_.pooling),
            "dropout": float(self.model_.head_dropout.p),
        }
        return {
            "format": FORMAT,
            "model": {"input_size": int(self.n_features_in_), **network, "output_size": len(values)},
            "classes": values,
            "classes_dtype": classes.dtype.str if classes.dtype != object else "object",
            "preprocessing": {
                "standardize": bool(self.standardize),
                "mean": self.standardizer_.mean.tolist(),
                "scale": self.standardizer_.scale.tolist(),
                "impute": self.impute,
                "channels_first": bool(self.channels_first),
            },
            "params": {k: _plain(v) for k, v in self.get_params().items() if k != "class_weight"}
            | {"class_weight": self.class_weight if not isinstance(self.class_weight, dict) else None}
            | network,
            "history": getattr(self, "history_", None),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/model.safetensors`` (weights) and ``path/model.json`` (classes, preprocessing,
        hyper-parameters); the folder is created if needed. Returns the folder."""
        check_is_fitted(self, "model_")
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self._config()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        write_json(path / CONFIG_FILE, config)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> LSTMSequenceClassifier:
        """Load a model written by :meth:`save` (or a run folder of ``lstmkit train``).

        Both files are checked before use: ``model.json`` against its schema (types, ranges, the
        class list's length, finite standardization statistics with non-zero scales, one per
        feature) and ``model.safetensors`` against the model ``model.json`` describes (names,
        shapes and dtypes from its header, before any tensor is read; then finite values).
        :class:`ModelFileError` names the file and the field.
        """
        path = Path(path)
        check_folder(path)
        config = read_config(path)
        params = dict(config["params"])
        est = cls(**params)
        est.device = device
        dtype = config["classes_dtype"]
        if dtype == "object":
            classes = np.empty(len(config["classes"]), dtype=object)
            classes[:] = config["classes"]
        else:
            classes = np.asarray(config["classes"], dtype=np.dtype(dtype))
        m, pre = config["model"], config["preprocessing"]
        # the model.json's own description of the network, whatever params says
        est.set_params(**{k: m[k] for k in ("hidden_size", "num_layers", "bidirectional", "pooling", "dropout")})
        est.set_params(**{k: pre[k] for k in ("standardize", "impute", "channels_first")})
        est.classes_ = classes
        est.standardizer_ = Standardizer(np.asarray(pre["mean"]), np.asarray(pre["scale"]))
        est.n_features_in_ = int(m["input_size"])
        with torch.device("meta"):  # shapes only: nothing allocated before the weight file is checked
            shapes = {k: tuple(v.shape) for k, v in est._build_model(est.n_features_in_, len(classes))
                      .state_dict().items()}
        tensors = read_weights(path, shapes)
        model = est._build_model(est.n_features_in_, len(classes))
        model.load_state_dict(tensors)
        est.model_ = model.to(_resolve_device(device)).eval()
        if config.get("history") is not None:
            est.history_ = config["history"]
        return est

    def __getstate__(self):
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return state

    def __setstate__(self, state):
        model_state = state.pop("_model_state", None)
        self.__dict__.update(state)
        if model_state is not None:
            model = self._build_model(self.n_features_in_, len(self.classes_))
            model.load_state_dict(model_state)
            self.model_ = model.eval()
