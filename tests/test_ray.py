"""`agp serve --ray`: the flags without Ray, the routing key, and `agp serve --ray` as a process,
as users run it (a local Ray cluster of its own with two replicas of the tiny model behind Ray's
proxy), driven by the official `openai` client and httpx, this process joining its cluster for the
tests that reach into Ray (a second application, a replica killed mid-load). Routes answer with and
without --root-path, one GET /metrics covers both replicas (a `replica` label on every series) and
answers each scraper as one process does (the text format's version by Accept, gzip by
Accept-Encoding), and SIGTERM drains: new requests get 503 + Retry-After (not Ray's 404) while the
one in flight finishes, then exit 0. The cluster's tests are skipped only when Ray is not installed
(`pip install -e '.[ray]'`)."""

import asyncio
import gzip
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline_dsl import cli
from pipeline_dsl.stopping import wait_for_stop
from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from test_serve import TINY, _free_port

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 8                      # every answer of the load test: 8 tokens, ignore_eos
SHARED = "the cat and the world " * 14          # 308 characters: longer than --affinity-chars


def tiny_pipeline(path, model, max_batch_size=4):
    path.write_text(TINY.format(model=model, max_queue=1024, max_batch_size=max_batch_size, timeout=20))
    return path


# ---------------------------------------------------------------- without a cluster

