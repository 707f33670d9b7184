"""_lru.LRU: the package's one bounded cache (layouts, BigBird block maps, row views, SDPA shape
counts, the Triton plan's mask classes)."""

import pickle

from sparse_attn._lru import LRU


def test_recall_marks_used_and_keep_drops_least_recent():
    cache = LRU()
    for key in "abc":
        assert cache.keep(key, key.upper(), capacity=3) == key.upper()
    assert cache.recall("a") == "A"  # "a" is now the most recent: "b" goes first
    cache.keep("d", "D", capacity=3)
    assert list(cache) == ["c", "a", "d"]
    assert cache.recall("b") is None and cache.recall("b", 0) == 0


def test_keep_overwrites_and_follows_the_capacity_of_each_call():
    cache = LRU()
    for i in range(5):
        cache.keep(i, i, capacity=5)
    cache.keep(1, "one", capacity=5)  # an overwrite is a use
    assert list(cache) == [0, 2, 3, 4, 1] and cache[1] == "one"
    cache.keep(5, 5, capacity=2)  # a smaller limit shrinks the cache at once
    assert list(cache) == [1, 5]


def test_falsy_values_are_recalled():
    cache = LRU()
    cache.keep("zero", 0, capacity=2)
    assert cache.recall("zero", default=-1) == 0


def test_pickles_with_its_order():
    cache = LRU()
    for key in "xyz":
        cache.keep(key, ord(key), capacity=3)
    cache.recall("x")
    again = pickle.loads(pickle.dumps(cache))
    assert isinstance(again, LRU) and list(again) == ["y", "z", "x"]
