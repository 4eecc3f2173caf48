// Philox4x32-10, a counter-based generator (Salmon et al., SC'11): the same (seed, counter) gives the
// same numbers on the host and on the device, so the CPU reference and the CUDA sampler draw alike, and
// a CUDA graph that advances the counter in device memory draws fresh numbers on every replay.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace hjcg {

HJCG_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Returns the first 32-bit word of Philox4x32-10 at counter (c0, c1, c2, 0) under key (seed lo, hi).
HJCG_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2) {
  uint32_t ctr[4] = {c0, c1, c2, 0u};
  uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, ctr[0], &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, ctr[2], &hi1);
    ctr[0] = hi1 ^ ctr[1] ^ key[0];
    ctr[1] = lo1;
    ctr[2] = hi0 ^ ctr[3] ^ key[1];
    ctr[3] = lo0;
    key[0] += 0x9E3779B9u;
    key[1] += 0xBB67AE85u;
  }
  return ctr[0];
}

// A uniform float in [0, 1) for draw number `offset` of stream `stream` under `seed`.
HJCG_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset, uint32_t stream) {
  const uint32_t word = philox_word(seed, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), stream);
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// The samplers' draw: number `offset` of the request seeded with `seed`, and nothing else. Not its row in
// the batch: rows move as streams join and leave, and a seeded request must draw the same tokens alone
// and among any neighbours (batch invariance); rows differ by their seeds.
HJCG_HOST_DEVICE float sampler_uniform(uint64_t seed, uint64_t offset) { return philox_uniform(seed, offset, 0u); }

}  // namespace hjcg
