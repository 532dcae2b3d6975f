"""SAE ops: every backend against the float64 reference (2x rule), exactness properties, opcheck.

Oracle: ``max|fast - ref64| <= 2 * max|torch_same_dtype - ref64| + floor`` where ``torch_same_dtype``
is the reference run on the same low-precision inputs, and the floor is a few fp32 ulps of the
output's scale. Test data keep every pre-activation at least 0.25 away from JumpReLU thresholds,
ReLU's kink and the top-k boundary (see ``separated_case``), so no rounding can flip a gate and
the comparison never needs masking.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch
from _ops_helpers import (
    HOST_PRELUDE,
    assert_within_oracle,
    backend_param,
    c_entry_points,
    cuda_ext_missing,
    emulate_launches,
    host_cuda,
    host_skip_reason,
    strip_binding,
)

from pysteer.ops import sae as ops
from pysteer.ops.sae import (
    EDIT_ABLATE,
    EDIT_ADD,
    EDIT_ADD_IF_ACTIVE,
    EDIT_NONE,
    EDIT_SCALE,
    EDIT_SET,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
KS = [1, 8, 64]


def _triton_skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device and TRITON_INTERPRET is not 1"
    return None


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return cuda_ext_missing("sae_steer_apply")


def _host_skip_reason() -> str | None:
    if DEVICE == "cuda":
        return "a CUDA device is present: the compiled kernels run instead of their host emulation"
    return host_skip_reason()


_TRITON_SKIP = _triton_skip_reason()
_CUDA_SKIP = _cuda_skip_reason()
_HOST_SKIP = _host_skip_reason()
# "cuda-host": csrc/sae.cu compiled for the host and run through pysteer/ops/cuda_sae.py (see the
# end of this file); on a GPU machine "cuda" runs the compiled kernels instead.
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")),
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")),
    pytest.param("cuda-host", marks=pytest.mark.skipif(_HOST_SKIP is not None, reason=_HOST_SKIP or "")),
]


@pytest.fixture
def backend(request) -> str:
    """The backend name to pass to the ops; "cuda-host" patches the CUDA wrappers onto the emulation."""
    return backend_param(request)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def separated_case(
    T: int, d: int, m: int, *, winners: int, seed: int = 0, sae_layout: bool = True
) -> dict[str, torch.Tensor]:
    """float64 SAE tensors and inputs with controlled pre-activations.

    For every token exactly ``winners`` latents have a pre-activation in [1, 2]; all others lie
    in [-1.5, -0.25]; JumpReLU thresholds lie in [0.5, 0.75]. ``W_enc`` is solved from the target
    pre-activations (least norm, plus a random component orthogonal to the inputs), so rounding
    the inputs to bf16 moves a pre-activation by ~0.03 at most: no gate or top-k membership flips.
    """
    assert T <= d
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    xin = torch.randn(T, d, generator=g, dtype=f64)
    b_dec = 0.1 * torch.randn(d, generator=g, dtype=f64)
    b_enc = 0.1 * torch.randn(m, generator=g, dtype=f64)
    P = -1.5 + 1.25 * torch.rand(T, m, generator=g, dtype=f64)
    for t in range(T):
        win = torch.randperm(m, generator=g)[:winners]
        P[t, win] = 1.0 + torch.rand(winners, generator=g, dtype=f64)
    pinv = torch.linalg.pinv(xin)
    noise = torch.randn(d, m, generator=g, dtype=f64) / math.sqrt(d)
    W_enc = pinv @ (P - b_enc) + noise - pinv @ (xin @ noise)
    if sae_layout:  # [m, d] storage seen as [d, m], as pysteer.SAE keeps it
        W_enc = W_enc.t().contiguous().t()
    return {
        "x": xin + b_dec,
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": torch.randn(m, d, generator=g, dtype=f64) / math.sqrt(d),
        "b_dec": b_dec,
        "threshold": 0.5 + 0.25 * torch.rand(m, generator=g, dtype=f64),
    }


def cast(case: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Round to ``dtype`` (keeping strides), on the test device."""
    out = {}
    for name, t in case.items():
        r = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=DEVICE)
        out[name] = r.copy_(t)
    return out


