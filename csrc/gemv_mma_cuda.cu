// The tensor-core GEMV, over fp8 (e4m3) weights (hjcg/fp8.py: W ~= q * w_scale[:, None], one float32 scale per
// output row) or over fp16/bf16 weights of the activations' dtype (w_scale = 1; for decode steps of 5..16 rows, where
// the CUDA-core GEMV of gemv_cuda.cu is bound on its FMAs):
//
// 1. The weight-streaming GEMV of a decode step or a short prompt chunk (B = 1..16 input rows):
//      out[b, n] = residual[b, n] + s_b * (w_scale[n] * sum_k q[n, k] x'[b, k])
//    with the fp16 GEMV's fusions (gemv_cuda.cu): x' = x, or silu(gate) * up of a [B, 2K] gate/up input;
//    s_b = 1 / rms(x_b) when rms_eps >= 0 (the norm's weight folded into W before quantization), else 1;
//    residual [B, N] may be out (in place). Activations and outputs fp16 or bf16, fp32 accumulation.
// 2. quantize_rows: per-token e4m3 activations for the fp8 GEMMs (torch._scaled_mm) of longer chunks, the
//    same rounding as hjcg.fp8.quantize_rows.
//
// Why tensor cores in a GEMV: e4m3 halves the bytes, so the kernel must take in twice the weights per second
// of the fp16 one. On CUDA cores each weight costs a conversion to fp32 (two instructions per weight, e4m3x2
// -> f16x2 -> 2 x f32) plus one FMA per input row: at 3 TB/s that is about 10 issue slots per weight, so the
// loop would be compute-bound from about 4 rows (counted as for the fp16 kernel's notes; not measured). Here
// the weights are converted once (one cvt.rn.f16x2.e4m3x2 per two weights; three more for bf16) and
// multiplied by all input rows with mma.sync m16n8k16: A = the input rows (m: up to 16 rows; the rows past B
// are zeros), B = 8 weight rows (n), C = fp32. One mma covers 8 weight rows x 16 columns for every input row,
// so the work per byte hardly depends on B and 16 rows stream about as fast as 1.
//
// fp16/bf16 weights take the same path with nothing to convert: a lane's 16 bytes are 8 columns and two mmas
// (WeightFormat), so a weight byte costs about half the instructions of an e4m3 one.
//
// Layout (e4m3; fp16/bf16 weights: 32-column chunks, 8 columns per lane). A block takes 8 weight rows (16, two
// tiles, past 8 input rows: see gemv_mma_ring_kernel); its `split` warps (kDefaultSplit) share them, each summing
// batches of kDepth 64-column chunks in turn, and the block adds
// the warps' partial sums through shared memory at the end (a warp per 8 rows alone would leave too few warps,
// and bytes in flight, for 4096-row matrices). In a chunk,
// lane (g, t) = (lane / 4, lane % 4) loads 16 bytes (16 weights) of weight row g at columns 16t..16t+15 and the
// same 16 columns of input rows g and g + 8: mma j (0..3) takes its columns 16t+4j..16t+4j+3 as the fragment
// slots (2t, 2t+1, 2t+8, 2t+9) that PTX assigns the lane in A and in B, so both operands agree on which slot is
// which column and the sum over a chunk's 64 columns is the dot product. x (a few KB to 350 KB) comes from L2 or
// L1.
//
// Batch invariance: row b's result is bit-identical whatever B is. Every kernel instance runs the same
// instructions for any B (B only says which lanes load input rows and which outputs are written); C[b][n] of
// an mma depends on row b of A and column n of B alone; the chunk order, the warps' order in the final sums and
// the norm's order (per lane over its chunks, then shuffles, then warps; one row computes the same sums before
// its main loop, see square_sums_before) are fixed. With silu_mul and B = 1 the activation is
// computed in the kernel (each lane two values, moved into the fragments by shuffles); for B > 1 a small kernel
// (gemv::silu_mul_rows) computes it first into a [B, K] buffer with the same expression (silu_mul_rounded):
// computing B rows' activations in every block would make the kernel bound on the special-function units.
// Measured (bench/results/2026-11-23-h100-fp8-lab, -fp8-ring-lab): the Llama-2-7B chain in 2.91 ms at 1 row
// (2.27 TB/s; the fp16 GEMV 4.71 ms, 2.81 TB/s), 2.99 ms at 8 rows, 4.57 ms at 16.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "gemv_common.cuh"
#include "ops.h"
#include "pdl.cuh"

