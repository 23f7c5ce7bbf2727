"""`agp`: the command line.

    agp check FILE... [--json]                 diagnostics on stderr; exit 0 clean, 2 on errors
    agp fmt FILE... [--write | --check]        canonical layout; --check exits 1 if a file would change
    agp render FILE [-o out.svg|png|pdf|dot] [--pipeline NAME] [--plan]
    agp stages [KIND]                          the stage kinds; one documented
    agp run | plan | bench | serve ...         from pipeline_dsl.commands.<name>, imported on use

Exit status: 0 ok, 1 runtime failure (or fmt --check would change a file), 2 user
errors, 141 (128 + SIGPIPE) when the reader of its output (standard output or error) has gone,
as a tool the signal ends. No input produces a traceback unless `--debug` is given.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import importlib.util
import json
import os
import sys

from .cliargs import CLOSED_PIPE
from .diagnostics import CheckFailed

# commands living in pipeline_dsl/commands/<name>.py (HELP, add_arguments(parser), main(args) -> int);
# the help text here lets `agp --help` list them without importing them (they may import torch)
LAZY_COMMANDS = {
    "run": "run a pipeline over a JSONL file of requests on a real model",
    "plan": "show how a pipeline's stages are laid onto streams",
    "bench": "measure a pipeline under load (throughput, TTFT, TPOT, latency)",
    "serve": "serve a pipeline behind an OpenAI-compatible HTTP API",
}

MODEL_COMMANDS = ("run", "bench", "serve")       # those that load torch and run a model

OK, FAILED, USER_ERROR = 0, 1, 2


class UserError(Exception):
    """Bad input from the user: printed as `agp: error: …`, exit 2."""


def _lazy_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"pipeline_dsl.commands.{name}") is not None
    except (ImportError, ValueError):
        return False


def _err(msg: str) -> None:
    print(f"agp: error: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- check

def cmd_check(args) -> int:
    from . import load, loads, read_pipeline_source
    from .diagnostics import CheckFailed, has_errors, render_all

    all_diags, failed = [], False
    for path in args.files:
        try:
            path, text = read_pipeline_source(path)          # FILE '-': stdin, named <stdin>
        except CheckFailed as exc:
            all_diags += exc.diagnostics
            failed = True
            if not args.json:
                sys.stderr.write(exc.render())
            continue
        program, diags = load(path, args.allow_path) if text is None else loads(text, path, args.allow_path)
        all_diags += diags
        failed |= has_errors(diags)
        if not args.json:
            if diags:
                sys.stderr.write(render_all(diags, program.sources))
            if not has_errors(diags):
                n = len(program.pipelines)
                print(f"{path}: ok ({n} pipeline{'' if n == 1 else 's'})")
    if args.json:
        out = {"ok": not failed, "diagnostics": [d.to_json() for d in all_diags]}
        print(json.dumps(out, indent=2))
    return USER_ERROR if failed else OK


# ---------------------------------------------------------------- fmt

def cmd_fmt(args) -> int:
    from .diagnostics import render_all
    from .fmt import format_text
    from .loader import STDIN, STDIN_NAME, read_source, read_stdin
    from .parser import newlines

    if args.write and STDIN in args.files:
        raise UserError("fmt --write rewrites files in place; '-' (stdin) has no file to rewrite: "
                        "leave out --write to print the formatted text")
    status = OK
    for path in args.files:
        if path == STDIN:
            path = STDIN_NAME
            text, diags = read_stdin()
        else:
            text, diags = read_source(path)
        if text is None:
            sys.stderr.write(render_all(diags, {}))
            status = USER_ERROR
            continue
        text = newlines(text)
        out, diags = format_text(text, path)
        if out is None:
            sys.stderr.write(render_all(diags, {path: text}))
            status = USER_ERROR
            continue
        if args.check:
            if out != text:
                print(f"{path}: would reformat")
                status = max(status, FAILED)
        elif args.write:
            if out != text:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(out)
                print(f"{path}: reformatted")
        else:
            sys.stdout.write(out)
    return status


# ---------------------------------------------------------------- render

def cmd_render(args) -> int:
    from .diagnostics import CheckFailed
    from .render import DotMissing, output_format, render_file
    from . import load_pipeline_graph, read_pipeline_source

    # by default beside FILE, its extension .svg (`agp render examples/chat.agp`: examples/chat.svg)
    out = args.output or os.path.splitext(args.file)[0] + ".svg"
    if output_format(out) is None:
        raise UserError(f"cannot write '{out}': the output must end in .svg, .png, .pdf or .dot")
    try:
        path, text = read_pipeline_source(args.file)          # FILE '-': stdin
        graph = load_pipeline_graph(path, args.pipeline, args.allow_path, text=text)
    except CheckFailed as exc:
        sys.stderr.write(exc.render())
        return USER_ERROR
    if text is not None and not args.output:      # stdin has no file name: the pipeline's name, here
        out = f"{graph.graph['name']}.svg"
    elif text is None and os.path.exists(out) and os.path.samefile(out, args.file):
        raise UserError(f"cannot write '{out}': it is the pipeline file {args.file} itself; give another "
                        "output with -o")
    plan = None
    if args.plan:
        from .plan import PlanError, make_plan

        try:
            plan = make_plan(graph)
        except PlanError as exc:
            raise UserError(f"{args.file}: cannot plan: {exc}") from exc
    try:
        render_file(graph, out, plan)
    except DotMissing as exc:
        _err(str(exc))
        return FAILED
    except OSError as exc:
        _err(f"cannot write '{out}': {exc.strerror or exc}")
        return FAILED
    print(f"wrote {out}")
    return OK


# ---------------------------------------------------------------- stages

def cmd_stages(args) -> int:
    from stages.registry import default_registry

    reg = default_registry()
    if args.kind is None:
        print(list_kinds(reg))
    else:
        kind = reg.get(args.kind)
        if kind is None:
            from .diagnostics import did_you_mean
            hint = did_you_mean(args.kind, reg.names())
            raise UserError(f"unknown stage kind '{args.kind}'" + (f"; {hint}" if hint else "")
                            + f" (kinds: {', '.join(reg.names())})")
        print(describe_kind(kind))
    for problem in reg.problems:
        print(f"agp: warning: {problem}", file=sys.stderr)
    return OK


def list_kinds(reg) -> str:
    rows = [(k.name, k.resource, _ports(k.inputs) + " -> " + _ports(k.outputs), k.doc.split(". ")[0].split(": ")[0])
            for k in reg.kinds()]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines + ["", "agp stages KIND documents one kind."])


def _ports(ports) -> str:
    return ", ".join(p.type for p in ports) or "-"


def describe_kind(kind) -> str:
    from . import modes, units
    from stages.registry import FROM_MODE

    def show(p, v):
        if v is FROM_MODE:
            return "(mode)"
        if v is None:
            return "none"
        if p.required:
            return "(required)"
        if p.type == "duration":
            return units.format_duration(v)
        if p.type == "size":
            return units.format_size(int(v))
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, tuple):
            return "[" + ", ".join(map(repr, v)) + "]"
        return str(v)

    lines = [f"{kind.name}  ({kind.source})", "", kind.doc, "",
             f"resource:   {kind.resource}",
             f"input:      {', '.join(f'{p.name}: {p.type}' for p in kind.inputs) or '- (a request source)'}",
             f"output:     {', '.join(f'{p.name}: {p.type}' for p in kind.outputs) or '- (ends the pipeline)'}"]
    if kind.conditions:
        lines.append(f"conditions: {' | '.join(kind.conditions)}  (edges: a -> b when {kind.conditions[0]})")
    if kind.impl:
        lines.append(f"impl:       {kind.impl}")
    lines += ["", "parameters:"]
    rows = []
    for p in kind.params:
        rng = ""
        if p.min is not None or p.max is not None:
            lo = show(p, p.min) if p.min is not None else ""
            hi = show(p, p.max) if p.max is not None else ""
            rng = f"{'(' if p.min_exclusive else '['}{lo}..{hi}]"     # (0.0..1.0]: 0 itself is refused
        rows.append((p.name, p.type_text(), show(p, p.default), rng, p.doc))
    w = [max([len(r[i]) for r in rows] + [1]) for i in range(4)]
    lines += [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d:<{w[3]}}  {e}".rstrip() for a, b, c, d, e in rows]
    preset = [(m, p, modes.PRESETS[m][(kind.name, p)]) for m in modes.MODES
              for (k, p) in modes.PRESETS[m] if k == kind.name]
    if preset:
        lines += ["", "mode presets (a stage's own setting wins):"]
        for p in sorted({p for _, p, _ in preset}):
            schema = kind.param(p)
            vals = "  ".join(f"{m}={show(schema, v)}" for m, q, v in preset if q == p)
            lines.append(f"  {p}: {vals}")
    def example(p) -> str:  # a value the file can hold: a placeholder of the right type when required
        if p.required:
            return {"str": '"…"', "int": "1", "float": "1.0", "bool": "true", "duration": "1ms",
                    "size": "1MiB", "list_str": "[]"}.get(p.type, p.choices[0] if p.choices else '"…"')
        return show(p, p.default)

    params = "  ".join(f"{p.name} = {example(p)}" for p in kind.params[:2]
                       if p.default is not FROM_MODE and p.default is not None)
    lines += ["", "example:", f"  stage {kind.name.split('_')[0]} : {kind.name} {{ {params} }}" if params
              else f"  stage {kind.name.split('_')[0]} : {kind.name} {{}}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- parser

def _command_name(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .cliargs import output_file_or_folders
    from .commands import add_allow_path

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="agp", description="agp: a pipeline language and runtime for LLM inference.",
        epilog="exit status: 0 ok, 1 runtime failure, 2 user error")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--version", action="version", version=f"agp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices                   # name -> its parser (usage of its own errors)

    p = sub.add_parser("check", help="check .agp files and report every error")
    p.add_argument("files", nargs="+", metavar="FILE", help="an .agp file; - reads standard input")
    p.add_argument("--json", action="store_true", help="diagnostics as JSON on stdout")
    add_allow_path(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("fmt", help="print .agp files in canonical layout (comments kept)")
    p.add_argument("files", nargs="+", metavar="FILE", help="an .agp file; - reads standard input")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", "-w", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 when a file would change")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("render", aliases=["draw"], help="draw a pipeline with graphviz")
    p.add_argument("file", metavar="FILE", help="the .agp file; - reads standard input")
    p.add_argument("-o", "--output", type=output_file_or_folders,
                   help="out.svg | out.png | out.pdf | out.dot (default: beside FILE, its extension .svg: "
                        "dir/p.agp draws dir/p.svg; for - the pipeline's name .svg, in the current folder)")
    p.add_argument("--pipeline", help="which pipeline of the file (default: its first)")
    p.add_argument("--plan", action="store_true", help="colour stages by plan stream, draw events dashed")
    add_allow_path(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("stages", help="list the stage kinds, or document one")
    p.add_argument("kind", nargs="?", metavar="KIND")
    p.set_defaults(func=cmd_stages)

    wanted = _command_name(argv)
    for name, help_text in LAZY_COMMANDS.items():
        available = _lazy_available(name)
        text = help_text if available else f"{help_text} (not available in this installation)"
        if name == wanted and available:
            mod = importlib.import_module(f"pipeline_dsl.commands.{name}")
            p = sub.add_parser(name, help=getattr(mod, "HELP", text), description=getattr(mod, "HELP", text))
            mod.add_arguments(p)
            p.set_defaults(func=mod.main)
        else:
            p = sub.add_parser(name, help=text)
            p.set_defaults(func=_missing_command(name))
    for p in set(sub.choices.values()):             # `agp serve --version` too (vllm serve --version)
        p.add_argument("--version", action="version", version=f"agp {_version()}", help=argparse.SUPPRESS)
        # a flag is written whole: argparse's abbreviations read another server's --keep (llama.cpp's)
        # as --keep-alive-timeout, and an abbreviation that works today breaks when a flag is added
        p.allow_abbrev = False
    parser.allow_abbrev = False
    return parser


def _version() -> str:
    from pipeline_dsl import __version__

    return __version__


def _missing_command(name: str):
    def run(args) -> int:
        _err(f"'agp {name}' is not available in this installation (pipeline_dsl/commands/{name}.py is missing)")
        return FAILED
    return run


# the engine's user-input errors (named, so that this module needs no torch import)
_INPUT_ERRORS = {"InputError", "ModelNotFoundError", "ModelFileError", "QueueFullError"}


# vLLM's flags that agp has no flag of that name for: where its setting is instead
_NO_DOWNLOAD = "agp downloads nothing: serve a local .gguf file or Hugging Face folder (agp serve MODEL)"
_NO_PROMPT_LOG = "agp never logs a request's prompt or parameters, only its access line"
_CHUNKED = "prefill is always chunked (generate's `prefill_chunk` tokens a step)"
_LORA = ("agp's is --lora-modules NAME=PATH, a PEFT adapter folder (adapter_config.json, "
         "adapter_model.safetensors) that requests name as their model")
_LORA_SIZED = ("agp sizes each LoRA adapter from its files (its rank, the modules it targets) and holds every one "
               "given (--lora-modules, a generate stage's `lora`) on the device in float32, its deltas computed in "
               "float32 whatever the model's dtype, so there is nothing to set")
VLLM_FLAGS = {
    "--model": "the model is the pipeline's `model` setting (or a generate stage's)",
    "--gpu-memory-utilization": "the KV cache's size is the pipeline's `kv_budget` (or a kv_lookup stage's `budget`)",
    "--tensor-parallel-size": "an engine runs on one device; more of them: agp serve --ray --replicas N (docs/scale.md)",
    "--pipeline-parallel-size": "an engine runs on one device; more of them: agp serve --ray --replicas N (docs/scale.md)",
    "--data-parallel-size": "replicas are agp serve --ray --replicas N (docs/scale.md)",
    "--enable-prefix-caching": "prefix caching is on by default (kv_lookup's reuse = prefix)",
    "--no-enable-prefix-caching": "agp's name is --no-prefix-reuse",
    "--max-num-batched-tokens": "a step's tokens are dynamic_batch's `max_tokens_per_step`",
    "--long-prefill-token-threshold": "long prompts leave room for short ones by dynamic_batch's `long_prefill_threshold`",
    "--block-size": "the KV block size is kv_lookup's `block_size`",
    "--enforce-eager": "only the performance mode compiles; generate's `compile = false` turns it off",
    "--trust-remote-code": "agp runs no code of a model folder, so there is nothing to trust",
    "--kv-cache-dtype": "the KV cache has the engine's compute dtype (--dtype)",
    "--quantization": "agp reads a model's quantization from its files, as vLLM does without the flag: a Hugging "
                      "Face folder's config.json quantization_config (AWQ, GPTQ, compressed-tensors' "
                      "pack-quantized) or a .gguf file's types; --dtype int8 quantizes an unquantized model to "
                      "weight-only int8",
    "--tokenizer": "the tokenizer is the model's own (its .gguf file or folder)",
    "--enable-auto-tool-choice": "tool calls are parsed whenever a request gives `tools` (tool_choice `auto`, "
                                 "their default), with nothing to turn on",
    "--disable-log-requests": _NO_PROMPT_LOG + " (--no-access-log turns those off)",
    "--enable-log-requests": _NO_PROMPT_LOG + " (--access-log, the default)",
    "--max-log-len": _NO_PROMPT_LOG,
    "--disable-log-stats": "the periodic stats line is --stats-interval 0",
    "--uvicorn-log-level": "one --log-level sets agp's and uvicorn's",
    "--disable-uvicorn-access-log": "agp's name is --no-access-log",
    "--response-role": "a chat answer's role is always `assistant`",
    "--max-logprobs": "logprobs, top_logprobs and prompt_logprobs take at most 20 alternatives (vLLM's "
                      "default), whatever the server",
    "--enable-chunked-prefill": _CHUNKED,
    "--no-enable-chunked-prefill": _CHUNKED,
    "--enable-prompt-tokens-details": "usage always carries prompt_tokens_details.cached_tokens",
    "--enable-force-include-usage": "a stream ends with its usage where the request asks "
                                    "(stream_options.include_usage)",
    "--swap-space": "a sequence preempted for KV blocks is recomputed, never swapped to CPU memory",
    "--download-dir": _NO_DOWNLOAD,
    "--revision": _NO_DOWNLOAD,
    "--hf-token": _NO_DOWNLOAD,
    "--load-format": "agp loads .gguf files and Hugging Face folders (safetensors), each by its kind",
    "--guided-decoding-backend": "one backend, llguidance, serves every structured output",
    "--enable-prompt-embeds": "a prompt comes as text or token ids; `prompt_embeds` is refused",
    "--trust-request-chat-template": "a request brings no chat template of its own: --chat-template sets the "
                                     "server's",
    "--enable-tokenizer-info-endpoint": "GET /tokenizer_info is always served (vLLM's only with this flag), as "
                                        "/tokenize and /detokenize are",
    # what vLLM's --enable-lora comes with: the sizes of its LoRA slots
    **dict.fromkeys(("--max-lora-rank", "--max-loras", "--max-cpu-loras", "--lora-dtype", "--fully-sharded-loras",
                     "--lora-extra-vocab-size"), _LORA_SIZED),
}


# llama.cpp's llama-server flags (and their short forms) that agp has no flag of that name for
_CTX = ("agp's is --max-model-len N, each sequence's context (llama.cpp splits -c among its --parallel slots; "
        "agp's sequences share one KV pool, sized by the pipeline's `kv_budget`)")
_N_PREDICT = ("a request's `max_tokens` sets it; the server's default is the generate stage's `max_new_tokens` "
              "(--override-generation-config '{\"max_new_tokens\": N}')")
_PARALLEL = "agp's is --max-num-seqs N (sequences batched at once)"
_MODEL_FILE = "give the model as FILE: agp serve model.gguf (a .gguf file or a Hugging Face folder)"
_GPU = "agp runs the whole model on the pipeline's `device` (auto: a GPU when torch sees one)"
_SAMPLING = ("a request's sampling fields set it; the server's defaults are --override-generation-config "
             "'{\"temperature\": 0.7, \"top_p\": 0.9, ...}'")
_ALWAYS_JINJA = "agp always applies the model's Jinja chat template (or --chat-template's): leave it out"
_ALIAS = "agp's is --served-model-name NAME"
_BATCH = "a step's tokens are dynamic_batch's `max_tokens_per_step`"
_ALWAYS_ON = "always on in agp: leave it out"
LLAMA_CPP_FLAGS = {
    "-m": _MODEL_FILE, "-mu": _NO_DOWNLOAD, "--model-url": _NO_DOWNLOAD,
    # the Hugging Face downloads: the model, its file, token, draft model, vocoder
    **dict.fromkeys(("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hft", "--hf-token", "-hfd", "-hfrd",
                     "--hf-repo-draft", "-hfv", "-hfrv", "--hf-repo-v", "-hffv", "--hf-file-v"), _NO_DOWNLOAD),
    "-c": _CTX, "--ctx-size": _CTX,
    "-n": _N_PREDICT, "--n-predict": _N_PREDICT, "--predict": _N_PREDICT,
    "-np": _PARALLEL, "--parallel": _PARALLEL,
    "-t": "agp's is --threads N", "-s": "agp's is --seed N",
    "-a": _ALIAS, "--alias": _ALIAS,
    "-ngl": _GPU, "--n-gpu-layers": _GPU, "--gpu-layers": _GPU,
    "-fa": "attention is chosen by the engine (FlexAttention on a GPU in performance mode: docs/gpu.md)",
    "--flash-attn": "attention is chosen by the engine (FlexAttention on a GPU in performance mode: docs/gpu.md)",
    "--jinja": _ALWAYS_JINJA, "--no-jinja": _ALWAYS_JINJA,
    "-cb": "continuous batching is " + _ALWAYS_ON, "--cont-batching": "continuous batching is " + _ALWAYS_ON,
    "--metrics": "GET /metrics is " + _ALWAYS_ON, "--slots": "agp has no /slots: GET /stats counts each engine's "
                                                             "sequences and KV blocks",
    "--embedding": "POST /v1/embeddings is " + _ALWAYS_ON, "--embeddings": "POST /v1/embeddings is " + _ALWAYS_ON,
    "-b": _BATCH, "--batch-size": _BATCH, "-ub": _BATCH, "--ubatch-size": _BATCH,
    "--cache-reuse": "prefix caching is on by default (kv_lookup's reuse = prefix; off: --no-prefix-reuse)",
    "--keep": "agp never shifts the context: a prompt and its max_tokens must fit --max-model-len",
    "--context-shift": "agp never shifts the context: a prompt and its max_tokens must fit --max-model-len",
    "-to": "agp's time limits are --header-timeout, --body-timeout, --send-timeout and --keep-alive-timeout",
    "--timeout": "agp's time limits are --header-timeout, --body-timeout, --send-timeout and --keep-alive-timeout",
    "--temp": _SAMPLING, "--top-k": _SAMPLING, "--top-p": _SAMPLING, "--min-p": _SAMPLING,
    "--repeat-penalty": _SAMPLING,
    "--mlock": "agp holds the weights in torch tensors; nothing to lock", "--no-mmap": "agp reads the weights once",
    "--no-webui": "agp serves no web page", "--api-key-file": "agp's is --api-key KEY (or AGP_API_KEY)",
    "--ssl-key-file": "agp's is --ssl-keyfile", "--ssl-cert-file": "agp's is --ssl-certfile",
    "--chat-template-file": "agp's is --chat-template FILE",
    "--grammar": "a request's `guided_grammar` takes GBNF text (docs/openai.md)",
    "--grammar-file": "a request's `guided_grammar` takes GBNF text (docs/openai.md)",
    "--lora": _LORA,
    "--log-disable": "agp's is --log-level error", "--log-file": "agp logs to standard error: redirect it",
    "-v": "agp's is --log-level debug", "--verbose": "agp's is --log-level debug",
}
VLLM_WORDS = {flag: ("vLLM's", text) for flag, text in VLLM_FLAGS.items()}

# vllm bench serve's flags that agp bench has no flag of that name for: whether each takes a value
# (so that its value is named with it, not read as a PIPELINE) and agp bench's way to say it
_WORKLOAD = ("agp bench's datasets are --dataset-name jsonl (--workload FILE: agp run's lines or OpenAI "
             "batch-API lines), random and sharegpt (--dataset-path FILE); docs/benchmarks.md turns other files "
             "into a JSONL workload")
_SYNTHETIC = ("agp bench's synthetic dataset is --dataset-name random (--random-input-len, --random-output-len, "
              "--random-range-ratio, --random-prefix-len); other shapes are a --workload FILE (a line's max_tokens "
              "with --ignore-eos fixes its output length)")
_RESULT = ("agp's --save-result writes a new file per measurement (--result-dir, --result-filename); --json FILE "
           "writes all of a run's reports in one")
_PERCENTILES = ("agp reports the mean and the percentiles (p50, p90 and p99, or --metric-percentiles') of all of "
                "TTFT, TPOT, ITL and E2E (vLLM's E2EL), in the table and in --json's reports")
_SAMPLING_BENCH = "a request's sampling fields are its workload line's (temperature, top_p, ... as agp run reads them)"
_ENDPOINT = ("agp bench --url takes the server's base URL and sends each workload line where it belongs: a "
             "`messages` line to /v1/chat/completions, a `prompt` line to /v1/completions, streamed")
VLLM_BENCH_FLAGS = {
    **dict.fromkeys(("--hf-subset", "--hf-split", "--hf-name", "--hf-output-len"), (True, _WORKLOAD)),
    "--custom-output-len": (True, "each workload line's max_tokens sets its output length"),
    "--custom-skip-chat-template": (False, "a `prompt` line is sent as it is (/v1/completions), a `messages` line "
                                           "through the chat template"),
    **dict.fromkeys(("--random-batch-size", "--input-len", "--output-len",
                     "--sonnet-input-len", "--sonnet-output-len", "--sonnet-prefix-len",
                     "--prefix-repetition-prefix-len", "--prefix-repetition-suffix-len",
                     "--prefix-repetition-num-prefixes", "--prefix-repetition-output-len"), (True, _SYNTHETIC)),
    "--append-result": (False, _RESULT),
    "--percentile-metrics": (True, _PERCENTILES),
    "--backend": (True, _ENDPOINT), "--endpoint": (True, _ENDPOINT),
    "--host": (True, "agp's is --url http://HOST:PORT"), "--port": (True, "agp's is --url http://HOST:PORT"),
    "--tokenizer-mode": (True, "agp bench's --tokenizer reads a model's or a Hugging Face folder's tokenizer here"),
    "--trust-remote-code": (False, "agp bench loads no tokenizer code: leave it out"),
    "--served-model-name": (True, "agp's is --model ID (default: the server's first model)"),
    **dict.fromkeys(("--temperature", "--top-p", "--top-k", "--min-p", "--frequency-penalty", "--presence-penalty",
                     "--repetition-penalty"), (True, _SAMPLING_BENCH)),
    "--extra-body": (True, "every field of a request is its workload line's: put them on the lines "
                           "(jq -c '. + {\"seed\": 42}' w.jsonl)"),
    "--label": (True, "a column is labelled with its pipeline or URL (and model)"),
    "--request-id-prefix": (True, "agp sends no request ids: the server makes them"),
    "--use-beam-search": (False, "agp serves no beam search"),
    **dict.fromkeys(("--ramp-up-strategy", "--ramp-up-start-rps", "--ramp-up-end-rps"),
                    (True, "agp's is a comma list of rates, each measured in turn: --rate 1,2,4,inf")),
    "--profile": (False, "agp bench starts no profiler on the server: profile its process there"),
    "--disable-shuffle": (False, "agp bench sends the workload's lines in order, never shuffled"),
    "--no-oversample": (False, "agp bench sends --num requests, cycling the workload's lines in order when it "
                               "holds fewer; without --num, one pass"),
}
VLLM_BENCH_WORDS = {flag: ("vllm bench serve's", text) for flag, (_, text) in VLLM_BENCH_FLAGS.items()}
# llama-server's flags are told apart under agp serve alone: their hints name serve's flags
SERVE_FOREIGN_FLAGS = {**{flag: ("llama.cpp's", text) for flag, text in LLAMA_CPP_FLAGS.items()}, **VLLM_WORDS}
# agp bench also takes a pipeline (and run/serve's options): vLLM serve's flags keep their hints there
BENCH_FOREIGN_FLAGS = {**VLLM_WORDS, **VLLM_BENCH_WORDS}


def foreign_flags(command: str | None) -> dict:
    """Other servers' flags the command explains: flag -> (whose, where agp sets it)."""
    return {"serve": SERVE_FOREIGN_FLAGS, "bench": BENCH_FOREIGN_FLAGS}.get(command, VLLM_WORDS)