def test_without_ray_the_flag_is_a_clean_error(monkeypatch, capsys, tmp_path, tiny_gguf):
    monkeypatch.setitem(sys.modules, "ray", None)               # import ray fails
    monkeypatch.delitem(sys.modules, "pipeline_dsl.serve.ray", raising=False)
    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    assert cli.main(["serve", str(path), "--ray", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "agp serve: error: Ray Serve is not installed" in err
    # the command installs Ray Serve itself (agp's `ray` extra): `pip install 'agp[ray]'` would
    # fetch PyPI's package named agp, another project, and not this one's extra
    assert "pip install 'ray[serve]" in err and "agp[ray]" not in err
    assert "Traceback" not in err


def test_serve_help_names_the_install_command_of_ray_serve(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "scaling out on Ray Serve (pip install 'ray[serve]" in out and "agp[ray]" not in out


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--max-replicas", "2"], "--max-replicas needs --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1, not 0"),
    (["--ray", "--min-replicas", "1"], "autoscaling needs --max-replicas"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is more than --max-replicas (2)"),
    (["--ray", "--replicas", "5", "--max-replicas", "4"], "--replicas (5) must lie between"),
    (["--ray", "--max-replicas", "2", "--target-ongoing-requests", "0"], "--target-ongoing-requests must be positive"),
    (["--ray", "--affinity-chars", "-1"], "--affinity-chars must be at least 0"),
    (["--ray", "--trace", "t.json"], "--trace records one process"),
])
def test_bad_scaling_flags_exit_2_naming_the_flag(flags, message, capsys, tmp_path, tiny_gguf):
    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    assert cli.main(["serve", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert f"agp serve: error: {message}" in err and "Traceback" not in err


def test_the_routing_key_is_the_prompt_prefix():
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    key = on_ray.affinity_key
    assert key(b'{"prompt": "abcdef", "max_tokens": 3}', 4) == "abcd"
    assert key(b'{"prompt": ["abcdef", "xyz"]}', 3) == "abc"                 # a batch: its first prompt
    assert key(b'{"prompt": [[5, 6, 7]]}', 100) == "5 6 7"
    assert key(b'{"prompt": [5.0, 6.0, 7]}', 100) == "5 6 7"               # whole floats: ids, as read
    chat = b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}'
    assert key(chat, 100) == "system\nBe brief.\nuser\nHi\n"
    assert key(chat, 100) == key(chat.replace(b'"Hi"', b'[{"type": "text", "text": "Hi"}]'), 100)
    assert key(b'{"prompt": ', 100) is None and key(b'[1]', 100) is None and key(b'{"prompt": "a"}', 0) is None
    # a compressed body (Content-Encoding) has the key of its JSON, as the replica reads it; one
    # it refuses (another coding, a corrupt body, more than the limit decoded) has none
    plain = b'{"prompt": "abcdef", "max_tokens": 3}'
    assert key(gzip.compress(plain), 4, "gzip") == key(zlib.compress(plain), 4, "deflate") == "abcd"
    assert key(gzip.compress(plain), 4, "GZIP", limit=len(plain)) == "abcd"
    assert key(gzip.compress(plain), 4, "gzip", limit=len(plain) - 1) is None
    assert key(plain, 4, "br") is None and key(plain, 4, "gzip") is None and key(plain, 4, "identity") == "abcd"
    # rendezvous hashing: a key keeps its replica when another replica comes or goes
    ids = ["r1", "r2", "r3", "r4"]
    for k in ("a", "b", "c", "d", "e", "f"):
        best = on_ray.rank(k, ids)[0]
        assert on_ray.rank(k, [i for i in ids if i != best])[0] == on_ray.rank(k, ids)[1]
        other = next(i for i in ids if i != best)
        assert on_ray.rank(k, [i for i in ids if i != other])[0] == best
    assert len({on_ray.rank(str(i), ids)[0] for i in range(40)}) == 4   # keys spread over replicas


def test_scaling_flags_become_serve_options(tmp_path, tiny_gguf):
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    fixed = on_ray.pipeline_options(on_ray.parse([str(path), "--replicas", "3", "--threads", "2"]))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert fixed["request_router_config"].request_router_class.endswith("PrefixAffinityRouter")
    # a stopping replica gets --drain-timeout, and looks more often than Serve's 2 s whether its requests finished
    assert fixed["graceful_shutdown_timeout_s"] == 60 and fixed["graceful_shutdown_wait_loop_s"] < 2
    auto = on_ray.pipeline_options(on_ray.parse([str(path), "--min-replicas", "0", "--max-replicas", "4",
                                                 "--target-ongoing-requests", "16"]))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 16}
    assert on_ray.app_builder({"pipeline": str(path), "replicas": "2", "no_prefix_reuse": "true"}) is not None
    with pytest.raises(ValueError, match="--min-replicas \\(3\\) is more than --max-replicas \\(2\\)"):
        on_ray.app_builder({"pipeline": str(path), "min_replicas": 3, "max_replicas": 2})


def test_app_builders_keys_are_whole_flags(tmp_path, tiny_gguf):
    """Ray's app_builder read keep=5 (llama.cpp's --keep) as --keep-alive-timeout 5, an abbreviation."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    with pytest.raises(ValueError, match="^unrecognized agp serve arguments: --keep 5$"):
        on_ray.app_builder({"pipeline": str(path), "keep": 5})
    assert on_ray.parse([str(path), "--keep-alive-timeout", "5"]).keep_alive_timeout == 5


class Ingress:
    """A stand-in for the ingress's Serve handle (its drain, in_flight and cut calls), with
    `in_flight` requests that never finish, and what became of the application: `held`, the
    requests still in flight when it was deleted (a replica that holds one waits for it)."""

    def __init__(self, in_flight: int):
        self.count, self.draining, self.deleted, self.held, self.reason = in_flight, False, False, None, None
        self.drain = self.Call(self._drain)
        self.in_flight = self.Call(lambda: self.count)
        self.cut = self.Call(self._cut)

    def _drain(self):
        self.draining = True

    def _cut(self, reason):
        cut, self.count, self.reason = self.count, 0, reason
        return cut

    def delete(self, app):
        self.deleted, self.held = app == "agp", self.count

    class Call:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            value = self.fn(*args)
            return type("Response", (), {"result": lambda _self: value})()


@pytest.mark.parametrize("in_flight, status", [(0, 0), (3, 1)])
def test_a_drain_whose_timeout_cuts_requests_exits_1_naming_how_many_as_one_process_does(
        in_flight, status, monkeypatch, caplog):
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    ingress = Ingress(in_flight)
    monkeypatch.setattr(on_ray.serve, "get_app_handle", lambda app: ingress if app == on_ray.APP else None)
    monkeypatch.setattr(on_ray.serve, "delete", ingress.delete)
    caplog.set_level(logging.INFO, logger="agp.serve")
    assert on_ray.stop(on_ray.APP, drain_timeout=0.2) == status
    assert ingress.draining and ingress.deleted
    # the drain timeout is waited once: what it left was cut before the application went, so no replica
    # holds a request when Serve stops it (it would give each --drain-timeout again)
    assert ingress.held == 0
    said = [r.getMessage() for r in caplog.records if r.name == "agp.serve"]
    if in_flight:
        assert "stopped; the drain timeout cut 3 request(s) still in flight" in said
        assert ingress.reason == "the server shut down before this request finished (drain timeout 0.2s)"
    else:
        assert said[-1] == "stopped (drained)" and not any("cut" in line for line in said)
        assert ingress.reason is None


class StuckReplicas:
    """A stand-in for the AgpPipeline handle: each call's replica sends the `sent` messages of its
    answer, then holds the rest; `cancelled` counts the calls let go."""

    def __init__(self, *answers):
        self.answers, self.cancelled = list(answers), 0
        self.asgi = self

    def options(self, **_):
        return self

    def remote(self, request, body, affinity=None):
        handle, sent = self, self.answers.pop(0)

        class Call:
            def __aiter__(self):
                return self

            async def __anext__(self):
                nonlocal sent
                if sent:
                    batch, sent = sent, []
                    return batch
                await asyncio.Event().wait()             # the rest never comes

            def cancel(self):
                handle.cancelled += 1
        return Call()


def test_the_ingress_cuts_the_requests_a_drain_timeout_left_as_one_process_does_and_lets_their_replicas_go():
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    stream_start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    first = {"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True}
    # a client that goes away; a stream under way; an answer not started
    replicas = StuckReplicas([], [stream_start, first], [])
    written = on_ray.AgpIngress.func_or_class.__bases__[0]      # the class as written, below Serve's ASGI wrapper
    ingress = written(replicas, 0, 1 << 20, 30.0)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-length", str(len(body)).encode())]}

    async def client(out: list):
        async def receive():
            if not out:
                out.append(None)
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            out.append(message)
        await ingress.forward(scope, receive, send)

    async def main():
        gone, a, b = [], [], []
        leaving = asyncio.ensure_future(client(gone))
        while ingress.in_flight() < 1:
            await asyncio.sleep(0.01)
        leaving.cancel()                              # its client went away: its replica's call ends, no answer
        await asyncio.wait({leaving})
        assert replicas.cancelled == 1 and ingress.in_flight() == 0 and gone == [None]
        clients = [asyncio.ensure_future(client(a)), asyncio.ensure_future(client(b))]
        while ingress.in_flight() < 2 or len(a) < 3:
            await asyncio.sleep(0.01)
        assert await ingress.cut("the server shut down before this request finished (drain timeout 5s)") == 2
        assert all(c.done() for c in clients) and ingress.in_flight() == 0
        return a[1:], b[1:]

    stream, unanswered = asyncio.run(main())
    assert replicas.cancelled == 3                  # each replica's call ended: it holds nothing to wait for
    # the stream ends with an error event and [DONE]; the request not answered yet gets a 503
    assert stream[0]["status"] == 200 and stream[1] == first and stream[2]["more_body"] is False
    events = stream[2]["body"].decode().split("\n\n")
    assert events[1] == "data: [DONE]"
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and "drain timeout 5s" in error["message"]
    assert unanswered[0]["status"] == 503 and (b"retry-after", b"1") in unanswered[0]["headers"]
    assert "drain timeout 5s" in json.loads(unanswered[1]["body"])["error"]["message"]


# a signal raised at each line the main thread runs once agp serve --ray's handlers are in place, in
# turn: in the wait, and in whatever it calls (threading's Event.wait holds the Event's lock at some)
SIGNAL_AT_EACH_LINE = """
import signal, sys
from pipeline_dsl.stopping import listening, wait_for_stop

def before(sig, frame):          # the wait's own handlers are not in place yet
    pass

n, every = 0, False
while not every:                 # the n-th line it runs (the first time it runs it), until none is new
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, before)
    lines, ran = set(), [0]

    def trace(frame, event, arg):
        global every
        if event == "line" and signal.getsignal(signal.SIGTERM) is not before:
            ran[0] += 1
            if (frame.f_code, frame.f_lineno) not in lines:
                lines.add((frame.f_code, frame.f_lineno))
                if len(lines) == n + 1:
                    signal.raise_signal(signal.SIGTERM)
            elif ran[0] == 5000:     # the wait has run every line it runs: all were tried
                every = True
                signal.raise_signal(signal.SIGTERM)
        return trace

    sys.settrace(trace)
    try:
        got = wait_for_stop(listening((signal.SIGINT, signal.SIGTERM)), 0.001)
    finally:
        sys.settrace(None)
    assert got == signal.SIGTERM, got
    n += 1
print("heard at each of", n - 1, "lines")
"""


def test_the_stop_signal_of_a_running_application_is_heard_wherever_the_main_thread_is_in_its_wait():
    """Once deployed, agp serve --ray waits on its main thread for SIGTERM or SIGINT. Its handler
    set a threading.Event the main thread was waiting on in Event.wait(0.5): a signal handled
    while that thread held the Event's lock (a plain Lock, held across lines of Event.wait)
    waited for that lock for good, and the application was never drained or deleted. Here the
    signal comes at each line of the wait in turn, and each one is heard."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    assert on_ray.wait_for_stop is wait_for_stop      # the wait tried here (without importing Ray again)
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT_EACH_LINE], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "heard at each of" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_while_deploying_deletes_the_application_and_exits_0(sig, tmp_path, tiny_gguf, monkeypatch):
    """SIGTERM, SIGHUP or Ctrl-C while agp serve --ray waits for its replicas: the application it
    was deploying is deleted before it exits (0, as agp serve stopped while its model loads), not
    left deploying on the cluster (ray.init's own SIGTERM handler exited at once; SIGHUP killed)."""
    import types

    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    serve = on_ray.serve
    args = on_ray.parse([str(tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)), "--threads", "1"])
    deleted, polls = [], []

    def status():                           # deploying; the signal comes at the first poll
        polls.append(1)
        if len(polls) == 1:
            signal.raise_signal(sig)
        app = types.SimpleNamespace(status="DEPLOYING", message="", deployments={})
        return types.SimpleNamespace(applications={on_ray.APP: app})

    monkeypatch.setattr(on_ray.ray, "is_initialized", lambda: True)       # a cluster it joined
    monkeypatch.setattr(on_ray, "running_http_options", lambda: None)
    monkeypatch.setattr(on_ray, "build_app", lambda args, gpus: "the app")
    monkeypatch.setattr(on_ray, "setup_failure", lambda name: None)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run_many", lambda targets, **kw: None)
    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(serve, "delete", lambda name, **kw: deleted.append(name))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert on_ray.main(args) == 0
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert deleted == [on_ray.APP] and len(polls) == 1


