// The extension's tensor operations as torch custom ops (namespace hjcg): one schema each, declaring what
// the op writes, with the CPU and the CUDA kernels registered apart. sample, pad_prompt and
// apply_token_bitmask have both; the decode step's kernels (attention, norm, RoPE, activation, GEMVs, fp8
// quantization) are CUDA only: their references are torch code, which the GPU tests compare them with.
// Python calls them as torch.ops.hjcg.<name>; torch.compile and torch.library.opcheck see them (hjcg/native.py
// adds the fake kernels). The graph cache and the LRU policy stay pybind11 classes (bindings.cpp).
#include <torch/library.h>

#include "ops.h"

namespace hjcg {
namespace {

// The dispatcher's signature: the outputs as mutable references. Both devices run the same argument checks.
void sample_cpu_op(const at::Tensor& logits, at::Tensor& history, at::Tensor& history_len,
                   const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                   const at::Tensor& min_p, const at::Tensor& repetition_penalty, const at::Tensor& seed,
                   at::Tensor& offset, at::Tensor& out, bool append_to_history) {
  TORCH_CHECK(!logits.is_cuda(), "hjcg::sample (CPU) got CUDA logits");
  sample(logits, history, history_len, temperature, top_k, top_p, min_p, repetition_penalty, seed, offset, out,
         append_to_history);
}

void pad_prompt_cpu_op(const at::Tensor& prompt, int64_t start_pos, int64_t pad_id, at::Tensor& input_ids,
                       at::Tensor& positions, at::Tensor& last_index, at::Tensor& seq_len) {
  TORCH_CHECK(!input_ids.is_cuda(), "hjcg::pad_prompt (CPU) got CUDA outputs");
  pad_prompt(prompt, start_pos, pad_id, input_ids, positions, last_index, seq_len);
}

void apply_token_bitmask_cpu_op(at::Tensor& logits, const at::Tensor& bitmask) {
  TORCH_CHECK(!logits.is_cuda(), "hjcg::apply_token_bitmask (CPU) got CUDA logits");
  apply_token_bitmask(logits, bitmask);
}

#ifdef HJCG_WITH_CUDA
void apply_token_bitmask_cuda_op(at::Tensor& logits, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.is_cuda(), "hjcg::apply_token_bitmask (CUDA) got CPU logits");
  apply_token_bitmask(logits, bitmask);
}

void sample_cuda_op(const at::Tensor& logits, at::Tensor& history, at::Tensor& history_len,
                    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                    const at::Tensor& min_p, const at::Tensor& repetition_penalty, const at::Tensor& seed,
                    at::Tensor& offset, at::Tensor& out, bool append_to_history) {
  TORCH_CHECK(logits.is_cuda(), "hjcg::sample (CUDA) got CPU logits");
  sample(logits, history, history_len, temperature, top_k, top_p, min_p, repetition_penalty, seed, offset, out,
         append_to_history);
}

void pad_prompt_cuda_op(const at::Tensor& prompt, int64_t start_pos, int64_t pad_id, at::Tensor& input_ids,
                        at::Tensor& positions, at::Tensor& last_index, at::Tensor& seq_len) {
  TORCH_CHECK(input_ids.is_cuda(), "hjcg::pad_prompt (CUDA) got CPU outputs");
  pad_prompt(prompt, start_pos, pad_id, input_ids, positions, last_index, seq_len);
}

// The CUDA-only ops (ops.h documents each): the dispatcher's signatures, forwarded as they are.
void decode_attention_op(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size, double scale,
                         at::Tensor& out, at::Tensor& workspace, at::Tensor& counters, bool pdl) {
  decode_attention_cuda(q, k_pool, v_pool, block_tables, seq_lens, block_size, scale, out, workspace, counters, pdl);
}

void rope_decode_attention_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
                              at::Tensor& v_pool, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              int64_t block_size, double scale, at::Tensor& out, at::Tensor& workspace,
                              at::Tensor& counters, bool pdl) {
  rope_decode_attention_cuda(qkv, cos, sin, k_pool, v_pool, block_tables, seq_lens, block_size, scale, out, workspace,
                             counters, pdl);
}

void rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  rms_norm_cuda(x, weight, eps, out);
}

void rope_cache_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                   const at::Tensor& slots, int64_t heads, int64_t kv_heads, at::Tensor& q_out, at::Tensor& k_out,
                   at::Tensor& v_out, at::Tensor& k_cache, at::Tensor& v_cache,
                   const c10::optional<at::Tensor>& norm_x, double eps, bool pdl) {
  rope_cache_cuda(qkv, cos, sin, positions, slots, heads, kv_heads, q_out, k_out, v_out, k_cache, v_cache, norm_x, eps,
                  pdl);
}

void silu_mul_op(const at::Tensor& gate_up, at::Tensor& out, const c10::optional<at::Tensor>& norm_x, double eps) {
  silu_mul_cuda(gate_up, out, norm_x, eps);
}

