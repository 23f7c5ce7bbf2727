"""Operating `agp serve` as one operates vLLM: flags (and their AGP_* variables), the startup
banner, auth, CORS, TLS, a root path, logs, vLLM-named metrics and the server's trace.

One server process runs with most flags at once (module fixture); the checks read what it
says and answers.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clikit import ROOT, agp, agp_child, agp_in
from test_serve import TINY, _free_port

KEY = "sk-test-7f3a"

PIPELINE = TINY.replace("{max_queue}", "256").replace("{max_batch_size}", "16").replace("{timeout}", "5")

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}=>{% endif %}"

VLLM = {  # name -> type, as a vLLM dashboard reads them
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",                      # its name before vLLM 0.11
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:num_preemptions": "counter", "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter", "vllm:request_success": "counter",
    "vllm:gpu_cache_usage_perc": "gauge", "vllm:cache_config_info": "gauge", "vllm:iteration_tokens_total": "histogram",
    "vllm:request_params_n": "histogram", "vllm:request_params_max_tokens": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_time_per_output_token_seconds": "histogram",
}



class Proc:
    """`agp serve` in a child process, its stderr collected line by line."""

    def __init__(self, args: list[str], env: dict | None = None, scheme: str = "http", verify=True,
                 root: str = ""):
        self.port = _free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}{root}"
        self.lines: list[str] = []
        self.proc = agp_child("serve", *args, "--port", self.port, env={**os.environ, **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.client = httpx.Client(verify=verify, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, "\n".join(self.lines)
            try:
                if self.client.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "agp serve did not come up:\n" + "\n".join(self.lines)
            time.sleep(0.05)         # a refused connection costs next to nothing

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> int:
        # the client's idle keep-alive connection still open, as a client's pool keeps it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.reader.join(10)
        self.client.close()
        return code


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    import ssl

    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return argparse.Namespace(dir=d, context=ssl.create_default_context(cafile=str(d / "ca.pem")))


@pytest.fixture(scope="module")
def ops(tmp_path_factory, tiny_gguf, tls):
    d = tmp_path_factory.mktemp("ops")
    (d / "ops.agp").write_text(PIPELINE.format(model=tiny_gguf).replace("max_queue = 256",
                                                                         "max_queue = 256  max_prompt_tokens = 40"))
    (d / "template.jinja").write_text(TEMPLATE)
    server = Proc([str(d / "ops.agp"), "--threads", "1", "--served-model-name", "alpha", "beta",
                   "--max-model-len", "200", "--max-input-tokens", "150", "--chat-template", str(d / "template.jinja"), "--seed", "11",
                   "--root-path", "/llm", "--allowed-origins", "https://app.example",
                   "--ssl-keyfile", str(tls.dir / "key.pem"), "--ssl-certfile", str(tls.dir / "cert.pem"),
                   "--log-format", "json", "--stats-interval", "0.5", "--trace", str(d / "serve.trace.json")],
                  env={"AGP_API_KEY": KEY, "AGP_MAX_NUM_SEQS": "4"}, scheme="https", verify=tls.context)
    server.dir, server.ca = d, tls.context
    server.auth = {"Authorization": f"Bearer {KEY}"}
    yield server
    server.stop()
    # the client's idle TLS connection did not hold the stop up: closing it waited for a close_notify
    # the client never sent, for uvicorn's 5 s, then an ERROR ("Cancel 0 running task(s)")
    assert not [line for line in server.lines if "graceful shutdown exceeded" in line], server.lines[-5:]


def _records(server) -> list[dict]:
    return [json.loads(line) for line in list(server.lines) if line.startswith("{")]


def _wait_for(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ---------------------------------------------------------------- flags, banner, auth

def test_the_banner_shows_the_effective_values_of_flags_and_variables(ops):
    banner = " ".join(r["message"] for r in _records(ops) if r["logger"] == "agp.serve")
    assert "agp 0.1.0 serving pipeline 'tiny' as 'alpha', 'beta' at https://127.0.0.1:" in banner
    assert "/llm/v1" in banner
    assert "context 200 tokens" in banner                        # --max-model-len over the model's 512
    assert "batch 4 sequences" in banner                         # AGP_MAX_NUM_SEQS over the file's 16
    assert "KV 256 blocks x 8 tokens" in banner and "on cpu" in banner and "seed 11" in banner
    assert re.search(r"on cpu \(\d+ threads? of the \d+ CPUs? this process may use", banner)
    assert "chat template template.jinja" in banner                # --chat-template over the model's own
    assert "api key required" in banner and "CORS https://app.example" in banner


def test_every_v1_route_wants_the_key_and_health_and_metrics_stay_open(ops):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/models/alpha"), ("POST", "/tokenize"), ("GET", "/stats")):
        r = ops.client.request(method, ops.url + path, json={})
        assert r.status_code == 401, path
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error" and err["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = ops.client.request(method, ops.url + path, json={}, headers={"Authorization": "Bearer sk-nope"})
        assert wrong.status_code == 401
    for path in ("/health", "/metrics", "/version", "/ping"):
        assert ops.client.get(ops.url + path).status_code == 200, path
    assert ops.client.head(ops.url + "/health").status_code == 200               # load balancers' probes
    assert ops.client.post(ops.url + "/ping").json() == {"status": "ok"}           # vLLM's SageMaker route
    client = openai.OpenAI(base_url=ops.url + "/v1", api_key="sk-nope", max_retries=0,
                           http_client=httpx.Client(verify=ops.ca))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_head_request_wants_the_key_as_its_get_does(ops):
    # HEAD is no probe of its own: only OPTIONS (a CORS preflight) and the open routes go without a key
    for path in ("/v1/models", "/v1/models/alpha", "/stats"):
        assert ops.client.head(ops.url + path).status_code == 401, path
        assert ops.client.head(ops.url + path, headers={"Authorization": "Bearer sk-nope"}).status_code == 401, path
        assert ops.client.head(ops.url + path, headers=ops.auth).status_code != 401, path
    assert ops.client.head(ops.url + "/health").status_code == 200


def test_served_names_context_and_template_take_effect(ops):
    client = openai.OpenAI(base_url=ops.url + "/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(verify=ops.ca))
    models = client.models.list().data
    assert [m.id for m in models][:2] == ["alpha", "beta"]
    assert all(m.max_model_len == 200 for m in models)
    out = client.completions.create(model="beta", prompt="hi", max_tokens=3)
    assert out.model == "beta" and out.usage.completion_tokens == 3          # the name asked for
    assert client.responses.create(model="beta", input="hi", max_output_tokens=2).model == "beta"
    unnamed = ops.client.post(ops.url + "/v1/completions", headers=ops.auth, json={"prompt": "hi", "max_tokens": 1})
    assert unnamed.json()["model"] == "alpha"                                # none asked for: the first
    with pytest.raises(openai.BadRequestError, match="200"):
        client.completions.create(model="alpha", prompt="hi", max_tokens=250)
    ids = ops.client.post(ops.url + "/tokenize", headers=ops.auth,
                          json={"messages": [{"role": "user", "content": "hey"}]}).json()["tokens"]
    text = ops.client.post(ops.url + "/detokenize", headers=ops.auth, json={"tokens": ids}).json()["prompt"]
    assert text == "<<hey>>=>"                                   # --chat-template's rendering


def test_max_input_tokens_overrides_the_pipelines_prompt_limit_and_refusals_name_the_flag(ops):
    """--max-input-tokens 150 over the file's requests.max_prompt_tokens = 40: a prompt of 100
    tokens is answered; one of 160 is refused in the flag's name (it named the pipeline's
    setting, which said 40), whether counted from ids or from text."""
    def complete(prompt):
        return ops.client.post(ops.url + "/v1/completions", headers=ops.auth,
                               json={"prompt": prompt, "max_tokens": 1})

    assert complete([5] * 100).status_code == 200
    for prompt in ([5] * 160, "a " * 400):
        r = complete(prompt)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "(--max-input-tokens 150)" in err["message"], err
        assert "max_prompt_tokens" not in err["message"]


def test_the_conversation_ends_as_the_request_asks_on_tokenize_and_chat(ops):
    def tokenize(**kw):
        r = ops.client.post(ops.url + "/tokenize", headers=ops.auth, json=kw)
        assert r.status_code == 200, r.text
        return r.json()

    def text(ids):
        return ops.client.post(ops.url + "/detokenize", headers=ops.auth, json={"tokens": ids}).json()["prompt"]

    hey = [{"role": "user", "content": "hey"}]
    begun = [*hey, {"role": "assistant", "content": "Sure, "}]
    assert text(tokenize(messages=hey, add_generation_prompt=False)["tokens"]) == "<<hey>>"
    assert text(tokenize(messages=begun, add_generation_prompt=False)["tokens"]) == "<<hey>><<Sure, >>"
    open_ = tokenize(messages=begun, continue_final_message=True, return_token_strs=True)
    assert text(open_["tokens"]) == "<<hey>><<Sure, "                  # the answer goes on after "Sure, "
    assert len(open_["token_strs"]) == open_["count"] and all(isinstance(t, str) and t for t in open_["token_strs"])
    assert tokenize(messages=hey)["token_strs"] is None

    def chat(**kw):
        return ops.client.post(ops.url + "/v1/chat/completions", headers=ops.auth,
                               json={"model": "alpha", "max_tokens": 2, "ignore_eos": True, **kw})

    out = chat(messages=begun, continue_final_message=True, add_generation_prompt=False)
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == open_["count"]
    plain = chat(messages=hey, add_generation_prompt=False)
    assert plain.json()["usage"]["prompt_tokens"] == tokenize(messages=hey, add_generation_prompt=False)["count"]
    both = chat(messages=begun, continue_final_message=True, add_generation_prompt=True)
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_cors_preflight_and_the_root_path(ops):
    pre = ops.client.options(ops.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    other = ops.client.options(ops.url + "/v1/models", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in other.headers


def test_the_root_path_answers_with_and_without_the_prefix_and_the_banner_url_works(ops):
    banner = next(r["message"] for r in _records(ops) if "serving pipeline" in r["message"])
    advertised = banner.rsplit(" at ", 1)[1]
    assert advertised.endswith("/llm/v1")
    for base in (advertised, ops.url + "/v1"):               # through a proxy that keeps the prefix, or strips it
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, http_client=httpx.Client(verify=ops.ca))
        assert [m.id for m in client.models.list().data][:2] == ["alpha", "beta"]
        assert client.completions.create(model="alpha", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert ops.client.get(ops.url + "/llm/health").json() == {"status": "ok"}
    assert ops.client.get(ops.url + "/llmx/v1/models", headers=ops.auth).status_code == 404   # not the prefix
    _wait_for(lambda: any(r.get("path") == "/llm/v1/completions" for r in _records(ops)), "no access line")
    paths = {r["path"] for r in _records(ops) if r["logger"] == "agp.access"}
    assert {"/llm/v1/models", "/v1/models"} <= paths and "/llm/llm/v1/models" not in paths   # as the client sent them


def test_a_stream_without_a_valid_key_is_refused_before_it_starts(ops):
    body = {"model": "alpha", "prompt": "stream me", "max_tokens": 4, "stream": True}
    for headers in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": KEY}):
        for route, payload in (("/v1/completions", body),
                               ("/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                                         "messages": [{"role": "user", "content": "hi"}]})):
            with ops.client.stream("POST", ops.url + route, json=payload,
                                   headers={"Accept": "text/event-stream", **headers}) as r:
                assert r.status_code == 401, (route, headers)
                assert r.headers["content-type"].startswith("application/json")
                assert json.loads(r.read())["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=ops.url + "/v1", api_key="sk-nope", max_retries=0,
                           http_client=httpx.Client(verify=ops.ca))
    with pytest.raises(openai.AuthenticationError):
        list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, stream=True))
    with ops.client.stream("POST", ops.url + "/v1/completions", json=body,
                           headers={"Accept": "text/event-stream", **ops.auth}) as r:
        assert r.status_code == 200 and [x for x in r.iter_lines() if x][-1] == "data: [DONE]"


def test_tls_is_served_and_plain_http_is_not(ops):
    plain = ops.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(plain + "/health", timeout=5)


def test_the_same_seed_gives_the_same_unseeded_samples(soft_gguf):
    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams

    def sample(seed):
        engine = Engine(EngineConfig(model=str(soft_gguf), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8,
                                     seed=seed))
        params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
        for i, prompt in enumerate(["a b c", "x y"]):
            engine.add_request(f"r{i}", prompt=prompt, params=params)
        out: dict = {}
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


# ---------------------------------------------------------------- logs

def test_logs_are_timestamped_json_with_access_lines_reasons_and_stats(ops):
    ops.client.post(ops.url + "/v1/completions", headers=ops.auth, json={"prompt": "x", "max_tokens": 0.5})
    body = {"prompt": "stats please", "max_tokens": 64, "ignore_eos": True}
    threads = [threading.Thread(target=ops.client.post, args=(ops.url + "/v1/completions",),
                                kwargs={"headers": ops.auth, "json": body}) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    _wait_for(lambda: any(r.get("stats") or "gen_tok_s" in r for r in _records(ops)), "no stats line")
    records = _records(ops)
    assert all(r["ts"].endswith("Z") and r["level"] and r["logger"] for r in records)
    access = [r for r in records if r["logger"] == "agp.access"]
    done = [r for r in access if r["method"] == "POST" and r["path"] == "/v1/completions" and r["status"] == 200]
    assert done and all(r["latency_ms"] > 0 and r["request_id"] for r in done)     # the path as the client sent it
    reasons = [r for r in records if r["logger"] == "agp.serve" and r.get("status") == 400]
    assert reasons and reasons[-1]["level"] == "INFO" and "max_tokens" in reasons[-1]["reason"]
    stats = [r for r in records if "gen_tok_s" in r]
    assert any(r["gen_tok_s"] > 0 for r in stats)
    assert {"running", "waiting", "prompt_tok_s", "kv_usage", "prefix_hit_rate"} <= stats[0].keys()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_gguf):
    """A second server, with text logs, no access log and a trace file, asked a few requests and
    then stopped (SIGTERM): what it wrote and its exit status, for the tests after it to read."""
    d = tmp_path_factory.mktemp("stopped")
    (d / "p.agp").write_text(PIPELINE.format(model=tiny_gguf))
    server = Proc([str(d / "p.agp"), "--threads", "1", "--no-access-log", "--trace", str(d / "t.json")])
    try:
        server.answers = [server.client.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}),
                          server.client.post(server.url + "/v1/completions", json={"prompt": ""})]
        for i in range(3):
            server.client.post(server.url + "/v1/completions", json={"prompt": f"n{i}", "max_tokens": 3})
    finally:
        server.code = server.stop()
    server.dir = d
    return server


def test_text_logs_and_no_access_log(stopped):
    server = stopped
    assert [r.status_code for r in server.answers] == [200, 400]
    assert server.code == 0
    text = "\n".join(server.lines)
    assert "agp.access" not in text and "uvicorn.access" not in text
    line = next(x for x in server.lines if "-> 400" in x)
    assert line[:4].isdigit() and "Z INFO agp.serve: POST /v1/completions -> 400" in line


# ---------------------------------------------------------------- metrics

def _scrape(server) -> dict:
    text = server.client.get(server.url + "/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families, name, sample=None, **labels) -> float:
    fam = families[name]
    want = sample or (name + "_total" if fam.type == "counter" else name)
    return sum(s.value for s in fam.samples if s.name == want and labels.items() <= s.labels.items())


def test_warnings_and_other_libraries_records_are_log_records_too():
    """A collector reads `--log-format json` line by line: a Python warning (agp's own "native
    kernels unavailable", a library's deprecation) went to bare stderr as two lines (the file and
    line, then the source line), and another library's logger.warning as a bare line; each is
    now one record in the server's format (a library's INFO stays out)."""
    code = ("import logging, warnings\n"
            "from pipeline_dsl.serve.logs import configure\n"
            "configure({fmt!r}, 'info')\n"
            "warnings.warn('agp: native kernels unavailable (x)\\nsecond line', RuntimeWarning)\n"
            "logging.getLogger('transformers.tokenization').warning('a library says %s', 'so')\n"
            "logging.getLogger('transformers.tokenization').info('a library chats')\n")
    for fmt in ("json", "text"):
        r = subprocess.run([sys.executable, "-c", code.format(fmt=fmt)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 2, r.stderr
        if fmt == "json":
            warned, said = (json.loads(line) for line in lines)
            assert warned["level"] == "WARNING" and warned["logger"] == "py.warnings"
            assert warned["message"] == "RuntimeWarning: agp: native kernels unavailable (x) second line"
            assert said["logger"] == "transformers.tokenization" and said["message"] == "a library says so"
        else:
            assert lines[0].endswith("Z WARNING py.warnings: RuntimeWarning: agp: native kernels unavailable (x) "
                                     "second line")
            assert lines[1].endswith("Z WARNING transformers.tokenization: a library says so")


def test_with_json_logs_a_start_that_fails_says_why_in_a_json_record(tmp_path):
    """Under --log-format json the one line saying why the server did not start (a port in use, a
    pipeline that does not check) was bare text, the only line a JSON collector could not parse,
    and the one that mattered. It is a JSON record at ERROR; text logs keep the bare line. The first
    start's JSON logs in a child process, whose every line of stderr is read (what a fresh process
    writes before the command runs included); the others in this process, what the command writes
    being the same whatever made the start fail."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    held6 = socket.socket(socket.AF_INET6)             # on IPv6 the address is bracketed: which colon is the port's?
    held6.bind(("::1", 0))
    held6.listen()
    port6 = held6.getsockname()[1]
    (tmp_path / "bad.agp").write_text("pipeline p {\n    stage a : nosuchkind {}\n}\n")
    try:
        for k, (argv, said) in enumerate(
                ((["examples/chat.agp", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["examples/chat.agp", "--host", "::1", "--port", str(port6)], f"cannot listen on [::1]:{port6}"),
                 ([str(tmp_path / "bad.agp"), "--port", "0"], "nosuchkind"))):
            for fmt in ("json", "text"):
                r = (agp("serve", *argv, "--log-format", fmt, timeout=120) if fmt == "json" and k == 0
                     else agp_in("serve", *argv, "--log-format", fmt))
                assert r.returncode == 2 and said in r.stderr, r.stderr
                if fmt == "text":
                    assert not r.stderr.startswith("{") and "Traceback" not in r.stderr
                    continue
                records = [json.loads(line) for line in r.stderr.splitlines()]     # every line, none bare
                assert records[-1]["level"] == "ERROR" and said in records[-1]["message"]
    finally:
        held.close()
        held6.close()


def test_why_a_start_failed_is_written_whatever_the_log_level(tmp_path):
    """--log-level critical keeps the ERROR records out, but not the one saying why the server
    did not start: exit 2 with nothing on stderr left the operator guessing. Text logs write it
    as a bare line at any level; JSON logs as their ERROR record. (In this process: what it writes
    is the point, not the process.)"""
    (tmp_path / "bad.agp").write_text("pipeline p {\n    stage a : nosuchkind {}\n}\n")
    for fmt in ("json", "text"):
        r = agp_in("serve", tmp_path / "bad.agp", "--port", "0", "--log-format", fmt, "--log-level", "critical")
        assert r.returncode == 2 and "nosuchkind" in r.stderr, (fmt, r.stderr)
        if fmt == "json":
            record = json.loads(r.stderr.splitlines()[-1])
            assert record["level"] == "ERROR" and "nosuchkind" in record["message"]


@pytest.fixture
def configure():
    """serve.logs.configure, which `agp serve` calls once for its process, for one test of this
    process (conftest's logging_put_back sets the loggers back after it)."""
    from pipeline_dsl.serve.logs import configure

    return configure


def test_uvicorns_own_records_are_written_in_the_servers_format(monkeypatch, configure):
    """uvicorn logs its start and an application's exception on `uvicorn.error`: one record in the
    server's format (through agp's handler on `uvicorn`), not lost nor a bare line."""
    import io
    import logging

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("json", "info")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7)
    [line] = sys.stderr.getvalue().splitlines()
    record = json.loads(line)
    assert (record["logger"], record["level"], record["message"]) == ("uvicorn.error", "INFO",
                                                                      "Started server process [7]")


