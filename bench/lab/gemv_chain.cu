// Lab harness (not built with the product): the Llama-2-7B decode GEMV chain in a CUDA graph under
// several kernel configurations; results in bench/results/2026-11-22-h100-gemv-lab/. Build:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o gemv_chain bench/lab/gemv_chain.cu
// Lab: one Llama-2-7B decode step's GEMV chain (32 layers + lm head) in a CUDA graph, kernel variants.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  const __half2* p = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) { float2 f = __half22float2(p[i]); out[2*i] = f.x; out[2*i+1] = f.y; }
}
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" :::); }

constexpr int kChunk = 256;

// MODE 0: baseline; 1: PDL wait first; 2: PDL, first loads before wait; 3: PDL + pipelined (next loads
// issued before compute), first loads before wait
template <int WARPS, int ROWS, int LOADS, bool PIPE, bool PDL, bool SILU>
__global__ void __launch_bounds__(WARPS * 32) gemv(const __half* __restrict__ x, const __half* __restrict__ W,
    int k_dim, int n_dim, float eps, const __half* residual, __half* out) {
  constexpr int U = LOADS / ROWS;
  if (PDL) pdl_trigger();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * WARPS + warp) * ROWS;
  if (row0 >= n_dim) { if (PDL) pdl_wait(); return; }
  const __half* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = W + (size_t)min(row0 + r, n_dim - 1) * k_dim;
  float acc[ROWS] = {};
  float ss = 0.f;
  uint4 w[U][ROWS];
  auto load = [&](int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kChunk;
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        w[u][r] = k < k_dim ? __ldcs(reinterpret_cast<const uint4*>(rows[r] + k)) : make_uint4(0,0,0,0);
    }
  };
  auto compute = [&](int k0, uint4 (&wv)[U][ROWS]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kChunk;
      if (k >= k_dim) break;
      float xv[8];
      if (SILU) {
        float g[8], up[8];
        unpack8(__ldg(reinterpret_cast<const uint4*>(x + k)), g);
        unpack8(__ldg(reinterpret_cast<const uint4*>(x + k_dim + k)), up);
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = g[i] / (1.f + __expf(-g[i])) * up[i];
      } else {
        unpack8(__ldg(reinterpret_cast<const uint4*>(x + k)), xv);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) ss = fmaf(xv[i], xv[i], ss);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float f[8]; unpack8(wv[u][r], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r] = fmaf(f[i], xv[i], acc[r]);
      }
    }
  };
  const int step = kChunk * U;
  int k0 = lane * 8;
  load(k0);
  if (PDL) pdl_wait();
  if (PIPE) {
    for (; k0 < k_dim; k0 += step) {
      uint4 cur[U][ROWS];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) cur[u][r] = w[u][r];
      if (k0 + step < k_dim) load(k0 + step);
      compute(k0, cur);
    }
  } else {
    for (;;) {
      compute(k0, w);
      k0 += step;
      if (k0 >= k_dim) break;
      load(k0);
    }
  }
  float scale = eps >= 0.f ? rsqrtf(warp_sum(ss) / k_dim + eps) : 1.f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float d = warp_sum(acc[r]);
    const int row = row0 + r;
    if (lane == 0 && row < n_dim) out[row] = __float2half((residual ? __half2float(residual[row]) : 0.f) + scale * d);
  }
}

// a small "attention-like" kernel between qkv and o: reads `bytes` of cache, writes 4096 outputs
template <bool PDL>
__global__ void small_kernel(const __half* __restrict__ src, const __half* __restrict__ qkv, int n, __half* out) {
  if (PDL) { pdl_trigger(); pdl_wait(); }
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += __half2float(src[i]);
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < 4096) out[j] = __float2half(__half2float(qkv[j]) + s * 1e-9f);
}


template <int WARPS, int ROWS, int LOADS, bool PIPE, bool PDL, bool SILU>
void launch_one(cudaStream_t s, const __half* x, const __half* W, int k, int n, float eps, const __half* res, __half* out) {
  const int blocks = (n + WARPS * ROWS - 1) / (WARPS * ROWS);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = blocks; cfg.blockDim = WARPS * 32; cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr; cfg.numAttrs = PDL ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, gemv<WARPS, ROWS, LOADS, PIPE, PDL, SILU>, x, W, k, n, eps, res, out));
}
using Fn = void (*)(cudaStream_t, const __half*, const __half*, int, int, float, const __half*, __half*);
// per shape: qkv, o, gate_up, down(silu), lm
struct Variant { const char* name; Fn f[5]; bool pdl; };
#define K(W, R, L, P, D, S) launch_one<W, R, L, P, D, S>

__global__ void fill(__half* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2half(((h & 0xffff) / 65536.f - 0.5f) * 0.02f);
  }
}

