"""Triton kernel for ``pysteer::affine_linear``: per-row affine steering fused into a projection.

    o[t] = W @ (z[t] * M[r[t]] + A[r[t]]) + bias

The contract (shapes, dtypes, row 0, fp32 accumulation) is the torch reference in
``pysteer/ops/affine_linear.py``, whose op body validates the arguments before
:func:`affine_linear` (named in ``pysteer/ops/_registry.py``) runs.

One GEMM kernel, ``out[T, N] = steer(z)[T, K] @ W[N, K]^T``, whose z-operand load applies the edit:
each program loads a ``[BLOCK_T, BLOCK_K]`` tile of ``z``, the rows of its tokens, and the matching
``M``/``A`` entries (head ``k // D``, channel ``k % D``; a ``[C, H, 1]`` table is addressed with a
zero D stride), computes ``z * M + A`` in fp32, rounds it to ``z``'s dtype (the reference's
intermediate) and feeds it to ``tl.dot`` with the ``[BLOCK_K, BLOCK_N]`` tile of ``W^T``. Row-0
tokens keep the loaded ``z`` and never read the tables. Accumulation is fp32; fp16/bf16 dots run
on tensor cores, fp32 dots use ``input_precision="ieee"`` (no TF32, like torch's default).

Tile choice (reasoned from the shapes, not tuned on a GPU from this file):

- Decode, ``T <= 64``: the GEMM is bound by reading ``W`` (Llama-3-8B o_proj: 32 MiB of bf16 per
  call). ``BLOCK_T`` is the next power of two of T, at least 16 (``tl.dot``'s minimum), so every
  program covers all tokens and ``W`` is read from DRAM once. With ``BLOCK_N = 64`` that leaves
  only ``N / 64`` programs (64 for N=4096, fewer than the H100's 132 SMs), so K is split until
  there are about two programs per SM (split 4 at N=4096): each split writes fp32 partials
  ``[SPLIT, T, N]`` and a second small kernel sums them in a fixed order (deterministic, unlike
  atomics), adds the bias and casts. Writing and reading the partials moves
  ``2 * 4 * SPLIT * T * N`` bytes: 2 MiB at T=16, 8 MiB at T=64, against 32 MiB of ``W``.
- Prefill, ``T > 64``: a standard tensor-core tiling (128 x 128 x 64 for 2-byte types) with
  grouped program order so neighbouring programs share ``W`` tiles in L2; no split.

None of these tiles has been timed on a GPU yet (bench/bench_affine_linear.py does that).

Rows outside ``[0, C)`` are outside the contract; the kernel treats them like row 0 (the token's
``z`` is projected unmodified) instead of reading out of bounds.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from pysteer._backend import triton_interpreter

from ._common import device_of, require_launchable, round_to, to_f32

__all__ = ["affine_linear"]

_DECODE_MAX_T = 64
# Split K until about this many programs per SM at decode sizes (bandwidth needs many loads in flight).
_PROGRAMS_PER_SM = 2
# Every split keeps at least this many BLOCK_K steps, so its pipeline has something to overlap.
_MIN_K_STEPS_PER_SPLIT = 4
# SM count assumed where none can be queried (the interpreter): an H100 SXM's.
_DEFAULT_SMS = 132


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    """``acc += a @ b`` in fp32. The interpreter computes bf16 dots wrongly, so it gets fp32 operands."""
    if INTERPRET:
        acc = tl.dot(to_f32(a), to_f32(b), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _affine_linear_kernel(
    z_ptr,
    rows_ptr,
    m_ptr,
    a_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K,
    D,
    C,
    stride_zt,
    stride_zk,
    stride_mc,
    stride_mh,
    stride_md,
    stride_ac,
    stride_ah,
    stride_ad,
    stride_wn,
    stride_wk,
    K_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    PARTIALS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    # Grouped order: GROUP_T token tiles run next to each other for each W tile (L2 reuse in prefill;
    # at decode there is one token tile and this is the identity).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_t = tl.cdiv(T, BLOCK_T)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * num_n
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    t64 = offs_t.to(tl.int64)
    n64 = offs_n.to(tl.int64)

    r = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    live = (r > 0) & (r < C) & mask_t
    r64 = r.to(tl.int64)
    m_rows = m_ptr + r64[:, None] * stride_mc
    a_rows = a_ptr + r64[:, None] * stride_ac

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        k64 = offs_k.to(tl.int64)
        z = tl.load(
            z_ptr + t64[:, None] * stride_zt + k64[None, :] * stride_zk,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        head = offs_k // D
        chan = offs_k - head * D
        live_k = live[:, None] & mask_k[None, :]
        m = tl.load(m_rows + head[None, :] * stride_mh + chan[None, :] * stride_md, mask=live_k, other=1.0)
        a = tl.load(a_rows + head[None, :] * stride_ah + chan[None, :] * stride_ad, mask=live_k, other=0.0)
        y = round_to(to_f32(z) * to_f32(m) + to_f32(a), z.dtype)
        y = tl.where(live[:, None], y, z)  # row 0: the unmodified z
        w = tl.load(
            w_ptr + n64[None, :] * stride_wn + k64[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot_acc(y, w, acc, INTERPRET)

    mask = mask_t[:, None] & mask_n[None, :]
    if PARTIALS:
        part = out_ptr + (pid_k * T + t64[:, None]) * N + n64[None, :]
        tl.store(part, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += to_f32(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0))[None, :]
        out = out_ptr + t64[:, None] * N + n64[None, :]
        tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_sum_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    TN,
    N,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = sum_s part[s] (+ bias)``, summed in split order, rounded to ``out``'s dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * TN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += to_f32(tl.load(bias_ptr + offs % N, mask=mask, other=0.0))
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tiles and K split of one launch (see the module docstring for how they are chosen)."""

    block_t: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_t: int = 8
    num_warps: int = 4
    num_stages: int = 3


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def choose_config(T: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The launch configuration for ``[T, K] @ [K, N]`` in ``dtype`` on ``device``.

    Shared memory, from compiling every configuration below ahead of time for sm_80 and sm_90
    (triton 3.9): at most 160 KiB (bf16 z with fp32 tables at T=4096), within sm_80's 163 KiB; with
    tables of z's dtype at most 32 KiB. fp32 at T=64 uses 32-wide K tiles: 64-wide ones with four
    stages asked for 208 KiB, more than an sm_80 GPU has.
    """
    two_byte = dtype != torch.float32
    if T > _DECODE_MAX_T:
        if two_byte:
            return LaunchConfig(128, 128, 64, num_warps=8, num_stages=3)
        # fp32 ieee dots run on FMA units; smaller tiles keep the pipeline in shared memory.
        return LaunchConfig(64, 64, 32, num_warps=4, num_stages=3)
    block_t = max(16, triton.next_power_of_2(T))
    block_n = 64
    if two_byte:
        block_k = 128 if block_t <= 32 else 64
    else:
        block_k = 64 if block_t <= 16 else 32
    tiles = triton.cdiv(N, block_n)
    target = _PROGRAMS_PER_SM * _sm_count(device)
    split = 1
    while tiles * split * 2 <= target and triton.cdiv(K, block_k * split * 2) >= _MIN_K_STEPS_PER_SPLIT:
        split *= 2
    return LaunchConfig(block_t, block_n, block_k, split_k=split, group_t=1, num_warps=4, num_stages=4)


def launch(
    z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None, config: LaunchConfig
) -> Tensor:
    """Run the kernel with an explicit configuration (arguments as for :func:`affine_linear`).

    ``config.split_k > 1`` writes fp32 partials and sums them in a second kernel; any split is
    valid (the split is rounded to whole ``block_k`` steps), which the tests use to check the
    split path on shapes too small for :func:`choose_config` to split. The arguments are trusted
    (validated by the op body); only the device is checked.
    """
    require_launchable("affine_linear", z)
    T, K = z.shape
    N = W.shape[0]
    C, H = M.shape[0], M.shape[1]
    D = K // H
    out = torch.empty((T, N), dtype=z.dtype, device=z.device)
    if T == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(F.linear(z, W, bias))
    rows = rows.contiguous()
    steps = triton.cdiv(K, config.block_k)
    split = max(1, min(config.split_k, steps))
    k_per_split = triton.cdiv(steps, split) * config.block_k
    split = triton.cdiv(K, k_per_split)  # no empty splits
    partials = torch.empty((split, T, N), dtype=torch.float32, device=z.device) if split > 1 else None
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    grid = (triton.cdiv(T, config.block_t) * triton.cdiv(N, config.block_n), split)
    with device_of(z):
        _affine_linear_kernel[grid](
            z,
            rows,
            M,
            A,
            W,
            bias_arg,
            partials if partials is not None else out,
            T,
            N,
            K,
            D,
            C,
            z.stride(0),
            z.stride(1),
            M.stride(0),
            M.stride(1),
            0 if M.shape[2] == 1 else M.stride(2),
            A.stride(0),
            A.stride(1),
            0 if A.shape[2] == 1 else A.stride(2),
            W.stride(0),
            W.stride(1),
            k_per_split,
            HAS_BIAS=bias is not None,
            PARTIALS=partials is not None,
            INTERPRET=triton_interpreter(),
            BLOCK_T=config.block_t,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_T=config.group_t,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if partials is not None:
            block = 1024
            _split_k_sum_kernel[(triton.cdiv(T * N, block),)](
                partials,
                bias_arg,
                out,
                T * N,
                N,
                SPLIT=split,
                HAS_BIAS=bias is not None,
                BLOCK=block,
                num_warps=4,
            )
    return out


def affine_linear(z: Tensor, rows: Tensor, M: Tensor, A: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """Triton forward of ``pysteer::affine_linear`` (arguments validated by the op).

    Args:
        z: ``[T, H*D]`` fp32/fp16/bf16, any strides.
        rows: ``[T]`` int32 table row per token; row 0 projects the unmodified ``z``.
        M: ``[C, H, D]`` or ``[C, H, 1]`` multiplicative table (fp32/fp16/bf16, any strides).
        A: ``[C, H, D]`` or ``[C, H, 1]`` additive table (fp32/fp16/bf16, any strides).
        W: ``[out, H*D]`` weight of ``z``'s dtype, any strides (``nn.Linear``'s is K-contiguous).
        bias: ``[out]`` of ``z``'s dtype, or None.

    Returns:
        Contiguous ``[T, out]`` tensor of ``z``'s dtype, accumulated in fp32.

    Raises:
        BackendUnavailable: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    config = choose_config(z.shape[0], W.shape[0], z.shape[1], z.dtype, z.device)
    return launch(z, rows, M, A, W, bias, config)
