"""`agp serve --ray` as a process, as users run it: two replicas of the tiny model behind Ray's
proxy, driven by the `openai` client and httpx. Routes answer with and without --root-path, one
GET /metrics covers both replicas (a `replica` label on every series), and SIGTERM drains: new
requests get 503 + Retry-After (not Ray's 404) while the one in flight finishes, then exit 0.
Skipped when Ray is not installed.
"""
from __future__ import annotations

import gzip
import os
import signal
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
pytest.importorskip("ray")


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
    # a 6 s batch window: a request alone waits in it, so one is surely in flight at SIGTERM
    (d / "tiny.agp").write_text(TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=6000))
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
        _wait(serving, "agp serve --ray did not come up", timeout=240, every=1.0)
        yield proc, url, d
    finally:
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
    for accept_encoding, coding in [("gzip", "gzip"), ("identity", None)]:       # Prometheus sends gzip
        with httpx.stream("GET", url + "/metrics", headers={"accept-encoding": accept_encoding}, timeout=30) as r:
            raw = b"".join(r.iter_raw())
        assert r.headers.get("content-encoding") == coding and "accept-encoding" in r.headers["vary"].lower()
        text = (gzip.decompress(raw) if coding else raw).decode()
        assert {f.name for f in text_string_to_metric_families(text)} >= {"vllm:request_success"}


def test_sigterm_drains_with_503_and_retry_after_and_finishes_the_request_in_flight(ray_server):
    proc, url, d = ray_server
    result = {}

    def in_flight():                               # alone in a 6 s batch window: in flight at SIGTERM
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": "the last one", "max_tokens": 6, "ignore_eos": True})
        result["status"], result["body"] = r.status_code, r.json()

    def queued():                   # the request reached a replica (its metrics show it waiting)
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)}
        return sum(s.value for name in ("vllm:num_requests_waiting", "vllm:num_requests_running")
                   for s in fams[name].samples) >= 1

    t = threading.Thread(target=in_flight)
    t.start()
    _wait(queued, "the request did not reach a replica", 30, 0.1)
    proc.send_signal(signal.SIGTERM)
    _wait(lambda: httpx.get(url + "/health", timeout=5).status_code == 503, "/health did not turn 503", 20, 0.05)
    r = httpx.post(url + "/llm/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "late"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable" and "shutting down" in r.json()["error"]["message"]
    assert queued()                                # /metrics still answers: the drain is watched
    t.join(120)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 6
    assert proc.wait(120) == 0, (d / "serve.log").read_text()
