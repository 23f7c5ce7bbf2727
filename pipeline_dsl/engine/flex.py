"""Paged attention read in place with PyTorch's FlexAttention: every row of a step in one call.

    runner = ModelRunner(model, ..., attention="flex")   # "auto": chosen on CUDA (bf16/fp16)
    step = runner.prepare(batch)                         # step.flex: a FlexMeta (host arrays, one upload)
    out = runner.flex.attention(step.flex, q, kc, vc)    # [T, nh*hd], inside ModelRunner.attend

Layout (the one vLLM's FlexAttention backend uses). The step's T query rows — decode tokens,
prefill chunks with or without a cached prefix, both at once — are one packed sequence
`[1, nh, Tp, hd]`; the layer's KV pool is one key sequence `[1, kv, slots, hd]`, read where it
lies (no gather, no copy, no padded context). A BlockMask with query blocks of `Q_BLOCK` rows
and key blocks of the KV block size lists, per query block, the pool blocks of the sequences
whose rows it holds (`kv_idx`), so the kernel loads only those. Its mask_mod keeps, for a row
of item i at position p, the slot s of pool block b = s // bs when b sits in i's block table
at the logical index l recorded for b, and l * bs + s % bs <= p (causal over the cached
prefix and the chunk itself). One logical index per block is enough: a block is shared only
as part of a common prefix, so it sits at the same index in every table that holds it; a
step that broke this would be told apart on the host (`host_meta` returns None) and take the
gather path instead.

Where the numbers come from. `host_meta` builds every array with numpy over the batch (no
per-item Python): the row -> item map, positions, the block -> logical index map, the
tables, and for each query block the deduplicated union of its items' blocks. The union is
listed item by item in table order, so each row meets its own blocks in logical order
whichever physical blocks hold them: on CUDA a row's online softmax visits its keys in the
same order cold or warm (blocks of other items in between are fully masked for it and leave
its running sums exactly as they were). Eager flex_attention (CPU) instead reduces over the
whole pool in physical order, so there cold and warm may differ in the last bits.

Static shapes. Sizes are padded so that one compiled kernel serves every step and a CUDA
graph can capture it: rows to a multiple of Q_BLOCK, at least 2 query blocks, tables and
block lists at least 2 wide (torch.compile specialises sizes 0 and 1), a padded decode step
of (B, nblk) always to the same sizes (`decode_width`). Padding rows have position -1:
every key is masked for them and their output is 0.

On CUDA the call is `torch.compile(flex_attention, fullgraph=True)` (Triton), compiled at load
by ModelRunner.warm_up; on CPU it is what torch's eager flex_attention computes (it materialises
the scores over the whole pool: for tests, not speed — the CPU path keeps its native kernels),
written out with the mask_mod's mask evaluated once a call (`FlexPaged._eager`): torch's own
eager call goes through torch.compile(backend="eager"), which would cost every CPU process
that uses the backend dynamo's import (~1.5 s of CPU) and a trace per new step shape.

Compiled versions. Dynamo keeps the versions of flex_attention per code object, so every runner
of the process shares one list, and with fullgraph=True reaching the recompile limit (8 by
default) raises instead of running eagerly. So the versions are counted, not left to chance:
the model's sizes (heads, head size, pool slots) are marked static while warm-up compiles
(`compiling`), so each runner gets kernels of its own shape, never a symbolic head count that
another model's shapes made dynamic; the
step's sizes (rows, query blocks, block-list width, table rows and width) change between the
warm-up's first two steps and so are dynamic from the second on. A runner then needs
VERSIONS_PER_RUNNER versions: the first warm-up step's (static), and one dynamic version on each
side of DECODE_KERNEL_ROWS, all made at load; the limit is raised to hold them for every runner
shape of the process (`reserve_versions`). Warm-up and steps both run in inference mode: grad
mode is part of every version's guards, so a step outside it would compile again.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

Q_BLOCK = 16              # query rows per block of the BlockMask (and the kernel's BLOCK_M)
MIN_BLOCKS = 2            # no padded size below 2: a compiled kernel is not specialised on it
# Inductor's flex lowering asks whether the query has fewer rows than this (to choose its
# flex-decoding kernel, torch/_inductor/kernel/flex/flex_decoding.py `_use_flex_decoding`)
# before it reads FORCE_USE_FLEX_ATTENTION, so the compiled kernel is guarded on the answer:
# steps on either side of it need a compile of their own (ModelRunner.warm_up does both).
DECODE_KERNEL_ROWS = 128
VERSIONS_PER_RUNNER = 3    # compiled at warm-up: the first step's static one, dynamic below and above 128 rows
_shapes: set = set()       # the runner shapes of this process that compile flex_attention


def reserve_versions(shape: tuple) -> int:
    """Raise dynamo's recompile limit to hold VERSIONS_PER_RUNNER versions for each runner shape
    of the process (all share flex_attention's cache; with fullgraph=True the limit raises, it
    never falls back). Returns the limit."""
    from torch._dynamo import config

    _shapes.add(shape)
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"   # torch < 2.7
    need = VERSIONS_PER_RUNNER * len(_shapes) + 2        # 2 spare: a step shape the warm-up missed
    if getattr(config, name) < need:
        setattr(config, name, need)
    return getattr(config, name)


def kernel_options(block_size: int, dtype: torch.dtype, smem_bytes: int | None) -> dict:
    """The Triton kernel's options for a pool of `block_size`-slot blocks on a device with
    `smem_bytes` of opt-in shared memory per block.

    A tile must divide the block mask's blocks (inductor refuses BLOCK_M that does not divide
    the query block, BLOCK_N that does not divide the KV block), and torch's own default tiles
    do not: 128 x 128 on sm90 for bf16 with head size 64, 128 x 64 on sm80
    (torch/_inductor/template_heuristics/triton.py). So BLOCK_M = Q_BLOCK: 16 query rows per
    tile, since the rows of a query block may belong to 16 different sequences and every row
    scores every block the tile loads, a larger tile would multiply that waste. BLOCK_N is the
    largest tile that divides the KV block, up to 64 for 16-bit (32 for fp32) and half that
    where shared memory is under 144 KiB (vLLM's FlexAttention backend makes the same choice);
    with the default block size of 16 it is 16. num_warps and num_stages stay torch's default
    for the device. FORCE_USE_FLEX_ATTENTION: never the flex-decoding kernel, which splits the
    whole key length (here the whole pool) into chunks; vLLM forces it off as well."""
    want = 32 if dtype == torch.float32 else 64
    if smem_bytes is not None and smem_bytes < 144 * 1024:
        want //= 2
    n = 1
    while n * 2 <= min(want, block_size) and block_size % (n * 2) == 0:
        n *= 2
    return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": Q_BLOCK, "BLOCK_N": n}


def unusable(block_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the flex backend cannot serve this runner on `device` (None: it can)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:                          # pragma: no cover - torch < 2.5
        return f"torch has no FlexAttention ({e})"
    if device.type == "cuda":
        if dtype not in (torch.bfloat16, torch.float16):
            return f"the compiled kernel runs bf16/fp16, not {dtype}"
        if block_size < 16 or block_size & (block_size - 1):
            return f"KV block size {block_size}: the kernel's key tiles need a power of two >= 16"
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def decode_width(nblk: int, num_blocks: int) -> int:
    """Blocks listed per query block of a padded decode step over nblk context blocks: at most
    Q_BLOCK sequences of nblk blocks each, and never more than the pool holds."""
    return max(MIN_BLOCKS, min(Q_BLOCK * nblk, num_blocks))


def host_meta(tables: np.ndarray, ctx: np.ndarray, item: np.ndarray, qpos: np.ndarray,
              num_blocks: int, width: int | None = None) -> dict | None:
    """The step's mask arrays (numpy, int64), or None when a block sits at two logical indices.

    tables [R, W] block ids in position order (any value past an item's context); ctx [R] blocks
    each item attends; item [T] item of each row (non-decreasing); qpos [T] position of each
    row (-1: a padding row, attends nothing); width: blocks listed per query block (None: the
    smallest power of two that holds them)."""
    R, W = tables.shape
    T = len(item)
    Tp = max(MIN_BLOCKS * Q_BLOCK, -(-T // Q_BLOCK) * Q_BLOCK)
    item_p = np.empty(Tp, np.int64)
    item_p[:T] = item
    item_p[T:] = item[-1] if T else 0                              # padding rows: the last item
    qpos_p = np.full(Tp, -1, np.int64)
    qpos_p[:T] = qpos
    live = np.arange(W)[None, :] < ctx[:, None]                    # [R, W] entries attended
    flat = tables[live]                                            # [sum ctx] item by item, in order
    logical = np.full(num_blocks, -1, np.int64)
    cols = np.broadcast_to(np.arange(W), (R, W))[live]             # [sum ctx] logical index of each
    logical[flat] = cols
    if not np.array_equal(logical[flat], cols):                    # a block at two logical indices
        return None
    off = np.cumsum(ctx) - ctx                                     # [R] first entry of each item in flat
    nq = Tp // Q_BLOCK
    row0 = np.arange(nq) * Q_BLOCK                                 # [nq] first row of each query block
    first = item_p[row0]
    last = item_p[np.minimum(row0 + Q_BLOCK, max(T, 1)) - 1]       # [nq] item of its last real row
    lo, hi = off[first], off[last] + ctx[last]                     # [nq] the block's span of flat
    hi = np.where(row0 < T, hi, lo)                                # a block of padding rows: none
    span = int((hi - lo).max()) if nq else 0
    c = np.arange(max(span, 1))
    valid = c[None, :] < (hi - lo)[:, None]                        # [nq, span]
    cand = np.where(valid, flat[np.minimum(lo[:, None] + c[None, :], max(len(flat) - 1, 0))]
                    if len(flat) else 0, -1)                       # [nq, span] candidate blocks
    order = np.argsort(cand, axis=1, kind="stable")                # equal ids: first occurrence first
    srt = np.take_along_axis(cand, order, 1)
    dup_sorted = np.zeros(cand.shape, bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)                   # a later occurrence of a block
    keep = valid & ~dup
    kv_num = keep.sum(1)                                           # [nq]
    need = int(kv_num.max()) if nq else 0
    if width is None:
        width = min(_pow2(max(need, MIN_BLOCKS)), max(num_blocks, MIN_BLOCKS))
    if need > width:
        raise ValueError(f"{need} KV blocks in one query block, more than the width {width}")
    kv_idx = np.zeros((nq, width), np.int64)
    r, k = np.nonzero(keep)
    kv_idx[r, (np.cumsum(keep, 1) - 1)[r, k]] = cand[r, k]        # kept blocks, left-packed, in order
    tab = np.zeros((max(R, MIN_BLOCKS), max(W, MIN_BLOCKS)), np.int64)
    tab[:R, :W] = tables
    return {"item": item_p, "qpos": qpos_p, "logical": logical, "tables": tab,
            "kv_num": kv_num.astype(np.int64), "kv_idx": kv_idx}


@dataclass
class FlexMeta:
    """One step's mask tensors on the device (what a decode graph copies into its static ones)."""
    rows: int                  # T: query rows the step really has
    item: torch.Tensor         # [Tp] item of each row
    qpos: torch.Tensor         # [Tp] position of each row (-1: padding)
    logical: torch.Tensor      # [num_blocks] logical index of each pool block (-1: not in the step)
    tables: torch.Tensor       # [R, W] block tables
    kv_num: torch.Tensor       # [nq] int32 blocks listed per query block
    kv_idx: torch.Tensor       # [nq, K] int32 those blocks
    mask: object = None        # the BlockMask, built on first use (once per step, or per graph)

    STATIC = ("item", "qpos", "logical", "tables", "kv_num", "kv_idx")

    def copy_(self, other: "FlexMeta") -> None:
        for name in self.STATIC:
            getattr(self, name).copy_(getattr(other, name))


def _paged_mask(item, qpos, logical, tables, bs: int):
    """mask_mod over (row, pool slot): the slot's block is in the row's table at its recorded
    logical index, and that position is not after the row's own."""
    def mask_mod(b, h, q, kv):
        blk = kv // bs
        lidx = logical[blk]
        own = tables[item[q], lidx.clamp(min=0)] == blk
        return (lidx >= 0) & own & (lidx * bs + kv % bs <= qpos[q])
    return mask_mod


class FlexPaged:
    """The flex attention backend of one ModelRunner."""

    def __init__(self, runner, backend=None):
        """backend: torch.compile's backend (default on CUDA: inductor; on CPU: no compile, the
        eager computation, `_eager`). Tests pass a counting backend to check the compiled versions
        on CPU."""
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        self.block_size, self.num_blocks = runner.block_size, runner.num_blocks
        self.slots = runner.num_blocks * runner.block_size
        self.device = runner.device
        self._block_mask = BlockMask
        self.cuda = runner.device.type == "cuda"
        self.compiled = self.cuda or backend is not None
        if self.compiled:
            # Triton kernels, compiled at load (warm_up): sizes that change between the first two
            # steps become dynamic, so later steps and the graphs' buckets reuse the kernel
            c = runner.model.config
            self.limit = reserve_versions((c.num_heads, c.num_kv_heads, c.head_dim, self.slots, runner.model.dtype))
            self.fn = torch.compile(flex_attention, fullgraph=True, backend=backend or "inductor")
            props = torch.cuda.get_device_properties(self.device) if self.cuda else None
            self.options = kernel_options(self.block_size, runner.model.dtype,
                                          getattr(props, "shared_memory_per_block_optin", None))
        else:
            self.fn, self.options = None, None           # _eager: no torch.compile, no dynamo
        self.calls = 0
        self._marking = False

    @contextlib.contextmanager
    def compiling(self):
        """Around the steps that make the compiled versions (ModelRunner.warm_up): the model's
        sizes are marked static on each call's tensors, which costs ~40 us a call (~1 ms a step
        of 30 layers), so only there; later calls match those versions' guards unmarked."""
        self._marking = self.compiled
        try:
            yield
        finally:
            self._marking = False

    def meta(self, upload, tables, ctx, item, qpos, width=None) -> FlexMeta | None:
        """FlexMeta of a step from its host arrays (see host_meta), uploaded in one copy."""
        host = host_meta(tables, ctx, item, qpos, self.num_blocks, width)
        if host is None:
            return None
        names = FlexMeta.STATIC
        dev = dict(zip(names, upload(*(host[n] for n in names))))
        dev["kv_num"] = dev["kv_num"].to(torch.int32)
        dev["kv_idx"] = dev["kv_idx"].to(torch.int32)
        return FlexMeta(rows=len(item), **dev)

    def block_mask(self, meta: FlexMeta):
        if meta.mask is None:
            mask_mod = _paged_mask(meta.item, meta.qpos, meta.logical, meta.tables, self.block_size)
            meta.mask = self._block_mask.from_kv_blocks(
                meta.kv_num[None, None], meta.kv_idx[None, None], BLOCK_SIZE=(Q_BLOCK, self.block_size),
                mask_mod=mask_mod, seq_lengths=(meta.item.shape[0], self.slots), compute_q_blocks=False)
        return meta.mask

    def _eager(self, meta: FlexMeta, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What torch's eager flex_attention computes (CPU), without torch's compile machinery.

        torch's eager flex_attention runs its call through torch.compile(backend="eager"): the
        first call of a process imports dynamo (~1.5 s of CPU) and traces (~0.5 s), and every new
        step shape traces again. Its computation is dense, the mask_mod evaluated at every
        (row, slot) and the scores of every slot of the pool (torch/_higher_order_ops/
        flex_attention.py, math_attention): here the same, in the same precision and order, with
        the step's BlockMask's mask_mod called once on the [Tp, slots] grid (its indexing and
        comparisons broadcast) instead of under torch's four nested vmaps. Evaluated at every
        call, not kept with the BlockMask: a decode graph's replay copies the next step's arrays
        into the tensors the mask_mod reads (FlexMeta.copy_). q [1, nh, Tp, hd], k and v
        [1, kv, slots, hd] -> [1, nh, Tp, hd]; a row that attends nothing (padding) gives 0."""
        mask = self.block_mask(meta)
        grid = mask.mask_mod(0, 0, torch.arange(meta.item.shape[0], device=self.device)[:, None],
                             torch.arange(self.slots, device=self.device)[None, :])     # [Tp, slots] bool
        g = q.shape[1] // k.shape[1]                                            # GQA: query heads per KV head
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = (q.to(work) @ k.to(work).transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        p = torch.softmax(scores.masked_fill(~grid, -math.inf), dim=-1)
        p = p.masked_fill(~grid.any(-1, keepdim=True), 0.0)                    # nothing attended: 0, not NaN
        return p.to(q.dtype) @ v

    def attention(self, meta: FlexMeta, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """q [T, nh, hd] (rows in step order) against the pool kc/vc [slots(+1), kv, hd] -> [T, nh*hd]."""
        T, nh, hd = q.shape
        Tp = meta.item.shape[0]
        qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, Tp - T))          # [Tp, nh, hd]
        qq = qp.transpose(0, 1).unsqueeze(0)                                # [1, nh, Tp, hd]
        k = kc[: self.slots].transpose(0, 1).unsqueeze(0)                   # [1, kv, slots, hd], in place
        v = vc[: self.slots].transpose(0, 1).unsqueeze(0)
        self.calls += 1
        kw = {"kernel_options": self.options} if self.options else {}
        k, v = k.to(q.dtype), v.to(q.dtype)
        if self._marking:      # the model's sizes: static in every version (module docstring)
            for t, dims in ((qq, (0, 1, 3)), (k, (0, 1, 2, 3)), (v, (0, 1, 2, 3))):
                for d in dims:
                    torch._dynamo.mark_static(t, d)
        if self.compiled:
            out = self.fn(qq, k, v, block_mask=self.block_mask(meta), enable_gqa=nh != k.shape[1], **kw)
        else:
            out = self._eager(meta, qq, k, v)                               # [1, nh, Tp, hd]
        return out[0, :, :T].transpose(0, 1).reshape(T, nh * hd)            # [T, nh*hd]
