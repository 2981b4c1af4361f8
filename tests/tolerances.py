"""The one place for numerical tolerances in tests, per dtype."""

import torch

# (rtol, atol) for comparisons against torch.nn.LSTM / the reference backend.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

# float32 against an implementation with another summation order, through a layer norm: normalizing
# by a small standard deviation amplifies rounding differences (float64 keeps the strict bound).
TOL_NORMALIZED = {**TOL, torch.float32: (1e-4, 1e-4)}


def assert_close(actual, expected, *, dtype=None, msg="", table=TOL):
    """Assert two tensors agree within the tolerance of ``dtype`` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    rtol, atol = table[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def max_dev(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
