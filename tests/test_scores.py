"""POST /v1/score (/score) and /v1/rerank (/rerank, /v2/rerank), vLLM's scoring routes, against an
`agp serve` app on the tiny model: a score is the cosine similarity of the two texts' embeddings,
each exactly what /v1/embeddings answers for the text; rerank puts the documents best first and
keeps top_n; bad input is a 400 naming the field; the requests are counted as embeddings' are.
"""
from __future__ import annotations

import pytest
import torch

from test_serve import TINY, LiveServer

DOCS = ["the cat sat on the mat", "a dog ran in the park", "the cat is here", "numbers one two three"]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


def post(server, path, body, status=200):
    r = server.http.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text[:400]
    return r.json()


def embedded(server, texts) -> list[torch.Tensor]:
    out = post(server, "/v1/embeddings", {"model": "tiny", "input": texts, "encoding_format": "float"})
    return [torch.tensor(d["embedding"], dtype=torch.float64) for d in out["data"]]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_a_score_is_the_cosine_of_the_texts_embeddings(server, path):
    """One text_1 against each text_2, and text_1[i] against text_2[i]: each score the cosine of the
    two texts' /v1/embeddings vectors; usage counts every text's tokens."""
    vec = dict(zip(DOCS + ["where is the cat"], embedded(server, DOCS + ["where is the cat"])))
    one = post(server, path, {"model": "tiny", "text_1": "where is the cat", "text_2": DOCS})
    assert one["object"] == "list" and one["model"] == "tiny" and one["id"].startswith("score-")
    assert [d["index"] for d in one["data"]] == [0, 1, 2, 3] and {d["object"] for d in one["data"]} == {"score"}
    for d, doc in zip(one["data"], DOCS):
        assert d["score"] == pytest.approx(cos(vec["where is the cat"], vec[doc]), abs=1e-5)
    assert len({round(d["score"], 6) for d in one["data"]}) == 4          # not one number for every pair
    pairs = post(server, path, {"text_1": DOCS[:2], "text_2": DOCS[2:]})
    assert [d["score"] for d in pairs["data"]] == pytest.approx([cos(vec[DOCS[0]], vec[DOCS[2]]),
                                                                 cos(vec[DOCS[1]], vec[DOCS[3]])], abs=1e-5)
    single = post(server, path, {"text_1": DOCS[0], "text_2": DOCS[0]})
    assert [d["score"] for d in single["data"]] == pytest.approx([1.0], abs=1e-5)
    tokens = post(server, "/v1/embeddings", {"input": DOCS[:2] + DOCS[2:]})["usage"]["prompt_tokens"]
    assert pairs["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}   # vLLM's UsageInfo


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_puts_the_documents_best_first_and_keeps_top_n(server, path):
    query = "where is the cat"
    vecs = embedded(server, [query] + DOCS)
    want = sorted(range(len(DOCS)), key=lambda i: -cos(vecs[0], vecs[i + 1]))
    out = post(server, path, {"model": "tiny", "query": query, "documents": DOCS})
    assert out["model"] == "tiny" and out["id"].startswith("rerank-") and out["usage"]["total_tokens"] > 0
    assert [r["index"] for r in out["results"]] == want
    for r in out["results"]:
        assert r["relevance_score"] == pytest.approx(cos(vecs[0], vecs[r["index"] + 1]), abs=1e-5)
        assert r["document"] == {"text": DOCS[r["index"]]}
    scores = [r["relevance_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    top = post(server, path, {"query": query, "documents": [{"text": d} for d in DOCS], "top_n": 2,
                              "return_documents": False, "max_tokens_per_doc": None})   # langchain-cohere's
    assert [r["index"] for r in top["results"]] == want[:2] and all("document" not in r for r in top["results"])
    every = post(server, path, {"query": query, "documents": DOCS, "top_n": 10})
    assert [r["index"] for r in every["results"]] == want
    every = post(server, path, {"query": query, "documents": DOCS, "top_n": 0})    # vLLM's "every document"
    assert [r["index"] for r in every["results"]] == want


@pytest.mark.parametrize("path, body, param", [
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q"}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", ""]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 5]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "a", "title": "t"}]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": "a"}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": ["q"], "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": [f"a{i}" for i in range(1024)]}, "documents"),   # 1025 texts: more than the queue
    ("/v1/score", {"text_1": [f"a{i}" for i in range(600)], "text_2": [f"b{i}" for i in range(600)]}, "text_2"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["x"]}, "rank_fields"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 4096}, "max_tokens_per_doc"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
    ("/v1/score", {"text_1": "a", "text_2": []}, "text_2"),
    ("/v1/score", {"text_2": "a"}, "text_1"),
    ("/v1/score", {"text_1": "a", "text_2": ["b", ""]}, "text_2"),
    ("/v1/score", {"text_1": [1, 2], "text_2": "b"}, "text_1"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "user": 5}, "user"),
])
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    err = post(server, path, body, 400)["error"]
    assert err["param"] == param, err


