"""`agp serve PIPELINE`: the pipeline behind an OpenAI-compatible HTTP API.

    agp serve examples/chat.agp --port 8000
    curl -N localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Routes: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health,
/metrics (Prometheus), /stats. SIGTERM (or Ctrl-C) stops accepting connections, lets
in-flight requests finish (up to --drain-timeout) and exits 0.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from pipeline_dsl.commands import add_pipeline_arguments

HELP = "serve a pipeline behind an OpenAI-compatible HTTP API"


def add_arguments(p) -> None:
    add_pipeline_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="override the pipeline's precision")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-queue", type=int, default=None,
                   help="override the requests stage's max_queue (full queue -> HTTP 429)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="turn the KV prefix cache off (A/B against reuse)")
    p.add_argument("--no-overlap", action="store_true",
                   help="run the plan's streams serially (A/B against overlap)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the pipeline's name)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests may take after SIGTERM; then they are cut with an "
                        "error and the exit status is 1 (default: 60)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="longest request body accepted; longer: 413 (default: 4 MiB)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens; longer: 400 (default: requests.max_prompt_tokens, "
                        "else the model's context)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="requests served at once; more: 503 with Retry-After (default: 1024)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request line and headers (default: 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body; later: 408 (default: 30)")
    p.add_argument("--lenient", action="store_true",
                   help="log and ignore request fields agp does not know, as vLLM does (default: a 400)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values accepted, '*' for any (default: the address "
                        "listened on and localhost; any when listening on all addresses)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")


def _err(message: str) -> None:
    print(f"agp serve: error: {message}", file=sys.stderr)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def model_names(runtime, served: str | None) -> tuple[str, ...]:
    """The ids /v1/models lists and requests may name: the pipeline first, then its model(s)."""
    names = [served] if served else []
    names.append(runtime.name)
    for es in runtime.segments[:1]:
        model = str(es.config.model)
        names += [model, Path(model).stem]
    return tuple(dict.fromkeys(n for n in names if n))


def allowed_hosts(host: str, given: str | None) -> tuple[str, ...]:
    """The Host header values the server answers for (DNS rebinding protection)."""
    if given:
        return tuple(h.strip().lower() for h in given.split(",") if h.strip())
    if host in ("0.0.0.0", "::", ""):
        return ("*",)                     # listening everywhere: the public name is not known here
    return tuple(dict.fromkeys([host.lower(), "localhost", "127.0.0.1", "::1"]))


def main(args) -> int:
    checks = [(not 0 <= args.port <= 65535, f"--port must be between 0 and 65535, not {args.port}"),
              (args.max_queue is not None and args.max_queue < 1, f"--max-queue must be at least 1, not {args.max_queue}"),
              (args.drain_timeout <= 0, f"--drain-timeout must be positive, not {args.drain_timeout}"),
              (args.max_body_bytes < 1024, f"--max-body-bytes must be at least 1024, not {args.max_body_bytes}"),
              (args.max_input_tokens is not None and args.max_input_tokens < 1,
               f"--max-input-tokens must be at least 1, not {args.max_input_tokens}"),
              (args.max_connections < 1, f"--max-connections must be at least 1, not {args.max_connections}"),
              (args.header_timeout <= 0 or args.body_timeout <= 0, "--header-timeout and --body-timeout must be "
                                                                   "positive")]
    for bad, message in checks:
        if bad:
            _err(message)
            return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        _err(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 2

    import uvicorn

    from pipeline_dsl.diagnostics import CheckFailed
    from pipeline_dsl.engine.errors import InputError
    from pipeline_dsl.runtime import build_runtime
    from pipeline_dsl.serve.app import ServeConfig, create_app
    from pipeline_dsl.serve.async_pipeline import AsyncPipeline
    from pipeline_dsl.serve.metrics import ServerMetrics
    from pipeline_dsl.serve.server import AgpServer, header_timeout_protocol

    try:
        runtime = build_runtime(args.pipeline, args.name, overlap=not args.no_overlap, max_queue=args.max_queue,
                                served_name=args.served_model_name,
                                overrides={"dtype": args.dtype, "threads": args.threads,
                                           "max_prompt_tokens": args.max_input_tokens,
                                           "prefix_reuse": False if args.no_prefix_reuse else None})
    except CheckFailed as e:
        sys.stderr.write(e.render())
        sock.close()
        return 2
    except InputError as e:
        _err(str(e))
        sock.close()
        return 2
    names = model_names(runtime, args.served_model_name)
    contexts = [es.engine.max_model_len for es in runtime.segments]
    config = ServeConfig(model_names=names, max_model_len=int(min(contexts) if contexts else 1 << 20),
                         stages=tuple((g, Path(str(es.config.model)).name) for g, es in runtime.seg_of_gen.items()),
                         drain_timeout_s=args.drain_timeout, max_body_bytes=args.max_body_bytes,
                         body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                         allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
                         max_prompt_chars=max((es.engine.max_prompt_chars or 0 for es in runtime.segments),
                                              default=0) or None,
                         max_stage_n=max((n for es in runtime.segments for n in es.n.values()), default=1),
                         lenient=args.lenient)
    metrics = ServerMetrics()
    apipe = AsyncPipeline(runtime, metrics=metrics)
    app = create_app(apipe, config, metrics)

    host, port = sock.getsockname()[:2]
    server = AgpServer(uvicorn.Config(
        app, log_level=args.log_level, access_log=args.access_log, lifespan="on",
        http=header_timeout_protocol(args.header_timeout), timeout_graceful_shutdown=5.0),
        apipe, args.drain_timeout)
    engines = ", ".join(f"{es.name}: {Path(str(es.config.model)).name} on {es.config.device}"
                        for es in runtime.segments)
    print(f"agp serve: pipeline '{names[0]}' on http://{host}:{port}/v1 ({engines or 'no model'})",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if not server.started:
        _err("the server did not start (see the log above)")
        return 1
    if engine_failed := apipe.error:
        _err(f"the pipeline failed: {engine_failed}")
        return 1
    if server.cut:
        print(f"agp serve: stopped; the drain timeout cut {server.cut} request(s)", file=sys.stderr)
        return 1
    print("agp serve: stopped" + (" (drained)" if server.stopped_by else ""), file=sys.stderr)
    return 0
