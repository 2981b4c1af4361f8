"""The one place for numerical tolerances in tests, per dtype."""

import torch

# (rtol, atol) for comparisons against torch.nn.LSTM / the reference backend.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual, expected, *, dtype=None, msg=""):
    """Assert two tensors agree within the tolerance of ``dtype`` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def max_dev(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
