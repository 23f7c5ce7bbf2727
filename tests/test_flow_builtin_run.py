"""Built-in request-level stages as a running pipeline applies them, python stages answering (no
model runs): edge conditions (`and`, `or`, `not`, the comparisons over a request's own fields,
docs/language.md "How a pipeline runs") route each request by its own fields, and
`system_prompt` puts its text first, replacing the client's system message only with
`override = true`; a stage's unconditional out-edges copy the item into branches in the
order the file lists the edges (the choices, and the branches a join lists, come in that order);
a python stage's function works on its own copy of the item, so a retry never sees what a failed
try wrote on it; a result a stage makes keeps the finish_reason it sets."""
from __future__ import annotations

import pytest

import flowkit
from flowkit import chat, errors, run, write

HOOKS = '''
import flowkit

def vip(item):
    return {"text": "vip"}

def std(item):
    return {"text": "std"}

def named(item):
    return {"text": item["metadata"]["name"]}

def one(item):
    item["metadata"]["name"] = "one"
    return item

def two(item):
    item["metadata"]["name"] = "two"
    return item

def three(item):
    item["metadata"]["name"] = "three"
    return item

def scribbles(item):
    """Writes on the item, then fails its first try with a transient error."""
    item["messages"][-1]["content"] += " (seen)"
    if flowkit.bump("scribbles") == 1:
        raise ConnectionError("reset by peer")
    return item

class Counted:
    """A value whose deep copies are counted (flowkit.COUNTS["copies"])."""
    def __deepcopy__(self, memo):
        flowkit.bump("copies")
        return Counted()

def carries(item):
    return {"text": "hi", "counted": Counted()}

def keeps(item):
    return item

def flaky_once(item):
    if flowkit.bump("flaky_once") == 1:
        raise ConnectionError("reset by peer")
    return item

def refuses(item):
    return {"text": "I cannot help with that.", "finish_reason": "content_filter"}

def said(item):
    return {"text": " | ".join(m["role"] + ": " + m["content"] for m in item["messages"])}
'''


def answering(name: str) -> str:
    return f'stage {name} : python {{ fn = "hooks:{name}"  returns = generated }}\n'


@pytest.mark.parametrize("condition, vip", [
    ('metadata.tier == "gold" or metadata.tier == "silver"', {"gold": True, "silver": True, "bronze": False}),
    ('metadata.tier == "gold" and metadata.paid == true', {"gold": True, "silver": False, "bronze": False}),
    ('not metadata.tier == "bronze"', {"gold": True, "silver": True, "bronze": False}),
    ('metadata.level <= 2', {"gold": True, "silver": True, "bronze": False}),
    ('metadata.level == true', {"gold": False, "silver": False, "bronze": False}),   # 1 is not true
])
def test_each_request_takes_the_edge_its_own_fields_satisfy(tmp_path, tiny_gguf, condition, vip):
    levels = {"gold": 1, "silver": 2, "bronze": 3}
    body = ("stage request : requests {}\nstage route : route {}\n" + answering("vip") + answering("std") +
            "stage out : respond {}\n"
            f"request -> route\nroute -> vip when {condition}\nroute -> std otherwise\nvip -> out\nstd -> out\n")
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    requests = [chat(tier, "hi", metadata={"tier": tier, "paid": tier == "gold", "level": levels[tier]})
                for tier in vip]
    results, rt = run(path, requests)
    assert all(r.ok for r in results), [r.error for r in results]
    assert {r.id: r.choices[0].text for r in results} == {tier: "vip" if v else "std" for tier, v in vip.items()}


@pytest.mark.parametrize("override, expected", [
    ("", "system: theirs | user: hi"),                       # the client's own system message stays
    ("override = false", "system: theirs | user: hi"),
    ("override = true", "system: ours | user: hi"),          # replaced, never both
])
def test_system_prompt_replaces_the_clients_system_message_only_with_override(tmp_path, tiny_gguf, override,
                                                                               expected):
    body = (f'stage request : requests {{}}\nstage system : system_prompt {{ text = "ours"  {override} }}\n'
            'stage said : python { fn = "hooks:said"  returns = generated }\nstage out : respond {}\n'
            "request -> system -> said -> out\n")
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    with_system = dict(chat("a", "hi"), messages=[{"role": "system", "content": "theirs"},
                                                  {"role": "user", "content": "hi"}])
    (theirs, plain), _ = run(path, [with_system, chat("b", "hi")])
    assert theirs.ok and plain.ok
    assert theirs.choices[0].text == expected
    assert plain.choices[0].text == "system: ours | user: hi"


