"""The per-row affine steering op (ARCHITECTURE.md, "Decisions every part shares").

    y[t, h, :] = x[t, h, :] * M[r[t], h, :] + A[r[t], h, :]

``x`` is a site tensor flattened to ``[T, H, D]``; ``M`` and ``A`` are steering tables ``[C, H, Dm]``
and ``[C, H, Da]`` with ``Dm, Da in {1, D}`` (a per-head scalar is stored with a last dim of 1);
``r`` is an int32 row index per token. Row 0 means "leave this token alone" and is bit-exact:
the output of such a token is ``x`` itself, whatever row 0 of the tables holds. Compute is fp32
for every input dtype; the output has ``x``'s dtype.

Backward gives ``dx = g * M[r]`` and accumulates ``dM[c] = sum_{r(t)=c} g*x`` and
``dA[c] = sum_{r(t)=c} g`` per table row (summed over D for a last dim of 1). Tokens on row 0
contribute nothing to the tables' gradients (the forward does not read row 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_kernel_dtypes
from ._registry import get_impl

# ---------------------------------------------------------------------------------------------
# validation: once per call, in the op bodies below, for every backend (before any kernel)
# ---------------------------------------------------------------------------------------------


def check_affine_args(x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str = "torch") -> None:
    """Raise ``ValueError`` naming the first problem with the op's arguments.

    ``backend`` other than ``"torch"`` also requires fp32/fp16/bf16 ``x``, ``M`` and ``A`` (what the
    kernels are instantiated for); the torch reference also takes float64.
    """
    if x.dim() != 3:
        raise ValueError(f"affine_steer: x must be [T, H, D], got shape {tuple(x.shape)}")
    T, H, D = x.shape
    if rows.dim() != 1 or rows.shape[0] != T:
        raise ValueError(f"affine_steer: rows must be [T]=[{T}], got shape {tuple(rows.shape)}")
    if rows.dtype != torch.int32:
        raise ValueError(f"affine_steer: rows must be int32, got {rows.dtype}")
    for name, tab in (("M", M), ("A", A)):
        if tab.dim() != 3:
            raise ValueError(f"affine_steer: {name} must be [C, H, D] or [C, H, 1], got {tuple(tab.shape)}")
        if tab.shape[1] != H:
            raise ValueError(f"affine_steer: {name} has {tab.shape[1]} heads, x has {H}")
        if tab.shape[2] not in (1, D):
            raise ValueError(f"affine_steer: {name} last dim must be 1 or D={D}, got {tab.shape[2]}")
        if tab.device != x.device:
            raise ValueError(f"affine_steer: {name} is on {tab.device}, x on {x.device}")
    if M.shape[0] != A.shape[0]:
        raise ValueError(f"affine_steer: M has {M.shape[0]} rows, A has {A.shape[0]}")
    if rows.device != x.device:
        raise ValueError(f"affine_steer: rows is on {rows.device}, x on {x.device}")
    check_kernel_dtypes("affine_steer", backend, x=x, M=M, A=A)


def check_affine_backward_args(
    grad: Tensor, x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str = "torch"
) -> None:
    """:func:`check_affine_args`, and ``grad`` must have ``x``'s shape, dtype and device."""
    check_affine_args(x, rows, M, A, backend)
    if grad.shape != x.shape:
        raise ValueError(f"affine_steer_backward: grad has shape {tuple(grad.shape)}, x has {tuple(x.shape)}")
    if grad.dtype != x.dtype:
        raise ValueError(f"affine_steer_backward: grad is {grad.dtype}, x is {x.dtype}")
    if grad.device != x.device:
        raise ValueError(f"affine_steer_backward: grad is on {grad.device}, x on {x.device}")


# ---------------------------------------------------------------------------------------------
# torch reference: product code (CPU path, compile-visible math) and the test oracle
# ---------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; float64 stays float64 (so gradcheck sees float64 math)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def affine_steer_ref(x: Tensor, rows: Tensor, M: Tensor, A: Tensor) -> Tensor:
    """Reference forward. Any strides; returns a contiguous tensor of ``x``'s dtype."""
    r = rows.long()
    ct = _compute_dtype(x)
    y = (x.to(ct) * M[r].to(ct) + A[r].to(ct)).to(x.dtype)
    return torch.where((r == 0)[:, None, None], x, y).contiguous()


def affine_steer_backward_ref(
    grad: Tensor, x: Tensor, rows: Tensor, M: Tensor, A: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference backward: ``(dx, dM, dA)`` with the shapes and dtypes of ``x``, ``M``, ``A``."""
    r = rows.long()
    ct = _compute_dtype(x)
    live = (r != 0)[:, None, None]
    g = grad.to(ct)
    dx = torch.where(live, g * M[r].to(ct), g).to(x.dtype)
    g = g * live
    gx = g * x.to(ct)
    if M.shape[2] == 1:
        gx = gx.sum(-1, keepdim=True)
    gA = g.sum(-1, keepdim=True) if A.shape[2] == 1 else g
    dM = torch.zeros(M.shape, dtype=ct, device=M.device).index_add_(0, r, gx)
    dA = torch.zeros(A.shape, dtype=ct, device=A.device).index_add_(0, r, gA)
    return dx, dM.to(M.dtype), dA.to(A.dtype)


# ---------------------------------------------------------------------------------------------
# op declarations: one schema, implementations chosen by the ``backend`` argument
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("pysteer::affine_steer", mutates_args=())
def _affine_steer_op(x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str) -> Tensor:
    check_affine_args(x, rows, M, A, backend)
    return get_impl("affine", "affine_steer", backend)(x, rows, M, A)


@_affine_steer_op.register_fake
def _affine_steer_fake(x, rows, M, A, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("pysteer::affine_steer_backward", mutates_args=())
def _affine_steer_backward_op(
    grad: Tensor, x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    check_affine_backward_args(grad, x, rows, M, A, backend)
    return get_impl("affine", "affine_steer_backward", backend)(grad, x, rows, M, A)


@_affine_steer_backward_op.register_fake
def _affine_steer_backward_fake(grad, x, rows, M, A, backend):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(M.shape, dtype=M.dtype, device=M.device),
        torch.empty(A.shape, dtype=A.dtype, device=A.device),
    )


def _setup_context(ctx, inputs, output):
    x, rows, M, A, backend = inputs
    ctx.save_for_backward(x, rows, M, A)
    ctx.backend = backend


def _backward(ctx, grad):
    x, rows, M, A = ctx.saved_tensors
    dx, dM, dA = torch.ops.pysteer.affine_steer_backward(grad.contiguous(), x, rows, M, A, ctx.backend)
    return dx, None, dM, dA, None


_affine_steer_op.register_autograd(_backward, setup_context=_setup_context)


def affine_steer(x: Tensor, rows: Tensor, M: Tensor, A: Tensor, backend: str = "torch") -> Tensor:
    """Apply per-row affine steering.

    Args:
        x: ``[T, H, D]`` site activations (fp32/fp16/bf16; any strides).
        rows: ``[T]`` int32 table row per token; 0 leaves the token bit-exactly unchanged.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table.
        backend: ``"torch"`` runs the reference math inline, visible to ``torch.compile`` so
            inductor can fuse it; ``"triton"`` / ``"cuda"`` call the registered op ``pysteer::affine_steer``.

    Returns:
        ``[T, H, D]`` tensor of ``x``'s dtype.
    """
    if backend == "torch":
        return affine_steer_ref(x, rows, M, A)
    return torch.ops.pysteer.affine_steer(x, rows, M, A, backend)