def test_a_text_log_line_is_one_line_whatever_a_client_put_in_its_reason(monkeypatch, configure):
    """A 404's reason quotes the request's `model`: `"model": "m\\nFORGED INFO agp.access: …"`
    wrote a second line to the text log, one the client chose (an escape sequence reached the
    operator's terminal the same way). A message's control characters are escaped in text lines."""
    import io
    import logging

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    logging.getLogger("agp.serve").info("POST /v1/completions -> 404 the model '%s' does not exist",
                                        "m\n2026-12-05T00:00:00.000Z INFO agp.access: forged\x1b[2J\r\x7f\tz")
    lines = sys.stderr.getvalue().splitlines()
    assert len(lines) == 1 and "\x1b" not in lines[0] and "\r" not in lines[0]
    assert lines[0].endswith("the model 'm\\n2026-12-05T00:00:00.000Z INFO agp.access: forged\\x1b[2J\\r"
                             "\\x7f\tz' does not exist")


def test_a_text_log_line_escapes_c1_controls_and_unicode_line_separators(monkeypatch, configure):
    """A client's text in a reason with U+0085 (NEL), U+2028 or U+2029 split the text line for a
    reader that splits lines as Unicode does (str.splitlines), and U+009B (CSI) opened an escape
    sequence on a terminal as ESC [ does: they are escaped as the C0 controls are; other non-ASCII
    text (a no-break space, an accent) is written as it is."""
    import io
    import logging

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    logging.getLogger("agp.serve").info("POST /v1/completions -> 404 the model '%s' does not exist",
                                        "m\x85A\u2028B\u2029C\x9b2J\x80\x9f\xa0é")
    lines = sys.stderr.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("the model 'm\\x85A\\u2028B\\u2029C\\x9b2J\\x80\\x9f\xa0é' does not exist")


