// Per-row affine steering fused into a projection, decode regime (T <= 64):
//
//     out[t, n] = sum_k W[n, k] * steer(z)[t, k] + bias[n],   steer(z)[t, k] = z[t, k] * M[r, h, d] + A[r, h, d]
//
// with r = rows[t], h = k / D, d = k % D. The contract is the torch reference in
// pysteer/ops/affine_linear.py: the steered activation is computed in fp32 and rounded to z's dtype,
// the projection accumulates in fp32, row 0 projects the unmodified z. pysteer/ops/cuda_affine_linear.py
// validates shapes, dtypes and devices, allocates the output and passes raw device pointers, sizes,
// strides, dtype codes (csrc/pysteer.h) and torch's current stream; the checks here guard the C ABI.
//
// Layout (GEMV style; at decode the projection is bound by reading W once):
//   grid.x = ceil(N / (kWarps * R)); a block computes kWarps * R output features for all T tokens.
//   The K axis is walked in chunks of kc channels. For each chunk the block's threads load z for
//   every token, apply the token's table row (fp32 FMA, rounded to z's dtype) and store the
//   result in shared memory ([T][kc]); then each warp streams R rows of W for that chunk, each lane
//   moving 16 bytes per row per step, and accumulates NT x R fp32 partial dot products in
//   registers against the staged activations. A warp shuffle reduction per (token, row) and the
//   bias finish the output. W is read from DRAM exactly once; the staged activations (T * K
//   elements plus the table entries) are re-read by every block, from L2.
//   NT (T rounded up to a power of two) and R are compile-time so the accumulators live in
//   registers: R = 2 up to NT = 16 (at most 32 accumulators), R = 1 above. For Llama-3-8B's o_proj
//   (N = 4096) that is 256 blocks of 8 warps up to T = 16 and 512 above.
//   Not measured on a GPU from this file. Expected: T <= 16 bound by reading W; at T = 64 the
//   FMA work on CUDA cores (2 * 64 * 4096^2 FLOP) and the L2 re-reads of the activations dominate,
//   where the Triton kernel's tensor-core tiles are the better path.
// Rows outside [0, C) are outside the contract; they are treated like row 0 (no out-of-bounds read).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace py = pybind11;

namespace pysteer_affine_linear {
namespace {

// Not pysteer.h: it declares pysteer_register_affine_linear weak (for module.cu), and the
// definition below is meant to be a strong symbol.
using namespace pysteer::common;
using pysteer::kBFloat16;
using pysteer::kFloat16;
using pysteer::kFloat32;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTokens = 64;  // MAX_TOKENS in pysteer/ops/cuda_affine_linear.py
// Staged activations per block; 48 KiB is the most a block may take without an opt-in attribute.
constexpr int64_t kStageBytes = 48 * 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct Args {
  const void* z;
  int64_t z_st;  // token stride of z; unit stride in K
  const int32_t* rows;
  const void* M;
  int64_t m_sc, m_sh, m_sd;  // m_sd = 0 for a [C, H, 1] table
  const void* A;
  int64_t a_sc, a_sh, a_sd;
  const void* W;
  int64_t w_sn;      // row stride of W; unit stride in K
  const void* bias;  // null: no bias
  void* out;         // contiguous [T, N]
  int T, N, K, D, C;
  int kc;  // channels per shared-memory chunk, a multiple of VEC
};

template <typename TX, typename TT, int NT, int R, int VEC>
__global__ void __launch_bounds__(kThreads) affine_linear_gemv_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char stage_raw[];
  TX* stage = reinterpret_cast<TX*>(stage_raw);  // [T][kc] steered activations
  __shared__ int32_t rows_s[NT];

  const TX* z = static_cast<const TX*>(a.z);
  const TT* M = static_cast<const TT*>(a.M);
  const TT* A = static_cast<const TT*>(a.A);
  const TX* W = static_cast<const TX*>(a.W);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int n0 = (blockIdx.x * kWarps + (tid >> 5)) * R;

