"""Where a GGUF model's load time goes: agp's dequantisation against gguf's own, in one run.

    python bench/load_time.py                      # the embedded model
    python bench/load_time.py --model path/to/x.gguf --rounds 3

Prints, per round, the seconds to dequantise every tensor of the file with gguf's
`quants.dequantize` (the baseline) and with agp's loader (`gguf_loader.dequantize`: each type's
block formula over many rows per call), their ratio, whether the floats are the same bit for
bit, and the whole `load_runner` (weights, packing, the runner) for scale.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file or an embedded model's name")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from gguf import quants

    from pipeline_dsl.engine import EngineConfig
    from pipeline_dsl.engine.engine import load_runner
    from pipeline_dsl.engine.gguf_loader import dequantize, read_tensors
    from pipeline_dsl.engine.models import resolve_model
    from pipeline_dsl.model_files.gguf_header import read_gguf_header

    path = resolve_model(args.model).path
    header = read_gguf_header(path)
    base, ours, whole = [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        ref = {t.name: np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)
               for t in read_tensors(path, header)}
        t1 = time.perf_counter()
        got = {t.name: dequantize(t) for t in read_tensors(path, header)}
        t2 = time.perf_counter()
        same = all(np.array_equal(ref[n], got[n]) for n in ref)
        del ref, got
        t3 = time.perf_counter()
        load_runner(EngineConfig(model=str(path)))
        t4 = time.perf_counter()
        base.append(t1 - t0)
        ours.append(t2 - t1)
        whole.append(t4 - t3)
        print(f"round {r + 1}: gguf {t1 - t0:.2f} s, agp {t2 - t1:.2f} s ({(t1 - t0) / (t2 - t1):.2f}x), "
              f"same floats: {same}; load_runner {t4 - t3:.2f} s")
    print(f"{path.name}: dequantising every tensor, median gguf {statistics.median(base):.2f} s / agp "
          f"{statistics.median(ours):.2f} s = {statistics.median(base) / statistics.median(ours):.2f}x; "
          f"whole load_runner {statistics.median(whole):.2f} s")


if __name__ == "__main__":
    main()
