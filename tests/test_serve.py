"""`agp serve`: request validation, and a real server on loopback with the tiny GGUF model
driven by the official `openai` client, httpx and a subprocess for SIGTERM."""

import asyncio
import json
import os
import random
import re
import signal
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import flowkit
from clikit import agp_child, agp_in, reap, reaped
from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.flow import build_runtime
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve.app import create_app
from pipeline_dsl.serve.config import ServeConfig
from pipeline_dsl.serve.async_pipeline import AsyncPipeline
from pipeline_dsl.serve.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
SERVED = ("tiny", "tiny-model")


# ---------------------------------------------------------------- validation, no server

def parse_chat(obj, max_model_len=512):
    return P.parse_chat(obj, max_model_len=max_model_len, served=SERVED, stages=("gen",))


def parse_completion(obj, max_model_len=512):
    return P.parse_completion(obj, max_model_len=max_model_len, served=SERVED, stages=("gen",))


def test_malformed_json_is_a_400_naming_the_position():
    with pytest.raises(P.APIError) as e:
        P.parse_json(b'{"prompt": "hi",}')
    assert e.value.status == 400 and "not valid JSON" in e.value.message
    assert "column 17" in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_json_that_is_not_an_object_is_rejected():
    with pytest.raises(P.APIError, match="must be a JSON object, not an array"):
        P.parse_json(b"[1, 2]")


@pytest.mark.parametrize("field, value, expected", [
    ("max_tokens", "ten", "'max_tokens' must be an integer from 1 to 1048576, not \"ten\""),
    ("max_tokens", True, "'max_tokens' must be an integer from 1 to 1048576, not true"),
    ("temperature", "hot", "'temperature' must be a number"),
    ("temperature", 3.5, "'temperature' must be a number from 0 to 2, not 3.5"),
    ("top_p", 0, "'top_p' must be a number above 0 up to 1, not 0"),
    ("stream", "yes", "'stream' must be true or false"),
    ("stop", 5, "'stop' must be a string or an array of strings"),
    ("seed", 1.5, "'seed' must be an integer"),
    ("n", 0, "'n' must be an integer from 1 to 64, not 0"),
])
def test_wrongly_typed_fields_are_400_naming_the_field(field, value, expected):
    with pytest.raises(P.APIError, match=expected) as e:
        parse_completion({"prompt": "hi", field: value})
    assert e.value.status == 400 and e.value.param == field


def test_empty_messages_and_empty_prompt_are_rejected():
    with pytest.raises(P.APIError, match="'messages' is empty") as e:
        parse_chat({"messages": []})
    assert e.value.param == "messages"
    with pytest.raises(P.APIError, match="'messages' is required"):
        parse_chat({})
    with pytest.raises(P.APIError, match="every message in 'messages' is empty"):
        parse_chat({"messages": [{"role": "user", "content": "  "}]})
    with pytest.raises(P.APIError, match="'prompt' is empty"):
        parse_completion({"prompt": ""})


def test_bad_message_role_and_content_are_named():
    with pytest.raises(P.APIError, match=r"'messages\[1\].role' must be one of"):
        parse_chat({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]})
    with pytest.raises(P.APIError, match=r"'messages\[0\].content' must be a string"):
        parse_chat({"messages": [{"role": "user", "content": 7}]})
    with pytest.raises(P.APIError, match="text part"):
        parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})


def test_max_tokens_beyond_the_context_is_rejected():
    with pytest.raises(P.APIError, match="beyond the context of 512 tokens") as e:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 513})
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(P.APIError, match="'max_completion_tokens' = 600"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600})


def test_unknown_field_suggests_the_closest_name():
    with pytest.raises(P.APIError, match='unrecognized request argument "max_token"; did you mean .max_tokens.'):
        parse_completion({"prompt": "hi", "max_token": 4})


def test_unknown_model_is_404_model_not_found():
    with pytest.raises(P.APIError) as e:
        parse_completion({"prompt": "hi", "model": "tinny"})
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert "did you mean 'tiny'" in e.value.message


def test_an_unknown_model_of_megabytes_is_a_404_naming_it_cut_short_without_matching_it(monkeypatch):
    """A `model` of 4 MB was sent back and logged whole in its 404, and difflib indexed all of
    it for a did-you-mean no name that long can get (~0.6 s a request): the 404 names it cut at
    64 characters, and no name too long to reach the match's cutoff is matched; a near name still
    gets its suggestion."""
    import difflib

    asked = []
    matches = difflib.get_close_matches

    def matched(word, possibilities, *args, **kw):
        asked.append(word)
        return matches(word, possibilities, *args, **kw)

    monkeypatch.setattr(difflib, "get_close_matches", matched)
    long_name = "tiny" + "x" * 4_000_000
    with pytest.raises(P.APIError) as e:
        parse_completion({"prompt": "hi", "model": long_name})
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert f"the model '{long_name[:61]}...' does not exist" in e.value.message and len(e.value.message) < 200
    assert long_name not in asked
    with pytest.raises(P.APIError, match="did you mean 'tiny'"):
        parse_completion({"prompt": "hi", "model": "tinyy"})
    assert "tinyy" in asked


