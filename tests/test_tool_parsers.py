"""Tool calls in each model family's own form (vLLM's hermes, llama3_json and mistral parsers):
parsed out of a whole answer and out of a stream of it split anywhere, the family told from a
model's chat template and vocabulary, `agp serve --tool-call-parser`, and an answer through a
served model that writes Llama's bare JSON."""
from __future__ import annotations

import json

import flowkit
import pytest

from pipeline_dsl.tools import (PARSERS, parse_tool_calls, prepare_messages, template_takes_tools, tool_parser_for,
                                 tool_stream, without_markers)


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# (parser, the answer, its content, its calls)
ANSWERS = [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '  <|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                    '{"name": "add", "arguments": {"a": 3, "b": 4}}', None,
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ("llama3_json", 'Let me look.<|python_tag|>{"name": "f", "parameters": {}}', "Let me look.", [("f", {})]),
    ("llama3_json", '[{"name": "f", "parameters": {"x": [1, 2]}}, {"name": "g", "parameters": {}}]', None,
     [("f", {"x": [1, 2]}), ("g", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "f", "arguments": {}}]',
     None, [("add", {"a": 1, "b": 2}), ("f", {})]),
    ("mistral", 'Sure. [TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]f[ARGS]{}', "Sure. ",
     [("add", {"a": 1, "b": 2}), ("f", {})]),
    ("mistral", '[{"name": "add", "arguments": {"a": 5, "b": 6}}]', None, [("add", {"a": 5, "b": 6})]),
    ("llama3_json", '{"name": "f", "parameters": {}};{"name": "g", "parameters": {"x": 1}}', None,
     [("f", {}), ("g", {"x": 1})]),                                       # no space after the ';'
    ("mistral", '[TOOL_CALLS]f[ARGS] {"a": 1}', None, [("f", {"a": 1})]),
    ("hermes", 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', "Sure. ",
     [("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>not json</tool_call> <tool_call>{"name": "f", "arguments": {}}</tool_call>',
     '<tool_call>not json</tool_call> ', [("f", {})]),                   # a block that held none stays
    ("hermes", '<tool_call>[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "argu', None,
     [("f", {"a": 1})]),                                                  # cut at max_tokens: the whole ones
]

# answers that hold no call in that family's form: all content, as written but for the family's
# markers (special tokens, no part of what the model said)
NOT_CALLS = [
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}'),              # cut JSON
    ("llama3_json", '{"name": "f", "parameters": {}} and then some words'),
    ("llama3_json", 'The call is {"name": "f", "parameters": {}}'),       # bare JSON inside prose
    ("llama3_json", '{"city": "Oslo", "temperature": 3}'),                 # JSON, not a call
    ("llama3_json", '<|python_tag|>print("hi")'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": '),
    ("mistral", '[a link](https://example.com) and text'),
    ("mistral", '[{"city": "Oslo"}]'),
    ("llama3_json", '{"name": "Oslo", "population": 709000}'),          # JSON with a "name", not a call
    ("llama3_json", '{"name": "f", "parameters": {}}; {"city": "Oslo"}'),  # a call and an object that is not
    ("mistral", '[{"name": "f", "arguments": {}}, {"city": "Oslo"}]'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}][TOOL_CALLS]oops'),
    ("hermes", '{"name": "f", "arguments": {}}'),                          # another family's form
    ("hermes", 'Answer is {"name": "f", "arguments": {}}'),
    ("llama3_json", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
]


@pytest.mark.parametrize("parser, text, content, calls", ANSWERS)
def test_each_family_s_calls_are_parsed_with_the_text_before_them_as_content(parser, text, content, calls):
    got_content, got = parse_tool_calls(text, None, parser)
    assert got_content == content and calls_of(got) == calls
    assert all(c["type"] == "function" for c in got)
    if parser == "mistral":      # Mistral's templates take back no other id (nine letters and digits)
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in got)
    else:
        assert all(c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("parser, text", NOT_CALLS)
def test_an_answer_whose_call_part_is_not_calls_stays_content_whole(parser, text):
    assert parse_tool_calls(text, None, parser) == (without_markers(text, parser), [])


@pytest.mark.parametrize("parser, text, content, calls", [a for a in ANSWERS if len(a[3]) > 1])
def test_parallel_tool_calls_false_keeps_the_first_call_of_every_family(parser, text, content, calls):
    assert calls_of(parse_tool_calls(text, 1, parser)[1]) == calls[:1]
    stream = tool_stream(1, parser)
    sent = [stream.feed(text), stream.finish()]
    assert calls_of([c for _, found in sent for c in found]) == calls[:1]


# an answer nested deeper than Python's stack (a model that writes `[` until max_tokens), where each
# family's calls may begin: no call, the whole answer content (json's RecursionError is no 500)
DEEP = "[" * 5000 + "1"
NESTED_PAST_THE_STACK = [("hermes", "<tool_call>" + DEEP + "</tool_call>"), ("hermes", "<tool_call>" + DEEP),
                         ("hermes", '<tool_call>{"name": "f", "arguments": ' + DEEP),
                         ("llama3_json", DEEP), ("llama3_json", "<|python_tag|>" + DEEP),
                         ("mistral", "[TOOL_CALLS]" + DEEP), ("mistral", "[TOOL_CALLS]f[ARGS]" + DEEP)]


@pytest.mark.parametrize("parser, text", NESTED_PAST_THE_STACK)
def test_an_answer_nested_past_python_s_stack_is_content_whole_or_streamed(parser, text):
    shown = without_markers(text, parser)          # content shows no family's marker
    assert parse_tool_calls(text, None, parser) == (shown, [])
    assert streamed(parser, [text[i:i + 7] for i in range(0, len(text), 7)]) == (shown, [])


def test_an_earlier_call_s_arguments_nested_past_python_s_stack_reach_the_prompt_as_written():
    args = "[" * 5000
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                                     "function": {"name": "f", "arguments": args}}]}]
    [_, said] = prepare_messages(history, None, template_takes_tools=False)
    assert said["content"] == "<tool_call>" + json.dumps([{"name": "f", "arguments": args}]) + "</tool_call>"