def test_a_traceback_in_the_text_log_escapes_what_its_exceptions_say(monkeypatch, configure):
    """A python stage's exception quoting a request's content (`ValueError(f"bad {text}")`), or
    the exception it was raised from, wrote that content raw under the record: a newline in it
    forged a record line of the client's choosing, ESC a terminal sequence. The traceback keeps
    its own lines (the frames, the chain), and each exception's text is escaped as a message is."""
    import io
    import logging

    forged = "x\n2026-12-05T00:00:00.000Z INFO agp.access: forged\x1b[2J\x85y"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    try:
        try:
            raise RuntimeError(forged)
        except RuntimeError as inner:
            raise ValueError(f"bad {forged}") from inner
    except ValueError:
        logging.getLogger("agp.serve").exception("a stage failed")
    lines = sys.stderr.getvalue().splitlines()
    assert not any(line.startswith("2026-12-05") for line in lines), lines
    assert not any(c in line for line in lines for c in "\x1b\x85"), lines
    assert lines[0].endswith("ERROR agp.serve: a stage failed")
    assert "RuntimeError: x\\n2026-12-05T00:00:00.000Z INFO agp.access: forged\\x1b[2J\\x85y" in lines
    assert "ValueError: bad x\\n2026-12-05T00:00:00.000Z INFO agp.access: forged\\x1b[2J\\x85y" == lines[-1]
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines.count("Traceback (most recent call last):") == 2
    assert any(line.startswith('  File "') and "test_a_traceback_in_the_text_log" in line for line in lines)


