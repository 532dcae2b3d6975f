"""The per-row affine steering op ``pysteer::affine_steer``: fast paths against the torch reference.

Oracle (flash-attention style): a fast path's max error against the float64 reference may be at
most twice the error of the torch reference run in the same dtype, plus a floor of one unit of
the output dtype at the output's magnitude. Tokens on row 0 must come back bit-exactly.

On a CPU machine Triton runs in its interpreter (tests/conftest.py) and the CUDA-extension cases
skip with a reason; on a CUDA machine the same grid runs both fast paths on the GPU.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from _ops_helpers import (
    DEVICE,
    ROOT,
    assert_within_oracle,
    fast_backends,
    host_cuda,
    sequential_host_source,
    skip_without_cuda_ext,
)
from conftest import requires_cuda, requires_triton

from pysteer._backend import BackendUnavailable, triton_interpreter
from pysteer.ops._registry import get_impl
from pysteer.ops.affine import affine_steer, affine_steer_backward_ref, affine_steer_ref

# awkward sizes: decode (1), odd, prime, more than one token block
NUM_TOKENS = [1, 7, 83, 300]
# (H, D): a d_model site (H=1), an odd head dim, GQA-like query heads of a real head dim
HEADS_DIMS = [(1, 48), (3, 13), (6, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (Dm, Da) as "full" (D) or "scalar" (1): per-head scalars broadcast over D
TABLE_DIMS = [("full", "full"), ("scalar", "full"), ("full", "scalar"), ("scalar", "scalar")]


requires_cuda_ext = skip_without_cuda_ext("affine_steer_fwd")
FAST_BACKENDS = fast_backends("affine_steer_fwd")


def _dims(kind: str, D: int) -> int:
    return D if kind == "full" else 1


def make_inputs(
    T: int,
    H: int,
    D: int,
    C: int,
    dtype: torch.dtype,
    dims: tuple[str, str] = ("full", "full"),
    rows: str = "random",
    table_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x [T, H, D]``, ``rows [T]`` and tables ``[C, H, Dm]``, ``[C, H, Da]`` on DEVICE.

    Row 0 of the tables holds values far from the identity, so reading it would show.
    ``rows``: "random" (any row, at least one token on row 0), "runs" (contiguous runs, as per-request
    rows of a batch), or "uniform" (every token on the last row, as a steered prompt).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, D, generator=gen)
    M = 1 + 0.5 * torch.randn(C, H, _dims(dims[0], D), generator=gen)
    A = torch.randn(C, H, _dims(dims[1], D), generator=gen)
    M[0], A[0] = 7.0, -3.0
    if rows == "uniform":
        r = torch.full((T,), C - 1, dtype=torch.int32)
    else:
        r = torch.randint(0, C, (T,), generator=gen, dtype=torch.int32)
        if rows == "runs":
            r = r.sort().values
        r[T // 2] = 0
    table_dtype = table_dtype or dtype
    return x.to(DEVICE, dtype), r.to(DEVICE), M.to(DEVICE, table_dtype), A.to(DEVICE, table_dtype)


def summed_terms(rows: torch.Tensor, table: torch.Tensor, D: int) -> int:
    """Most fp32 terms summed into one entry of ``table``'s gradient."""
    live = rows[rows != 0].long()
    per_row = int(torch.bincount(live).max()) if live.numel() else 0
    return per_row * (D if table.shape[2] == 1 else 1)


def assert_backward_within_oracle(got, grad, x, rows, M, A) -> None:
    """The 2x oracle for ``(dx, dM, dA)`` against float64, with torch's same-dtype backward as the baseline."""
    same = affine_steer_backward_ref(grad, x, rows, M, A)
    ref64 = ref64_backward(grad, x, rows, M, A)
    D = x.shape[2]
    terms = (1, summed_terms(rows, M, D), summed_terms(rows, A, D))
    for name, fast, s, r, n in zip(("dx", "dM", "dA"), got, same, ref64, terms):
        assert fast.dtype == s.dtype and fast.shape == s.shape, name
        assert_within_oracle(fast, s, r, name, terms=n)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal bit patterns (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)), what


