// Per-row affine steering: y[t, h, :] = x[t, h, :] * M[r[t], h, :] + A[r[t], h, :]
//
// The contract is the torch reference in pysteer/ops/affine.py: fp32 compute for every input
// dtype, output in x's dtype, row 0 returns x bit-exactly, tables [C, H, D] or [C, H, 1].
// Python (pysteer/ops/cuda_affine.py) validates shapes and dtypes, allocates outputs and passes
// raw device pointers, sizes, strides and the current stream; the checks here guard the C ABI.
//
// Layout:
//   forward:  grid (T, channel chunks); a block reads its token's row once, then each thread moves
//             VEC consecutive channels (16 bytes of x) per step. Row 0 is a straight copy.
//   backward: grid (channel chunks, token chunks); each thread walks TOKENS_PER_BLOCK tokens for
//             its VEC channels, writing dx and keeping fp32 sums of g*x and g for the current
//             table row, flushed with atomicAdd when the row changes. Prompt-shaped batches keep
//             one row for many tokens, so a flush is one atomic per channel per chunk instead of
//             one per token.
// Rows outside [0, C) are outside the contract; they are treated like row 0 (no out-of-bounds read).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "pysteer.h"

namespace py = pybind11;

namespace pysteer {
namespace {

using namespace common;

constexpr int kThreads = 128;
constexpr int kMaxGridY = 65535;
constexpr int kMinTokensPerBlock = 16;

// N table values as fp32: one aligned access when the row is contiguous and aligned, a broadcast
// of one value for a [C, H, 1] table, scalar loads otherwise.
template <typename TT, int N>
__device__ __forceinline__ void load_table(const TT* p, bool bcast, bool aligned, int64_t stride_d,
                                           float (&out)[N]) {
  if (bcast) {
    const float v = to_float(p[0]);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = v;
  } else if (aligned) {
    const Pack<TT, N> v = load_pack<TT, N>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(p[k * stride_d]);
  }
}

struct TableArgs {
  int64_t stride_c, stride_h, stride_d;
  bool bcast;    // last dim is 1
  bool aligned;  // rows start VEC-aligned with unit stride in D
};

template <typename TX, typename TT, int VEC>
__global__ void affine_steer_fwd_kernel(const TX* __restrict__ x, int64_t x_st, int64_t x_sh,
                                        const int32_t* __restrict__ rows, const TT* __restrict__ M,
                                        TableArgs m, const TT* __restrict__ A, TableArgs a,
                                        TX* __restrict__ y, int64_t C, int H, int D) {
  const int64_t t = blockIdx.x;
  const int nvec = D / VEC;
  const int n = H * nvec;
  const int32_t r = rows[t];
  const bool live = r > 0 && r < C;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.y) {
    const int h = i / nvec;
    const int d0 = (i - h * nvec) * VEC;
    const Pack<TX, VEC> xv = load_pack<TX, VEC>(x + t * x_st + h * x_sh + d0);
    TX* yp = y + (t * H + h) * D + d0;
    if (!live) {  // uniform across the block
      store_pack<TX, VEC>(yp, xv);
      continue;
    }
    float mv[VEC], av[VEC];
    load_table<TT, VEC>(M + r * m.stride_c + h * m.stride_h + (m.bcast ? 0 : d0 * m.stride_d), m.bcast,
                        m.aligned, m.stride_d, mv);
    load_table<TT, VEC>(A + r * a.stride_c + h * a.stride_h + (a.bcast ? 0 : d0 * a.stride_d), a.bcast,
                        a.aligned, a.stride_d, av);
    Pack<TX, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_float<TX>(fmaf(to_float(xv.v[k]), mv[k], av[k]));
    store_pack<TX, VEC>(yp, out);
  }
}

template <int VEC>
__device__ __forceinline__ void flush_table_grad(float* dT, bool bcast, int64_t row, int H, int D, int h,
                                                 int d0, const float (&acc)[VEC]) {
  if (bcast) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += acc[k];
    atomicAdd(dT + row * H + h, s);
  } else {
    float* p = dT + (row * H + h) * D + d0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(p + k, acc[k]);
  }
}

