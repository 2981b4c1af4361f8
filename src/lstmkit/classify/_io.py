"""Reading labelled sequence files: .ts (UEA/UCR, through aeon's loader), .npz and long-format CSV.

Every reader returns ``(X, y)`` with X a list of ``(n_steps, n_features)`` float32 arrays and y a 1-D
array of labels, and raises :class:`DataFileError` naming the file (and the line, for .ts and CSV).
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

SUPPORTED_SUFFIXES = (".ts", ".npz", ".csv")


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names the file and, where known, the line."""


def read_data(
    path: str | os.PathLike, *, labels: bool = True, channels_first: bool = False
) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read a sequence file; the format follows the suffix (.ts, .npz or .csv).

    Args:
        labels: labels are required (else y may be None when the file has none).
        channels_first: .npz ``X`` is ``(n_cases, n_channels, n_timepoints)``.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return read_ts(path, labels=labels)
    if suffix == ".npz":
        return read_npz(path, labels=labels, channels_first=channels_first)
    if suffix == ".csv":
        return read_csv(path, labels=labels)
    raise DataFileError(
        f"data file {str(path)!r}: expected a suffix in {list(SUPPORTED_SUFFIXES)}, got {path.suffix!r}"
    )


# ---------------------------------------------------------------------------------------------- .ts


def _aeon_ts(path: Path):
    from aeon.datasets import load_from_ts_file

    return load_from_ts_file(str(path), return_meta_data=True)


def _failing_line(path: Path, lines: list[str]) -> Optional[int]:
    """The first line whose inclusion makes aeon's loader fail (1-based), by bisection over prefixes.

    aeon parses line by line, so a prefix that stops before the bad line loads; this reports where
    aeon's own parser gives up without a parser of our own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.ts"

        def fails(k: int) -> bool:
            probe.write_text("".join(lines[:k]), encoding="utf-8")
            try:
                X, y, meta = _aeon_ts(probe)
            except Exception:
                return True
            return False

        if not fails(len(lines)):
            return None
        lo, hi = 0, len(lines)  # fails(hi) is True; fails(lo) is False (an empty file loads)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fails(mid):
                hi = mid
            else:
                lo = mid
        return hi


def read_ts(path: str | os.PathLike, labels: bool = True) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read a UEA/UCR .ts file with :func:`aeon.datasets.load_from_ts_file`."""
    path = Path(path)
    try:
        X, y, meta = _aeon_ts(path)
    except FileNotFoundError:
        raise DataFileError(f"data file {str(path)!r} does not exist") from None
    except Exception as exc:
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            raise DataFileError(f"{path}: not a UTF-8 text .ts file ({exc})") from exc
        line = _failing_line(path, lines)
        where = f"{path}:{line}" if line is not None else str(path)
        text = lines[line - 1].strip() if line is not None else ""
        shown = f" (line reads {text[:80]!r})" if text else ""
        raise DataFileError(f"{where}: malformed .ts file: {exc}{shown}") from exc
    if len(X) == 0:
        raise DataFileError(f"{path}: no cases after @data")
    has_labels = bool(meta.get("classlabel", False))
    if labels and not has_labels:
        raise DataFileError(f"{path}: expected class labels (@classLabel true ...), the file has none")
    cases = [np.ascontiguousarray(np.asarray(c, dtype=np.float32).T) for c in X]
    return cases, (np.asarray(y) if has_labels else None)


# --------------------------------------------------------------------------------------------- .npz


