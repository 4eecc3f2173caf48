// The token-bitmask kernel (semantics: token_bitmask_ref.h): one thread per 32-bit word, which skips its
// 32 logits at once when every bit is set, so an unconstrained row costs one read of its words.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "ops.h"
#include "token_bitmask_ref.h"

namespace hjcg {
namespace {

__global__ void apply_token_bitmask_kernel(float* __restrict__ logits, int64_t vocab, int64_t logits_stride,
                                           const int32_t* __restrict__ bitmask, int64_t words) {
  const int64_t word = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (word >= words) return;
  const int64_t row = blockIdx.y;
  const uint32_t bits = static_cast<uint32_t>(bitmask[row * words + word]);
  if (bits == 0xFFFFFFFFu) return;
  float* out = logits + row * logits_stride + word * 32;
  const int64_t count = min(static_cast<int64_t>(32), vocab - word * 32);
  for (int64_t i = 0; i < count; ++i) {
    if (!((bits >> i) & 1u)) out[i] = -INFINITY;
  }
}

}  // namespace

void apply_token_bitmask_cuda(const torch::Tensor& logits, const torch::Tensor& bitmask) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const int64_t words = (vocab + 31) / 32;
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((words + threads - 1) / threads), static_cast<unsigned>(rows));
  apply_token_bitmask_kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), vocab, logits.stride(0), bitmask.data_ptr<int32_t>(), bitmask.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
