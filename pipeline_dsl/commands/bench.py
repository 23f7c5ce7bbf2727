"""`agp bench PIPELINE... --workload FILE`: replay a workload and measure latency and throughput.

    agp bench examples/chat.agp --workload bench/workloads/short_chat.jsonl --rate 4 --num 100
    agp bench examples/chat.agp examples/chat.agp,prefix_reuse=false \\
        --workload bench/workloads/shared_prefix.jsonl --rate 1,2,inf --num 64 --compare --plot out/b.png
    agp bench --url http://127.0.0.1:8000 --workload bench/workloads/short_chat.jsonl --duration 30
    agp bench examples/chat.agp -w bench/workloads/short_chat.jsonl --rate 4 --baseline before.json
    agp bench examples/chat.agp --dataset-name random --random-input-len 1024 --random-output-len 128 \\
        --num-prompts 200 --save-result --result-dir out/ --result-filename r.json
    agp bench --url http://127.0.0.1:8000 --tokenizer smollm2-135m-instruct \\
        --dataset-name sharegpt --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json

A PIPELINE runs in this process (its engine driven as `agp serve` drives it); append
`,key=value` EngineConfig settings to measure a variant (an object's value is JSON:
`,override_generation_config={"temperature": 0.5}`). `--url` (repeatable) measures any
OpenAI-compatible server over streaming HTTP. Arrivals are Poisson at each `--rate`
(`inf`: all at once). Reports request and token throughput, TTFT, TPOT, inter-token and
end-to-end latency (mean, p50, p90, p99 or --metric-percentiles'), errors and the KV hit rate; `--baseline` sets an
earlier run's `--json` reports beside them. The requests are a JSONL workload, or vllm bench serve's
random and sharegpt datasets drawn with a tokenizer here (commands/datasets.py); `--save-result` writes
each measurement in vllm bench serve's keys (loadgen.vllm_result).

Exit status: 0 when every measurement had a request succeed (failed requests under load are
part of the result, its errors row); 1 when some target at some rate had none succeed (every
measurement is still reported, then one line each naming the first error); 2 for bad options;
130 on Ctrl-C, the measurement it cut reported with the requests that had ended (SIGTERM and
SIGHUP alike: 143, 129).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path

HELP = "measure pipelines or OpenAI-compatible servers under a replayed workload"
# --dataset-name's (commands/datasets.py draws random and sharegpt)
DATASETS = ("jsonl", "random", "sharegpt")


def add_arguments(p) -> None:
    from pipeline_dsl.cliargs import (add_dtype_argument, count, http_url, output_file, output_file_of, seconds,
                                      seconds_or_zero)
    from pipeline_dsl.commands import add_allow_path

    p.add_argument("pipelines", nargs="*", metavar="PIPELINE",
                   help="a .agp file, optionally followed by ,pipeline=NAME (which of its pipelines; "
                        "default: the first) and ,key=value engine settings")
    p.add_argument("--workload", "-w",
                   help="JSONL requests (agp run's format: agp's lines or OpenAI batch-API lines)")
    p.add_argument("--dataset-name", choices=DATASETS, default=None,
                   help="where the requests come from, as vllm bench serve's: jsonl (--workload's file, the default "
                        "with one), random (token ids drawn to --random-input-len and --random-output-len) or "
                        "sharegpt (--dataset-path's conversations); random and sharegpt count with a tokenizer")
    p.add_argument("--dataset-path", default=None, metavar="FILE",
                   help="sharegpt: the ShareGPT JSON file (ShareGPT_V3_unfiltered_cleaned_split.json); jsonl: the "
                        "workload, as --workload")
    p.add_argument("--random-input-len", type=count(1), default=None, metavar="N",
                   help="random: prompt tokens per request, the tokenizer's special tokens included (default: 1024)")
    p.add_argument("--random-output-len", type=count(1), default=None, metavar="N",
                   help="random: max_tokens of each request (default: 128)")
    p.add_argument("--random-range-ratio", type=range_ratio, default=None, metavar="R",
                   help="random: each length drawn uniformly from [N * (1 - R), N * (1 + R)], 0 <= R < 1 (default: 0)")
    p.add_argument("--random-prefix-len", type=count(0), default=None, metavar="N",
                   help="random: tokens drawn once that every prompt starts with, before its own (default: 0)")
    p.add_argument("--sharegpt-output-len", type=count(1), default=None, metavar="N",
                   help="sharegpt: every request's max_tokens (default: the tokens of the conversation's answer)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="random and sharegpt: the tokenizer that draws and counts the prompts: an embedded model's "
                        "name, a .gguf file or a Hugging Face folder (or its tokenizer.json) here; nothing is "
                        "downloaded (default: the first PIPELINE's model; needed with --url alone)")
    add_allow_path(p)
    p.add_argument("--rate", "--request-rate", default="inf",
                   help="requests/s of the Poisson arrivals, 'inf' = all at once; "
                        "a comma list (1,2,inf) measures each (default: inf)")
    p.add_argument("--burstiness", type=burstiness, default=1.0,
                   help="shape of the gamma-distributed gaps between arrivals, their mean 1/rate: "
                        "1 = Poisson, below 1 burstier, above 1 more even, inf evenly spaced (default: 1)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--num", "--num-prompts", "-n", type=count(1), default=None,
                        help="requests to send (default: one pass over the workload)")
    amount.add_argument("--duration", "-d", type=seconds, default=None,
                        help="send for this many seconds (workload cycled)")
    p.add_argument("--concurrency", "--max-concurrency", "-c", type=count(1), default=None,
                   help="at most this many requests in flight; with --rate inf and --duration, "
                        "a closed loop of this many clients")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every request runs to its max_tokens (sets each line's ignore_eos, as vllm bench serve's "
                        "--ignore-eos): output lengths that do not depend on the model")
    p.add_argument("--goodput", nargs="+", action="extend", metavar="METRIC:MS", type=slo_limit, default=None,
                   help="service-level objectives (ttft, tpot, e2el or e2e, in ms: --goodput ttft:500 tpot:50): "
                        "also report the completed requests/s that met all of them (repeatable: every flag's limits count, "
                        "one a metric)")
    p.add_argument("--metric-percentiles", type=percentile_list, default=None, metavar="P,P,...",
                   help="the latency percentiles to show besides the mean (--metric-percentiles 50,95,99; "
                        "default: 50,90,99, which --json's reports always hold)")
    p.add_argument("--url", "--base-url", action="append", default=[], type=http_url,
                   help="an OpenAI-compatible server to measure: its base URL, http://HOST:PORT (repeatable)")
    p.add_argument("--model", default=None, help="model id for --url (default: its first model)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="sent to --url as 'Authorization: Bearer KEY' (a server started with --api-key; "
                        "default: $OPENAI_API_KEY, as vllm bench serve reads it)")
    p.add_argument("--compare", action="store_true",
                   help="print all targets side by side and plot them (--plot, default agp-bench.png)")
    p.add_argument("--plot", type=output_file_of("png", "svg", "pdf"), default=None,
                   help="write throughput-vs-rate and latency CDFs here (.png, .svg or .pdf)")
    p.add_argument("--json", dest="json_out", type=output_file, default=None,
                   help="write the reports as JSON here (latencies in seconds; each report's 'units' names them)")
    p.add_argument("--save-result", action="store_true",
                   help="write each measurement as vllm bench serve --save-result writes it (its keys: latencies in "
                        "ms, agp's report under 'agp') to --result-dir/--result-filename")
    p.add_argument("--save-detailed", action="store_true",
                   help="--save-result with the per-request lists: input_lens, output_lens, ttfts, itls, "
                        "generated_texts, errors")
    p.add_argument("--result-dir", default=None, metavar="DIR",
                   help="the folder of --save-result's files, made if missing (default: the current one)")
    p.add_argument("--result-filename", default=None, metavar="NAME",
                   help="--save-result's file name, for one measurement (default: "
                        "LABEL-RATEqps[-concurrencyC]-MODEL-DATE.json, as vLLM names it)")
    p.add_argument("--metadata", nargs="+", action="extend", type=metadata_pair, default=None, metavar="KEY=VALUE",
                   help="pairs written into --save-result's files beside their own keys")
    p.add_argument("--baseline", action="append", default=[], metavar="JSON",
                   help="the reports an earlier run wrote with --json (or one --save-result wrote), shown beside "
                        "this run's as --compare shows them (repeatable; without a PIPELINE or --url, only they are shown)")
    add_dtype_argument(p, "the pipelines'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-overlap", action="store_true",
                   help="in-process: run the plan's streams serially (A/B against overlap; by default CUDA overlaps them, "
                        "CPU only with a core to spare beside the forward's threads)")
    p.add_argument("--seed", type=count(0, 2**64 - 1), default=0, help="seed of the arrival times and of the random and sharegpt datasets' draws (default: 0)")
    p.add_argument("--warmup", "--num-warmups", type=count(0), default=1,
                   help="requests sent before measuring (default: 1)")
    p.add_argument("--request-timeout", type=seconds, default=600.0,
                   help="seconds before one request counts as an error (default: 600)")
    p.add_argument("--ready-timeout", "--ready-check-timeout-sec", type=seconds_or_zero, default=600.0,
                   help="seconds to wait for a --url not listening yet or answering 503 while it loads its "
                        "model; 0: no ready "
                        "check (default: 600, as vllm bench serve's --ready-check-timeout-sec)")
    p.add_argument("--no-progress", "--disable-tqdm", action="store_true", help="no progress bar")


def range_ratio(text: str) -> float:
    """--random-range-ratio: a number from 0 up to (not including) 1."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, not {text}")
    return value