def test_a_local_cluster_that_times_out_starting_is_started_again_and_other_failures_are_not(monkeypatch, caplog):
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    calls, shutdowns = [], []
    outcomes = [Exception("The current node timed out during startup. This could happen because ..."), None]

    def init(**kw):
        calls.append(kw)
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    monkeypatch.setattr(on_ray.ray, "init", init)
    monkeypatch.setattr(on_ray.ray, "shutdown", lambda: shutdowns.append(1))
    caplog.set_level(logging.WARNING, logger="agp.serve")
    on_ray.init_cluster(num_cpus=2)
    assert calls == [{"num_cpus": 2}, {"num_cpus": 2}] and shutdowns == [1]
    assert any("did not start in time" in r.getMessage() for r in caplog.records)

    outcomes[:] = [RuntimeError("bad address"), None]
    with pytest.raises(RuntimeError, match="bad address"):
        on_ray.init_cluster()
    assert len(calls) == 3 and shutdowns == [1]

    outcomes[:] = [Exception("timed out during startup")] * on_ray.STARTS
    with pytest.raises(Exception, match="timed out during startup"):
        on_ray.init_cluster()
    assert len(calls) == 3 + on_ray.STARTS


@pytest.mark.parametrize("level", ["critical", "error", "warning", "info", "debug"])
def test_ray_serves_deployments_log_at_the_log_level_and_write_no_access_line_of_their_own(level, tmp_path,
                                                                                         tiny_gguf):
    """agp logs each request itself (--access-log / --no-access-log): Ray Serve's access line
    for every request of every deployment is off, and its own lines follow --log-level."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    from ray.serve.schema import LoggingConfig

    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    args = on_ray.parse([str(path), "--log-level", level, "--no-access-log"])
    config = LoggingConfig(**on_ray.logging_config(args))          # Ray's own check of the fields
    assert config.enable_access_log is False and config.log_level == level.upper()
    assert on_ray.pipeline_options(args)["logging_config"] == on_ray.logging_config(args)
    assert on_ray.logging_config(on_ray.parse([str(path)]))["enable_access_log"] is False   # agp's log is on


@pytest.mark.parametrize("flags, served", [
    ([], ("127.0.0.1", 8123, "http")),                            # --port left at its default: Serve's port
    (["--port", "0"], ("127.0.0.1", 8123, "http")),               # any port: Serve's
    (["--port", "8123", "--host", "127.0.0.1"], ("127.0.0.1", 8123, "http")),
    (["--port", "9000"], "--port 9000 cannot be served"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 cannot be served"),
    (["--port", "9000", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"], "--port 9000 and --ssl-certfile c.pem"),
])
def test_joining_a_running_serve_serves_on_its_port_or_refuses_another(flags, served, tmp_path, tiny_gguf):
    """Ray Serve's HTTP options hold for its whole cluster (a later serve.start keeps them): agp
    serves on Serve's port when the flags leave it open, and refuses a --port, --host or TLS
    certificate it would not be served on, naming both."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    from ray.serve.config import HTTPOptions

    from pipeline_dsl.serve.options import SetupError

    running = HTTPOptions(host="127.0.0.1", port=8123)
    args = on_ray.parse([str(tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)), *flags])
    if isinstance(served, tuple):
        assert on_ray.served_address(args, running) == served
        return
    with pytest.raises(SetupError) as e:
        on_ray.served_address(args, running)
    assert served in str(e.value)
    assert "its HTTP proxy on 127.0.0.1:8123" in str(e.value) and "--port 8123" in str(e.value)


