// pdl.cuh's host side.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <array>
#include <atomic>

#include "pdl.cuh"

namespace hjcg::pdl {

bool supported() {
  // per device: 0 not asked yet, 1 no, 2 yes (the attribute query is cheap, but this runs on every launch)
  static std::array<std::atomic<int>, 64> known{};
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= static_cast<int>(known.size())) return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state = major >= 9 ? 2 : 1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

}  // namespace hjcg::pdl
