"""Batch-invariant execution: a row's logits do not depend on its batch neighbours, on what
the prefix cache held, or on how its prompt was chunked (opt in: AGP_BATCH_INVARIANT=1).

Why results move otherwise. A GEMM's kernel, and so the order in which it sums a row's
products, depends on the number of rows M (measured on CPU, fp32: a row of x @ W.T differs
in its last bits between M = 1, 2-3 and >= 8); the native decode step runs up to 8 rows and
the glued path more; attention kernels split the keys by the length of the batch's longest
context. So the same request decoded alone or among 40 others, or prefilled cold (its whole
prompt in one chunk) or warm (only the uncached tail), sums in different orders: its logits
differ in the last bits, a sampled token can flip, and from there the text (issue: seeded
answers differed between a cold and a warm cache). vLLM's batch-invariant mode and SGLang's
deterministic inference make each row's reduction order independent of the batch; so
does this mode, on this engine's own torch path:

- every linear layer (and the lm_head) runs on fixed tiles of `TILE` rows (one bmm of
  [n_tiles, TILE, K] x [K, N], the same kernel for every tile whatever M is);
- attention for every row (decode or prefill, cached prefix or not) reads its keys and
  values back from the KV pool and computes dot products, softmax and the weighted sum
  with elementwise products and reductions over the head dimension and over the context
  padded to a multiple of `KEY_PAD` (masked keys add exact zeros);
- the native kernels are off (their paths change with the batch size).

Cost: measured on CPU with the tiny model the mode is several times slower than the
default; it is for reproducing answers, not for throughput.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

TILE = 16          # rows per GEMM tile
KEY_PAD = 64       # contexts padded to a multiple of this many keys


class TiledLinear:
    """A linear layer whose every row is computed by the same fixed-shape GEMM."""

    def __init__(self, lin):
        self.inner = lin
        self.out_features = lin.out_features
        w = getattr(lin, "weight", None)
        dense = type(lin).__name__ in ("DenseLinear", "PackedLinear") and w is not None
        self.w_t = w.t() if dense else None                      # [K, N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        xp = F.pad(x, (0, 0, 0, (-M) % TILE))                    # [M', K], M' a multiple of TILE
        if self.w_t is None:                                      # a quantised kernel: one call per tile
            return torch.cat([self.inner(t) for t in xp.split(TILE)])[:M]
        nt = xp.shape[0] // TILE
        out = torch.bmm(xp.view(nt, TILE, -1), self.w_t.unsqueeze(0).expand(nt, -1, -1))  # [nt, TILE, N]
        return out.reshape(nt * TILE, -1)[:M]                    # [M, N]


def make_invariant(model):
    """The model as the invariant mode runs it: a shallow copy whose linear layers (and lm_head)
    are TiledLinear, on the same tensors (no weight is copied). `model` itself is left as it is:
    other engines on the same loaded weights (models.LoadedModels) keep their own kernels, its
    small int8 head and the native decode step. A model already made invariant is returned as is."""
    if getattr(model, "batch_invariant", False):
        return model
    view = copy.copy(model)
    view.layers = []
    for ly in model.layers:
        tiled = copy.copy(ly)
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(tiled, name, TiledLinear(getattr(ly, name)))
        view.layers.append(tiled)
    view.lm_head = TiledLinear(model.lm_head)
    view.lm_head_small = None
    view.batch_invariant = True
    return view


def key_index(batch, block_size: int, item_of: np.ndarray, positions: np.ndarray, scratch: int):
    """Per item its context's slots padded to a multiple of KEY_PAD ([n, Lp], the scratch slot
    past the end), and per row the last key it may see ([T] = its position)."""
    ctx = batch.starts + batch.counts                            # [n]
    Lp = int(-(-int(ctx.max()) // KEY_PAD) * KEY_PAD)
    p = np.arange(Lp)
    blk = np.minimum(p // block_size, batch.tables.shape[1] - 1)
    slots = batch.tables[:, blk] * block_size + p % block_size    # [n, Lp]
    slots = np.where(p[None, :] < ctx[:, None], slots, scratch)
    return slots, positions


def attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, key_slots: torch.Tensor,
              item_of: torch.Tensor, positions: torch.Tensor, group: int, scale: float | None = None,
              window: int = 0) -> torch.Tensor:
    """q [T, nh, hd] against each row's own context read from the pool -> [T, nh*hd]; scale: of the
    scores (None: hd ** -0.5); window: a row sees only its last `window` keys (0: all)."""
    T, nh, hd = q.shape
    kv = nh // group
    slots = key_slots.index_select(0, item_of)                    # [T, Lp]
    Lp = slots.shape[1]
    ks = kc.index_select(0, slots.view(-1)).view(T, Lp, kv, hd).to(q.dtype)   # [T, Lp, kv, hd]
    vs = vc.index_select(0, slots.view(-1)).view(T, Lp, kv, hd).to(q.dtype)
    qg = q.view(T, kv, group, 1, hd)                              # [T, kv, g, 1, hd]
    scores = (qg * ks.permute(0, 2, 1, 3)[:, :, None]).sum(-1) * (scale or hd ** -0.5)   # [T, kv, g, Lp]
    keys = torch.arange(Lp, device=q.device)[None, :]
    visible = keys <= positions[:, None]                          # [T, Lp]
    if window:
        visible &= keys > positions[:, None] - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)     # [T, kv, g, Lp]
    out = (probs[..., None] * vs.permute(0, 2, 1, 3)[:, :, None]).sum(-2)     # [T, kv, g, hd]
    return out.reshape(T, nh * hd)