def read_npz(
    path: str | os.PathLike, labels: bool = True, channels_first: bool = False
) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read ``X`` (n_cases, n_steps, n_features) or (n_cases, n_steps), ``y`` (n_cases,) and optional
    ``lengths`` (n_cases,): case i is ``X[i, :lengths[i]]``. With ``channels_first`` X is
    ``(n_cases, n_channels, n_timepoints)``."""
    path = Path(path)
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DataFileError(f"{path}: not a readable .npz file (not a zip archive as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        raise DataFileError(
            f"{path}: cannot read .npz ({exc}); object arrays are refused, store padded X with lengths"
        ) from exc
    except Exception as exc:
        raise DataFileError(f"{path}: not a readable .npz file ({exc})") from exc
    for key in ("X", "y") if labels else ("X",):
        if key not in arrays:
            raise DataFileError(f"{path}: expected arrays 'X' and 'y' (and optional 'lengths'), found {sorted(arrays)}")
    X, y = arrays["X"], arrays.get("y")
    if X.ndim == 2:
        X = X[:, :, None]
    elif X.ndim == 3 and channels_first:
        X = X.transpose(0, 2, 1)
    if X.ndim != 3:
        raise DataFileError(f"{path}: 'X' must be (n_cases, n_steps, n_features), got shape {X.shape}")
    if y is not None and (y.ndim != 1 or len(y) != len(X)):
        raise DataFileError(f"{path}: 'y' must be 1-D with {len(X)} labels (one per case of X), got shape {y.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise DataFileError(f"{path}: 'X' must be numeric, got dtype {X.dtype}")
    n_steps = X.shape[1]
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.shape != (len(X),) or not np.issubdtype(lengths.dtype, np.integer):
            raise DataFileError(
                f"{path}: 'lengths' must be integers of shape ({len(X)},), got {lengths.dtype} {lengths.shape}"
            )
        bad = np.flatnonzero((lengths < 0) | (lengths > n_steps))
        if len(bad):
            raise DataFileError(
                f"{path}: lengths[{bad[0]}] = {lengths[bad[0]]} is outside [0, {n_steps}] (X has {n_steps} steps)"
            )
    else:
        lengths = np.full(len(X), n_steps)
    cases = [np.ascontiguousarray(X[i, : lengths[i]], dtype=np.float32) for i in range(len(X))]
    return cases, y


# --------------------------------------------------------------------------------------------- .csv


LABEL_COLUMN_NAMES = ("label", "class", "y", "target")


def read_csv(path: str | os.PathLike, labels: bool = True) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read the long format: a header, then one row per time step:
    ``sequence_id, time_step, feature_1, ..., feature_F, label``.

    With ``labels=False`` the last column is read as the label only if its header is one of
    :data:`LABEL_COLUMN_NAMES`; otherwise every column after ``time_step`` is a feature.

    Rows of one sequence are ordered by ``time_step`` (integers, unique within a sequence); the label
    must be the same on every row of a sequence. Sequences keep the order of their first row.
    """
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open ({exc})") from exc
    steps: dict[str, list[tuple[int, list[float], int]]] = {}
    seq_labels: dict[str, tuple[str, int]] = {}
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFileError(f"{path}: empty file, expected a header line") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataFileError(f"{path}:1: {exc}") from exc
        has_label = labels or header[-1].strip().lower() in LABEL_COLUMN_NAMES
        if len(header) < 3 + has_label:
            raise DataFileError(
                f"{path}:1: expected a header 'sequence_id,time_step,<features...>,label' with at least "
                f"{3 + has_label} columns, got {len(header)}: {header}"
            )
        n_cols = len(header)
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != n_cols:
                    raise DataFileError(f"{path}:{line}: expected {n_cols} columns (as the header), got {len(row)}")
                cells = [cell.strip() for cell in row]
                seq, step, feats = cells[0], cells[1], cells[2 : n_cols - has_label]
                label = cells[-1] if has_label else ""
                try:
                    t = int(step)
                except ValueError:
                    raise DataFileError(f"{path}:{line}: time_step must be an integer, got {step!r}") from None
                try:
                    values = [float(v) for v in feats]
                except ValueError as exc:
                    raise DataFileError(f"{path}:{line}: feature values must be numbers ({exc})") from None
                if seq in seq_labels and seq_labels[seq][0] != label:
                    raise DataFileError(
                        f"{path}:{line}: sequence {seq!r} has label {label!r} here but {seq_labels[seq][0]!r} on "
                        f"line {seq_labels[seq][1]}; a sequence has one label"
                    )
                seq_labels.setdefault(seq, (label, line))
                steps.setdefault(seq, []).append((t, values, line))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataFileError(f"{path}:{reader.line_num}: {exc}") from exc
    if not steps:
        raise DataFileError(f"{path}: no data rows after the header")
    X = []
    for seq, rows in steps.items():
        rows.sort(key=lambda r: r[0])
        for a, b in zip(rows, rows[1:]):
            if a[0] == b[0]:
                raise DataFileError(
                    f"{path}:{b[2]}: sequence {seq!r} repeats time_step {b[0]} (first on line {a[2]})"
                )
        X.append(np.asarray([r[1] for r in rows], dtype=np.float32))
    y = np.asarray([seq_labels[s][0] for s in steps]) if has_label else None
    return X, y


def write_csv(path: str | os.PathLike, X: list[np.ndarray], y, ids=None) -> None:
    """Write sequences in the long CSV format read by :func:`read_csv`."""
    n_features = X[0].shape[1] if X and np.ndim(X[0]) == 2 else 1
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sequence_id", "time_step", *[f"f{j}" for j in range(n_features)], "label"])
        for i, (case, label) in enumerate(zip(X, y)):
            case = np.asarray(case).reshape(len(case), -1)
            sid = ids[i] if ids is not None else i
            for t, row in enumerate(case):
                w.writerow([sid, t, *[repr(float(v)) for v in row], label])
