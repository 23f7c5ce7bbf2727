"""What an OpenAI client sends today, against `agp serve` on the tiny model: the request fields
current SDKs and agent frameworks set on chat (`safety_identifier`, `prompt_cache_key`, `user`)
are taken as OpenAI takes them, and a field agp does not serve is named without a misleading
suggestion."""
from __future__ import annotations

import openai
import pytest

from test_serve import LiveServer

USER = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


def test_chat_takes_openais_end_user_and_cache_identifiers(server):
    # OpenAI's chat API: safety_identifier replaces user; prompt_cache_key groups requests for caching
    kw = dict(model="tiny", messages=USER, max_tokens=3, temperature=0)
    plain = server.client.chat.completions.create(**kw)
    tagged = server.client.chat.completions.create(**kw, safety_identifier="u-7f3a", prompt_cache_key="conv-1",
                                                   user="someone")
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    assert tagged.usage == plain.usage or tagged.usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("field", ["safety_identifier", "prompt_cache_key", "user"])
def test_an_identifier_that_is_not_a_string_is_a_400_naming_it(server, field):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: 5})
    assert e.value.param == field and "must be a string" in e.value.message


@pytest.mark.parametrize("field, value", [("reasoning_effort", "low"), ("verbosity", "low"),
                                          ("modalities", ["text", "audio"]), ("web_search_options", {}),
                                          ("prediction", {"type": "content", "content": "x"})])
def test_an_openai_feature_the_models_lack_is_a_400_that_says_so(server, field, value):
    # not "unrecognized ...; did you mean 'response_format'?": the field is OpenAI's, agp lacks the feature
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: value})
    assert e.value.param == field and e.value.code == "unsupported_parameter"
    assert "not supported by agp" in e.value.message and "did you mean" not in e.value.message


def test_the_values_of_those_features_that_ask_for_nothing_are_taken(server):
    out = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, modalities=["text"],
                                                extra_body={"prediction": None, "reasoning_effort": None})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_an_unknown_field_is_offered_a_name_only_when_it_is_close(server):
    def message(field):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: 1})
        return e.value.message

    assert "did you mean 'temperature'?" in message("temprature")
    assert "did you mean" not in message("n_choices")          # not 'tool_choice'
