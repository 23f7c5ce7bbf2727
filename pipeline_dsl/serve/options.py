"""The flags of `agp serve` (each with its AGP_* variable) and the checks of their ranges.

Both front ends read them: the command (pipeline_dsl.commands.serve) and the Ray Serve
application (serve/ray.py, whose replicas and `app_builder` parse the same flags), so they
live here, below both.

    p = argparse.ArgumentParser(prog="agp serve"); add_arguments(p)
    args = p.parse_args([...]); check_args(args)      # SetupError names the flag at fault
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from pipeline_dsl.cliargs import (GENERATION_CONFIG_HELP, OVERRIDE_GENERATION_CONFIG_HELP, SPECULATIVE_CONFIG_HELP,
                                  generation_config, speculative_config,
                                  add_dtype_argument, output_file, override_generation_config, reasoning_parser,
                                  switch, token_count)
from pipeline_dsl.diagnostics import closest
from pipeline_dsl.loader import add_pipeline_arguments, is_gguf_file

from .config import OPEN_PATHS

ENV_PREFIX = "AGP_"


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# an origin as a browser sends it: scheme://host[:port], no path (nor a trailing slash)
ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s,\"'\[\]]+")


def _origins(value: str) -> list[str]:
    """--allowed-origins: comma-separated origins, or vLLM's JSON list of them ('["https://app.example"]');
    each '*', 'null' or scheme://host[:port]. One that is none (a path, a trailing slash, a piece of a
    JSON list read as text) would never match a browser's Origin header: an error naming it."""
    import json

    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of origins ({e})") from None
        except RecursionError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}... is not a JSON list of origins (nested too deeply "
                                             "to read)") from None
        if not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of origins (strings)")
        names = [i.strip() for i in items if i.strip()]
    else:
        names = _names(text)
    for name in names:
        if name not in ("*", "null") and not ORIGIN.fullmatch(name):
            raise argparse.ArgumentTypeError(f"{name!r} is not an origin: a browser sends scheme://host[:port] "
                                             "(https://app.example:8443, no path), or give '*' for any")
    return names


def _lora_specs(value: str) -> list[str]:
    """AGP_LORA_MODULES: what --lora-modules takes, several at once: a JSON list (of vLLM's objects
    or of NAME=PATH strings), one JSON object, or specs split on the commas outside {...} and
    quotes (`sql=/a/sql,{"name": "chat", "path": "/a/chat"}`); a comma that does not start another
    spec (one followed by neither `{` nor NAME=) stays in the path before it. Each object is given
    on as its JSON text, which serve/lora.py reads as the flag's."""
    import json

    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list of adapters ({e})") from None
        except RecursionError:
            raise argparse.ArgumentTypeError("not a JSON list of adapters (nested too deeply to read)") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, dict)) for i in items):
            raise argparse.ArgumentTypeError("a JSON list of adapters holds NAME=PATH strings or "
                                             '{"name": ..., "path": ...} objects')
        return [i if isinstance(i, str) else json.dumps(i, ensure_ascii=False) for i in items]
    pieces, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if quoted:
            escaped, quoted = (not escaped and ch == "\\"), quoted and (escaped or ch != '"')
        elif ch == '"':
            quoted = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    specs: list[str] = []
    for piece in pieces:
        head = piece.strip()
        if specs and not head.startswith("{") and "=" not in head:
            specs[-1] += "," + piece          # a comma inside NAME=PATH's path
        else:
            specs.append(piece)
    return [s.strip() for s in specs if s.strip()]


# AGP_<FLAG> of a flag taking several values whose values may hold commas: its own reading
ENV_LISTS = {"lora_modules": _lora_specs}


