"""The per-row low-rank edit ``pysteer::lowrank_edit``: reference, fast paths, autograd, errors.

The torch reference is checked against the plain math written token by token in float64; the fast
paths against the 2x oracle (max error against float64 at most twice the torch reference's in the
same dtype, plus a floor); row-0 tokens come back bit-exactly and a batch of mixed rows equals
each row run alone. On a CPU machine Triton runs in its interpreter (tests/conftest.py) and the
CUDA kernels run compiled for the host ("cuda-host", emulation at the end of this file); on a GPU
machine "cuda" runs the compiled kernels instead.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _ops_helpers import (
    DEVICE,
    assert_within_oracle,
    backend_param,
    cuda_ext_missing,
    fast_backends_or_host,
    host_cuda,
    host_skip_reason,
    sequential_host_source,
)
from conftest import requires_triton

from pysteer._backend import triton_interpreter
from pysteer.ops._registry import get_impl
from pysteer.ops.lowrank import lowrank_edit, lowrank_edit_backward_ref, lowrank_edit_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


FAST = fast_backends_or_host("lowrank_edit_fwd")
_HOST_SKIP = host_skip_reason()


@pytest.fixture
def backend(request) -> str:
    """The backend to run; "cuda-host" routes pysteer/ops/cuda_lowrank.py to the host build."""
    return backend_param(request)


def forward(backend: str):
    return get_impl("lowrank", "lowrank_edit", backend)


def backward(backend: str):
    return get_impl("lowrank", "lowrank_edit_backward", backend)


# ---------------------------------------------------------------------------------------------
# data and the plain-math oracle
# ---------------------------------------------------------------------------------------------

# (T, K, N, R, C): decode, LoReFT-shaped (K = N), a weight delta (K != N), rank 1, odd sizes
SHAPES = [(1, 16, 16, 4, 2), (13, 24, 24, 4, 4), (9, 37, 29, 3, 3), (20, 12, 40, 1, 5)]


def make_inputs(T, K, N, R, C, dtype=torch.float32, table_dtype=torch.float32, seed=0, rows="random"):
    """``(x, base, rows, U, c, V)`` on DEVICE. Row 0 of the tables holds NaN, so reading it would show.

    ``rows``: "random" (at least one token on row 0), "runs" (sorted, as per-request rows), or "uniform".
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen)
    base = torch.randn(T, N, generator=gen)
    U = torch.randn(C, K, R, generator=gen) / K**0.5
    c = torch.randn(C, R, generator=gen)
    V = torch.randn(C, R, N, generator=gen) / R**0.5
    U[0], c[0], V[0] = float("nan"), float("nan"), float("nan")
    if rows == "uniform":
        r = torch.full((T,), C - 1, dtype=torch.int32)
    else:
        r = torch.randint(0, C, (T,), generator=gen, dtype=torch.int32)
        r = r.sort().values if rows == "runs" else r
        if T:
            r[T // 2] = 0
    tabs = [t.to(DEVICE, table_dtype) for t in (U, c, V)]
    return (x.to(DEVICE, dtype), base.to(DEVICE, dtype), r.to(DEVICE), *tabs)


def plain64(x, base, rows, U, c, V) -> torch.Tensor:
    """The op's math in float64, token by token: the oracle, independent of the reference's GEMMs."""
    out = []
    for t in range(x.shape[0]):
        r = int(rows[t])
        if r == 0:
            out.append(base[t].double())
        else:
            h = x[t].double() @ U[r].double() + c[r].double()
            out.append(base[t].double() + h @ V[r].double())
    return torch.stack(out) if out else base.double().clone()


def plain64_backward(grad, x, rows, U, c, V) -> tuple[torch.Tensor, ...]:
    """``(dx, dbase, dU, dc, dV)`` of :func:`plain64`, by autograd in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, U, c, V)]
    base = torch.zeros(grad.shape, dtype=torch.float64, requires_grad=True)
    plain64(leaves[0], base, rows.cpu(), *leaves[1:]).backward(grad.double().cpu())
    return tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (leaves[0], base, *leaves[1:]))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)), what


def per_row_terms(rows: torch.Tensor) -> int:
    live = rows[rows != 0].long()
    return int(torch.bincount(live).max()) if live.numel() else 0


def assert_forward_within_oracle(y, x, base, rows, U, c, V, what="y") -> None:
    K, R = U.shape[1], U.shape[2]
    same = lowrank_edit_ref(x, base, rows, U, c, V)
    assert_within_oracle(
        y, same, plain64(*(t.cpu() for t in (x, base, rows, U, c, V))).to(y.device), what, terms=K + R
    )
    assert_bitwise_equal(y[rows == 0], base[rows == 0], f"{what}: row-0 tokens")


def assert_backward_within_oracle(got, grad, x, rows, U, c, V) -> None:
    K, R, N = U.shape[1], U.shape[2], V.shape[2]
    same = lowrank_edit_backward_ref(grad, x, rows, U, c, V)
    want = plain64_backward(*(t.cpu() for t in (grad, x, rows, U, c, V)))
    tokens = per_row_terms(rows)
    terms = {"dx": N + R, "dbase": 1, "dU": tokens * N, "dc": tokens * N, "dV": tokens * K}
    for name, fast, s, w in zip(("dx", "dbase", "dU", "dc", "dV"), got, same, want):
        assert fast.dtype == s.dtype and fast.shape == s.shape, name
        assert_within_oracle(fast, s, w.to(fast.device), name, terms=terms[name])
    assert_bitwise_equal(got[1], grad, "dbase is grad")
    assert not got[0][rows == 0].any(), "row-0 tokens get dx = 0"
    assert not any(t[0].any() for t in got[2:]), "row 0 of the tables gets no gradient"


# ---------------------------------------------------------------------------------------------
# the torch reference against the plain math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [*SHAPES, (5, 8, 8, 2, 1), (0, 8, 8, 2, 3)], ids=str)
def test_reference_matches_plain_math_in_float64(shape):
    x, base, rows, U, c, V = (t.cpu() for t in make_inputs(*shape, torch.float64, torch.float64))
    want = plain64(x, base, rows, U, c, V)
    torch.testing.assert_close(lowrank_edit_ref(x, base, rows, U, c, V), want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = lowrank_edit_backward_ref(grad, x, rows, U, c, V)
    for name, g, w in zip(("dx", "dbase", "dU", "dc", "dV"), got, plain64_backward(grad, x, rows, U, c, V)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_within_oracle_in_low_precision(dtype):
    """fp32 compute with one rounding: the reference's own error is a few units of the output dtype."""
    x, base, rows, U, c, V = (t.cpu() for t in make_inputs(13, 24, 24, 4, 4, dtype))
    y = lowrank_edit_ref(x, base, rows, U, c, V)
    err = (y.double() - plain64(x, base, rows, U, c, V)).abs().max().item()
    assert y.dtype == dtype and err <= 2 * torch.finfo(dtype).eps * 8


# ---------------------------------------------------------------------------------------------
# properties every backend keeps: row 0 bit-exact, mixed rows equal each row alone
# ---------------------------------------------------------------------------------------------

ALL = [pytest.param("torch"), *FAST]


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_zero_is_bit_exact_for_special_values(backend, dtype):
    """NaN, infinities, signed zeros and subnormals in base come back untouched; NaN in x or row 0 never leaks."""
    tiny = torch.finfo(dtype).tiny
    vals = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, tiny / 4, -tiny / 2, 1.5, -2.25]
    x, base, rows, U, c, V = make_inputs(4, 6, len(vals), 2, 3, dtype)
    rows = torch.tensor([0, 1, 0, 2], dtype=torch.int32, device=DEVICE)
    base[0] = base[2] = torch.tensor(vals).to(DEVICE, dtype)
    x[0] = float("nan")
    y = forward(backend)(x, base, rows, U, c, V)
    assert_bitwise_equal(y[rows == 0], base[rows == 0], "row 0")
    assert torch.isfinite(y[rows != 0]).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_mixed_rows_equal_each_row_alone(backend):
    """A batch of per-request rows equals, bit for bit, each request run alone with a table of just its row."""
    x, base, rows, U, c, V = make_inputs(24, 16, 20, 3, 4, torch.bfloat16, rows="runs")
    y = forward(backend)(x, base, rows, U, c, V)
    for r in range(4):
        sel = rows == r
        keep = [0, r] if r else [0]
        alone = forward(backend)(
            x[sel], base[sel], (rows[sel] > 0).to(torch.int32), U[keep], c[keep], V[keep]
        )
        assert_bitwise_equal(y[sel], alone, f"row {r}")


