"""Phi-3's weights in the engine's form (model_files/phi3.py says what differs and why).

    split_fused(config, weights)   # in place: qkv -> q, k, v; gate_up -> gate, up; a partial
                                   # rotary's q/k head dims reordered for the engine's rotation

The fused tensors are [q heads | k heads | v heads] and [gate | up] along the output rows. With
`rotary_dims` r below the head size d, transformers rotates dims i and i + r/2 of each head
(i < r/2) and leaves dims r..d as they are; the engine rotates dims j and j + d/2 of the whole
head. Each q and k head's rows are reordered to

    [rot 0 .. r/2 | pass r .. r + (d-r)/2 | rot r/2 .. r | pass r + (d-r)/2 .. d]

so the engine's pair j, j + d/2 is transformers' pair for j < r/2 and two passing dims after
(frequency 0 there: rope_inv_freq). q and k take the same order, so every q.k is the same sum.
A GGUF's 4-bit blocks (weights.int4) are split and reordered with the float copy.
"""

from __future__ import annotations

import torch


def head_order(head_dim: int, rotary_dims: int) -> list[int]:
    """The dims of one head in the engine's order (a partial rotary; the identity otherwise)."""
    r, d = rotary_dims, head_dim
    half = (d - r) // 2
    return [*range(r // 2), *range(r, r + half), *range(r // 2, r), *range(r + half, d)]


def _rows(n_heads: int, head_dim: int, rotary_dims: int) -> torch.Tensor:
    order = torch.tensor(head_order(head_dim, rotary_dims))
    return (torch.arange(n_heads)[:, None] * head_dim + order).reshape(-1)        # [n_heads * hd]


def split_fused(config, weights) -> None:
    """Split a Phi-3's fused weights in `weights` (engine name -> tensor, `.int4` beside when a
    Weights) into the engine's q, k, v, gate, up, in place."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    dims = int(dict(c.rope_scaling).get("rotary_dims", c.head_dim))
    reorder = {"q": _rows(c.num_heads, c.head_dim, dims), "k": _rows(c.num_kv_heads, c.head_dim, dims)} \
        if dims != c.head_dim else {}
    int4 = getattr(weights, "int4", {})
    for i in range(c.num_layers):
        p = f"layers.{i}."
        for fused, parts in (("qkv", (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))),
                             ("gate_up", (("gate", 0, c.intermediate_size),
                                          ("up", c.intermediate_size, 2 * c.intermediate_size)))):
            w, blocks = weights.pop(p + fused), int4.pop(p + fused, None)
            for part, begin, end in parts:
                rows = torch.arange(begin, end)
                if part in reorder:
                    rows = rows[reorder[part]]
                weights[p + part] = w.index_select(0, rows).contiguous()
                if blocks is not None:
                    int4[p + part] = blocks.permute_rows(rows)
