// A least-recently-used cache under two budgets (entry count and bytes), generic over key and value.
//
// The graph cache instantiates it with CUDA graphs; the CPU tests instantiate it with plain values, so
// the policy is proven without a GPU. Values are owned by the cache: an evicted value is destroyed (its
// destructor frees what it holds) unless a caller still shares it. Entries in use are pinned and never
// evicted. Not thread-safe: one engine thread owns it.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hjcg {

struct LruStats {
  uint64_t entries = 0;
  uint64_t bytes = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t insertions = 0;
  uint64_t evictions = 0;
  uint64_t rejections = 0;  // entries that could not fit even after evicting every unpinned entry
};

template <typename Key, typename Value, typename Hash = std::hash<Key>>
class LruCache {
 public:
  // max_entries == 0 or max_bytes == 0 means no limit of that kind.
  LruCache(uint64_t max_entries, uint64_t max_bytes) : max_entries_(max_entries), max_bytes_(max_bytes) {}

  // Returns the value and marks it most recently used; counts a hit or a miss.
  std::optional<Value> get(const Key& key) {
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++stats_.misses;
      return std::nullopt;
    }
    ++stats_.hits;
    order_.splice(order_.begin(), order_, it->second);
    return it->second->value;
  }

  // Looks without touching recency or the hit/miss counts.
  bool contains(const Key& key) const { return index_.count(key) != 0; }

  // Inserts (or replaces) an entry as most recently used, then evicts least-recently-used unpinned
  // entries until both budgets hold. Returns the evicted keys. If the entry cannot fit even with every
  // other unpinned entry gone, nothing is evicted, the entry is not stored and std::nullopt is returned.
  std::optional<std::vector<Key>> put(const Key& key, Value value, uint64_t bytes) {
    erase(key);
    if (!fits_after_evicting_all_unpinned(bytes)) {
      ++stats_.rejections;
      return std::nullopt;
    }
    order_.push_front(Entry{key, std::move(value), bytes, 0});
    index_[key] = order_.begin();
    stats_.bytes += bytes;
    ++stats_.insertions;
    return evict_to_budget();
  }

  bool erase(const Key& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return false;
    stats_.bytes -= it->second->bytes;
    order_.erase(it->second);
    index_.erase(it);
    return true;
  }

  void clear() {
    order_.clear();
    index_.clear();
    stats_.bytes = 0;
  }

  // A pinned entry is in use and is never evicted; pins nest.
  void pin(const Key& key) { find_or_throw(key).pins += 1; }
  void unpin(const Key& key) {
    Entry& e = find_or_throw(key);
    if (e.pins == 0) throw std::logic_error("unpin of an entry that is not pinned");
    e.pins -= 1;
  }
  uint32_t pins(const Key& key) const {
    auto it = index_.find(key);
    return it == index_.end() ? 0 : it->second->pins;
  }

  // Changes the budgets and evicts to meet them; returns the evicted keys.
  std::vector<Key> set_budget(uint64_t max_entries, uint64_t max_bytes) {
    max_entries_ = max_entries;
    max_bytes_ = max_bytes;
    return evict_to_budget();
  }

  // Keys from most to least recently used.
  std::vector<Key> keys() const {
    std::vector<Key> out;
    out.reserve(order_.size());
    for (const Entry& e : order_) out.push_back(e.key);
    return out;
  }

  LruStats stats() const {
    LruStats s = stats_;
    s.entries = order_.size();
    return s;
  }
  uint64_t max_entries() const { return max_entries_; }
  uint64_t max_bytes() const { return max_bytes_; }

 private:
  struct Entry {
    Key key;
    Value value;
    uint64_t bytes;
    uint32_t pins;
  };
  using Iter = typename std::list<Entry>::iterator;

  Entry& find_or_throw(const Key& key) {
    auto it = index_.find(key);
    if (it == index_.end()) throw std::out_of_range("no such cache entry");
    return *it->second;
  }

  bool over_budget(uint64_t entries, uint64_t bytes) const {
    return (max_entries_ != 0 && entries > max_entries_) || (max_bytes_ != 0 && bytes > max_bytes_);
  }

  bool fits_after_evicting_all_unpinned(uint64_t new_bytes) const {
    uint64_t entries = 1, bytes = new_bytes;
    for (const Entry& e : order_) {
      if (e.pins > 0) {
        entries += 1;
        bytes += e.bytes;
      }
    }
    return !over_budget(entries, bytes);
  }

  std::vector<Key> evict_to_budget() {
    std::vector<Key> evicted;
    auto it = order_.end();
    while (over_budget(order_.size(), stats_.bytes) && it != order_.begin()) {
      --it;
      if (it->pins > 0) continue;
      evicted.push_back(it->key);
      stats_.bytes -= it->bytes;
      ++stats_.evictions;
      index_.erase(it->key);
      it = order_.erase(it);
    }
    return evicted;
  }

  uint64_t max_entries_;
  uint64_t max_bytes_;
  std::list<Entry> order_;  // front: most recently used
  std::unordered_map<Key, Iter, Hash> index_;
  LruStats stats_;
};

}  // namespace hjcg
