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
// rope_decode_attention runs the same kernel from the QKV output: RoPE on q and on the newest K (see RopeArgs), so a
// hybrid decode step launches one kernel where rope_cache and the attention were two.
//
// Why one kernel: at decode lengths the split kernel and the former merge kernel were both latency-bound,
// 3.05 us each per layer on the H100 at 10-74 positions (bench/results/2026-11-24-h100-fp8-step-lab).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
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

// The fused step (rope_decode_attention): q and the newest position's K/V straight from the QKV GEMV's output, RoPE
// applied here at that position (seq_lens[b] - 1), and the newest K/V stored into the pools (at the slot the block
// table gives that position) by the blocks of each KV head's first query head.
struct RopeArgs {
  const void* qkv;    // [B, (Hq + 2 Hkv) D]
  const void* cos;    // [positions, D]
  const void* sin;
  int kv_heads;
};

// The lane's kPerLane dimensions of one head of a qkv row, rotated at the position whose cos and sin rows are given,
// rounded to T: what rope_cache stores (rope_first, rope_second).
template <typename T, int D, typename KV>
__device__ __forceinline__ KV rotated(const T* head, const T* cos, const T* sin, int lane) {
  constexpr int kPerLane = D / 32, kHalf = D / 2;
  const int d = lane * kPerLane;
  const bool first = d < kHalf;
  const KV own = *reinterpret_cast<const KV*>(head + d);
  const KV other = *reinterpret_cast<const KV*>(head + (first ? d + kHalf : d - kHalf));
  const KV c = *reinterpret_cast<const KV*>(cos + d), s = *reinterpret_cast<const KV*>(sin + d);
  KV out;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float x = to_float(own.x[j]), y = to_float(other.x[j]), cj = to_float(c.x[j]), sj = to_float(s.x[j]);
    out.x[j] = from_float<T>(first ? rope_first(x, y, cj, sj) : rope_second(y, x, cj, sj));
  }
  return out;
}

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

