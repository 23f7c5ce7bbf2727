"""The paged KV cache's bookkeeping: a pool of fixed-size blocks shared by block tables.

The physical K/V tensors live in the model runner; this module only decides which
block ids a sequence uses. Shape of the design (vLLM v1's block pool):

- `num_blocks` blocks of `block_size` token slots, all allocated up front from a byte
  budget (`num_blocks_for_budget`);
- one block table per sequence: position p lives in block `table[p // block_size]`;
- prefix reuse: every *full* block gets a key, a 128-bit BLAKE2b digest of its parent's
  key and its tokens (a chain: the key of block k stands for every token up to the end
  of block k, as vLLM's sha256 block hashes do); a new sequence whose leading full
  blocks match cached keys shares those blocks instead of recomputing them. A 64-bit
  `hash()` of the parent would make serving another prompt's KV a matter of chance
  (tests/test_kv_cache.py forces such a collision). Partly filled blocks are never
  shared, so no sequence ever writes into a block another one reads. A sequence with a
  cache salt (vLLM's cache_salt) chains its keys from a root digest of the salt instead
  of the empty root, so its blocks are shared only with sequences of the same salt (a
  sequence of a LoRA adapter chains from a digest of the adapter and its salt: root_key);
- reference counts; a block whose count drops to 0 goes to the free queue but keeps its
  key, so a later request can still hit it. The free queue is in eviction order (front
  = least recently used; blocks without a key go to the front, they are worth nothing);
  allocating pops the front and drops that block's key (LRU eviction);
- the tables are also rows of one preallocated array (`BlockTables`, as vLLM's BlockTable
  and nano-vllm keep them), updated where blocks are appended or a sequence is freed, so a
  step's tables are one fancy index (`rows`), not a list per sequence.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

BlockKey = bytes  # 16 bytes: blake2b(parent key + the block's token ids)
ROOT_KEY = b""     # the parent of a sequence's first block (one without a cache salt)


def root_key(salt: str | None = None, adapter: str | None = None) -> BlockKey:
    """The parent of a sequence's first block: ROOT_KEY, or a digest of its cache salt and its LoRA
    adapter (SamplingParams.prefix_key). A sequence of an adapter has the adapter's K/V, so its
    blocks are shared only with the same adapter's sequences (of the same salt)."""
    if adapter is not None:
        tail = b"" if salt is None else b"\0cache_salt\0" + salt.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(b"lora\0" + adapter.encode("utf-8", "surrogatepass") + tail, digest_size=16).digest()
    if salt is None:
        return ROOT_KEY
    return hashlib.blake2b(b"cache_salt\0" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype_bytes: int) -> int:
    """Bytes one block takes in the pool: K and V for every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    return max(0, int(budget_bytes) // int(block_bytes))


@dataclass
class _SeqBlocks:
    row: int                                          # its row of BlockTables.array
    table: list[int] = field(default_factory=list)  # physical block ids, in position order
    keys: list[BlockKey] = field(default_factory=list)  # keys of the leading full blocks
    root: BlockKey = ROOT_KEY                         # the parent of its first block (root_key of its salt)


class BlockTables:
    """Every sequence's block table as a row of one int64 array [rows, width] (grown by
    doubling), and its length; rows are reused once their sequence is freed."""

    def __init__(self, rows: int = 16, width: int = 16):
        self.array = np.zeros((rows, width), np.int64)     # [rows, width] block ids
        self.lens = np.zeros(rows, np.int64)               # [rows] blocks each row holds
        self.free_rows = list(range(rows - 1, -1, -1))

    def take_row(self) -> int:
        if not self.free_rows:
            old = self.array.shape[0]
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        return self.free_rows.pop()

    def give_row(self, row: int) -> None:
        self.lens[row] = 0
        self.free_rows.append(row)

    def extend(self, row: int, blocks: list[int]) -> None:
        """Append blocks to a row."""
        n = int(self.lens[row])
        end = n + len(blocks)
        if end > self.array.shape[1]:
            width = max(end, 2 * self.array.shape[1])
            grown = np.zeros((self.array.shape[0], width), np.int64)
            grown[:, :self.array.shape[1]] = self.array
            self.array = grown
        self.array[row, n:end] = blocks
        self.lens[row] = end

    def truncate(self, row: int, n: int) -> None:
        """Keep a row's first n blocks."""
        self.lens[row] = min(int(self.lens[row]), n)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([n, W] tables, [n] lengths) of `rows`, W = the longest of them."""
        lens = self.lens[rows]                                  # [n]
        width = int(lens.max()) if len(lens) else 0
        return self.array[rows, :width], lens                   # [n, W]


class BlockManager:
    """Allocates blocks to sequences, shares cached full blocks, evicts in LRU order."""

    def __init__(self, num_blocks: int, block_size: int, prefix_reuse: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, not {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_reuse = prefix_reuse
        self.ref = [0] * num_blocks
        self.key: list[BlockKey | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockKey, int] = {}          # key -> block id
        self.seqs: dict[str, _SeqBlocks] = {}
        self.tables = BlockTables()
        self.queried_tokens = 0                        # prompt tokens looked up
        self.hit_tokens = 0                            # of which served from the cache
        self.evictions = 0

    # ---- sizes -----------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (unused, cached or not)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a reusable prefix (shared by running sequences or evictable)."""
        return len(self.cached)

    @property
    def num_cached_unused(self) -> int:
        """Unreferenced blocks kept for prefix reuse (evicted first-come when space is needed)."""
        return sum(1 for b in self.free if self.key[b] is not None)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def table(self, seq_id: str) -> list[int]:
        return self.seqs[seq_id].table

    def row(self, seq_id: str) -> int:
        """The sequence's row of `tables.array` (while it holds blocks)."""
        return self.seqs[seq_id].row

    def rows(self, seq_ids) -> list[int]:
        """The sequences' rows of `tables.array`, in order (a step's: one call, not one a sequence)."""
        seqs = self.seqs
        return [seqs[s].row for s in seq_ids]

    def _seq(self, seq_id: str, salt: str | None = None, adapter: str | None = None) -> _SeqBlocks:
        seq = self.seqs.get(seq_id)
        if seq is None:
            seq = self.seqs[seq_id] = _SeqBlocks(self.tables.take_row(), root=root_key(salt, adapter))
        return seq

    # ---- prefix reuse ------------------------------------------------------------------
    def block_keys(self, token_ids: list[int], parent: BlockKey | None = None,
                   start: int = 0) -> list[BlockKey]:
        """Keys of the full blocks of token_ids[start:], chained from `parent`."""
        bs = self.block_size
        keys = []
        parent = ROOT_KEY if parent is None else parent
        for i in range(start, len(token_ids) - bs + 1, bs):
            tokens = array("q", token_ids[i:i + bs]).tobytes()
            parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
            keys.append(parent)
        return keys

    def lookup(self, token_ids: list[int], salt: str | None = None, adapter: str | None = None) -> list[int]:
        """Cached blocks covering the longest full-block prefix (no side effects), among those
        of sequences with the same cache `salt` and LoRA `adapter`.

        The last token is never covered: the model must compute it to give logits.
        """
        if not self.prefix_reuse:
            return []
        usable = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        blocks = []
        for key in self.block_keys(token_ids[:usable * self.block_size], root_key(salt, adapter)):
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def holds(self, keys: list[BlockKey]) -> bool:
        """Whether the prefix cache holds every one of these blocks (keys of a prompt's first full
        blocks, in order): lookup would serve at least them."""
        return self.prefix_reuse and all(key in self.cached for key in keys)

    def num_computed_blocks(self, seq_id: str) -> int:
        """Full blocks of the (admitted) sequence whose K/V are known computed: shared at admission
        or committed since (a block still being computed is not among them)."""
        return len(self.seqs[seq_id].keys)

    def admission_cost(self, hit: list[int], num_tokens: int) -> int:
        """Free blocks a new sequence would consume to cover num_tokens, sharing `hit` (from lookup)."""
        from_free = sum(1 for b in hit if self.ref[b] == 0)  # cached but unused: they leave the free queue
        return self.blocks_for(num_tokens) - len(hit) + from_free

    def match_prefix(self, seq_id: str, token_ids: list[int], count: bool = True, salt: str | None = None,
                     adapter: str | None = None) -> int:
        """Start a sequence: share its longest cached prefix of full blocks (of its cache `salt`
        and LoRA `adapter`).

        Returns the number of prompt tokens served from the cache. `count=False` keeps a
        re-admission (after preemption) out of the hit statistics.
        """
        if seq_id in self.seqs and self.seqs[seq_id].table:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        seq = self._seq(seq_id, salt, adapter)
        hit = self.lookup(token_ids, salt, adapter)
        for block in hit:
            self._acquire(block)
            seq.table.append(block)
            seq.keys.append(self.key[block])
        self.tables.extend(seq.row, hit)
        if count:
            self.queried_tokens += len(token_ids)
            self.hit_tokens += len(hit) * self.block_size
        return len(hit) * self.block_size

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Publish the full blocks among the first `num_computed` tokens for reuse."""
        if not self.prefix_reuse:
            return
        seq = self.seqs[seq_id]
        full = min(num_computed // self.block_size, len(seq.table))
        if full <= len(seq.keys):
            return
        parent = seq.keys[-1] if seq.keys else seq.root
        start = len(seq.keys) * self.block_size
        for key in self.block_keys(token_ids[:full * self.block_size], parent, start):
            block = seq.table[len(seq.keys)]
            seq.keys.append(key)
            if key not in self.cached and self.key[block] is None:
                self.cached[key] = block
                self.key[block] = key

    # ---- allocation --------------------------------------------------------------------
    def allocate(self, seq_id: str, num_tokens: int, salt: str | None = None, adapter: str | None = None) -> bool:
        """Grow the sequence's table to cover positions [0, num_tokens). All or nothing. A
        sequence it starts (one match_prefix did not) publishes its blocks under `salt` and `adapter`."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            seq = self._seq(seq_id, salt, adapter)
        need = -(-num_tokens // self.block_size) - len(seq.table)
        if need <= 0:                      # the common decode step: the last block has room
            return True
        if need > len(self.free):
            return False
        if need > 0:
            new = [self._pop_free() for _ in range(need)]
            seq.table.extend(new)
            self.tables.extend(seq.row, new)
        return True

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Shrink the sequence's table to cover positions [0, num_tokens): the blocks past them
        (speculative decoding's rejected drafts) go back to the free queue. Never a block the prefix
        cache knows: only blocks of committed (accepted) tokens are keyed, and those are kept."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return
        keep = max(self.blocks_for(num_tokens), len(seq.keys))
        if keep >= len(seq.table):
            return
        dropped, seq.table = seq.table[keep:], seq.table[:keep]
        self.tables.truncate(seq.row, keep)
        self._release(dropped)

    def free_seq(self, seq_id: str) -> None:
        """Release a sequence's blocks; cached ones stay reusable until evicted."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self.tables.give_row(seq.row)
        self._release(seq.table)

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each of a table's `blocks`; those left unreferenced go to the free
        queue, a keyed one at the back (still reusable), one without a key at the front. Reversed:
        a table's tail blocks are evicted before its head (shared prefixes)."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                if self.key[block] is None:
                    self.free.move_to_end(block, last=False)

    def _acquire(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key[block]
        if key is not None:  # evict: the block's contents are about to be overwritten
            del self.cached[key]
            self.key[block] = None
            self.evictions += 1
        self.ref[block] = 1
        return block

    # ---- checks ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests, debugging)."""
        counts = [0] * self.num_blocks
        for seq in self.seqs.values():
            for block in seq.table:
                counts[block] += 1
        assert counts == self.ref, "reference counts differ from the block tables"
        for seq in self.seqs.values():
            assert list(self.tables.array[seq.row, :self.tables.lens[seq.row]]) == seq.table, \
                "the table array differs from a block table"
        assert all((self.ref[b] == 0) == (b in self.free) for b in range(self.num_blocks)), \
            "free queue differs from the blocks with no reference"
        assert all(self.key[b] == k for k, b in self.cached.items()), "cache map is stale"
        assert sum(k is not None for k in self.key) == len(self.cached), "stray block keys"

    def stats(self) -> dict:
        cached_unused = self.num_cached_unused
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_used": self.num_used,                 # referenced by live sequences
            "kv_blocks_cached": cached_unused,               # unreferenced, kept for reuse
            "kv_blocks_free": self.num_free - cached_unused,  # used + cached + free == total
            "kv_blocks_prefix": self.num_cached,             # all blocks with a reusable key
            "kv_block_size": self.block_size,
            "kv_prefix_reuse": self.prefix_reuse,
            "kv_evictions": self.evictions,
            "kv_queried_tokens": self.queried_tokens,
            "kv_hit_tokens": self.hit_tokens,
            "kv_hit_rate": self.hit_rate,
        }
