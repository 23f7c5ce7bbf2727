"""POST /invocations, SageMaker's one inference route, as vLLM serves it beside /ping (which agp
served already): the body's shape picks the API — 'messages' a chat completion, 'prompt' a
completion, 'input' an embedding, 'query' and 'documents' a rerank, 'text_1' and 'text_2' a score —
and the answer is that API's, streamed too; a body that holds none of them is a 400 naming what the
route takes."""
from __future__ import annotations

import json

import pytest

from test_serve import LiveServer


@pytest.fixture(scope="module")
def live(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


def invoke(live, body, **kw):
    return live.http.post(live.url + "/invocations", json=body, timeout=60, **kw)


def test_the_body_picks_the_api(live):
    chat = invoke(live, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "chat.completion" and chat.json()["usage"]["completion_tokens"] == 2
    text = invoke(live, {"prompt": ["a", "b"], "max_tokens": 2})
    assert text.status_code == 200, text.text
    assert text.json()["object"] == "text_completion" and len(text.json()["choices"]) == 2
    emb = invoke(live, {"input": ["a", "b"], "model": "tiny"})
    assert emb.status_code == 200, emb.text
    assert emb.json()["object"] == "list" and [d["object"] for d in emb.json()["data"]] == ["embedding"] * 2
    # as on its own route: the answer the API gives the same body
    same = live.http.post(live.url + "/v1/embeddings", json={"input": ["a", "b"], "model": "tiny"}, timeout=60)
    assert same.json()["data"] == emb.json()["data"]


def test_rerank_and_score_bodies_are_answered_as_on_their_routes(live):
    """vLLM's /invocations tries RerankRequest and ScoreRequest after the generation and embedding
    requests: a rerank body gets /v1/rerank's answer, a score body /v1/score's."""
    docs = ["the cat sat", "a dog ran", "the cat is here"]
    rerank = {"model": "tiny", "query": "where is the cat", "documents": docs, "top_n": 2}
    got = invoke(live, rerank)
    assert got.status_code == 200, got.text
    want = live.http.post(live.url + "/v1/rerank", json=rerank, timeout=60).json()
    assert got.json()["results"] == want["results"] and len(want["results"]) == 2
    assert got.json()["id"].startswith("rerank-")
    score = {"model": "tiny", "text_1": "where is the cat", "text_2": docs}
    got = invoke(live, score)
    assert got.status_code == 200, got.text
    want = live.http.post(live.url + "/v1/score", json=score, timeout=60).json()
    assert got.json()["data"] == want["data"] and got.json()["usage"] == want["usage"]
    # one of the two fields picks the API, whose own check names the other
    half = invoke(live, {"query": "where is the cat"})
    assert half.status_code == 400 and half.json()["error"]["param"] == "documents", half.text
    half = invoke(live, {"text_2": docs})
    assert half.status_code == 400 and half.json()["error"]["param"] == "text_1", half.text


def test_a_streamed_chat_is_the_chat_routes_stream(live):
    with live.http.stream("POST", live.url + "/invocations", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert {json.loads(ln)["object"] for ln in lines[:-1]} == {"chat.completion.chunk"}


def test_a_body_of_no_api_is_a_400_naming_what_the_route_takes(live):
    r = invoke(live, {"model": "tiny", "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unknown_request_type"
    assert ("'messages' (chat completions), 'prompt' (completions), 'input' (embeddings), 'query' and 'documents' "
            "(rerank) or 'text_1' and 'text_2' (score)") in err["message"]
    bad = invoke(live, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "guided_jsn": {}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_jsn"     # the chat route's checks
