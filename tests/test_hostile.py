"""No request can hurt another: hostile bodies, huge prompts, hostile chat templates, long
stop strings, bad request lines, Ctrl-C in `agp run`, a drain that times out, half-sent
requests, foreign Host headers. Every probe gets a clear 4xx (or its own error record) and
nothing else notices."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import flowkit
import httpx
import pytest

from clikit import agp_child, agp_in, reap, reaped
from pipeline_dsl.engine.tokenizer import TEMPLATE_SECONDS
from pipeline_dsl.plan import ITEM_WORKERS
from test_serve import LiveServer, TINY, start_agp_serve
from tiny_model import CHAT_TEMPLATE, write_tiny_gguf


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf, max_batch_size=8, max_body_bytes=16 << 20, max_connections=64)
    yield s
    s.close()


def post(server, body: bytes | str, route="/v1/completions", ctype="application/json", **kw):
    data = body.encode() if isinstance(body, str) else body
    return server.http.post(server.url + route, content=data, headers={"content-type": ctype}, timeout=60, **kw)


def assert_openai_error(r, status: int, fragment: str):
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"], err


# ---------------------------------------------------------------- malformed bodies: 4xx, never 5xx

@pytest.mark.parametrize("body, fragment", [
    ('{"prompt": "hi \\ud800", "max_tokens": 1}', "lone UTF-16 surrogate"),
    ('{"prompt": "hi", "\\udfff": 1}', "lone UTF-16 surrogate"),
    ('{"prompt": "hi", "model": "\\ud800"}', "lone UTF-16 surrogate"),
    ('{"messages": [{"role": "user", "content": "a\\ud83d"}]}', "lone UTF-16 surrogate"),
    ("[" * 50000 + "]" * 50000, "nested more than"),
    ('{"prompt": "hi", "metadata": ' + '{"a": ' * 64 + "1" + "}" * 64 + "}", "nested more than 64 levels"),   # 65 deep
    ('{"prompt": "hi", "stop": ' + "[" * 64 + "]" * 64 + "}", "nested more than 64 levels"),
    ('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", "number that cannot be read"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    ('{"prompt": "hi", "max_tokens": 1e999}', "Infinity in 'max_tokens'"),
])
def test_malformed_bodies_are_400_with_an_openai_error(server, body, fragment):
    route = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
    assert_openai_error(post(server, body, route), 400, fragment)


@pytest.mark.parametrize("route, body, where", [
    ("/v1/responses", '{"input": "hi", "max_output_tokens": 1, "metadata": {"a": NaN}}', "metadata.a"),   # were 500s:
    ("/v1/responses", '{"input": "hi", "max_output_tokens": 1, "metadata": {"a": [1e999]}}', "metadata.a[0]"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 1, "metadata": {"b": -Infinity}}', "metadata.b"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 1, "temperature": NaN}', "temperature"),
])
def test_nan_or_infinity_anywhere_in_a_body_is_a_400_naming_where(server, route, body, where):
    """JSON has no NaN or Infinity, but Python's json reads them (and 1e999 as Infinity): a
    Responses answer echoes its request's metadata, and one holding NaN could not be written
    (a 500, "Out of range float values are not JSON compliant")."""
    r = post(server, body, route)
    assert_openai_error(r, 400, f"in '{where}', which JSON has no value for")
    assert r.json()["error"]["param"] == where


METADATA_AT_LIMIT = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}     # OpenAI's: 16 keys, 64 and 512 characters


BOUNDED = [
    ("metadata", {f"k{i}": "v" for i in range(17)}, "metadata", "has 17 keys: at most 16"),
    ("metadata", {"k" * 65: "v"}, "metadata", "is 65 characters long"),
    ("metadata", {"a": "v" * 513}, "metadata.a", "'metadata.a' is 513 characters long: at most 512"),
    ("metadata", {"a": {"b": ["x" * 600]}}, "metadata.a", "characters long as JSON: at most 512"),
    ("metadata", {"a": "v" * (3 << 20)}, "metadata.a", "at most 512"),            # megabytes, stored with an answer
    ("user", "u" * 513, "user", "'user' is 513 characters long: at most 512 are taken"),
    ("safety_identifier", "s" * 65, "safety_identifier",
     "'safety_identifier' is 65 characters long: at most 64 are taken (OpenAI's limit)"),
    ("prompt_cache_key", "p" * 513, "prompt_cache_key", "'prompt_cache_key' is 513 characters long: at most 512"),
    ("user", 7, "user", "'user' must be a string, not 7"),
]


@pytest.mark.parametrize("route, field, value, param, fragment", [
    (route, *case) for case in BOUNDED for route in ("/v1/chat/completions", "/v1/responses", "/v1/completions")
    if route != "/v1/completions" or case[0] in ("metadata", "user")])   # the others are chat's and Responses'
def test_metadata_and_identifiers_are_bounded_as_openai_bounds_them(server, route, field, value, param, fragment):
    """A Responses answer is stored with its metadata and identifiers (and every request's item holds
    them): unbounded, one request's megabytes of metadata evicted the other clients' stored answers.
    OpenAI takes 16 metadata keys of at most 64 characters, values of at most 512, and a
    safety_identifier of 64; agp also bounds user and prompt_cache_key, and a metadata value that
    is no string (conditions compare them) by its JSON's length."""
    body = ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} if route == "/v1/chat/completions" else
            {"input": "hi", "max_output_tokens": 1} if route == "/v1/responses" else {"prompt": "hi", "max_tokens": 1})
    r = post(server, json.dumps({**body, field: value}), route)
    assert_openai_error(r, 400, fragment)
    assert r.json()["error"]["param"] == param
    fine = {"metadata": METADATA_AT_LIMIT, "user": "u" * 512, "safety_identifier": "s" * 64,
            "prompt_cache_key": "p" * 512}
    r = post(server, json.dumps({**body, field: fine[field]}), route)
    assert r.status_code == 200, r.text[:300]
    if route == "/v1/responses":                       # stored and echoed whole
        kept = server.http.get(f"{server.url}/v1/responses/{r.json()['id']}", timeout=30).json()
        assert kept[field] == fine[field]


