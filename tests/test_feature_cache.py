"""The content-keyed LRU feature cache."""

import threading

import pytest
import torch

from captioner.vqa.feature_cache import FeatureCache, key_for


def test_lru_bound_evicts_the_least_recently_used():
    cache = FeatureCache(max_items=2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", torch.full((1,), 2.0))
    assert len(cache) == 2
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None


def test_hits_and_misses_are_counted():
    cache = FeatureCache(max_items=4)
    assert cache.get("x") is None
    cache.put("x", torch.arange(3.0))
    torch.testing.assert_close(cache.get("x"), torch.arange(3.0))
    cache.get("x")
    cache.get("y")
    assert (cache.hits, cache.misses) == (2, 2)


def test_size_zero_disables_caching():
    cache = FeatureCache(max_items=0)
    cache.put("a", torch.zeros(1))
    assert len(cache) == 0 and cache.get("a") is None


def test_putting_a_key_again_replaces_it_without_growing():
    cache = FeatureCache(max_items=3)
    cache.put("a", torch.zeros(1))
    cache.put("a", torch.ones(1))
    assert len(cache) == 1
    torch.testing.assert_close(cache.get("a"), torch.ones(1))


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="max_items"):
        FeatureCache(bad)


def test_keys_depend_on_content_and_model_identity():
    k = key_for(b"png bytes", "shapes-vqa", "1")
    assert k == key_for(b"png bytes", "shapes-vqa", "1")
    assert len(k) == 64
    others = {
        key_for(b"png bytes!", "shapes-vqa", "1"),
        key_for(b"png bytes", "easy-vqa", "1"),
        key_for(b"png bytes", "shapes-vqa", "2"),
        key_for(b"png bytes", "shapes-vqa"),
        key_for(b"png bytes", "shapes-vq", "a1"),  # identity parts are not simply concatenated
    }
    assert k not in others and len(others) == 5


def test_concurrent_use_keeps_the_bound_and_the_counts():
    cache = FeatureCache(max_items=8)

    def work(offset: int) -> None:
        for i in range(200):
            key = str((i + offset) % 16)
            if cache.get(key) is None:
                cache.put(key, torch.zeros(2))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 8
    assert cache.hits + cache.misses == 800
