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
