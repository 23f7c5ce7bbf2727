"""A/B of `agp run` between two source trees (e.g. a commit before a change and after it).

Runs `python -m pipeline_dsl.cli run PIPELINE -i WORKLOAD` from tree A and tree B in turns
(A, B, B, A, A, B, ...: the machine's speed drifts, so rounds interleave and each goes first
as often), in fresh processes with the same Python environment, and prints each round's output
tokens/s and time per output token after the first (p50 of the run's requests: the decode alone,
without the prefill's TTFT), the medians, the ratios, and whether both trees gave the same
answers. Greedy answers in bf16 depend on which requests shared a batch, which timing decides:
with AGP_BATCH_INVARIANT=1 in the environment (slower) they must be the same, and a difference
is exit 1; without it a difference is reported, not an error.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/ab_run.py --a /tmp/base --b . --rounds 3
    .venv/bin/python bench/ab_run.py --a /tmp/base --b . --pipeline examples/chat.agp --workload bench/w32.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(tree: Path, pipeline: str, workload: str, threads: int, extra: list[str]) -> tuple[float, float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out, stats = Path(tmp) / "out.jsonl", Path(tmp) / "stats.json"
        env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
        cmd = [sys.executable, "-m", "pipeline_dsl.cli", "run", str(ROOT / pipeline), "-i", str(ROOT / workload),
               "-o", str(out), "--stats", str(stats), "--threads", str(threads), "--no-progress", *extra]
        proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: agp run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        s = json.loads(stats.read_text())
        answers = {r["id"]: r.get("text") for r in map(json.loads, out.read_text().splitlines())}
        return float(s["output_tokens_per_s"]), float(s["tpot_p50_ms"] or "nan"), answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="tree A (the baseline)")
    ap.add_argument("--b", default=str(ROOT), help="tree B (default: this one)")
    ap.add_argument("--pipeline", default="examples/chat.agp")
    ap.add_argument("--workload", default="bench/w32.jsonl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more agp run arguments (after --)")
    args = ap.parse_args()
    a, b = Path(args.a), Path(args.b)
    rates: dict[str, list[float]] = {"A": [], "B": []}
    tpots: dict[str, list[float]] = {"A": [], "B": []}
    answers: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, tree in (("A", a), ("B", b))[::1 if r % 2 == 0 else -1]:
            rate, tpot, ans = one(tree, args.pipeline, args.workload, args.threads, args.extra)
            rates[name].append(rate)
            tpots[name].append(tpot)
            answers.setdefault(name, ans)
            print(f"round {r + 1} {name} ({tree}): {rate:.1f} output tok/s, {tpot:.2f} ms per output token",
                  flush=True)
    ma, mb = statistics.median(rates["A"]), statistics.median(rates["B"])
    ta, tb = statistics.median(tpots["A"]), statistics.median(tpots["B"])
    same = answers["A"] == answers["B"]
    print(f"\nmedian A {ma:.1f} tok/s, B {mb:.1f} tok/s: B/A = {mb / ma:.3f}")
    print(f"median per output token A {ta:.2f} ms, B {tb:.2f} ms: A/B = {ta / tb:.3f} (above 1: B is faster)")
    invariant = os.environ.get("AGP_BATCH_INVARIANT", "0").lower() in ("1", "true", "yes", "on")
    print(f"answers identical: {same}")
    if not same:
        diff = [k for k in answers["A"] if answers["A"][k] != answers["B"].get(k)]
        print(f"differing ids: {diff[:10]}" + ("" if invariant else
              " (bf16 batches follow timing: AGP_BATCH_INVARIANT=1 compares token for token)"))
    return 0 if same or not invariant else 1


if __name__ == "__main__":
    sys.exit(main())
