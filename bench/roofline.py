"""Where a decode step's time goes, against this machine's measured ceilings.

    .venv/bin/python bench/roofline.py [--threads 2] [--batches 1,8,32] [--weights bf16,int4]

First measures the ceilings here (same threads): memory read bandwidth (a 512 MiB sum),
and dense GEMM throughput in bf16 and fp32 (torch/oneDNN, large square-ish shapes). Then,
for each configuration (batch B of decode sequences with ~100 tokens of context; weights
bf16 = dense bf16 layers, int4 = the GGUF's 4-bit blocks with the int8 head where the
file has it), the runner's median step time and:

  weights GB/s   bytes of weights read per step / step time (each weight read once a step)
  GFLOP/s        2 * params * B (+ attention) / step time
  GEMM ms        the step's linear layers alone (same kernels, same shapes; one call each, so
                 at batch 1 it carries 121 calls' dispatch that the fused native step does not)
  attention ms   the step's decode attention alone
  outside        the share of the step that is neither: norms, RoPE, SwiGLU, residuals,
                 KV writes, embedding, host-side preparation, dispatch

Batches of up to the runner's native_max_batch run as one native call when the kernels are
built (then GEMM and attention are timed with the same native kernels); larger ones run
layer by layer. AGP_NATIVE=0 measures the eager path alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipeline_dsl.engine.batch import StepBatch
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.models import load_weights, resolve_model
from pipeline_dsl.engine.quant import Int4Linear, PackedLinear

try:
    from pipeline_dsl.engine.quant import Q8Linear
except ImportError:          # an older tree (A/B against a baseline checkout)
    class Q8Linear:  # noqa: D101
        pass


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ceilings(reps: int = 5) -> dict:
    x = torch.ones(128 << 20, dtype=torch.float32)                         # 512 MiB
    read = x.numel() * 4 / timed(lambda: x.sum(), reps) / 1e9
    del x
    out = {"read_GBs": read}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(512, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        out[f"gemm_{name}_GFLOPs"] = 2 * 512 * 2048 * 2048 / timed(lambda: a @ b, reps) / 1e9
    w = torch.randn(1536 * 2, 576).bfloat16()                              # this model's gate_up, 32 rows
    lin, xs = PackedLinear(w), torch.randn(32, 576).bfloat16()
    out["gemm_bf16_model_shape_GFLOPs"] = 2 * 32 * w.numel() / timed(lambda: lin(xs), reps * 20) / 1e9
    return out


def weight_bytes(lin, rows: int) -> int:
    """Bytes one call with `rows` rows reads of this layer's weight."""
    if isinstance(lin, Int4Linear):
        if rows > lin.small_batch and lin.dense is not None:
            return lin.dense.weight.numel() * 2
        return lin.scales_zeros.numel() * 10       # per 32 weights: 16 bytes of nibbles + 2 bf16 (scale, zero)
    if isinstance(lin, Q8Linear):
        if rows > lin.small_batch and lin.dense is not None:
            return lin.dense.weight.numel() * 2
        return lin.qweight.numel() + lin.scale.numel() * 4
    w = getattr(lin, "weight", None)
    if w is None:
        w = lin.qweight
    return w.numel() * w.element_size()