def ref64_forward(x, rows, M, A) -> torch.Tensor:
    """The op's math in float64: the oracle, written out independently of the product reference."""
    r = rows.long()
    y = x.double() * M.double()[r] + A.double()[r]
    return torch.where((r == 0)[:, None, None], x.double(), y)


def ref64_backward(grad, x, rows, M, A) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dM, dA)`` in float64 (see :func:`ref64_forward`)."""
    r = rows.long()
    live = (r != 0)[:, None, None]
    g = grad.double()
    dx = torch.where(live, g * M.double()[r], g)
    g = g * live
    gx = g * x.double()
    gx = gx.sum(-1, keepdim=True) if M.shape[2] == 1 else gx
    ga = g.sum(-1, keepdim=True) if A.shape[2] == 1 else g
    dM = torch.zeros(M.shape, dtype=torch.float64, device=M.device).index_add_(0, r, gx)
    dA = torch.zeros(A.shape, dtype=torch.float64, device=A.device).index_add_(0, r, ga)
    return dx, dM, dA


def fast_forward(backend: str):
    return get_impl("affine", "affine_steer", backend)


def fast_backward(backend: str):
    return get_impl("affine", "affine_steer_backward", backend)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


# (C, table dims): every C and every table layout, without their full product (the interpreter is slow)
ROWS_AND_DIMS = [
    (1, ("full", "full")),
    (2, ("scalar", "full")),
    (2, ("full", "full")),
    (17, ("full", "scalar")),
    (17, ("scalar", "scalar")),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "C,dims", ROWS_AND_DIMS, ids=lambda v: f"M{v[0]}-A{v[1]}" if isinstance(v, tuple) else f"C{v}"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D", HEADS_DIMS)
@pytest.mark.parametrize("T", NUM_TOKENS)
def test_forward_matches_reference(backend, T, H, D, C, dtype, dims):
    x, rows, M, A = make_inputs(T, H, D, C, dtype, dims)
    y = fast_forward(backend)(x, rows, M, A)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    ref64 = ref64_forward(x, rows, M, A)
    assert_within_oracle(y, affine_steer_ref(x, rows, M, A), ref64, "y")
    keep = rows == 0
    assert_bitwise_equal(y[keep], x[keep], "row-0 tokens")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("rows", ["runs", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_row_patterns(backend, dtype, rows):
    x, r, M, A = make_inputs(300, 6, 64, 5, dtype, rows=rows)
    ref64 = ref64_forward(x, r, M, A)
    assert_within_oracle(fast_forward(backend)(x, r, M, A), affine_steer_ref(x, r, M, A), ref64, "y")


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x [T, H, D]`` in a non-contiguous layout."""
    T, H, D = x.shape
    if layout == "slice_of_wider":  # e.g. one of the q/k/v thirds of a fused projection
        wide = torch.zeros(T, H, 3 * D, dtype=x.dtype, device=x.device)
        wide[:, :, D : 2 * D] = x
        out = wide[:, :, D : 2 * D]
    elif layout == "head_slice":  # a subset of the heads of a wider tensor
        wide = torch.zeros(T, H + 2, D, dtype=x.dtype, device=x.device)
        wide[:, 1 : H + 1] = x
        out = wide[:, 1 : H + 1]
    elif layout == "every_other_token":
        wide = torch.zeros(2 * T, H, D, dtype=x.dtype, device=x.device)
        wide[::2] = x
        out = wide[::2]
    elif layout == "transposed_view":  # attention output [1, H, S, D] -> [1, S, H, D] -> [S, H, D]
        bhsd = x.transpose(0, 1).contiguous().unsqueeze(0)
        out = bhsd.transpose(1, 2).view(T, H, D)
    elif layout == "d_not_unit_stride":  # last dim strided: the launchers copy it
        out = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        raise AssertionError(layout)
    assert torch.equal(out, x)
    return out


