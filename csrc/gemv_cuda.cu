// Weight-streaming GEMV for the decode step (one token): out[n] = residual[n] + sum_k W[n, k] * x'[k],
// where x' = x, or rms_norm(x) * norm_weight when a norm weight is given (the layer's RMSNorm fused in:
// each block normalises x in shared memory, which costs a few KB of L2 reads against MBs of weights).
// A warp owns ROWS rows and streams them with 16-byte loads, several in flight; fp32 accumulation.
// One launch replaces cuBLAS's GEMV, its split-K reduction, the norm kernel and the residual add.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_utils.cuh"
#include "ops.h"

namespace hjcg {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kRowsPerWarp = 2;

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
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x) {
  using P = Pair<T>;
  const auto* wp = reinterpret_cast<const typename P::type*>(&w);
  const auto* xp = reinterpret_cast<const typename P::type*>(&x);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = P::to_float2(wp[i]), b = P::to_float2(xp[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, int64_t k_dim, int64_t n_dim,
    const T* __restrict__ norm_weight, float eps, const T* residual, T* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  __shared__ float red[32];
  const int tid = threadIdx.x;
  for (int64_t i = tid * 8; i < k_dim; i += blockDim.x * 8)
    *reinterpret_cast<uint4*>(xs + i) = *reinterpret_cast<const uint4*>(x + i);
  __syncthreads();
  if (norm_weight != nullptr) {
    float ss = 0.f;
    for (int64_t i = tid; i < k_dim; i += blockDim.x) {
      const float v = to_float(xs[i]);
      ss += v * v;
    }
    const float inv_rms = rsqrtf(block_sum(ss, red) / static_cast<float>(k_dim) + eps);
    for (int64_t i = tid; i < k_dim; i += blockDim.x) {
      // rounded to the model dtype before the weight, as transformers does
      const float normed = to_float(from_float<T>(to_float(xs[i]) * inv_rms));
      xs[i] = from_float<T>(to_float(norm_weight[i]) * normed);
    }
    __syncthreads();
  }
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * kRowsPerWarp;
  if (row0 >= n_dim) return;
  float acc[kRowsPerWarp] = {};
  const T* rows[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) rows[r] = weight + min(row0 + r, n_dim - 1) * k_dim;
#pragma unroll 4
  for (int64_t k = lane * 8; k < k_dim; k += 32 * 8) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xs + k);
    uint4 wv[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) wv[r] = __ldcs(reinterpret_cast<const uint4*>(rows[r] + k));
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[r] += dot8<T>(wv[r], xv);
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float sum = warp_sum(acc[r]);
    const int64_t row = row0 + r;
    if (lane == 0 && row < n_dim) {
      const float base = residual != nullptr ? to_float(residual[row]) : 0.f;
      out[row] = from_float<T>(base + sum);
    }
  }
}

}  // namespace

bool gemv_supported(const torch::Tensor& x, const torch::Tensor& weight) {
  const auto t = x.scalar_type();
  return x.is_cuda() && (t == torch::kFloat16 || t == torch::kBFloat16) && x.dim() == 2 && x.size(0) == 1 &&
         weight.dim() == 2 && weight.size(1) == x.size(1) && x.size(1) % 8 == 0 && x.size(1) <= 16384 &&
         weight.scalar_type() == t && weight.is_contiguous() && x.is_contiguous();
}

void gemv_cuda(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& norm_weight,
               double eps, const c10::optional<torch::Tensor>& residual, const torch::Tensor& out) {
  TORCH_CHECK(gemv_supported(x, weight), "gemv: x must be one contiguous fp16/bf16 row [1, K] (K % 8 == 0, "
              "K <= 16384) and weight a contiguous [N, K] of the same dtype");
  const int64_t k_dim = x.size(1), n_dim = weight.size(0);
  TORCH_CHECK(out.is_contiguous() && out.numel() == n_dim && out.scalar_type() == x.scalar_type(), "gemv: out [1, N]");
  if (norm_weight) TORCH_CHECK(norm_weight->numel() == k_dim && norm_weight->scalar_type() == x.scalar_type(),
                               "gemv: norm_weight [K] of x's dtype");
  if (residual) TORCH_CHECK(residual->numel() == n_dim && residual->is_contiguous() &&
                                residual->scalar_type() == x.scalar_type(), "gemv: residual [1, N] of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  const int blocks = static_cast<int>((n_dim + rows_per_block - 1) / rows_per_block);
  const size_t shared = k_dim * x.element_size();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = gemv_kernel<T>;
    if (shared > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    kernel<<<blocks, kWarpsPerBlock * 32, shared, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(weight.data_ptr()), k_dim, n_dim,
        norm_weight ? reinterpret_cast<const T*>(norm_weight->data_ptr()) : nullptr, static_cast<float>(eps),
        residual ? reinterpret_cast<const T*>(residual->data_ptr()) : nullptr, reinterpret_cast<T*>(out.data_ptr()));
  };
  if (x.scalar_type() == torch::kFloat16) launch(__half{});
  else launch(__nv_bfloat16{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
