"""Piecewise CUDA graphs of the steps no decode graph covers: mixed prefill + decode steps.

    pieces = MixedPieces(runner, factory)
    pieces.capture_all(max_tokens=512)      # at load, with the decode graphs (capture_graphs)
    x = pieces.replay(step)                 # [T, H] final hidden states, or None: too many rows

A mixed step's rows and their contexts change every step, so no single graph replays it
(vLLM's and SGLang's answer, taken here: capture everything but attention). For each token
bucket Tb (TOKEN_BUCKETS, up to the step's token budget) the dense part of the layers is
captured as L + 1 graphs over static buffers of Tb rows:

    piece 0        x = embed(tokens); q, k, v = qkv(layer 0, x)
    piece i        x += o(a); x += mlp(x)  (layer i-1); q, k, v = qkv(layer i, x)
    piece L        x += o(a); x += mlp(x)  (the last layer)

and between them the runner's own attention of layer i runs eagerly on the T real rows
(ModelRunner.attend: K/V written to the pool, then the flex call or gather + SDPA), its
output copied into the static `a`. Rows past T are padding: their tokens and rotary tables
are left from earlier steps, they write nothing to the KV pool and nothing reads them back.

The graphs share the pool of the decode graphs and read and write only the buffers below,
so replaying them never touches the KV pool. This module is imported only by capture_graphs:
a machine without CUDA never loads it (tests drive it with an eager stand-in factory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_buckets(max_tokens: int) -> list[int]:
    """Row counts a mixed step is padded to: multiples of 16 up to 64, then 96, 128, 192, 256, ...
    (a step of n > 64 rows is padded to less than 1.5 n), the last one >= max_tokens."""
    out, b = [], 16
    while True:
        out.append(b)
        if b >= max_tokens:
            return out
        b = b + 16 if b < 64 else (b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3)


class MixedPieces:
    def __init__(self, runner, factory):
        self.runner, self.factory = runner, factory
        self.graphs: dict[int, list] = {}        # bucket -> replay of each piece, in order
        self.buckets: list[int] = []
        self.replays = 0

    def capture_all(self, max_tokens: int) -> int:
        """Capture every piece of every bucket; returns the number of graphs."""
        m, dev = self.runner.model, self.runner.device
        c = m.config
        self.buckets = token_buckets(max_tokens)
        n = self.buckets[-1]
        z = lambda *shape, dtype=m.dtype: torch.zeros(*shape, dtype=dtype, device=dev)   # noqa: E731
        self.tok = z(n, dtype=torch.long)                                    # [N] token ids
        self.cos, self.sin = z(n, 1, c.head_dim), z(n, 1, c.head_dim)        # [N, 1, hd]
        self.x = z(n, c.hidden_size)                                         # [N, H] the residual stream
        self.q = z(n, c.num_heads, c.head_dim)                               # [N, nh, hd]
        self.k, self.v = z(n, c.num_kv_heads, c.head_dim), z(n, c.num_kv_heads, c.head_dim)
        self.a = z(n, c.num_heads * c.head_dim)                              # [N, nh*hd] attention out
        with torch.inference_mode():
            for tb in reversed(self.buckets):    # largest first: smaller captures reuse its pool memory
                self.graphs[tb] = [self.factory.capture(self._piece(li, tb))[0]
                                   for li in range(len(m.layers) + 1)]
        return sum(len(g) for g in self.graphs.values())

    def _piece(self, li: int, tb: int):
        m = self.runner.model
        last = len(m.layers)

        def piece():
            x = self.x[:tb]                                                  # [Tb, H]
            if li == 0:
                x.copy_(F.embedding(self.tok[:tb], m.embed))
            else:                                                            # the rest of layer li-1
                layer = m.layers[li - 1]
                x.add_(m.attn_out(layer, self.a[:tb]))   # o(a) (+ its bias), rounded as the eager step's
                x.add_(m.mlp(layer, x))
            if li < last:                                                    # layer li up to attention
                q, k, v = m.qkv(m.layers[li], x, self.cos[:tb], self.sin[:tb])
                self.q[:tb].copy_(q)
                self.k[:tb].copy_(k)
                self.v[:tb].copy_(v)
            return x
        return piece

    def replay(self, step) -> torch.Tensor | None:
        """The step's final hidden states [T, H] (a view of a static buffer, valid until the next
        replay), or None when no bucket holds its rows."""
        T = step.tokens.shape[0]
        if step.native or not self.buckets or T > self.buckets[-1]:
            return None
        tb = next(b for b in self.buckets if b >= T)
        self.tok[:T].copy_(step.tokens)
        self.cos[:T].copy_(step.cos)
        self.sin[:T].copy_(step.sin)
        pieces = self.graphs[tb]
        pieces[0]()
        for li in range(len(pieces) - 1):
            a = self.runner.attend(step, li, self.q[:T], self.k[:T], self.v[:T])   # [T, nh*hd], eager
            self.a[:T].copy_(a)
            pieces[li + 1]()
        self.replays += 1
        return self.x[:T]
