// CPU implementations of the extension's operations, over the torch-free references, and the argument
// checks shared with the CUDA adapters. The checks' messages are literal strings, or formatted by HJCG_CHECK_FMT
// (csrc/checks.h says why not by TORCH_CHECK).
#include <vector>

#include "ops.h"
#include "padding_ref.h"
#include "sampling_ref.h"
#include "token_bitmask_ref.h"

namespace hjcg {
namespace {

// message: what `t` must be, e.g. "top_k must be a contiguous int32 [batch] tensor on the logits' device"
void check_row_tensor(const torch::Tensor& t, torch::ScalarType dtype, int64_t rows, const torch::Device& device,
                      const char* message) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == dtype && t.device() == device &&
                  t.is_contiguous(),
              message);
}

}  // namespace

void check_sample_args(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
                       const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
                       const torch::Tensor& min_p, const torch::Tensor& repetition_penalty,
                       const torch::Tensor& seed, const torch::Tensor& offset, const torch::Tensor& out) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [batch, vocab]");
  TORCH_CHECK(logits.size(1) > 0, "logits must have a non-empty vocabulary");
  TORCH_CHECK(logits.stride(1) == 1, "logits rows must be contiguous");
  const int64_t rows = logits.size(0);
  const auto device = logits.device();
  TORCH_CHECK(history.dim() == 2 && history.size(0) == rows, "history must be [batch, capacity]");
  TORCH_CHECK(history.scalar_type() == torch::kInt64 && history.device() == device && history.is_contiguous(),
              "history must be a contiguous int64 tensor on the logits' device");
  // each message a literal made from the argument's name (see the top of the file)
#define HJCG_CHECK_ROW(t, dtype, dtype_name) \
  check_row_tensor(t, dtype, rows, device,   \
                   #t " must be a contiguous " dtype_name " [batch] tensor on the logits' device")
  HJCG_CHECK_ROW(history_len, torch::kInt64, "int64");
  HJCG_CHECK_ROW(temperature, torch::kFloat32, "float32");
  HJCG_CHECK_ROW(top_k, torch::kInt32, "int32");
  HJCG_CHECK_ROW(top_p, torch::kFloat32, "float32");
  HJCG_CHECK_ROW(min_p, torch::kFloat32, "float32");
  HJCG_CHECK_ROW(repetition_penalty, torch::kFloat32, "float32");
  HJCG_CHECK_ROW(seed, torch::kInt64, "int64");
  HJCG_CHECK_ROW(offset, torch::kInt64, "int64");
  HJCG_CHECK_ROW(out, torch::kInt64, "int64");
#undef HJCG_CHECK_ROW
}

void sample(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& history_len,
            const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
            const torch::Tensor& min_p, const torch::Tensor& repetition_penalty, const torch::Tensor& seed,
            const torch::Tensor& offset, const torch::Tensor& out, bool append_to_history) {
  check_sample_args(logits, history, history_len, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                    offset, out);
  if (logits.is_cuda()) {
#ifdef HJCG_WITH_CUDA
    sample_cuda(logits, history, history_len, temperature, top_k, top_p, min_p, repetition_penalty, seed, offset,
                out, append_to_history);
    return;
#else
    TORCH_CHECK(false, "hjcg._C was built without CUDA");
#endif
  }
  const torch::Tensor logits32 = logits.to(torch::kFloat32).contiguous();
  const int64_t rows = logits32.size(0), vocab = logits32.size(1), capacity = history.size(1);
  const float* l = logits32.data_ptr<float>();
  int64_t* hist = history.data_ptr<int64_t>();
  int64_t* hist_len = history_len.data_ptr<int64_t>();
  int64_t* offs = offset.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const SamplingParamsRow p{temperature.data_ptr<float>()[r], top_k.data_ptr<int32_t>()[r],
                              top_p.data_ptr<float>()[r], min_p.data_ptr<float>()[r],
                              repetition_penalty.data_ptr<float>()[r]};
    const int64_t len = std::min<int64_t>(std::max<int64_t>(hist_len[r], 0), capacity);
    const int64_t token =
        sample_row_ref(l + r * vocab, vocab, hist + r * capacity, len, p,
                       static_cast<uint64_t>(seed.data_ptr<int64_t>()[r]), static_cast<uint64_t>(offs[r]));
    o[r] = token;
    offs[r] += 1;
    if (append_to_history && len < capacity) {
      hist[r * capacity + len] = token;
      hist_len[r] = len + 1;
    }
  }
}

void pad_prompt(const torch::Tensor& prompt, int64_t start_pos, int64_t pad_id, const torch::Tensor& input_ids,
                const torch::Tensor& positions, const torch::Tensor& last_index, const torch::Tensor& seq_len) {
  TORCH_CHECK(prompt.dim() == 1 && prompt.scalar_type() == torch::kInt64, "prompt must be a 1-D int64 tensor");
  TORCH_CHECK(input_ids.dim() == 1 && positions.dim() == 1 && input_ids.size(0) == positions.size(0),
              "input_ids and positions must be 1-D of the same length");
  for (const auto* t : {&input_ids, &positions, &last_index, &seq_len}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "pad_prompt outputs must be contiguous int64");
    TORCH_CHECK(t->device() == input_ids.device(), "pad_prompt outputs must share one device");
  }
  TORCH_CHECK(last_index.numel() == 1 && seq_len.numel() == 1, "last_index and seq_len must hold one element");
  const int64_t length = prompt.size(0), bucket = input_ids.size(0);
  TORCH_CHECK(length >= 1, "the prompt chunk must hold at least one token");
  TORCH_CHECK(length <= bucket, "the prompt chunk does not fit a bucket of input_ids' length");
  TORCH_CHECK(start_pos >= 0, "start_pos must be >= 0");
  if (input_ids.is_cuda()) {
#ifdef HJCG_WITH_CUDA
    pad_prompt_cuda(prompt, start_pos, pad_id, input_ids, positions, last_index, seq_len);
    return;
#else
    TORCH_CHECK(false, "hjcg._C was built without CUDA");
#endif
  }
  const torch::Tensor p = prompt.contiguous();
  pad_prompt_ref(p.data_ptr<int64_t>(), length, start_pos, bucket, pad_id, input_ids.data_ptr<int64_t>(),
                 positions.data_ptr<int64_t>(), last_index.data_ptr<int64_t>(), seq_len.data_ptr<int64_t>());
}

void apply_token_bitmask(const torch::Tensor& logits, const torch::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1,
              "logits must be a float32 [batch, vocab] tensor with contiguous rows");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kInt32 && bitmask.stride(1) == 1,
              "bitmask must be an int32 [batch, words] tensor with contiguous rows");
  TORCH_CHECK(bitmask.size(0) == logits.size(0), "bitmask and logits must have the same rows");
  TORCH_CHECK(bitmask.size(1) * 32 >= logits.size(1), "bitmask rows of too few words cannot cover a vocabulary of "
              "the logits' width (32 tokens per word)");
  TORCH_CHECK(bitmask.device() == logits.device(), "bitmask must be on the logits' device");
  if (logits.is_cuda()) {
#ifdef HJCG_WITH_CUDA
    apply_token_bitmask_cuda(logits, bitmask);
    return;
#else
    TORCH_CHECK(false, "hjcg._C was built without CUDA");
#endif
  }
  apply_token_bitmask_ref(logits.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0),
                          bitmask.data_ptr<int32_t>(), bitmask.stride(0));
}

}  // namespace hjcg