namespace hjcg {
namespace {

using gemv::bit_cast;

constexpr int kRowsPerBlock = 8;    // the mma's n
constexpr int kMaxInputRows = 16;   // the mma's m
constexpr int kLaneBytes = 16;      // one 16-byte weight load per lane and chunk
constexpr int kChunkBytes = 4 * kLaneBytes;  // a chunk: 4 lanes' loads on each of the 8 rows
constexpr int kMaxSplit = 8;
// The launch shape, from bench/lab/fp8_gemv.py's sweeps of the Llama-2-7B chain on the H100 (2026-11-23,
// bench/results/2026-11-23-h100-fp8-lab): 8 warps per block sharing its rows, 2 chunks per warp and batch:
// 2.98-3.03 ms at 1 row, 3.10-3.12 at 8 (4 warps: 3.10-3.13, 3.19-3.20; 4 chunks per batch: 3.19-3.64; 8 chunks:
// 3.66-5.27, too many registers for enough warps; loading 4 rows x 128 bytes per instruction, whole lines, and
// moving them into the fragments by shuffles: 3.48-4.05). At 16 rows 4 warps would do better (4.26 ms against
// 4.74), but one shape serves every row count: the warps' partial sums, and so a row's bits, depend on it.
constexpr int kDefaultSplit = 8;
constexpr int kDefaultDepth = 2;
// Batches in flight per warp: 1, the register path (the next batch in registers); 2..8, the cp.async ring. The
// ring with 2 stages (bench/results/2026-11-23-h100-fp8-ring-lab): 2.91 ms at 1 row, 2.99 at 8, 4.57 at 16,
// against 3.00 / 3.11 / 4.73 in registers; more stages were slower (3 stages 3.03 at 1 row, 4: 3.12, 6: 3.24),
// so the weight bytes in flight are not what holds the kernel at 2.3 TB/s.
constexpr int kDefaultStages = 2;
// Tiles of 8 weight rows per block when more than 8 input rows come (one tile below): each chunk's inputs then serve
// 16 weight rows. Rows' bits do not depend on it (see gemv_mma_ring_kernel).
constexpr int kDefaultTilesPast8Rows = 2;
constexpr int kMaxStages = 8;
// fp16/bf16 weights (bench/results/2026-11-23-h100-mma-gemv-lab, the fp16 Llama-2-7B chain): the ring copied by
// whole rows (RowLines), 4 chunks per batch, one tile at any row count: 4.94 ms at 1 row, 5.00 at 4, 5.04 at 8 (cuBLAS
// 5.05-5.14; by fragments at 2 chunks: 5.10, 5.17, 5.23); at 16 rows 6.20 (cuBLAS 5.09), where the engine uses cuBLAS.
// For e4m3 weights the copy by rows was slower (2.92 -> 3.18 ms at 1 row, 2.99 -> 3.14 at 8), so they keep the
// fragment order and the shape above.
constexpr int kDefaultDepthInputDtype = 4;
constexpr float kFp8Max = 448.f;    // e4m3's largest finite value (hjcg.fp8.FP8_MAX)

// Where a kernel computes the norm's sums of squares (rms_eps >= 0): kNone, no norm; kInLoop, each lane adds its
// chunks' squares as the main loop loads them (several rows); kBefore, before the main loop (one row: see
// square_sums_before). Both give a row the same bits.
enum class Norm { kNone, kInLoop, kBefore };

// The mma on T, and two e4m3 weights (the lower-indexed in the low byte) as one 32-bit word of T2, exactly.
template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ uint32_t weights(uint16_t pair) {
    return bit_cast<uint32_t>(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));  // one instruction on sm_89+
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__nv_bfloat16> {
  // no e4m3 -> bf16 instruction: through f16 (exact: e4m3 values are f16 and bf16 values)
  static __device__ __forceinline__ uint32_t weights(uint16_t pair) {
    const float2 f = __half22float2(bit_cast<__half2>(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    return bit_cast<uint32_t>(__floats2bfloat162_rn(f.x, f.y));  // one packing conversion
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The weights' element type: e4m3, or T itself (fp16/bf16 weights of the activations' dtype).
struct E4m3 {};

// A lane's 16-byte load of one weight row (words wq) as B fragments: columns 4j .. 4j + 3 of the lane's as two words
// of T2 (b0: 4j, 4j + 1; b1: 4j + 2, 4j + 3), for mma j of WeightFormat's kColumns / 4.
template <typename T, typename W> struct WeightFormat;
template <typename T> struct WeightFormat<T, E4m3> {
  static constexpr int kColumns = 16;  // per lane and chunk
  static constexpr int kElementBytes = 1;
  static __device__ __forceinline__ void b_fragments(const uint32_t (&wq)[4], int j, uint32_t& b0, uint32_t& b1) {
    b0 = Mma<T>::weights(static_cast<uint16_t>(wq[j] & 0xffffu));
    b1 = Mma<T>::weights(static_cast<uint16_t>(wq[j] >> 16));
  }
};
template <typename T> struct WeightFormat<T, T> {
  static constexpr int kColumns = 8;
  static constexpr int kElementBytes = 2;
  static __device__ __forceinline__ void b_fragments(const uint32_t (&wq)[4], int j, uint32_t& b0, uint32_t& b1) {
    b0 = wq[2 * j];
    b1 = wq[2 * j + 1];
  }
};

// A chunk's mmas for a lane: its 16-byte weight load w against the A fragments of the same columns (lo: input row g,
// hi: row g + 8, as words of T2, columns 2i and 2i + 1 in word i). mma j takes the lane's columns 4j .. 4j + 3 as the
// fragment slots (2t, 2t+1, 2t+8, 2t+9) in A and in B (see Layout).
template <typename T, typename W>
__device__ __forceinline__ void chunk_mma(const uint4& w, const uint32_t (&lo)[WeightFormat<T, W>::kColumns / 2],
                                          const uint32_t (&hi)[WeightFormat<T, W>::kColumns / 2], float (&acc)[4]) {
  const uint32_t wq[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < WeightFormat<T, W>::kColumns / 4; ++j) {
    const uint32_t frag[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
    uint32_t b0, b1;
    WeightFormat<T, W>::b_fragments(wq, j, b0, b1);
    Mma<T>::mma(acc, frag, b0, b1);
  }
}

struct MmaGemvArgs {
  const void* x;          // [rows, K], or [1, 2K] = [gate, up] with kSiluMul
  const uint8_t* q;       // [N, K] weights: e4m3, or T
  const float* w_scale;   // [N], or nullptr: 1
  int64_t k_dim, n_dim;
  int rows;
  float rms_eps;
  const void* residual;   // [rows, N] or nullptr; may be out
  void* out;              // [rows, N]
};

// A lane's streams: its weight row and its input rows (or, with kSiluMul, the gate and up values of its two
// columns of the chunk) at its first column; chunk c is c * kChunkColumns further on (c * kChunkBytes in the weight
// row). 32-bit offsets (K < 2^29, checked on the host: K bytes of fp16 fit an int) keep the per-chunk address
// arithmetic small. Everything past the rows or the columns reads as zeros.
template <typename T, typename W, bool kSiluMul, bool kHi>
struct LaneStreams {
  static constexpr int kColumns = WeightFormat<T, W>::kColumns;
  static constexpr int kWords = kColumns / 2;           // the lane's columns as words of T2
  static constexpr int kChunkColumns = 4 * kColumns;
  static constexpr int kRowVectors = kColumns * static_cast<int>(sizeof(T)) / 16;  // 16-byte input vectors per row
  static constexpr int kInputVectors = kSiluMul ? 1 : kHi ? 2 * kRowVectors : kRowVectors;
  static_assert(!kSiluMul || kColumns == 16, "the fused activation is laid out for 16 columns per lane");
  const uint8_t* weights;  // row g of the block, the lane's first byte
  int64_t tile_offset;     // bytes from row g of the block's first tile of 8 rows to row g of its second
  const T* lo;             // input row g, column t * kColumns (kSiluMul: gate at column 2l)
  const T* hi;             // input row g + 8, column t * kColumns (kSiluMul: up at column 2l)
  int k_dim, k_bytes, chunks;
  int weight_byte, input_column;  // the lane's first weight byte and input column in a chunk
  bool has_lo, has_hi;            // whether the input rows exist

  __device__ __forceinline__ bool weights_in(int c) const { return c * kChunkBytes + weight_byte < k_bytes; }

  __device__ __forceinline__ uint4 weights_of(int c) const {
    return weights_in(c) ? __ldcs(reinterpret_cast<const uint4*>(weights + c * kChunkBytes)) : make_uint4(0, 0, 0, 0);
  }

  // kSiluMul: v[0].x the gate pair, v[0].y the up pair; else row g's kColumns values, then row g + 8's.
  __device__ __forceinline__ void inputs_of(int c, uint4 (&v)[kInputVectors]) const {
#pragma unroll
    for (auto& e : v) e = make_uint4(0, 0, 0, 0);
    const int off = c * kChunkColumns;
    if (c >= chunks || off + input_column >= k_dim) return;
    if constexpr (kSiluMul) {
      v[0].x = __ldg(reinterpret_cast<const uint32_t*>(lo + off));
      v[0].y = __ldg(reinterpret_cast<const uint32_t*>(hi + off));
    } else {
      if (has_lo) {
#pragma unroll
        for (int i = 0; i < kRowVectors; ++i) v[i] = __ldg(reinterpret_cast<const uint4*>(lo + off) + i);
      }
      if constexpr (kHi) {
        if (has_hi) {
#pragma unroll
          for (int i = 0; i < kRowVectors; ++i)
            v[kRowVectors + i] = __ldg(reinterpret_cast<const uint4*>(hi + off) + i);
        }
      }
    }
  }
};

// kVectors 16-byte vectors as words of T2, columns 2i and 2i + 1 in word i.
template <int kVectors>
__device__ __forceinline__ void to_words(const uint4* v, uint32_t (&words)[4 * kVectors]) {
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    words[4 * i] = v[i].x;
    words[4 * i + 1] = v[i].y;
    words[4 * i + 2] = v[i].z;
    words[4 * i + 3] = v[i].w;
  }
}

// The one-row activation of a chunk, spread over the warp: lane l computes columns 2l, 2l+1 of the chunk from its
// gate and up words, and lane (g, t) takes the 16 columns 16t..16t+15 by shuffles (8 words); rows other than 0
// (g != 0) get zeros. (e4m3 weights only: 16 columns per lane.)
template <typename T>
__device__ __forceinline__ void silu_mul_fragment(uint32_t gate, uint32_t up, int lane, uint32_t (&words)[8]) {
  const float2 g = gemv::word_to_float2<T>(gate), u = gemv::word_to_float2<T>(up);
  const uint32_t pair =
      gemv::float2_to_word<T>(gemv::silu_mul_rounded<T>(g.x, u.x), gemv::silu_mul_rounded<T>(g.y, u.y));
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t v = __shfl_sync(0xffffffffu, pair, 8 * t + i);  // columns 16t + 2i, 16t + 2i + 1
    words[i] = lane < 4 ? v : 0u;
  }
}

// A lane's squares of one chunk's values of a row (its words), summed from 0 in column order: the term that both
// ways of computing the norm add per chunk.
template <typename T, int kWords>
__device__ __forceinline__ float chunk_squares(const uint32_t (&words)[kWords]) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    const float2 f = gemv::word_to_float2<T>(words[i]);
    sum = fmaf(f.x, f.x, sum);
    sum = fmaf(f.y, f.y, sum);
  }
  return sum;
}

// A chunk's A fragments for a lane: input rows g and g + 8 at its columns (in) as words of T2 (lo, hi); with
// Norm::kInLoop their chunk_squares are added to sq.
template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi>
__device__ __forceinline__ void chunk_inputs(const uint4 (&in)[LaneStreams<T, W, kSiluMul, kHi>::kInputVectors],
                                             int lane, uint32_t (&lo)[LaneStreams<T, W, kSiluMul, kHi>::kWords],
                                             uint32_t (&hi)[LaneStreams<T, W, kSiluMul, kHi>::kWords],
                                             float (&sq)[2]) {
  using Streams = LaneStreams<T, W, kSiluMul, kHi>;
  if constexpr (kSiluMul) {
    silu_mul_fragment<T>(in[0].x, in[0].y, lane, lo);
  } else {
    to_words<Streams::kRowVectors>(in, lo);
    if constexpr (kHi) to_words<Streams::kRowVectors>(in + Streams::kRowVectors, hi);
  }
  if constexpr (kNorm == Norm::kInLoop) {
    sq[0] += chunk_squares<T>(lo);
    if constexpr (kHi) sq[1] += chunk_squares<T>(hi);
  }
}

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi>
__device__ __forceinline__ void sum_chunk(const uint4& w,
                                          const uint4 (&in)[LaneStreams<T, W, kSiluMul, kHi>::kInputVectors],
                                          int lane, float (&acc)[4], float (&sq)[2]) {
  constexpr int kWords = LaneStreams<T, W, kSiluMul, kHi>::kWords;
  uint32_t lo[kWords], hi[kWords] = {};
  chunk_inputs<T, W, kSiluMul, kNorm, kHi>(in, lane, lo, hi, sq);
  chunk_mma<T, W>(w, lo, hi, acc);
}

// The warps' sums of squares of the norm's input rows, [warp][row], added in warp order by finish_block.
using SquareSums = float[kMaxSplit][kMaxInputRows];

// A warp's sums of squares of each lane's row (g, g + 8) over the 4 lanes t of the row, in the order of the
// finishing shuffles; lane t == 0 writes them.
template <bool kHi>
__device__ __forceinline__ void store_square_sums(float (&sq)[2], SquareSums& sums) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], 1);
    sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], 2);
  }
  if (t == 0) {
    sums[warp][g] = sq[0];
    if constexpr (kHi) sums[warp][g + 8] = sq[1];
  }
}

