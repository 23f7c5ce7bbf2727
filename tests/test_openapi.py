"""schemathesis over the served /openapi.json: generated requests of every documented shape
get no 5xx and only answers the description allows (status codes, content types, bodies)."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from test_serve import LiveServer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 40               # per operation


@pytest.fixture(scope="module")
def live(tiny_gguf):
    s = LiveServer(tiny_gguf, max_batch_size=8, batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.fixture(scope="module")
def operations(live):
    """The described operations, read from /openapi.json once for the module (reading and
    resolving the description is seconds; each test only draws cases from them)."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_route_is_described(operations):
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models",
            "GET /health", "GET /metrics", "GET /stats", "GET /tokenizer_info"} <= labels


@pytest.mark.parametrize("label", ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses",
                                   "POST /v1/embeddings", "POST /v1/score", "POST /v1/rerank", "GET /v1/models",
                                   "GET /health", "GET /stats", "GET /metrics", "GET /tokenizer_info"])
def test_the_served_api_matches_its_description(live, operations, label):
    op = next(o for o in operations if o.label == label)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def run(case):
        case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=60)

    run()


def test_the_described_completions_prompt_is_every_shape_the_server_takes(live):
    """A batch of prompts (strings, token-id arrays, or both) is described as the server takes it:
    up to its limit of prompts a request, one choice for each."""
    import jsonschema

    from pipeline_dsl.serve.protocol import MAX_PROMPTS

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**body, "components": spec.get("components", {})})
    taken = [["a", "b", "c"], [[1, 2], [3]], ["a", [4, 5]], ["x"] * MAX_PROMPTS]
    refused = [[], [""], ["x"] * (MAX_PROMPTS + 1), [[]], [1, "a"]]
    for prompt in taken:
        assert validator.is_valid({"prompt": prompt, "max_tokens": 1}), prompt
    for prompt in refused:
        assert not validator.is_valid({"prompt": prompt, "max_tokens": 1}), prompt
    for prompt in taken[:3] + refused:
        r = live.http.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
        assert r.status_code == (200 if prompt in taken else 400), (prompt, r.text)
        if r.status_code == 200:
            assert sorted(c["index"] for c in r.json()["choices"]) == list(range(len(prompt)))


def test_the_described_request_bodies_name_every_field_the_server_takes(live):
    """A client generated from /openapi.json (additionalProperties: false) may send every field the
    server takes: logprobs, tools, response_format, penalties, the neutral vLLM fields..."""
    from pipeline_dsl.serve import embeddings, protocol, responses, scores

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()

    def described(path):
        return set(spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"])

    assert described("/v1/chat/completions") == protocol.CHAT_FIELDS
    assert described("/v1/completions") == protocol.COMPLETION_FIELDS
    assert described("/v1/responses") == responses.FIELDS
    assert described("/v1/embeddings") == embeddings.FIELDS
    assert described("/v1/score") == described("/score") == scores.SCORE_FIELDS
    assert described("/v1/rerank") == described("/rerank") == described("/v2/rerank") == scores.RERANK_FIELDS


def test_the_described_64_bit_bounds_are_the_integers_the_server_takes(live):
    """`seed` and `priority` are signed 64-bit integers: the description's bounds are those
    integers (2**63 - 1 as a float is 2**63, which the server refuses)."""
    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        fields = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        for name in ("seed", "priority"):
            assert (fields[name]["minimum"], fields[name]["maximum"]) == (-(1 << 63), (1 << 63) - 1), (path, name)
            assert isinstance(fields[name]["maximum"], int)
    body = {"prompt": "hi", "max_tokens": 1, "seed": 1 << 63}
    assert live.http.post(live.url + "/v1/completions", json=body, timeout=60).status_code == 400


def test_a_null_cache_salt_is_described_as_the_server_takes_it(live):
    """vLLM's cache_salt is optional (null: no salt) and the server takes null; the description
    said a string alone. Null is described and served, on every route that takes the field; an
    empty string stays a 400 and is described as refused."""
    import jsonschema

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    bodies = {"/v1/completions": {"prompt": "hi", "max_tokens": 1},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
              "/v1/responses": {"input": "hi", "max_output_tokens": 1}}
    for path, body in bodies.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        jsonschema.validate({**body, "cache_salt": None}, schema)
        jsonschema.validate({**body, "cache_salt": "s"}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**body, "cache_salt": ""}, schema)
        assert live.http.post(live.url + path, json={**body, "cache_salt": None}, timeout=60).status_code == 200, path
        assert live.http.post(live.url + path, json={**body, "cache_salt": ""}, timeout=60).status_code == 400, path


