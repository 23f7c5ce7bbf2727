"""What an operator of `agp serve` reads back: access-log statuses, metrics of refused requests,
probes. Each test drives a real server (tiny model) and asserts what it logs, counts or answers."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import time

import httpx
import pytest

from test_serve import ROOT, TINY, LiveServer, _pipeline_file


@pytest.fixture(scope="module")
def live(tiny_gguf):
    """A server that wants the key k1 and lets the pages of http://app.example call it (CORS: only
    a request with that Origin gets its headers)."""
    s = LiveServer(tiny_gguf, header_timeout=10.0, api_keys=("k1",), allowed_origins=("http://app.example",))
    yield s
    s.close()


class LogRecords:
    """The records of one logger (agp.access unless told) while in use, at INFO and up (or `level`)."""

    def __init__(self, name: str = "agp.access", level: int = logging.INFO):
        self.name, self.want = name, level

    def __enter__(self):
        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        self.logger = logging.getLogger(self.name)
        self.logger.addHandler(self.handler)
        self.level = self.logger.level
        self.logger.setLevel(self.want)             # setLevel: it clears the loggers' cached levels
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    def mine(self, *ports: int) -> list:
        """The records of the clients on these ports: the logger is the process's, and a server an
        earlier test left draining may still write a line for one of its own connections."""
        return [r for r in self.records if str(getattr(r, "client", "")).rsplit(":", 1)[-1] in map(str, ports)]

    def statuses(self, path: str, count: int, timeout: float = 30.0) -> list[int]:
        """The statuses logged for `path`, once `count` lines are there (each is written after its
        answer's last byte, so a client may read its answer before the line is written)."""
        deadline = time.monotonic() + timeout
        while len(found := [r.status for r in self.records if r.path == path]) < count:
            assert time.monotonic() < deadline, [(r.path, r.status) for r in self.records]
            time.sleep(0.02)
        return found


KEY = {"Authorization": "Bearer k1"}


@pytest.mark.parametrize("path, fields", [
    ("/v1/completions", {"prompt": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
    ("/v1/responses", {"input": "hello"}),
])
def test_a_stream_read_to_its_end_is_logged_200_not_499(live, path, fields):
    with LogRecords() as lines:
        for _ in range(3):
            with live.http.stream("POST", live.url + path, headers=KEY, timeout=60,
                              json={"model": "tiny", **fields, "stream": True}) as r:
                assert r.status_code == 200
                body = b"".join(r.iter_bytes())
            assert body.rstrip().endswith(b"[DONE]") or b"response.incomplete" in body or b"response.completed" in body
        assert lines.statuses(path, 3) == [200, 200, 200]


def test_a_second_server_on_a_port_another_still_loading_holds_exits_2(tmp_path, tiny_gguf):
    """The first server holds its port from the start (bound and listening while its model
    loads), so a second one started meanwhile on that port exits 2 at once, instead of loading,
    saying it serves, and listening nowhere."""
    from pipeline_dsl.commands import serve

    held = serve.listening_socket("127.0.0.1", 0)     # what `agp serve` holds while it loads
    port = held.getsockname()[1]
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "serve",
                               str(_pipeline_file(tmp_path, tiny_gguf)), "--port", str(port)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
        assert "serving pipeline" not in proc.stderr
    finally:
        held.close()


def test_requests_the_guard_refuses_are_counted_by_status(live):
    """A generation request without a valid key is counted in agp_requests_total like any
    other refused one (an operator alerting on 401s sees them); /v1/models' are not requests."""
    def count(status: str) -> float:
        try:
            return live.metric("agp_requests_total", f'{{status="{status}"}}')
        except AssertionError:
            return 0.0

    before = count("401")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
        r = live.http.post(live.url + path, json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert live.http.get(live.url + "/v1/models").status_code == 401
    assert count("401") == before + 4


def test_a_request_failed_after_its_first_tokens_is_counted_by_its_status_not_as_gone(tiny_gguf):
    """A stream stage fails every answer after its first chunk: the client, streamed or not, gets
    the 500 (a JSON error, or an error event and [DONE] after the first chunk) and
    agp_requests_total counts a 500 each, not a 499 (a client that went away)."""
    from test_serve import TINY

    text = (TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20)
            .replace("kv -> gen -> out", "kv -> gen -> p -> out")
            .replace("stage out", 'stage p       : python        { fn = "flowkit:fail_after_first_chunk"  stream = true }\n    stage out'))
    s = LiveServer(tiny_gguf, text=text)

    def count(status: str) -> float:
        try:
            return s.metric("agp_requests_total", f'{{status="{status}"}}')
        except AssertionError:
            return 0.0

    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        r = s.http.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "stage_failed", r.text[:300]
        with s.http.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            text = b"".join(r.iter_bytes()).decode()
        assert '"code":"stage_failed"' in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
        deadline = time.monotonic() + 30
        while count("500") < 2:
            assert time.monotonic() < deadline, (count("500"), count("499"))
            time.sleep(0.05)
        assert (count("500"), count("499")) == (2, 0)
    finally:
        s.close()


def test_an_error_answer_is_logged_with_its_request_id(live):
    """The line that gives an error's reason carries the request's id, as its access line does,
    so the id a client reports finds why it was refused."""
    with LogRecords("agp.serve") as log:
        r = live.http.post(live.url + "/v1/completions", headers={**KEY, "X-Request-Id": "op-bad-1"},
                       json={"model": "tiny", "prompt": "hi", "max_tokens": "ten"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "op-bad-1"
        r = live.http.post(live.url + "/v1/chat/completions", headers={"X-Request-Id": "op-nokey-1"},
                       json={"model": "tiny", "messages": []})
        assert r.status_code == 401
    records = log.records
    reasons = {r.request_id: r for r in records if getattr(r, "reason", None)}
    assert reasons["op-bad-1"].status == 400 and "max_tokens" in reasons["op-bad-1"].getMessage()
    assert reasons["op-bad-1"].getMessage().endswith("id=op-bad-1")
    assert reasons["op-nokey-1"].status == 401


SECRET = "my card is 4111-1111"          # what a client sent: no operator asked to see it in the INFO log


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "temperature": SECRET}, "temperature"),
    ("/v1/completions", {"prompt": [1, 2, SECRET]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {SECRET: 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 6}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"messages": SECRET}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": SECRET}}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": SECRET, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": SECRET},
     "tool_choice"),
    ("/v1/responses", {"input": "hi", "include": [SECRET]}, "include[0]"),
    ("/v1/responses", {"input": [{"type": "item_reference", "id": SECRET}]}, "input[0].id"),     # a 404
    ("/v1/responses/resp_none", None, "stream"),          # GET ?stream=SECRET
])
def test_a_refusal_that_quotes_the_requests_content_logs_it_only_at_debug(live, path, body, param):
    """A 4xx whose message quotes the start of a value the client sent: the client's message
    quotes it as ever, the INFO line names the field and the code and writes `<value>` where the
    message quotes it (an operator opts in to request content: at DEBUG a line has it in full).
    Before, the INFO log held whatever the client had put in a malformed field."""
    headers = {**KEY, "X-Request-Id": "op-quoted-1"}
    with LogRecords("agp.serve", level=logging.DEBUG) as log:
        if body is None:
            r = live.http.get(live.url + path, headers=headers, params={"stream": SECRET})
        else:
            r = live.http.post(live.url + path, headers=headers, json={"model": "tiny", **body})
        assert r.status_code == (404 if param == "input[0].id" else 400), r.text
    error = r.json()["error"]
    if param in ("max_tokens", "logprobs"):        # quotes nothing but a number: logged as it is
        assert SECRET not in error["message"]
    else:
        assert SECRET[:20] in error["message"]    # the client's own message is left as it is
    mine = [rec for rec in log.records if getattr(rec, "request_id", None) == "op-quoted-1"]
    info = [rec for rec in mine if rec.levelno >= logging.INFO]
    assert len(info) == 1 and info[0].param == error["param"] and info[0].code == error["code"]
    assert error["param"].startswith(param.split("[")[0])
    assert SECRET[:4] not in info[0].getMessage() and SECRET[:4] not in info[0].reason
    debug = [rec for rec in mine if rec.levelno == logging.DEBUG]
    if param in ("max_tokens", "logprobs"):
        assert info[0].reason == error["message"] and not debug
    else:
        assert "<value>" in info[0].reason
        assert len(debug) == 1 and debug[0].reason == error["message"] in debug[0].getMessage()


def test_the_access_line_brackets_an_ipv6_client_so_its_port_can_be_told_apart():
    """Served on `--host ::` the access line read `::1:50412` (and `::ffff:10.0.0.7:50412`): which
    colon starts the port? An IPv6 client is written as in a URL, `[::1]:50412`."""
    import asyncio

    from pipeline_dsl.serve.access import Access

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message):
        pass

    with LogRecords() as log:
        for client in (("::1", 50412), ("::ffff:10.0.0.7", 50413), ("10.0.0.7", 50414)):
            scope = {"type": "http", "method": "GET", "path": "/health", "headers": [], "client": client}
            asyncio.run(Access(app)(scope, None, ignore))
    records = log.mine(50412, 50413, 50414)
    assert [r.client for r in records] == ["[::1]:50412", "[::ffff:10.0.0.7]:50413", "10.0.0.7:50414"]
    assert records[0].getMessage().startswith('[::1]:50412 "GET /health HTTP/1.1" 204')


