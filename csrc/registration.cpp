// The extension's tensor operations as torch custom ops (namespace hjcg): one schema each, declaring what
// the op writes, with the CPU and the CUDA kernels registered apart. Python calls them as
// torch.ops.hjcg.<name>; torch.compile and torch.library.opcheck see them (hjcg/native.py adds the fake
// kernels). The graph cache and the LRU policy stay pybind11 classes (bindings.cpp).
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
}
#endif

}  // namespace hjcg