def _header_names(value: str) -> list[str]:
    """--request-headers: comma-separated HTTP header names, lower-cased (HTTP's are case-blind)."""
    from pipeline_dsl.requests_io import HEADER_NAME, MAX_HEADERS

    names = list(dict.fromkeys(n.lower() for n in _names(value)))
    for name in names:
        if not HEADER_NAME.fullmatch(name):
            raise argparse.ArgumentTypeError(f"{name!r} is not an HTTP header name (letters, digits, '-')")
    if len(names) > MAX_HEADERS:
        raise argparse.ArgumentTypeError(f"{len(names)} headers; a request carries at most {MAX_HEADERS}")
    return names


def _paths(value: str) -> list[str]:
    paths = _names(value)
    for path in paths:
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(f"each path must start with '/', not {path!r}")
    return paths


class ExtendOrReplace(argparse._ExtendAction):
    """`--flag A B --flag C` gives [A, B, C], as argparse's "extend"; but the flags replace the
    default (which AGP_<FLAG> may have set) instead of adding to it: `AGP_API_KEY=old agp serve
    --api-key new` accepts only `new`, so rotating a key this way leaves the old one invalid."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])          # the first use of the flag: the default goes
        super().__call__(parser, namespace, values, option_string)


def add_arguments(p) -> None:
    add_pipeline_arguments(p, file_help="the .agp file, or a model to serve as `vllm serve MODEL` does (a .gguf "
                           "file, a Hugging Face folder or an embedded model's name: served by a pipeline of the "
                           "chat example's stages, under that name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    add_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-queue", type=int, default=None,
                   help="override the requests stage's max_queue (full queue -> HTTP 429)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="turn the KV prefix cache off (A/B against reuse)")
    p.add_argument("--no-overlap", action="store_true",
                   help="run the plan's streams serially (A/B against overlap; by default CUDA overlaps them, "
                        "CPU only with a core to spare beside the forward's threads)")
    p.add_argument("--served-model-name", action=ExtendOrReplace, nargs="+", default=None, metavar="NAME",
                   help="the model id(s) clients use; the first is reported in answers (default: the "
                        "pipeline's name)")
    p.add_argument("--lora-modules", action=ExtendOrReplace, nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders: adapter_config.json, adapter_model.safetensors) served "
                        "beside the model, each as NAME=PATH or vLLM's JSON form '{\"name\": ..., \"path\": ..., "
                        "\"base_model_name\": ...}': a request whose model is NAME is answered with it")
    p.add_argument("--enable-lora", action="store_true",
                   help="vLLM's switch, accepted: adapters are served whenever --lora-modules names some")
    p.add_argument("--api-key", action=ExtendOrReplace, nargs="+", default=None, metavar="KEY",
                   help="answer only requests with 'Authorization: Bearer KEY', or Azure's 'api-key: KEY' "
                        "(401 otherwise); "
                        f"{', '.join(OPEN_PATHS)} stay open (vLLM's VLLM_API_KEY is read too, below AGP_API_KEY)")
    p.add_argument("--max-model-len", type=token_count, default=None,
                   help="context length in tokens (prompt + answer); at most the model's (vLLM's suffixes: 32k = "
                        "32000, 32K = 32768)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences batched at once (overrides the pipeline's max_batch_size)")
    p.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help=SPECULATIVE_CONFIG_HELP)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None,
                   help="which waiting request is admitted first (overrides dynamic_batch's scheduling_policy): "
                        "fcfs, in order of arrival; priority, by the request's 'priority' field, lower first")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the model's (or, as vLLM takes it, the "
                        "template itself: a value holding {{ or {%%)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling of requests that bring no seed of their own")
    p.add_argument("--generation-config", type=generation_config, default="auto", metavar="auto|vllm|FOLDER",
                   help=GENERATION_CONFIG_HELP)
    p.add_argument("--override-generation-config", type=override_generation_config, default=None, metavar="JSON",
                   help=OVERRIDE_GENERATION_CONFIG_HELP)
    p.add_argument("--root-path", default="",
                   help="the path prefix a proxy serves this server under (e.g. /llm)")
    p.add_argument("--allowed-origins", type=_origins, default=None, metavar="ORIGINS",
                   help="comma-separated origins browsers may call from (CORS), or vLLM's JSON list of them; "
                        "'*' for any (default: none)")
    p.add_argument("--request-headers", type=_header_names, default=None, metavar="NAMES",
                   help="comma-separated HTTP headers copied into each request's `headers` {name: value} that "
                        "python stages read (x-tenant,x-user-id; lower-case names; only those named, so "
                        "Authorization and cookies only when named; default: none). The headers the "
                        "pipeline's conditions compare (when headers[\"x-tenant\"] == ...) are copied too")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS: the private key (PEM)")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS: the certificate chain (PEM)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests may take after SIGTERM; then they are cut with an "
                        "error and the exit status is 1 (default: 60)")
    p.add_argument("--retry-after-s", type=int, default=None, metavar="SECONDS",
                   help="the Retry-After of every 429 and 503 the server writes (a full queue, over "
                        "--max-connections, draining, loading; a python stage's Reject keeps its own): a whole "
                        "number of seconds, at least 1 (default: 1, and 5 while the model loads)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="longest request body accepted; longer: 413 (default: 4 MiB)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens; longer: 400 (default: requests.max_prompt_tokens, "
                        "else the model's context)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="requests served at once, counted once their body has arrived; more: 503 with "
                        "Retry-After (default: 1024)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request line and headers (default: 10)")
    p.add_argument("--keep-alive-timeout", type=float, default=75.0,
                   help="seconds a connection may sit idle between requests before the server closes it; "
                        "longer than the clients' own (httpx and the openai client: 5 s; load balancers: "
                        "60 s), or a request sent as the server closes fails (default: 75)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body, more for each --body-min-rate bytes "
                        "it sends, and the longest it may pause; later: 408 (default: 30)")
    p.add_argument("--body-min-rate", type=float, default=500.0,
                   help="bytes/s a request body must arrive at after its first --body-timeout seconds (each "
                        "byte buys 1/rate s more; a steady upload this fast is never cut); slower: 408; "
                        "0: --body-timeout bounds the whole body (default: 500)")
    p.add_argument("--max-body-bytes-arriving", type=int, default=256 << 20,
                   help="bytes that request bodies still arriving may hold, all together (at least "
                        "--max-body-bytes); more: 503 with Retry-After to the request that passes it "
                        "(default: 256 MiB)")
    p.add_argument("--send-timeout", type=float, default=30.0,
                   help="seconds a client may take none of its answer while some waits for it (its TCP "
                        "acknowledges nothing) before the connection is cut and its request aborted (default: 30)")
    p.add_argument("--max-unread-tokens", type=int, default=1024,
                   help="unread tokens a stream may have: queued while its writer is blocked on its client "
                        "(the socket's buffers full), not those the server's own loop hands it while it waits "
                        "for them; more: the request is aborted and its KV cache freed (default: 1024)")
    p.add_argument("--pause-unread-tokens", type=int, default=256,
                   help="unread tokens a stream may have (as --max-unread-tokens counts them: queued while its "
                        "writer is blocked on its client) before its "
                        "generation pauses: its sequences leave the batch and free their KV cache until the "
                        "client has taken them, then recompute and go on; paused for --send-timeout with none "
                        "taken, the request is aborted. 0: never paused (default: 256; a client that stops "
                        "reading pauses sooner, on its TCP)")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name each token \"token_id:N\" instead of its text, for requests that do not "
                        "set return_tokens_as_token_ids themselves (vLLM's flag)")
    p.add_argument("--tool-call-parser", type=_tool_call_parser, default="auto", metavar="NAME",
                   help="the form the model writes tool calls in, by vLLM's parser names: hermes "
                        "(<tool_call>{...}</tool_call>), llama3_json (bare {\"name\", \"parameters\"} JSON, "
                        "after <|python_tag|> or not), mistral ([TOOL_CALLS]...); default auto: the model's own, "
                        "told from its chat template and vocabulary (docs/openai.md)")
    p.add_argument("--reasoning-parser", type=reasoning_parser, default=None, metavar="NAME",
                   help="split a reasoning model's thinking out of its chat answers, by vLLM's parser names: qwen3 "
                        "or deepseek_r1 (<think>...</think>): what comes before </think> is the message's reasoning, "
                        "what follows it the content (default: none, the thinking stays in the content; "
                        "docs/openai.md)")
    p.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave a request's tools out of its prompt when its tool_choice is \"none\" (as vLLM's "
                        "flag; by default the model sees them, and no tool call is parsed from its answer)")
    p.add_argument("--lenient", action="store_true",
                   help="log and ignore request fields agp does not know, as vLLM does (default: a 400)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values accepted, '*' for any (default: the address "
                        "listened on, localhost, 127.0.0.1 and ::1; any when listening on 0.0.0.0 or ::)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="default: info")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="timestamped text lines, or one JSON object per line (default: text)")
    p.add_argument("--access-log", dest="access_log", action="store_true", default=True,
                   help="log every HTTP request (the default)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log each request")
    p.add_argument("--disable-access-log-for-endpoints", type=_paths, default=None, metavar="PATHS",
                   help="comma-separated paths whose successful answers are not logged, e.g. /health,/metrics,/ping "
                        "(probes and scrapers; an error answer is still logged) (default: none)")
    p.add_argument("--stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log a stats line this often while busy (default: 10; 0: never)")
    p.add_argument("--trace", type=output_file, default=None, metavar="FILE",
                   help="record a Chrome trace (Perfetto) of the pipeline; written at shutdown and on "
                        "POST /trace/flush")
    add_ray_arguments(p)
    env_defaults(p)


def ray_install_command() -> str:
    """The command that installs what `--ray` needs: the requirement of agp's `ray` extra
    (pyproject.toml), read from agp's installed metadata. Not `pip install 'agp[ray]'`: agp is
    installed from its source folder, and the package named agp on PyPI is another project."""
    from importlib import metadata

    try:
        requires = metadata.requires("agp") or []
    except metadata.PackageNotFoundError:
        requires = []
    extra = [r.split(";", 1)[0].strip() for r in requires if r.replace(" ", "").endswith('extra=="ray"')]
    return f"pip install '{extra[0] if extra else 'ray[serve]'}'"


def add_ray_arguments(p) -> None:
    """Flags of `--ray` (pipeline_dsl.serve.ray; docs/scale.md)."""
    g = p.add_argument_group(f"scaling out on Ray Serve ({ray_install_command()}; see docs/scale.md)")
    g.add_argument("--ray", action="store_true",
                   help="run the pipeline as Ray Serve replicas behind Ray's HTTP proxy (a running cluster "
                        "when RAY_ADDRESS is set, else a local one)")
    g.add_argument("--replicas", type=int, default=None,
                   help="replicas of the pipeline (default: 1; with --max-replicas: how many to start with)")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling: the fewest replicas (default: 1; 0 lets it scale to zero)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="turns autoscaling on: the most replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling: the requests in flight per replica it scales towards (default: 8)")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests a replica holds at once; more wait in Ray's router (default: 64)")
    g.add_argument("--affinity-chars", type=int, default=256,
                   help="requests whose prompts share their first N characters go to one replica "
                        "(prefix-cache affinity; 0: off; default: 256)")


def long_flag(action: argparse.Action) -> str:
    """The flag's first long spelling: --pipeline, not its --pipeline-name alias."""
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def env_name(action: argparse.Action) -> str:
    """AGP_ and the flag's name (its first long spelling) in capitals with _ for -, as
    docs/serve.md states the rule."""
    return ENV_PREFIX + long_flag(action).lstrip("-").upper().replace("-", "_")


