"""Where each backend's implementation of an op family lives.

Ops are declared once (schema, fake impl, autograd) in ``pysteer/ops/<family>.py``; backends only
provide implementations, looked up lazily so ``import pysteer`` imports neither Triton nor the
CUDA extension:

- ``torch``:  ``pysteer.ops.<family>.<name>_ref``  (product code and test oracle)
- ``triton``: ``pysteer.kernels.<family>.<name>``
- ``cuda``:   ``pysteer.ops.cuda_<family>.<name>`` (thin wrappers passing raw pointers to ``pysteer._C``)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from .._backend import BACKENDS


@functools.cache
def get_impl(family: str, name: str, backend: str) -> Callable:
    """Return the ``backend`` implementation of op ``name`` in ``family``.

    Raises:
        ValueError: unknown backend.
        ImportError / AttributeError: that backend does not implement the op (message names it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        module, attr = f"pysteer.ops.{family}", f"{name}_ref"
    elif backend == "triton":
        module, attr = f"pysteer.kernels.{family}", name
    else:
        module, attr = f"pysteer.ops.cuda_{family}", name
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise AttributeError(f"backend {backend!r} has no implementation of {family}.{name} ({module}.{attr})") from None
