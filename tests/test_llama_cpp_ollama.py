"""What a user of llama.cpp's llama-server or of Ollama brings to `agp serve`: their flags
(-c, --n-predict, --parallel, -hf, --keep, --chat-template chatml), their request fields
(n_predict, cache_prompt, grammar, json_schema, n_probs, Ollama's options) and their routes
(/completion, /props, /slots, /api/chat, /api/tags). agp takes OpenAI's and vLLM's names; each of
those is refused as an unknown one is (exit 2, a 400, a 404), and the message says where agp's
equivalent is (docs/serve.md and docs/openai.md, "Coming from llama.cpp or Ollama")."""
from __future__ import annotations

import logging

import pytest

from pipeline_dsl import cli
from pipeline_dsl.commands import serve as serve_command
from pipeline_dsl.requests_io import RequestError, parse_request
from pipeline_dsl.serve import protocol as P
from test_serve import SERVED, LiveServer


# ---------------------------------------------------------------- llama-server's flags

@pytest.fixture
def no_serving(monkeypatch):
    """agp serve's main replaced: a command line that gets past the parser serves nothing."""
    monkeypatch.setattr(serve_command, "main", lambda args: 0)


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["-c", "2048", "-np", "4"],
     ["unrecognized arguments: -c 2048 -np 4; ",
      "-c is llama.cpp's: agp's is --max-model-len N, each sequence's context (llama.cpp splits -c among its "
      "--parallel slots",
      "-np is llama.cpp's: agp's is --max-num-seqs N"]),
    (["--ctx-size=4096", "--n-predict", "64", "--parallel", "2"],
     ["--ctx-size is llama.cpp's: agp's is --max-model-len N",
      "--n-predict is llama.cpp's: a request's `max_tokens` sets it; the server's default is the generate stage's "
      "`max_new_tokens` (--override-generation-config '{\"max_new_tokens\": N}')",
      "--parallel is llama.cpp's: agp's is --max-num-seqs N"]),
    (["-ngl", "99", "--jinja", "-a", "mine"],
     ["-ngl is llama.cpp's: agp runs the whole model on the pipeline's `device`",
      "--jinja is llama.cpp's: agp always applies the model's Jinja chat template",
      "-a is llama.cpp's: agp's is --served-model-name NAME"]),
])
def test_llama_servers_flags_say_what_agp_serve_takes_instead(argv, said, no_serving, capsys):
    """They were refused as any unknown flag is, `unrecognized arguments: -c 2048`, with nothing on
    agp's --max-model-len or --max-num-seqs."""
    err = refused(["serve", "examples/chat.agp", *argv], capsys)
    for line in said:
        assert line in err, err


@pytest.mark.parametrize("argv, flag", [
    (["--keep", "5"], "--keep"),                 # llama.cpp's tokens kept on a context shift
    (["-hf", "org/model-GGUF"], "-hf"),          # llama.cpp's Hugging Face download
])
def test_a_llama_server_flag_is_not_misread_as_one_of_agps(argv, flag, no_serving, capsys):
    """argparse took llama.cpp's --keep 5 as an abbreviation of --keep-alive-timeout (the server
    started, closing idle connections after 5 s), and -hf as -h with the value 'f' ('ignored explicit
    argument'): both are refused as unknown, saying what they are."""
    err = refused(["serve", "examples/chat.agp", *argv], capsys)
    assert f"unrecognized arguments: {flag}" in err and f"; {flag} is llama.cpp's: " in err, err


@pytest.mark.parametrize("flag", ["-hfr", "-hff", "-hft", "-hfd", "-hfrd", "-hfv", "-hfrv", "-hffv", "--hf-file",
                                  "--hf-repo"])
def test_llama_servers_hugging_face_flags_are_named(flag, no_serving, capsys):
    """-hfr and the rest were read as -h with the value 'fr' ('argument -h/--help: ignored explicit
    argument 'fr'')."""
    err = refused(["serve", "examples/chat.agp", flag, "org/model-GGUF"], capsys)
    assert f"unrecognized arguments: {flag}" in err and f"; {flag} is llama.cpp's: agp downloads nothing" in err, err
    assert "explicit argument" not in err


