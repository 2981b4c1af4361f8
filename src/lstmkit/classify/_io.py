"""Reading labelled sequence files: .ts (UEA/UCR, through aeon's loader), .npz and long-format CSV.

:func:`read_cases` returns :class:`Cases`: X a list of ``(n_steps, n_features)`` float32 arrays, y a
1-D array of labels (or None), each case's id (the CSV's ``sequence_id``, the .npz's optional
``ids``, else its position) and where each case and step sits in the file, so that an error can name
the file, line and sequence. :func:`read_data` returns ``(X, y)``. Every reader raises
:class:`DataFileError` naming the file (and the line, for .ts and CSV).
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

SUPPORTED_SUFFIXES = (".ts", ".npz", ".csv")


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names the file and, where known, the line."""


@dataclass
class Cases:
    """Sequences read from one source, with what it takes to point at any of them.

    ``ids[i]`` identifies case i to the user (a CSV ``sequence_id``, an .npz ``ids`` entry, or the
    case's 0-based position); ``lines[i]`` is the line of case i (.ts: an int) or the line of each of
    its steps (CSV: a list, in step order); None where the source has no lines.
    """

    X: list[np.ndarray]
    y: Optional[np.ndarray]
    ids: list
    source: str
    lines: Optional[list[Union[int, list[int]]]] = None
    feature_names: Optional[list[str]] = None
    #: True when ids come from the file (CSV sequence_id, .npz ids), False when they are positions
    named_ids: bool = False
    path: Optional[Path] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.X)

    @property
    def n_features(self) -> int:
        return int(self.X[0].shape[1])

    def where(self, i: int, step: Optional[int] = None) -> str:
        """``file:line: sequence 'id'`` (CSV), ``file:line: case i`` (.ts) or ``source: case i``."""
        line = None
        if self.lines is not None:
            at = self.lines[i]
            line = at[step if step is not None else 0] if isinstance(at, list) else at
        place = self.source if line is None else f"{self.source}:{line}"
        who = f"sequence {self.ids[i]!r}" if self.named_ids else f"case {self.ids[i]}"
        return f"{place}: {who}"

    def feature_name(self, j: int) -> str:
        if self.feature_names is not None:
            return f"{j} ({self.feature_names[j]!r})"
        return str(j)

    def subset(self, idx) -> Cases:
        idx = [int(i) for i in idx]
        return Cases(
            [self.X[i] for i in idx],
            None if self.y is None else self.y[idx],
            [self.ids[i] for i in idx],
            self.source,
            None if self.lines is None else [self.lines[i] for i in idx],
            self.feature_names,
            self.named_ids,
            self.path,
        )


def read_cases(path: str | os.PathLike, *, labels: bool = True, channels_first: bool = False) -> Cases:
    """Read a sequence file as :class:`Cases`; the format follows the suffix (.ts, .npz or .csv).

    Args:
        labels: labels are required (else y is None when the file has none).
        channels_first: .npz ``X`` is ``(n_cases, n_channels, n_timepoints)``.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} is a folder, not a file")
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return _read_ts(path, labels=labels)
    if suffix == ".npz":
        return _read_npz(path, labels=labels, channels_first=channels_first)
    if suffix == ".csv":
        return _read_csv(path, labels=labels)
    raise DataFileError(
        f"data file {str(path)!r}: expected a suffix in {list(SUPPORTED_SUFFIXES)}, got {path.suffix!r}"
    )


def read_data(
    path: str | os.PathLike, *, labels: bool = True, channels_first: bool = False
) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read a sequence file as ``(X, y)``; the format follows the suffix (.ts, .npz or .csv).

    Args:
        labels: labels are required (else y may be None when the file has none).
        channels_first: .npz ``X`` is ``(n_cases, n_channels, n_timepoints)``.
    """
    cases = read_cases(path, labels=labels, channels_first=channels_first)
    return cases.X, cases.y


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


def _ts_case_lines(lines: list[str], n_cases: int) -> Optional[list[int]]:
    """1-based line of each case: aeon reads one case per line after the ``@data`` line."""
    for k, line in enumerate(lines):
        text = " ".join(line.strip().lower().split())
        if text == "@data":
            if len(lines) - (k + 1) < n_cases:
                return None
            return [k + 2 + i for i in range(n_cases)]
    return None


