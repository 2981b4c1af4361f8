"""lstmkit: torch.nn.LSTM, exact, on fused kernels, with the variants torch lacks.

Public API: :class:`LSTM`, :class:`LSTMCell`, :class:`LSTMClassifier`, :func:`available_backends`,
:func:`warmup` (compile the CPU kernels ahead), :mod:`lstmkit.functional`, and :mod:`lstmkit.memory`
(allocator settings for training loops). The classification toolkit lives in :mod:`lstmkit.classify`.
"""

import os

# the kernels' on-disk cache: LSTMKIT_CACHE_DIR names it unless NUMBA_CACHE_DIR does (read when Numba
# is imported, which ``import lstmkit`` does not do)
if os.environ.get("LSTMKIT_CACHE_DIR") and not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = os.path.abspath(os.path.expanduser(os.environ["LSTMKIT_CACHE_DIR"]))

from . import functional, memory  # noqa: E402
from ._classifier import LSTMClassifier  # noqa: E402
from ._modules import LSTM, LSTMCell  # noqa: E402
from ._warmup import warmup  # noqa: E402
from .backends import available_backends  # noqa: E402

__all__ = ["LSTM", "LSTMCell", "LSTMClassifier", "available_backends", "functional", "memory", "warmup"]
__version__ = "0.1.0"