def test_a_note_on_a_logged_exception_is_one_escaped_line(monkeypatch, configure):
    """An exception's notes (e.add_note, as a python stage may quote a request's text in one) were
    split at their newlines under the traceback, so a note forged a record line of its own: each
    note is one line, its control characters escaped as a message's, after the exception's line."""
    import io
    import logging

    forged = "hi\n2026-12-05T00:00:00.000Z INFO agp.serve: forged\x1b[2J"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    try:
        e = ValueError("bad")
        e.add_note(forged)
        e.add_note("second")
        raise e
    except ValueError:
        logging.getLogger("agp.serve").exception("a stage failed")
    lines = sys.stderr.getvalue().splitlines()
    assert not any(line.startswith("2026-12-05") or "\x1b" in line for line in lines), lines
    assert lines[-3:] == ["ValueError: bad", "hi\\n2026-12-05T00:00:00.000Z INFO agp.serve: forged\\x1b[2J", "second"]


def test_a_logged_exception_formats_where_python_has_no_notes(monkeypatch, configure):
    """Python 3.10's TracebackException has no __notes__ (3.11 added them): a logged exception
    still writes its traceback, not an AttributeError in the log handler."""
    import io
    import logging
    import traceback
    import types

    class WithoutNotes(traceback.TracebackException):          # as Python 3.10's
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self.__notes__

        def format_exception_only(self):
            self.__notes__ = None                                # (3.11's own method reads it)
            try:
                yield from super().format_exception_only()
            finally:
                del self.__notes__

    from pipeline_dsl.serve import logs

    monkeypatch.setattr(logs, "traceback", types.SimpleNamespace(TracebackException=WithoutNotes))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("agp.serve").exception("a stage failed")
    lines = sys.stderr.getvalue().splitlines()
    assert lines[0].endswith("ERROR agp.serve: a stage failed") and lines[-1] == "ValueError: bad", lines


