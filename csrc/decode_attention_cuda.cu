// Paged decode attention (one query token per batch row) over the paged KV pool, reading each row's block
// table and length from device memory: one CUDA graph serves every mix of streams and positions and
// reads only their valid keys. Position t of row b lives at slot tables[b][t / block_size] * block_size +
// t % block_size. Split-K ("flash decoding") in one kernel: blocks (head, split, row), of which a row uses
// row_splits(length) = min(splits, ceil(length / kPositionsPerSplit)); each covers a slice of the row's
// positions with an online softmax, a warp per position, two positions in flight per warp. With one split
// the block writes the output; with more, each block leaves its partial in the workspace and the last to
// finish (a per-head counter, reset by that block) merges them in split order. The split count depends on the
// row's own length alone, so a row's result does not depend on its neighbours (batch invariance).
// GQA: query head h reads KV head h / (Hq / Hkv).
//
// Why one kernel: at decode lengths the split kernel and the former merge kernel were both latency-bound,
// 3.05 us each per layer on the H100 at 10-74 positions (bench/results/2026-11-24-h100-fp8-step-lab).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_utils.cuh"
#include "ops.h"
#include "pdl.cuh"

namespace hjcg {
namespace {

constexpr int kWarps = 4;
// Positions a split takes before the row uses another (up to the workspace's splits, at most kMaxSplits): one
// step of two positions per warp. At decode lengths every step is a chain of dependent loads (the block table,
// then K and V) and shuffles, so blocks in parallel beat steps in a row: 32 positions per split took 6.8 us per
// layer at 10-74 positions on the H100, against 6.1 for the former two kernels of 16 splits each.
constexpr int kPositionsPerSplit = 2 * kWarps;
constexpr int kMaxSplits = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T x[N];
};

__device__ __forceinline__ int row_splits(int64_t len, int splits) {
  const int64_t wanted = (len + kPositionsPerSplit - 1) / kPositionsPerSplit;
  return static_cast<int>(max(int64_t{1}, min(static_cast<int64_t>(splits), wanted)));
}

struct AttentionArgs {
  const int* tables;
  int64_t table_width;
  const int64_t* seq_lens;
  int block_size;
  int64_t t_stride;  // elements between consecutive slots of the pool
  int group;         // query heads per KV head
  float scale;
  float* workspace;  // [B * Hq, splits, D + 2]: per split the unnormalised output, then its max and sum
  int* counters;     // [B * Hq], zero between launches: the splits of a head that have finished
};

// The online-softmax state of one position range: running max m, sum l and unnormalised output acc.
template <int kPerLane>
struct Softmax {
  float m = -INFINITY, l = 0.f, acc[kPerLane] = {};
};

// The block's warps' states merged, in warp order: each warp's state goes to the shared arrays, then every thread
// takes the block's max and sum; block_output gives the block's unnormalised output at dimension d.
template <int D, int kPerLane>
__device__ __forceinline__ void merge_warps(const Softmax<kPerLane>& st, float (&warp_m)[kWarps],
                                            float (&warp_l)[kWarps], float (&warp_acc)[kWarps][D],
                                            float& block_m, float& block_l) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    warp_m[warp] = st.m;
    warp_l[warp] = st.l;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) warp_acc[warp][lane * kPerLane + j] = st.acc[j];
  __syncthreads();
  block_m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_m = fmaxf(block_m, warp_m[w]);
  block_l = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w)
    if (warp_m[w] > -INFINITY) block_l += warp_l[w] * expf(warp_m[w] - block_m);
}