def test_a_ray_without_the_controllers_names_starts_serve_as_on_a_new_cluster(monkeypatch, caplog):
    """Where a running Serve listens is read through Ray's controller names, which Ray keeps out of
    its public API: a Ray laid out otherwise gets a warning and the start of a new cluster (agp's
    --host and --port asked of serve.start), not an ImportError out of `agp serve --ray`."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    monkeypatch.setitem(sys.modules, "ray.serve._private.constants", None)   # import fails
    with caplog.at_level(logging.WARNING, logger="agp.serve"):
        assert on_ray.running_http_options() is None
    assert "does not say where a running Serve listens" in caplog.text


class Actor:
    """A stand-in for a replica's actor handle: its `__ray_ready__` answers, raises what Ray
    raises for a dead or an unreachable actor, or never answers."""

    def __init__(self, outcome=None):
        self.outcome, self.pings = outcome, 0
        self.__ray_ready__ = self

    async def _ping(self):
        self.pings += 1
        if self.outcome == "hangs":
            await asyncio.Event().wait()
        if self.outcome is not None:
            raise self.outcome
        return True

    def remote(self):
        return self._ping()


def test_the_metrics_hub_forgets_a_replica_whose_actor_died_at_the_next_scrape(monkeypatch):
    """A replica killed mid-load left its last series on the merged /metrics for STALE_S (15 s):
    the hub learnt of a death only from the silence. It asks Ray at each scrape whether each
    replica's actor lives: a dead one's series go at once (and a push it sent before dying,
    arriving after, does not bring them back); one unreachable for now, or slow to answer, stays,
    and silence still drops a replica after STALE_S."""
    pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from pipeline_dsl.serve import ray_metrics

    monkeypatch.setattr(ray_metrics, "PING_S", 0.05)
    now = [0.0]
    hub = ray_metrics.AgpMetrics.func_or_class(clock=lambda: now[0])
    actors = {"alive": Actor(), "dead": Actor(ActorDiedError()),
              "unreachable": Actor(ActorUnavailableError("unreachable", None)), "slow": Actor("hangs")}
    for name, actor in actors.items():
        assert hub.put(name, f"{name} 1\n", actor)       # the hub holds the handle: later pushes leave it out
    assert hub.put("alive", "alive 1\n")
    assert not hub.put("unknown", "unknown 1\n")         # no actor handle (asked for again); only silence drops it
    assert sorted(asyncio.run(hub.collect())) == ["alive", "slow", "unknown", "unreachable"], "the dead one stays"
    assert all(a.pings == 1 for a in actors.values())
    hub.put("dead", "dead 2\n", actors["dead"])          # sent before it died
    assert "dead" not in asyncio.run(hub.collect())
    assert actors["dead"].pings == 1                      # and no longer asked after
    now[0] = ray_metrics.STALE_S + 1
    hub.put("alive", "alive 2\n", actors["alive"])
    assert asyncio.run(hub.collect()) == {"alive": "alive 2\n"}


def test_a_push_a_stopped_replica_sent_before_its_goodbye_does_not_bring_its_series_back():
    """A stopping replica cancels its pusher and says goodbye (drop); a push it sent before,
    reaching the hub after the goodbye, put its series back on /metrics, where they stayed for
    STALE_S (its handle, which the hub no longer held, not sent again). A replica that was only
    silent past STALE_S still comes back with its next push."""
    pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)
    from pipeline_dsl.serve import ray_metrics

    now = [0.0]
    hub = ray_metrics.AgpMetrics.func_or_class(clock=lambda: now[0])
    assert hub.put("stopped", "stopped 1\n", Actor()) and hub.put("silent", "silent 1\n", Actor())
    hub.drop("stopped")
    hub.put("stopped", "stopped 2\n")                    # sent before the goodbye, arriving after it
    assert asyncio.run(hub.collect()) == {"silent": "silent 1\n"}
    now[0] = ray_metrics.STALE_S + 1
    assert asyncio.run(hub.collect()) == {}
    assert not hub.put("silent", "silent 2\n")           # back, and asks for its handle again
    assert asyncio.run(hub.collect()) == {"silent": "silent 2\n"}


# ---------------------------------------------------------------- a local Ray cluster

HOLD = "hold until "
def test_a_stopping_replica_tells_the_metrics_hub_without_waiting_for_a_hub_that_goes_too():
    """A replica's stop tells the hub to forget its series (a scale down: the hub lives), but
    waits for no answer: when the application is deleted the hub stops with it, and the call waited
    for a hub that was gone, 2 s of every stop of `agp serve --ray`."""
    on_ray = pytest.importorskip("pipeline_dsl.serve.ray", exc_type=ImportError)

    class Gone:                                     # the hub's answer, which never comes
        awaited = False

        def __await__(self):
            Gone.awaited = True
            yield from asyncio.Event().wait().__await__()

    class Hub:
        dropped: list[str] = []

        class drop:
            @staticmethod
            def remote(replica):
                Hub.dropped.append(replica)
                return Gone()

    written = on_ray.AgpPipeline.func_or_class

    class Stopping(written):
        def __del__(self):                          # Python's finalizer; Serve awaits the class's own
            pass

    replica = Stopping.__new__(Stopping)

    async def stop():
        replica.hub, replica.replica = Hub(), b"r1"
        replica.pusher = asyncio.ensure_future(asyncio.Event().wait())
        await asyncio.wait_for(written.__del__(replica), 30)
        await asyncio.wait({replica.pusher})
        return replica.pusher.cancelled()              # it stopped pushing

    assert asyncio.run(stop())
    assert Hub.dropped == ["r1"] and not Gone.awaited


HOLDS = f'''import os
import time


def hold(item):
    prompt = item.get("prompt")
    if isinstance(prompt, str) and prompt.startswith({HOLD!r}):
        path = prompt[len({HOLD!r}):]
        open(path + ".held", "w").close()
        while not os.path.exists(path):
            time.sleep(0.05)
    return item
'''


def _wait(predicate, what: str, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(every)


class Cluster:
    def __init__(self, url: str, ray, proc: subprocess.Popen, folder: Path):
        self.url, self.ray, self.proc, self.folder = url, ray, proc, folder
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def kill_replica(self, replica_id: str) -> None:
        """End a replica's actor at once, as a crashed process or a lost node would."""
        from ray.util import list_named_actors

        names = [a["name"] for a in list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith("#" + replica_id)]
        assert len(names) == 1, names
        self.ray.kill(self.ray.get_actor(names[0], namespace="serve"), no_restart=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_gguf, ray_turn):
    """`agp serve --ray` as a process, on a local cluster of its own, and this process joined to
    that cluster (one cluster for every test of the module: each start is half a minute of
    processes importing Ray, torch and the model)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'ray[serve]')")
    d = tmp_path_factory.mktemp("ray")
    # a request whose prompt is HOLD + a file's path waits in the `hold` stage until the test
    # makes the file (`hold` writes PATH.held first): in flight at SIGTERM for as long as the test needs
    (d / "holds.py").write_text(HOLDS)
    text = TINY.format(model=tiny_gguf, max_queue=1024, max_batch_size=4, timeout=20)
    text = text.replace("    request -> batch\n", "    stage hold    : python        { fn = \"holds:hold\" }\n"
                                                   "    request -> hold -> batch\n")
    assert "request -> hold -> batch" in text
    (d / "tiny.agp").write_text(text)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    # CPUs for its two replicas and the one of each application the tests deploy beside it, whatever
    # the machine's count (Ray's own override of a node's resources)
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": 4, "object_store_memory": 100 << 20})
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "serve", str(d / "tiny.agp"), "--ray",
                             "--replicas", "2", "--threads", "1", "--root-path", "/llm", "--port", str(port),
                             "--stats-interval", "0", "--drain-timeout", "60"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, (d / "serve.log").read_text()
        try:
            return httpx.get(url + "/llm/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def serving():                   # logged once serve.run returned: every replica is running
        return healthy() and "agp serving pipeline" in (d / "serve.log").read_text()

    import ray
    try:
        _wait(serving, "agp serve --ray did not come up", timeout=240, every=0.25)
        with pytest.MonkeyPatch.context() as mp:      # the local cluster (the one running), not RAY_ADDRESS's
            mp.delenv("RAY_ADDRESS", raising=False)
            ray.init(address="auto", logging_level="warning", log_to_driver=False)
        from ray import serve
        assert "agp" in serve.status().applications, "this process joined another cluster than agp serve's"
        yield Cluster(url, ray, proc, d)
    finally:
        ray.shutdown()              # this process leaves the cluster before the agp serve process ends it
        (d / "release").touch()     # a request the SIGTERM test held, should it have failed before its release
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_routes_answer_with_and_without_the_root_path_and_metrics_cover_every_replica(cluster):
    url = cluster.url
    replicas = set()

    def complete(base, i):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        raw = client.completions.with_raw_response.create(model="tiny", prompt=f"request {i} here", max_tokens=4,
                                                          extra_body={"ignore_eos": True})
        assert raw.parse().usage.completion_tokens == 4
        replicas.add(raw.headers["x-agp-replica"])

    threads = [threading.Thread(target=complete, args=(url + ("/llm/v1" if i % 2 else "/v1"), i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(replicas) == 2, replicas

    def merged():
        text = httpx.get(url + "/llm/metrics", timeout=30).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        done = [s for s in fams["vllm:request_success"].samples if s.name.endswith("_total")]
        by_replica = {s.labels["replica"] for s in done if s.value > 0}
        return fams if sum(s.value for s in done) >= 16 and by_replica == replicas else None

    fams = _wait(merged, "one /metrics does not show both replicas' requests", timeout=60, every=0.5)
    running = fams["vllm:num_requests_running"].samples
    assert {s.labels["replica"] for s in running} == replicas and all(s.labels["engine"] == "0" for s in running)
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200             # the bare path too


PROMETHEUS_3 = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
                "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;"
                "q=0.3,*/*;q=0.2")


@pytest.mark.parametrize("accept, accept_encoding, content_type", [
    (None, None, "text/plain; version=0.0.4; charset=utf-8"),                             # curl, a probe
    (PROMETHEUS_3, "gzip", "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
    ("text/plain;version=1.0.0", "gzip;q=0, identity", "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    ("*/*", "deflate, gzip;q=0.8", "text/plain; version=0.0.4; charset=utf-8"),
])
def test_the_merged_metrics_answer_each_scraper_as_one_process_does(cluster, accept, accept_encoding,
                                                                    content_type):
    """The ingress's /metrics negotiates as `agp serve`'s: the text format's version by Accept (0.0.4
    to a plain scrape, 1.0.0 when listed), gzip when Accept-Encoding takes it, `Vary` naming both."""
    url = cluster.url
    with httpx.Client(timeout=30) as scraper:
        del scraper.headers["accept"], scraper.headers["accept-encoding"]           # httpx's own
        headers = {k: v for k, v in (("accept", accept), ("accept-encoding", accept_encoding)) if v is not None}
        with scraper.stream("GET", url + "/llm/metrics", headers=headers) as r:
            raw = b"".join(r.iter_raw())
        assert r.request.headers.get("accept") == accept
    gzipped = accept_encoding is not None and "gzip;q=0," not in accept_encoding
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    assert {v.strip().lower() for v in r.headers["vary"].split(",")} >= {"accept", "accept-encoding"}
    assert r.headers.get("content-encoding") == ("gzip" if gzipped else None)
    assert int(r.headers["content-length"]) == len(raw)
    fams = {f.name: f for f in text_string_to_metric_families((gzip.decompress(raw) if gzipped else raw).decode())}
    assert [s.name for s in fams["vllm:prompt_tokens"].samples] == ["vllm:prompt_tokens_total"] * 2   # both replicas
    assert len({s.labels["replica"] for s in fams["vllm:prompt_tokens"].samples}) == 2


def test_the_ingress_refuses_what_one_process_refuses_huge_bodies_and_headers_and_deep_json(cluster):
    """As one process: a Content-Length past --max-body-bytes is a 413 before any of the body is
    read (the ingress waited for the body, a 408 after --body-timeout), headers past 16 KiB a 431
    (answered 200), and JSON nested past the limit a 400 from the replica (the ingress's routing
    key read raised RecursionError: a 500)."""
    url = cluster.url
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10737418240\r\n\r\n{")
        c.settimeout(60)
        answer = b""
        while b"body_too_large" not in answer and (chunk := c.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"has 10737418240 bytes; at most 4194304 are accepted (--max-body-bytes)" in answer
    r = httpx.get(url + "/health", headers={"x-big": "a" * (20 << 10)}, timeout=30)      # Ray's proxy takes any size
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large", r.text[:300]
    assert httpx.get(url + "/health", headers={"x-fine": "a" * (12 << 10)}, timeout=30).status_code == 200
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(url + "/v1/completions", content=nested, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nested more than" in r.json()["error"]["message"], r.text[:300]


def serve_beside(args) -> tuple[int | None, bool]:
    """`agp serve --ray` (its main) in this process, on the cluster it has joined: its exit status
    (None when it raised: one that deployed fails at setting its signal handlers, which only the
    main thread may), and whether it still runs after two minutes."""
    from pipeline_dsl.serve import ray as on_ray

    outcome = {}
    t = threading.Thread(target=lambda: outcome.setdefault("code", on_ray.main(args)), daemon=True)
    t.start()
    t.join(120)
    return outcome.get("code"), t.is_alive()


def test_a_second_agp_serve_on_the_cluster_refuses_another_port_and_the_same_application(cluster, tmp_path,
                                                                                           tiny_gguf, capsys):
    """Ray Serve already runs on the cluster with its proxy on the fixture's port: a --port that
    differs would never be listened on (it said it served there), and the same port would replace
    the application `agp` already deployed. Both exit 2 before deploying anything, and the first
    application serves on."""
    from ray import serve

    from pipeline_dsl.serve import ray as on_ray

    port = int(cluster.url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        other = s.getsockname()[1]
    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    flags = [str(path), "--threads", "1", "--stats-interval", "0", "--log-level", "warning"]
    assert serve_beside(on_ray.parse([*flags, "--port", str(other)])) == (2, False)
    err = capsys.readouterr().err
    assert f"agp serve: error: Ray Serve already runs on this cluster with its HTTP proxy on 127.0.0.1:{port}" in err
    assert f"--port {other} cannot be served" in err and "Traceback" not in err
    assert serve_beside(on_ray.parse([*flags, "--port", str(port)])) == (2, False)
    err = capsys.readouterr().err
    assert "agp serve: error: Ray Serve on this cluster already runs an application named 'agp'" in err
    assert "serve delete agp" in err and "Traceback" not in err
    assert serve.status().applications["agp"].status == "RUNNING"
    r = cluster.client.completions.create(model="tiny", prompt="still here", max_tokens=2,
                                          extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def expected_texts(model, requests: list[dict]) -> list[str]:
    """What one engine in this process answers to each request (prompt= or messages=)."""
    e = Engine(EngineConfig(model=str(model), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8,
                            batch_timeout_s=0.0))
    for i, inputs in enumerate(requests):
        e.add_request(str(i), params=SamplingParams(max_tokens=TOKENS, ignore_eos=True), **inputs)
    texts = {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                texts[out.request_id] = out.text
    return [texts[str(i)] for i in range(len(requests))]


def test_32_requests_on_two_replicas_with_prefix_affinity(cluster, tiny_gguf):
    client = cluster.client

    def complete(prompt):
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=TOKENS,
                                                          extra_body={"ignore_eos": True})
        r = raw.parse()
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == TOKENS
        return raw.headers["x-agp-replica"], r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    def chat(content):
        with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=TOKENS, stream=True,
                extra_body={"ignore_eos": True}) as resp:
            replica = resp.headers["x-agp-replica"]
            chunks = list(resp.parse())
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == ["length"]
        return replica, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), 0

    prompts = [f"hello {i} world" for i in range(16)]
    chats = [f"the cat {i} is here" for i in range(8)]
    shared = [SHARED + f"and then {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:                 # concurrent: distinct prompts spread by load and key
        got = list(pool.map(complete, prompts)) + list(pool.map(chat, chats))
    got += [complete(p) for p in shared]                 # one after another: affinity alone decides
    want = expected_texts(tiny_gguf, [{"prompt": p} for p in prompts] +
                          [{"messages": [{"role": "user", "content": c}]} for c in chats] +
                          [{"prompt": p} for p in shared])
    assert len(got) == 32
    assert [text for _, text, _ in got] == want         # every answer, token for token
    assert all(want), want
    assert len({replica for replica, _, _ in got}) == 2, "both replicas served"
    on_shared = {replica for replica, _, _ in got[24:]}
    assert len(on_shared) == 1, f"requests sharing a prefix went to {on_shared}"
    assert all(cached > 0 for _, _, cached in got[25:])   # so each found the shared prefix in the KV cache


def holding_replica(url: str) -> str | None:
    """The replica with a request in its `hold` stage, by the application's /metrics (every
    replica's series, labelled; GET /stats would answer from the least loaded replica)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    held = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("agp_stage_items_in", "agp_stage_items_out"):
            for sample in fam.samples:
                if sample.name.endswith("_total") and sample.labels["stage"] == "hold":
                    sign = 1 if fam.name == "agp_stage_items_in" else -1
                    held[sample.labels["replica"]] = held.get(sample.labels["replica"], 0) + sign * sample.value
    return next((replica for replica, count in held.items() if count > 0), None)