def test_a_log_lines_time_is_utc_to_the_millisecond_whatever_the_local_zone(monkeypatch):
    """`2027-01-15T08:00:00.005Z`: the Z says UTC, so the time is UTC on a server whose zone is not,
    and its milliseconds are three digits (5 ms is .005, not .5)."""
    import logging
    import time

    from pipeline_dsl.serve.logs import formatter

    monkeypatch.setenv("TZ", "Asia/Kolkata")                 # UTC+05:30
    time.tzset()
    try:
        record = logging.makeLogRecord({"name": "agp.serve", "levelname": "INFO", "msg": "hello",
                                        "created": 1_800_000_000.005, "msecs": 5.0})
        assert formatter("text").format(record) == "2027-01-15T08:00:00.005Z INFO agp.serve: hello"
        assert json.loads(formatter("json").format(record))["ts"] == "2027-01-15T08:00:00.005Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_json_log_record_keeps_its_message_and_puts_the_traceback_in_its_own_field(monkeypatch, configure):
    import io
    import logging

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("json", "info")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("agp.serve").exception("a stage failed")
    record = json.loads(sys.stderr.getvalue())
    assert record["message"] == "a stage failed" and record["level"] == "ERROR"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("ValueError: bad")


def test_an_exception_groups_exceptions_are_logged_under_it_each_marked_and_indented(monkeypatch, configure):
    """As Python writes a group: each of its exceptions under a `+---- i ----` line, its lines
    behind `| `; the group's own line before them, the exception it was raised from first."""
    import io
    import logging

    if sys.version_info < (3, 11):
        pytest.skip("exception groups came with Python 3.11")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    configure("text", "info")
    try:
        try:
            raise KeyError("cause")
        except KeyError as e:
            raise ExceptionGroup("two failed", [ValueError("one\nx"), TypeError("two")]) from e
    except ExceptionGroup:
        logging.getLogger("agp.serve").exception("calls failed")
    lines = sys.stderr.getvalue().splitlines()
    cause, group = lines.index("KeyError: 'cause'"), lines.index("ExceptionGroup: two failed (2 sub-exceptions)")
    assert cause < group
    first, second = lines.index("+---------------- 1 ----------------"), lines.index("+---------------- 2 ----------------")
    assert group < first < lines.index("| ValueError: one\\nx") < second < lines.index("| TypeError: two")


