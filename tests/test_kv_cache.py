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


# ---------------------------------------------------------------- found by `make mutate` (docs/testing.md)

def test_a_budget_below_one_block_gives_no_blocks():
    assert num_blocks_for_budget(999, 1000) == 0
    assert num_blocks_for_budget(1000, 1000) == 1


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (0, 0), (-1, 4)])
def test_a_pool_needs_one_block_of_one_token(num_blocks, block_size):
    with pytest.raises(ValueError, match=rf"need at least one block of one token, not {num_blocks} x {block_size}"):
        BlockManager(num_blocks, block_size)


def test_a_pool_of_one_block_of_one_token_works():
    bm = BlockManager(1, 1)
    assert bm.allocate("a", 1) and not bm.allocate("b", 1)
    bm.check_invariants()


def test_a_sequence_holding_blocks_cannot_be_started_again():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.match_prefix("a", [1, 2, 3])
    bm.allocate("a", 3)
    with pytest.raises(ValueError, match=r"sequence 'a' already holds blocks"):
        bm.match_prefix("a", [1, 2, 3])


def test_hit_statistics_add_up_over_requests_and_skip_readmissions():
    bm = BlockManager(num_blocks=16, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    bm.match_prefix("a", prompt)
    bm.allocate("a", 5)
    bm.commit("a", prompt, 5)
    assert bm.match_prefix("b", prompt) == 4
    assert bm.match_prefix("c", prompt) == 4
    assert bm.match_prefix("d", prompt, count=False) == 4     # a re-admission after preemption
    assert (bm.queried_tokens, bm.hit_tokens) == (15, 8)
    assert bm.hit_rate == 8 / 15


def test_freed_blocks_without_a_key_are_reused_before_cached_ones():
    """A sequence's partial last block has no key: freed, it goes to the front of the queue, so
    the next allocation takes it and the cached full block stays reusable."""
    bm = BlockManager(num_blocks=2, block_size=2)
    prompt = [1, 2, 3]                    # one full block (cached) and one partial block
    bm.match_prefix("a", prompt)
    bm.allocate("a", 3)
    bm.commit("a", prompt, 3)
    bm.free_seq("a")
    bm.allocate("b", 1)
    assert bm.evictions == 0
    assert bm.match_prefix("c", prompt) == 2
    bm.check_invariants()


def test_every_eviction_is_counted():
    bm = BlockManager(num_blocks=3, block_size=1)
    for sid, tok in (("a", 1), ("b", 2), ("c", 3)):
        bm.match_prefix(sid, [tok, 0])
        bm.allocate(sid, 1)
        bm.commit(sid, [tok, 0], 1)
        bm.free_seq(sid)
    assert bm.num_cached == 3
    bm.allocate("d", 2)
    assert bm.evictions == 2 and bm.num_cached == 1
    bm.allocate("e", 1)
    assert bm.evictions == 3 and bm.num_cached == 0


def test_stats_name_every_counter():
    """The keys the runner's summary, the metrics and the benchmarks read (all derived
    from one scenario: 2 blocks in use, 1 cached and unused, 1 free, 1 eviction)."""
    bm = BlockManager(num_blocks=4, block_size=2)
    for sid, toks in (("a", [1, 2]), ("b", [3, 4]), ("x", [5, 6])):
        bm.match_prefix(sid, toks + [0])
        bm.allocate(sid, 2)
        bm.commit(sid, toks + [0], 2)
        bm.free_seq(sid)
    assert bm.match_prefix("c", [3, 4, 0]) == 2     # hit "b"
    bm.allocate("c", 3)
    bm.allocate("d", 2)                            # the fresh block, then evicts "a"
    assert bm.stats() == {
        "kv_blocks_total": 4, "kv_blocks_used": 3, "kv_blocks_cached": 1, "kv_blocks_free": 0,
        "kv_blocks_prefix": 2, "kv_block_size": 2, "kv_prefix_reuse": True, "kv_evictions": 1,
        "kv_queried_tokens": 12, "kv_hit_tokens": 2, "kv_hit_rate": 2 / 12,
    }


@pytest.mark.parametrize("corrupt, message", [
    (lambda bm: bm.ref.__setitem__(0, 5), "reference counts differ from the block tables"),
    (lambda bm: bm.free.pop(3), "free queue differs from the blocks with no reference"),
    (lambda bm: bm.cached.__setitem__(b"k" * 16, 3), "cache map is stale"),
    (lambda bm: bm.key.__setitem__(3, b"k" * 16), "stray block keys"),
])
def test_check_invariants_names_what_is_broken(corrupt, message):
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.match_prefix("a", [1, 2, 3])
    bm.allocate("a", 3)
    bm.commit("a", [1, 2, 3], 3)
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(AssertionError) as e:
        bm.check_invariants()
    assert str(e.value) == message


def test_a_freed_keyless_block_is_reused_before_any_cached_block_is_evicted():
    # the whole pool in use: "a" holds two published blocks, "b" one partial block without a key
    bm = BlockManager(num_blocks=3, block_size=4)
    prompt = list(range(8))
    bm.match_prefix("a", prompt + [99])
    assert bm.allocate("a", 8)
    bm.commit("a", prompt + [99], 8)
    assert bm.allocate("b", 2)
    bm.free_seq("a")                      # cached blocks freed first...
    bm.free_seq("b")                      # ...the keyless one last, yet it is reused first
    assert bm.num_free == 3 and bm.num_cached == 2
    assert bm.allocate("c", 4)
    assert bm.evictions == 0 and bm.num_cached == 2
    assert bm.match_prefix("d", prompt + [99]) == 8
    bm.check_invariants()


def test_a_freed_sequence_loses_its_last_blocks_to_eviction_before_its_first():
    """A prefix is only found from its first block on: evicting a freed sequence's head would
    leave the rest unreachable, so its tail blocks go first and the head stays reusable."""
    bm = BlockManager(num_blocks=3, block_size=4)
    prompt = list(range(12))
    bm.match_prefix("a", prompt + [99])
    assert bm.allocate("a", 12)
    bm.commit("a", prompt + [99], 12)
    bm.free_seq("a")
    assert bm.num_cached == 3
    assert bm.allocate("b", 4)                    # one block: an eviction
    assert bm.evictions == 1
    assert bm.match_prefix("c", prompt + [99]) == 8
    bm.check_invariants()


def test_a_table_that_grows_past_twice_the_arrays_width_at_once_holds_every_block():
    """One allocation may add more blocks than the table array's width doubled (a long prompt
    admitted in one chunk): the array grows to hold them all, and a step reads them back."""
    bm = BlockManager(num_blocks=100, block_size=1)
    assert bm.allocate("long", 70)
    assert len(bm.table("long")) == 70
    tables, lens = bm.tables.rows(bm.rows(["long"]))
    assert lens.tolist() == [70] and tables[0].tolist() == bm.table("long")
    bm.check_invariants()


def test_more_sequences_than_the_tables_rows_each_keep_a_row_of_their_own():
    """The table array starts with a few rows and doubles: sequences admitted past that keep
    distinct rows, so no sequence's blocks are read through another's table."""
    bm = BlockManager(num_blocks=200, block_size=2)
    ids = [f"s{i}" for i in range(40)]
    for i, sid in enumerate(ids):
        assert bm.allocate(sid, 2 + 2 * (i % 3))
    assert len(set(bm.rows(ids))) == len(ids)
    tables, lens = bm.tables.rows(bm.rows(ids))
    for sid, row, n in zip(ids, tables.tolist(), lens.tolist()):
        assert row[:n] == bm.table(sid)
    bm.check_invariants()
