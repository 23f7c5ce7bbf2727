"""One answer on a busy machine: the same request with 0 and N CPU hogs beside agp.

Each measurement is one `agp run` (a fresh process: the model loaded while the hogs already run,
as when a user starts agp on a busy machine) answering one chat request of `--tokens` tokens
(ignore_eos) with examples/chat.agp. The hogs are `yes > /dev/null` processes started before the
child and killed (by their pid) when it ends; a child that runs past `--timeout` is killed too and
reported as such. Prints per measurement, from the run's --stats, the generation wall time, TTFT,
the per-token p50, the engine's threads, OpenMP wait policy and the steps its contention guard ran
on one thread, then the busy / quiet ratio.

    .venv/bin/python bench/busy.py [--hogs 2] [--rounds 1] [--tokens 64] [--threads N] [--timeout 150]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def measure(hogs: int, args, folder: Path) -> dict:
    """One `agp run` of the request in a fresh process, `hogs` yes processes beside it."""
    request = {"id": "a", "max_tokens": args.tokens, "ignore_eos": True,
               "messages": [{"role": "user", "content": "Write a short story about a robot who paints."}]}
    (folder / "in.jsonl").write_text(json.dumps(request) + "\n")
    stats = folder / "stats.json"
    stats.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline_dsl.cli", "run", str(ROOT / "examples" / "chat.agp"),
           "-i", str(folder / "in.jsonl"), "-o", str(folder / "out.jsonl"), "--overwrite",
           "--stats", str(stats), "--no-progress", *(["--threads", str(args.threads)] if args.threads else [])]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = []
    try:
        for _ in range(hogs):
            procs.append(subprocess.Popen(["yes"], stdout=subprocess.DEVNULL))
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"wall_s": None, "note": f"killed after {args.timeout} s"}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if r.returncode != 0:
        return {"wall_s": None, "note": r.stderr.strip().splitlines()[-1:]}
    s = json.loads(stats.read_text())
    gen = next(iter(s["engines"].values()))
    return {"wall_s": s["generation_s"], "ttft_ms": s["ttft_p50_ms"], "tpot_p50_ms": s["tpot_p50_ms"],
            "threads": gen.get("threads"), "omp_wait_policy": gen.get("omp_wait_policy"),
            "one_thread_steps": gen.get("one_thread_steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="default: agp's choice")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds before a measurement is killed")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  load {os.getloadavg()[0]:.2f}  "
          f"{args.tokens} tokens, threads {args.threads or 'default'}, {os.cpu_count()} cpus", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="agp-busy-"))
    walls: dict[int, list[float]] = {0: [], args.hogs: []}
    for r in range(args.rounds):
        for hogs in (0, args.hogs):              # alternate: the machine's speed drifts
            res = measure(hogs, args, folder)
            if res.get("wall_s") is not None:
                walls[hogs].append(res["wall_s"])
            print(f"round {r + 1} hogs {hogs}: {json.dumps(res)}  load {os.getloadavg()[0]:.2f}", flush=True)
    if walls[0] and walls[args.hogs]:
        quiet, busy = statistics.median(walls[0]), statistics.median(walls[args.hogs])
        print(f"median wall: quiet {quiet:.2f} s, {args.hogs} hogs {busy:.2f} s, ratio {busy / quiet:.1f}x")


if __name__ == "__main__":
    main()
