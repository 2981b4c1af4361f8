"""``lstmkit bench``: lstmkit against torch.nn.LSTM, measured side by side in one process.

``main(argv)`` runs the CPU suite (the Numba backend, :mod:`lstmkit.bench._cpu`); with
``--device cuda`` it hands the arguments to the GPU suite, :mod:`lstmkit.bench.cuda`.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["main"]


def _device_of(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cpu"


def main(argv: Optional[list[str]] = None) -> int:
    """``--suite lstm`` (default): plain LSTM against torch.nn.LSTM; ``--suite variants``: the
    variants and the step API (:mod:`lstmkit.bench.variants`); ``--suite first-use``: the first calls
    of a fresh install (empty kernel cache) and the step API's latency on an idle and a busy machine
    (:mod:`lstmkit.bench.first_use`)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    suite = "lstm"
    for i, a in enumerate(argv):
        if a == "--suite" and i + 1 < len(argv):
            suite = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--suite="):
            suite = a.split("=", 1)[1]
            del argv[i]
            break
    if suite not in ("lstm", "variants", "first-use"):
        print(f"lstmkit bench: --suite expected 'lstm', 'variants' or 'first-use', got {suite!r}", file=sys.stderr)
        return 2
    if suite == "variants":
        from . import variants

        return variants.main(argv)
    if suite == "first-use":
        from . import first_use

        return first_use.main(argv)
    if _device_of(argv).startswith("cuda"):
        try:
            from . import cuda
        except ImportError as exc:
            print(f"lstmkit bench --device cuda: the GPU suite is not available ({exc})", file=sys.stderr)
            return 2
        import torch

        if not torch.cuda.is_available():
            print("lstmkit bench --device cuda: no CUDA device is available", file=sys.stderr)
            return 2
        return int(cuda.main(argv) or 0)
    from . import _cpu

    return _cpu.main(argv)
