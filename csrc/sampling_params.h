// Per-row sampling parameters and the small pieces of their semantics that the CPU reference and the
// CUDA kernel share, so both compute the same function.
//
// Each parameter's range, "off" value and canonical form are specified once, in hjcg/sampling.py
// (SamplingParams and its table): the engine hands the samplers canonical values only. The predicates
// below also make every value outside a filter's active range "off" (the torch sampler,
// hjcg/torch_sampler.py, mirrors them), so the three samplers agree even on values passed directly.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace hjcg {

struct SamplingParamsRow {
  float temperature;         // <= 0: greedy (argmax, lowest index on ties)
  int32_t top_k;             // <= 0: off
  float top_p;               // <= 0 or >= 1: off
  float min_p;               // <= 0: off
  float repetition_penalty;  // <= 0 or == 1: off
};

HJCG_HOST_DEVICE bool penalty_active(float penalty) { return penalty > 0.f && penalty != 1.f; }
HJCG_HOST_DEVICE bool top_k_active(int32_t k, int64_t vocab) { return k > 0 && k < vocab; }
HJCG_HOST_DEVICE bool top_p_active(float p) { return p > 0.f && p < 1.f; }
HJCG_HOST_DEVICE bool min_p_active(float p) { return p > 0.f; }

// IEEE division on the device too: the extension is compiled with --use_fast_math, whose approximate
// division would let a penalised logit (or 1/T) differ from the CPU reference's and torch's by an ulp,
// enough to break a tie the other way.
HJCG_HOST_DEVICE float ieee_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Repetition penalty as in CTRL and HF transformers: move a seen token's logit towards "less likely".
HJCG_HOST_DEVICE float penalize_logit(float logit, float penalty) {
  return logit > 0.f ? ieee_div(logit, penalty) : logit * penalty;
}

}  // namespace hjcg
