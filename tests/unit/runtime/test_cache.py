from __future__ import annotations

import numpy as np
import pytest

from packager.runtime.cache import ResponseCache, cache_key


def test_key_depends_on_model_bytes_shape_dtype_and_outputs() -> None:
    a = {"x": np.zeros((2, 2), np.float32)}
    base = cache_key("m1", a, ["y"])
    assert base == cache_key("m1", {"x": np.zeros((2, 2), np.float32)}, ["y"])
    assert base != cache_key("m2", a, ["y"])
    assert base != cache_key("m1", {"x": np.zeros((4,), np.float32)}, ["y"])
    assert base != cache_key("m1", {"x": np.zeros((2, 2), np.int32)}, ["y"])
    assert base != cache_key("m1", {"x": np.ones((2, 2), np.float32)}, ["y"])
    assert base != cache_key("m1", a, ["z"])


def test_lru_eviction_keeps_within_the_byte_bound() -> None:
    entry = np.zeros(100, np.float32)  # 400 bytes + key + 64 of bookkeeping
    cache = ResponseCache(capacity_bytes=3 * (400 + 3 + 64))
    for key in (b"k1a", b"k2a", b"k3a"):
        cache.put(key, [entry])
    assert len(cache) == 3
    assert cache.get(b"k1a") is not None  # k1a is now the most recently used
    cache.put(b"k4a", [entry])
    assert cache.get(b"k2a") is None  # the least recently used went
    assert all(cache.get(k) is not None for k in (b"k1a", b"k3a", b"k4a"))
    assert cache.used <= cache.capacity


def test_oversized_results_are_not_cached_and_cached_arrays_are_read_only() -> None:
    cache = ResponseCache(capacity_bytes=1000)
    cache.put(b"big", [np.zeros(1000, np.float32)])
    assert cache.get(b"big") is None and cache.used == 0
    source = np.arange(4, dtype=np.float32)
    cache.put(b"small", [source])
    source[0] = 99  # the caller's array may change later; the cache kept a copy
    (cached,) = cache.get(b"small") or ()
    assert cached[0] == 0
    with pytest.raises(ValueError):
        cached[0] = 1