@pytest.mark.parametrize("command, arg", [("serve", "-hx"), ("run", "-hq"), ("fmt", "-wz")])
def test_a_switch_with_letters_after_it_is_refused_naming_the_argument(command, arg, no_serving, capsys):
    """Any single-dash argument that begins with a switch of the command (an option with no value:
    -h, fmt's -w) is one argparse would misread; it is refused whole."""
    err = refused([command, "examples/chat.agp", arg], capsys)
    assert f"unrecognized arguments: {arg}" in err and "explicit argument" not in err, err


@pytest.mark.parametrize("command, flag", [("serve", "--max-model"), ("serve", "--keep-alive"),
                                           ("check", "--js")])
def test_agps_flags_are_taken_whole_never_abbreviated(command, flag, no_serving, capsys):
    """argparse's abbreviations read llama.cpp's --keep as --keep-alive-timeout; no agp flag is
    taken by a prefix of its name."""
    err = refused([command, "examples/chat.agp", flag, "5"], capsys)
    assert f"unrecognized arguments: {flag}" in err, err


def test_agp_run_names_no_serve_flag_for_llama_cpps(capsys):
    """agp run has no --max-model-len: a hint there would send the user to a flag it refuses."""
    err = refused(["run", "examples/chat.agp", "-c", "2048"], capsys)
    assert "unrecognized arguments: -c 2048" in err and "llama.cpp" not in err, err


def test_a_chat_template_given_by_name_is_told_agp_takes_a_template(capsys):
    """llama.cpp's --chat-template takes a built-in's name (chatml, llama3); agp said only
    'chatml: no such file'."""
    assert cli.main(["serve", "examples/chat.agp", "--port", "0", "--chat-template", "chatml"]) == 2
    err = capsys.readouterr().err
    assert ("--chat-template chatml: no such file (agp knows no templates by name, as llama.cpp knows 'chatml' or "
            "'llama3': give a Jinja template's file or the template itself; left out, the model's own template") in err
    # a path that is not there is still just that
    assert cli.main(["serve", "examples/chat.agp", "--port", "0", "--chat-template", "t/none.jinja"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template t/none.jinja: no such file" in err and "by name" not in err, err


# ---------------------------------------------------------------- request fields

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field, value, said", [
    ("n_predict", 16, "(llama.cpp's name; agp's is 'max_tokens')"),
    ("cache_prompt", True, "(llama.cpp's; agp reuses a prompt's cached prefix by itself"),
    ("grammar", 'root ::= "yes" | "no"', "(llama.cpp's; agp takes GBNF (or Lark) text as 'guided_grammar'"),
    ("json_schema", {"type": "object"}, "(llama.cpp's; agp's is 'response_format': {\"type\": \"json_schema\""),
    ("n_probs", 3, "(llama.cpp's; agp's is 'logprobs'"),
    ("repeat_penalty", 1.1, "(llama.cpp's and Ollama's name; agp's is 'repetition_penalty'"),
    ("mirostat", 2, "(agp has no Mirostat sampler: it samples by temperature, top_k, top_p, min_p"),
    ("options", {"num_predict": 8}, "(Ollama's; agp takes its sampling fields at the top level: 'max_tokens' "
                                    "(num_predict)"),
    ("num_predict", 8, "(Ollama's name; agp's is 'max_tokens')"),
    ("format", "json", "(Ollama's; agp's is 'response_format': {\"type\": \"json_object\"} for \"json\""),
    # not "did you mean 'reasoning_effort'?", another setting
    ("reasoning_format", "none", "(agp serve --reasoning-parser qwen3|deepseek_r1 splits a reasoning model's "
                                 "thinking out"),
    ("think", False, "(agp serve --reasoning-parser qwen3|deepseek_r1 splits a reasoning model's thinking out of its "
                     "answer (reasoning_content, or a reasoning item on /v1/responses), as vLLM's does; under qwen3, "
                     "chat_template_kwargs {\"enable_thinking\": false} turns the thinking off)"),
])
@pytest.mark.parametrize("parse", ["chat", "completion"])
def test_llama_cpps_and_ollamas_fields_are_a_400_naming_agps(field, value, said, parse):
    """They were a bare 'unrecognized request argument "n_predict"' (or a did-you-mean at another
    field: reasoning_format at reasoning_effort)."""
    body = {**CHAT, field: value} if parse == "chat" else {"prompt": "hi", field: value}
    with pytest.raises(P.APIError) as e:
        getattr(P, f"parse_{parse}")(body, max_model_len=512, served=SERVED, stages=("gen",))
    assert e.value.message.startswith(f'unrecognized request argument "{field}" {said}'), e.value.message
    assert (e.value.status, e.value.param, e.value.code) == (400, field, "unknown_parameter")


