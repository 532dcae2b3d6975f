// Sparse-autoencoder kernels: dense encode, top-k selection, sparse decode, feature steering.
//
// The contract is the torch reference in pysteer/ops/sae.py; pysteer/ops/cuda_sae.py validates
// shapes, dtypes and devices, allocates outputs and passes raw device pointers, sizes, strides, a
// dtype code (csrc/pysteer.h) and torch's current stream. The checks here guard the C ABI only.
//
//   encode:  tiled GEMM on CUDA cores with fp32 accumulation: a block computes BM tokens x BN
//            latents, staging (x - b_dec) (rounded to x's dtype, like torch) and W_enc tiles in
//            shared memory; bias and ReLU/JumpReLU are applied in the epilogue. W_enc may be
//            K-contiguous ([m, d] storage, pysteer.SAE) or N-contiguous (SAELens's [d, m]); the
//            tile loads follow whichever stride is 1, so both read W_enc coalesced. Token tiles
//            vary fastest in the grid so blocks sharing a W_enc tile run together and W_enc comes
//            from DRAM about once. Decode-sized batches (T <= 8) use 8-token tiles: the kernel is
//            then bound by reading W_enc. No tensor cores: at prefill sizes this path is FMA-bound
//            (the Triton backend's tl.dot uses tensor cores for fp16/bf16).
//   top-k:   one block per token over fp32 pre-activations. Each value is packed with its latent
//            id into a distinct 64-bit key (order-preserving float bits, then the complemented id,
//            so ties go to the lower id); an 8-bit radix select finds the k-th largest key, usually
//            after 4 passes (values rarely tie); the winners are gathered, bitonic-sorted in shared
//            memory and written as relu(value) and id, descending.
//   decode:  one block per (token, 256 channels): the token's k ids and values are staged in
//            shared memory and each thread sums its channel over the k decoder rows (coalesced
//            when W_dec rows are contiguous).
//   steer:   coeff: one warp per (token, feature j in S) computes df = f'_j - f_j: a dot of
//            (x - b_dec) with column j of W_enc (selective encode, ReLU/JumpReLU) or a lookup of j
//            in the token's top-k (TopK). apply: y = x + sum_j df_j W_dec[S_j] per channel, in
//            fp32, skipping zero df_j; row 0, and a zero x with nothing added, keep x's bits.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace py = pybind11;

