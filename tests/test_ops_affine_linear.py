"""Per-head steering fused into the output projection, ``pysteer::affine_linear``.

    o[t] = W @ (z[t] * M[r[t]] + A[r[t]]) + bias

Oracle (flash-attention style): a fast path's max error against a float64 evaluation of the math
may be at most twice the error of the torch reference run in the same dtype, plus a floor of one
unit of the output dtype at the output's magnitude. Tokens on row 0 must match plain
``F.linear(z, W, bias)`` in the same sense.

On a CPU machine Triton runs in its interpreter (tests/conftest.py), the CUDA kernel runs compiled
for the host with its threads as OS threads (shared memory, barriers and warp shuffles emulated),
and the GPU cases skip with a reason; on a CUDA machine the same grid runs both fast paths on the GPU.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from _ops_helpers import (
    DEVICE,
    HOST_PRELUDE,
    assert_within_oracle,
    c_entry_points,
    emulate_launches,
    fast_backends,
    host_cuda,
    skip_without_cuda_ext,
    strip_binding,
)
from conftest import requires_cuda, requires_triton

from pysteer._backend import BackendUnavailable, triton_interpreter
from pysteer.ops import affine_linear, affine_linear_ref
from pysteer.ops._registry import get_impl
from pysteer.ops.affine_linear import affine_linear_backward_ref

NUM_TOKENS = [1, 3, 17]
# (H, D, out): odd head dims (3 x 13 = 39 channels is no multiple of any tile or 16-byte pack) and
# output counts that leave the last output tile partly empty
SHAPES = [(3, 13, 24), (2, 7, 40)]
DTYPES = [torch.float32, torch.bfloat16]
# (C, Dm, Da, bias): one table row (all tokens on row 0) and three; full and per-head-scalar tables
TABLE_CASES = [
    (1, "full", "full", True),
    (3, "scalar", "full", False),
    (3, "full", "scalar", True),
    (3, "full", "full", False),
]


requires_cuda_ext = skip_without_cuda_ext("affine_linear_fwd")
FAST_BACKENDS = fast_backends("affine_linear_fwd")


def make_inputs(
    T: int,
    H: int,
    D: int,
    N: int,
    C: int,
    dtype: torch.dtype,
    dims: tuple[str, str] = ("full", "full"),
    bias: bool = True,
    table_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """``z [T, H*D]``, ``rows [T]``, ``M [C, H, Dm]``, ``A [C, H, Da]``, ``W [N, H*D]``, ``bias [N]`` or None.

    Row 0 of the tables holds values far from the identity, so reading it would show. With C > 1
    the first token is steered; with T > 1 the middle one is on row 0.
    """
    gen = torch.Generator().manual_seed(seed)
    K = H * D
    z = torch.randn(T, K, generator=gen)
    M = 1 + 0.5 * torch.randn(C, H, D if dims[0] == "full" else 1, generator=gen)
    A = torch.randn(C, H, D if dims[1] == "full" else 1, generator=gen)
    M[0], A[0] = 7.0, -3.0
    rows = torch.randint(0, C, (T,), generator=gen, dtype=torch.int32)
    if T > 1:
        rows[T // 2] = 0
    if C > 1:
        rows[0] = C - 1
    W = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    table_dtype = table_dtype or dtype
    return (
        z.to(DEVICE, dtype),
        rows.to(DEVICE),
        M.to(DEVICE, table_dtype),
        A.to(DEVICE, table_dtype),
        W.to(DEVICE, dtype),
        b.to(DEVICE, dtype) if b is not None else None,
    )


def ref64(z, rows, M, A, W, bias) -> torch.Tensor:
    """The op's math in float64, written out independently of the product reference."""
    T, K = z.shape
    H = M.shape[1]
    r = rows.long()
    z3 = z.double().view(T, H, K // H)
    y = torch.where((r == 0)[:, None, None], z3, z3 * M.double()[r] + A.double()[r])
    out = y.reshape(T, K) @ W.double().t()
    return out + bias.double() if bias is not None else out


def check_forward(out: torch.Tensor, z, rows, M, A, W, bias) -> None:
    """The 2x oracle for the whole output, and for row-0 tokens against plain ``F.linear``."""
    assert out.shape == (z.shape[0], W.shape[0]) and out.dtype == z.dtype and out.is_contiguous()
    assert_within_oracle(out, affine_linear_ref(z, rows, M, A, W, bias), ref64(z, rows, M, A, W, bias), "out")
    keep = rows == 0
    plain64 = F.linear(z.double(), W.double(), bias.double() if bias is not None else None)
    assert_within_oracle(out[keep], F.linear(z, W, bias)[keep], plain64[keep], "row-0 tokens vs F.linear")


def fast_forward(backend: str):
    return get_impl("affine_linear", "affine_linear", backend)


# ---------------------------------------------------------------------------------------------
# forward: fast paths against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("C,dm,da,bias", TABLE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("H,D,N", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", NUM_TOKENS)
def test_forward_matches_reference(backend, T, dtype, H, D, N, C, dm, da, bias):
    args = make_inputs(T, H, D, N, C, dtype, (dm, da), bias)
    check_forward(fast_forward(backend)(*args), *args)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("T", [1, 17])
def test_forward_float16(backend, T):
    args = make_inputs(T, 4, 8, 24, 3, torch.float16, ("scalar", "full"))
    check_forward(fast_forward(backend)(*args), *args)


@pytest.mark.parametrize("backend", [pytest.param("torch"), *FAST_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 17])
def test_all_tokens_on_row_zero_equal_plain_linear(backend, T, dtype):
    """With every token on row 0 the op is ``F.linear(z, W, bias)``, whatever the tables hold."""
    z, rows, M, A, W, bias = make_inputs(T, 3, 13, 40, 3, dtype)
    rows.zero_()
    M.fill_(float("nan"))
    A.fill_(float("inf"))
    out = affine_linear(z, rows, M, A, W, bias, backend=backend)
    plain64 = F.linear(z.double(), W.double(), bias.double())
    assert_within_oracle(out, F.linear(z, W, bias), plain64, "row 0")


@pytest.mark.parametrize("backend", [pytest.param("torch"), *FAST_BACKENDS])
def test_identity_row_equals_plain_linear(backend):
    """A live row holding M=1, A=0 gives the same product as row 0 (the edit is exact)."""
    z, rows, M, A, W, bias = make_inputs(5, 3, 13, 24, 2, torch.bfloat16)
    M[1], A[1] = 1.0, 0.0
    steered = affine_linear(z, torch.ones_like(rows), M, A, W, bias, backend=backend)
    plain = affine_linear(z, torch.zeros_like(rows), M, A, W, bias, backend=backend)
    assert torch.equal(steered, plain)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_strided_inputs(backend, dtype):
    """z as a slice of a wider buffer (a fused projection's output), W transposed in memory, strided tables."""
    z, rows, M, A, W, bias = make_inputs(17, 3, 13, 40, 3, dtype)
    wide = torch.zeros(17, 3 * 39, dtype=dtype, device=DEVICE)
    wide[:, 39:78] = z
    zs = wide[:, 39:78]
    Ws = W.t().contiguous().t()
    Ms = M.transpose(1, 2).contiguous().transpose(1, 2)
    assert not zs.is_contiguous() and not Ws.is_contiguous() and not Ms.is_contiguous()
    out = fast_forward(backend)(zs, rows, Ms, A, Ws, bias)
    check_forward(out, z, rows, M, A, W, bias)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "z_dtype,table_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str
)
def test_forward_tables_in_another_dtype(backend, z_dtype, table_dtype):
    args = make_inputs(3, 3, 13, 24, 3, z_dtype, ("full", "scalar"), table_dtype=table_dtype)
    check_forward(fast_forward(backend)(*args), *args)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_rows_outside_the_table_are_left_alone(backend):
    """Rows outside [0, C) break the contract; the kernels treat them like row 0 rather than read out of bounds."""
    z, rows, M, A, W, bias = make_inputs(4, 3, 13, 24, 3, torch.float32)
    rows = torch.tensor([-1, 3, 99, 1], dtype=torch.int32, device=DEVICE)
    out = fast_forward(backend)(z, rows, M, A, W, bias)
    clamped = torch.tensor([0, 0, 0, 1], dtype=torch.int32, device=DEVICE)
    check_forward(out, z, clamped, M, A, W, bias)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_empty_token_batch(backend):
    z, rows, M, A, W, bias = make_inputs(1, 3, 13, 24, 3, torch.float32)
    out = fast_forward(backend)(z[:0], rows[:0], M, A, W, bias)
    assert out.shape == (0, 24) and out.dtype == z.dtype


