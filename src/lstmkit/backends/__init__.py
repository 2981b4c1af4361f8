"""Backend registry: which backends exist, which can serve an input, and ``backend="auto"``.

Backends are imported lazily, so ``import lstmkit`` does not pay for Numba or Triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

from .. import _warmup
from ._contract import LayerOptions

__all__ = ["LayerOptions", "available_backends", "resolve", "BACKEND_MODULES"]

# name -> module; "auto" tries them in this order and takes the first that can serve the input and
# lists the input's device type in its AUTO_DEVICE_TYPES (absent: any device). The Triton
# interpreter can run CPU tensors, but "auto" must only pick Triton for CUDA tensors.
BACKEND_MODULES = {
    "triton": "lstmkit.backends.triton_gpu",
    "numba": "lstmkit.backends.numba_cpu",
    "reference": "lstmkit.backends.reference",
}

_loaded: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as exc:  # a missing optional dependency
        _import_errors[name] = f"not installed ({exc})"
        return None
    _loaded[name] = mod
    return mod


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are installed, in ``auto`` preference order."""
    return [name for name in BACKEND_MODULES if _load(name) is not None]


def _why_not(name: str, device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions]) -> Optional[str]:
    mod = _load(name)
    if mod is None:
        return _import_errors[name]
    return mod.unavailable(device, dtype, opts)


def resolve(
    name: str, device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions] = None, units: int = 0
) -> ModuleType:
    """The backend module that runs tensors of ``device``/``dtype`` with ``opts``.

    ``"auto"`` picks the first backend in :data:`BACKEND_MODULES` order that can serve the input,
    except that a backend may leave calls of ``units`` (batch rows x hidden units, where the caller
    knows them) to the reference backend as slower (its ``declines(dtype, units)``). An explicit
    name that cannot serve the input raises; nothing falls back silently.

    Under a ``torch.func`` transform (``jacrev``, ``vmap``, ``grad``, ...) only the reference
    backend can run: the fused kernels work outside torch's dispatcher, where no transform sees
    them. ``"auto"`` picks it there; an explicit other name raises.
    """
    if torch._C._are_functorch_transforms_active() and name != "reference":
        if name != "auto":
            raise RuntimeError(
                f"backend {name!r} cannot run under torch.func transforms (jacrev, vmap, grad, ...): its "
                "kernels run outside torch's dispatcher; use backend='auto' or 'reference'"
            )
        return _resolve("reference", device, dtype, opts)
    if opts is None:  # the per-call path of plain LSTMs: remember the answer (once it is final)
        key = (name, device, dtype)
        mod = _plain_choice.get(key)
        if mod is None:
            mod = _resolve(name, device, dtype, None)
            if mod is not _warmup.PENDING:
                _plain_choice[key] = mod
    else:
        mod = _resolve(name, device, dtype, opts)
    if units and dtype is torch.float64 and name == "auto" and declines(mod, dtype, units):
        return _load("reference")
    return mod


def declines(mod: ModuleType, dtype: torch.dtype, units: int) -> bool:
    """Whether backend ``mod`` leaves calls of dtype with ``units`` (rows x hidden units) to the
    reference backend under ``auto``."""
    fn = getattr(mod, "declines", None)
    return fn is not None and fn(dtype, units)


_plain_choice: dict[tuple, ModuleType] = {}


def _while_compiling(dtype: torch.dtype, opts: Optional[LayerOptions]) -> Optional[ModuleType]:
    """What ``auto`` answers instead of numba while numba's kernels for ``dtype`` are not known to be
    in the on-disk cache (``lstmkit/_warmup.py``): the reference backend (the same numbers within
    the documented tolerance), with a background process compiling them; None once they are ready,
    or where the background compile is off (``LSTMKIT_BACKGROUND_COMPILE=0``) or could not start.
    A plain call (``opts`` None) gets :data:`_warmup.PENDING`, the reference backend whose
    ``call_runner`` gives modules functions that switch to numba's once the kernels are ready (the
    modules keep their functions)."""
    kind = "plain" if opts is None or opts.is_plain() else "variants"
    if _warmup.ready(dtype, kind) or not _warmup.start_background(dtype, kind):
        return None
    return _warmup.PENDING if opts is None else _load("reference")


def _resolve(name: str, device: torch.device, dtype: torch.dtype, opts: Optional[LayerOptions]) -> ModuleType:
    if name == "auto":
        for cand in BACKEND_MODULES:
            if _why_not(cand, device, dtype, opts) is None:
                auto_types = getattr(_loaded[cand], "AUTO_DEVICE_TYPES", None)
                if auto_types is None or device.type in auto_types:
                    if cand == "numba" and not torch.compiler.is_compiling():  # (compiled: its ops)
                        return _while_compiling(dtype, opts) or _loaded[cand]
                    return _loaded[cand]
        raise RuntimeError(f"no lstmkit backend can run device={device}, dtype={dtype}")
    if name not in BACKEND_MODULES:
        raise ValueError(
            f"backend: expected 'auto' or one of {list(BACKEND_MODULES)}, got {name!r}"
        )
    reason = _why_not(name, device, dtype, opts)
    if reason is not None:
        usable = [c for c in BACKEND_MODULES if _why_not(c, device, dtype, opts) is None]
        raise RuntimeError(
            f"backend {name!r} cannot run device={device}, dtype={dtype}: {reason}; "
            f"backends that can: {usable}"
        )
    return _loaded[name]


def validate_name(name: str) -> str:
    """Check a module's ``backend=`` argument; also imports the backends, so that the first forward
    call (possibly under torch.compile, which cannot trace an import) finds them loaded."""
    available_backends()
    if not isinstance(name, str) or (name != "auto" and name not in BACKEND_MODULES):
        raise ValueError(
            f"backend: expected 'auto' or one of {list(BACKEND_MODULES)}, got {name!r}; "
            f"installed: {available_backends()}"
        )
    return name
