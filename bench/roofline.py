"""Where a decode step's time goes, against this machine's measured ceilings.

    .venv/bin/python bench/roofline.py [--threads 2] [--batches 1,8,32] [--weights bf16,int4]

First measures the ceilings here (same threads): memory read bandwidth (a 512 MiB sum),
and dense GEMM throughput in bf16 and fp32 (torch/oneDNN, large square-ish shapes). The bf16
ones need oneDNN's bf16 (AVX-512 BW+VL+DQ, or AVX-NE-CONVERT; the model-shape one also its
weight packing, PackedLinear): on a CPU without it (an AVX2 one) they are skipped, the reason
printed before anything is measured (torch's fallback there took 14 s of CPU a 512x2048x2048
call, 200x fp32's, and the packing raises), and the table's GFLOP/s are against fp32's. Then,
for each configuration (batch B of decode sequences with ~100 tokens of context; weights
bf16 = dense bf16 layers, int4 = the GGUF's 4-bit blocks with the int8 head where the
file has it), the runner's median step time and:

  weights GB/s   bytes of weights read per step / step time (each weight read once a step)
  GFLOP/s        2 * params * B (+ attention) / step time
  path           native step (batches of up to native_max_batch, one native call), or what
                 computes the layers' GEMMs at that batch (agp's int8 kernels; torch's GEMMs and
                 in which dtype: fp32 for bf16 weights where bf16 is emulated) + the native glue
                 between them, or eager without the native library
  GEMM ms        the step's linear layers alone (same kernels, same shapes: in the native step
                 its kernels on each layer's records; one call each, so at batch 1 it carries
                 121 calls' dispatch that the fused native step does not)
  attention ms   the step's decode attention alone
  outside        the share of the step that is neither: norms, RoPE, SwiGLU, residuals,
                 KV writes, embedding, host-side preparation, dispatch

Batches of up to the runner's native_max_batch run as one native call when the kernels are
built (then GEMM and attention are timed with the same native kernels); larger ones run
layer by layer. AGP_NATIVE=0 measures the eager path alone.

Then one request alone (batch 1, int4, the native step), per token: each part of the native
step timed inside it (the step's own per-phase clock, mean of the threads) with the bytes it
reads, the runner's work around the native call, and the engine's around the runner (one
request through Engine.step() on the main thread and through the plan's executor, as
bench/w32.py runs them), against the bound of reading the weights once at the measured rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_dsl.engine import native
from pipeline_dsl.engine.batch import StepBatch
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.models import load_weights, resolve_model
from pipeline_dsl.engine.quant import Int4Linear, PackedLinear, packing_works

try:
    from pipeline_dsl.engine.quant import Q8Linear
except ImportError:          # an older tree (A/B against a baseline checkout)
    class Q8Linear:  # noqa: D101
        pass

try:
    from pipeline_dsl.engine.quant import linear_runs, native_linear
except ImportError:          # an older tree: the table's path names no kernels, its GEMMs run as eager
    linear_runs = native_linear = None


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# oneDNN's bf16 (its GEMMs and its weight packing) needs one of these sets, as its error names them;
# without it torch's bf16 GEMMs fall back to a slow reference path and the packing raises
ONEDNN_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))


def cpu_flags() -> frozenset[str]:
    """native.cpu_flags(), or /proc/cpuinfo's words where an older tree has no such reader."""
    reader = getattr(native, "cpu_flags", None)
    if reader is not None:
        return reader()
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def skipped_ceilings() -> dict[str, str]:
    """The ceilings this CPU cannot give, each with why, decided before anything is measured:
    from its flags (cpu_flags()) and a tiny try of the packing (quant.packing_works())."""
    flags = cpu_flags()
    skip = {}
    if flags and not any(all(f in flags for f in need) for need in ONEDNN_BF16):
        why = ("oneDNN's bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which this CPU lacks "
               f"(it has {', '.join(sorted(f for f in flags if f.startswith(('avx', 'amx')))) or 'no AVX'})")
        skip["gemm_bf16_GFLOPs"] = (f"{why}: torch's fallback bf16 GEMM is no ceiling (a 512x2048x2048 "
                                    "call took 14 s of CPU on a 2-core AVX2 EPYC, fp32 0.07 s)")
        skip["gemm_bf16_model_shape_GFLOPs"] = (f"{why}: its bf16 weight packing (PackedLinear) raises; "
                                                "the engine runs its bf16 layers unpacked here (DenseLinear)")
    elif not packing_works():
        skip["gemm_bf16_model_shape_GFLOPs"] = ("oneDNN's bf16 weight packing (PackedLinear) fails here "
                                                f"(torch {torch.__version__}): the engine runs its bf16 layers unpacked")
    return skip