# ---------------------------------------------------------------------------------------------
# fast paths against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_within_oracle(backend, shape, dtype):
    x, base, rows, U, c, V = make_inputs(*shape, dtype)
    y = forward(backend)(x, base, rows, U, c, V)
    assert y.shape == base.shape and y.dtype == dtype and y.is_contiguous()
    assert_forward_within_oracle(y, x, base, rows, U, c, V)


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape,rows", [(SHAPES[1], "random"), (SHAPES[2], "runs"), (SHAPES[3], "uniform")], ids=str
)
def test_backward_within_oracle(backend, shape, rows, dtype):
    x, base, r, U, c, V = make_inputs(*shape, dtype, rows=rows)
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    assert_backward_within_oracle(backward(backend)(grad, x, r, U, c, V), grad, x, r, U, c, V)


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_strided_inputs(backend):
    """x and base as column slices of wider tensors (e.g. a fused projection's output)."""
    x, base, rows, U, c, V = make_inputs(9, 12, 10, 3, 3, torch.bfloat16)
    wide_x = torch.zeros(9, 30, dtype=x.dtype, device=DEVICE)
    wide_b = torch.zeros(9, 25, dtype=x.dtype, device=DEVICE)
    wide_x[:, 5:17], wide_b[:, 3:13] = x, base
    xs, bs = wide_x[:, 5:17], wide_b[:, 3:13]
    assert not xs.is_contiguous() and not bs.is_contiguous()
    assert_forward_within_oracle(forward(backend)(xs, bs, rows, U, c, V), x, base, rows, U, c, V)
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, x.dtype)
    assert_backward_within_oracle(backward(backend)(grad, xs, rows, U, c, V), grad, x, rows, U, c, V)


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_empty_token_batch(backend):
    x, base, rows, U, c, V = make_inputs(3, 8, 6, 2, 2)
    x, base, rows = x[:0], base[:0], rows[:0]
    assert forward(backend)(x, base, rows, U, c, V).shape == (0, 6)
    dx, dbase, dU, dc, dV = backward(backend)(base.clone(), x, rows, U, c, V)
    assert dx.shape == (0, 8) and dbase.shape == (0, 6)
    assert not dU.any() and not dc.any() and not dV.any()


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_autograd_through_registered_op(backend):
    x, base, rows, U, c, V = make_inputs(*SHAPES[2])
    leaves = [t.clone().requires_grad_() for t in (x, base, U, c, V)]
    y = torch.ops.pysteer.lowrank_edit(leaves[0], leaves[1], rows, *leaves[2:], backend)
    assert_forward_within_oracle(y.detach(), x, base, rows, U, c, V)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y.backward(grad)
    dx, dbase, dU, dc, dV = (t.grad for t in leaves)
    assert_backward_within_oracle((dx, dbase, dU, dc, dV), grad, x, rows, U, c, V)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile (the reference path on CPU)
