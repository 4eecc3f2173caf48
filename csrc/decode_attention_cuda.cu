// Paged decode attention (one query token per batch row) over the paged KV pool, reading each row's block
// table and length from device memory: one CUDA graph serves every mix of streams and positions and
// reads only their valid keys. Position t of row b lives at slot tables[b][t / block_size] * block_size +
// t % block_size. Split-K ("flash decoding"): blocks (head, split, row) each cover a slice of the row's
// positions with an online softmax, warp per position; a second kernel merges the splits. The split count
// does not depend on the batch, so a row's result does not depend on its neighbours (batch invariance).
// GQA: query head h reads KV head h / (Hq / Hkv).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_utils.cuh"
#include "ops.h"

namespace hjcg {
namespace {

constexpr int kWarps = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T x[N];
};

// workspace [B * Hq, splits, D + 2]: per split the unnormalised output, then the running max and sum.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) decode_attention_split_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ tables,
    int64_t table_width, const int64_t* __restrict__ seq_lens, int block_size, int64_t t_stride, int group,
    float scale, float* __restrict__ workspace) {
  constexpr int kPerLane = D / 32;
  const int row = blockIdx.z, heads = gridDim.x;
  const int head = row * heads + blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kv_head = blockIdx.x / group;
  const int* table = tables + row * table_width;
  const int64_t len = seq_lens[row];
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t begin = split * chunk, end = min(len, begin + chunk);

  float qf[kPerLane];
  const auto qv = *reinterpret_cast<const Vec<T, kPerLane>*>(q + head * D + lane * kPerLane);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) qf[j] = to_float(qv.x[j]) * scale;

  float m = -INFINITY, l = 0.f, acc[kPerLane] = {};
  for (int64_t t = begin + warp; t < end; t += kWarps) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const int64_t base = slot * t_stride + kv_head * D + lane * kPerLane;
    const auto kv = *reinterpret_cast<const Vec<T, kPerLane>*>(k + base);
    const auto vv = *reinterpret_cast<const Vec<T, kPerLane>*>(v + base);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) s += qf[j] * to_float(kv.x[j]);
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new), p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] = acc[j] * correction + p * to_float(vv.x[j]);
    m = m_new;
  }

  __shared__ float warp_m[kWarps], warp_l[kWarps];
  __shared__ float warp_acc[kWarps][D];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) warp_acc[warp][lane * kPerLane + j] = acc[j];
  __syncthreads();

  float* out = workspace + (static_cast<int64_t>(head) * splits + split) * (D + 2);
  float block_m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_m = fmaxf(block_m, warp_m[w]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (warp_m[w] > -INFINITY) sum += warp_acc[w][d] * expf(warp_m[w] - block_m);
    out[d] = sum;
  }
  if (threadIdx.x == 0) {
    float block_l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (warp_m[w] > -INFINITY) block_l += warp_l[w] * expf(warp_m[w] - block_m);
    out[D] = block_m;
    out[D + 1] = block_l;
  }
}

template <typename T, int D>
__global__ void decode_attention_merge_kernel(const float* __restrict__ workspace, int splits, T* __restrict__ out) {
  const int head = blockIdx.x;
  const float* parts = workspace + static_cast<int64_t>(head) * splits * (D + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, parts[s * (D + 2) + D]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ms = parts[s * (D + 2) + D];
    if (ms > -INFINITY) total += parts[s * (D + 2) + D + 1] * expf(ms - m);
  }
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ms = parts[s * (D + 2) + D];
      if (ms > -INFINITY) sum += parts[s * (D + 2) + d] * expf(ms - m);
    }
    out[head * D + d] = from_float<T>(sum * inv_total);
  }
}

struct Paging {
  const torch::Tensor& tables;
  const torch::Tensor& seq_lens;
  int block_size;
};

