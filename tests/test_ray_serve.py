"""`agp serve --ray` as a process, as users run it: two replicas of the tiny model behind Ray's
proxy, driven by the `openai` client and httpx. Routes answer with and without --root-path, one
GET /metrics covers both replicas (a `replica` label on every series) and answers each scraper as one
process does (the text format's version by Accept, gzip by Accept-Encoding), and SIGTERM drains: new
requests get 503 + Retry-After (not Ray's 404) while the one in flight finishes, then exit 0.
Skipped when Ray is not installed.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_serve import TINY, _free_port

ROOT = Path(__file__).resolve().parents[1]
# Ray runs in the `agp serve --ray` process alone: looked for, not imported (seconds) by every
# worker that collects this module
if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (pip install 'ray[serve]')", allow_module_level=True)


HOLD = "hold until "
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


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_gguf, ray_turn):
    d = tmp_path_factory.mktemp("rayserve")
    # a request whose prompt is HOLD + a file's path waits in the `hold` stage until the test
    # makes the file (`hold` writes PATH.held first): in flight at SIGTERM for as long as the test needs
    (d / "holds.py").write_text(HOLDS)
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=20)
    text = text.replace("    request -> batch\n", "    stage hold    : python        { fn = \"holds:hold\" }\n"
                                                   "    request -> hold -> batch\n")
    assert "request -> hold -> batch" in text
    (d / "tiny.agp").write_text(text)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
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

    try:
        _wait(serving, "agp serve --ray did not come up", timeout=240, every=0.25)
        yield proc, url, d
    finally:
        (d / "release").touch()     # a request the SIGTERM test held, should it have failed before its release
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_routes_answer_with_and_without_the_root_path_and_metrics_cover_every_replica(ray_server):
    proc, url, _ = ray_server
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
def test_the_merged_metrics_answer_each_scraper_as_one_process_does(ray_server, accept, accept_encoding,
                                                                    content_type):
    """The ingress's /metrics negotiates as `agp serve`'s: the text format's version by Accept (0.0.4
    to a plain scrape, 1.0.0 when listed), gzip when Accept-Encoding takes it, `Vary` naming both."""
    _, url, _ = ray_server
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


def test_the_ingress_refuses_what_one_process_refuses_huge_bodies_and_headers_and_deep_json(ray_server):
    """As one process: a Content-Length past --max-body-bytes is a 413 before any of the body is
    read (the ingress waited for the body, a 408 after --body-timeout), headers past 16 KiB a 431
    (answered 200), and JSON nested past the limit a 400 from the replica (the ingress's routing
    key read raised RecursionError: a 500)."""
    _, url, _ = ray_server
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


def test_sigterm_drains_with_503_and_retry_after_and_finishes_the_request_in_flight(ray_server):
    proc, url, d = ray_server
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
    _wait(lambda: httpx.get(url + "/health", timeout=5).status_code == 503, "/health did not turn 503", 20, 0.05)
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
