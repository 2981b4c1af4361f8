"""Input checks and preprocessing: cases as (n_steps, n_features) arrays, standardization, imputation,
padding with lengths."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ._defaults import CHOICES

IMPUTE_OPTIONS = CHOICES["impute"]


def as_cases(X, *, channels_first: bool = False, name: str = "X") -> list[np.ndarray]:
    """Convert X to a list of float32 ``(n_steps, n_features)`` arrays, checking shapes.

    Accepted: a sequence of arrays ``(n_steps, n_features)`` or ``(n_steps,)``; a 3-D array
    ``(n_cases, n_steps, n_features)``; a 2-D array ``(n_cases, n_steps)`` (univariate). With
    ``channels_first=True`` each case is ``(n_channels, n_timepoints)`` (aeon/sktime layout) instead.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name}: sparse input is not supported; pass a dense array or a list of arrays")
    if not isinstance(X, (list, tuple, np.ndarray)) and hasattr(X, "__array__"):
        X = np.asarray(X)
    if isinstance(X, np.ndarray) and X.dtype.kind == "c":
        raise ValueError(f"{name}: Complex data not supported")
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] == 0:
        raise ValueError(
            f"{name}: 0 time steps per case: found array with 0 feature(s) (shape={X.shape}) while a "
            "minimum of 1 is required."
        )
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype != object:
        raise ValueError(
            f"{name}: expected a list of cases or a 2-D/3-D array, got a 1-D array of shape {X.shape}. "
            "Reshape your data: one univariate case is X[None, :], one multivariate case is [case]"
        )
    if isinstance(X, np.ndarray) and X.dtype != object:
        if X.ndim == 3:
            raw = list(X)
        elif X.ndim == 2:  # one univariate series per row
            raw = [row[None, :] if channels_first else row[:, None] for row in X]
        else:
            layout = "(n_cases, n_channels, n_timepoints)" if channels_first else "(n_cases, n_steps, n_features)"
            raise ValueError(
                f"{name}: expected a 3-D array {layout}, a 2-D array (n_cases, n_steps) or a list of "
                f"2-D arrays, got an array of shape {X.shape}"
            )
    elif isinstance(X, (list, tuple, np.ndarray)):
        raw = list(X)
    else:
        raise TypeError(f"{name}: expected an array or a list of arrays, got {type(X).__name__}")
    if len(raw) == 0:
        raise ValueError(f"{name}: expected at least one case, got 0")
    cases = []
    n_features = None
    for i, case in enumerate(raw):
        if isinstance(case, torch.Tensor):
            case = case.detach().cpu().numpy()
        if np.iscomplexobj(case):
            raise ValueError(f"{name}[{i}]: Complex data not supported")
        try:
            arr = np.asarray(case, dtype=np.float32)
        except TypeError as exc:
            raise TypeError(f"{name}[{i}]: expected numeric values ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: expected numeric values ({exc})") from None
        if arr.ndim == 1:
            arr = arr[:, None] if not channels_first else arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-D case, got shape {arr.shape}")
        if channels_first:
            arr = arr.T
        if arr.shape[0] == 0:
            raise ValueError(f"{name}[{i}]: empty sequence (0 time steps); every case needs at least one step")
        if n_features is None:
            n_features = arr.shape[1]
        elif arr.shape[1] != n_features:
            raise ValueError(
                f"{name}[{i}]: expected {n_features} features (as {name}[0]), got {arr.shape[1]}"
            )
        cases.append(np.ascontiguousarray(arr))
    if n_features == 0:
        raise ValueError(f"{name}: cases have 0 features")
    return cases


def check_finite(cases: list[np.ndarray], impute: Optional[str], name: str = "X") -> None:
    """Raise naming the first case with NaN or inf, unless ``impute`` will replace them."""
    if impute is not None:
        return
    for i, case in enumerate(cases):
        bad = ~np.isfinite(case)
        if bad.any():
            t, f = np.argwhere(bad)[0]
            raise ValueError(
                f"{name}[{i}] contains NaN or inf (first at step {t}, feature {f}: {case[t, f]}); "
                f"clean the data or pass impute='zero' or impute='ffill'"
            )


class Standardizer:
    """Per-feature mean and standard deviation over every valid step of the training cases."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)

    @classmethod
    def fit(cls, cases: list[np.ndarray], enabled: bool = True) -> Standardizer:
        n_features = cases[0].shape[1]
        if not enabled:
            return cls(np.zeros(n_features), np.ones(n_features))
        allsteps = np.concatenate(cases, axis=0).astype(np.float64)
        allsteps[~np.isfinite(allsteps)] = np.nan
        with np.errstate(all="ignore"):
            finite = np.isfinite(allsteps).any(axis=0)
            mean = np.where(finite, np.nanmean(np.where(finite, allsteps, 0.0), axis=0), 0.0)
            std = np.where(finite, np.nanstd(np.where(finite, allsteps, 0.0), axis=0), 1.0)
        std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(mean, std)

    def transform(self, cases: list[np.ndarray], impute: Optional[str]) -> list[np.ndarray]:
        out = []
        for case in cases:
            z = (case - self.mean) / self.scale
            if impute is not None:
                z = _impute(z, impute)
            out.append(z.astype(np.float32, copy=False))
        return out


def _impute(z: np.ndarray, how: str) -> np.ndarray:
    bad = ~np.isfinite(z)
    if not bad.any():
        return z
    z = z.copy()
    if how == "ffill":
        # carry the last finite value forward; leading gaps take the training mean (0 once standardized)
        idx = np.where(~bad, np.arange(len(z))[:, None], -1)
        np.maximum.accumulate(idx, axis=0, out=idx)
        filled = np.take_along_axis(z, np.maximum(idx, 0), axis=0)
        z = np.where(idx >= 0, filled, 0.0)
        z[~np.isfinite(z)] = 0.0
    else:  # "zero": the training mean of the feature
        z[bad] = 0.0
    return z


def pad(cases: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack cases into ``(n_cases, max_steps, n_features)`` with zeros after each case's end, and
    the lengths ``(n_cases,)``."""
    lengths = torch.tensor([len(c) for c in cases], dtype=torch.long)
    out = torch.zeros(len(cases), int(lengths.max()), cases[0].shape[1], dtype=torch.float32)
    for i, c in enumerate(cases):
        out[i, : len(c)] = torch.from_numpy(c)
    return out, lengths