def up(case: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 copies of already-rounded tensors: the reference computes on exactly these values."""
    return {name: t.double() for name, t in case.items()}


def strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a non-contiguous view (row stride d + 3)."""
    T, d = x.shape
    big = torch.zeros(T, d + 3, dtype=x.dtype, device=x.device)
    big[:, 1 : d + 1] = x
    return big[:, 1 : d + 1]


def edit_tables(m: int, n_rows: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features S (6 distinct ids) and tables whose rows 1.. use every edit kind."""
    g = torch.Generator().manual_seed(seed)
    features = torch.tensor([0, 5, m // 2, m - 1, 17, 3], dtype=torch.int32)
    kinds_all = [EDIT_SET, EDIT_ADD, EDIT_SCALE, EDIT_ABLATE, EDIT_ADD_IF_ACTIVE, EDIT_NONE]
    kinds = torch.zeros(n_rows, 6, dtype=torch.int32)
    for c in range(1, n_rows):
        kinds[c] = torch.tensor(kinds_all[c - 1 :] + kinds_all[: c - 1], dtype=torch.int32)
    strengths = 4 * torch.rand(n_rows, 6, generator=g) - 2
    strengths[0] = 0
    return features.to(DEVICE), kinds.to(DEVICE), strengths.to(DEVICE)


def assert_2x(fast: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The 2x oracle with a floor of 8 fp32 units (the SAE ops sum over d or k in fp32)."""
    assert torch.isfinite(fast).all(), f"{what}: non-finite output"
    assert_within_oracle(fast, same, ref, what, floor_eps=8 * torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------

# (T, d, m, SAE storage layout, strided x): a decode step, and a prefill-shaped odd case
ENCODE_SHAPES = [(1, 67, 131, True, False), (33, 67, 257, False, True)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["relu", "jumprelu"])
@pytest.mark.parametrize("shape", ENCODE_SHAPES, ids=["T1", "T33-strided"])
def test_encode_matches_reference(backend, dtype, act, shape):
    T, d, m, sae_layout, strided_x = shape
    c = cast(separated_case(T, d, m, winners=m // 4, sae_layout=sae_layout), dtype)
    x = strided(c["x"]) if strided_x else c["x"]
    thr = c["threshold"] if act == "jumprelu" else None
    fast = ops.sae_encode(x, c["W_enc"], c["b_enc"], c["b_dec"], thr, act=act, backend=backend)
    same = ops.sae_encode(x, c["W_enc"], c["b_enc"], c["b_dec"], thr, act=act, backend="torch")
    r = up(c)
    ref = ops.sae_encode_ref(
        r["x"], r["W_enc"], r["b_enc"], r["b_dec"], r["threshold"] if thr is not None else None, act
    )
    assert fast.dtype == dtype and fast.shape == (T, m)
    assert_2x(fast, same, ref, f"sae_encode[{backend}, {act}, {dtype}]")
    assert torch.equal(fast == 0, ref == 0), "the set of active latents differs"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_encode_without_b_dec(backend):
    c = cast(separated_case(7, 67, 131, winners=30), torch.float32)
    xin = c["x"] - c["b_dec"]
    fast = ops.sae_encode(xin, c["W_enc"], c["b_enc"], None, None, act="relu", backend=backend)
    r = up(c)
    ref = ops.sae_encode_ref(r["x"] - r["b_dec"], r["W_enc"], r["b_enc"], None, None, "relu")
    same = ops.sae_encode_ref(xin, c["W_enc"], c["b_enc"], None, None, "relu")
    assert_2x(fast, same, ref, "sae_encode without b_dec")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", KS)
def test_encode_topk_matches_reference(backend, dtype, k):
    T, d, m = 9, 67, 131
    c = cast(separated_case(T, d, m, winners=k, seed=k, sae_layout=k != 8), dtype)
    values, indices = ops.sae_encode_topk(c["x"], c["W_enc"], c["b_enc"], c["b_dec"], k=k, backend=backend)
    assert values.shape == (T, k) and indices.shape == (T, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert (values[:, 1:] <= values[:, :-1]).all(), "values are not sorted descending"
    r = up(c)
    ref_v, ref_i = ops.sae_encode_topk_ref(r["x"], r["W_enc"], r["b_enc"], r["b_dec"], k)
    same_v, same_i = ops.sae_encode_topk_ref(c["x"], c["W_enc"], c["b_enc"], c["b_dec"], k)
    # the winners are separated by >= 1.25 from the rest: the same sets, compared in id order
    ids, order = indices.sort(dim=1)
    ref_ids, ref_order = ref_i.sort(dim=1)
    same_ids, same_order = same_i.sort(dim=1)
    assert torch.equal(ids, ref_ids) and torch.equal(same_ids, ref_ids)
    assert_2x(
        values.gather(1, order),
        same_v.gather(1, same_order),
        ref_v.gather(1, ref_order),
        f"sae_encode_topk[{backend}, k={k}, {dtype}]",
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_topk_kernels_break_ties_towards_the_lower_latent_id(backend):
    x = torch.zeros(2, 3, device=DEVICE)
    W_enc = torch.zeros(3, 10, device=DEVICE)
    b_enc = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0, -0.0, 0.0, 0.0, 0.0, 2.0], device=DEVICE)
    values, indices = ops.sae_encode_topk(x, W_enc, b_enc, None, k=3, backend=backend)
    assert indices.tolist() == [[9, 1, 2], [9, 1, 2]]
    assert values.tolist() == [[2.0, 1.0, 1.0]] * 2
    values, indices = ops.sae_encode_topk(x, W_enc, b_enc, None, k=7, backend=backend)
    assert indices[0].tolist() == [9, 1, 2, 4, 3, 0, 5]  # -0.0 ties with +0.0


# ---------------------------------------------------------------------------------------------
# sparse decode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", KS)
def test_decode_sparse_matches_reference(backend, dtype, k):
    T, d, m = 5, 67, 131
    g = torch.Generator().manual_seed(k)
    indices = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    if k == 8:
        indices = indices.int()
    values = (1 + torch.rand(T, k, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    W_dec = torch.randn(m, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    if k == 64:  # a non-contiguous decoder
        W_dec = W_dec.t().contiguous().t()
    b_dec = torch.randn(d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    fast = ops.sae_decode_sparse(indices, values, W_dec, b_dec, backend=backend)
    same = ops.sae_decode_sparse(indices, values, W_dec, b_dec, backend="torch")
    ref = ops.sae_decode_sparse_ref(indices, values.double(), W_dec.double(), b_dec.double())
    assert fast.dtype == dtype and fast.shape == (T, d)
    assert_2x(fast, same, ref, f"sae_decode_sparse[{backend}, k={k}, {dtype}]")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sparse_decode_of_topk_codes_equals_dense_decode(backend):
    c = cast(separated_case(6, 67, 131, winners=8), torch.float32)
    values, indices = ops.sae_encode_topk(c["x"], c["W_enc"], c["b_enc"], c["b_dec"], k=8, backend=backend)
    dense = torch.zeros(6, 131, device=DEVICE).scatter_(1, indices, values)
    sparse = ops.sae_decode_sparse(indices, values, c["W_dec"], c["b_dec"], backend=backend)
    torch.testing.assert_close(sparse, dense @ c["W_dec"] + c["b_dec"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# steering
# ---------------------------------------------------------------------------------------------


def _steer(c, rows, tables, act, k, backend, x=None):
    features, kinds, strengths = tables
    thr = c["threshold"] if act == "jumprelu" else None
    return ops.sae_steer(
        c["x"] if x is None else x,
        rows,
        c["W_enc"],
        c["b_enc"],
        c["W_dec"],
        c["b_dec"],
        thr,
        features,
        kinds,
        strengths,
        act=act,
        k=k,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
def test_steer_matches_reference(backend, dtype, act):
    T, d, m, k = 13, 67, 131, 8
    winners = k if act == "topk" else 40
    c = cast(separated_case(T, d, m, winners=winners, seed=3, sae_layout=act != "relu"), dtype)
    kk = k if act == "topk" else 0
    rows = (torch.arange(T, dtype=torch.int32) % 4).to(DEVICE)
    tables = edit_tables(m)
    x = strided(c["x"]) if act == "jumprelu" else c["x"]
    fast = _steer(c, rows, tables, act, kk, backend, x=x)
    same = _steer(c, rows, tables, act, kk, "torch", x=x)
    r = up(c)
    f, kinds, s = tables
    ref = ops.sae_steer_ref(ops.SteerArgs(
        r["x"], rows, r["W_enc"], r["b_enc"], r["W_dec"], r["b_dec"], r["threshold"] if act == "jumprelu" else None,
        f, kinds, s.double(), act, kk,
    ))  # fmt: skip
    assert fast.dtype == dtype and fast.shape == (T, d) and fast.is_contiguous()
    assert_2x(fast, same, ref, f"sae_steer[{backend}, {act}, {dtype}]")
    assert torch.equal(fast[rows == 0], c["x"][rows == 0]), "row-0 tokens changed"
    assert not torch.equal(fast[rows != 0], c["x"][rows != 0]), "the edits did nothing"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("k", [1, 64])
def test_steer_topk_k(backend, k):
    T, d, m = 5, 67, 131
    c = cast(separated_case(T, d, m, winners=k, seed=k), torch.float32)
    rows = torch.tensor([1, 2, 3, 0, 1], dtype=torch.int32, device=DEVICE)
    tables = edit_tables(m, seed=k)
    fast = _steer(c, rows, tables, "topk", k, backend)
    same = _steer(c, rows, tables, "topk", k, "torch")
    r = up(c)
    f, kinds, s = tables
    ref = ops.sae_steer_ref(
        ops.SteerArgs(
            r["x"],
            rows,
            r["W_enc"],
            r["b_enc"],
            r["W_dec"],
            r["b_dec"],
            None,
            f,
            kinds,
            s.double(),
            "topk",
            k,
        )
    )
    assert_2x(fast, same, ref, f"sae_steer[{backend}, topk, k={k}]")


@pytest.mark.parametrize("backend", [pytest.param("torch"), *BACKENDS], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
def test_zero_edits_are_bit_exact_identity(backend, dtype, act):
    T, d, m, k = 8, 67, 131, 8
    c = cast(separated_case(T, d, m, winners=k, seed=5), dtype)
    x = c["x"].clone()
    x[:, :4] = 0.0
    x[::2, :2] = -0.0  # x + 0.0 would turn these into +0.0
    features = torch.tensor([1, 4, 9, 77], dtype=torch.int32, device=DEVICE)
    kinds = torch.tensor(
        [[EDIT_SET] * 4, [EDIT_ADD] * 4, [EDIT_SCALE] * 4, [EDIT_NONE] * 4, [EDIT_ADD_IF_ACTIVE] * 4],
        dtype=torch.int32,
        device=DEVICE,
    )
    strengths = torch.tensor([[5.0] * 4, [0.0] * 4, [1.0] * 4, [3.0] * 4, [0.0] * 4], device=DEVICE)
    rows = torch.tensor([0, 1, 2, 3, 4, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    y = _steer(c, rows, (features, kinds, strengths), act, k if act == "topk" else 0, backend, x=x)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(y.view(bits), x.view(bits)), (
        "an edit that changes no feature must return x bit-exactly"
    )


@pytest.mark.parametrize("backend", [pytest.param("torch"), *BACKENDS], indirect=True)
@pytest.mark.parametrize("act", ["relu", "jumprelu"])
def test_selective_encode_equals_full_encode_on_edited_features(backend, act):
    """Ablating S through a decoder of unit vectors reads -f_S off the output; compare to the full encode."""
    T, d, m = 6, 67, 61
    c = cast(separated_case(T, d, m, winners=20, seed=7), torch.float32)
    features = torch.tensor([0, 2, 13, 29, 60], dtype=torch.int32, device=DEVICE)
    c["W_dec"] = torch.eye(m, d, device=DEVICE)  # W_dec[j] = e_j
    kinds = torch.full((2, 5), EDIT_ABLATE, dtype=torch.int32, device=DEVICE)
    strengths = torch.zeros(2, 5, device=DEVICE)
    rows = torch.ones(T, dtype=torch.int32, device=DEVICE)
    y = _steer(c, rows, (features, kinds, strengths), act, 0, backend)
    thr = c["threshold"] if act == "jumprelu" else None
    full = ops.sae_encode(c["x"], c["W_enc"], c["b_enc"], c["b_dec"], thr, act=act, backend="torch")
    S = features.long()
    assert (full[:, S] > 0).any() and (full[:, S] == 0).any(), "need active and inactive edited features"
    torch.testing.assert_close((c["x"] - y)[:, S], full[:, S], rtol=2e-6, atol=2e-6)
    others = torch.ones(d, dtype=torch.bool, device=DEVICE)
    others[S] = False
    assert torch.equal(y[:, others], c["x"][:, others])
    # the reference's selective path against its full encode, in float64
    r = up(c)
    sel = ops.sae_feature_acts_ref(
        r["x"],
        r["W_enc"],
        r["b_enc"],
        r["b_dec"],
        r["threshold"] if thr is not None else None,
        features,
        act,
        0,
    )
    whole = ops.sae_encode_ref(
        r["x"], r["W_enc"], r["b_enc"], r["b_dec"], r["threshold"] if thr is not None else None, act
    )
    torch.testing.assert_close(sel, whole[:, S], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [pytest.param("torch"), *BACKENDS], indirect=True)
@pytest.mark.parametrize("act", ["relu", "topk"])
def test_add_edit_on_orthonormal_tied_sae_adds_the_decoder_row(backend, act):
    T, d, m, j, s = 5, 64, 48, 7, 1.5
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W_dec = q[:, :m].t().contiguous().float().to(DEVICE)  # orthonormal rows
    x = torch.randn(T, d, generator=g).to(DEVICE)
    c = {"x": x, "W_enc": W_dec.t(), "b_enc": torch.zeros(m, device=DEVICE), "W_dec": W_dec}
    c["b_dec"] = 0.1 * torch.randn(d, generator=g).to(DEVICE)
    k = m if act == "topk" else 0  # all latents kept: membership cannot change under the edit
    features = torch.tensor([3, j, 20], dtype=torch.int32, device=DEVICE)
    kinds = torch.tensor([[0, 0, 0], [EDIT_NONE, EDIT_ADD, EDIT_NONE]], dtype=torch.int32, device=DEVICE)
    strengths = torch.tensor([[0.0, 0.0, 0.0], [0.0, s, 0.0]], device=DEVICE)
    rows = torch.ones(T, dtype=torch.int32, device=DEVICE)
    y = _steer(c, rows, (features, kinds, strengths), act, k, backend)
    torch.testing.assert_close(y, x + s * W_dec[j], rtol=1e-6, atol=1e-6)
    # re-encoding the steered activations moves feature j's pre-activation by exactly s
    pre_x = (x - c["b_dec"]) @ W_dec.t()
    pre_y = (y - c["b_dec"]) @ W_dec.t()
    shift = torch.zeros(m, device=DEVICE)
    shift[j] = s
    torch.testing.assert_close(pre_y, pre_x + shift, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
def test_steer_backward_matches_autograd_of_reference(act):
    """The registered backward (used by every backend) against autograd through the reference, in float64."""
    T, d, m, k = 9, 23, 41, 6
    r = {n: t.to(DEVICE) for n, t in separated_case(T, d, m, winners=k, seed=13).items()}
    features = torch.tensor([0, 5, 20, 40, 17, 3], dtype=torch.int32, device=DEVICE)
    _, kinds, s = edit_tables(m)
    rows = (torch.arange(T, dtype=torch.int32) % 4).to(DEVICE)
    thr = r["threshold"] if act == "jumprelu" else None
    kk = k if act == "topk" else 0
    grad = torch.randn(T, d, dtype=torch.float64, device=DEVICE)

    def run(fn, *extra):
        x = r["x"].clone().requires_grad_()
        st = s.double().clone().requires_grad_()
        y = fn(
            x, rows, r["W_enc"], r["b_enc"], r["W_dec"], r["b_dec"], thr, features, kinds, st, act, kk, *extra
        )
        dx, ds = torch.autograd.grad(y, (x, st), grad)
        return y, dx, ds

    y_ref, dx_ref, ds_ref = run(lambda *args: ops.sae_steer_ref(ops.SteerArgs(*args)))
    y_op, dx_op, ds_op = run(torch.ops.pysteer.sae_steer, "torch")
    torch.testing.assert_close(y_op, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx_op, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds_op, ds_ref, rtol=1e-12, atol=1e-12)
    assert ds_ref[0].abs().max() == 0 and ds_ref[1:].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_steer_backward_through_kernel_backend(backend):
    T, d, m = 6, 23, 41
    c = cast(separated_case(T, d, m, winners=10, seed=2), torch.float32)
    features, kinds, s = edit_tables(m)
    rows = (torch.arange(T, dtype=torch.int32) % 4).to(DEVICE)
    grads = []
    for be in ("torch", backend):
        x = c["x"].clone().requires_grad_()
        st = s.clone().requires_grad_()
        y = ops.sae_steer(
            x,
            rows,
            c["W_enc"],
            c["b_enc"],
            c["W_dec"],
            c["b_dec"],
            None,
            features,
            kinds,
            st,
            act="relu",
            backend=be,
        )
        grads.append(torch.autograd.grad((y * y).sum(), (x, st)))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-4)


def test_encode_decode_backward_match_autograd_of_reference():
    c = {n: t.to(DEVICE) for n, t in separated_case(5, 19, 37, winners=6, seed=4).items()}
    g = torch.randn(5, 37, dtype=torch.float64, device=DEVICE)
    for act, thr in (("relu", None), ("jumprelu", c["threshold"])):
        x1 = c["x"].clone().requires_grad_()
        x2 = c["x"].clone().requires_grad_()
        y1 = torch.ops.pysteer.sae_encode(x1, c["W_enc"], c["b_enc"], c["b_dec"], thr, act, "torch")
        y2 = ops.sae_encode_ref(x2, c["W_enc"], c["b_enc"], c["b_dec"], thr, act)
        torch.testing.assert_close(torch.autograd.grad(y1, x1, g)[0], torch.autograd.grad(y2, x2, g)[0])
    x1 = c["x"].clone().requires_grad_()
    x2 = c["x"].clone().requires_grad_()
    v1, _ = torch.ops.pysteer.sae_encode_topk(x1, c["W_enc"], c["b_enc"], c["b_dec"], 6, "torch")
    v2, _ = ops.sae_encode_topk_ref(x2, c["W_enc"], c["b_enc"], c["b_dec"], 6)
    gv = torch.randn_like(v1)
    torch.testing.assert_close(torch.autograd.grad(v1, x1, gv)[0], torch.autograd.grad(v2, x2, gv)[0])
    idx = torch.tensor([[1, 4], [0, 36], [2, 3], [5, 6], [7, 8]], device=DEVICE)
    vals1 = torch.rand(5, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    vals2 = vals1.detach().clone().requires_grad_()
    W_dec = c["W_dec"]
    gd = torch.randn(5, 19, dtype=torch.float64, device=DEVICE)
    o1 = torch.ops.pysteer.sae_decode_sparse(idx, vals1, W_dec, None, "torch")
    o2 = ops.sae_decode_sparse_ref(idx, vals2, W_dec, None)
    torch.testing.assert_close(torch.autograd.grad(o1, vals1, gd)[0], torch.autograd.grad(o2, vals2, gd)[0])


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

OPCHECK_BACKENDS = [pytest.param("torch"), BACKENDS[0]]


def _small(dtype=torch.float32):
    c = cast(separated_case(3, 19, 37, winners=4, seed=9), dtype)
    return c


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_sae_encode(backend):
    c = _small()
    x = c["x"].clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.pysteer.sae_encode.default,
        (x, c["W_enc"], c["b_enc"], c["b_dec"], c["threshold"], "jumprelu", backend),
    )


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_sae_encode_topk(backend):
    c = _small()
    x = c["x"].clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.pysteer.sae_encode_topk.default, (x, c["W_enc"], c["b_enc"], c["b_dec"], 4, backend)
    )


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS, indirect=True)
def test_opcheck_sae_decode_sparse(backend):
    c = _small()
    idx = torch.tensor([[0, 5, 36], [1, 2, 3], [7, 7, 9]], device=DEVICE)
    vals = torch.rand(3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.pysteer.sae_decode_sparse.default, (idx, vals, c["W_dec"], c["b_dec"], backend)
    )


# jumprelu runs on torch only: topk covers the triton steer path and its selection kernels
OPCHECK_STEER = [
    ("torch", "jumprelu"),
    ("torch", "topk"),
    pytest.param(
        "triton", "topk", marks=pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")
    ),
]


@pytest.mark.parametrize(("backend", "act"), OPCHECK_STEER, indirect=["backend"])
def test_opcheck_sae_steer(backend, act):
    c = _small()
    features, kinds, s = edit_tables(37)
    rows = torch.tensor([1, 0, 3], dtype=torch.int32, device=DEVICE)
    x = c["x"].clone().requires_grad_()
    s = s.clone().requires_grad_()
    thr = c["threshold"] if act == "jumprelu" else None
    args = (
        x,
        rows,
        c["W_enc"],
        c["b_enc"],
        c["W_dec"],
        c["b_dec"],
        thr,
        features,
        kinds,
        s,
        act,
        4 if act == "topk" else 0,
        backend,
    )
    torch.library.opcheck(torch.ops.pysteer.sae_steer.default, args)


# ---------------------------------------------------------------------------------------------
# validation: a clear error, before anything runs
# ---------------------------------------------------------------------------------------------


def _steer_args(**override):
    c = _small()
    features, kinds, s = edit_tables(37)
    args = {
        "x": c["x"],
        "rows": torch.tensor([1, 0, 3], dtype=torch.int32, device=DEVICE),
        "W_enc": c["W_enc"],
        "b_enc": c["b_enc"],
        "W_dec": c["W_dec"],
        "b_dec": c["b_dec"],
        "threshold": None,
        "features": features,
        "kinds": kinds,
        "strengths": s,
    }
    args.update(override)
    return args


@pytest.mark.parametrize("backend", ["torch", *([] if _TRITON_SKIP else ["triton"])])
@pytest.mark.parametrize(
    ("override", "act", "k", "field"),
    [
        ({"rows": torch.zeros(3, dtype=torch.int64)}, "relu", 0, "rows must be int32"),
        ({"rows": torch.zeros(4, dtype=torch.int32)}, "relu", 0, "rows must be [T]"),
        ({"W_dec": torch.zeros(37, 18)}, "relu", 0, "W_dec must be [m, d]"),
        ({"W_enc": torch.zeros(18, 37)}, "relu", 0, "W_enc must be [d, m]"),
        ({"b_enc": torch.zeros(36)}, "relu", 0, "b_enc must be [m]"),
        ({"b_dec": torch.zeros(20)}, "relu", 0, "b_dec must be [d]"),
        ({"strengths": torch.zeros(4, 6, dtype=torch.float16)}, "relu", 0, "strengths must be torch.float32"),
        ({"kinds": torch.zeros(4, 5, dtype=torch.int32)}, "relu", 0, "kinds must be [C, F]"),
        ({"features": torch.zeros(6, dtype=torch.int64)}, "relu", 0, "features must be int32"),
        ({}, "jumprelu", 0, "needs threshold"),
        ({"threshold": torch.zeros(37)}, "relu", 0, "threshold is only used by act='jumprelu'"),
        ({}, "topk", 0, "k must be in [1, m=37]"),
        ({}, "topk", 38, "k must be in [1, m=37]"),
        ({}, "relu", 4, "k is only used by act='topk'"),
        ({}, "gelu", 0, "unknown activation 'gelu'"),
        (
            {"W_dec": torch.zeros(37, 19, dtype=torch.float16)},
            "relu",
            0,
            "W_dec is torch.float16 but x is torch.float32",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_field(backend, override, act, k, field):
    args = _steer_args(**{n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in override.items()})
    with pytest.raises(ValueError) as err:
        ops.sae_steer(**args, act=act, k=k, backend=backend)
    assert field in str(err.value)


@pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")
def test_kernel_backends_refuse_weight_gradients_and_float64():
    args = _steer_args()
    W_dec = args.pop("W_dec").clone().requires_grad_()
    with pytest.raises(ValueError, match="W_dec requires grad"):
        ops.sae_steer(**args, W_dec=W_dec, act="relu", backend="triton")
    c = up(_small())
    with pytest.raises(ValueError, match="for backend 'triton'"):
        ops.sae_encode(c["x"], c["W_enc"], c["b_enc"], None, None, act="relu", backend="triton")
    with pytest.raises(ValueError, match="k <= 1024"):
        big = torch.zeros(2, 2048, device=DEVICE)
        ops.sae_encode_topk(
            c["x"][:, :2].float(), big, torch.zeros(2048, device=DEVICE), None, k=1025, backend="triton"
        )


def test_decode_sparse_rejects_mismatched_values():
    idx = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="values must have indices' shape"):
        ops.sae_decode_sparse(idx, torch.zeros(3, 5), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        ops.sae_decode_sparse(idx.float(), torch.zeros(3, 4), torch.zeros(10, 4))


def test_cuda_backend_rejects_host_tensors_with_a_clear_error():
    args = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in _steer_args().items()}
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.sae_steer(**args, act="relu", backend="cuda")


# ---------------------------------------------------------------------------------------------
# the CUDA kernels' logic, compiled for the host
# ---------------------------------------------------------------------------------------------
#
# csrc/sae.cu is compiled with the host C++ compiler. Each launch runs its blocks one after another
# and a block's threads as OS threads: ``__shared__`` becomes a static shared by them,
# ``__syncthreads`` a barrier over the block, and the warp intrinsics (shuffles, ballot,
# match_any) exchange values through a per-warp buffer between two warp barriers. This checks the
# kernels' indexing, synchronisation, radix select, sorting and edit logic without a GPU, through
# the same Python wrappers (pysteer/ops/cuda_sae.py) that drive pysteer._C. Device code generation
# and timing are what a GPU run checks.

_HOST_SHIM = (
    HOST_PRELUDE
    + r"""
#include <barrier>
#include <memory>
#include <mutex>
#include <thread>
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
};
static EmuBlock* emu_block = nullptr;
static std::mutex emu_atomic_mutex;
inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline std::barrier<>& emu_warp() { return *emu_block->warps[threadIdx.x / 32]; }
inline uint64_t emu_exchange(uint64_t mine, int src_lane) {
  emu_block->slots[threadIdx.x] = mine;
  emu_warp().arrive_and_wait();
  const uint64_t got = emu_block->slots[(threadIdx.x & ~31u) + src_lane];
  emu_warp().arrive_and_wait();
  return got;
}
template <typename V>
inline V emu_shfl(V v, int src) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  bits = emu_exchange(bits, src);
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int o) { return emu_shfl(v, (threadIdx.x & 31) ^ o); }
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) { return emu_shfl(v, src); }
inline unsigned emu_gather_mask(uint64_t mine, bool (*same)(uint64_t, uint64_t)) {
  emu_block->slots[threadIdx.x] = mine;
  emu_warp().arrive_and_wait();
  unsigned m = 0;
  const unsigned base = threadIdx.x & ~31u;
  for (int l = 0; l < 32; ++l) if (same(mine, emu_block->slots[base + l])) m |= 1u << l;
  emu_warp().arrive_and_wait();
  return m;
}
inline unsigned __ballot_sync(unsigned, bool p) {
  return emu_gather_mask(p, [](uint64_t, uint64_t other) { return other != 0; });
}
inline unsigned __match_any_sync(unsigned, int v) {
  return emu_gather_mask(static_cast<uint64_t>(static_cast<uint32_t>(v)), [](uint64_t a, uint64_t b) { return a == b; });
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <typename V>
inline V atomicAdd(V* p, V v) { std::lock_guard<std::mutex> g(emu_atomic_mutex); const V old = *p; *p += v; return old; }
template <typename K, typename... Args>
void emulate(dim3 grid, dim3 block, K kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      EmuBlock eb;
      eb.block = std::make_unique<std::barrier<>>(n);
      for (unsigned w = 0; w < (n + 31) / 32; ++w) eb.warps.push_back(std::make_unique<std::barrier<>>(32));
      eb.slots.assign(n, 0);
      emu_block = &eb;
      std::vector<std::thread> threads;
      threads.reserve(n);
      for (unsigned tx = 0; tx < n; ++tx) {
        threads.emplace_back([=] {
          blockIdx = dim3(bx, by);
          threadIdx = dim3(tx);
          kernel(args...);
        });
      }
      for (auto& t : threads) t.join();
      emu_block = nullptr;
    }
  }
}
"""
)


def _host_source(cu: str) -> tuple[str, dict[str, list]]:
    """csrc/sae.cu with launches turned into ``emulate(...)`` calls and a C entry point per host function."""
    drop = ("#include <cuda_runtime.h>", "#include <pybind11/pybind11.h>", "namespace py = pybind11;")
    cu = strip_binding(cu, "sae.cu", "// Registered by PYBIND11_MODULE", drop)
    # The top-k select is written for any block size that is a multiple of 32; emulated with 512 OS
    # threads its ~30 block barriers cost 0.26 s per token on 2 cores, so it runs with 64 here.
    select = "constexpr int kSelectThreads = 512;"
    assert select in cu, "csrc/sae.cu's select block size changed; update _host_source"
    cu = cu.replace(select, "constexpr int kSelectThreads = 64;")
    cu = emulate_launches(
        cu, "sae.cu", r"(\w+<[^<>]*>)\s*<<<([^,]+), ([^,]+), 0, \w+>>>\(", r"emulate(\2, \3, \1, ", 16
    )
    api, signatures = c_entry_points(cu, "pysteer_sae", "sae_")
    assert len(signatures) == 6, sorted(signatures)
    return _HOST_SHIM + cu + api, signatures


@pytest.fixture
def cuda_kernels_on_host(tmp_path_factory, monkeypatch):
    """Route pysteer/ops/cuda_sae.py to the host build, with host tensors standing in for device ones."""
    return host_cuda("sae", _host_source, tmp_path_factory, monkeypatch, std="c++20")


@pytest.mark.skipif(_HOST_SKIP is not None, reason=_HOST_SKIP or "")
def test_cuda_host_functions_reject_bad_sizes(cuda_kernels_on_host):
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(m, 1024\)\]"):
        cuda_kernels_on_host.sae_topk_select(0, 1, 10, 11, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        cuda_kernels_on_host.sae_decode_sparse(0, True, 0, 1, 0, 1, 1, 0, 0, 1, 4, 7, 0, 0)
    with pytest.raises(ValueError, match="jumprelu needs a threshold"):
        cuda_kernels_on_host.sae_steer_coeff(0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 4, 1, 2, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# the Triton kernels compile for a GPU (no GPU needed)
# ---------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pysteer.kernels import sae as K

P, I32, I64 = "*bf16", "i32", "i64"
CASES = [
    (K._sae_encode_kernel, dict(x_ptr=P, w_ptr=P, b_enc_ptr=P, b_dec_ptr=P, thr_ptr=P, out_ptr=P, T=I32, D=I32, M=I32,
     stride_xt=I64, stride_xd=I32, stride_wd=I32, stride_wm=I64, stride_ot=I64),
     dict(HAS_B_DEC=True, ACT=2, INTERPRET=False, BLOCK_T=16, BLOCK_M=64, BLOCK_D=128), 4),
    (K._topk_stage_kernel, dict(src_ptr="*fp32", keys_ptr="*i64", val_ptr=P, idx_ptr="*i64", T=I32, N=I32, K=I32,
     stride_src=I64, stride_keys=I64),
     dict(FROM_VALUES=True, FINAL=True, BLOCK_T=1, GROUP=4096, KP=256, BLOCK_J=16, INTERPRET=False), 8),
    (K._sae_decode_sparse_kernel, dict(idx_ptr="*i64", val_ptr=P, w_ptr=P, b_ptr=P, out_ptr=P, K=I32, D=I32,
     stride_wm=I64, stride_wd=I32), dict(HAS_B=True, BLOCK_K=16, BLOCK_D=512, INTERPRET=False), 4),
    (K._sae_steer_coeff_kernel, dict(x_ptr=P, rows_ptr="*i32", w_ptr=P, b_enc_ptr=P, b_dec_ptr=P, thr_ptr=P,
     feat_ptr="*i32", kinds_ptr="*i32", str_ptr="*fp32", df_ptr="*fp32", T=I32, D=I32, F=I32, stride_xt=I64,
     stride_xd=I32, stride_wd=I32, stride_wm=I64),
     dict(HAS_B_DEC=True, ACT=2, INTERPRET=False, BLOCK_T=16, BLOCK_F=32, BLOCK_D=128), 4),
    (K._sae_steer_coeff_topk_kernel, dict(idx_ptr="*i64", val_ptr=P, rows_ptr="*i32", feat_ptr="*i32",
     kinds_ptr="*i32", str_ptr="*fp32", df_ptr="*fp32", T=I32, K=I32, F=I32),
     dict(BLOCK_T=16, BLOCK_F=32, BLOCK_K=16), 4),
    (K._sae_steer_apply_kernel, dict(x_ptr=P, rows_ptr="*i32", df_ptr="*fp32", w_ptr=P, feat_ptr="*i32", out_ptr=P,
     T=I32, D=I32, F=I32, stride_xt=I64, stride_xd=I32, stride_wm=I64, stride_wd=I32),
     dict(BLOCK_T=16, BLOCK_D=128, BLOCK_F=32, INTERPRET=False), 4),
]
for fn, types, consts, warps in CASES:
    signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
    assert kernel.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)
"""


@pytest.mark.skipif(_TRITON_SKIP is not None, reason=_TRITON_SKIP or "")
def test_triton_kernels_compile_for_sm90(tmp_path):
    """The interpreter runs Python; this compiles each kernel to an sm_90 cubin with Triton's own ptxas."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 6