def test_an_unknown_model_is_a_404_and_a_text_beyond_the_context_names_its_place(server):
    assert post(server, "/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404)["error"]["param"] == "model"
    err = post(server, "/v1/rerank", {"query": "q", "documents": ["a", "a b c d " * 600]}, 400)["error"]
    assert err["param"] == "documents" and "'documents[1]'" in err["message"], err
    err = post(server, "/v1/score", {"text_1": "a b c d " * 600, "text_2": ["a"]}, 400)["error"]
    assert err["param"] == "text_1" and "'text_1'" in err["message"], err
    # a text given twice before it (embedded once) does not move the place named
    err = post(server, "/v1/rerank", {"query": "a", "documents": ["a", "a", "a b c d " * 600]}, 400)["error"]
    assert err["param"] == "documents" and "'documents[2]'" in err["message"], err
    # past what any tokenisation fits by its characters alone: refused as it is queued, named the same
    longest = server.runtime.segments[0].max_prompt_chars
    err = post(server, "/v1/rerank", {"query": "q", "documents": ["a", "a " * longest]}, 400)["error"]
    assert err["param"] == "documents" and err["message"].startswith("'documents[1]': prompt of "), err


def test_a_request_of_more_texts_than_the_queue_holds_says_how_many_and_the_limit(server):
    err = post(server, "/v1/rerank", {"query": "q", "documents": [f"a{i}" for i in range(1024)]}, 400)["error"]
    assert "'query' and 'documents' make 1025 texts" in err["message"] and "at most 1024" in err["message"], err
    # the queue holds the distinct texts, each embedded once: the same document 1024 times fits
    assert len(post(server, "/v1/rerank", {"query": "q", "documents": ["a"] * 1024})["results"]) == 1024
    err = post(server, "/v1/rerank", {"query": "q", "documents": ["a"] * 2048}, 400)["error"]
    assert "make 2049 texts" in err["message"] and "at most 2048 a request" in err["message"], err
    err = post(server, "/v1/rerank", {"query": "q", "documents": ["a", 5]}, 400)["error"]
    assert "'documents[1]'" in err["message"], err


def test_scoring_routes_want_the_api_key_and_its_refusals_are_counted(tiny_gguf):
    s = LiveServer(tiny_gguf, api_keys=("k1",))
    try:
        for path, body in [("/v1/rerank", {"query": "q", "documents": ["a"]}), ("/v2/rerank", {"query": "q",
                           "documents": ["a"]}), ("/score", {"text_1": "q", "text_2": "a"})]:
            assert s.http.post(s.url + path, json=body, timeout=60).status_code == 401
            r = s.http.post(s.url + path, json=body, headers={"Authorization": "Bearer k1"}, timeout=60)
            assert r.status_code == 200, r.text[:300]
        assert s.metric("agp_requests_total", '{status="401"}') == 3
        assert s.metric("agp_requests_total", '{status="200"}') == 3
    finally:
        s.close()


def test_scoring_requests_are_counted_by_status_and_leave_nothing_in_flight(server):
    def count(status: str) -> float:
        return server.metric("agp_requests_total", f'{{status="{status}"}}', default=0.0)

    ok, refused = count("200"), count("400")
    post(server, "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    post(server, "/v1/score", {"text_1": "q", "text_2": "a"})
    post(server, "/v2/rerank", {"query": "q", "documents": []}, 400)             # refused before the pipeline
    post(server, "/score", {"text_1": "q", "text_2": "a b c d " * 600}, 400)    # failed by the engine
    assert (count("200"), count("400")) == (ok + 2, refused + 2)
    assert server.metric("agp_requests_in_flight") == 0


def test_a_long_user_is_taken_as_these_routes_store_nothing(server):
    """/v1/score and /v1/rerank keep nothing with `user` (as /v1/embeddings): a string of any
    length is taken, where chat's and Responses' are bounded to 512 characters."""
    post(server, "/v1/score", {"text_1": "q", "text_2": "a", "user": "u" * 600})
    post(server, "/v1/rerank", {"query": "q", "documents": ["a"], "user": "u" * 600})


def test_request_id_is_the_answers_x_request_id_and_its_id(server):
    r = server.http.post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a"], "request_id": "rr-1",
                                                          "user": "alice"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "rr-1" and r.json()["id"] == "rerank-rr-1"


def test_a_text_the_pipeline_answers_with_words_is_a_400_naming_its_field(tiny_gguf):
    """A pipeline whose python stage answers a text with words of its own, instead of the model's
    embedding, cannot score it: a 400 with code rejected naming the text's field and place."""
    guard = 'stage guard   : python        { fn = "flowkit:refuse_blocked" }\n    stage out'
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace("stage out", guard)
    s = LiveServer(tiny_gguf, text=text.replace("kv -> gen -> out", "kv -> gen -> guard -> out"))
    try:
        err = post(s, "/v1/rerank", {"query": "q", "documents": ["fine", "blocked"]}, 400)["error"]
        assert err["code"] == "rejected" and err["param"] == "documents" and "'documents[1]'" in err["message"], err
        err = post(s, "/v1/score", {"text_1": "blocked", "text_2": ["a", "b"]}, 400)["error"]
        assert err["param"] == "text_1" and "'text_1'" in err["message"], err
        assert len(post(s, "/v1/rerank", {"query": "q", "documents": ["fine", "also"]})["results"]) == 2
        assert s.metric("agp_requests_in_flight") == 0
    finally:
        s.close()


def test_rerank_keeps_the_documents_order_among_equal_scores(server):
    """The same document given twice scores the same: the one given first comes first (vLLM's
    stable sort), whatever else is in the list."""
    docs = ["a dog ran in the park", "the cat sat on the mat", "numbers one two three", "the cat sat on the mat",
            "a dog ran in the park"]
    out = post(server, "/v1/rerank", {"query": "where is the cat", "documents": docs})
    order = [r["index"] for r in out["results"]]
    for first, again in ((0, 4), (1, 3)):
        assert order.index(first) < order.index(again), order
        scores = {r["index"]: r["relevance_score"] for r in out["results"]}
        assert scores[first] == scores[again]


def test_a_text_given_twice_is_embedded_once_and_counted_twice(server):
    """Equal texts in one call (a document repeated, the query among the documents, a text_1
    among the text_2) are embedded once: the pipeline sees each distinct text once, the answer is
    the one the texts given once get, and usage counts every text given, as vLLM's (which embeds
    each)."""
    def embedded_now() -> int:
        return server.stats()["stages"]["gen"]["items_in"]

    query, docs = "where is the cat", [DOCS[0], DOCS[1], DOCS[0], "where is the cat", DOCS[1]]
    once = post(server, "/v1/rerank", {"query": query, "documents": DOCS[:2]})
    before = embedded_now()
    out = post(server, "/v1/rerank", {"query": query, "documents": docs})
    assert embedded_now() - before == 3                                       # the query, DOCS[0], DOCS[1]
    scores = {r["index"]: r["relevance_score"] for r in out["results"]}
    want = {r["index"]: r["relevance_score"] for r in once["results"]}
    assert [scores[0], scores[1], scores[2], scores[4]] == [want[0], want[1], want[0], want[1]]
    assert scores[3] == pytest.approx(1.0, abs=1e-6)
    tokens = post(server, "/v1/embeddings", {"input": [query] + docs})["usage"]["prompt_tokens"]
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    before = embedded_now()
    pairs = post(server, "/v1/score", {"text_1": [DOCS[0], DOCS[0], DOCS[1]], "text_2": [DOCS[1], DOCS[2], DOCS[0]]})
    assert embedded_now() - before == 3
    alone = post(server, "/v1/score", {"text_1": DOCS[0], "text_2": [DOCS[1], DOCS[2]]})
    assert [d["score"] for d in pairs["data"]] == [alone["data"][0]["score"], alone["data"][1]["score"],
                                                   alone["data"][0]["score"]]
    tokens = post(server, "/v1/embeddings", {"input": [DOCS[0], DOCS[0], DOCS[1], DOCS[1], DOCS[2], DOCS[0]]})
    assert pairs["usage"]["prompt_tokens"] == tokens["usage"]["prompt_tokens"]


def test_cosines_of_a_zero_vector_are_zero():
    """A pair with an all-zero vector (no direction) scores 0, never nan or 1; the others are
    their cosines, each vector's norm its own."""
    from pipeline_dsl.serve.scores import cosines
    got = cosines([[0.0, 0.0], [3.0, 4.0], [4.0, 3.0], [-3.0, -4.0]], [(0, 1), (1, 0), (0, 0), (1, 2), (1, 3), (2, 2)])
    assert got == pytest.approx([0.0, 0.0, 0.0, 24 / 25, -1.0, 1.0])
