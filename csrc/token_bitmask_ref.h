// CPU reference of the token-bitmask kernel: structured output's allowed tokens applied to the logits.
//
// bitmask [B, W] int32 words, W = ceil(V / 32): bit (v % 32) of word v / 32 set <=> token v allowed
// (the layout llguidance and xgrammar fill). A disallowed token's logit becomes -inf, so every sampler
// (greedy, filters, the draw) and the logprobs see only allowed tokens. Rows whose words are all set are
// unchanged.
#pragma once

#include <cstdint>
#include <limits>

namespace hjcg {

inline bool token_allowed(const int32_t* words, int64_t token) {
  return (static_cast<uint32_t>(words[token >> 5]) >> (token & 31)) & 1u;
}

inline void apply_token_bitmask_ref(float* logits, int64_t rows, int64_t vocab, int64_t logits_stride,
                                    const int32_t* bitmask, int64_t words) {
  const float masked = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * logits_stride;
    const int32_t* mask = bitmask + r * words;
    for (int64_t v = 0; v < vocab; ++v) {
      if (!token_allowed(mask, v)) row[v] = masked;
    }
  }
}

}  // namespace hjcg