  if (tid < a.T) {
    const int32_t r = a.rows[tid];
    rows_s[tid] = r > 0 && r < a.C ? r : 0;
  }
  float acc[NT][R];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int j = 0; j < R; ++j) acc[t][j] = 0.f;
  }
  __syncthreads();

  for (int k0 = 0; k0 < a.K; k0 += a.kc) {
    const int len = a.K - k0 < a.kc ? a.K - k0 : a.kc;
    const int nvec = len / VEC;

    // Stage this chunk of steer(z) for every token. VEC divides D, so a pack stays in one head.
    for (int i = tid; i < a.T * nvec; i += kThreads) {
      const int t = i / nvec;
      const int kk = (i - t * nvec) * VEC;
      const int k = k0 + kk;
      Pack<TX, VEC> v = load_pack<TX, VEC>(z + t * a.z_st + k);
      const int64_t r = rows_s[t];
      if (r != 0) {
        const int h = k / a.D;
        const int d = k - h * a.D;
        const TT* mp = M + r * a.m_sc + h * a.m_sh + d * a.m_sd;
        const TT* ap = A + r * a.a_sc + h * a.a_sh + d * a.a_sd;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v.v[e] = from_float<TX>(fmaf(to_float(v.v[e]), to_float(mp[e * a.m_sd]), to_float(ap[e * a.a_sd])));
        }
      }
      store_pack<TX, VEC>(stage + t * a.kc + kk, v);
    }
    __syncthreads();

    // Stream R rows of W over the chunk; lane i takes packs i, i + 32, ...