// Norm::kBefore, the one-row kernel's sums of squares, computed before its main loop with the bits that kInLoop
// gives. In the loop, warp w's lanes (0, t) would add the chunk_squares of chunks c(s) = ((s / kDepth) * split + w)
// * kDepth + s % kDepth, s = 0, 1, ..., each over the chunk's kColumns columns from t * kColumns. Here lane (j, t)
// of the warp computes slot s0 + j's term (one round of loads for 8 slots), and every lane adds the 8 terms of its t
// in slot order by shuffles; a missing chunk adds +0, which changes nothing. Why: adding the squares in the loop
// took the one-row kernel from 48 to 54 registers (5 -> 4 blocks per SM) and the decode step 0.08-0.13 ms (on the
// CUDA cores or as tensor-core mmas alike); squaring the row once before the loop cost nothing measurable
// (bench/results/2026-11-24-h100-norm-lab). Several rows keep kInLoop: a pass before the loop over all their rows
// made a 10-row GEMV wait on L2 for every block (fp8 TTFT at 10 tokens +0.5 ms).
// s: the lane's streams (one row: every lane's s.lo is row 0 at its column t * kColumns); first, stride: the main
// loop's first chunk and step for this warp, so that the slots run in the loop's order.
template <typename T, int kDepth, typename Streams>
__device__ __forceinline__ void square_sums_before(const Streams& s, int first, int stride, SquareSums& sums) {
  constexpr int kSlots = 8;  // the lanes' j
  const int lane = threadIdx.x & 31, j = lane >> 2, t = lane & 3;
  auto chunk_of = [&](int slot) { return first + (slot / kDepth) * stride + slot % kDepth; };
  static_assert(Streams::kInputVectors >= Streams::kRowVectors, "row 0's values, not the fused activation's pairs");
  Streams row0 = s;  // every lane loads row 0, not only the lanes (0, t) that hold it in the loop
  row0.has_lo = true;
  row0.has_hi = false;
  float sq[2] = {};
  for (int s0 = 0; chunk_of(s0) < s.chunks; s0 += kSlots) {  // uniform over the warp
    uint4 in[Streams::kInputVectors];
    row0.inputs_of(chunk_of(s0 + j), in);
    uint32_t words[Streams::kWords];
    to_words<Streams::kRowVectors>(in, words);
    const float term = chunk_squares<T>(words);
#pragma unroll
    for (int q = 0; q < kSlots; ++q) sq[0] += __shfl_sync(0xffffffffu, term, q * 4 + t);
  }
  // every lane holds row 0's sums: lanes (g, 0) write them as row g's, and only row 0 is read
  store_square_sums<false>(sq, sums);
}

