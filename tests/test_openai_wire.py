"""What an OpenAI or vLLM client reads off the wire of `agp serve`, checked on the raw HTTP
answers (httpx) and through the official `openai` client against a live server on the tiny
random model: the shape of each streamed choice, the usage an answer reports, the ids and
headers that name it, the errors a client branches on.
"""
from __future__ import annotations

import json
import re

import pytest

from test_serve import LiveServer

USER = [{"role": "user", "content": "the cat and the world"}]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(tiny_gguf):
    """A server that wants one of two API keys (--api-key given twice), for the tests of the key
    guard; each reads the counters it checks as they move during it. Its tests come last: a module's
    servers stay up until its end, and an idle engine still wakes every few milliseconds."""
    s = LiveServer(tiny_gguf, api_keys=("first-key", "second-key"))
    yield s
    s.close()


def events(server, path: str, body: dict, headers: dict | None = None) -> list:
    """The `data:` payloads of a streamed answer, in order: JSON objects, and "[DONE]" as a string."""
    with server.http.stream("POST", server.url + path, json={"model": "tiny", **body, "stream": True},
                            headers=headers or {}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_every_streamed_chat_choice_opens_with_the_assistant_role_once(server):
    """OpenAI's chat stream: the first chunk of each choice is `{"role": "assistant", "content": ""}`
    (clients take the role from it), and no later chunk of that choice names a role again; with
    n = 3 every choice, not only the first to start."""
    chunks = events(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 4, "n": 3, "temperature": 1.0,
                                                     "seed": 5})
    assert chunks[-1] == "[DONE]"
    by_choice: dict[int, list] = {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            by_choice.setdefault(choice["index"], []).append(choice)
    assert sorted(by_choice) == [0, 1, 2]
    for index, choices in by_choice.items():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}, (index, choices[0])
        assert not any("role" in c["delta"] for c in choices[1:]), index


