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

// 16-byte vectors of T: 8 halves or 4 floats per load.
template <typename T> struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union { uint4 raw; T v[kSize]; };
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> out;
  out.raw = *reinterpret_cast<const uint4*>(p);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  *reinterpret_cast<uint4*>(p) = v.raw;
}

// One warp per row, kNormWarps rows per block: the sum of squares is a warp shuffle, no shared memory and
// no block barrier (a block per row with two barriers took ~4 us even for 16 rows: latency, not bytes).
// The second pass re-reads the row from L1.
constexpr int kNormWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32) rms_norm_kernel(
    const T* __restrict__ x, const T* __restrict__ w, float eps, int64_t rows, int64_t hidden, T* __restrict__ y) {
  constexpr int kVec = Vec<T>::kSize;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* row = x + r * hidden;
  T* out = y + r * hidden;
  float sum = 0.f;
#pragma unroll 4
  for (int64_t i = lane * kVec; i < hidden; i += 32 * kVec) {
    const Vec<T> v = load_vec(row + i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += to_float(v.v[e]) * to_float(v.v[e]);
  }
  const float inv_rms = rsqrtf(warp_sum(sum) / static_cast<float>(hidden) + eps);
#pragma unroll 4
  for (int64_t i = lane * kVec; i < hidden; i += 32 * kVec) {
    const Vec<T> v = load_vec(row + i), wv = load_vec(w + i);
    Vec<T> o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      // round the normalised value to the model dtype before the weight, as transformers does
      const float normed = to_float(from_float<T>(to_float(v.v[e]) * inv_rms));
      o.v[e] = from_float<T>(to_float(wv.v[e]) * normed);
    }
    store_vec(out + i, o);
  }
}

// grid (S, ceil(quads / (kRopeThreads * kPerThread))), block kRopeThreads. A token has (Hq + 2 Hkv) * D/4
// "quads": two neighbouring rotation pairs (i, i+1) and (i + D/2, i+1 + D/2), read and written as pairs of
// elements. Long prompts give each thread several quads, a block-stride apart, so their loads are in
// flight together; one pair per thread in 64-thread blocks was latency-bound (31 us for 512 tokens of
// Llama-2-7B, where the bytes take 8). A decode step (one token) keeps one quad per thread, more blocks.
constexpr int kRopeThreads = 256;

template <typename T> struct alignas(2 * sizeof(T)) Two { T a, b; };

template <typename T, int kPerThread>
__global__ void __launch_bounds__(kRopeThreads) rope_cache_kernel(
    const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
    const int64_t* __restrict__ positions, int heads, int kv_heads, int head_dim, T* __restrict__ q_out,
    T* __restrict__ k_cache, T* __restrict__ v_cache) {
  const int token = blockIdx.x, half = head_dim / 2, quads_per_head = head_dim / 4;
  const int quads = (heads + 2 * kv_heads) * quads_per_head;
  const int64_t pos = positions[token];
  const T* src_row = qkv + static_cast<int64_t>(token) * (heads + 2 * kv_heads) * head_dim;
  const T* c = cos + pos * head_dim;
  const T* s = sin + pos * head_dim;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int quad = (blockIdx.y * kPerThread + j) * kRopeThreads + threadIdx.x;
    if (quad >= quads) break;
    const int head = quad / quads_per_head, i = 2 * (quad % quads_per_head);
    const T* src = src_row + static_cast<int64_t>(head) * head_dim;
    const Two<T> lo_in = *reinterpret_cast<const Two<T>*>(src + i);
    const Two<T> hi_in = *reinterpret_cast<const Two<T>*>(src + i + half);
    T* dst;
    Two<T> lo_out, hi_out;
    if (head >= heads + kv_heads) {  // v: no rotation
      dst = v_cache + (pos * kv_heads + (head - heads - kv_heads)) * head_dim;
      lo_out = lo_in;
      hi_out = hi_in;
    } else {
      const Two<T> c_lo = *reinterpret_cast<const Two<T>*>(c + i), c_hi = *reinterpret_cast<const Two<T>*>(c + i + half);
      const Two<T> s_lo = *reinterpret_cast<const Two<T>*>(s + i), s_hi = *reinterpret_cast<const Two<T>*>(s + i + half);
      auto rotate = [](T a, T b, T cos_lo, T sin_lo, T cos_hi, T sin_hi, T& lo, T& hi) {
        lo = from_float<T>(to_float(a) * to_float(cos_lo) - to_float(b) * to_float(sin_lo));
        hi = from_float<T>(to_float(b) * to_float(cos_hi) + to_float(a) * to_float(sin_hi));
      };
      rotate(lo_in.a, hi_in.a, c_lo.a, s_lo.a, c_hi.a, s_hi.a, lo_out.a, hi_out.a);
      rotate(lo_in.b, hi_in.b, c_lo.b, s_lo.b, c_hi.b, s_hi.b, lo_out.b, hi_out.b);
      dst = head < heads ? q_out + (static_cast<int64_t>(token) * heads + head) * head_dim
                         : k_cache + (pos * kv_heads + (head - heads)) * head_dim;
    }
    *reinterpret_cast<Two<T>*>(dst + i) = lo_out;
    *reinterpret_cast<Two<T>*>(dst + i + half) = hi_out;
  }
}