def test_a_metadata_value_that_is_no_string_is_measured_by_its_compact_json(server):
    """120 one-letter strings are 481 characters as a client writes them (compact JSON, the way
    OpenAI's SDKs and JSON.stringify write them) and 600 with json.dumps' default ", " separators,
    spaces the client never sent: taken. 128 are 513 characters, compact: refused."""
    fits, over = ["x"] * 120, ["x"] * 128
    assert len(json.dumps(fits, separators=(",", ":"))) == 481 and len(json.dumps(fits)) == 600
    for route, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                        ("/v1/responses", {"input": "hi", "max_output_tokens": 1})):
        r = post(server, json.dumps({**body, "metadata": {"a": fits, "b": {"k": 1}}}), route)
        assert r.status_code == 200, r.text[:300]
        r = post(server, json.dumps({**body, "metadata": {"a": over}}), route)
        assert_openai_error(r, 400, "'metadata.a' is 513 characters long as JSON: at most 512")


TOOL = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("choice, fragment", [
    ({"type": "function", "function": "w"}, "'tool_choice' must be none, auto, required"),     # was a 500
    ({"type": "function", "function": ["w"]}, "'tool_choice' must be none, auto, required"),
    ({"type": "function", "name": "w"}, "'tool_choice' must be none, auto, required"),  # the Responses API's shape
    ({"type": "function", "function": {"name": 7}}, "'tool_choice' must be none, auto, required"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {
        "name": "w"}}]}}, "give the allowed tools as 'tools'"),                   # OpenAI's, not served
    ({"type": "function", "function": {"name": "x"}}, "'tool_choice' names \"x\", which is not among the tools (w)"),
])
def test_a_tool_choice_of_another_shape_is_a_400_naming_it(server, choice, fragment):
    """A tool_choice object that is not {"type": "function", "function": {"name"}} is a 400 that
    shows it (a `function` that is no object was a 500, an allowed_tools or a Responses-shaped
    choice a 400 about a tool named null); a name no tool has is a 400 naming the tools."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": [TOOL], "tool_choice": choice}
    r = post(server, json.dumps(body), "/v1/chat/completions")
    assert_openai_error(r, 400, fragment)
    assert r.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("fields, param, fragment", [
    ({"tool_choice": "auto"}, "tool_choice", "'tool_choice' is \"auto\" but no 'tools' are given"),   # was taken
    ({"tool_choice": "auto", "tools": None}, "tool_choice", "'tool_choice' is \"auto\" but no 'tools' are given"),
    ({"tool_choice": "required"}, "tool_choice", "'tool_choice' is \"required\" but no 'tools' are given"),
    ({"tool_choice": {"type": "function", "function": {"name": "w"}}}, "tool_choice",
     "'tool_choice' names \"w\" but no 'tools' are given"),
    ({"tools": []}, "tools", "'tools' is an empty array"),                                          # was taken
    ({"tools": [], "tool_choice": "auto"}, "tools", "'tools' is an empty array"),
])
def test_a_tool_choice_without_tools_and_empty_tools_are_400s_naming_the_field(server, fields, param, fragment):
    """A tool_choice other than "none" with no tools to choose among, and an empty 'tools', are
    refused as vLLM and OpenAI refuse them (vLLM: "When using `tool_choice`, `tools` must be set.",
    "`tools` must not be an empty array"): a client that sent them believes tools are in play. A
    tool_choice of "none" without tools is still taken, as is a Responses request's "auto" (its default)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields}
    r = post(server, json.dumps(body), "/v1/chat/completions")
    assert_openai_error(r, 400, fragment)
    assert r.json()["error"]["param"] == param
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tool_choice": "none"}
    assert post(server, json.dumps(ok), "/v1/chat/completions").status_code == 200
    r = post(server, json.dumps({"input": "hi", "max_output_tokens": 1, "tool_choice": "auto"}), "/v1/responses")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["tool_choice"] == "auto"


