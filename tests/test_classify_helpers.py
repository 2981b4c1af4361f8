"""Shared helpers for the classify tests (no tests here): a small synthetic sequence problem."""

from __future__ import annotations

import numpy as np

LABELS = np.array(["slow", "mid", "fast"])


def make_sequences(n: int, seed: int = 0, n_features: int = 2, min_len: int = 5, max_len: int = 16, labels=LABELS):
    """Variable-length sequences whose class is the frequency of a noisy sine in feature 0."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for i in range(n):
        c = i % len(labels)
        T = int(rng.integers(min_len, max_len + 1))
        t = np.arange(T)
        cols = [np.sin(t * (0.3 + 0.6 * c) + rng.uniform(0, 0.5)) + 0.2 * rng.standard_normal(T)]
        cols += [rng.standard_normal(T) for _ in range(n_features - 1)]
        X.append((np.stack(cols, 1) * 3.0 + 5.0).astype(np.float32))  # off-scale on purpose
        y.append(labels[c])
    return X, np.asarray(y)


# small and fast, for tests; "reference" keeps them independent of the fused backends' compile time
TINY = dict(hidden_size=8, epochs=25, batch_size=16, lr=2e-2, validation_fraction=0.0, backend="reference")
