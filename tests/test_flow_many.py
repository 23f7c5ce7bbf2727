"""A fan-out as wide as a list (docs/language.md, "returns = many"): a python stage's function
returns a list of requests, each goes on as an item of its own (through a generate chain, say)
and the join that collects them merges them in list order. Its edges: an empty list, a list
past max_items, an element that is no request, a branch refused or cancelled, usage and n per
branch, a streamed request; and what `check` refuses."""
from __future__ import annotations

import json
import time

import pytest

import flowkit
from flowkit import Heard, chain, chat, errors, run, runtime, write
import pipeline_dsl

HOOKS = '''
import json

import flowkit
import pipeline_dsl


def split(item):
    """One request per '|'-separated part of the question ('' and '||' have none)."""
    text = item["prompt"] if "prompt" in item else item["messages"][-1]["content"]
    return [{"prompt": f"part {i}: {p}"} for i, p in enumerate(text.split("|")) if p]


def split_bad(item):
    bad = item["metadata"]["bad"]
    if bad == "str":
        return [{"prompt": "fine"}, "a string"]
    if bad == "result":
        return [{"prompt": "fine"}, {"prompt": "fine too"}, {"text": "an answer"}]
    if bad == "invalid":
        return [{"prompt": "fine"}, {"prompt": "fine too"}, {"prompt": "also"}, {"prompt": ""}]
    if bad == "none":
        return [{"prompt": "fine"}, {"metadata": {}}]
    if bad == "dict":
        return item
    if bad == "ids":
        return [{"prompt": "fine"}, {"prompt_token_ids": [1, 10 ** 6]}]
    if bad == "fine":
        return [{"prompt": f"p{i}"} for i in range(4)]
    return [{"prompt": f"p{i}"} for i in range(5)]


def parts(results):
    """What each branch's result says of itself, in the order the join got them."""
    flowkit.bump("merge")
    return {"text": json.dumps([{"prompt": r["request"]["prompt"], "id": r["id"],
                                 "tag": r["request"]["metadata"].get("tag"), "by": r["generated_by"]}
                                for r in results]) if results else "no parts"}


def two_forms(item):
    """A text element and a chat one, whatever the request's form."""
    return [{"prompt": "a text"}, {"messages": [{"role": "user", "content": "a chat"}]}]


def fields(results):
    return {"text": json.dumps([sorted(r["request"]) for r in results])}


def own_groups(item):
    """A text element with its own output format, a chat element with its own tools."""
    g = [{"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}]
    return [{"prompt": "is this yes?", "guided_choice": ["yes", "no"]},
            {"messages": [{"role": "user", "content": "a chat"}], "tools": g}]


def groups(results):
    return {"text": json.dumps([{k: r["request"].get(k) for k in ("response_format", "guided_choice", "tools",
                                                                   "tool_choice") if r["request"].get(k) is not None}
                                for r in results])}


def again(item):
    return item


def semis(item):
    return [{"prompt": p} for p in item["messages"][-1]["content"].split(";")]


def commas(item):
    return [{"prompt": p} for p in item["prompt"].split(",") if p]


def guard(item):
    if "bad" in item["request"]["prompt"]:
        raise pipeline_dsl.Reject("a bad part")
    return item


def sub_questions(item):
    """After a first model: three sub-questions of its answer's request (a Generated item)."""
    return [{"prompt": f"sub {i}: " + item["request"]["messages"][-1]["content"]} for i in range(3)]


def subs_of_request(item):
    """After a first model: three sub-questions of the request that made its result."""
    return [{"prompt": f"sub {j} of " + item["request"]["prompt"]} for j in range(3)]


def asked(item):
    """After the join: what the merged answer says it answers."""
    return {**item, "text": json.dumps(item["request"])}


def scored_parts(item):
    """One element a part, each asking its own prompt's logprobs."""
    return [{"prompt": p, "prompt_logprobs": 1} for p in item["prompt"].split("|")]


def none_of_it(item):
    return []


def held(item):
    flowkit.bump("held")
    flowkit.gate("held").wait(60)
    return item


def one_as_dict(item):
    if item.get("prompt"):
        return [{"prompt": "a"}]
    return {"prompt": "only one"}


def a_label(item):
    return "none"


def nothing(item):
    if item.get("prompt"):
        return [{"prompt": "a"}]
    return


def yielded(item):
    for part in item["messages"][-1]["content"].split("|"):
        yield {"prompt": part}


def pair(item):
    return ({"prompt": "first"}, {"prompt": "second"})


def free_second(item):
    """Two parts; the second says it answers freely, whatever the request constrains."""
    return [{"prompt": "kept"}, {"prompt": "freed", "response_format": None}]


def maybe(item):
    parts = [{"prompt": p} for p in item["messages"][-1]["content"].split("|") if p]
    if parts:
        return parts


def always(item):
    parts = [{"prompt": p} for p in item["messages"][-1]["content"].split("|") if p]
    if parts:
        return parts
    else:
        return []


def in_a_loop(item):
    while True:
        return [{"prompt": "a"}]


def formats(results):
    return {"text": json.dumps([r["request"].get("response_format") for r in results])}
'''

pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def pipeline(tmp_path, model, split="hooks:split", join='fn = "hooks:parts"', extra="", after="gen -> collect",
             split_params=""):
    body = (f'stage request : requests {{}}\nstage split : python {{ fn = "{split}"  returns = many {split_params}}}\n'
            f"stage gen : generate {{ max_new_tokens = 3 }}\nstage collect : join {{ {join} }}\n"
            f"stage out : respond {{}}\n{extra}request -> split -> batch\n" + chain()
            + f"{after}\ncollect -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def said(result) -> list[dict]:
    return json.loads(result.choices[0].text)


# ---------------------------------------------------------------- the list, item by item

def test_each_request_of_the_list_is_generated_and_the_join_gets_them_in_list_order(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf)
    (res,), rt = run(path, [chat("q", "a|b|c|d|e", metadata={"tag": "t"})])
    assert res.ok and len(res.choices) == 1
    assert said(res) == [{"prompt": f"part {i}: {p}", "id": "q", "tag": "t", "by": "gen"}
                         for i, p in enumerate("abcde")]       # its id and metadata: the request's
    assert len(res.choices[0].data["branches"]) == 5
    assert res.usage["completion_tokens"] == 5 * 4            # every branch's tokens (max_tokens 4), summed
    assert res.usage["prompt_tokens"] > 0
    flowkit.edges_add_up(rt.stats())
    stages = rt.stats()["stages"]
    assert stages["split"]["items_in"] == 1 and stages["split"]["items_out"] == 5
    assert stages["gen"]["items_in"] == 5 and stages["collect"]["items_out"] == 1


def test_the_requests_n_and_settings_apply_to_each_branch(tmp_path, soft_gguf):
    """What an element leaves out is the request's: its n (2 answers a branch), its max_tokens."""
    path = pipeline(tmp_path, soft_gguf)
    (res,), _ = run(path, [chat("q", "a|b|c", n=2, max_tokens=2, temperature=1.0, seed=3)])
    assert res.ok
    got = said(res)
    assert [g["prompt"] for g in got] == ["part 0: a"] * 2 + ["part 1: b"] * 2 + ["part 2: c"] * 2
    assert res.usage["completion_tokens"] == 3 * 2 * 2


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
SETTINGS = {"metadata", "headers", "user", "temperature", "max_tokens", "ignore_eos", "logprobs", "id"}


@pytest.mark.parametrize("form", ["chat", "text"])
def test_an_element_takes_the_requests_settings_not_how_its_prompt_is_rendered(tmp_path, soft_gguf, form):
    """What shapes the request's own prompt (echo, continue_final_message, truncation, ...) is no
    element's; a chat request's own fields (tools, ...) are a chat element's alone, so a request
    with tools is answered, not failed at the stage; its settings are every element's."""
    path = pipeline(tmp_path, soft_gguf, split="hooks:two_forms", join='fn = "hooks:fields"')
    common = {"id": "q", "max_tokens": 2, "ignore_eos": True, "temperature": 0.5, "user": "u", "logprobs": 1,
              "truncate_prompt_tokens": 20, "add_special_tokens": False}
    if form == "chat":
        asked = {**common, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
                 "chat_template_kwargs": {"x": 1}, "continue_final_message": True, "add_generation_prompt": False}
    else:
        asked = {**common, "prompt": "q", "echo": True, "suffix": ""}
    (rec,) = flowkit.run_lines(path, [asked])
    assert "error" not in rec, rec["error"]
    answer = rec["text"].removeprefix("q") if form == "text" else rec["text"]     # echo: the line's prompt first
    text, talk = json.loads(answer)
    assert set(text) == SETTINGS | {"prompt"}
    chat_own = {"tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"} if form == "chat" else set()
    assert set(talk) == SETTINGS | {"messages"} | chat_own


def test_an_elements_own_format_or_tools_replace_the_requests_group(tmp_path, soft_gguf):
    """An element that names an output format (guided_choice) takes none of the request's
    (response_format); one that gives its own tools takes not the request's tool_choice, which
    names a tool it lacks. (Before: each a 500 at the stage, 'give at most one of ...' and
    'tool_choice names "f", which is not among the tools'.)"""
    path = pipeline(tmp_path, soft_gguf, split="hooks:own_groups", join='fn = "hooks:groups"')
    asked = {"id": "q", "max_tokens": 2, "messages": [{"role": "user", "content": "q"}],
             "response_format": {"type": "json_object"}, "tools": TOOLS,
             "tool_choice": {"type": "function", "function": {"name": "f"}}}
    (rec,) = flowkit.run_lines(path, [asked])
    assert "error" not in rec, rec["error"]
    text, talk = json.loads(rec["text"])
    assert text["response_format"] == {"type": "choice", "choices": ["yes", "no"]}     # its own, not json_object
    assert [t["function"]["name"] for t in talk["tools"]] == ["g"] and talk.get("tool_choice") in (None, "auto")


@pytest.mark.parametrize("policy", ["first", "majority", "longest"])
def test_the_built_in_policies_keep_their_meaning(tmp_path, soft_gguf, policy):
    path = pipeline(tmp_path, soft_gguf, join=f"policy = {policy}")
    (res,), _ = run(path, [chat("q", "a|b|c")])
    assert res.ok and len(res.choices) == 1 and len(res.choices[0].data["branches"]) == 3
    texts = [b["text"] for b in res.choices[0].data["branches"]]
    if policy == "longest":
        assert res.choices[0].text == max(texts, key=len)
    assert res.choices[0].text in texts


def test_an_empty_list_gives_the_join_fn_no_results(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf)
    (res,), rt = run(path, [chat("q", "||")])
    assert res.ok and res.choices[0].text == "no parts" and res.choices[0].data["id"] == "q"
    assert res.choices[0].data["branches"] == [] and res.choices[0].data["finish_reason"] == "stop"
    assert res.usage["completion_tokens"] == 0 and flowkit.COUNTS["merge"] == 1
    assert rt.stats()["stages"]["gen"]["items_in"] == 0
    flowkit.edges_add_up(rt.stats())


def test_after_a_model_the_list_takes_the_settings_of_the_request_that_made_its_result(tmp_path, soft_gguf):
    """A question split into sub-questions after a first generate stage: the many stage gets a
    Generated result, and what its requests leave out is that result's request's."""
    body = ('stage request : requests {}\nstage first : generate { max_new_tokens = 2 }\n'
            'stage split : python { fn = "hooks:sub_questions"  returns = many }\n'
            "stage gen : generate { max_new_tokens = 3 }\n"
            'stage collect : join { fn = "hooks:parts" }\nstage out : respond {}\n'
            "request -> b1\n" + chain("first", "b1", "e1", "k1") + "first -> split -> batch\n" + chain()
            + "gen -> collect -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), _ = run(path, [chat("q", "why", metadata={"tag": "m"}, max_tokens=2)])
    assert res.ok and [(g["prompt"], g["id"], g["tag"], g["by"]) for g in said(res)] == \
        [(f"sub {i}: why", "q", "m", "gen") for i in range(3)]
    assert res.usage["completion_tokens"] == 2 + 3 * 2      # the first answer's and every branch's


def test_nested_lists_reach_their_join_grouped_by_the_outer_list_in_order(tmp_path, soft_gguf):
    """A many stage after another's branches: each element of an outer element's list follows it, so the
    join gets the outer list's order first, then each inner list's (a, its parts; b, its parts)."""
    body = ('stage request : requests {}\nstage split : python { fn = "hooks:split"  returns = many }\n'
            "stage first : generate { max_new_tokens = 2 }\n"
            'stage subs : python { fn = "hooks:subs_of_request"  returns = many }\n'
            "stage gen : generate { max_new_tokens = 2 }\n"
            'stage collect : join { fn = "hooks:parts" }\nstage out : respond {}\n'
            "request -> split -> b1\n" + chain("first", "b1", "e1", "k1") + "first -> subs -> batch\n" + chain()
            + "gen -> collect -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), _ = run(path, [chat("q", "a|b", max_tokens=2)])
    assert res.ok, res
    assert [g["prompt"] for g in said(res)] == [f"sub {j} of part {i}: {p}" for i, p in enumerate("ab")
                                                for j in range(3)]


@pytest.mark.parametrize("join", ["policy = first", 'fn = "hooks:parts"'])
def test_the_merged_answer_answers_the_request_the_stage_got_not_an_element(tmp_path, soft_gguf, join):
    """The join's result is the answer to the request the many stage got (a stage after the join
    reads it as `request`), while each branch's result inside the join keeps its element's."""
    body = ('stage request : requests {}\nstage split : python { fn = "hooks:split"  returns = many }\n'
            f"stage gen : generate {{ max_new_tokens = 3 }}\nstage collect : join {{ {join} }}\n"
            'stage asked : python { fn = "hooks:asked" }\nstage out : respond {}\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> asked -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    question = chat("q", "a|b", metadata={"tag": "t"}, return_token_ids=True)
    (res,), _ = run(path, [question])
    assert res.ok and json.loads(res.choices[0].text) == question
    assert res.choices[0].data["request"] == question
    assert "prompt_token_ids" not in res.choices[0].data           # no element's prompt as the request's


def test_agp_serve_echoes_the_clients_prompt_not_an_elements(tmp_path, soft_gguf, monkeypatch):
    from test_serve import LiveServer

    (tmp_path / "many_hooks.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = pipeline(tmp_path, soft_gguf, join="policy = first").read_text().replace('"hooks:', '"many_hooks:')
    s = LiveServer(soft_gguf, text=text)
    try:
        for stream in (False, True):
            r = s.http.post(s.url + "/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": "x|y", "echo": True, "max_tokens": 2, "stream": stream})
            assert r.status_code == 200, r.text
            got = (r.json()["choices"][0]["text"] if not stream else
                   "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                           if line.startswith("data: {") and json.loads(line[6:])["choices"]))
            assert got.startswith("x|y") and "part 0" not in got, got
        r = s.http.post(s.url + "/v1/chat/completions", timeout=60,
                        json={"model": "tiny", "messages": [{"role": "user", "content": "x|y"}], "max_tokens": 2,
                              "return_token_ids": True})
        assert r.status_code == 200 and r.json()["prompt_token_ids"] == [], r.text    # no element's prompt
    finally:
        s.close()


@pytest.mark.parametrize("join", ["policy = first", 'fn = "hooks:parts"'])
def test_the_merged_answer_keeps_no_elements_prompt_logprobs(tmp_path, soft_gguf, join):
    """An element asks its own prompt's logprobs; the merged answer answers the request the stage got,
    which asked none: no element's prompt_logprobs in it (each branch's result keeps its own)."""
    path = pipeline(tmp_path, soft_gguf, split="hooks:scored_parts", join=join)
    (res,), _ = run(path, [{"id": "q", "prompt": "ab|cd", "max_tokens": 2}])
    assert res.ok, res.error
    assert res.choices[0].data.get("prompt_logprobs") is None, res.choices[0].data.get("prompt_logprobs")
    assert res.choices[0].data["request"]["prompt"] == "ab|cd"


def test_agp_run_echoes_the_lines_prompt_and_gives_no_elements_prompt_ids(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, join="policy = first")
    text, chats = flowkit.run_lines(path, [{"id": "e", "prompt": "x|y", "echo": True, "max_tokens": 2},
                                           chat("c", "x|y", return_token_ids=True)])
    assert "error" not in text and text["text"].startswith("x|y") and "part 0" not in text["text"]
    assert "error" not in chats and chats["prompt_token_ids"] is None and len(chats["token_ids"]) == 4


def test_agp_run_answers_each_line_or_says_why_not(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, join="policy = longest")
    good, empty = flowkit.run_lines(path, [chat("g", "a|b"), chat("e", "|")])
    assert good["id"] == "g" and "error" not in good and len(good["branches"]) == 2
    assert good["usage"]["completion_tokens"] == 2 * 4
    assert empty["id"] == "e" and empty["error"]["stage"] == "collect" and empty["error"]["status"] == 500
    assert "stage 'split' returned an empty list" in empty["error"]["message"]


def test_an_empty_list_fails_a_built_in_policy_naming_the_join_and_the_stage(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, join="policy = majority")
    (empty, full), _ = run(path, [chat("e", ""), chat("f", "a|b")])
    assert full.ok
    err = empty.error
    assert err.kind == "failed" and err.stage == "collect"
    assert "join 'collect' got no results" in err.message and "stage 'split' returned an empty list" in err.message


@pytest.mark.parametrize("bad, words", [
    ("str", "item [1] is a str; expected a request dict"),
    ("result", "item [2] is a result (text), not a request"),
    ("invalid", "item [3] is an invalid request: field 'prompt' is empty"),
    ("none", "item [1] is a dict without messages, prompt or prompt_token_ids"),
    ("dict", "returned a dict, but it declares returns = many"),
    ("long", "returned a list of 5 requests, more than its max_items = 4"),
    ("ids", "item [1] is a request whose prompt_token_ids"),
])
def test_a_bad_list_fails_its_request_at_the_stage_and_says_where(tmp_path, soft_gguf, bad, words):
    path = pipeline(tmp_path, soft_gguf, split="hooks:split_bad", split_params=" max_items = 4 ")
    (res, good), _ = run(path, [chat("bad", "x", metadata={"bad": bad}), chat("ok", "x", metadata={"bad": "fine"})])
    assert res.error is not None and res.error.stage == "split" and res.error.kind == "failed"
    assert res.error.message.startswith("stage 'split' ") and words in res.error.message, res.error.message
    assert good.ok and len(good.choices[0].data["branches"]) == 4          # the other request is answered


def test_the_default_cap_is_64(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf)
    (res,), _ = run(path, [chat("q", "|".join(["x"] * 65))])
    assert "more than its max_items = 64" in res.error.message


# ---------------------------------------------------------------- failures and cancellation

@pytest.mark.parametrize("on_reject", ["drop", "fail"])
def test_a_refused_branch_follows_the_joins_on_reject(tmp_path, soft_gguf, on_reject):
    path = pipeline(tmp_path, soft_gguf, join=f'fn = "hooks:parts"  on_reject = {on_reject}',
                    extra='stage guard : python { fn = "hooks:guard" }\n', after="gen -> guard -> collect")
    (res, all_bad), _ = run(path, [chat("q", "a|bad|c"), chat("b", "bad|bad")])
    if on_reject == "drop":
        assert res.ok and [g["prompt"] for g in said(res)] == ["part 0: a", "part 2: c"]
        assert all_bad.error.kind == "rejected"             # every branch refused: the request fails
    else:
        assert res.error.kind == "rejected" and res.error.message == "a bad part"
        assert all_bad.error.kind == "rejected"


@pytest.mark.parametrize("join", ["policy = first", 'fn = "hooks:parts"'])
def test_an_empty_list_beside_refused_branches_fails_with_the_refusal(tmp_path, soft_gguf, join):
    """Nested many stages: one part splits into nothing, the other's only branch is refused. The
    join gets no result because of the refusal, so the request fails with it (as when every branch
    is refused), neither as an empty list nor answered by fn([])."""
    body = ('stage request : requests {}\nstage s1 : python { fn = "hooks:semis"  returns = many }\n'
            'stage s2 : python { fn = "hooks:commas"  returns = many }\n'
            "stage gen : generate { max_new_tokens = 3 }\nstage guard : python { fn = \"hooks:guard\" }\n"
            f"stage collect : join {{ {join}  on_reject = drop }}\nstage out : respond {{}}\n"
            "request -> s1 -> s2 -> batch\n" + chain() + "gen -> guard -> collect -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (refused, kept, empty), rt = run(path, [chat("r", ",;bad"), chat("k", ",;a,bad;b"), chat("e", ",;,")])
    assert refused.error is not None and refused.error.kind == "rejected", refused.error
    assert refused.error.message == "a bad part" and refused.error.stage == "guard"
    assert kept.ok and kept.choices[0].data["request"] == chat("k", ",;a,bad;b")    # the outer stage's request
    if "fn" in join:
        assert [g["prompt"] for g in said(kept)] == ["a", "b"]
        assert empty.ok and empty.choices[0].text == "no parts"          # nothing refused: fn([]) decides
    else:
        assert empty.error.kind == "failed" and "returned an empty list" in empty.error.message
    (line,) = flowkit.run_lines(path, [chat("r", ",;bad")])
    assert line["error"]["status"] == 400 and line["error"]["message"] == "a bad part"
    flowkit.edges_add_up(rt.stats())


def test_a_refusal_before_one_join_leaves_a_later_joins_empty_list_to_its_fn(tmp_path, soft_gguf):
    """A branch refused on its way to the first join (on_reject = drop) is that join's refusal alone:
    a later join, reached only through the first, whose many stage returned an empty list is
    answered by its fn([]), not failed with the earlier refusal."""
    body = ('stage request : requests {}\nstage s1 : python { fn = "hooks:split"  returns = many }\n'
            "stage gen : generate { max_new_tokens = 3 }\nstage guard : python { fn = \"hooks:guard\" }\n"
            'stage first : join { policy = first  on_reject = drop }\n'
            'stage s2 : python { fn = "hooks:none_of_it"  returns = many }\n'
            'stage gen2 : generate { max_new_tokens = 3 }\n'
            'stage second : join { fn = "hooks:parts"  on_reject = drop }\nstage out : respond {}\n'
            "request -> s1 -> batch\n" + chain() + "gen -> guard -> first -> s2 -> batch2\n"
            + chain("gen2", "batch2", "encode2", "kv2") + "gen2 -> second -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    (res,), rt = run(path, [{"id": "q", "prompt": "bad|fine", "max_tokens": 2}])
    assert res.ok, res.error
    assert res.choices[0].text == "no parts"
    flowkit.edges_add_up(rt.stats())


def test_a_request_that_ends_cancels_every_branch(tmp_path, soft_gguf):
    """Its client goes away (or its deadline passes: agp serve aborts it the same way) while one
    branch's call is held and the others wait for the stage's one worker: none of them is called
    after, and the join never merges. A request sent after them, queued behind them for that
    worker, is answered: by then every call queued before it was made or skipped."""
    path = pipeline(tmp_path, soft_gguf, extra='stage hold : python { fn = "hooks:held"  workers = 1 }\n',
                    after="gen -> hold -> collect")
    rt = runtime(path)
    rt.start()
    try:
        one = Heard()
        key = rt.submit(chat("gone", "a|b|c|d"), one)
        deadline = time.monotonic() + 60
        while not (flowkit.COUNTS["held"] == 1 and rt.stats()["stages"]["hold"]["items_in"] == 4):
            assert time.monotonic() < deadline, rt.stats()["stages"]["hold"]
            time.sleep(0.01)
        rt.abort(key)
        assert one.done.wait(30) and one.result.error.kind == "aborted"
        later = Heard()
        rt.submit(chat("later", "x"), later)
        while rt.stats()["stages"]["hold"]["items_in"] < 5:
            assert time.monotonic() < deadline, rt.stats()["stages"]["hold"]
            time.sleep(0.01)
        flowkit.gate("held").set()
        assert later.done.wait(60) and later.result.ok
        assert flowkit.COUNTS["held"] == 2 and flowkit.COUNTS["merge"] == 1     # gone's first call, later's
        assert rt.stats()["stages"]["hold"]["dropped"] == 4 and rt.wait_idle(30)   # gone's four, the held one too
    finally:
        flowkit.gate("held").set()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


# ---------------------------------------------------------------- streaming

class Listener(Heard):
    def __init__(self):
        super().__init__()
        self.deltas = []

    def on_delta(self, key, index, out):
        self.deltas.append(out.delta_text)


def test_a_streamed_request_gets_the_joins_result_whole(tmp_path, soft_gguf):
    """As after any join: no branch's tokens are heard as they come; the merged answer is the
    one piece the client gets."""
    path = pipeline(tmp_path, soft_gguf)
    rt = runtime(path)
    rt.start()
    try:
        one = Listener()
        rt.submit(chat("s", "a|b"), one, stream=True)
        assert one.done.wait(120)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert one.result.ok and [g["prompt"] for g in said(one.result)] == ["part 0: a", "part 1: b"]
    assert not any(one.deltas)


# ---------------------------------------------------------------- check

def diags(tmp_path, model, body):
    path = write(tmp_path, model, body, hooks=HOOKS)
    return pipeline_dsl.load(str(path))[1]


HEAD = ('stage request : requests {}\nstage split : python { fn = "hooks:split"  returns = many }\n'
        "stage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n")


def test_check_wants_a_join_on_every_path_from_a_many_stage(tmp_path, soft_gguf):
    body = (HEAD + 'stage collect : join { fn = "hooks:parts" }\nstage r : route {}\n'
            "request -> split -> batch\n" + chain() + "gen -> r\nr -> collect when prompt_tokens > 5\n"
            "r -> out otherwise\ncollect -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error]
    assert err.message == ("stage 'split' returns many items, but a path from it reaches respond stage 'out' "
                           "without a join: split -> batch -> encode -> kv -> gen -> r -> out")
    assert (err.pos.line, err.pos.col) == (6, 7)         # the stage's name: line 2 of the body
    assert "join" in err.hint and err.notes[0][0] == "returns = many here"


def test_check_wants_one_join_to_collect_a_many_stages_items(tmp_path, soft_gguf):
    body = (HEAD + 'stage j1 : join { fn = "hooks:parts" }\nstage j2 : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> j1 when prompt_tokens > 5\ngen -> j2 otherwise\n"
            "j1 -> out\nj2 -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error]
    assert err.message == "stage 'split' returns many items, but they reach 2 joins first ('j1', 'j2'); " \
                          "one join collects them"


def test_a_checked_many_pipeline_has_no_join_warning(tmp_path, soft_gguf):
    body = (HEAD + 'stage collect : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    assert diags(tmp_path, soft_gguf, body) == []       # the list fans out: the join merges something


@pytest.mark.parametrize("params, severity, words", [
    ("stream = true", "error", "has stream = true, so it gives Generated results, not returns = many"),
    ("cache = 16", "error", "cache cannot be used with returns = many"),
])
def test_check_refuses_what_a_many_stage_cannot_do(tmp_path, soft_gguf, params, severity, words):
    body = (HEAD.replace("returns = many", f"returns = many  {params}")
            + 'stage collect : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    found = [d for d in diags(tmp_path, soft_gguf, body) if words in d.message]
    assert found and found[0].severity == severity


@pytest.mark.parametrize("param, words", [("returns = many", "returns = many belongs on the python stage"),
                                          ("max_items = 8", "set it on that stage")])
def test_the_split_stages_words_on_the_join_say_where_they_go(tmp_path, soft_gguf, param, words):
    body = (HEAD + f'stage collect : join {{ fn = "hooks:parts"  {param} }}\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error]
    assert err.message.startswith(f"unknown parameter '{param.split()[0]}' for stage kind 'join'")
    assert words in err.hint                      # not "did you mean 'retries'?"


def test_max_items_without_returns_many_is_a_warning(tmp_path, soft_gguf):
    body = ('stage request : requests {}\nstage f : python { fn = "hooks:guard"  max_items = 3 }\n'
            "stage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> f -> out\n")
    (d,) = diags(tmp_path, soft_gguf, body)
    assert d.severity == "warning" and "sets max_items but not returns = many" in d.message


def hooks_line(text: str, after: str | None = None) -> int:
    lines = HOOKS.splitlines()
    start = lines.index(after) if after else 0
    return lines.index(text, start) + 1


@pytest.mark.parametrize("fn, returns, what", [
    ("one_as_dict", '    return {"prompt": "only one"}', "a dict"),
    ("a_label", '    return "none"', "a string"),
    ("nothing", "    return", "None"),
])
def test_check_refuses_a_return_of_a_many_stage_that_is_no_list(tmp_path, soft_gguf, fn, returns, what):
    """Each of these fails its request whenever the return is reached (`returned a dict, but it
    declares returns = many`): check says so at the fn, naming the line."""
    body = (HEAD.replace("hooks:split", f"hooks:{fn}") + 'stage collect : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error]
    assert err.message.startswith(f"stage 'split': hooks:{fn} returns {what} at line {hooks_line(returns)}, but "
                                  "the stage says returns = many: its function returns a list of requests")
    assert (err.pos.line, err.pos.col) == (6, 29)          # the fn value: line 2 of the body


def test_check_warns_at_a_many_stage_whose_function_can_run_off_its_end(tmp_path, soft_gguf):
    """`if parts: return parts` alone returns None for a question without parts, and the request
    fails (`returned None, but it declares returns = many`); check warns where the source says so
    for sure, and not where a return may be inside a loop."""
    def check_fn(fn):
        body = (HEAD.replace("hooks:split", f"hooks:{fn}") + 'stage collect : join { fn = "hooks:parts" }\n'
                "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
        return diags(tmp_path, soft_gguf, body)

    (d,) = check_fn("maybe")
    last = hooks_line("        return parts", after="def maybe(item):")
    assert d.severity == "warning" and d.message == (
        f"stage 'split': hooks:maybe can run off its end after line {last}, which returns None, but the "
        "stage says returns = many: that request fails there")
    assert d.hint == "return [] when there is nothing to fan out"
    assert check_fn("always") == [] and check_fn("in_a_loop") == [] and check_fn("split") == []
    path = pipeline(tmp_path, soft_gguf, split="hooks:maybe")
    (res,), _ = run(path, [chat("q", "|")])                  # what the warning foretold
    assert not res.ok and "returned None, but it declares returns = many" in str(res.error)


def test_check_says_a_many_stages_generator_must_return_a_list(tmp_path, soft_gguf):
    body = (HEAD.replace("hooks:split", "hooks:yielded") + 'stage collect : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error]
    assert err.message == ("stage 'split': hooks:yielded is a generator function, but a returns = many "
                           "stage's function returns a list of requests")
    assert "stream" not in err.hint                       # a stream filter is no list of requests


def test_a_list_returned_without_returns_many_is_pointed_at_it(tmp_path, soft_gguf):
    body = (HEAD.replace("  returns = many", "") + 'stage collect : join { fn = "hooks:parts" }\n'
            "request -> split -> batch\n" + chain() + "gen -> collect -> out\n")
    (err,) = [d for d in diags(tmp_path, soft_gguf, body) if d.is_error and "returns a list" in d.message]
    assert "returns = many" in err.hint


def test_a_label_on_a_many_stages_edge_is_never_taken_and_check_says_so(tmp_path, soft_gguf):
    """A returns = many function gives a list, never a label: `when short` on its edge sends
    nothing there; a comparison of a field its requests carry is the way to tell them apart."""
    body = (HEAD + 'stage collect : join { fn = "hooks:parts" }\nstage r : route {}\n'
            "request -> split\nsplit -> r when short\nsplit -> r when metadata.tag == \"a\"\n"
            "split -> batch otherwise\nr -> batch\n" + chain() + "gen -> collect -> out\n")
    (d,) = diags(tmp_path, soft_gguf, body)
    assert d.severity == "warning" and d.message == (
        "stage 'split' returns = many: its function returns a list of requests, never a label, so "
        "`when short` is never taken")
    assert (d.pos.line, d.pos.col) == (12, 17)            # the label: line 8 of the body


def test_an_element_inherits_the_requests_constraint_unless_it_says_none(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, split="hooks:free_second", join='fn = "hooks:formats"')
    (res,), _ = run(path, [chat("q", "x", response_format={"type": "json_object"})])
    assert res.ok and said(res) == [{"type": "json_object"}, None]


def test_a_tuple_of_requests_fans_out_as_a_list_does(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, split="hooks:pair")
    (res,), _ = run(path, [chat("q", "x")])
    assert res.ok and [p["prompt"] for p in said(res)] == ["first", "second"]


# ---------------------------------------------------------------- render and plan

def test_render_and_plan_show_the_fan_out_and_its_join(tmp_path, soft_gguf):
    from pipeline_dsl.plan import format_plan, make_plan
    from pipeline_dsl.render import dot_source

    graph = pipeline_dsl.load_pipeline_graph(str(pipeline(tmp_path, soft_gguf, split_params=" max_items = 9 ")))
    dot = dot_source(graph)
    assert '"split" -> "batch" [label="each", style=bold, penwidth=2];' in dot
    assert '"gen" -> "collect";' in dot                      # the other edges as ever
    plan = make_plan(graph)
    assert "fan-out at run time: split (returns = many, at most 9) -> join 'collect'" in format_plan(plan)
    assert plan.to_dict()["many"] == [{"stage": "split", "join": "collect", "max_items": 9}]


LOOP = ('stage request : requests {}\nstage split : python { fn = "hooks:split"  returns = many  max_items = 4 }\n'
        "stage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n"
        'stage tool : python { fn = "hooks:again"  max_turns = 2  returns = any }\n'
        'stage collect : join { fn = "hooks:parts" }\n')


def test_a_many_stage_inside_a_loop_is_warned_as_multiplying_its_items(tmp_path, soft_gguf):
    """Every item that comes back round the loop is split again: up to max_items^(turns + 1) items
    for one request (the loop fan-out warning counted only stages with several edges)."""
    body = LOOP + "request -> split -> batch\n" + chain() + "gen -> tool\ntool -> split\ntool -> collect\ncollect -> out\n"
    (d,) = diags(tmp_path, soft_gguf, body)
    assert d.severity == "warning" and d.message == (
        "items can multiply round the loop split -> batch -> encode -> kv -> gen -> tool -> split: 'split' "
        "returns = many splits again every item that comes back round")
    assert "up to 4^3 items" in d.hint
    before = (LOOP + "request -> split -> batch\n" + chain() + "gen -> tool\ntool -> batch\ntool -> collect\n"
              "collect -> out\n")                                     # split once, before the loop: one split
    assert diags(tmp_path, soft_gguf, before) == []