template <typename T, int D>
void launch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const Paging& paging,
            float scale, const torch::Tensor& out, const torch::Tensor& workspace) {
  const int rows = static_cast<int>(q.size(0));
  const int heads = static_cast<int>(q.size(1)), kv_heads = static_cast<int>(k_cache.size(1));
  const int splits = static_cast<int>(workspace.size(1));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  using Raw = typename std::conditional<std::is_same<T, at::Half>::value, __half,
              typename std::conditional<std::is_same<T, at::BFloat16>::value, __nv_bfloat16, float>::type>::type;
  decode_attention_split_kernel<Raw, D><<<dim3(heads, splits, rows), kWarps * 32, 0, stream>>>(
      reinterpret_cast<const Raw*>(q.data_ptr<T>()), reinterpret_cast<const Raw*>(k_cache.data_ptr<T>()),
      reinterpret_cast<const Raw*>(v_cache.data_ptr<T>()), paging.tables.data_ptr<int>(), paging.tables.stride(0),
      paging.seq_lens.data_ptr<int64_t>(), paging.block_size, k_cache.stride(0), heads / kv_heads, scale,
      workspace.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_attention_merge_kernel<Raw, D><<<rows * heads, D, 0, stream>>>(workspace.data_ptr<float>(), splits,
                                                                  reinterpret_cast<Raw*>(out.data_ptr<T>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_head_dim(int64_t d, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       const Paging& paging, float scale, const torch::Tensor& out, const torch::Tensor& ws) {
  switch (d) {
    case 64: return launch<T, 64>(q, k, v, paging, scale, out, ws);
    case 128: return launch<T, 128>(q, k, v, paging, scale, out, ws);
    case 256: return launch<T, 256>(q, k, v, paging, scale, out, ws);
    default: TORCH_CHECK(false, "decode_attention supports head dims 64, 128 and 256, got ", d);
  }
}

}  // namespace

void decode_attention_cuda(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                           double scale, const torch::Tensor& out, const torch::Tensor& workspace) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "q must be a contiguous CUDA tensor [B, Hq, D]");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous(), "k_pool and v_pool must be contiguous [slots, Hkv, D] of one shape");
  TORCH_CHECK(k_pool.size(2) == q.size(2), "q and the pool disagree on the head dim");
  TORCH_CHECK(q.size(1) % k_pool.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == out.scalar_type(),
              "q, the pool and out must share one dtype");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "out must be contiguous like q");
  const int64_t rows = q.size(0);
  TORCH_CHECK(block_tables.is_cuda() && block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 &&
                  block_tables.size(0) == rows && block_tables.stride(1) == 1,
              "block_tables must be int32 [B, W] on the device, rows contiguous");
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == torch::kInt64 && seq_lens.numel() == rows &&
                  seq_lens.is_contiguous(), "seq_lens must be int64 [B] on the device");
  TORCH_CHECK(block_size >= 1 && k_pool.size(0) % block_size == 0, "the pool must hold whole blocks");
  TORCH_CHECK(workspace.scalar_type() == torch::kFloat32 && workspace.dim() == 3 &&
                  workspace.size(0) == rows * q.size(1) && workspace.size(2) == q.size(2) + 2 &&
                  workspace.is_contiguous(),
              "workspace must be float32 [B * Hq, splits, D + 2]");
  const c10::cuda::CUDAGuard guard(q.device());
  const float s = static_cast<float>(scale);
  const Paging paging{block_tables, seq_lens, static_cast<int>(block_size)};
  switch (q.scalar_type()) {
    case torch::kFloat16: return dispatch_head_dim<at::Half>(q.size(2), q, k_pool, v_pool, paging, s, out, workspace);
    case torch::kBFloat16:
      return dispatch_head_dim<at::BFloat16>(q.size(2), q, k_pool, v_pool, paging, s, out, workspace);
    case torch::kFloat32: return dispatch_head_dim<float>(q.size(2), q, k_pool, v_pool, paging, s, out, workspace);
    default: TORCH_CHECK(false, "decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace hjcg
