// Per-row low-rank edit: y[t] = base[t] + (x[t] U[r[t]] + c[r[t]]) V[r[t]]
//
// The contract is the torch reference in pysteer/ops/lowrank.py: fp32 compute for every input
// dtype, output in x's dtype (base has it too), row 0 returns base bit-exactly and reads no table,
// tables U [C, K, R], c [C, R], V [C, R, N] are contiguous fp32. Python
// (pysteer/ops/cuda_lowrank.py) validates shapes and dtypes, allocates the outputs and the fp32
// workspaces and passes raw device pointers, sizes, strides and the current stream; the checks
// here guard the C ABI.
//
// Simple kernels, one thread per output element, no shared memory and no barriers:
//   forward:  hidden  h[t, j] = c[r, j] + sum_k x[t, k] U[r, k, j]       thread per (t, j)
//             out     y[t, n] = base[t, n] + sum_j h[t, j] V[r, j, n]     thread per (t, n)
//   backward: hidden  (as above, recomputed)
//             dh      dh[t, j] = sum_n g[t, n] V[r, j, n]; dc[r, j] += dh  thread per (t, j)
//             dx      dx[t, k] = sum_j dh[t, j] U[r, k, j] (0 on row 0)    thread per (t, k)
//             (hidden, dh and dx are one per-row matrix-vector kernel with other strides)
//             outer   dU[r, k, j] += x[t, k] dh[t, j], dV[r, j, n] += h[t, j] g[t, n]: a thread
//                     per table entry walks a chunk of tokens, keeping an fp32 sum for the current
//                     row and flushing it with atomicAdd when the row changes (one atomic per
//                     entry per chunk for prompt-shaped batches on one row).
// Adjacent threads read adjacent j (U) or n (V, base, y), so table reads coalesce across a warp.
// Rows outside [0, C) are outside the contract; they are treated like row 0 (no out-of-bounds read).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace py = pybind11;

namespace pysteer_lowrank {
namespace {

// Not pysteer.h: it declares pysteer_register_lowrank weak (for module.cu), and the definition
// below is meant to be a strong symbol.
using namespace pysteer::common;
using pysteer::kFloat16;
using pysteer::kFloat32;

constexpr int kThreads = 128;
constexpr int64_t kMaxGridX = INT32_MAX;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMinTokensPerChunk = 16;

__device__ __forceinline__ bool live_row(int32_t r, int64_t C) { return r > 0 && r < C; }

// out[t, j] = bias[r, j] + sum_m a[t, m] W[r * w_sr + j * w_sj + m * w_sm] for a live token (0 on
// row 0), thread per (t, j) of J per token; no bias when `bias` is null. With `dsum`, a live token's
// value is also added into dsum[r, j]. The hidden, dh and dx passes are each one of these.
template <typename TA, typename TO>
__global__ void lowrank_row_gemv_kernel(const TA* __restrict__ a, int64_t a_st, int64_t M,
                                        const int32_t* __restrict__ rows, const float* __restrict__ W, int64_t w_sr,
                                        int64_t w_sj, int64_t w_sm, const float* __restrict__ bias,
                                        float* __restrict__ dsum, TO* __restrict__ out, int64_t T, int64_t C,
                                        int64_t J) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * J) return;
  const int64_t t = i / J;
  const int64_t j = i - t * J;
  const int32_t r = rows[t];
  float acc = 0.f;
  if (live_row(r, C)) {
    const float* w = W + r * w_sr + j * w_sj;
    const TA* at = a + t * a_st;
    if (bias != nullptr) acc = bias[r * J + j];
    for (int64_t m = 0; m < M; ++m) acc = fmaf(to_float(at[m]), w[m * w_sm], acc);
    if (dsum != nullptr) atomicAdd(dsum + r * J + j, acc);
  }
  out[i] = from_float<TO>(acc);
}

template <typename TX>
__global__ void lowrank_out_kernel(const TX* __restrict__ base, int64_t base_st, const int32_t* __restrict__ rows,
                                   const float* __restrict__ h, const float* __restrict__ V, TX* __restrict__ y,
                                   int64_t T, int64_t C, int64_t N, int64_t R) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * N) return;
  const int64_t t = i / N;
  const int64_t n = i - t * N;
  const TX b = base[t * base_st + n];
  const int32_t r = rows[t];
  if (!live_row(r, C)) {
    y[i] = b;  // a copy of the element: bit-exact
    return;
  }
  const float* v = V + r * R * N + n;
  const float* ht = h + t * R;
  float acc = 0.f;
  for (int64_t j = 0; j < R; ++j) acc = fmaf(ht[j], v[j * N], acc);
  y[i] = from_float<TX>(to_float(b) + acc);
}

