"""A/B of the native linear kernels of two source trees in one process, timed in this thread's CPU time.

    .venv/bin/python bench/kernel_ab.py --a /tmp/base --b . [--rows 1] [--rounds 12]

Loads each tree's built library (pipeline_dsl/engine/native/build/, `make native` in each tree
first) side by side and calls `agp_linear` on one thread on the embedded model's layer-0
q/k/v, gate/up and down linears (their weights stay in cache between calls: the kernels'
arithmetic, not the memory) and on its output head (31.9 MB: read from memory), the two
libraries taking turns round by round. The time is this thread's CPU time (time.thread_time_ns),
which other processes holding the cores do not inflate as they do wall time; the minimum and
the lower quartile of the rounds are printed, and the two libraries' outputs must be the same
bits. AGP_NATIVE_ACT picks the activations' form as for agp run (the layers are built with it).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

from pipeline_dsl.engine.models import load_weights, resolve_model  # noqa: E402


def library(tree: str):
    found = sorted(Path(tree, "pipeline_dsl/engine/native/build").glob("libagp_native-*.so"))
    if len(found) != 1:
        raise SystemExit(f"{tree}: expected one built library in pipeline_dsl/engine/native/build, found "
                         f"{len(found)} (run `make native` there)")
    lib = ctypes.CDLL(str(found[0]))
    lib.agp_linear.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="tree A (the baseline)")
    ap.add_argument("--b", default=".", help="tree B (default: this one)")
    ap.add_argument("--rows", type=int, default=1, help="input rows a call (1: one request's decode)")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    libs = {"A": library(args.a), "B": library(args.b)}
    config, weights, _ = load_weights(resolve_model(None))
    m = roofline.Case(config, weights, "int4", 1).model
    head = m.lm_head_small if m.lm_head_small is not None else m.lm_head
    same = True
    print("| linear | kind | MB | A min / q1 us | B min / q1 us | A/B min | A/B q1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, lin in (("qkv", m.layers[0].qkv), ("gate_up", m.layers[0].gate_up), ("down", m.layers[0].down),
                      ("head", head)):
        s = lin.native_struct()
        nbytes = roofline.weight_bytes(lin, args.rows)
        x = torch.randn(args.rows, s.K)
        ys = {k: torch.empty(args.rows, s.N) for k in libs}
        reps = max(2, int(3e7 // nbytes))
        took: dict[str, list[float]] = {k: [] for k in libs}
        for r in range(args.rounds):
            for k in ("A", "B")[:: 1 if r % 2 == 0 else -1]:
                t = time.thread_time_ns()
                for _ in range(reps):
                    libs[k].agp_linear(ctypes.byref(s), x.data_ptr(), args.rows, ys[k].data_ptr(), 1)
                took[k].append((time.thread_time_ns() - t) / reps / 1e3)
        same &= torch.equal(ys["A"], ys["B"])
        a, b = sorted(took["A"]), sorted(took["B"])
        q = len(a) // 4
        print(f"| {name} | {s.kind} | {nbytes / 1e6:.2f} | {a[0]:.1f} / {a[q]:.1f} | {b[0]:.1f} / {b[q]:.1f} | "
              f"{a[0] / b[0]:.3f} | {a[q] / b[q]:.3f} |", flush=True)
    print(f"outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