def metadata_pair(text: str) -> tuple[str, str]:
    """--metadata KEY=VALUE -> (KEY, VALUE), both stripped as vLLM strips them; a key that is one of the
    saved result's own is refused (it would be overwritten, or overwrite a measured value)."""
    import argparse

    from pipeline_dsl.commands.loadgen import VLLM_LATENCIES, VLLM_RESULT_KEYS

    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    if key in VLLM_RESULT_KEYS or any(key.endswith(f"_{name}_ms") for name in VLLM_LATENCIES):
        raise argparse.ArgumentTypeError(f"'{key}' is a key of the saved result itself: give the pair another name")
    return key, value.strip()


def burstiness(text: str) -> float:
    """A positive number or inf: the shape of the arrivals' gamma gaps."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (1 = Poisson), not {text}")
    return value


def percentile_list(text: str) -> list[float]:
    """`50,95,99.9` -> [50.0, 95.0, 99.9]: percentiles of --metric-percentiles, each from 0 to 100."""
    import argparse

    out = []
    for part in text.split(","):
        try:
            p = float(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part.strip()}' is not a number (give percentiles as 50,95,99)") from None
        if not 0 <= p <= 100:
            raise argparse.ArgumentTypeError(f"{part.strip()} is not a percentile from 0 to 100")
        out.append(p)
    return sorted(set(out))


def slo_limit(text: str) -> tuple[str, float]:
    """`ttft:500` -> ("ttft", 0.5): a metric of --goodput and its limit in ms, as seconds."""
    import argparse

    from pipeline_dsl.cliargs import positive_number
    from pipeline_dsl.commands.loadgen import SLO_METRICS

    name, colon, ms = text.partition(":")
    name = {"e2el": "e2e"}.get(name.strip().lower(), name.strip().lower())
    if not colon or name not in SLO_METRICS:
        raise argparse.ArgumentTypeError(f"'{text}' is not METRIC:MS with a metric of ttft, tpot, e2el")
    try:
        limit = positive_number(ms.strip(), "milliseconds")
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"'{text}': the limit {e}") from None
    return name, limit / 1000


def _err(message: str) -> int:
    print(f"agp bench: error: {message}", file=sys.stderr)
    return 2


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"--rate: '{part}' is not a number or 'inf'") from None
        if not rate > 0:
            raise ValueError(f"--rate: {part} must be positive")
        rates.append(rate)
    return rates


def main(args) -> int:
    """_main, SIGTERM and SIGHUP heard as Ctrl-C (agp run's three stops): `timeout 600 agp bench …`
    or a CI job's cancel killed it in silence, every measurement lost; exit 128 + the signal."""
    import signal

    from pipeline_dsl.stopping import heeded

    heard = []

    def as_ctrl_c(signum, frame):
        heard.append(signum)
        handler = signal.getsignal(signal.SIGINT)      # asyncio.run's while a load runs: it cancels it
        if callable(handler):
            return handler(signal.SIGINT, frame)
        raise KeyboardInterrupt

    old = {}
    try:
        for sig in heeded((signal.SIGTERM, signal.SIGHUP)):    # nohup's SIGHUP stays ignored
            old[sig] = signal.signal(sig, as_ctrl_c)
    except ValueError:                                 # not the main thread: signals are not ours
        pass
    try:
        code = _main(args)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 128 + heard[0] if code == 130 and heard else code


def _main(args) -> int:
    from pipeline_dsl.commands.loadgen import (DEFAULT_PERCENTILES, BenchError, EngineTarget, HTTPTarget, Interrupted, bench_one,
                                        failure, format_table, load_reports, load_workload, parse_target,
                                        rate_text)
    from pipeline_dsl.stopping import ticking
    from pipeline_dsl.diagnostics import CheckFailed
    from pipeline_dsl.engine.errors import InputError

    measured = bool(args.pipelines or args.url)
    if not measured and not args.baseline:
        return _err("give at least one PIPELINE or --url (or --baseline reports to show)")
    try:
        dataset = dataset_of(args)
    except ValueError as e:
        return _err(str(e))
    if measured and dataset is None:
        return _err("the following arguments are required: --workload/-w (a JSONL file of requests), or "
                    "--dataset-name random (drawn token ids) or sharegpt (--dataset-path FILE)")
    if args.threads is not None and args.threads < 1:
        return _err(f"--threads must be at least 1, not {args.threads}")
    limits: dict[str, list[float]] = {}
    for name, limit in args.goodput or ():  # every --goodput's (a second flag replaced the first's)
        limits.setdefault(name, []).append(limit)
    for name, given in limits.items():
        if len(given) > 1:                   # the last one was kept, in silence
            return _err(f"--goodput gives {'e2el (or e2e)' if name == 'e2e' else name} {len(given)} limits "
                        f"({', '.join(f'{x * 1000:g}' for x in given)} ms): give each metric one")
    pairs: dict[str, list[str]] = {}
    for key, value in args.metadata or ():   # every --metadata's pairs, as every --goodput's limits
        pairs.setdefault(key, []).append(value)
    for key, values in pairs.items():
        if len(set(values)) > 1:
            return _err(f"--metadata gives {key} {len(values)} values ({', '.join(map(repr, values))}): give it one")
    saving = bool(args.save_result or args.save_detailed or args.result_dir or args.result_filename
                  or args.metadata)
    tokenizer_id = args.tokenizer
    try:
        saved = [r for path in args.baseline for r in load_reports(path)]
        if args.metric_percentiles:          # shown for the saved reports too: '-' where a file holds none
            for r in saved:
                r.percentiles = sorted(set(args.metric_percentiles))
        rates = parse_rates(args.rate)
        if not measured:
            if saving:
                raise ValueError("--save-result writes measurements: give a PIPELINE or --url to measure")
            return _show(saved, args)
        if dataset == "jsonl":
            items = load_workload(args.workload or args.dataset_path)
        for spec in args.pipelines:
            parse_target(spec)               # bad paths / settings before any model loads
        result_dir = _result_dir(args, (len(args.pipelines) + len(args.url)) * len(rates)) if saving else None
        if dataset != "jsonl":               # drawn once, every target sent the same requests
            items, tokenizer_id = drawn_workload(args, dataset)
        if args.ignore_eos:
            for item in items:
                item.sampling["ignore_eos"] = True
    except (ValueError, BenchError) as e:
        return _err(str(e))
    except CheckFailed as e:                 # the pipeline whose model's tokenizer was looked for
        sys.stderr.write(e.render())
        return 2
    num = args.num if args.num is not None or args.duration is not None else len(items)
    if any(math.isinf(r) for r in rates) and args.duration is not None and not args.concurrency:
        return _err("--rate inf with --duration needs --concurrency (a closed loop of clients)")
    from pipeline_dsl.cliargs import MAX_COUNT
    if args.duration is not None and (many := [r for r in rates if not math.isinf(r) and r * args.duration > MAX_COUNT]):
        # its arrivals are drawn before the first is sent: 1e300 s drew them until memory ran out, in silence
        return _err(f"--duration {args.duration:g} at rate {rate_text(many[0])} is about {many[0] * args.duration:.3g} "
                    f"requests, and a measurement sends at most {MAX_COUNT:,}: give a shorter --duration")
    if args.duration is not None and args.num is None:
        from pipeline_dsl.commands.loadgen import arrival_times
        for rate in rates:                   # few arrivals: drawn here as the load draws them (its seed)
            if not math.isinf(rate) and rate * args.duration <= 1000 and not arrival_times(
                    None, rate, duration=args.duration, seed=args.seed, burstiness=args.burstiness):
                # it measured nothing: 'requests ok/sent 0/0', exit 0
                return _err(f"--duration {args.duration:g} at rate {rate_text(rate)} sends no request (its first "
                            f"arrival, drawn with --seed {args.seed}, comes later): give a longer --duration "
                            f"or a higher --rate")

    def targets():
        for spec in args.pipelines:
            yield lambda spec=spec: EngineTarget.from_pipeline(
                spec, overlap=False if args.no_overlap else None, allow_paths=args.allow_path, dtype=args.dtype,
                threads=args.threads)
        for url in args.url:
            yield lambda url=url: HTTPTarget(url, args.model, timeout=args.request_timeout,
                                                    api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                                                    ready_timeout=args.ready_timeout)

    reports, codes = [], []      # codes: the exit code of each target that could not be measured
    stopped = None               # Ctrl-C: why the measurements stopped there
    for make in targets():
        if stopped is not None:
            break
        for rate in rates:
            try:
                target = make()              # a fresh engine (cold KV cache) per measurement
            except KeyboardInterrupt:
                stopped = "while a pipeline loaded"
                break
            except CheckFailed as e:
                sys.stderr.write(e.render())
                codes.append(2)
                break
            except InputError as e:
                codes.append(_err(str(e)))
                break
            try:
                # the loop woken every 0.1 s: Ctrl-C is heard whichever thread the kernel hands it to
                report = asyncio.run(ticking(bench_one(
                    target, items, rate=rate, num=num, duration=args.duration,
                    concurrency=args.concurrency, seed=args.seed, progress=not args.no_progress,
                    warmup=args.warmup, request_timeout=args.request_timeout, burstiness=args.burstiness,
                    slo=dict(args.goodput or ()),
                    percentiles=args.metric_percentiles or DEFAULT_PERCENTILES, keep_records=saving)))
            except BenchError as e:          # this target cannot be measured: the others still are
                print(f"agp bench: error: {e}", file=sys.stderr)
                codes.append(1)
                break
            except Interrupted as e:
                report = e.report
                stopped = (f"while measuring {report.label} at rate {rate_text(rate)}: its report holds the "
                           f"{report.requests} requests that had ended in its first {report.duration_s:.1f} s")
            except KeyboardInterrupt:        # before the load began (its warm-up, a server's models)
                stopped = "before a measurement began"
                break
            del target
            reports.append(report)
            if not args.compare:
                print(format_table([report]), flush=True)
                print()
            if stopped is not None:
                break
    if not reports:
        if stopped is not None:
            print(f"agp bench: interrupted {stopped}", file=sys.stderr)
            return 130
        return max(codes)
    _dedupe_labels(reports)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    if saving:
        _save_results(reports, args, result_dir, items=items, tokenizer_id=tokenizer_id, num=num)
    _show(saved + reports, args, table=args.compare or bool(saved))
    if stopped is not None:
        print(f"agp bench: interrupted {stopped}", file=sys.stderr)
        return 130
    failed = [(r, why) for r in reports if (why := failure(r))]
    for r, why in failed:                    # the other targets' measurements are printed above
        print(f"agp bench: error: {r.label} at rate {rate_text(r.rate)}: {why}", file=sys.stderr)
    return max([*codes, 1 if failed else 0])


def dataset_of(args) -> str | None:
    """Which requests the options ask for (jsonl, random, sharegpt; None: none named); ValueError
    names options that do not go together."""
    name = args.dataset_name
    if name is None and (args.workload or args.dataset_path):
        name = "jsonl"
    randoms = [flag for flag, value in (("--random-input-len", args.random_input_len),
                                        ("--random-output-len", args.random_output_len),
                                        ("--random-range-ratio", args.random_range_ratio),
                                        ("--random-prefix-len", args.random_prefix_len)) if value is not None]
    if randoms and name != "random":
        said = " and ".join(randoms)
        raise ValueError(f"{said} {'shapes' if len(randoms) == 1 else 'shape'} the random dataset's requests: add "
                         f"--dataset-name random" + (f" (the requests are {name}'s here)" if name else ""))
    if args.sharegpt_output_len is not None and name != "sharegpt":
        raise ValueError("--sharegpt-output-len sets the sharegpt dataset's max_tokens: add --dataset-name sharegpt "
                         "--dataset-path FILE" + (f" (the requests are {name}'s here)" if name else ""))
    if name in ("random", "sharegpt") and args.workload:
        raise ValueError(f"--workload {args.workload} and --dataset-name {name} are two sources of requests: give one")
    if name == "random" and args.dataset_path:
        raise ValueError(f"--dataset-name random draws its requests and reads no file: leave out --dataset-path "
                         f"{args.dataset_path} (or name its kind: --dataset-name sharegpt or jsonl)")
    if name == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT JSON file, as "
                         "ShareGPT_V3_unfiltered_cleaned_split.json)")
    if name == "jsonl" and not (args.workload or args.dataset_path):
        raise ValueError("--dataset-name jsonl needs its file: --dataset-path FILE (or --workload FILE), a JSONL "
                         "file of requests in agp run's format")
    if name == "jsonl" and args.workload and args.dataset_path:
        raise ValueError(f"--workload {args.workload} and --dataset-path {args.dataset_path} both name the "
                         "workload: give one")
    return name


