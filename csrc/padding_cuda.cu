// The padding kernel: one launch writes a prompt chunk, its pads, positions, last-row index and the
// sequence length into a prefill graph's static inputs (semantics: padding_ref.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace hjcg {
namespace {

__global__ void pad_prompt_kernel(const int64_t* __restrict__ prompt, int64_t length, int64_t start_pos,
                                  int64_t bucket, int64_t pad_id, int64_t* __restrict__ input_ids,
                                  int64_t* __restrict__ positions, int64_t* last_index, int64_t* seq_len) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < bucket) {
    input_ids[i] = i < length ? prompt[i] : pad_id;
    positions[i] = start_pos + i;
  }
  if (i == 0) {
    *last_index = length - 1;
    *seq_len = start_pos + length;
  }
}

}  // namespace

void pad_prompt_cuda(const torch::Tensor& prompt, int64_t start_pos, int64_t pad_id, const torch::Tensor& input_ids,
                     const torch::Tensor& positions, const torch::Tensor& last_index, const torch::Tensor& seq_len) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  // A host prompt is copied in on the same stream (pinned memory makes that copy asynchronous).
  const torch::Tensor device_prompt = prompt.to(input_ids.device(), /*non_blocking=*/true).contiguous();
  const int64_t bucket = input_ids.size(0);
  const int threads = 256;
  const int blocks = static_cast<int>((bucket + threads - 1) / threads);
  pad_prompt_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      device_prompt.data_ptr<int64_t>(), device_prompt.size(0), start_pos, bucket, pad_id,
      input_ids.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), last_index.data_ptr<int64_t>(),
      seq_len.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
