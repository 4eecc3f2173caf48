// Argument checks whose message carries the offending values.
//
// On the GPU machine's build a failing TORCH_CHECK whose message c10::str formats with an integer in it crashed the
// process (segmentation fault) instead of raising; messages formatted from strings and dtypes only raised, as do
// literal ones (bench/results/2026-11-24-h100-formatted-checks/). The cause, somewhere in the ostream formatting of
// integers between this library and libtorch, is not known. So these checks format with snprintf into a buffer on
// the stack and hand libtorch a `const char*`. Plain TORCH_CHECK stays for literal messages.
#pragma once

#include <cstdio>
#include <string>

#include <torch/types.h>

namespace hjcg {

// "[2, 4096] Half on cuda:0": a tensor's shape, dtype and device for a message (no ostream: see above)
inline std::string tensor_text(const torch::Tensor& t) {
  std::string text = "[";
  for (int64_t i = 0; i < t.dim(); ++i) text += (i ? ", " : "") + std::to_string(t.size(i));
  text += "] ";
  text += c10::toString(t.scalar_type());
  text += t.is_cuda() ? " on cuda:" + std::to_string(t.get_device()) : " on cpu";
  return text;
}

}  // namespace hjcg

// TORCH_CHECK with a printf-style message: HJCG_CHECK_FMT(rows <= 8, "x must have 1 to 8 rows, got %lld", rows_ll)
#define HJCG_CHECK_FMT(cond, ...)                                                       \
  do {                                                                                  \
    if (C10_UNLIKELY(!(cond))) {                                                        \
      char hjcg_check_message_[768];                                                    \
      std::snprintf(hjcg_check_message_, sizeof(hjcg_check_message_), __VA_ARGS__);     \
      TORCH_CHECK(false, static_cast<const char*>(hjcg_check_message_));                \
    }                                                                                   \
  } while (false)
