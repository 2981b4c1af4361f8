"""lstmkit: torch.nn.LSTM, exact, on fused kernels, with the variants torch lacks.

Public API: :class:`LSTM`, :class:`LSTMCell`, :class:`LSTMClassifier`, :func:`available_backends`,
:func:`safe_globals`, :func:`warmup` (compile the CPU kernels ahead), :mod:`lstmkit.functional`, and
:mod:`lstmkit.memory` (allocator settings for training loops). The classification toolkit lives in
:mod:`lstmkit.classify`.
"""

import os

# the kernels' on-disk cache: LSTMKIT_CACHE_DIR names it unless NUMBA_CACHE_DIR does (read when Numba
# is imported, which ``import lstmkit`` does not do)
if os.environ.get("LSTMKIT_CACHE_DIR") and not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = os.path.abspath(os.path.expanduser(os.environ["LSTMKIT_CACHE_DIR"]))

import torch  # noqa: E402

from . import functional, memory  # noqa: E402
from ._classifier import LSTMClassifier  # noqa: E402
from ._modules import LSTM, LSTMCell  # noqa: E402
from ._warmup import warmup  # noqa: E402
from .backends import available_backends  # noqa: E402

__all__ = ["LSTM", "LSTMCell", "LSTMClassifier", "available_backends", "functional", "memory", "safe_globals", "warmup"]
__version__ = "0.1.0"


def safe_globals() -> list[type]:
    """The classes a whole pickled lstmkit module refers to: lstmkit's modules and the torch modules
    :class:`LSTMClassifier` holds. Allow them to load a model saved with ``torch.save(model)`` through
    ``torch.load``'s default ``weights_only=True``, as for any custom module::

        torch.serialization.add_safe_globals(lstmkit.safe_globals())
        model = torch.load("model.pt")

    (or ``with torch.serialization.safe_globals(lstmkit.safe_globals()): ...``). A pickled lstmkit
    module holds its parameters, its options as plain values and these classes, nothing else.
    """
    return [LSTM, LSTMCell, LSTMClassifier, torch.nn.Linear, torch.nn.Dropout]