# ---------------------------------------------------------------------------------------------
# Triton: split-K and the launch configuration
# ---------------------------------------------------------------------------------------------


@requires_triton
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_triton_split_k_partials_sum_to_the_product(dtype, split, bias):
    """The decode path's split-K (fp32 partials, then a summing kernel) on shapes too small to split by itself."""
    if DEVICE.type != "cuda" and not triton_interpreter():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    from pysteer.kernels.affine_linear import LaunchConfig, launch

    args = make_inputs(17, 3, 13, 40, 3, dtype, ("scalar", "full"), bias)
    out = launch(*args, LaunchConfig(block_t=16, block_n=16, block_k=16, split_k=split))
    check_forward(out, *args)


@requires_triton
def test_triton_decode_config_splits_k_to_fill_the_gpu():
    """Llama-3-8B o_proj (4096 x 4096): decode covers all tokens in one tile and splits K; prefill does not."""
    from pysteer.kernels.affine_linear import choose_config

    cpu = torch.device("cpu")
    for T in (1, 4, 16, 64):
        cfg = choose_config(T, 4096, 4096, torch.bfloat16, cpu)
        assert cfg.block_t >= T and cfg.split_k > 1, (T, cfg)
        programs = (4096 // cfg.block_n) * cfg.split_k
        assert 132 <= programs <= 2 * 2 * 132, (T, cfg)
    assert choose_config(4096, 4096, 4096, torch.bfloat16, cpu).split_k == 1
    assert choose_config(1, 4096, 64, torch.bfloat16, cpu).split_k == 1  # too short to split


# ---------------------------------------------------------------------------------------------
# autograd, gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def _f64_leaves(dims, bias=True, T=5, H=2, D=3, N=4, C=3):
    z, rows, M, A, W, b = make_inputs(T, H, D, N, C, torch.float64, dims, bias)
    leaves = [t.cpu().requires_grad_() for t in (z, M, A, W)]
    return leaves, rows.cpu(), (b.cpu().requires_grad_() if b is not None else None)


GRAD_DIMS = [("full", "full"), ("scalar", "full"), ("full", "scalar"), ("scalar", "scalar")]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", GRAD_DIMS, ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_gradcheck_registered_op_torch_backend(dims, bias):
    (z, M, A, W), rows, b = _f64_leaves(dims, bias)
    if b is None:
        fn = lambda z, M, A, W: torch.ops.pysteer.affine_linear(z, rows, M, A, W, None, "torch")
        assert torch.autograd.gradcheck(fn, (z, M, A, W))
    else:
        fn = lambda z, M, A, W, b: torch.ops.pysteer.affine_linear(z, rows, M, A, W, b, "torch")
        assert torch.autograd.gradcheck(fn, (z, M, A, W, b))


@pytest.mark.parametrize("dims", [("full", "scalar"), ("scalar", "full")], ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_gradcheck_inline_reference(dims):
    (z, M, A, W), rows, b = _f64_leaves(dims)
    fn = lambda z, M, A, W, b: affine_linear(z, rows, M, A, W, b, backend="torch")
    assert torch.autograd.gradcheck(fn, (z, M, A, W, b))


def test_backward_reference_matches_autograd_of_the_unfused_math():
    """The registered backward equals autograd through the reference's own ops (fp32, same math)."""
    z, rows, M, A, W, bias = (
        t.cpu() for t in make_inputs(17, 3, 13, 24, 3, torch.float32, ("scalar", "full"))
    )
    leaves = [t.clone().requires_grad_() for t in (z, M, A, W, bias)]
    out = affine_linear_ref(leaves[0], rows, *leaves[1:])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    got = affine_linear_backward_ref(grad, z, rows, M, A, W, has_bias=True)
    for name, g, leaf in zip(("dz", "dM", "dA", "dW", "dbias"), got, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.all(got[1][0] == 0) and torch.all(got[2][0] == 0), "row 0 of the tables gets no gradient"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_autograd_through_registered_op(backend):
    """Backward through a fast backend's op gives the reference's gradients (the backward is the reference math)."""
    z, rows, M, A, W, bias = make_inputs(17, 3, 13, 24, 3, torch.float32, ("full", "scalar"))
    grad = torch.randn(17, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for name in ("torch", backend):
        leaves = [t.clone().requires_grad_() for t in (z, M, A, W, bias)]
        out = torch.ops.pysteer.affine_linear(leaves[0], rows, *leaves[1:4], leaves[4], name)
        out.backward(grad)
        results.append([t.grad for t in leaves])
    for name, want, got in zip(("dz", "dM", "dA", "dW", "dbias"), *results):
        torch.testing.assert_close(got, want, msg=name)


def _opcheck_args(bias: bool, device: torch.device, dims=("full", "scalar")):
    z, rows, M, A, W, b = make_inputs(7, 3, 13, 24, 3, torch.float32, dims, bias)
    args = [z.to(device), rows.to(device), M.to(device), A.to(device), W.to(device)]
    for i in (0, 2, 3, 4):
        args[i].requires_grad_()
    return (*args, b.to(device).requires_grad_() if b is not None else None)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_torch_backend(bias):
    torch.library.opcheck(
        torch.ops.pysteer.affine_linear, (*_opcheck_args(bias, torch.device("cpu")), "torch")
    )


@requires_triton
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_triton_backend(bias):
    if DEVICE.type != "cuda" and not triton_interpreter():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.pysteer.affine_linear, (*_opcheck_args(bias, DEVICE), "triton"))


@requires_cuda
@requires_cuda_ext
def test_opcheck_cuda_backend():
    torch.library.opcheck(torch.ops.pysteer.affine_linear, (*_opcheck_args(True, DEVICE), "cuda"))


@pytest.mark.parametrize("inline", [True, False], ids=["inline-reference", "registered-op"])
def test_compile_fullgraph_torch_backend(inline):
    """The torch path compiles without graph breaks (inline math for inductor to fuse, or the opaque op)."""
    torch._dynamo.reset()
    z, rows, M, A, W, bias = (
        t.cpu() for t in make_inputs(5, 3, 13, 24, 3, torch.float32, ("full", "scalar"))
    )
    if inline:
        fn = lambda z, rows, M, A, W, b: affine_linear(z, rows, M, A, W, b, backend="torch")
    else:
        fn = lambda z, rows, M, A, W, b: torch.ops.pysteer.affine_linear(z, rows, M, A, W, b, "torch")
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if inline else "aot_eager")
    out = compiled(z, rows, M, A, W, bias)
    assert_within_oracle(
        out, affine_linear_ref(z, rows, M, A, W, bias), ref64(z, rows, M, A, W, bias), "compiled"
    )
    # in-place table and row updates are followed without recompiling
    M.mul_(2)
    rows.copy_(torch.tensor([2, 1, 0, 0, 2], dtype=torch.int32))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(z, rows, M, A, W, bias)
    assert_within_oracle(
        out, affine_linear_ref(z, rows, M, A, W, bias), ref64(z, rows, M, A, W, bias), "updated"
    )


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _bad(**over):
    z, rows, M, A, W, bias = (
        t.cpu() if t is not None else None for t in make_inputs(4, 3, 4, 8, 3, torch.float32)
    )
    args = {"z": z, "rows": rows, "M": M, "A": A, "W": W, "bias": bias}
    args.update({k: v(args) for k, v in over.items()})
    return args


BAD_INPUTS = [
    ({"z": lambda a: a["z"].view(4, 3, 4)}, r"z must be \[T, H\*D\]"),
    ({"z": lambda a: a["z"].int()}, "z must be a floating-point tensor"),
    ({"rows": lambda a: a["rows"].long()}, "rows must be int32"),
    ({"rows": lambda a: a["rows"][:3]}, r"rows must be \[T\]=\[4\]"),
    ({"M": lambda a: a["M"][:, :, :2]}, "M last dim must be 1 or D=4, got 2"),
    ({"z": lambda a: a["z"][:, :11]}, "z has 11 channels, not a multiple of the tables' H=3"),
    ({"A": lambda a: a["A"][:, :1]}, "A has 1 heads, M has 3"),
    ({"A": lambda a: a["A"][:2]}, "M has 3 rows, A has 2"),
    ({"M": lambda a: a["M"][:0], "A": lambda a: a["A"][:0]}, "the tables have no rows"),
    ({"W": lambda a: a["W"][:, :5]}, r"W must be \[out, H\*D\]"),
    ({"W": lambda a: a["W"].double()}, "W is torch.float64, z is torch.float32"),
    ({"bias": lambda a: a["bias"][:3]}, r"bias must be \[out\]=\[8\]"),
    ({"bias": lambda a: a["bias"].half()}, "bias is torch.float16, z is torch.float32"),
]


@pytest.mark.parametrize("over,match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["public", "registered-op"])
def test_bad_inputs_raise_clear_errors(entry, over, match):
    a = _bad(**over)
    with pytest.raises(ValueError, match=match):
        if entry == "public":
            affine_linear(a["z"], a["rows"], a["M"], a["A"], a["W"], a["bias"], backend="torch")
        else:
            torch.ops.pysteer.affine_linear(a["z"], a["rows"], a["M"], a["A"], a["W"], a["bias"], "torch")


@requires_triton
def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton needs CUDA tensors"):
        fast_forward("triton")(*_bad().values())


def test_cuda_backend_refuses_cpu_tensors():
    a = _bad()
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        fast_forward("cuda")(*a.values())


# ---------------------------------------------------------------------------------------------
# the CUDA extension's C ABI (no GPU needed: it validates before touching the device)
# ---------------------------------------------------------------------------------------------


def _raw_call(**over):
    args = dict(
        z=0, z_stride_t=12, rows=0, M=0, M_stride_c=12, M_stride_h=4, M_stride_d=1, Dm=4,
        A=0, A_stride_c=12, A_stride_h=4, A_stride_d=1, Da=4, W=0, W_stride_n=12, bias=0, out=0,
        T=0, H=3, D=4, N=8, C=3, dtype=0, table_dtype=0, device=0, stream=0,
    )  # fmt: skip
    args.update(over)
    return args


RAW_BAD = [
    ({"dtype": 7}, "unknown z dtype code 7"),
    ({"dtype": 2, "table_dtype": 1}, "tables must have z's dtype or float32"),
    ({"T": 65}, r"T must be in \[0, 64\], got 65"),
    ({"Da": 3}, "table last dims must be 1 or D=4, got 4 and 3"),
    ({"C": 0}, "C >= 1"),
]


@requires_cuda_ext
@pytest.mark.parametrize("over,match", RAW_BAD, ids=[m for _, m in RAW_BAD])
def test_cuda_extension_validates_before_touching_the_device(over, match):
    ext = importlib.import_module("pysteer._C")
    with pytest.raises(ValueError, match=match):
        ext.affine_linear_fwd(**_raw_call(**over))


@requires_cuda_ext
def test_cuda_extension_empty_batch_needs_no_device():
    importlib.import_module("pysteer._C").affine_linear_fwd(**_raw_call(T=0))


# ---------------------------------------------------------------------------------------------
# the CUDA kernel's logic, compiled for the host
# ---------------------------------------------------------------------------------------------
#
# csrc/affine_linear.cu is compiled with the host C++ compiler. Each block runs as kThreads fibers
# (ucontext) on one OS thread: __syncthreads waits for every thread of the block, a warp shuffle
# exchanges through a per-warp buffer between two waits for the warp's 32 threads, and __shared__
# variables are function statics (one block runs at a time). Dynamic shared memory is filled with 0xFF bytes
# (NaN in every float type) so reading an unstaged element shows. This checks the kernel's
# indexing, staging, K chunking, token buckets, 16-byte packing and reductions on a machine
# without a GPU, through the real wrapper (pysteer/ops/cuda_affine_linear.py); device code
# generation is what the nvcc build and the GPU tests check.

_HOST_SHIM = (
    HOST_PRELUDE
    + r"""
#include <ucontext.h>
#include <climits>
#include <functional>
static dim3 threadIdx, blockIdx, blockDim, gridDim;
// Each CUDA thread of a block is a fiber; a thread waiting at a barrier yields to the scheduler.
struct EmuFiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static std::vector<EmuFiber> emu_fibers;
static ucontext_t emu_scheduler;
static int emu_current = 0;
static std::function<void()> emu_body;
static unsigned char* emu_dynamic_smem = nullptr;
static float emu_exchange[1024];
struct EmuBarrier { int arrived = 0, generation = 0; };
static EmuBarrier emu_block_barrier, emu_warp_barrier[32];
inline void emu_wait(EmuBarrier& b, int count) {
  const int gen = b.generation;
  if (++b.arrived == count) { b.arrived = 0; ++b.generation; return; }
  while (b.generation == gen) swapcontext(&emu_fibers[emu_current].ctx, &emu_scheduler);
}
inline void __syncthreads() { emu_wait(emu_block_barrier, blockDim.x); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int tid = threadIdx.x, warp = tid / 32;
  emu_exchange[tid] = v;
  emu_wait(emu_warp_barrier[warp], 32);
  const float other = emu_exchange[warp * 32 + ((tid % 32) ^ lane_mask)];
  emu_wait(emu_warp_barrier[warp], 32);
  return other;
}
static void emu_trampoline() { emu_body(); emu_fibers[emu_current].done = true; }
template <typename K, typename... Args>
void emulate(unsigned grid, int threads, size_t smem, K kernel, Args... args) {
  std::vector<unsigned char> dynamic(smem + 16);
  gridDim = dim3(grid);
  blockDim = dim3(threads);
  emu_fibers.resize(threads);
  emu_body = [=] { kernel(args...); };
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(dynamic.data(), 0xFF, dynamic.size());  // NaN in every float type
    emu_dynamic_smem = dynamic.data() + (16 - reinterpret_cast<uintptr_t>(dynamic.data()) % 16) % 16;
    emu_block_barrier = EmuBarrier{};
    for (auto& w : emu_warp_barrier) w = EmuBarrier{};
    blockIdx = dim3(b);
    for (auto& f : emu_fibers) {
      f.stack.resize(1 << 16);
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &emu_scheduler;
      makecontext(&f.ctx, emu_trampoline, 0);
    }
    for (int live = threads; live > 0;) {
      live = 0;
      for (emu_current = 0; emu_current < threads; ++emu_current) {
        if (emu_fibers[emu_current].done) continue;
        threadIdx = dim3(emu_current);
        swapcontext(&emu_scheduler, &emu_fibers[emu_current].ctx);
        live += !emu_fibers[emu_current].done;
      }
    }
  }
}
"""
)


def _host_source(cu: str) -> tuple[str, dict[str, list]]:
    """csrc/affine_linear.cu with the launch turned into an emulated grid, the binding dropped, a C entry point added."""
    drop = ("#include <cuda_runtime.h>", "#include <pybind11/pybind11.h>", "namespace py = pybind11;")
    cu = strip_binding(cu, "affine_linear.cu", "void pysteer_register_affine_linear(", drop)
    smem = r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];"
    cu, n_smem = re.subn(smem, r"unsigned char* \1 = emu_dynamic_smem;", cu)
    assert n_smem == 1, "csrc/affine_linear.cu's dynamic shared memory changed; update _host_source"
    launch = r"(\w+<[^<>]*>)<<<(\w+), (\w+), (\w+), \w+>>>\("
    cu = emulate_launches(cu, "affine_linear.cu", launch, r"emulate(\2, \3, \4, \1, ", 1)
    api, signatures = c_entry_points(cu, "pysteer_affine_linear", "affine_linear_fwd")
    assert list(signatures) == ["affine_linear_fwd"], sorted(signatures)
    return _HOST_SHIM + cu + api, signatures


@pytest.fixture
def host_cuda_kernel(tmp_path_factory, monkeypatch):
    """``fast_forward("cuda")`` runs the host build of csrc/affine_linear.cu."""
    return host_cuda("affine_linear", _host_source, tmp_path_factory, monkeypatch)


def _cpu(args):
    return tuple(t.cpu() if t is not None else None for t in args)


# (T, H, D, N): every token bucket (1 ... 64), packed (D a multiple of the 16-byte pack) and
# scalar paths, and output counts that leave a block's last rows empty
HOST_SHAPES = [(1, 4, 16, 40), (3, 3, 13, 24), (17, 2, 8, 40), (64, 3, 13, 24), (6, 1, 48, 8)]


@pytest.mark.parametrize("T,H,D,N", HOST_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_on_host_matches_reference(host_cuda_kernel, T, H, D, N, dtype):
    for C, dm, da, bias in TABLE_CASES[1:3]:
        args = _cpu(make_inputs(T, H, D, N, C, dtype, (dm, da), bias, seed=T))
        check_forward(fast_forward("cuda")(*args), *args)


def test_cuda_kernel_on_host_walks_k_in_chunks(host_cuda_kernel):
    """64 fp32 tokens stage 128 channels at a time (48 KiB), so K = 4 * 96 takes three chunks."""
    args = _cpu(make_inputs(64, 4, 96, 16, 3, torch.float32, ("full", "scalar")))
    check_forward(fast_forward("cuda")(*args), *args)


def test_cuda_kernel_on_host_strided_and_mixed_dtypes(host_cuda_kernel):
    """A token stride wider than K, strided tables, fp32 tables for bf16 z, and unaligned W (scalar path)."""
    z, rows, M, A, W, bias = _cpu(make_inputs(5, 2, 16, 24, 3, torch.bfloat16))
    wide = torch.zeros(5, 64, dtype=z.dtype)
    wide[:, 8:40] = z
    Ms = M.float().transpose(1, 2).contiguous().transpose(1, 2)
    check_forward(
        fast_forward("cuda")(wide[:, 8:40], rows, Ms, A.float(), W, bias),
        z,
        rows,
        M.float(),
        A.float(),
        W,
        bias,
    )
    buf = torch.empty(W.numel() + 1, dtype=W.dtype)
    buf[1:] = W.flatten()
    W_unaligned = buf[1:].view(W.shape)
    check_forward(fast_forward("cuda")(z, rows, M, A, W_unaligned, None), z, rows, M, A, W, None)


def test_cuda_kernel_on_host_leaves_out_of_range_rows_alone(host_cuda_kernel):
    z, rows, M, A, W, bias = _cpu(make_inputs(4, 3, 13, 24, 3, torch.float32))
    rows = torch.tensor([-1, 3, 99, 1], dtype=torch.int32)
    out = fast_forward("cuda")(z, rows, M, A, W, bias)
    check_forward(out, z, torch.tensor([0, 0, 0, 1], dtype=torch.int32), M, A, W, bias)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@requires_cuda
@requires_cuda_ext
def test_cuda_backend_larger_batches_use_the_reference():
    """Above 64 tokens the CUDA wrapper runs the reference math (documented fallback)."""
    args = make_inputs(65, 4, 32, 64, 3, torch.bfloat16)
    torch.testing.assert_close(fast_forward("cuda")(*args), affine_linear_ref(*args), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("T", [1, 16, 64, 300])
def test_llama_o_proj_shape_on_gpu(backend, T):
    """Llama-3-8B's o_proj in bf16 (H=32, D=128, out=4096): the shapes the bench times."""
    args = make_inputs(T, 32, 128, 4096, 8, torch.bfloat16)
    check_forward(fast_forward(backend)(*args), *args)


@requires_cuda
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_cuda_graph_replay_follows_in_place_updates(backend):
    z, rows, M, A, W, bias = make_inputs(16, 8, 64, 256, 4, torch.bfloat16)
    op = fast_forward(backend)
    op(z, rows, M, A, W, bias)  # compile / warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = op(z, rows, M, A, W, bias)
    torch.cuda.current_stream().wait_stream(stream)
    rows.copy_(torch.randint(0, 4, rows.shape, device=DEVICE, dtype=torch.int32))
    M.mul_(2)
    A.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    check_forward(out, z, rows, M, A, W, bias)
