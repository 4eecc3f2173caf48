// Marks functions that compile for both the host (CPU references) and the device (CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define HJCG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HJCG_HOST_DEVICE inline
#endif
