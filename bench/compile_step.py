"""Approach check: the whole decode step compiled with torch.compile (inductor, C++ backend),
gpt-fast style, against the same step eager and against agp's runner.

    .venv/bin/python bench/compile_step.py [--batches 1,32] [--threads 2] [--context 128]

The step is written for static shapes: a contiguous KV cache [B, ctx, kv, hd] preallocated,
the new token's K/V written at its position with index_copy, SDPA over the whole cache with a
position mask, dense bf16 weights (F.linear), greedy argmax on the device. It is compiled once
per batch size (dynamic=False; the compile time is printed) and timed against itself eager and
against the runner's step (native kernels where built) on the same model and a context of the
same length. Without a C++ compiler torch.compile fails: the script says so and times eager.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.models import load_weights, resolve_model
from roofline import timed  # bench/ is on sys.path when a bench script runs


def int4_linear(blocks):
    """torch's CPU int4 kernel over the file's 4-bit blocks (traceable: no ctypes)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 1)
    sz = torch.stack([blocks.scale.t(), blocks.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)


def make_step(model: LlamaModel, weights: dict, B: int, ctx: int, int4: bool = False):
    c, dt = model.config, torch.bfloat16
    W = {k: v.to(dt).contiguous() for k, v in weights.items() if v.dim() == 2}

    def lin(*names):
        if int4:
            from pipeline_dsl.engine.quant import Int4Blocks
            return int4_linear(Int4Blocks.cat([weights.int4[n] for n in names]))
        w = torch.cat([W[n] for n in names])
        return lambda x: F.linear(x, w)

    layers = []
    for i in range(c.num_layers):
        p = f"layers.{i}."
        layers.append((weights[p + "attn_norm"].to(dt), lin(p + "q", p + "k", p + "v"), lin(p + "o"),
                       weights[p + "ffn_norm"].to(dt), lin(p + "gate", p + "up"), lin(p + "down")))
    embed, norm, cos_t, sin_t = W["embed"], weights["norm"].to(dt), model.cos, model.sin
    kc = torch.zeros(c.num_layers, B, ctx, c.num_kv_heads, c.head_dim, dtype=dt)   # [layers, B, ctx, kv, hd]
    vc = torch.zeros_like(kc)
    nh, nkv, hd, g = c.num_heads, c.num_kv_heads, c.head_dim, c.group

    def step(tokens, pos):                                  # tokens [B], pos [1] (same position for all)
        x = F.embedding(tokens, embed)                      # [B, H]
        cos, sin = cos_t.index_select(0, pos)[None], sin_t.index_select(0, pos)[None]   # [1, 1, hd]
        mask = (torch.arange(ctx) <= pos)[None, None, None]  # [1, 1, 1, ctx]
        for li, (an, qkv_w, o_w, fn, gu_w, d_w) in enumerate(layers):
            h = F.rms_norm(x, (x.shape[-1],), an, c.rms_eps)
            qkv = qkv_w(h)                                  # [B, (nh+2kv)*hd]
            qk = qkv[:, : (nh + nkv) * hd].view(B, nh + nkv, hd)
            sw = qk.view(B, nh + nkv, 2, hd // 2).flip(-2).view(B, nh + nkv, hd)
            qk = qk * cos + sw * sin
            q, k = qk[:, :nh], qk[:, nh:]                   # [B, nh, hd], [B, kv, hd]
            v = qkv[:, (nh + nkv) * hd:].view(B, nkv, hd)
            kc[li].index_copy_(1, pos, k[:, None])
            vc[li].index_copy_(1, pos, v[:, None])
            qg = q.view(B, nkv, g, hd)                      # [B, kv, g, hd]
            a = F.scaled_dot_product_attention(qg, kc[li].transpose(1, 2), vc[li].transpose(1, 2),
                                               attn_mask=mask)   # [B, kv, g, hd]
            x = x + o_w(a.reshape(B, -1))
            h = F.rms_norm(x, (x.shape[-1],), fn, c.rms_eps)
            gate, up = gu_w(h).chunk(2, dim=-1)
            x = x + d_w(F.silu(gate) * up)
        h = F.rms_norm(x, (x.shape[-1],), norm, c.rms_eps)
        return F.linear(h, embed).argmax(-1)               # [B] greedy, no host sync

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, weights, _ = load_weights(resolve_model(None))
    model = LlamaModel(config, weights, dtype="bf16")
    print("| batch | weights | eager static step ms | compiled ms | compile s | agp runner ms | runner path |")
    print("|---|---|---|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        int4 = B <= 8                  # as balanced: the file's 4-bit blocks for small batches
        with torch.inference_mode():
            step = make_step(model, weights, B, args.context, int4)
            tokens, pos = torch.randint(100, 40000, (B,)), torch.tensor([args.context - 28])
            eager = timed(lambda: step(tokens, pos), args.reps)
            t = time.perf_counter()
            try:
                compiled = torch.compile(step, dynamic=False)
                compiled(tokens, pos)
                ctime = time.perf_counter() - t
                comp = timed(lambda: compiled(tokens, pos), args.reps)
            except Exception as e:  # no compiler, or inductor fails here
                print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                comp, ctime = float("nan"), float("nan")
            nblk = args.context // 16 + 1
            runner = ModelRunner(model, num_blocks=B * nblk, block_size=16)
            tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(B)]
            n = args.context - 28
            rng = np.random.default_rng(0)
            runner.execute([SeqBatchItem(rng.integers(100, 40000, n).tolist(), 0, t_, False) for t_ in tables])
            items = [SeqBatchItem([7], n, t_, True) for t_ in tables]
            ours = timed(lambda: runner.execute(items).argmax(-1), args.reps)
            path = "native step" if runner.native is not None and B <= runner.native_max_batch else (
                "oneDNN GEMMs + native glue" if runner.native is not None else "eager")
        print(f"| {B} | {'int4' if int4 else 'bf16'} | {eager * 1e3:.1f} | {comp * 1e3:.1f} | {ctime:.0f} | {ours * 1e3:.1f} | {path} |", flush=True)


if __name__ == "__main__":
    main()
