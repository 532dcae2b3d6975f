"""Triton kernels for the per-row affine steering op ``pysteer::affine_steer``.

    y[t, h, :] = x[t, h, :] * M[r[t], h, :] + A[r[t], h, :]

The contract (shapes, dtypes, row 0 bit-exact, fp32 compute, backward) is defined by the torch
reference in ``pysteer/ops/affine.py``, whose op bodies validate the arguments before these
launchers (named in ``pysteer/ops/_registry.py``) run.

Layout: one program per (block of ``BLOCK_T`` tokens) x (head ``h``) x (block of ``BLOCK_D``
channels of that head). ``x`` may be strided in T and H; its last dim must have stride 1 (the
launcher makes it contiguous otherwise). The table row is looked up per token, so a block may mix
rows. Tables with a last dim of 1 (per-head scalars) are loaded once per (token, head) and broadcast.

Rows outside ``[0, C)`` are outside the contract; the kernels treat them like row 0 (the token is
left unchanged and contributes no gradient) instead of reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pysteer.ops._common import unit_stride_last

from ._common import device_of, require_launchable, round_to, to_f32

__all__ = ["affine_steer", "affine_steer_backward"]

# Elements per program. The 15-line kernel in ../shared/GPU-BASELINES.md (1 token x 1024 channels
# per program) reached 0.76 of copy bandwidth at T=4096 on an H100; 4096-element tiles give each of
# 128 threads 32 elements (64 B of bf16) to keep in flight. Not re-tuned on a GPU from this file.
_TILE_ELEMS = 4096
_MAX_BLOCK_D = 1024
_NUM_WARPS = 4


@triton.jit
def _affine_steer_fwd_kernel(
    x_ptr,
    rows_ptr,
    m_ptr,
    a_ptr,
    y_ptr,
    T,
    H,
    D,
    C,
    stride_xt,
    stride_xh,
    stride_mc,
    stride_mh,
    stride_ac,
    stride_ah,
    M_BCAST: tl.constexpr,
    A_BCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    t64 = offs_t.to(tl.int64)

    r = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    live = (r > 0) & (r < C)
    r64 = r.to(tl.int64)
    live_mask = mask & live[:, None]

    x = tl.load(x_ptr + t64[:, None] * stride_xt + h * stride_xh + offs_d[None, :], mask=mask)

    m_row = m_ptr + r64[:, None] * stride_mc + h * stride_mh
    if M_BCAST:
        m = tl.load(m_row, mask=(mask_t & live)[:, None], other=1.0)
    else:
        m = tl.load(m_row + offs_d[None, :], mask=live_mask, other=1.0)
    a_row = a_ptr + r64[:, None] * stride_ac + h * stride_ah
    if A_BCAST:
        a = tl.load(a_row, mask=(mask_t & live)[:, None], other=0.0)
    else:
        a = tl.load(a_row + offs_d[None, :], mask=live_mask, other=0.0)

    y = to_f32(x) * to_f32(m) + to_f32(a)
    # Row 0 returns the loaded x itself, not x*1+0: that would turn -0.0 into +0.0.
    y = tl.where(live[:, None], round_to(y, x.dtype), x)
    tl.store(y_ptr + (t64[:, None] * H + h) * D + offs_d[None, :], y, mask=mask)


@triton.jit
def _affine_steer_bwd_kernel(
    g_ptr,
    x_ptr,
    rows_ptr,
    m_ptr,
    dx_ptr,
    dm_ptr,
    da_ptr,
    T,
    H,
    D,
    C,
    stride_xt,
    stride_xh,
    stride_mc,
    stride_mh,
    M_BCAST: tl.constexpr,
    A_BCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask = mask_t[:, None] & mask_d[None, :]
    t64 = offs_t.to(tl.int64)

    r = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    live = (r > 0) & (r < C) & mask_t
    r64 = r.to(tl.int64)
    live_mask = mask & live[:, None]

    # grad and dx are contiguous [T, H, D]
    dense = (t64[:, None] * H + h) * D + offs_d[None, :]
    g = tl.load(g_ptr + dense, mask=mask)
    x = tl.load(x_ptr + t64[:, None] * stride_xt + h * stride_xh + offs_d[None, :], mask=mask, other=0.0)
    m_row = m_ptr + r64[:, None] * stride_mc + h * stride_mh
    if M_BCAST:
        m = tl.load(m_row, mask=live[:, None], other=1.0)
    else:
        m = tl.load(m_row + offs_d[None, :], mask=live_mask, other=1.0)

    g32 = to_f32(g)
    dx = tl.where(live[:, None], round_to(g32 * to_f32(m), g.dtype), g)
    tl.store(dx_ptr + dense, dx, mask=mask)

    g_live = tl.where(live_mask, g32, 0.0)
    gx = g_live * to_f32(x)

    # Table gradients: fp32 atomics into [C, H, Dm] / [C, H, Da]. Prompt-shaped batches put every
    # token of a block on one row, so that case is reduced over the block first: one atomic per
    # channel instead of BLOCK_T of them on the same address.
    r_max = tl.max(tl.where(live, r, 0), axis=0)
    r_min = tl.min(tl.where(live, r, C), axis=0)
    if r_max > 0:
        if r_min == r_max:
            row = r_max.to(tl.int64)
            if M_BCAST:
                tl.atomic_add(dm_ptr + row * H + h, tl.sum(tl.sum(gx, axis=1), axis=0))
            else:
                tl.atomic_add(dm_ptr + (row * H + h) * D + offs_d, tl.sum(gx, axis=0), mask=mask_d)
            if A_BCAST:
                tl.atomic_add(da_ptr + row * H + h, tl.sum(tl.sum(g_live, axis=1), axis=0))
            else:
                tl.atomic_add(da_ptr + (row * H + h) * D + offs_d, tl.sum(g_live, axis=0), mask=mask_d)
        else:
            if M_BCAST:
                tl.atomic_add(dm_ptr + r64 * H + h, tl.sum(gx, axis=1), mask=live)
            else:
                tl.atomic_add(dm_ptr + (r64[:, None] * H + h) * D + offs_d[None, :], gx, mask=live_mask)
            if A_BCAST:
                tl.atomic_add(da_ptr + r64 * H + h, tl.sum(g_live, axis=1), mask=live)
            else:
                tl.atomic_add(da_ptr + (r64[:, None] * H + h) * D + offs_d[None, :], g_live, mask=live_mask)


def _tiles(T: int, D: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(D), _MAX_BLOCK_D)
    block_t = max(1, min(triton.next_power_of_2(T), _TILE_ELEMS // block_d))
    return block_t, block_d


def affine_steer(x: Tensor, rows: Tensor, M: Tensor, A: Tensor) -> Tensor:
    """Triton forward of ``pysteer::affine_steer`` (arguments validated by the op).

    Args:
        x: ``[T, H, D]`` fp32/fp16/bf16, any strides in T and H (copied if the D stride is not 1).
        rows: ``[T]`` int32 table row per token; 0 leaves the token bit-exactly unchanged.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table (fp32/fp16/bf16).
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table (fp32/fp16/bf16).

    Returns:
        Contiguous ``[T, H, D]`` tensor of ``x``'s dtype, computed in fp32.

    Raises:
        BackendUnavailable: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    require_launchable("affine_steer", x)
    T, H, D = x.shape
    C = M.shape[0]
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, M, A = unit_stride_last(x), unit_stride_last(M), unit_stride_last(A)
    rows = rows.contiguous()
    block_t, block_d = _tiles(T, D)
    grid = (triton.cdiv(T, block_t), H, triton.cdiv(D, block_d))
    with device_of(x):
        _affine_steer_fwd_kernel[grid](
            x,
            rows,
            M,
            A,
            y,
            T,
            H,
            D,
            C,
            x.stride(0),
            x.stride(1),
            M.stride(0),
            M.stride(1),
            A.stride(0),
            A.stride(1),
            M_BCAST=M.shape[2] == 1,
            A_BCAST=A.shape[2] == 1,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=_NUM_WARPS,
        )
    return y


