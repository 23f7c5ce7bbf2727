"""What `dtype = bf16` / `fp16` with dense weights costs on a CPU without that type in hardware.

    .venv/bin/python bench/dense_bf16.py [--threads 1] [--batch 32] [--prompt 20] [--reps 5] [--dtypes bf16,fp16]

The embedded model dequantized (its 4-bit blocks dropped: dense weights, as an fp32/f16 file or
a Hugging Face folder gives), a batch of decode sequences with ~prompt tokens of context, the
runner's median decode step (and the prefill before it, one step of batch x prompt rows) for each
half type of --dtypes (bf16, fp16):

  bf16 emulated   DenseLinear on torch's bf16 GEMM at every row count (upcast_rows unlimited):
                  what a CPU without AMX / AVX512-BF16 ran before
  bf16            as the engine runs it: more than EMULATED_HALF_ROWS rows in fp32, rounded to bf16
  fp16 emulated,  the same in fp16 (emulated without AMX-FP16 / AVX512-FP16)
  fp16
  fp32            fp32 weights (what dtype = auto takes for dense weights there)

and how many of the batch's greedy next tokens each type and its emulated GEMM agree on. On a
CPU with the type in hardware its two rows are the same path (nothing is upcast there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_dsl.engine import native  # noqa: E402
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem  # noqa: E402
from pipeline_dsl.engine.models import load_weights, resolve_model  # noqa: E402
from pipeline_dsl.engine.quant import NO_ROW_LIMIT, DenseLinear  # noqa: E402


def run(config, weights, dtype: str, emulated: bool, batch: int, prompt: int, reps: int, block_size: int = 16):
    model = LlamaModel(config, dict(weights), dtype=dtype)
    if emulated:
        for layer in model.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                lin = getattr(layer, name)
                if isinstance(lin, DenseLinear):
                    lin.upcast_rows = NO_ROW_LIMIT
        if isinstance(model.lm_head, DenseLinear):
            model.lm_head.upcast_rows = NO_ROW_LIMIT
    nblk = (prompt + 40 + block_size) // block_size + 1
    runner = ModelRunner(model, num_blocks=batch * nblk, block_size=block_size)
    rng = np.random.default_rng(0)
    tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(batch)]
    lens = [int(rng.integers(max(1, prompt - 5), prompt + 6)) for _ in range(batch)]
    t = time.perf_counter()
    runner.execute([SeqBatchItem(rng.integers(100, 40000, n).tolist(), 0, tab, False) for tab, n in zip(tables, lens)])
    prefill = time.perf_counter() - t
    items = [SeqBatchItem([1000 + i], n, tab, True) for i, (n, tab) in enumerate(zip(lens, tables))]
    logits = runner.execute(items)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.execute(items)          # the same position again: a steady state
        times.append(time.perf_counter() - t)
    return prefill, statistics.median(times), logits.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="bf16,fp16", help="the half types to measure, comma-separated")
    args = ap.parse_args()
    halves = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not halves or any(d not in ("bf16", "fp16") for d in halves):
        ap.error(f"--dtypes {args.dtypes!r}: expected bf16, fp16 or both, comma-separated")
    torch.set_num_threads(args.threads)
    print(f"fast bf16 (AMX or AVX512-BF16): {native.fast_bf16()}; fast fp16 (AMX-FP16 or AVX512-FP16): "
          f"{native.fast_fp16()}; {args.threads} thread(s), batch {args.batch}, "
          f"~{args.prompt} tokens of context", flush=True)
    config, weights, _ = load_weights(resolve_model(None))
    tokens = {}
    print(f"{'weights':<16}{'prefill s':>10}{'step ms':>10}{'tok/s':>8}")
    runs = [r for d in halves for r in ((f"{d} emulated", d, True), (d, d, False))] + [("fp32", "fp32", False)]
    for label, dtype, emulated in runs:
        prefill, step, tokens[label] = run(config, weights, dtype, emulated, args.batch, args.prompt, args.reps)
        print(f"{label:<16}{prefill:>10.2f}{step * 1e3:>10.0f}{args.batch / step:>8.1f}", flush=True)
    for d in halves:
        same = int((tokens[d] == tokens[f"{d} emulated"]).sum())
        print(f"greedy next tokens, {d} vs {d} emulated: {same}/{args.batch} the same")


if __name__ == "__main__":
    main()
