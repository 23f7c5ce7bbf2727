"""Signals as an operator's tools send them. `agp serve`: SIGTERM, SIGINT or SIGHUP while the
model loads stop the load with a line saying so (exit 0); SIGHUP drains as SIGTERM does; a
second signal during a drain cuts what is still in flight with an answer for each (an SSE error
event and [DONE], a JSON 503) and exit 1, never a truncated body or an HTML 500. `agp run`: a
signal while the model loads stops it with a line (exit 128 + the signal); SIGHUP during the run
is in test_hostile's Ctrl-C test. Each test runs agp on the tiny model as a child process."""
from __future__ import annotations

import asyncio
import inspect
import json
import signal
import socket
import subprocess
import threading
import time
import types

import httpx
import pytest

from clikit import agp_child, reaped
from test_hostile import InFlight, held_pipeline, with_python_stage, write_pipeline
from test_serve import _free_port, start_agp_serve

SLOW_IMPORT = """import pathlib, threading
pathlib.Path(__file__).with_suffix(".loading").touch()     # the load has come this far
threading.Event().wait(300)      # importing this module holds the pipeline's load

def passthrough(item):
    return item
"""


def wait_for_health(url: str, status: int, body: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as http:      # one for the polls: a new one a poll is CPU the child needs
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                r = http.get(url + "/health")
                if r.status_code == status and body in r.text:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"/health never answered {status} {body}"
            time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_model_loads_stops_the_load_with_a_line_and_exit_0(tmp_path, tiny_gguf, sig):
    pipeline = slow_loading_pipeline(tmp_path, tiny_gguf)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with reaped(agp_child("serve", pipeline, "--port", port)) as proc:
        wait_for_health(url, 503, "loading", proc)
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)                  # a second one while it stops: no death by signal
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    assert f"{signal.Signals(sig).name} while loading the pipeline: stopped before serving" in err
    assert "Traceback" not in err


def slow_loading_pipeline(tmp_path, model):
    """A pipeline whose python stage's module takes 300 s to import: its load is still going when
    a signal comes, and tmp_path/slowload.loading exists once the load has reached the import."""
    (tmp_path / "slowload.py").write_text(SLOW_IMPORT)
    return with_python_stage(write_pipeline(tmp_path, model), "pass", 'fn = "slowload:passthrough"',
                             "request -> batch")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_agp_run_stopped_while_the_model_loads_says_so_and_exits_128_plus_the_signal(tmp_path, tiny_gguf, sig):
    pipeline = slow_loading_pipeline(tmp_path, tiny_gguf)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "max_tokens": 4}) + "\n")
    with reaped(agp_child("run", pipeline, "-i", inp, "-o", out, "--no-progress")) as proc:
        deadline = time.monotonic() + 120
        while not (tmp_path / "slowload.loading").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig, err
    assert f"agp run: {signal.Signals(sig).name} while loading the pipeline: stopped before running" in err
    assert "Traceback" not in err and out.read_text() == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_agp_run_stopped_while_waiting_for_stdins_first_line_says_so_and_exits_128_plus_the_signal(
        tmp_path, tiny_gguf, sig):
    """Ctrl-C while `agp run P.agp` waited on a pipe that had sent no whole line yet exited 130 without
    a word (SIGTERM and SIGHUP: killed by the signal); it says why, as an interrupted load does."""
    import fcntl
    import termios

    pipeline = write_pipeline(tmp_path, tiny_gguf)
    with reaped(agp_child("run", pipeline, "--no-progress", stdin=subprocess.PIPE, stdout=subprocess.PIPE)) as proc:
        proc.stdin.write('{"id": "a", ')        # half a line
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while True:                              # the pipe is empty once the run has read the half line
            waiting = bytearray(4)
            fcntl.ioctl(proc.stdin.fileno(), termios.FIONREAD, waiting)
            if int.from_bytes(waiting, "little") == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip() == (f"agp run: {signal.Signals(sig).name} while waiting for the input's first lines: "
                           "stopped before running any request")
    assert out == ""