# variables below the flags: the engine's switches (docs/gpu.md, docs/architecture.md)
ENGINE_VARIABLES = ("AGP_ATTENTION", "AGP_BATCH_INVARIANT", "AGP_CUDA_GRAPHS", "AGP_NATIVE", "AGP_NATIVE_ACT")


def unknown_variables(p: argparse.ArgumentParser, environ=None) -> list[str]:
    """A line for each AGP_* variable that is set but that nothing reads (a typo such as
    AGP_MAX_NUM_SEQ would otherwise pass silently), with the closest known name."""
    environ = os.environ if environ is None else environ
    known = {env_name(a) for a in p._actions if a.option_strings} | set(ENGINE_VARIABLES)
    out = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        close = closest(name, known)
        out.append(f"environment variable {name} is set but is not one of agp's"
                   + (f" (did you mean {close}?)" if close else "") + "; it is ignored")
    return out


def env_defaults(p: argparse.ArgumentParser, environ=None) -> None:
    """Each option's default from AGP_<OPTION> when that is set (the flag still wins); the
    variable is named in the option's help. A bad value is an error naming the variable."""
    environ = os.environ if environ is None else environ
    from_variables = {}                  # dest -> (variable, value): what given_as reads
    for action in list(p._actions):
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(action)
        action.help = (action.help or "") + f" [env {name}]"
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                value = switch(raw) if raw.strip() else False
                # --no-x's own variable (AGP_NO_ACCESS_LOG=1) as well as --x's (AGP_ACCESS_LOG=0)
                value = value if isinstance(action, argparse._StoreTrueAction) else not value
            elif action.dest in ENV_LISTS:
                value = ENV_LISTS[action.dest](raw)
            elif isinstance(action, argparse._ExtendAction):
                value = _names(raw)
            elif action.type in (int, float):
                try:
                    value = action.type(raw)
                except ValueError:               # not Python's words: "invalid literal for int() with base 10"
                    what = "an integer" if action.type is int else "a number"
                    raise ValueError(f"{long_flag(action)} takes {what}") from None
            else:
                value = action.type(raw) if action.type else raw
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
            problem = value_problem(action.dest, value)
            if problem:                      # its range: named by the variable the user set, not by the flag
                raise ValueError(problem)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            p.error(f"environment variable {name}={raw!r}: {e}")
        p.set_defaults(**{action.dest: value})
        from_variables[action.dest] = (name, value)
    vllm_key = environ.get(VLLM_API_KEY)
    if vllm_key and "api_key" not in from_variables and any(a.dest == "api_key" for a in p._actions):
        # vLLM's server reads its key from VLLM_API_KEY: a deployment that sets it must not come up open
        p.set_defaults(api_key=[vllm_key])
        from_variables["api_key"] = (VLLM_API_KEY, [vllm_key])
    p.set_defaults(from_variables=from_variables)