def test_the_access_line_gives_the_answers_latency_in_milliseconds():
    """An answer that took at least 50 ms is logged as that many milliseconds (`latency_ms` of a
    JSON line, `…ms` of a text one), not as seconds."""
    import asyncio

    from pipeline_dsl.serve.access import Access

    async def app(scope, receive, send):
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message):
        pass

    with LogRecords() as log:
        scope = {"type": "http", "method": "GET", "path": "/health", "headers": [], "client": ("10.0.0.7", 1)}
        asyncio.run(Access(app)(scope, None, ignore))
    [record] = log.mine(1)
    assert record.latency_ms >= 50
    assert record.getMessage().endswith(f" 204 {record.latency_ms:.1f}ms id={record.request_id}")


def test_quiet_paths_log_no_success_but_every_other_request(tiny_gguf):
    """--disable-access-log-for-endpoints /health,/metrics (vLLM's flag): a load balancer's probes
    and a scraper's polls write no access line, other requests do, as under --root-path; an error
    answer on a quiet path is still logged."""
    s = LiveServer(tiny_gguf, quiet_paths=("/health", "/metrics"), root_path="/llm")
    try:
        with LogRecords() as lines:
            for path in ("/health", "/metrics", "/llm/health", "/health?probe=1", "/v1/models", "/version"):
                assert s.http.get(s.url + path).status_code == 200
            assert lines.statuses("/version", 1) == [200]
            assert lines.statuses("/v1/models", 1) == [200]
            assert {r.path for r in lines.records} == {"/v1/models", "/version"}
            assert httpx.delete(s.url + "/metrics").status_code == 405
            assert lines.statuses("/metrics", 1) == [405]
    finally:
        s.close()


