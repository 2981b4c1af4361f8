"""Default hyper-parameters and the allowed values of the choice parameters: the one place they are set.

The estimator's ``__init__`` defaults and checks, the CLI's option defaults and choices, and the
benchmark commands all read this module. The defaults were chosen once for all bundled datasets (see
BENCHMARKS.md), never per dataset. This module imports nothing, so that ``lstmkit --help`` can read it
without importing torch.
"""

from __future__ import annotations

#: ``epochs="auto"``: at least AUTO_MIN_EPOCHS epochs and at least AUTO_MIN_STEPS optimizer steps, so
#: that a small training set (BasicMotions: 40 cases, 2 steps per epoch) still gets enough updates
AUTO_MIN_EPOCHS = 60
AUTO_MIN_STEPS = 500

DEFAULTS: dict[str, object] = {
    "hidden_size": 64,
    "num_layers": 1,
    "bidirectional": True,
    # max over each sequence's valid steps: on the long univariate sets (GunPoint 150 steps, ArrowHead 251)
    # the last step alone stayed near chance; with max pooling, lr 1e-2 overshot on JapaneseVowels
    # (0.978 at seed 0), lr 5e-3 kept it >= 0.98 (BENCHMARKS.md)
    "pooling": "max",
    "dropout": 0.0,
    "lr": 5e-3,
    "weight_decay": 1e-4,
    "epochs": "auto",
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

#: allowed values of the parameters that take one of a few names (``pooling`` must match
#: ``lstmkit._classifier.POOLINGS`` and ``backend`` the backend registry; a test checks both)
CHOICES: dict[str, tuple] = {
    "pooling": ("last", "mean", "max", "last+mean"),
    "monitor": ("loss", "acc"),
    "impute": (None, "zero", "ffill"),
    "backend": ("auto", "triton", "numba", "reference"),
}

#: the most CPU threads a model may ask for (``num_threads``); far beyond it OpenMP runtimes crash
MAX_THREADS = 1024

#: upper bounds of the model's sizes, checked on ``fit`` and on loading a saved model (a model.json
#: must never make the process allocate without bound)
MAX_SIZES = {"input_size": 1 << 20, "hidden_size": 1 << 16, "num_layers": 256, "output_size": 1 << 20}