def test_log_lines_go_to_the_stderr_of_the_moment_not_the_one_at_configure(monkeypatch, configure):
    import io
    import logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("text", "info")
    first.close()                                 # a host swapped its stderr and closed the old one
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("agp.serve").info("after the swap")
    assert "INFO agp.serve: after the swap" in second.getvalue()


def test_every_series_but_the_process_collectors_carries_the_first_served_name(ops):
    """docs/serve.md, "Metrics": each series has a `model_name` label, the first served name
    (--served-model-name alpha beta: alpha), but the process's own (`process_…`, prometheus-client's)."""
    samples = [(f.name, s) for f in _scrape(ops).values() for s in f.samples]
    unlabelled = {name for name, s in samples if "model_name" not in s.labels}
    assert unlabelled == {name for name, _ in samples if name.startswith("process_")} != set()
    assert {s.labels["model_name"] for name, s in samples if name not in unlabelled} == {"alpha"}


def test_metrics_carry_vllm_names_types_model_label_and_move_under_load(ops):
    before = _scrape(ops)
    for name, kind in VLLM.items():
        assert name in before and before[name].type == kind, name
        assert all(s.labels.get("model_name") == "alpha" for s in before[name].samples), name
    every = [s for f in before.values() for s in f.samples]
    assert not any(s.name.endswith("_created") for s in every)
    assert "process_resident_memory_bytes" in before and "process_cpu_seconds" in before
    assert "agp_requests" in before and "agp_stage_items_in" in before         # agp's names stay

    peak = {"running": 0.0, "usage": 0.0}
    shared = "the same long system prompt for every request " * 4
    body = {"prompt": shared, "max_tokens": 48, "ignore_eos": True}
    sent = 0
    for _ in range(5):         # load until the gauges are seen to move (a busy machine may miss a round)
        threads = [threading.Thread(target=ops.client.post, args=(ops.url + "/v1/completions",),
                                    kwargs={"headers": ops.auth, "json": body}) for _ in range(8)]
        for t in threads:
            t.start()
        sent += len(threads)
        while any(t.is_alive() for t in threads):
            fams = _scrape(ops)
            peak["running"] = max(peak["running"], _value(fams, "vllm:num_requests_running"))
            peak["usage"] = max(peak["usage"], _value(fams, "vllm:kv_cache_usage_perc"))
        for t in threads:
            t.join(60)
        if peak["running"] >= 1 and peak["usage"] > 0:
            break
    after = _scrape(ops)
    assert peak["running"] >= 1 and 0 < peak["usage"] <= 1
    assert _value(after, "vllm:num_requests_running") == 0
    grew = {name: _value(after, name, name + ("_count" if VLLM[name] == "histogram" else "_total"))
            - _value(before, name, name + ("_count" if VLLM[name] == "histogram" else "_total"))
            for name, kind in VLLM.items() if kind != "gauge" and name != "vllm:num_preemptions"}
    assert grew["vllm:request_success"] >= sent and grew["vllm:e2e_request_latency_seconds"] >= sent
    assert grew["vllm:generation_tokens"] >= sent * 48 and grew["vllm:prompt_tokens"] > sent * 20
    assert grew["vllm:request_queue_time_seconds"] >= sent and grew["vllm:request_decode_time_seconds"] >= sent
    assert grew["vllm:prefix_cache_hits"] > 0 and grew["vllm:prefix_cache_queries"] >= grew["vllm:prefix_cache_hits"]
    assert _value(after, "vllm:request_success", finished_reason="length") >= sent
    assert grew["vllm:time_per_output_token_seconds"] == grew["vllm:inter_token_latency_seconds"] > 0
    assert 0 < _value(after, "agp_prefix_cache_hit_rate") <= 1


