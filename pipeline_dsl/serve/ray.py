"""`agp serve PIPELINE --ray`: the same server as replicas on Ray Serve (docs/scale.md).

    agp serve examples/chat.agp --ray --replicas 2
    agp serve examples/chat.agp --ray --max-replicas 4 --target-ongoing-requests 8
    serve run pipeline_dsl.serve.ray:app_builder pipeline=/abs/path/chat.agp replicas=2

The application `agp` is three deployments (serve/ray_deployments.py): `AgpIngress` behind
Ray's HTTP proxy, the `AgpPipeline` replicas (each the app `agp serve` builds for the same
flags) and `AgpMetrics` (serve/ray_metrics.py). This module sets them up from the flags
(`build_app`: replica counts, autoscaling, resources, Ray's logging), runs them (`main`; `deploy`
reports a replica that fails on a flag at its first failure), and drains them at SIGTERM (`stop`,
`drain`: new requests get 503 + Retry-After while those in flight finish, then the application is
deleted; the exit status is 1 when the drain timeout cut requests, as in one process).

The application is served at "/" and answers under --root-path too (the app strips it), so a
route answers with and without the prefix, as in one process. On a cluster where Ray Serve already
runs, its HTTP options are the cluster's: agp serves on Serve's port (`served_address`), and refuses
a --port / --host it would not be served on, and an application `agp` already deployed there.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import time
from typing import Callable
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from pipeline_dsl.stopping import STOP_SIGNALS, listening, wait_for_stop

from .ray_deployments import AgpIngress, AgpPipeline, PrefixAffinityRouter, affinity_key, rank
from .ray_metrics import AgpMetrics

log = logging.getLogger("agp.serve")
APP = "agp"
DEFAULT_TARGET = 8.0              # --target-ongoing-requests
# How often a stopping replica looks whether its requests finished (Serve's graceful_shutdown_wait_loop_s,
# 2 s by default, waited at least once by every replica): `stop` drained the application at its ingress before
# deleting it, so a replica finds none left and a 2 s look only delays the stop.
STOP_POLL_S = 0.25
HUB_STOP_S = 1.0                  # the AgpMetrics replica's stop (it holds no request to wait for)

__all__ = ["APP", "AgpIngress", "AgpPipeline", "PrefixAffinityRouter", "StartFailed", "affinity_key", "app_builder",
           "build_app", "deploy", "drain", "init_cluster", "logging_config", "main", "parse",
           "pipeline_options", "rank", "replica_options", "running_http_options", "served_address", "setup_failure",
           "start_failure", "stop"]


# ---------------------------------------------------------------- the application

def logging_config(args) -> dict:
    """Ray Serve's logging of each deployment (its LoggingConfig): none of its own access lines,
    as agp logs each request itself (--access-log / --no-access-log), and --log-level's level."""
    return {"enable_access_log": False, "log_level": args.log_level.upper()}


