"""The graph cache's LRU policy (hjcg._C.LruCache): budgets by count and bytes, order, pins, stats."""
import pytest

from hjcg.native import _C


def test_evicts_least_recently_used_past_the_entry_budget():
    cache = _C.LruCache(2, 0)
    assert cache.put("a", "A", 1) == []
    assert cache.put("b", "B", 1) == []
    assert cache.get("a") == "A"          # a is now the most recently used
    assert cache.put("c", "C", 1) == ["b"]
    assert cache.keys() == ["c", "a"]
    assert "b" not in cache


def test_evicts_until_the_byte_budget_holds():
    cache = _C.LruCache(0, 100)
    for key in "abc":
        cache.put(key, key, 30)
    assert cache.put("d", "d", 30) == ["a"]
    assert cache.stats()["bytes"] == 90
    assert cache.put("e", "e", 60) == ["b", "c"]
    assert cache.keys() == ["e", "d"]


def test_rejects_an_entry_larger_than_the_budget_without_evicting():
    cache = _C.LruCache(0, 100)
    cache.put("a", 1, 50)
    assert cache.put("huge", 2, 101) is None
    assert cache.keys() == ["a"]
    assert cache.stats()["rejections"] == 1


def test_pinned_entries_are_never_evicted():
    cache = _C.LruCache(2, 0)
    cache.put("a", 1, 1)
    cache.pin("a")
    cache.put("b", 2, 1)
    assert cache.put("c", 3, 1) == ["b"]   # a is older but pinned
    cache.pin("c")
    assert cache.put("d", 4, 1) is None    # both pinned: no room
    cache.unpin("a")
    assert cache.put("d", 4, 1) == ["a"]
    assert cache.pins("c") == 1


def test_unpin_of_an_unpinned_entry_is_an_error():
    cache = _C.LruCache(2, 0)
    cache.put("a", 1, 1)
    with pytest.raises(RuntimeError):
        cache.unpin("a")
    with pytest.raises(IndexError):
        cache.pin("missing")


def test_counts_hits_misses_insertions_evictions():
    cache = _C.LruCache(1, 0)
    cache.put("a", 1, 10)
    cache.get("a")
    cache.get("zz")
    cache.put("b", 2, 10)
    s = cache.stats()
    assert (s["entries"], s["bytes"], s["hits"], s["misses"], s["insertions"], s["evictions"]) == (1, 10, 1, 1, 2, 1)


def test_replacing_a_key_updates_its_bytes():
    cache = _C.LruCache(0, 0)
    cache.put("a", 1, 10)
    cache.put("a", 2, 30)
    assert cache.get("a") == 2
    assert cache.stats()["bytes"] == 30 and cache.stats()["entries"] == 1


def test_shrinking_the_budget_evicts_and_erase_frees():
    cache = _C.LruCache(0, 0)
    for key in "abc":
        cache.put(key, key, 10)
    assert cache.set_budget(1, 0) == ["a", "b"]
    assert cache.erase("c") and not cache.erase("c")
    assert cache.stats()["bytes"] == 0


def test_evicted_values_are_released():
    import weakref

    class Value:
        pass

    cache = _C.LruCache(1, 0)
    v = Value()
    ref = weakref.ref(v)
    cache.put("a", v, 1)
    del v
    assert ref() is not None
    cache.put("b", Value(), 1)
    assert ref() is None
