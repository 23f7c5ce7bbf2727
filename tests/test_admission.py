"""`agp serve`: a request that can never run (its prompt, or its prompt + max_tokens, past the
context) is a 400 at once, as vLLM's API layer answers it, whatever else the server is doing: never
a 429 while the queue is full (a client retries a 429, forever for such a request), never after
it waited for a batch slot. And the Retry-After of every 429 and 503 the server writes."""

import contextlib
import threading

import httpx
import pytest

import flowkit
from test_serve import TINY, LiveServer

CHAT = {"messages": [{"role": "user", "content": "the cat " * 500}], "max_tokens": 1500}
# each over the context (2048 tokens: all TINY's KV budget holds) by its prompt + max_tokens, or by its
# prompt alone, though its characters alone do not say so: only its tokens do
NEVER = [("/v1/completions", {"prompt": "the cat " * 500, "max_tokens": 1500}, None),
         ("/v1/completions", {"prompt": "the cat " * 500, "max_tokens": 1500, "stream": True}, None),
         ("/v1/completions", {"prompt": "the cat " * 500, "max_tokens": 1500, "n": 2}, None),
         ("/v1/completions", {"prompt": "the cat " * 1100, "max_tokens": 4}, None),
         ("/v1/completions", {"prompt": ["hi", "the cat " * 500], "max_tokens": 1500}, "'prompt[1]': "),
         ("/v1/chat/completions", CHAT, None),
         ("/v1/chat/completions", {**CHAT, "stream": True}, None),
         ("/v1/responses", {"input": "the cat " * 500, "max_output_tokens": 1500}, None),
         ("/v1/embeddings", {"input": "the cat " * 1100}, None)]


@contextlib.contextmanager
def full_queue(model):
    """A server whose queue (requests.max_queue = 2) is full: two requests held in a python stage
    after their generate stage (in flight, not running: the queue's). Let go at the end, both are
    answered."""
    text = (TINY.format(model=model, max_queue=2, max_batch_size=1, timeout=0)
            .replace("gen -> out", "gen -> hold -> out")
            .replace("stage out", 'stage hold    : python        { fn = "flowkit:hold" }\n    stage out'))
    s = LiveServer(model, text=text)
    try:
        held = []
        waiting = [threading.Thread(target=lambda: held.append(httpx.post(
            s.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)))
            for _ in range(2)]
        for t in waiting:
            t.start()
        s.stats_when(lambda st: st["stages"]["hold"]["items_in"] == 2)
        yield s
        flowkit.gate("hold").set()
        for t in waiting:
            t.join(60)
        assert [a.status_code for a in held] == [200, 200]
    finally:
        flowkit.gate("hold").set()
        s.close()


@pytest.mark.usefixtures("fresh_flowkit")
def test_a_request_that_can_never_run_is_a_400_while_the_queue_is_full_not_a_429(long_gguf):
    """requests.max_queue = 2, filled by requests held in a python stage after their generate stage
    (in flight, not running: the queue's). A request over the context, on every generation route,
    streamed or not, with n, one prompt of a batch: its 400 (context_length_exceeded), as on an idle
    server; one that fits: the queue's 429. Let go, the held one is answered."""
    with full_queue(long_gguf) as s:
        assert s.engine.max_model_len == 2048
        for path, body, place in NEVER:
            r = s.http.post(s.url + path, json={"model": "tiny", **body}, timeout=60)
            assert r.status_code == 400, (path, body.keys(), r.text)
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and "retry-after" not in r.headers, (path, err)
            assert "exceeds the context of 2048 tokens" in err["message"], err
            assert place is None or err["message"].startswith(place), err
        r = s.http.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "the cat " * 500,
                                                         "max_tokens": 1000}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text


