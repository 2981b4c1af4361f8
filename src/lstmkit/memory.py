"""Process-wide memory settings for CPU training loops.

glibc returns large freed blocks to the operating system: blocks above a threshold it adjusts as the
program runs come from ``mmap`` and go back on ``free``, and free memory at the top of the heap is
trimmed. A training loop asks for the same large buffers at every step, so a step can find all of
them returned and touch every page afresh: one page fault per 4 KiB. Whether it does depends on the
allocator's history. Measured on the 2-core VM of BENCHMARKS.md (T=100 B=16 I=32 H=128, 2 layers,
forward + backward): torch.nn.LSTM 17 ms with the faults (4800 a step) and 12 ms without; lstmkit
12-21 ms (0-1900 faults a step) depending on what ran before.

:func:`keep_freed_memory` fixes both thresholds, so freed blocks stay with the process for the
next step. It changes the whole process's allocator (every library in it), so lstmkit never calls
it on import: the ``lstmkit train`` command and the benchmark suite do (``--default-malloc`` turns
it off there), and programs may. The cost is memory: up to ``trim_bytes`` of freed heap, and
freed blocks below ``mmap_bytes``, are kept instead of returned.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest accepted mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory(mmap_bytes: int = MMAP_THRESHOLD_MAX, trim_bytes: int = 256 * 1024 * 1024) -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): allocations below ``mmap_bytes`` come from
    the heap, and up to ``trim_bytes`` of free heap top is kept. Returns True when applied; False
    on other C libraries, or when the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables already set them (the user's choice wins)."""
    if not isinstance(mmap_bytes, int) or not 0 < mmap_bytes <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_bytes: expected an int in (0, {MMAP_THRESHOLD_MAX}], got {mmap_bytes!r}")
    if not isinstance(trim_bytes, int) or not 0 < trim_bytes < 2**31:
        raise ValueError(f"trim_bytes: expected an int in (0, 2**31), got {trim_bytes!r}")
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