// d[r, p, q] += sum over the chunk's tokens on row r of a[t, p] * b[t, q] (d is fp32 [C, P, Q]).
template <typename TA, typename TB>
__global__ void lowrank_outer_grad_kernel(const TA* __restrict__ a, int64_t a_st, int64_t P,
                                          const TB* __restrict__ b, int64_t b_st, int64_t Q,
                                          const int32_t* __restrict__ rows, float* __restrict__ d, int64_t T,
                                          int64_t C, int64_t tokens_per_chunk) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P * Q) return;
  const int64_t p = i / Q;
  const int64_t q = i - p * Q;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_chunk;
  const int64_t t1 = t0 + tokens_per_chunk < T ? t0 + tokens_per_chunk : T;
  float acc = 0.f;
  int32_t cur = 0;  // 0: nothing accumulated
  for (int64_t t = t0; t < t1; ++t) {
    int32_t r = rows[t];
    if (!live_row(r, C)) r = 0;
    if (r != cur) {
      if (cur != 0) atomicAdd(d + (cur * P + p) * Q + q, acc);
      acc = 0.f;
      cur = r;
    }
    if (r != 0) acc = fmaf(to_float(a[t * a_st + p]), to_float(b[t * b_st + q]), acc);
  }
  if (cur != 0) atomicAdd(d + (cur * P + p) * Q + q, acc);
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

void check_sizes(int64_t T, int64_t K, int64_t N, int64_t R, int64_t C) {
  if (T < 0 || K < 0 || N < 0 || R < 1 || C < 1) {
    throw py::value_error("lowrank_edit: sizes must be T, K, N >= 0 and R, C >= 1, got T=" + std::to_string(T) +
                          " K=" + std::to_string(K) + " N=" + std::to_string(N) + " R=" + std::to_string(R) +
                          " C=" + std::to_string(C));
  }
  const int64_t widest = K > N ? (K > R ? K : R) : (N > R ? N : R);
  if (T > 0 && widest > (kMaxGridX * kThreads) / T) {
    throw py::value_error("lowrank_edit: T=" + std::to_string(T) +
                          " times the widest of K, N, R exceeds the grid limit");
  }
  if (K * R > kMaxGridX || R * N > kMaxGridX) {
    throw py::value_error("lowrank_edit: K*R and R*N must be below 2^31");
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename TA, typename TO>
void launch_gemv(uintptr_t a, int64_t a_st, int64_t M, uintptr_t rows, uintptr_t W, int64_t w_sr, int64_t w_sj,
                 int64_t w_sm, uintptr_t bias, uintptr_t dsum, uintptr_t out, int64_t T, int64_t C, int64_t J,
                 cudaStream_t stream) {
  const dim3 grid(blocks_for(T * J));
  lowrank_row_gemv_kernel<TA, TO><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TA*>(a), a_st, M, reinterpret_cast<const int32_t*>(rows),
      reinterpret_cast<const float*>(W), w_sr, w_sj, w_sm, reinterpret_cast<const float*>(bias),
      reinterpret_cast<float*>(dsum), reinterpret_cast<TO*>(out), T, C, J);
}

template <typename TX>
void launch_out(uintptr_t base, int64_t base_st, uintptr_t rows, uintptr_t h, uintptr_t V, uintptr_t y, int64_t T,
                int64_t C, int64_t N, int64_t R, cudaStream_t stream) {
  const dim3 grid(blocks_for(T * N));
  lowrank_out_kernel<TX><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TX*>(base), base_st, reinterpret_cast<const int32_t*>(rows),
      reinterpret_cast<const float*>(h), reinterpret_cast<const float*>(V), reinterpret_cast<TX*>(y), T, C, N, R);
}

template <typename TA, typename TB>
void launch_outer(uintptr_t a, int64_t a_st, int64_t P, uintptr_t b, int64_t b_st, int64_t Q, uintptr_t rows,
                  uintptr_t d, int64_t T, int64_t C, cudaStream_t stream) {
  int64_t per_chunk = kMinTokensPerChunk;
  if ((T + per_chunk - 1) / per_chunk > kMaxGridY) per_chunk = (T + kMaxGridY - 1) / kMaxGridY;
  const dim3 grid(blocks_for(P * Q), static_cast<unsigned>((T + per_chunk - 1) / per_chunk));
  lowrank_outer_grad_kernel<TA, TB><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TA*>(a), a_st, P, reinterpret_cast<const TB*>(b), b_st, Q,
      reinterpret_cast<const int32_t*>(rows), reinterpret_cast<float*>(d), T, C, per_chunk);
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<TX>{}) for the runtime dtype code of x.
template <typename F>
void dispatch(int x_dtype, const F& f) {
  switch (x_dtype) {
    case kFloat32:
      return f(Tag<float>{});
    case kFloat16:
      return f(Tag<__half>{});
    default:
      return f(Tag<__nv_bfloat16>{});
  }
}