template <typename TX, typename TT, int VEC>
__global__ void affine_steer_bwd_kernel(const TX* __restrict__ g, const TX* __restrict__ x, int64_t x_st,
                                        int64_t x_sh, const int32_t* __restrict__ rows,
                                        const TT* __restrict__ M, TableArgs m, bool a_bcast,
                                        TX* __restrict__ dx, float* __restrict__ dM, float* __restrict__ dA,
                                        int64_t T, int64_t C, int H, int D, int64_t tokens_per_block) {
  const int nvec = D / VEC;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= H * nvec) return;  // no block-level sync below, so idle threads may leave
  const int h = i / nvec;
  const int d0 = (i - h * nvec) * VEC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t t1 = t0 + tokens_per_block < T ? t0 + tokens_per_block : T;

  float acc_m[VEC], acc_a[VEC];
  int32_t cur = 0;  // 0: nothing accumulated
  for (int64_t t = t0; t < t1; ++t) {
    int32_t r = rows[t];
    if (r < 0 || r >= C) r = 0;
    if (r != cur) {
      if (cur != 0) {
        flush_table_grad<VEC>(dM, m.bcast, cur, H, D, h, d0, acc_m);
        flush_table_grad<VEC>(dA, a_bcast, cur, H, D, h, d0, acc_a);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc_m[k] = acc_a[k] = 0.f;
      cur = r;
    }
    const int64_t dense = (t * H + h) * D + d0;
    const Pack<TX, VEC> gv = load_pack<TX, VEC>(g + dense);
    if (r == 0) {
      store_pack<TX, VEC>(dx + dense, gv);
      continue;
    }
    const Pack<TX, VEC> xv = load_pack<TX, VEC>(x + t * x_st + h * x_sh + d0);
    float mv[VEC];
    load_table<TT, VEC>(M + r * m.stride_c + h * m.stride_h + (m.bcast ? 0 : d0 * m.stride_d), m.bcast,
                        m.aligned, m.stride_d, mv);
    Pack<TX, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gk = to_float(gv.v[k]);
      out.v[k] = from_float<TX>(gk * mv[k]);
      acc_m[k] += gk * to_float(xv.v[k]);
      acc_a[k] += gk;
    }
    store_pack<TX, VEC>(dx + dense, out);
  }
  if (cur != 0) {
    flush_table_grad<VEC>(dM, m.bcast, cur, H, D, h, d0, acc_m);
    flush_table_grad<VEC>(dA, a_bcast, cur, H, D, h, d0, acc_a);
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

void check_sizes(int64_t T, int64_t H, int64_t D, int64_t C, int64_t Dm, int64_t Da) {
  if (T < 0 || H < 0 || D < 0 || C < 1) {
    throw py::value_error("affine_steer: sizes must be T, H, D >= 0 and C >= 1, got T=" + std::to_string(T) +
                          " H=" + std::to_string(H) + " D=" + std::to_string(D) + " C=" + std::to_string(C));
  }
  if ((Dm != 1 && Dm != D) || (Da != 1 && Da != D)) {
    throw py::value_error("affine_steer: table last dims must be 1 or D=" + std::to_string(D) +
                          ", got " + std::to_string(Dm) + " and " + std::to_string(Da));
  }
  if (T > INT32_MAX) {
    throw py::value_error("affine_steer: T=" + std::to_string(T) + " exceeds the grid limit 2^31-1");
  }
  if (H * D > (int64_t{1} << 30)) {
    throw py::value_error("affine_steer: H*D=" + std::to_string(H * D) + " exceeds 2^30 channels");
  }
}

TableArgs table_args(uintptr_t ptr, int64_t sc, int64_t sh, int64_t sd, int64_t last, int64_t D, int vec,
                     int elem) {
  TableArgs t{sc, sh, sd, last == 1 && D != 1, false};
  t.aligned = !t.bcast && (sd == 1 || D == 1) && sc % vec == 0 && sh % vec == 0 && aligned_to(ptr, int64_t{vec} * elem);
  return t;
}

// Whether every x/y/grad access can move 16 bytes at once.
bool can_pack(int x_elem, int64_t D, int64_t x_st, int64_t x_sh, std::initializer_list<uintptr_t> ptrs) {
  const int vec = 16 / x_elem;
  bool ok = D % vec == 0 && x_st % vec == 0 && x_sh % vec == 0;
  for (uintptr_t p : ptrs) ok = ok && aligned_to(p, 16);
  return ok;
}

template <typename TX, typename TT, int VEC>
void launch_fwd(uintptr_t x, int64_t x_st, int64_t x_sh, uintptr_t rows, uintptr_t M, TableArgs m, uintptr_t A,
                TableArgs a, uintptr_t y, int64_t T, int64_t C, int64_t H, int64_t D, cudaStream_t stream) {
  const int64_t n = H * (D / VEC);
  const int64_t chunks = (n + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
  affine_steer_fwd_kernel<TX, TT, VEC><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TX*>(x), x_st, x_sh, reinterpret_cast<const int32_t*>(rows),
      reinterpret_cast<const TT*>(M), m, reinterpret_cast<const TT*>(A), a, reinterpret_cast<TX*>(y), C,
      static_cast<int>(H), static_cast<int>(D));
}

template <typename TX, typename TT, int VEC>
void launch_bwd(uintptr_t g, uintptr_t x, int64_t x_st, int64_t x_sh, uintptr_t rows, uintptr_t M, TableArgs m,
                bool a_bcast, uintptr_t dx, uintptr_t dM, uintptr_t dA, int64_t T, int64_t C, int64_t H,
                int64_t D, cudaStream_t stream) {
  const int64_t n = H * (D / VEC);
  int64_t per_block = kMinTokensPerBlock;
  if ((T + per_block - 1) / per_block > kMaxGridY) per_block = (T + kMaxGridY - 1) / kMaxGridY;
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                  static_cast<unsigned>((T + per_block - 1) / per_block));
  affine_steer_bwd_kernel<TX, TT, VEC><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TX*>(g), reinterpret_cast<const TX*>(x), x_st, x_sh,
      reinterpret_cast<const int32_t*>(rows), reinterpret_cast<const TT*>(M), m, a_bcast,
      reinterpret_cast<TX*>(dx), reinterpret_cast<float*>(dM), reinterpret_cast<float*>(dA), T, C,
      static_cast<int>(H), static_cast<int>(D), per_block);
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f.template run<TX, TT, VEC>() for the runtime dtype codes, with VEC either a 16-byte pack
// of x or 1 (unaligned or odd sizes). Intermediate widths are not instantiated: head dims of the
// supported models are multiples of 8, so they would only add compile time and binary size.
template <typename F>
void dispatch(int x_dtype, int tab_dtype, bool packed, const F& f) {
  auto with_x = [&](auto x_tag) {
    using TX = typename decltype(x_tag)::type;
    auto with_tab = [&](auto tab_tag) {
      using TT = typename decltype(tab_tag)::type;
      if (packed) {
        f.template run<TX, TT, 16 / sizeof(TX)>();
      } else {
        f.template run<TX, TT, 1>();
      }
    };
    switch (tab_dtype) {
      case kFloat32:
        return with_tab(Tag<float>{});
      case kFloat16:
        return with_tab(Tag<__half>{});
      default:
        return with_tab(Tag<__nv_bfloat16>{});
    }
  };
  switch (x_dtype) {
    case kFloat32:
      return with_x(Tag<float>{});
    case kFloat16:
      return with_x(Tag<__half>{});
    default:
      return with_x(Tag<__nv_bfloat16>{});
  }
}