@pytest.mark.parametrize("echo", [False, True])
def test_a_streamed_choices_text_offsets_are_its_own_and_those_of_its_whole_answer(server, echo):
    """Completions `logprobs.text_offset` streamed with n = 2 (and echo): each choice's offsets run
    through its own text, after its echoed prompt, as the answer that does not stream says; a
    client cutting each choice's text at them gets the tokens back."""
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 5, "n": 2, "logprobs": 1, "temperature": 1.0,
            "seed": 11, "ignore_eos": True, "echo": echo}
    whole = server.http.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    chunks = events(server, "/v1/completions", body)
    streamed: dict[int, dict] = {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            got = streamed.setdefault(choice["index"], {"text": "", "tokens": [], "text_offset": []})
            got["text"] += choice["text"]
            if choice["logprobs"]:
                got["tokens"] += choice["logprobs"]["tokens"]
                got["text_offset"] += choice["logprobs"]["text_offset"]
    assert sorted(streamed) == [0, 1]
    for choice in whole:
        got = streamed[choice["index"]]
        assert got["text"] == choice["text"]
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert got["text_offset"] == choice["logprobs"]["text_offset"], choice["index"]


def test_continuous_usage_of_a_batch_of_prompts_counts_each_prompts_own_tokens(server):
    """vLLM's continuous_usage_stats on a completions batch of two prompts, n = 2 each: every
    chunk's completion_tokens are the token ids sent so far, its prompt_tokens never go down and
    end as the two prompts' sum, and its last chunk agrees with the usage chunk."""
    prompts = ["hey", "the cat sat on the mat"]
    sizes = [server.http.post(server.url + "/tokenize", json={"prompt": p}, timeout=30).json()["count"]
             for p in prompts]
    chunks = events(server, "/v1/completions", {
        "prompt": prompts, "max_tokens": 3, "n": 2, "ignore_eos": True, "return_token_ids": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    *streamed, final, done = chunks
    assert done == "[DONE]" and final["choices"] == []
    sent, prompt_seen = 0, []
    for c in streamed:
        sent += sum(len(choice.get("token_ids") or ()) for choice in c["choices"])
        assert c["usage"]["completion_tokens"] == sent, (c, sent)
        prompt_seen.append(c["usage"]["prompt_tokens"])
    assert sent == 2 * 2 * 3 and prompt_seen == sorted(prompt_seen) and prompt_seen[-1] == sum(sizes)
    assert final["usage"]["prompt_tokens"] == sum(sizes) and final["usage"]["completion_tokens"] == sent


@pytest.mark.parametrize("words", [300, 100_000])    # over the context's tokens; over its characters too
def test_the_item_of_a_list_input_over_the_context_is_named_by_its_place(server, words):
    """A completions batch (`prompt: [...]`) or an embeddings list (`input: [...]`) one of whose
    texts is over the context: the 400 names that item (`'prompt[1]'`, `'input[1]'`, as a list of
    token ids too long was named), so a client of a batch knows which to cut; it said only
    "prompt of N tokens exceeds the model's context", whichever it was. A lone prompt is not numbered."""
    import openai

    long = "hello " * words
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="tiny", prompt=["hi", long, "there"], max_tokens=2)
    assert e.value.body["message"].startswith("'prompt[1]': prompt of "), e.value.body
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.embeddings.create(model="tiny", input=["hi", "there", long])
    assert e.value.body["message"].startswith("'input[2]': prompt of "), e.value.body
    assert e.value.code == "context_length_exceeded" and e.value.param == "input"
    for call in (lambda: server.client.completions.create(model="tiny", prompt=long, max_tokens=2),
                 lambda: server.client.embeddings.create(model="tiny", input=long)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["message"].startswith("prompt of ") and e.value.code == "context_length_exceeded"
    # streamed: refused before its first chunk, or an error event after the other prompts' chunks
    with server.http.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": ["hi", long], "max_tokens": 2, "stream": True}) as r:
        said = r.read().decode()
    assert "'prompt[1]': " in said, said[:500]


def test_a_python_stage_that_answers_itself_answers_each_of_n_choices(tiny_gguf):
    """A guard before the model that answers a request itself (no generate stage on its path),
    asked for n = 3: each of the 3 choices is its answer (the stage runs once; a model at
    temperature 0 answers n times alike), streamed or not, chat and completions; it gave one
    choice, and a client reading choices[2] failed. Requests it lets through get the model's n."""
    from test_serve import TINY

    guard = 'stage guard   : python        { fn = "flowkit:refuse_blocked"  returns = any }\n    stage out'
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace("stage out", guard, 1)
    text = text.replace("request -> batch", "request -> guard -> batch\n    guard -> out")
    s = LiveServer(tiny_gguf, text=text)
    try:
        said = "I can't help with that."
        blocked = [{"role": "user", "content": "a blocked topic"}]
        out = s.client.chat.completions.create(model="tiny", messages=blocked, n=3, max_tokens=4)
        assert [(c.index, c.message.content, c.finish_reason) for c in out.choices] == [
            (k, said, "content_filter") for k in range(3)]
        chunks = list(s.client.chat.completions.create(model="tiny", messages=blocked, n=3, max_tokens=4, stream=True))
        texts: dict[int, str] = {}
        for c in chunks:
            for choice in c.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        assert texts == {0: said, 1: said, 2: said}
        done = s.client.completions.create(model="tiny", prompt="blocked", n=2, max_tokens=4)
        assert [(c.index, c.text) for c in done.choices] == [(0, said), (1, said)]
        assert len(s.client.chat.completions.create(model="tiny", messages=blocked, max_tokens=4).choices) == 1
        passed = s.client.chat.completions.create(model="tiny", messages=USER, n=3, max_tokens=2)
        assert len(passed.choices) == 3 and passed.usage.completion_tokens == 6
    finally:
        s.close()


def test_a_generate_stage_named_as_the_pipeline_is_listed_once(tiny_gguf):
    """GET /v1/models lists each id once: a generate stage that has the pipeline's (served) name is
    that name's entry, not a second one of the same id."""
    from test_serve import TINY

    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20)
    text = text.replace("stage gen     :", "stage tiny    :").replace("kv -> gen -> out", "kv -> tiny -> out")
    s = LiveServer(tiny_gguf, text=text, stages=("tiny",))
    try:
        ids = [m["id"] for m in s.http.get(s.url + "/v1/models", timeout=30).json()["data"]]
        assert sorted(ids) == ["tiny", "tiny-model"], ids
    finally:
        s.close()


def test_the_prompt_tokens_the_cache_served_are_counted_as_the_answers_say(server):
    """agp_prompt_tokens_cached moves by the cached_tokens each answer reports: a prompt sent twice
    is served from the prefix cache the second time, and the counter says so."""
    body = {"model": "tiny", "prompt": "a prompt long enough to fill a block of the cache twice over", "max_tokens": 2}
    server.http.post(server.url + "/v1/completions", json=body, timeout=60)
    before = server.metric("agp_prompt_tokens_cached_total")
    again = server.http.post(server.url + "/v1/completions", json=body, timeout=60).json()
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert server.metric("agp_prompt_tokens_cached_total") == before + cached


def test_an_embedding_input_the_engine_refuses_is_a_400_naming_input(server):
    """An embeddings input too long for the context once tokenised fails in the engine: the 400
    names `input` (the field the client sent), not a completions request's `prompt`."""
    r = server.http.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "a b c d " * 600}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "input", r.json()


def test_prompt_logprobs_list_their_own_number_beside_more_logprobs(server):
    """vLLM's prompt_logprobs = 2 beside echo with logprobs = 5: each prompt position lists its own
    token and the 2 most likely (ranks 1 and 2), not the 5 the echoed logprobs list."""
    body = {"model": "tiny", "prompt": "the cat sat on the mat", "max_tokens": 0, "echo": True, "logprobs": 5,
            "prompt_logprobs": 2}
    choice = server.http.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert max(len(t) for t in choice["logprobs"]["top_logprobs"][1:]) > 3          # 5 alternatives (and its own)
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) > 2
    for entry in entries[1:]:
        assert len(entry) in (2, 3), entry
        assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2]


