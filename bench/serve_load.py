"""The serving benchmark of issue 5, end to end; rewrites docs/benchmarks.md and its plots.

    python bench/serve_load.py                       # `make bench-serve`: the embedded model
    python bench/serve_load.py --pipeline my.agp --clients 8 --duration 10   # a smoke run

1. Load: `agp serve PIPELINE` in a subprocess on 127.0.0.1, then `--clients` streaming
   clients in a closed loop for `--duration` s over bench/workloads/short_chat.jsonl:
   errors, truncated streams, TTFT p99; the KV pool after the run; SIGTERM -> exit 0.
2. Prefix reuse: bench/workloads/shared_prefix.jsonl (one long system prompt) with
   Poisson arrivals, in process, prefix reuse on against off: the TTFT ratio.
3. Saturation: the same prompts all at once through `agp run`, through `agp serve`
   (HTTP) and through the in-process AsyncEngine: output tokens/s.

All traffic goes to 127.0.0.1 and every phase is bounded in requests and time.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_dsl.commands import loadgen as B  # noqa: E402
from pipeline_dsl.requests_io import parse_line  # noqa: E402

WORKLOADS = ROOT / "bench" / "workloads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`agp serve` in a subprocess on a free loopback port. Its clients ignore the environment's
    proxy settings (trust_env=False): httpx would send even 127.0.0.1 through HTTP_PROXY / ALL_PROXY."""

    def __init__(self, pipeline: str, *extra: str, startup_s: float = 300, python: tuple = ("-m", "pipeline_dsl.cli")):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, *python, "serve", pipeline,
                                      "--port", str(self.port), *extra],
                                     cwd=ROOT, stderr=self.log, stdout=self.log)
        deadline = time.monotonic() + startup_s
        # one client for every poll: httpx.get makes a client, and its SSL context (~50 ms of CPU),
        # each call, and a busy machine takes tens of polls to start a server. A poll then costs
        # well under a millisecond, so it comes every 0.1 s: the server is used soon after it answers
        with httpx.Client(timeout=2, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agp serve exited with {self.proc.returncode}: {self.output()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError("agp serve did not start: " + self.output())
                time.sleep(0.1)

    def output(self, whole: bool = False) -> str:
        """The server's stderr and stdout: the last 2,000 characters, or all of it."""
        self.log.seek(0)
        text = self.log.read()
        return text if whole else text[-2000:]

    def get(self, path: str):
        import httpx

        return httpx.get(self.url + path, timeout=30, trust_env=False)

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------- the three phases

def phase_load(args) -> dict:
    items = B.load_workload(WORKLOADS / "short_chat.jsonl")
    server = Server(args.pipeline)
    try:
        report = asyncio.run(B.bench_one(B.HTTPTarget(server.url), items, rate=math.inf,
                                         duration=args.duration, concurrency=args.clients,
                                         warmup=1, request_timeout=args.request_timeout))
        time.sleep(0.5)
        text = server.get("/metrics").text
        stats = server.get("/stats").json()
    finally:
        code = server.terminate()
    report.label = f"{args.clients} clients, {args.duration:g} s"
    return {"report": report, "exit_code": code,
            "kv_blocks_used_after": metric(text, "agp_kv_blocks_used"),
            "kv_blocks_cached_after": metric(text, "agp_kv_blocks_cached"),
            "requests_aborted": stats.get("requests_aborted"),
            "preemptions": stats.get("preemptions"),
            "mean_batch_size": stats.get("mean_batch_size")}


def phase_reuse(args) -> dict:
    items = B.load_workload(WORKLOADS / "shared_prefix.jsonl")
    reports = []
    for setting in ("prefix_reuse=true", "prefix_reuse=false"):
        target = B.EngineTarget.from_pipeline(f"{args.pipeline},{setting}")
        reports.append(asyncio.run(B.bench_one(target, items, rate=args.reuse_rate,
                                               num=args.reuse_num, concurrency=args.reuse_clients,
                                               warmup=1, request_timeout=args.request_timeout)))
        del target
    on, off = reports
    return {"reports": reports,
            "ttft_ratio_mean": off.ttft["mean"] / on.ttft["mean"] if on.ttft["mean"] else None,
            "ttft_ratio_p50": off.ttft["p50"] / on.ttft["p50"] if on.ttft["p50"] else None}


def phase_saturation(args) -> dict:
    lines = (WORKLOADS / "short_chat.jsonl").read_text().splitlines()[:args.sat_num]
    items = [parse_line(line, i + 1) for i, line in enumerate(lines)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
        for i in range(2):                   # before and after the server: contention drifts
            if i == 1:
                server = Server(args.pipeline)
                try:
                    serve = asyncio.run(B.bench_one(B.HTTPTarget(server.url), items,
                                                    rate=math.inf, num=len(items), warmup=1,
                                                    request_timeout=args.request_timeout))
                finally:
                    server.terminate()
                serve.label = "agp serve (HTTP)"
                local = asyncio.run(B.bench_one(B.EngineTarget.from_pipeline(args.pipeline),
                                                items, rate=math.inf, num=len(items), warmup=1,
                                                request_timeout=args.request_timeout))
                local.label = "agp bench (in process)"
            stats = Path(tmp) / f"run{i}.json"
            subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "run", args.pipeline,
                            "--input", str(prompts), "--output", os.devnull, "--stats", str(stats),
                            "--no-progress"], cwd=ROOT, check=True, timeout=1800,
                           stderr=subprocess.DEVNULL)
            runs.append(json.loads(stats.read_text()))
    run_tps = [r["output_tokens_per_s"] for r in runs]
    mean_run = sum(run_tps) / len(run_tps)
    return {"run": runs, "run_tps": run_tps, "run_tps_mean": mean_run,
            "serve": serve, "local": local,
            "serve_vs_run": serve.output_throughput / mean_run if mean_run else None}


# ---------------------------------------------------------------- the page

def plots(load: dict, reuse: dict, sat: dict, img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    img.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    r = load["report"]
    for samples, name in ((r.ttft_samples, "TTFT"), (r.e2e_samples, "end to end")):
        xs = np.sort(np.asarray(samples)) * 1000
        if xs.size:
            axes[0].plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
    axes[0].set(xscale="log", xlabel="ms (log)", ylabel="fraction of requests",
                title=f"agp serve, {r.label}")
    for rep in reuse["reports"]:
        xs = np.sort(np.asarray(rep.ttft_samples)) * 1000
        if xs.size:
            axes[1].plot(xs, np.arange(1, xs.size + 1) / xs.size, label=rep.label)
    axes[1].set(xscale="log", xlabel="TTFT, ms (log)", ylabel="fraction of requests",
                title="shared system prompt: TTFT CDF")
    names = ["agp run", "agp serve (HTTP)", "agp bench (in process)"]
    values = [sat["run_tps_mean"], sat["serve"].output_throughput, sat["local"].output_throughput]
    axes[2].bar(names, values, color=["#777", "#1f77b4", "#2ca02c"])
    axes[2].set(ylabel="output tokens/s", title=f"saturation, {len(sat['serve'].ttft_samples)} "
                "prompts at once")
    axes[2].tick_params(axis="x", labelsize=8)
    for ax in axes[:2]:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no crowded labels
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = img / "serve_load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    B.plot(reuse["reports"], img / "prefix_reuse.png")
    return [path.name, "prefix_reuse.png"]


def x(v) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def page(args, load, reuse, sat, images, started, load_before, load_after, wall) -> str:
    import torch

    r = load["report"]
    on, off = reuse["reports"]
    ok = lambda b: "**met**" if b else "**not met**"   # noqa: E731
    sat_ratio = sat["serve_vs_run"]
    lines = [
        "# Benchmarks: `agp serve` under load",
        "",
        "Generated by `make bench-serve` (`python bench/serve_load.py`); do not edit by hand.",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {wall / 60:.1f} min, pipeline `{args.pipeline}`, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"load average (1/5/15 min) {load_before} before and {load_after} after.",
        "A load average above the core count means other work shared the CPUs: absolute",
        "numbers are then low, and each comparison below runs its sides back to back.",
        "",
        "## Targets",
        "",
        "| target | result | |",
        "|---|---|---|",
        f"| {args.clients} streaming clients for {args.duration:g} s: 0 errors, 0 truncated "
        f"streams, p99 TTFT reported | {r.completed} requests, {r.errors} errors, {r.truncated} "
        f"truncated, p99 TTFT {ms(r.ttft['p99'])} | {ok(r.errors == 0 and r.truncated == 0)} |",
        f"| shared system prompt: TTFT with prefix reuse >= 5x lower than without | mean "
        f"{ms(on.ttft['mean'])} vs {ms(off.ttft['mean'])} ({x(reuse['ttft_ratio_mean'])}), "
        f"p50 {x(reuse['ttft_ratio_p50'])} | {ok((reuse['ttft_ratio_mean'] or 0) >= 5)} |",
        f"| saturation throughput within 10 % of `agp run` | serve {sat['serve'].output_throughput:.1f}"
        f" vs run {sat['run_tps_mean']:.1f} output tok/s ({sat_ratio:.0%}) | "
        f"{ok(sat_ratio >= 0.9)} |",
        f"| SIGTERM after the load drains and exits 0 | exit status {load['exit_code']} | "
        f"{ok(load['exit_code'] == 0)} |",
        f"| no KV blocks held after the load | {load['kv_blocks_used_after']:.0f} used, "
        f"{load['kv_blocks_cached_after'] or 0:.0f} cached for reuse | "
        f"{ok(load['kv_blocks_used_after'] == 0)} |",
        "",
        "The disconnect target (100 clients hanging up mid-stream leave no KV block in use) is",
        "`tests/test_serve.py::test_hundred_clients_disconnecting_mid_stream_leak_no_kv_blocks`.",
        "",
        "`agp bench`'s exit status: 0 when every measurement (a target at a rate) had at least one",
        'request succeed; failed requests under load are part of the result (its `errors` row and',
        '`error_samples`), as `vllm bench serve` counts them. 1 when a measurement had no',
        'request succeed (a server that refuses everything, a wrong `--model`): every measurement is',
        'still printed and written, then one line each, `agp bench: error: URL at rate R: none of its',
        'N requests succeeded; the first error: HTTP 503: …`. A target that cannot be measured at all (a',
        'server that is down, a pipeline that fails its check) is named on standard error and skipped: the',
        'others are still measured, printed and written, and the exit status is 1 (2 for the pipeline).',
        '130 on Ctrl-C: the measurement it cuts is reported (printed, `--json`, `--save-result`) with the',
        'requests that had ended, those in flight left out, its report\'s `interrupted` true (`--json`, and',
        '`--save-result`\'s `agp`: its `num_prompts` stays the number asked), and the line `agp bench:',
        'interrupted while measuring …` says so; nothing after it is measured. SIGTERM (`timeout`, a CI',
        'job cancelled) and SIGHUP (unless ignored, as under `nohup`) stop it alike, with 143 and 129.',
        '2 for bad options (a `--url` without an',
        'http(s) scheme and a host is refused while parsing, before any pipeline is measured).',
        "",
        f"## 1. {args.clients} streaming clients against `agp serve`",
        "",
        f"Closed loop: {args.clients} clients each send a request from "
        "`bench/workloads/short_chat.jsonl`, read its stream to `data: [DONE]` and send the next, "
        f"for {args.duration:g} s; requests in flight then finish. Engine: mean batch size "
        f"{load['mean_batch_size'] or 0:.1f}, {load['preemptions']} preemptions.",
        "",
        "    agp serve PIPELINE --port P &",
        f"    agp bench --url http://127.0.0.1:P --workload bench/workloads/short_chat.jsonl "
        f"--rate inf --concurrency {args.clients} --duration {args.duration:g}",
        "",
        B.format_markdown([r]),
        "",
        f"![load]({Path(args.img_dir).name}/{images[0]})",
        "",
        "## 2. Shared system prompt: prefix reuse on and off",
        "",
        f"`bench/workloads/shared_prefix.jsonl`: every request carries the same ~1,700-token "
        f"system prompt and a short question; {args.reuse_num} requests, "
        + (f"Poisson arrivals at {args.reuse_rate:g} req/s" if math.isfinite(args.reuse_rate)
           else "sent as fast as") + f" at most {args.reuse_clients} in flight allow"
        + (" (one at a time: TTFT is the prefill itself, no queueing)" if args.reuse_clients == 1
           else "") + ", in process (the engine driven as `agp serve` drives it), after one "
        "warm-up request.",
        "",
        f"    agp bench PIPELINE PIPELINE,prefix_reuse=false --workload "
        f"bench/workloads/shared_prefix.jsonl --rate {args.reuse_rate:g} --concurrency "
        f"{args.reuse_clients} --num {args.reuse_num} --compare",
        "",
        B.format_markdown(reuse["reports"]),
        "",
        f"![reuse]({Path(args.img_dir).name}/{images[1]})",
        "",
        "## 3. Saturation: `agp serve` against `agp run`",
        "",
        f"The first {args.sat_num} prompts of `bench/workloads/short_chat.jsonl`, all at once. "
        f"`agp run` twice (before and after the server runs: "
        f"{', '.join(f'{x:.1f}' for x in sat['run_tps'])} output tok/s), then "
        "`agp serve` over HTTP and the in-process engine through `agp bench`.",
        "",
        "    agp run PIPELINE --input prompts.jsonl --stats stats.json",
        "    agp bench --url http://127.0.0.1:P --workload prompts.jsonl --rate inf",
        "",
        "| | output tok/s | vs `agp run` |",
        "|---|---:|---:|",
        f"| `agp run` (mean of 2) | {sat['run_tps_mean']:.1f} | 100 % |",
        f"| `agp serve` (HTTP, streaming) | {sat['serve'].output_throughput:.1f} | {sat_ratio:.0%} |",
        f"| in process (`agp bench PIPELINE`) | {sat['local'].output_throughput:.1f} | "
        f"{sat['local'].output_throughput / sat['run_tps_mean']:.0%} |",
        "",
        B.format_markdown([sat["serve"], sat["local"]]),
        "",
    ]
    return "\n".join(lines)


# docs/benchmarks.md from this line on is written by other benchmarks and kept on a rewrite
KEPT = "<!-- kept by bench/serve_load.py -->"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="examples/chat.agp")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--reuse-rate", type=float, default=math.inf,
                   help="req/s of the prefix-reuse runs (default: inf, as --reuse-clients allow)")
    p.add_argument("--reuse-clients", type=int, default=1,
                   help="requests in flight in the prefix-reuse runs (default 1: TTFT without queueing)")
    p.add_argument("--reuse-num", type=int, default=10)
    p.add_argument("--sat-num", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--img-dir", default="docs/img")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    os.chdir(ROOT)

    started, t0, before = dt.datetime.now(dt.timezone.utc), time.monotonic(), loadavg()
    print(f"[1/3] {args.clients} clients for {args.duration:g} s against agp serve", file=sys.stderr)
    load = phase_load(args)
    print(B.format_table([load["report"]]), file=sys.stderr)
    print("[2/3] shared system prompt, prefix reuse on / off", file=sys.stderr)
    reuse = phase_reuse(args)
    print(B.format_table(reuse["reports"]), file=sys.stderr)
    print("[3/3] saturation: agp run / agp serve / in process", file=sys.stderr)
    sat = phase_saturation(args)
    print(f"agp run {sat['run_tps']} tok/s; serve {sat['serve'].output_throughput:.1f}; "
          f"in process {sat['local'].output_throughput:.1f}", file=sys.stderr)

    images = plots(load, reuse, sat, Path(args.img_dir))
    text = page(args, load, reuse, sat, images, started, before, loadavg(), time.monotonic() - t0)
    out = Path(args.out)
    before = out.read_text() if out.exists() else ""
    if KEPT in before:                                # sections other benchmarks wrote stay
        text = text.rstrip("\n") + "\n\n" + before[before.index(KEPT):]
    out.write_text(text)
    print(f"wrote {args.out} and {args.img_dir}/", file=sys.stderr)
    if not args.json:
        return 0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "load": {**{k: v for k, v in load.items() if k != "report"},
                 "report": load["report"].to_dict()},
        "reuse": {"reports": [r.to_dict() for r in reuse["reports"]],
                  "ttft_ratio_mean": reuse["ttft_ratio_mean"], "ttft_ratio_p50": reuse["ttft_ratio_p50"]},
        "saturation": {"run": sat["run"], "run_tps_mean": sat["run_tps_mean"],
                       "serve": sat["serve"].to_dict(), "local": sat["local"].to_dict(),
                       "serve_vs_run": sat["serve_vs_run"]},
    }, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