def streamed(parser: str, pieces: list[str], limit=None) -> tuple[str, list[dict]]:
    """What a stream of these pieces sends, put together as a client does: content, and each
    index's call with its name and arguments joined."""
    stream = tool_stream(limit, parser)
    content, by_index = "", {}
    for out in [stream.feed(p) for p in pieces] + [stream.finish()]:
        content += out[0]
        for c in out[1]:
            call = by_index.setdefault(c["index"], {"name": "", "arguments": ""})
            call["name"] += c.get("function", {}).get("name") or ""
            call["arguments"] += c.get("function", {}).get("arguments") or ""
    return content, [{"function": by_index[i]} for i in sorted(by_index)]


@pytest.mark.parametrize("parser, text", [(a[0], a[1]) for a in ANSWERS] + NOT_CALLS)
def test_a_streamed_answer_split_anywhere_puts_together_to_the_whole_answer(parser, text):
    whole_content, whole_calls = parse_tool_calls(text, None, parser)
    expected = (whole_content or "", calls_of(whole_calls))
    for cut in range(len(text) + 1):
        content, calls = streamed(parser, [text[:cut], text[cut:]])
        assert (content, calls_of(calls)) == expected, cut
    for a in range(0, len(text), 3):                    # three pieces, the middle one anywhere
        for b in range(a, len(text), 5):
            content, calls = streamed(parser, [text[:a], text[a:b], text[b:]])
            assert (content, calls_of(calls)) == expected, (a, b)
    content, calls = streamed(parser, list(text))       # a character a delta
    assert (content, calls_of(calls)) == expected


def test_text_before_a_call_streams_as_content_before_the_answer_ends():
    stream = tool_stream(None, "llama3_json")
    assert stream.feed("Let me look") == ("Let me look", [])
    assert stream.feed(".<|pyth") == (".", [])                   # what may be the tag waits
    assert stream.feed('on_tag|>{"name": "f", "parameters": {}}') == ("", [])
    content, calls = stream.finish()
    assert content == "" and [c["index"] for c in calls] == [0] and calls_of(calls) == [("f", {})]
    stream = tool_stream(None, "mistral")
    assert stream.feed("Plain words, [not a call] here") == ("Plain words, [not a call] here", [])
    assert stream.finish() == ("", [])
    stream = tool_stream(None, "mistral")
    assert stream.feed("I") == ("I", [])                          # a first word of one letter
    assert stream.feed(" see") == (" see", [])
    assert stream.finish() == ("", [])
    stream = tool_stream(None, "mistral")
    assert stream.feed("[") == ("", [])                           # what may be a bare list waits
    assert stream.feed("a link](https://example.com) and") == ("[a link](https://example.com) and", [])
    assert stream.finish() == ("", [])


