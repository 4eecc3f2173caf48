// Programmatic dependent launch (Hopper, sm_90+): a kernel launched with it may start while the kernel before it in
// the stream is still running. It does what does not depend on that kernel first (a GEMV requests its first weight
// batches), then waits for it to finish and its writes to be visible (wait()), before it reads or writes anything
// that kernel, or any earlier one it overlaps, touches. What was written before the step's first such kernel ran
// (the lengths, the block tables, earlier steps' K/V) may be read before the wait: the decode attention does.
// launch_dependents() lets the next such kernel start once every block of this grid has called it. Measured on the
// H100 (bench/results/2026-11-24-h100-pdl-lab): the fp8 decode GEMV chain at Llama-2-7B 2.92 -> 2.81 ms, the
// tensor-core GEMV over fp16 weights 4.96 -> 4.70.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <utility>

namespace hjcg::pdl {

// Both do nothing in a grid launched without programmatic dependent launch.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether the current device launches with it (compute capability 9.0 or newer).
bool supported();

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch when `enabled` and supported
// (the kernel must then call wait() before touching what earlier kernels write or read); checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool enabled,
            Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = enabled && supported() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace hjcg::pdl
