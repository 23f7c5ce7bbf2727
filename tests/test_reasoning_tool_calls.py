"""Under --reasoning-parser the tool calls the python stages after a generate stage see (the
Generated result's `tool_calls`) are read from the answer's content after `</think>`, as the
client's answer reads them: a `<tool_call>` the model wrote while thinking is reasoning text, run
by no tool stage, and the call after `</think>` reaches the stage and the client, the same call.

The tiny model cannot be made to write a call unconstrained, and a format would leave it no
thinking, so its vocabulary holds the whole answer as one token, which the request allows alone.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import flowkit
from flowkit import chain, write

transformers = pytest.importorskip("transformers")

THOUGHT = '<tool_call>{"name": "secret", "arguments": {}}</tool_call>'
SAID = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
ANSWER = f"maybe {THOUGHT}</think>{SAID}"
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
SECRET = {"type": "function", "function": {"name": "secret", "parameters": {"type": "object"}}}
HOOKS = '''
import json
import pathlib

SEEN = pathlib.Path(__file__).with_name("seen.jsonl")

def note(result):
    """Write down the calls this stage got, by request."""
    with SEEN.open("a", encoding="utf-8") as f:
        f.write(json.dumps([result["id"], [[c["id"], c["function"]["name"]] for c in result.get("tool_calls") or []]])
                + "\\n")
    return result
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen3 folder (tests/test_qwen3_chat.py's) whose vocabulary also holds ANSWER whole,
    an added token (not special: the answer's text keeps it); its id."""
    from tokenizers import AddedToken

    from pipeline_dsl.engine.models import load_model
    from test_model_families import save_folder
    from test_qwen3_chat import QWEN3_TEMPLATE
    from tiny_model import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "qwen3.gguf", arch="qwen3")
    tk = load_model(str(gguf), dtype="fp32")[1].tk
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>", ANSWER)])
    src = SimpleNamespace(tk=tk, vocab_size=tk.get_vocab_size(with_added_tokens=True), chat_template=QWEN3_TEMPLATE)
    path = save_folder(tmp_path_factory.mktemp("qwen3"), src, cls="Qwen3Config", head_dim=32,
                       tie_word_embeddings=True, eos_token_id=2, max_position_embeddings=1024)
    return path, tk.token_to_id(ANSWER)


@pytest.fixture
def pipeline(tmp_path, folder):
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 8 }\n'
            'stage note : python { fn = "hooks:note" }\nstage out : respond {}\n'
            + chain() + "request -> batch\ngen -> note\nnote -> out\n")
    path = write(tmp_path, folder[0], body, hooks=HOOKS)
    assert flowkit.errors(path) == []
    return path


def line(rid: str, answer: int, **kw) -> dict:
    """A chat line whose answer is ANSWER: its one token, allowed alone."""
    return {"id": rid, "messages": [{"role": "user", "content": "add"}], "tools": [ADD, SECRET], "max_tokens": 1,
            "allowed_token_ids": [answer], **kw}


def seen(path) -> dict:
    """request id -> [(call id, function name)] the stage got."""
    lines = (path.parent / "seen.jsonl").read_text(encoding="utf-8").splitlines()
    return {rid: [tuple(c) for c in calls] for rid, calls in map(json.loads, lines)}


def test_a_call_written_while_thinking_reaches_no_stage_and_the_one_after_it_does(pipeline, folder):
    thinking, off = flowkit.run_lines(pipeline, [line("thinks", folder[1]),
                                                 line("off", folder[1],
                                                      chat_template_kwargs={"enable_thinking": False})],
                                      {"reasoning_parser": "qwen3"})
    got = seen(pipeline)
    assert thinking["reasoning"] == f"maybe {THOUGHT}" and thinking["usage"]["reasoning_tokens"] == 1
    assert [name for _, name in got["thinks"]] == ["add"]          # the call in the thinking is not run
    assert thinking["finish_reason"] == "tool_calls"
    assert [(c["id"], c["function"]["name"]) for c in thinking["tool_calls"]] == got["thinks"]   # the same call
    # thinking off: the whole answer is content, and both calls are read, by the stage and the client alike
    assert off["reasoning"] is None and [name for _, name in got["off"]] == ["secret", "add"]
    assert [(c["id"], c["function"]["name"]) for c in off["tool_calls"]] == got["off"]


def test_without_a_reasoning_parser_the_stage_gets_every_call_in_the_text(pipeline, folder):
    [plain] = flowkit.run_lines(pipeline, [line("plain", folder[1])])
    got = seen(pipeline)
    assert [name for _, name in got["plain"]] == ["secret", "add"]
    assert [(c["id"], c["function"]["name"]) for c in plain["tool_calls"]] == got["plain"]


def test_after_a_fan_out_and_a_join_the_answer_gives_the_call_the_branches_got(tmp_path, folder):
    """A join's answer (one branch's text) keeps what its generate stage read, the content's call:
    the client's is the one the branches' stages got, id and all, not the text read again."""
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 8 }\n'
            'stage a : python { fn = "hooks:note" }\nstage b : python { fn = "hooks:note" }\n'
            'stage j : join { policy = first }\nstage out : respond {}\n'
            + chain() + "request -> batch\ngen -> a\ngen -> b\na -> j\nb -> j\nj -> out\n")
    path = write(tmp_path, folder[0], body, hooks=HOOKS)
    assert flowkit.errors(path) == []
    [answer] = flowkit.run_lines(path, [line("joined", folder[1])], {"reasoning_parser": "qwen3"})
    lines = (path.parent / "seen.jsonl").read_text(encoding="utf-8").splitlines()
    (_, a), (_, b) = map(json.loads, lines)
    assert a == b and [name for _, name in a] == ["add"]
    assert [[c["id"], c["function"]["name"]] for c in answer["tool_calls"]] == a
