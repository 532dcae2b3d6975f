"""The op table: where every part of every ``pysteer::`` op lives.

Each op family is one :class:`OpFamily` row of :data:`FAMILIES`, and each of its ops one :class:`Op`
naming, as ``"module:attribute"`` strings, the registered custom op (its schema comes from the
declaration's signature; validation runs in its body), its fake (meta) implementation, the function
its autograd formula calls, and the three backends' implementations:

- ``torch``:  the reference (product code on CPU, compile-visible math, and the test oracle);
- ``triton``: a launcher in ``pysteer.kernels.<family>``;
- ``cuda``:   a thin wrapper in ``pysteer.ops.cuda_<family>`` passing raw pointers to ``pysteer._C``.

Nothing here imports a module: the strings are resolved on first use by :func:`resolve` /
:func:`get_impl`, so ``import pysteer`` imports neither Triton nor the CUDA extension. Every op
body validates its arguments (once, for every backend) before calling ``get_impl``; the backend
implementations trust them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

from .._backend import BACKENDS


@dataclasses.dataclass(frozen=True)
class Op:
    """One registered op, ``torch.ops.pysteer.<name>``; every field but ``name`` is ``"module:attribute"``.

    Attributes:
        name: the op's name in the ``pysteer`` namespace.
        declared: the ``torch.library.custom_op`` object (schema, validation, dispatch on ``backend``).
        fake: the implementation registered for fake / meta tensors.
        autograd: what the registered backward calls (an op, or a torch reference backward).
        torch: the torch reference.
        triton: the Triton launcher.
        cuda: the CUDA-extension wrapper.
    """

    name: str
    declared: str
    fake: str
    autograd: str | None
    torch: str
    triton: str
    cuda: str

    def impl(self, backend: str) -> str:
        """The ``"module:attribute"`` of ``backend``'s implementation."""
        return getattr(self, backend)


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """A family of ops declared together in ``module`` (``pysteer/ops/<name>.py``)."""

    name: str
    module: str
    ops: tuple[Op, ...]

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(
            f"op family {self.name!r} has no op {name!r}; it has {', '.join(o.name for o in self.ops)}"
        )


