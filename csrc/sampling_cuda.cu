// The fused sampler on the GPU: one block per row runs the whole pipeline of sampling_ref.h (penalty,
// greedy or temperature, top-k, top-p, min-p, seeded draw) with no host synchronisation. Thresholds
// are found by bisection on the bit patterns of the (positive) float weights, which order like the
// floats themselves: exact, sort-free, and the same set the CPU reference keeps. The draw counter
// (offset) and the history length are read from and advanced in device memory, so a CUDA graph replay
// continues where the last one left off.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>

#include "checks.h"
#include "cuda_utils.cuh"
#include "ops.h"
#include "philox.h"
#include "sampling_params.h"

namespace hjcg {
namespace {

constexpr int kThreads = 1024;

struct RowArgs {
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const float* repetition_penalty;
  const int64_t* seed;
  int64_t* offset;
  int64_t* history;
  int64_t* history_len;
  int64_t history_capacity;
  int64_t* out;
  bool append;
};

// Count (or weight sum) of the weights whose bits are >= b, over the whole row.
__device__ float mass_at_or_above(const float* w, int64_t vocab, uint32_t b, bool count, float* shared) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = w[i];
    if (__float_as_uint(x) >= b) acc += count ? 1.f : x;
  }
  return block_sum(acc, shared);
}

// The largest bit pattern b (a float in [0, 1]) such that mass_at_or_above(b) >= need.
__device__ uint32_t bisect_threshold(const float* w, int64_t vocab, uint32_t floor_bits, float need, bool count,
                                     float* shared) {
  uint32_t lo = floor_bits, hi = __float_as_uint(1.0f);  // the answer lies in [lo, hi]
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (mass_at_or_above(w, vocab, mid, count, shared) >= need) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, int64_t logits_stride,
                                                         int64_t vocab, float* __restrict__ workspace, RowArgs a) {
  __shared__ float shared[32];
  __shared__ int64_t shared_i[32];
  const int row = blockIdx.x;
  const T* l = logits + row * logits_stride;
  float* w = workspace + row * vocab;
  const float penalty = a.repetition_penalty[row];
  const int64_t cap = a.history_capacity;
  int64_t* hist = a.history + row * cap;
  const int64_t hist_len = min(max(a.history_len[row], int64_t(0)), cap);

  // 1. repetition penalty into the workspace (reads the original logit: duplicates write the same value). A greedy
  //    row without a penalty needs no workspace: its argmax reads the logits themselves (one pass over the row
  //    instead of three; the same values, so the same token).
  const float temperature = a.temperature[row];
  const bool penalize = penalty_active(penalty), weigh = temperature > 0.f, use_workspace = penalize || weigh;
  if (use_workspace) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = to_float(l[i]);
    __syncthreads();
  }
  if (penalize) {
    for (int64_t i = threadIdx.x; i < hist_len; i += blockDim.x) {
      const int64_t t = hist[i];
      if (t >= 0 && t < vocab) w[t] = penalize_logit(to_float(l[t]), penalty);
    }
    __syncthreads();
  }

  // 2. argmax (greedy answer, and the max for the softmax)
  ArgMax best{-INFINITY, INT64_MAX};
  if (use_workspace) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) best = better(best, ArgMax{w[i], i});
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) best = better(best, ArgMax{to_float(l[i]), i});
  }
  best = block_argmax(best, shared, shared_i);
  int64_t token = best.index;

  if (weigh) {
    // 3. unnormalised weights, the largest exactly 1
    const float inv_t = ieee_div(1.f, temperature);  // exact, as on the CPU
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = expf((w[i] - best.value) * inv_t);
    __syncthreads();

    // 4-6. the keep threshold (as bits)
    uint32_t threshold = 0;
    const int32_t k = a.top_k[row];
    if (top_k_active(k, vocab)) threshold = bisect_threshold(w, vocab, 0, static_cast<float>(k), true, shared);
    const float top_p = a.top_p[row];
    if (top_p_active(top_p)) {
      const float kept = mass_at_or_above(w, vocab, threshold, false, shared);
      threshold = bisect_threshold(w, vocab, threshold, top_p * kept, false, shared);
    }
    const float min_p = a.min_p[row];
    if (min_p_active(min_p)) threshold = max(threshold, __float_as_uint(min_p));

    // 7. inverse CDF over the kept weights, in index order: contiguous chunks, a block scan of their
    //    sums; in double, like the CPU reference, so large vocabularies draw the same token on both
    const int64_t chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int64_t begin = min(vocab, threadIdx.x * chunk), end = min(vocab, begin + chunk);
    double chunk_sum = 0.0;
    int64_t last_kept = -1;
    for (int64_t i = begin; i < end; ++i) {
      if (__float_as_uint(w[i]) >= threshold) {
        chunk_sum += w[i];
        last_kept = i;
      }
    }
    __shared__ double shared_d[32];
    const double total = block_sum(chunk_sum, shared_d);
    const double target = static_cast<double>(sampler_uniform(static_cast<uint64_t>(a.seed[row]),
                                                              static_cast<uint64_t>(a.offset[row]))) * total;
    using Scan = cub::BlockScan<double, kThreads>;
    __shared__ typename Scan::TempStorage scan_storage;
    double prefix;
    Scan(scan_storage).ExclusiveSum(chunk_sum, prefix);
    __shared__ unsigned long long picked;
    __shared__ unsigned long long last_any_plus_one;
    if (threadIdx.x == 0) {
      picked = ~0ull;
      last_any_plus_one = 0;
    }
    __syncthreads();
    if (last_kept >= 0) atomicMax(&last_any_plus_one, static_cast<unsigned long long>(last_kept + 1));
    if (last_kept >= 0 && prefix <= target && target < prefix + chunk_sum) {
      double running = prefix;
      int64_t choice = last_kept;
      for (int64_t i = begin; i < end; ++i) {
        if (__float_as_uint(w[i]) < threshold) continue;
        running += w[i];
        if (running > target) {
          choice = i;
          break;
        }
      }
      atomicMin(&picked, static_cast<unsigned long long>(choice));
    }
    __syncthreads();
    // rounding may leave the target just past the total: take the last kept token
    if (picked != ~0ull) token = static_cast<int64_t>(picked);
    else if (last_any_plus_one > 0) token = static_cast<int64_t>(last_any_plus_one) - 1;
  }

  if (threadIdx.x == 0) {
    a.out[row] = token;
    a.offset[row] += 1;
    if (a.append && hist_len < cap) {
      hist[hist_len] = token;
      a.history_len[row] = hist_len + 1;
    }
  }
}

}  // namespace

