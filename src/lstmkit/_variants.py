"""The LSTM variants torch lacks: their options, parameters and per-call tensors, in one place.

Used by both :class:`lstmkit.LSTM` and :class:`lstmkit.LSTMCell`. The equations are in
``backends/_contract.py``; the docstring of :class:`lstmkit.LSTM` gives them with references.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import init

from ._gates import GATE_ORDER
from .backends._contract import LayerOptions

_F = GATE_ORDER.index("f")


def _check_prob(name: str, p, upper_inclusive: bool = False) -> float:
    ok = isinstance(p, numbers.Real) and not isinstance(p, bool) and 0 <= p and (p <= 1 if upper_inclusive else p < 1)
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}: expected a probability in {bound}, got {p!r}")
    return float(p)


@dataclass(frozen=True)
class Variants:
    """One module's variant options. ``plain`` (not a field): True when none of them changes the
    recurrence, in either mode."""

    layer_norm: bool = False
    peephole: bool = False
    recurrent_dropout: float = 0.0
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0
    forget_bias: Optional[float] = None

    def __post_init__(self) -> None:
        # no variant in the recurrence: every call is torch's, in training and evaluation alike (so a
        # plain LSTMCell's forward never reads the module's training flag, as torch's does not)
        object.__setattr__(self, "plain", not (self.layer_norm or self.peephole or self.recurrent_dropout > 0
                                                 or self.zoneout_cell > 0 or self.zoneout_hidden > 0))

    def options(self) -> dict:
        """The options as plain values (what a pickled module keeps): ``Variants(**v.options()) == v``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def parse(cls, *, layer_norm=False, peephole=False, recurrent_dropout=0.0,
              zoneout: Union[float, tuple[float, float]] = 0.0, forget_bias=None, bias=True) -> Variants:
        for name, v in (("layer_norm", layer_norm), ("peephole", peephole)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(v).__name__}")
        rd = _check_prob("recurrent_dropout", recurrent_dropout)
        if isinstance(zoneout, (tuple, list)):
            if len(zoneout) != 2:
                raise ValueError(f"zoneout: expected a probability or a pair (p_cell, p_hidden), got {zoneout!r}")
            zc, zh = (_check_prob(f"zoneout[{i}]", p) for i, p in enumerate(zoneout))
        else:
            zc = zh = _check_prob("zoneout", zoneout)
        if forget_bias is not None:
            if not isinstance(forget_bias, numbers.Real) or isinstance(forget_bias, bool) \
                    or not math.isfinite(forget_bias):
                raise ValueError(f"forget_bias: expected a finite number, got {forget_bias!r}")
            if not bias:
                raise ValueError("forget_bias: needs bias=True (it initializes the forget-gate bias), got bias=False")
            forget_bias = float(forget_bias)
        return cls(layer_norm, peephole, rd, zc, zh, forget_bias)

    def active(self, training: bool) -> bool:
        """True when this call's recurrence differs from torch's (recurrent dropout is off in eval)."""
        return not self.plain and (self.layer_norm or self.peephole or self.zoneout_cell > 0
                                   or self.zoneout_hidden > 0 or (training and self.recurrent_dropout > 0))

    def extra_repr(self) -> str:
        parts = []
        if self.layer_norm:
            parts.append("layer_norm=True")
        if self.peephole:
            parts.append("peephole=True")
        if self.recurrent_dropout:
            parts.append(f"recurrent_dropout={self.recurrent_dropout}")
        if self.zoneout_cell or self.zoneout_hidden:
            z = self.zoneout_cell if self.zoneout_cell == self.zoneout_hidden else (self.zoneout_cell,
                                                                                     self.zoneout_hidden)
            parts.append(f"zoneout={z}")
        if self.forget_bias is not None:
            parts.append(f"forget_bias={self.forget_bias}")
        return "".join(", " + p for p in parts)

    # -- parameters ------------------------------------------------------------------------------
    def register(self, module: nn.Module, sfx: str, hidden_size: int, factory: dict) -> list[str]:
        """Create this layer-direction's variant parameters on ``module``; returns their names."""
        H, G = hidden_size, 4 * hidden_size
        shapes: list[tuple[str, tuple[int, ...]]] = []
        if self.layer_norm:
            shapes += [("ln_ih_weight", (G,)), ("ln_hh_weight", (G,)), ("ln_cell_weight", (H,)),
                       ("ln_cell_bias", (H,))]
        if self.peephole:
            shapes += [("weight_peephole", (3, H))]
        names = []
        for base, shape in shapes:
            setattr(module, base + sfx, nn.Parameter(torch.empty(shape, **factory)))
            names.append(base + sfx)
        return names

    def reset(self, module: nn.Module, names: list[str], b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              hidden_size: int) -> None:
        stdv = 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            for n in names:
                p = getattr(module, n)
                if n.startswith("ln_cell_bias"):
                    p.zero_()
                elif n.startswith("ln_"):
                    p.fill_(1.0)
                else:  # peephole weights: the same uniform init as the other weights
                    init.uniform_(p, -stdv, stdv)
            if self.forget_bias is not None and b_ih is not None:
                H = hidden_size
                b_ih[_F * H:(_F + 1) * H].fill_(self.forget_bias)
                b_hh[_F * H:(_F + 1) * H].zero_()

    # -- per call --------------------------------------------------------------------------------
    def layer_options(self, module: nn.Module, sfx: str, B: int, T: int, H: int, P: int, training: bool,
                      like: Tensor) -> Optional[LayerOptions]:
        if not self.active(training):
            return None
        o = LayerOptions()
        if self.layer_norm:
            o.ln_hh = getattr(module, "ln_hh_weight" + sfx)
            o.ln_cell_w = getattr(module, "ln_cell_weight" + sfx)
            o.ln_cell_b = getattr(module, "ln_cell_bias" + sfx)
        if self.peephole:
            o.peephole = getattr(module, "weight_peephole" + sfx)
        if self.recurrent_dropout > 0 and training:
            keep = 1.0 - self.recurrent_dropout
            o.rec_mask = bernoulli((B, P), keep, like) / keep
        o.zoneout_c = _zoneout(self.zoneout_cell, (T, B, H), training, like)
        o.zoneout_h = _zoneout(self.zoneout_hidden, (T, B, P), training, like)
        return o

    def input_norm(self, module: nn.Module, sfx: str) -> Optional[Tensor]:
        return getattr(module, "ln_ih_weight" + sfx) if self.layer_norm else None


def _zoneout(p: float, shape: tuple[int, ...], training: bool, like: Tensor):
    if p == 0:
        return None
    if training:  # 1 where the unit keeps its previous value
        return bernoulli(shape, p, like)
    return p  # evaluation: the expectation


def bernoulli(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A mask of the given shape, 1 with probability p, else 0 (dtype and device of ``like``),
    drawn from torch's default generator (so ``torch.manual_seed`` fixes it). On CPU a compiled
    SplitMix64 stream seeded from that generator fills it (~10x faster than ``torch.bernoulli``:
    zoneout masks are (T, B, H), as large as the layer's output)."""
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64):
        from .kernels.numba_variants import bernoulli_fill

        out = torch.empty(shape, dtype=like.dtype)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        bernoulli_fill(out.numpy().reshape(-1), float(p), seed)
        return out
    return torch.bernoulli(like.new_full(shape, p))
