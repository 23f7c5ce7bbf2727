"""Every figure of the GPU engine in one offline run: two tables, ratios within the run.

    sh bench/gpu_prepare.sh                                   # once, here: bench/tok and .whl/gpu
    sh bench/gpu_device.sh                                    # on the device: one command (docs/gpu.md)
    python bench/gpu_suite.py --tokenizer bench/tok --budget 480 --json gpu.json   # what it runs
    python bench/gpu_suite.py --smoke                         # CPU, tiny shapes, about two minutes (a test runs it)
    python bench/gpu_suite.py --tokenizer bench/tok --only "batch sweep" --only serve   # some rows again
    python bench/gpu_suite.py --table gpu.json                # the tables of a saved run

Inputs stay small: random-weight models of the real shapes (SmolLM2-135M, Llama-3.2-1B)
are built on the device as Hugging Face folders next to the real tokenizer (weights do
not change throughput with greedy decoding and ignore_eos; ../docs/gpu.md).

Rows, issue 17's "done when" figures first (cheapest per figure first), the nice-to-haves last:
engine alone on the issue's workload (256 prompts of 24-64 random tokens x 128 new tokens),
the engine alone again on the very token ids `agp run` and `agp serve` encode from their chat
requests (same token counts, greedy, ignore_eos: the baselines of the pipeline's ratios, so
they measure the pipeline's own overhead), one request alone, the plan's streams overlapped
vs not (graphs on both; copy and host time hidden under compute), transformers `generate`,
`agp run` and `agp serve` (256 and 512 streams) in the default mode with the engine alone's
batch size and KV budget, the Llama-3.2-1B shape, `agp run` in performance mode; then the rest
of the batch sweep (16 / 64 / 256), attention reading the pool in place (flex) vs gathering it
(sdpa), and `agp serve` in performance mode. Each model is loaded (warm-up, compile, capture)
once for all its engine rows. A row that fails says why and the suite goes on; with --json the
rows so far are written after each one, and --budget (counted from the process's start, as a
device command's limit is) starts no row after its seconds nor one
whose estimate (ESTIMATE_S) would end it more than a minute past them, so a device command's
time limit still leaves the figures and the tables: every figure, then issue 17's "done when"
figures with targets and whether each is met.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "tiny-mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True),
}


def make_tokenizer(out: Path) -> None:
    """The embedded model's tokenizer (and chat template) as a small HF folder (~3.5 MB): the
    tokenizer agp reads from the GGUF file's metadata (the one `agp run` encodes the embedded
    model's prompts with), written as the tokenizer.json and tokenizer_config.json that
    Tokenizer.from_hf_folder reads back. A second or so: transformers' GGUF reader took ~25 s."""
    from pipeline_dsl.engine.gguf_loader import read_metadata
    from pipeline_dsl.engine.models import resolve_model
    from pipeline_dsl.engine.tokenizer import Tokenizer
    from pipeline_dsl.model_files import read_gguf_header

    tok = Tokenizer.from_gguf_metadata(read_metadata(read_gguf_header(resolve_model(None).path)))
    out.mkdir(parents=True, exist_ok=True)
    tok.tk.save(str(out / "tokenizer.json"))
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
              "add_eos_token": tok.add_eos, "chat_template": tok.chat_template}
    text = json.dumps(config, indent=1, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")


def make_model(shape: str, tokenizer: Path, out: Path, device: str) -> Path:
    """A random-weight Llama folder of the shape, the tokenizer files beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


# the process's start: --budget counts from it, as the device script's cut does (torch's import and the
# preflight's, some seconds on a bare device, come before the first row)
STARTED = time.perf_counter()
DEADLINE: list = [None]    # perf_counter() by which a subprocess row must end (the budget, and a minute)
ROW_MIN_S = 30             # what a subprocess row is given at least, however late it starts
KV_BUDGET = [4 << 30]      # the engine-alone rows' KV pool: 4 GiB on a device, small in --smoke (CPU RAM)


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def digest(ids: list[list[int]]) -> str:
    """The prompts' token ids, in request order, as one short hash: two rows compare like for
    like only when they ran the very same prompts."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def chat_prompt_ids(folder: Path, device: str, reqs: list[dict]) -> list[list[int]]:
    """The token ids the encode stage gives these chat requests (the folder's real tokenizer
    and chat template, through the same Engine.prompt_ids), so the engine alone can run exactly
    what `agp run` and `agp serve` run; the loaded runner serves, no model is loaded for this."""
    from pipeline_dsl.engine import Engine, EngineConfig
    from pipeline_dsl.engine.tokenizer import Tokenizer

    cfg = EngineConfig(model=str(folder), device=device, dtype="bf16", max_batch_size=256,
                       max_tokens_per_step=4096, prefill_chunk=512, kv_budget_bytes=KV_BUDGET[0], batch_timeout_s=0.0)
    runner, _ = loaded(cfg, None)
    engine = Engine(cfg, runner=runner, tokenizer=Tokenizer.from_hf_folder(folder))
    return [engine.prompt_ids(messages=r["messages"]) for r in reqs]


# Device seconds a row takes, to start none that would overrun the budget; from GPU-NOTES.md's
# H200 figures at today's speed (256 x 128 tokens at ~7.5k tok/s: ~5 s; a chat run at ~3.3k: ~10 s;
# 512 streams x 64 at ~1.7k: ~20 s) plus what the figures do not give and is guessed here: a load
# (model build, warm-up, flex compile, graph capture) ~60 s, torch.compile of performance mode
# ~60 s more. Every row records its own seconds (row_s) to replace the guesses after a run.
ESTIMATE_S = {
    "run": 10,                 # an engine-alone row on the loaded runner: 256 x 128, or 512 x 64
    "one": 5,                  # one request alone: 128 tokens at >= 50 tok/s
    "load": 80,                # a runner's first row: load, warm-up, compile, capture, the run
    "load large": 110,         # the 1B shape: building its 2.5 GB folder too
    "transformers": 20,        # load + warm-up + 256 x 128 generate, 135M
    "transformers large": 30,  # the same, 1B
    "agp run": 90,             # a subprocess: start, load, capture, 256 chat requests x 128
    "agp serve": 110,          # a server: start, load, capture, 256 then 512 streams x 64
    "agp run compiled": 150,   # performance mode: torch.compile at load too
    "agp serve compiled": 170,
}

# The pipeline's step budget and prefill chunk (the stages' defaults, dynamic_batch and generate),
# written into its file and given to the engine alone that is its baseline, so both run one config
PIPELINE_STEP = {"max_tokens_per_step": 512, "prefill_chunk": 256}

RUNNERS: dict = {}         # (folder, attention) -> (runner, load info): one load serves every row of it
LOAD_FAILED: dict = {}     # (folder, attention) -> why its load failed: the rows after it fail at once


def loaded(cfg, attention: str | None):
    """The runner of cfg.model with that attention, loaded (warm-up, graphs) once for the suite:
    each load compiles and captures, which alone would take most of a device command's time, so
    a load that failed is not tried again by every row of that runner."""
    from pipeline_dsl.engine.engine import load_runner

    key = (cfg.model, attention)
    same = [k for k, (_, info) in RUNNERS.items() if k[0] == cfg.model and attention
            and info.get("attention") == attention and not info.get("attention_fallback")]
    if same:                                # the default load already runs this attention
        return RUNNERS[same[0]]
    if key in LOAD_FAILED:
        raise RuntimeError(f"its model's load failed in an earlier row: {LOAD_FAILED[key]}")
    if key not in RUNNERS:
        before = os.environ.get("AGP_ATTENTION")
        if attention:                       # flex (reads the pool in place) or sdpa (gathers): A/B
            os.environ["AGP_ATTENTION"] = attention
        try:
            RUNNERS[key] = load_runner(cfg)[::2]
        except Exception as e:
            LOAD_FAILED[key] = f"{type(e).__name__}: {str(e)[:200]}"
            raise
        finally:
            if before is None:
                os.environ.pop("AGP_ATTENTION", None)
            else:
                os.environ["AGP_ATTENTION"] = before
    return RUNNERS[key]


def release(keep: Path | None = None) -> None:
    """Free every loaded runner but keep's (the KV pool and the graphs' memory)."""
    import torch

    for key in [k for k in RUNNERS if k[0] != str(keep)]:
        del RUNNERS[key]
    gc.collect()                # the runner and its graphs refer to each other: only the cycle
    if torch.cuda.is_available():   # collector frees the KV pool and the graphs' memory pool
        torch.cuda.empty_cache()


def _graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (every version of every function)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def engine_alone(folder: Path, device: str, ps, new: int, *, overlap=None, graphs=None, batch=256,
                 attention: str | None = None, as_pipeline: bool = False) -> dict:
    """The engine without the pipeline on prompts `ps` (token ids), `new` tokens each, greedy,
    ignore_eos. `as_pipeline`: the step's token budget and prefill chunk of the suite's pipeline
    (PIPELINE_STEP), for the baselines of the pipeline's ratios; otherwise the larger ones the
    issue's engine-alone figure was taken with."""
    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
    from pipeline_dsl.engine.executor import Executor
    from pipeline_dsl.engine.tokenizer import IdTokenizer
    from pipeline_dsl.engine.trace import Trace

    # the runner is loaded for 256 rows (graphs for every batch bucket up to it); a row's Engine
    # takes `batch` as its max_batch_size, so its scheduler pads to buckets the runner captured
    cfg = EngineConfig(model=str(folder), device=device, dtype="bf16", max_batch_size=max(batch, 256),
                       max_tokens_per_step=4096, prefill_chunk=512, kv_budget_bytes=KV_BUDGET[0], batch_timeout_s=0.0)
    runner, info = loaded(cfg, attention)
    cfg = dataclasses.replace(cfg, max_batch_size=batch)
    if as_pipeline:                 # the runner captured pieces up to 4096 tokens: these are a subset
        cfg = dataclasses.replace(cfg, **PIPELINE_STEP)
    sp = SamplingParams(max_tokens=new, ignore_eos=True)
    warm = Executor(Engine(cfg, runner=runner, tokenizer=IdTokenizer()), overlap=overlap, cuda_graphs=graphs)
    warm.submit("warm", prompt_token_ids=ps[0][:8], params=SamplingParams(max_tokens=4, ignore_eos=True))
    warm.run()                                                 # first step's lazy work, outside the timing
    trace = Trace()
    ex = Executor(Engine(cfg, runner=runner, tokenizer=IdTokenizer()), overlap=overlap, cuda_graphs=graphs,
                  trace=trace)
    for i, p in enumerate(ps):
        ex.submit(str(i), prompt_token_ids=p, params=sp)
    compiled = _graphs_compiled()
    t0 = time.perf_counter()
    stats = ex.run()
    wall = time.perf_counter() - t0
    return {"tok_s": len(ps) * new / wall, "compiled_in_run": _graphs_compiled() - compiled, "wall_s": wall,
            "ms_per_step": 1e3 * wall / max(stats["steps"], 1), "prompts": len(ps), "tokens": len(ps) * new,
            "batch": batch, "ids_digest": digest(ps), "step_tokens": cfg.max_tokens_per_step,
            "prefill_chunk": cfg.prefill_chunk,
            "load_s": info.get("load_s"), "graphs": info.get("cuda_graphs"), "piece_graphs": info.get("piece_graphs"),
            "capture_s": info.get("graph_capture_s"), "warm_up_s": info.get("warm_up_s"),
            "attention": info.get("attention"), "attention_fallback": info.get("attention_fallback"),
            "graphs_fallback": info.get("graphs_fallback"),
            "overlap": stats["overlap"], "measured_overlap": stats["measured_overlap"],
            "copy_hidden": trace.hidden_fraction("copy", "compute"),
            "host_hidden": trace.hidden_fraction("host", "compute")}


def transformers_generate(folder: Path, device: str, ps, new: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.bfloat16,
                                             attn_implementation="sdpa").to(device).eval()
    width = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)          # [B, W] left padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    return {"tok_s": len(ps) * new / wall, "wall_s": wall}