# ---------------------------------------------------------------- which family a model is

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if tools is not none and not tools_in_user_message %}
{{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}{{- "<|python_tag|>" + tool_call.name }}{%- endif %}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{%- for message in messages %}{%- if message.role == "ipython" or message.role == "tool" %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{%- endif %}{%- endfor %}"""
LLAMA32 = """{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- '{"name": function name, "parameters": dictionary of argument name and its value}' }}
{%- if message.role == "ipython" %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}{%- endif %}"""
QWEN25 = """{%- if tools %}{{- "# Tools\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
{{- "</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags" }}
{%- endif %}{%- if message.role == "ipython" %}{%- endif %}"""
MISTRAL = """{%- if tools is not none and (message == user_messages[-1]) %}
{{- "[AVAILABLE_TOOLS] [" }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- "[/AVAILABLE_TOOLS]" }}
{%- endif %}{%- if message.tool_calls is defined %}{{- "[TOOL_CALLS] [" }}{%- endif %}"""
MISTRAL_NEW = """{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}
{%- for message in messages %}{%- if message.tool_calls %}{%- for call in message.tool_calls %}
{{- call.function.name }}[ARGS]{{ call.function.arguments }}{%- endfor %}{%- endif %}{%- endfor %}"""
HERMES_PARAMETERS = """{%- if tools %}<tools>{%- for tool in tools %}{"name": "{{ tool.function.name }}", \
"parameters": {{ tool.function.parameters | tojson }}}{%- endfor %}</tools>
Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>{%- endif %}
{%- for message in messages %}{%- if message.role in ("tool", "ipython") %}<tool_response>{{ message.content }}\
</tool_response>{%- endif %}{%- endfor %}"""
TOOLS_NO_FORM = """{%- if tools %}Functions: {%- for tool in tools %}{"name": "{{ tool.function.name }}", \
"parameters": {{ tool.function.parameters | tojson }}}{%- endfor %}{%- endif %}
{%- for message in messages %}{{ message.role }}: {{ message.content }}{%- endfor %}"""
LLAMA3_NO_TOOLS = """{%- for message in messages %}<|start_header_id|>{{ message.role }}<|end_header_id|>
{%- if message.role == "ipython" %}<|python_tag|>{%- endif %}{{ message.content }}<|eot_id|>{%- endfor %}"""
SMOLLM2 = """{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"""


@pytest.mark.parametrize("template, vocabulary, family", [
    (LLAMA31, (), "llama3_json"),
    (LLAMA32, (), "llama3_json"),
    (QWEN25, (), "hermes"),
    (MISTRAL, (), "mistral"),
    (MISTRAL_NEW, {"[TOOL_CALLS]", "[ARGS]"}, "mistral"),        # the marker in its vocabulary alone
    (SMOLLM2, (), "hermes"),               # renders no tools: agp's own prompt asks for <tool_call>
    (SMOLLM2, {"[TOOL_CALLS]"}, "mistral"),
    (None, (), "hermes"),
    (HERMES_PARAMETERS, (), "hermes"),     # its own <tool_call> decides, "parameters" and ipython aside
    (TOOLS_NO_FORM, (), "hermes"),         # renders tools, names no form of call
    (LLAMA3_NO_TOOLS, (), "hermes"),       # renders no tools: agp's own prompt asks for <tool_call>
])
def test_the_family_is_told_from_the_chat_template_and_vocabulary(template, vocabulary, family):
    assert tool_parser_for(template, vocabulary) == family
    assert family in PARSERS


# ---------------------------------------------------------------- agp serve --tool-call-parser

def test_serve_takes_vllms_parser_names_and_refuses_another_naming_those_it_reads(capsys):
    from pipeline_dsl import cli

    for name in ("auto", "hermes", "llama3_json", "mistral"):
        args = cli.build_parser(["serve"]).parse_args(["serve", "examples/chat.agp", "--tool-call-parser", name])
        assert args.tool_call_parser == name
    assert cli.build_parser(["serve"]).parse_args(["serve", "examples/chat.agp"]).tool_call_parser == "auto"
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "examples/chat.agp", "--tool-call-parser", "pythonic"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tool-call-parser: agp has no tool-call parser 'pythonic'; it reads hermes, llama3_json, mistral" in err
    assert "is vLLM's" not in err


# ---------------------------------------------------------------- through a served model

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"]}}}
LLAMA_TEMPLATE = ("{% if tools %}Environment: ipython\nCall a function as "
                  '{"name": function name, "parameters": dictionary of argument name and its value}'
                  "{% for t in tools %}{{ t | tojson }}{% endfor %}\n{% endif %}"
                  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")


def _answer(client, said: str, stream: bool = False, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "add 1 and 2"}], max_tokens=300, tools=[ADD],
        stream=stream, extra_body={"guided_choice": [said]}, **kw)


def _assembled(chunks) -> tuple[str, list, set]:
    content, calls, reasons = "", {}, set()
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons.add(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                calls.setdefault(tc.index, ["", ""])
                calls[tc.index][0] += tc.function.name or ""
                calls[tc.index][1] += tc.function.arguments or ""
    return content, [tuple(v) for _, v in sorted(calls.items())], reasons - {None}


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llguidance")
    from test_serve import LiveServer
    from tiny_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf", context=4096, embed_scale=0.3)
    s = LiveServer(path, max_batch_size=4, batch_timeout_s=0.001,
                   overrides={"kv_budget_bytes": 8 << 20, "chat_template": LLAMA_TEMPLATE})
    yield s
    s.close()


def test_a_model_whose_template_asks_for_bare_json_gets_its_calls_parsed_streamed_or_not(llama_server):
    """Its family told from its chat template (no flag): Llama's bare JSON calls come back as
    tool_calls with finish_reason tool_calls, and a stream of the same answer assembles to them."""
    said = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}'
    whole = _answer(llama_server.client, said).choices[0]
    assert whole.finish_reason == "tool_calls" and not whole.message.content
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    content, streamed_calls, reasons = _assembled(_answer(llama_server.client, said, stream=True))
    assert content == "" and streamed_calls == calls and reasons == {"tool_calls"}
    one = _answer(llama_server.client, said, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["add"]


def test_malformed_bare_json_stays_content_with_finish_reason_stop(llama_server):
    said = '{"name": "add", "parameters": {"a": 1, "b": 2} oops'
    whole = _answer(llama_server.client, said).choices[0]
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == (said, None, "stop")
    assert _assembled(_answer(llama_server.client, said, stream=True)) == (said, [], {"stop"})


def test_a_forced_call_is_read_in_the_form_the_decoder_wrote_it_whatever_the_family(llama_server):
    """tool_choice "required" (or a named function) has the constrained decoder write the call
    as `<tool_call>[...]</tool_call>`: a Llama-family model's forced call still comes back parsed."""
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "add"}], max_tokens=300, tools=[ADD],
                  tool_choice=choice)
        reason = "tool_calls" if choice == "required" else "stop"      # a named choice's, as OpenAI's and vLLM's
        whole = llama_server.client.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == reason and whole.message.tool_calls[0].function.name == "add"
        content, calls, reasons = _assembled(llama_server.client.chat.completions.create(stream=True, **kw))
        assert calls and calls[0][0] == "add" and reasons == {reason}