def test_a_second_signal_cuts_what_is_in_flight_with_an_answer_each_and_exit_1(tmp_path, tiny_gguf):
    # held answers (test_hostile.held_pipeline): all three are in flight when the signals come
    proc, url = start_agp_serve(str(held_pipeline(tmp_path, tiny_gguf)), "--threads", "1", "--drain-timeout", "600")
    with reaped(proc):
        held = InFlight(url, {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}, streams=2, timeout=120)
        proc.send_signal(signal.SIGTERM)
        wait_for_health(url, 503, "draining", proc)           # the drain waits (up to 600 s) ...
        # meanwhile every new request is refused (docs/serve.md, as under --ray), not only generation:
        # /v1/models and /tokenize answered 200 from a server that was going away; the drain is
        # watched through /metrics and /stats, which still answer
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "hi"}),
                                   ("POST", "/v1/completions", {"prompt": "hi"})):
            r = httpx.request(method, url + path, json=body, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"], (path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "unavailable", (path, r.text[:200])
        # the probes say "draining" themselves, with the Retry-After every other route's 503 has
        # (and theirs while the model loads); it was left out of theirs
        for method, path in (("GET", "/health"), ("HEAD", "/health"), ("GET", "/ping"), ("POST", "/ping")):
            r = httpx.request(method, url + path, timeout=30)
            assert r.status_code == 503 and r.headers.get("retry-after") == "1", (method, path, r.headers)
            assert method == "HEAD" or r.json() == {"status": "draining"}, (path, r.text[:200])
        metrics = httpx.get(url + "/metrics", timeout=30)
        assert metrics.status_code == 200 and "agp_num_requests_running" in metrics.text
        assert httpx.get(url + "/stats", timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)                      # ... until the second signal
        held.join()
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "cut 3 request(s)" in err, err
    assert "Traceback" not in err
    for lines in held.streams:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert "stopped by a second signal" in json.loads(lines[-2][6:])["error"]["message"]
    r = held.whole["r"]
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text[:300]


# a body still arriving at SIGTERM gets a JSON 503 at once: test_slow_clients' test of a shutdown
# with clients that read nothing (one server's SIGTERM shows both)


def test_ctrl_c_while_agp_imports_its_version_lookup_is_a_keyboard_interrupt_not_a_name_error():
    """A Ctrl-C that landed in the import of importlib.metadata (agp's version) raised NameError
    ('PackageNotFoundError' is not defined) from the except clause around that import."""
    import sys

    code = """import sys
class Interrupted:
    def find_spec(self, name, path=None, target=None):
        if name == "importlib.metadata":
            raise KeyboardInterrupt
sys.modules.pop("importlib.metadata", None)
sys.meta_path.insert(0, Interrupted())
try:
    import pipeline_dsl
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""
    from clikit import ROOT

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.strip() == "KeyboardInterrupt" and "NameError" not in r.stderr, r.stderr


class _Runtime:
    """A pipeline runtime as AgpServer's drain sees it: `in_flight` requests that never finish on
    their own; close() (the cut) takes until `release` is set when `slow`."""

    def __init__(self, in_flight: int, slow: bool):
        self.in_flight, self.cut = in_flight, 0
        self.cutting, self.release = threading.Event(), threading.Event()
        if not slow:
            self.release.set()

    def stop_admitting(self):
        pass

    def wait_idle(self, timeout):
        time.sleep(timeout)
        return self.in_flight == 0

    def close(self, drain=True, timeout=None, reason=""):
        self.cutting.set()
        assert self.release.wait(30)
        self.cut, self.in_flight = self.in_flight, 0
        return self.cut == 0


def _server(runtime):
    """An AgpServer over `runtime`, as if serving (its signals are sent by calling handle_exit)."""
    import types

    import uvicorn

    from pipeline_dsl.serve.server import AgpServer

    async def app(scope, receive, send):
        pass
    apipe = types.SimpleNamespace(runtime=runtime, error=None)
    server = AgpServer(uvicorn.Config(app), apipe, drain_timeout=600)
    server.started = True
    return server, types.SimpleNamespace(apipe=apipe)


def _wait(predicate):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_signal_once_the_drain_is_over_does_not_force_the_stop_and_the_exit_status_stays_0(caplog):
    """SIGTERM, the drain finds nothing in flight; another SIGTERM while the server stops on its
    own changes nothing (before: it was taken for a third signal, a forced exit that skipped the
    app's shutdown: uvicorn logged 'Exception in lifespan' with a traceback), and the exit status
    is 0; one more signal then stops it at once."""
    import logging

    from pipeline_dsl.commands.serve import exit_status

    caplog.set_level(logging.INFO, logger="agp.serve")
    server, serving = _server(_Runtime(0, slow=False))
    server.handle_exit(signal.SIGTERM, None)
    _wait(lambda: server.drained is not None)
    server.handle_exit(signal.SIGTERM, None)
    _wait(lambda: server.should_exit)
    assert server.drained is True and not server.force_exit
    assert "already stopping" in caplog.text
    assert exit_status(serving, server) == 0
    server.handle_exit(signal.SIGTERM, None)               # insisting: the server's own end may hang
    assert server.force_exit


def test_a_drain_lets_the_server_stop_without_a_pause_whether_it_cut_requests_or_not(monkeypatch):
    """The drain over, it slept 0.3 s for the answers it cut to reach their clients before it let
    uvicorn stop (once also when it had cut none): uvicorn's shutdown waits for each answer being
    written, cut or not, and most were out already. Seen through the sleeps of the server's
    module: none, whether nothing was cut or a second signal cut two (that their answers reach
    their clients: test_a_second_signal_cuts_what_is_in_flight_with_an_answer_each_and_exit_1)."""
    import pipeline_dsl.serve.server as server_module

    slept: list[float] = []

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            slept.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(server_module, "time", Clock())
    server, _ = _server(_Runtime(0, slow=False))
    server.handle_exit(signal.SIGTERM, None)
    _wait(lambda: server.should_exit)
    assert server.drained is True and server.cut == 0 and slept == []

    server, _ = _server(_Runtime(2, slow=False))
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)                 # cut what is in flight
    _wait(lambda: server.should_exit)
    assert server.drained is False and server.cut == 2 and slept == []


class _StoppedClock(asyncio.SelectorEventLoop):
    """An event loop whose clock stops when `stopped` is set: a timer (asyncio.sleep, call_later,
    a timeout) no longer ends, and only what waits on an event (a connection closing, a task
    ending, a call from another thread) goes on."""

    def __init__(self):
        super().__init__()
        self.stopped = threading.Event()
        self._at = None

    def time(self):
        if self.stopped.is_set():
            if self._at is None:
                self._at = super().time()
            return self._at
        return super().time()


@pytest.mark.parametrize("answering", [False, True])
def test_a_stop_waits_on_the_connections_and_the_drain_not_for_a_fixed_while(answering):
    """SIGTERM to a server with nothing in flight, or with one answer being written that finishes
    after the signal: the server stops once the drain is over and its connections closed, with its
    event loop's clock stopped, so with no fixed wait among them. uvicorn's loop looked whether to
    stop every 0.1 s and its shutdown slept 0.1 s, then looked every 0.1 s whether its connections
    had closed: 0.1 to 0.3 s of every stop spent waiting on what had already happened."""
    import uvicorn

    from pipeline_dsl.serve.server import AgpServer, agp_protocol

    release = asyncio.Event()
    answered: list[bytes] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    apipe = types.SimpleNamespace(runtime=_Runtime(0, slow=False), error=None)
    server = AgpServer(uvicorn.Config(app, http=agp_protocol(), lifespan="off", log_level="warning"),
                       apipe, drain_timeout=600)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = _StoppedClock()
    serving = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    serving.start()
    _wait(lambda: server.started)
    client = socket.create_connection(sock.getsockname())
    if answering:                                   # a request under way: its answer waits for `release`
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _wait(lambda: server.server_state.tasks)
    loop.stopped.set()
    server.handle_exit(signal.SIGTERM, None)
    _wait(lambda: server.drained is not None)
    if answering:
        assert serving.is_alive()                   # the answer being written holds the stop ...
        loop.call_soon_threadsafe(release.set)      # ... until it is out
        client.settimeout(30)
        while chunk := client.recv(1024):
            answered.append(chunk)
        assert b"".join(answered).endswith(b"ok")
    serving.join(30)
    assert not serving.is_alive(), "the server waited on its stopped clock"
    client.close()
    loop.close()


def test_a_third_signal_while_the_requests_are_cut_stops_at_once_with_exit_1_saying_how_many(caplog):
    """SIGTERM with 3 in flight; a second signal cuts them; a third while the cut is still going
    on stops the server at once (a forced exit): the exit status is 1 and the log says how many
    got no answer (before: 0 and 'stopped (drained)' when the cut had not yet counted them)."""
    import logging

    from pipeline_dsl.commands.serve import exit_status

    runtime = _Runtime(3, slow=True)
    server, serving = _server(runtime)
    caplog.set_level(logging.INFO, logger="agp.serve")
    try:
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGTERM, None)
        assert runtime.cutting.wait(30)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit and server.force_exit and server.cut == 0
        assert exit_status(serving, server) == 1
        assert "stopped at once by a third signal; 3 request(s) still in flight got no answer" in caplog.text
        assert "stopped (drained)" not in caplog.text
    finally:
        runtime.release.set()


def test_the_servers_stop_runs_on_its_event_loop_not_inside_the_code_the_signal_interrupted():
    """agp serve's handle_exit (it logs and starts the drain's thread) runs as a callback of the
    event loop, after the code the signal came in: a Python signal handler runs wherever the main
    thread was, inside a write to stderr (a reentrant write raises) or holding the lock a thread's
    start takes (a wait for itself for good). Its former handlers are back once it stops."""
    import os

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set on the main thread only")
    server, _ = _server(_Runtime(0, slow=False))
    stacks = []
    server.handle_exit = lambda sig, frame: stacks.append((sig, [f.function for f in inspect.stack()]))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def interrupted_code():
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:       # Python code the signal's handler would run inside
            pass

    async def serving():
        with server.capture_signals():
            interrupted_code()
            for _ in range(100):
                if stacks:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(serving())
    assert len(stacks) == 1 and stacks[0][0] == signal.SIGHUP, stacks
    assert "interrupted_code" not in stacks[0][1], stacks[0][1]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_hangup_ignored_when_agp_serve_started_stays_ignored_and_another_signal_still_drains(tmp_path, tiny_gguf):
    """`nohup agp serve … &`: nohup starts it with SIGHUP ignored so that closing the terminal (whose
    hang-up comes to it) leaves it serving; agp's own SIGHUP handler (a drain) stopped it all the
    same. A stop signal ignored on entry stays ignored (stopping.heeded); SIGTERM still drains."""
    from test_serve import _pipeline_file

    def nohup():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc, url = start_agp_serve(str(_pipeline_file(tmp_path, tiny_gguf)), preexec_fn=nohup)
    with reaped(proc):
        proc.send_signal(signal.SIGHUP)
        body = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)      # served after the hang-up
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text[:300]
        assert httpx.get(url + "/health", timeout=10).status_code == 200 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err[-2000:]
    assert "draining (SIGTERM)" in err and "SIGHUP" not in err, err[-2000:]


def test_heeded_leaves_out_a_stop_signal_ignored_on_entry():
    from pipeline_dsl.stopping import STOP_SIGNALS, heeded

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal dispositions are set on the main thread only")
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert heeded() == tuple(s for s in STOP_SIGNALS if s != signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, old)
    assert signal.SIGHUP in heeded()
