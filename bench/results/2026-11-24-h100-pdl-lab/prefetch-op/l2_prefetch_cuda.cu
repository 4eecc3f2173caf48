// Warms the GPU's L2 cache with the first bytes of a tensor that a later kernel will stream: launched on a side
// stream beside the kernel before it (or beside attention, which leaves memory idle), so the DRAM traffic of the
// next weight matrix starts while the GPU would otherwise wait on a kernel boundary or on latency-bound work.
// Only a hint: nothing reads what it fetches, and a fetch that comes too late or is evicted costs a DRAM read
// the consumer would have made anyway.
//
// Two ways to issue it (the lab bench/lab/l2_prefetch.py measures both):
//   kBulk: each thread hands `piece`-byte ranges to its SM's copy engine (cp.async.bulk.prefetch.L2, sm_90);
//   kLines: each thread issues one prefetch.global.L2 per 128-byte line, marked evict_last so the consumer's
//           evict-first weight stream does not push the lines out before they are read.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "ops.h"

namespace hjcg {
namespace {

constexpr int64_t kLineBytes = 128;
constexpr int kThreads = 128;
enum Mode : int64_t { kBulk = 0, kLines = 1 };

__global__ void bulk_prefetch_kernel(const uint8_t* base, int64_t bytes, int64_t piece) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * piece;
  for (int64_t off = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * piece; off < bytes;
       off += stride) {
    const uint32_t size = static_cast<uint32_t>(min(piece, bytes - off));  // multiples of 16 (checked on the host)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + off), "r"(size) : "memory");
#endif
  }
}

__global__ void line_prefetch_kernel(const uint8_t* base, int64_t bytes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kLineBytes;
  for (int64_t off = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kLineBytes; off < bytes;
       off += stride)
    asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(base + off));
}

}  // namespace

void l2_prefetch_cuda(const torch::Tensor& t, int64_t bytes, int64_t mode, int64_t blocks, int64_t piece) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "l2_prefetch: t must be a contiguous CUDA tensor, got ",
              t.device(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(mode == kBulk || mode == kLines, "l2_prefetch: mode must be 0 (bulk) or 1 (lines), got ", mode);
  TORCH_CHECK(blocks >= 1 && blocks <= 65535, "l2_prefetch: blocks must be in 1..65535, got ", blocks);
  TORCH_CHECK(piece >= 16 && piece % 16 == 0 && piece <= std::numeric_limits<int32_t>::max(),
              "l2_prefetch: piece must be a positive multiple of 16 bytes, got ", piece);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "l2_prefetch: t must be 16-byte aligned");
  const int64_t total = t.numel() * static_cast<int64_t>(t.element_size());
  bytes = std::min(bytes, total) / 16 * 16;  // the bulk copy's unit
  if (bytes <= 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* base = static_cast<const uint8_t*>(t.data_ptr());
  if (mode == kBulk) bulk_prefetch_kernel<<<static_cast<int>(blocks), kThreads, 0, stream>>>(base, bytes, piece);
  else line_prefetch_kernel<<<static_cast<int>(blocks), kThreads, 0, stream>>>(base, bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