// The block's end: the warps' partial sums (and the norm's sums of squares) added in warp order through shared
// memory, then out = residual + scale * w_scale * dot for the block's kTiles x 8 weight rows. sq: the lane's
// kInLoop sums; partial_sq: where they go (kBefore has filled it already).
template <typename T, Norm kNorm, bool kHi, int kTiles>
__device__ __forceinline__ void finish_block(const MmaGemvArgs& a, const float (&acc)[kTiles][2][4], float (&sq)[2],
                                             SquareSums& partial_sq) {
  constexpr int kRows = kTiles * kRowsPerBlock;
  __shared__ float partial[kMaxSplit][kMaxInputRows][kRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int split = blockDim.x >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    const int n = j * kRowsPerBlock + 2 * t;
    partial[warp][g][n] = acc[j][0][0] + acc[j][1][0];
    partial[warp][g][n + 1] = acc[j][0][1] + acc[j][1][1];
    if constexpr (kHi) {
      partial[warp][g + 8][n] = acc[j][0][2] + acc[j][1][2];
      partial[warp][g + 8][n + 1] = acc[j][0][3] + acc[j][1][3];
    }
  }
  if constexpr (kNorm == Norm::kInLoop) store_square_sums<kHi>(sq, partial_sq);
  __syncthreads();
  for (int i = threadIdx.x; i < a.rows * kRows; i += blockDim.x) {
    const int b = i / kRows, n = i % kRows;
    const int64_t row = row0 + n;
    if (row >= a.n_dim) continue;
    float dot = 0.f, ss = 0.f;
    for (int v = 0; v < split; ++v) {
      dot += partial[v][b][n];
      if constexpr (kNorm != Norm::kNone) ss += partial_sq[v][b];
    }
    const bool normed = kNorm != Norm::kNone && a.rms_eps >= 0.f;
    const float scale = normed ? rsqrtf(ss / static_cast<float>(a.k_dim) + a.rms_eps) : 1.f;
    const float w_scale = a.w_scale != nullptr ? a.w_scale[row] : 1.f;
    const int64_t idx = b * a.n_dim + row;
    const float base = a.residual != nullptr ? to_float(static_cast<const T*>(a.residual)[idx]) : 0.f;
    static_cast<T*>(a.out)[idx] = from_float<T>(base + scale * (w_scale * dot));
  }
}

// The lane's streams for block blockIdx.x of kTiles x 8 weight rows (see Layout above); `weights` is tile 0's row,
// tile j's is j * tile_offset bytes further (clamped to the last row).
template <typename T, typename W, bool kSiluMul, bool kHi, int kTiles = 1>
__device__ __forceinline__ LaneStreams<T, W, kSiluMul, kHi> lane_streams(const MmaGemvArgs& a) {
  using Streams = LaneStreams<T, W, kSiluMul, kHi>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int k_dim = static_cast<int>(a.k_dim);
  const int64_t row_bytes = a.k_dim * WeightFormat<T, W>::kElementBytes;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTiles * kRowsPerBlock;
  const T* x = static_cast<const T*>(a.x);
  Streams streams;
  // rows past N (the last block) read row N - 1 and are not written
  streams.weights = a.q + min(row0 + g, a.n_dim - 1) * row_bytes + t * kLaneBytes;
  const int64_t tile1_row = min(row0 + kRowsPerBlock + g, a.n_dim - 1);
  streams.tile_offset = kTiles > 1 ? (tile1_row - min(row0 + g, a.n_dim - 1)) * row_bytes : 0;
  if constexpr (kSiluMul) {
    streams.lo = x + 2 * lane;
    streams.hi = x + a.k_dim + 2 * lane;
  } else {
    streams.lo = x + static_cast<int64_t>(min(g, a.rows - 1)) * a.k_dim + t * Streams::kColumns;
    streams.hi = x + static_cast<int64_t>(min(g + 8, a.rows - 1)) * a.k_dim + t * Streams::kColumns;
  }
  streams.k_dim = k_dim;
  streams.k_bytes = static_cast<int>(row_bytes);
  streams.chunks = (k_dim + Streams::kChunkColumns - 1) / Streams::kChunkColumns;
  streams.weight_byte = t * kLaneBytes;
  streams.input_column = kSiluMul ? 2 * lane : t * Streams::kColumns;
  streams.has_lo = g < a.rows;
  streams.has_hi = g + 8 < a.rows;
  return streams;
}

