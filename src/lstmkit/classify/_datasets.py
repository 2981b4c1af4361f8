"""The dataset registry: the UEA/UCR sets bundled with aeon's wheel, read offline by aeon's loaders.

One place for what is available, the shape of each set (read by ``lstmkit datasets`` without
loading the files; a test checks them against the files) and what the literature reports on each
test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    n_train: int
    n_test: int
    n_channels: int
    #: shortest and longest case over both splits
    lengths: tuple[int, int]
    n_classes: int
    #: published test accuracies on the standard split, {method: accuracy}
    published: dict[str, float] = field(default_factory=dict)


# Published figures: Karim et al., "LSTM Fully Convolutional Networks for Time Series Classification"
# (2018) and "Multivariate LSTM-FCNs for Time Series Classification" (2019); FCN/MLP from Wang et al.
# (2017); DTW from the UEA/UCR archive's baselines.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "JapaneseVowels",
            "speaker recognition: 9 men uttering /ae/, 12 LPC cepstrum coefficients per frame",
            270, 370, 12, (7, 29), 9,
            {"MLSTM-FCN": 1.00, "LSTM-FCN": 0.99, "FCN": 0.993, "MLP": 0.976, "DTW": 0.959},
        ),
        DatasetInfo(
            "BasicMotions",
            "activity (standing, walking, running, badminton) from a wrist accelerometer and gyroscope",
            40, 40, 6, (100, 100), 4,
            {"MLSTM-FCN": 1.00},
        ),
        DatasetInfo(
            "GunPoint", "hand motion: drawing a gun or pointing a finger (hand x-coordinate)",
            50, 150, 1, (150, 150), 2, {"LSTM-FCN": 1.00},
        ),
        DatasetInfo(
            "ArrowHead", "arrowhead outlines as 1-D series, 3 types", 36, 175, 1, (251, 251), 3, {"LSTM-FCN": 0.897}
        ),
        DatasetInfo(
            "ItalyPowerDemand",
            "daily electricity demand of Italy: October-March or April-September",
            67, 1029, 1, (24, 24), 2,
            {"LSTM-FCN": 0.962},
        ),
        DatasetInfo(
            "OSULeaf", "leaf outlines of 6 tree species as 1-D series", 200, 242, 1, (427, 427), 6, {"LSTM-FCN": 0.996}
        ),
    ]
}


def list_datasets() -> list[str]:
    """Names of the bundled datasets, loadable offline."""
    return list(DATASETS)


def canonical_name(name: str) -> str:
    """The registry's spelling of ``name`` (case-insensitive); ValueError naming the choices."""
    canonical = {n.lower(): n for n in DATASETS}.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"dataset: expected one of {list_datasets()}, got {name!r}")
    return canonical


def load_dataset(name: str, split: str = "train") -> tuple[list[np.ndarray], np.ndarray]:
    """Load a bundled dataset split as ``(X, y)``: X a list of ``(n_steps, n_features)`` float arrays.

    Args:
        name: one of :func:`list_datasets` (case-insensitive).
        split: ``"train"`` or ``"test"``.
    """
    canonical = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    import numpy as np
    from aeon.datasets import load_classification

    # The registry only names sets whose files ship inside aeon's wheel, so this never downloads.
    X, y = load_classification(canonical, split=split)
    return [np.ascontiguousarray(np.asarray(case, dtype=np.float32).T) for case in X], np.asarray(y)