// kRope: q is unused; RoPE, q and the newest K/V come from r (RopeArgs), and the pools are written.
template <typename T, int D, bool kRope>
__global__ void __launch_bounds__(kWarps * 32) decode_attention_kernel(const T* __restrict__ q, T* __restrict__ k,
                                                                       T* __restrict__ v, AttentionArgs a,
                                                                       RopeArgs r, T* __restrict__ out) {
  constexpr int kPerLane = D / 32;
  using KV = Vec<T, kPerLane>;
  pdl::launch_dependents();
  // Before the wait (pdl.cuh), only what the kernels before did not write: the lengths and block tables (set before
  // the step's first fused kernel) and the K/V of every position but the newest, which earlier steps wrote. So the
  // table lookups and those loads of the first step overlap the kernel before: rope_cache, which writes q and the
  // newest position, or (kRope) the QKV GEMV.
  const int row = blockIdx.z, heads = gridDim.x;
  const int head = row * heads + blockIdx.x, split = blockIdx.y;
  const int64_t len = a.seq_lens[row];
  const int splits = row_splits(len, gridDim.y);
  if (split >= splits) {  // uniform over the block
    pdl::wait();  // a block leaves only after the kernel before it is done (pdl.cuh)
    return;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kv_head = blockIdx.x / a.group;
  const int* table = a.tables + row * a.table_width;
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t begin = split * chunk, end = min(len, begin + chunk), newest = len - 1;

  auto base_of = [&](int64_t t) {
    const int64_t slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
    return slot * a.t_stride + kv_head * D + lane * kPerLane;
  };
  auto load = [&](const T* pool, int64_t base) { return *reinterpret_cast<const KV*>(pool + base); };
  // The first step's positions t0 and t0 + kWarps (see the loop below), loaded now unless one is the newest.
  const int64_t t0 = begin + warp;
  const bool has0 = t0 < end, has1 = t0 + kWarps < end;
  const int64_t first0 = has0 ? base_of(t0) : 0, first1 = has1 ? base_of(t0 + kWarps) : first0;
  KV k0{}, k1{}, v0{}, v1{};
  if (has0 && t0 != newest) k0 = load(k, first0), v0 = load(v, first0);
  if (has1 && t0 + kWarps != newest) k1 = load(k, first1), v1 = load(v, first1);
  pdl::wait();
  KV qv, k_new{}, v_new{};  // kRope: the newest position's K/V, used from registers (other blocks may be storing it)
  const bool holds_newest = begin <= newest && newest < end;
  if constexpr (kRope) {
    const T* src = static_cast<const T*>(r.qkv) + static_cast<int64_t>(row) * (heads + 2 * r.kv_heads) * D;
    const int64_t position = max(newest, int64_t{0});  // an empty row (length 0) attends to nothing
    const T* cos = static_cast<const T*>(r.cos) + position * D;
    const T* sin = static_cast<const T*>(r.sin) + position * D;
    qv = rotated<T, D, KV>(src + blockIdx.x * D, cos, sin, lane);
    if (holds_newest) {
      k_new = rotated<T, D, KV>(src + (heads + kv_head) * D, cos, sin, lane);
      v_new = *reinterpret_cast<const KV*>(src + (heads + r.kv_heads + kv_head) * D + lane * kPerLane);
      if (blockIdx.x % a.group == 0 && warp == 0) {  // one block per KV head stores it for the steps after
        const int64_t base = base_of(newest);
        *reinterpret_cast<KV*>(k + base) = k_new;
        *reinterpret_cast<KV*>(v + base) = v_new;
      }
    }
  } else {
    qv = *reinterpret_cast<const KV*>(q + head * D + lane * kPerLane);
  }
  auto take_newest = [&](int64_t base, KV& key, KV& value) {  // base: the newest position's slot
    if constexpr (kRope) {
      key = k_new, value = v_new;
    } else {
      key = load(k, base), value = load(v, base);
    }
  };
  if (has0 && t0 == newest) take_newest(first0, k0, v0);
  if (has1 && t0 + kWarps == newest) take_newest(first1, k1, v1);

  float qf[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) qf[j] = to_float(qv.x[j]) * a.scale;

  Softmax<kPerLane> st;
  // Positions t and t + kWarps per step: both loads are in flight before either score is needed.
  for (int64_t t = t0; t < end; t += 2 * kWarps) {
    const bool pair = t + kWarps < end;
    if (t != t0) {
      const int64_t base0 = base_of(t), base1 = pair ? base_of(t + kWarps) : base0;
      k0 = load(k, base0), k1 = load(k, base1), v0 = load(v, base0), v1 = load(v, base1);
      if (kRope && t == newest) k0 = k_new, v0 = v_new;
      if (kRope && pair && t + kWarps == newest) k1 = k_new, v1 = v_new;
    }
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      s0 += qf[j] * to_float(k0.x[j]);
      s1 += qf[j] * to_float(k1.x[j]);
    }
    s0 = warp_sum(s0);
    s1 = pair ? warp_sum(s1) : -INFINITY;
    const float m_new = fmaxf(st.m, fmaxf(s0, s1));
    const float correction = expf(st.m - m_new), p0 = expf(s0 - m_new), p1 = pair ? expf(s1 - m_new) : 0.f;
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

template <typename T, int D, bool kRope>
void launch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& out, const AttentionArgs& args, const RopeArgs& rope, dim3 grid, bool pdl) {
  using Raw = typename std::conditional<std::is_same<T, at::Half>::value, __half,
              typename std::conditional<std::is_same<T, at::BFloat16>::value, __nv_bfloat16, float>::type>::type;
  pdl::launch(decode_attention_kernel<Raw, D, kRope>, grid, dim3(kWarps * 32), 0, c10::cuda::getCurrentCUDAStream(),
              pdl, reinterpret_cast<const Raw*>(q.data_ptr<T>()), reinterpret_cast<Raw*>(k_cache.data_ptr<T>()),
              reinterpret_cast<Raw*>(v_cache.data_ptr<T>()), args, rope, reinterpret_cast<Raw*>(out.data_ptr<T>()));
}

template <typename T, bool kRope>
void dispatch_head_dim(int64_t d, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& out, const AttentionArgs& args, const RopeArgs& rope, dim3 grid, bool pdl) {
  switch (d) {
    case 64: return launch<T, 64, kRope>(q, k, v, out, args, rope, grid, pdl);
    case 128: return launch<T, 128, kRope>(q, k, v, out, args, rope, grid, pdl);
    case 256: return launch<T, 256, kRope>(q, k, v, out, args, rope, grid, pdl);
    default: HJCG_CHECK_FMT(false, "decode_attention supports head dims 64, 128 and 256, got %lld", static_cast<long long>(d));
  }
}

// Checks the arguments the two ops share and launches; q is [B, Hq, D] (for the fused op, `out`: only its shape).
template <bool kRope>
void attend(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
            const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size, double scale,
            const torch::Tensor& out, const torch::Tensor& workspace, const torch::Tensor& counters,
            const RopeArgs& rope, bool pdl) {
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
    case torch::kFloat16:
      return dispatch_head_dim<at::Half, kRope>(q.size(2), q, k_pool, v_pool, out, args, rope, grid, pdl);
    case torch::kBFloat16:
      return dispatch_head_dim<at::BFloat16, kRope>(q.size(2), q, k_pool, v_pool, out, args, rope, grid, pdl);
    case torch::kFloat32:
      return dispatch_head_dim<float, kRope>(q.size(2), q, k_pool, v_pool, out, args, rope, grid, pdl);
    default: HJCG_CHECK_FMT(false, "decode_attention: unsupported dtype %s", c10::toString(q.scalar_type()));
  }
}

}  // namespace

