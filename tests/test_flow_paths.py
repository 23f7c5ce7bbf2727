"""Whole pipelines on the tiny model, each holding a promise of the runtime that the table tests
(test_flow_edges.py) cannot: a join after a bounded loop keeps the turns its branches took, each
copy of a fan-out counts its own turns round a loop, the prompt a condition counted is read again
once a later stage changes it, the choices of a fan-out inside a fan-out come in branch order
whatever order they arrive in (through a second generate stage too), an echo that generates
nothing still counts its prompt, and a join without a policy takes the first result."""
from __future__ import annotations

import pytest

import flowkit
from flowkit import chain, chat, errors, run, write

HOOKS = '''
import flowkit

def again(item):
    req = dict(item["request"])
    req["messages"] = req["messages"] + [{"role": "assistant", "content": item["text"]},
                                         {"role": "user", "content": "again"}]
    return req

def mark(letter):
    def fn(item):
        if letter == "P":                 # the first branch goes on after the second has answered
            flowkit.gate("t").wait(30)
        item["text"] += letter
        if letter == "T":
            flowkit.gate("t").set()
        return item
    return fn

p, q, r, t = (mark(x) for x in "PQRT")

def odd_one_first(item):
    # the first call answers "odd" at once; the others answer "even" once it reached the join
    if flowkit.bump("odd") == 1:
        item["text"] = "odd"
    else:
        flowkit.gate("even").wait(60)
        item["text"] = "even"
    return item

def round_again(item):
    flowkit.bump("round")
    return "again"

def rounds(item):
    return {"text": "done"}
'''


def test_a_join_after_a_loop_keeps_the_turns_its_branches_took(tmp_path, soft_gguf):
    """gen (n = 2) -> tool (max_turns = 1, back to gen once) -> vote: the merged result has
    taken one turn, as each of its branches had, and a `turn` condition after the join reads it."""
    body = ("stage request : requests {}\n"
            "stage gen : generate { n = 2  temperature = 1.0  seed = 5  max_new_tokens = 2 }\n"
            "stage tool : python { fn = \"hooks:again\"  returns = any  max_turns = 1 }\n"
            "stage vote : join { policy = first }\n"
            "stage looped : respond {}\nstage straight : respond {}\n"
            "request -> batch\n" + chain() + "gen -> tool\ntool -> batch\ntool -> vote\n"
            "vote -> looped when turn == 1\nvote -> straight otherwise\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hello", max_tokens=None)])
    assert res.ok, res.error
    stages = rt.stats()["stages"]
    assert stages["gen"]["items_in"] == 4 and stages["vote"]["items_in"] == 2
    assert stages["looped"]["items_in"] == 1 and stages["straight"]["items_in"] == 0


def test_each_branch_of_a_fan_out_counts_its_own_turns_round_a_bounded_loop(tmp_path, soft_gguf, fresh_flowkit):
    """max_turns bounds the calls made for each item's path: two copies made before the loop go
    round it max_turns times each, not max_turns between them."""
    body = ("stage request : requests {}\nstage a : route {}\nstage b : route {}\nstage back : route {}\n"
            "stage tool : python { fn = \"hooks:round_again\"  max_turns = 2 }\n"
            "stage answer : python { fn = \"hooks:rounds\"  returns = generated }\nstage out : respond {}\n"
            "request -> a\nrequest -> b\na -> tool\nb -> tool\n"
            "tool -> back when again\ntool -> answer otherwise\nback -> tool\nanswer -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hello")])
    assert res.ok, res.error
    assert len(res.choices) == 2
    assert flowkit.COUNTS["round"] == 4                       # two calls on each branch
    assert rt.stats()["stages"]["tool"]["items_in"] == 6      # and a third arrival each, that leaves


def test_the_model_gets_the_prompt_as_changed_after_a_condition_counted_it(tmp_path, soft_gguf):
    """route reads prompt_tokens (the prompt is tokenised then), system_prompt then puts a
    message first: the engine tokenises the changed prompt, not the one the route counted."""
    body = ("stage request : requests {}\nstage r : route {}\n"
            "stage system : system_prompt { text = \"Answer in one short sentence, please.\" }\n"
            "stage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n"
            "request -> r\nr -> system when prompt_tokens > 0\nr -> batch otherwise\nsystem -> batch\n"
            "gen -> out\n" + chain())
    path = write(tmp_path, soft_gguf, body)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hello")])
    assert res.ok, res.error
    request = res.choices[0].data["request"]
    assert request["messages"][0]["role"] == "system"
    assert res.usage["prompt_tokens"] == len(rt.tokenise(request))