def test_a_batch_of_prompts_through_a_fan_out_gives_each_choice_its_own_index(tmp_path, tiny_gguf):
    """A fan-out to two generate stages (n = 1 and n = 2) answers each prompt of a completions
    batch with three choices, more than the largest n that numbered them: the first prompt's third
    choice shared index 2 with the second prompt's first, and a stream interleaved their text on it.
    Each index is now one choice's, whole and streamed alike, each streamed text on its own prompt."""
    import argparse

    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments
    from test_run_batch_api import FAN

    path = tmp_path / "fan.agp"
    path.write_text(FAN.format(model=tiny_gguf))
    p = argparse.ArgumentParser()
    add_arguments(p)
    serving = build(p.parse_args([str(path), "--threads", "1"]))
    body = {"prompt": ["once upon", "the end"], "temperature": 0, "echo": True}
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            whole = client.post("/v1/completions", json=body)
            assert whole.status_code == 200, whole.text
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        serving.runtime.close()
    choices = whole.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    streamed: dict[int, str] = {}
    for line in lines[:-1]:
        for c in json.loads(line)["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == {c["index"]: c["text"] for c in choices}
    prompt_of = {0: "once upon", 1: "once upon", 2: "the end", 3: "the end", 4: "once upon", 5: "the end"}
    assert all(streamed[i].startswith(p) for i, p in prompt_of.items()), streamed


def test_each_of_several_api_keys_lets_a_client_in(keyed):
    """--api-key given twice (a key per client, or an old and a new one while keys rotate): either
    key is let in, on a streamed answer too; any other is a 401."""
    s = keyed
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for key in ("first-key", "second-key"):
        auth = {"Authorization": f"Bearer {key}"}
        assert s.http.post(s.url + "/v1/completions", json=body, headers=auth, timeout=60).status_code == 200, key
        assert events(s, "/v1/completions", body, headers=auth)[-1] == "[DONE]"
    r = s.http.post(s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer third-key"}, timeout=60)
    assert r.status_code == 401


def test_a_refused_key_is_counted_on_generation_routes_only(keyed):
    """docs/serve.md, "Metrics": agp_requests_total counts generation requests, a 401 of the
    --api-key guard among them; a 401 on a route that generates nothing (POST /tokenize, a GET
    of /v1/models) leaves the count as it was, as that route's other answers do."""
    s = keyed

    def refused() -> float:
        return s.metric("agp_requests_total", '{status="401"}', default=0.0)

    before = refused()                       # the server's earlier tests' refusals
    assert s.http.post(s.url + "/tokenize", json={"model": "tiny", "prompt": "hi"}, timeout=60).status_code == 401
    assert s.http.get(s.url + "/v1/models", timeout=60).status_code == 401
    assert refused() == before
    r = s.http.post(s.url + "/v1/chat/completions", timeout=60,
                    json={"model": "tiny", "messages": USER, "max_tokens": 2})
    assert r.status_code == 401 and refused() == before + 1


def test_azure_openais_client_is_let_in_with_its_api_key_header_and_served_at_its_deployment_routes(keyed):
    """openai.AzureOpenAI sends the key as `api-key: KEY` (not `Authorization: Bearer`) and calls
    /openai/deployments/{deployment}/chat/completions?api-version=...: with --api-key set it was a
    401, and its routes 404s. The key is taken from either header on every route that wants one,
    streams included; the deployment is the model that answers (a generate stage too, whatever
    the body's `model`); Azure's routes agp does not serve are 404s naming those it does and /v1."""
    import openai

    s = keyed
    refused_before = s.metric("agp_requests_total", '{status="401"}', default=0.0)   # the earlier tests'
    http = openai.DefaultHttpxClient(verify=False)
    try:
        azure = openai.AzureOpenAI(azure_endpoint=s.url, api_key="second-key", api_version="2024-10-21",
                                   max_retries=0, timeout=60, http_client=http)
        out = azure.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        assert out.model == "tiny" and out.choices[0].message.content is not None
        streamed = azure.chat.completions.create(model="tiny", messages=USER, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True})
        assert [c.usage.completion_tokens for c in streamed if c.usage] == [3]
        assert azure.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert len(azure.embeddings.create(model="tiny", input=["a", "b"]).data) == 2
        pinned = openai.AzureOpenAI(azure_endpoint=s.url, azure_deployment="gen", api_key="first-key",
                                    api_version="2024-10-21", max_retries=0, timeout=60, http_client=http)
        assert pinned.chat.completions.create(model="not-served", messages=USER, max_tokens=2).model == "gen"
        with pytest.raises(openai.NotFoundError) as missing:
            azure.chat.completions.create(model="nope", messages=USER, max_tokens=2)
        assert missing.value.body["param"] == "model" and "the model 'nope' does not exist" in missing.value.message
        with pytest.raises(openai.NotFoundError) as other:
            azure.models.list()
        assert "Azure OpenAI's" in other.value.message and "http://HOST:PORT/v1" in other.value.message
        wrong = openai.AzureOpenAI(azure_endpoint=s.url, api_key="third-key", api_version="2024-10-21",
                                   max_retries=0, timeout=60, http_client=http)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert "'api-key: KEY'" in refused.value.message
        # the header alone, on /v1's routes and a stream of them
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert s.http.post(s.url + "/v1/completions", json=body, headers={"api-key": "first-key"},
                           timeout=60).status_code == 200
        assert events(s, "/v1/completions", body, headers={"api-key": "first-key"})[-1] == "[DONE]"
        assert s.http.get(s.url + "/v1/models", headers={"api-key": "first-key"}, timeout=60).status_code == 200
        assert s.http.get(s.url + "/v1/models", headers={"api-key": "other"}, timeout=60).status_code == 401
        assert s.metric("agp_requests_total", '{status="401"}') == refused_before + 1   # the Azure route's refusal
    finally:
        http.close()


def test_a_detokenize_token_outside_the_vocabulary_is_a_400_naming_tokens(server):
    """/detokenize of an id the model's vocabulary does not hold: a 400 whose `param` is the
    request's own field, `tokens` (the body has no `prompt` a client could fix)."""
    r = server.http.post(server.url + "/detokenize", json={"model": "tiny", "tokens": [5, 10 ** 6]}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tokens" and "outside the vocabulary" in err["message"], err


def test_detokenize_takes_the_vocabularys_last_id_and_refuses_the_one_past_it(server):
    """The vocabulary's ids are 0..size - 1, as the refusal says: the last one reads as text, the one
    after it (the size itself) is a 400 naming `tokens`, never an answer or a server error."""
    def detokenize(ids):
        return server.http.post(server.url + "/detokenize", json={"model": "tiny", "tokens": ids}, timeout=30)

    said = detokenize([10 ** 6]).json()["error"]["message"]
    last = int(re.search(r"\(0\.\.(\d+)\)", said).group(1))
    ok = detokenize([5, last])
    assert ok.status_code == 200 and isinstance(ok.json()["prompt"], str), ok.text
    past = detokenize([5, last + 1])
    assert past.status_code == 400, past.text
    err = past.json()["error"]
    assert err["param"] == "tokens" and f"token id {last + 1} is outside the vocabulary" in err["message"], err
