"""``python -m lstmkit.warmup``: compile lstmkit's CPU kernels into the on-disk cache.

    python -m lstmkit.warmup --dtypes float32 float64 --variants layer_norm

See :func:`lstmkit.warmup` (``lstmkit/_warmup.py``) for what is compiled and where the cache lives.
Importing this module leaves ``lstmkit.warmup`` the function: the module is callable as it.
"""

import sys
import types

from ._warmup import main, warmup


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return warmup(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
