"""One step's inputs as arrays, and the index tensors the forward reads, built vectorised.

    batch = StepBatch.from_items(items)            # or Engine/Executor: from the block manager's table array
    step = runner.prepare(batch)                   # positions, slots, sample rows, tables: array ops
    logits = runner.run(step)                      # [n_sample, V]

`StepBatch` is what the scheduler decided, per item (a prefill chunk or one decode token):
where it starts, how many tokens it feeds, whether its last row is sampled, and its block
table row. `prepare_step` turns it into a `Step` with numpy/torch operations over the
whole batch: no per-token and no per-item Python (the per-item lists of an earlier version
cost milliseconds a step at batch 256, see bench/gpu_host_step.py). On CUDA every host
array of the step goes to the device in ONE copy from a pinned buffer, non-blocking
(`Uploader`), so the host can prepare step N+1 while step N computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .flex import decode_width

PLACEHOLDER = -1          # a token sampled by a step still in flight (filled on the device)

# decode batch sizes the padded (static-shape) paths and the CUDA graphs use
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CONTEXT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)   # blocks of a padded decode context


def bucket_of(n: int, buckets=BATCH_BUCKETS) -> int:
    """The smallest bucket >= n; past the last, n rounded up to a multiple of 128."""
    for b in buckets:
        if n <= b:
            return b
    return ((n + 127) // 128) * 128


@dataclass
class StepBatch:
    """What one step feeds the model, per item (host arrays)."""
    tokens: np.ndarray        # [T] int64, items' tokens back to back; PLACEHOLDER where in flight
    starts: np.ndarray        # [n] int64 tokens of the item already in the KV cache
    counts: np.ndarray        # [n] int64 tokens the item feeds (1: a decode)
    sample: np.ndarray        # [n] bool: logits wanted for the item's last token
    tables: np.ndarray        # [n, W] int64 physical block ids in position order (0 past the end)
    table_lens: np.ndarray    # [n] int64 blocks each table really holds
    pad_to: int | None = None  # pad an all-decode batch to this many rows (static shapes)
    fill_from: np.ndarray | None = None   # [F] per PLACEHOLDER row in order: its index in the
                                          # concatenated sampled tensors of earlier steps
    rows: list | None = None  # [n] per item: () or the outputs wanted for EVERY row it feeds
                              # ("logits", "hidden": prompt logprobs, pooling; prompt_outputs.py)
    lora: list | None = None  # [n] per item: the name of its LoRA adapter or None (lora.py); None: no adapter

    @classmethod
    def from_items(cls, items, pad_to: int | None = None) -> "StepBatch":
        """From SeqBatchItem-like objects (token_ids, start_pos, block_table, sample)."""
        n = len(items)
        counts = np.fromiter((len(it.token_ids) for it in items), np.int64, n)
        lens = np.fromiter((len(it.block_table) for it in items), np.int64, n)
        tables = np.zeros((n, int(lens.max()) if n else 0), np.int64)
        for i, it in enumerate(items):
            tables[i, :len(it.block_table)] = it.block_table
        tokens = np.fromiter((t for it in items for t in it.token_ids), np.int64, int(counts.sum()))
        wanted = [tuple(getattr(it, "rows", ())) for it in items]
        lora = [getattr(it, "lora", None) for it in items]
        return cls(tokens, np.fromiter((it.start_pos for it in items), np.int64, n), counts,
                   np.fromiter((bool(it.sample) for it in items), bool, n), tables, lens, pad_to,
                   rows=wanted if any(wanted) else None, lora=lora if any(lora) else None)

    def __len__(self) -> int:
        return len(self.counts)


@dataclass
class Step:
    """Index tensors of one step, built once and shared by every layer."""
    tokens: torch.Tensor          # [T]
    slots: torch.Tensor           # [T] where each token's K/V is written
    cos: torch.Tensor | None      # [T, 1, hd]
    sin: torch.Tensor | None
    sample_rows: torch.Tensor | None   # [n_sample] rows of T whose logits are wanted
    all_decode: bool
    dec_rows: torch.Tensor | None      # [B] rows of the decode tokens (None: all rows, in order)
    dec_gather: torch.Tensor | None    # [B*nblk] block ids of each decode sequence's context
    dec_mask: torch.Tensor | None      # [B, 1, 1, Lmax] additive: 0 where real, -inf beyond
    prefills: list                     # (row0, n, gather [L], mask [g*n, L]) per prefill chunk
    dec_len: int | None = None         # one decode sequence alone (CPU): its context, no mask
    dec_first: int | None = None       # ... and its first slot, when its blocks are consecutive (no gather)
    positions: torch.Tensor | None = None   # [T]
    dec_tables: torch.Tensor | None = None  # [B, nblk] block ids (native attention reads them in place)
    dec_lens: torch.Tensor | None = None    # [B] context length of each decode sequence
    native: bool = False               # the whole step runs as one native call
    items: int = 0                     # sequences in the step
    fills: torch.Tensor | None = None  # [F] rows whose token is still in flight (PLACEHOLDER), or None
    fill_from: torch.Tensor | None = None   # [F] where each comes from (StepBatch.fill_from)
    invariant: tuple | None = None     # batch-invariant mode: (key slots [n, Lp], item of each row [T])
    row_items: list | None = None      # (item index, row0, n, wanted) of items that want every row
    rows: dict | None = None           # after the forward: item index -> {"logits": [n, V], "hidden": [n, H]}
    flex: object = None                # flex.FlexMeta: attention reads the pool in place (flex backend)
    graph_key: tuple | None = None     # (B, context blocks) of a padded all-decode step: its CUDA graph
    window_masks: dict | None = None   # a sliding layer's masks, built by its first layer (model._attention)
    lora: object = None                # lora.StepLora: the LoRA adapters of some rows (None: none)


class Uploader:
    """Host int64 arrays to the device: on CUDA packed into one pinned buffer and copied with one
    non-blocking copy on the current stream; a ring of buffers, each reused only after the copy
    that read it finished (an event), so preparing step N+1 never waits for step N's compute."""

    RING = 4

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: list = [None] * self.RING
        self._events: list = [None] * self.RING
        self._i = 0

    def __call__(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if not self.cuda:
            return [torch.from_numpy(np.ascontiguousarray(a, np.int64)) for a in arrays]
        sizes = [a.size for a in arrays]
        total = max(sum(sizes), 1)
        i = self._i = (self._i + 1) % self.RING
        if self._events[i] is not None:
            self._events[i].synchronize()               # the copy that last read it is done
        buf = self._bufs[i]
        if buf is None or buf.numel() < total:
            buf = self._bufs[i] = torch.empty(max(total, 4096), dtype=torch.int64, pin_memory=True)
        host = buf.numpy()
        at = 0
        for a, n in zip(arrays, sizes):
            host[at:at + n] = a.reshape(-1)
            at += n
        dev = buf[:total].to(self.device, non_blocking=True)      # [sum] one H2D copy
        ev = self._events[i] = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))   # the copy's stream (not the current device's)
        out, at = [], 0
        for a, n in zip(arrays, sizes):
            out.append(dev[at:at + n].view(a.shape))
            at += n
        return out