// kNorm: where the norm's sums of squares are computed (Norm). kHi: input rows 8..15 present (B > 8). kDepth:
// chunks per warp and batch. The register path (stages = 1): the next batch's weights in registers.
template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth>
__global__ void __launch_bounds__(kMaxSplit * 32) gemv_mma_kernel(const MmaGemvArgs a) {
  static_assert(!(kSiluMul && (kNorm != Norm::kNone || kHi)), "the fused activation is for one row without the norm");
  using Streams = LaneStreams<T, W, kSiluMul, kHi>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Streams streams = lane_streams<T, W, kSiluMul, kHi>(a);
  const int chunks = streams.chunks, stride = (blockDim.x >> 5) * kDepth;

  // Warp w takes kDepth consecutive chunks at a time (chunks (i * split + w) * kDepth + u), their loads issued
  // back to back: 8 rows x kDepth * 64 contiguous bytes, the block's warps side by side. The next batch's
  // weights are in flight while this one is summed; this batch's inputs (from L2 or L1) are all requested
  // before the first is used. (Loading each chunk's input just before its mmas cost an L2 round trip per chunk:
  // 1.9 TB/s; a ring refilling one chunk at a time spread a warp's weight loads out: 1.2-1.5 TB/s.)
  uint4 next[kDepth];
  auto load_weights = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kDepth; ++u) next[u] = streams.weights_of(c0 + u);
  };
  // C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1] (input row, weight row of the block), in two accumulators
  // (even and odd chunks of a batch) so that an mma waits on the one before the last, not the last
  float acc[1][2][4] = {};
  float sq[2] = {};  // Norm::kInLoop: sums of squares of input rows g and g + 8 over this lane's columns
  __shared__ SquareSums partial_sq;
  load_weights(warp * kDepth);
  if constexpr (kNorm == Norm::kBefore) square_sums_before<T, kDepth>(streams, warp * kDepth, stride, partial_sq);
  for (int c0 = warp * kDepth; c0 < chunks; c0 += stride) {
    uint4 w[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) w[u] = next[u];
    if (c0 + stride < chunks) load_weights(c0 + stride);
    uint4 in[kDepth][Streams::kInputVectors];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) streams.inputs_of(c0 + u, in[u]);
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      if (c0 + u >= chunks) break;  // uniform over the warp
      sum_chunk<T, W, kSiluMul, kNorm, kHi>(w[u], in[u], lane, acc[0][u & 1], sq);
    }
  }
  finish_block<T, kNorm, kHi, 1>(a, acc, sq, partial_sq);
}
// cp.async: 16 bytes from global to shared memory without passing through registers, marked evict-first in L2
// (as __ldcs marks the register path's weight loads: the weights stream through once, and must not push the
// inputs, which every block reads again, out of L2); src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void copy_async16(void* dst, const void* src, bool valid, uint64_t policy) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` of this thread's copy groups are still in flight (an immediate in PTX).
__device__ __forceinline__ void wait_async(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
  }
}

// The ring's copy by whole rows (kLines): a warp's batch is 8 rows x kDepth * 64 contiguous bytes of each of its
// tiles. The fragment order (lane (g, t) copying its own 16 bytes of each chunk) makes every copy instruction
// touch 8 rows x 64 bytes, half-lines; here copy instruction i takes rows i * 8 / kDepth .. of the tile whole:
// lane l copies unit l % (4 kDepth) (16 bytes) of row i * 8 / kDepth + l / (4 kDepth), so with kDepth 2 an
// instruction reads 4 whole 128-byte lines. A row's units lie side by side in shared memory, the odd rows' swapped
// in pairs of chunks (unit q at q ^ 4) so that the lanes (g, t) reading chunk u (rows g, units 4u + t) hit distinct
// banks in each quarter warp.
template <int kDepth>
struct RowLines {
  static constexpr int kUnitsPerRow = 4 * kDepth;
  static constexpr int kRowsPerCopy = kRowsPerBlock / kDepth;
  static_assert(kDepth == 1 || kDepth == 2 || kDepth == 4, "a copy instruction takes whole rows");
  int64_t row0, n_dim, row_bytes;
  int copy_row, copy_unit;  // the lane's row (in copy 0) and unit
  int read_base, read_flip;  // the lane's row g start (units) and its chunk swap (odd g)

  __device__ __forceinline__ RowLines(const MmaGemvArgs& a, int64_t weight_row_bytes, int rows_per_block) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    n_dim = a.n_dim;
    row_bytes = weight_row_bytes;
    copy_row = lane / kUnitsPerRow;
    copy_unit = lane % kUnitsPerRow;
    read_base = g * kUnitsPerRow + t;
    read_flip = kDepth >= 2 ? (g & 1) : 0;
  }
  static __device__ __forceinline__ int swizzled(int row, int unit) {
    return kDepth >= 2 ? unit ^ ((row & 1) << 2) : unit;
  }
  // The warp's units of (stage, tile j).
  __device__ __forceinline__ int region(int stage, int j, int tiles, int threads) const {
    const int warps = threads >> 5, warp = threadIdx.x >> 5;
    return ((stage * tiles + j) * warps + warp) * (kRowsPerBlock * kUnitsPerRow);
  }
  __device__ __forceinline__ int write_unit(int i) const {
    const int row = i * kRowsPerCopy + copy_row;
    return row * kUnitsPerRow + swizzled(row, copy_unit);
  }
  __device__ __forceinline__ int read_unit(int u) const { return read_base + ((u ^ read_flip) << 2); }
  // Copy i of tile j for the batch at chunk c0: its global source, and whether it exists (else zeros, and a valid
  // address that is not read). A byte within the row is within the row's chunks.
  __device__ __forceinline__ bool source(const MmaGemvArgs& a, int c0, int i, int j, const uint8_t*& src) const {
    const int64_t row = row0 + j * kRowsPerBlock + i * kRowsPerCopy + copy_row;
    const int64_t byte = static_cast<int64_t>(c0) * kChunkBytes + copy_unit * kLaneBytes;
    const bool ok = row < n_dim && byte < row_bytes;
    src = ok ? a.q + row * row_bytes + byte : a.q;
    return ok;
  }
};

