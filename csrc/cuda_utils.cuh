// Small device helpers shared by the kernels: warp/block reductions and dtype conversion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hjcg {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// RoPE of the pair (a, b) = (x[i], x[i + D/2]) with the cos and sin at the output's own dimension: the first
// half's value a cos - b sin, the second's b cos + a sin. Each product rounded before the sum (no contraction into
// an FMA), so every kernel that rotates (rope_cache, the decode attention) gets the same bits.
__device__ __forceinline__ float rope_first(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rope_second(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `shared` holds at least 32 values. Samplers sum in
// double over 100k+ weights, where float rounding would move the sampling boundaries.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : T(0);
  return warp_sum(v);
}

// (value, index) argmax with the lowest index on ties; every thread gets the result.
struct ArgMax {
  float value;
  int64_t index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, a.value, o),
                 static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(a.index), o))};
    a = better(a, other);
  }
  return a;
}

__device__ __forceinline__ ArgMax block_argmax(ArgMax a, float* shared_v, int64_t* shared_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  a = warp_argmax(a);
  __syncthreads();
  if (lane == 0) {
    shared_v[warp] = a.value;
    shared_i[warp] = a.index;
  }
  __syncthreads();
  a = lane < warps ? ArgMax{shared_v[lane], shared_i[lane]} : ArgMax{-INFINITY, INT64_MAX};
  return warp_argmax(a);
}

}  // namespace hjcg
