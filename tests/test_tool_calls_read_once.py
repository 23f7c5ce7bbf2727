"""An answer's tool calls are read once, where its generate stage reads them for the python
stages after it (`tool_calls` on the Generated result): agp serve's chat and Responses answers
and `agp run`'s lines give those same calls, ids and all, so a pipeline that logs or runs a call
by its id names the one the client gets. A stage that rewrites the answer's text gets the calls
of the text it wrote."""
from __future__ import annotations

import json

import pytest

import flowkit
from flowkit import chain, write

HOOKS = '''
import json
import pathlib

SEEN = pathlib.Path(__file__).with_name("seen.jsonl")

def note(result):
    """Write down the ids of the calls this stage sees; rewrite the answer where asked."""
    with SEEN.open("a", encoding="utf-8") as f:
        f.write(json.dumps([result["id"], [c["id"] for c in result.get("tool_calls") or []]]) + "\\n")
    rewrite = result["request"].get("metadata", {}).get("rewrite")
    if rewrite:
        result["text"] = rewrite
    return result
'''
TEMPLATE = ("{% if tools %}Environment: ipython\nCall a function as "
            '{"name": function name, "parameters": dictionary of argument name and its value}\n{% endif %}'
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
SAID = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'
REWRITTEN = '<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}'


@pytest.fixture
def pipeline(tmp_path):
    pytest.importorskip("llguidance")
    from tiny_model import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "llama.gguf", context=4096, embed_scale=0.3, chat_template=TEMPLATE)
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 200 }\n'
            'stage note : python { fn = "hooks:note" }\nstage out : respond {}\n'
            + chain().replace("budget = 2MiB", "budget = 8MiB")
            + "request -> batch\ngen -> note\nnote -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert flowkit.errors(path) == []
    return path


def seen(path) -> list[list]:
    """(request id, the ids of the calls the stage saw) each, in the order the stage saw them."""
    lines = (path.parent / "seen.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def args(call: dict) -> dict:
    return json.loads(call["function"]["arguments"])


def line(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "add"}], "max_tokens": 200, "tools": [ADD],
            "guided_choice": [SAID], **kw}


def test_agp_run_lines_give_the_calls_the_python_stages_saw(pipeline):
    plain, rewritten = flowkit.run_lines(pipeline, [line(), line(metadata={"rewrite": REWRITTEN})])
    ids = dict(seen(pipeline))[0]
    assert plain["finish_reason"] == "tool_calls" and [c["id"] for c in plain["tool_calls"]] == ids
    assert args(plain["tool_calls"][0]) == {"a": 1, "b": 2}
    [call] = rewritten["tool_calls"]                 # the text the stage wrote, read anew
    assert rewritten["finish_reason"] == "tool_calls" and args(call) == {"a": 5, "b": 6}


def test_the_stages_see_no_call_under_tool_choice_none_and_one_without_parallel_calls(pipeline):
    """The calls a python stage after generate sees are the answer's as its request allows them:
    none where tool_choice is "none" (the text is content), the first alone where
    parallel_tool_calls is false, every one otherwise."""
    two = SAID + '; {"name": "add", "parameters": {"a": 3, "b": 4}}'
    none, single, both = flowkit.run_lines(pipeline, [line(tool_choice="none"),
                                                      line(guided_choice=[two], parallel_tool_calls=False),
                                                      line(guided_choice=[two])])
    ids = dict(seen(pipeline))
    assert ids[0] == [] and not none.get("tool_calls") and none["text"] == SAID
    assert len(ids[1]) == 1 and [c["id"] for c in single["tool_calls"]] == ids[1]
    assert len(ids[2]) == 2 and [c["id"] for c in both["tool_calls"]] == ids[2]


def test_agp_serve_chat_and_responses_answers_give_the_calls_the_python_stages_saw(pipeline):
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve_flags import parse

    serving = build(parse([str(pipeline), "--threads", "1"], {}))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            chat = client.post("/v1/chat/completions", json={"model": model, **line()})
            assert chat.status_code == 200, chat.text
            [choice] = chat.json()["choices"]
            responses = client.post("/v1/responses", json={
                "model": model, "input": "add", "max_output_tokens": 200, "guided_choice": [SAID],
                "tools": [{"type": "function", "name": "add", "parameters": {"type": "object"}}]})
            assert responses.status_code == 200, responses.text
            rewritten = client.post("/v1/chat/completions",
                                    json={"model": model, **line(metadata={"rewrite": REWRITTEN})})
            assert rewritten.status_code == 200, rewritten.text
    finally:
        serving.runtime.close()
    (_, chat_ids), (_, responses_ids), _ = seen(pipeline)    # one request after another
    assert choice["finish_reason"] == "tool_calls"
    assert [c["id"] for c in choice["message"]["tool_calls"]] == chat_ids
    [item] = responses.json()["output"]
    assert (item["type"], item["call_id"], json.loads(item["arguments"])) == ("function_call", *responses_ids,
                                                                               {"a": 1, "b": 2})
    [call] = rewritten.json()["choices"][0]["message"]["tool_calls"]
    assert args(call) == {"a": 5, "b": 6}


@pytest.mark.parametrize("policy", ["first", "longest"])
def test_the_calls_of_an_answer_that_went_through_a_fan_out_and_a_join_are_the_ones_its_stages_saw(tmp_path, policy):
    """A fan-out after generate copies the answer to each branch with what its generate stage read,
    and a join's answer (the text of one of its branches) keeps that branch's read: the answer's
    calls are those the branches' python stages saw, ids and all (a copy read its text again,
    with new ids)."""
    pytest.importorskip("llguidance")
    from tiny_model import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "llama.gguf", context=4096, embed_scale=0.3, chat_template=TEMPLATE)
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 200 }\n'
            'stage a : python { fn = "hooks:note" }\nstage b : python { fn = "hooks:note" }\n'
            f'stage j : join {{ policy = {policy} }}\nstage out : respond {{}}\n'
            + chain().replace("budget = 2MiB", "budget = 8MiB")
            + "request -> batch\ngen -> a\ngen -> b\na -> j\nb -> j\nj -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert flowkit.errors(path) == []
    [answer] = flowkit.run_lines(path, [line()])
    (_, a_ids), (_, b_ids) = seen(path)
    assert a_ids == b_ids and len(a_ids) == 1
    assert answer["finish_reason"] == "tool_calls" and [c["id"] for c in answer["tool_calls"]] == a_ids