def test_the_quiet_paths_flag_and_its_variable_are_read_and_checked():
    import argparse

    from pipeline_dsl.serve.options import add_arguments, env_defaults

    p = argparse.ArgumentParser()
    add_arguments(p)
    env_defaults(p, {"AGP_DISABLE_ACCESS_LOG_FOR_ENDPOINTS": "/health, /metrics"})
    assert p.parse_args(["x.agp"]).disable_access_log_for_endpoints == ["/health", "/metrics"]
    assert p.parse_args(["x.agp", "--disable-access-log-for-endpoints", "/ping"]).disable_access_log_for_endpoints \
        == ["/ping"]
    with pytest.raises(SystemExit):
        p.parse_args(["x.agp", "--disable-access-log-for-endpoints", "health"])


def test_agp_serve_answers_503_before_importing_the_app_or_the_runtime():
    """What `agp serve` imports before its port answers 503 (the command, its stop handling and
    serve/loading.py) holds neither the web app (fastapi, starlette), nor the flow runtime and
    its graph library, nor torch: they load behind the 503 (the answer came some 0.3 s later
    when serve/loading.py took the client id's pattern from the access middleware)."""
    code = ("import sys, pipeline_dsl.cli, pipeline_dsl.commands.serve, pipeline_dsl.stopping,"
            " pipeline_dsl.serve.loading;"
            "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'networkx', 'pipeline_dsl.flow')"
            " if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_while_the_model_loads_probes_get_503_loading_and_the_port_stays_held():
    """What `agp serve` answers between taking its port and serving (serve/loading.py): /health
    503 {"status": "loading"} with Retry-After, a generation request an OpenAI 503; afterwards
    the same socket still listens, and a connection made then waits for the real server."""
    import socket

    from pipeline_dsl.commands import serve
    from pipeline_dsl.serve.loading import Loading

    sock = serve.listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with Loading(sock, retry_after_s=7):
            r = httpx.get(url + "/health", timeout=10)
            assert r.status_code == 503 and r.json() == {"status": "loading"}
            assert r.headers["retry-after"] == "7" and r.headers["connection"] == "close"
            # every answer carries X-Request-Id (docs/serve.md), the loading ones too: the client's own
            assert len(r.headers["x-request-id"]) == 32
            r = httpx.get(url + "/health", headers={"X-Request-Id": "probe-7"}, timeout=10)
            assert r.headers["x-request-id"] == "probe-7"
            r = httpx.get(url + "/health", headers={"X-Request-Id": "a b"}, timeout=10)
            assert r.headers["x-request-id"] != "a b"                   # not printable without spaces: a new one
            assert httpx.head(url + "/health", timeout=10).status_code == 503
            c = socket.create_connection(sock.getsockname()[:2], timeout=10)     # a HEAD answer has no body
            c.sendall(b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw = b""
            while chunk := c.recv(65536):
                raw += chunk
            c.close()
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and rest == b"", raw
            r = httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        late = socket.create_connection(sock.getsockname()[:2], timeout=10)   # queued, not refused
        conn, _ = sock.accept()
        late.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(100).startswith(b"GET /health")                     # it reached the socket's owner
        conn.close()
        late.close()
    finally:
        sock.close()


def test_a_client_still_sending_its_head_when_the_model_is_up_is_closed_without_a_traceback(caplog):
    """A connection the loading answerer took whose request head had not all come when the real
    server took over: its read is cancelled and the connection closed, quietly (asyncio logged
    "Exception in callback" with the CancelledError's traceback, an error in every such start)."""
    import socket

    from pipeline_dsl.commands import serve
    from pipeline_dsl.serve.loading import Loading

    sock = serve.listening_socket("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            with Loading(sock) as loading:
                slow = socket.create_connection(sock.getsockname()[:2], timeout=10)
                slow.sendall(b"GET /health HTTP/1.1\r\n")                # no blank line yet
                r = httpx.get(f"http://127.0.0.1:{sock.getsockname()[1]}/health", timeout=10)
                assert r.status_code == 503 and loading.answered == 1     # the other was taken, and waits
            assert slow.recv(100) == b""                                  # closed, unanswered
            slow.close()
        said = [r.getMessage() + str(r.exc_info) for r in caplog.records
                if r.name == "asyncio" and r.levelno >= logging.WARNING]
        assert not said, said
    finally:
        sock.close()


def test_a_browser_may_read_the_request_id_and_retry_after(live):
    """CORS answers expose X-Request-Id, Retry-After and Warning: without Access-Control-Expose-Headers a
    browser hides them from the page's script (its error report could not name the request).
    The guard's refusals carry them too (CORS sits outside it), and a preflight needs no key."""
    s = live
    origin = {"Origin": "http://app.example"}
    for headers, status in (({**KEY, "X-Request-Id": "cors-1"}, 200), ({"X-Request-Id": "cors-1"}, 401)):
        r = s.http.get(s.url + "/v1/models", headers={**origin, **headers})
        assert r.status_code == status
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "retry-after", "warning"} <= exposed and r.headers["x-request-id"] == "cors-1"
    r = httpx.options(s.url + "/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


def test_every_route_but_the_documented_open_ones_wants_the_key(live):
    """docs/serve.md, --api-key: every route answers 401 without a valid key but /health, /ping,
    /metrics, /version and /openapi.json. Walked over the app's own routes, so a route added
    later (or one left open by mistake: /tokenizer_info, /v1/embeddings) is checked too."""
    from pipeline_dsl.serve.routes import router

    open_paths = {"/health", "/ping", "/metrics", "/version", "/openapi.json"}
    seen = set()
    for route in router.routes:
        path = re.sub(r"\{[^}]*\}", "x", route.path)
        seen.add(route.path)
        for method in sorted(route.methods):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = live.http.request(method, live.url + path, json={}, headers=headers, timeout=30)
                if route.path in open_paths:
                    assert r.status_code != 401, (method, path)
                else:
                    assert r.status_code == 401, (method, path, r.status_code)
                    if method != "HEAD":
                        assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["www-authenticate"] == "Bearer"
    assert {"/v1/embeddings", "/tokenizer_info", "/detokenize", "/v1/responses/{response_id}"} <= seen
    assert live.http.get(live.url + "/openapi.json", timeout=30).status_code == 200


def test_the_authorization_scheme_is_read_whatever_its_case(live):
    """RFC 9110: the scheme of an Authorization header is case-insensitive; a client that sends
    `bearer KEY` (or `BEARER KEY`) with the right key is let in, and a wrong key is still a 401."""
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = live.http.get(live.url + "/v1/models", headers={"Authorization": f"{scheme} k1"}, timeout=30)
        assert r.status_code == 200, (scheme, r.text[:200])
    r = live.http.get(live.url + "/v1/models", headers={"Authorization": "bearer k2"}, timeout=30)
    assert r.status_code == 401


def test_a_client_request_id_of_up_to_128_printable_characters_is_kept(live):
    """docs/serve.md, "Request ids": the client's X-Request-Id, 1 to 128 printable ASCII characters
    without spaces, comes back and names the answer; a longer one, or one with a space (an access-log
    line ends `id=...`), is replaced by a new id."""
    longest = "r" * 127 + "~"
    r = live.http.post(live.url + "/v1/completions", headers={**KEY, "X-Request-Id": longest},
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == longest and r.json()["id"] == f"cmpl-{longest}"
    r = live.http.get(live.url + "/health", headers={"X-Request-Id": longest + "r"}, timeout=30)
    assert r.headers["x-request-id"] not in ("", longest, longest + "r")
    r = live.http.get(live.url + "/health", headers={"X-Request-Id": "two words"}, timeout=30)
    assert r.headers["x-request-id"] not in ("", "two words", "two", "words")


def test_a_failed_pipeline_says_so_on_its_probes_and_still_answers_its_other_routes():
    """docs/serve.md: /health (and /ping) answer 503 `{"status": "failed"}` once the engine
    failed, so a readiness probe takes the pod out, while /version and /metrics still answer."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.app import create_app
    from pipeline_dsl.serve.config import ServeConfig
    from pipeline_dsl.serve.metrics import ServerMetrics

    class Failed:                          # what the app reads of a pipeline whose engine failed
        error, accepting, metrics = RuntimeError("the engine failed"), False, None

        async def stats(self):
            return {}

    client = TestClient(create_app(Failed(), ServeConfig(model_names=("tiny",), max_model_len=64),
                                   ServerMetrics(process=False)))
    for probe in (client.get("/health"), client.head("/health"), client.get("/ping"), client.post("/ping")):
        assert probe.status_code == 503
    assert client.get("/health").json()["status"] == "failed"
    assert client.get("/version").status_code == 200 and client.get("/metrics").status_code == 200


def test_an_error_answer_is_logged_at_info_when_4xx_and_at_warning_when_5xx():
    """docs/serve.md, "Logs": each error answer is logged with its reason, 4xx at INFO (the
    client's doing), 5xx at WARNING (an alert on the server's warnings sees them)."""
    from pipeline_dsl.serve.api_error import APIError
    from pipeline_dsl.serve.errors import log_error

    with LogRecords("agp.serve") as log:
        log_error(APIError("'max_tokens' must be an integer", status=400))
        log_error(APIError("stage 'g' failed", status=500, type="server_error"))
        log_error(APIError("the server is shutting down", status=503, type="server_error"))
    assert [(r.levelname, r.status, r.reason) for r in log.records] == [
        ("INFO", 400, "'max_tokens' must be an integer"), ("WARNING", 500, "stage 'g' failed"),
        ("WARNING", 503, "the server is shutting down")]


@pytest.mark.parametrize("trace", [False, True])
def test_a_server_without_trace_keeps_no_spans_and_one_with_it_keeps_them(tmp_path, tiny_gguf, trace):
    """docs/serve.md, "Tracing a server": spans are kept for `--trace` only. Without it a server
    that answers all day holds none (they would grow its memory by a span per stage, request and
    engine step, some 20 MB before their bound), and answers the same."""
    import argparse

    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(_pipeline_file(tmp_path, tiny_gguf)), "--threads", "1"]
                        + (["--trace", str(tmp_path / "t.json")] if trace else []))
    serving = build(args)
    with TestClient(serving.app, base_url="http://127.0.0.1") as client:
        for i in range(3):
            r = client.post("/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
        kept = len(serving.runtime.trace.spans)
    assert kept > 0 if trace else kept == 0


GATE = '''
import pipeline_dsl

def gate(item):
    tier = item.get("metadata", {}).get("tier")
    if tier == "over":
        raise pipeline_dsl.Reject("over the tenant's rate limit", status=429, retry_after=2.5)
    if tier == "banned":
        raise pipeline_dsl.Reject("this key may not use the model", status=403)
    if tier == "plain":
        raise pipeline_dsl.Reject("refused")
    if tier == "nokey":
        raise pipeline_dsl.Reject("a key of this tenant is needed", status=401)
    if tier == "bad":
        raise pipeline_dsl.Reject("refused", status=407)
    if tier == "down":
        raise pipeline_dsl.Reject("the tenant's backend is down", status=503, retry_after=5)
    if tier == "budget":
        raise pipeline_dsl.Reject("the tenant's token budget is spent", status=429, retry_after=7,
                                  param="metadata.tier", code="budget_spent")
    return item
'''


def test_a_reject_answers_the_4xx_status_and_retry_after_it_names(tmp_path, tiny_gguf, monkeypatch):
    """docs/language.md, python stages: Reject(..., status=429, retry_after=2.5) is a 429
    rate_limit_error with Retry-After: 3 (a rate limiter in the pipeline), its `param` null (no
    request field is at fault) and the stage in `stage`; a plain Reject stays a 400; a 503 is a
    server_error with its own Retry-After; a Reject's own param and code are the answer's, its
    Retry-After kept; a status a Reject may not carry (407: agp sends no Proxy-Authenticate)
    fails the request as the stage's bug (500); other requests go on."""
    (tmp_path / "gate_hooks.py").write_text(GATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace(
        "request -> batch", 'stage gate : python { fn = "gate_hooks:gate" }\n    request -> gate -> batch')
    s = LiveServer(tiny_gguf, text=text)
    try:
        def post(tier):
            return s.http.post(s.url + "/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                    "metadata": {"tier": tier}})
        r = post("over")
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"] == {"message": "over the tenant's rate limit", "type": "rate_limit_error",
                                     "param": None, "code": "rejected", "stage": "gate"}
        r = post("banned")
        assert r.status_code == 403 and "retry-after" not in r.headers
        assert r.json()["error"]["type"] == "permission_error" and "www-authenticate" not in r.headers
        r = post("nokey")                  # HTTP's 401 names its scheme, as the --api-key guard's does
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        r = post("plain")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = post("bad")
        assert r.status_code == 500 and r.json()["error"]["message"].startswith(
            "stage 'gate' failed: ValueError: Reject's status must be a 4xx or 5xx HTTP status agp can answer")
        r = post("down")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("server_error", "rejected")
        r = post("budget")
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"] == {"message": "the tenant's token budget is spent", "type": "rate_limit_error",
                                     "param": "metadata.tier", "code": "budget_spent", "stage": "gate"}
        assert post("fine").status_code == 200
    finally:
        s.close()


def test_a_server_whose_engine_fails_logs_it_once_with_its_traceback_and_stops(tmp_path, tiny_gguf):
    """docs/serve.md, "Shutting down": an engine whose loop raised fails every request in flight
    (503) and would fail every later one, so the server logs the failure once, with its traceback,
    and stops on its own (exit status 1: the supervisor restarts it) rather than staying up unready
    with nothing to restart it."""
    import socket
    import threading

    import uvicorn

    from pipeline_dsl.flow import build_runtime
    from pipeline_dsl.serve.app import create_app
    from pipeline_dsl.serve.async_pipeline import AsyncPipeline
    from pipeline_dsl.serve.config import ServeConfig
    from pipeline_dsl.serve.metrics import ServerMetrics
    from pipeline_dsl.serve.server import AgpServer

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=1))
    runtime = build_runtime(path, overrides={"threads": 1})
    engine = runtime.segments[0].engine

    schedule = engine.schedule

    def broken(*args, **kwargs):
        if engine.has_unfinished():
            raise RuntimeError("the device went away")
        return schedule(*args, **kwargs)

    engine.schedule = broken                        # the engine's loop raises on its first request
    metrics = ServerMetrics(process=False)
    apipe = AsyncPipeline(runtime, metrics=metrics)
    app = create_app(apipe, ServeConfig(model_names=("tiny",), max_model_len=engine.max_model_len), metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = AgpServer(uvicorn.Config(app, log_level="warning", lifespan="on"), apipe, drain_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    with LogRecords("agp.serve") as log:
        thread.start()
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and "the device went away" in r.json()["error"]["message"]
        thread.join(60)
    assert not thread.is_alive(), "the server stayed up after its engine failed"
    assert server.failed is not None and "the device went away" in str(server.failed)
    failures = [rec for rec in log.records if rec.levelno >= logging.ERROR]
    assert len(failures) == 1, [rec.getMessage() for rec in failures]
    assert "the device went away" in failures[0].getMessage() and failures[0].exc_info is not None


RAISING = '''
def check(request):
    if request["metadata"].get("tier") == "odd":
        return looks_up(request)
    return request


def looks_up(request):
    return {"gold": 1}[request["metadata"]["tier"]]
'''


def test_a_python_stage_that_raises_is_logged_once_with_its_traceback_and_other_requests_go_on(
        tmp_path, tiny_gguf, monkeypatch):
    """docs/serve.md, "Logs": a request a python stage's own exception failed (500 stage_failed)
    is logged once, at WARNING with its reason and request id, and with the exception's
    traceback: the operator finds the line of the stage that raised, not only its message. A 4xx
    is logged without one (the client's doing, no stack to show)."""
    (tmp_path / "raising_hooks.py").write_text(RAISING)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace(
        "request -> batch", 'stage check : python { fn = "raising_hooks:check" }\n    request -> check -> batch')
    s = LiveServer(tiny_gguf, text=text)
    try:
        with LogRecords("agp.serve") as log:
            r = s.http.post(s.url + "/v1/chat/completions", timeout=60, headers={"X-Request-Id": "odd-1"},
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                  "metadata": {"tier": "odd"}})
            assert r.status_code == 500 and r.json()["error"]["code"] == "stage_failed"
            fine = s.http.post(s.url + "/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert fine.status_code == 200
            assert s.http.post(s.url + "/v1/chat/completions", timeout=60,
                               json={"messages": [], "max_tokens": 2}).status_code == 400
        mine = [rec for rec in log.records if getattr(rec, "request_id", None) == "odd-1"]
        assert len(mine) == 1 and mine[0].levelno == logging.WARNING and mine[0].status == 500
        assert mine[0].exc_info is not None and mine[0].exc_info[0] is KeyError
        stack = logging.Formatter().formatException(mine[0].exc_info)
        assert "raising_hooks.py" in stack and "in looks_up" in stack and "'odd'" in stack
        refused = [rec for rec in log.records if getattr(rec, "status", None) == 400]
        assert len(refused) == 1 and refused[0].exc_info is None
    finally:
        s.close()