def test_valid_requests_become_items_with_the_fields_they_set():
    req = parse_chat({"model": "tiny", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "temperature": 0.5, "top_k": -1, "stop": "\n", "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}, "metadata": {"tier": "gold"}})
    assert req.fields == {"max_tokens": 7, "temperature": 0.5, "top_k": -1, "stop": ["\n"], "seed": 3}
    item = req.item("r1")
    assert item["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \nthere"}]
    assert item["metadata"] == {"tier": "gold"} and item["model"] == "tiny" and item["id"] == "r1"
    assert req.stream and req.include_usage and req.pin is None
    comp = parse_completion({"prompt": [[5, 6, 7]], "model": "gen"})
    assert comp.item("r2")["prompt_token_ids"] == [5, 6, 7]
    assert comp.fields == {} and comp.model == "gen" and comp.pin == "gen"   # names a generate stage


# ---------------------------------------------------------------- a live server

TINY = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{ max_queue = {max_queue} }}
    stage batch   : dynamic_batch {{ max_batch_size = {max_batch_size}  timeout = {timeout}ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 16 }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


class LiveServer:
    """An `agp serve` app on 127.0.0.1:<free port>, in a uvicorn thread of this process."""

    def __init__(self, model_path, *, max_batch_size=8, max_queue=1024, batch_timeout_s=0.02, text=None,
                 header_timeout=None, overrides=None, max_unread_tokens=None, stages=("gen",), **config_kw):
        import tempfile

        from pipeline_dsl.serve.server import header_timeout_protocol

        self.dir = tempfile.mkdtemp()
        path = Path(self.dir) / "tiny.agp"
        path.write_text(text or TINY.format(model=model_path, max_queue=max_queue, max_batch_size=max_batch_size,
                                            timeout=batch_timeout_s * 1000))
        self.runtime = build_runtime(path, overrides={"threads": 1, **(overrides or {})})
        self.engine = self.runtime.segments[0].engine
        self.metrics = ServerMetrics()
        self.apipe = AsyncPipeline(self.runtime, metrics=self.metrics, max_unread_tokens=max_unread_tokens)
        self.app = create_app(self.apipe,
                              ServeConfig(model_names=SERVED, max_model_len=self.engine.max_model_len,
                                          stages=tuple((g, Path(str(model_path)).name) for g in stages),
                                          **config_kw),
                              self.metrics)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        extra = {"http": header_timeout_protocol(header_timeout)} if header_timeout else {}
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on", **extra))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        # the server speaks plain HTTP: its clients load no CA certificates (verify=False), which
        # took a tenth of a second of CPU a client, two a server, and this builds a hundred servers
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                    timeout=60, http_client=openai.DefaultHttpxClient(verify=False))
        # one HTTP client for the helpers below, which poll: a new one a call (httpx.get) loads
        # the CA certificates again, tens of milliseconds each. A connection a request, as
        # httpx.get's: none is left open between calls for a test counting connections to see
        self.http = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0), verify=False)

    def stats(self) -> dict:
        """The engine's counters, and the pipeline's requests in flight."""
        st = self.http.get(self.url + "/stats").json()
        return {**st["engines"]["gen"], "in_flight": st["requests"]["in_flight"], "stages": st["stages"]}

    def stats_when(self, ok, timeout: float = 60.0) -> dict:
        """The stats once `ok(stats)` holds (an AssertionError with the last stats after `timeout`)."""
        deadline = time.monotonic() + timeout
        while not ok(st := self.stats()):
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        return st

    def metric(self, name: str, labels: str = "", default: float | None = None, page: str | None = None) -> float:
        """The value of sample `name` whose labels include `labels` ('{status="429"}'); `default`
        where there is no such sample yet (else an AssertionError). From `page`, a /metrics page
        already read, where given (a test reading many samples of one moment), else a fresh one."""
        from prometheus_client.parser import text_string_to_metric_families

        want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        text = self.http.get(self.url + "/metrics").text if page is None else page
        # only the sample lines of `name` are parsed (the whole page, hundreds of histogram
        # buckets, took a fifth of a second a call): the same samples, found the same way
        mine = "\n".join(line for line in text.splitlines() if re.match(re.escape(name) + r"[{ ]", line))
        for family in text_string_to_metric_families(mine + "\n"):
            for sample in family.samples:
                if sample.name == name and want.items() <= sample.labels.items():
                    return sample.value
        if default is not None:
            return default
        raise AssertionError(f"{name}{labels} not in /metrics")

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)     # its pipeline file: not left in the temporary folder


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


def direct(engine_path, **inputs) -> str:
    """The same request run on a bare engine: what the server must answer."""
    e = Engine(EngineConfig(model=str(engine_path), dtype="fp32", kv_budget_bytes=1 << 20,
                            block_size=8, batch_timeout_s=0.0))
    e.add_request("x", params=inputs.pop("params"), **inputs)
    text = None
    while e.has_unfinished():
        for out in e.step():
            text = out.text if out.finished else text
    return text


def test_completion_with_the_openai_client_matches_the_engine(server, tiny_gguf):
    r = server.client.completions.create(model="tiny", prompt="hello world", max_tokens=12,
                                         extra_body={"ignore_eos": True})
    expected = direct(tiny_gguf, prompt="hello world", params=SamplingParams(max_tokens=12, ignore_eos=True))
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_integer_fields_written_as_whole_floats_are_those_integers(server):
    """A client whose JSON encoder writes every number as a double (R's jsonlite, Lua) sends
    "max_tokens": 3.0; it is 3, as vLLM takes it: an answer of 3 tokens a choice, n = 2.0 choices,
    logprobs = 1.0 alternatives, the same text as the integers ask for, and a Responses answer that
    repeats max_output_tokens as 3. 3.5 is a 400 naming the field."""
    def post(path: str, text: str) -> httpx.Response:
        return server.http.post(server.url + path, content=text.encode(), headers={"content-type": "application/json"},
                                timeout=60)

    body = '"model": "tiny", "prompt": "hello world", "ignore_eos": true, "temperature": 0.8'
    floats = post("/v1/completions", "{" + body + ', "max_tokens": 3.0, "n": 2.0, "logprobs": 1.0, "seed": 7.0}')
    ints = post("/v1/completions", "{" + body + ', "max_tokens": 3, "n": 2, "logprobs": 1, "seed": 7}')
    assert floats.status_code == ints.status_code == 200, floats.text
    got = floats.json()
    assert len(got["choices"]) == 2 and got["usage"]["completion_tokens"] == 6
    for choice in got["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 3 and choice["finish_reason"] == "length"
        assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in ints.json()["choices"]]
    answer = post("/v1/responses", '{"model": "tiny", "input": "hi", "max_output_tokens": 3.0}')
    assert answer.status_code == 200, answer.text
    assert '"max_output_tokens":3,' in answer.text.replace(" ", "") and answer.json()["usage"]["output_tokens"] <= 3
    half = post("/v1/completions", "{" + body + ', "max_tokens": 3.5}')
    assert half.status_code == 400 and half.json()["error"]["param"] == "max_tokens"
    assert half.json()["error"]["message"] == "'max_tokens' must be an integer from 1 to 1048576, not 3.5"


