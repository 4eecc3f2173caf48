// Weight-streaming GEMV for the decode step (B = 1..8 rows, one token per stream):
//   out[b, n] = residual[b, n] + scale_b * sum_k W[n, k] x'[b, k].
//   x' = x, or silu(gate[k]) * up[k] when the input is a fused gate/up row (the MLP's activation fused in);
//   scale_b = 1, or 1 / rms(x_b) when `rms_eps` >= 0: the layer's RMSNorm fused in, its weight folded into W's
//   columns once at load time (FastLlama.fold_norm_weights), so the norm costs no pass and no barrier.
// Every warp streams its weight rows once with 16-byte loads, the next slice in flight while it sums this one,
// and applies them to all B input rows; it reads x through L1 (a few KB to a few hundred KB against MBs of
// weights); no shared memory, no block barrier, no prologue, so the weight stream starts at once. fp32
// accumulation.
//
// Batch invariance: row b's result is bit-identical whatever B is. Each (input row, weight row) pair has its
// own accumulator, summed in the same order as the one-row kernel (per lane over k in steps of one 256-element
// slice, then warp_sum); the norm's sum of squares likewise; the epilogue is the same expression. The kernel
// is templated on the row count NB, and NB = 1 is the one-row kernel as it was (same loop, same epilogue).
// With silu_mul and B > 1, silu(gate) * up is computed first, rounded to T exactly as the fused one-row path
// rounds it, by a small kernel into a [B, K] buffer that the GEMV then reads as x: recomputing the activation
// in every warp for every row would make the GEMV compute-bound (two MUFU ops per element and row).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda_utils.cuh"
#include "gemv_common.cuh"
#include "ops.h"

namespace hjcg {
namespace {

// Measured on the H100 over the Llama-2-7B decode chain (lab sweep of warps x rows x loads, 2026-11-22):
// 2 rows per warp, 2 slices deep, double-buffered, streams 2.70 TB/s over all four shapes; 1 or 4 rows per
// warp, 8 loads per lane without double buffering, 2.2-2.6 TB/s. Programmatic dependent launch gained nothing.
constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerWarp = 2;
constexpr int kUnroll = 2;
constexpr int kChunk = 32 * 8;  // elements one warp covers with one 16-byte load per lane
constexpr int kMaxInputRows = 8;

// Weight rows per warp for an NB-row call. Per 16-byte weight load a lane does 8 * NB FMAs whatever the rows
// per warp, but the per-input-row work (x loads and conversions, the norm's sum of squares) is shared by the
// warp's weight rows. A 3 TB/s stream leaves an SM about 300 issue slots per 1 KB slice of weights (at
// 1.75 GHz); counted in the PTX of the loop, 2 rows per warp spend about 35% of them at NB = 2, 57% at 4,
// 80% at 6 and 100% at 8 (with the norm), 4 rows per warp 61% at 6 and 78% at 8. So from 5 input rows on a
// warp takes 4 weight rows, with at least 3 blocks per SM (12 warps, 48 KB of weights in flight) where the
// registers allow. Estimates, not yet measured: bench/lab/gemv_rows.py times the chain.
constexpr int kWideRowsPerWarp = 4;
constexpr int kWideMinBlocksPerSm = 3;
constexpr int rows_per_warp(int nb) { return nb <= 4 ? kRowsPerWarp : kWideRowsPerWarp; }

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
};

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  using P = Pair<T>;
  const auto* p = reinterpret_cast<const typename P::type*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = P::to_float2(p[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The eight input values at k: x[k..k+8), or silu(gate) * up rounded to T as transformers rounds it.
template <typename T, bool kSiluMul>
__device__ __forceinline__ void load_input(const T* __restrict__ x, int64_t k, int64_t k_dim, float* out) {
  if constexpr (kSiluMul) {
    float g[8], u[8];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + k)), g);
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + k_dim + k)), u);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = gemv::silu_mul_rounded<T>(g[i], u[i]);
  } else {
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + k)), out);
  }
}