# ---------------------------------------------------------------- trace

def test_the_server_trace_opens_in_perfetto_with_request_ids_and_flows(ops):
    r = ops.client.post(ops.url + "/v1/completions", headers=ops.auth, json={"prompt": "trace me", "max_tokens": 4})
    rid = r.json()["id"]
    flushed = ops.client.post(ops.url + "/trace/flush", headers=ops.auth)
    assert flushed.status_code == 200 and flushed.json()["trace"] == "serve.trace.json"
    assert ops.client.post(ops.url + "/trace/flush").status_code == 401
    trace = json.loads((ops.dir / "serve.trace.json").read_text())
    check_trace_event_format(trace)
    mine = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["args"].get("id") == rid]
    names = [e["name"] for e in sorted(mine, key=lambda e: e["ts"])]
    assert names[0] == "request.admit" and "gen.generate" in names and names[-1] == "out.respond"
    key = mine[0]["args"]["request"]
    flow = [e for e in trace["traceEvents"] if e["ph"] in "stf" and e["args"]["request"] == key]
    assert [e["ph"] for e in flow] == ["s"] + ["t"] * (len(mine) - 2) + ["f"]
    assert len({e["id"] for e in flow}) == 1


def check_trace_event_format(trace: dict) -> None:
    """What Perfetto's JSON importer needs: the Trace Event Format's required keys and types,
    complete events with durations, flows that start, step and finish inside slices."""
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    slices: dict[tuple, list] = {}
    for e in events:
        assert e["ph"] in {"X", "M", "s", "t", "f"} and isinstance(e["name"], str), e
        assert isinstance(e["pid"], int)
        if e["ph"] == "M":
            assert e["name"] in {"process_name", "thread_name", "thread_sort_index"} and isinstance(e["args"], dict)
            continue
        assert isinstance(e["tid"], int) and isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
            slices.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    flows: dict = {}
    for e in events:
        if e["ph"] in "stf":
            assert isinstance(e["id"], int) and e["cat"]
            assert any(a <= e["ts"] <= b for a, b in slices[(e["pid"], e["tid"])]), "a flow event outside any slice"
            flows.setdefault(e["id"], []).append(e["ph"])
    for phases in flows.values():
        assert phases[0] == "s" and phases[-1] == "f" and set(phases[1:-1]) <= {"t"}
    for spans in slices.values():                       # slices on one track nest or follow each other
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list = []
        for a, b in spans:
            while stack and stack[-1] <= a:
                stack.pop()
            assert not stack or b <= stack[-1] + 1e-3, "overlapping slices on one track"
            stack.append(b)