FAN = ('stage request : requests {}\nstage one : python { fn = "hooks:one" }\n'
       'stage two : python { fn = "hooks:two" }\nstage three : python { fn = "hooks:three" }\n'
       'stage answer : python { fn = "hooks:named"  returns = generated }\n'
       "request -> EDGES\n")


@pytest.mark.parametrize("order", [("one", "two", "three"), ("three", "one", "two")])
def test_fan_out_branches_come_in_the_order_of_the_edges(tmp_path, tiny_gguf, order):
    edges = "".join(f"request -> {s}\n" for s in order)
    apart = FAN.replace("request -> EDGES\n", edges) + "stage out : respond {}\n" + \
        "".join(f"{s} -> answer\n" for s in order) + "answer -> out\n"
    path = write(tmp_path, tiny_gguf, apart, hooks=HOOKS)
    assert errors(path) == []
    (res,), _ = run(path, [chat("a", "hi", metadata={})])
    assert res.ok, res.error
    assert [c.text for c in res.choices] == list(order)              # no join: one choice per branch
    assert [c.index for c in res.choices] == [0, 1, 2]

    (tmp_path / "joined").mkdir()
    joined = FAN.replace("request -> EDGES\n", edges) + "stage vote : join { policy = longest }\n" + \
        "stage out : respond {}\n" + "".join(f"{s} -> answer\n" for s in order) + "answer -> vote -> out\n"
    path = write(tmp_path / "joined", tiny_gguf, joined, hooks=HOOKS)
    assert errors(path) == []
    (res,), _ = run(path, [chat("a", "hi", metadata={})])
    assert res.ok, res.error
    assert [b["text"] for b in res.choices[0].data["branches"]] == list(order)


def test_a_retry_gets_the_item_as_it_was_not_as_the_failed_try_left_it(tmp_path, tiny_gguf, fresh_flowkit):
    body = ('stage request : requests {}\nstage f : python { fn = "hooks:scribbles"  retries = 1  backoff = 1ms }\n'
            'stage said : python { fn = "hooks:said"  returns = generated }\nstage out : respond {}\n'
            "request -> f -> said -> out\n")
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hi")])
    assert res.ok, res.error
    assert flowkit.COUNTS["scribbles"] == 2 and rt.stats()["stages"]["f"]["retries"] == 1
    assert res.choices[0].text == "user: hi (seen)"


@pytest.mark.parametrize("fn, copies", [("keeps", 1), ("flaky_once", 2)])
def test_a_stage_with_retries_copies_the_item_once_per_try(tmp_path, tiny_gguf, fresh_flowkit, fn, copies):
    """Each try works on a copy of its own, made as it starts: a call that succeeds first time
    copies the item once, however many retries the stage may have."""
    body = ('stage request : requests {}\nstage make : python { fn = "hooks:carries"  returns = generated }\n'
            f'stage f : python {{ fn = "hooks:{fn}"  retries = 2  backoff = 1ms }}\nstage out : respond {{}}\n'
            "request -> make -> f -> out\n")
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hi")])
    assert res.ok, res.error
    assert rt.stats()["stages"]["f"]["retries"] == copies - 1
    assert flowkit.COUNTS["copies"] == copies


def test_a_stage_answering_a_request_keeps_the_finish_reason_it_set(tmp_path, tiny_gguf):
    """What a new result dict leaves out is filled in (finish_reason "stop" for a Request the stage
    answered); what it sets stays."""
    body = ('stage request : requests {}\nstage guard : python { fn = "hooks:refuses"  returns = generated }\n'
            'stage plain : python { fn = "hooks:vip"  returns = generated }\nstage route : route {}\n'
            "stage out : respond {}\nrequest -> route\nroute -> guard when metadata.refuse == true\n"
            "route -> plain otherwise\nguard -> out\nplain -> out\n")
    path = write(tmp_path, tiny_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (refused, answered), _ = run(path, [chat("a", "hi", metadata={"refuse": True}), chat("b", "hi")])
    assert refused.ok and refused.choices[0].finish_reason == "content_filter"
    assert refused.choices[0].text == "I cannot help with that."
    assert answered.ok and answered.choices[0].finish_reason == "stop"