def test_wrong_content_type_and_oversized_bodies_are_415_and_413(server):
    assert_openai_error(post(server, '{"prompt": "hi"}', ctype="text/plain"), 415, "must be application/json")
    r = server.http.post(server.url + "/v1/completions", data={"prompt": "hi"}, timeout=30)   # a form post
    assert r.status_code == 415
    small = LiveServer(server.runtime.segments[0].config.model, max_body_bytes=2048)
    try:
        big = json.dumps({"prompt": "x" * 5000})
        assert_openai_error(post(small, big), 413, "--max-body-bytes")
    finally:
        small.close()


def test_a_gzip_or_deflate_body_is_decoded_within_the_body_limit_and_another_coding_is_a_415(server):
    import gzip
    import zlib

    body = json.dumps({"prompt": "hello there", "max_tokens": 4, "temperature": 0}).encode()

    def send(data: bytes, coding: str):
        return server.http.post(server.url + "/v1/completions", content=data, timeout=60,
                          headers={"content-type": "application/json", "content-encoding": coding})

    plain = post(server, body)
    assert plain.status_code == 200, plain.text
    raw = zlib.compressobj(wbits=-15)
    for data, coding in [(gzip.compress(body), "gzip"), (gzip.compress(body), "x-gzip"),
                         (gzip.compress(body[:9]) + gzip.compress(body[9:]), "gzip"),     # two members
                         (zlib.compress(body), "deflate"), (raw.compress(body) + raw.flush(), "deflate"),
                         (body, "identity")]:
        r = send(data, coding)
        assert r.status_code == 200, (coding, r.text)
        assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    # a bomb: 64 KiB that inflate to 64 MiB, past the server's 16 MiB: a 413 once 16 MiB are out, not 64 MiB held
    bomb = gzip.compress(b'{"prompt": "' + b" " * (64 << 20), compresslevel=9)
    assert len(bomb) < 1 << 20
    r = send(bomb, "gzip")
    assert_openai_error(r, 413, f"decodes to more than {16 << 20} bytes")
    assert r.json()["error"]["code"] == "body_too_large"
    for data in (b"not gzip at all", gzip.compress(body)[:-12]):      # garbage, and a stream cut short
        r = send(data, "gzip")
        assert_openai_error(r, 400, "is not gzip data (Content-Encoding: gzip)")
    r = send(body, "br")
    assert_openai_error(r, 415, "Content-Encoding is br")
    assert r.headers["accept-encoding"] == "gzip, deflate"
    assert post(server, body).status_code == 200                       # and nothing else noticed


def test_a_body_without_a_content_type_is_415(server):
    # a browser's cross-site fetch may send a body with no Content-Type at all (an ArrayBuffer, a
    # no-cors request) without a preflight: it is refused as text/plain is, not read as JSON
    r = server.http.post(server.url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}', timeout=30)
    assert "content-type" not in r.request.headers
    assert_openai_error(r, 415, "not unspecified")


def test_a_body_of_exactly_max_body_bytes_is_taken_and_one_byte_more_is_413(server):
    small = LiveServer(server.runtime.segments[0].config.model, max_body_bytes=2048)
    try:
        body = '{"prompt": "hi", "max_tokens": 1}'
        exact = body[:-1] + " " * (2048 - len(body)) + "}"          # JSON whitespace up to the limit
        assert len(exact) == 2048
        r = post(small, exact)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text[:300]
        assert_openai_error(post(small, exact[:-1] + " }"), 413, "at most 2048 are accepted")
        for data, status in ((exact, 200), (exact[:-1] + " }", 413)):       # chunked: no Content-Length
            r = post(small, (part.encode() for part in (data[:1000], data[1000:])))
            assert "content-length" not in r.request.headers and r.status_code == status, r.text[:300]
    finally:
        small.close()


def test_a_body_larger_than_the_longest_prompt_can_need_is_413_before_it_is_read(server):
    # a pipeline whose engines take at most 1,000 characters of prompt needs no 4 MiB body: past
    # 8 bytes a character and 256 KiB of other fields, the body is refused by its Content-Length
    small = LiveServer(server.runtime.segments[0].config.model, max_prompt_chars=1000)
    try:
        limit = 8 * 1000 + (256 << 10)
        body = '{"prompt": "hi", "max_tokens": 1}'
        r = post(small, body[:-1] + " " * (limit + 1 - len(body)) + "}")
        assert_openai_error(r, 413, f"at most {limit} are accepted (more than the longest prompt")
        assert post(small, body).status_code == 200
    finally:
        small.close()