def test_the_trace_is_written_at_shutdown(stopped):
    assert stopped.code == 0
    trace = json.loads((stopped.dir / "t.json").read_text())
    check_trace_event_format(trace)
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert "requests #1" in lanes and "compute" in lanes


# ---------------------------------------------------------------- the command line

def test_agp_version_and_the_usage_of_an_unknown_serve_flag():
    v = agp_in("--version")
    assert v.returncode == 0 and v.stdout.strip() == "agp 0.1.0"
    for command in ("serve", "run"):                 # as `vllm serve --version` answers
        sv = agp_in(command, "--version")
        assert (sv.returncode, sv.stdout) == (0, v.stdout)
    bad = agp_in("serve", "examples/chat.agp", "--max-num-seqs", "4", "--bogus")
    assert bad.returncode == 2
    assert "usage: agp serve" in bad.stderr and "unrecognized arguments: --bogus" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: no such file"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["--root-path", "llm"], "--root-path must start with '/'"),
])
def test_bad_serve_flags_exit_2_naming_the_flag(argv, message):
    r = agp_in("serve", "examples/chat.agp", "--port", "0", *argv)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_chat_template_that_does_not_parse_is_named_by_its_flag_and_line(tmp_path):
    # it said "chat_template: the model's chat template does not parse", once the model had loaded
    (tmp_path / "t.jinja").write_text("{% for m in messages %}\n{{ m.content }\n")
    r = agp_in("serve", "examples/chat.agp", "--port", "0", "--chat-template", tmp_path / "t.jinja")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"agp serve: error: --chat-template {tmp_path / 't.jinja'}: the template does not parse (line 2): " \
           "unexpected '}'" in r.stderr
    assert "model's" not in r.stderr and "serving" not in r.stderr


def test_environment_variables_set_serve_flags_and_flags_win():
    p = argparse.ArgumentParser(prog="agp serve")
    os_env = {"AGP_API_KEY": "k1,k2", "AGP_MAX_NUM_SEQS": "8", "AGP_ACCESS_LOG": "false", "AGP_SEED": "3", "AGP_LOG_FORMAT": "json"}
    _add(p, os_env)
    args = p.parse_args(["x.agp"])
    assert args.api_key == ["k1", "k2"] and args.max_num_seqs == 8 and args.seed == 3
    assert args.access_log is False and args.log_format == "json"
    assert p.parse_args(["x.agp", "--max-num-seqs", "2"]).max_num_seqs == 2
    bad = argparse.ArgumentParser(prog="agp serve")
    with pytest.raises(SystemExit) as e:
        _add(bad, {"AGP_MAX_NUM_SEQS": "many"})
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        _add(argparse.ArgumentParser(prog="agp serve"), {"AGP_LOG_FORMAT": "xml"})


def _add(p, environ):
    """serve's arguments with their defaults from `environ` instead of os.environ."""
    from unittest import mock

    from pipeline_dsl.commands import serve

    with mock.patch.dict(os.environ, environ, clear=False):
        serve.add_arguments(p)
