"""lstmkit: torch.nn.LSTM, exact, on fused kernels, with the variants torch lacks.

Public API: :class:`LSTM`, :class:`LSTMCell`, :class:`LSTMClassifier`, :func:`available_backends`,
:func:`safe_globals`, :func:`warmup` (compile the CPU kernels ahead), :mod:`lstmkit.functional`, and
:mod:`lstmkit.memory` (allocator settings for training loops). The classification toolkit lives in
:mod:`lstmkit.classify`.

Where torch is already imported (``import torch`` first, the usual order), ``import lstmkit`` imports
everything, its torch operators included (``lstmkit::lstm``, which traced and exported models call).
Otherwise the names load on first use (PEP 562), so that ``lstmkit --help``, ``--version`` and
``lstmkit datasets`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# the kernels' on-disk cache: LSTMKIT_CACHE_DIR names it unless NUMBA_CACHE_DIR does (read when Numba
# is imported, which ``import lstmkit`` does not do)
if os.environ.get("LSTMKIT_CACHE_DIR") and not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = os.path.abspath(os.path.expanduser(os.environ["LSTMKIT_CACHE_DIR"]))

__all__ = ["LSTM", "LSTMCell", "LSTMClassifier", "available_backends", "functional", "memory", "safe_globals", "warmup"]
__version__ = "0.1.0"

# public name -> the module that defines it (None: the name is a submodule)
_LAZY = {
    "LSTM": "._modules",
    "LSTMCell": "._modules",
    "LSTMClassifier": "._classifier",
    "available_backends": ".backends",
    "warmup": "._warmup",
    "functional": None,
    "memory": None,
}

if TYPE_CHECKING:
    from . import functional, memory  # noqa: F401
    from ._classifier import LSTMClassifier
    from ._modules import LSTM, LSTMCell
    from ._warmup import warmup  # noqa: F401
    from .backends import available_backends  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lstmkit' has no attribute {name!r}")
    module = _LAZY[name]
    value = (importlib.import_module(f".{name}", __name__) if module is None
             else getattr(importlib.import_module(module, __name__), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def safe_globals() -> list[type]:
    """The classes a whole pickled lstmkit module refers to: lstmkit's modules and the torch modules
    :class:`LSTMClassifier` holds. Allow them to load a model saved with ``torch.save(model)`` through
    ``torch.load``'s default ``weights_only=True``, as for any custom module::

        torch.serialization.add_safe_globals(lstmkit.safe_globals())
        model = torch.load("model.pt")

    (or ``with torch.serialization.safe_globals(lstmkit.safe_globals()): ...``). A pickled lstmkit
    module holds its parameters, its options as plain values and these classes, nothing else.
    """
    import torch

    return [__getattr__("LSTM"), __getattr__("LSTMCell"), __getattr__("LSTMClassifier"), torch.nn.Linear,
            torch.nn.Dropout]


if "torch" in sys.modules:  # torch's cost is paid: load everything now, as a plain import would
    for _name in _LAZY:
        __getattr__(_name)