def test_lenient_logs_what_agp_calls_the_field_it_ignores(caplog):
    with caplog.at_level(logging.INFO, logger="agp.serve"):
        P.parse_completion({"prompt": "hi", "n_predict": 8}, max_model_len=512, served=SERVED, lenient=True)
    assert "ignoring unrecognized request arguments: 'n_predict' (llama.cpp's name; agp's is 'max_tokens')" \
        in caplog.text


def test_a_request_line_is_told_the_same():
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "hi", "n_predict": 8})
    assert str(e.value) == "unknown field 'n_predict' (llama.cpp's name; agp's is 'max_tokens')"
    with pytest.raises(RequestError) as e:            # Ollama's as well as llama.cpp's
        parse_request({"prompt": "hi", "num_predict": 8})
    assert str(e.value) == "unknown field 'num_predict' (Ollama's name; agp's is 'max_tokens')"


def test_the_hints_for_request_lines_stay_off_the_servers_routes():
    """TGI's "inputs" is told, in a request line, that a line's prompt is 'prompt': on /v1/embeddings
    it is a typo of 'input', which the did-you-mean names."""
    from pipeline_dsl.serve.embeddings import FIELDS

    with pytest.raises(P.APIError) as e:
        P.check_unknown({"inputs": "x"}, FIELDS)
    assert e.value.message == 'unrecognized request argument "inputs"; did you mean \'input\'?'


def test_a_nested_field_gets_no_foreign_hint():
    """The table names top-level fields: stream_options.format is no Ollama field."""
    with pytest.raises(P.APIError) as e:
        P.parse_completion({"prompt": "hi", "stream": True, "stream_options": {"format": 1}}, max_model_len=512,
                           served=SERVED)
    assert e.value.message == 'unrecognized request argument "stream_options.format"'


@pytest.mark.parametrize("field, said", [
    ("n_predict", " (llama.cpp's name; agp's is 'max_output_tokens')"),
    ("num_predict", " (Ollama's name; agp's is 'max_output_tokens')"),
    ("format", " (Ollama's; agp's is 'text': {\"format\": {\"type\": \"json_object\"}} for \"json\""),
    ("system", " (Ollama's; agp takes a system prompt as 'instructions'"),
    ("json_schema", " (llama.cpp's; agp's is 'text': {\"format\": {\"type\": \"json_schema\""),
    ("options", " (Ollama's; agp takes its sampling fields at the top level: 'max_output_tokens' (num_predict)"),
    ("n_probs", " (llama.cpp's; agp's is 'top_logprobs'"),
    ("content", " (llama.cpp's name for the text; agp's is 'input')"),
    ("images", "; did you mean 'image'?"),             # a typo of a field /v1/responses takes
])
def test_responses_is_told_its_own_fields(field, said):
    """/v1/responses was told agp's names for chat and completions ('max_tokens', 'response_format',
    'messages'), which it refuses, and 'images' lost its did-you-mean at 'image'."""
    from pipeline_dsl.serve.responses import parse_responses

    with pytest.raises(P.APIError) as e:
        parse_responses({"input": "hi", field: 5}, max_model_len=512, served=SERVED)
    assert e.value.message.startswith(f'unrecognized request argument "{field}"{said}'), e.value.message


@pytest.mark.parametrize("field, said", [
    ("return_tokens", " (llama.cpp's; agp gives each id's text with 'return_token_strs': true)"),
    ("with_pieces", " (llama.cpp's; agp's /tokenize gives each id's text with 'return_token_strs': true)"),
    ("content", " (llama.cpp's name for the text; agp's is 'prompt')"),
    ("add_special", " (llama.cpp's; agp's is 'add_special_tokens')"),
    ("n_predict", ""),                                   # /tokenize has no such setting at all
])
def test_tokenize_is_told_its_own_fields(field, said):
    """/tokenize's return_tokens was told 'return_token_ids', which /tokenize refuses."""
    with pytest.raises(P.APIError) as e:
        P.parse_tokenize({"prompt": "hi", field: True}, served=SERVED)
    assert e.value.message == f'unrecognized request argument "{field}"{said}'