VLLM_API_KEY = "VLLM_API_KEY"   # vLLM's variable for --api-key, read when AGP_API_KEY is not set


def given_as(args, dest: str) -> str:
    """How the user gave a flag's value, as an error found after parsing names it: its AGP_*
    variable when the value is the variable's (no flag replaced it), else the flag."""
    name, value = getattr(args, "from_variables", {}).get(dest, (None, None))
    return name if name is not None and getattr(args, dest, None) == value else f"--{dest.replace('_', '-')}"


class SetupError(Exception):
    """A flag or file the server cannot start with (exit status 2); the message says which."""


# each flag's own range (dest -> the least value), whether given as the flag or as its AGP_* variable
AT_LEAST = {"max_queue": 1, "max_body_bytes": 1024, "max_input_tokens": 1, "max_connections": 1, "max_model_len": 1,
            "max_body_bytes_arriving": 1024,
            "max_num_seqs": 1, "threads": 1, "max_unread_tokens": 1, "pause_unread_tokens": 0, "replicas": 1, "min_replicas": 0,
            "max_replicas": 1, "max_ongoing_requests": 1, "affinity_chars": 0, "retry_after_s": 1}
POSITIVE_SECONDS = ("drain_timeout", "header_timeout", "body_timeout", "send_timeout", "keep_alive_timeout")
FILES = ("ssl_keyfile", "ssl_certfile", "chat_template")
RAY_DESTS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
             "affinity_chars")                 # checked with --ray alone (without it, their use is the error)