void decode_attention_cuda(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                           double scale, const torch::Tensor& out, const torch::Tensor& workspace,
                           const torch::Tensor& counters, bool pdl) {
  attend<false>(q, k_pool, v_pool, block_tables, seq_lens, block_size, scale, out, workspace, counters, RopeArgs{},
                pdl);
}

void rope_decode_attention_cuda(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                                const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                                double scale, const torch::Tensor& out, const torch::Tensor& workspace,
                                const torch::Tensor& counters, bool pdl) {
  // out stands in for q in attend()'s checks (its shape is q's), so it is checked here under its own name
  TORCH_CHECK(out.is_cuda() && out.dim() == 3 && out.is_contiguous(),
              "out must be a contiguous CUDA tensor [B, Hq, D]");
  const int64_t rows = out.size(0), heads = out.size(1), dim = out.size(2), kv_heads = k_pool.size(1);
  TORCH_CHECK(qkv.is_cuda() && qkv.is_contiguous() && qkv.dim() == 2 && qkv.size(0) == rows &&
                  qkv.size(1) == (heads + 2 * kv_heads) * dim && qkv.scalar_type() == out.scalar_type(),
              "qkv must be contiguous [B, (Hq + 2 Hkv) D] of out's dtype");
  TORCH_CHECK(cos.is_cuda() && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == dim &&
                  cos.sizes() == sin.sizes() && sin.is_contiguous() && cos.scalar_type() == out.scalar_type() &&
                  sin.scalar_type() == out.scalar_type(),
              "cos and sin must be contiguous [positions, D] of out's dtype");
  // the newest position, seq_lens[b] - 1, must have a cos row: checked on the device would cost a sync, so the
  // caller bounds the lengths (the runner's positions never pass its rope tables)
  attend<true>(out, k_pool, v_pool, block_tables, seq_lens, block_size, scale, out, workspace, counters,
               RopeArgs{qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), static_cast<int>(kv_heads)}, pdl);
}

}  // namespace hjcg