template <int D>
__device__ __forceinline__ float block_output(int d, const float (&warp_m)[kWarps], const float (&warp_acc)[kWarps][D],
                                              float block_m) {
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w)
    if (warp_m[w] > -INFINITY) sum += warp_acc[w][d] * expf(warp_m[w] - block_m);
  return sum;
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                       const T* __restrict__ v, AttentionArgs a,
                                                                       T* __restrict__ out) {
  constexpr int kPerLane = D / 32;
  pdl::launch_dependents();  // q and the caches come from the kernels before (pdl.cuh)
  pdl::wait();
  const int row = blockIdx.z, heads = gridDim.x;
  const int head = row * heads + blockIdx.x, split = blockIdx.y;
  const int64_t len = a.seq_lens[row];
  const int splits = row_splits(len, gridDim.y);
  if (split >= splits) return;  // uniform over the block
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kv_head = blockIdx.x / a.group;
  const int* table = a.tables + row * a.table_width;
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t begin = split * chunk, end = min(len, begin + chunk);

  float qf[kPerLane];
  const auto qv = *reinterpret_cast<const Vec<T, kPerLane>*>(q + head * D + lane * kPerLane);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) qf[j] = to_float(qv.x[j]) * a.scale;

  auto base_of = [&](int64_t t) {
    const int64_t slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
    return slot * a.t_stride + kv_head * D + lane * kPerLane;
  };
  Softmax<kPerLane> st;
  // Positions t and t + kWarps per step: both loads are in flight before either score is needed.
  for (int64_t t = begin + warp; t < end; t += 2 * kWarps) {
    const bool has1 = t + kWarps < end;
    const int64_t base0 = base_of(t), base1 = has1 ? base_of(t + kWarps) : base0;
    const auto k0 = *reinterpret_cast<const Vec<T, kPerLane>*>(k + base0);
    const auto k1 = *reinterpret_cast<const Vec<T, kPerLane>*>(k + base1);
    const auto v0 = *reinterpret_cast<const Vec<T, kPerLane>*>(v + base0);
    const auto v1 = *reinterpret_cast<const Vec<T, kPerLane>*>(v + base1);
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      s0 += qf[j] * to_float(k0.x[j]);
      s1 += qf[j] * to_float(k1.x[j]);
    }
    s0 = warp_sum(s0);
    s1 = has1 ? warp_sum(s1) : -INFINITY;
    const float m_new = fmaxf(st.m, fmaxf(s0, s1));
    const float correction = expf(st.m - m_new), p0 = expf(s0 - m_new), p1 = has1 ? expf(s1 - m_new) : 0.f;
    st.l = st.l * correction + p0 + p1;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      st.acc[j] = st.acc[j] * correction + p0 * to_float(v0.x[j]) + p1 * to_float(v1.x[j]);
    st.m = m_new;
  }

  __shared__ float warp_m[kWarps], warp_l[kWarps];
  __shared__ float warp_acc[kWarps][D];
  float block_m, block_l;
  merge_warps<D, kPerLane>(st, warp_m, warp_l, warp_acc, block_m, block_l);
  if (splits == 1) {
    const float inv = block_l > 0.f ? 1.f / block_l : 0.f;  // an empty row (length 0) reads zeros
    for (int d = threadIdx.x; d < D; d += blockDim.x)
      out[head * D + d] = from_float<T>(block_output<D>(d, warp_m, warp_acc, block_m) * inv);
    return;
  }

  float* parts = a.workspace + static_cast<int64_t>(head) * gridDim.y * (D + 2);
  float* mine = parts + split * (D + 2);
  for (int d = threadIdx.x; d < D; d += blockDim.x) mine[d] = block_output<D>(d, warp_m, warp_acc, block_m);
  if (threadIdx.x == 0) {
    mine[D] = block_m;
    mine[D + 1] = block_l;
  }
  // The last split of this head to finish merges: its partial and the count are published in that order.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&a.counters[head], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Warp 0 weighs the splits (lane s: split s), then each thread sums its dimensions over the splits, every
  // split's load in flight at once (the partials are in L2: __ldcg, not a stale L1 line).
  __shared__ float weight[kMaxSplits];
  __shared__ float inv_total;
  if (warp == 0) {
    const float ms = lane < splits ? __ldcg(parts + lane * (D + 2) + D) : -INFINITY;
    const float ls = lane < splits ? __ldcg(parts + lane * (D + 2) + D + 1) : 0.f;
    const float m = warp_max(ms);
    const float w = ms > -INFINITY ? expf(ms - m) : 0.f;
    if (lane < kMaxSplits) weight[lane] = w;
    const float total = warp_sum(ls * w);
    if (lane == 0) inv_total = total > 0.f ? 1.f / total : 0.f;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float part[kMaxSplits];
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) part[s] = s < splits ? __ldcg(parts + s * (D + 2) + d) : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) sum += part[s] * weight[s];
    out[head * D + d] = from_float<T>(sum * inv_total);
  }
  if (threadIdx.x == 0) a.counters[head] = 0;  // ready for the next launch (the next layer, the next replay)
}

template <typename T, int D>
void launch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& out,
            const AttentionArgs& args, dim3 grid, bool pdl) {
  using Raw = typename std::conditional<std::is_same<T, at::Half>::value, __half,
              typename std::conditional<std::is_same<T, at::BFloat16>::value, __nv_bfloat16, float>::type>::type;
  pdl::launch(decode_attention_kernel<Raw, D>, grid, dim3(kWarps * 32), 0, c10::cuda::getCurrentCUDAStream(), pdl,
              reinterpret_cast<const Raw*>(q.data_ptr<T>()), reinterpret_cast<const Raw*>(k_cache.data_ptr<T>()),
              reinterpret_cast<const Raw*>(v_cache.data_ptr<T>()), args, reinterpret_cast<Raw*>(out.data_ptr<T>()));
}

template <typename T>
void dispatch_head_dim(int64_t d, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& out, const AttentionArgs& args, dim3 grid, bool pdl) {
  switch (d) {
    case 64: return launch<T, 64>(q, k, v, out, args, grid, pdl);
    case 128: return launch<T, 128>(q, k, v, out, args, grid, pdl);
    case 256: return launch<T, 256>(q, k, v, out, args, grid, pdl);
    default: TORCH_CHECK(false, "decode_attention supports head dims 64, 128 and 256, got ", d);
  }
}

}  // namespace

void decode_attention_cuda(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                           double scale, const torch::Tensor& out, const torch::Tensor& workspace,
                           const torch::Tensor& counters, bool pdl) {
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
  TORCH_CHECK(workspace.size(1) >= 1 && workspace.size(1) <= kMaxSplits, "workspace must hold 1 to 16 splits");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == torch::kInt32 && counters.numel() == rows * q.size(1) &&
                  counters.is_contiguous(),
              "counters must be int32 [B * Hq] on the device, zero before the first launch");
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionArgs args{block_tables.data_ptr<int>(), block_tables.stride(0), seq_lens.data_ptr<int64_t>(),
                           static_cast<int>(block_size), k_pool.stride(0), static_cast<int>(q.size(1) / k_pool.size(1)),
                           static_cast<float>(scale), workspace.data_ptr<float>(), counters.data_ptr<int>()};
  const dim3 grid(static_cast<unsigned>(q.size(1)), static_cast<unsigned>(workspace.size(1)),
                  static_cast<unsigned>(rows));  // (head, split, row)
  switch (q.scalar_type()) {
    case torch::kFloat16: return dispatch_head_dim<at::Half>(q.size(2), q, k_pool, v_pool, out, args, grid, pdl);
    case torch::kBFloat16: return dispatch_head_dim<at::BFloat16>(q.size(2), q, k_pool, v_pool, out, args, grid, pdl);
    case torch::kFloat32: return dispatch_head_dim<float>(q.size(2), q, k_pool, v_pool, out, args, grid, pdl);
    default: TORCH_CHECK(false, "decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace hjcg
