"""Keeping the kernels' on-disk Numba cache fresh across edits of the files they depend on.

Numba's cache checks only the source file of the function it compiled, but a kernel has the
functions it calls from other files compiled into it (``numba_lstm``'s GEMM and activations, the
variants' step, ``numba_blas``'s constants, ``_gates``'s epsilon): after an edit there, a
cached kernel would run the old code (seen: garbage from a changed packed-weight format, and a
kernel that kept the old ``mm`` after it changed). :func:`tie_module` adds the stamps (name, mtime,
size) of every kernel source file and of ``_gates.py`` to the cache index stamp of each
dispatcher a module defines, so an edit to any of them makes every entry stale (recompiled once).
The warm-up markers (``lstmkit/_warmup.py``) hold the same stamps (this module imports Numba only
in :func:`tie_module`).

Numba keys each entry of a cache index by the signature, the function's bytecode and
``codegen.magic_tuple()``: the target triple, the host CPU's name and its feature string (numba
0.63, ``numba/core/caching.py``, ``Cache._index_key``). A cache directory shared between machines
(an image, a CI cache) therefore never loads code built for another CPU: such a machine compiles
its own entries next to the others.
"""

from __future__ import annotations

import os

_DIR = os.path.dirname(os.path.abspath(__file__))
_FILES = sorted(os.path.join(_DIR, f) for f in os.listdir(_DIR) if f.endswith(".py")) + [
    os.path.join(os.path.dirname(_DIR), "_gates.py")]
# the 512-bit switch (``numba_blas.wide_vectors``) changes the compiled code: part of the stamp
WIDE_VECTORS = os.environ.get("LSTMKIT_WIDE_VECTORS", "1") != "0"
_STAMPS = tuple((os.path.basename(f), os.stat(f).st_mtime, os.stat(f).st_size) for f in _FILES) + (
    ("wide_vectors", WIDE_VECTORS),)


def tie(obj) -> None:
    """Add the kernel sources' stamps to the cache stamp of a dispatcher or ``CFunc`` (before its
    first compile or cache load); nothing for an object without an on-disk cache."""
    cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = (cache_file._source_stamp, _STAMPS)


def tie_module(namespace: dict) -> None:
    """:func:`tie` every Numba dispatcher defined in the module whose globals are ``namespace``."""
    from numba.core.dispatcher import Dispatcher

    name = namespace["__name__"]
    for v in list(namespace.values()):
        if isinstance(v, Dispatcher) and getattr(v.py_func, "__module__", None) == name:
            tie(v)
