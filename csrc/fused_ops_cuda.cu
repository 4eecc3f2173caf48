// Fused elementwise stages of a Llama layer, each one launch where plain torch takes several:
//   rms_norm:   y = w * (x / rms(x))            (float32 statistics, as transformers computes them)
//   rope_cache: RoPE on q and k from the fused QKV output, k and v stored into the KV cache at the
//               step's positions (read from device memory), q written out for attention
//   silu_mul:   y = silu(gate) * up               over the fused gate/up output
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda_utils.cuh"
#include "ops.h"
#include "pdl.cuh"

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

// 1 / rms of a row (float32 statistics), computed by a whole block; every thread must call it. The prefill
// path defers the RMSNorm this way: with the norm's weight folded into the next matrix, norm(x) W^T is
// diag(1 / rms(x)) (x W^T), so the GEMM reads x itself and the kernel after it scales each row, and the
// separate norm kernel (a launch and a pass over x per matrix) disappears.
template <typename T>
__device__ __forceinline__ float row_inv_rms(const T* __restrict__ row, int64_t hidden, float eps, float* shared) {
  constexpr int kVec = Vec<T>::kSize;
  float sum = 0.f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < hidden; i += static_cast<int64_t>(blockDim.x) * kVec) {
    const Vec<T> v = load_vec(row + i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += to_float(v.v[e]) * to_float(v.v[e]);
  }
  return rsqrtf(block_sum(sum, shared) / static_cast<float>(hidden) + eps);
}

// One block per row; each thread keeps its kNormMaxVecs 16-byte slices of the row in registers, so the row
// is read from memory once (hidden <= 1024 * kNormMaxVecs * Vec::kSize, checked on the host). A warp per
// row (no block barrier, a second pass from L1) measured slower on the H100: 6.6 us against 3.7 for the
// 16 rows of a short prompt, too few warps in flight.
constexpr int kNormMaxVecs = 4;

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, float eps, int64_t hidden,
                                T* __restrict__ y) {
  __shared__ float shared[32];
  constexpr int kVec = Vec<T>::kSize;
  const T* row = x + blockIdx.x * hidden;
  T* out = y + blockIdx.x * hidden;
  Vec<T> vals[kNormMaxVecs];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kNormMaxVecs; ++j) {
    const int64_t i = (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * kVec;
    if (i < hidden) {
      vals[j] = load_vec(row + i);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum += to_float(vals[j].v[e]) * to_float(vals[j].v[e]);
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum, shared) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int j = 0; j < kNormMaxVecs; ++j) {
    const int64_t i = (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * kVec;
    if (i < hidden) {
      const Vec<T> wv = load_vec(w + i);
      Vec<T> o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        // round the normalised value to the model dtype before the weight, as transformers does
        const float normed = to_float(from_float<T>(to_float(vals[j].v[e]) * inv_rms));
        o.v[e] = from_float<T>(to_float(wv.v[e]) * normed);
      }
      store_vec(out + i, o);
    }
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
    const int64_t* __restrict__ positions, const int64_t* __restrict__ slots, int heads, int kv_heads, int head_dim,
    T* __restrict__ q_out, T* __restrict__ k_out, T* __restrict__ v_out, T* __restrict__ k_cache,
    T* __restrict__ v_cache, const T* __restrict__ norm_x, int64_t hidden, float eps) {
  __shared__ float shared[32];
  pdl::launch_dependents();  // everything below reads the kernels before (pdl.cuh)
  pdl::wait();
  const int token = blockIdx.x, half = head_dim / 2, quads_per_head = head_dim / 4;
  // the deferred RMSNorm of the layer input (nullptr: qkv is already normalised)
  const float scale = norm_x != nullptr ? row_inv_rms(norm_x + token * hidden, hidden, eps, shared) : 1.f;
  const int quads = (heads + 2 * kv_heads) * quads_per_head;
  const int64_t pos = positions[token], slot = slots[token];
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
    T* copy = nullptr;  // k and v also go to the step's own [S, Hkv, D] outputs
    Two<T> lo_out, hi_out;
    if (head >= heads + kv_heads) {  // v: no rotation (scaling by 1 leaves fp16/bf16 values exact)
      const int64_t offset = (head - heads - kv_heads) * head_dim;
      dst = v_cache + slot * kv_heads * head_dim + offset;
      copy = v_out + static_cast<int64_t>(token) * kv_heads * head_dim + offset;
      lo_out = {from_float<T>(to_float(lo_in.a) * scale), from_float<T>(to_float(lo_in.b) * scale)};
      hi_out = {from_float<T>(to_float(hi_in.a) * scale), from_float<T>(to_float(hi_in.b) * scale)};
    } else {
      const Two<T> c_lo = *reinterpret_cast<const Two<T>*>(c + i), c_hi = *reinterpret_cast<const Two<T>*>(c + i + half);
      const Two<T> s_lo = *reinterpret_cast<const Two<T>*>(s + i), s_hi = *reinterpret_cast<const Two<T>*>(s + i + half);
      auto rotate = [scale](T a_in, T b_in, T cos_lo, T sin_lo, T cos_hi, T sin_hi, T& lo, T& hi) {
        const float a = to_float(a_in) * scale, b = to_float(b_in) * scale;
        lo = from_float<T>(rope_first(a, b, to_float(cos_lo), to_float(sin_lo)));
        hi = from_float<T>(rope_second(a, b, to_float(cos_hi), to_float(sin_hi)));
      };
      rotate(lo_in.a, hi_in.a, c_lo.a, s_lo.a, c_hi.a, s_hi.a, lo_out.a, hi_out.a);
      rotate(lo_in.b, hi_in.b, c_lo.b, s_lo.b, c_hi.b, s_hi.b, lo_out.b, hi_out.b);
      if (head < heads) {
        dst = q_out + (static_cast<int64_t>(token) * heads + head) * head_dim;
      } else {
        const int64_t offset = (head - heads) * head_dim;
        dst = k_cache + slot * kv_heads * head_dim + offset;
        copy = k_out + static_cast<int64_t>(token) * kv_heads * head_dim + offset;
      }
    }
    *reinterpret_cast<Two<T>*>(dst + i) = lo_out;
    *reinterpret_cast<Two<T>*>(dst + i + half) = hi_out;
    if (copy != nullptr) {
      *reinterpret_cast<Two<T>*>(copy + i) = lo_out;
      *reinterpret_cast<Two<T>*>(copy + i + half) = hi_out;
    }
  }
}

