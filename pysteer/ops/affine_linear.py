"""Per-row affine steering fused into the attention output projection (ARCHITECTURE.md, "Decisions every part shares").

    o[t] = W @ (z[t] * M[r[t]] + A[r[t]]) + bias

``z`` is the ``attn.heads`` site flattened to ``[T, H*D]`` (head-major, so it views as
``[T, H, D]``); ``M`` and ``A`` are steering tables ``[C, H, Dm]`` and ``[C, H, Da]`` with
``Dm, Da in {1, D}`` (the conventions of ``pysteer::affine_steer``); ``rows`` is an int32 table row
per token; ``W`` is the projection weight ``[out, H*D]`` (``nn.Linear`` layout) and ``bias`` is
``[out]`` or None. The output is ``[T, out]`` in ``z``'s dtype.

The contract is the unfused math: the steered activation is computed in fp32 and rounded to
``z``'s dtype (what ``affine_steer`` returns), then projected with fp32 accumulation. A token on
row 0 is projected from the unmodified ``z``, so its output equals ``F.linear(z, W, bias)`` for
that token up to the summation order of the backend's GEMM.

Why fuse: at decode the projection is bound by reading ``W`` and a separate steering pass sits
between attention and the projection; under ``max-autotune`` that pass costs 12 % of decode time
(../shared/GPU-BASELINES.md), while editing ``z`` as the GEMM loads it adds no bytes beyond the
table rows.

Backward (reference math for every backend): ``y = steer(z)``, ``dy = grad @ W``,
``dW = grad^T @ y``, ``dbias = sum_t grad``, then the steering backward of ``affine_steer``:
``dz = dy * M[r]`` (``dy`` itself on row 0), ``dM[c] = sum_{r(t)=c} dy * z``,
``dA[c] = sum_{r(t)=c} dy``, summed over D for a last dim of 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_kernel_dtypes
from ._registry import get_impl

__all__ = [
    "affine_linear",
    "affine_linear_backward_ref",
    "affine_linear_ref",
    "check_affine_linear_args",
]

# ---------------------------------------------------------------------------------------------
# validation: once per call, in the op body (or the inline torch path), for every backend
# ---------------------------------------------------------------------------------------------


def check_affine_linear_args(
    z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None, backend: str = "torch"
) -> None:
    """Raise ``ValueError`` naming the first problem with the op's arguments.

    Args:
        z: ``[T, H*D]`` activations.
        rows: ``[T]`` int32 table row per token.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table.
        W: ``[out, H*D]`` projection weight of ``z``'s dtype.
        bias: ``[out]`` of ``z``'s dtype, or None.
        backend: other than ``"torch"``, ``z``, ``M`` and ``A`` must also be fp32/fp16/bf16 (what
            the kernels are instantiated for).
    """
    if z.dim() != 2:
        raise ValueError(f"affine_linear: z must be [T, H*D], got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"affine_linear: z must be a floating-point tensor, got {z.dtype}")
    T, K = z.shape
    if rows.dim() != 1 or rows.shape[0] != T:
        raise ValueError(f"affine_linear: rows must be [T]=[{T}], got shape {tuple(rows.shape)}")
    if rows.dtype != torch.int32:
        raise ValueError(f"affine_linear: rows must be int32, got {rows.dtype}")
    if rows.device != z.device:
        raise ValueError(f"affine_linear: rows is on {rows.device}, z on {z.device}")
    if M.dim() != 3:
        raise ValueError(f"affine_linear: M must be [C, H, D] or [C, H, 1], got {tuple(M.shape)}")
    H = M.shape[1]
    if H == 0 or K % H != 0:
        raise ValueError(f"affine_linear: z has {K} channels, not a multiple of the tables' H={H} heads")
    D = K // H
    for name, tab in (("M", M), ("A", A)):
        if tab.dim() != 3:
            raise ValueError(f"affine_linear: {name} must be [C, H, D] or [C, H, 1], got {tuple(tab.shape)}")
        if tab.shape[1] != H:
            raise ValueError(f"affine_linear: {name} has {tab.shape[1]} heads, M has {H}")
        if tab.shape[2] not in (1, D):
            raise ValueError(f"affine_linear: {name} last dim must be 1 or D={D}, got {tab.shape[2]}")
        if not tab.is_floating_point():
            raise ValueError(f"affine_linear: {name} must be a floating-point tensor, got {tab.dtype}")
        if tab.device != z.device:
            raise ValueError(f"affine_linear: {name} is on {tab.device}, z on {z.device}")
    if M.shape[0] != A.shape[0]:
        raise ValueError(f"affine_linear: M has {M.shape[0]} rows, A has {A.shape[0]}")
    if M.shape[0] == 0:
        raise ValueError("affine_linear: the tables have no rows (row 0 is the identity and must exist)")
    if W.dim() != 2 or W.shape[1] != K:
        raise ValueError(f"affine_linear: W must be [out, H*D]=[out, {K}], got shape {tuple(W.shape)}")
    if W.dtype != z.dtype:
        raise ValueError(f"affine_linear: W is {W.dtype}, z is {z.dtype} (they must match, as for F.linear)")
    if W.device != z.device:
        raise ValueError(f"affine_linear: W is on {W.device}, z on {z.device}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != W.shape[0]:
            raise ValueError(
                f"affine_linear: bias must be [out]=[{W.shape[0]}], got shape {tuple(bias.shape)}"
            )
        if bias.dtype != z.dtype:
            raise ValueError(f"affine_linear: bias is {bias.dtype}, z is {z.dtype}")
        if bias.device != z.device:
            raise ValueError(f"affine_linear: bias is on {bias.device}, z on {z.device}")
    check_kernel_dtypes("affine_linear", backend, z=z, M=M, A=A)


# ---------------------------------------------------------------------------------------------
# torch reference: product code (CPU path, compile-visible math) and the test oracle
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16; float64 stays float64 (so gradcheck's finite differences are exact)."""
    return torch.promote_types(dtype, torch.float32)