def test_stop_strings_are_bounded_by_count_length_and_characters_in_all(server):
    """vLLM sets no count; agp bounds what the matcher's automaton may hold (a state a character),
    so 64 stop strings pass and the per-token cost does not grow with them."""
    assert_openai_error(post(server, json.dumps({"prompt": "hi", "stop": ["a"] * 1025})), 400, "at most 1024")
    assert_openai_error(post(server, json.dumps({"prompt": "hi", "stop": ["x" * 257]})), 400, "at most 256")
    r = post(server, json.dumps({"prompt": "hi", "stop": ["y" * 256] * 17}))
    assert_openai_error(r, 400, "4352 characters in all; at most 4096")
    assert r.json()["error"]["param"] == "stop"
    for stops in (["y" * 256] * 16, [f"stop {i}" for i in range(64)], [chr(0x4e00 + i) for i in range(1024)]):
        r = post(server, json.dumps({"prompt": "hello", "max_tokens": 8, "stop": stops}))
        assert r.status_code == 200, r.text


def test_a_conversation_too_long_once_rendered_is_refused_before_it_is_tokenised(server):
    """Thousands of one-letter messages pass the check of the messages' own characters, but the
    template writes each one's turn around it: the rendered text is measured as a prompt is,
    and refused without tokenising it (where it used to be tokenised whole, 70,000 tokens of
    work for a 340 KB body a plain prompt of its size is refused without)."""
    for route in ("/v1/chat/completions", "/tokenize"):
        r = post(server, json.dumps({"messages": [{"role": "user", "content": "a"}] * 3000}), route=route)
        assert_openai_error(r, 400, "conversation rendered by the chat template of")
        assert r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = post(server, json.dumps({"messages": [{"role": "user", "content": "a"}] * 8}), route=route)
        assert r.status_code == 200, r.text                       # a short one is taken as before


def test_no_response_shows_an_absolute_path_and_405_says_allow(server):
    assert "/" not in json.dumps(server.http.get(server.url + "/stats").json()).replace("/s", "")
    for m in server.http.get(server.url + "/v1/models").json()["data"]:
        assert not str(m.get("root", "")).startswith("/")
    r = server.http.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# ---------------------------------------------------------------- nothing heavy on the engine loop

STALL = 1.0   # seconds: a blocked engine loop costs more (a chat template runs up to TEMPLATE_SECONDS,
              # 2 s; a 10 MB body read, parsed or tokenised on it takes seconds); a busy shared machine's
              # scheduling hiccups stay well under it (0.36 s seen at load 7)