def test_every_hint_names_only_fields_its_route_takes():
    """Whatever route a client of llama.cpp or Ollama sends a field to, the 400 names no field that route refuses."""
    import re

    from pipeline_dsl.requests_io import KNOWN, SERVER_FIELDS, foreign_hint
    from pipeline_dsl.serve import embeddings, responses

    for known in (P.CHAT_FIELDS, P.COMPLETION_FIELDS, responses.FIELDS, responses.COUNT_FIELDS, embeddings.FIELDS,
                  KNOWN):
        for field in SERVER_FIELDS:
            hint = foreign_hint(field, known) or ""
            assert set(re.findall(r"'([a-z_]+)'", hint)) <= set(known), (field, hint)


SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}


def test_llama_cpps_json_object_with_a_schema_asks_for_that_schema():
    """llama.cpp's README writes a schema as response_format {"type": "json_object", "schema": ...}:
    agp dropped the schema and answered any JSON object."""
    fmt = {"type": "json_object", "schema": SCHEMA}
    r = P.parse_chat({**CHAT, "response_format": fmt}, max_model_len=512, served=SERVED)
    assert (r.response_format["type"], r.response_format["schema"]) == ("json_schema", SCHEMA)
    assert parse_request({**CHAT, "response_format": fmt}).response_format["schema"] == SCHEMA    # a line too
    # without a schema it is OpenAI's json_object, as before
    r = P.parse_chat({**CHAT, "response_format": {"type": "json_object"}}, max_model_len=512, served=SERVED)
    assert r.response_format == {"type": "json_object"}
    with pytest.raises(P.APIError) as e:
        P.parse_chat({**CHAT, "response_format": {"type": "json_object", "schema": "x"}}, max_model_len=512,
                     served=SERVED)
    assert e.value.message == "'response_format.schema' must be a JSON schema (an object), not \"x\""


def test_llama_cpps_logit_bias_pairs_are_told_agps_form():
    with pytest.raises(P.APIError) as e:
        P.parse_completion({"prompt": "hi", "logit_bias": [[15043, False]]}, max_model_len=512, served=SERVED)
    assert e.value.message == ("'logit_bias' must be an object {\"token id\": bias}, not [[15043, false]] "
                               "(llama.cpp's [[id, bias], ...] pairs are {\"id\": bias, ...} here; its false, a "
                               "token banned, is -100)")


# ---------------------------------------------------------------- routes

@pytest.fixture(scope="module")
def live(tiny_gguf):
    s = LiveServer(tiny_gguf)
    yield s
    s.close()


@pytest.mark.parametrize("method, path, said", [
    ("POST", "/completion", "(llama.cpp's; agp's is POST /v1/completions (its n_predict is 'max_tokens' there))"),
    ("GET", "/props", "(llama.cpp's; agp's settings: GET /v1/models (each model's max_model_len), GET /stats"),
    ("GET", "/slots", "(llama.cpp's; agp has no slots: GET /stats counts"),
    ("POST", "/slots/0?action=save", "(llama.cpp's; agp has no slots"),
    ("POST", "/chat/completions", "(agp serves OpenAI's routes under /v1 (a client's base URL is "
                                  "http://HOST:PORT/v1): POST /v1/chat/completions)"),
    ("POST", "/api/chat", "(Ollama's API; agp serves OpenAI's, as Ollama does under /v1 too"),
    ("GET", "/api/tags", "Ollama's /api/tags is GET /v1/models)"),
    ("POST", "/api/pull", "(Ollama's API; agp serves OpenAI's"),
    ("GET", "/", "(agp serves no web page"),
])
def test_another_servers_route_is_a_404_saying_where_agps_is(live, method, path, said):
    """The ollama package's Client and llama.cpp's README curl lines got 'POST /api/chat: Not Found'."""
    r = live.http.request(method, live.url + path, json={})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "not_found_error" and said in error["message"], error


def test_a_json_object_with_a_schema_is_answered_in_that_schema(live):
    import json

    r = live.http.post(live.url + "/v1/chat/completions", timeout=60,
                       json={**CHAT, "max_tokens": 30, "response_format": {"type": "json_object", "schema": SCHEMA}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in ({"a": "x"}, {"a": "y"})


def test_an_unknown_route_of_no_server_gets_no_hint(live):
    r = live.http.get(live.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "GET /nowhere: Not Found"