def foreign_equivalents(extra: list[str], command: str | None = "serve") -> str:
    """For each of vLLM's (or, under agp serve, llama.cpp's) flags among unrecognized arguments,
    agp's way to say it."""
    table = foreign_flags(command)
    said: dict[tuple, list[str]] = {}       # flags of one hint are named together, the hint said once
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in table and flag not in said.get(table[flag], ()):
            said.setdefault(table[flag], []).append(flag)
    return "".join(f"; {flags[0]} is {whose}: {text}" if len(flags) == 1 else
                   f"; {', '.join(flags[:-1])} and {flags[-1]} are {whose}: {text}"
                   for (whose, text), flags in said.items())


def misread_flags(command: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Single-dash arguments argparse would read as one of the command's switches (an option that
    takes no value, as -h) followed by more letters: llama.cpp's -hf and -hfr as -h with 'f' or 'fr'
    ('ignored explicit argument'), or -h and another switch. Those are refused as unknown, each
    named, before they are misread; no agp option is written so. (Abbreviations of long options are
    off: agp's parsers set allow_abbrev=False, so llama.cpp's --keep is not --keep-alive-timeout.)"""
    switches = {f for a in command._actions if a.nargs == 0       # as serve/options.py reads them
                for f in a.option_strings if not f.startswith("--")}
    out = []
    for arg in argv:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") and len(flag) > 2 and flag[:2] in switches:
            out.append(flag)
    return out


def foreign_arguments(command: argparse.ArgumentParser, argv: list[str], table: dict) -> list[int]:
    """The positions in `argv` of another tool's flags the command has no option of that name for,
    each with its value (`table`: flag -> (takes a value: True, "*" for several, or False, ...)):
    `--dataset-name sharegpt` is refused as a whole, its value not read as a positional argument."""
    own = {f for a in command._actions for f in a.option_strings}
    out, i = [], 0
    while i < len(argv) and argv[i] != "--":
        flag, eq, _ = argv[i].partition("=")
        if flag in table and flag not in own:
            out.append(i)
            takes = table[flag][0]
            while takes and not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                out.append(i)
                if takes is True:
                    break
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:       # taken wherever it stands: an internal error says "run with --debug", after the command too
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    try:
        parser = build_parser(argv)
        named = _command_name(argv)               # (it skips options, --debug too)
        command = parser.commands.get(named or "")
        if command is not None:
            misread = misread_flags(command, argv[argv.index(named) + 1:])
            if misread:
                command.error(f"unrecognized arguments: {' '.join(misread)}{foreign_equivalents(misread, named)}")
            rest = argv[argv.index(named) + 1:]
            foreign = foreign_arguments(command, rest, VLLM_BENCH_FLAGS) if named == "bench" else []
            if foreign:                            # named with their values, beside any other unknown ones
                _, extra = command.parse_known_args([a for i, a in enumerate(rest) if i not in foreign])
                unknown = [rest[i] for i in foreign] + extra
                command.error(f"unrecognized arguments: {' '.join(unknown)}{foreign_equivalents(unknown, named)}")
        args, extra = parser.parse_known_args(argv)
        if extra:                                  # the command's usage, not the top level's
            name = getattr(args, "command", None)
            command = parser.commands.get(name or "")
            (command or parser).error(f"unrecognized arguments: {' '.join(extra)}{foreign_equivalents(extra, name)}")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return USER_ERROR
        if args.command in MODEL_COMMANDS:
            from pipeline_dsl.engine.cpus import passive_waits

            passive_waits()                        # before torch loads libgomp (engine/cpus.py)
        code = int(args.func(args) or 0)
        sys.stdout.flush()      # a full disk fails here, with a message, not at exit in silence
        return code
    except UserError as exc:
        if debug:
            raise
        _err(str(exc))
        return USER_ERROR
    except CheckFailed as exc:                     # a command that loads a pipeline (run, serve, …)
        if debug:
            raise
        sys.stderr.write(exc.render())
        return USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                        # `agp … 2>&1 | head -1`: the reader has gone
        _drop_stdout()
        return CLOSED_PIPE
    except SystemExit:
        raise
    except OSError as exc:                         # the system's reason (a full disk, a file gone), no traceback
        if debug:
            raise
        _drop_stdout()
        if exc.filename:
            _err(f"{exc.filename}: {exc.strerror or exc}")
        elif exc.errno in _WRITE_ERRNOS:         # a write to a file already open: standard output, mostly
            _err(f"cannot write the output: {exc.strerror}")
        else:
            _err(f"{exc.strerror or exc}")
        return FAILED
    except Exception as exc:                       # noqa: BLE001 - no traceback without --debug
        if debug:
            raise
        if type(exc).__name__ in _INPUT_ERRORS:    # the engine's: bad model path, KV budget, …
            _err(str(exc))
            return USER_ERROR
        _err(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return FAILED


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE}


def _drop_stdout() -> None:
    """If standard output cannot take what is buffered for it, point it at /dev/null, so that
    the interpreter's flush at exit does not fail again (silently, with another status)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def entry() -> int:
    """The `agp` process: main(), then every object alive frozen (gc.freeze) for the exit. The
    interpreter's last collections would walk and free the loaded model's ~300k objects one by
    one (seconds on a busy machine) just before the system frees the whole process; what main()
    opened it has closed, and atexit handlers still run. Callers of main() in a process that goes
    on (tests, agp bench's in-process targets) keep collecting as before."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