def replicas_alone(on_ray, args):
    """The application's AgpPipeline deployment alone (what `build_app` binds, without the ingress
    and the metrics hub): what `deploy` watches, and the deploy tests' only need. The other two
    are each a process that imports Ray Serve and agp on a machine the fixture's cluster already
    keeps busy: with them a failing replica took 17-18 s to report on 2 busy cores, alone 10-11 s."""
    return on_ray.AgpPipeline.options(**on_ray.pipeline_options(args)).bind(on_ray.replica_options(args))


def test_a_flag_the_replicas_cannot_start_with_is_named_at_the_first_failure(cluster, tmp_path, tiny_gguf):
    """A SetupError fails a replica the same way each time Serve starts it again (3 times per
    replica by default, each a process that loads the model): `deploy` reports the first."""
    from ray import serve

    from pipeline_dsl.serve import ray as on_ray

    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    # checked by the replica; --drain-timeout: the replicas Serve starts again meanwhile stop within 1 s once
    # deleted (beside the next test), not when their start is over
    args = on_ray.parse([str(path), "--threads", "1", "--max-model-len", "100000", "--drain-timeout", "1"])
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError) as e:
        on_ray.deploy(replicas_alone(on_ray, args), "agp-bad", "/bad")
    try:
        # nothing of deploy's goes on calling Ray once it raised: `agp serve --ray` shuts Ray down
        # next, and a Ray call after that starts a second local cluster in the exiting process
        left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
        assert left == [], f"deploy raised with threads of its own still running: {left}"
        status = serve.status().applications["agp-bad"].status
        assert status != "DEPLOY_FAILED", "agp waited out Serve's retries of a replica that fails on a flag"
        assert on_ray.start_failure(e.value, app="agp-bad") == (
            2, "--max-model-len 100000 is beyond the model's context of 512 tokens; set at most 512 or leave it out")
    finally:
        # not waited for: its replicas' stop goes on beside the test after this one
        serve.delete("agp-bad", _blocking=False)


