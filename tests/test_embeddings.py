"""POST /v1/embeddings through the `openai` client and litellm against an `agp serve` app on the
tiny model: each embedding is the L2-normalised mean of the model's final normed hidden states
over the input's tokens (checked against a whole-prompt forward), in floats or base64, computed
as a prefill in chunks through the engine; bad input is a 400 naming the field.
"""
from __future__ import annotations

import math
import os

import httpx
import openai
import pytest
import torch

from test_prompt_outputs import reference
from test_serve import LiveServer


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf, overrides={"prefill_chunk": 64}, batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(server, ids, normalize=True) -> torch.Tensor:
    _, hidden = reference(server.engine.runner.model, ids)
    mean = hidden.mean(0)
    return mean / mean.norm() if normalize else mean


def ids_of(server, text):
    return server.http.post(server.url + "/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


def test_each_embedding_is_the_normalised_mean_hidden_state(server, client):
    texts = ["hello world", "the cat is here"]
    out = client.embeddings.create(model="tiny", input=texts)            # the SDK asks for base64
    assert [d.index for d in out.data] == [0, 1] and out.model == "tiny"
    for text, d in zip(texts, out.data):
        got = torch.tensor(d.embedding)
        assert torch.allclose(got, expected(server, ids_of(server, text)), atol=1e-4)
        assert math.isclose(float(got.norm()), 1.0, rel_tol=1e-4)
    assert out.usage.prompt_tokens == sum(len(ids_of(server, t)) for t in texts) == out.usage.total_tokens
    floats = client.embeddings.create(model="tiny", input="hello world", encoding_format="float")
    assert torch.allclose(torch.tensor(floats.data[0].embedding), torch.tensor(out.data[0].embedding), atol=1e-6)
    raw = client.embeddings.create(model="tiny", input=[[5, 6, 7, 8]], encoding_format="float",
                                   extra_body={"normalize": False})
    assert torch.allclose(torch.tensor(raw.data[0].embedding), expected(server, [5, 6, 7, 8], False), atol=1e-4)


def test_a_long_input_is_prefilled_in_chunks_through_the_engine(server, client):
    before = server.stats()
    ids = [(7 * i + 3) % 200 + 3 for i in range(200)]                   # 200 tokens, chunks of 64
    out = client.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    assert torch.allclose(torch.tensor(out.data[0].embedding), expected(server, ids), atol=1e-4)
    after = server.stats()
    grown = {int(k): v - before["step_tokens_hist"].get(k, 0) for k, v in after["step_tokens_hist"].items()
             if v - before["step_tokens_hist"].get(k, 0) > 0}
    assert max(grown) <= 64 and sum(k * n for k, n in grown.items()) >= 200, grown
    assert after["requests_done"] - before["requests_done"] == 1 and after["generated_tokens"] == before["generated_tokens"]


def test_litellm_embeds_too(server):
    # litellm's import fetches its model price list from the network (retried in a thread) unless told not to
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    out = litellm.embedding(model="openai/tiny", input=["hello world"], api_base=server.url + "/v1", api_key="x")
    got = torch.tensor(out.data[0]["embedding"])
    assert torch.allclose(got, expected(server, ids_of(server, "hello world")), atol=1e-4)


def test_vllms_chat_form_embeds_the_rendered_conversation(server):
    """vLLM's chat-form embeddings request: `messages` instead of `input`, rendered by the chat
    template without the assistant's turn opened after them (vLLM's default for embeddings) unless
    add_generation_prompt is true; the embedding is that of the rendered tokens."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat is here"}]
    for opened in (None, True):
        flag = {} if opened is None else {"add_generation_prompt": opened}
        r = server.http.post(server.url + "/v1/embeddings", json={"model": "tiny", "messages": messages,
                                                            "encoding_format": "float", **flag}, timeout=30)
        assert r.status_code == 200, r.text
        ids = server.http.post(server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": bool(opened)},
                         timeout=30).json()["tokens"]
        assert torch.allclose(torch.tensor(r.json()["data"][0]["embedding"]), expected(server, ids), atol=1e-4)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.jpg"}}]}]},
     "messages[0].content"),
    ({"input": "x", "add_generation_prompt": True}, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, "add_special_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 700}]}, "messages"),     # beyond the context (input)
])
def test_a_chat_form_embedding_request_that_cannot_be_embedded_is_a_400_naming_the_field(server, body, param):
    r = server.http.post(server.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("endianness", ["native", "big", "little"])
def test_a_base64_embedding_is_written_in_the_dtype_and_byte_order_asked(server, dtype, endianness):
    """vLLM's embed_dtype and endianness (its base64 client sends each pair): the numbers of the float
    embedding, rounded to that dtype, each in that byte order ("native": the server's own)."""
    import base64
    import sys

    import numpy

    body = {"model": "tiny", "input": "hello world"}
    floats = server.http.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "float"},
                        timeout=30).json()["data"][0]["embedding"]
    r = server.http.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "base64", "embed_dtype": dtype,
                                                        "endianness": endianness}, timeout=30)
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    real = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(dtype) or getattr(torch, dtype)
    width = torch.tensor([], dtype=real).element_size()
    bits = {1: numpy.uint8, 2: numpy.int16, 4: numpy.int32}[width]
    order = sys.byteorder if endianness == "native" else endianness
    words = numpy.frombuffer(raw, dtype=numpy.dtype(bits).newbyteorder("<" if order == "little" else ">"))
    got = torch.from_numpy(words.astype(bits)).view(real)
    assert len(raw) == width * len(floats)
    assert torch.equal(got.float(), torch.tensor(floats).to(real).float())


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": "x", "encoding_format": "base64", "embed_dtype": "int8"}, 400, "embed_dtype"),
    ({"input": "x", "encoding_format": "base64", "endianness": "middle"}, 400, "endianness"),
    ({"input": "x", "encoding_format": "base64", "embed_dtype": ["float16"]}, 400, "embed_dtype"),   # was a 500
    ({"input": "x", "encoding_format": "base64", "embed_dtype": {"float16": 1}}, 400, "embed_dtype"),
    ({"input": []}, 400, "input"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "encoding_format": 0}, 400, "encoding_format"),     # was taken as left out, as false and ""
    ({"input": "x", "encoding_format": "base64", "embed_dtype": ""}, 400, "embed_dtype"),
    ({"input": "x", "encoding_format": "base64", "endianness": False}, 400, "endianness"),
    ({"input": "x", "dimensions": 3}, 400, "dimensions"),
    ({"input": "x", "truncate": True}, 400, "truncate"),
    ({"input": "x", "model": "nope"}, 404, "model"),
    ({"input": "x", "user": 5}, 400, "user"),
    ({"input": [[1] * 600]}, 400, "input"),
    ({"input": ["x"] * 2049}, 400, "input"),
    ({"input": ["x"] * 1025}, 400, "input"),          # more than the queue (1024) ever holds
])
def test_bad_input_is_an_error_naming_the_field(server, body, status, param):
    r = server.http.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_truncate_prompt_tokens_embeds_each_inputs_last_tokens(server, client):
    """vLLM's truncate_prompt_tokens, as on completions and chat: each input's last k tokens are
    embedded (a text's once tokenised), so an input longer than the context is embedded from its end;
    -1 keeps the context's worth. It was an unknown field (a 400), which vLLM clients send for long
    documents."""
    long_ids = [(7 * i + 3) % 200 + 3 for i in range(600)]              # beyond the context of 512
    text = "the cat is here " * 3
    out = client.embeddings.create(model="tiny", input=[long_ids, text], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": 5})
    assert torch.allclose(torch.tensor(out.data[0].embedding), expected(server, long_ids[-5:]), atol=1e-4)
    assert torch.allclose(torch.tensor(out.data[1].embedding), expected(server, ids_of(server, text)[-5:]), atol=1e-4)
    assert out.usage.prompt_tokens == 10
    whole = client.embeddings.create(model="tiny", input=[long_ids], extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == 512
    r = server.http.post(server.url + "/v1/embeddings", json={"input": "x", "truncate_prompt_tokens": 513}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


def test_a_thousand_inputs_are_embedded_and_the_answer_names_the_model_asked_for(server, client):
    """docs/openai.md, /v1/embeddings: up to 2048 inputs a request, OpenAI's limit, and no more
    than the queue holds (2049, and 1025 on a queue of 1024, are 400s, above): LangChain's
    OpenAIEmbeddings sends 1000 texts a request and the Vercel AI SDK's embedMany 2048 (256 was the
    limit, and both failed on a longer list of documents). One embedding each in order; the answer
    carries the model name the request asked for."""
    r = client.embeddings.create(model="tiny-model", input=["a", "b c"] * 500)
    assert r.model == "tiny-model" and [d.index for d in r.data] == list(range(1000))
    assert r.data[1].embedding == r.data[3].embedding != r.data[0].embedding


def test_a_long_user_is_taken_as_this_route_stores_nothing(server):
    """Chat, completions and Responses bound `user` to 512 characters (a stored Responses answer
    keeps it); /v1/embeddings keeps nothing with it, and OpenAI's embeddings `user` has no bound:
    a string of any length is taken, and still no other type."""
    r = server.http.post(server.url + "/v1/embeddings", json={"input": "x", "user": "u" * 600}, timeout=30)
    assert r.status_code == 200, r.text[:300]


def test_request_id_is_the_answers_x_request_id(server):
    """docs/openai.md, /v1/embeddings: vLLM's request_id is the answer's X-Request-Id, as on chat."""
    r = server.http.post(server.url + "/v1/embeddings", json={"input": "x", "request_id": "emb-7"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "emb-7", dict(r.headers)
    other = server.http.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
    assert other.headers["x-request-id"] not in ("", "emb-7")


def test_embeddings_are_counted_by_status_and_leave_nothing_in_flight(server, client):
    """An embeddings request answered, or failed by the engine (an input beyond the context), is
    counted in agp_requests_total by its status and leaves agp_requests_in_flight at 0."""
    def count(status: str) -> float:
        return server.metric("agp_requests_total", f'{{status="{status}"}}', default=0.0)

    ok, refused = count("200"), count("400")
    client.embeddings.create(model="tiny", input=["a b", "c"])
    r = server.http.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "a b c d " * 600}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert (count("200"), count("400")) == (ok + 1, refused + 1)
    assert server.metric("agp_requests_in_flight") == 0


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_input_a_guard_answers_itself_is_a_400_with_its_words_and_the_others_are_embedded(tiny_gguf, where):
    """A python stage (a guard) that answers a request with words of its own, in the model's place
    or over the model's result, leaves that input with no embedding: the client gets a 400 with
    the guard's words, as a Reject's (was a 500, a server error); inputs it lets through, and other
    requests, are embedded."""
    from test_serve import TINY

    returns = "  returns = any" if where == "before" else ""            # a request in, an answer out
    guard = f'stage guard   : python        {{ fn = "flowkit:refuse_blocked"{returns} }}\n    stage out'
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=1).replace("stage out", guard)
    text = (text.replace("request -> batch", "request -> guard -> batch\n    guard -> out")
            if where == "before" else text.replace("kv -> gen -> out", "kv -> gen -> guard -> out"))
    s = LiveServer(tiny_gguf, text=text)
    try:
        for body, field in [({"input": "a blocked topic"}, "'input'"), ({"input": ["fine", "blocked"]}, "'input[1]'"),
                            ({"messages": [{"role": "user", "content": "blocked"}]}, "'messages'")]:
            r = s.http.post(s.url + "/v1/embeddings", json=body, timeout=60)
            assert r.status_code == 400, r.text[:300]
            err = r.json()["error"]
            assert err["code"] == "rejected" and err["type"] == "invalid_request_error", err
            assert err["param"] == ("messages" if "messages" in body else "input")
            assert field in err["message"] and "I can't help with that." in err["message"], err
        ok = s.http.post(s.url + "/v1/embeddings", json={"input": ["fine", "also fine"]}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2, ok.text[:300]
        assert s.metric("agp_requests_total", '{status="400"}') == 3
        assert s.metric("agp_requests_in_flight") == 0
    finally:
        s.close()


def test_a_client_gone_before_its_embeddings_aborts_them_and_logs_no_unretrieved_error(tiny_gguf, caplog):
    """An embeddings client that hangs up while its inputs wait: every input's request is aborted,
    nothing is left in flight, and the server logs no asyncio 'exception was never retrieved'
    (one per disconnect, with a traceback, would fill a day's log)."""
    import gc
    import logging

    s = LiveServer(tiny_gguf, batch_timeout_s=30.0)            # the inputs wait in the batch window
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        with pytest.raises(httpx.ReadTimeout):
            s.http.post(s.url + "/v1/embeddings", json={"input": ["a b", "c d", "e f"]}, timeout=0.5)
        st = s.stats_when(lambda st: st["requests_aborted"] == 3 and st["in_flight"] == 0)
        assert st["kv_blocks_used"] == 0 and st["waiting"] == 0
        assert s.metric("agp_requests_total", '{status="499"}') == 1
        # the server's loop has run what the abort left it (the cancelled work's ends) once it has
        # answered a request after it; an exception left unretrieved is reported when collected
        assert s.http.get(s.url + "/health", timeout=30).status_code == 200
        gc.collect()
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    finally:
        s.close()


def test_add_special_tokens_false_embeds_a_text_input_without_the_start_token(tmp_path):
    """vLLM's embeddings field, as on completions (default true): false leaves the tokenizer's
    start token off a text input; token-id inputs are taken as they are either way."""
    from tiny_model import write_tiny_gguf

    s = LiveServer(write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True), batch_timeout_s=0.001)
    try:
        def embed(**extra):
            r = s.http.post(s.url + "/v1/embeddings", json={"model": "tiny", "input": "the cat sat", **extra},
                           timeout=60)
            assert r.status_code == 200, r.text
            return torch.tensor(r.json()["data"][0]["embedding"]), r.json()["usage"]["prompt_tokens"]

        ids = s.http.post(s.url + "/tokenize", json={"prompt": "the cat sat"}, timeout=30).json()["tokens"]
        assert ids[0] == s.engine.tokenizer.bos_token_id
        (with_start, n), (left_out, _) = embed(), embed(add_special_tokens=True)
        without, m = embed(add_special_tokens=False)
        assert (n, m) == (len(ids), len(ids) - 1) and torch.equal(with_start, left_out)
        assert torch.allclose(with_start, expected(s, ids), atol=1e-4)
        assert torch.allclose(without, expected(s, ids[1:]), atol=1e-4)
        assert torch.allclose(embed(input=ids[1:], add_special_tokens=True)[0], without, atol=1e-5)
        r = s.http.post(s.url + "/v1/embeddings", json={"input": "x", "add_special_tokens": "no"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "add_special_tokens"
    finally:
        s.close()


def stage_before_batch(tmp_path, monkeypatch, tiny_gguf, module: str, source: str, fn: str) -> str:
    """The tiny serving pipeline with a python stage (`module`:`fn`, written from `source`) between
    its requests and its batcher."""
    from test_serve import TINY

    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=1).replace(
        "stage out     : respond       {}",
        f'stage out     : respond       {{}}\n    stage hook : python {{ fn = "{module}:{fn}" }}').replace(
        "request -> batch", "request -> hook -> batch")


GATE = '''
from pipeline_dsl import Reject


def gate(item):
    if item["headers"].get("x-tenant") != "acme":
        raise Reject(f"unknown tenant {item['headers'].get('x-tenant')!r}", status=403)
    if item.get("user") != "alice":
        raise Reject(f"unknown user {item.get('user')!r}", status=403)
    return item
'''


def test_an_embeddings_request_brings_its_user_and_request_headers_to_the_pipeline(tmp_path, monkeypatch,
                                                                                     tiny_gguf):
    """`user` and the headers `--request-headers` names reach a python stage from /v1/embeddings
    as from chat: a gate that keys on the tenant header and the end user lets a request that
    brings both through and refuses one that does not (it refused every embedding request, which
    carried neither, so a header-gated pipeline could not embed at all)."""
    text = stage_before_batch(tmp_path, monkeypatch, tiny_gguf, "gatehooks", GATE, "gate")
    s = LiveServer(tiny_gguf, text=text, request_headers=("x-tenant",))
    try:
        ok = httpx.post(s.url + "/v1/embeddings", headers={"X-Tenant": "acme"},
                        json={"input": ["a b", "c d"], "user": "alice"}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2, ok.text[:300]
        for headers, user, words in [({"X-Tenant": "acme"}, "mallory", "unknown user 'mallory'"),
                                     ({}, "alice", "unknown tenant None")]:
            r = httpx.post(s.url + "/v1/embeddings", headers=headers, json={"input": "a b", "user": user}, timeout=60)
            assert r.status_code == 403 and words in r.json()["error"]["message"], r.text[:300]
    finally:
        s.close()


def test_an_embeddings_body_is_checked_off_the_event_loop(server, monkeypatch):
    """Checking an embeddings body holds its loop for as long as its inputs take: 2048 inputs of
    token ids in a 4 MiB body take about 0.2 s, which on the event loop stalled every other stream
    and /health (chat's and completions' bodies are checked on request threads already). Both
    routes that embed, /v1/embeddings and /invocations, check it off the loop."""
    import threading

    from pipeline_dsl.serve.embeddings import Embeddings

    threads, parse = [], Embeddings.parse

    def parsed(self, body):
        threads.append(threading.current_thread())
        return parse(self, body)

    monkeypatch.setattr(Embeddings, "parse", parsed)
    for route in ("/v1/embeddings", "/invocations"):
        r = server.http.post(server.url + route, json={"model": "tiny", "input": [[1, 2, 3], "hi"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2
    assert len(threads) == 2 and server.thread not in threads


SEES = '''
from pipeline_dsl import Reject


def retrieve(item):
    if item.get("pooling") is not None:      # an input of /v1/embeddings or /v1/rerank: as it is
        raise Reject(f"pooled {item['pooling']} max_tokens={item['max_tokens']} prompt={item['prompt']!r}")
    item["messages"] = [{"role": "system", "content": "Passage: x"}] + item["messages"]
    return item
'''


def test_a_python_stage_tells_embeddings_and_rerank_inputs_by_their_pooling_field(tmp_path, monkeypatch,
                                                                                  tiny_gguf):
    """A retrieval stage before the batcher gets every input of /v1/embeddings and /v1/rerank too
    (docs/language.md): each as a Request whose `prompt` is the text, `max_tokens` 0 and `pooling`
    "mean", which is how a stage that rewrites chat prompts (or calls the server's own rerank)
    leaves them alone; a chat request has no `pooling`."""
    text = stage_before_batch(tmp_path, monkeypatch, tiny_gguf, "seehooks", SEES, "retrieve")
    s = LiveServer(tiny_gguf, text=text)
    try:
        r = httpx.post(s.url + "/v1/embeddings", json={"input": "a b"}, timeout=60)
        assert r.status_code == 400 and "pooled mean max_tokens=0 prompt='a b'" in r.json()["error"]["message"], r.text[:300]
        r = httpx.post(s.url + "/v1/rerank", json={"query": "q r", "documents": ["a b"]}, timeout=60)
        assert r.status_code == 400 and "pooled mean max_tokens=0 prompt=" in r.json()["error"]["message"], r.text[:300]
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text[:300]
    finally:
        s.close()


MAP_REDUCE = """
def split(item, passthrough=False):
    if passthrough and item.get("pooling") is not None:
        return [item]
    return [{"prompt": "part " + p} for p in item["prompt"].split("|")]


def merge(results, passthrough=False):
    if passthrough and len(results) == 1 and results[0]["request"].get("pooling") is not None:
        return 0
    return {"text": " ".join(r["text"] for r in results)}
"""


@pytest.mark.parametrize("passthrough", [False, True])
def test_an_input_through_a_map_reduce_is_embedded_when_its_stages_pass_it_through(tmp_path, monkeypatch,
                                                                                   tiny_gguf, passthrough):
    """A returns = many stage and its join: the join's fn makes a new answer of an embedding input's
    branch, and the 400 says what to do (the join returns the branch's index, the split [item]);
    done so, the input is embedded."""
    from test_serve import TINY

    (tmp_path / "mr.py").write_text(MAP_REDUCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = "  args = {passthrough = true}" if passthrough else ""
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=1).replace(
        "stage out     : respond       {}",
        "stage out     : respond       {}\n"
        f'    stage split : python {{ fn = "mr:split"  returns = many{args} }}\n'
        f'    stage collect : join {{ fn = "mr:merge"{args} }}').replace(
        "request -> batch", "request -> split -> batch").replace("gen -> out", "gen -> collect -> out")
    s = LiveServer(tiny_gguf, text=text)
    try:
        r = s.http.post(s.url + "/v1/embeddings", json={"input": "a|b"}, timeout=60)
        if passthrough:
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 0, r.text[:300]
        else:
            assert r.status_code == 400, r.text[:300]
            message = r.json()["error"]["message"]
            assert "a join's fn merged its branches into an answer of its own" in message, message
            assert "returns the branch's index, 0" in message
    finally:
        s.close()


ROUTED = """
pipeline routed {{
    stage request : requests {{}}
    stage route   : route {{}}
    stage bs : dynamic_batch {{ timeout = 1ms }}
    stage es : encode {{}}
    stage ks : kv_lookup {{}}
    stage small : generate {{ model = "{small}"  max_new_tokens = 4 }}
    stage bl : dynamic_batch {{ timeout = 1ms }}
    stage el : encode {{}}
    stage kl : kv_lookup {{}}
    stage big : generate {{ model = "{big}"  max_new_tokens = 4 }}
    stage out : respond {{}}
    request -> route
    route -> bl when prompt_tokens > 20
    route -> bs otherwise
    bs -> es -> ks -> small -> out
    bl -> el -> kl -> big -> out
}}
"""


def test_inputs_a_route_sends_to_models_of_different_widths_are_a_400_naming_the_fix(tmp_path, tiny_gguf):
    """One answer's vectors are compared with each other (a rerank compares them itself): inputs
    that a pipeline's route sends to two models (short ones to a small model, long ones to a
    bigger) cannot be, so the request is a 400 naming the two stages and the fix, `model` naming
    one generate stage (was a list of vectors of two lengths, and a rerank's 500)."""
    from tiny_model import write_tiny_gguf

    big = write_tiny_gguf(tmp_path / "big.gguf", hidden=128, ffn=256, seed=1)
    s = LiveServer(tiny_gguf, text=ROUTED.format(small=tiny_gguf, big=big), stages=("small", "big"))
    long = "the cat is on the mat and the cat is here " * 4
    try:
        for route, body, fields in [
                ("/v1/embeddings", {"input": ["hi", long]}, ("'input[0]'", "'input[1]'")),
                ("/v1/rerank", {"query": "hi", "documents": [long, "yo"]}, ("'query'", "'documents[0]'")),
                ("/v1/score", {"text_1": "hi", "text_2": long}, ("'text_1'", "'text_2'"))]:
            r = s.http.post(s.url + route, json=body, timeout=60)
            assert r.status_code == 400, (route, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert (err["param"], err["code"], err["type"]) == ("model", "mixed_models", "invalid_request_error")
            assert err["message"].startswith(f"{fields[0]} and {fields[1]} were embedded by different models "
                                             "(generate stage 'small', 64 dimensions; generate stage 'big', "
                                             "128 dimensions)"), err["message"]
            pinned = s.http.post(s.url + route, json={**body, "model": "big"}, timeout=60)
            assert pinned.status_code == 200, pinned.text[:300]
        data = s.http.post(s.url + "/v1/embeddings", json={"input": ["hi", long], "model": "small"},
                           timeout=60).json()["data"]
        assert [len(d["embedding"]) for d in data] == [64, 64]
        assert s.metric("agp_requests_total", '{status="500"}', default=0) == 0
    finally:
        s.close()
