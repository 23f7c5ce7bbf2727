"""Overlap check: W32 through the plan's streams and with --no-overlap, in one run.

    python bench/gpu_check.py                          # CUDA, SmolLM2-135M's shape, random weights
    python bench/gpu_check.py --device cpu --small     # the same path on a CPU, a smaller workload
    python bench/gpu_check.py --device cpu --model smollm2-135m-instruct --threads 2
                                                       # CPU W32 on the embedded model (needs gguf)

W32 = 32 prompts, 64 new tokens each, greedy, ignore_eos. Without --model the weights are
random, built directly in torch with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads,
3 KV heads, intermediate 1536, vocab 49152), so the script needs torch, numpy and networkx
only (no gguf file). Each mode runs --repeat times, alternating, after a warm-up; for each
it prints output tokens/s, the measured overlap (time with >= 2 streams busy / wall time)
and, from the trace, the share of copy time hidden under compute and of host time hidden
under the device. --trace DIR writes one Chrome trace per mode.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from pipeline_dsl.engine.executor import Executor, default_plan  # noqa: E402
from pipeline_dsl.engine.model import LlamaConfig, LlamaModel, ModelRunner  # noqa: E402
from pipeline_dsl.engine.trace import Trace  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position=2048)


class IdTokenizer:
    """Token ids as text ("17 4 ..."): enough for a random-weight model's detokenising."""
    eos_token_ids = (0,)

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def random_model(device: str, dtype: str, layers: int) -> LlamaModel:
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_layers": layers})
    g = torch.Generator(device=device).manual_seed(0)
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def w(*shape):
        return torch.randn(*shape, generator=g, device=device) * 0.02

    weights = {"embed": w(cfg.vocab_size, H), "norm": torch.ones(H, device=device)}
    for i in range(layers):
        p = f"layers.{i}."
        weights.update({p + "attn_norm": torch.ones(H, device=device),
                        p + "ffn_norm": torch.ones(H, device=device),
                        p + "q": w(cfg.num_heads * hd, H), p + "k": w(cfg.num_kv_heads * hd, H),
                        p + "v": w(cfg.num_kv_heads * hd, H), p + "o": w(H, cfg.num_heads * hd),
                        p + "gate": w(I, H), p + "up": w(I, H), p + "down": w(H, I)})
    return LlamaModel(cfg, weights, dtype=dtype, device=device)


