"""What the syntax errors of a long file cost `agp check`: the CPU seconds of a child
`python -m pipeline_dsl.cli check FILE` on generated files near the 1 MiB cap, each with
syntax errors near its end (recovery blanks each error's statement and parses on to the next).

    python bench/recovery_speed.py                  # every shape, best of 3
    python bench/recovery_speed.py --shapes edges --repeat 5

Shapes: edges (45,000 edges, one a line, 1 MiB, then 3 bad settings), whenline (a line of
20,000 edges with a condition, then an edge with two arrows after its condition). Prints one
line per shape: KiB, errors reported, CPU seconds (user + sys of the child, its start included).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text(shape: str) -> str:
    edges = "".join(f"    s{i} -> s{i + 1}\n" for i in range(45_000))
    if shape == "edges":
        return "pipeline p {\n" + edges + "".join(f"    bad{i} = = {i}\n" for i in range(3)) + "}\n"
    if shape == "whenline":
        return "pipeline p {\n" + "a -> b when full " * 20_000 + "\na -> b when full -> c\n}\n"
    raise SystemExit(f"unknown shape {shape}")


def cpu_of_check(path: str) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "check", path], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    errors = sum(1 for ln in proc.stderr.splitlines() if ": error: " in ln and not ln.startswith(" "))
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["edges", "whenline"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            path = os.path.join(tmp, f"{shape}.agp")
            with open(path, "w") as f:
                f.write(text(shape))
            runs = [cpu_of_check(path) for _ in range(args.repeat)]
            print(f"{shape:9} {os.path.getsize(path) / 1024:7.0f} KiB  {runs[0][1]:2} errors  "
                  f"{min(cpu for cpu, _ in runs):6.2f} s CPU", flush=True)


if __name__ == "__main__":
    main()