def value_problem(dest: str, value) -> str | None:
    """What is wrong with one flag's value on its own (out of its range, a file that is not there),
    in words that follow the flag's name or its variable's; None when nothing."""
    if value is None:
        return None
    if dest == "port" and not 0 <= value <= 65535:
        return f"must be between 0 and 65535, not {value}"
    if dest in AT_LEAST and value < AT_LEAST[dest]:
        return f"must be at least {AT_LEAST[dest]}, not {value}"
    if dest in POSITIVE_SECONDS and not (value > 0 and math.isfinite(value)):
        # nan and inf too: a timer of either failed every connection
        return f"must be a positive number of seconds, not {value}"
    if dest == "stats_interval" and not (value >= 0 and math.isfinite(value)):
        return f"must be 0 (off) or a positive number of seconds, not {value}"
    if dest == "body_min_rate" and not (value >= 0 and math.isfinite(value)):
        return f"must be 0 (off) or a positive number of bytes per second, not {value}"
    if dest == "target_ongoing_requests" and not (value > 0 and math.isfinite(value)):
        return f"must be positive, not {value:g}"
    if dest == "seed":                  # the requests' range (stages/fields.py), as the engine checks it
        from stages.fields import ENGINE_FIELDS, ParamError, check_engine_field, expected, param_of

        try:
            check_engine_field("seed", value)
        except ParamError:
            return f"must be {expected(param_of(*ENGINE_FIELDS['seed']))}, not {value}"
    if dest == "chat_template" and value and template_text(value):
        return None                     # the template itself, as vLLM's --chat-template takes it too
    if dest == "chat_template" and value and not Path(value).is_file() and re.fullmatch(r"[\w.-]+", value) \
            and not Path(value).suffix:
        # a template's name, as llama.cpp's --chat-template takes one of its built-ins ("chatml", "llama3")
        return (f"{value}: no such file (agp knows no templates by name, as llama.cpp knows 'chatml' or 'llama3': "
                "give a Jinja template's file or the template itself; left out, the model's own template is "
                "used, from its .gguf file or tokenizer_config.json)")
    if dest in FILES and value and not Path(value).is_file():
        return f"{value}: no such file"
    if dest == "root_path" and value and not value.startswith("/"):
        return f"must start with '/', not {value!r}"
    return None