def test_ctrl_c_while_deploying_deletes_the_application_it_was_deploying(cluster, tmp_path, tiny_gguf, monkeypatch):
    """Ctrl-C while `agp serve --ray` waits for its replicas (`deploy`): on a cluster it joined,
    the application it was deploying is deleted before the command exits, not left deploying on
    (and serving once it runs). The KeyboardInterrupt comes where a SIGINT's would, in the main
    thread while deploy polls Serve's status, at the first poll that finds the application (a
    thread's interrupt_main raced the deploy on a busy machine: it could come after deploy returned)."""
    from ray import serve

    from pipeline_dsl.serve import ray as on_ray

    path = tiny_pipeline(tmp_path / "tiny.agp", tiny_gguf)
    # --drain-timeout: how long Serve gives each replica to stop; the delete waits for the ones still starting
    args = on_ray.parse([str(path), "--threads", "1", "--drain-timeout", "1"])
    status, seen = serve.status, []

    def interrupted_once_deploying():
        now = status()
        if "agp-int" in now.applications and not seen:
            seen.append(now.applications["agp-int"].status)
            raise KeyboardInterrupt
        return now

    monkeypatch.setattr(serve, "status", interrupted_once_deploying)
    with pytest.raises(KeyboardInterrupt):
        on_ray.deploy(replicas_alone(on_ray, args), "agp-int", "/int")
    monkeypatch.setattr(serve, "status", status)
    assert seen
    try:
        assert "agp-int" not in serve.status().applications, "the application was left deploying"
    finally:
        if "agp-int" in serve.status().applications:
            serve.delete("agp-int", _blocking=False)


