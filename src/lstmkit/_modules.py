"""lstmkit.LSTM and lstmkit.LSTMCell: drop-in replacements for torch.nn.LSTM / LSTMCell.

Modules hold parameters (torch's names, shapes and initialization), check arguments and convert
input forms (batch_first, unbatched, PackedSequence, lengths=); the math is in
:mod:`lstmkit.functional` and the backends.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from . import _export, backends, functional
from ._gates import NUM_GATES
from ._variants import Variants

__all__ = ["LSTM", "LSTMCell"]

State = tuple[Tensor, Tensor]

# (backend name, dtype) -> the backend module that runs CPU tensors of that dtype (plain calls)
_CALL_BACKENDS: dict = {}
_NO_RUNNER = object()  # LSTM._runners, LSTMCell._runners: shapes not seen yet
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_compiling = torch.compiler.is_compiling  # bound once: read on every call


class _KeepsRunners:
    """A module that keeps the backend's functions per input shape in ``_runners`` (closures) and
    other per-process helpers, named in ``_TRANSIENT`` and made by ``_init_transient``. Pickling and
    deepcopy drop them and keep the variant options as plain values, so that a pickled module holds
    its parameters, options and public classes only (``torch.load(..., weights_only=True)`` needs
    nothing but :func:`lstmkit.safe_globals`)."""

    _TRANSIENT: tuple[str, ...] = ("_runners",)

    @staticmethod
    def _make_runner(backend: str, dt: torch.dtype, *args, **kwargs) -> Optional[Callable]:
        """``call_runner(*args, **kwargs)`` of the backend that runs CPU tensors of dtype dt, or None
        where it has no such hook or ``auto`` leaves these shapes to another backend (args: x_shape,
        h_shape, c_shape, ...)."""
        be = _CALL_BACKENDS.get((backend, dt))
        if be is None:
            be = _CALL_BACKENDS[backend, dt] = backends.resolve(backend, torch.device("cpu"), dt)
        c_shape = args[2]
        if backend == "auto" and backends.declines(be, dt, c_shape[1] * c_shape[2]):
            return None  # the general path, which asks backends.resolve with the shapes
        make = getattr(be, "call_runner", None)
        return None if make is None else make(*args, **kwargs)

    def _remember(self, key: tuple, run: Optional[Callable]) -> Optional[Callable]:
        """Keep run (or None: the general path) for key; a few shapes at most (streams keep theirs)."""
        if len(self._runners) >= 16:
            self._runners.clear()
        self._runners[key] = run
        return run

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self._TRANSIENT:
            state.pop(name, None)
        state["variants"] = state["variants"].options()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "variants": Variants(**state["variants"])})
        self._init_transient()


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        bound = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _check_state_tensor(name: str, t, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name}: expected dtype {like.dtype} (the input's), got {t.dtype}")
    if t.device != like.device:
        raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                           f"{like.device} and hidden tensor at {t.device} (hidden tensor: {name})")


def _unpack_hx(hx, name: str = "hx") -> State:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        got = f"{type(hx).__name__} of length {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
        what = "(h_0, c_0)" if name == "hx" else "(h, c)"
        raise TypeError(f"{name}: expected a tuple {what} of two Tensors, got {got}")
    return hx[0], hx[1]


class LSTM(_KeepsRunners, nn.Module):
    r"""A multi-layer LSTM, numerically the same as :class:`torch.nn.LSTM`, run by lstmkit's backends.

    For each element in the input sequence, each layer computes

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    with gate order (i, f, g, o) in the stacked weights. With ``proj_size > 0``,
    :math:`h_t = W_{hr}(o_t \odot \tanh(c_t))`. Layer :math:`l > 0` takes the previous layer's
    :math:`h_t`, after dropout with probability ``dropout`` in training mode.

    Args:
        input_size: features of the input :math:`x`.
        hidden_size: features of the hidden state :math:`h`.
        num_layers: stacked recurrent layers. Default: 1
        bias: if ``False``, no ``b_ih`` and ``b_hh``. Default: ``True``
        batch_first: input and output as ``(batch, seq, feature)``. Default: ``False``
        dropout: dropout probability on the outputs of every layer but the last. Default: 0
        bidirectional: a bidirectional LSTM. Default: ``False``
        proj_size: if ``> 0``, an LSTM with projections of that size. Default: 0
        device, dtype: where and how to create the parameters.
        backend: ``"auto"`` (the fastest backend that supports the input) or a name from
            :func:`lstmkit.available_backends`. Default: ``"auto"``

    Variants (keyword-only; all off gives exactly torch's module, state dict and numbers). They
    combine with each other and with layers, bidirectional and proj_size:

        layer_norm: layer-normalized LSTM (Ba, Kiros and Hinton 2016, "Layer Normalization"; the
            form of haste's LayerNormLSTM):
            :math:`z_t = \mathrm{LN}(W_{ih} x_t;\gamma_x) + \mathrm{LN}(W_{hh} h_{t-1};\gamma_h) + b_{ih} + b_{hh}`,
            :math:`h_t = o_t \odot \tanh(\mathrm{LN}(c_t;\gamma_c,\beta_c))`, where
            :math:`\mathrm{LN}(v;\gamma,\beta) = \gamma (v - \mu(v))/\sqrt{\sigma^2(v) + 10^{-5}} + \beta`
            over the 4H gate pre-activations (resp. the H cell units). Parameters
            ``ln_ih_weight_l{k}`` (:math:`\gamma_x`, 4H), ``ln_hh_weight_l{k}`` (:math:`\gamma_h`,
            4H), ``ln_cell_weight_l{k}`` / ``ln_cell_bias_l{k}`` (:math:`\gamma_c, \beta_c`, H);
            gains start at 1, the bias at 0.
        peephole: peephole connections (Gers and Schmidhuber 2000, "Recurrent nets that time and
            count"): :math:`i_t = \sigma(\dots + p_i \odot c_{t-1})`,
            :math:`f_t = \sigma(\dots + p_f \odot c_{t-1})`, :math:`o_t = \sigma(\dots + p_o \odot c_t)`;
            parameter ``weight_peephole_l{k}`` of shape (3, H), rows :math:`p_i, p_f, p_o`.
        recurrent_dropout: variational dropout on :math:`h_{t-1}` inside the recurrence (Gal and
            Ghahramani 2016): :math:`W_{hh}(h_{t-1} \odot m)`, one mask :math:`m` (scaled by
            :math:`1/(1-p)`) per sequence and layer-direction, drawn per forward call, training only.
        zoneout: ``p`` or ``(p_cell, p_hidden)`` (Krueger et al. 2017): in training each unit keeps its
            previous value with probability p, :math:`c_t = d^c_t \odot c_{t-1} + (1 - d^c_t) \odot \tilde c_t`
            and the same for :math:`h_t` (with :math:`\tilde c_t, \tilde h_t` the plain LSTM update);
            in evaluation the expectation, :math:`c_t = p\, c_{t-1} + (1 - p)\, \tilde c_t`.
        forget_bias: initialize the forget-gate bias to this value (Jozefowicz, Zaremba and
            Sutskever 2015; 1.0 is their recommendation): ``bias_ih``'s forget block is set to it and
            ``bias_hh``'s to 0. The parameter layout is unchanged.

    Inputs: input, (h_0, c_0), lengths
        - **input**: ``(L, H_in)`` unbatched, ``(L, N, H_in)``, or ``(N, L, H_in)`` with
          ``batch_first=True``; or a :class:`~torch.nn.utils.rnn.PackedSequence`.
        - **h_0**: ``(D * num_layers, H_out)`` or ``(D * num_layers, N, H_out)``; zeros if omitted.
        - **c_0**: ``(D * num_layers, H_cell)`` or ``(D * num_layers, N, H_cell)``; zeros if omitted.
        - **lengths** (keyword): per-sequence lengths of a padded batch, in any order: outputs are
          zero past each length and ``h_n``/``c_n`` come from each sequence's last valid step,
          exactly as with packing.

        where :math:`D` is 2 if bidirectional else 1, ``H_cell = hidden_size`` and ``H_out`` is
        ``proj_size`` if it is set, else ``hidden_size``.

    Outputs: output, (h_n, c_n)
        - **output**: ``(L, D * H_out)``, ``(L, N, D * H_out)`` or ``(N, L, D * H_out)``, or a
          PackedSequence for packed input: the last layer's :math:`h_t` for every step.
        - **h_n**: ``(D * num_layers, [N,] H_out)``: final hidden state of every layer-direction.
        - **c_n**: ``(D * num_layers, [N,] H_cell)``: final cell state.

    Attributes:
        weight_ih_l[k], weight_hh_l[k], bias_ih_l[k], bias_hh_l[k], weight_hr_l[k] (and the
        ``_reverse`` ones): the same names, shapes and initialization
        :math:`\mathcal{U}(-1/\sqrt{H}, 1/\sqrt{H})` as :class:`torch.nn.LSTM`, so state dicts load
        both ways. They are read through the module's attributes, once per call, so torch's
        parametrizations (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``,
        ``torch.nn.utils.parametrize.register_parametrization``), the legacy
        ``torch.nn.utils.weight_norm`` and plain tensors set in a weight's place (AWD-LSTM's
        WeightDrop) work as on :class:`torch.nn.LSTM`.

    Saving: ``torch.save(model)`` pickles the parameters, the options and lstmkit's public classes
    only. ``torch.load`` (``weights_only=True`` by default) loads such a file once they are allowed:
    ``torch.serialization.add_safe_globals(lstmkit.safe_globals())``. State dicts need nothing.

    Example::

        >>> lstm = lstmkit.LSTM(10, 20, 2)
        >>> x = torch.randn(5, 3, 10)
        >>> h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = lstm(x, (h0, c0))
        >>> output.shape, hn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        layer_norm: bool = False,
        peephole: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: Union[float, tuple[float, float]] = 0.0,
        forget_bias: Optional[float] = None,
    ) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                f"element being zeroed, got {dropout!r}"
            )
        _check_int("num_layers", num_layers, 1)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_bool("bidirectional", bidirectional)
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(
                f"proj_size should be a positive integer or zero to disable projections, got {proj_size!r}"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                f"and hidden_size={hidden_size}"
            )
        self.backend = backends.validate_name(backend)
        self.variants = Variants.parse(layer_norm=layer_norm, peephole=peephole, recurrent_dropout=recurrent_dropout,
                                       zoneout=zoneout, forget_bias=forget_bias, bias=bias)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.mode = "LSTM"

        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G = NUM_GATES * hidden_size
        P = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        self._suffixes: list[str] = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                layer_in = input_size if layer == 0 else P * D
                shapes = [("weight_ih", (G, layer_in)), ("weight_hh", (G, P))]
                if bias:
                    shapes += [("bias_ih", (G,)), ("bias_hh", (G,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for base, shape in shapes:
                    setattr(self, base + sfx, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(base + sfx)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
                self._suffixes.append(sfx)
        # variant parameters after all of torch's, so torch's parameter order is kept as a prefix
        self._variant_names = [self.variants.register(self, sfx, hidden_size, factory) for sfx in self._suffixes]
        self._init_transient()
        self.reset_parameters()

    _TRANSIENT = ("_runners", "_flat_getter")

    def _init_transient(self) -> None:
        self._flat_getter = operator.itemgetter(*self._flat_weights_names)
        # (x.shape, h.shape, c.shape, dtype, backend, batch_first, grad, threads) -> the backend's
        # function for plain calls of those shapes, or None (``_runner``)
        self._runners: dict = {}

    # -- torch.nn.LSTM compatibility -------------------------------------------------------------
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            init.uniform_(getattr(self, name), -stdv, stdv)
        for sfx, names in zip(self._suffixes, self._variant_names):
            b_ih, b_hh = getattr(self, "bias_ih" + sfx, None), getattr(self, "bias_hh" + sfx, None)
            self.variants.reset(self, names, b_ih, b_hh, self.hidden_size)

    def _weights(self) -> tuple[Tensor, ...]:
        """The weights in torch's ``_flat_weights`` order, read once per call (every path takes them
        from there). Straight from the parameter dict where all of them are this module's Parameters
        (0.11 us; nn.Module.__getattr__ costs ~1 us a name); else through the attributes, as torch
        reads them: a parametrization (``parametrizations.weight_norm``, ``spectral_norm``,
        ``register_parametrization``: computed here, once per call) or a plain tensor set in the
        weight's place (the legacy ``weight_norm``, AWD-LSTM's WeightDrop)."""
        if not _compiling():  # Dynamo cannot trace an itemgetter
            try:
                return self._flat_getter(self._parameters)
            except KeyError:
                pass
        return tuple(getattr(self, n) for n in self._flat_weights_names)

    @property
    def _flat_weights(self) -> tuple[Tensor, ...]:
        return self._weights()

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM (lstmkit needs no flat cuDNN buffer)."""

    def __prepare_scriptable__(self):
        _export.refuse_script(self)  # raises: names torch.jit.trace / torch.export instead

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        s += self.variants.extra_repr()
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def resolved_backend(self, device=None, dtype=None) -> str:
        """The name of the backend that ``backend="auto"`` (or the explicit choice) runs for inputs of
        ``device``/``dtype`` (default: the parameters'); raises if the explicit choice cannot serve them."""
        w = self.weight_ih_l0
        device = torch.device(device) if device is not None else w.device
        opts = self.variants.layer_options(self, self._suffixes[0], 1, 1, self.hidden_size, self._real_hidden_size,
                                           self.training, w.detach())
        return backends.resolve(self.backend, device, dtype or w.dtype, opts).NAME

    # -- forward ---------------------------------------------------------------------------------
    @property
    def _real_hidden_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _check_input(self, x: Tensor, packed: bool, w: Tensor) -> None:
        """Raise for an input that w (weight_ih_l0) and the options cannot take, with torch's
        messages."""
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({x.dtype})"
            )
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )
        if x.device != w.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{x.device} and parameter tensor at {w.device}"
            )
        if not packed and x.shape[0 if not self.batch_first else 1] == 0:
            raise RuntimeError(
                f"Expected sequence length to be larger than 0 in RNN, got input of shape {tuple(x.shape)}"
            )

    def _check_hidden(self, h: Tensor, c: Tensor, batch: int, arg: str = "hx") -> None:
        D = 2 if self.bidirectional else 1
        LD = self.num_layers * D
        expected = ((LD, batch, self._real_hidden_size), (LD, batch, self.hidden_size))
        for i, (t, exp) in enumerate(zip((h, c), expected)):
            if tuple(t.shape) != exp:
                raise RuntimeError(f"Expected hidden[{i}] size {exp}, got {list(t.shape)} ({arg}[{i}])")

    def _input_ok(self, x: Tensor, w: Tensor) -> bool:
        """True when x has w's (weight_ih_l0's) dtype and device and input_size features (the per-call
        check); False sends the caller through :meth:`_check_input`, which names what is wrong."""
        return x.dtype is w.dtype and x.device == w.device and x.shape[-1] == self.input_size

    def _state_ok(self, hx, x: Tensor, batch: int) -> bool:
        """True for a well-formed batched (h_0, c_0) (the per-call check of streaming loops); False
        sends the caller through the checks that name what is wrong."""
        if type(hx) is not tuple or len(hx) != 2:
            return False
        h, c = hx
        if type(h) is not Tensor or type(c) is not Tensor:
            return False
        D = 2 if self.bidirectional else 1
        return (h.dtype is x.dtype and c.dtype is x.dtype and h.device == x.device and c.device == x.device
                and h.shape == (self.num_layers * D, batch, self._real_hidden_size)
                and c.shape == (self.num_layers * D, batch, self.hidden_size))

    def _zeros_state(self, x: Tensor, batch: int) -> State:
        D = 2 if self.bidirectional else 1
        h = torch.zeros(self.num_layers * D, batch, self._real_hidden_size, dtype=x.dtype, device=x.device)
        c = torch.zeros(self.num_layers * D, batch, self.hidden_size, dtype=x.dtype, device=x.device)
        return h, c

    def _run(self, x: Tensor, h0: Tensor, c0: Tensor, batch_sizes: Optional[Tensor], weights: tuple[Tensor, ...]):
        """Time-first (T, B, I) input, (L*D, B, *) states, the call's weights (``_weights``) ->
        (output, h_n, c_n)."""
        opts_for = ln_ih = None
        v = self.variants
        if v.active(self.training):
            if _export.exporting():
                _export.check_module(self)  # random masks cannot be captured in a graph
            D = 2 if self.bidirectional else 1
            H, P, training = self.hidden_size, self._real_hidden_size, self.training

            def opts_for(layer: int, d: int, B: int, T: int):
                return v.layer_options(self, self._suffixes[layer * D + d], B, T, H, P, training, x)

            if v.layer_norm:
                ln_ih = [v.input_norm(self, sfx) for sfx in self._suffixes]
        return functional.lstm(
            x, h0, c0, weights,
            num_layers=self.num_layers, bidirectional=self.bidirectional, has_biases=self.bias,
            proj_size=self.proj_size, dropout=self.dropout, training=self.training,
            batch_sizes=batch_sizes, backend=self.backend, opts_for=opts_for, ln_ih=ln_ih,
        )

    def forward(
        self,
        input: Union[Tensor, PackedSequence],
        hx: Optional[State] = None,
        # not keyword-only: the TorchScript-based ONNX exporter passes every defaulted parameter of
        # the exported module's forward positionally
        lengths: Optional[Union[Tensor, list[int]]] = None,
    ):
        weights = self._weights()
        if type(input) is Tensor and lengths is None and input.dim() == 3:
            if hx is None and input.is_cpu:  # zeros, then the same path as a given state
                hx = self._zeros_state(input, input.shape[0 if self.batch_first else 1])
            if type(hx) is tuple:
                fast = self._fast(input, hx, weights)  # plain calls: the checks once per shape
                if fast is not None:
                    return fast
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths: must be None for a PackedSequence input (it carries its lengths)")
            return self._forward_packed(input, hx, weights)
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not self._input_ok(input, weights[0]) or input.shape[1 if batched and self.batch_first else 0] == 0:
            self._check_input(input, False, weights[0])  # raises, or accepts a dtype under autocast
        if not batched:
            if lengths is not None:
                raise ValueError("lengths: only valid for batched 3-D input, got unbatched 2-D input")
            input = input.unsqueeze(1)  # (T, 1, I) whatever batch_first says
            x = input
        else:
            x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I)
        B = x.shape[1]

        if hx is None:
            h0, c0 = self._zeros_state(x, B)
        elif batched and self._state_ok(hx, x, B):
            h0, c0 = hx
        else:
            h0, c0 = _unpack_hx(hx)
            _check_state_tensor("hx[0] (h_0)", h0, x)
            _check_state_tensor("hx[1] (c_0)", c0, x)
            want = 3 if batched else 2
            if h0.dim() != want or c0.dim() != want:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_hidden(h0, c0, B)

        if lengths is None:
            out, h_n, c_n = self._run(x, h0, c0, None, weights)
        else:
            out, h_n, c_n = self._forward_lengths(x, h0, c0, lengths, weights)

        if not batched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)

    # -- streaming ---------------------------------------------------------------------------------
    def step(self, x: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """Advance every sequence of the batch by one time step, carrying the state between calls.

        ``x``: ``(B, input_size)`` (or ``(input_size,)`` unbatched); ``state``: ``(h, c)`` as returned by
        the previous call or by ``forward`` (``(num_layers, B, H_out)``, ``(num_layers, B, hidden_size)``),
        or ``None`` for zeros. Returns ``(y, (h, c))`` with ``y`` the top layer's ``(B, H_out)``.
        The same numbers as one ``forward`` call over the whole sequence. Unidirectional LSTMs only.
        In training mode, recurrent dropout and zoneout masks are drawn per call.
        """
        weights = self._weights()
        if type(x) is Tensor and x.dim() == 2 and not self.bidirectional:
            if state is None and x.is_cpu:  # a stream's first step: zeros, then the same path
                state = self._zeros_state(x, x.shape[0])
            if type(state) is tuple:
                fast = self._fast(x, state, weights)  # the per-step path of streaming loops
                if fast is not None:
                    return fast
        if self.bidirectional:
            raise RuntimeError("step: a bidirectional LSTM needs the whole sequence; use forward() on it")
        if not isinstance(x, Tensor) or x.dim() not in (1, 2):
            got = f"{x.dim()}-D" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"step: expected x of shape (batch, input_size) or (input_size,), got {got}")
        batched = x.dim() == 2
        x1 = x.unsqueeze(0) if batched else x.view(1, 1, -1)  # (1, B, I)
        self._check_input(x1, False, weights[0])
        B = x1.shape[1]
        if state is None:
            h0, c0 = self._zeros_state(x1, B)
        else:
            h0, c0 = _unpack_hx(state, "state")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            _check_state_tensor("state[0] (h)", h0, x1)
            _check_state_tensor("state[1] (c)", c0, x1)
            if h0.dim() != 3 or c0.dim() != 3:
                raise RuntimeError(f"state: expected ({'2' if not batched else '3'}-D h, c) as step() returns, "
                                   f"got ({h0.dim() - (not batched)}-D, {c0.dim() - (not batched)}-D)")
            if h0.shape != (self.num_layers, B, self._real_hidden_size) or c0.shape != (
                    self.num_layers, B, self.hidden_size):
                self._check_hidden(h0, c0, B, "state")
        out, h, c = self._run(x1, h0, c0, None, weights)
        if not batched:
            return out[0, 0], (h[:, 0], c[:, 0])
        return out[0], (h, c)

    def _fast(self, x: Tensor, state: tuple, weights: tuple[Tensor, ...]) -> Optional[tuple[Tensor, State]]:
        """forward() of a batched CPU input (3-D) with a well-formed state, or step() of a batched x
        (B, I) without gradients, straight into the backend's function for these shapes (plain
        LSTM: no variant, no dropout at work); None leaves the call to the general path (which also
        names what is wrong). The checks are those of the general path, in their cheapest form (on
        small models they cost as much as the kernels): the shapes once, where the backend's
        function for them is made (``_runner``), the rest every call."""
        if len(state) != 2 or not functional.direct_calls_ok():
            return None
        h, c = state
        w = weights[0]
        dt = x.dtype
        if (type(h) is not Tensor or type(c) is not Tensor or h.dtype is not dt or c.dtype is not dt
                or w.dtype is not dt or not (x.is_cpu and h.is_cpu and c.is_cpu and w.is_cpu)
                or self.variants.active(self.training) or (self.training and self.dropout > 0 and self.num_layers > 1)):
            return None
        grad = torch.is_grad_enabled() and functional.needs_grad([x, h, c, *weights])
        if grad and x.dim() == 2:
            return None  # step() with gradients: the general path
        key = (x.shape, h.shape, c.shape, dt, self.backend, self.batch_first, grad, torch.get_num_threads())
        run = self._runners.get(key, _NO_RUNNER)
        if run is _NO_RUNNER:
            run = self._runner(key)
        if run is None:
            return None
        y, h, c = run(x, h, c, weights)
        return y, (h, c)

    def _runner(self, key: tuple) -> Optional[Callable]:
        """The backend's function for plain calls of (x.shape, h.shape, c.shape, dtype, backend,
        batch_first, grad, thread count), or None where those shapes are not a well-formed call of
        this module or the backend has none; remembered (``_remember``)."""
        x_shape, h_shape, c_shape, dt, backend, batch_first, grad, _ = key
        if len(x_shape) == 2:
            T, B = 1, x_shape[0]
        else:
            T, B = (x_shape[1], x_shape[0]) if batch_first else (x_shape[0], x_shape[1])
        LD = self.num_layers * (2 if self.bidirectional else 1)
        run = None
        if (x_shape[-1] == self.input_size and B > 0 and T > 0 and h_shape == (LD, B, self._real_hidden_size)
                and c_shape == (LD, B, self.hidden_size)):
            run = self._make_runner(backend, dt, x_shape, h_shape, c_shape, dt, num_layers=self.num_layers,
                                    bidirectional=self.bidirectional, has_biases=self.bias, proj_size=self.proj_size,
                                    batch_first=batch_first, grad=grad)
        return self._remember(key, run)

    @staticmethod
    def reset_state(state: State, rows) -> State:
        """Zero the state of chosen batch rows (new sequences starting there), e.g. between stream chunks.

        ``rows``: a bool mask ``(B,)`` or a list/tensor of row indices. Returns a new ``(h, c)``; the
        argument is not modified.
        """
        h, c = _unpack_hx(state, "state")
        B = h.shape[1]
        r = torch.as_tensor(rows, device=h.device)
        if r.dtype == torch.bool:
            if r.shape != (B,):
                raise ValueError(f"rows: expected a bool mask of shape ({B},), got shape {tuple(r.shape)}")
            keep = ~r
        else:
            if r.numel() and (int(r.min()) < -B or int(r.max()) >= B):
                raise IndexError(f"rows: expected indices in [0, {B}), got {r.tolist()}")
            keep = torch.ones(B, dtype=torch.bool, device=h.device)
            keep[r.long()] = False
        keep = keep.view(1, B, 1)
        return h * keep, c * keep

    def _forward_lengths(self, x: Tensor, h0: Tensor, c0: Tensor, lengths,
                         weights: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        if _export.exporting():
            _export.refuse_lengths()  # a graph would keep the traced call's lengths
        T, B = x.shape[0], x.shape[1]
        lens = torch.as_tensor(lengths)
        if lens.dim() != 1 or lens.numel() != B:
            raise ValueError(f"lengths: expected a 1-D sequence of {B} lengths (one per batch row), "
                             f"got shape {tuple(lens.shape)}")
        if lens.dtype.is_floating_point or lens.dtype == torch.bool:
            raise TypeError(f"lengths: expected integers, got dtype {lens.dtype}")
        lens = lens.to("cpu", torch.int64)
        if B and (int(lens.min()) < 1 or int(lens.max()) > T):
            raise ValueError(f"lengths: expected every length in [1, {T}] (the sequence length), "
                             f"got min {int(lens.min())}, max {int(lens.max())}")
        if B == 0 or bool((lens == T).all()):
            return self._run(x, h0, c0, None, weights)
        sorted_lens, order = torch.sort(lens, descending=True)
        unorder = torch.empty_like(order)
        unorder[order] = torch.arange(B)
        batch_sizes = functional.lengths_to_batch_sizes(sorted_lens, T)
        dev = x.device
        order_d, unorder_d = order.to(dev), unorder.to(dev)
        out, h_n, c_n = self._run(x.index_select(1, order_d), h0.index_select(1, order_d),
                                  c0.index_select(1, order_d), batch_sizes, weights)
        return out.index_select(1, unorder_d), h_n.index_select(1, unorder_d), c_n.index_select(1, unorder_d)

    def _forward_packed(self, packed: PackedSequence, hx: Optional[State], weights: tuple[Tensor, ...]):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {data.dim()} (the data of a PackedSequence)")
        self._check_input(data, True, weights[0])
        B = int(batch_sizes[0])
        if hx is None:
            h0, c0 = self._zeros_state(data, B)
        else:
            h0, c0 = _unpack_hx(hx)
            _check_state_tensor("hx[0] (h_0)", h0, data)
            _check_state_tensor("hx[1] (c_0)", c0, data)
            self._check_hidden(h0, c0, B)
            if sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        x = functional.packed_to_padded(data, batch_sizes)  # (T, B, I)
        out, h_n, c_n = self._run(x, h0, c0, batch_sizes, weights)
        out_packed = PackedSequence(functional.padded_to_packed(out, batch_sizes), batch_sizes,
                                    sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return out_packed, (h_n, c_n)


class LSTMCell(_KeepsRunners, nn.Module):
    r"""A long short-term memory cell, numerically the same as :class:`torch.nn.LSTMCell`.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}) \\
        g = \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = f \odot c + i \odot g \\
        h' = o \odot \tanh(c')
        \end{array}

    Args:
        input_size: features of the input :math:`x`.
        hidden_size: features of the hidden state :math:`h`.
        bias: if ``False``, no ``bias_ih`` and ``bias_hh``. Default: ``True``
        device, dtype: where and how to create the parameters.
        backend: ``"auto"`` or a name from :func:`lstmkit.available_backends`.

    Inputs: input, (h_0, c_0)
        - **input**: ``(N, H_in)`` or ``(H_in)``.
        - **h_0**, **c_0**: ``(N, H)`` or ``(H)``; zeros if omitted.

    Outputs: (h_1, c_1), each ``(N, H)`` or ``(H)``.

    Attributes:
        weight_ih ``(4H, H_in)``, weight_hh ``(4H, H)``, bias_ih ``(4H)``, bias_hh ``(4H)``,
        initialized :math:`\mathcal{U}(-1/\sqrt{H}, 1/\sqrt{H})` as in torch; read through the
        attributes once per call (parametrizations, weight_norm, plain tensors: see
        :class:`LSTM`). Saving and ``torch.load``: as :class:`LSTM`.

    Example::

        >>> cell = lstmkit.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto", layer_norm: bool = False, peephole: bool = False,
                 recurrent_dropout: float = 0.0, zoneout: Union[float, tuple[float, float]] = 0.0,
                 forget_bias: Optional[float] = None) -> None:
        super().__init__()
        _check_bool("bias", bias)
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        self.backend = backends.validate_name(backend)
        self.variants = Variants.parse(layer_norm=layer_norm, peephole=peephole, recurrent_dropout=recurrent_dropout,
                                       zoneout=zoneout, forget_bias=forget_bias, bias=bias)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        G = NUM_GATES * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((G, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((G, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._variant_names = self.variants.register(self, "", hidden_size, factory)
        self._init_transient()
        self.reset_parameters()

    _TRANSIENT = ("_runners", "_weights_getter", "_rec_mask")

    def _init_transient(self) -> None:
        self._weights_getter = operator.itemgetter(*_CELL_WEIGHTS[:4 if self.bias else 2])
        # (x.shape, h.shape, c.shape, dtype, backend, threads) -> the backend's one-step function for
        # calls without gradients (``_runner``), or None
        self._runners: dict = {}
        self._rec_mask: Optional[Tensor] = None  # the recurrent-dropout mask of the sequence in progress

    def _weights(self) -> tuple[Tensor, ...]:
        """(weight_ih, weight_hh[, bias_ih, bias_hh]), read once per call as :meth:`LSTM._weights`."""
        if not _compiling():  # Dynamo cannot trace an itemgetter
            try:
                return self._weights_getter(self._parameters)
            except KeyError:
                pass
        return tuple(getattr(self, n) for n in _CELL_WEIGHTS[:4 if self.bias else 2])

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            if w is not None:
                init.uniform_(w, -stdv, stdv)
        self.variants.reset(self, self._variant_names, self.bias_ih, self.bias_hh, self.hidden_size)

    def reset_dropout_mask(self) -> None:
        """Start a new recurrent-dropout mask at the next call (call it at the start of each sequence).

        With ``recurrent_dropout > 0`` in training mode the cell keeps one mask across calls, so that a
        sequence run step by step shares one mask (variational dropout); a new mask is also drawn when
        the batch size changes.
        """
        self._rec_mask = None

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s + self.variants.extra_repr()

    def __prepare_scriptable__(self):
        _export.refuse_script(self)  # raises: names torch.jit.trace / torch.export instead

    def forward(self, input: Tensor, hx: Optional[State] = None) -> State:
        weights = self._weights()
        if type(input) is Tensor and input.dim() == 2 and input.is_cpu:
            if hx is None:  # zeros, then the same path as a given state
                z = torch.zeros(input.shape[0], self.hidden_size, dtype=input.dtype)
                hx = (z, z)
            if type(hx) is tuple:
                fast = self._fast(input, hx, weights)  # token-by-token calls: the checks once per shape
                if fast is not None:
                    return fast
        # torch's checks in torch's order (ranks, then sizes), then dtype and device
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            h, c = _unpack_hx(hx)
            for idx, (name, t) in enumerate((("hx[0] (h)", h), ("hx[1] (c)", c))):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
                if t.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {t.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.shape[-1]} expected {self.input_size}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B, H = x.shape[0], self.hidden_size
        if hx is None:
            h = c = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        else:
            for name, t in (("hx[0] (h)", h), ("hx[1] (c)", c)):
                if t.dim() != input.dim():
                    raise RuntimeError(f"{name}: expected {input.dim()}-D like the input, got {t.dim()}-D")
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
            for idx, t in enumerate((h, c)):
                if t.shape[0] != B:
                    raise RuntimeError(f"Input batch size {B} doesn't match hidden{idx} batch size {t.shape[0]}")
                if t.shape[1] != H:
                    raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {t.shape[1]}, expected {H}")
        w = weights[0]
        if input.dtype != w.dtype:
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})"
            )
        if input.device != w.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {w.device}"
            )
        if hx is not None:
            _check_state_tensor("hx[0] (h)", h, x)
            _check_state_tensor("hx[1] (c)", c, x)
        opts = ln_ih = None
        v = self.variants
        if not v.plain and v.active(self.training):  # a plain cell never reads the training flag
            if _export.exporting():
                _export.check_module(self)  # random masks cannot be captured in a graph
            H = self.hidden_size
            opts = v.layer_options(self, "", B, 1, H, H, self.training, x)
            if opts.rec_mask is not None:
                if self._rec_mask is None or self._rec_mask.shape != opts.rec_mask.shape:
                    self._rec_mask = opts.rec_mask
                opts.rec_mask = self._rec_mask
            ln_ih = v.input_norm(self, "")
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        h1, c1 = functional.lstm_cell(x, h, c, weights[0], weights[1], b_ih, b_hh,
                                      backend=self.backend, opts=opts, ln_ih=ln_ih)
        if not batched:
            return h1.squeeze(0), c1.squeeze(0)
        return h1, c1

    def _fast(self, x: Tensor, state: tuple, weights: tuple[Tensor, ...]) -> Optional[State]:
        """A batched CPU step without gradients straight into the backend's one-step function for
        these shapes (``LSTM.step``'s, one layer; no variant at work), or None: the general path,
        which also names what is wrong. The shapes are checked once, where that function is made."""
        if len(state) != 2 or not functional.direct_calls_ok():
            return None
        h, c = state
        dt = x.dtype
        if (type(h) is not Tensor or type(c) is not Tensor or h.dtype is not dt or c.dtype is not dt
                or weights[0].dtype is not dt or not (h.is_cpu and c.is_cpu and weights[0].is_cpu)
                or (not self.variants.plain and self.variants.active(self.training))
                or (torch.is_grad_enabled() and functional.needs_grad([x, h, c, *weights]))):
            return None
        key = (x.shape, h.shape, c.shape, dt, self.backend, torch.get_num_threads())
        run = self._runners.get(key, _NO_RUNNER)
        if run is _NO_RUNNER:
            run = self._runner(key)
        if run is None:
            return None
        y, _, c1 = run(x, h[None], c[None], weights)
        return y, c1[0]

    def _runner(self, key: tuple) -> Optional[Callable]:
        """The backend's one-step function for (x.shape, h.shape, c.shape, dtype, backend, thread
        count), or None where those are not a well-formed step of this cell or the backend has none;
        remembered (``_remember``)."""
        x_shape, h_shape, c_shape, dt, backend, _ = key
        B, H = x_shape[0], self.hidden_size
        run = None
        if x_shape[1] == self.input_size and B > 0 and h_shape == (B, H) and c_shape == (B, H):
            run = self._make_runner(backend, dt, x_shape, (1, B, H), (1, B, H), dt, num_layers=1,
                                    bidirectional=False, has_biases=self.bias, proj_size=0, batch_first=False,
                                    grad=False)
        return self._remember(key, run)