def test_chat_stream_concatenates_to_the_non_streaming_answer(server):
    msgs = [{"role": "user", "content": "the cat and the world"}]
    whole = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10)
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")  # OpenAI's
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0   # same prompt again: prefix hit


def test_chat_with_n_answers_exactly_n_choices_streamed_and_not(server):
    msgs = [{"role": "user", "content": "count the choices"}]
    for n in (2, 3):
        whole = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=n,
                                                      temperature=1.0, seed=7)
        assert sorted(c.index for c in whole.choices) == list(range(n))
        assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in whole.choices)
        chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=n,
                                                            temperature=1.0, seed=7, stream=True))
        finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        assert sorted(finished) == list(range(n))                    # one finishing chunk per choice
        assert {c.choices[0].index for c in chunks if c.choices} == set(range(n))
        texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(n)}
        assert texts == {c.index: c.message.content for c in whole.choices}   # the same seeds, the same answers


def test_a_model_is_looked_up_by_its_id_and_an_unknown_one_is_404(server):
    """GET /v1/models/{id} (vLLM's): a served name or a generate stage answers its entry, anything
    else a 404 model_not_found, as a request whose `model` names nothing."""
    r = server.http.get(server.url + "/v1/models/tiny-model", timeout=30)
    assert r.status_code == 200 and (r.json()["id"], r.json()["object"]) == ("tiny-model", "model")
    stage = server.http.get(server.url + "/v1/models/gen", timeout=30).json()
    assert (stage["id"], stage["parent"]) == ("gen", "tiny")
    r = server.http.get(server.url + "/v1/models/nope", timeout=30)
    assert r.status_code == 404, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("model_not_found", "model")
    listed = [m["id"] for m in server.http.get(server.url + "/v1/models", timeout=30).json()["data"]]
    assert r.json()["error"]["message"] == f"the model 'nope' does not exist; the pipeline answers to {', '.join(listed)}"
    close = server.http.get(server.url + "/v1/models/tiny-modle", timeout=30).json()["error"]["message"]
    assert close == "the model 'tiny-modle' does not exist; did you mean 'tiny-model'?", close


def test_a_request_naming_a_generate_stage_is_answered_by_that_stage(tmp_path, tiny_gguf):
    """docs/openai.md, `model`: a generate stage's name sends the request the way that leads there,
    whatever the conditions before it would choose (here the first way, to short_gen, which the
    served name takes); the answer names the stage. Completions and chat, streamed and not."""
    from flowkit import chain, write

    body = ("stage request : requests {}\nstage route : route {}\n"
            "stage short_gen : generate { max_new_tokens = 3 }\nstage long_gen : generate { max_new_tokens = 5 }\n"
            "stage out : respond {}\nrequest -> route\n"
            "route -> batch_s otherwise\nroute -> batch_l when prompt_tokens > 1000\n"
            + chain("short_gen", "batch_s", "enc_s", "kv_s") + chain("long_gen", "batch_l", "enc_l", "kv_l")
            + "short_gen -> out\nlong_gen -> out\n")
    s = LiveServer(tiny_gguf, text=write(tmp_path, tiny_gguf, body).read_text(), stages=("short_gen", "long_gen"))
    try:
        def answered(model, kind, stream):
            kw = dict(model=model, stream=stream, extra_body={"ignore_eos": True},
                      **({"stream_options": {"include_usage": True}} if stream else {}))
            out = (s.client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
                   if kind == "chat" else s.client.completions.create(prompt="hi", **kw))
            chunks = list(out) if stream else [out]
            return {c.model for c in chunks}, chunks[-1].usage.completion_tokens

        for kind in ("completion", "chat"):
            for stream in (False, True):
                assert answered("tiny", kind, stream) == ({"tiny"}, 3)
                assert answered("long_gen", kind, stream) == ({"long_gen"}, 5)
                assert answered("short_gen", kind, stream) == ({"short_gen"}, 3)
    finally:
        s.close()


def test_every_model_entry_is_vllms_model_card(server, tiny_gguf):
    """vLLM's card: root (the model that answers), parent (a generate stage's served name; null for
    a served name, as vLLM's base model), max_model_len and one permission object."""
    entries = server.http.get(server.url + "/v1/models", timeout=30).json()["data"]
    model = Path(str(tiny_gguf)).name
    assert [(e["id"], e["root"], e["parent"]) for e in entries] == [("tiny", model, None), ("tiny-model", model, None),
                                                                    ("gen", model, "tiny")]
    for e in entries + [server.http.get(server.url + "/v1/models/gen", timeout=30).json()]:
        assert e["max_model_len"] == server.engine.max_model_len and e["owned_by"] == "agp"
        [permission] = e["permission"]
        assert permission["object"] == "model_permission" and permission["id"].startswith("modelperm-")
        assert (permission["allow_sampling"], permission["allow_logprobs"], permission["organization"]) == \
            (True, True, "*")


def _echoed_choices(url: str, body: dict) -> tuple[dict, dict]:
    """({index: text} of the answer, {index: text} its stream assembles) of a completions request;
    each streamed choice finishes once."""
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    streamed: dict = {}
    finished: list = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[len("data: "):])["choices"]:
                    streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
                    finished += [c["index"]] if c["finish_reason"] else []
    assert sorted(finished) == sorted(streamed), finished
    return {c["index"]: c["text"] for c in whole["choices"]}, streamed


