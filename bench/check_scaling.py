"""How `agp check` scales: the time of `pipeline_dsl.load(FILE)` per pipeline size.

    python bench/check_scaling.py                       # chain, fan and edges at 1k..20k stages
    python bench/check_scaling.py --shapes chain --sizes 1000 20000
    python bench/check_scaling.py --fmt                 # also time `agp fmt` (format_text)

Shapes (each a valid pipeline, so every check runs to its end):
  chain   request -> s0 -> s1 -> ... -> batch -> encode -> kv -> gen -> out, one statement
  edges   the same chain written as one `a -> b` statement per edge
  fan     request -> route -> s_i -> batch for every i (a wide fan-out and fan-in)
  deadend the chain without its last edge (every stage reports it cannot reach respond)
  unknown a chain of stages of an unknown kind
  undefined  a chain of names no stage has, among n stages (did-you-mean over n names each)
  params  one stage with N parameters (unknown ones: N errors, each did-you-mean'd)
  pipes   N small pipelines in one file
  longname  a syntax error after a name of 40*N characters (hints once searched from every offset)
  whenline  a syntax error on the line after N edges with a condition on one line

Prints one line per (shape, size): stages, seconds, diagnostics. Linear means the seconds
per 1k stages stay flat as N grows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline_dsl  # noqa: E402

HEAD = 'pipeline p {\n    stage request : requests {}\n'
TAIL = ('    stage batch : dynamic_batch {}\n    stage encode : encode {}\n    stage kv : kv_lookup {}\n'
        '    stage gen : generate {}\n    stage out : respond {}\n'
        '    batch -> encode when full\n    batch -> encode when timeout\n    encode -> kv -> gen -> out\n')


def _stages(n: int) -> str:        # route: a pass-through stage, short enough for 20,000 in 1 MiB
    return "".join(f"    stage s{i} : route\n" for i in range(n))


def make(shape: str, n: int) -> str:
    """The text of a pipeline of `shape` with about `n` stages."""
    if shape == "chain":
        return HEAD + _stages(n) + TAIL + "    request -> " + " -> ".join(f"s{i}" for i in range(n)) + " -> batch\n}\n"
    if shape == "edges":
        names = ["request"] + [f"s{i}" for i in range(n)] + ["batch"]
        return HEAD + _stages(n) + TAIL + "".join(f"    {a} -> {b}\n" for a, b in zip(names, names[1:])) + "}\n"
    if shape == "fan":
        return (HEAD + "    stage r : route {}\n" + _stages(n) + TAIL + "    request -> r\n"
                + "".join(f"    r -> s{i} -> batch\n" for i in range(n)) + "}\n")
    if shape == "deadend":             # the last stage leads nowhere: an error on every stage
        return HEAD + _stages(n) + TAIL + "    request -> " + " -> ".join(f"s{i}" for i in range(n)) + "\n}\n"
    if shape == "unknown":             # stages of an unknown kind: n errors, reachability from each
        return ("pipeline p {\n" + "".join(f"    stage s{i} : nokind\n" for i in range(n))
                + "    " + " -> ".join(f"s{i}" for i in range(n)) + "\n}\n")
    if shape == "undefined":           # n edges to undefined stages among n stages: n did-you-means
        return HEAD + _stages(n) + TAIL + "    " + " -> ".join(f"t{i}" for i in range(n)) + "\n}\n"
    if shape == "params":
        return (HEAD + "    stage sp : system_prompt { text = \"x\" "
                + " ".join(f"p{i} = {i}" for i in range(n)) + " }\n" + TAIL + "    request -> sp -> batch\n}\n")
    if shape == "pipes":
        one = ("pipeline p{i} {{ stage request : requests {{}} stage batch : dynamic_batch {{}} "
               "stage encode : encode {{}} stage kv : kv_lookup {{}} stage gen : generate {{}} "
               "stage out : respond {{}} request -> batch batch -> encode when full "
               "batch -> encode when timeout encode -> kv -> gen -> out }}\n")
        return "".join(one.format(i=i) for i in range(max(1, n // 6)))
    if shape == "longname":            # one error; the hint reads the text around it
        return f"pipeline p {{\n stage {'x' * (40 * n)} : route {{ }} -> c\n}}\n"
    if shape == "whenline":
        return "pipeline p {\n" + "a -> b when full " * n + "\na -> b when full -> c\n}\n"
    raise ValueError(f"unknown shape {shape!r}")


def time_fmt(text: str) -> float:
    from pipeline_dsl.fmt import format_text

    t0 = time.perf_counter()
    format_text(text)
    return time.perf_counter() - t0


def time_load(text: str, directory: str) -> tuple[float, int]:
    path = os.path.join(directory, "scale.agp")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    t0 = time.perf_counter()
    _, diags = pipeline_dsl.load(path)
    return time.perf_counter() - t0, len(diags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["chain", "edges", "fan", "deadend", "unknown", "undefined",
                                                     "params", "pipes"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 2000, 5000, 10000, 20000])
    ap.add_argument("--fmt", action="store_true", help="also time format_text on each file")
    args = ap.parse_args(argv)
    pipeline_dsl.loads('pipeline w { stage request : requests {} }')     # warm: grammar, registry
    print(f"{'shape':<9} {'stages':>7} {'seconds':>8} {'s/1k':>6} {'diags':>6}" + ("  fmt s" if args.fmt else ""))
    with tempfile.TemporaryDirectory(prefix="agp-scale-") as d:
        for shape in args.shapes:
            for n in args.sizes:
                text = make(shape, n)
                secs, nd = time_load(text, d)
                extra = f"  {time_fmt(text):5.2f}" if args.fmt else ""
                print(f"{shape:<9} {n:>7} {secs:>8.2f} {secs / n * 1000:>6.3f} {nd:>6}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
