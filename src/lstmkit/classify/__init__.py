"""Sequence classification on lstmkit: a scikit-learn estimator, dataset loading, training runs.

Needs the ``classify`` extra (scikit-learn, aeon, safetensors, tqdm, matplotlib); ``import lstmkit``
does not import this package.
"""

from ._data import IMPUTE_OPTIONS
from ._datasets import DATASETS, DatasetInfo, list_datasets, load_dataset
from ._defaults import DEFAULTS
from ._estimator import LSTMSequenceClassifier
from ._io import DataFileError, read_data, write_csv

__all__ = [
    "DATASETS",
    "DEFAULTS",
    "IMPUTE_OPTIONS",
    "DataFileError",
    "DatasetInfo",
    "LSTMSequenceClassifier",
    "list_datasets",
    "load_dataset",
    "read_data",
    "write_csv",
]