class Victim:
    """A long streaming completion on a thread, recording when each token arrives, until stopped."""

    def __init__(self, url: str):
        self.stamps: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,))
        self.thread.start()

    def _read(self, url: str) -> None:
        # 4000 tokens: many seconds at any plausible speed, so the stream outlasts the probe (a 2 s
        # chat template) on a fast machine too; finish() hangs up long before the end
        body = {"prompt": "hello world", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    self.stamps.append(time.perf_counter())
                if self.stop.is_set():
                    return

    def wait_for(self, tokens: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while len(self.stamps) < tokens and self.thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(120)

    def gaps_during(self, t0: float, t1: float) -> list[float]:
        """The gaps between consecutive tokens that overlap [t0, t1]; the stream must have been
        running before t0 and after t1, so that a stall anywhere inside shows as a gap."""
        assert self.stamps and self.stamps[0] < t0 and self.stamps[-1] > t1, "the stream did not span the window"
        return [b - a for a, b in zip(self.stamps, self.stamps[1:]) if b >= t0 and a <= t1]


@pytest.fixture(scope="module")
def mid_gguf(tmp_path_factory):
    """A model big enough that a decode step takes milliseconds, as a real one does (a context
    of 4096 tokens: room for a victim stream that outlasts any probe)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "mid.gguf", hidden=768, ffn=2048, layers=6,
                           heads=12, kv_heads=4, context=4096)


def send_from_another_process(url: str, body_file: Path, route="/v1/completions") -> tuple[int, str]:
    code = ("import httpx, sys; r = httpx.post(sys.argv[1], content=open(sys.argv[2], 'rb').read(), "
            "headers={'content-type': 'application/json'}, timeout=60); print(r.status_code); print(r.text)")
    out = subprocess.run([sys.executable, "-c", code, url + route, str(body_file)], capture_output=True,
                         text=True, timeout=120).stdout.split("\n", 1)
    return int(out[0]), out[1]


def while_a_stream_runs(url: str, body_file: Path, route: str) -> tuple[int, str, list[float]]:
    """Send `body_file` while a victim stream is under way: its answer, and the victim's gaps
    between tokens for as long as the request was in flight."""
    victim = Victim(url)
    try:
        victim.wait_for(5)                                      # the stream is under way
        t0 = time.perf_counter()
        status, text = send_from_another_process(url, body_file, route)
        t1 = time.perf_counter()
        victim.wait_for(len(victim.stamps) + 3)                 # and still going afterwards
    finally:
        victim.finish()
    return status, text, victim.gaps_during(t0, t1)


class MidServed:
    """`agp serve` of the mid model with a chat template that never ends (--chat-template: used
    instead of the model's own, as a template in the .gguf is), shared by the tests of what a
    victim stream notices: raw prompts need no template, so its streams and the 10 MB body never
    meet it. Started for the first test that asks (`url`), stopped by the last (an idle server
    still costs some CPU), started again for a later one."""

    def __init__(self, folder: Path, model):
        self.folder, self.model, self.proc = folder, model, None
        self.loop = folder / "loop.jinja"
        self.loop.write_text("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")

    def url(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            # 4000 tokens of KV: 48 MiB
            self.proc, self._url = start_serve(self.folder, self.model, "--chat-template", str(self.loop),
                                               budget="64MiB")
        return self._url

    def stop(self) -> None:
        if self.proc is not None:
            reap(self.proc)


@pytest.fixture(scope="module")
def mid_served(tmp_path_factory, mid_gguf):
    served = MidServed(tmp_path_factory.mktemp("mid_served"), mid_gguf)
    try:
        yield served
    finally:
        served.stop()


def stalls(probe, bound: float) -> list[float]:
    """probe() -> the victim's gaps; [] when none reaches `bound`, else every try's gaps. A stall the
    server causes comes back each time; a busy machine's hiccup (1.7 s seen once, 3 test workers on
    2 cores) seldom twice running, so a second try decides."""
    tries = []
    for _ in range(2):
        gaps = probe()
        assert gaps
        tries.append(gaps)
        if max(gaps) < bound:
            return []
    return tries


def test_a_10mb_prompt_does_not_stall_a_running_stream(tmp_path, mid_served):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"prompt": "word " * 2_000_000, "max_tokens": 4}))        # 10 MB

    def probe() -> list[float]:
        status, text, gaps = while_a_stream_runs(mid_served.url(), big, "/v1/completions")
        assert status == 413 and "body_too_large" in text
        return gaps

    assert not stalls(probe, STALL)


def test_a_chat_template_that_never_ends_fails_its_request_only(tmp_path, mid_served):
    # the mid model served with a template that never ends (the fixture; the last of its tests)
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    # raw prompts need no template: the victim goes on while the template runs its 2 s
    def probe() -> list[float]:
        status, text, gaps = while_a_stream_runs(mid_served.url(), chat, "/v1/chat/completions")
        assert status == 400 and "did not finish within" in text
        assert len(gaps) >= 5
        return gaps

    # the template runs to its limit: had it run on the engine's loop, one gap would be as long as
    # that; a busy machine's hiccups are shorter (1.4 s seen at load 11: above STALL)
    try:
        assert not stalls(probe, 0.9 * TEMPLATE_SECONDS)
    finally:
        mid_served.stop()


# a template that spins until its time is up when a request's chat_template_kwargs say so
SPIN_TEMPLATE = ("{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                 "{% endif %}" + CHAT_TEMPLATE)


@contextlib.contextmanager
def _spinning(tmp_path, route: str, body: dict, spinning: int):
    """A LiveServer of a model whose chat template spins while `chat_template_kwargs` say so, and
    `spinning` requests of `body` to `route` kept in it, each on a thread of its own: yields
    (the server, the answers of those that ended); each is a 400 once they have all ended."""
    model = write_tiny_gguf(tmp_path / "spin.gguf", chat_template=SPIN_TEMPLATE)
    s = LiveServer(model)
    ended = []
    threads = [threading.Thread(target=lambda: ended.append(httpx.post(s.url + route, json=body, timeout=120)))
               for _ in range(spinning)]
    try:
        for t in threads:
            t.start()
        yield s, ended
    finally:
        for t in threads:
            t.join()
        s.close()
    assert [r.status_code for r in ended] == [400] * spinning


def test_chat_templates_kept_running_by_requests_hold_up_no_other_request(tmp_path):
    """Each spinning request holds a thread for the template's TEMPLATE_SECONDS; twice as many of
    them as the host pool has threads used to hold every thread that admits requests and hands
    over answers, so a raw prompt waited for them (4 s). Conversations render on threads of
    their own, which share the CPU: a plain prompt and a plain conversation are both answered
    while every spinning request is still in its template."""
    spinning = 2 * ITEM_WORKERS
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template_kwargs": {"spin": True}}
    with _spinning(tmp_path, "/v1/chat/completions", body, spinning) as (s, ended):
        s.stats_when(lambda st: st["in_flight"] == spinning)
        plain = s.http.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=120)
        chat = s.http.post(s.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        still = spinning - len(ended)
        assert plain.status_code == 200 and chat.status_code == 200, (plain.text, chat.text)
        assert still == spinning, [r.text for r in ended]
    assert all("did not finish within" in r.json()["error"]["message"] for r in ended)


def test_tokenize_requests_kept_in_their_template_hold_up_no_other_request(tmp_path):
    """/tokenize renders a conversation on the pipeline's render threads: more spinning ones than
    the threads that parse every request's body used to hold them all, and a plain prompt waited
    for their 2 s."""
    spinning = min(32, (os.cpu_count() or 1) + 4) + 2        # asyncio's default thread pool, and more
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"spin": True}}
    with _spinning(tmp_path, "/tokenize", body, spinning) as (s, ended):
        time.sleep(0.5)                                      # let them reach their template
        plain = s.http.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=120)
        still = spinning - len(ended)
        assert plain.status_code == 200, plain.text
        assert still == spinning, [r.text for r in ended]


def test_an_answer_being_built_holds_up_no_other_request(tiny_gguf, monkeypatch):
    """A non-streamed answer is built and written off the server's loop: 64 choices of 60 tokens
    with 20 logprobs each are 80,000 objects, seconds on a busy host, during which every other
    request's stream and answer used to wait. Here the first answer's building waits until
    another request has been answered meanwhile."""
    from pipeline_dsl.serve import generation

    real, answered, calls, held = generation.answer_body, threading.Event(), [], []

    def building(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            held.append(answered.wait(20))             # the plain request is answered meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "answer_body", building)
    s = LiveServer(tiny_gguf)
    try:
        big = []
        t = threading.Thread(target=lambda: big.append(httpx.post(s.url + "/v1/completions", timeout=120, json={
            "prompt": "hi", "n": 8, "max_tokens": 4, "logprobs": 20})))
        t.start()
        while not calls and t.is_alive():
            time.sleep(0.01)
        plain = httpx.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=120)
        answered.set()
        t.join()
    finally:
        s.close()
    assert plain.status_code == 200 and big[0].status_code == 200, (plain.text, big[0].text)
    assert held == [True]
    assert len(big[0].json()["choices"]) == 8


# ---------------------------------------------------------------- agp run: one bad line loses nothing

def with_python_stage(pipeline: Path, name: str, params: str, edge: str) -> Path:
    """The pipeline file with a python stage `name` { params } put into `edge` ("a -> b" becomes
    "a -> name -> b")."""
    src, dst = edge.split(" -> ")
    pipeline.write_text(pipeline.read_text()
                        .replace(edge, f"{src} -> {name} -> {dst}")
                        .replace("stage out", f"stage {name} : python {{ {params} }}\n    stage out"))
    return pipeline


def write_pipeline(tmp_path, model, budget="1MiB") -> Path:
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=model, max_queue=64, max_batch_size=4, timeout=1)
                    .replace("budget = 1MiB", f"budget = {budget}"))
    return path


def test_agp_run_turns_every_bad_line_into_an_error_record(tmp_path, tiny_gguf):
    lines = [b'{"id": "a", "prompt": "hello", "max_tokens": 3}',
             b'{"id": "s", "prompt": "\\ud800"}',
             b"[" * 20000 + b"]" * 20000,
             b'{"id": "n", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}",
             b'{"id": "bytes", "prompt": "\xff"}',
             b'{"id": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}']
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    r = agp_in("run", str(write_pipeline(tmp_path, tiny_gguf)), "-i", str(inp), "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["a", "s", 3, 4, "bytes", "b"]
    assert "text" in rows[0] and "text" in rows[5]
    assert [row["error"]["line"] for row in rows[1:5]] == [2, 3, 4, 5]
    assert "surrogate" in rows[1]["error"]["message"] and "nested" in rows[2]["error"]["message"]
    assert "4 failed" in r.stderr


def test_agp_run_never_overwrites_answers_silently(tmp_path, tiny_gguf):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hello", "max_tokens": 2}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old", "text": "keep me"}\n')
    r = agp_in("run", str(write_pipeline(tmp_path, tiny_gguf)), "-i", str(inp), "-o", str(out), "--no-progress")
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert out.read_text() == '{"id": "old", "text": "keep me"}\n'


HOLD_HOOK = """import os, threading

def _held():
    # blocked on a lock for 300 s, not polling: the waiting threads leave the engine's thread the
    # interpreter (38 threads polling a file every 10 ms starved it under load); agp exits anyway
    threading.Event().wait(300)

def hold(item):
    # with AGP_TEST_HOLD set, every request but the first two waits here
    if os.environ.get("AGP_TEST_HOLD") and item["id"] not in ("q0", "q1"):
        _held()
    return item

def hold_end(item, chunks):
    # a stream stage: every chunk goes on as it comes; the end of the answer waits
    for text in chunks:
        yield text
    _held()
"""


def to_another_thread(proc: subprocess.Popen, sig: int) -> None:
    """`sig` sent to one of `proc`'s threads other than its main one, as the kernel may hand a
    signal sent to the process to any thread (the main one's signal handlers still run it)."""
    tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
    if tgkill is None:
        pytest.skip("this C library has no tgkill")
    tid = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
    assert tgkill(proc.pid, tid, sig) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("sig, code, thread", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False),
                                               (signal.SIGHUP, 129, False), (signal.SIGKILL, -9, False),
                                               (signal.SIGINT, 130, True)])
def test_ctrl_c_stops_agp_run_cleanly_and_resume_finishes_the_job(tmp_path, tiny_gguf, sig, code, thread):
    # a python stage holds every request but the first two until agp has exited: the run is
    # interrupted with requests in flight however fast the machine (a tiny model answers all of
    # them in a fraction of a second, quicker than a busy test could see two lines and signal).
    # The hold, not an answer's length or their number, keeps them in flight: 16 requests of 8
    # tokens each (the --resume run generates the other 14 answers in full; 40 of them, 60
    # tokens each, made it 2,280 decode tokens on a batch of four)
    n = 16
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}", "max_tokens": 8,
                                         "ignore_eos": True}) for i in range(n)) + "\n")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    (tmp_path / "holdhook.py").write_text(HOLD_HOOK)
    pipeline = write_pipeline(tmp_path, tiny_gguf)
    with_python_stage(pipeline, "hold", 'fn = "holdhook:hold"  workers = 64', "request -> batch")
    pipeline = str(pipeline)
    deadline = time.monotonic() + 120
    with reaped(agp_child("run", pipeline, "-i", inp, "-o", out, "--stats", stats, "--no-progress", "--threads", "1",
                          env={**os.environ, "AGP_TEST_HOLD": "1"})) as proc:
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        if thread:        # the main thread is joining the engine's threads then: it hears it all the same
            to_another_thread(proc, sig)
        else:
            proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]      # the held calls do not keep the process alive
    assert proc.returncode == code, err
    if sig != signal.SIGKILL:                              # SIGKILL leaves no time for a summary
        assert "Traceback" not in err and "terminate called" not in err and "run summary" in err
        assert json.loads(stats.read_text())["interrupted"] > 0
    text = out.read_text()
    first = [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()]   # whole lines
    assert 0 < len(first) < n
    r = agp_in("run", pipeline, "-i", str(inp), "-o", str(out), "--resume", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))                 # each answered exactly once