@pytest.mark.usefixtures("fresh_flowkit")
def test_choices_of_a_fan_out_inside_a_fan_out_come_in_branch_order(tmp_path, soft_gguf):
    """gen -> p and gen -> t; p -> q and p -> r: the answer's choices are q's, r's, t's, in the
    order of the edges that made them, whichever reached respond first (t's does, here)."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\n"
            + "".join(f"stage {x} : python {{ fn = \"hooks:{x}\" }}\n" for x in "pqrt")
            + "stage out : respond {}\nrequest -> batch\n" + chain()
            + "gen -> p\ngen -> t\np -> q\np -> r\nq -> out\nr -> out\nt -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), _ = run(path, [chat("a", "hello")])
    assert res.ok, res.error
    assert [c.index for c in res.choices] == [0, 1, 2]
    tails = [c.text[-2:] for c in res.choices]
    assert tails[:2] == ["PQ", "PR"] and tails[2][-1] == "T"


def test_an_echo_without_tokens_to_generate_counts_its_prompt(tmp_path, soft_gguf):
    """echo with max_tokens = 0 (a prompt scored, not continued) is answered without the engine
    stepping: its usage still counts the prompt's tokens, and nothing generated."""
    from pipeline_dsl.requests_io import parse_request

    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> out\n")
    path = write(tmp_path, soft_gguf, body)
    item = parse_request({"id": "a", "prompt": "hello world", "echo": True, "max_tokens": 0}).item()
    (res,), rt = run(path, [item])
    assert res.ok, res.error
    assert res.usage["prompt_tokens"] == len(rt.tokenise(item)) > 0
    assert res.usage["completion_tokens"] == 0 and res.choices[0].finish_reason == "length"


@pytest.mark.usefixtures("fresh_flowkit")
def test_a_join_without_a_policy_takes_the_first_result_to_arrive(tmp_path, soft_gguf):
    """join {} is policy = first (docs/language.md): of "odd", "even", "even", odd arrived first
    and is the answer, where a majority would have been "even"."""
    body = ("stage request : requests {}\nstage gen : generate { n = 3  max_new_tokens = 2 }\n"
            "stage f : python { fn = \"hooks:odd_one_first\" }\nstage vote : join {}\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> f -> vote -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hello")], open_when=("vote", "even"))   # the other branch goes on after
    assert res.ok, res.error
    assert res.choices[0].text == "odd"
    assert sorted(b["text"] for b in res.choices[0].data["branches"]) == ["even", "even", "odd"]


@pytest.mark.usefixtures("fresh_flowkit")
def test_refined_drafts_answer_in_their_drafts_order_whatever_order_they_reach_the_second_model(tmp_path, soft_gguf):
    """gen (n = 2) -> refine -> gen2 -> out, draft 1 reaching gen2 before draft 0: the answer,
    sent whole, has draft i's refinement as choice i. A choice streamed straight from gen2 was
    numbered as it started there, so which refinement was choice 0 depended on which draft's
    python call ended first, and a seeded request's choices could swap from run to run."""
    n2 = {"n": 2, "temperature": 1.0, "seed": 5}
    plain = write(tmp_path, soft_gguf, "stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\n"
                  "stage out : respond {}\nrequest -> batch\n" + chain() + "gen -> out\n")
    (drafted,), _ = run(plain, [chat("a", "hello", max_tokens=None, **n2)])
    drafts = [c.text for c in drafted.choices]
    assert drafted.ok and len(set(drafts)) == 2
    hooks = HOOKS + f'''

def refine(item):
    if item["text"] == {drafts[0]!r}:      # draft 0 goes on once draft 1 has reached gen2
        flowkit.gate("second").wait(60)
    req = dict(item["request"])
    req["messages"] = req["messages"] + [{{"role": "assistant", "content": item["text"]}},
                                         {{"role": "user", "content": "better"}}]
    return req
'''
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\n"
            "stage refine : python { fn = \"hooks:refine\"  returns = request }\n"
            "stage gen2 : generate { max_new_tokens = 3 }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> refine -> batch2\n"
            + chain("gen2", "batch2", "enc2", "kv2") + "gen2 -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=hooks)
    assert errors(path) == []
    (res,), _ = run(path, [chat("a", "hello", max_tokens=None, **n2)], open_when=("gen2", "second"))
    assert res.ok, res.error
    assert [c.index for c in res.choices] == [0, 1]
    refined = [[m["content"] for m in c.data["request"]["messages"] if m["role"] == "assistant"]
               for c in res.choices]
    assert refined == [[drafts[0]], [drafts[1]]]