// One warp's rows: NB input rows x [NB, K] (or [NB, 2K], gate then up, with kSiluMul); out and residual
// [NB, N]. kRows weight rows per warp. kNorm: the sum of squares is accumulated (the one-row kernel always
// does; rms_eps < 0 then ignores it). Row n of out reads residual row n first, so residual may be out.
template <typename T, bool kSiluMul, int NB, int kRows, bool kNorm>
__device__ __forceinline__ void gemv_warp(const T* __restrict__ x, const T* __restrict__ weight, int64_t k_dim,
                                          int64_t n_dim, float rms_eps, const T* residual, T* out) {
  static_assert(NB >= 1 && NB * kRows <= 32, "one lane per output in the epilogue");
  static_assert(NB == 1 || !kSiluMul, "several rows read a precomputed activation");
  static_assert(NB > 1 || kNorm, "the one-row kernel always accumulates the sum of squares");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * kRows;
  if (row0 >= n_dim) return;
  const T* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = weight + min(row0 + r, n_dim - 1) * k_dim;
  uint4 next[kUnroll][kRows];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kChunk;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        next[u][r] = k < k_dim ? __ldcs(reinterpret_cast<const uint4*>(rows[r] + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  float acc[NB][kRows] = {};
  float sum_sq[NB] = {};
  const int64_t x_stride = kSiluMul ? 2 * k_dim : k_dim;
  constexpr int64_t kStep = kChunk * kUnroll;
  load(lane * 8);
  for (int64_t k0 = lane * 8; k0 < k_dim; k0 += kStep) {
    uint4 w[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r) w[u][r] = next[u][r];
    if (k0 + kStep < k_dim) load(k0 + kStep);  // the next slice is in flight while this one is summed
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kChunk;
      if (k >= k_dim) break;
      if constexpr (NB == 1) {  // the one-row kernel's body
        float xv[8];
        load_input<T, kSiluMul>(x, k, k_dim, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum_sq[0] = fmaf(xv[i], xv[i], sum_sq[0]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wv[8];
          unpack8<T>(w[u][r], wv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[0][r] = fmaf(wv[i], xv[i], acc[0][r]);
        }
      } else {  // the weights converted once, then each input row; every sum in the one-row order
        float wv[kRows][8];
#pragma unroll
        for (int r = 0; r < kRows; ++r) unpack8<T>(w[u][r], wv[r]);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          float xv[8];
          load_input<T, kSiluMul>(x + b * x_stride, k, k_dim, xv);
          if constexpr (kNorm) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sum_sq[b] = fmaf(xv[i], xv[i], sum_sq[b]);
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[b][r] = fmaf(wv[r][i], xv[i], acc[b][r]);
        }
      }
    }
  }
  if constexpr (NB == 1) {  // the one-row kernel's epilogue: lane 0 writes the warp's rows
    float scale = 1.f;
    if (kNorm && rms_eps >= 0.f) scale = rsqrtf(warp_sum(sum_sq[0]) / static_cast<float>(k_dim) + rms_eps);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float dot = warp_sum(acc[0][r]);
      const int64_t row = row0 + r;
      if (lane == 0 && row < n_dim) {
        const float base = residual != nullptr ? to_float(residual[row]) : 0.f;
        out[row] = from_float<T>(base + scale * dot);
      }
    }
  } else {
    // The same sums and expression, one output per lane (lane = b * kRows + r), so the residual reads of the
    // NB * kRows outputs are in flight together rather than one after another (residual may alias out).
    float my_scale = 1.f, my_dot = 0.f;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float scale = 1.f;
      if (kNorm && rms_eps >= 0.f) scale = rsqrtf(warp_sum(sum_sq[b]) / static_cast<float>(k_dim) + rms_eps);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float dot = warp_sum(acc[b][r]);
        if (lane == b * kRows + r) {
          my_scale = scale;
          my_dot = dot;
        }
      }
    }
    const int b = lane / kRows;
    const int64_t row = row0 + lane % kRows;
    if (b < NB && row < n_dim) {
      const int64_t i = b * n_dim + row;
      const float base = residual != nullptr ? to_float(residual[i]) : 0.f;
      out[i] = from_float<T>(base + my_scale * my_dot);
    }
  }
}

// The entry points differ only in their launch bounds. gemv_kernel's are the one-row kernel's (ptxas schedules
// even a no-op minimum of blocks per SM differently); the wide kernel (4 weight rows per warp) asks for
// kWideMinBlocksPerSm blocks per SM, which caps its registers (NB = 8 with the norm: 174 -> 168).
template <typename T, bool kSiluMul, int NB, int kRows, bool kNorm>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, int64_t k_dim, int64_t n_dim, float rms_eps,
    const T* residual, T* out) {
  gemv_warp<T, kSiluMul, NB, kRows, kNorm>(x, weight, k_dim, n_dim, rms_eps, residual, out);
}

template <typename T, int NB, bool kNorm>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kWideMinBlocksPerSm) gemv_wide_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, int64_t k_dim, int64_t n_dim, float rms_eps,
    const T* residual, T* out) {
  gemv_warp<T, false, NB, kWideRowsPerWarp, kNorm>(x, weight, k_dim, n_dim, rms_eps, residual, out);
}

struct GemvArgs {
  const void* x;
  const void* weight;
  int64_t k_dim, n_dim;
  float rms_eps;
  const void* residual;
  void* out;
};