namespace pysteer_sae {
namespace {

// Not pysteer.h: it declares pysteer_register_sae weak (for module.cu), and the definition below
// is meant to be a strong symbol.
using namespace pysteer::common;
using pysteer::kBFloat16;
using pysteer::kFloat16;
using pysteer::kFloat32;

// must match pysteer/ops/sae.py
constexpr int kActNone = 0;
constexpr int kActRelu = 1;
constexpr int kActJumpRelu = 2;
constexpr int kEditSet = 1;
constexpr int kEditAdd = 2;
constexpr int kEditScale = 3;
constexpr int kEditAblate = 4;
constexpr int kEditAddIfActive = 5;

constexpr int kMaxK = 1024;  // MAX_TOPK_K in pysteer/ops/sae.py
constexpr int kSelectThreads = 512;
constexpr int kDecodeThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int kCoeffWarps = 8;
constexpr int64_t kMaxGridY = 65535;

// (x - b_dec) as torch computes it in x's dtype: rounded once to T, then widened.
template <typename T>
__device__ __forceinline__ float encoder_input(const T* x, int64_t ix, const T* b_dec, int64_t d) {
  const float v = to_float(x[ix]);
  return b_dec == nullptr ? v : to_float(from_float<T>(v - to_float(b_dec[d])));
}

__device__ __forceinline__ float activate(float pre, float thr, int act) {
  if (act == kActRelu) return pre > 0.f ? pre : 0.f;
  if (act == kActJumpRelu) return (pre > thr && pre > 0.f) ? pre : 0.f;
  return pre;
}

// f' - f for one edit (EDIT_* in pysteer/ops/sae.py); kind 0 (none) and unknown kinds change nothing.
__device__ __forceinline__ float edit_delta(float f, int kind, float s) {
  float fp = f;
  switch (kind) {
    case kEditSet:
      fp = s;
      break;
    case kEditAdd:
      fp = f + s;
      break;
    case kEditScale:
      fp = f * s;
      break;
    case kEditAblate:
      fp = 0.f;
      break;
    case kEditAddIfActive:
      fp = f > 0.f ? f + s : f;
      break;
    default:
      break;
  }
  return fp - f;
}

// ------------------------------------------------------------------------------------------------
// dense encode
// ------------------------------------------------------------------------------------------------

// Thread (tx, ty) owns tokens ty + i * (BM / TM) and latents tx + j * (BN / TN): neighbouring
// threads read neighbouring shared-memory words and write neighbouring outputs.
template <typename T, int BM, int BN, int BK, int TM, int TN, bool OUT_F32>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    encode_kernel(const T* __restrict__ x, int64_t sxt, int64_t sxd, const T* __restrict__ b_dec,
                  const T* __restrict__ w, int64_t swd, int64_t swm, const T* __restrict__ b_enc,
                  const T* __restrict__ thr, void* __restrict__ out, int64_t n_tok, int64_t D, int64_t M,
                  int act) {
  constexpr int kThreads = (BM / TM) * (BN / TN);
  constexpr int kRowsPerStep = BM / TM;
  constexpr int kColsPerStep = BN / TN;
  // +1 column: writes that walk along k hit distinct banks
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % kColsPerStep;
  const int ty = tid / kColsPerStep;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const bool w_k_contiguous = swd == 1;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }

  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int kk = e % BK;
      const int mm = e / BK;
      const int64_t t = t0 + mm;
      const int64_t d = k0 + kk;
      As[kk][mm] = (t < n_tok && d < D) ? encoder_input(x, t * sxt + d * sxd, b_dec, d) : 0.f;
    }
    for (int e = tid; e < BK * BN; e += kThreads) {
      const int kk = w_k_contiguous ? e % BK : e / BN;
      const int nn = w_k_contiguous ? e / BK : e % BN;
      const int64_t d = k0 + kk;
      const int64_t n = n0 + nn;
      Bs[kk][nn] = (d < D && n < M) ? to_float(w[d * swd + n * swm]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM];
      float b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * kRowsPerStep];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * kColsPerStep];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t t = t0 + ty + i * kRowsPerStep;
    if (t >= n_tok) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx + j * kColsPerStep;
      if (n >= M) continue;
      const float pre = acc[i][j] + to_float(b_enc[n]);
      const float v = activate(pre, act == kActJumpRelu ? to_float(thr[n]) : 0.f, act);
      if constexpr (OUT_F32) {
        static_cast<float*>(out)[t * M + n] = v;
      } else {
        static_cast<T*>(out)[t * M + n] = from_float<T>(v);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// top-k selection
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t pack_key(float v, uint32_t id) {
  uint32_t b = __float_as_uint(v);
  if ((b << 1) == 0u) b = 0u;  // -0.0 == +0.0: one key, so the tie goes to the lower id
  const uint32_t o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // unsigned order == float order
  return (static_cast<uint64_t>(o) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - id);
}

__device__ __forceinline__ float key_value(uint64_t key) {
  const uint32_t o = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

__device__ __forceinline__ int64_t key_id(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(const float* __restrict__ pre, int64_t M, int k, T* __restrict__ values,
                       int64_t* __restrict__ indices) {
  __shared__ unsigned int hist[256];
  __shared__ uint64_t keys[kMaxK];
  __shared__ uint64_t s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_done;
  __shared__ int s_count;
  const int64_t t = blockIdx.x;
  const float* row = pre + t * M;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  if (tid == 0) {
    s_prefix = 0;
    s_remaining = k;
    s_done = 0;
    s_count = 0;
  }
  __syncthreads();

  // Radix select, most significant byte first. Invariant: the winners are every key whose fixed
  // bits (mask) exceed prefix, plus the s_remaining largest keys that match prefix.
  uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0u;
    __syncthreads();
    const uint64_t prefix = s_prefix;
    // whole warps iterate together (blockDim is a multiple of 32), so __match_any_sync sees every
    // lane: one shared atomic per distinct byte per warp instead of one per element
    for (int64_t base = 0; base < M; base += blockDim.x) {
      const int64_t i = base + tid;
      int digit = -1;
      if (i < M) {
        const uint64_t key = pack_key(row[i], static_cast<uint32_t>(i));
        if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & 0xFFu);
      }
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
      if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (tid == 0) {
      const unsigned remaining = static_cast<unsigned>(s_remaining);
      unsigned above = 0;
      int digit = 255;
      for (; digit > 0; --digit) {
        if (above + hist[digit] >= remaining) break;
        above += hist[digit];
      }
      s_remaining = static_cast<int>(remaining - above);
      s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
      s_done = hist[digit] == remaining - above;  // every key in this byte is a winner
    }
    __syncthreads();
    mask |= static_cast<uint64_t>(0xFFu) << shift;
    if (s_done) break;  // keys are distinct, so this holds by the last byte at the latest
  }

  const uint64_t prefix = s_prefix;
  for (int64_t i = tid; i < M; i += blockDim.x) {
    const uint64_t key = pack_key(row[i], static_cast<uint32_t>(i));
    if ((key & mask) >= prefix) {
      const int pos = atomicAdd(&s_count, 1);
      if (pos < k) keys[pos] = key;
    }
  }
  int kp = 1;
  while (kp < k) kp <<= 1;
  for (int i = k + tid; i < kp; i += blockDim.x) keys[i] = 0;  // sorts after every winner
  __syncthreads();

  // bitonic sort, descending
  for (int size = 2; size <= kp; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < kp; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = keys[i];
          const uint64_t b = keys[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  for (int r = tid; r < k; r += blockDim.x) {
    const uint64_t key = keys[r];
    const float v = key_value(key);
    values[t * k + r] = from_float<T>(v > 0.f ? v : 0.f);
    indices[t * k + r] = key_id(key);
  }
}

// ------------------------------------------------------------------------------------------------
// sparse decode
// ------------------------------------------------------------------------------------------------

template <typename T, typename I>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_sparse_kernel(const I* __restrict__ idx, const T* __restrict__ vals, int64_t K, const T* __restrict__ w,
                         int64_t swm, int64_t swd, const T* __restrict__ b_dec, T* __restrict__ out, int64_t D) {
  __shared__ int64_t s_idx[kDecodeThreads];
  __shared__ float s_val[kDecodeThreads];
  const int64_t t = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += blockDim.x) {
    const int64_t kk = k0 + threadIdx.x;
    if (kk < K) {
      s_idx[threadIdx.x] = static_cast<int64_t>(idx[t * K + kk]);
      s_val[threadIdx.x] = to_float(vals[t * K + kk]);
    }
    __syncthreads();
    const int n = static_cast<int>(K - k0 < blockDim.x ? K - k0 : blockDim.x);
    if (c < D) {
      for (int i = 0; i < n; ++i) acc = fmaf(s_val[i], to_float(w[s_idx[i] * swm + c * swd]), acc);
    }
    __syncthreads();
  }
  if (c < D) {
    if (b_dec != nullptr) acc += to_float(b_dec[c]);
    out[t * D + c] = from_float<T>(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// feature steering
// ------------------------------------------------------------------------------------------------

// df[t, j] = f'_j - f_j for ReLU / JumpReLU: one warp per (token, feature), reading column S_j of
// W_enc only. A token on row 0 gets df = 0 without reading anything.
template <typename T>
__global__ void __launch_bounds__(kCoeffWarps * 32)
    steer_coeff_kernel(const T* __restrict__ x, int64_t sxt, int64_t sxd, const T* __restrict__ b_dec,
                       const T* __restrict__ w, int64_t swd, int64_t swm, const T* __restrict__ b_enc,
                       const T* __restrict__ thr, const int32_t* __restrict__ rows, const int32_t* __restrict__ feats,
                       const int32_t* __restrict__ kinds, const float* __restrict__ strengths,
                       float* __restrict__ df, int64_t D, int64_t F, int act) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kCoeffWarps + threadIdx.x / 32;
  if (j >= F) return;  // whole warps
  const int64_t r = rows[t];
  float delta = 0.f;
  if (r != 0) {
    const int64_t feat = feats[j];
    float acc = 0.f;
    for (int64_t c = lane; c < D; c += 32) {
      acc = fmaf(encoder_input(x, t * sxt + c * sxd, b_dec, c), to_float(w[c * swd + feat * swm]), acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    const float f = activate(acc + to_float(b_enc[feat]), act == kActJumpRelu ? to_float(thr[feat]) : 0.f, act);
    delta = edit_delta(f, kinds[r * F + j], strengths[r * F + j]);
  }
  if (lane == 0) df[t * F + j] = delta;
}

// df for TopK: f_j is the token's top-k value for latent S_j, 0 when S_j is not among the k.
template <typename T>
__global__ void __launch_bounds__(kCoeffWarps * 32)
    steer_coeff_topk_kernel(const int64_t* __restrict__ idx, const T* __restrict__ vals, int64_t K,
                            const int32_t* __restrict__ rows, const int32_t* __restrict__ feats,
                            const int32_t* __restrict__ kinds, const float* __restrict__ strengths,
                            float* __restrict__ df, int64_t F) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kCoeffWarps + threadIdx.x / 32;
  if (j >= F) return;  // whole warps
  const int64_t r = rows[t];
  float delta = 0.f;
  if (r != 0) {
    const int64_t feat = feats[j];
    float f = 0.f;
    for (int64_t base = 0; base < K; base += 32) {
      const int64_t i = base + lane;
      const bool hit = i < K && idx[t * K + i] == feat;
      const unsigned found = __ballot_sync(0xFFFFFFFFu, hit);
      if (found != 0u) {  // same value in every lane: the warp leaves together
        f = __shfl_sync(0xFFFFFFFFu, hit ? to_float(vals[t * K + i]) : 0.f, __ffs(found) - 1);
        break;
      }
    }
    delta = edit_delta(f, kinds[r * F + j], strengths[r * F + j]);
  }
  if (lane == 0) df[t * F + j] = delta;
}

// y = x + sum_j df[t, j] * W_dec[S_j] for one token and kApplyThreads channels.
template <typename T>
__global__ void __launch_bounds__(kApplyThreads)
    steer_apply_kernel(const T* __restrict__ x, int64_t sxt, int64_t sxd, const int32_t* __restrict__ rows,
                       const float* __restrict__ df, const T* __restrict__ w, int64_t swm, int64_t swd,
                       const int32_t* __restrict__ feats, T* __restrict__ out, int64_t D, int64_t F) {
  __shared__ float s_df[kApplyThreads];
  __shared__ int64_t s_feat[kApplyThreads];
  const int64_t t = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int32_t r = rows[t];
  float acc = 0.f;
  if (r != 0) {  // the same branch for the whole block
    for (int64_t f0 = 0; f0 < F; f0 += blockDim.x) {
      const int64_t jj = f0 + threadIdx.x;
      if (jj < F) {
        s_df[threadIdx.x] = df[t * F + jj];
        s_feat[threadIdx.x] = feats[jj];
      }
      __syncthreads();
      const int n = static_cast<int>(F - f0 < blockDim.x ? F - f0 : blockDim.x);
      if (c < D) {
        for (int i = 0; i < n; ++i) {
          const float a = s_df[i];
          if (a != 0.f) acc = fmaf(a, to_float(w[s_feat[i] * swm + c * swd]), acc);
        }
      }
      __syncthreads();
    }
  }
  if (c < D) {
    const T xv = x[t * sxt + c * sxd];
    const float xf = to_float(xv);
    // row 0 keeps x's bits; so does a zero x with nothing added (x + 0.0 would turn -0.0 into +0.0)
    out[t * D + c] = (r == 0 || (acc == 0.f && xf == 0.f)) ? xv : from_float<T>(xf + acc);
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

void check_dtype(int code, const char* op) { dtype_size(code, std::string(op) + ": unknown"); }

void check_nonnegative(const char* op, std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const auto& [name, v] : sizes) {
    if (v < 0) throw py::value_error(std::string(op) + ": " + name + " must be >= 0, got " + std::to_string(v));
  }
}

void check_grid_y(const char* op, int64_t blocks, const char* what) {
  if (blocks > kMaxGridY) {
    throw py::value_error(std::string(op) + ": " + what + " needs " + std::to_string(blocks) +
                          " blocks in grid y (limit 65535)");
  }
}

template <typename T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <typename T, int BM, int BN, int BK, int TM, int TN>
void launch_encode(uintptr_t x, int64_t sxt, int64_t sxd, uintptr_t b_dec, uintptr_t w, int64_t swd, int64_t swm,
                   uintptr_t b_enc, uintptr_t thr, uintptr_t out, bool out_f32, int64_t n_tok, int64_t D, int64_t M,
                   int act, cudaStream_t stream) {
  check_grid_y("sae_encode", (M + BN - 1) / BN, "m latents");
  const dim3 grid(static_cast<unsigned>((n_tok + BM - 1) / BM), static_cast<unsigned>((M + BN - 1) / BN));
  const dim3 block((BM / TM) * (BN / TN));
  void* o = reinterpret_cast<void*>(out);
  if (out_f32) {
    encode_kernel<T, BM, BN, BK, TM, TN, true><<<grid, block, 0, stream>>>(
        ptr<T>(x), sxt, sxd, ptr<T>(b_dec), ptr<T>(w), swd, swm, ptr<T>(b_enc), ptr<T>(thr), o, n_tok, D, M, act);
  } else {
    encode_kernel<T, BM, BN, BK, TM, TN, false><<<grid, block, 0, stream>>>(
        ptr<T>(x), sxt, sxd, ptr<T>(b_dec), ptr<T>(w), swd, swm, ptr<T>(b_enc), ptr<T>(thr), o, n_tok, D, M, act);
  }
}

template <typename T>
void encode_typed(uintptr_t x, int64_t sxt, int64_t sxd, uintptr_t b_dec, uintptr_t w, int64_t swd, int64_t swm,
                  uintptr_t b_enc, uintptr_t thr, uintptr_t out, bool out_f32, int64_t n_tok, int64_t D, int64_t M,
                  int act, cudaStream_t stream) {
  if (n_tok <= 8) {  // decode: one token tile, every W_enc element read once
    launch_encode<T, 8, 128, 32, 1, 4>(x, sxt, sxd, b_dec, w, swd, swm, b_enc, thr, out, out_f32, n_tok, D, M, act,
                                       stream);
  } else {
    launch_encode<T, 64, 64, 16, 4, 4>(x, sxt, sxd, b_dec, w, swd, swm, b_enc, thr, out, out_f32, n_tok, D, M, act,
                                       stream);
  }
}

void sae_encode(uintptr_t x, int64_t sxt, int64_t sxd, uintptr_t b_dec, uintptr_t w, int64_t swd, int64_t swm,
                uintptr_t b_enc, uintptr_t thr, uintptr_t out, bool out_f32, int64_t n_tok, int64_t D, int64_t M,
                int act, int dtype, int device, uintptr_t stream) {
  const char* op = "sae_encode";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"d", D}, {"m", M}});
  if (act != kActNone && act != kActRelu && act != kActJumpRelu) {
    throw py::value_error("sae_encode: unknown activation code " + std::to_string(act));
  }
  if (act == kActJumpRelu && thr == 0) throw py::value_error("sae_encode: jumprelu needs a threshold pointer");
  if (n_tok == 0 || M == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat32) {
    encode_typed<float>(x, sxt, sxd, b_dec, w, swd, swm, b_enc, thr, out, out_f32, n_tok, D, M, act, s);
  } else if (dtype == kFloat16) {
    encode_typed<__half>(x, sxt, sxd, b_dec, w, swd, swm, b_enc, thr, out, out_f32, n_tok, D, M, act, s);
  } else {
    encode_typed<__nv_bfloat16>(x, sxt, sxd, b_dec, w, swd, swm, b_enc, thr, out, out_f32, n_tok, D, M, act, s);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

void sae_topk_select(uintptr_t pre, int64_t n_tok, int64_t M, int64_t k, uintptr_t values, uintptr_t indices, int dtype,
                     int device, uintptr_t stream) {
  const char* op = "sae_topk_select";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"m", M}});
  if (k < 1 || k > kMaxK || k > M) {
    throw py::value_error("sae_topk_select: k must be in [1, min(m, 1024)], got k=" + std::to_string(k) +
                          " with m=" + std::to_string(M));
  }
  if (M > 0xFFFFFFFFLL) throw py::value_error("sae_topk_select: m must be < 2^32");
  if (n_tok == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_tok));
  const auto* p = reinterpret_cast<const float*>(pre);
  auto* idx = reinterpret_cast<int64_t*>(indices);
  const int kk = static_cast<int>(k);
  if (dtype == kFloat32) {
    topk_select_kernel<float><<<grid, kSelectThreads, 0, s>>>(p, M, kk, reinterpret_cast<float*>(values), idx);
  } else if (dtype == kFloat16) {
    topk_select_kernel<__half><<<grid, kSelectThreads, 0, s>>>(p, M, kk, reinterpret_cast<__half*>(values), idx);
  } else {
    topk_select_kernel<__nv_bfloat16>
        <<<grid, kSelectThreads, 0, s>>>(p, M, kk, reinterpret_cast<__nv_bfloat16*>(values), idx);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

template <typename T>
void decode_typed(uintptr_t idx, bool idx64, uintptr_t vals, int64_t K, uintptr_t w, int64_t swm, int64_t swd,
                  uintptr_t b_dec, uintptr_t out, int64_t n_tok, int64_t D, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(n_tok), static_cast<unsigned>((D + kDecodeThreads - 1) / kDecodeThreads));
  auto* o = reinterpret_cast<T*>(out);
  if (idx64) {
    decode_sparse_kernel<T, int64_t><<<grid, kDecodeThreads, 0, s>>>(ptr<int64_t>(idx), ptr<T>(vals), K, ptr<T>(w),
                                                                     swm, swd, ptr<T>(b_dec), o, D);
  } else {
    decode_sparse_kernel<T, int32_t><<<grid, kDecodeThreads, 0, s>>>(ptr<int32_t>(idx), ptr<T>(vals), K, ptr<T>(w),
                                                                     swm, swd, ptr<T>(b_dec), o, D);
  }
}

void sae_decode_sparse(uintptr_t idx, bool idx64, uintptr_t vals, int64_t K, uintptr_t w, int64_t swm, int64_t swd,
                       uintptr_t b_dec, uintptr_t out, int64_t n_tok, int64_t D, int dtype, int device,
                       uintptr_t stream) {
  const char* op = "sae_decode_sparse";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"k", K}, {"d", D}});
  check_grid_y(op, (D + kDecodeThreads - 1) / kDecodeThreads, "d channels");
  if (n_tok == 0 || D == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat32) {
    decode_typed<float>(idx, idx64, vals, K, w, swm, swd, b_dec, out, n_tok, D, s);
  } else if (dtype == kFloat16) {
    decode_typed<__half>(idx, idx64, vals, K, w, swm, swd, b_dec, out, n_tok, D, s);
  } else {
    decode_typed<__nv_bfloat16>(idx, idx64, vals, K, w, swm, swd, b_dec, out, n_tok, D, s);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

void sae_steer_coeff(uintptr_t x, int64_t sxt, int64_t sxd, uintptr_t b_dec, uintptr_t w, int64_t swd, int64_t swm,
                     uintptr_t b_enc, uintptr_t thr, uintptr_t rows, uintptr_t feats, uintptr_t kinds,
                     uintptr_t strengths, uintptr_t df, int64_t n_tok, int64_t D, int64_t F, int act, int dtype,
                     int device, uintptr_t stream) {
  const char* op = "sae_steer_coeff";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"d", D}, {"F", F}});
  if (act != kActRelu && act != kActJumpRelu) {
    throw py::value_error("sae_steer_coeff: activation code must be 1 (relu) or 2 (jumprelu), got " +
                          std::to_string(act));
  }
  if (act == kActJumpRelu && thr == 0) throw py::value_error("sae_steer_coeff: jumprelu needs a threshold pointer");
  check_grid_y(op, (F + kCoeffWarps - 1) / kCoeffWarps, "F features");
  if (n_tok == 0 || F == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_tok), static_cast<unsigned>((F + kCoeffWarps - 1) / kCoeffWarps));
  const auto* r = ptr<int32_t>(rows);
  const auto* f = ptr<int32_t>(feats);
  const auto* kd = ptr<int32_t>(kinds);
  const auto* st = ptr<float>(strengths);
  auto* o = reinterpret_cast<float*>(df);
  if (dtype == kFloat32) {
    steer_coeff_kernel<float><<<grid, kCoeffWarps * 32, 0, s>>>(ptr<float>(x), sxt, sxd, ptr<float>(b_dec),
                                                                ptr<float>(w), swd, swm, ptr<float>(b_enc),
                                                                ptr<float>(thr), r, f, kd, st, o, D, F, act);
  } else if (dtype == kFloat16) {
    steer_coeff_kernel<__half><<<grid, kCoeffWarps * 32, 0, s>>>(ptr<__half>(x), sxt, sxd, ptr<__half>(b_dec),
                                                                 ptr<__half>(w), swd, swm, ptr<__half>(b_enc),
                                                                 ptr<__half>(thr), r, f, kd, st, o, D, F, act);
  } else {
    using B = __nv_bfloat16;
    steer_coeff_kernel<B><<<grid, kCoeffWarps * 32, 0, s>>>(ptr<B>(x), sxt, sxd, ptr<B>(b_dec), ptr<B>(w), swd, swm,
                                                            ptr<B>(b_enc), ptr<B>(thr), r, f, kd, st, o, D, F, act);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

void sae_steer_coeff_topk(uintptr_t idx, uintptr_t vals, int64_t K, uintptr_t rows, uintptr_t feats, uintptr_t kinds,
                          uintptr_t strengths, uintptr_t df, int64_t n_tok, int64_t F, int dtype, int device,
                          uintptr_t stream) {
  const char* op = "sae_steer_coeff_topk";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"k", K}, {"F", F}});
  check_grid_y(op, (F + kCoeffWarps - 1) / kCoeffWarps, "F features");
  if (n_tok == 0 || F == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_tok), static_cast<unsigned>((F + kCoeffWarps - 1) / kCoeffWarps));
  const auto* i = ptr<int64_t>(idx);
  const auto* r = ptr<int32_t>(rows);
  const auto* f = ptr<int32_t>(feats);
  const auto* kd = ptr<int32_t>(kinds);
  const auto* st = ptr<float>(strengths);
  auto* o = reinterpret_cast<float*>(df);
  if (dtype == kFloat32) {
    steer_coeff_topk_kernel<float><<<grid, kCoeffWarps * 32, 0, s>>>(i, ptr<float>(vals), K, r, f, kd, st, o, F);
  } else if (dtype == kFloat16) {
    steer_coeff_topk_kernel<__half><<<grid, kCoeffWarps * 32, 0, s>>>(i, ptr<__half>(vals), K, r, f, kd, st, o, F);
  } else {
    steer_coeff_topk_kernel<__nv_bfloat16>
        <<<grid, kCoeffWarps * 32, 0, s>>>(i, ptr<__nv_bfloat16>(vals), K, r, f, kd, st, o, F);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

void sae_steer_apply(uintptr_t x, int64_t sxt, int64_t sxd, uintptr_t rows, uintptr_t df, uintptr_t w, int64_t swm,
                     int64_t swd, uintptr_t feats, uintptr_t out, int64_t n_tok, int64_t D, int64_t F, int dtype,
                     int device, uintptr_t stream) {
  const char* op = "sae_steer_apply";
  check_dtype(dtype, op);
  check_nonnegative(op, {{"T", n_tok}, {"d", D}, {"F", F}});
  check_grid_y(op, (D + kApplyThreads - 1) / kApplyThreads, "d channels");
  if (n_tok == 0 || D == 0) return;
  const DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_tok), static_cast<unsigned>((D + kApplyThreads - 1) / kApplyThreads));
  const auto* r = ptr<int32_t>(rows);
  const auto* d = ptr<float>(df);
  const auto* f = ptr<int32_t>(feats);
  if (dtype == kFloat32) {
    steer_apply_kernel<float><<<grid, kApplyThreads, 0, s>>>(ptr<float>(x), sxt, sxd, r, d, ptr<float>(w), swm, swd,
                                                             f, reinterpret_cast<float*>(out), D, F);
  } else if (dtype == kFloat16) {
    steer_apply_kernel<__half><<<grid, kApplyThreads, 0, s>>>(ptr<__half>(x), sxt, sxd, r, d, ptr<__half>(w), swm,
                                                              swd, f, reinterpret_cast<__half*>(out), D, F);
  } else {
    using B = __nv_bfloat16;
    steer_apply_kernel<B><<<grid, kApplyThreads, 0, s>>>(ptr<B>(x), sxt, sxd, r, d, ptr<B>(w), swm, swd, f,
                                                         reinterpret_cast<B*>(out), D, F);
  }
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

}  // namespace
}  // namespace pysteer_sae

