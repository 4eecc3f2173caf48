// The CPU references of the sampling and padding kernels, without torch.
#include <cmath>
#include <vector>

#include "../padding_ref.h"
#include "../sampling_ref.h"
#include "test_main.h"

namespace {
hjcg::SamplingParamsRow greedy() { return {0.f, 0, 1.f, 0.f, 1.f}; }
}  // namespace

TEST(greedy_picks_the_first_maximum) {
  std::vector<float> logits = {0.1f, 3.f, -2.f, 3.f};
  CHECK(hjcg::sample_row_ref(logits.data(), 4, nullptr, 0, greedy(), 0, 0) == 1);
}

TEST(repetition_penalty_changes_the_argmax) {
  std::vector<float> logits = {2.f, 1.5f};
  std::vector<int64_t> history = {0, 0};
  auto p = greedy();
  p.repetition_penalty = 2.f;
  CHECK(hjcg::sample_row_ref(logits.data(), 2, history.data(), 2, p, 0, 0) == 1);
}

TEST(top_k_keeps_only_the_k_largest) {
  std::vector<float> logits = {1.f, 5.f, 4.f, 0.f, 3.f};
  hjcg::SamplingParamsRow p{1.f, 2, 1.f, 0.f, 1.f};
  for (uint64_t offset = 0; offset < 200; ++offset) {
    const int64_t t = hjcg::sample_row_ref(logits.data(), 5, nullptr, 0, p, 11, offset);
    CHECK(t == 1 || t == 2);
  }
}

TEST(top_p_keeps_whole_tie_groups) {
  std::vector<float> w = {1.f, 0.5f, 0.5f, 0.1f};
  hjcg::SamplingParamsRow p{1.f, 0, 0.4f, 0.f, 1.f};
  CHECK(hjcg::keep_threshold_ref(w, p) == 1.f);   // 1.0 alone is 48% of 2.1: enough for 40%
  p.top_p = 0.5f;
  CHECK(hjcg::keep_threshold_ref(w, p) == 0.5f);  // not for 50%: both 0.5s join, not one
}

TEST(same_seed_and_offset_same_draw) {
  CHECK(hjcg::philox_uniform(1, 2, 0) == hjcg::philox_uniform(1, 2, 0));
  CHECK(hjcg::philox_uniform(1, 2, 0) != hjcg::philox_uniform(1, 3, 0));
}

TEST(padding_fills_ids_positions_and_lengths) {
  std::vector<int64_t> prompt = {5, 6, 7}, ids(8), pos(8);
  int64_t last = -1, len = -1;
  hjcg::pad_prompt_ref(prompt.data(), 3, 10, 8, 0, ids.data(), pos.data(), &last, &len);
  CHECK(ids[0] == 5 && ids[2] == 7 && ids[3] == 0 && ids[7] == 0);
  CHECK(pos[0] == 10 && pos[7] == 17 && last == 2 && len == 13);
}

TEST_MAIN()