template <typename T, bool kSiluMul, int NB, int kRows, bool kNorm>
void launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  constexpr int64_t rows_per_block = kWarpsPerBlock * kRows;
  const int64_t blocks = (a.n_dim + rows_per_block - 1) / rows_per_block;
  HJCG_CHECK_FMT(blocks <= std::numeric_limits<int>::max(), "gemv: weight has too many rows (%lld)",
                 static_cast<long long>(a.n_dim));
  const auto run = [&](auto kernel) {
    kernel<<<static_cast<int>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.weight), a.k_dim, a.n_dim, a.rms_eps,
        static_cast<const T*>(a.residual), static_cast<T*>(a.out));
  };
  if constexpr (kRows == kWideRowsPerWarp) run(gemv_wide_kernel<T, NB, kNorm>);
  else run(gemv_kernel<T, kSiluMul, NB, kRows, kNorm>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NB>
void launch_rows(const GemvArgs& a, cudaStream_t stream) {
  constexpr int kRows = rows_per_warp(NB);
  if (a.rms_eps >= 0.f) launch_gemv<T, false, NB, kRows, true>(a, stream);
  else launch_gemv<T, false, NB, kRows, false>(a, stream);  // no sum of squares to accumulate
}

// x is [rows, K] (silu_mul: already the activation when rows > 1).
template <typename T>
void dispatch(const GemvArgs& a, int64_t rows, bool silu_mul, cudaStream_t stream) {
  switch (rows) {
    case 1:  // the one-row kernel, as measured: sum of squares always on, rms_eps < 0 ignores it
      if (silu_mul) launch_gemv<T, true, 1, kRowsPerWarp, true>(a, stream);
      else launch_gemv<T, false, 1, kRowsPerWarp, true>(a, stream);
      return;
    case 2: return launch_rows<T, 2>(a, stream);
    case 3: return launch_rows<T, 3>(a, stream);
    case 4: return launch_rows<T, 4>(a, stream);
    case 5: return launch_rows<T, 5>(a, stream);
    case 6: return launch_rows<T, 6>(a, stream);
    case 7: return launch_rows<T, 7>(a, stream);
    case 8: return launch_rows<T, 8>(a, stream);
    default:
      HJCG_CHECK_FMT(false, "gemv: x must have 1 to %d rows, got %lld", static_cast<int>(kMaxInputRows),
                     static_cast<long long>(rows));
  }
}

}  // namespace

bool gemv_supported(const torch::Tensor& x, const torch::Tensor& weight) {
  return weight.dim() == 2 && weight.size(0) > 0 && gemv::input_supported(x, weight.size(1), kMaxInputRows) &&
         weight.scalar_type() == x.scalar_type() && weight.device() == x.device() && weight.is_contiguous() &&
         weight.size(1) % 8 == 0 && gemv::aligned16(weight);  // 16-byte loads
}

void gemv_cuda(const torch::Tensor& x, const torch::Tensor& weight, double rms_eps, bool silu_mul,
               const c10::optional<torch::Tensor>& residual, const torch::Tensor& out) {
  HJCG_CHECK_FMT(gemv_supported(x, weight),
                 "gemv: x must be a contiguous fp16/bf16 [B, K] (or [B, 2K] with silu_mul) with 1 <= B <= %d and "
                 "weight a contiguous [N, K] of the same dtype and device, K %% 8 == 0, both 16-byte aligned; got x %s, "
                 "weight %s", static_cast<int>(kMaxInputRows), hjcg::tensor_text(x).c_str(),
                 hjcg::tensor_text(weight).c_str());
  const int64_t rows = x.size(0), k_dim = weight.size(1), n_dim = weight.size(0);
  HJCG_CHECK_FMT(x.size(1) == (silu_mul ? 2 * k_dim : k_dim), "gemv: x must be [B, %lld] (%s), got %s",
                 static_cast<long long>(silu_mul ? 2 * k_dim : k_dim),
                 silu_mul ? "[gate, up] with silu_mul" : "K, as weight's columns", hjcg::tensor_text(x).c_str());
  TORCH_CHECK(!(silu_mul && rms_eps >= 0), "gemv: the norm and silu_mul do not combine");
  HJCG_CHECK_FMT(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                     out.numel() == rows * n_dim,
                 "gemv: out must be a contiguous [B, N] = [%lld, %lld] of x's dtype on x's device, got %s",
                 static_cast<long long>(rows), static_cast<long long>(n_dim), hjcg::tensor_text(out).c_str());
  TORCH_CHECK(!gemv::overlaps(out, x) && !gemv::overlaps(out, weight), "gemv: out must not overlap x or weight");
  if (residual) {
    HJCG_CHECK_FMT(residual->device() == x.device() && residual->scalar_type() == x.scalar_type() &&
                       residual->is_contiguous() && residual->numel() == rows * n_dim,
                   "gemv: residual must be a contiguous [B, N] = [%lld, %lld] of x's dtype on x's device, got %s",
                   static_cast<long long>(rows), static_cast<long long>(n_dim), hjcg::tensor_text(*residual).c_str());
    TORCH_CHECK(residual->data_ptr() == out.data_ptr() || !gemv::overlaps(*residual, out),
                "gemv: residual must be out itself (in place) or not overlap it");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = x.scalar_type() == torch::kFloat16;
  GemvArgs args{x.data_ptr(), weight.data_ptr(), k_dim, n_dim, static_cast<float>(rms_eps),
                residual ? residual->data_ptr() : nullptr, out.data_ptr()};
  torch::Tensor act;  // with silu_mul and several rows: the activation, computed once for all warps
  if (silu_mul && rows > 1) {
    act = gemv::silu_mul_rows(x, k_dim, stream);
    args.x = act.data_ptr();
    silu_mul = false;
  }
  if (half) dispatch<__half>(args, rows, silu_mul, stream);
  else dispatch<__nv_bfloat16>(args, rows, silu_mul, stream);
}

}  // namespace hjcg