def write_pipeline(folder: Path, mode: str, device: str, tmp: Path, batch: int) -> Path:
    """The chat pipeline of `agp run` / `agp serve` in `mode`: its batch size, KV budget, step
    budget and prefill chunk are those of the engine alone it is compared with, every other
    setting the mode's."""
    path = tmp / f"{mode}-{batch}.agp"
    step, chunk = PIPELINE_STEP["max_tokens_per_step"], PIPELINE_STEP["prefill_chunk"]
    path.write_text(f"""pipeline chat {{
    model = "{folder}"
    mode = {mode}
    device = {device}
    stage request : requests {{}}
    stage batch : dynamic_batch {{ max_batch_size = {batch} timeout = 1ms max_tokens_per_step = {step} }}
    stage encode : encode {{}}
    stage kv : kv_lookup {{ reuse = prefix budget = {size(KV_BUDGET[0])} }}
    stage gen : generate {{ max_new_tokens = 128 temperature = 0 prefill_chunk = {chunk} }}
    stage out : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
""")
    return path


def size(n: int) -> str:
    """Bytes as a size of the pipeline language: MiB when whole (a device's 4 GiB), else KiB."""
    return f"{n >> 20}MiB" if n % (1 << 20) == 0 else f"{n >> 10}KiB"


def chat_requests(n: int, new: int) -> list[dict]:
    rng = random.Random(1)
    words = "the a sea sky city river model engine token answer question light stone".split()
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in
                                                                              range(rng.randint(10, 40)))}],
             "max_tokens": new, "ignore_eos": True, "return_token_ids": True} for i in range(n)]