@pytest.mark.usefixtures("fresh_flowkit")
def test_a_full_queue_tokenises_only_the_prompts_of_a_batch_whose_bytes_may_not_fit(long_gguf, monkeypatch):
    """A batch the full queue refuses: a prompt whose UTF-8 bytes (a token stands for one at
    least), with the special tokens the engine adds and its max_tokens, fit the context is not
    tokenised to find that out, on each retry of its client; one whose bytes may not fit is, and
    the answer is what tokenising every prompt gives (the 429, or a prompt's 400)."""
    from pipeline_dsl.engine.tokenizer import Tokenizer

    encoded = []
    encode = Tokenizer.encode

    def spy(self, text, add_special_tokens=True):
        encoded.append(text)
        return encode(self, text, add_special_tokens)

    with full_queue(long_gguf) as s:
        monkeypatch.setattr(Tokenizer, "encode", spy)
        fits, may_not = ["the cat " * 50, "a dog " * 60], "the cat " * 300     # 2400 bytes, ~600 tokens
        over = "the cat " * 500                    # ~1000 tokens: + max_tokens 1500 past the context
        for prompts, most, status, tokenised in ((fits, 10, 429, []), (fits[:1] + [may_not], 10, 429, [may_not]),
                                                 (fits[:1] + [over], 1500, 400, [over])):
            encoded.clear()
            r = s.http.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": most},
                            timeout=60)
            assert r.status_code == status, r.text
            assert [t for t in encoded if t in prompts] == tokenised, [len(t) for t in encoded]
        assert r.json()["error"]["message"].startswith("'prompt[1]': "), r.text