void lowrank_edit_fwd(uintptr_t x, int64_t x_st, uintptr_t base, int64_t base_st, uintptr_t rows, uintptr_t U,
                      uintptr_t c, uintptr_t V, uintptr_t h, uintptr_t y, int64_t T, int64_t K, int64_t N, int64_t R,
                      int64_t C, int x_dtype, int device, uintptr_t stream) {
  dtype_size(x_dtype, "lowrank_edit: unknown");
  check_sizes(T, K, N, R, C);
  if (T == 0 || N == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const DeviceGuard guard(device, "lowrank_edit");
  dispatch(x_dtype, [&](auto tag) {
    using TX = typename decltype(tag)::type;
    launch_gemv<TX, float>(x, x_st, K, rows, U, K * R, 1, R, c, 0, h, T, C, R, s);  // h = x U + c
    launch_out<TX>(base, base_st, rows, h, V, y, T, C, N, R, s);
  });
  check_cuda(cudaGetLastError(), "lowrank_edit", "forward kernel launch");
}

void lowrank_edit_bwd(uintptr_t g, uintptr_t x, int64_t x_st, uintptr_t rows, uintptr_t U, uintptr_t c, uintptr_t V,
                      uintptr_t h, uintptr_t dh, uintptr_t dx, uintptr_t dU, uintptr_t dc, uintptr_t dV, int64_t T,
                      int64_t K, int64_t N, int64_t R, int64_t C, int x_dtype, int device, uintptr_t stream) {
  dtype_size(x_dtype, "lowrank_edit: unknown");
  check_sizes(T, K, N, R, C);
  if (T == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const DeviceGuard guard(device, "lowrank_edit");
  dispatch(x_dtype, [&](auto tag) {
    using TX = typename decltype(tag)::type;
    launch_gemv<TX, float>(x, x_st, K, rows, U, K * R, 1, R, c, 0, h, T, C, R, s);   // h = x U + c
    launch_gemv<TX, float>(g, N, N, rows, V, R * N, N, 1, 0, dc, dh, T, C, R, s);    // dh = g V^T, dc
    launch_gemv<float, TX>(dh, R, R, rows, U, K * R, R, 1, 0, 0, dx, T, C, K, s);    // dx = dh U^T
    launch_outer<TX, float>(x, x_st, K, dh, R, R, rows, dU, T, C, s);
    launch_outer<float, TX>(h, R, R, g, N, N, rows, dV, T, C, s);
  });
  check_cuda(cudaGetLastError(), "lowrank_edit", "backward kernel launch");
}

}  // namespace
}  // namespace pysteer_lowrank

void pysteer_register_lowrank(pybind11::module_& m) {
  m.def("lowrank_edit_fwd", &pysteer_lowrank::lowrank_edit_fwd,
        "y = base + (x U[rows] + c[rows]) V[rows] (row 0: y = base). Pointers are device addresses; x and base "
        "have unit stride in their last dim; tables are contiguous fp32; h is an fp32 [T, R] workspace; y is "
        "contiguous [T, N].",
        py::arg("x"), py::arg("x_stride_t"), py::arg("base"), py::arg("base_stride_t"), py::arg("rows"),
        py::arg("U"), py::arg("c"), py::arg("V"), py::arg("h"), py::arg("y"), py::arg("T"), py::arg("K"),
        py::arg("N"), py::arg("R"), py::arg("C"), py::arg("x_dtype"), py::arg("device"), py::arg("stream"));
  m.def("lowrank_edit_bwd", &pysteer_lowrank::lowrank_edit_bwd,
        "dx = (g V[r]^T) U[r]^T (row 0: 0); dU[c] += x^T dh, dc[c] += dh, dV[c] += h^T g over tokens on row c, "
        "into zero-initialised fp32 buffers. g and dx are contiguous; h and dh are fp32 [T, R] workspaces.",
        py::arg("g"), py::arg("x"), py::arg("x_stride_t"), py::arg("rows"), py::arg("U"), py::arg("c"),
        py::arg("V"), py::arg("h"), py::arg("dh"), py::arg("dx"), py::arg("dU"), py::arg("dc"), py::arg("dV"),
        py::arg("T"), py::arg("K"), py::arg("N"), py::arg("R"), py::arg("C"), py::arg("x_dtype"),
        py::arg("device"), py::arg("stream"));
}
