// CPU reference of the padding kernel: writes one prompt chunk into a prefill graph's static inputs.
//
// Right padding: with a causal mask the real tokens never attend to the pads that follow them, so the
// logits of the real rows are exact. Pads take pad_id and continue the positions (any valid position is
// harmless). The decode step that follows overwrites the cache rows the pads wrote.
#pragma once

#include <cstdint>

namespace hjcg {

inline void pad_prompt_ref(const int64_t* prompt, int64_t length, int64_t start_pos, int64_t bucket, int64_t pad_id,
                           int64_t* input_ids, int64_t* positions, int64_t* last_index, int64_t* seq_len) {
  for (int64_t i = 0; i < bucket; ++i) {
    input_ids[i] = i < length ? prompt[i] : pad_id;
    positions[i] = start_pos + i;
  }
  *last_index = length - 1;
  *seq_len = start_pos + length;
}

}  // namespace hjcg
