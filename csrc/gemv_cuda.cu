// Weight-streaming GEMV for the decode step (one token): out[n] = residual[n] + scale * sum_k W[n, k] x'[k].
//   x' = x, or silu(gate[k]) * up[k] when the input is a fused gate/up row (the MLP's activation fused in);
//   scale = 1, or 1 / rms(x) when `rms_eps` >= 0: the layer's RMSNorm fused in, its weight folded into W's
//   columns once at load time (FastLlama.fold_norm_weights), so the norm costs no pass and no barrier.
// Every warp streams two rows with 16-byte loads, the next slice in flight while it sums this one; reads x
// through L1 (a few KB against MBs of weights); no shared memory, no block barrier, no prologue, so the
// weight stream starts at once. fp32 accumulation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_utils.cuh"
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
    for (int i = 0; i < 8; ++i) {
      const float silu = to_float(from_float<T>(g[i] / (1.f + __expf(-g[i]))));
      out[i] = to_float(from_float<T>(silu * u[i]));
    }
  } else {
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + k)), out);
  }
}

template <typename T, bool kSiluMul>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, int64_t k_dim, int64_t n_dim, float rms_eps,
    const T* residual, T* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * kRowsPerWarp;
  if (row0 >= n_dim) return;
  const T* rows[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) rows[r] = weight + min(row0 + r, n_dim - 1) * k_dim;
  uint4 next[kUnroll][kRowsPerWarp];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kChunk;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        next[u][r] = k < k_dim ? __ldcs(reinterpret_cast<const uint4*>(rows[r] + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  float acc[kRowsPerWarp] = {};
  float sum_sq = 0.f;
  constexpr int64_t kStep = kChunk * kUnroll;
  load(lane * 8);
  for (int64_t k0 = lane * 8; k0 < k_dim; k0 += kStep) {
    uint4 w[kUnroll][kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) w[u][r] = next[u][r];
    if (k0 + kStep < k_dim) load(k0 + kStep);  // the next slice is in flight while this one is summed
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kChunk;
      if (k >= k_dim) break;
      float xv[8];
      load_input<T, kSiluMul>(x, k, k_dim, xv);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum_sq = fmaf(xv[i], xv[i], sum_sq);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float wv[8];
        unpack8<T>(w[u][r], wv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r] = fmaf(wv[i], xv[i], acc[r]);
      }
    }
  }
  float scale = 1.f;
  if (rms_eps >= 0.f) scale = rsqrtf(warp_sum(sum_sq) / static_cast<float>(k_dim) + rms_eps);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float dot = warp_sum(acc[r]);
    const int64_t row = row0 + r;
    if (lane == 0 && row < n_dim) {
      const float base = residual != nullptr ? to_float(residual[row]) : 0.f;
      out[row] = from_float<T>(base + scale * dot);
    }
  }
}

}  // namespace

bool gemv_supported(const torch::Tensor& x, const torch::Tensor& weight) {
  const auto t = x.scalar_type();
  return x.is_cuda() && (t == torch::kFloat16 || t == torch::kBFloat16) && x.dim() == 2 && x.size(0) == 1 &&
         weight.dim() == 2 && x.size(1) % weight.size(1) == 0 && weight.size(1) % 8 == 0 &&
         weight.scalar_type() == t && weight.is_contiguous() && x.is_contiguous();
}

void gemv_cuda(const torch::Tensor& x, const torch::Tensor& weight, double rms_eps, bool silu_mul,
               const c10::optional<torch::Tensor>& residual, const torch::Tensor& out) {
  TORCH_CHECK(gemv_supported(x, weight), "gemv: x must be one contiguous fp16/bf16 row and weight a contiguous "
              "[N, K] of the same dtype with K % 8 == 0");
  const int64_t k_dim = weight.size(1), n_dim = weight.size(0);
  TORCH_CHECK(x.size(1) == (silu_mul ? 2 * k_dim : k_dim), "gemv: x must be [1, K] (or [1, 2K] with silu_mul)");
  TORCH_CHECK(!(silu_mul && rms_eps >= 0), "gemv: the norm and silu_mul do not combine");
  TORCH_CHECK(out.is_contiguous() && out.numel() == n_dim && out.scalar_type() == x.scalar_type(), "gemv: out [1, N]");
  if (residual) TORCH_CHECK(residual->numel() == n_dim && residual->is_contiguous() &&
                                residual->scalar_type() == x.scalar_type(), "gemv: residual [1, N] of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  constexpr int64_t rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  const int blocks = static_cast<int>((n_dim + rows_per_block - 1) / rows_per_block);
  auto launch = [&](auto tag, auto silu) {
    using T = decltype(tag);
    gemv_kernel<T, decltype(silu)::value><<<blocks, kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(weight.data_ptr()), k_dim, n_dim,
        static_cast<float>(rms_eps), residual ? reinterpret_cast<const T*>(residual->data_ptr()) : nullptr,
        reinterpret_cast<T*>(out.data_ptr()));
  };
  const bool half = x.scalar_type() == torch::kFloat16;
  if (half && silu_mul) launch(__half{}, std::true_type{});
  else if (half) launch(__half{}, std::false_type{});
  else if (silu_mul) launch(__nv_bfloat16{}, std::true_type{});
  else launch(__nv_bfloat16{}, std::false_type{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