def workload(args, tokenizer_ready: bool):
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    if tokenizer_ready:
        lines = [json.loads(x) for x in (ROOT / "bench" / "w32.jsonl").read_text().splitlines() if x.strip()]
        lines = (lines * (args.prompts // len(lines) + 1))[:args.prompts]
        return [(f"w{i}", dict(messages=x["messages"], params=params)) for i, x in enumerate(lines)]
    rng = random.Random(0)
    return [(f"w{i}", dict(prompt_token_ids=[rng.randrange(1, 49152) for _ in range(rng.randint(24, 64))],
                           params=params)) for i in range(args.prompts)]


def make_engine(args, shared):
    cfg = EngineConfig(model=args.model or "random", device=args.device, dtype=args.dtype,
                       threads=args.threads, max_batch_size=max(32, args.prompts),
                       kv_budget_bytes=args.kv_mib << 20)
    if args.model:
        if "engine" not in shared:
            shared["engine"] = Engine(cfg)       # loads once; later engines share its runner
        base = shared["engine"]
        return Engine(cfg, runner=base.runner, tokenizer=base.tokenizer)
    if "runner" not in shared:
        model = random_model(args.device, args.dtype, args.layers)
        c = model.config
        elem = torch.empty((), dtype=model.dtype).element_size()
        per_block = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 16 * elem
        shared["runner"] = ModelRunner(model, max(64, (args.kv_mib << 20) // per_block), 16, None,
                                       args.device, pad_decode=True)
    return Engine(cfg, runner=shared["runner"], tokenizer=IdTokenizer())


def run_once(args, shared, overlap: bool, graphs: bool, issue: str, trace_dir: Path | None, tag: str) -> dict:
    eng = make_engine(args, shared)
    for rid, kw in workload(args, tokenizer_ready=bool(args.model)):
        eng.add_request(rid, **kw)
    trace = Trace()
    ex = Executor(eng, default_plan(), overlap=overlap, trace=trace, cuda_graphs=graphs, issue=issue)
    tokens = 0

    def on_output(outputs):
        nonlocal tokens
        tokens += sum(len(o.new_token_ids) for o in outputs)

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = ex.run(on_output=on_output)
    wall = time.perf_counter() - t0
    if trace_dir:
        trace.write(str(trace_dir / f"{tag}.json"))
    busy = trace.busy_s()
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "overlap": stats["measured_overlap"], "steps": stats["steps"],
            "copy_hidden": trace.hidden_fraction("copy", "compute"),
            "host_hidden": trace.hidden_fraction("host", "compute"),
            "copy_hidden_decode": trace.hidden_fraction("copy", "compute", stats["last_prefill_step"] + 1),
            "busy": {k: round(v, 4) for k, v in busy.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--model", default=None, help="a model name/path for the real engine (needs gguf)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--small", action="store_true", help="8 prompts, 16 tokens, 4 layers (a CPU smoke run)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-mib", type=int, default=256)
    p.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph modes")
    p.add_argument("--trace", default=None, help="directory for the Chrome traces")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.small:
        args.prompts, args.new_tokens, args.layers = 8, 16, 4
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    trace_dir = Path(args.trace) if args.trace else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {dev}; model {args.model or f'random SmolLM2-135M shape, {args.layers} layers'}; "
          f"{args.dtype}; {args.prompts} prompts x {args.new_tokens} new tokens, greedy, ignore_eos")
    shared: dict = {}
    # CUDA issues from one host thread by default; "threads" = one per stream, as on CPU
    modes = {"no-overlap": (False, False, None), "overlap": (True, False, None)}
    if args.device.startswith("cuda"):
        modes["overlap-threads"] = (True, False, "threads")
        if not args.no_graphs:
            modes.update({"no-overlap+graphs": (False, True, None),
                          "overlap+graphs": (True, True, None),
                          "overlap+graphs-threads": (True, True, "threads")})
    t = time.perf_counter()
    for mode in modes.values():
        run_once(args, shared, *mode, None, "warmup")
    print(f"warm-up done in {time.perf_counter() - t:.1f} s")
    results = {mode: [] for mode in modes}
    for r in range(args.repeat):
        for mode in (list(modes) if r % 2 == 0 else list(reversed(modes))):
            res = run_once(args, shared, *modes[mode], trace_dir, f"{mode.replace('+', '_')}-{r}")
            results[mode].append(res)
            print(f"  {mode:<10} run {r}: {res['tok_s']:8.1f} tok/s  wall {res['wall_s']:.3f} s  "
                  f"overlap {res['overlap']:.3f}  busy {res['busy']}")

    def med(mode, key):
        vals = [x[key] for x in results[mode] if x[key] is not None]
        return statistics.median(vals) if vals else None

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    print(f"\n{'mode':<24}{'tok/s':>10}{'overlap':>10}{'copy hidden':>13}{'(decode)':>10}{'host hidden':>13}")
    for mode in modes:
        print(f"{mode:<24}{med(mode, 'tok_s'):>10.1f}{med(mode, 'overlap'):>10.3f}"
              f"{pct(med(mode, 'copy_hidden')):>13}{pct(med(mode, 'copy_hidden_decode')):>10}"
              f"{pct(med(mode, 'host_hidden')):>13}")
    ratio = med("overlap", "tok_s") / med("no-overlap", "tok_s")
    print(f"overlap / no-overlap throughput: {ratio:.2f}x")
    if "overlap+graphs" in modes:
        print(f"with CUDA graphs: overlap / no-overlap throughput: "
              f"{med('overlap+graphs', 'tok_s') / med('no-overlap+graphs', 'tok_s'):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": dev, "ratio": ratio,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