@pytest.mark.parametrize("stage_n", [None, 2])
def test_a_batch_of_prompts_numbers_its_choices_prompt_times_n_streamed_and_not(server, tiny_gguf, stage_n):
    """docs/openai.md, `prompt`: a batch's answers are numbered prompt × n + choice, n the
    request's or, when it gives none, the generate stage's; each choice echoes its own prompt and
    its stream assembles to the same answer (greedy: n answers of a prompt are alike)."""
    prompts = ["once upon", "the end", "hello"]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 3, "echo": True, "temperature": 0}
    s = server
    if stage_n is None:
        body["n"] = 2
    else:
        s = LiveServer(tiny_gguf, max_stage_n=stage_n, text=TINY.format(
            model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace(
            "generate      { max_new_tokens = 16 }", f"generate {{ max_new_tokens = 4  n = {stage_n} }}"))
    try:
        whole, streamed = _echoed_choices(s.url, body)
        assert sorted(whole) == list(range(6)), whole
        assert all(text.startswith(prompts[i // 2]) for i, text in whole.items()), whole
        assert streamed == whole
    finally:
        if s is not server:
            s.close()


SHOW_ID = """
def show_id(item):
    item["text"] = item["request"]["id"]
    return item
"""


def test_each_prompt_of_a_batch_is_its_own_pipeline_request(tmp_path, tiny_gguf, monkeypatch):
    """A completions batch of prompts is one pipeline request per prompt: the first has the
    answer's id, the k-th that id and `-k` (what a python stage sees), never one id for all."""
    (tmp_path / "id_hooks.py").write_text(SHOW_ID)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = LiveServer(tiny_gguf, text=TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace(
        "encode -> kv -> gen -> out", 'stage show : python { fn = "id_hooks:show_id" }\n    encode -> kv -> gen -> show -> out'))
    try:
        r = s.http.post(s.url + "/v1/completions", timeout=60, headers={"x-request-id": "batch7"},
                        json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [r.json()["id"], r.json()["id"] + "-1", r.json()["id"] + "-2"], texts
    finally:
        s.close()


def test_total_tokens_is_prompt_plus_completion_also_when_the_prompt_was_cached(server):
    body = dict(model="tiny", messages=[{"role": "user", "content": "the same prompt twice " * 4}], max_tokens=6)
    first = server.client.chat.completions.create(**body).usage
    second = server.client.chat.completions.create(**body).usage
    assert second.prompt_tokens_details.cached_tokens > 0                 # the second found it cached
    assert second.prompt_tokens == first.prompt_tokens                    # cached tokens are prompt tokens
    for use in (first, second):
        assert use.total_tokens == use.prompt_tokens + use.completion_tokens
    for _ in range(2):                                                    # streamed: the usage chunk
        chunks = list(server.client.completions.create(model="tiny", prompt="the same prompt twice " * 4,
                                                       max_tokens=6, stream=True,
                                                       stream_options={"include_usage": True}))
    use = chunks[-1].usage
    assert use.prompt_tokens_details.cached_tokens > 0 and use.total_tokens == use.prompt_tokens + use.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_the_usage_of_a_batch_of_prompts_sums_its_prompts(server, stream):
    """A completions request with several prompts answers one usage: every prompt's tokens and
    every choice's, whole or on the stream's usage chunk."""
    prompts = ["the cat sat", "on a mat today", "hi"]
    sizes = [server.http.post(server.url + "/tokenize", json={"prompt": p}, timeout=30).json()["count"] for p in prompts]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 3, "ignore_eos": True, "n": 2, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    if stream:
        with server.http.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        usage = chunks[-1]["usage"]
    else:
        usage = server.http.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] == sum(sizes) and usage["completion_tokens"] == 3 * 3 * 2
    assert usage["total_tokens"] == sum(sizes) + 18


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_with_a_prompt_over_the_context_is_a_400_streamed_or_not(server, stream):
    """A completions batch one of whose prompts does not fit the context is refused whole, as that
    prompt alone is: a 400 naming it, streamed too (not a 200 stream of the other prompts' tokens
    that ends in an error event), counted as a 400, nothing left running."""
    body = {"model": "tiny", "prompt": ["hi", "the cat " * 300], "max_tokens": 4, "stream": stream}
    before = server.metric("agp_requests_total", '{status="400"}', default=0)
    r = server.http.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert server.metric("agp_requests_total", '{status="400"}') == before + 1
    server.stats_when(lambda s: s["in_flight"] == 0 and s["running"] == 0 and s["kv_blocks_used"] == 0)


def test_raw_sse_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
    with server.http.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        # nor a cache nor a buffering proxy (nginx reads X-Accel-Buffering) holds the chunks back
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(p["object"] == "text_completion" for p in payloads)


def test_an_answer_not_streamed_has_its_result_as_only_event_and_its_ttft_still_taken(tiny_gguf, tmp_path):
    """A request added with stream=False is waited on for its result: none of its tokens is
    queued for a consumer that would pass it over (a copy of each and a wake-up of the event
    loop); a stream's consumer has every one. Both take their first token's time (TTFT)."""
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=1))
    apipe = AsyncPipeline(build_runtime(path, overrides={"threads": 1}))
    apipe.start()

    async def answer(rid: str, stream: bool):
        rs = await apipe.add({"id": rid, "prompt": "hello there", "max_tokens": 6, "ignore_eos": True},
                             stream=stream)
        return rs, [event async for event in rs]

    async def both():
        return await asyncio.gather(answer("whole", False), answer("streamed", True))

    try:
        (whole, whole_events), (streamed, streamed_events) = asyncio.run(both())
    finally:
        apipe.stop()
    assert [e[0] for e in whole_events] == ["done"] and whole_events[0][1].ok
    assert whole_events[0][1].usage["completion_tokens"] == 6
    deltas = [e for e in streamed_events if e[0] == "delta"]
    assert sum(len(e[2].new_token_ids) for e in deltas) == 6 and streamed_events[-1][0] == "done"
    assert whole.first_token_at is not None and streamed.first_token_at is not None


def test_a_paused_stream_is_not_cut_for_the_tokens_that_came_while_the_loop_was_busy(tiny_gguf, tmp_path):
    """Pausing on (past 4 unread tokens) and a cut past 16: the event loop held busy while
    the engine generates, the tokens it made meanwhile reach the stream together, past both bounds.
    The stream pauses at the first of them and is not cut for the rest (they were on their way
    before the pause could take hold; on a loaded machine a stalled reader's stream was cut this
    way, its client told it left 256 tokens unread), nor once its answer is whole (a fast engine
    may finish meanwhile); read at last, it gives every token. The loop stays busy until the
    engine's counters say it generated past the cut's bound (however slow the machine), not for a
    fixed time (on a loaded machine a second gave 7 tokens), and from the request's start: a loop let
    run until its first token may take the first few before they pass the cut's bound, and pause it."""
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=1))
    runtime = build_runtime(path, overrides={"threads": 1})
    apipe = AsyncPipeline(runtime, max_unread_tokens=16, pause_unread_tokens=4)
    apipe.start()

    def generated() -> int:
        return sum(e["generated_tokens"] for e in runtime.stats()["engines"].values())

    async def late_reader():
        rs = await apipe.add({"id": "late", "prompt": "hello there", "max_tokens": 120, "ignore_eos": True},
                             stream=True)
        busy_until = time.monotonic() + 60   # the loop busy from the start: what the engine makes waits
        while generated() <= 24 and time.monotonic() < busy_until:
            time.sleep(0.02)
        await asyncio.sleep(0.1)
        unread = rs.unread
        return unread, [event async for event in rs]

    try:
        unread, events = asyncio.run(late_reader())
    finally:
        apipe.stop()
    assert unread > 16                   # past the cut's bound: paused, or its answer whole meanwhile
    assert events[-1][0] == "done" and events[-1][1].ok, events[-1]
    deltas = [e for e in events if e[0] == "delta"]
    assert sum(len(e[2].new_token_ids) for e in deltas) == 120