struct FwdArgs {
  uintptr_t x;
  int64_t x_st, x_sh;
  uintptr_t rows, M;
  TableArgs m;
  uintptr_t A;
  TableArgs a;
  uintptr_t y;
  int64_t T, C, H, D;
  cudaStream_t stream;

  template <typename TX, typename TT, int VEC>
  void run() const {
    launch_fwd<TX, TT, VEC>(x, x_st, x_sh, rows, M, m, A, a, y, T, C, H, D, stream);
  }
};

struct BwdArgs {
  uintptr_t g, x;
  int64_t x_st, x_sh;
  uintptr_t rows, M;
  TableArgs m;
  bool a_bcast;
  uintptr_t dx, dM, dA;
  int64_t T, C, H, D;
  cudaStream_t stream;

  template <typename TX, typename TT, int VEC>
  void run() const {
    launch_bwd<TX, TT, VEC>(g, x, x_st, x_sh, rows, M, m, a_bcast, dx, dM, dA, T, C, H, D, stream);
  }
};

void affine_steer_fwd(uintptr_t x, int64_t x_st, int64_t x_sh, uintptr_t rows, uintptr_t M, int64_t m_sc,
                      int64_t m_sh, int64_t m_sd, int64_t Dm, uintptr_t A, int64_t a_sc, int64_t a_sh,
                      int64_t a_sd, int64_t Da, uintptr_t y, int64_t T, int64_t H, int64_t D, int64_t C,
                      int x_dtype, int tab_dtype, int device, uintptr_t stream) {
  const int x_elem = dtype_size(x_dtype, "affine_steer: unknown");
  const int tab_elem = dtype_size(tab_dtype, "affine_steer: unknown");
  check_sizes(T, H, D, C, Dm, Da);
  if (T == 0 || H == 0 || D == 0) return;
  const bool packed = can_pack(x_elem, D, x_st, x_sh, {x, y});
  const int vec = packed ? 16 / x_elem : 1;
  const FwdArgs args{x,
                     x_st,
                     x_sh,
                     rows,
                     M,
                     table_args(M, m_sc, m_sh, m_sd, Dm, D, vec, tab_elem),
                     A,
                     table_args(A, a_sc, a_sh, a_sd, Da, D, vec, tab_elem),
                     y,
                     T,
                     C,
                     H,
                     D,
                     reinterpret_cast<cudaStream_t>(stream)};
  const DeviceGuard guard(device, "affine_steer");
  dispatch(x_dtype, tab_dtype, packed, args);
  check_cuda(cudaGetLastError(), "affine_steer", "forward kernel launch");
}

