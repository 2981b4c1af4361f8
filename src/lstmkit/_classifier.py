"""The tutorial's sequence classifier, done right: logits out, padding never read."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._modules import LSTM

__all__ = ["LSTMClassifier"]

POOLINGS = ("last", "mean", "max", "last+mean")


class LSTMClassifier(nn.Module):
    r"""Classify whole sequences: an :class:`lstmkit.LSTM`, then a linear layer on the last step.

    The tutorial's ``LSTMClassifier`` with two fixes a real library needs:

    * ``forward`` returns **logits**, not softmax probabilities. :class:`torch.nn.CrossEntropyLoss`
      applies ``log_softmax`` itself; feeding it probabilities applies softmax twice, which
      squashes the loss into a narrow range, shrinks its gradients (they vanish as the
      probabilities saturate) and slows or stalls training. Use :meth:`predict_proba` for
      probabilities.
    * It reads each sequence's **last valid step**, not ``output[-1]``, which for a padded batch is
      padding for every sequence shorter than the longest. Pass ``lengths`` (or a
      :class:`~torch.nn.utils.rnn.PackedSequence`). With ``bidirectional=True`` the features are
      the forward direction's state at the last valid step and the backward direction's state at
      the first step (where it has read the whole sequence).

    Args:
        input_size: features per time step.
        hidden_size: LSTM hidden size.
        num_layers: LSTM layers.
        output_size: number of classes.
        bidirectional: a bidirectional LSTM. Default: ``False``
        dropout: dropout between LSTM layers (if ``num_layers > 1``) and before the linear head.
        batch_first: input as ``(batch, seq, feature)``. Default: ``False``
        pooling: how a sequence becomes one feature vector: ``"last"`` (the tutorial's last step, per
            direction as above), ``"mean"`` or ``"max"`` of the top layer's output over each
            sequence's valid steps (padding excluded), or ``"last+mean"`` (both, concatenated).
            Default: ``"last"``
        backend: the LSTM backend, see :class:`lstmkit.LSTM`.
        **lstm_kwargs: further keyword arguments of :class:`lstmkit.LSTM` (e.g. ``proj_size``).

    Inputs: x, lengths
        - **x**: ``(T, B, input_size)`` (``(B, T, input_size)`` if ``batch_first``), or a
          PackedSequence.
        - **lengths**: optional ``(B,)`` valid lengths of a padded batch, any order.

    Outputs: logits ``(B, output_size)``.

    Example::

        >>> model = lstmkit.LSTMClassifier(3, 5, 2, output_size=2)
        >>> x = torch.randn(10, 4, 3)                   # (T, B, features)
        >>> logits = model(x, lengths=[10, 7, 3, 9])    # (4, 2)
        >>> probs = model.predict_proba(x, lengths=[10, 7, 3, 9])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        output_size: int,
        *,
        bidirectional: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        pooling: str = "last",
        backend: str = "auto",
        **lstm_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size < 1:
            raise ValueError(f"output_size: expected a positive int (number of classes), got {output_size!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.lstm = LSTM(
            input_size, hidden_size, num_layers, batch_first=batch_first,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional, backend=backend, **lstm_kwargs,
        )
        self.head_dropout = nn.Dropout(dropout)
        D = 2 if bidirectional else 1
        feat = self.lstm.proj_size if self.lstm.proj_size > 0 else hidden_size
        in_features = D * feat * (2 if pooling == "last+mean" else 1)
        self.fc = nn.Linear(in_features, output_size, device=lstm_kwargs.get("device"), dtype=lstm_kwargs.get("dtype"))

    def features(self, x: Union[Tensor, PackedSequence], lengths=None) -> Tensor:
        """The (B, D * H_out) summary of each sequence that the linear head classifies."""
        if isinstance(x, PackedSequence):
            out, (h_n, _) = self.lstm(x)
            out, lens = pad_packed_sequence(out)  # (T, B, D*P), zeros past each length
        else:
            out, (h_n, _) = self.lstm(x, lengths=lengths)
            if self.lstm.batch_first:
                out = out.transpose(0, 1)
            T = out.shape[0]
            lens = torch.full((out.shape[1],), T) if lengths is None else torch.as_tensor(lengths)
        feats = []
        if self.pooling in ("last", "last+mean"):
            # h_n holds each row's state after its last valid step (forward direction) and after
            # step 0 (backward direction): exactly the features to classify, with no padding read.
            feats.append(torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.lstm.bidirectional else h_n[-1])
        if self.pooling in ("mean", "last+mean"):
            # outputs are zero past each length, so the sum over time covers the valid steps only
            feats.append(out.sum(0) / lens.to(out.device, out.dtype).unsqueeze(1))
        if self.pooling == "max":
            valid = torch.arange(out.shape[0], device=out.device).unsqueeze(1) < lens.to(out.device).unsqueeze(0)
            feats.append(out.masked_fill(~valid.unsqueeze(2), float("-inf")).amax(0))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def forward(self, x: Union[Tensor, PackedSequence], lengths: Optional[Union[Tensor, list]] = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() != 3:
            raise ValueError(f"x: expected a batched 3-D tensor, got {x.dim()}-D of shape {tuple(x.shape)}")
        return self.fc(self.head_dropout(self.features(x, lengths)))

    @torch.no_grad()
    def predict_proba(self, x: Union[Tensor, PackedSequence], lengths=None) -> Tensor:
        """Softmax class probabilities ``(B, output_size)``."""
        return torch.softmax(self.forward(x, lengths), dim=-1)