def read_ts(path: str | os.PathLike, labels: bool = True) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read a UEA/UCR .ts file with :func:`aeon.datasets.load_from_ts_file`."""
    cases = _read_ts(Path(path), labels)
    return cases.X, cases.y


def _read_ts(path: Path, labels: bool = True) -> Cases:
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
    try:
        case_lines = _ts_case_lines(path.read_text(encoding="utf-8").splitlines(), len(cases))
    except (OSError, UnicodeDecodeError):
        case_lines = None
    return Cases(cases, np.asarray(y) if has_labels else None, list(range(len(cases))), str(path),
                 case_lines, path=path)


# --------------------------------------------------------------------------------------------- .npz


def read_npz(
    path: str | os.PathLike, labels: bool = True, channels_first: bool = False
) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """Read ``X`` (n_cases, n_steps, n_features) or (n_cases, n_steps), ``y`` (n_cases,) and optional
    ``lengths`` (n_cases,): case i is ``X[i, :lengths[i]]``. With ``channels_first`` X is
    ``(n_cases, n_channels, n_timepoints)``. An optional ``ids`` (n_cases,) names the cases."""
    cases = _read_npz(Path(path), labels, channels_first)
    return cases.X, cases.y


def _read_npz(path: Path, labels: bool = True, channels_first: bool = False) -> Cases:
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
        bad = np.flatnonzero((lengths < 1) | (lengths > n_steps))
        if len(bad):
            raise DataFileError(
                f"{path}: lengths[{bad[0]}] = {lengths[bad[0]]} is outside [1, {n_steps}] (X has {n_steps} steps; "
                "every case needs at least one)"
            )
    else:
        lengths = np.full(len(X), n_steps)
    if len(X) == 0:
        raise DataFileError(f"{path}: 'X' holds no cases (shape {X.shape})")
    ids: list = list(range(len(X)))
    if "ids" in arrays:
        raw = arrays["ids"]
        if raw.shape != (len(X),) or raw.dtype.kind not in "iuUS":
            raise DataFileError(
                f"{path}: 'ids' must be integers or strings of shape ({len(X)},), got {raw.dtype} {raw.shape}"
            )
        ids = [v.decode() if isinstance(v, bytes) else v for v in raw.tolist()]
        if len(set(ids)) != len(ids):
            dup = next(v for v in ids if ids.count(v) > 1)
            raise DataFileError(f"{path}: 'ids' repeats {dup!r}; every case needs its own id")
    cases = [np.ascontiguousarray(X[i, : lengths[i]], dtype=np.float32) for i in range(len(X))]
    return Cases(cases, y, ids, str(path), named_ids="ids" in arrays, path=path)


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
    cases = _read_csv(Path(path), labels)
    return cases.X, cases.y


def _read_csv(path: Path, labels: bool = True) -> Cases:
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
                    first = seq_labels[seq][1]
                    if header[-1].strip().lower() not in LABEL_COLUMN_NAMES:
                        raise DataFileError(
                            f"{path}:{line}: the last column, {header[-1].strip()!r}, is read as the label but "
                            f"sequence {seq!r} has {label!r} here and {seq_labels[seq][0]!r} on line {first}; "
                            f"add a label column (named one of {list(LABEL_COLUMN_NAMES)}) as the last column"
                        )
                    raise DataFileError(
                        f"{path}:{line}: sequence {seq!r} has label {label!r} here but {seq_labels[seq][0]!r} on "
                        f"line {first}; a sequence has one label"
                    )
                seq_labels.setdefault(seq, (label, line))
                steps.setdefault(seq, []).append((t, values, line))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataFileError(f"{path}:{reader.line_num}: {exc}") from exc
    if not steps:
        raise DataFileError(f"{path}: no data rows after the header")
    X, lines = [], []
    for seq, rows in steps.items():
        rows.sort(key=lambda r: r[0])
        for a, b in zip(rows, rows[1:]):
            if a[0] == b[0]:
                raise DataFileError(
                    f"{path}:{b[2]}: sequence {seq!r} repeats time_step {b[0]} (first on line {a[2]})"
                )
        X.append(np.asarray([r[1] for r in rows], dtype=np.float32))
        lines.append([r[2] for r in rows])
    y = np.asarray([seq_labels[s][0] for s in steps]) if has_label else None
    names = [h.strip() for h in header[2 : n_cols - has_label]]
    return Cases(X, y, list(steps), str(path), lines, names, named_ids=True, path=path)


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