class Case:
    def __init__(self, config, weights, kind: str, batch: int, prompt: int = 100, block_size: int = 16):
        self.model = LlamaModel(config, weights if kind == "int4" else dict(weights), dtype="bf16")
        nblk = (prompt + 40 + block_size) // block_size + 1
        self.runner = ModelRunner(self.model, num_blocks=batch * nblk, block_size=block_size)
        rng = np.random.default_rng(0)
        self.tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(batch)]
        self.lens = [int(rng.integers(prompt - 10, prompt + 11)) for _ in range(batch)]
        self.runner.execute([SeqBatchItem(rng.integers(100, 40000, n).tolist(), 0, t, False)
                             for t, n in zip(self.tables, self.lens)])
        self.batch, self.config = batch, config
        self.items = [SeqBatchItem([1000 + i], n, t, True) for i, (n, t) in enumerate(zip(self.lens, self.tables))]

    def step(self):
        return self.runner.execute(self.items)       # the same position again: a steady state

    @staticmethod
    def in_features(lin) -> int:
        if isinstance(lin, Int4Linear):
            return lin.scales_zeros.shape[0] * 32
        return (lin.qweight if isinstance(lin, Q8Linear) else lin.weight).shape[1]

    def linears(self):
        m = self.model
        small = getattr(m, "lm_head_small", None)
        head = small if small is not None and self.batch <= small.small_batch \
            else m.lm_head
        return [lin for ly in m.layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)] + [head]

    def gemm_only(self):
        """The step's linear layers alone, inputs of the right shapes (in the step's own kernels)."""
        B, c = self.batch, self.config
        xs = {}
        for lin in self.linears():
            xs.setdefault(self.in_features(lin), torch.randn(B, self.in_features(lin)).bfloat16())
        lins = [(lin, xs[self.in_features(lin)]) for lin in self.linears()]
        return lambda: [lin(x) for lin, x in lins]

    def attention_only(self):
        r, c = self.runner, self.config
        step = r.prepare(StepBatch.from_items(self.items))
        q = torch.randn(self.batch, c.num_heads, c.head_dim).bfloat16()
        if getattr(step, "dec_tables", None) is not None:
            return lambda: [r.native.attention(li, q, step.dec_tables, step.dec_lens) for li in range(c.num_layers)]
        return lambda: [r._decode_attention(q, r._k_pool[li], r._v_pool[li], step.dec_gather, step.dec_mask,
                                            step.dec_len, step.dec_first) for li in range(c.num_layers)]

    def flops(self) -> float:
        c, B = self.config, self.batch
        params = sum(lin.out_features * self.in_features(lin) for lin in self.linears())
        attn = sum(4 * c.num_heads * c.head_dim * (n + 1) for n in self.lens) * c.num_layers
        return 2 * params * B + attn


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--weights", default="bf16,int4")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        ceil = ceilings()
    print(f"ceilings ({args.threads} threads): memory read {ceil['read_GBs']:.1f} GB/s; GEMM bf16 "
          f"{ceil['gemm_bf16_GFLOPs']:.0f} GFLOP/s (this model's gate_up at 32 rows: "
          f"{ceil['gemm_bf16_model_shape_GFLOPs']:.0f}), fp32 {ceil['gemm_fp32_GFLOPs']:.0f} GFLOP/s")
    config, weights, _ = load_weights(resolve_model(None))
    print(f"| weights | batch | path | step ms | tok/s | weights MB | GB/s (of {ceil['read_GBs']:.0f}) | "
          f"GFLOP/s (of {ceil['gemm_bf16_GFLOPs']:.0f}) | GEMM ms | attention ms | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.weights.split(","):
        for B in (int(b) for b in args.batches.split(",")):
            case = Case(config, weights, kind, B)
            with torch.inference_mode():
                step = timed(case.step, args.reps)
                gemm = timed(case.gemm_only(), args.reps)
                attn = timed(case.attention_only(), args.reps)
            r = case.runner
            nat = getattr(r, "native", None)
            path = "native step" if (nat is not None and B <= r.native_max_batch) else (
                "oneDNN GEMMs + native glue" if nat is not None else "eager")
            mb = sum(weight_bytes(lin, B) for lin in case.linears()) / 1e6
            outside = max(0.0, 1 - (gemm + attn) / step)
            print(f"| {kind} | {B} | {path} | {step * 1e3:.1f} | {B / step:.0f} | {mb:.0f} | {mb / 1e3 / step:.1f} | "
                  f"{case.flops() / step / 1e9:.0f} | {gemm * 1e3:.1f} | {attn * 1e3:.1f} | {outside:.0%} |", flush=True)
            del case


if __name__ == "__main__":
    main()
