"""An engine's start in CPU seconds: the imports, then `Engine(EngineConfig(model=...))`, each
round in a fresh process (what every `agp run` / `agp serve` start and many tests pay).

    python bench/startup.py                                 # this tree, the embedded model, 5 rounds
    python bench/startup.py --tree /path/to/base --tree .   # A/B, the trees' rounds alternating
    python bench/startup.py --model path/to/x.gguf --rounds 9
    python bench/startup.py --serve examples/chat.agp --tree /path/to/base --tree .

CPU time (user + system of the process, every thread), not wall time: on a shared machine
another process's load stretches the wall clock but hardly the CPU a start takes. Prints each
round and the medians per tree. `--serve PIPELINE`: `agp serve PIPELINE` instead, until its first
/health 200 (the server's CPU seconds then, and the wall seconds). `--profile` prints the child's cProfile of the engine's load
(the compute thread's `load_runner`) instead, for one round of the first tree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.process_time()
import torch
t1 = time.process_time()
from pipeline_dsl.engine import Engine, EngineConfig
t2 = time.process_time()
config = EngineConfig(model=sys.argv[1])
if sys.argv[2] == "profile":
    import cProfile, pstats
    from pipeline_dsl.engine.engine import load_runner
    p = cProfile.Profile()
    p.enable()
    load_runner(config)
    p.disable()
    pstats.Stats(p).sort_stats("cumulative").print_stats(40)
    raise SystemExit
Engine(config)
t3 = time.process_time()
print(json.dumps({"torch": t1 - t0, "agp_imports": t2 - t1, "engine": t3 - t2, "total": t3 - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", help="a checkout of agp to time (repeat for A/B); default: this one")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file or an embedded model's name")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--serve", metavar="PIPELINE", help="time `agp serve PIPELINE` to its first /health 200")
    args = ap.parse_args()
    trees = [str(Path(t).resolve()) for t in (args.tree or [Path(__file__).resolve().parents[1]])]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")

    def one(tree: str, mode: str):
        return subprocess.run([sys.executable, "-c", CHILD, args.model, mode], cwd=tree, check=True,
                              env={**env, "PYTHONPATH": tree}, capture_output=mode == "time", text=True)

    if args.profile:
        one(trees[0], "profile")
        return
    if args.serve:
        one = lambda tree, mode: serve(tree, args.serve, env)   # noqa: E731
    one(trees[0], "time")                      # the file into the page cache, the .pyc files written
    got: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            got_one = one(tree, "time")
            row = got_one if isinstance(got_one, dict) else json.loads(got_one.stdout.strip().splitlines()[-1])
            got[tree].append(row)
            print(f"round {r + 1} {tree}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
    print("medians (CPU seconds):")
    for tree, rows in got.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"  {tree}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))


def serve(tree: str, pipeline: str, env: dict) -> dict:
    """{"server_cpu", "wall"} seconds of `agp serve pipeline` (from tree) up to its first /health 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "serve", pipeline, "--port", str(port)],
                            cwd=tree, env={**env, "PYTHONPATH": tree}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"agp serve {pipeline} exited with {proc.returncode} before /health said 200")
            time.sleep(0.05)
        wall = time.monotonic() - t0
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
        return {"server_cpu": cpu, "wall": wall}
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