def test_the_responses_api_reads_the_model_s_family_too(llama_server):
    import httpx

    said = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'
    body = {"model": "tiny", "input": "add 1 and 2", "max_output_tokens": 300,
            "tools": [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}],
            "guided_choice": [said]}
    r = httpx.post(llama_server.url + "/v1/responses", json=body, timeout=120)
    assert r.status_code == 200, r.text
    [item] = r.json()["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"])) == ("function_call", "add", {"a": 1, "b": 2})
    with httpx.stream("POST", llama_server.url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    [done] = [e for e in events if e["type"] == "response.completed"]
    assert [(i["type"], i["name"], i["arguments"]) for i in done["response"]["output"]] == \
        [("function_call", "add", item["arguments"])]


def _run_lines(server, overrides: dict, *bodies: dict) -> list[dict]:
    """Request lines through `agp run`'s driver on the server's pipeline (a runtime of its own)."""
    from pathlib import Path

    return flowkit.run_lines(Path(server.dir) / "tiny.agp", bodies, {"kv_budget_bytes": 8 << 20, **overrides})


def test_agp_run_lines_read_the_family_of_the_model_or_the_one_named(llama_server):
    def line(said):
        return {"messages": [{"role": "user", "content": "add"}], "max_tokens": 300, "tools": [ADD],
                "guided_choice": [said]}

    llama = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    mistral = 'Adding. [TOOL_CALLS]add[ARGS]{"a": 3, "b": 4}'
    a, b = _run_lines(llama_server, {"chat_template": LLAMA_TEMPLATE}, line(llama), line(mistral))
    assert a["finish_reason"] == "tool_calls" and calls_of(a["tool_calls"]) == [("add", {"a": 1, "b": 2})]
    assert (b["text"], b["finish_reason"], b.get("tool_calls")) == (mistral, "stop", None)
    [c] = _run_lines(llama_server, {"chat_template": LLAMA_TEMPLATE, "tool_call_parser": "mistral"}, line(mistral))
    assert (c["text"], c["finish_reason"], calls_of(c["tool_calls"])) == ("Adding. ", "tool_calls",
                                                                           [("add", {"a": 3, "b": 4})])


# ------------------------------------------- a pipeline whose generate stages' models differ

@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    """A pipeline of two generate stages whose models write calls differently: hermes_gen's (the
    pipeline's model: a template that takes no tools, hermes) and llama_gen's (Llama's template:
    llama3_json). A request that names neither goes to llama_gen."""
    pytest.importorskip("llguidance")
    from flowkit import chain, write
    from test_serve import LiveServer
    from tiny_model import write_tiny_gguf

    where = tmp_path_factory.mktemp("two_families")
    hermes = write_tiny_gguf(where / "hermes.gguf", context=4096, embed_scale=0.3)
    llama = write_tiny_gguf(where / "llama.gguf", context=4096, embed_scale=0.3, chat_template=LLAMA_TEMPLATE)
    body = (f"stage request : requests {{}}\nstage route : route {{}}\nstage hermes_gen : generate {{}}\n"
            f"stage llama_gen : generate {{ model = \"{llama}\" }}\nstage out : respond {{}}\n"
            "request -> route\nroute -> batch_l otherwise\nroute -> batch_h when prompt_tokens > 100000\n"
            + chain("llama_gen", "batch_l", "enc_l", "kv_l") + chain("hermes_gen", "batch_h", "enc_h", "kv_h")
            + "llama_gen -> out\nhermes_gen -> out\n")
    s = LiveServer(hermes, text=write(where, hermes, body).read_text(), stages=("hermes_gen", "llama_gen"),
                   overrides={"kv_budget_bytes": 8 << 20})
    yield s
    s.close()


def test_serve_reads_an_answer_s_calls_in_the_form_of_the_stage_that_wrote_it(two_families):
    """The form a choice's calls are read in is that of the generate stage that answered it (its
    generated_by), as `agp run` reads it, not the pinned stage's or the pipeline's model's: an
    unpinned request that llama_gen answers has its bare JSON call parsed, whole and streamed,
    chat and Responses, and a request pinned to hermes_gen its `<tool_call>` block."""
    import httpx

    client, url = two_families.client, two_families.url
    for model, said in [("tiny", '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
                        ("llama_gen", '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
                        ("hermes_gen", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')]:
        kw = dict(model=model, messages=[{"role": "user", "content": "add 1 and 2"}], max_tokens=300, tools=[ADD],
                  extra_body={"guided_choice": [said]})
        whole = client.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "tool_calls" and not whole.message.content, (model, whole)
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2})], model
        assert _assembled(client.chat.completions.create(stream=True, **kw)) == ("", calls, {"tool_calls"}), model
        body = {"model": model, "input": "add 1 and 2", "max_output_tokens": 300, "guided_choice": [said],
                "tools": [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}]}
        r = httpx.post(url + "/v1/responses", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [(i["type"], i["name"], json.loads(i["arguments"])) for i in r.json()["output"]] == \
            [("function_call", "add", {"a": 1, "b": 2})], model
        with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        [done] = [e for e in events if e["type"] == "response.completed"]
        assert [(i["type"], i["name"], json.loads(i["arguments"])) for i in done["response"]["output"]] == \
            [("function_call", "add", {"a": 1, "b": 2})], model


# ------------------------------------------- markers that are special tokens of the vocabulary

def test_content_never_shows_a_family_s_marker_whole_or_streamed():
    """An answer decoded with its markers kept (they are special tokens) that holds no call:
    the markers' text is no part of its content (as vLLM's parsers strip them)."""
    for parser, text, content in [
            ("mistral", '[TOOL_CALLS]f[ARGS]{"a": ', 'f{"a": '),
            ("mistral", 'So [TOOL_CALLS][{"name": "f"', 'So [{"name": "f"'),
            ("llama3_json", 'Hi.<|python_tag|>print("hi")', 'Hi.print("hi")')]:
        assert parse_tool_calls(text, None, parser) == (content, [])
        assert streamed(parser, list(text)) == (content, [])


MARKED = ("[TOOL_CALLS]", "[ARGS]", "<|python_tag|>")


@pytest.fixture(scope="module")
def marked_servers(tmp_path_factory):
    """A model whose vocabulary has Mistral's and Llama's markers as special tokens, served with
    its family told from its vocabulary (mistral) and named (llama3_json)."""
    pytest.importorskip("llguidance")
    from test_serve import LiveServer
    from tiny_model import tiny_vocab, write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("marked") / "tiny.gguf", context=4096, embed_scale=0.3,
                           control_tokens=MARKED)
    first = len(tiny_vocab()[0])
    ids = {m: first + i for i, m in enumerate(MARKED)}
    servers = {"mistral": LiveServer(path, max_batch_size=4, batch_timeout_s=0.001,
                                     overrides={"kv_budget_bytes": 8 << 20})}
    try:
        servers["llama3_json"] = LiveServer(path, max_batch_size=4, batch_timeout_s=0.001, overrides={
            "kv_budget_bytes": 8 << 20, "chat_template": LLAMA_TEMPLATE, "tool_call_parser": "llama3_json"})
        yield servers, ids
    finally:
        for s in servers.values():
            s.close()


def _forced(ids: dict, *parts: str) -> str:
    """A Lark grammar that is `parts` in order: a marker as its special token, text as written."""
    return "start: " + " ".join(f"<[{ids[p]}]>" if p in ids else json.dumps(p) for p in parts)


def _said(client, grammar: str, stream: bool = False, tools=True, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "add 1 and 2"}], max_tokens=300,
        stream=stream, extra_body={"guided_grammar": grammar, **kw.pop("extra", {})},
        **({"tools": [ADD]} if tools else {}), **kw)