def time_left(most: float = 300) -> float:
    """Seconds a subprocess row may run: well inside a device command's 600 s, and never past the
    suite's time budget (DEADLINE), though at least ROW_MIN_S."""
    return most if DEADLINE[0] is None else max(ROW_MIN_S, min(most, DEADLINE[0] - time.perf_counter()))


def agp_run(pipeline: Path, reqs: list[dict], tmp: Path) -> dict:
    inp, out, st = tmp / "req.jsonl", tmp / "out.jsonl", tmp / "stats.json"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    cmd = [sys.executable, "-m", "pipeline_dsl.cli", "run", str(pipeline), "-i", str(inp), "-o", str(out),
           "--stats", str(st), "--no-progress", "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=time_left())
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    s = json.loads(st.read_text())
    # the prompts' ids as the pipeline encoded them (return_token_ids): the like-for-like check
    answers = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    answers = {a.get("id"): a for a in answers}
    ids = [answers.get(r["id"], {}).get("prompt_token_ids") or [] for r in reqs]
    tokens = sum(len(a.get("token_ids") or ()) for a in answers.values())
    return {"tok_s": s["output_tokens_per_s"], "ttft_p50_ms": s["ttft_p50_ms"], "prompts": len(reqs),
            "answered": sum(1 for a in answers.values() if "error" not in a), "tokens": tokens,
            "ids_digest": digest(ids)}


async def serve_streams(port: int, n: int, new: int) -> dict:
    import httpx

    reqs = chat_requests(n, new)
    ttft, tokens, ids = [], [0], [[] for _ in reqs]

    async def one(client, i, r):
        t0 = time.perf_counter()
        first = None
        body = {"model": "chat", "messages": r["messages"], "max_tokens": new, "ignore_eos": True, "stream": True,
                "return_token_ids": True}     # the prompt's ids (the like-for-like check) and each token's
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    choice = (chunk.get("choices") or [{}])[0]
                    ids[i] = chunk.get("prompt_token_ids") or choice.get("prompt_token_ids") or ids[i]
                    got = len(choice.get("token_ids") or ()) or (1 if choice.get("delta", {}).get("content") else 0)
                    if got:
                        first = first or time.perf_counter()
                        tokens[0] += got
        ttft.append((first or time.perf_counter()) - t0)

    # trust_env=False: the server is on loopback, and httpx would send it through a proxy the
    # machine's environment names (HTTP_PROXY, ALL_PROXY): no stream would be answered. The clock
    # starts once the client is made (its SSL context: ~50 ms not the server's)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 8), trust_env=False) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, i, r) for i, r in enumerate(reqs)), return_exceptions=True)
        wall = time.perf_counter() - t0
    failed = [d for d in done if isinstance(d, BaseException)]
    return {"streams": n, "answered": n - len(failed), "stream_tok_s": tokens[0] / wall, "tokens": tokens[0],
            "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else None, "ids_digest": digest(ids)}


def agp_serve(pipeline: Path, counts, new: int) -> list[dict]:
    """The streams against `agp serve`, the server's start and every wave within time_left(): a
    server that never answers ends the row, not the suite."""
    from serve_load import Server                    # bench/serve_load.py (this script's folder)

    limit = time_left()
    end = time.perf_counter() + limit
    srv = Server(str(pipeline), startup_s=limit)
    try:
        out = []
        for n in counts:
            try:
                out.append(asyncio.run(asyncio.wait_for(serve_streams(srv.port, n, new),
                                                        max(end - time.perf_counter(), 1))))
            except TimeoutError:
                raise RuntimeError(f"{n} streams not answered within the row's {limit:.0f} s") from None
        return out
    finally:
        srv.terminate(timeout=10)


def names(n: int, new: int, shapes, streams) -> dict:
    """The rows' names, which the rows and the "done when" table both use."""
    small, snew = shapes[0], min(new, 64)
    return {"engine": lambda s: f"engine alone, {s}, {n} x {new}",
            "transformers": lambda s: f"transformers generate, {s}",
            "run": lambda mode: f"agp run {mode}, {n} chat requests",
            "run base": f"engine alone, {small}, agp run's {n} chat prompts x {new}",
            "serve": lambda mode: f"agp serve {mode}, {streams[0]} / {streams[1]} streams x {snew}",
            "serve base": f"engine alone, {small}, agp serve's {streams[1]} chat prompts x {snew}",
            "one": "batch sweep 1", "on": "streams overlapped (graphs on)", "off": "streams serial (graphs on)"}


def done_when(results: dict, n: int, new: int, shapes, streams) -> list[tuple[str, str, str, str]]:
    """Issue 17's "done when" figures from the rows: (figure, value, target, met: yes / no / -).
    The pipeline's ratios divide by the engine alone on the very prompts the pipeline ran (same
    token ids, same token counts, same run): a figure whose rows differ there says so."""
    nm = names(n, new, shapes, streams)

    def get(name, key="tok_s"):
        v = results.get(name, {})
        return v.get(key) if isinstance(v, dict) else None

    def check(what, value, target, ok, fmt="{:,.0f}", why=None):
        shown = why or ("not run" if value is None else fmt.format(value))
        out.append((what, shown, target, "no" if why else "-" if value is None else ("yes" if ok(value) else "no")))

    def ratio(a, b):
        return a / b if a is not None and b else None

    def unlike(run: dict, base: str) -> str | None:
        """Why `run` and the engine-alone row `base` are not like for like (None when they are)."""
        b = results.get(base, {})
        if not (isinstance(run, dict) and run.get("ids_digest") and isinstance(b, dict) and b.get("ids_digest")):
            return None                       # one is missing: the figure shows "not run"
        if run["ids_digest"] != b["ids_digest"]:
            return "prompts differ from the baseline's"
        if run.get("tokens") != b.get("tokens"):
            return f"{run.get('tokens')} tokens, the baseline {b.get('tokens')}"
        return None

    out: list = []
    for s, floor in zip(shapes, (40_000, 25_000)):
        eng = get(nm["engine"](s))
        check(f"engine alone, {s}, tok/s", eng, f">= {floor:,}", lambda v: v >= floor)
        check(f"engine alone / transformers, {s}", ratio(eng, get(nm["transformers"](s))), ">= 4x",
              lambda v: v >= 4, "{:.2f}x")
    run = results.get(nm["run"]("balanced"), {})
    check("agp run balanced / engine alone (same prompts)", ratio(get(nm["run"]("balanced")), get(nm["run base"])),
          ">= 85 %", lambda v: v >= 0.85, "{:.0%}", unlike(run, nm["run base"]))
    check("agp run balanced, TTFT p50 ms", get(nm["run"]("balanced"), "ttft_p50_ms"), "<= 1000", lambda v: v <= 1000)
    check("agp run performance, TTFT p50 ms (no compile inside TTFT)",
          get(nm["run"]("performance"), "ttft_p50_ms"), "<= 1000", lambda v: v <= 1000)
    check("one request alone, tok/s", get(nm["one"]), ">= 600", lambda v: v >= 600)
    check("overlap on / off (graphs on both)", ratio(get(nm["on"]), get(nm["off"])), ">= 1.25x",
          lambda v: v >= 1.25, "{:.2f}x")
    for part in ("copy", "host"):
        check(f"{part} time hidden under compute", get(nm["on"], f"{part}_hidden"), ">= 90 %",
              lambda v: v >= 0.9, "{:.0%}")
    runs = [v.get("compiled_in_run") for v in results.values() if isinstance(v, dict) and "compiled_in_run" in v]
    check("torch.compile versions made inside the timed engine runs", sum(runs) if runs else None, "0",
          lambda v: v == 0)
    serve = results.get(nm["serve"]("balanced"))
    big = serve[-1] if isinstance(serve, list) and serve else {}
    check(f"agp serve {streams[1]} streams answered", big.get("answered"), f"{streams[1]}",
          lambda v: v == streams[1])
    check(f"agp serve {streams[1]} streams, TTFT p50 ms", big.get("ttft_p50_ms"), "<= 1500", lambda v: v <= 1500)
    check(f"agp serve {streams[1]} streams, streamed tok/s / engine alone (same prompts)",
          ratio(big.get("stream_tok_s"), get(nm["serve base"])), ">= 70 %", lambda v: v >= 0.7, "{:.0%}",
          unlike(big, nm["serve base"]))
    return out


def print_tables(saved: dict) -> None:
    """The rows' table and the "done when" table, from what main saved (a run cut short too)."""
    print(f"\n| figure ({saved['device']}, torch {saved['torch']}, {saved['date']}, {saved['wall_s']:.0f} s"
          f"{'' if saved['complete'] else ', cut short'}) | value |")
    print("|---|---|")
    for name, value in saved["table"]:             # a row's whole value is in the JSON
        value = value if len(value) <= 150 else value[:147] + "..."
        print(f"| {name.strip()} | {value} |")
    w = saved["workload"]
    print("\n| done when (issue 17) | measured | target | met |\n|---|---|---|---|")
    for row in done_when(saved["rows"], w["n"], w["new"], w["shapes"], w["streams"]):
        print("| " + " | ".join(row) + " |")


PREFLIGHT_MODULES = ("transformers", "gguf", "lark", "pydantic", "fastapi", "uvicorn", "httpx")


def preflight(tok: Path | None) -> list[str]:
    """What the device lacks for some rows, said before the first row rather than inside it. Each
    module is imported, not only found: a wheel can be there and still fail to import against the
    image's own packages (pydantic-core wants a newer typing_extensions than an image may have)."""
    import importlib

    problems = []
    for m in PREFLIGHT_MODULES:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - any failure to import is what the rows would meet
            problems.append(f"module {m} does not import ({type(e).__name__}: {str(e)[:160]}; "
                            f"GPU-NOTES.md: bring its wheel)")
    if tok is None or not (tok / "tokenizer.json").is_file():
        problems.append(f"no tokenizer folder at {tok} (make it with --make-tokenizer on a machine with "
                        f"the embedded model)")
    return problems


def main(argv=None, started: float | None = None) -> int:
    """`started`: the perf_counter() the budget counts from (the process's start when run as a
    script; this call's start by default)."""
    t_start = time.perf_counter() if started is None else started
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, help="folder from --make-tokenizer (the real tokenizer)")
    ap.add_argument("--make-tokenizer", type=Path, help="write the embedded model's tokenizer folder here and stop")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few requests: checks the suite runs")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here (after each row)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the rows whose name contains TEXT (repeatable)")
    ap.add_argument("--budget", type=float, default=None, metavar="S",
                    help="start no row after S seconds from the process's start (default 480 on a device: "
                         "one command runs at most 600 s); "
                         "the rows left are marked skipped and the tables are still printed")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print the tables of a saved run and stop")
    args = ap.parse_args(argv)
    if args.make_tokenizer:
        make_tokenizer(args.make_tokenizer)
        print(f"wrote {args.make_tokenizer}")
        return 0
    if args.table:                  # without torch: the tables print even where importing it hangs
        print_tables(json.loads(args.table.read_text()))
        return 0
    import torch

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if smoke:
        # eager flex_attention on a CPU scores every slot of the pool (its row's time grows with it);
        # 512 KiB of the tiny shape (256 bytes a token in bf16) is 2,048 tokens, 1,024 of tiny-mha's:
        # about 4x the most a smoke row holds at once (8 chat prompts of 43-67 tokens and 8 new each)
        KV_BUDGET[0] = 512 << 10
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    if not smoke:
        for problem in preflight(args.tokenizer):
            print(f"preflight: {problem}", flush=True)
        if args.tokenizer is None or not (args.tokenizer / "tokenizer.json").is_file():
            raise SystemExit("no tokenizer folder: pass --tokenizer bench/tok (docs/gpu.md)")
    budget = args.budget if args.budget is not None else (None if smoke else 480.0)
    if budget is not None:
        DEADLINE[0] = t_start + budget + 60
    n, new, lo, hi = (8, 8, 6, 12) if smoke else (256, 128, 24, 64)
    sweep = (1, 4) if smoke else (1, 16, 64, 256)
    streams = (4, 8) if smoke else (256, 512)
    shapes = ("tiny", "tiny-mha") if smoke else ("smollm2-135m", "llama-3.2-1b")   # the second: its rows too
    rows: list[tuple[str, str]] = []
    results: dict = {}
    dev = "cpu (smoke)" if smoke else torch.cuda.get_device_name()

    def saved(done: bool) -> dict:
        return {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                "wall_s": time.perf_counter() - t_start, "complete": done, "rows": results, "table": rows,
                "workload": {"n": n, "new": new, "shapes": list(shapes), "streams": list(streams)}}

    def save(done: bool) -> None:
        if args.json:
            args.json.write_text(json.dumps(saved(done), indent=1, default=str))

    def ratio(name, a, b, fmt="{:.2f}x"):
        a, b = results.get(a, {}), results.get(b, {})
        if "tok_s" in a and "tok_s" in b:
            rows.append((name, fmt.format(a["tok_s"] / b["tok_s"])))

    def row(name, fn, fmt, kind):
        """Run one row unless --only leaves it out or the budget cannot hold it: a row starts only
        within the budget, and only when its estimate ends it by the budget and a minute (an engine
        row in this process cannot be cut short, a subprocess row is cut at that deadline)."""
        if args.only and not any(t in name for t in args.only):
            return
        spent = time.perf_counter() - t_start
        if budget is not None and (spent > budget or spent + ESTIMATE_S[kind] > budget + 60):
            results[name] = {"skipped": f"{spent:.0f} s of the {budget:.0f} s budget spent, "
                                        f"the row takes about {ESTIMATE_S[kind]} s"}
            rows.append((name, "skipped: time budget spent (rerun it with --only)"))
        else:
            t0 = time.perf_counter()
            try:
                r = fn()
                results[name] = r
                rows.append((name, fmt(r)))
            except Exception as e:  # noqa: BLE001 - one row's failure is reported, the suite goes on
                results[name] = r = {"error": f"{type(e).__name__}: {e}"}
                rows.append((name, f"failed: {type(e).__name__}: {str(e)[:120]}"))
            except KeyboardInterrupt:   # the device script's cut (SIGINT): the tables name the row it stopped
                spent = time.perf_counter() - t0
                results[name] = {"error": f"stopped by the time limit after {spent:.0f} s", "row_s": round(spent, 3)}
                rows.append((name, f"failed: stopped by the time limit after {spent:.0f} s"))
                save(False)
                raise
            for part in r if isinstance(r, list) else [r]:   # the row's own seconds: to check ESTIMATE_S
                part["row_s"] = round(time.perf_counter() - t0, 3)   # against (a serve row: each wave)
        print(f"{name:48s} {rows[-1][1]}", flush=True)
        save(False)

    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tok = args.tokenizer
        if tok is None:
            tok = tmp / "tok"
            make_tokenizer(tok)
        ps = prompts(n, lo, hi)
        folders: dict = {}

        def folder(shape):                            # built when its first row runs, inside that row's time
            if shape not in folders:
                folders[shape] = make_model(shape, tok, tmp / shape, device)
            return folders[shape]

        nm, snew, batch = names(n, new, shapes, streams), min(new, 64), max(n, 8)
        reqs, sreqs = chat_requests(n, new), chat_requests(streams[1], snew)
        chat: dict = {}                               # the chat requests' token ids, from the encode stage's code

        def chat_ids(rs):
            key = len(rs), rs[0]["max_tokens"]
            if key not in chat:
                chat[key] = chat_prompt_ids(folder(shapes[0]), device, rs)
            return chat[key]

        def engine_fmt(r):
            return (f"{r['tok_s']:,.0f} tok/s, {r['ms_per_step']:.1f} ms a step ({r['attention']} attention, graphs "
                    f"{r['graphs']} + {r['piece_graphs']} pieces, load {r['load_s'] or 0:.0f} s: warm-up "
                    f"{r['warm_up_s'] or 0:.1f} s, capture {r['capture_s'] or 0:.1f} s"
                    f"{', flex fell back: ' + r['attention_fallback'] if r['attention_fallback'] else ''}"
                    f"{', no graphs: ' + r['graphs_fallback'] if r['graphs_fallback'] else ''})")

        def tok_s(r):
            return f"{r['tok_s']:,.0f} tok/s, {r['ms_per_step']:.2f} ms a step"

        def run_fmt(r):
            return f"{r['tok_s']:,.0f} tok/s, TTFT p50 {r['ttft_p50_ms']} ms, {r['answered']}/{r['prompts']} answered"

        def serve_fmt(r):
            return "; ".join(f"{x['answered']}/{x['streams']} answered, {x['stream_tok_s']:,.0f} tok/s, "
                             f"TTFT p50 {x['ttft_p50_ms']:.0f} ms" for x in r)

        small = shapes[0]
        # Issue 17's "done when" figures first, the cheapest per figure first, so a time budget cut
        # takes the nice-to-haves and then the dearest done-when rows; estimates in ESTIMATE_S.
        # 1. the small shape's runner, loaded once, kept to the end (its pool and graphs ~5 GiB)
        row(nm["engine"](small), lambda: engine_alone(folder(small), device, ps, new), engine_fmt, "load")
        row(nm["run base"], lambda: engine_alone(folder(small), device, chat_ids(reqs), new, batch=batch,
                                                 as_pipeline=True), tok_s, "run")
        row(nm["serve base"], lambda: engine_alone(folder(small), device, chat_ids(sreqs), snew, batch=batch,
                                                   as_pipeline=True), tok_s, "run")
        row(nm["one"], lambda: engine_alone(folder(small), device, ps[:1], new, batch=1), tok_s, "one")
        row(nm["on"], lambda: engine_alone(folder(small), device, ps, new, overlap=True),
            lambda r: f"{r['tok_s']:,.0f} tok/s (streams busy at once {pct(r['measured_overlap'])}, copy hidden "
                      f"{pct(r['copy_hidden'])}, host hidden {pct(r['host_hidden'])})", "run")
        row(nm["off"], lambda: engine_alone(folder(small), device, ps, new, overlap=False), tok_s, "run")
        ratio("  ratio overlap on / off", nm["on"], nm["off"])
        row(nm["transformers"](small), lambda: transformers_generate(folder(small), device, ps, new),
            lambda r: f"{r['tok_s']:,.0f} tok/s", "transformers")
        ratio(f"  ratio engine / transformers, {small}", nm["engine"](small), nm["transformers"](small))
        # 2. the pipeline end to end in subprocesses, the default mode; batch size and KV budget are
        # the engine alone's, so the ratios below measure the pipeline's own overhead
        row(nm["run"]("balanced"), lambda: agp_run(write_pipeline(folder(small), "balanced", device, tmp, batch),
                                                   reqs, tmp), run_fmt, "agp run")
        ratio("  ratio agp run balanced / engine alone (same prompts)", nm["run"]("balanced"), nm["run base"],
              "{:.0%}")
        row(nm["serve"]("balanced"), lambda: agp_serve(write_pipeline(folder(small), "balanced", device, tmp, batch),
                                                       streams, snew), serve_fmt, "agp serve")
        # 3. the larger shape: its runner goes before transformers loads the same weights
        for s in shapes[1:]:
            row(nm["engine"](s), lambda: engine_alone(folder(s), device, ps, new), engine_fmt, "load large")
            release(keep=folder(small))
            row(nm["transformers"](s), lambda: transformers_generate(folder(s), device, ps, new),
                lambda r: f"{r['tok_s']:,.0f} tok/s", "transformers large")
            ratio(f"  ratio engine / transformers, {s}", nm["engine"](s), nm["transformers"](s))
        # 4. performance mode: torch.compile at load makes it the dearest done-when row
        row(nm["run"]("performance"), lambda: agp_run(write_pipeline(folder(small), "performance", device, tmp,
                                                                     batch), reqs, tmp), run_fmt, "agp run compiled")
        # 5. nice to have: the rest of the batch sweep, attention A/B, serve in performance mode
        for b in sweep[1:]:
            row(f"batch sweep {b}", lambda: engine_alone(folder(small), device, ps[:b] if b <= n else
                                                         prompts(b, lo, hi), new, batch=b), tok_s, "run")
        for att in ("flex", "sdpa"):
            row(f"attention {att} (engine alone, {small})",
                lambda: engine_alone(folder(small), device, ps, new, attention=att),
                lambda r: f"{r['tok_s']:,.0f} tok/s ({r['attention']})", "run" if att == "flex" else "load")
        ratio("  ratio attention flex / sdpa", f"attention flex (engine alone, {small})",
              f"attention sdpa (engine alone, {small})")
        row(nm["serve"]("performance"), lambda: agp_serve(write_pipeline(folder(small), "performance", device, tmp,
                                                                         batch), streams, snew), serve_fmt,
            "agp serve compiled")
    save(True)
    print_tables(saved(True))
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
