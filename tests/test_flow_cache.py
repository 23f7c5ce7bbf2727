"""A python stage's result cache (docs/language.md, "Python stages": `cache`, `cache_ttl`): keyed
by content without ids, the least recently used entry goes first, entries age out after the ttl."""
from __future__ import annotations

from pipeline_dsl.flow.cache import ResultCache, cache_key


def test_the_key_is_the_content_without_the_ids():
    a = {"id": "a", "text": "t", "request": {"id": "a", "prompt": "p"}}
    b = {"id": "b", "text": "t", "request": {"id": "b", "prompt": "p"}}
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**b, "text": "u"})
    assert cache_key({"prompt": "p", "metadata": {"x": object()}}) is None     # not plain JSON: never cached
    # canonical: the same content whatever order its keys came in (a request line's, a stage's dict)
    assert cache_key({"prompt": "p", "metadata": {"a": 1, "b": 2}, "max_tokens": 3}) == \
        cache_key({"max_tokens": 3, "metadata": {"b": 2, "a": 1}, "prompt": "p"})


def test_the_least_recently_used_entry_goes_first():
    cache = ResultCache(2)
    ka, kb, kc = (cache_key({"prompt": w}) for w in "abc")
    cache.put(ka, None, {"prompt": "a"})
    cache.put(kb, None, {"prompt": "b"})
    assert cache.get(ka, {"prompt": "a"}) is not None         # a is used: b is now the oldest
    cache.put(kc, None, {"prompt": "c"})
    assert cache.get(kb, {"prompt": "b"}) is None
    assert cache.get(ka, {"prompt": "a"}) is not None and cache.get(kc, {"prompt": "c"}) is not None


def test_an_entry_older_than_the_ttl_is_a_miss_and_zero_keeps_it_forever():
    now = [0.0]
    aging, forever = ResultCache(8, ttl=10.0, clock=lambda: now[0]), ResultCache(8, clock=lambda: now[0])
    key = cache_key({"prompt": "a"})
    for cache in (aging, forever):
        cache.put(key, "label", {"id": "1", "prompt": "a"})
    now[0] = 9.0
    assert aging.get(key, {"id": "2", "prompt": "a"}) == ("label", {"id": "2", "prompt": "a"})   # its own id
    now[0] = 11.0
    assert aging.get(key, {"prompt": "a"}) is None
    now[0] = 1e9
    assert forever.get(key, {"prompt": "a"}) is not None