def drawn_workload(args, dataset: str):
    """(requests, the tokenizer's id) of --dataset-name random or sharegpt: drawn with --tokenizer's,
    or the first PIPELINE's model's tokenizer (read from its file, nothing loaded but the tokenizer)."""
    from pipeline_dsl.commands import datasets
    from pipeline_dsl.commands.loadgen import BenchError
    from pipeline_dsl.requests_io import RequestError, parse_line_object

    name = args.tokenizer
    if name is None and args.pipelines:
        name = datasets.pipeline_model(args.pipelines[0], args.allow_path)
        if name is None:
            raise ValueError(f"--dataset-name {dataset} counts tokens with a tokenizer, and the pipeline "
                             f"{args.pipelines[0]} has no model: give --tokenizer MODEL")
    if name is None:
        raise ValueError(f"--dataset-name {dataset} counts tokens with a tokenizer, and --url's model is not here: "
                         f"give --tokenizer MODEL (an embedded model's name, a .gguf file or a Hugging Face folder "
                         f"with the server's tokenizer on this machine; nothing is downloaded)")
    tokenizer, tokenizer_id = datasets.load_tokenizer(name)
    num = args.num if args.num is not None else datasets.NUM_PROMPTS
    if dataset == "random":
        lines = datasets.random_lines(
            tokenizer, num, seed=args.seed,
            input_len=datasets.RANDOM_INPUT_LEN if args.random_input_len is None else args.random_input_len,
            output_len=datasets.RANDOM_OUTPUT_LEN if args.random_output_len is None else args.random_output_len,
            range_ratio=args.random_range_ratio or 0.0, prefix_len=args.random_prefix_len or 0)
    else:
        lines = datasets.sharegpt_lines(args.dataset_path, tokenizer, num, output_len=args.sharegpt_output_len,
                                        seed=args.seed)
    try:
        return [parse_line_object(line, i) for i, line in enumerate(lines, 1)], tokenizer_id
    except RequestError as e:                # a drawn line agp cannot send (none known): said, not a traceback
        raise BenchError(f"--dataset-name {dataset}: {e}") from None


