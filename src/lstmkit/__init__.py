"""lstmkit: torch.nn.LSTM, exact, on fused kernels, with the variants torch lacks.

Public API: :class:`LSTM`, :class:`LSTMCell`, :class:`LSTMClassifier`, :func:`available_backends`,
and :mod:`lstmkit.functional`. The classification toolkit lives in :mod:`lstmkit.classify`.
"""

from . import functional
from ._classifier import LSTMClassifier
from ._modules import LSTM, LSTMCell
from .backends import available_backends

__all__ = ["LSTM", "LSTMCell", "LSTMClassifier", "available_backends", "functional"]
__version__ = "0.1.0"
