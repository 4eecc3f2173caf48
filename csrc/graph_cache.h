// The CUDA graph cache: captured graphs keyed by "phase:length:batch", under an LRU policy with a
// count and a byte budget (lru_cache.h). Each graph captures into its own memory pool, so evicting one
// really returns its memory (a pool shared by several graphs is freed only when all of them are).
#pragma once

#include <torch/extension.h>

namespace hjcg {

void bind_graph_cache(pybind11::module_& m);

}  // namespace hjcg