@pytest.mark.parametrize("parser, parts, content", [
    ("mistral", ("Sure. ", "[TOOL_CALLS]", "add", "[ARGS]", '{"a": 1, "b": 2}'), "Sure. "),
    ("mistral", ("[TOOL_CALLS]", "add", "[ARGS]", '{"a": 1, "b": 2}'), None),
    ("llama3_json", ("Let me add.", "<|python_tag|>", '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
     "Let me add."),
])
def test_a_call_after_a_special_token_marker_is_parsed_streamed_or_not(marked_servers, parser, parts, content):
    """The marker is a special token, which an answer's text leaves out by default: a request
    with tools keeps it for the parser (Mistral's `name[ARGS]{…}`, text before Llama's tag)."""
    servers, ids = marked_servers
    client, grammar = servers[parser].client, _forced(ids, *parts)
    whole = _said(client, grammar).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == \
        [("add", {"a": 1, "b": 2})]
    got, calls, reasons = _assembled(_said(client, grammar, stream=True))
    assert got == (content or "") and [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2})]
    assert reasons == {"tool_calls"}


def test_a_marker_kept_for_the_parser_never_shows_in_content(marked_servers):
    servers, ids = marked_servers
    grammar = _forced(ids, "Hm ", "[TOOL_CALLS]", "add", "[ARGS]", '{"a": ')       # no call after all
    whole = _said(servers["mistral"].client, grammar).choices[0]
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == ('Hm add{"a": ', None, "stop")
    assert _assembled(_said(servers["mistral"].client, grammar, stream=True)) == ('Hm add{"a": ', [], {"stop"})


