"""lstmkit: torch.nn.LSTM, exact, on fused kernels, with the variants torch lacks.

Public API: :class:`LSTM`, :class:`LSTMCell`, :class:`LSTMClassifier`, :func:`available_backends`,
:mod:`lstmkit.functional`, and :mod:`lstmkit.memory` (allocator settings for training loops). The
classification toolkit lives in :mod:`lstmkit.classify`.
"""

from . import functional, memory
from ._classifier import LSTMClassifier
from ._modules import LSTM, LSTMCell
from .backends import available_backends

__all__ = ["LSTM", "LSTMCell", "LSTMClassifier", "available_backends", "functional", "memory"]
__version__ = "0.1.0"