void sample_cuda(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
                 const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
                 const torch::Tensor& min_p, const torch::Tensor& repetition_penalty, const torch::Tensor& seed,
                 const torch::Tensor& offset, const torch::Tensor& out, bool append_to_history) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  auto workspace = torch::empty({rows, vocab}, logits.options().dtype(torch::kFloat32));
  RowArgs a{temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
            min_p.data_ptr<float>(), repetition_penalty.data_ptr<float>(), seed.data_ptr<int64_t>(),
            offset.data_ptr<int64_t>(), history.data_ptr<int64_t>(), history_len.data_ptr<int64_t>(),
            history.size(1), out.data_ptr<int64_t>(), append_to_history};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  switch (logits.scalar_type()) {
    case torch::kFloat32:
      sample_kernel<float><<<rows, kThreads, 0, stream>>>(logits.data_ptr<float>(), logits.stride(0), vocab,
                                                          workspace.data_ptr<float>(), a);
      break;
    case torch::kFloat16:
      sample_kernel<__half><<<rows, kThreads, 0, stream>>>(
          reinterpret_cast<const __half*>(logits.data_ptr<at::Half>()), logits.stride(0), vocab,
          workspace.data_ptr<float>(), a);
      break;
    case torch::kBFloat16:
      sample_kernel<__nv_bfloat16><<<rows, kThreads, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(logits.data_ptr<at::BFloat16>()), logits.stride(0), vocab,
          workspace.data_ptr<float>(), a);
      break;
    default:
      HJCG_CHECK_FMT(false, "logits must be float32, float16 or bfloat16, got %s", c10::toString(logits.scalar_type()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