void gemv_op(const at::Tensor& x, const at::Tensor& weight, double rms_eps, bool silu_mul,
             const c10::optional<at::Tensor>& residual, at::Tensor& out) {
  gemv_cuda(x, weight, rms_eps, silu_mul, residual, out);
}

void gemv_fp8_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, double rms_eps, bool silu_mul,
                 const c10::optional<at::Tensor>& residual, at::Tensor& out, int64_t split, int64_t depth,
                 int64_t stages, int64_t tiles, int64_t copy_order, bool pdl) {
  gemv_fp8_cuda(x, q, scale, rms_eps, silu_mul, residual, out, split, depth, stages, tiles, copy_order, pdl);
}

void gemv_mma_op(const at::Tensor& x, const at::Tensor& weight, double rms_eps, bool silu_mul,
                 const c10::optional<at::Tensor>& residual, at::Tensor& out, int64_t split, int64_t depth,
                 int64_t stages, int64_t tiles, int64_t copy_order, bool pdl) {
  gemv_mma_cuda(x, weight, rms_eps, silu_mul, residual, out, split, depth, stages, tiles, copy_order, pdl);
}

void quantize_rows_op(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) { quantize_rows_cuda(x, q, scale); }
#endif

}  // namespace

TORCH_LIBRARY(hjcg, m) {
  // ops.h documents each: sample advances offset (and history, history_len) and writes out; pad_prompt
  // writes a prefill graph's static inputs; apply_token_bitmask masks disallowed tokens' logits in place.
  m.def("sample(Tensor logits, Tensor(a!) history, Tensor(b!) history_len, Tensor temperature, Tensor top_k, "
        "Tensor top_p, Tensor min_p, Tensor repetition_penalty, Tensor seed, Tensor(c!) offset, Tensor(d!) out, "
        "bool append_to_history=True) -> ()");
  m.def("pad_prompt(Tensor prompt, int start_pos, int pad_id, Tensor(a!) input_ids, Tensor(b!) positions, "
        "Tensor(c!) last_index, Tensor(d!) seq_len) -> ()");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask) -> ()");
  // CUDA only. The GEMVs' residual may be out itself (in place); split .. copy_order: 0 = the measured defaults.
  m.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, "
        "int block_size, float scale, Tensor(a!) out, Tensor(b!) workspace, Tensor(c!) counters, "
        "bool pdl=False) -> ()");
  m.def("rope_decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, "
        "Tensor block_tables, Tensor seq_lens, int block_size, float scale, Tensor(c!) out, Tensor(d!) workspace, "
        "Tensor(e!) counters, bool pdl=False) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("rope_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slots, int heads, int kv_heads, "
        "Tensor(a!) q_out, Tensor(b!) k_out, Tensor(c!) v_out, Tensor(d!) k_cache, Tensor(e!) v_cache, "
        "Tensor? norm_x=None, float eps=0.0, bool pdl=False) -> ()");
  m.def("silu_mul(Tensor gate_up, Tensor(a!) out, Tensor? norm_x=None, float eps=0.0) -> ()");
  m.def("gemv(Tensor x, Tensor weight, float rms_eps, bool silu_mul, Tensor? residual, Tensor(a!) out) -> ()");
  m.def("gemv_fp8(Tensor x, Tensor q, Tensor scale, float rms_eps, bool silu_mul, Tensor? residual, Tensor(a!) out, "
        "int split=0, int depth=0, int stages=0, int tiles=0, int copy_order=0, bool pdl=False) -> ()");
  m.def("gemv_mma(Tensor x, Tensor weight, float rms_eps, bool silu_mul, Tensor? residual, Tensor(a!) out, "
        "int split=0, int depth=0, int stages=0, int tiles=0, int copy_order=0, bool pdl=False) -> ()");
  m.def("quantize_rows(Tensor x, Tensor(a!) q, Tensor(b!) scale) -> ()");
}

TORCH_LIBRARY_IMPL(hjcg, CPU, m) {
  m.impl("sample", &sample_cpu_op);
  m.impl("pad_prompt", &pad_prompt_cpu_op);
  m.impl("apply_token_bitmask", &apply_token_bitmask_cpu_op);
}

#ifdef HJCG_WITH_CUDA
TORCH_LIBRARY_IMPL(hjcg, CUDA, m) {
  m.impl("sample", &sample_cuda_op);
  m.impl("pad_prompt", &pad_prompt_cuda_op);
  m.impl("apply_token_bitmask", &apply_token_bitmask_cuda_op);
  m.impl("decode_attention", &decode_attention_op);
  m.impl("rope_decode_attention", &rope_decode_attention_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("rope_cache", &rope_cache_op);
  m.impl("silu_mul", &silu_mul_op);
  m.impl("gemv", &gemv_op);
  m.impl("gemv_fp8", &gemv_fp8_op);
  m.impl("gemv_mma", &gemv_mma_op);
  m.impl("quantize_rows", &quantize_rows_op);
}
#endif

}  // namespace hjcg