def test_a_replica_lost_mid_load_loses_no_request_that_had_not_started_streaming(cluster):
    """A replica is killed while the load is under way on both, holding a request that has not
    started (the last one, held in its `hold` stage until the kill: it is there for certain, where
    requests waiting for a batch were there only while a scrape of /metrics caught them)."""
    client = cluster.client
    n, tokens = 24, 64
    release = cluster.folder / "release-lost"
    prompts = [f"request {i} of the load" for i in range(n)] + [HOLD + str(release)]
    state = [{"chunks": 0} for _ in range(n + 1)]

    def stream(i):
        s = state[i]
        with client.completions.with_streaming_response.create(
                model="tiny", prompt=prompts[i], max_tokens=tokens, stream=True,
                extra_body={"ignore_eos": True}) as resp:
            s["replica"] = resp.headers["x-agp-replica"]
            s["attempts"] = int(resp.headers["x-agp-attempts"])
            text, finish = "", None
            for chunk in resp.parse():
                s["chunks"] += 1
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        s["finish"] = finish

    def whole(i):
        s = state[i]
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompts[i], max_tokens=tokens,
                                                          extra_body={"ignore_eos": True})
        r = raw.parse()
        s.update(replica=raw.headers["x-agp-replica"], attempts=int(raw.headers["x-agp-attempts"]),
                 finish=r.choices[0].finish_reason, tokens=r.usage.completion_tokens)

    def run(i):
        try:
            (stream if i % 2 else whole)(i)
        except openai.APIError as e:
            state[i]["error"] = e

    holding = threading.Thread(target=run, args=(n,))            # n is even: a whole answer
    holding.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    try:
        _wait(lambda: Path(str(release) + ".held").exists(), "the request did not reach a replica's hold stage", 60,
              0.05)
        victim = _wait(lambda: holding_replica(cluster.url), "the held request does not show on /metrics", 30, 0.1)
        for t in threads:
            t.start()
        _wait(lambda: any(s["chunks"] for s in state) or not any(t.is_alive() for t in threads),
              "no stream of the load started", 60, 0.02)
        cluster.kill_replica(victim)
    finally:
        release.touch()             # the held request goes on, on the replica it is sent to again
    for t in [*threads, holding]:
        t.join(180)
    failed = {i for i, s in enumerate(state) if "error" in s}
    for i, s in enumerate(state):
        if i in failed:
            assert s["chunks"] > 0 and s["replica"] == victim       # only a stream already under way may fail
            continue
        assert s["finish"] == "length", (i, s)
        assert s.get("tokens", tokens) == tokens
    retried = [s for s in state if s.get("attempts", 1) > 1 and "error" not in s]
    assert retried, "the lost replica held no request that had not started: the test proved nothing"
    assert all(s["replica"] != victim for s in retried)
    # the cluster serves on (Serve starts a replica in place of the lost one)
    r = client.completions.create(model="tiny", prompt="after", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4

    def series_of_the_lost_replica():
        fams = text_string_to_metric_families(httpx.get(cluster.url + "/metrics", timeout=30).text)
        return any(s.labels.get("replica") == victim for fam in fams for s in fam.samples)

    # and /metrics drops the lost replica's last series (the scrape finds its actor dead; not only after
    # STALE_S of silence): its held request would count on beside the one the next test holds
    _wait(lambda: not series_of_the_lost_replica(), "the lost replica's series stay on /metrics", 60, 0.5)


def test_sigterm_drains_with_503_and_retry_after_and_finishes_the_request_in_flight(cluster):
    """The module's last test: it ends the cluster's agp serve (this process leaves the cluster
    first)."""
    proc, url, d = cluster.proc, cluster.url, cluster.folder
    cluster.ray.shutdown()
    release = d / "release"
    result = {}

    def in_flight():                # held in the `hold` stage of its replica until `release` exists
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": HOLD + str(release), "max_tokens": 6, "ignore_eos": True})
        result["status"], result["body"] = r.status_code, r.json()

    def held():                     # one request in a replica's hold stage, by the merged /metrics
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)}
        into, out = (sum(s.value for s in fams[name].samples
                         if s.name.endswith("_total") and s.labels["stage"] == "hold")
                     for name in ("agp_stage_items_in", "agp_stage_items_out"))
        return into - out == 1

    t = threading.Thread(target=in_flight)
    t.start()
    _wait(lambda: Path(str(release) + ".held").exists(), "the request did not reach a replica's hold stage", 60, 0.05)
    _wait(held, "the request held in a replica does not show on /metrics", 30, 0.1)
    proc.send_signal(signal.SIGTERM)
    # each poll waits for the answer however slow a loaded machine makes it (a 5 s client timeout raised
    # ReadTimeout out of the wait instead of polling again); the wait bounds only a server that never turns 503
    _wait(lambda: httpx.get(url + "/health", timeout=60).status_code == 503, "/health did not turn 503", 120, 0.05)
    r = httpx.post(url + "/llm/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "late"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable" and "shutting down" in r.json()["error"]["message"]
    assert held()                                  # /metrics still answers: the drain is watched
    assert t.is_alive() and proc.poll() is None    # the drain waits for the request held in flight
    release.touch()
    t.join(120)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 6
    assert proc.wait(120) == 0, (d / "serve.log").read_text()