# ---------------------------------------------------------------------------------------------


def _f64_leaves():
    x, base, rows, U, c, V = (t.cpu() for t in make_inputs(6, 4, 5, 2, 3, torch.float64, torch.float64))
    U[0], c[0], V[0] = 0.0, 0.0, 0.0  # gradcheck perturbs every entry, row 0 included
    return rows, [t.requires_grad_() for t in (x, base, U, c, V)]


def test_gradcheck_registered_op_torch_backend():
    rows, leaves = _f64_leaves()
    assert torch.autograd.gradcheck(
        lambda x, b, U, c, V: torch.ops.pysteer.lowrank_edit(x, b, rows, U, c, V, "torch"), leaves
    )


def test_gradcheck_inline_reference():
    rows, leaves = _f64_leaves()
    assert torch.autograd.gradcheck(lambda x, b, U, c, V: lowrank_edit(x, b, rows, U, c, V), leaves)


def _opcheck_args(device="cpu"):
    x, base, rows, U, c, V = (t.to(device) for t in make_inputs(5, 6, 7, 2, 3))
    return [
        x.requires_grad_(),
        base.requires_grad_(),
        rows,
        U.requires_grad_(),
        c.requires_grad_(),
        V.requires_grad_(),
    ]


def test_opcheck_torch_backend():
    torch.library.opcheck(torch.ops.pysteer.lowrank_edit, (*_opcheck_args(), "torch"))