@pytest.mark.usefixtures("fresh_flowkit")
def test_a_full_queue_bounds_a_conversation_by_its_rendered_bytes_and_refuses_none_that_fits(long_gguf, monkeypatch):
    """A chat request the full queue refuses gets the completions prompt's cheap bound: its
    conversation as the chat template renders it (every turn's markers counted), its UTF-8 bytes
    and max_tokens within the context, is not tokenised to find out it fits (it always was, on
    each retry of its client). At the edge: max_tokens that the bound just allows is the 429 with
    no tokenising; one more is tokenised and still the 429 (the bound is above the tokens), up to
    the max_tokens its tokens leave exactly; one past that is its 400. A conversation of many
    short messages, whose markers are most of its tokens, is tokenised and refused: its
    messages' own bytes would have fit."""
    from pipeline_dsl.engine.tokenizer import Tokenizer

    encoded = []
    encode = Tokenizer.encode

    def spy(self, text, add_special_tokens=True):
        encoded.append(text)
        return encode(self, text, add_special_tokens)

    def post(messages, most):
        encoded.clear()
        r = s.http.post(s.url + "/v1/chat/completions",
                        json={"model": "tiny", "messages": messages, "max_tokens": most}, timeout=60)
        return r.status_code, [t for t in encoded if messages[-1]["content"] in t], r

    with full_queue(long_gguf) as s:
        context = s.engine.max_model_len
        tok = s.engine.tokenizer
        chat = [{"role": "user", "content": "the cat sat " * 100}]
        rendered = tok.apply_chat_template(chat, add_generation_prompt=True)
        bound = tok.max_tokens(rendered, add_special_tokens=False)
        tokens = len(tok.encode(rendered, add_special_tokens=False))
        assert tokens < bound < context, (tokens, bound)
        monkeypatch.setattr(Tokenizer, "encode", spy)
        status, tokenised, r = post(chat, context - bound)
        assert status == 429 and not tokenised, r.text
        status, tokenised, r = post(chat, context - bound + 1)
        assert status == 429 and tokenised == [rendered], r.text
        status, tokenised, r = post(chat, context - tokens)
        assert status == 429 and tokenised == [rendered], r.text
        status, _, r = post(chat, context - tokens + 1)
        assert status == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text

        short = [{"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(199)]
        own = sum(len(m["content"]) for m in short)            # 199 bytes; the markers are ~1,400 tokens
        status, tokenised, r = post(short, context - own - 10)
        assert status == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_past_a_python_stage_the_engine_refuses_it_without_waiting_for_a_batch_slot(long_gguf, tmp_path,
                                                                                  monkeypatch):
    """Where a python stage before the engine may rewrite the prompt, the engine's admission
    refuses a request that can never run as it arrives there: while the one batch slot
    (max_batch_size 1) is taken by a long answer, not once that answer is done."""
    (tmp_path / "admission_hooks.py").write_text("def same(item):\n    return item\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = (TINY.format(model=long_gguf, max_queue=16, max_batch_size=1, timeout=0)
            .replace("request -> batch", "request -> pre -> batch")
            .replace("stage out", 'stage pre     : python        { fn = "admission_hooks:same" }\n    stage out'))
    s = LiveServer(long_gguf, text=text)
    try:
        long = []
        t = threading.Thread(target=lambda: long.append(httpx.post(
            s.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2000,
                                             "ignore_eos": True}, timeout=300)))
        t.start()
        s.stats_when(lambda st: st["running"] == 1)
        for path, body in [("/v1/completions", {"prompt": "the cat " * 500, "max_tokens": 1500}),
                           ("/v1/chat/completions", {**CHAT, "stream": True})]:
            r = s.http.post(s.url + path, json={"model": "tiny", **body}, timeout=300)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert not long, "refused only once the long answer was done"
        t.join(300)
        assert [a.status_code for a in long] == [200]
    finally:
        s.close()


# ---------------------------------------------------------------- --retry-after-s

def _parse(argv):
    import argparse

    from pipeline_dsl.commands import serve

    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("value, said", [("0", "--retry-after-s must be at least 1, not 0"),
                                         ("-3", "--retry-after-s must be at least 1, not -3"),
                                         ("1.5", "--retry-after-s: invalid int value: '1.5'"),
                                         ("soon", "--retry-after-s: invalid int value: 'soon'")])
def test_a_retry_after_that_is_no_positive_whole_number_of_seconds_stops_the_start(tmp_path, capsys, value, said):
    from pipeline_dsl import cli

    path = tmp_path / "x.agp"
    path.write_text("")
    try:
        code = cli.main(["serve", str(path), "--port", "0", "--retry-after-s", value])
    except SystemExit as e:                        # argparse's own refusal of a value that is no integer
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and said in err, err
    assert "Traceback" not in err


@pytest.mark.usefixtures("fresh_flowkit")
def test_retry_after_s_is_the_retry_after_of_every_429_and_503_the_server_writes(tmp_path, tiny_gguf):
    """`agp serve --retry-after-s 7`: the full queue's 429 (chat, completions, streamed or not,
    embeddings), then, draining, /health's 503 and a request's, all with Retry-After: 7 (the
    server wrote 1 whatever it was told: there was no such flag)."""
    import socket

    import uvicorn

    from pipeline_dsl.serve.build import build

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=1, max_batch_size=1, timeout=0)
                    .replace("request -> batch", "request -> hold -> batch")
                    .replace("stage out", 'stage hold    : python        { fn = "flowkit:hold" }\n    stage out'))
    serving = build(_parse([str(path), "--threads", "1", "--retry-after-s", "7"]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(serving.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    held, stopping = [], None
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            threading.Event().wait(0.02)
        t = threading.Thread(target=lambda: held.append(httpx.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)))
        t.start()
        while flowkit.COUNTS["hold"] < 1:
            threading.Event().wait(0.02)
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for route, body in [("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                            ("/v1/chat/completions", {**chat, "stream": True}),
                            ("/v1/embeddings", {"input": "hi"})]:
            r = httpx.post(url + route, json={"model": "tiny", **body}, timeout=30)
            assert (r.status_code, r.headers.get("retry-after")) == (429, "7"), (route, r.text)
        stopping = threading.Thread(target=serving.apipe.stop, kwargs={"timeout": 60})
        stopping.start()                           # a drain: the held request finishes, new ones are refused
        while serving.apipe.accepting:
            threading.Event().wait(0.02)
        r = httpx.get(url + "/health", timeout=30)
        assert (r.status_code, r.headers.get("retry-after")) == (503, "7"), r.text
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert (r.status_code, r.headers.get("retry-after")) == (503, "7"), r.text
        flowkit.gate("hold").set()
        t.join(60)
        assert [a.status_code for a in held] == [200]
    finally:
        flowkit.gate("hold").set()
        if stopping is not None:
            stopping.join(60)
        server.should_exit = True
        thread.join(30)
        serving.runtime.close()