def _steer(z3: Tensor, rows: Tensor, M: Tensor, A: Tensor) -> Tensor:
    """``affine_steer``'s forward on ``z3 [T, H, D]``, computing float64 in float64.

    Identical to ``affine_steer_ref`` for fp32/fp16/bf16 (which upcasts to fp32 and rounds back);
    that function also rounds float64 through fp32, which would make float64 gradcheck noise.
    """
    r = rows.long()
    cd = _compute_dtype(z3.dtype)
    y = (z3.to(cd) * M[r].to(cd) + A[r].to(cd)).to(z3.dtype)
    return torch.where((r == 0)[:, None, None], z3, y)


def affine_linear_ref(
    z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None
) -> Tensor:
    """Reference forward: steer ``z`` (rounded to its dtype), then ``F.linear``.

    Args:
        z: ``[T, H*D]`` activations (fp32/fp16/bf16/fp64; any strides).
        rows: ``[T]`` int32 table row per token; row 0 leaves the token's ``z`` unmodified.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table.
        W: ``[out, H*D]`` projection weight, ``z``'s dtype.
        bias: ``[out]`` or None.

    Returns:
        Contiguous ``[T, out]`` tensor of ``z``'s dtype.
    """
    T, K = z.shape
    H = M.shape[1]
    y = _steer(z.unflatten(1, (H, K // H)), rows, M, A).reshape(T, K)
    return F.linear(y, W, bias)


def affine_linear_backward_ref(
    grad: Tensor, z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Reference backward of :func:`affine_linear_ref`.

    Args:
        grad: ``[T, out]`` gradient of the output, ``z``'s dtype.
        z, rows, M, A, W: the forward's inputs.
        has_bias: whether the forward had a bias (then its gradient is returned).

    Returns:
        ``(dz, dM, dA, dW, dbias)`` with the shapes and dtypes of ``z``, ``M``, ``A``, ``W`` and
        ``bias`` (``dbias`` is None without a bias). The GEMMs run in ``z``'s dtype (as autograd
        of ``F.linear`` does); the steering part in fp32 (float64 for float64). Row 0 of ``dM``
        and ``dA`` is zero.
    """
    T, K = z.shape
    H = M.shape[1]
    D = K // H
    z3 = z.unflatten(1, (H, D))
    y = _steer(z3, rows, M, A).reshape(T, K)
    dy = grad.mm(W)
    dW = grad.t().mm(y)
    dbias = grad.sum(0) if has_bias else None

    cd = _compute_dtype(z.dtype)
    r = rows.long()
    live = (r != 0)[:, None, None]
    g = dy.unflatten(1, (H, D)).to(cd)
    dz = torch.where(live, g * M[r].to(cd), g).to(z.dtype).reshape(T, K)
    g = g * live
    gz = g * z3.to(cd)
    if M.shape[2] == 1:
        gz = gz.sum(-1, keepdim=True)
    gA = g.sum(-1, keepdim=True) if A.shape[2] == 1 else g
    dM = torch.zeros(M.shape, dtype=cd, device=M.device).index_add_(0, r, gz)
    dA = torch.zeros(A.shape, dtype=cd, device=A.device).index_add_(0, r, gA)
    return dz, dM.to(M.dtype), dA.to(A.dtype), dW, dbias


# ---------------------------------------------------------------------------------------------
# op declaration: one schema, implementations chosen by the ``backend`` argument
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("pysteer::affine_linear", mutates_args=())
def _affine_linear_op(
    z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None, backend: str
) -> Tensor:
    check_affine_linear_args(z, rows, M, A, W, bias, backend)
    return get_impl("affine_linear", "affine_linear", backend)(z, rows, M, A, W, bias)


@_affine_linear_op.register_fake
def _affine_linear_fake(z, rows, M, A, W, bias, backend):
    return torch.empty((z.shape[0], W.shape[0]), dtype=z.dtype, device=z.device)


def _setup_context(ctx, inputs, output):
    z, rows, M, A, W, bias, _backend = inputs
    ctx.save_for_backward(z, rows, M, A, W)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    z, rows, M, A, W = ctx.saved_tensors
    dz, dM, dA, dW, dbias = affine_linear_backward_ref(grad, z, rows, M, A, W, ctx.has_bias)
    return dz, None, dM, dA, dW, dbias, None


_affine_linear_op.register_autograd(_backward, setup_context=_setup_context)


def affine_linear(
    z: Tensor,
    rows: Tensor,
    M: Tensor,
    A: Tensor,
    W: Tensor,
    bias: Tensor | None = None,
    backend: str = "torch",
) -> Tensor:
    """Project per-row affine-steered activations: ``W @ (z * M[r] + A[r]) + bias`` per token.

    Args:
        z: ``[T, H*D]`` activations at ``attn.heads`` (fp32/fp16/bf16), viewed as ``[T, H, D]``.
        rows: ``[T]`` int32 table row per token; row 0 projects the unmodified ``z``.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table.
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table.
        W: ``[out, H*D]`` projection weight (``nn.Linear`` layout), ``z``'s dtype.
        bias: ``[out]`` of ``z``'s dtype, or None.
        backend: ``"torch"`` runs the reference math inline, visible to ``torch.compile`` so
            inductor can fuse the edit into its GEMM prologue; ``"triton"`` / ``"cuda"`` call the
            registered op ``pysteer::affine_linear``.

    Returns:
        ``[T, out]`` tensor of ``z``'s dtype (fp32 accumulation).

    Raises:
        ValueError: bad shapes, dtypes or devices.
    """
    if backend == "torch":
        check_affine_linear_args(z, rows, M, A, W, bias)
        return affine_linear_ref(z, rows, M, A, W, bias)
    return torch.ops.pysteer.affine_linear(z, rows, M, A, W, bias, backend)