FAMILIES: dict[str, OpFamily] = {
    family.name: family
    for family in (
        OpFamily(
            name="affine",
            module="pysteer.ops.affine",
            ops=(
                Op(
                    name="affine_steer",
                    declared="pysteer.ops.affine:_affine_steer_op",
                    fake="pysteer.ops.affine:_affine_steer_fake",
                    autograd="pysteer.ops.affine:_affine_steer_backward_op",
                    torch="pysteer.ops.affine:affine_steer_ref",
                    triton="pysteer.kernels.affine:affine_steer",
                    cuda="pysteer.ops.cuda_affine:affine_steer",
                ),
                Op(
                    name="affine_steer_backward",
                    declared="pysteer.ops.affine:_affine_steer_backward_op",
                    fake="pysteer.ops.affine:_affine_steer_backward_fake",
                    autograd=None,
                    torch="pysteer.ops.affine:affine_steer_backward_ref",
                    triton="pysteer.kernels.affine:affine_steer_backward",
                    cuda="pysteer.ops.cuda_affine:affine_steer_backward",
                ),
            ),
        ),
        OpFamily(
            name="affine_linear",
            module="pysteer.ops.affine_linear",
            ops=(
                Op(
                    name="affine_linear",
                    declared="pysteer.ops.affine_linear:_affine_linear_op",
                    fake="pysteer.ops.affine_linear:_affine_linear_fake",
                    autograd="pysteer.ops.affine_linear:affine_linear_backward_ref",
                    torch="pysteer.ops.affine_linear:affine_linear_ref",
                    triton="pysteer.kernels.affine_linear:affine_linear",
                    cuda="pysteer.ops.cuda_affine_linear:affine_linear",
                ),
            ),
        ),
        OpFamily(
            name="lowrank",
            module="pysteer.ops.lowrank",
            ops=(
                Op(
                    name="lowrank_edit",
                    declared="pysteer.ops.lowrank:_lowrank_edit_op",
                    fake="pysteer.ops.lowrank:_lowrank_edit_fake",
                    autograd="pysteer.ops.lowrank:_lowrank_edit_backward_op",
                    torch="pysteer.ops.lowrank:lowrank_edit_ref",
                    triton="pysteer.kernels.lowrank:lowrank_edit",
                    cuda="pysteer.ops.cuda_lowrank:lowrank_edit",
                ),
                Op(
                    name="lowrank_edit_backward",
                    declared="pysteer.ops.lowrank:_lowrank_edit_backward_op",
                    fake="pysteer.ops.lowrank:_lowrank_edit_backward_fake",
                    autograd=None,
                    torch="pysteer.ops.lowrank:lowrank_edit_backward_ref",
                    triton="pysteer.kernels.lowrank:lowrank_edit_backward",
                    cuda="pysteer.ops.cuda_lowrank:lowrank_edit_backward",
                ),
            ),
        ),
        OpFamily(
            name="sae",
            module="pysteer.ops.sae",
            ops=(
                Op(
                    name="sae_encode",
                    declared="pysteer.ops.sae:_sae_encode_op",
                    fake="pysteer.ops.sae:_sae_encode_fake",
                    autograd="pysteer.ops.sae:_sae_encode_backward",
                    torch="pysteer.ops.sae:sae_encode_ref",
                    triton="pysteer.kernels.sae:sae_encode",
                    cuda="pysteer.ops.cuda_sae:sae_encode",
                ),
                Op(
                    name="sae_encode_topk",
                    declared="pysteer.ops.sae:_sae_encode_topk_op",
                    fake="pysteer.ops.sae:_sae_encode_topk_fake",
                    autograd="pysteer.ops.sae:_sae_encode_topk_backward",
                    torch="pysteer.ops.sae:sae_encode_topk_ref",
                    triton="pysteer.kernels.sae:sae_encode_topk",
                    cuda="pysteer.ops.cuda_sae:sae_encode_topk",
                ),
                Op(
                    name="sae_decode_sparse",
                    declared="pysteer.ops.sae:_sae_decode_sparse_op",
                    fake="pysteer.ops.sae:_sae_decode_sparse_fake",
                    autograd="pysteer.ops.sae:_sae_decode_sparse_backward",
                    torch="pysteer.ops.sae:sae_decode_sparse_ref",
                    triton="pysteer.kernels.sae:sae_decode_sparse",
                    cuda="pysteer.ops.cuda_sae:sae_decode_sparse",
                ),
                Op(
                    name="sae_steer",
                    declared="pysteer.ops.sae:_sae_steer_op",
                    fake="pysteer.ops.sae:_sae_steer_fake",
                    autograd="pysteer.ops.sae:sae_steer_backward_ref",
                    torch="pysteer.ops.sae:sae_steer_ref",
                    triton="pysteer.kernels.sae:sae_steer",
                    cuda="pysteer.ops.cuda_sae:sae_steer",
                ),
            ),
        ),
    )
}


def resolve(target: str) -> object:
    """Import ``"module:attribute"`` and return the attribute (looked up afresh on every call)."""
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise AttributeError(
            f"{module} has no attribute {attr!r} (named in pysteer/ops/_registry.py)"
        ) from None


@functools.cache
def get_impl(family: str, name: str, backend: str) -> Callable:
    """Return the ``backend`` implementation of op ``name`` in ``family``, as :data:`FAMILIES` names it.

    Raises:
        ValueError: unknown backend.
        KeyError: unknown family or op.
        ImportError / AttributeError: the module named for that backend cannot be imported or
            lacks the function (the message names it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        fam = FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown op family {family!r}; the families are {', '.join(FAMILIES)}") from None
    return resolve(fam.op(name).impl(backend))
