"""A python stage's result cache (docs/language.md, "Python stages": `cache`, `cache_ttl`): keyed
by content without ids, the least recently used entry goes first, entries age out after the ttl;
in a running pipeline, requests of the same content wait for the one call already on its way,
and a call that fails is kept by none of them."""
from __future__ import annotations

import threading

import flowkit
from flowkit import chat, errors, on_a_thread, runtime, write
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
    now[0] = 10.0                                   # exactly the ttl old: not older than it, still a hit
    assert aging.get(key, {"id": "3", "prompt": "a"}) == ("label", {"id": "3", "prompt": "a"})
    now[0] = 11.0
    assert aging.get(key, {"prompt": "a"}) is None
    now[0] = 1e9
    assert forever.get(key, {"prompt": "a"}) is not None


# ---------------------------------------------------------------- the cache in a running pipeline

HOOKS = '''
import flowkit

def held(item):
    """The first call waits until both requests reached the stage; it may fail."""
    n = flowkit.bump("held")
    if n == 1:
        flowkit.gate("both in").wait(60)
        if item["metadata"].get("first_fails"):
            raise ValueError("the first call fails")
    item["messages"][0]["content"] += " (seen)"
    return item

def answer(item):
    return {"text": item["messages"][0]["content"]}
'''

CACHED = ('stage request : requests {}\nstage f : python { fn = "hooks:held"  cache = 8 }\n'
          'stage ans : python { fn = "hooks:answer"  returns = generated }\nstage out : respond {}\n'
          'request -> f -> ans -> out\n')


def _run_two_alike(tmp_path, model, metadata):
    """Two requests of the same content at a cached stage: the first call is held until both are in."""
    path = write(tmp_path, model, CACHED, hooks=HOOKS)
    assert errors(path) == []
    rt = runtime(path)

    def watch():
        for _ in range(6000):
            if rt.stats()["stages"]["f"]["items_in"] >= 2:
                break
            threading.Event().wait(0.01)
        flowkit.gate("both in").set()
    threading.Thread(target=watch, daemon=True).start()
    out: list = []
    failure = on_a_thread(lambda: out.extend(rt.run_all([chat("a", "same words", metadata=metadata),
                                                         chat("b", "same words", metadata=metadata)])), 120)
    rt.shutdown()
    assert not failure, repr(failure[0])
    return out, rt


def test_a_burst_of_the_same_content_makes_one_call_and_each_request_keeps_its_id(tmp_path, tiny_gguf,
                                                                                  fresh_flowkit):
    (a, b), rt = _run_two_alike(tmp_path, tiny_gguf, {})
    assert a.ok and b.ok
    assert flowkit.COUNTS["held"] == 1                       # b waited for a's call instead of its own
    assert a.choices[0].text == b.choices[0].text == "same words (seen)"
    assert a.choices[0].data["request"]["id"] == "a" and b.choices[0].data["request"]["id"] == "b"


def test_a_failed_call_fails_only_its_own_request_and_the_one_that_waited_calls_again(tmp_path, tiny_gguf,
                                                                                     fresh_flowkit):
    """Only successful calls are kept: a request that waited for a call that failed makes its own
    call, it does not get the other request's error."""
    results, rt = _run_two_alike(tmp_path, tiny_gguf, {"first_fails": True})
    failed = [r for r in results if not r.ok]
    answered = [r for r in results if r.ok]
    assert len(failed) == 1 and failed[0].error.stage == "f" and "the first call fails" in failed[0].error.message
    assert len(answered) == 1, [r.error for r in results]
    assert answered[0].choices[0].text == "same words (seen)"
    assert answered[0].choices[0].data["request"]["id"] == answered[0].id
    assert flowkit.COUNTS["held"] == 2
    assert rt.stats()["stages"]["f"]["cache_hits"] == 0
