// CPU reference of the fused sampler, over raw arrays (no PyTorch), one row at a time.
//
// The pipeline, the same in the CUDA kernel:
//   1. repetition penalty on every distinct token of the history;
//   2. temperature <= 0: argmax (lowest index on ties), done;
//   3. w_i = exp((l_i - max) / T), unnormalised weights (the largest is exactly 1);
//   4. top-k: keep w_i >= the k-th largest weight (ties at the edge are kept);
//   5. top-p: among those, keep w_i >= t for the largest t whose kept mass reaches top_p of theirs;
//   6. min-p: keep w_i >= min_p (min_p times the largest weight, which is 1);
//   7. draw u in [0, 1) from Philox(seed, offset) and return the first token, in index order,
//      whose running kept mass exceeds u times the kept total.
// Every filter keeps the set {w_i >= threshold}, so the filters compose by taking the largest threshold.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "philox.h"
#include "sampling_params.h"

namespace hjcg {

inline int64_t argmax_ref(const float* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (values[i] > values[best]) best = i;
  return best;
}

// Steps 1: writes penalised logits into `out` (size vocab).
inline void apply_repetition_penalty_ref(const float* logits, int64_t vocab, const int64_t* history,
                                         int64_t history_len, float penalty, float* out) {
  std::copy(logits, logits + vocab, out);
  if (!penalty_active(penalty)) return;
  // Reads the original logit, so a token seen twice is penalised once.
  for (int64_t i = 0; i < history_len; ++i) {
    const int64_t token = history[i];
    if (token >= 0 && token < vocab) out[token] = penalize_logit(logits[token], penalty);
  }
}

// Steps 4-6: the smallest weight that survives every active filter.
inline float keep_threshold_ref(const std::vector<float>& weights, const SamplingParamsRow& p) {
  const int64_t vocab = static_cast<int64_t>(weights.size());
  float threshold = 0.f;
  if (top_k_active(p.top_k, vocab)) {
    std::vector<float> sorted(weights);
    std::nth_element(sorted.begin(), sorted.begin() + (p.top_k - 1), sorted.end(), std::greater<float>());
    threshold = sorted[p.top_k - 1];
  }
  if (top_p_active(p.top_p)) {
    std::vector<float> kept;
    double kept_mass = 0.0;
    for (float w : weights)
      if (w >= threshold) {
        kept.push_back(w);
        kept_mass += w;
      }
    std::sort(kept.begin(), kept.end(), std::greater<float>());
    const double target = static_cast<double>(p.top_p) * kept_mass;
    double running = 0.0;
    float t = kept.empty() ? threshold : kept.back();
    // The threshold must keep every copy of a tied weight, so the mass counts whole tie groups.
    for (size_t i = 0; i < kept.size(); ++i) {
      running += kept[i];
      const bool group_ends = i + 1 == kept.size() || kept[i + 1] != kept[i];
      if (group_ends && running >= target) {
        t = kept[i];
        break;
      }
    }
    threshold = std::max(threshold, t);
  }
  if (min_p_active(p.min_p)) threshold = std::max(threshold, p.min_p);
  return threshold;
}

// Samples one token from one row of logits. `history` may be null when history_len is 0.
inline int64_t sample_row_ref(const float* logits, int64_t vocab, const int64_t* history, int64_t history_len,
                              const SamplingParamsRow& p, uint64_t seed, uint64_t offset) {
  std::vector<float> work(static_cast<size_t>(vocab));
  apply_repetition_penalty_ref(logits, vocab, history, history_len, p.repetition_penalty, work.data());
  const int64_t best = argmax_ref(work.data(), vocab);
  if (!(p.temperature > 0.f)) return best;

  const float max_logit = work[best];
  const float inv_t = ieee_div(1.f, p.temperature);
  for (float& w : work) w = std::exp((w - max_logit) * inv_t);

  const float threshold = keep_threshold_ref(work, p);
  double total = 0.0;
  for (float w : work)
    if (w >= threshold) total += w;
  const double target = static_cast<double>(sampler_uniform(seed, offset)) * total;
  double running = 0.0;
  int64_t last_kept = best;
  for (int64_t i = 0; i < vocab; ++i) {
    if (work[i] < threshold) continue;
    running += work[i];
    last_kept = i;
    if (running > target) return i;
  }
  return last_kept;  // rounding left the target just past the total
}

}  // namespace hjcg