int main() {
  const int H = 4096, F = 11008, QKV = 12288, V = 32000, L = 32;
  const size_t per_layer = (size_t)QKV * H + (size_t)H * H + (size_t)2 * F * H + (size_t)H * F;
  const size_t total = per_layer * L + (size_t)V * H;
  __half* wbuf; CK(cudaMalloc(&wbuf, total * 2));
  fill<<<4096, 256>>>(wbuf, total, 1); CK(cudaGetLastError());
  __half *x, *qkv, *attn, *gu, *logits, *cache;
  CK(cudaMalloc(&x, H * 2)); CK(cudaMalloc(&qkv, QKV * 2)); CK(cudaMalloc(&attn, H * 2));
  CK(cudaMalloc(&gu, 2 * F * 2)); CK(cudaMalloc(&logits, V * 2)); CK(cudaMalloc(&cache, 1 << 22));
  fill<<<16, 256>>>(x, H, 2); fill<<<256, 256>>>(cache, 1 << 21, 3);
  CK(cudaDeviceSynchronize());
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const double bytes = (double)total * 2;
  std::vector<Variant> vs = {
    {"A product W4L8 R2/1/4/1/4", {K(4,2,8,false,false,false), K(4,1,8,false,false,false), K(4,4,8,false,false,false), K(4,1,8,false,false,true), K(4,4,8,false,false,false)}, false},
    {"B best-per-shape", {K(4,2,4,false,false,false), K(4,2,4,true,false,false), K(4,2,4,true,false,false), K(4,4,4,true,false,true), K(4,2,4,true,false,false)}, false},
    {"C best-per-shape+PDL", {K(4,2,4,false,true,false), K(4,2,4,true,true,false), K(4,2,4,true,true,false), K(4,4,4,true,true,true), K(4,2,4,true,true,false)}, true},
    {"D all R2 L4 pipe", {K(4,2,4,true,false,false), K(4,2,4,true,false,false), K(4,2,4,true,false,false), K(4,2,4,true,false,true), K(4,2,4,true,false,false)}, false},
    {"E all R2 L4 pipe+PDL", {K(4,2,4,true,true,false), K(4,2,4,true,true,false), K(4,2,4,true,true,false), K(4,2,4,true,true,true), K(4,2,4,true,true,false)}, true},
    {"F all R2 L8", {K(4,2,8,false,false,false), K(4,2,8,false,false,false), K(4,2,8,false,false,false), K(4,2,8,false,false,true), K(4,2,8,false,false,false)}, false},
    {"G R4 L4 pipe all", {K(4,4,4,true,false,false), K(4,4,4,true,false,false), K(4,4,4,true,false,false), K(4,4,4,true,false,true), K(4,4,4,true,false,false)}, false},
    {"H R4 L4 pipe all+PDL", {K(4,4,4,true,true,false), K(4,4,4,true,true,false), K(4,4,4,true,true,false), K(4,4,4,true,true,true), K(4,4,4,true,true,false)}, true},
  };
  const int small_blocks = 64, small_n = 1 << 20;
  for (int with_small = 0; with_small < 2; ++with_small)
  for (auto& v : vs) {
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    __half* w = wbuf;
    for (int l = 0; l < L; ++l) {
      v.f[0](s, x, w, H, QKV, 1e-5f, nullptr, qkv); w += (size_t)QKV * H;
      const __half* o_in = qkv;
      if (with_small) {
        if (v.pdl) {
          cudaLaunchConfig_t cfg = {}; cfg.gridDim = small_blocks; cfg.blockDim = 128; cfg.stream = s;
          cudaLaunchAttribute a[1]; a[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
          a[0].val.programmaticStreamSerializationAllowed = 1; cfg.attrs = a; cfg.numAttrs = 1;
          CK(cudaLaunchKernelEx(&cfg, small_kernel<true>, (const __half*)cache, (const __half*)qkv, small_n, attn));
        } else {
          small_kernel<false><<<small_blocks, 128, 0, s>>>(cache, qkv, small_n, attn);
        }
        o_in = attn;
      }
      v.f[1](s, o_in, w, H, H, -1.f, x, x); w += (size_t)H * H;
      v.f[2](s, x, w, H, 2 * F, 1e-5f, nullptr, gu); w += (size_t)2 * F * H;
      v.f[3](s, gu, w, F, H, -1.f, x, x); w += (size_t)H * F;
    }
    v.f[4](s, x, w, H, V, 1e-5f, nullptr, logits);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 5; ++i) CK(cudaGraphLaunch(ge, s));
    std::vector<float> t;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 30; ++i) {
      cudaEventRecord(a, s); CK(cudaGraphLaunch(ge, s)); cudaEventRecord(b, s); CK(cudaEventSynchronize(b));
      float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    printf("%-28s small=%d  median %.3f ms  min %.3f  -> %.2f TB/s\n", v.name, with_small, t[15], t[0], bytes / (t[15] * 1e-3) / 1e12);
    fflush(stdout);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
  }
  return 0;
}
