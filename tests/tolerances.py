"""The one place for numerical tolerances in tests, per dtype."""

import torch

# (rtol, atol) for comparisons against torch.nn.LSTM / the reference backend.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

# float32 through a layer norm over few units (H=5 in the tests): dividing by a small standard deviation
# amplifies rounding and the float32 tanh approximation (<= 2.6e-7) about 1000x; gradients of size ~100
# then differ by a few 1e-4 from a float32 per-step loop (both are ~1e-3 from a float64 run). float64
# keeps the strict 1e-10 bound, which is the exactness check for these variants.
TOL_NORMALIZED = {**TOL, torch.float32: (1e-3, 1e-3)}


def assert_close(actual, expected, *, dtype=None, msg="", table=TOL):
    """Assert two tensors agree within the tolerance of ``dtype`` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    rtol, atol = table[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def max_dev(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
