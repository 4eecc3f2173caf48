#include "graph_cache.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <string>

#include "lru_cache.h"

namespace py = pybind11;

namespace hjcg {
namespace {

using Graph = std::shared_ptr<at::cuda::CUDAGraph>;

int64_t reserved_bytes(c10::DeviceIndex device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.reserved_bytes[0].current;  // index 0: the aggregate over pools
}

class GraphCache {
 public:
  GraphCache(uint64_t max_entries, uint64_t max_bytes) : lru_(max_entries, max_bytes) {}

  // Replays the graph under `key` on the current stream; false (a miss) when there is none.
  // The lookup holds the GIL (stats() may read the policy from another Python thread); the launch does not:
  // cudaGraphLaunch takes ~0.2 ms of host time, during which the server's RPC threads can stream tokens.
  bool replay(const std::string& key) {
    auto graph = lru_.get(key);
    if (!graph) return false;
    auto held = *graph;  // keeps the graph alive whatever happens to the cache meanwhile
    py::gil_scoped_release no_gil;
    held->replay();
    return true;
  }

  bool contains(const std::string& key) const { return lru_.contains(key); }

  // Captures `fn` (a Python callable that enqueues the work) into a graph stored under `key`.
  // Never throws for a failed capture (out of memory included): returns captured=False and the
  // reason, so the caller runs the eager path instead.
  py::dict capture(const std::string& key, const py::function& fn, int warmup, bool pin) {
    py::dict result;
    result["captured"] = false;
    result["bytes"] = 0;
    result["evicted"] = py::list();
    const auto start = std::chrono::steady_clock::now();
    const c10::DeviceIndex device = c10::cuda::current_device();
    lru_.erase(key);
    Graph graph;
    int64_t bytes = 0;
    try {
      auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
      int64_t before = 0;
      {
        const c10::cuda::CUDAStreamGuard guard(side);
        c10::cuda::device_synchronize();
        for (int i = 0; i < warmup; ++i) fn();  // first-call work (handles, autotuning) stays out of the graph
        c10::cuda::device_synchronize();
        // measured after the warm-up, so the figure is the graph's own pool and nothing else
        c10::cuda::CUDACachingAllocator::emptyCache();
        before = reserved_bytes(device);
        graph = std::make_shared<at::cuda::CUDAGraph>();
        graph->capture_begin();
        try {
          fn();
        } catch (...) {
          end_failed_capture(*graph);
          throw;
        }
        graph->capture_end();
      }
      c10::cuda::device_synchronize();
      bytes = std::max<int64_t>(0, reserved_bytes(device) - before);
    } catch (const std::exception& e) {
      graph.reset();
      ++capture_failures_;
      (void)cudaGetLastError();  // a failed capture leaves a sticky-free error behind; clear it
      c10::cuda::CUDACachingAllocator::emptyCache();
      result["error"] = std::string(e.what()).substr(0, 500);
      result["capture_ms"] = elapsed_ms(start);
      return result;
    }
    ++captures_;
    auto evicted = lru_.put(key, graph, static_cast<uint64_t>(bytes));
    if (!evicted) {
      ++capture_failures_;
      graph.reset();
      c10::cuda::CUDACachingAllocator::emptyCache();
      result["error"] = std::string("the graph (") + std::to_string(bytes) + " bytes) does not fit the cache budget";
      result["capture_ms"] = elapsed_ms(start);
      return result;
    }
    if (pin) lru_.pin(key);
    if (!evicted->empty()) c10::cuda::CUDACachingAllocator::emptyCache();  // give the evicted pools back
    result["captured"] = true;
    result["bytes"] = bytes;
    result["evicted"] = py::cast(*evicted);
    result["capture_ms"] = elapsed_ms(start);
    return result;
  }

  bool erase(const std::string& key) {
    const bool erased = lru_.erase(key);
    if (erased) c10::cuda::CUDACachingAllocator::emptyCache();
    return erased;
  }

  void clear() {
    lru_.clear();
    c10::cuda::CUDACachingAllocator::emptyCache();
  }

  py::dict stats() const {
    const LruStats s = lru_.stats();
    py::dict d;
    d["entries"] = s.entries;
    d["max_entries"] = lru_.max_entries();
    d["budget_bytes"] = lru_.max_bytes();
    d["bytes"] = s.bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["captures"] = captures_;
    d["evictions"] = s.evictions;
    d["capture_failures"] = capture_failures_;
    return d;
  }

  std::vector<std::string> keys() const { return lru_.keys(); }

 private:
  static double elapsed_ms(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }

  static void end_failed_capture(at::cuda::CUDAGraph& graph) {
    try {
      graph.capture_end();  // ends stream capture and the pool's allocation mode, then reports the failure
    } catch (...) {
    }
  }

  LruCache<std::string, Graph> lru_;
  uint64_t captures_ = 0;
  uint64_t capture_failures_ = 0;
};

}  // namespace

void bind_graph_cache(py::module_& m) {
  py::class_<GraphCache>(m, "GraphCache",
                         "CUDA graphs under an LRU policy with an entry and a byte budget; one memory pool "
                         "per graph, so eviction frees memory.")
      .def(py::init<uint64_t, uint64_t>(), py::arg("max_entries"), py::arg("max_bytes"))
      .def("replay", &GraphCache::replay, py::arg("key"))
      .def("capture", &GraphCache::capture, py::arg("key"), py::arg("fn"), py::arg("warmup") = 1,
           py::arg("pin") = false)
      .def("__contains__", &GraphCache::contains)
      .def("erase", &GraphCache::erase)
      .def("clear", &GraphCache::clear)
      .def("keys", &GraphCache::keys)
      .def("stats", &GraphCache::stats);
}

}  // namespace hjcg
