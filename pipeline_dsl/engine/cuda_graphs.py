"""CUDA graphs of the padded all-decode step, captured at load for every bucket.

    stats = runner.capture_graphs(max_batch=256, max_len=8192, max_tokens=512)   # at load (load_runner)
    x = runner.graphs.replay(step)                               # [T, H] hidden states, or None

A decode step padded to a batch bucket (the scheduler's `pad_to`: powers of two up to
max_batch_size) with its context padded to a block bucket (batch.CONTEXT_BUCKETS) has
static shapes, so one graph per (batch, context blocks) pair replays it: a replay copies
the step's index tensors into the graph's static ones (with the flex backend its block-mask
tensors, flex.FlexMeta, whose sizes depend only on the bucket) and launches ~300 kernels as one.
The graph ends at the final hidden states; the lm_head and sampling run after it, so the
graphs' outputs are small ([B, H]) and share one memory pool. Pairs whose gathered
context could not exist in the KV pool (batch x context > 2 x the pool's blocks) are not
captured. Other steps (mixed prefill + decode, or a decode past every bucket) replay the
piecewise graphs of cuda_pieces.py when capture_all was given max_tokens: the layers' dense
parts captured, attention eager between them. Native CPU steps never replay a graph.
Everything is captured largest first (the biggest piecewise bucket, then the decode pairs by
batch and context, `capture_order`), so each smaller capture reuses the shared pool's memory.

Capture writes only the runner's scratch KV slot (every padding row's slot) and reads block
0, so it leaves the cache as it was. This module is imported only by capture_graphs: a
machine without CUDA never loads it.
"""
from __future__ import annotations

import time

import torch

from .batch import CONTEXT_BUCKETS, bucket_of

STATIC = ("tokens", "slots", "cos", "sin")    # what a replay copies in (and the attention's tensors)
GATHER = ("dec_gather", "dec_mask")


class CudaGraphFactory:
    """torch.cuda graphs captured in one shared pool, on one capture stream of the runner's device.

    The stream is the factory's own, on its device, and the same for every capture (torch's note on
    `pool`: captures that share one should share their stream). Left to torch.cuda.graph, the
    capture stream is one per process made on the current device: for a runner on cuda:1 while
    the current device is cuda:0, the step's kernels would run eagerly on cuda:1 outside the
    capture, leaving an empty graph whose replays compute nothing."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pool = None
        self.stream = torch.cuda.Stream(self.device)

    def capture(self, fn):
        with torch.cuda.device(self.device):       # the capture's synchronize and empty_cache: this device
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):                 # warm-up: lazy inits, cuBLAS workspaces
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                out = fn()
        self.pool = graph.pool()
        return graph.replay, out


def batch_buckets(max_batch: int) -> list[int]:
    """The padded decode batch sizes the scheduler produces (scheduler.bucket): powers of two
    below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def context_buckets(max_blocks: int) -> list[int]:
    out, n = [], 1
    while True:
        b = bucket_of(n, CONTEXT_BUCKETS)
        out.append(b)
        if b >= max_blocks:
            return out
        n = b + 1


def capture_order(max_batch: int, max_blocks: int, num_blocks: int) -> list[tuple[int, int]]:
    """The (batch, context blocks) pairs to capture, largest batch first, and within a batch the
    longest context first. All graphs share one memory pool, and a capture can reuse only what
    earlier captures freed into it: the largest step first leaves blocks that every smaller one
    fits in, where smallest first makes each larger capture grow the pool again (vLLM captures
    its batch sizes in reverse for this reason). Pairs whose context could not exist in the
    pool (batch x context > 2 x its blocks; one sequence longer than the pool, when the model's
    context is longer than the pool holds) are left out."""
    max_blocks = min(max_blocks, num_blocks)       # a sequence holds at most the pool's blocks
    pairs = [(B, nblk) for B in batch_buckets(max_batch) for nblk in context_buckets(max_blocks)
             if B * nblk <= 2 * num_blocks]
    return sorted(pairs, reverse=True)


class DecodeGraphs:
    def __init__(self, runner, factory=None):
        self.runner = runner
        self.factory = factory or CudaGraphFactory(runner.device)
        self.graphs: dict[tuple[int, int], tuple] = {}   # (B, nblk) -> (replay, static step, out)
        self.pieces = None                                # cuda_pieces.MixedPieces: the other steps
        self.replays = 0

    def capture_all(self, max_batch: int, max_len: int, max_tokens: int | None = None) -> dict:
        """Decode graphs for every bucket pair; with max_tokens, also the piecewise graphs of
        steps of up to that many rows (mixed prefill + decode, cuda_pieces.py)."""
        t0 = time.perf_counter()
        pieces = 0
        if max_tokens:      # first: the largest bucket's rows outnumber any decode batch's
            from .cuda_pieces import MixedPieces

            self.pieces = MixedPieces(self.runner, self.factory)
            pieces = self.pieces.capture_all(max_tokens)
        with torch.inference_mode():
            for B, nblk in capture_order(max_batch, -(-max_len // self.runner.block_size), self.runner.num_blocks):
                self.graphs[(B, nblk)] = self._capture(B, nblk)
        return {"graphs": len(self.graphs), "piece_graphs": pieces, "capture_s": time.perf_counter() - t0}

    def _static(self, B: int, nblk: int):
        """A padded decode step of B rows over nblk blocks that touches only the scratch slot."""
        import numpy as np

        from .batch import Step
        from .flex import decode_width

        r, m, dev = self.runner, self.runner.model, self.runner.device
        L = nblk * r.block_size
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        cos, sin = m.rope_tables(pos)                                       # [B, 1, hd]
        step = Step(tokens=torch.zeros(B, dtype=torch.long, device=dev),
                    slots=torch.full((B,), r.num_slots, dtype=torch.long, device=dev),
                    cos=cos.clone(), sin=sin.clone(), sample_rows=None, all_decode=True, dec_rows=None,
                    dec_gather=None, dec_mask=None, prefills=[], positions=pos, graph_key=(B, nblk))
        if r.flex is not None:       # no row attends anything: every position -1
            step.flex = r.flex.meta(lambda *a: [torch.from_numpy(x).to(dev) for x in a],
                                    np.zeros((B, nblk), np.int64), np.zeros(B, np.int64), np.arange(B),
                                    np.full(B, -1, np.int64), decode_width(nblk, r.num_blocks))
        else:
            step.dec_gather = torch.zeros(B * nblk, dtype=torch.long, device=dev)   # block 0: read only
            step.dec_mask = torch.zeros(B, 1, 1, L, dtype=m.dtype, device=dev)
        return step

    def _capture(self, B: int, nblk: int):
        static = self._static(B, nblk)
        replay, out = self.factory.capture(lambda: self.runner.hidden(static))   # out [B, H]
        return replay, static, out

    def replay(self, step) -> torch.Tensor | None:
        """The step's final hidden states [T, H]: its decode graph, else the piecewise graphs;
        None when neither fits (the step then runs eagerly)."""
        if step.native:
            return None
        g = self.graphs.get(step.graph_key) if step.all_decode and step.graph_key is not None else None
        if g is None or (g[1].flex is None) != (step.flex is None):   # none, or the other attention path
            return self.pieces.replay(step) if self.pieces is not None else None
        replay, static, out = g
        for name in STATIC:
            getattr(static, name).copy_(getattr(step, name))
        if static.flex is not None:
            static.flex.copy_(step.flex)
        else:
            for name in GATHER:
                getattr(static, name).copy_(getattr(step, name))
        replay()
        self.replays += 1
        return out