LAYOUTS = ["slice_of_wider", "head_slice", "every_other_token", "transposed_view", "d_not_unit_stride"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 83])
def test_forward_strided_x(backend, T, dtype, layout):
    x, rows, M, A = make_inputs(T, 4, 24, 3, dtype)
    xs = _strided(x, layout)
    if layout != "d_not_unit_stride" and T > 1:
        assert not xs.is_contiguous()
    y = fast_forward(backend)(xs, rows, M, A)
    assert y.is_contiguous()
    ref64 = ref64_forward(x, rows, M, A)
    assert_within_oracle(y, affine_steer_ref(x, rows, M, A), ref64, layout)
    assert_bitwise_equal(y[rows == 0], x[rows == 0], "row-0 tokens")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,table_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str
)
def test_forward_tables_in_another_dtype(backend, x_dtype, table_dtype):
    x, rows, M, A = make_inputs(83, 3, 13, 4, x_dtype, ("full", "scalar"), table_dtype=table_dtype)
    y = fast_forward(backend)(x, rows, M, A)
    assert y.dtype == x_dtype
    ref64 = ref64_forward(x, rows, M, A)
    assert_within_oracle(y, affine_steer_ref(x, rows, M, A), ref64, "y")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_forward_tables_of_two_dtypes(backend):
    x, rows, M, A = make_inputs(7, 3, 16, 3, torch.float16)
    M = M.to(torch.bfloat16)
    ref64 = ref64_forward(x, rows, M, A)
    assert_within_oracle(fast_forward(backend)(x, rows, M, A), affine_steer_ref(x, rows, M, A), ref64, "y")