def template_text(value: str) -> bool:
    """Whether --chat-template's value is a template itself rather than a file's path (vLLM takes
    both): it holds Jinja's {{ or {%, which no sensible path does."""
    return "{{" in value or "{%" in value


def _check_values(args, dests) -> None:
    for dest in dests:
        problem = value_problem(dest, getattr(args, dest, None))
        if problem:
            raise SetupError(f"--{dest.replace('_', '-')} {problem}")


def model_named(file: str) -> str | None:
    """The model FILE names when it names one rather than a pipeline file, as `vllm serve MODEL`
    takes it: an embedded model's name, a .gguf file, or a Hugging Face folder (one holding a
    config.json); None otherwise (a .agp file, or a path that is none of these). An embedded
    model's name comes first, as the loader (engine.models.resolve_model) reads it."""
    from pipeline_dsl.model_files import EMBEDDED_FILES, model_file

    key = file.strip().lower()
    if key in EMBEDDED_FILES:
        return key
    path = model_file(file)
    if path.is_file():
        # absolute, the file's own link kept: a Hugging Face cache's snapshots/REV/m.gguf links to
        # blobs/SHA256, which has no .gguf name for the loader to take it by. Its folder is resolved, not
        # written out: in link/../m.gguf, '..' is the folder above the one `link` points to, as the
        # system reads it, not the one above `link`
        return os.path.join(os.path.realpath(path.parent), path.name) if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        return str(path.resolve()) if (path / "config.json").is_file() else None
    return None