# ---------------------------------------------------------------- agp serve: drain, timeouts, hosts, load

def start_serve(tmp_path, model, *extra, budget="1MiB", pipeline=None, env=None) -> tuple[subprocess.Popen, str]:
    pipeline = pipeline or write_pipeline(tmp_path, model, budget)
    return start_agp_serve(str(pipeline), "--threads", "1", "--no-access-log", *extra,
                           env={**os.environ, **(env or {})})


def held_pipeline(tmp_path, model, budget="1MiB"):
    """A pipeline whose stream stage after generation passes each chunk on as it comes, then holds
    the answer until agp has exited: its requests are still in flight when a drain or a signal
    comes, however fast the machine generates."""
    (tmp_path / "holdhook.py").write_text(HOLD_HOOK)
    pipeline = write_pipeline(tmp_path, model, budget=budget)
    return with_python_stage(pipeline, "hold", 'fn = "holdhook:hold_end"  stream = true  workers = 64',
                             "gen -> out")


class InFlight:
    """`streams` streamed requests and one whole one, each on a thread, once all are in the
    pipeline and the streams have begun (GET /stats): `streams` (each one's data lines), `whole`."""

    def __init__(self, url: str, body: dict, streams: int, timeout: float = 60):
        self.streams, self.whole = [[] for _ in range(streams)], {}

        def stream(i):
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
                self.streams[i].extend(line for line in r.iter_lines() if line.startswith("data: "))

        def nonstream():
            self.whole["r"] = httpx.post(url + "/v1/completions", json=body, timeout=timeout)

        self.threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)] + \
            [threading.Thread(target=nonstream)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 120
        while not (all(self.streams) and
                   httpx.get(url + "/stats", timeout=30).json()["requests"]["in_flight"] >= streams + 1):
            assert time.monotonic() < deadline, f"the {streams + 1} requests did not arrive"
            time.sleep(0.05)

    def join(self) -> None:
        for t in self.threads:
            t.join(60)


def test_a_drain_that_times_out_says_so_to_every_client_and_in_the_exit_status(tmp_path, tiny_gguf):
    # held answers: all four are still in flight when the 0.2 s drain ends, however fast the
    # machine generates: the hold, not the answers' length, keeps them (16 tokens: each stream
    # has begun, and the engine is idle while the drain waits), so a drain this short times out
    # as a long one would, with no second of it waited out
    pipeline = held_pipeline(tmp_path, tiny_gguf)
    proc, url = start_serve(tmp_path, tiny_gguf, "--drain-timeout", "0.2", pipeline=pipeline)
    with reaped(proc):
        held = InFlight(url, {"prompt": "hello", "max_tokens": 16, "ignore_eos": True}, streams=3)
        proc.send_signal(signal.SIGTERM)
        held.join()
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "cut 4 request(s)" in err, err
    for lines in held.streams:
        assert lines[-1] == "data: [DONE]"
        assert "shut down before this request finished" in json.loads(lines[-2][6:])["error"]["message"]
    whole = held.whole
    assert whole["r"].status_code == 503 and whole["r"].json()["error"]["type"] == "server_error"


def test_half_sent_requests_are_closed_and_slow_bodies_get_408(tiny_gguf):
    s = LiveServer(tiny_gguf, header_timeout=0.5, body_timeout_s=0.5)
    try:
        socks = []
        for _ in range(20):                                   # headers that never end
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(c)
        for c in socks:
            c.settimeout(60)                                  # only the header timeout closes them
            assert c.recv(1024) == b""                        # closed by the server
            c.close()
        c = socket.create_connection(("127.0.0.1", s.port))   # a body that stops half way
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        c.settimeout(60)
        reply = b""
        while b"body_timeout" not in reply:
            chunk = c.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply
        c.close()
        assert s.http.get(s.url + "/health").status_code == 200
    finally:
        s.close()


@pytest.fixture(scope="module")
def hosts_server(tiny_gguf):
    """A server that allows the Host headers of 127.0.0.1, ::1 and localhost (as `agp serve
    --host 127.0.0.1` and `--host ::1` allow theirs), shared by the tests of Host headers."""
    s = LiveServer(tiny_gguf, allowed_hosts=("127.0.0.1", "::1", "localhost"))
    yield s
    s.close()


def test_a_foreign_host_header_is_refused(hosts_server):
    s = hosts_server
    ok = s.http.get(s.url + "/health")
    assert ok.status_code == 200
    r = s.http.get(s.url + "/health", headers={"host": "attacker.example"})
    assert_openai_error(r, 400, "Host header")


def test_an_ipv6_host_header_in_brackets_is_answered(hosts_server):
    # a server on ::1 (`agp serve --host ::1` allows "::1") is called as http://[::1]:PORT/, so its
    # Host header is "[::1]:PORT" (RFC 3986 brackets), with or without the port
    s = hosts_server
    for host in (f"[::1]:{s.port}", "[::1]", "[::1]:8000"):
        r = s.http.get(s.url + "/health", headers={"host": host})
        assert r.status_code == 200, (host, r.text[:200])
    r = s.http.get(s.url + "/health", headers={"host": "[::2]:8000"})
    assert_openai_error(r, 400, "Host header")


def test_an_http_1_0_request_without_a_host_header_is_answered(hosts_server):
    # HTTP/1.0 lets a client leave Host out (HAProxy's default health check: OPTIONS / HTTP/1.0);
    # it was refused as a foreign host, 400, so such a probe marked the server down
    s = hosts_server
    for raw in (b"GET /health HTTP/1.0\r\n\r\n",
                b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n"
                b'{"prompt": "hi", "max_tokens": 2}'):
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(raw)
        answer = b""
        c.settimeout(60)
        while chunk := c.recv(65536):                 # HTTP/1.0: the server closes after the answer
            answer += chunk
        c.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body.get("status") == "ok" or body["usage"]["completion_tokens"] == 2, body


@pytest.mark.usefixtures("fresh_flowkit")
def test_too_many_requests_at_once_get_503_with_retry_after(tiny_gguf):
    # a python stage holds both requests (flowkit.hold) until the third has had its answer,
    # however the threads are scheduled
    text = (TINY.format(model=tiny_gguf, max_queue=1024, max_batch_size=8, timeout=20)
            .replace("request -> batch", "request -> hold -> batch")
            .replace("stage out", 'stage hold    : python        { fn = "flowkit:hold" }\n    stage out'))
    s = LiveServer(tiny_gguf, max_connections=2, text=text)
    try:
        body = {"prompt": "hello", "max_tokens": 2}
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(httpx.post(
            s.url + "/v1/completions", json=body, timeout=60))) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while flowkit.COUNTS["hold"] < 2:                       # both hold a connection slot
            assert time.monotonic() < deadline, "the two requests did not arrive"
            time.sleep(0.01)
        r = s.http.post(s.url + "/v1/completions", json=body, timeout=30)
        assert_openai_error(r, 503, "--max-connections")
        assert r.headers["retry-after"] == "1"
        flowkit.gate("hold").set()
        for t in threads:
            t.join(60)
        assert [a.status_code for a in answers] == [200, 200]  # the two held ones are served
    finally:
        flowkit.gate("hold").set()
        s.close()


def test_a_client_gone_while_sending_its_body_is_a_499_not_a_500(server):
    # the body's read raised starlette's ClientDisconnect out of the handler: a traceback in the
    # server's log and a 500 in the metrics for what a client did
    def count(status: str) -> float:
        return server.metric("agp_http_requests_total", f'{{handler="/v1/completions",status="{status}"}}', default=0.0)

    before = count("499")
    c = socket.create_connection(("127.0.0.1", server.port))
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    time.sleep(0.2)
    c.close()
    deadline = time.monotonic() + 30
    while count("499") == before:
        assert count("500") == 0, "a client that went away was counted a server error"
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.05)
    assert count("500") == 0
