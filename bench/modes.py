"""The seed's mode table, measured: memory and throughput of efficient, balanced and
performance on the same workload.

Each mode runs `agp run` in its own process (peak memory is per process) over the W32
prompts on examples/chat.agp with only `mode` changed, and the table reports output
tokens/s, peak memory and the settings the mode chose.

    .venv/bin/python bench/modes.py [--threads 2] [--workload bench/w32.jsonl]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("efficient", "balanced", "performance")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", default=str(ROOT / "bench" / "w32.jsonl"))
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--repeat", type=int, default=2,
                    help="send the workload this many times at once (64 requests: room for performance's batch)")
    ap.add_argument("--modes", default=",".join(MODES), help="which modes (default: all three)")
    args = ap.parse_args()

    text = Path(args.pipeline).read_text(encoding="utf-8")
    rows = []
    lines = [json.loads(x) for x in Path(args.workload).read_text().splitlines() if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.jsonl"
        workload.write_text("".join(json.dumps({**obj, "id": f"{obj.get('id', i)}-{r}"}) + "\n"
                                    for r in range(args.repeat) for i, obj in enumerate(lines)))
        for mode in args.modes.split(","):
            agp = Path(tmp) / f"{mode}.agp"
            agp.write_text(re.sub(r"mode\s*=\s*\w+", f"mode = {mode}", text, count=1), encoding="utf-8")
            stats = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "pipeline_dsl.cli", "run", str(agp), "--input", str(workload),
                   "--output", "/dev/null", "--threads", str(args.threads), "--stats", str(stats),
                   "--no-progress"]
            subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
            s = json.loads(stats.read_text())
            rows.append((mode, s))
            print(f"  {mode:<12} {s['output_tokens_per_s']:8.1f} tok/s  "
                  f"{s['peak_memory_bytes'] / 2**20:7.0f} MiB", file=sys.stderr, flush=True)
    print(f"\nmodes on {Path(args.workload).name} x {args.repeat} ({len(lines) * args.repeat} requests at once), "
          f"{args.threads} threads")
    print("| mode | output tok/s | peak memory | precision | mean batch |")
    print("|---|---|---|---|---|")
    for mode, s in rows:
        print(f"| {mode} | {s['output_tokens_per_s']:.1f} | {s['peak_memory_bytes'] / 2**20:.0f} MiB "
              f"| {s.get('dtype', '')} | {s.get('mean_batch_size')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