// grid (S, ceil(width / (256 * kVec))): no 64-bit division per element; kVec = 16-byte vectors when the
// width is a multiple of one, else single elements.
template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, int64_t width, T* __restrict__ out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (c >= width) return;
  const T* gate = gate_up + blockIdx.x * 2 * width + c;
  const T* up = gate + width;
  T* dst = out + blockIdx.x * width + c;
  if constexpr (kVec > 1) {
    const Vec<T> g = load_vec(gate), u = load_vec(up);
    Vec<T> o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gv = to_float(g.v[e]);
      o.v[e] = from_float<T>(gv / (1.f + expf(-gv)) * to_float(u.v[e]));
    }
    store_vec(dst, o);
  } else {
    const float gv = to_float(*gate);
    *dst = from_float<T>(gv / (1.f + expf(-gv)) * to_float(*up));
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
  const int64_t vec = 16 / x.element_size(), hidden = x.size(1), rows = x.size(0);
  TORCH_CHECK(hidden % vec == 0, "rms_norm: the hidden size must be a multiple of ", vec);
  const int blocks = static_cast<int>((rows + kNormWarps - 1) / kNormWarps);
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<blocks, kNormWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(x), ptr<T>(weight), static_cast<float>(eps), rows, hidden, ptr<T>(out));
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
  TORCH_CHECK(head_dim % 4 == 0, "rope_cache: head_dim must be a multiple of 4");
  const c10::cuda::CUDAGuard guard(qkv.device());
  dispatch_float_types(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t quads = (heads + 2 * kv_heads) * head_dim / 4;
    auto launch = [&](auto per_thread) {
      constexpr int kPerThread = decltype(per_thread)::value;
      const dim3 grid(tokens, (quads + kRopeThreads * kPerThread - 1) / (kRopeThreads * kPerThread));
      rope_cache_kernel<T, kPerThread><<<grid, kRopeThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          ptr<T>(qkv), ptr<T>(cos), ptr<T>(sin), positions.data_ptr<int64_t>(), heads, kv_heads, head_dim,
          ptr<T>(q_out), ptr<T>(k_cache), ptr<T>(v_cache));
    };
    if (tokens >= 64) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_mul_cuda(const torch::Tensor& gate_up, const torch::Tensor& out) {
  check_cuda_contiguous(gate_up, "gate_up");
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1), "silu_mul: gate_up [S, 2F] -> out [S, F]");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t width = out.size(1), vec = 16 / out.element_size();
  const int threads = 256;
  const bool vectorised = width % vec == 0;  // rows then start on 16-byte boundaries too
  const int64_t per_block = threads * (vectorised ? vec : 1);
  const dim3 grid(out.size(0), (width + per_block - 1) / per_block);
  dispatch_float_types(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = Vec<T>::kSize;
    if (vectorised) silu_mul_kernel<T, kVec><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(ptr<T>(gate_up), width, ptr<T>(out));
    else silu_mul_kernel<T, 1><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(ptr<T>(gate_up), width, ptr<T>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
