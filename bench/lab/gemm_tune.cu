// Lab harness (not built with the product): the Llama-2-7B prefill GEMMs (qkv, o, gate_up, down) at
// several prompt buckets, timed with cuBLAS's default choice (what torch.mm calls) against every
// algorithm cuBLASLt's heuristic offers. Question it answers: is there a faster tiling of the token
// dimension than the one the default picks (128-row token tiles waste 22% of the work at 400 tokens)?
// Build (on the GPU machine; CUBLAS_HOME holds include/cublasLt.h and lib/libcublasLt.so.*):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -I$CUBLAS_HOME/include bench/lab/gemm_tune.cu \
//        -L$CUBLAS_HOME/lib -l:libcublasLt.so.13 -l:libcublas.so.13 -o gemm_tune
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)
#define CB(x) do { int st_ = (int)(x); if (st_ != 0) { printf("%s:%d cublas status %d\n", __FILE__, __LINE__, st_); exit(1);} } while (0)

struct Shape { const char* name; int n, k; };  // out features, in features
constexpr Shape kShapes[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
constexpr int kLayers = 32;
constexpr size_t kWorkspace = 32u << 20;
constexpr int kIters = 30;

// random fp16 in [-1, 1): the tensor cores' power draw, and so the clock they settle at, depends on the data
__global__ void fill_random(__half* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    p[i] = __float2half((h & 0xffff) / 32768.f - 1.f);
  }
}

template <typename F> float time_ms(F&& f) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  CK(cudaEventRecord(a));
  for (int i = 0; i < kIters; ++i) f();
  CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
  float ms; CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaEventDestroy(a)); CK(cudaEventDestroy(b));
  return ms / kIters;
}

int main(int argc, char** argv) {
  std::vector<int> tokens = {16, 64, 128, 208, 256, 304, 384, 400, 416, 432, 448, 480, 512};
  if (argc > 1) { tokens.clear(); for (int i = 1; i < argc; ++i) tokens.push_back(atoi(argv[i])); }
  const int max_m = *std::max_element(tokens.begin(), tokens.end());
  __half *x, *w, *y; void* ws;
  CK(cudaMalloc(&x, sizeof(__half) * max_m * 11008));
  CK(cudaMalloc(&w, sizeof(__half) * 22016 * 4096));
  CK(cudaMalloc(&y, sizeof(__half) * max_m * 22016));
  CK(cudaMalloc(&ws, kWorkspace));
  fill_random<<<1024, 256>>>(x, (size_t)max_m * 11008, 1u); CK(cudaGetLastError());
  fill_random<<<1024, 256>>>(w, (size_t)22016 * 4096, 2u); CK(cudaGetLastError());
  cublasHandle_t blas; CB(cublasCreate(&blas));
  CB(cublasSetWorkspace(blas, ws, kWorkspace));
  cublasLtHandle_t lt; CB(cublasLtCreate(&lt));
  const float alpha = 1.f, beta = 0.f;
  printf("tokens shape   default_ms lt_top1_ms best_ms best_index n_algos  (x32 layers per bucket below)\n");
  for (int m : tokens) {
    double sum_default = 0, sum_top1 = 0, sum_best = 0;
    for (const Shape& s : kShapes) {
      // row-major y[m,n] = x[m,k] w[n,k]^T  ==  column-major y^T[n,m] = w^T (op T on k x n) * x^T (k x m)
      const float t_default = time_ms([&] {
        CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, w, CUDA_R_16F, s.k, x, CUDA_R_16F,
                        s.k, &beta, y, CUDA_R_16F, s.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      });
      cublasLtMatmulDesc_t desc; CB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
      CB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
      CB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
      cublasLtMatrixLayout_t a_l, b_l, c_l;
      CB(cublasLtMatrixLayoutCreate(&a_l, CUDA_R_16F, s.k, s.n, s.k));
      CB(cublasLtMatrixLayoutCreate(&b_l, CUDA_R_16F, s.k, m, s.k));
      CB(cublasLtMatrixLayoutCreate(&c_l, CUDA_R_16F, s.n, m, s.n));
      cublasLtMatmulPreference_t pref; CB(cublasLtMatmulPreferenceCreate(&pref));
      uint64_t ws_bytes = kWorkspace;
      CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
      cublasLtMatmulHeuristicResult_t results[64]; int returned = 0;
      CB(cublasLtMatmulAlgoGetHeuristic(lt, desc, a_l, b_l, c_l, c_l, pref, 64, results, &returned));
      float best = 1e30f, top1 = 0.f; int best_i = -1;
      for (int i = 0; i < returned; ++i) {
        if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const float t = time_ms([&] {
          CB(cublasLtMatmul(lt, desc, &alpha, w, a_l, x, b_l, &beta, y, c_l, y, c_l, &results[i].algo, ws,
                            kWorkspace, 0));
        });
        if (i == 0) top1 = t;
        if (t < best) { best = t; best_i = i; }
      }
      int tile = -1, stages = -1, splitk = -1, cluster = -1; size_t written;
      if (best_i >= 0) {
        const cublasLtMatmulAlgo_t& a = results[best_i].algo;
        cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof(cluster), &written);
      }
      printf("%6d %-7s %9.4f %9.4f %9.4f %4d/%-3d tile=%d stages=%d splitk=%d cluster=%d\n", m, s.name, t_default,
             top1, best, best_i, returned, tile, stages, splitk, cluster);
      sum_default += t_default; sum_top1 += top1; sum_best += best;
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(a_l); cublasLtMatrixLayoutDestroy(b_l); cublasLtMatrixLayoutDestroy(c_l);
      cublasLtMatmulDescDestroy(desc);
    }
    printf("BUCKET %4d  default %.3f ms  lt_top1 %.3f ms  best %.3f ms  (x32 layers)  gain %.1f%%\n", m,
           sum_default * kLayers, sum_top1 * kLayers, sum_best * kLayers, 100.0 * (1 - sum_best / sum_default));
    fflush(stdout);
  }
  cublasLtDestroy(lt); cublasDestroy(blas);
  return 0;
}
