// Helpers of the weight-streaming GEMVs (gemv_cuda.cu, gemv_fp8_cuda.cu): the activation's rounding and its
// several-row kernel, pairs of 16-bit values, and the host-side checks on their tensors.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda_utils.cuh"

namespace hjcg::gemv {

// silu(g) * u rounded to T as transformers computes it in the model's dtype: silu(g) rounded to T first, then
// the product. Every path that feeds an MLP activation to a GEMV computes it through this one expression, so
// a fused one-row call and a precomputed several-row activation give the same bits.
template <typename T>
__device__ __forceinline__ float silu_mul_rounded(float g, float u) {
  const float silu = to_float(from_float<T>(g / (1.f + __expf(-g))));
  return to_float(from_float<T>(silu * u));
}

template <typename To, typename From>
__host__ __device__ __forceinline__ To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// Two values of T in one 32-bit word, the lower-indexed in the low half (as memory holds them), as floats.
template <typename T>
__device__ __forceinline__ float2 word_to_float2(uint32_t w) {
  return make_float2(to_float(bit_cast<T>(static_cast<uint16_t>(w & 0xffffu))),
                     to_float(bit_cast<T>(static_cast<uint16_t>(w >> 16))));
}

template <typename T>
__device__ __forceinline__ uint32_t float2_to_word(float lo, float hi) {
  return bit_cast<uint16_t>(from_float<T>(lo)) | static_cast<uint32_t>(bit_cast<uint16_t>(from_float<T>(hi))) << 16;
}

inline bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether two contiguous tensors' bytes overlap.
inline bool overlaps(const torch::Tensor& a, const torch::Tensor& b) {
  const auto* pa = static_cast<const char*>(a.data_ptr());
  const auto* pb = static_cast<const char*>(b.data_ptr());
  return a.numel() > 0 && b.numel() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// A GEMV's input as every weight-streaming GEMV reads it: a contiguous, 16-byte aligned fp16/bf16 CUDA [B, K], or
// [B, 2K] (a gate/up pair for silu_mul), 1 <= B <= max_rows, against a weight of K > 0 columns.
inline bool input_supported(const torch::Tensor& x, int64_t k_dim, int64_t max_rows) {
  const auto t = x.scalar_type();
  return x.is_cuda() && (t == torch::kFloat16 || t == torch::kBFloat16) && x.dim() == 2 && x.size(0) >= 1 &&
         x.size(0) <= max_rows && x.is_contiguous() && k_dim > 0 && (x.size(1) == k_dim || x.size(1) == 2 * k_dim) &&
         aligned16(x);
}

// A GEMV's out or residual: a contiguous [rows, n] of x's dtype on x's device. (A literal message: see
// gemv_fp8_cuda.)
inline void check_rows_tensor(const torch::Tensor& t, const torch::Tensor& x, int64_t rows, int64_t n) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous() &&
                  t.numel() == rows * n,
              "gemv: out and residual must be contiguous [B, N] tensors of x's dtype on x's device");
}

// act [B, K] = silu(gate) * up of gate_up [B, 2K] through silu_mul_rounded, for a GEMV of B > 1 rows to read as
// its input: computed once rather than in every block. One thread per 8 values.
template <typename T>
__global__ void silu_mul_rows_kernel(const T* __restrict__ gate_up, int64_t k_dim, int64_t vectors,
                                     T* __restrict__ act) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  const int64_t per_row = k_dim / 8, b = v / per_row, k = (v - b * per_row) * 8;
  const T* gate = gate_up + b * 2 * k_dim + k;
  const uint4 gv = __ldg(reinterpret_cast<const uint4*>(gate));
  const uint4 uv = __ldg(reinterpret_cast<const uint4*>(gate + k_dim));
  const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 g = word_to_float2<T>(gw[i]), u = word_to_float2<T>(uw[i]);
    out[i] = float2_to_word<T>(silu_mul_rounded<T>(g.x, u.x), silu_mul_rounded<T>(g.y, u.y));
  }
  *reinterpret_cast<uint4*>(act + b * k_dim + k) = make_uint4(out[0], out[1], out[2], out[3]);
}

// silu_mul_rows_kernel on `stream` into a new [B, K] tensor.
inline torch::Tensor silu_mul_rows(const torch::Tensor& gate_up, int64_t k_dim, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const torch::Tensor act = torch::empty({gate_up.size(0), k_dim}, gate_up.options());
  const int64_t vectors = gate_up.size(0) * (k_dim / 8);
  const int64_t blocks = (vectors + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gemv: x is too large for the activation kernel");
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(gate_up.data_ptr()), k_dim, vectors, reinterpret_cast<T*>(act.data_ptr()));
  };
  if (gate_up.scalar_type() == torch::kFloat16) launch(__half{});
  else launch(__nv_bfloat16{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return act;
}

}  // namespace hjcg::gemv
