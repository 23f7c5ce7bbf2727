"""`agp serve PIPELINE`: the pipeline behind an OpenAI-compatible HTTP API (`agp serve MODEL`: a model
through a pipeline of the chat example's stages, as `vllm serve MODEL`; serve/build.py).

    agp serve examples/chat.agp --port 8000
    curl -N localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Routes: /v1/completions, /v1/chat/completions, /v1/responses (streaming or not), /v1/models,
/tokenize, /detokenize, /health, /ping, /invocations (SageMaker's), /metrics (Prometheus), /stats, /version,
/trace/flush; the flags and what they build live in pipeline_dsl.serve (options, build). SIGTERM (or
Ctrl-C, or SIGHUP) answers new requests 503, lets in-flight requests finish (up to
--drain-timeout; a second signal cuts them now, each with an error answer) and exits 0 (1 when
some were cut). While the model loads, the port is already held and every request gets 503
(serve/loading.py); a signal then stops the load and exits 0. Every flag can also be set by an environment variable:
AGP_ and the flag's name in capitals (--api-key: AGP_API_KEY, --max-num-seqs:
AGP_MAX_NUM_SEQS); the flag wins over the variable, both over the pipeline file. `--ray`
serves it as replicas on Ray Serve instead (pipeline_dsl.serve.ray, docs/scale.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pipeline_dsl.serve.build import Serving, build
from pipeline_dsl.serve.options import (SetupError, add_arguments, check_args, ray_install_command, report,
                                        unknown_variables)

HELP = "serve a pipeline behind an OpenAI-compatible HTTP API"
log = logging.getLogger("agp.serve")
FILES_BESIDE_CONNECTIONS = 256  # descriptors the server holds besides its connections (model files, pipes, logs)
BACKLOG = 2048                  # uvicorn's default: connections the kernel queues before they are accepted

__all__ = ["HELP", "add_arguments", "exit_status", "listening_socket", "main"]


def listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket, before the model loads. Listening (not only bound) is what holds
    the port: with SO_REUSEADDR (a restart must not wait out TIME_WAIT) two sockets may be
    bound to one port until one listens, so a second server started meanwhile would load,
    print its banner and listen nowhere. While the model loads, serve/loading.py answers 503."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def banner(serving: Serving, url: str, args) -> list[str]:
    """The startup lines: what this server really runs with (after flags, variables and file)."""
    from pipeline_dsl import __version__
    from pipeline_dsl.engine.cpus import cpus_text

    cfg = serving.config
    lines = [f"agp {__version__} serving pipeline '{serving.runtime.name}' as "
             f"{', '.join(repr(n) for n in cfg.model_names[:max(1, len(args.served_model_name or ()))])} "
             f"at {url}"]
    first_on: dict[int, str] = {}               # each loaded copy of weights -> the first engine on it
    for es in serving.runtime.segments:
        e, c = es.engine, es.config
        info = e.model_info
        sharer = first_on.setdefault(id(e.runner.model), es.name)
        runs = info.get("linears") or f"{info.get('weights', '?')} weights, {info.get('dtype', c.dtype)} compute"
        if c.dtype == "auto" and getattr(e.runner.model, "dtype_reason", None):
            runs += f", dtype auto: {e.runner.model.dtype_reason}"             # why auto chose it
        lines.append(f"  engine {es.name}: model {Path(str(c.model)).name} ({runs}) on {c.device}"
                     + (f" (the weights engine {sharer} loaded, shared)" if sharer != es.name else "")
                     + (f" ({e.threads} thread{'s' * (e.threads != 1)} of the {cpus_text(e.cpus)} this process may use"
                        + (f"; OpenMP waits {e.omp_wait}" if e.omp_wait != "default" else "") + ")"
                        if e.threads else "")
                     + f"; context {e.max_model_len} tokens"
                     + (f" (all the KV cache holds; the model's {e.model_context})" if e.pool_bound else "")
                     + f"; batch {c.max_batch_size} sequences; KV {e.blocks.num_blocks} blocks x {c.block_size} "
                     f"tokens; prefix reuse {'on' if c.prefix_reuse else 'off'}"
                     + (f"; {c.scheduling_policy} scheduling" if c.scheduling_policy != "fcfs" else "")
                     + (f"; seed {c.seed}" if c.seed is not None else "")
                     + (f"; chat template {Path(args.chat_template).name}" if args.chat_template else "")
                     + (f"; sampling defaults of generation_config.json"
                        f"{' and --override-generation-config' if c.override_generation_config else ''}: "
                        f"{', '.join(f'{k}={v:g}' for k, v in e.generation_defaults.items())}"
                        if e.generation_defaults else ""))
    lines.append(f"  api key {'required' if cfg.api_keys else 'off'}; CORS "
                 f"{', '.join(cfg.allowed_origins) if cfg.allowed_origins else 'off'}; max connections "
                 f"{cfg.max_connections}; queue {serving.runtime.max_queue}"
                 + (f"; open files {args.open_files}" if getattr(args, "open_files", None) else "")
                 + f"; trace {args.trace or 'off'}"
                 + (f"; request headers {', '.join(cfg.request_headers)}" if cfg.request_headers else ""))
    return lines


def open_files(max_connections: int) -> int | None:
    """The open-files limit, raised (serve/server.py); a warning when it leaves too few for
    --max-connections, whose clients past it the kernel would drop rather than the server answer."""
    from pipeline_dsl.serve.server import raise_open_files

    limit = raise_open_files()
    if limit is not None and limit < max_connections + FILES_BESIDE_CONNECTIONS:
        log.warning("the open-files limit is %d, too few for --max-connections %d (and the server's own "
                    "files): clients past it go unanswered; raise it (ulimit -n) or lower --max-connections",
                    limit, max_connections)
    return limit


def main(args) -> int:
    from pipeline_dsl.serve.logs import configure, endpoint

    configure(args.log_format, args.log_level, args.access_log)
    flags = argparse.ArgumentParser(prog="agp serve")
    add_arguments(flags)
    for line in unknown_variables(flags):
        log.warning(line)
    if args.ray:
        return _main_on_ray(args)
    try:
        check_args(args)
        sock = listening_socket(args.host, args.port)
        args.open_files = open_files(args.max_connections)
    except SetupError as e:
        report(str(e))
        return 2
    except OSError as e:
        report(f"cannot listen on {endpoint(args.host, args.port)}: {e.strerror or e}")
        return 2

    started = _start(args, sock)
    if isinstance(started, int):
        sock.close()
        return started
    serving, server = started
    server.run(sockets=[sock])
    return exit_status(serving, server)


def exit_status(serving, server) -> int:
    """The exit status of a server that has stopped, its reason logged: 0 when it stopped with
    every request answered (drained), 1 when it did not start, its pipeline failed, or requests in
    flight were cut (each with an error answer) or, stopped at once by a third signal, got none."""
    if not server.started:
        report("the server did not start (see the log above)")
        return 1
    if engine_failed := serving.apipe.error:
        if server.failed is None:                   # the server logged the failure as it stopped for it
            report(f"the pipeline failed: {engine_failed}")
        return 1
    if server.dropped:                                # set by a third signal only: the drain thread may still be cutting them
        log.warning("stopped at once by a third signal; %d request(s) still in flight got no answer "
                    "or only part of one", server.dropped)
        return 1
    cut = serving.apipe.runtime.cut                   # counted by close() (the drain thread keeps a copy to log)
    if cut:
        log.warning("stopped; cut %d request(s) still in flight", cut)
        return 1
    log.info("stopped" + (" (drained)" if server.stopped_by else ""))
    return 0


def _build_or_stop(args, sock):
    """build(args) with 503 on the socket meanwhile; a stop signal gives the load up at once (nothing
    is in flight yet): a line says so and the process exits 0 (pipeline_dsl/stopping.py)."""
    from pipeline_dsl.stopping import load_unless_stopped
    from pipeline_dsl.serve.loading import Loading

    # 503 {"status": "loading"} until the model is up, once a stop signal would be heard
    loading = Loading(sock, args.loading_retry_after_s)    # check_args resolved it
    serving, sig = load_unless_stopped(lambda: build(args), around=loading)
    if sig is not None:
        log.info("%s while loading the pipeline: stopped before serving", signal.Signals(sig).name)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sock.close()
        os._exit(0)                              # the load thread may be anywhere (an import, a C call)
    return serving


def _start(args, sock):
    """Load the pipeline (503 on the socket meanwhile) and make its server: (Serving, AgpServer),
    or an exit status, the error reported."""
    import uvicorn

    from pipeline_dsl.diagnostics import CheckFailed
    from pipeline_dsl.serve.logs import endpoint, fatal
    from pipeline_dsl.serve.server import AgpServer, agp_protocol, max_open_connections

    try:
        serving = _build_or_stop(args, sock)
    except CheckFailed as e:
        fatal(e.render())
        return 2
    except SetupError as e:
        report(str(e))
        return 2
    host, port = sock.getsockname()[:2]
    tls = bool(args.ssl_certfile)
    try:
        # the app writes the access log (with latency and request id) and answers under --root-path
        # itself: uvicorn's root_path would prefix every path a second time
        server = AgpServer(uvicorn.Config(
            serving.app, log_level=args.log_level, access_log=False, lifespan="on",
            http=agp_protocol(args.header_timeout, args.send_timeout, keep_alive_timeout=args.keep_alive_timeout,
                              max_open=max_open_connections(getattr(args, "open_files", None))),
            timeout_graceful_shutdown=5.0,             # the idle keep-alive: the protocol's own (above)
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
            log_config={"version": 1, "disable_existing_loggers": False}),
            serving.apipe, args.drain_timeout)
        server.config.load()                        # TLS files are read here: a bad one is a clean exit 2
    except (OSError, ValueError) as e:
        report(f"cannot start: {e}")
        return 2
    url = f"{'https' if tls else 'http'}://{endpoint(host, port)}{args.root_path}/v1"
    for line in banner(serving, url, args):
        log.info(line)
    return serving, server


def _main_on_ray(args) -> int:
    try:
        check_args(args)
    except SetupError as e:
        report(str(e))
        return 2
    try:
        from pipeline_dsl.serve import ray as on_ray
    except ImportError as e:
        report(f"Ray Serve is not installed ({e}): {ray_install_command()}")
        return 2
    return on_ray.main(args)