// grid (S, ceil(width / (256 * kVec))): no 64-bit division per element; kVec = 16-byte vectors when the
// width is a multiple of one, else single elements.
template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, int64_t width, T* __restrict__ out,
                                const T* __restrict__ norm_x, int64_t hidden, float eps) {
  __shared__ float shared[32];
  // the deferred RMSNorm of the MLP input (nullptr: gate_up is already normalised)
  const float scale = norm_x != nullptr ? row_inv_rms(norm_x + blockIdx.x * hidden, hidden, eps, shared) : 1.f;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kVec;
  if (c >= width) return;
  const T* gate = gate_up + blockIdx.x * 2 * width + c;
  const T* up = gate + width;
  T* dst = out + blockIdx.x * width + c;
  auto silu_mul = [scale](T g_in, T u_in) {
    const float g = to_float(g_in) * scale;
    return from_float<T>(g / (1.f + expf(-g)) * (to_float(u_in) * scale));
  };
  if constexpr (kVec > 1) {
    const Vec<T> g = load_vec(gate), u = load_vec(up);
    Vec<T> o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) o.v[e] = silu_mul(g.v[e], u.v[e]);
    store_vec(dst, o);
  } else {
    *dst = silu_mul(*gate, *up);
  }
}

template <typename F>
void dispatch_float_types(torch::ScalarType t, F&& f) {
  switch (t) {
    case torch::kFloat16: return f(__half{});
    case torch::kBFloat16: return f(__nv_bfloat16{});
    case torch::kFloat32: return f(float{});
    default: HJCG_CHECK_FMT(false, "unsupported dtype %s", c10::toString(t));
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_cuda_contiguous(const torch::Tensor& t, const char* name) {
  HJCG_CHECK_FMT(t.is_cuda() && t.is_contiguous(), "%s must be a contiguous CUDA tensor", name);
}

// The deferred norm's input: [S, H] of the output's dtype, H a multiple of a 16-byte vector.
void check_norm_input(const c10::optional<torch::Tensor>& norm_x, int64_t rows, torch::ScalarType dtype) {
  if (!norm_x) return;
  check_cuda_contiguous(*norm_x, "norm_x");
  const auto vec = static_cast<long long>(16 / norm_x->element_size());
  HJCG_CHECK_FMT(norm_x->dim() == 2 && norm_x->size(0) == rows && norm_x->scalar_type() == dtype &&
                     norm_x->size(1) % vec == 0,
                 "norm_x must be [S, H] = [%lld, H] of the output's dtype, H a multiple of %lld; got %s",
                 static_cast<long long>(rows), vec, hjcg::tensor_text(*norm_x).c_str());
}

}  // namespace

void rms_norm_cuda(const torch::Tensor& x, const torch::Tensor& weight, double eps, const torch::Tensor& out) {
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(weight, "weight");
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && weight.size(0) == x.size(1), "rms_norm: shape mismatch");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == out.scalar_type(), "rms_norm: one dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t vec = 16 / x.element_size(), hidden = x.size(1);
  HJCG_CHECK_FMT(hidden % vec == 0 && hidden <= 1024 * kNormMaxVecs * vec,
                 "rms_norm: the hidden size must be a multiple of %lld and at most %lld, got %lld",
                 static_cast<long long>(vec), static_cast<long long>(1024 * kNormMaxVecs * vec),
                 static_cast<long long>(hidden));
  const int64_t vectors = hidden / vec;
  // enough threads that each holds at most kNormMaxVecs vectors, in whole warps
  const int threads = static_cast<int>(std::min<int64_t>(1024, ((vectors + kNormMaxVecs - 1) / kNormMaxVecs + 31) / 32 * 32));
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<x.size(0), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(x), ptr<T>(weight), static_cast<float>(eps), hidden, ptr<T>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rope_cache_cuda(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, const torch::Tensor& slots, int64_t heads, int64_t kv_heads,
                     const torch::Tensor& q_out, const torch::Tensor& k_out, const torch::Tensor& v_out,
                     const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const c10::optional<torch::Tensor>& norm_x, double eps, bool pdl) {
  for (const auto* t : {&qkv, &cos, &sin, &positions, &slots, &q_out, &k_out, &v_out, &k_cache, &v_cache})
    check_cuda_contiguous(*t, "rope_cache input");
  const int64_t tokens = qkv.size(0), head_dim = cos.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv width must be (Hq + 2 Hkv) * D");
  TORCH_CHECK(q_out.numel() == tokens * heads * head_dim, "q_out must hold [S, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(1) == kv_heads && k_cache.size(2) == head_dim &&
                  v_cache.sizes() == k_cache.sizes(), "caches must be [T, Hkv, D]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == tokens, "positions: int64 [S]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.numel() == tokens, "slots: int64 [S]");
  TORCH_CHECK(k_out.numel() == tokens * kv_heads * head_dim && v_out.sizes() == k_out.sizes(),
              "k_out and v_out must hold [S, Hkv, D]");
  TORCH_CHECK(head_dim % 4 == 0, "rope_cache: head_dim must be a multiple of 4");
  check_norm_input(norm_x, tokens, qkv.scalar_type());
  const c10::cuda::CUDAGuard guard(qkv.device());
  dispatch_float_types(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t quads = (heads + 2 * kv_heads) * head_dim / 4;
    auto launch = [&](auto per_thread) {
      constexpr int kPerThread = decltype(per_thread)::value;
      const dim3 grid(tokens, (quads + kRopeThreads * kPerThread - 1) / (kRopeThreads * kPerThread));
      pdl::launch(rope_cache_kernel<T, kPerThread>, grid, dim3(kRopeThreads), 0, c10::cuda::getCurrentCUDAStream(), pdl,
                  ptr<T>(qkv), ptr<T>(cos), ptr<T>(sin), positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
                  static_cast<int>(heads), static_cast<int>(kv_heads), static_cast<int>(head_dim), ptr<T>(q_out),
                  ptr<T>(k_out), ptr<T>(v_out), ptr<T>(k_cache), ptr<T>(v_cache),
                  norm_x ? ptr<T>(*norm_x) : static_cast<T*>(nullptr), norm_x ? norm_x->size(1) : int64_t{0},
                  static_cast<float>(eps));
    };
    if (tokens >= 64) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_mul_cuda(const torch::Tensor& gate_up, const torch::Tensor& out, const c10::optional<torch::Tensor>& norm_x,
                   double eps) {
  check_cuda_contiguous(gate_up, "gate_up");
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1), "silu_mul: gate_up [S, 2F] -> out [S, F]");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  check_norm_input(norm_x, out.size(0), out.scalar_type());
  const int64_t width = out.size(1), vec = 16 / out.element_size();
  const int threads = 256;
  const bool vectorised = width % vec == 0;  // rows then start on 16-byte boundaries too
  const int64_t per_block = threads * (vectorised ? vec : 1);
  const dim3 grid(out.size(0), (width + per_block - 1) / per_block);
  dispatch_float_types(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = Vec<T>::kSize;
    const T* nx = norm_x ? ptr<T>(*norm_x) : nullptr;
    const int64_t hidden = norm_x ? norm_x->size(1) : 0;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (vectorised) silu_mul_kernel<T, kVec><<<grid, threads, 0, stream>>>(ptr<T>(gate_up), width, ptr<T>(out), nx, hidden, static_cast<float>(eps));
    else silu_mul_kernel<T, 1><<<grid, threads, 0, stream>>>(ptr<T>(gate_up), width, ptr<T>(out), nx, hidden, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
