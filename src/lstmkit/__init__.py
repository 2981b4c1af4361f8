"""lstmkit: torch.nn.LSTM, exact and faster."""

from .backends import available_backends

__all__ = ["available_backends"]
__version__ = "0.1.0"