def pipeline_options(args, gpus: float = 0) -> dict:
    """Serve options of the AgpPipeline deployment for these flags."""
    opts = {"max_ongoing_requests": args.max_ongoing_requests, "logging_config": logging_config(args),
            "graceful_shutdown_timeout_s": args.drain_timeout, "graceful_shutdown_wait_loop_s": STOP_POLL_S,
            "ray_actor_options": {"num_cpus": args.threads or 1, "num_gpus": gpus},
            "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter)}
    if args.max_replicas is None:
        opts["num_replicas"] = args.replicas or 1
    else:
        low = 1 if args.min_replicas is None else args.min_replicas
        opts["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": args.max_replicas,
            "initial_replicas": args.replicas if args.replicas is not None else max(low, 1),
            "target_ongoing_requests": args.target_ongoing_requests or DEFAULT_TARGET}
    return opts


def replica_options(args) -> dict:
    """The flags each AgpPipeline replica builds its app from (files made absolute: every node
    reads them at the same path)."""
    from .build import served_names
    from .options import template_text

    options = dict(vars(args), served_model_name=served_names(args))   # a model's: FILE as given
    for name in ("pipeline", "chat_template"):
        if options.get(name) and not template_text(options[name]) and Path(options[name]).exists():
            options[name] = str(Path(options[name]).resolve())    # not an embedded model, nor an inline template
    if options.get("generation_config") not in (None, "auto", "vllm"):       # a folder
        options["generation_config"] = str(Path(options["generation_config"]).resolve())
    options.pop("func", None)
    return options


def build_app(args, gpus: float = 0):
    """The Serve application for checked `agp serve` flags."""
    logs = logging_config(args)
    hub = AgpMetrics.options(logging_config=logs, graceful_shutdown_wait_loop_s=STOP_POLL_S,
                             graceful_shutdown_timeout_s=HUB_STOP_S).bind()
    pipeline = AgpPipeline.options(**pipeline_options(args, gpus)).bind(replica_options(args), hub)
    return AgpIngress.options(logging_config=logs, graceful_shutdown_wait_loop_s=STOP_POLL_S,
                              graceful_shutdown_timeout_s=args.drain_timeout).bind(
        pipeline, args.affinity_chars, args.max_body_bytes, args.body_timeout, hub, args.root_path,
        body_min_rate=args.body_min_rate, max_body_bytes_arriving=args.max_body_bytes_arriving,
        retry_after_s=args.retry_after_s)


def drain(app: str, timeout: float, quiet_s: float = 1.0) -> int:
    """The graceful stop of a running application: its ingress answers new requests 503 +
    Retry-After while those in flight finish (up to `timeout`). Returns how many were still in
    flight when the timeout ended the wait (0: all finished; `stop` cuts those). It returns
    once nothing has been in flight for `quiet_s`: a request the proxy accepted just before the
    drain reaches the ingress within it (and is answered, not cut), and a load balancer polling
    /health sees the 503."""
    ingress = serve.get_app_handle(app)
    ingress.drain.remote().result()
    start = time.monotonic()
    idle_since = None
    while True:
        now = time.monotonic()
        active = ingress.in_flight.remote().result()
        if active > 0:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= quiet_s:
            return 0
        if now - start > timeout:
            return active
        time.sleep(0.1)


def stop(app: str, drain_timeout: float) -> int:
    """Drain the running application (`drain`), delete it, and give agp serve's exit status, as
    one process gives it (commands/serve.py exit_status): 0 when every request in flight was
    answered, 1 when the drain timeout cut some (their count logged).

    The drain timeout is waited once in all: the requests it leaves are cut at the ingress
    (`AgpIngress.cut`: each fails as in one process, and its replica's call ends) before the
    application is deleted, so that no replica waits for them again (Serve gives each stopping
    replica its graceful_shutdown_timeout_s, --drain-timeout, for the requests it still holds)."""
    log.info("draining: new requests get 503; those in flight get up to %gs", drain_timeout)
    cut = drain(app, drain_timeout)
    if cut:
        cut = serve.get_app_handle(app).cut.remote(
            f"the server shut down before this request finished (drain timeout {drain_timeout:g}s)").result()
    serve.delete(app)                            # its replicas hold no request: they stop at once
    if cut:
        log.warning("stopped; the drain timeout cut %d request(s) still in flight", cut)
        return 1
    log.info("stopped (drained)")
    return 0


def pipeline_device(args) -> str:
    """The pipeline's `device` setting (raises CheckFailed for a file that does not check)."""
    from pipeline_dsl.flow import load_graph

    from .build import pipeline_graph

    return str(load_graph(pipeline_graph(args), args.name).graph["settings"].get("device") or "auto")


def replica_gpus(device: str) -> float:
    """1 when the pipeline runs on CUDA (device cuda…, or auto on a cluster with GPUs), else 0:
    Ray shows an actor only the GPUs it reserved."""
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0


def parse(argv: list[str]) -> argparse.Namespace:
    """`agp serve` flags (with --ray) from an argument list."""
    from .options import add_arguments

    p = argparse.ArgumentParser(prog="agp serve", allow_abbrev=False)     # as the command's (cli.py)
    add_arguments(p)
    args, extra = p.parse_known_args([*argv, "--ray"])
    if extra:             # app_builder's keys: a ValueError for Ray to show, not argparse's exit
        raise ValueError(f"unrecognized agp serve arguments: {' '.join(extra)}")
    return args


def app_builder(config: dict):
    """For Ray's own CLI: `serve run pipeline_dsl.serve.ray:app_builder pipeline=FILE replicas=2
    max_replicas=4 ...`; every other key is an `agp serve` flag (dashes or underscores; true for
    a switch)."""
    from .options import SetupError, check_args

    config = dict(config)
    if "pipeline" not in config:
        raise ValueError("app_builder needs pipeline=FILE")
    argv = [str(config.pop("pipeline"))]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() == "true":
            argv.append(flag)
        elif str(value).lower() != "false":
            argv += [flag, str(value)]
    args = parse(argv)
    try:
        check_args(args)
    except SetupError as e:
        raise ValueError(str(e)) from None
    return build_app(args, replica_gpus(pipeline_device(args)))


class StartFailed(RuntimeError):
    """A replica's constructor raised a SetupError (`deploy`): the message is Serve's status of
    the AgpPipeline deployment, with the replica's traceback."""


def setup_failure(app: str) -> str | None:
    """Serve's message on the AgpPipeline deployment of `app` when a replica of it failed to start
    on a SetupError (a flag the pipeline cannot run with), else None."""
    try:
        message = serve.status().applications[app].deployments["AgpPipeline"].message
    except Exception:                           # noqa: BLE001 - not deployed yet
        return None
    return message.strip() if "SetupError: " in message else None


def deploy(target, name: str = APP, route_prefix: str = "/", every: float = 0.2,
           stopped: Callable[[], bool] = lambda: False) -> None:
    """Deploy `target` as the application `name` and return once it runs, or raise as `serve.run`
    does when its replicas do not start. Serve is asked not to wait (`serve.run_many`), and its
    status is polled here, in the caller's thread: no thread of agp's goes on calling Ray after this
    returns or raises (a Ray call after `ray.shutdown()` would start a new local cluster). A replica
    that fails on a SetupError would fail the same way each time Serve starts it again (up to 3
    times per replica, RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT, each a process that loads the model):
    its first failure raises StartFailed at once (`start_failure` reads it), and the caller deletes
    the application. A KeyboardInterrupt (Ctrl-C), or `stopped()` true at a poll (a stop signal
    `main` noted), deletes it here before a KeyboardInterrupt is raised: the cluster would go on
    deploying it (and serving it once it runs) after the command has exited."""
    try:
        serve.run_many([serve.RunTarget(target=target, name=name, route_prefix=route_prefix)],
                       wait_for_applications_running=False)
        while True:
            app = serve.status().applications.get(name)
            if app is None:
                raise RuntimeError(f"Waiting for application {name} to be RUNNING, but application doesn't exist.")
            if app.status == "RUNNING":
                return
            if (detail := setup_failure(name)) is not None:
                raise StartFailed(detail)
            if app.status == "DEPLOY_FAILED":   # serve.run's own message
                raise RuntimeError(f"Deploying application {name} failed: {app.message}")
            if stopped():
                raise KeyboardInterrupt
            time.sleep(every)
    except KeyboardInterrupt:
        log.warning("interrupted while deploying: deleting the application %r", name)
        serve.delete(name)
        raise


def start_failure(e: Exception, app: str = APP) -> tuple[int, str]:
    """Exit status and message when the replicas did not start: what a replica's constructor
    raised, from Serve's status (a SetupError is a flag the pipeline cannot run with: 2)."""
    if isinstance(e, StartFailed):
        detail = str(e)
    else:
        try:
            detail = serve.status().applications[app].deployments["AgpPipeline"].message.strip()
        except Exception:                       # noqa: BLE001 - no status: Serve's own message
            detail = ""
    if "SetupError: " in detail:
        return 2, detail.rsplit("SetupError: ", 1)[1]
    return 1, detail.splitlines()[-1] if detail else str(e)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


STARTS = 3                        # tries of a local cluster's start (init_cluster)


def init_cluster(**kw) -> None:
    """`ray.init(**kw)`, tried up to STARTS times: Ray gives a local node's raylet a fixed 30 s to
    register, and on a machine busy enough (every core held) the start fails with "timed out
    during startup" though a second one goes through. Any other failure is raised at once."""
    for attempt in range(1, STARTS + 1):
        try:
            ray.init(**kw)
            return
        except Exception as e:    # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e) or attempt == STARTS:
                raise
            ray.shutdown()
            log.warning("the local Ray cluster did not start in time (a busy machine?): starting it again (%d of %d)",
                        attempt + 1, STARTS)


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000       # agp serve's --host and --port when not given


def running_http_options():
    """The HTTP options (host, port, TLS files) of the Ray Serve already running on the cluster
    this process joined, from its controller, or None when Serve does not run there. They are the
    cluster's: `serve.start` on a running Serve keeps them and ignores new ones."""
    try:                                        # Ray has no public call for them: its controller's names
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    except ImportError:                         # another Ray's layout: start Serve as on a new cluster
        log.warning("this Ray does not say where a running Serve listens: --host/--port are asked of serve.start")
        return None
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:                          # no controller: Serve is not running
        return None
    return ray.get(controller.get_http_config.remote())


def served_address(args, running) -> tuple[str, int, str]:
    """(host, port, scheme) agp serves on when joining a cluster whose Serve already runs with the
    HTTP options `running` (`running_http_options`): Serve's own, as its proxies listen there
    whatever a later `serve.start` asks. Raises SetupError for a --host, --port or TLS certificate
    the user set (other than the defaults; --port 0 takes any port) that differs from Serve's."""
    from .logs import endpoint
    from .options import SetupError

    host, port, cert = running.host, running.port, running.ssl_certfile
    asked = []
    if args.port not in (0, DEFAULT_PORT, port):
        asked.append(f"--port {args.port}")
    if args.host not in (DEFAULT_HOST, host):
        asked.append(f"--host {args.host}")
    if args.ssl_certfile and args.ssl_certfile != cert:
        asked.append(f"--ssl-certfile {args.ssl_certfile}")
    if asked:
        raise SetupError(
            f"Ray Serve already runs on this cluster with its HTTP proxy on {endpoint(host, port)}"
            f"{' (TLS)' if cert else ''}, and its HTTP options hold for the whole cluster: {' and '.join(asked)} "
            f"cannot be served. Leave the flag out (or give --port {port}) to serve on Serve's port, "
            "or run `serve shutdown` on the cluster first to start Serve again with yours")
    return host, port, "https" if cert else "http"


def main(args) -> int:
    """`agp serve … --ray`: deploy, serve until SIGINT / SIGTERM, then drain and stop."""
    from pipeline_dsl.diagnostics import CheckFailed

    from .logs import endpoint, fatal
    from .options import SetupError, report

    try:
        device = pipeline_device(args)
    except CheckFailed as e:
        fatal(e.render())
        return 2
    started_here = not ray.is_initialized()
    if started_here:
        init_cluster(logging_level=logging.WARNING, include_dashboard=False)
    gpus = replica_gpus(device)
    running = running_http_options()
    if running is None:
        host, port, scheme = args.host, args.port or _free_port(args.host), "https" if args.ssl_certfile else "http"
        serve.start(proxy_location="EveryNode",
                    http_options={"host": host, "port": port, "ssl_keyfile": args.ssl_keyfile,
                                  "ssl_certfile": args.ssl_certfile,
                                  # its proxy's idle connections, in whole seconds (Ray's own default: 90 s)
                                  "keep_alive_timeout_s": math.ceil(args.keep_alive_timeout)},
                    logging_config=logging_config(args))
    else:                         # a cluster's Serve keeps the HTTP options it started with
        try:
            host, port, scheme = served_address(args, running)
            if APP in serve.status().applications:
                raise SetupError(
                    f"Ray Serve on this cluster already runs an application named {APP!r} (another "
                    "`agp serve --ray`?), which deploying would replace: stop that one first (SIGTERM to "
                    f"its agp serve, or `serve delete {APP}`)")
        except SetupError as e:
            report(str(e))
            if started_here:
                ray.shutdown()
            return 2
        if (host, port) != (args.host, args.port):
            log.warning("Ray Serve already runs on this cluster with its HTTP proxy on %s: serving there",
                        endpoint(host, port))
    # from here a stop signal (SIGINT, SIGTERM, or SIGHUP, which drains plain agp serve too) is only
    # noted and looked at: one while deploying deletes what was deployed (ray.init's own SIGTERM
    # handler exited, leaving the application deploying on), one once deployed drains it
    stopped = listening(STOP_SIGNALS)
    try:
        deploy(build_app(args, gpus), APP, "/", stopped=lambda: bool(stopped))   # answers under --root-path too
    except Exception as e:                      # noqa: BLE001 - Serve says why the replicas did not start
        code, why = start_failure(e)
        report(why if code == 2 else f"the application did not start: {why}")
        serve.delete(APP)
        if started_here:
            ray.shutdown()
        return code
    except KeyboardInterrupt:                   # a stop signal while deploying: deploy deleted the application
        if started_here:
            ray.shutdown()
        if not stopped:
            raise
        log.warning("stopped by %s before the application ran: nothing is left deployed",
                    signal.Signals(stopped[0]).name)
        return 0                                # as agp serve stopped while its model loads
    count = (f"{args.replicas or 1} replica(s)" if args.max_replicas is None else
             f"{1 if args.min_replicas is None else args.min_replicas}-{args.max_replicas} replicas "
             f"(autoscaling towards {args.target_ongoing_requests or DEFAULT_TARGET:g} requests in flight each)")
    log.info("agp serving pipeline %s on Ray Serve as %s at %s://%s%s/v1; prefix affinity %s",
             Path(args.pipeline).name, count, scheme, endpoint(host, port), args.root_path,
             f"on the first {args.affinity_chars} characters" if args.affinity_chars else "off")
    # a stop signal drains and deletes it (noted by a handler that takes no lock, heard whichever
    # thread it came to)
    wait_for_stop(stopped)
    try:
        return stop(APP, args.drain_timeout)
    finally:
        if started_here:
            ray.shutdown()