@pytest.mark.parametrize("route, body, status, fragment", [
    ("/v1/completions", b'{"prompt": ', 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "8"}', 400, "'max_tokens' must be an integer"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "'messages' is empty"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
     400, "beyond the context of"),
    ("/v1/completions", json.dumps({"prompt": "the cat " * 300, "max_tokens": 8}).encode(), 400,
     "exceeds the model's context"),
    ("/v1/completions", json.dumps({"prompt": "the cat " * 50, "max_tokens": 450}).encode(), 400,
     "exceeds the model's context"),
    ("/v1/completions", json.dumps({"prompt": [5] * 512}).encode(), 400,    # the whole context, no max_tokens
     "prompt of 512 tokens fills the model's context of 512 tokens and leaves no room to generate"),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-4"}', 404, "does not exist"),
])
def test_bad_requests_get_openai_style_errors(server, route, body, status, fragment):
    r = server.http.post(server.url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    if "context" in fragment:                        # one code whichever side overflows the context
        assert err["code"] == "context_length_exceeded"


def test_a_body_that_starts_with_a_utf8_byte_order_mark_is_served_as_without_it(server):
    """A JSON file saved by a Windows editor starts with a BOM, and `curl -d @file.json` sends it:
    it was a 400 ("Unexpected UTF-8 BOM"), where vLLM's server reads the body past it."""
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    answers = []
    for raw in (json.dumps(body).encode(), b"\xef\xbb\xbf" + json.dumps(body).encode()):
        r = server.http.post(server.url + "/v1/completions", content=raw,
                             headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["text"])
    assert answers[0] == answers[1]
    chat = b"\xef\xbb\xbf" + json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    r = server.http.post(server.url + "/v1/chat/completions", content=chat,
                         headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    r = server.http.post(server.url + "/v1/completions", content=b"\xef\xbb\xbf{", timeout=30,
                         headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_the_openai_client_raises_bad_request_for_invalid_input(server):
    with pytest.raises(openai.BadRequestError, match="'messages' is empty"):
        server.client.chat.completions.create(model="tiny", messages=[])


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list()] == list(SERVED) + ["gen"]
    assert server.http.get(server.url + "/health").json() == {"status": "ok"}
    server.client.completions.create(model=SERVED[0], prompt="hello", max_tokens=2)   # by status: after one
    text = server.http.get(server.url + "/metrics").text
    for name in ("agp_requests_total", "agp_queue_length", "agp_running_sequences", "agp_batch_size",
                 "agp_prompt_tokens_total", "agp_generation_tokens_total",
                 "agp_time_to_first_token_seconds", "agp_inter_token_latency_seconds",
                 "agp_kv_blocks_used", "agp_kv_blocks_cached", "agp_prefix_cache_hit_rate",
                 "agp_stage_items_in_total", "agp_stage_queue_depth", "agp_stage_busy_seconds_total",
                 "agp_stage_stuck_calls"):
        assert f"\n{name}" in text, name
    assert server.http.get(server.url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_every_agp_series_follows_prometheus_naming(server):
    """promtool's rules: only a counter's name ends in _total; a unit is a base unit (seconds,
    bytes). The text parses as Prometheus' own parser reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    server.client.completions.create(model=SERVED[0], prompt="hello", max_tokens=2)
    families = list(text_string_to_metric_families(server.http.get(server.url + "/metrics").text))
    ours = [f for f in families if f.name.startswith("agp_")]
    assert ours and any(f.type == "counter" for f in ours) and any(f.type == "gauge" for f in ours)
    for f in ours:
        if f.type != "counter":
            assert not f.name.endswith("_total"), f"{f.name} is a {f.type}: _total is a counter's suffix"
        assert not re.search(r"_(milliseconds|ms|minutes|kilobytes|megabytes|mib)(_|$)", f.name), f.name
    gauges = {f.name: f for f in ours if f.type == "gauge"}
    assert gauges["agp_kv_pool_blocks"].samples[0].value == server.engine.stats()["kv_blocks_total"] > 0


@pytest.mark.usefixtures("fresh_flowkit")
def test_full_queue_is_429_with_retry_after(tiny_gguf):
    # one request waits in the engine's batch window (a minute long, full at two) and one in a
    # python stage before it (flowkit.hold): together they fill max_queue = 2, however long the
    # test takes. Let go, the held one fills the window and both are served
    text = (TINY.format(model=tiny_gguf, max_queue=2, max_batch_size=2, timeout=60_000)
            .replace("request -> batch", 'request -> pick\n    pick -> hold when metadata.held == "yes"\n'
                                         "    pick -> batch otherwise\n    hold -> batch")
            .replace("stage out", "stage pick    : route         {}\n"
                                  '    stage hold    : python        { fn = "flowkit:hold" }\n    stage out'))
    s = LiveServer(tiny_gguf, text=text)
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True}
        codes = []

        def send(**more):
            with httpx.stream("POST", s.url + "/v1/completions", json={**body, **more}, timeout=30) as r:
                codes.append(r.status_code)
                r.read()

        waiting = [threading.Thread(target=send, kwargs={"metadata": {"held": "yes"}}), threading.Thread(target=send)]
        waiting[0].start()
        s.stats_when(lambda st: st["in_flight"] == 1 and st["stages"]["hold"]["items_in"] == 1)
        waiting[1].start()
        s.stats_when(lambda st: st["in_flight"] == 2 and st["waiting"] == 1)     # in the engine's window
        r = s.http.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        assert r.json()["error"]["type"] == "rate_limit_error"
        flowkit.gate("hold").set()
        for t in waiting:
            t.join(30)
        assert codes == [200, 200]                         # the waiting ones are served
        assert s.metric("agp_requests_total", '{status="429"}') == 1
    finally:
        flowkit.gate("hold").set()
        s.close()


def test_a_request_of_more_inputs_than_the_queue_holds_is_400_not_a_429_forever(tiny_gguf):
    """An embeddings request's inputs and a completions batch's prompts are each a request in the
    queue: more of them than requests.max_queue could never be admitted, even on an idle server,
    so the answer is a 400 naming the limit (a 429 would send a client's retries round forever).
    n answers of one prompt are one request in the queue, admitted as any other."""
    s = LiveServer(tiny_gguf, max_queue=2)
    try:
        for path, body, param in [("/v1/embeddings", {"model": "tiny", "input": ["a", "b", "c"]}, "input"),
                                  ("/v1/completions", {"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2},
                                   "prompt"),
                                  ("/v1/completions", {"model": "tiny", "prompt": [[5, 6], [7], [8], [9]],
                                                       "max_tokens": 2}, "prompt")]:
            r = s.http.post(s.url + path, json=body, timeout=60)
            assert r.status_code == 400, (path, r.text)
            assert "retry-after" not in r.headers
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error"
            assert "max_queue" in err["message"] and "at most 2" in err["message"], err
        r = s.http.post(s.url + "/v1/embeddings", json={"model": "tiny", "input": ["a", "b"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        r = s.http.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        for path, body in [("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "n": 5}),
                           ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "n": 5,
                                                     "messages": [{"role": "user", "content": "hi"}]})]:
            r = s.http.post(s.url + path, json=body, timeout=60)
            assert r.status_code == 200 and len(r.json()["choices"]) == 5, r.text
        assert s.metric("agp_requests_total", '{status="400"}') == 3
    finally:
        s.close()


def _full_queue(tiny_gguf, check, **server):
    """A server whose queue (max_queue = 2) is full: a python stage before the engine holds two
    completions (flowkit.hold) until `check(server)` has run, however long it takes; then the
    held ones are let go and must be served."""
    text = (TINY.format(model=tiny_gguf, max_queue=2, max_batch_size=8, timeout=20)
            .replace("request -> batch", "request -> hold -> batch")
            .replace("stage out", 'stage hold    : python        { fn = "flowkit:hold" }\n    stage out'))
    s = LiveServer(tiny_gguf, text=text, **server)
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(httpx.post(s.url + "/v1/completions", json=body,
                                                                             timeout=30)))
                   for _ in range(2)]
        for t in waiting:
            t.start()
        s.stats_when(lambda st: st["in_flight"] == 2)
        check(s)
        flowkit.gate("hold").set()
        for t in waiting:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200]          # the held ones are served
    finally:
        flowkit.gate("hold").set()
        s.close()


@pytest.mark.usefixtures("fresh_flowkit")
def test_inputs_the_queue_could_hold_later_are_429_while_it_is_full(tiny_gguf):
    def check(s):
        for path, more in [("/v1/embeddings", {"input": ["a", "b"]}),
                           ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})]:
            r = s.http.post(s.url + path, json={"model": "tiny", **more}, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "queue_full"
    _full_queue(tiny_gguf, check)


@pytest.mark.usefixtures("fresh_flowkit")
def test_the_retry_after_of_a_full_queue_is_the_servers_on_every_generation_route(tiny_gguf):
    """The server's retry_after_s is the Retry-After of each generation route's 429 (chat,
    completions, embeddings, Responses; a stream refused before its first event is an HTTP 429
    too), whatever api_error or a parser wrote first."""
    def check(s):
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, more in [("/v1/completions", {"prompt": "a", "max_tokens": 2}),
                           ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True}),
                           ("/v1/embeddings", {"input": ["a", "b"]}),
                           ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                           ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "stream": True})]:
            r = s.http.post(s.url + path, json={"model": "tiny", **more}, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "4", (path, more, r.text)
            assert r.json()["error"]["code"] == "queue_full"
    _full_queue(tiny_gguf, check, retry_after_s=4)


def test_hundred_clients_disconnecting_mid_stream_leak_no_kv_blocks(tiny_gguf):
    s = LiveServer(tiny_gguf, max_batch_size=32)
    try:
        async def client(i, http):
            body = {"model": "tiny", "prompt": f"hello world {i}", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text":""' not in line:
                        return True                            # one token seen: hang up
            return False

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60,
                                         limits=httpx.Limits(max_connections=200)) as http:
                return await asyncio.wait_for(
                    asyncio.gather(*(client(i, http) for i in range(100))), 120)

        assert all(asyncio.run(main()))
        deadline = time.monotonic() + 30
        while True:
            st = s.stats()
            if st["requests_aborted"] == 100 and st["kv_blocks_used"] == 0 and st["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["requests_done"] == 0 and st["running"] == 0 and st["waiting"] == 0
        assert s.metric("agp_kv_blocks_used") == 0
        assert s.metric("agp_requests_total", '{status="499"}') == 100
        s.engine.blocks.check_invariants()
    finally:
        s.close()


# ---------------------------------------------------------------- the command

def _pipeline_file(tmp_path, model_path) -> Path:
    text = (ROOT / "examples" / "chat.agp").read_text()
    text = re.sub(r'model\s*=\s*"[^"]*"', f'model = "{model_path}"', text, count=1)
    path = tmp_path / "tiny.agp"
    path.write_text(text)
    return path


def _free_port() -> int:
    """A port free now for a server that binds it later. Not one the kernel hands out itself: a port
    from bind(0) lies in the ephemeral range, where any outgoing connection (Ray's own among them) may
    take it before the server binds it (CI: Ray Serve's proxy 'Failed to bind to address'). Below
    that range only an explicit bind takes a port; each xdist worker draws from its own slice."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
    slices = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    start = 10000
    width = max(1, (low - start) // slices)
    rng = random.Random()
    for _ in range(200):
        port = start + (worker % slices) * width + rng.randrange(width)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:                      # every draw taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    """Poll GET /health of an `agp serve` child until it answers 200 (fails if the child exits).
    One client for the polls (a new one loads the CA certificates again, CPU the starting child
    needs), every 50 ms (a refused connection costs next to nothing)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1, verify=False) as http:     # plain HTTP: no CA certificates to load
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if http.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "agp serve did not come up"
            time.sleep(0.05)


def start_agp_serve(*args: str, env: dict | None = None, tries: int = 5, **popen) -> tuple[subprocess.Popen, str]:
    """`agp serve ARGS --port P` as a child on a free port P, once GET /health answers: (process, url);
    `popen` goes to subprocess.Popen.
    Another process may take P between our choosing it and the child binding it; the child then
    exits 2 ("cannot listen on"), and a fresh port is tried."""
    for attempt in range(tries):
        port = _free_port()
        proc = agp_child("serve", *args, "--port", port, env=env, **popen)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(proc, url)
            return proc, url
        except AssertionError as e:
            reap(proc)
            if proc.returncode != 2 or "cannot listen on" not in str(e) or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_finishes_in_flight_streams_and_exits_zero(tmp_path, tiny_gguf, sig):
    """SIGHUP too (uvicorn leaves it to its default action: the server died with 6 streams in flight)."""
    proc, url = start_agp_serve(str(_pipeline_file(tmp_path, tiny_gguf)))
    with reaped(proc):
        body = {"prompt": "hello", "max_tokens": 300, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(sig)                            # mid-stream
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 300 and first
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0 and f"draining ({signal.Signals(sig).name})" in err, err
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)


def test_serve_command_reports_bad_input_without_traceback(tmp_path):
    # in this process (what it writes and its exit status are the point, not the process)
    missing = agp_in("serve", tmp_path / "nope.agp", "--port", "0")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "nope.agp" in missing.stderr
    bad_port = agp_in("serve", "examples/chat.agp", "--port", "70000")
    assert bad_port.returncode == 2 and "--port must be between 0 and 65535" in bad_port.stderr


def test_the_model_ids_name_a_model_file_never_its_path():
    # docs/serve.md: no answer shows a path of the server's files (/v1/models gives file names)
    from types import SimpleNamespace

    from pipeline_dsl.serve.build import model_names

    def runtime(model):
        return SimpleNamespace(name="chat", segments=[SimpleNamespace(config=SimpleNamespace(model=model))])

    assert model_names(runtime("/srv/models/tiny.gguf"), None) == ("chat", "tiny.gguf", "tiny")
    assert model_names(runtime("/srv/models/SmolLM2"), ["a"]) == ("a", "chat", "SmolLM2")
    assert model_names(runtime("smollm2-135m-instruct"), None) == ("chat", "smollm2-135m-instruct")


ROUTED = """pipeline routed {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{}}
    stage pick    : route         {{}}
    stage bg      : dynamic_batch {{}}
    stage eg      : encode        {{}}
    stage kg      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gold    : generate      {{ max_new_tokens = 2 }}
    stage bf      : dynamic_batch {{}}
    stage ef      : encode        {{}}
    stage kf      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage free    : generate      {{ max_new_tokens = 2 }}
    stage out     : respond       {{}}
    request -> pick
    pick -> bg when metadata.tier == "gold"
    pick -> bf otherwise
    bg -> eg -> kg -> gold -> out
    bf -> ef -> kf -> free -> out
}}
"""


def test_metrics_count_items_per_edge_and_every_stage_counter_stats_has(tiny_gguf):
    """/metrics counts what /stats counts: the items sent along each edge (how a router split its
    requests) and each stage's dropped items, timeouts, retries, cache hits and stalls."""
    s = LiveServer(tiny_gguf, text=ROUTED.format(model=tiny_gguf))
    try:
        for tier in ("gold", "gold", "free"):
            s.client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                     extra_body={"metadata": {"tier": tier}})
        stats = s.http.get(s.url + "/stats", timeout=10).json()
        page = s.http.get(s.url + "/metrics", timeout=10).text     # the requests are done: nothing moves now
        sent = {(e["from"], e["to"]): e["items"] for e in stats["edges"]}
        assert sent[("pick", "bg")] == 2 and sent[("pick", "bf")] == 1
        for (src, dst), items in sent.items():
            assert s.metric("agp_edge_items_total", f'{{from="{src}",to="{dst}"}}', page=page) == items, (src, dst)
        for key in ("dropped", "timeouts", "retries", "cache_hits", "stalls"):
            for stage, row in stats["stages"].items():
                assert s.metric(f"agp_stage_{key}_total", f'{{stage="{stage}"}}', page=page) == row[key], (key, stage)
    finally:
        s.close()


# ---------------------------------------------------------------- servers a few tests share
# Last in the module: a module's servers stay up until its end, and an idle engine still wakes
# every few milliseconds (CPU the tests after them would share).

@pytest.fixture(scope="module")
def windowed(tiny_gguf):
    """A server whose batch window is longer than any test (a minute): a batch leaves when its
    eight have come, and a lone request waits in the window."""
    s = LiveServer(tiny_gguf, max_batch_size=8, batch_timeout_s=60.0)
    yield s
    s.close()


def test_concurrent_http_requests_are_batched_together(windowed):
    # a batch window longer than the test: the batch leaves when its eight have come, however
    # the client threads are scheduled (with a 20 ms window a fast engine could answer each
    # request before the next thread sent its own)
    server = windowed

    def one(i):
        return server.client.completions.create(model="tiny", prompt=f"hello {i}", max_tokens=8,
                                                extra_body={"ignore_eos": True})

    threads, results = [], {}
    for i in range(8):
        t = threading.Thread(target=lambda i=i: results.__setitem__(i, one(i)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(60)
    assert all(results[i].usage.completion_tokens == 8 for i in range(8))
    grown = {int(k): v for k, v in server.stats()["batch_size_hist"].items() if v > 0}
    assert max(grown) >= 4, grown        # several requests shared one step


def test_a_non_streaming_client_that_hangs_up_aborts_its_request(windowed):
    s = windowed                                                         # it waits in the window
    aborted, gone = s.stats()["requests_aborted"], s.metric("agp_requests_total", '{status="499"}', default=0)
    with pytest.raises(httpx.ReadTimeout):
        s.http.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=0.5)
    st = s.stats_when(lambda st: st["requests_aborted"] == aborted + 1)
    assert st["waiting"] == 0 and st["in_flight"] == 0 and st["kv_blocks_used"] == 0
    assert s.metric("agp_requests_total", '{status="499"}') == gone + 1


@pytest.fixture(scope="module")
def long_server(long_gguf):
    """A server of the 4096-token model: room for answers far longer than a test. Each test on it
    reads the counters it checks as they move during it, and leaves nothing in flight."""
    s = LiveServer(long_gguf, max_batch_size=8)
    yield s
    s.close()


def test_a_stream_whose_client_is_gone_before_the_first_byte_is_aborted(long_server):
    # an answer far longer than the test: however late the failed write is noticed (a busy
    # machine), the request is still generating then, so it can only end aborted
    s = long_server
    aborted = s.stats()["requests_aborted"]
    body = json.dumps({"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 9), "server": ("127.0.0.1", s.port)}

    async def call_app():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(60)

        async def send(message):
            raise OSError("connection reset by peer")          # gone before the headers

        with pytest.raises(Exception):
            await s.app(scope, receive, send)

    asyncio.run(call_app())
    st = s.stats_when(lambda st: st["requests_aborted"] == aborted + 1)
    assert st["waiting"] == 0 and st["in_flight"] == 0
    assert s.metric("agp_requests_in_flight") == 0


@pytest.mark.parametrize("path, fields", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000}),
    ("/v1/responses", {"input": "hello", "max_output_tokens": 2000}),
])
def test_a_stream_notices_its_client_going_while_it_has_nothing_to_write(long_server, path, fields):
    """The server hears the client go (http.disconnect) while its writes still succeed, as when
    a stream holds back text (a tool call until it parses): the request stops, not at its end."""
    s = long_server
    st = s.stats()
    aborted, done = st["requests_aborted"], st["requests_done"]
    gone = s.metric("agp_requests_total", '{status="499"}', default=0)
    body = json.dumps({"model": "tiny", **fields, "ignore_eos": True, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 9), "server": ("127.0.0.1", s.port)}

    async def call_app():
        chunks = []
        first = asyncio.Event()

        async def receive():
            if not chunks:
                chunks.append(b"")
                return {"type": "http.request", "body": body, "more_body": False}
            await first.wait()                                 # the answer began: now the client goes
            return {"type": "http.disconnect"}

        async def send(message):                               # writes never fail
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                first.set()

        await asyncio.wait_for(s.app(scope, receive, send), 60)
        return chunks

    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lines.append
    access = logging.getLogger("agp.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)            # setLevel: the loggers' cached isEnabledFor answers are dropped
    try:
        chunks = asyncio.run(call_app())
        assert len(chunks) > 1 and not chunks[1].startswith(b'{"error"')   # it was answering
        assert [r.status for r in lines if r.path == path] == [499]          # logged as the metrics count it
        st = s.stats_when(lambda st: st["requests_aborted"] == aborted + 1)
        assert st["requests_done"] == done and st["in_flight"] == 0 and st["running"] == 0
        assert s.metric("agp_requests_total", '{status="499"}') == gone + 1
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