def test_the_described_embeddings_input_is_every_shape_the_server_takes(live):
    import jsonschema

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for body in ({"input": [5, 6, 7]}, {"input": ["a", [5, 6]]}, {"input": ["x"] * 8}, {"input": "x", "user": "u"},
                 {"input": "x", "dimensions": 64, "request_id": "r1"}):
        jsonschema.validate(body, schema)
        r = live.http.post(live.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=60)
        assert r.status_code == 200, r.text                 # the tiny model's embeddings have 64 dimensions


def test_a_described_chat_body_with_tools_logprobs_and_a_tool_turn_is_valid_and_served(live):
    import jsonschema

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "tiny", "max_tokens": 2, "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5,
            "tools": [tool], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    jsonschema.validate(body, schema)
    # the tool prompt outgrows the tiny model's 512 tokens: the turn is served without the tools' listing
    served = {k: v for k, v in body.items() if k not in ("tools", "tool_choice")}
    r = live.http.post(live.url + "/v1/chat/completions", json=served, timeout=60)
    assert r.status_code == 200, r.text


def test_the_probes_are_described(live):
    """/ping (GET and POST, vLLM's) and HEAD /health answer, so the description lists them."""
    paths = live.http.get(live.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"get", "post"} <= set(paths["/ping"]) and {"get", "head"} <= set(paths["/health"])
    for method, path in [("GET", "/ping"), ("POST", "/ping"), ("HEAD", "/health")]:
        assert live.http.request(method, live.url + path, timeout=30).status_code == 200


def test_a_described_scoring_request_is_valid_and_served(live):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0) fits the description."""
    import jsonschema

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 1}
    jsonschema.validate(body, schema)
    assert live.http.post(live.url + "/v1/completions", json=body, timeout=60).status_code == 200


NULL_BODIES = {"/v1/completions": {"prompt": "hi", "max_tokens": 1},
               "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
               "/v1/responses": {"input": "hi", "max_output_tokens": 1},
               "/v1/embeddings": {"model": "tiny", "input": "hi"},
               "/v1/score": {"model": "tiny", "text_1": "hi", "text_2": ["a", "b"]},
               "/v1/rerank": {"model": "tiny", "query": "hi", "documents": ["a", {"text": "b"}]}}


def test_every_request_field_takes_null_exactly_when_its_description_does(live):
    """Clients send null for the optional fields they leave unset (vLLM's are Optional); the server
    took null for fields described as not nullable (priority, ignore_eos, n, ...), so a client
    generated from the description could not send what the server takes. Field by field: a body
    with the field null is served (200) exactly when the description validates it."""
    import jsonschema

    spec = live.http.get(live.url + "/openapi.json", timeout=30).json()
    disagree = []
    for path, body in NULL_BODIES.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        validator = jsonschema.Draft202012Validator(schema)
        assert validator.is_valid(body), path
        for name in sorted(schema["properties"]):
            nullable = validator.is_valid({**body, name: None})
            r = live.http.post(live.url + path, json={**body, name: None}, timeout=60)
            assert r.status_code in (200, 400), (path, name, r.status_code, r.text)
            if nullable != (r.status_code == 200):
                disagree.append(f"{path} {name}: described {'nullable' if nullable else 'not nullable'}, "
                                f"served {r.status_code} {r.text[:80]}")
    assert not disagree, "\n".join(disagree)
