"""The one in-process LRU (streamshard/lru.py): count and byte bounds, recency, eviction
callbacks, make_room before a new value, pickling as an empty copy, concurrent use."""

from __future__ import annotations

import pickle
import threading

from streamshard.lru import LRU


def test_count_bound_evicts_least_recently_used_and_calls_back():
    evicted = []
    lru = LRU(2, on_evict=lambda k, v: evicted.append((k, v)))
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1          # a is now the most recent
    lru.put("c", 3)                   # evicts b, the least recent
    assert evicted == [("b", 2)] and list(lru) == ["a", "c"]
    assert lru.get("b") is None
    assert lru.stats() == {"hits": 1, "misses": 1, "evictions": 1, "bytes": 2}


def test_byte_bound_keeps_at_least_the_newest_entry():
    lru = LRU(10, size=len)
    lru.put(1, b"xxxx")
    lru.put(2, b"yyyy")
    lru.put(3, b"zzzz")               # 12 bytes > 10: the oldest goes
    assert list(lru) == [2, 3] and lru.total == 8
    lru.put(4, b"w" * 50)             # alone larger than the bound: kept, the rest goes
    assert list(lru) == [4] and lru.total == 50
    lru.put(4, b"v")                  # replacing a key adjusts the total
    assert lru.total == 1 and len(lru) == 1


def test_make_room_evicts_before_a_new_value_exists():
    released = []
    lru = LRU(2, on_evict=lambda k, v: released.append(k))
    lru.put("s0", "reader0")
    lru.put("s1", "reader1")
    lru.make_room(1)                  # the caller is about to open a third shard
    assert released == ["s0"] and len(lru) == 1
    lru.capacity = 1                  # capacity may be lowered later (the loader does)
    lru.make_room(1)
    assert released == ["s0", "s1"] and len(lru) == 0


def test_pop_and_drain_do_not_call_back_and_zero_capacity_stores_nothing():
    calls = []
    lru = LRU(3, on_evict=lambda k, v: calls.append(k))
    for k in "abc":
        lru.put(k, k.upper())
    assert lru.pop("b") == "B" and lru.pop("b") is None
    assert lru.drain() == [("a", "A"), ("c", "C")] and len(lru) == 0 and lru.total == 0
    assert calls == []
    off = LRU(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def test_pickles_as_an_empty_map_of_the_same_capacity():
    lru = LRU(5, size=len)
    lru.put("a", b"12")
    copy = pickle.loads(pickle.dumps(lru))
    assert copy.capacity == 5 and len(copy) == 0
    copy.put("b", b"123456")          # the size function travelled: 6 > 5 keeps only b
    copy.put("c", b"1")
    assert list(copy) == ["c"]


def test_concurrent_puts_and_gets_keep_the_bound():
    lru = LRU(50, size=lambda v: v)
    errors = []

    def work(seed: int) -> None:
        try:
            for i in range(2000):
                key = (seed * 7919 + i * 104729) % 300
                if lru.get(key) is None:
                    lru.put(key, 1 + key % 4)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert lru.total <= 50 and lru.total == sum(1 + k % 4 for k in lru)
