"""Triton kernels for the per-row low-rank edit ``pysteer::lowrank_edit``.

    y[t] = base[t] + (x[t] @ U[r[t]] + c[r[t]]) @ V[r[t]]

The contract (shapes, dtypes, row 0 bit-exact, fp32 compute, backward) is defined by the torch
reference in ``pysteer/ops/lowrank.py``, whose op bodies validate the arguments before these
launchers (named in ``pysteer/ops/_registry.py``) run.

Layout: one program per token (forward: per token and block of ``BLOCK_N`` output channels).
A program loads its token's row once; a row-0 token copies ``base`` (forward) or writes ``dx = 0``
(backward) and reads no table. A live token computes its hidden ``h = x U[r] + c[r]`` (``[R]``,
fp32) by walking K in ``[BLOCK_K, BLOCK_R]`` tiles of ``U[r]``, then ``h V[r]`` over its
``BLOCK_N`` channels. The products are elementwise fp32 multiplies reduced with ``tl.sum`` (the
rank is small, below ``tl.dot``'s 16-wide minimum in the common case), so bf16 and fp16 are widened
exactly before any arithmetic. The forward recomputes ``h`` for each channel block of a token:
``K * R`` multiply-adds against the ``BLOCK_N * R`` of the block, a small share for ``K ~ N``.

Backward, one program per token: recompute ``h``; walk N for ``dh = V[r] g`` while adding
``h^T g`` into ``dV[r]``; add ``dh`` into ``dc[r]``; walk K for ``dx = U[r] dh`` while adding
``x^T dh`` into ``dU[r]``. Table gradients are fp32 atomics (summation order follows the
atomics, so they are not bit-reproducible run to run); one atomic per table entry per token, so
a long prompt on one row contends on its row's entries. This is the simple, correct kernel: no
token tiling, no tensor cores; it has not been tuned on a GPU.

Tables are fp32 and made contiguous here (a no-op for tables built as documented). ``x`` and
``base`` may be strided in T; their last dims must have stride 1 (copied otherwise). Rows outside
``[0, C)`` are outside the contract; the kernels treat them like row 0 instead of reading out of
bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pysteer.ops._common import unit_stride_last
from pysteer.ops.lowrank import kernel_grad_buffers

from ._common import device_of, require_launchable, round_to, to_f32

__all__ = ["lowrank_edit", "lowrank_edit_backward"]

# Elements of a [BLOCK_K or BLOCK_N, BLOCK_R] tile (4096: 32 fp32 per thread with 4 warps).
_TILE_ELEMS = 4096
_MAX_BLOCK_N = 1024
_NUM_WARPS = 4


@triton.jit
def _hidden(x_ptr, u_ptr, c_ptr, t, r64, K, R, stride_xt, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """``x[t] @ U[r] + c[r]`` in fp32, ``[BLOCK_R]`` (zero past R). Tables are contiguous."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h = tl.load(c_ptr + r64 * R + offs_r, mask=mask_r, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xv = to_f32(tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0))
        u = tl.load(
            u_ptr + (r64 * K + offs_k[:, None]) * R + offs_r[None, :],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        h += tl.sum(xv[:, None] * u, axis=0)
    return h


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr,
    base_ptr,
    rows_ptr,
    u_ptr,
    c_ptr,
    v_ptr,
    y_ptr,
    K,
    N,
    R,
    C,
    stride_xt,
    stride_bt,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = tl.load(base_ptr + t * stride_bt + offs_n, mask=mask_n)
    r = tl.load(rows_ptr + t)
    out = base  # row 0: base itself, bit for bit
    if (r > 0) & (r < C):
        r64 = r.to(tl.int64)
        h = _hidden(x_ptr, u_ptr, c_ptr, t, r64, K, R, stride_xt, BLOCK_K, BLOCK_R)
        offs_r = tl.arange(0, BLOCK_R)
        v = tl.load(
            v_ptr + (r64 * R + offs_r[:, None]) * N + offs_n[None, :],
            mask=(offs_r < R)[:, None] & mask_n[None, :],
            other=0.0,
        )
        out = round_to(to_f32(base) + tl.sum(h[:, None] * v, axis=0), base.dtype)
    tl.store(y_ptr + t * N + offs_n, out, mask=mask_n)


@triton.jit
def _lowrank_bwd_kernel(
    g_ptr,
    x_ptr,
    rows_ptr,
    u_ptr,
    c_ptr,
    v_ptr,
    dx_ptr,
    du_ptr,
    dc_ptr,
    dv_ptr,
    K,
    N,
    R,
    C,
    stride_xt,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    r = tl.load(rows_ptr + t)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if (r > 0) & (r < C):
        r64 = r.to(tl.int64)
        h = _hidden(x_ptr, u_ptr, c_ptr, t, r64, K, R, stride_xt, BLOCK_K, BLOCK_R)
        dh = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_rn = mask_r[:, None] & mask_n[None, :]
            g = to_f32(tl.load(g_ptr + t * N + offs_n, mask=mask_n, other=0.0))
            rn = (r64 * R + offs_r[:, None]) * N + offs_n[None, :]
            v = tl.load(v_ptr + rn, mask=mask_rn, other=0.0)
            dh += tl.sum(v * g[None, :], axis=1)
            tl.atomic_add(dv_ptr + rn, h[:, None] * g[None, :], mask=mask_rn)
        tl.atomic_add(dc_ptr + r64 * R + offs_r, dh, mask=mask_r)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            mask_kr = mask_k[:, None] & mask_r[None, :]
            xv = to_f32(tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0))
            kr = (r64 * K + offs_k[:, None]) * R + offs_r[None, :]
            u = tl.load(u_ptr + kr, mask=mask_kr, other=0.0)
            dx = tl.sum(u * dh[None, :], axis=1)
            tl.store(dx_ptr + t * K + offs_k, round_to(dx, dx_ptr.dtype.element_ty), mask=mask_k)
            tl.atomic_add(du_ptr + kr, xv[:, None] * dh[None, :], mask=mask_kr)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            zero = tl.zeros((BLOCK_K,), dtype=dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + t * K + offs_k, zero, mask=offs_k < K)


def _blocks(K: int, N: int, R: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_R, BLOCK_N)``: the whole rank, K and N tiles of about ``_TILE_ELEMS``."""
    block_r = triton.next_power_of_2(R)
    per_row = max(16, _TILE_ELEMS // block_r)
    block_k = min(triton.next_power_of_2(max(K, 1)), per_row)
    block_n = min(triton.next_power_of_2(max(N, 1)), per_row, _MAX_BLOCK_N)
    return block_k, block_r, block_n


def lowrank_edit(x: Tensor, base: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor) -> Tensor:
    """Triton forward of ``pysteer::lowrank_edit`` (arguments validated by the op).

    Args:
        x: ``[T, K]`` fp32/fp16/bf16, any strides (copied if the K stride is not 1).
        base: ``[T, N]`` of ``x``'s dtype, any strides (copied if the N stride is not 1).
        rows: ``[T]`` int32 table row per token; 0 returns ``base`` bit-exactly.
        U: ``[C, K, R]``, c: ``[C, R]``, V: ``[C, R, N]`` fp32 tables.

    Returns:
        Contiguous ``[T, N]`` tensor of ``x``'s dtype, computed in fp32.

    Raises:
        BackendUnavailable: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    require_launchable("lowrank_edit", x)
    T, K = x.shape
    C, _, R = U.shape
    N = base.shape[1]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, base = unit_stride_last(x), unit_stride_last(base)
    rows, U, c, V = rows.contiguous(), U.contiguous(), c.contiguous(), V.contiguous()
    block_k, block_r, block_n = _blocks(K, N, R)
    with device_of(x):
        _lowrank_fwd_kernel[(T, triton.cdiv(N, block_n))](
            x,
            base,
            rows,
            U,
            c,
            V,
            y,
            K,
            N,
            R,
            C,
            x.stride(0),
            base.stride(0),
            BLOCK_K=block_k,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=_NUM_WARPS,
        )
    return y


def lowrank_edit_backward(
    grad: Tensor, x: Tensor, rows: Tensor, U: Tensor, c: Tensor, V: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward of ``pysteer::lowrank_edit`` (arguments validated by ``pysteer::lowrank_edit_backward``).

    Args:
        grad: ``[T, N]`` gradient of the output, ``x``'s dtype.
        x, rows, U, c, V: the forward's inputs (see :func:`lowrank_edit`).

    Returns:
        ``(dx, dbase, dU, dc, dV)`` as :func:`pysteer.ops.lowrank.lowrank_edit_backward_ref` gives
        them; the table gradients are added with one fp32 atomic per entry and token, in whatever
        order the programs run.

    Raises:
        BackendUnavailable: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    require_launchable("lowrank_edit", x)
    T, K = x.shape
    C, _, R = U.shape
    N = V.shape[2]
    dx, dbase, dU, dc, dV = kernel_grad_buffers(grad, x, U, c, V)
    if T > 0:
        grad, x = grad.contiguous(), unit_stride_last(x)
        rows, U, c, V = rows.contiguous(), U.contiguous(), c.contiguous(), V.contiguous()
        block_k, block_r, block_n = _blocks(K, N, R)
        with device_of(x):
            _lowrank_bwd_kernel[(T,)](
                grad,
                x,
                rows,
                U,
                c,
                V,
                dx,
                dU,
                dc,
                dV,
                K,
                N,
                R,
                C,
                x.stride(0),
                BLOCK_K=block_k,
                BLOCK_R=block_r,
                BLOCK_N=block_n,
                num_warps=_NUM_WARPS,
            )
    return dx, dbase, dU, dc, dV