def test_the_request_s_own_skip_special_tokens_and_no_tools_keep_the_default(marked_servers):
    """Only a request with tools, under a family whose marker is special, leaving
    skip_special_tokens to agp, has special tokens kept: the client's own flag is respected."""
    servers, ids = marked_servers
    client = servers["mistral"].client
    grammar = _forced(ids, "[TOOL_CALLS]", "add", "[ARGS]", '{"a": 1, "b": 2}')
    own = _said(client, grammar, extra={"skip_special_tokens": True}).choices[0]
    assert (own.message.content, own.message.tool_calls) == ('add{"a": 1, "b": 2}', None)
    plain = _said(client, grammar, tools=False).choices[0]
    assert plain.message.content == 'add{"a": 1, "b": 2}'
    none = _said(client, grammar, tool_choice="none").choices[0]
    assert (none.message.content, none.message.tool_calls) == ('add{"a": 1, "b": 2}', None)
    kept = _said(client, grammar, tools=False, extra={"skip_special_tokens": False}).choices[0]
    assert kept.message.content == '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}'


def test_agp_run_lines_keep_the_marker_for_the_parser_and_out_of_the_text(marked_servers):
    servers, ids = marked_servers

    def line(*parts):
        return {"messages": [{"role": "user", "content": "add"}], "max_tokens": 300, "tools": [ADD],
                "guided_grammar": _forced(ids, *parts)}

    a, b = _run_lines(servers["mistral"], {}, line("Adding. ", "[TOOL_CALLS]", "add", "[ARGS]", '{"a": 3, "b": 4}'),
                      line("Hm ", "[TOOL_CALLS]", "add", "[ARGS]", '{"a": '))
    assert (a["text"], a["finish_reason"], calls_of(a["tool_calls"])) == ("Adding. ", "tool_calls",
                                                                           [("add", {"a": 3, "b": 4})])
    assert (b["text"], b["finish_reason"], b.get("tool_calls")) == ('Hm add{"a": ', "stop", None)