// The ring path (stages >= 2): each lane copies its weights with cp.async into its own slots of a ring in shared
// memory, `stages` batches ahead, so the weight bytes in flight are bounded by shared memory rather than by
// registers (the register path keeps one batch in flight). A lane reads back only what it copied, so no barrier
// is needed: cp.async.wait_group orders its own copies, and a slot is refilled only after the mmas that consumed
// it have issued. Slot (stage, u) of thread i: ring[(stage * kDepth + u) * threads + i], so a warp's 16-byte
// reads are contiguous (no bank conflicts). The inputs go through L1 as in the register path (__ldg, requested at
// the top of the batch, before the wait): the blocks on an SM read the same columns of x at about the same time.
// (Copying the inputs through the ring as well, L2 only, made the chain 1.8x slower at 1 row and 4.7x at 8.)
// kTiles: tiles of 8 weight rows per block, each chunk's A fragments (the inputs) used for all of them, so the
// inputs read from L1 per weight byte fall by kTiles (with 16 input rows they are 4x the weight bytes at one tile).
// A row's products, their order and so its bits do not depend on kTiles.
// kLines: the warp copies its batch by whole rows instead (RowLines below), and each lane reads its fragments'
// bytes from where other lanes put them.
template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth, int kTiles, bool kLines>
__device__ __forceinline__ void ring_gemv(const MmaGemvArgs& a, int stages) {
  static_assert(!(kSiluMul && (kNorm != Norm::kNone || kHi)), "the fused activation is for one row without the norm");
  using Streams = LaneStreams<T, W, kSiluMul, kHi>;
  extern __shared__ uint4 ring[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, threads = blockDim.x;
  const Streams s = lane_streams<T, W, kSiluMul, kHi, kTiles>(a);
  const int chunks = s.chunks, stride = (threads >> 5) * kDepth;
  const uint64_t policy = evict_first_policy();
  const RowLines<kDepth> lines(a, s.k_bytes, kTiles * kRowsPerBlock);
  auto slot = [&](int stage, int u, int j) -> uint4* {
    if constexpr (kLines) return ring + lines.region(stage, j, kTiles, threads) + lines.read_unit(u);
    return ring + ((stage * kDepth + u) * kTiles + j) * threads + threadIdx.x;
  };
  auto fill = [&](int c0, int stage) {  // batch c0's weights into `stage`, one commit group (empty past the end)
    if constexpr (kLines) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const uint8_t* src;
          const bool ok = lines.source(a, c0, i, j, src);
          copy_async16(ring + lines.region(stage, j, kTiles, threads) + lines.write_unit(i), src, ok, policy);
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
        const int c = c0 + u;
        if (c >= chunks) break;
        const bool ok = s.weights_in(c);
        const int off = ok ? c * kChunkBytes : 0;
#pragma unroll
        for (int j = 0; j < kTiles; ++j)
          copy_async16(slot(stage, u, j), s.weights + j * s.tile_offset + off, ok, policy);
      }
    }
    commit_async();
  };
  float acc[kTiles][2][4] = {};
  float sq[2] = {};  // Norm::kInLoop
  __shared__ SquareSums partial_sq;
  const int first = warp * kDepth;
  for (int i = 0; i < stages; ++i) fill(first + i * stride, i);
  // Programmatic dependent launch (pdl.cuh; nothing without it): the weights are constants, so their first
  // batches are requested before waiting on the kernels that write x and residual, and the next kernel may start
  // its own weight reads as this grid's blocks start.
  pdl::launch_dependents();
  pdl::wait();
  if constexpr (kNorm == Norm::kBefore) square_sums_before<T, kDepth>(s, first, stride, partial_sq);
  int stage = 0;
  for (int c0 = first; c0 < chunks; c0 += stride) {
    uint4 in[kDepth][Streams::kInputVectors];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) s.inputs_of(c0 + u, in[u]);
    wait_async(stages - 1);
    if constexpr (kLines) __syncwarp();  // the other lanes' copies, seen by this one
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      if (c0 + u >= chunks) break;  // uniform over the warp
      uint32_t lo[Streams::kWords], hi[Streams::kWords] = {};
      chunk_inputs<T, W, kSiluMul, kNorm, kHi>(in[u], lane, lo, hi, sq);
#pragma unroll
      for (int j = 0; j < kTiles; ++j) chunk_mma<T, W>(*slot(stage, u, j), lo, hi, acc[j][u & 1]);
    }
    if constexpr (kLines) __syncwarp();  // every lane's reads of the stage done before it is refilled
    fill(c0 + stages * stride, stage);
    stage = stage + 1 == stages ? 0 : stage + 1;
  }
  wait_async(0);  // nothing may land in shared memory after the block ends
  finish_block<T, kNorm, kHi, kTiles>(a, acc, sq, partial_sq);
}

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth, int kTiles, bool kLines>
__global__ void __launch_bounds__(kMaxSplit * 32) gemv_mma_ring_kernel(const MmaGemvArgs a, int stages) {
  ring_gemv<T, W, kSiluMul, kNorm, kHi, kDepth, kTiles, kLines>(a, stages);
}

// The one-row e4m3 kernel with the norm before its loop, at the engine's shapes (kFiveBlocks), held to 5 blocks per
// SM: ptxas gives it 50 registers otherwise, 2 past the 48 that 5 blocks of 8 warps fit in (without the norm it takes
// 48). A kernel of its own because naming a minimum of 1 block for the others is not the same as naming none: it
// gave them 4-22 more registers (the fp16-weight GEMV of 3-8 rows 58 -> 65-67, 4 -> 3 blocks per SM, and decode at 4
// and 8 streams 0.2 ms/token slower in bench/results/2026-11-24-h100-271732d). The lab's deeper or two-tile shapes
// would spill at 48, so they keep the plain kernel.
template <typename W, Norm kNorm, int kDepth, int kTiles>
constexpr bool kFiveBlocks = std::is_same_v<W, E4m3> && kNorm == Norm::kBefore && kDepth <= 2 && kTiles == 1;

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth, int kTiles, bool kLines>
__global__ void __launch_bounds__(kMaxSplit * 32, 5) gemv_mma_ring_kernel_5_blocks(const MmaGemvArgs a, int stages) {
  ring_gemv<T, W, kSiluMul, kNorm, kHi, kDepth, kTiles, kLines>(a, stages);
}