// Registered by PYBIND11_MODULE in module.cu (declared weak in pysteer.h, defined here).
void pysteer_register_sae(pybind11::module_& m) {
  using namespace pysteer_sae;
  m.def("sae_encode", &sae_encode,
        "out[t, n] = act((x - b_dec)[t] . W_enc[:, n] + b_enc[n]) into a contiguous [T, m] buffer of x's dtype, "
        "or fp32 when out_f32. act: 0 none, 1 relu, 2 jumprelu. b_dec / threshold pointers may be 0.",
        py::arg("x"), py::arg("x_stride_t"), py::arg("x_stride_d"), py::arg("b_dec"), py::arg("W_enc"),
        py::arg("W_stride_d"), py::arg("W_stride_m"), py::arg("b_enc"), py::arg("threshold"), py::arg("out"),
        py::arg("out_f32"), py::arg("T"), py::arg("d"), py::arg("m"), py::arg("act"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("sae_topk_select", &sae_topk_select,
        "Top-k of each row of a contiguous fp32 [T, m] buffer: values (relu, x's dtype) and int64 ids into "
        "contiguous [T, k] buffers, descending, ties to the lower id. k <= 1024.",
        py::arg("pre"), py::arg("T"), py::arg("m"), py::arg("k"), py::arg("values"), py::arg("indices"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sae_decode_sparse", &sae_decode_sparse,
        "out[t] = sum_i values[t, i] * W_dec[indices[t, i]] (+ b_dec); indices (int64 if idx64 else int32) and "
        "values contiguous [T, k]; out contiguous [T, d].",
        py::arg("indices"), py::arg("idx64"), py::arg("values"), py::arg("k"), py::arg("W_dec"),
        py::arg("W_stride_m"), py::arg("W_stride_d"), py::arg("b_dec"), py::arg("out"), py::arg("T"), py::arg("d"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sae_steer_coeff", &sae_steer_coeff,
        "df[t, j] = f'_j - f_j (fp32, contiguous [T, F]) for ReLU/JumpReLU, encoding only the features S; "
        "rows [T], features [F], kinds [C, F] int32 and strengths [C, F] fp32, contiguous.",
        py::arg("x"), py::arg("x_stride_t"), py::arg("x_stride_d"), py::arg("b_dec"), py::arg("W_enc"),
        py::arg("W_stride_d"), py::arg("W_stride_m"), py::arg("b_enc"), py::arg("threshold"), py::arg("rows"),
        py::arg("features"), py::arg("kinds"), py::arg("strengths"), py::arg("df"), py::arg("T"), py::arg("d"),
        py::arg("F"), py::arg("act"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sae_steer_coeff_topk", &sae_steer_coeff_topk,
        "df[t, j] = f'_j - f_j for TopK from the token's top-k (int64 ids, values of x's dtype, contiguous [T, k]).",
        py::arg("indices"), py::arg("values"), py::arg("k"), py::arg("rows"), py::arg("features"), py::arg("kinds"),
        py::arg("strengths"), py::arg("df"), py::arg("T"), py::arg("F"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("sae_steer_apply", &sae_steer_apply,
        "out[t] = x[t] + sum_j df[t, j] W_dec[S_j] in fp32 (row 0: out = x bit-exactly); out contiguous [T, d].",
        py::arg("x"), py::arg("x_stride_t"), py::arg("x_stride_d"), py::arg("rows"), py::arg("df"), py::arg("W_dec"),
        py::arg("W_stride_m"), py::arg("W_stride_d"), py::arg("features"), py::arg("out"), py::arg("T"), py::arg("d"),
        py::arg("F"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
}