# files that hold a model's weights alone (its folder is the model): not a pipeline to read
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")


def check_file(file: str) -> None:
    """FILE is a pipeline file or a model (model_named); a path that is neither and does not end in
    .agp (a Hub id such as `Qwen/Qwen2.5-0.5B-Instruct`, as vLLM takes it, a folder without a
    config.json, a weights file) is a SetupError saying what FILE may be, before the server starts.
    A missing .agp file is the loader's to report."""
    from pipeline_dsl.model_files import EMBEDDED_FILES

    if model_named(file) is not None or file.endswith(".agp"):
        return
    path = Path(file).expanduser()
    takes = (f"give a .agp file, or a model to serve as vLLM's `vllm serve MODEL` does: a .gguf file, a Hugging "
             f"Face model folder (with its config.json) or an embedded model ({', '.join(sorted(EMBEDDED_FILES))})")
    if path.is_symlink() and not path.exists():     # a dangling link: what it points to is missing
        target = os.readlink(path)
        where = "" if os.path.isabs(target) else f" (from {str(path.parent)!r})"
        raise SetupError(f"{file!r} is a link to {target!r}{where}, which does not exist")
    if path.is_dir():
        raise SetupError(f"{file!r} is a folder without a config.json, so neither a pipeline file nor a model: {takes}")
    if path.suffix.lower() in WEIGHT_FILES:
        raise SetupError(f"{file!r} is a file of weights alone: {takes}")
    if path.is_file() and is_gguf_file(path):
        # as Ollama keeps its models (blobs/sha256-...): the loader takes a GGUF file by its .gguf name
        raise SetupError(f"{file!r} is a GGUF model without the .gguf extension (as Ollama stores its models' "
                         "files): agp takes a model file by its .gguf name; link it as one (ln -s FILE model.gguf) "
                         "and serve the link")
    if not path.exists() and re.fullmatch(r"[a-z0-9][\w.-]*:[\w.-]+", file):
        # Ollama's name:tag of a model it pulled: the GGUF file is in its store
        raise SetupError(f"{file!r} is neither a pipeline (.agp) file nor a model: {takes}. An Ollama model's "
                         f"file is in Ollama's store: `ollama show --modelfile {file}` prints its path (FROM "
                         f".../blobs/sha256-...); link it as a .gguf file (ln -s PATH model.gguf), serve the link, "
                         f"and --served-model-name {file} keeps the name clients send")
    if not path.exists():
        raise SetupError(f"{file!r} is neither a pipeline (.agp) file nor a model: {takes}; agp downloads nothing, "
                         "so a Hub id must be a local folder")


def check_args(args) -> None:
    """The flags' own ranges, and FILE (check_file), before anything is loaded."""
    check_file(args.pipeline)
    if getattr(args, "name", None) is not None and model_named(args.pipeline) is not None:
        raise SetupError(f"--pipeline {args.name} picks a pipeline of a .agp file, and {args.pipeline!r} is a "
                         "model (agp serves it with a pipeline of its own)")
    _check_values(args, ("port", *(d for d in AT_LEAST if d not in RAY_DESTS), *POSITIVE_SECONDS, "stats_interval",
                         "body_min_rate", "seed"))
    if args.max_body_bytes_arriving < args.max_body_bytes:     # a body of the largest size could never arrive
        raise SetupError(f"--max-body-bytes-arriving ({args.max_body_bytes_arriving}) must be at least "
                         f"--max-body-bytes ({args.max_body_bytes})")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise SetupError("--ssl-keyfile and --ssl-certfile go together")
    _check_values(args, (*FILES, "root_path"))
    if any(not k for k in args.api_key or ()):
        raise SetupError("--api-key must not be empty")
    if getattr(args, "lora_modules", None):
        parse_specs(args.lora_modules)          # the values' form; the folders are read by build
    check_ray_args(args)
    _resolve_retry_after(args)