#pragma unroll 2
    for (int p = lane; p < nvec; p += 32) {
      const int kk = p * VEC;
      float w[R][VEC];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (n0 + j < a.N) {
          const Pack<TX, VEC> wv = load_pack<TX, VEC>(W + (n0 + j) * a.w_sn + k0 + kk);
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[j][e] = to_float(wv.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[j][e] = 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t < a.T) {
          const Pack<TX, VEC> zv = load_pack<TX, VEC>(stage + t * a.kc + kk);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float ze = to_float(zv.v[e]);
#pragma unroll
            for (int j = 0; j < R; ++j) acc[t][j] = fmaf(ze, w[j][e], acc[t][j]);
          }
        }
      }
    }
    __syncthreads();  // the next chunk overwrites the staged activations
  }

  // Reduce each (token, row) over the warp's lanes; t < T is uniform over the warp.
  const TX* bias = static_cast<const TX*>(a.bias);
  TX* out = static_cast<TX*>(a.out);
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t < a.T) {
#pragma unroll
      for (int j = 0; j < R; ++j) {
        float s = warp_sum(acc[t][j]);
        const int n = n0 + j;
        if (lane == 0 && n < a.N) {
          if (bias != nullptr) s += to_float(bias[n]);
          out[static_cast<int64_t>(t) * a.N + n] = from_float<TX>(s);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

template <typename TX, typename TT, int NT, int VEC>
void launch(const Args& a, cudaStream_t stream) {
  constexpr int R = NT <= 16 ? 2 : 1;
  constexpr int rows_per_block = kWarps * R;
  const unsigned blocks = static_cast<unsigned>((a.N + rows_per_block - 1) / rows_per_block);
  const size_t smem = static_cast<size_t>(a.T) * a.kc * sizeof(TX);
  affine_linear_gemv_kernel<TX, TT, NT, R, VEC><<<blocks, kThreads, smem, stream>>>(a);
}

template <typename TX, typename TT, int VEC>
void launch_tokens(const Args& a, cudaStream_t stream) {
  if (a.T <= 1) return launch<TX, TT, 1, VEC>(a, stream);
  if (a.T <= 2) return launch<TX, TT, 2, VEC>(a, stream);
  if (a.T <= 4) return launch<TX, TT, 4, VEC>(a, stream);
  if (a.T <= 8) return launch<TX, TT, 8, VEC>(a, stream);
  if (a.T <= 16) return launch<TX, TT, 16, VEC>(a, stream);
  if (a.T <= 32) return launch<TX, TT, 32, VEC>(a, stream);
  return launch<TX, TT, 64, VEC>(a, stream);
}

// Tables either share z's dtype or are fp32 (the Python wrapper widens any other mix, exactly);
// this keeps the instantiations at 5 (z, table) pairs x 7 token counts x 2 widths.
template <typename TX>
void dispatch_tables(const Args& a, bool tables_f32, bool packed, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(TX);
  if (tables_f32) {
    if (packed) return launch_tokens<TX, float, kPack>(a, stream);
    return launch_tokens<TX, float, 1>(a, stream);
  }
  if (packed) return launch_tokens<TX, TX, kPack>(a, stream);
  return launch_tokens<TX, TX, 1>(a, stream);
}

void affine_linear_fwd(uintptr_t z, int64_t z_st, uintptr_t rows, uintptr_t M, int64_t m_sc, int64_t m_sh,
                       int64_t m_sd, int64_t Dm, uintptr_t A, int64_t a_sc, int64_t a_sh, int64_t a_sd, int64_t Da,
                       uintptr_t W, int64_t w_sn, uintptr_t bias, uintptr_t out, int64_t T, int64_t H, int64_t D,
                       int64_t N, int64_t C, int dtype, int table_dtype, int device, uintptr_t stream) {
  const int elem = dtype_size(dtype, "affine_linear: unknown z");
  dtype_size(table_dtype, "affine_linear: unknown table");
  if (table_dtype != dtype && table_dtype != kFloat32) {
    throw py::value_error("affine_linear: tables must have z's dtype or float32, got dtype codes " +
                          std::to_string(table_dtype) + " and " + std::to_string(dtype));
  }
  if (T < 0 || T > kMaxTokens) {
    throw py::value_error("affine_linear: T must be in [0, " + std::to_string(kMaxTokens) + "], got " +
                          std::to_string(T));
  }
  if (H < 0 || D < 0 || N < 0 || C < 1) {
    throw py::value_error("affine_linear: sizes must be H, D, N >= 0 and C >= 1, got H=" + std::to_string(H) +
                          " D=" + std::to_string(D) + " N=" + std::to_string(N) + " C=" + std::to_string(C));
  }
  if ((Dm != 1 && Dm != D) || (Da != 1 && Da != D)) {
    throw py::value_error("affine_linear: table last dims must be 1 or D=" + std::to_string(D) + ", got " +
                          std::to_string(Dm) + " and " + std::to_string(Da));
  }
  const int64_t K = H * D;
  if (K > INT32_MAX || N > INT32_MAX) {
    throw py::value_error("affine_linear: H*D and N must fit in int32, got " + std::to_string(K) + " and " +
                          std::to_string(N));
  }
  if (T == 0 || N == 0) return;

  const int vec = 16 / elem;
  const bool packed = D % vec == 0 && z_st % vec == 0 && w_sn % vec == 0 && aligned_to(z, 16) &&
                      aligned_to(W, 16);
  const int step = packed ? vec : 1;
  // Chunk width: a multiple of 32 packs (every lane busy) that fits the staging budget, never
  // less than one pack, at most K.
  int64_t kc = kStageBytes / (T * elem);
  kc = kc >= 32 * step ? kc / (32 * step) * (32 * step) : kc / step * step;
  if (kc > K) kc = K;
  if (kc < step) kc = step;

  Args a{};
  a.z = reinterpret_cast<const void*>(z);
  a.z_st = z_st;
  a.rows = reinterpret_cast<const int32_t*>(rows);
  a.M = reinterpret_cast<const void*>(M);
  a.m_sc = m_sc;
  a.m_sh = m_sh;
  a.m_sd = Dm == 1 ? 0 : m_sd;
  a.A = reinterpret_cast<const void*>(A);
  a.a_sc = a_sc;
  a.a_sh = a_sh;
  a.a_sd = Da == 1 ? 0 : a_sd;
  a.W = reinterpret_cast<const void*>(W);
  a.w_sn = w_sn;
  a.bias = reinterpret_cast<const void*>(bias);
  a.out = reinterpret_cast<void*>(out);
  a.T = static_cast<int>(T);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.D = static_cast<int>(D > 0 ? D : 1);
  a.C = static_cast<int>(C < INT32_MAX ? C : INT32_MAX);
  a.kc = static_cast<int>(kc);

  const bool tables_f32 = table_dtype == kFloat32;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const DeviceGuard guard(device, "affine_linear");
  switch (dtype) {
    case kFloat32:
      dispatch_tables<float>(a, true, packed, s);
      break;
    case kFloat16:
      dispatch_tables<__half>(a, tables_f32, packed, s);
      break;
    default:
      dispatch_tables<__nv_bfloat16>(a, tables_f32, packed, s);
      break;
  }
  check_cuda(cudaGetLastError(), "affine_linear", "kernel launch");
}

}  // namespace
}  // namespace pysteer_affine_linear

void pysteer_register_affine_linear(pybind11::module_& m) {
  m.def("affine_linear_fwd", &pysteer_affine_linear::affine_linear_fwd,
        "out[t] = W @ (z[t] * M[rows[t]] + A[rows[t]]) + bias for T <= 64 tokens (row 0: W @ z[t] + bias). "
        "Pointers are device addresses; z [T, H*D] and W [N, H*D] have unit stride in K; out is contiguous "
        "[T, N]; bias may be 0 (none); tables have z's dtype or float32.",
        py::arg("z"), py::arg("z_stride_t"), py::arg("rows"), py::arg("M"), py::arg("M_stride_c"),
        py::arg("M_stride_h"), py::arg("M_stride_d"), py::arg("Dm"), py::arg("A"), py::arg("A_stride_c"),
        py::arg("A_stride_h"), py::arg("A_stride_d"), py::arg("Da"), py::arg("W"), py::arg("W_stride_n"),
        py::arg("bias"), py::arg("out"), py::arg("T"), py::arg("H"), py::arg("D"), py::arg("N"), py::arg("C"),
        py::arg("dtype"), py::arg("table_dtype"), py::arg("device"), py::arg("stream"));
}