def check_batch(batch: StepBatch, block_size: int, max_position: int) -> None:
    """ValueError for an item that has no tokens, a table too short, or a position past the context."""
    if not len(batch):
        return
    ends = batch.starts + batch.counts
    if int(batch.counts.min()) <= 0:
        raise ValueError("a batch item has no tokens")
    short = (-(-ends // block_size) > batch.table_lens).nonzero()[0]
    if short.size:
        i = int(short[0])
        raise ValueError(f"block table of {int(batch.table_lens[i])} blocks cannot hold {int(ends[i])} tokens")
    if int(ends.max()) > max_position:
        raise ValueError(f"position {int(ends.max())} exceeds the model's context {max_position}")


def prepare_step(runner, batch: StepBatch) -> Step:
    """The Step of `batch` for `runner` (a ModelRunner): array operations over the batch."""
    model, bs, dev = runner.model, runner.block_size, runner.device
    c = model.config
    check_batch(batch, bs, c.max_position)
    counts, starts, tables = batch.counts, batch.starts, batch.tables
    n, T = len(counts), int(counts.sum())
    ends = counts.cumsum()                                         # [n] row after each item
    offs = ends - counts                                           # [n] first row of each item
    item_of = np.arange(n).repeat(counts)                          # [T] item of each row
    positions = starts[item_of] + np.arange(T) - offs[item_of]     # [T]
    slots = tables[item_of, positions // bs] * bs + positions % bs  # [T]
    sample_rows = (ends - 1)[batch.sample]                         # [n_sample]
    wants = np.zeros(n, bool) if batch.rows is None else np.fromiter(map(bool, batch.rows), bool, n)
    dec = (counts == 1) & ~wants       # a row-wanting chunk of one token takes the prefill path
    dec_idx = dec.nonzero()[0]                                     # items that decode one token
    pre_idx = (~dec).nonzero()[0]
    B = len(dec_idx)
    all_decode = not len(pre_idx)
    # a row of a LoRA adapter: the eager layers, which add its deltas (no native step, no graph)
    lora = batch.lora is not None and any(name is not None for name in batch.lora)
    use_native = runner.native is not None and all_decode and B <= runner.native_max_batch and not lora
    invariant = getattr(runner, "batch_invariant", False)
    # padded to a bucket (static shapes, for a CUDA graph): never for a model no graph can replay
    padded = all_decode and (runner.pad_decode or batch.pad_to is not None) and runner.native is None \
        and not invariant and not lora and getattr(runner, "graphs_refused", None) is None
    tokens = batch.tokens
    dec_rows = offs[dec_idx]
    pad = 0
    if padded:
        pad = max(0, (batch.pad_to or bucket_of(B)) - B)
        if pad:
            tokens = np.concatenate([tokens, np.zeros(pad, np.int64)])
            positions = np.concatenate([positions, np.zeros(pad, np.int64)])
            slots = np.concatenate([slots, np.full(pad, runner.num_slots, np.int64)])   # the scratch slot
            dec_rows = np.concatenate([dec_rows, np.arange(T, T + pad)])
    dec_lens = starts[dec_idx] + 1                                 # [B] context of each decode
    nblk = int(-(-int(dec_lens.max()) // bs)) if B else 0
    if B and padded and runner.native is None:
        nblk = bucket_of(nblk, CONTEXT_BUCKETS)                    # static shapes: few context lengths
    dec_tab = np.zeros((B + pad, nblk), np.int64)                  # [B(+pad), nblk]; padding: block 0
    if B:
        w = min(nblk, tables.shape[1])
        dec_tab[:B, :w] = tables[dec_idx, :w]
        dec_tab[:B, :w] *= np.arange(w)[None, :] < batch.table_lens[dec_idx, None]   # past a table's end: 0
    fills = (tokens == PLACEHOLDER).nonzero()[0]
    fill_from = batch.fill_from if batch.fill_from is not None else np.zeros(0, np.int64)
    if len(fill_from) != len(fills):
        raise ValueError(f"{len(fills)} tokens in flight but {len(fill_from)} sources for them")
    tok_t, slot_t, pos_t, rows_t, dec_rows_t, fills_t, from_t = runner.upload(
        tokens, slots, positions, sample_rows, dec_rows, fills, fill_from)
    cos, sin = (None, None) if use_native else model.rope_tables(pos_t)   # the native step has its own
    step = Step(tokens=tok_t, slots=slot_t, cos=cos, sin=sin,
                sample_rows=rows_t if len(sample_rows) else None, all_decode=all_decode,
                dec_rows=None, dec_gather=None, dec_mask=None, prefills=[], positions=pos_t,
                native=use_native, items=n, fills=fills_t if fills.size else None,
                fill_from=from_t if fills.size else None)
    if lora:
        from .lora import step_lora

        step.lora = step_lora(getattr(runner, "loras", {}), batch.lora, offs, counts, dev, per_row=invariant)
    if wants.any():
        step.row_items = [(i, int(offs[i]), int(counts[i]), tuple(batch.rows[i])) for i in np.nonzero(wants)[0].tolist()]
    if invariant:                                # every row over its own context, one path (invariant.py)
        from .invariant import key_index

        key_slots, _ = key_index(batch, bs, item_of, positions, runner.num_slots)
        step.invariant = tuple(runner.upload(key_slots, item_of))
        return step
    if getattr(runner, "flex", None) is not None:    # every row against the pool, in place (flex.py)
        if padded:                               # static sizes per (batch, context) bucket: a graph's
            ctx = np.concatenate([-(-dec_lens // bs), np.zeros(pad, np.int64)])
            qpos = np.concatenate([positions[:T], np.full(pad, -1, np.int64)])
            meta = runner.flex.meta(runner.upload, dec_tab, ctx, np.arange(B + pad), qpos,
                                    decode_width(nblk, runner.num_blocks))
        else:
            meta = runner.flex.meta(runner.upload, tables, -(-(starts + counts) // bs), item_of, positions)
        if meta is not None:                     # None: a block at two logical indices (gather path)
            step.flex = meta
            step.graph_key = (B + pad, nblk) if padded else None
            return step
    if B and runner.native is not None:          # tables read in place: no gather, no mask
        step.dec_tables = torch.from_numpy(dec_tab)                # [B, nblk]
        step.dec_lens = torch.from_numpy(dec_lens)                 # [B]
        if not all_decode:
            step.dec_rows = dec_rows_t
    elif B:
        lens = np.concatenate([dec_lens, np.ones(pad, np.int64)])  # [B+pad]
        gather_t, lens_t = runner.upload(dec_tab.reshape(-1), lens)   # [B*nblk] block ids, [B]
        step.dec_gather = gather_t
        if B == 1 and not padded and dev.type == "cpu":
            step.dec_len = int(dec_lens[0])     # attends to exactly its context: no mask to build or apply
            t = dec_tab[0]
            if np.array_equal(t, t[0] + np.arange(nblk)):
                step.dec_first = int(t[0]) * bs  # one slice of the pool: no gather either
        else:
            keep = torch.arange(nblk * bs, device=dev)[None, :] < lens_t[:, None]       # [B, Lmax]
            mask = torch.zeros(keep.shape, dtype=model.dtype, device=dev).masked_fill_(~keep, float("-inf"))
            step.dec_mask = mask[:, None, None, :]                 # [B, 1, 1, Lmax] additive
        if not all_decode:
            step.dec_rows = dec_rows_t
        if padded:
            step.graph_key = (B + pad, nblk)
    step.prefills = _prefill_chunks(runner, batch, pre_idx, offs)
    return step


def _prefill_chunks(runner, batch: StepBatch, pre_idx: np.ndarray, offs: np.ndarray) -> list:
    """(row0, n, gather [L], mask [g*n, L]) per prefill chunk. Every chunk, with a cached prefix
    or without, reads its keys and values back from the pool as stored, through the same
    masked attention: a prompt computed cold and one whose prefix was cached take the same path
    (docs/engine.md, "Reproducibility")."""
    bs, dev, g = runner.block_size, runner.device, runner.model.config.group
    out = []
    for i in pre_idx.tolist():
        row0, n, start = int(offs[i]), int(batch.counts[i]), int(batch.starts[i])
        L = start + n
        p = np.arange(L)
        gather = batch.tables[i, p // bs] * bs + p % bs                             # [L]
        (gather_t,) = runner.upload(gather)
        pos = torch.arange(L, device=dev)
        mask = pos[None, :] <= (start + torch.arange(n, device=dev))[:, None]       # [n, L]
        out.append((row0, n, gather_t, mask.repeat(g, 1)))                          # [g*n, L]
    return out


@dataclass
class _ItemsStep:
    batch: StepBatch
    tokens: torch.Tensor          # [T] (filled in place where fills says)
    fills: torch.Tensor | None
    fill_from: torch.Tensor | None
    rows: dict | None = None      # prompt outputs, when the runner's execute takes `rows`


@dataclass
class _Item:
    token_ids: list
    start_pos: int
    block_table: list
    sample: bool
    rows: tuple = ()


class ItemsRunner:
    """A runner that offers only `execute(items)` (a test double, a plug-in model) behind the
    prepare/run contract: prepare keeps the arrays, run builds the items and calls execute."""

    def __init__(self, runner):
        import inspect

        self.inner = runner
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self.returns_rows = "rows" in inspect.signature(runner.execute).parameters

    def prepare(self, batch: StepBatch) -> _ItemsStep:
        fills = (batch.tokens == PLACEHOLDER).nonzero()[0]
        if not fills.size:
            return _ItemsStep(batch, torch.from_numpy(batch.tokens.copy()).to(self.device), None, None)
        return _ItemsStep(batch, torch.from_numpy(batch.tokens.copy()).to(self.device),
                          torch.from_numpy(fills).to(self.device), torch.from_numpy(batch.fill_from).to(self.device))

    def run(self, step: _ItemsStep, want_logits: bool = True, graphs: bool = True):
        b = step.batch
        toks = step.tokens.tolist()
        ends = b.counts.cumsum().tolist()
        items = [_Item(toks[e - n:e], int(s), b.tables[i, :b.table_lens[i]].tolist(), bool(b.sample[i]),
                       tuple(b.rows[i]) if b.rows is not None else ())
                 for i, (e, n, s) in enumerate(zip(ends, b.counts.tolist(), b.starts.tolist()))]
        if b.rows is not None and self.returns_rows:
            step.rows = {}
            logits = self.inner.execute(items, rows=step.rows)              # [n_sample, V]
        else:
            logits = self.inner.execute(items)                               # [n_sample, V]
        return logits if want_logits and b.sample.any() else None
