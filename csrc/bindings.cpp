// The Python module hjcg._C: the LRU policy (holding Python objects, so the policy is usable and testable
// without a GPU) and, where built with CUDA, the CUDA graph cache and the GEMVs' support checks. Every kernel is
// a torch custom op (registration.cpp), called as torch.ops.hjcg.<name>.
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
  m.doc() = "hjcg native parts: LRU policy, CUDA graph cache, GEMV support checks (kernels: torch.ops.hjcg)";
  m.def("philox_uniform", &hjcg::philox_uniform, py::arg("seed"), py::arg("offset"), py::arg("row"),
        "The uniform draw the sampler uses for (seed, offset, row); exposed for tests.");

#ifdef HJCG_WITH_CUDA
  m.attr("with_cuda") = true;
  // the host-side checks the Python wrappers run before choosing a GEMV (the kernels: torch.ops.hjcg)
  m.def("gemv_supported", &hjcg::gemv_supported, py::arg("x"), py::arg("weight"));
  m.def("gemv_fp8_supported", &hjcg::gemv_fp8_supported, py::arg("x"), py::arg("q"), py::arg("scale"));
  m.def("gemv_mma_supported", &hjcg::gemv_mma_supported, py::arg("x"), py::arg("weight"));
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