def _resolve_retry_after(args) -> None:
    """--retry-after-s resolved once: the Retry-After of every 429 and 503 (RETRY_AFTER_S where it
    is left out), and of the 503 while the model loads (args.loading_retry_after_s: loading.py's
    LOADING_RETRY_AFTER_S where it is left out). Again on args already resolved: nothing."""
    from .config import RETRY_AFTER_S
    from .loading import LOADING_RETRY_AFTER_S

    if getattr(args, "loading_retry_after_s", None) is None:
        args.loading_retry_after_s = args.retry_after_s or LOADING_RETRY_AFTER_S
        args.retry_after_s = args.retry_after_s or RETRY_AFTER_S


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """(name, path, base_model_name) of one --lora-modules value: NAME=PATH or vLLM's JSON object."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SetupError(f"--lora-modules {spec!r}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise SetupError(f"--lora-modules {spec!r}: expected a JSON object")
        other = sorted(set(obj) - {"name", "path", "base_model_name"})
        if other:
            raise SetupError(f"--lora-modules {spec!r}: unknown key {other[0]!r} (expected name, path, "
                             "base_model_name)")
        name, path, base = obj.get("name"), obj.get("path"), obj.get("base_model_name")
        for key, value in (("name", name), ("path", path)):
            if not isinstance(value, str) or not value:
                raise SetupError(f"--lora-modules {spec!r}: {key!r} must be a non-empty string")
        if base is not None and (not isinstance(base, str) or not base):
            raise SetupError(f"--lora-modules {spec!r}: 'base_model_name' must be a non-empty string")
        return name, path, base
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SetupError(f"--lora-modules {spec!r}: expected NAME=PATH (or vLLM's JSON object with name and path)")
    return name.strip(), path.strip(), None


def parse_specs(specs) -> list[tuple[str, str, str | None]]:
    """(name, path, base_model_name) of each --lora-modules value; SetupError for a bad one or a
    name given twice."""
    out, seen = [], set()
    for spec in specs or ():
        name, path, base = parse_spec(spec)
        if name in seen:
            raise SetupError(f"--lora-modules: the name {name!r} is given twice")
        seen.add(name)
        out.append((name, path, base))
    return out


def check_ray_args(args) -> None:
    given = [f for f in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests")
             if getattr(args, f, None) is not None]
    if not getattr(args, "ray", False):
        if given:
            raise SetupError(f"--{given[0].replace('_', '-')} needs --ray")
        return
    _check_values(args, RAY_DESTS)
    if args.max_replicas is None:
        if args.min_replicas is not None or args.target_ongoing_requests is not None:
            raise SetupError("autoscaling needs --max-replicas")
    else:
        low = 1 if args.min_replicas is None else args.min_replicas
        if low > args.max_replicas:
            raise SetupError(f"--min-replicas ({low}) is more than --max-replicas ({args.max_replicas})")
        if args.replicas is not None and not low <= args.replicas <= args.max_replicas:
            raise SetupError(f"--replicas ({args.replicas}) must lie between --min-replicas ({low}) and "
                             f"--max-replicas ({args.max_replicas})")
    if args.trace:
        raise SetupError("--trace records one process: it does not go with --ray")


def report(message: str) -> None:
    """The one-line error of `agp serve` (on stderr, a JSON record under --log-format json): what
    cannot start, and why."""
    from .logs import fatal

    fatal(f"agp serve: error: {message}")


def _tool_call_parser(value: str) -> str:
    """--tool-call-parser's value: auto or a form agp reads calls in (pipeline_dsl/tools.py)."""
    from pipeline_dsl.tools import check_parser

    if value == "auto":
        return value
    try:
        return check_parser(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