def _result_dir(args, measurements: int) -> Path:
    """The folder --save-result writes to, made now (a bad one is an error before the load)."""
    if args.result_filename is not None:
        if measurements > 1:
            raise ValueError(f"--result-filename {args.result_filename} names one file, and this run makes "
                             f"{measurements} measurements (targets x rates): leave it out for a file each, "
                             "named by its target, rate and model")
        if not args.result_filename or args.result_filename.endswith(("/", os.sep)):
            raise ValueError(f"--result-filename '{args.result_filename}' is not a file name")
    folder = Path(args.result_dir or ".")
    # the folder the file goes in: --result-dir, or under it, a folder --result-filename names (sub/r.json)
    inside = (folder / args.result_filename).parent if args.result_filename else folder
    flag = "--result-filename" if inside != folder else "--result-dir"
    for f in (folder, inside):
        if f.exists() and not f.is_dir():
            raise ValueError(f"{flag} {args.result_filename if flag == '--result-filename' else folder}: {f} is a "
                             "file, not a folder")
    try:
        inside.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}: cannot make the folder {inside}: {e.strerror or e}") from None
    if args.result_filename is not None and (folder / args.result_filename).is_dir():
        raise ValueError(f"--result-filename {args.result_filename}: {folder / args.result_filename} is a folder")
    if not os.access(inside, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write in {inside} (permission denied)")
    return folder


def _save_results(reports, args, folder: Path, *, items, tokenizer_id, num) -> None:
    """One file per measurement, as vllm bench serve --save-result writes it (loadgen.vllm_result)."""
    import re
    from datetime import datetime

    from pipeline_dsl.commands.loadgen import vllm_result

    chat = all(item.messages is not None for item in items)
    written: set[Path] = set()
    for r in reports:
        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        backend = "agp" if r.pipeline is not None else ("openai-chat" if chat else "openai")
        result = vllm_result(r, date=date, backend=backend, tokenizer_id=tokenizer_id or r.model,
                             num_prompts=num if num is not None else r.requests, metadata=dict(args.metadata or ()),
                             detailed=args.save_detailed)
        name = args.result_filename
        if name is None:
            concurrency = f"-concurrency{r.concurrency}" if r.concurrency else ""
            model = (r.model or "none").split("/")[-1]
            name = re.sub(r"[^\w.=+-]+", "_", f"{r.label}-{r.rate}qps{concurrency}-{model}-{date}").strip("_")
            stem, n = name, 1
            while folder / f"{name}.json" in written:
                n += 1
                name = f"{stem}-{n}"
            name += ".json"
        path = folder / name
        written.add(path)
        path.write_text(json.dumps(result, indent=2, allow_nan=False))
        print(f"result: {path}", file=sys.stderr)


def _show(reports, args, table: bool = True) -> int:
    """Reports side by side (a table when `table`) and plotted (--plot; --compare's default file)."""
    from pipeline_dsl.commands.loadgen import format_table, plot

    _dedupe_labels(reports)
    if table:
        print(format_table(reports))
    plot_path = args.plot or ("agp-bench.png" if args.compare else None)
    if plot_path:
        plot(reports, plot_path)
        print(f"plot: {plot_path}", file=sys.stderr)
    return 0


def _dedupe_labels(reports) -> None:
    seen: dict[tuple, int] = {}
    for r in reports:
        key = (r.label, r.rate)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            r.label = f"{r.label} #{seen[key]}"