@requires_triton
def test_opcheck_triton_backend():
    if DEVICE.type != "cuda" and not triton_interpreter():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.pysteer.lowrank_edit, (*_opcheck_args(DEVICE), "triton"))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="no CUDA device on this machine")
@pytest.mark.skipif(
    cuda_ext_missing("lowrank_edit_fwd") is not None, reason="pysteer._C lacks lowrank_edit_fwd"
)
def test_opcheck_cuda_backend():
    torch.library.opcheck(torch.ops.pysteer.lowrank_edit, (*_opcheck_args(DEVICE), "cuda"))


def test_compile_fullgraph_inline_reference():
    torch._dynamo.reset()
    x, base, rows, U, c, V = (t.cpu() for t in make_inputs(7, 6, 5, 2, 3))

    @torch.compile(fullgraph=True)
    def edit_then_scale(x, base, rows, U, c, V):
        return lowrank_edit(x, base, rows, U, c, V) * 2

    torch.testing.assert_close(
        edit_then_scale(x, base, rows, U, c, V), lowrank_edit_ref(x, base, rows, U, c, V) * 2
    )


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the problem, raised by the op body before any backend runs
# ---------------------------------------------------------------------------------------------


def _good():
    return list(t.cpu() for t in make_inputs(5, 4, 6, 2, 3))


