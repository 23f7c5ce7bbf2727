"""What one request may ask of `agp serve` is bounded: its answers (prompts x n, with the
generate stage's n when the request gives none) and the ids /detokenize turns into text."""
from __future__ import annotations

import httpx
import pytest

from pipeline_dsl.serve import protocol as P


def test_prompts_times_n_is_bounded():
    with pytest.raises(P.APIError) as e:
        P.parse_completion({"prompt": ["hi"] * 256, "n": 64}, max_model_len=512, served=("tiny",))
    assert e.value.status == 400 and "16384 answers; at most 256" in e.value.message
    ok = P.parse_completion({"prompt": ["hi"] * 4, "n": 64}, max_model_len=512, served=("tiny",))
    assert len(ok.split()) == 4
    with pytest.raises(P.APIError, match="at most 256"):
        P.check_choices(8, 64)                       # the stage's n when the request sets none


def test_the_stages_n_answers_and_numbers_a_request_that_sets_none():
    """parse_completion's and parse_chat's stage_n (the largest n of the pipeline's generate stages)
    bounds the answers of a request that sets no n as a sent n does, and numbers each prompt's
    choices (choice i of prompt k is k * choices_per_prompt + i); a request's own n replaces the
    stage's, as it does for the answers (vLLM numbers [0, 1] for two prompts at n = 1)."""
    def completion(body, stage_n):
        return P.parse_completion(body, max_model_len=512, served=("tiny",), stage_n=stage_n)

    with pytest.raises(P.APIError) as e:
        completion({"prompt": ["hi"] * 8}, 64)
    assert (e.value.param, e.value.message) == ("prompt", "8 prompts x n = 64 asks for 512 answers; at most 256 a "
                                                          "request (send fewer prompts or a smaller n)")
    assert completion({"prompt": ["hi"] * 8, "n": 2}, 64).choices_per_prompt == 2      # the request's n, sent
    assert completion({"prompt": ["hi"] * 8, "n": 3}, 2).choices_per_prompt == 3
    assert completion({"prompt": ["hi"] * 4}, 64).choices_per_prompt == 64
    assert completion({"prompt": ["hi"] * 4}, 1).choices_per_prompt == 1
    chat = P.parse_chat({"messages": [{"role": "user", "content": "hi"}]}, max_model_len=512, served=("tiny",),
                        stage_n=4)
    assert chat.choices_per_prompt == 4


def test_detokenize_takes_at_most_the_models_context():
    with pytest.raises(P.APIError) as e:
        P.parse_detokenize({"tokens": [5] * 1_000_000}, served=("tiny",), max_model_len=512)
    assert e.value.status == 400 and e.value.param == "tokens" and "at most 512" in e.value.message
    assert P.parse_detokenize({"tokens": [5] * 512}, served=("tiny",), max_model_len=512)[0] == [5] * 512


def test_the_server_refuses_unbounded_requests_with_a_400(tiny_gguf):
    from test_serve import LiveServer

    s = LiveServer(tiny_gguf, max_stage_n=64)          # as if a generate stage said n = 64
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["hi"] * 8, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and "512 answers" in r.json()["error"]["message"], r.text
        r = httpx.post(s.url + "/detokenize", json={"tokens": [5] * 100_000}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
        assert httpx.post(s.url + "/detokenize", json={"tokens": [5, 6]}, timeout=60).status_code == 200
    finally:
        s.close()


@pytest.mark.parametrize("field, noun, most", [("prompt", "prompts", P.MAX_PROMPTS), ("input", "inputs", 2048)])
def test_a_completions_prompt_and_an_embeddings_input_are_bounded_alike(field, noun, most):
    """A batch of texts (completions' prompt, embeddings' input) is bounded by one rule
    (protocol.bounded_batch): so many a request, none empty, none of more token ids than the
    context once truncate_prompt_tokens has kept its last ids."""
    from pipeline_dsl.serve.embeddings import parse_request

    def parse(value, **more):
        body = {field: value, **more}
        if field == "prompt":
            return P.parse_completion(body, max_model_len=8, served=("tiny",))
        return parse_request(body, max_model_len=8, served=("tiny",))

    for value, message, code in [(["a"] * (most + 1), f"'{field}' holds {most + 1} {noun}; at most {most} a request",
                                  None),
                                 (["a", ""], f"'{field}[1]' is empty", None),
                                 ([5] * 9, f"'{field}' holds 9 tokens, beyond the context of 8 tokens",
                                  "context_length_exceeded"),
                                 (["a", [5] * 9], f"'{field}[1]' holds 9 tokens, beyond the context of 8 tokens",
                                  "context_length_exceeded")]:
        with pytest.raises(P.APIError) as e:
            parse(value)
        assert (e.value.message, e.value.param, e.value.code) == (message, field, code)
    parse(["a"] * most)
    parse([5] * 9, truncate_prompt_tokens=8)            # its last 8 ids: within the context
