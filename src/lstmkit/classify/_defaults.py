"""Default hyper-parameters: the one place they are set.

The estimator's ``__init__`` defaults, the CLI's option defaults and the benchmark commands all read
this mapping. Chosen once for all bundled datasets (see BENCHMARKS.md), never per dataset.
"""

from __future__ import annotations

DEFAULTS: dict[str, object] = {
    "hidden_size": 64,
    "num_layers": 1,
    "bidirectional": True,
    "dropout": 0.0,
    "lr": 1e-2,
    "weight_decay": 1e-4,
    "epochs": 60,
    "batch_size": 32,
    "validation_fraction": 0.0,
    "patience": 20,
    "monitor": "loss",
    "grad_clip": 1.0,
    "noise": 0.0,
    "class_weight": None,
    "standardize": True,
    "impute": None,
    "channels_first": False,
    "seed": 0,
    "device": "auto",
    "backend": "auto",
    "num_threads": 1,
}
