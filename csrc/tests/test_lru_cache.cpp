// The LRU policy with plain values: what the CUDA graph cache relies on.
#include <memory>
#include <string>

#include "../lru_cache.h"
#include "test_main.h"

using Cache = hjcg::LruCache<std::string, int>;

TEST(evicts_least_recently_used_by_count) {
  Cache c(2, 0);
  c.put("a", 1, 1);
  c.put("b", 2, 1);
  CHECK(c.get("a").value() == 1);
  auto evicted = c.put("c", 3, 1).value();
  CHECK(evicted.size() == 1 && evicted[0] == "b");
  CHECK(!c.contains("b") && c.contains("a") && c.contains("c"));
}

TEST(evicts_by_bytes_and_rejects_oversized) {
  Cache c(0, 100);
  c.put("a", 1, 60);
  c.put("b", 2, 30);
  auto evicted = c.put("c", 3, 50).value();
  CHECK(evicted.size() == 1 && evicted[0] == "a");
  CHECK(c.stats().bytes == 80);
  CHECK(!c.put("big", 4, 101).has_value());
  CHECK(c.stats().rejections == 1 && c.stats().entries == 2);
}

TEST(pinned_entries_survive) {
  Cache c(1, 0);
  c.put("a", 1, 1);
  c.pin("a");
  CHECK(!c.put("b", 2, 1).has_value());
  c.unpin("a");
  CHECK(c.put("b", 2, 1).value().size() == 1);
}

TEST(evicted_values_are_destroyed) {
  hjcg::LruCache<std::string, std::shared_ptr<int>> c(1, 0);
  auto value = std::make_shared<int>(7);
  std::weak_ptr<int> watch = value;
  c.put("a", std::move(value), 1);
  CHECK(!watch.expired());
  c.put("b", std::make_shared<int>(8), 1);
  CHECK(watch.expired());
}

TEST(stats_count_hits_and_misses) {
  Cache c(0, 0);
  c.put("a", 1, 5);
  c.get("a");
  c.get("a");
  c.get("x");
  auto s = c.stats();
  CHECK(s.hits == 2 && s.misses == 1 && s.insertions == 1 && s.bytes == 5);
}

TEST_MAIN()