@pytest.mark.parametrize("backend", [pytest.param("torch"), *FAST_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_zero_is_bit_exact_for_special_values(backend, dtype):
    """NaN, infinities, signed zeros and subnormals come back untouched, whatever row 0 holds."""
    tiny = torch.finfo(dtype).tiny
    vals = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, tiny / 4, -tiny / 2, 1.5, -2.25]
    x = torch.tensor(vals, dtype=torch.float32).to(dtype).view(1, 1, -1).expand(3, 2, -1).contiguous()
    D = x.shape[-1]
    M = torch.full((2, 2, D), float("nan"), dtype=dtype)
    A = torch.full((2, 2, D), 5.0, dtype=dtype)
    rows = torch.zeros(3, dtype=torch.int32)
    x, rows, M, A = (t.to(DEVICE) for t in (x, rows, M, A))
    y = (
        affine_steer(x, rows, M, A, backend=backend)
        if backend == "torch"
        else fast_forward(backend)(x, rows, M, A)
    )
    assert_bitwise_equal(y, x, "row 0")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_live_rows_round_to_nearest_even_like_torch(backend, dtype):
    """x*1 + A with A = 0 or -0 keeps signed zeros and subnormals; results round like torch's casts."""
    tiny = torch.finfo(dtype).tiny
    vals = [-0.0, 0.0, tiny / 4, -tiny / 2, 1.5, -2.25, float("inf")]
    x = torch.tensor(vals, dtype=torch.float32).to(dtype).view(1, 1, -1).to(DEVICE)
    D = x.shape[-1]
    M = torch.ones(2, 1, D, dtype=dtype, device=DEVICE)
    A = torch.zeros(2, 1, D, dtype=dtype, device=DEVICE)
    A[1, 0, 0] = -0.0
    rows = torch.ones(1, dtype=torch.int32, device=DEVICE)
    assert_bitwise_equal(
        fast_forward(backend)(x, rows, M, A), affine_steer_ref(x, rows, M, A), "identity row 1"
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_empty_token_batch(backend):
    x, rows, M, A = make_inputs(1, 2, 8, 2, torch.float32)
    x, rows = x[:0], rows[:0]
    assert fast_forward(backend)(x, rows, M, A).shape == (0, 2, 8)
    dx, dM, dA = fast_backward(backend)(x.clone(), x, rows, M, A)
    assert (
        dx.shape == (0, 2, 8)
        and torch.equal(dM, torch.zeros_like(M))
        and torch.equal(dA, torch.zeros_like(A))
    )


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def _check_backward(backend, x, rows, M, A, seed=1):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype)
    dx, dM, dA = fast_backward(backend)(grad, x, rows, M, A)
    assert_backward_within_oracle((dx, dM, dA), grad, x, rows, M, A)
    keep = rows == 0
    assert_bitwise_equal(dx[keep], grad[keep], "row-0 dx passes grad through")
    assert not dM[0].any() and not dA[0].any(), "row 0 of the tables gets no gradient"


# (row pattern, table dims): random rows take the kernels' per-token accumulation, uniform rows
# (a steered prompt) the block-reduced one, runs (per-request rows of a batch) a mix of both
BACKWARD_CASES = [
    ("random", ("full", "full")),
    ("random", ("scalar", "scalar")),
    ("runs", ("scalar", "full")),
    ("uniform", ("full", "scalar")),
    ("uniform", ("scalar", "scalar")),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "rows,dims", BACKWARD_CASES, ids=lambda v: f"M{v[0]}-A{v[1]}" if isinstance(v, tuple) else v
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", NUM_TOKENS)
def test_backward_matches_reference(backend, T, dtype, rows, dims):
    _check_backward(backend, *make_inputs(T, 3, 13, 17 if rows == "random" else 4, dtype, dims, rows=rows))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("H,D", HEADS_DIMS)
def test_backward_head_shapes(backend, H, D):
    _check_backward(backend, *make_inputs(83, H, D, 3, torch.float32, ("scalar", "full"), rows="runs"))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", ["head_slice", "transposed_view"])
def test_backward_strided_x(backend, layout):
    x, rows, M, A = make_inputs(83, 4, 24, 3, torch.float32, ("full", "scalar"))
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)
    got = fast_backward(backend)(grad, _strided(x, layout), rows, M, A)
    assert_backward_within_oracle(got, grad, x, rows, M, A)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dims", [("full", "scalar"), ("scalar", "full")], ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_autograd_through_registered_op_matches_reference(backend, dims):
    x, rows, M, A = make_inputs(83, 3, 13, 4, torch.float32, dims)
    leaves = [t.clone().requires_grad_() for t in (x, M, A)]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = torch.ops.pysteer.affine_steer(leaves[0], rows, leaves[1], leaves[2], backend)
    assert_within_oracle(y.detach(), affine_steer_ref(x, rows, M, A), ref64_forward(x, rows, M, A), "y")
    y.backward(grad)
    assert_backward_within_oracle([t.grad for t in leaves], grad, x, rows, M, A)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile (the reference path on CPU)
# ---------------------------------------------------------------------------------------------


def test_reference_computes_float64_inputs_in_float64():
    x, rows, M, A = make_inputs(83, 3, 13, 4, torch.float64, ("full", "scalar"))
    assert_bitwise_equal(affine_steer_ref(x, rows, M, A), ref64_forward(x, rows, M, A), "forward")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    for name, got, want in zip(
        ("dx", "dM", "dA"),
        affine_steer_backward_ref(grad, x, rows, M, A),
        ref64_backward(grad, x, rows, M, A),
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def _f64_inputs(dims, T=6, H=2, D=3, C=3):
    x, rows, M, A = make_inputs(T, H, D, C, torch.float64, dims)
    return x.cpu().requires_grad_(), rows.cpu(), M.cpu().requires_grad_(), A.cpu().requires_grad_()


@pytest.mark.parametrize("dims", TABLE_DIMS, ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_gradcheck_registered_op_torch_backend(dims):
    x, rows, M, A = _f64_inputs(dims)
    assert torch.autograd.gradcheck(
        lambda x, M, A: torch.ops.pysteer.affine_steer(x, rows, M, A, "torch"), (x, M, A)
    )


@pytest.mark.parametrize("dims", TABLE_DIMS, ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_gradcheck_inline_reference(dims):
    x, rows, M, A = _f64_inputs(dims)
    assert torch.autograd.gradcheck(lambda x, M, A: affine_steer(x, rows, M, A, backend="torch"), (x, M, A))


def _opcheck_inputs(dims, device="cpu"):
    x, rows, M, A = make_inputs(7, 3, 13, 3, torch.float32, dims)
    return [
        x.to(device).requires_grad_(),
        rows.to(device),
        M.to(device).requires_grad_(),
        A.to(device).requires_grad_(),
    ]


@pytest.mark.parametrize("dims", [("full", "full"), ("scalar", "full")], ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_opcheck_torch_backend(dims):
    torch.library.opcheck(torch.ops.pysteer.affine_steer, (*_opcheck_inputs(dims), "torch"))


@requires_triton
@pytest.mark.parametrize("dims", [("full", "full"), ("full", "scalar")], ids=lambda d: f"M{d[0]}-A{d[1]}")
def test_opcheck_triton_backend(dims):
    if DEVICE.type != "cuda" and not triton_interpreter():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.pysteer.affine_steer, (*_opcheck_inputs(dims, DEVICE), "triton"))


@requires_cuda
@requires_cuda_ext
def test_opcheck_cuda_backend():
    torch.library.opcheck(
        torch.ops.pysteer.affine_steer, (*_opcheck_inputs(("full", "scalar"), DEVICE), "cuda")
    )


def test_compile_fullgraph_inline_reference():
    torch._dynamo.reset()
    x, rows, M, A = (t.cpu() for t in make_inputs(7, 3, 13, 3, torch.float32, ("full", "scalar")))

    @torch.compile(fullgraph=True)
    def steer_then_scale(x, rows, M, A):
        return affine_steer(x, rows, M, A, backend="torch") * 2

    torch.testing.assert_close(steer_then_scale(x, rows, M, A), affine_steer_ref(x, rows, M, A) * 2)


def test_compile_fullgraph_registered_op():
    torch._dynamo.reset()
    x, rows, M, A = (t.cpu() for t in make_inputs(7, 3, 13, 3, torch.float32, ("scalar", "full")))

    @torch.compile(fullgraph=True)
    def steer_then_scale(x, rows, M, A):
        return torch.ops.pysteer.affine_steer(x, rows, M, A, "torch") * 2

    torch.testing.assert_close(steer_then_scale(x, rows, M, A), affine_steer_ref(x, rows, M, A) * 2)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the problem, raised by the op body before any backend runs
# ---------------------------------------------------------------------------------------------


def _good():
    return [t.cpu() for t in make_inputs(5, 2, 4, 3, torch.float32)]


BAD_INPUTS = {
    "x_not_3d": (lambda x, r, M, A: (x.flatten(1), r, M, A), r"x must be \[T, H, D\]"),
    "rows_wrong_length": (lambda x, r, M, A: (x, r[:-1], M, A), r"rows must be \[T\]"),
    "rows_int64": (lambda x, r, M, A: (x, r.long(), M, A), r"rows must be int32"),
    "M_wrong_heads": (lambda x, r, M, A: (x, r, M[:, :1], A), r"M has 1 heads, x has 2"),
    "A_bad_last_dim": (lambda x, r, M, A: (x, r, M, A[..., :3]), r"A last dim must be 1 or D=4"),
    "tables_rows_differ": (lambda x, r, M, A: (x, r, M, A[:2]), r"M has 3 rows, A has 2"),
    "M_not_3d": (lambda x, r, M, A: (x, r, M[0], A), r"M must be \[C, H, D\]"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_shapes_raise_value_error(backend, case):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    bad = BAD_INPUTS[case][0](*_good())
    with pytest.raises(ValueError, match=BAD_INPUTS[case][1]):
        torch.ops.pysteer.affine_steer(*bad, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("which", ["x", "M", "A"])
def test_unsupported_dtype_raises_value_error(backend, which):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    x, rows, M, A = _good()
    args = {"x": x, "M": M, "A": A}
    args[which] = args[which].double()
    with pytest.raises(
        ValueError, match=rf"\({backend}\): {which} must be float32, float16 or bfloat16, got torch.float64"
    ):
        torch.ops.pysteer.affine_steer(args["x"], rows, args["M"], args["A"], backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize(
    "case,match",
    [
        ("grad_shape", r"grad has shape \(5, 2, 3\), x has \(5, 2, 4\)"),
        ("grad_dtype", r"grad is torch.float16"),
    ],
)
def test_backward_bad_grad_raises_value_error(backend, case, match):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    x, rows, M, A = _good()
    grad = x[..., :3].clone() if case == "grad_shape" else x.half()
    with pytest.raises(ValueError, match=match):
        torch.ops.pysteer.affine_steer_backward(grad, x, rows, M, A, backend)


def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor, got device cpu"):
        fast_forward("cuda")(*_good())


@requires_triton
def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton needs CUDA tensors unless TRITON_INTERPRET=1"):
        fast_forward("triton")(*_good())


# ---------------------------------------------------------------------------------------------
# the CUDA extension's own interface
# ---------------------------------------------------------------------------------------------


def test_cuda_dtype_codes_match_header():
    from pysteer.ops._cuda_common import DTYPE_CODES

    header = (ROOT / "csrc" / "common.cuh").read_text()
    enum = dict(re.findall(r"k(\w+) = (\d+)", header[header.index("enum DType") :]))
    names = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16"}
    assert {names[dt]: str(code) for dt, code in DTYPE_CODES.items()} == enum


def _fwd_call(**over):
    args = dict(
        x=0, x_stride_t=4, x_stride_h=4, rows=0, M=0, M_stride_c=4, M_stride_h=4, M_stride_d=1, Dm=4,
        A=0, A_stride_c=4, A_stride_h=4, A_stride_d=1, Da=4, y=0, T=0, H=1, D=4, C=1,
        x_dtype=0, table_dtype=0, device=0, stream=0,
    )  # fmt: skip
    args.update(over)
    return args


@requires_cuda_ext
@pytest.mark.parametrize(
    "over,match",
    [
        ({"x_dtype": 7}, "unknown dtype code 7"),
        ({"table_dtype": 3}, "unknown dtype code 3"),
        ({"Dm": 3}, "table last dims must be 1 or D=4, got 3 and 4"),
        ({"C": 0}, "C >= 1"),
        ({"T": -1}, "T, H, D >= 0"),
    ],
)
def test_cuda_extension_validates_before_touching_the_device(over, match):
    """Bad raw arguments raise ValueError in C++ before any CUDA call (so this runs without a GPU)."""
    ext = importlib.import_module("pysteer._C")
    with pytest.raises(ValueError, match=match):
        ext.affine_steer_fwd(**_fwd_call(**over))


@requires_cuda_ext
def test_cuda_extension_empty_batch_needs_no_device():
    importlib.import_module("pysteer._C").affine_steer_fwd(**_fwd_call(T=0))


# ---------------------------------------------------------------------------------------------
# the CUDA kernels' logic, compiled for the host
# ---------------------------------------------------------------------------------------------
#
# csrc/affine.cu is compiled with the host C++ compiler, each launch running its blocks and threads
# one after another. This checks the kernels' indexing, 16-byte packing, alignment choices, table
# broadcasting and gradient flushing on a machine without a GPU (the kernels use no shared memory,
# warp shuffles or block barriers, so running threads in turn is faithful). It stands in for
# pysteer._C behind the real wrappers (pysteer/ops/cuda_affine.py). Device code generation is what
# the GPU tests above check.


def _host_source(cu: str) -> tuple[str, dict[str, list]]:
    """csrc/affine.cu with CUDA launches turned into host loops, the binding dropped, C entry points added."""
    drop = ('#include "pysteer.h"', "namespace py = pybind11;", "#include <cuda_runtime.h>")
    source, signatures = sequential_host_source(
        cu,
        "affine.cu",
        drop,
        "void register_affine(py::module_& m)",
        "pysteer",
        "affine_steer_",
        launches=2,
        tail="}  // namespace pysteer\n",
    )
    assert sorted(signatures) == ["affine_steer_bwd", "affine_steer_fwd"], sorted(signatures)
    return source, signatures


@pytest.fixture
def host_cuda_kernels(tmp_path_factory, monkeypatch):
    """``fast_forward("cuda")`` / ``fast_backward("cuda")`` run the host build of csrc/affine.cu."""
    return host_cuda("affine", _host_source, tmp_path_factory, monkeypatch)


# (T, H, D, layout): every head shape, decode and prefill-sized T, contiguous and strided x
HOST_SHAPES = [
    (1, 6, 64, "transposed_view"),
    (7, 3, 13, "contiguous"),
    (83, 1, 48, "head_slice"),
    (83, 6, 64, "contiguous"),
    (300, 3, 13, "transposed_view"),
]


@pytest.mark.parametrize(
    "C,dims", ROWS_AND_DIMS, ids=lambda v: f"M{v[0]}-A{v[1]}" if isinstance(v, tuple) else f"C{v}"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_on_host_match_reference(host_cuda_kernels, dtype, C, dims):
    gen = torch.Generator().manual_seed(5)
    for T, H, D, layout in HOST_SHAPES:
        where = f"T={T} H={H} D={D} {layout}"
        x, rows, M, A = (
            t.cpu() for t in make_inputs(T, H, D, C, dtype, dims, rows="runs" if C == 2 else "random")
        )
        xs = x if layout == "contiguous" else _strided(x, layout)
        y = fast_forward("cuda")(xs, rows, M, A)
        assert_within_oracle(y, affine_steer_ref(x, rows, M, A), ref64_forward(x, rows, M, A), f"y {where}")
        assert_bitwise_equal(y[rows == 0], x[rows == 0], f"row-0 tokens {where}")
        grad = torch.randn(x.shape, generator=gen).to(dtype)
        got = fast_backward("cuda")(grad, xs, rows, M, A)
        assert_backward_within_oracle(got, grad, x, rows, M, A)
        assert_bitwise_equal(got[0][rows == 0], grad[rows == 0], f"row-0 dx {where}")


def test_cuda_kernels_on_host_unaligned_and_mixed_dtypes(host_cuda_kernels):
    """Tensors one element off 16 bytes take the unpacked path; tables of other dtypes convert."""

    def offset_by_one(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        buf[1:] = t.flatten()
        return buf[1:].view(t.shape)

    x, rows, M, A = (t.cpu() for t in make_inputs(83, 4, 32, 4, torch.bfloat16, ("full", "full")))
    want = (affine_steer_ref(x, rows, M, A), ref64_forward(x, rows, M, A))
    for args in [(offset_by_one(x), M, A), (x, offset_by_one(M), A), (x, M.float(), A.half())]:
        assert_within_oracle(fast_forward("cuda")(args[0], rows, *args[1:]), *want, "y")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(x.dtype)
    got = fast_backward("cuda")(grad, offset_by_one(x), rows, offset_by_one(M), A)
    assert_backward_within_oracle(got, grad, x, rows, M, A)


def test_cuda_kernels_on_host_leave_out_of_range_rows_alone(host_cuda_kernels):
    x, rows, M, A = (t.cpu() for t in make_inputs(6, 2, 16, 4, torch.float32))
    rows = torch.tensor([-1, 4, 99, 1, 0, 3], dtype=torch.int32)
    y = fast_forward("cuda")(x, rows, M, A)
    assert_bitwise_equal(y[:3], x[:3], "rows outside [0, C)")
    assert_within_oracle(
        y[3:], affine_steer_ref(x[3:], rows[3:], M, A), ref64_forward(x[3:], rows[3:], M, A), "y"
    )


# ---------------------------------------------------------------------------------------------
# GPU only: CUDA graphs follow in-place table and row updates
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_cuda_graph_replay_follows_in_place_updates(backend):
    x, rows, M, A = make_inputs(64, 8, 128, 4, torch.bfloat16)
    op = fast_forward(backend)
    op(x, rows, M, A)  # compile / warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y = op(x, rows, M, A)
    torch.cuda.current_stream().wait_stream(stream)
    rows.copy_(torch.randint(0, 4, rows.shape, device=DEVICE, dtype=torch.int32))
    M.mul_(2)
    A.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    ref64 = ref64_forward(x, rows, M, A)
    assert_within_oracle(y, affine_steer_ref(x, rows, M, A), ref64, "replayed y")
