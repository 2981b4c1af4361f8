"""Sequence classification on lstmkit: a scikit-learn estimator, dataset loading, training runs.

Needs the ``classify`` extra (scikit-learn, aeon, safetensors, tqdm, matplotlib); ``import lstmkit``
does not import this package. The names below are imported on first use, so that the command line
can read :data:`DEFAULTS` and :data:`DATASETS` without importing torch, scikit-learn or aeon.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the private module that defines it
_EXPORTS = {
    "DATASETS": "_datasets",
    "DatasetInfo": "_datasets",
    "list_datasets": "_datasets",
    "load_dataset": "_datasets",
    "DEFAULTS": "_defaults",
    "IMPUTE_OPTIONS": "_data",
    "LSTMSequenceClassifier": "_estimator",
    "ModelFileError": "_modelfile",
    "DataFileError": "_io",
    "read_data": "_io",
    "write_csv": "_io",
}

__all__ = [
    "DATASETS",
    "DEFAULTS",
    "IMPUTE_OPTIONS",
    "DataFileError",
    "DatasetInfo",
    "LSTMSequenceClassifier",
    "ModelFileError",
    "list_datasets",
    "load_dataset",
    "read_data",
    "write_csv",
]

if TYPE_CHECKING:
    from ._data import IMPUTE_OPTIONS
    from ._datasets import DATASETS, DatasetInfo, list_datasets, load_dataset
    from ._defaults import DEFAULTS
    from ._estimator import LSTMSequenceClassifier
    from ._io import DataFileError, read_data, write_csv
    from ._modelfile import ModelFileError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lstmkit.classify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