BAD_INPUTS = {
    "x_not_2d": (lambda x, b, r, U, c, V: (x[None], b, r, U, c, V), r"x must be \[T, K\]"),
    "base_wrong_tokens": (
        lambda x, b, r, U, c, V: (x, b[:-1], r, U, c, V),
        r"base must be \[T, N\] with T=5",
    ),
    "base_dtype": (
        lambda x, b, r, U, c, V: (x, b.half(), r, U, c, V),
        r"base is torch.float16, x is torch.float32",
    ),
    "rows_wrong_length": (lambda x, b, r, U, c, V: (x, b, r[:-1], U, c, V), r"rows must be \[T\]=\[5\]"),
    "rows_int64": (lambda x, b, r, U, c, V: (x, b, r.long(), U, c, V), r"rows must be int32"),
    "rows_out_of_range": (lambda x, b, r, U, c, V: (x, b, r + 3, U, c, V), r"rows must be in \[0, C=3\)"),
    "U_wrong_K": (lambda x, b, r, U, c, V: (x, b, r, U[:, :3], c, V), r"U must be \[C, K, R\] with K=4"),
    "c_wrong_shape": (lambda x, b, r, U, c, V: (x, b, r, U, c[:, :1], V), r"c must be \[C, R\]=\[3, 2\]"),
    "V_wrong_N": (lambda x, b, r, U, c, V: (x, b, r, U, c, V[..., :5]), r"V must be \[C, R, N\]=\[3, 2, 6\]"),
    "V_wrong_rows": (lambda x, b, r, U, c, V: (x, b, r, U, c, V[:2]), r"V must be \[C, R, N\]=\[3, 2, 6\]"),
    "no_rows": (lambda x, b, r, U, c, V: (x, b, r * 0, U[:0], c[:0], V[:0]), r"the tables have no rows"),
    "rank_zero": (
        lambda x, b, r, U, c, V: (x, b, r, U[..., :0], c[:, :0], V[:, :0]),
        r"rank R .* at least 1",
    ),
    "tables_mixed": (lambda x, b, r, U, c, V: (x, b, r, U, c.double(), V), r"c .*float64"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(backend, case):
    bad, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        torch.ops.pysteer.lowrank_edit(*bad(*_good()), backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "which,match",
    [
        ("x", r"x must be one of float32, float16, bfloat16, got torch.float64"),
        ("U", r"U must be one of float32, got torch.bfloat16"),
    ],
)
def test_kernel_dtypes_raise_value_error(backend, which, match):
    x, base, rows, U, c, V = _good()
    if which == "x":
        x, base = x.double(), base.double()
    else:
        U, c, V = U.bfloat16(), c.bfloat16(), V.bfloat16()
    with pytest.raises(ValueError, match=rf"\({backend}\): {match}"):
        torch.ops.pysteer.lowrank_edit(x, base, rows, U, c, V, backend)


def test_backward_bad_grad_raises_value_error():
    x, base, rows, U, c, V = _good()
    with pytest.raises(ValueError, match=r"grad must be \[T, N\]"):
        torch.ops.pysteer.lowrank_edit_backward(base[:, :5], x, rows, U, c, V, "torch")
    with pytest.raises(ValueError, match=r"grad is torch.float16, x is torch.float32"):
        torch.ops.pysteer.lowrank_edit_backward(base.half(), x, rows, U, c, V, "torch")


def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor, got device cpu"):
        forward("cuda")(*_good())


@pytest.mark.skipif(
    cuda_ext_missing("lowrank_edit_fwd") is not None, reason=cuda_ext_missing("lowrank_edit_fwd") or ""
)
@pytest.mark.parametrize(
    "over,match",
    [({"x_dtype": 7}, "unknown dtype code 7"), ({"R": 0}, "R, C >= 1"), ({"T": -1}, "T, K, N >= 0")],
)
def test_cuda_extension_validates_before_touching_the_device(over, match):
    """Bad raw arguments raise ValueError in C++ before any CUDA call (so this runs without a GPU)."""
    args = dict(
        x=0, x_stride_t=4, base=0, base_stride_t=4, rows=0, U=0, c=0, V=0, h=0, y=0,
        T=0, K=4, N=4, R=2, C=2, x_dtype=0, device=0, stream=0,
    )  # fmt: skip
    args.update(over)
    with pytest.raises(ValueError, match=match):
        importlib.import_module("pysteer._C").lowrank_edit_fwd(**args)


# ---------------------------------------------------------------------------------------------
# the CUDA kernels compiled for the host
# ---------------------------------------------------------------------------------------------
#
# csrc/lowrank.cu's kernels use no shared memory, warp shuffles or block barriers, so running each
# launch's threads one after another (tests/_ops_helpers.py: SEQUENTIAL_SHIM) is faithful. It checks
# the kernels' indexing, row handling and gradient flushing without a GPU, behind the real wrappers
# in pysteer/ops/cuda_lowrank.py; device code generation is what the GPU runs check.


def _host_source(cu: str) -> tuple[str, dict[str, list]]:
    drop = ("#include <cuda_runtime.h>", "#include <pybind11/pybind11.h>", "namespace py = pybind11;")
    source, signatures = sequential_host_source(
        cu,
        "lowrank.cu",
        drop,
        "void pysteer_register_lowrank(",
        "pysteer_lowrank",
        "lowrank_edit_",
        launches=3,
    )
    assert sorted(signatures) == ["lowrank_edit_bwd", "lowrank_edit_fwd"], sorted(signatures)
    return source, signatures


@pytest.fixture
def cuda_kernels_on_host(tmp_path_factory, monkeypatch):
    return host_cuda("lowrank", _host_source, tmp_path_factory, monkeypatch)


@pytest.mark.skipif(_HOST_SKIP is not None, reason=_HOST_SKIP or "")
def test_cuda_host_functions_reject_bad_sizes(cuda_kernels_on_host):
    with pytest.raises(ValueError, match="R, C >= 1"):
        cuda_kernels_on_host.lowrank_edit_fwd(0, 4, 0, 4, 0, 0, 0, 0, 0, 0, 1, 4, 4, 0, 2, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        cuda_kernels_on_host.lowrank_edit_bwd(0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4, 4, 2, 2, 7, 0, 0)


@pytest.mark.skipif(_HOST_SKIP is not None, reason=_HOST_SKIP or "")
def test_cuda_kernels_on_host_leave_out_of_range_rows_alone(cuda_kernels_on_host):
    """Out-of-range rows are outside the contract (the op rejects them on CPU); the kernels treat them as row 0."""
    x, base, rows, U, c, V = _good()
    rows = torch.tensor([-1, 3, 99, 1, 2], dtype=torch.int32)
    y = forward("cuda")(x, base, rows, U, c, V)
    assert_bitwise_equal(y[:3], base[:3], "rows outside [0, C)")
    assert_forward_within_oracle(y[3:], x[3:], base[3:], rows[3:], U, c, V)
