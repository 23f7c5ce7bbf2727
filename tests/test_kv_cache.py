"""BlockManager: allocation, prefix reuse, reference counts, LRU eviction, no leaks."""

import random

import pytest

from pipeline_dsl.engine.kv_cache import BlockManager, bytes_per_block, num_blocks_for_budget


def test_budget_sets_number_of_blocks():
    per_block = bytes_per_block(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype_bytes=2)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert num_blocks_for_budget(256 << 20, per_block) == (256 << 20) // per_block


def test_allocation_covers_positions_and_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.allocate("a", 17)
    assert len(bm.table("a")) == 2
    assert bm.allocate("a", 32)           # still two blocks
    assert len(bm.table("a")) == 2
    assert not bm.allocate("b", 3 * 16)   # needs 3, only 2 free: nothing taken
    assert "b" not in bm.seqs or bm.table("b") == []
    assert bm.num_free == 2
    bm.check_invariants()


def test_identical_prefix_shares_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))              # blocks [0..3] [4..7], partial [8, 9]
    assert bm.match_prefix("a", prompt) == 0
    bm.allocate("a", len(prompt))
    bm.commit("a", prompt, len(prompt))
    assert bm.num_cached == 2             # the partial block is never shared
    assert bm.match_prefix("b", prompt) == 8
    assert bm.table("b") == bm.table("a")[:2]
    assert [bm.ref[b] for b in bm.table("a")] == [2, 2, 1]
    bm.allocate("b", len(prompt))
    assert bm.table("b")[2] != bm.table("a")[2]   # b writes its own last block
    assert bm.hit_tokens == 8 and bm.queried_tokens == 20
    bm.check_invariants()


def test_different_prefix_does_not_match_later_identical_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    bm.match_prefix("a", a)
    bm.allocate("a", 9)
    bm.commit("a", a, 9)
    b = [9, 9, 9, 9, 5, 6, 7, 8, 9]       # same second block, different parent
    assert bm.match_prefix("b", b) == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    bm.match_prefix("a", prompt)
    bm.allocate("a", 8)
    bm.commit("a", prompt, 8)
    assert bm.match_prefix("b", prompt) == 4  # the last block is recomputed, not shared


def test_freed_cached_blocks_stay_reusable_until_evicted_lru_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    for sid, toks in (("a", [1, 2]), ("b", [3, 4])):
        bm.match_prefix(sid, toks + [0])
        bm.allocate(sid, 2)
        bm.commit(sid, toks + [0], 2)
        bm.free_seq(sid)
    assert bm.num_cached == 2 and bm.num_free == 4
    # two fresh blocks are taken from the never-cached ones first, then "a"'s (older) block
    bm.allocate("c", 6)
    assert bm.num_cached == 1 and bm.evictions == 1
    assert bm.match_prefix("d", [3, 4, 0]) == 2   # "b" survived
    assert bm.match_prefix("e", [1, 2, 0]) == 0   # "a" was evicted
    bm.check_invariants()


def test_reuse_moves_block_to_back_of_eviction_queue():
    bm = BlockManager(num_blocks=2, block_size=2)
    for sid, toks in (("a", [1, 2]), ("b", [3, 4])):
        bm.match_prefix(sid, toks + [0])
        bm.allocate(sid, 2)
        bm.commit(sid, toks + [0], 2)
        bm.free_seq(sid)
    assert bm.match_prefix("a2", [1, 2, 0]) == 2  # touch "a": now "b" is the oldest
    bm.free_seq("a2")
    bm.allocate("c", 2)
    assert bm.match_prefix("x", [1, 2, 0]) == 2
    assert bm.match_prefix("y", [3, 4, 0]) == 0


def test_prefix_reuse_off_never_matches():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_reuse=False)
    bm.match_prefix("a", [1, 2, 3])
    bm.allocate("a", 3)
    bm.commit("a", [1, 2, 3], 3)
    assert bm.match_prefix("b", [1, 2, 3]) == 0 and bm.num_cached == 0


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_thousand_random_requests_leak_nothing(prefix_reuse):
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=64, block_size=4, prefix_reuse=prefix_reuse)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(8)]
    live: dict[str, list[int]] = {}
    for n in range(1000):
        sid = f"r{n}"
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 10))]
        computed = bm.match_prefix(sid, prompt)
        assert computed % 4 == 0 and computed < len(prompt)
        if not bm.allocate(sid, len(prompt)):
            bm.free_seq(sid)
        else:
            bm.commit(sid, prompt, len(prompt))
            tokens = list(prompt)
            for _ in range(rng.randrange(0, 12)):       # decode a few tokens
                tokens.append(rng.randrange(50))
                if not bm.allocate(sid, len(tokens)):
                    break
                bm.commit(sid, tokens, len(tokens))
            live[sid] = tokens
        while live and (len(live) > 6 or rng.random() < 0.4):
            victim = rng.choice(sorted(live))
            del live[victim]
            bm.free_seq(victim)
        bm.check_invariants()
    for sid in list(live):
        bm.free_seq(sid)
    bm.check_invariants()
    assert sum(bm.ref) == 0 and bm.num_used == 0
    assert bm.num_free == bm.num_blocks
    st = bm.stats()
    assert st["kv_blocks_free"] + st["kv_blocks_cached"] == st["kv_blocks_total"]
    assert st["kv_blocks_cached"] == bm.num_cached
    if prefix_reuse:
        assert bm.hit_tokens > 0


def test_a_colliding_parent_hash_cannot_serve_another_prompts_blocks(monkeypatch):
    """Keys chain a 128-bit digest of the whole parent key: even when Python's 64-bit hash of
    every parent collides (forced here), a prompt never gets blocks computed for another.

    C = [p, q2] and A = [p, q1, x] are cached; B = [p, q2, x] shares p and q2 with C, and x
    with A, but its third block's KV was computed after q1, not q2: it must not be shared."""
    import builtins

    from pipeline_dsl.engine import kv_cache

    monkeypatch.setattr(builtins, "hash", lambda obj: 0)     # the old scheme keyed on hash(parent)
    bm = kv_cache.BlockManager(num_blocks=16, block_size=2)
    p, q1, q2, x = [1, 2], [3, 4], [5, 6], [7, 8]
    for sid, toks in (("C", p + q2), ("A", p + q1 + x)):
        bm.match_prefix(sid, toks + [9])
        bm.allocate(sid, len(toks) + 1)
        bm.commit(sid, toks + [9], len(toks))
    b = p + q2 + x + [9]
    assert len(bm.lookup(b)) == 2                            # p and q2 only, not A's x
    keys = bm.block_keys(b)
    assert len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    assert keys[2] != bm.block_keys(p + q1 + x)[2]
