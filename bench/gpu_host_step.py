"""Host time per engine step at batch 256 (a tiny random model): this tree against a baseline tree.

    python bench/gpu_host_step.py --baseline /path/to/old/tree [--batch 256 --steps 60 --rounds 3]

What a GPU hides only if it is small: the host's part of a step (schedule, the step's index
arrays, sampling bookkeeping, update, detokenise) is measured as the step's wall time minus
the model's forward and the draw, on CPU, with the torch (GPU-path) kernels and a model so
small that the forward is cheap. Each round runs the baseline and this tree in fresh
processes, in turns; the ratio is of medians within the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, random
import torch
from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine.model import LlamaConfig, LlamaModel, ModelRunner
from pipeline_dsl.engine.tokenizer import IdTokenizer

B, STEPS = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
c = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, max_position=1024)
w = {"embed": torch.randn(c.vocab_size, c.hidden_size) * 0.1, "norm": torch.ones(c.hidden_size)}
for i in range(c.num_layers):
    p = f"layers.{i}."
    for n, shape in (("q", (64, 64)), ("k", (32, 64)), ("v", (32, 64)), ("o", (64, 64)),
                     ("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))):
        w[p + n] = torch.randn(*shape) * 0.1
    w[p + "attn_norm"] = torch.ones(64)
    w[p + "ffn_norm"] = torch.ones(64)
model = LlamaModel(c, w, "fp32")
runner = ModelRunner(model, num_blocks=B * 20, block_size=16, pad_decode=True)
runner.native = None                      # the torch kernels a GPU runs

eng = Engine(EngineConfig(max_batch_size=B, max_tokens_per_step=B * 64, prefill_chunk=256,
                          batch_timeout_s=0.0), runner=runner, tokenizer=IdTokenizer())
rng = random.Random(0)
for i in range(B):
    eng.add_request(str(i), prompt_token_ids=[rng.randrange(3, 500) for _ in range(rng.randint(24, 64))],
                    params=SamplingParams(max_tokens=STEPS + 8, ignore_eos=True))
while eng.scheduler.waiting or any(s.num_computed < s.num_prompt for s in eng.scheduler.running):
    eng.step()                            # prefill: not measured
spent = {"model": 0.0}
name = "run" if hasattr(runner, "prepare") else "_forward"
inner = getattr(runner, name)
def timed(*a, **k):
    t = time.perf_counter(); out = inner(*a, **k); spent["model"] += time.perf_counter() - t; return out
setattr(runner, name, timed)
draw = eng.sample
def timed_sample(*a, **k):
    t = time.perf_counter(); out = draw(*a, **k); spent["model"] += time.perf_counter() - t; return out
eng.sample = timed_sample
t0 = time.perf_counter()
for _ in range(STEPS):
    eng.step()
wall = time.perf_counter() - t0
print(json.dumps({"host_ms": 1e3 * (wall - spent["model"]) / STEPS, "step_ms": 1e3 * wall / STEPS,
                  "batch": len(eng.scheduler.running)}))
"""


def one(tree: Path, batch: int, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(steps)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: failed\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the tree to compare against")
    ap.add_argument("--tree", type=Path, default=ROOT)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base, new = [], []
    for r in range(args.rounds):
        a, b = one(args.baseline, args.batch, args.steps), one(args.tree, args.batch, args.steps)
        base.append(a["host_ms"])
        new.append(b["host_ms"])
        print(f"round {r + 1}: host ms/step baseline {a['host_ms']:.2f} (step {a['step_ms']:.2f}), "
              f"this tree {b['host_ms']:.2f} (step {b['step_ms']:.2f}), batch {b['batch']}", flush=True)
    mb, mn = statistics.median(base), statistics.median(new)
    print(f"median host ms/step at batch {args.batch}: baseline {mb:.2f}, this tree {mn:.2f}, "
          f"ratio {mn / mb:.2f} (lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