def affine_steer_backward(
    grad: Tensor, x: Tensor, rows: Tensor, M: Tensor, A: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward of ``pysteer::affine_steer`` (arguments validated by ``pysteer::affine_steer_backward``).

    Args:
        grad: ``[T, H, D]`` gradient of the output, ``x``'s dtype.
        x, rows, M, A: the forward's inputs (see :func:`affine_steer`).

    Returns:
        ``(dx, dM, dA)`` with the shapes and dtypes of ``x``, ``M`` and ``A``: ``dx = grad * M[r]``
        (``grad`` itself on row 0); ``dM[c] = sum_{r(t)=c} grad * x`` and ``dA[c] = sum_{r(t)=c} grad``,
        summed over D for a last dim of 1, accumulated in fp32 and cast to the table dtype.
        Row 0 of ``dM`` and ``dA`` is zero. Summation order follows atomics, so the table gradients
        are not bit-reproducible run to run.

    Raises:
        BackendUnavailable: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    require_launchable("affine_steer", x)
    T, H, D = x.shape
    C = M.shape[0]
    dx = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    dM = torch.zeros(M.shape, dtype=torch.float32, device=M.device)
    dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
    if dx.numel() > 0:
        grad = grad.contiguous()
        x, M = unit_stride_last(x), unit_stride_last(M)
        rows = rows.contiguous()
        block_t, block_d = _tiles(T, D)
        grid = (triton.cdiv(T, block_t), H, triton.cdiv(D, block_d))
        with device_of(x):
            _affine_steer_bwd_kernel[grid](
                grad,
                x,
                rows,
                M,
                dx,
                dM,
                dA,
                T,
                H,
                D,
                C,
                x.stride(0),
                x.stride(1),
                M.stride(0),
                M.stride(1),
                M_BCAST=M.shape[2] == 1,
                A_BCAST=A.shape[2] == 1,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                num_warps=_NUM_WARPS,
            )
    return dx, dM.to(M.dtype), dA.to(A.dtype)