void affine_steer_bwd(uintptr_t g, uintptr_t x, int64_t x_st, int64_t x_sh, uintptr_t rows, uintptr_t M,
                      int64_t m_sc, int64_t m_sh, int64_t m_sd, int64_t Dm, int64_t Da, uintptr_t dx,
                      uintptr_t dM, uintptr_t dA, int64_t T, int64_t H, int64_t D, int64_t C, int x_dtype,
                      int tab_dtype, int device, uintptr_t stream) {
  const int x_elem = dtype_size(x_dtype, "affine_steer: unknown");
  const int tab_elem = dtype_size(tab_dtype, "affine_steer: unknown");
  check_sizes(T, H, D, C, Dm, Da);
  if (T == 0 || H == 0 || D == 0) return;
  // g and dx are contiguous [T, H, D]: their strides H*D and D are multiples of the pack when D is.
  const bool packed = can_pack(x_elem, D, x_st, x_sh, {g, x, dx});
  const int vec = packed ? 16 / x_elem : 1;
  const BwdArgs args{g,
                     x,
                     x_st,
                     x_sh,
                     rows,
                     M,
                     table_args(M, m_sc, m_sh, m_sd, Dm, D, vec, tab_elem),
                     Da == 1 && D != 1,
                     dx,
                     dM,
                     dA,
                     T,
                     C,
                     H,
                     D,
                     reinterpret_cast<cudaStream_t>(stream)};
  const DeviceGuard guard(device, "affine_steer");
  dispatch(x_dtype, tab_dtype, packed, args);
  check_cuda(cudaGetLastError(), "affine_steer", "backward kernel launch");
}

}  // namespace

void register_affine(py::module_& m) {
  m.def("affine_steer_fwd", &affine_steer_fwd,
        "y = x * M[rows] + A[rows] (row 0: y = x). Pointers are device addresses; y is contiguous [T, H, D]; "
        "x has unit stride in D.",
        py::arg("x"), py::arg("x_stride_t"), py::arg("x_stride_h"), py::arg("rows"), py::arg("M"),
        py::arg("M_stride_c"), py::arg("M_stride_h"), py::arg("M_stride_d"), py::arg("Dm"), py::arg("A"),
        py::arg("A_stride_c"), py::arg("A_stride_h"), py::arg("A_stride_d"), py::arg("Da"), py::arg("y"),
        py::arg("T"), py::arg("H"), py::arg("D"), py::arg("C"), py::arg("x_dtype"), py::arg("table_dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("affine_steer_bwd", &affine_steer_bwd,
        "dx = g * M[rows] (row 0: dx = g); dM[c] += sum g*x and dA[c] += sum g over tokens on row c, "
        "into zero-initialised fp32 buffers [C, H, Dm] and [C, H, Da]. g and dx are contiguous [T, H, D].",
        py::arg("g"), py::arg("x"), py::arg("x_stride_t"), py::arg("x_stride_h"), py::arg("rows"), py::arg("M"),
        py::arg("M_stride_c"), py::arg("M_stride_h"), py::arg("M_stride_d"), py::arg("Dm"), py::arg("Da"),
        py::arg("dx"), py::arg("dM"), py::arg("dA"), py::arg("T"), py::arg("H"), py::arg("D"), py::arg("C"),
        py::arg("x_dtype"), py::arg("table_dtype"), py::arg("device"), py::arg("stream"));
}

}  // namespace pysteer