def test_the_responses_api_keeps_the_marker_for_the_parser_too(marked_servers):
    import httpx

    servers, ids = marked_servers
    url = servers["mistral"].url + "/v1/responses"
    body = {"model": "tiny", "input": "add 1 and 2", "max_output_tokens": 300,
            "tools": [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}],
            "guided_grammar": _forced(ids, "[TOOL_CALLS]", "add", "[ARGS]", '{"a": 1, "b": 2}')}
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    [item] = r.json()["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"])) == ("function_call", "add", {"a": 1, "b": 2})
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    [done] = [e for e in events if e["type"] == "response.completed"]
    assert [(i["type"], i["name"]) for i in done["response"]["output"]] == [("function_call", "add")]


@pytest.mark.parametrize("parser", PARSERS)
def test_an_answer_of_white_space_alone_is_its_content_as_written(parser):
    """No calls in it: the answer is the content, streamed or not, its white space kept (not
    turned into no content)."""
    for text in ("", " ", "\n\n", " \t "):
        assert parse_tool_calls(text, None, parser) == (text, [])
        assert streamed(parser, list(text)) == (text, [])


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_a_template_that_does_not_take_tools_gets_them_in_one_system_message_first():
    """A template that does not render `tools` gets them listed in a system message: the
    conversation's own system message goes on after the listing, in that one message; tool_choice
    "required" and a named function add what the answer must do, "none" still lists them."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    auto = prepare_messages(chat, [WEATHER_TOOL], template_takes_tools=False)
    assert [m["role"] for m in auto] == ["system", "user"]
    assert '<tools>[{"name": "weather"' in auto[0]["content"] and auto[0]["content"].endswith("\n\nBe brief.")
    assert "at least one function call" not in auto[0]["content"]
    required = prepare_messages(chat, [WEATHER_TOOL], template_takes_tools=False, choice="required")
    assert required[0]["content"].startswith(auto[0]["content"].removesuffix("\n\nBe brief."))
    assert "Answer with at least one function call." in required[0]["content"]
    named = prepare_messages(chat[1:], [WEATHER_TOOL], template_takes_tools=False,
                             choice={"type": "function", "function": {"name": "weather"}})
    assert [m["role"] for m in named] == ["system", "user"] and "Call the function weather." in named[0]["content"]
    assert prepare_messages(chat, [WEATHER_TOOL], template_takes_tools=False, choice="none") == auto


def test_an_earlier_call_is_written_after_its_message_s_text_with_its_arguments_as_json():
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Let me look.", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c", "content": "cold"}]
    [_, said, result] = prepare_messages(history, None, template_takes_tools=False)
    assert said == {"role": "assistant", "content": 'Let me look.\n<tool_call>[{"name": "weather", "arguments": '
                                                    '{"city": "Oslo"}}]</tool_call>'}
    assert result == {"role": "tool", "content": "cold"}


@pytest.mark.parametrize("template, takes", [
    ("{% if tools %}{{ tools | tojson }}{% endif %}", True),
    ("{%- for t in tools -%}{{ t.function.name }}{%- endfor -%}", True),
    ("{{ messages[0].content }}{% if use_tools_note %}!{% endif %}", False),
    ("{{ messages[0].content }} (no toolset here)", False),
    (None, False),
])
def test_a_template_takes_tools_where_it_names_the_variable(template, takes):
    assert template_takes_tools(template) is takes


HISTORY = [{"role": "user", "content": "hi"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "c", "content": "cold"}]


def test_a_conversation_s_tools_and_calls_reach_the_prompt_whether_or_not_its_template_takes_tools(tiny_gguf):
    """A template that names `tools` gets the request's tools and the calls as OpenAI sends them;
    one that does not gets the calls written into the text (with or without tools in the request)."""
    from pipeline_dsl.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32"))
    tok = engine.tokenizer
    tok.set_chat_template("{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}|"
                          "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                          "{% for c in m.tool_calls or [] %}{{ c.function.name }}{% endfor %};{% endfor %}")
    assert tok.decode(engine.prompt_ids(messages=HISTORY, tools=[WEATHER_TOOL])) == \
        "weather|user:hi;assistant:weather;tool:cold;"
    tok.set_chat_template("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    call = '<tool_call>[{"name": "weather", "arguments": {}}]</tool_call>'
    assert tok.decode(engine.prompt_ids(messages=HISTORY)) == f"user:hi;assistant:{call};tool:cold;"


# a tool-use template as Qwen2.5's, Hermes' and Llama 3.1's write an earlier call: its arguments `| tojson`
TOJSON_TEMPLATE = ("{% for m in messages %}{% for c in m.tool_calls or [] %}"
                   "<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
                   "</tool_call>{% endfor %}{% endfor %}{{ tools | length }}")


@pytest.mark.parametrize("arguments, written", [('{"city": "Paris"}', '{"city": "Paris"}'), ("", "{}"), (None, "{}"),
                                                ("not json", '"not json"')])
def test_a_template_that_takes_tools_gets_an_earlier_call_s_arguments_as_the_object_they_hold(arguments, written):
    """vLLM hands a tool-use chat template each earlier call's arguments parsed (its chat_utils'
    _postprocess_messages; none or "" as {}), as transformers' templates expect: `| tojson` on the
    client's string wrote it quoted again, "{\\"city\\": ...}". A string that is no JSON stays one;
    the client's messages are left as they were."""
    from pipeline_dsl.engine.tokenizer import compile_chat_template

    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]
    sent = json.loads(json.dumps(history))
    prepared = prepare_messages(history, [WEATHER_TOOL], template_takes_tools=True)
    assert history == sent
    text = compile_chat_template(TOJSON_TEMPLATE).render(messages=prepared, tools=[WEATHER_TOOL])
    assert text == f'<tool_call>{{"name": "get_weather", "arguments": {written}}}</tool_call>1'


@pytest.mark.parametrize("takes_tools", [True, False])
def test_an_earlier_call_with_empty_arguments_reaches_either_prompt_as_an_empty_object(takes_tools):
    """An arguments string of "" (a call of a function without parameters, as some clients send
    it) is {} in the prompt, as vLLM gives it, in agp's own tool prompt as in a template's."""
    history = [{"role": "user", "content": "time?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                                     "function": {"name": "now", "arguments": ""}}]}]
    [_, said] = prepare_messages(history, None, template_takes_tools=takes_tools)
    if takes_tools:
        assert said["tool_calls"][0]["function"]["arguments"] == {}
    else:
        assert said["content"] == '<tool_call>[{"name": "now", "arguments": {}}]</tool_call>'
