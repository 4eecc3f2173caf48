// The Python module hjcg._C: the LRU policy (holding Python objects, so the policy is usable and testable
// without a GPU) and, where built with CUDA, the decode kernels and the CUDA graph cache. The sampling and
// padding ops are torch custom ops (registration.cpp), called as torch.ops.hjcg.sample / pad_prompt.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "lru_cache.h"
#include "philox.h"
#include "ops.h"

#ifdef HJCG_WITH_CUDA
#include "graph_cache.h"
#endif

namespace py = pybind11;

namespace {

using PyLruCache = hjcg::LruCache<std::string, py::object>;

py::dict stats_dict(const hjcg::LruStats& s) {
  py::dict d;
  d["entries"] = s.entries;
  d["bytes"] = s.bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["insertions"] = s.insertions;
  d["evictions"] = s.evictions;
  d["rejections"] = s.rejections;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hjcg native operations: LRU graph cache, CUDA kernels (sample and pad_prompt: torch.ops.hjcg)";
  m.def("philox_uniform", &hjcg::philox_uniform, py::arg("seed"), py::arg("offset"), py::arg("row"),
        "The uniform draw the sampler uses for (seed, offset, row); exposed for tests.");

#ifdef HJCG_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("decode_attention", &hjcg::decode_attention_cuda, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("block_size"), py::arg("scale"), py::arg("out"),
        py::arg("workspace"), py::arg("counters"), py::arg("pdl") = false);
  m.def("rope_decode_attention", &hjcg::rope_decode_attention_cuda, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
        py::arg("k_pool"), py::arg("v_pool"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("block_size"),
        py::arg("scale"), py::arg("out"), py::arg("workspace"), py::arg("counters"), py::arg("pdl") = false);
  m.def("rms_norm", &hjcg::rms_norm_cuda, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"));
  m.def("rope_cache", &hjcg::rope_cache_cuda, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("positions"),
        py::arg("slots"), py::arg("heads"), py::arg("kv_heads"), py::arg("q_out"), py::arg("k_out"), py::arg("v_out"),
        py::arg("k_cache"), py::arg("v_cache"),
        py::arg("norm_x") = py::none(), py::arg("eps") = 0.0, py::arg("pdl") = false);
  m.def("silu_mul", &hjcg::silu_mul_cuda, py::arg("gate_up"), py::arg("out"), py::arg("norm_x") = py::none(),
        py::arg("eps") = 0.0);
  m.def("gemv_supported", &hjcg::gemv_supported, py::arg("x"), py::arg("weight"));
  m.def("gemv", &hjcg::gemv_cuda, py::arg("x"), py::arg("weight"), py::arg("rms_eps"), py::arg("silu_mul"),
        py::arg("residual"), py::arg("out"));
  m.def("gemv_fp8_supported", &hjcg::gemv_fp8_supported, py::arg("x"), py::arg("q"), py::arg("scale"));
  m.def("gemv_fp8", &hjcg::gemv_fp8_cuda, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("rms_eps"),
        py::arg("silu_mul"), py::arg("residual"), py::arg("out"), py::arg("split") = 0,
        py::arg("depth") = 0, py::arg("stages") = 0, py::arg("tiles") = 0, py::arg("copy_order") = 0,
        py::arg("pdl") = false);
  m.def("gemv_mma_supported", &hjcg::gemv_mma_supported, py::arg("x"), py::arg("weight"));
  m.def("gemv_mma", &hjcg::gemv_mma_cuda, py::arg("x"), py::arg("weight"), py::arg("rms_eps"), py::arg("silu_mul"),
        py::arg("residual"), py::arg("out"), py::arg("split") = 0, py::arg("depth") = 0, py::arg("stages") = 0,
        py::arg("tiles") = 0, py::arg("copy_order") = 0, py::arg("pdl") = false);
  m.def("quantize_rows", &hjcg::quantize_rows_cuda, py::arg("x"), py::arg("q"), py::arg("scale"));
  hjcg::bind_graph_cache(m);
#else
  m.attr("with_cuda") = false;
#endif

  py::class_<PyLruCache>(m, "LruCache",
                         "Least-recently-used cache of Python objects under an entry-count and a byte budget "
                         "(0 = unlimited). Pinned entries are never evicted.")
      .def(py::init<uint64_t, uint64_t>(), py::arg("max_entries"), py::arg("max_bytes"))
      .def("get", [](PyLruCache& c, const std::string& k) -> py::object {
        auto v = c.get(k);
        return v ? *v : py::none();
      })
      .def("put", [](PyLruCache& c, const std::string& k, py::object v, uint64_t bytes) -> py::object {
        auto evicted = c.put(k, std::move(v), bytes);
        if (!evicted) return py::none();
        return py::cast(*evicted);
      }, py::arg("key"), py::arg("value"), py::arg("bytes"),
         "Returns the evicted keys, or None when the entry cannot fit even after evicting all unpinned entries.")
      .def("__contains__", &PyLruCache::contains)
      .def("erase", &PyLruCache::erase)
      .def("clear", &PyLruCache::clear)
      .def("pin", &PyLruCache::pin)
      .def("unpin", &PyLruCache::unpin)
      .def("pins", &PyLruCache::pins)
      .def("set_budget", &PyLruCache::set_budget, py::arg("max_entries"), py::arg("max_bytes"))
      .def("keys", &PyLruCache::keys)
      .def("stats", [](const PyLruCache& c) { return stats_dict(c.stats()); })
      .def_property_readonly("max_entries", &PyLruCache::max_entries)
      .def_property_readonly("max_bytes", &PyLruCache::max_bytes);
}
