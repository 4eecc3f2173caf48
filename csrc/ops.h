// The extension's tensor-level operations. Each checks its inputs and dispatches to the CPU reference
// or, where built, the CUDA kernel; both compute the same function.
#pragma once

#include <torch/extension.h>

namespace hjcg {

// Samples one token per row of `logits` [B, V] and writes it to `out` [B] (int64).
// Per-row parameters are [B] tensors: temperature, top_p, min_p, repetition_penalty (float32),
// top_k (int32), seed and offset (int64). `history` [B, H] (int64) holds the tokens so far, valid up to
// `history_len` [B] (int64), for the repetition penalty. Side effects, the same on every device, so a
// CUDA graph replay continues where the last left off: offset += 1; if append_to_history and a row's
// history has room, the token is appended and history_len += 1.
void sample(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
            const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
            const torch::Tensor& min_p, const torch::Tensor& repetition_penalty, const torch::Tensor& seed,
            const torch::Tensor& offset, const torch::Tensor& out, bool append_to_history);

// Writes `prompt` [L] (int64) into the static inputs of a prefill graph of `input_ids.size(0)` rows:
// input_ids, positions [S] (int64), last_index [1] and seq_len [1] (int64). `prompt` is on the host or
// on the device of the outputs.
void pad_prompt(const torch::Tensor& prompt, int64_t start_pos, int64_t pad_id, const torch::Tensor& input_ids,
                const torch::Tensor& positions, const torch::Tensor& last_index, const torch::Tensor& seq_len);

// Structured output: sets logits [B, V] (float32, rows contiguous) to -inf wherever bitmask [B, W] (int32,
// W >= ceil(V / 32), rows contiguous) has the token's bit clear (token_bitmask_ref.h has the layout).
void apply_token_bitmask(const torch::Tensor& logits, const torch::Tensor& bitmask);

void check_sample_args(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
                       const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
                       const torch::Tensor& min_p, const torch::Tensor& repetition_penalty,
                       const torch::Tensor& seed, const torch::Tensor& offset, const torch::Tensor& out);

#ifdef HJCG_WITH_CUDA
// `pdl` (decode_attention, rope_decode_attention, rope_cache, gemv_fp8, gemv_mma): launch with programmatic dependent
// launch (pdl.cuh), so the kernel's start overlaps the end of the kernel before it; ignored before sm_90.
void sample_cuda(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
                 const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
                 const torch::Tensor& min_p, const torch::Tensor& repetition_penalty, const torch::Tensor& seed,
                 const torch::Tensor& offset, const torch::Tensor& out, bool append_to_history);
void apply_token_bitmask_cuda(const torch::Tensor& logits, const torch::Tensor& bitmask);
void pad_prompt_cuda(const torch::Tensor& prompt, int64_t start_pos, int64_t pad_id, const torch::Tensor& input_ids,
                     const torch::Tensor& positions, const torch::Tensor& last_index, const torch::Tensor& seq_len);
// Paged decode attention, one query token per row: q [B, Hq, D]; k_pool, v_pool [slots, Hkv, D] (slot =
// block * block_size + offset); block_tables [B, W] int32 and seq_lens [B] int64 on the device; row b
// attends to positions [0, seq_lens[b]) of its stream; out [B, Hq, D]; workspace [B * Hq, splits, D + 2]; counters
// [B * Hq] int32, zero before the first launch and left zero by each.
void decode_attention_cuda(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                           double scale, const torch::Tensor& out, const torch::Tensor& workspace,
                           const torch::Tensor& counters, bool pdl);
// The decode step's RoPE and attention in one kernel: q and the newest position's K/V (position seq_lens[b] - 1) from
// the QKV output qkv [B, (Hq + 2 Hkv) D], rotated with cos, sin [positions, D] (as rope_cache), the newest K/V stored
// into the pools at that position's slot; then as decode_attention, with out [B, Hq, D].
void rope_decode_attention_cuda(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                                const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t block_size,
                                double scale, const torch::Tensor& out, const torch::Tensor& workspace,
                                const torch::Tensor& counters, bool pdl);
void rms_norm_cuda(const torch::Tensor& x, const torch::Tensor& weight, double eps, const torch::Tensor& out);
// qkv [S, (Hq + 2 Hkv) D]; cos, sin [T, D]; positions, slots [S] int64; q_out [S, Hq, D]; k_out, v_out
// [S, Hkv, D] (the step's own K/V, for a prompt's attention); caches [slots, Hkv, D], row slots[s] written.
// norm_x [S, H] (optional): the RMSNorm deferred past the GEMM, each row of qkv (or gate_up) scaled by
// 1 / rms(norm_x row) first (the norm's weight folded into the matrix).
void rope_cache_cuda(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, const torch::Tensor& slots, int64_t heads, int64_t kv_heads,
                     const torch::Tensor& q_out, const torch::Tensor& k_out, const torch::Tensor& v_out,
                     const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const c10::optional<torch::Tensor>& norm_x, double eps, bool pdl);
void silu_mul_cuda(const torch::Tensor& gate_up, const torch::Tensor& out, const c10::optional<torch::Tensor>& norm_x,
                   double eps);
// Decode GEMV for B = 1..8 rows (one token per stream): out [B, N] = residual + s * x' @ weight.T, per row b:
// x'_b = x_b or silu(gate_b) * up_b (silu_mul, x [B, 2K] = [gate, up]), s_b = 1 / rms(x_b) when rms_eps >= 0
// (the norm's weight folded into weight's columns), else 1. residual [B, N] may be out (in place). Row b's
// result is bit-identical whatever B is. gemv_supported: x a contiguous fp16/bf16 [B, K] or [B, 2K] with
// 1 <= B <= 8, weight a contiguous [N, K] of its dtype and device, K % 8 == 0, both 16-byte aligned.
bool gemv_supported(const torch::Tensor& x, const torch::Tensor& weight);
void gemv_cuda(const torch::Tensor& x, const torch::Tensor& weight, double rms_eps, bool silu_mul,
               const c10::optional<torch::Tensor>& residual, const torch::Tensor& out);
// The same GEMV over fp8 weights (hjcg/fp8.py: W ~= q * scale[:, None], q [N, K] float8_e4m3fn, scale [N]
// float32), for B = 1..16 rows: out = residual + s * (x' @ q.T) * scale, fp32 accumulation on tensor cores,
// row b bit-identical whatever B is. gemv_fp8_supported: x a contiguous fp16/bf16 [B, K] or [B, 2K] with
// 1 <= B <= 16, q contiguous [N, K] and scale contiguous [N] on x's device, K % 16 == 0, K < 2^29, x and q
// 16-byte aligned. split (warps per block sharing its weight rows, 1..8), depth (chunks per warp and batch:
// 1, 2, 4), stages (batches in flight per warp: 1 in registers, 2..8 through a cp.async ring in shared memory) and
// tiles (of 8 weight rows per block, 1 or 2) and copy_order (the ring's: 1 by fragments, 2 by whole rows): 0 = the
// measured defaults; other values for the lab.
bool gemv_fp8_supported(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale);
void gemv_fp8_cuda(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, double rms_eps,
                   bool silu_mul, const c10::optional<torch::Tensor>& residual, const torch::Tensor& out,
                   int64_t split, int64_t depth, int64_t stages, int64_t tiles, int64_t copy_order, bool pdl);
// The same tensor-core GEMV over fp16/bf16 weights of x's dtype (w_scale 1), for B = 1..16 rows: the decode steps of
// more streams than gemv's CUDA cores serve at the copy rate. gemv_mma_supported: as gemv_fp8_supported with weight a
// contiguous [N, K] of x's dtype, K % 8 == 0. split, depth, stages, tiles, copy_order: as for gemv_fp8.
bool gemv_mma_supported(const torch::Tensor& x, const torch::Tensor& weight);
void gemv_mma_cuda(const torch::Tensor& x, const torch::Tensor& weight, double rms_eps, bool silu_mul,
                   const c10::optional<torch::Tensor>& residual, const torch::Tensor& out, int64_t split,
                   int64_t depth, int64_t stages, int64_t tiles, int64_t copy_order, bool pdl);
// Per-token e4m3 activations for the fp8 GEMMs: x [S, K] fp16/bf16 -> q [S, K] float8_e4m3fn and scale [S]
// float32, bit for bit hjcg.fp8.quantize_rows (scale = amax / 448, or 1 for a zero row; q = e4m3(x / scale)).
void quantize_rows_cuda(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale);
#endif

}  // namespace hjcg
