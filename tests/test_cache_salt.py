"""vLLM's cache_salt in the prefix cache (engine/kv_cache.py): a sequence's block keys chain
from a digest of its salt, so requests with different salts (or one salted and one not) never
share KV blocks, and requests with the same salt do."""
from __future__ import annotations

import pytest

from pipeline_dsl.engine import InputError, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from test_sampling_features import make

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = list(range(3, 3 + 40))                  # 2 full blocks of 16 before the last token


def admitted(bm: BlockManager, rid: str, salt=None) -> int:
    """Tokens of PROMPT a new sequence gets from the cache; its blocks then published."""
    hit = bm.match_prefix(rid, PROMPT, salt=salt)
    assert bm.allocate(rid, len(PROMPT))
    bm.commit(rid, PROMPT, len(PROMPT))
    return hit


def test_blocks_are_shared_only_under_the_same_salt():
    bm = BlockManager(32, 16)
    assert admitted(bm, "a", salt="alice") == 0
    assert admitted(bm, "b", salt="bob") == 0                 # another salt: nothing shared
    assert admitted(bm, "c") == 0                             # no salt: nothing shared with a salted one
    assert admitted(bm, "d", salt="alice") == 32              # the same salt: both full blocks
    assert admitted(bm, "e") == 32                            # unsalted ones share among themselves
    assert bm.table("d")[:2] == bm.table("a")[:2] and not set(bm.table("b")) & set(bm.table("a"))
    assert bm.lookup(PROMPT, "bob") == bm.table("b")[:2] and bm.lookup(PROMPT, "carol") == []
    bm.check_invariants()


def test_a_sequence_started_by_allocate_publishes_under_its_salt():
    bm = BlockManager(32, 16)
    assert bm.allocate("a", len(PROMPT), "s")                 # no prefix read (prompt logprobs)
    bm.commit("a", PROMPT, len(PROMPT))
    assert bm.lookup(PROMPT) == [] and bm.lookup(PROMPT, "s") == bm.table("a")[:2]


def test_the_engine_serves_cached_tokens_only_to_the_same_salt(tiny_gguf):
    eng = make(tiny_gguf)
    prompt = "the quick brown fox jumps over the lazy dog " * 4

    def cached(rid, salt=None):
        eng.add_request(rid, prompt=prompt, params=SamplingParams(max_tokens=2, cache_salt=salt))
        outs = []
        while eng.has_unfinished():
            outs += [o for o in eng.step() if o.request_id == rid]
        return outs[-1].cached_tokens

    assert cached("a", "one") == 0
    assert cached("b", "two") == 0 and cached("c") == 0
    assert cached("d", "one") > 0 and cached("e") > 0 and cached("f", "two") > 0
    with pytest.raises(InputError, match="'cache_salt' must be a non-empty string") as e:
        eng.add_request("g", prompt=prompt, params=SamplingParams(max_tokens=2, cache_salt=""))
    assert e.value.param == "cache_salt"