// One block per row: amax, the row's scale amax / 448 (1 for an all-zero row), then e4m3(x / scale) with
// IEEE division and round-to-nearest-even, saturating: hjcg.fp8.quantize_rows on the GPU to the bit. 8 values per
// thread and step; the second pass reads the row again from L1/L2.
constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const T* __restrict__ x, int64_t k_dim,
                                                                       uint8_t* __restrict__ q,
                                                                       float* __restrict__ scales) {
  __shared__ float warp_amax[kQuantThreads / 32];
  const T* row = x + blockIdx.x * k_dim;
  auto values = [&](int64_t k, float (&v)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = gemv::word_to_float2<T>(w[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  };
  const int64_t step = static_cast<int64_t>(blockDim.x) * 8;
  float amax = 0.f;
  for (int64_t k = threadIdx.x * 8; k < k_dim; k += step) {
    float v[8];
    values(k, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
  __syncthreads();
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) amax = fmaxf(amax, warp_amax[w]);
  // amax * (1 / 448), not amax / 448: torch on CUDA divides by a scalar that way (a multiplication by the
  // float32 reciprocal), so hjcg.fp8.quantize_rows run on the GPU gives these bits
  const float scale = amax > 0.f ? __fmul_rn(amax, 1.f / kFp8Max) : 1.f;
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  uint8_t* out = q + blockIdx.x * k_dim;
  for (int64_t k = threadIdx.x * 8; k < k_dim; k += step) {
    float v[8];
    values(k, v);
    uint16_t pairs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = make_float2(fminf(fmaxf(__fdiv_rn(v[2 * i], scale), -kFp8Max), kFp8Max),
                                   fminf(fmaxf(__fdiv_rn(v[2 * i + 1], scale), -kFp8Max), kFp8Max));
      pairs[i] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
    }
    *reinterpret_cast<uint2*>(out + k) = bit_cast<uint2>(pairs);
  }
}

// How a call runs: warps per block, chunks per warp and batch, batches in flight, tiles of 8 weight rows per
// block (the lab's knobs; the defaults above).
struct MmaGemvShape {
  int split, depth, stages, tiles;
  bool lines;  // the ring's copies by whole rows (RowLines)
  bool pdl;    // programmatic dependent launch (pdl.cuh; the ring kernel only)
};

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth, int kTiles, bool kLines>
void launch_ring(const MmaGemvArgs& a, MmaGemvShape shape, cudaStream_t stream) {
  const int64_t blocks = (a.n_dim + kTiles * kRowsPerBlock - 1) / (kTiles * kRowsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gemv_mma: weight has too many rows");
  const int threads = shape.split * 32;
  const auto kernel = [] {  // only the one named is compiled
    if constexpr (kFiveBlocks<W, kNorm, kDepth, kTiles>)
      return gemv_mma_ring_kernel_5_blocks<T, W, kSiluMul, kNorm, kHi, kDepth, kTiles, kLines>;
    else
      return gemv_mma_ring_kernel<T, W, kSiluMul, kNorm, kHi, kDepth, kTiles, kLines>;
  }();
  const size_t ring_bytes = static_cast<size_t>(shape.stages) * kDepth * kTiles * threads * sizeof(uint4);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(ring_bytes)));
  pdl::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), ring_bytes, stream,
              shape.pdl, a, shape.stages);
}

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi, int kDepth>
void launch_depth(const MmaGemvArgs& a, MmaGemvShape shape, cudaStream_t stream) {
  if (shape.stages > 1) {
    if constexpr (kDepth <= 2) {
      if (shape.tiles == 2) {
        if (shape.lines) return launch_ring<T, W, kSiluMul, kNorm, kHi, kDepth, 2, true>(a, shape, stream);
        return launch_ring<T, W, kSiluMul, kNorm, kHi, kDepth, 2, false>(a, shape, stream);
      }
    }
    if (shape.lines) return launch_ring<T, W, kSiluMul, kNorm, kHi, kDepth, 1, true>(a, shape, stream);
    return launch_ring<T, W, kSiluMul, kNorm, kHi, kDepth, 1, false>(a, shape, stream);
  }
  const int64_t blocks = (a.n_dim + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gemv_mma: weight has too many rows");
  gemv_mma_kernel<T, W, kSiluMul, kNorm, kHi, kDepth><<<static_cast<int>(blocks), shape.split * 32, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W, bool kSiluMul, Norm kNorm, bool kHi>
void launch_shape(const MmaGemvArgs& a, MmaGemvShape shape, cudaStream_t stream) {
  if (shape.depth == 1) return launch_depth<T, W, kSiluMul, kNorm, kHi, 1>(a, shape, stream);
  if (shape.depth == 2) return launch_depth<T, W, kSiluMul, kNorm, kHi, 2>(a, shape, stream);
  launch_depth<T, W, kSiluMul, kNorm, kHi, 4>(a, shape, stream);  // 4, checked on entry
}

// fp16/bf16 weights, of the activations' dtype: W = T in the kernels.
struct InputDtype {};

// silu_mul in the kernel only for e4m3 weights and one row (the caller computes it first otherwise).
template <typename T, typename W>
void dispatch_gemv_mma(const MmaGemvArgs& a, bool silu_mul, MmaGemvShape shape, cudaStream_t stream) {
  const bool norm = a.rms_eps >= 0.f, hi = a.rows > kRowsPerBlock;
  if constexpr (std::is_same_v<W, E4m3>) {
    if (silu_mul) return launch_shape<T, W, true, Norm::kNone, false>(a, shape, stream);
  }
  if (norm && hi) return launch_shape<T, W, false, Norm::kInLoop, true>(a, shape, stream);
  if (norm && a.rows == 1) return launch_shape<T, W, false, Norm::kBefore, false>(a, shape, stream);
  if (norm) return launch_shape<T, W, false, Norm::kInLoop, false>(a, shape, stream);
  if (hi) return launch_shape<T, W, false, Norm::kNone, true>(a, shape, stream);
  launch_shape<T, W, false, Norm::kNone, false>(a, shape, stream);
}

bool half_or_bf16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat16 || t.scalar_type() == torch::kBFloat16;
}

// The checks and the launch that both weight formats share: x [B, K] (or [B, 2K] with silu_mul), weight [N, K] (e4m3,
// or x's dtype), w_scale [N] or nullptr. Messages are literal, or formatted by HJCG_CHECK_FMT (csrc/checks.h says
// why not by TORCH_CHECK).
template <typename W>
void run_gemv_mma(const torch::Tensor& x, const torch::Tensor& weight, const float* w_scale, double rms_eps,
                  bool silu_mul, const c10::optional<torch::Tensor>& residual, const torch::Tensor& out, int64_t split,
                  int64_t depth, int64_t stages, int64_t tiles, int64_t copy_order, bool pdl) {
  constexpr bool e4m3 = std::is_same_v<W, E4m3>;
  const int64_t rows = x.size(0), n_dim = weight.size(0), k_dim = weight.size(1);
  TORCH_CHECK(x.size(1) == (silu_mul ? 2 * k_dim : k_dim),
              "gemv_mma: x must be [B, K] (K = the weight's columns), or [B, 2K] = [gate, up] with silu_mul");
  TORCH_CHECK(!(silu_mul && rms_eps >= 0), "gemv_mma: the norm and silu_mul do not combine");
  TORCH_CHECK(split >= 0 && split <= kMaxSplit, "gemv_mma: split must be 0 (the default) to 8");
  TORCH_CHECK(depth == 0 || depth == 1 || depth == 2 || depth == 4,
              "gemv_mma: depth must be 0 (the default), 1, 2 or 4");
  TORCH_CHECK(stages >= 0 && stages <= kMaxStages, "gemv_mma: stages must be 0 (the default) to 8");
  TORCH_CHECK(tiles >= 0 && tiles <= 2, "gemv_mma: tiles must be 0 (the default), 1 or 2");
  TORCH_CHECK(copy_order >= 0 && copy_order <= 2, "gemv_mma: copy_order must be 0 (the default), 1 or 2");
  gemv::check_rows_tensor(out, x, rows, n_dim);
  TORCH_CHECK(!gemv::overlaps(out, x) && !gemv::overlaps(out, weight),
              "gemv_mma: out must not overlap x or the weight");
  if (residual) {
    gemv::check_rows_tensor(*residual, x, rows, n_dim);
    TORCH_CHECK(residual->data_ptr() == out.data_ptr() || !gemv::overlaps(*residual, out),
                "gemv_mma: residual must be out itself (in place) or not overlap it");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = x.scalar_type() == torch::kFloat16;
  MmaGemvArgs args{x.data_ptr(),          static_cast<const uint8_t*>(weight.data_ptr()),
                   w_scale,               k_dim,
                   n_dim,                 static_cast<int>(rows),
                   static_cast<float>(rms_eps), residual ? residual->data_ptr() : nullptr,
                   out.data_ptr()};
  // the activation is computed once for all blocks (kept alive to the launch), except for one row and e4m3
  // weights, whose kernel computes it (see Batch invariance)
  const bool act_first = silu_mul && (rows > 1 || !e4m3);
  const torch::Tensor act = act_first ? gemv::silu_mul_rows(x, k_dim, stream) : torch::Tensor();
  if (act.defined()) {
    args.x = act.data_ptr();
    silu_mul = false;
  }
  const int default_tiles = e4m3 && rows > kRowsPerBlock ? kDefaultTilesPast8Rows : 1;
  MmaGemvShape shape{split != 0 ? static_cast<int>(split) : kDefaultSplit,
                     depth != 0 ? static_cast<int>(depth) : e4m3 ? kDefaultDepth : kDefaultDepthInputDtype,
                     stages != 0 ? static_cast<int>(stages) : kDefaultStages,
                     tiles != 0 ? static_cast<int>(tiles) : default_tiles,
                     copy_order != 0 ? copy_order == 2 : !e4m3, pdl};
  // 2 tiles take the ring with 1 or 2 chunks per batch. The ring's slots then take at most 8 stages x 2 chunks x
  // 2 tiles (or 4 chunks x 1 tile) x 256 threads x 16 B = 128 KiB, within the 227 KiB a Hopper block may take.
  TORCH_CHECK(shape.tiles == 1 || (shape.stages > 1 && shape.depth <= 2),
              "gemv_mma: 2 tiles need the ring (stages >= 2) and depth 1 or 2");
  if constexpr (e4m3) {
    if (half) dispatch_gemv_mma<__half, E4m3>(args, silu_mul, shape, stream);
    else dispatch_gemv_mma<__nv_bfloat16, E4m3>(args, silu_mul, shape, stream);
  } else {
    if (half) dispatch_gemv_mma<__half, __half>(args, silu_mul, shape, stream);
    else dispatch_gemv_mma<__nv_bfloat16, __nv_bfloat16>(args, silu_mul, shape, stream);
  }
}

// x as every tensor-core GEMV call needs it (gemv::input_supported), against a weight of K < 2^29 columns.
bool mma_input_supported(const torch::Tensor& x, int64_t k_dim) {
  return gemv::input_supported(x, k_dim, kMaxInputRows) && k_dim < (int64_t{1} << 29);
}

}  // namespace

bool gemv_fp8_supported(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  if (q.dim() != 2 || q.scalar_type() != torch::kFloat8_e4m3fn || !q.is_contiguous() || q.size(0) < 1 ||
      !mma_input_supported(x, q.size(1)) || q.device() != x.device() || scale.dim() != 1 ||
      scale.scalar_type() != torch::kFloat32 || scale.device() != x.device() || !scale.is_contiguous() ||
      scale.numel() != q.size(0))
    return false;
  return q.size(1) % 16 == 0 && gemv::aligned16(q);
}

void gemv_fp8_cuda(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, double rms_eps,
                   bool silu_mul, const c10::optional<torch::Tensor>& residual, const torch::Tensor& out,
                   int64_t split, int64_t depth, int64_t stages, int64_t tiles, int64_t copy_order, bool pdl) {
  TORCH_CHECK(gemv_fp8_supported(x, q, scale),
              "gemv_fp8: x must be a contiguous fp16/bf16 [B, K] (or [B, 2K] with silu_mul), 1 <= B <= 16, q a "
              "contiguous float8_e4m3fn [N, K] and scale a contiguous float32 [N] on x's device, K % 16 == 0 and "
              "K < 2^29, x and q 16-byte aligned");
  TORCH_CHECK(!gemv::overlaps(out, scale), "gemv_fp8: out must not overlap scale");
  run_gemv_mma<E4m3>(x, q, scale.data_ptr<float>(), rms_eps, silu_mul, residual, out, split, depth, stages, tiles,
                     copy_order, pdl);
}

bool gemv_mma_supported(const torch::Tensor& x, const torch::Tensor& weight) {
  return weight.dim() == 2 && weight.size(0) >= 1 && mma_input_supported(x, weight.size(1)) &&
         weight.scalar_type() == x.scalar_type() && weight.device() == x.device() && weight.is_contiguous() &&
         weight.size(1) % 8 == 0 && gemv::aligned16(weight);
}

void gemv_mma_cuda(const torch::Tensor& x, const torch::Tensor& weight, double rms_eps, bool silu_mul,
                   const c10::optional<torch::Tensor>& residual, const torch::Tensor& out, int64_t split,
                   int64_t depth, int64_t stages, int64_t tiles, int64_t copy_order, bool pdl) {
  TORCH_CHECK(gemv_mma_supported(x, weight),
              "gemv_mma: x must be a contiguous fp16/bf16 [B, K] (or [B, 2K] with silu_mul), 1 <= B <= 16, weight a "
              "contiguous [N, K] of x's dtype on x's device, K % 8 == 0 and K < 2^29, both 16-byte aligned");
  run_gemv_mma<InputDtype>(x, weight, nullptr, rms_eps, silu_mul, residual, out, split, depth, stages, tiles,
                           copy_order, pdl);
}

void quantize_rows_cuda(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(x.is_cuda() && half_or_bf16(x) && x.dim() == 2 && x.is_contiguous() && x.size(1) % 8 == 0 &&
                  gemv::aligned16(x),
              "quantize_rows: x must be a contiguous fp16/bf16 CUDA [S, K], K % 8 == 0, 16-byte aligned");
  TORCH_CHECK(q.device() == x.device() && q.scalar_type() == torch::kFloat8_e4m3fn && q.is_contiguous() &&
                  q.sizes() == x.sizes() && reinterpret_cast<uintptr_t>(q.data_ptr()) % 8 == 0,
              "quantize_rows: q must be a contiguous float8_e4m3fn of x's shape on x's device, 8-byte aligned");
  TORCH_CHECK(scale.device() == x.device() && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.numel() == x.size(0),
              "quantize_rows: scale must be a contiguous float32 [S] on x's device");
  if (x.size(0) == 0) return;
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int>::max(), "quantize_rows: too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<static_cast<int>(x.size(0)), kQuantThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), x.size(1), static_cast<uint8_t*>(q.data_ptr()),
        scale.data_ptr<float>());
  };
  if (x.scalar_type() == torch::kFloat16) launch(__half{});
  else launch(__nv_bfloat16{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hjcg
