// Fused elementwise stages of a Llama layer, each one launch where plain torch takes several:
//   rms_norm:   y = w * (x / rms(x))            (float32 statistics, as transformers computes them)
//   rope_cache: RoPE on q and k from the fused QKV output, k and v stored into the KV cache at the
//               step's positions (read from device memory), q written out for attention
//   silu_mul:   y = silu(gate) * up               over the fused gate/up output
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_utils.cuh"
#include "ops.h"

namespace hjcg {
namespace {

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, float eps, int64_t hidden,
                                T* __restrict__ y) {
  __shared__ float shared[32];
  const T* row = x + blockIdx.x * hidden;
  T* out = y + blockIdx.x * hidden;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(row[i]);
    sum += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum, shared) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    // round the normalised value to the model dtype before the weight, as transformers does
    const float normed = to_float(from_float<T>(to_float(row[i]) * inv_rms));
    out[i] = from_float<T>(to_float(w[i]) * normed);
  }
}

// grid (S, Hq + 2 Hkv), block D / 2: thread i rotates the pair (i, i + D/2) of one head of one token.
template <typename T>
__global__ void rope_cache_kernel(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                                  const int64_t* __restrict__ positions, int heads, int kv_heads, int head_dim,
                                  T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache) {
  const int token = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
  const int64_t pos = positions[token];
  const int64_t row = static_cast<int64_t>(token) * (heads + 2 * kv_heads) * head_dim;
  const T* src = qkv + row + static_cast<int64_t>(head) * head_dim;
  const float a = to_float(src[i]), b = to_float(src[i + half]);
  if (head >= heads + kv_heads) {  // v: no rotation
    T* dst = v_cache + (pos * kv_heads + (head - heads - kv_heads)) * head_dim;
    dst[i] = src[i];
    dst[i + half] = src[i + half];
    return;
  }
  const T* c = cos + pos * head_dim;
  const T* s = sin + pos * head_dim;
  const float lo = a * to_float(c[i]) - b * to_float(s[i]);
  const float hi = b * to_float(c[i + half]) + a * to_float(s[i + half]);
  T* dst = head < heads ? q_out + (static_cast<int64_t>(token) * heads + head) * head_dim
                        : k_cache + (pos * kv_heads + (head - heads)) * head_dim;
  dst[i] = from_float<T>(lo);
  dst[i + half] = from_float<T>(hi);
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, int64_t width, int64_t total, T* __restrict__ out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / width, c = idx % width;
    const float g = to_float(gate_up[r * 2 * width + c]);
    const float u = to_float(gate_up[r * 2 * width + width + c]);
    out[idx] = from_float<T>(g / (1.f + expf(-g)) * u);
  }
}

template <typename F>
void dispatch_float_types(torch::ScalarType t, F&& f) {
  switch (t) {
    case torch::kFloat16: return f(__half{});
    case torch::kBFloat16: return f(__nv_bfloat16{});
    case torch::kFloat32: return f(float{});
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_cuda_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

}  // namespace

void rms_norm_cuda(const torch::Tensor& x, const torch::Tensor& weight, double eps, const torch::Tensor& out) {
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(weight, "weight");
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && weight.size(0) == x.size(1), "rms_norm: shape mismatch");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(), "rms_norm: one dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int threads = x.size(1) >= 1024 ? 1024 : 256;
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<x.size(0), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(x), ptr<T>(weight), static_cast<float>(eps), x.size(1), ptr<T>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rope_cache_cuda(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, int64_t heads, int64_t kv_heads, const torch::Tensor& q_out,
                     const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  for (const auto* t : {&qkv, &cos, &sin, &positions, &q_out, &k_cache, &v_cache}) check_cuda_contiguous(*t, "rope_cache input");
  const int64_t tokens = qkv.size(0), head_dim = cos.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv width must be (Hq + 2 Hkv) * D");
  TORCH_CHECK(q_out.numel() == tokens * heads * head_dim, "q_out must hold [S, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(1) == kv_heads && k_cache.size(2) == head_dim &&
                  v_cache.sizes() == k_cache.sizes(), "caches must be [T, Hkv, D]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == tokens, "positions: int64 [S]");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 2048, "head_dim must be even");
  const c10::cuda::CUDAGuard guard(qkv.device());
  dispatch_float_types(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rope_cache_kernel<T><<<dim3(tokens, heads + 2 * kv_heads), head_dim / 2, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(qkv), ptr<T>(cos), ptr<T>(sin), positions.data_ptr<int64_t>(), heads, kv_heads, head_dim,
        ptr<T>(q_out), ptr<T>(k_cache), ptr<T>(v_cache));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_mul_cuda(const torch::Tensor& gate_up, const torch::Tensor& out) {
  check_cuda_contiguous(gate_up, "gate_up");
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1), "silu_mul: gate_up [S, 2F] -> out [S, F]");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t total = out.numel();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 4096));
  dispatch_float_types(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(ptr<T>(gate_up), out.size(1), total,
                                                                                 ptr<T>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