def ceilings(reps: int = 5, skip=()) -> dict:
    """The measured ceilings; those named in `skip` (skipped_ceilings()) are left out."""
    x = torch.ones(128 << 20, dtype=torch.float32)                         # 512 MiB
    read = x.numel() * 4 / timed(lambda: x.sum(), reps) / 1e9
    del x
    out = {"read_GBs": read}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if f"gemm_{name}_GFLOPs" in skip:
            continue
        a, b = torch.randn(512, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        out[f"gemm_{name}_GFLOPs"] = 2 * 512 * 2048 * 2048 / timed(lambda: a @ b, reps) / 1e9
    if "gemm_bf16_model_shape_GFLOPs" not in skip:
        w = torch.randn(1536 * 2, 576).bfloat16()                          # this model's gate_up, 32 rows
        lin, xs = PackedLinear(w), torch.randn(32, 576).bfloat16()
        out["gemm_bf16_model_shape_GFLOPs"] = 2 * 32 * w.numel() / timed(lambda: lin(xs), reps * 20) / 1e9
    return out


def native_read_GBs(nbytes: int, threads: int, reps: int = 9) -> float | None:
    """GB/s of reading nbytes once, as the native linears read their weights (each thread one
    contiguous share, 64-byte loads, the same prefetch), a buffer the size of a step's weights."""
    lib = native.load()
    if lib is None or not hasattr(lib, "agp_read_bytes"):
        return None
    buf = torch.ones(nbytes // 64 * 64, dtype=torch.uint8)
    return buf.numel() / timed(lambda: lib.agp_read_bytes(buf.data_ptr(), buf.numel(), threads), reps) / 1e9


def weight_bytes(lin, rows: int) -> int:
    """Bytes one call with `rows` rows reads of this layer's weight."""
    x16 = getattr(lin, "x16", None)
    if x16 is not None and rows <= max(lin.small_batch, getattr(lin, "x16_rows", 0)):
        return x16.numel()                          # the interleaved records: blocks and their scales
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
        vocab = min(40000, config.vocab_size)          # a small test model's too
        self.runner.execute([SeqBatchItem(rng.integers(min(100, vocab // 2), vocab, n).tolist(), 0, t, False)
                             for t, n in zip(self.tables, self.lens)])
        self.batch, self.config = batch, config
        self.items = [SeqBatchItem([(1000 + i) % vocab], n, t, True)
                      for i, (n, t) in enumerate(zip(self.lens, self.tables))]

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
        head = small if small is not None and self.batch <= max(small.small_batch, getattr(small, "x16_rows", 0)) \
            else m.lm_head
        return [lin for ly in m.layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)] + [head]

    def native_step(self) -> bool:
        """Whether the step runs as one native call (ModelRunner: all-decode, up to native_max_batch)."""
        r = self.runner
        return getattr(r, "native", None) is not None and self.batch <= r.native_max_batch

    def path(self) -> str:
        """What runs the step: the native step, or the layers' GEMMs (what computes them at this
        batch: agp's int8 kernels, torch's GEMMs in which dtype) with the native glue between
        them (ModelRunner._forward_glued) or eager."""
        if self.native_step():
            return "native step"
        glue = "native glue" if getattr(self.runner, "native", None) is not None else None
        if linear_runs is None:
            return "oneDNN GEMMs + native glue" if glue else "eager"
        runs = linear_runs(self.model.layers[0].qkv)[2 if self.batch > 8 else 1]
        return f"{runs} + {glue}" if glue else f"eager: {runs}"

    def gemm_only(self):
        """The step's linear layers alone, inputs of the right shapes, in the step's own kernels:
        the native step's (quant.native_linear on each layer's native records) where it runs,
        else each layer's call as the eager and glued paths make it."""
        B = self.batch
        xs = {}
        for lin in self.linears():
            xs.setdefault(self.in_features(lin), torch.randn(B, self.in_features(lin)).bfloat16())
        in_step = self.native_step() and native_linear is not None
        calls = [(native_linear if in_step and lin.native_struct() is not None else (lambda lin, x: lin(x)),
                  lin, xs[self.in_features(lin)]) for lin in self.linears()]
        return lambda: [call(lin, x) for call, lin, x in calls]

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


def batch1_breakdown(config, weights, threads: int, reps: int, engine: bool = True) -> None:
    """Where one request's decode token goes (module docstring)."""
    case = Case(config, weights, "int4", 1)
    r = case.runner
    if r.native is None:
        print("\nbatch 1 breakdown: needs the native kernels (make native)")
        return
    st = r.prepare(StepBatch.from_items(case.items))
    n = reps * 4
    prof = torch.zeros(torch.get_num_threads(), len(native.PHASES), dtype=torch.float64)
    with torch.inference_mode():
        runner_s = timed(case.step, n)
        native_s = timed(lambda: r.native.decode(st.tokens, st.positions, st.slots, st.dec_tables, st.sample_rows), n)
        r.native.decode(st.tokens, st.positions, st.slots, st.dec_tables, st.sample_rows, prof)   # warm
        prof.zero_()
        t = time.perf_counter()
        for _ in range(n):
            r.native.decode(st.tokens, st.positions, st.slots, st.dec_tables, st.sample_rows, prof)
        profiled_s = (time.perf_counter() - t) / n
    ms = dict(zip(native.PHASES, (prof.mean(0) / n * 1e3).tolist()))   # per phase, mean of the threads
    m = case.model
    layer_mb = {name: sum(weight_bytes(getattr(ly, name), 1) for ly in m.layers) / 1e6
                for name in ("qkv", "o", "gate_up", "down")}
    head = m.lm_head_small if m.lm_head_small is not None else m.lm_head
    head_mb = weight_bytes(head, 1) / 1e6
    c = config
    kv_mb = 2 * case.lens[0] * c.num_kv_heads * c.head_dim * r._k_pool.element_size() * c.num_layers / 1e6
    total_mb = sum(layer_mb.values()) + head_mb
    bw_step = native_read_GBs(int(total_mb * 1e6), torch.get_num_threads())
    bw_big = native_read_GBs(512 << 20, torch.get_num_threads())
    rows = [(f"{name} (int4 blocks{', x16' if getattr(m.layers[0].qkv, 'x16', None) is not None else ''})",
             ms[name], layer_mb[name]) for name in ("qkv", "o", "gate_up", "down")]
    rows += [(f"lm_head ({type(head).__name__}{', x16' if getattr(head, 'x16', None) is not None else ''})",
              ms["head"], head_mb),
             (f"attention (context {case.lens[0]}, K/V read in place)", ms["attention"], kv_mb),
             ("glue: norms, input quantisation, RoPE, residuals, SwiGLU", ms["glue"], None),
             ("barrier waits (5 a layer)", ms["barrier"], None)]
    print(f"\nOne request alone: batch 1, int4, the native step ({torch.get_num_threads()} threads), per token")
    print("| part | ms | share of the step | MB read | GB/s |")
    print("|---|---|---|---|---|")
    for name, t, mb in rows:
        rate = f"{mb / t:.1f}" if mb and t > 0 else ""
        print(f"| {name} | {t:.3f} | {t / (profiled_s * 1e3):.0%} | {f'{mb:.1f}' if mb else ''} | {rate} |")
    print(f"| native step (profiled; unprofiled {native_s * 1e3:.3f}) | {profiled_s * 1e3:.3f} | 100% | "
          f"{total_mb + kv_mb:.1f} | {(total_mb + kv_mb) / (profiled_s * 1e3):.1f} |")
    print(f"| runner around the native call (step tensors, ctypes) | {(runner_s - native_s) * 1e3:.3f} | | | |")
    if bw_step:
        print(f"| bound: {total_mb:.0f} MB of weights at the measured read rate ({bw_step:.1f} GB/s for "
              f"{total_mb:.0f} MB, {bw_big:.1f} GB/s for 512 MiB) | {total_mb / bw_step:.3f} | | {total_mb:.1f} | {bw_step:.1f} |")
    del case
    if engine:
        engine_overhead(runner_s, threads)


def engine_overhead(runner_s: float, threads: int) -> None:
    """One request through the engine as bench/w32.py runs it: its decode time a token against
    the runner's step alone."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import w32

    root = Path(__file__).resolve().parent.parent
    work = w32.load_workload(root / "bench" / "w32.jsonl", 64)[:2]
    for label, driver in (("Engine.step() on the main thread", w32.agp_main_thread),
                          ("the plan's executor (agp run)", w32.agp_executor)):
        s = w32.agp_single(root / "examples" / "chat.agp", work, "bf16", threads, driver)
        per_token = 1 / s["decode_tok_s"]
        print(f"| engine around the runner: {label}, {s['decode_tok_s']:.1f} tok/s | "
              f"{(per_token - runner_s) * 1e3:.3f} | | | |")


# the options are checked as they are read: a typo exits 2 there, not after minutes of measuring

def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return v


def batches(text: str) -> list[int]:
    """--batches: comma-separated batch sizes, each at least 1."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("no batch size")
    return [positive(t) for t in items]


WEIGHT_KINDS = ("bf16", "int4")


def weight_kinds(text: str) -> list[str]:
    """--weights: comma-separated of WEIGHT_KINDS."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in WEIGHT_KINDS:
            raise argparse.ArgumentTypeError(f"{t!r}: expected {' or '.join(WEIGHT_KINDS)}")
    if not items:
        raise argparse.ArgumentTypeError(f"none of {', '.join(WEIGHT_KINDS)}")
    return items


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--batches", type=batches, default=[1, 8, 32])
    ap.add_argument("--weights", type=weight_kinds, default=list(WEIGHT_KINDS))
    ap.add_argument("--reps", type=positive, default=15)
    ap.add_argument("--no-engine", action="store_true", help="batch 1: skip the engine runs")
    args = ap.parse_args(argv)
    skip = skipped_ceilings()
    for name, why in skip.items():
        print(f"ceiling {name} skipped: {why}", flush=True)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        ceil = ceilings(skip=skip)
    bf16 = ceil.get("gemm_bf16_GFLOPs")
    shape = ceil.get("gemm_bf16_model_shape_GFLOPs")
    print(f"ceilings ({args.threads} threads): memory read {ceil['read_GBs']:.1f} GB/s; GEMM bf16 "
          f"{f'{bf16:.0f} GFLOP/s' if bf16 else 'skipped'} (this model's gate_up at 32 rows: "
          f"{f'{shape:.0f}' if shape else 'skipped'}), fp32 {ceil['gemm_fp32_GFLOPs']:.0f} GFLOP/s", flush=True)
    flops_of = f"{bf16:.0f}" if bf16 else f"{ceil['gemm_fp32_GFLOPs']:.0f} fp32"
    config, weights, _ = load_weights(resolve_model(None))
    print(f"| weights | batch | path | step ms | tok/s | weights MB | GB/s (of {ceil['read_GBs']:.0f}) | "
          f"GFLOP/s (of {flops_of}) | GEMM ms | attention ms | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.weights:
        for B in args.batches:
            case = Case(config, weights, kind, B)
            with torch.inference_mode():
                step = timed(case.step, args.reps)
                gemm = timed(case.gemm_only(), args.reps)
                attn = timed(case.attention_only(), args.reps)
            path = case.path()
            mb = sum(weight_bytes(lin, B) for lin in case.linears()) / 1e6
            outside = max(0.0, 1 - (gemm + attn) / step)
            print(f"| {kind} | {B} | {path} | {step * 1e3:.1f} | {B / step:.0f} | {mb:.0f} | {mb / 1e3 / step:.1f} | "
                  f"{case.flops() / step / 1e9:.0f} | {gemm * 1e3:.1f} | {attn * 1e3:.1f} | {outside:.0%} |", flush=True)
            del case
    batch1_breakdown(config, weights, args.threads, args.reps, engine=not args.no_engine)


if __name__ == "__main__":
    main()
