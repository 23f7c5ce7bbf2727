"""The graph runs: stages execute on the items of their edges (python stages, routing,
several engines, fan-out and join, bounded loops), and `check` rejects what cannot run."""
from __future__ import annotations

import json
import textwrap

import pytest

import pipeline_dsl
from pipeline_dsl.flow import PipelineRuntime, load_graph

SEGMENT = """
    stage {b} : dynamic_batch {{ max_batch_size = 8  timeout = 1ms }}
    stage {e} : encode {{}}
    stage {k} : kv_lookup {{ block_size = 8  budget = 2MiB }}
"""

HOOKS = '''
import pipeline_dsl

def redact(item):
    for m in item.get("messages") or []:
        m["content"] = m["content"].replace("secret@example.com", "[EMAIL]")
    return item

def reject_flagged(item):
    if item.get("metadata", {}).get("bad"):
        raise pipeline_dsl.Reject("flagged by the test")

def reject_answer_of(item):
    if item["request"]["id"] == "victim":
        raise pipeline_dsl.Reject("the answer was refused")
    return item

def reject_own(item):
    how = item.get("metadata", {}).get("how")
    if how == "field":
        raise pipeline_dsl.Reject("unknown tenant", param="metadata.tenant", code="unknown_tenant")
    if how == "changed":            # a status no Reject may carry, set after it was made
        r = pipeline_dsl.Reject("go through the proxy")
        r.status = 407
        raise r
    if how == "down":
        raise pipeline_dsl.Reject("the tenant's backend is down", status=503, retry_after=5)
    return item

def steps(item):                   # answer -> critique -> revise, its step kept in metadata
    request = dict(item["request"])
    metadata = dict(request.get("metadata") or {})
    step = {"answer": "critique", "critique": "revise"}.get(metadata.get("step", "answer"))
    if step is None:
        return item
    metadata["step"] = step
    request["metadata"] = metadata
    request["messages"] = request["messages"] + [{"role": "assistant", "content": item["text"]},
                                                 {"role": "user", "content": step}]
    return request

def boom(item):
    if item.get("id") == "boom":
        raise ValueError("kaboom")
    return item

def classify(item):
    return "vip" if item.get("metadata", {}).get("vip") else "plain"

def upper(item):
    item["text"] = item["text"].upper()
    return item

def ab(item):
    return "b" if item.get("user") == "bob" else "a"

def arm(item):
    item.setdefault("metadata", {})["arm"] = "b" if item.get("safety_identifier") == "s-9" else "a"
    return item

def loop(item):
    req = dict(item["request"])
    req["messages"] = req["messages"] + [{"role": "assistant", "content": item["text"]},
                                         {"role": "user", "content": "again"}]
    return req

def fall_back(item):
    if item["request"]["id"].startswith("keep"):
        return item
    return item["request"]

def pick_last(items):
    return items[-1]

def bad_type(item):
    answer = 42             # a value the source does not settle: check leaves it to the run
    return answer
'''


def write(tmp_path, body: str, settings: str = "", hooks: bool = True):
    if hooks:
        (tmp_path / "hooks.py").write_text(HOOKS, encoding="utf-8")
    path = tmp_path / "p.agp"
    path.write_text(f"pipeline p {{\n    model = \"{MODEL}\"\n    device = cpu\n    dtype = fp32\n{settings}\n"
                    + textwrap.dedent(body) + "\n}\n", encoding="utf-8")
    return path


MODEL = ""


@pytest.fixture(autouse=True)
def _model(soft_gguf):
    global MODEL
    MODEL = str(soft_gguf)


def check(path) -> list:
    _, diags = pipeline_dsl.load(str(path))
    return [d for d in diags if d.is_error]


def run(path, requests, pins=None) -> list:
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    items = [dict(r) for r in requests]
    if pins:
        items = [(i, p) for i, p in zip(items, pins)]
    out = rt.run_all(items)
    rt.shutdown()
    return out, rt


def chat(rid, text, **kw):
    return {"id": rid, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": True,
            **kw}


def chain(gen="gen", b="batch", e="encode", k="kv"):
    return (SEGMENT.format(b=b, e=e, k=k) +
            f"    {b} -> {e} when full\n    {b} -> {e} when timeout\n    {e} -> {k} -> {gen}\n")


# ---------------------------------------------------------------- python stages

def test_redaction_runs_before_the_model_and_the_prompt_tokens_show_it(tmp_path):
    body = ("stage request : requests {}\nstage redact : python { fn = \"hooks:redact\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> redact -> batch\n" + chain() + "gen -> out\n")
    path = write(tmp_path, body)
    assert check(path) == []
    (with_mail, placeholder), _ = run(path, [chat("a", "mail secret@example.com now"),
                                             chat("b", "mail [EMAIL] now")])
    assert with_mail.ok and placeholder.ok
    assert with_mail.usage["prompt_tokens"] == placeholder.usage["prompt_tokens"]
    assert with_mail.choices[0].data["request"]["messages"][0]["content"] == "mail [EMAIL] now"


def test_reject_before_and_after_the_model_fails_only_that_request(tmp_path):
    body = ("stage request : requests {}\nstage pre : python { fn = \"hooks:reject_flagged\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage post : python { fn = \"hooks:reject_answer_of\" }\n"
            "stage out : respond {}\nrequest -> pre -> batch\n" + chain() + "gen -> post -> out\n")
    path = write(tmp_path, body)
    results, rt = run(path, [chat("ok1", "hello"), chat("flagged", "hi", metadata={"bad": True}),
                             chat("victim", "hello there"), chat("ok2", "the cat")])
    by_id = {r.id: r for r in results}
    assert by_id["ok1"].ok and by_id["ok2"].ok
    assert by_id["flagged"].error.kind == "rejected" and by_id["flagged"].error.stage == "pre"
    assert by_id["flagged"].error.message == "flagged by the test"
    assert by_id["victim"].error.kind == "rejected" and by_id["victim"].error.stage == "post"
    stats = rt.stats()["stages"]
    assert stats["pre"]["rejected"] == 1 and stats["post"]["rejected"] == 1
    assert stats["gen"]["items_in"] == 3            # the flagged one never reached the model


def test_a_rejects_param_code_and_status_reach_its_request_and_a_bad_one_set_later_is_a_bug(tmp_path):
    """docs/language.md, python stages: a Reject's `param`, `code` and `status` are its request's
    error; a Reject whose status was set, after it was made, to one a Reject may not carry (407
    needs a Proxy-Authenticate header) fails its request as the stage's bug, naming the stage."""
    body = ("stage request : requests {}\nstage gate : python { fn = \"hooks:reject_own\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> gate -> batch\n" + chain() + "gen -> out\n")
    results, _ = run(write(tmp_path, body), [chat(how, "hi", metadata={"how": how})
                                             for how in ("field", "changed", "down", "fine")])
    by_id = {r.id: r for r in results}
    field, changed, down = by_id["field"].error, by_id["changed"].error, by_id["down"].error
    assert (field.kind, field.stage, field.message) == ("rejected", "gate", "unknown tenant")
    assert (field.param, field.code, field.status) == ("metadata.tenant", "unknown_tenant", 400)
    assert (down.kind, down.status, down.retry_after, down.param, down.code) == ("rejected", 503, 5, None, None)
    assert (changed.kind, changed.stage) == ("failed", "gate")
    assert changed.message.startswith("stage 'gate' failed: ValueError: Reject's status") and "407" in changed.message
    assert by_id["fine"].ok


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 451, 500, 502, 503, 504])
def test_a_reject_takes_the_4xx_and_5xx_statuses_agp_can_answer(status):
    assert pipeline_dsl.Reject("no", status=status).status == status
    assert status in pipeline_dsl.REJECT_STATUSES


@pytest.mark.parametrize("status", [100, 200, 204, 301, 304, 399, 405, 407, 416, 418, 426, 444, 499, 505, 511,
                                    520, 600, True, "429", 429.0, None])
def test_a_reject_refuses_a_status_that_needs_what_agp_does_not_send_or_is_no_refusal(status):
    """1xx-3xx are no refusal; 405 needs Allow, 407 Proxy-Authenticate, 416 Content-Range, 426
    Upgrade; 499 is nginx's client-gone, no server's answer; 505 and 511 are the connection's and a
    network's, never a request's."""
    with pytest.raises(ValueError, match="Reject's status must be a 4xx or 5xx HTTP status agp can answer"):
        pipeline_dsl.Reject("no", status=status)


@pytest.mark.parametrize("field, value", [("param", ""), ("param", 3), ("code", ["x"]), ("code", "a\nb"),
                                          ("param", "\ud800"), ("code", "c" * 257)])
def test_a_rejects_param_and_code_are_short_printable_strings(field, value):
    with pytest.raises(ValueError, match=f"Reject's {field} must be"):
        pipeline_dsl.Reject("no", **{field: value})
    assert getattr(pipeline_dsl.Reject("no", **{field: "messages[0].content"}), field) == "messages[0].content"


def test_a_function_that_raises_fails_its_request_with_the_stage_and_message(tmp_path):
    body = ("stage request : requests {}\nstage f : python { fn = \"hooks:boom\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> f -> batch\n" + chain() + "gen -> out\n")
    path = write(tmp_path, body)
    (a, b), _ = run(path, [chat("boom", "x"), chat("fine", "y")])
    assert a.error.kind == "failed" and a.error.stage == "f"
    assert "kaboom" in a.error.message and "ValueError" in a.error.message
    assert b.ok


def test_a_function_returning_the_wrong_type_is_a_clear_error(tmp_path):
    body = ("stage request : requests {}\nstage g : python { fn = \"hooks:bad_type\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> g -> batch\n" + chain() + "gen -> out\n")
    (r,), _ = run(write(tmp_path, body), [chat("x", "y")])
    assert r.error.stage == "g" and "returned int" in r.error.message


def test_a_missing_module_or_function_is_a_check_error_at_fn(tmp_path):
    body = ("stage request : requests {}\nstage f : python { fn = \"nowhere:redact\" }\n"
            "stage g : python { fn = \"hooks:redcat\" }\n"
            "stage gen : generate {}\nstage out : respond {}\nrequest -> f -> g -> batch\n" + chain() + "gen -> out\n")
    path = write(tmp_path, body)
    errs = check(path)
    assert len(errs) == 2
    assert "module 'nowhere' not found" in errs[0].message and errs[0].pos.col > 1
    assert "has no function 'redcat'" in errs[1].message and errs[1].hint == "did you mean 'redact'?"
    text = path.read_text().splitlines()[errs[1].pos.line - 1]
    assert text[errs[1].pos.col - 1:].startswith('"hooks:redcat"')


# ---------------------------------------------------------------- routing

ROUTER = """
stage request : requests {}
stage route : route {}
stage short_gen : generate { max_new_tokens = 3 }
stage long_gen : generate { max_new_tokens = 5 }
stage out : respond {}
request -> route
route -> batch_l when prompt_tokens > 20
route -> batch_s otherwise
"""


def test_long_prompts_reach_the_long_branch(tmp_path):
    path = write(tmp_path, ROUTER + chain("short_gen", "batch_s", "enc_s", "kv_s")
                 + chain("long_gen", "batch_l", "enc_l", "kv_l") + "short_gen -> out\nlong_gen -> out\n")
    assert check(path) == []
    reqs = [{"id": "short", "prompt": "hi", "ignore_eos": True},
            {"id": "long", "prompt": "the cat and the world " * 8, "ignore_eos": True}]
    results, rt = run(path, reqs)
    by_id = {r.id: r for r in results}
    assert by_id["short"].choices[0].data["generated_by"] == "short_gen"
    assert by_id["long"].choices[0].data["generated_by"] == "long_gen"
    assert by_id["short"].usage["completion_tokens"] == 3 and by_id["long"].usage["completion_tokens"] == 5
    assert len(rt.segments) == 2                     # two engines, each its own batching loop
    stages = rt.stats()["stages"]
    assert stages["long_gen"]["items_in"] == 1 and stages["short_gen"]["items_in"] == 1


def upper_when(fn: str, condition: str) -> str:
    """request -> a python stage (hooks:`fn`) -> the engine -> a route: to `up` (upper-cases the
    answer) when `condition`, otherwise straight to respond."""
    return (f"stage request : requests {{}}\nstage first : python {{ fn = \"hooks:{fn}\" }}\n"
            "stage up : python { fn = \"hooks:upper\" }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> first -> batch\n" + chain() +
            f"stage pick : route {{}}\ngen -> pick\npick -> up when {condition}\n"
            "pick -> out otherwise\nup -> out\n")


def test_conditions_on_metadata_and_labels_route_each_item(tmp_path):
    path = write(tmp_path, upper_when("classify", "metadata.vip == true and not prompt_tokens > 400"))
    assert check(path) == []
    (vip, plain), rt = run(path, [chat("v", "hello", metadata={"vip": True}), chat("p", "hello")])
    assert vip.choices[0].text == vip.choices[0].text.upper()
    assert rt.stats()["stages"]["up"]["items_in"] == 1


def test_user_and_safety_identifier_reach_python_stages_and_conditions(tmp_path):
    # an A/B split by the request's safety_identifier (a python stage) and a per-user route (a condition)
    path = write(tmp_path, upper_when("arm", 'user == "alice" and metadata.arm == "b"'))
    assert check(path) == []
    reqs = [chat("ab", "hello", user="alice", safety_identifier="s-9"), chat("a", "hello", user="alice"),
            chat("b", "hello", user="bob", safety_identifier="s-9"), chat("none", "hello")]
    results, rt = run(path, reqs)
    assert all(r.choices for r in results), [r.error for r in results]
    by_id = {r.id: r.choices[0].data for r in results}
    assert [by_id[i]["request"].get("user") for i in ("ab", "a", "b", "none")] == ["alice", "alice", "bob", None]
    assert [by_id[i]["request"]["metadata"]["arm"] for i in ("ab", "a", "b", "none")] == ["b", "a", "b", "a"]
    assert by_id["ab"]["text"] == by_id["ab"]["text"].upper()
    assert rt.stats()["stages"]["up"]["items_in"] == 1


def test_a_python_stage_returning_an_edged_label_on_every_path_routes_without_otherwise(tmp_path):
    body = ("stage request : requests {}\nstage split : python { fn = \"hooks:ab\" }\n"
            "stage ra : route {}\nstage rb : route {}\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> split\nsplit -> ra when a\nsplit -> rb when b\nra -> batch\nrb -> batch\n"
            + chain() + "gen -> out\n")
    path = write(tmp_path, body)
    assert check(path) == []
    results, rt = run(path, [chat("1", "hi", user="bob"), chat("2", "hi", user="alice"), chat("3", "hi")])
    assert all(r.choices for r in results)
    stages = rt.stats()["stages"]
    assert (stages["ra"]["items_in"], stages["rb"]["items_in"]) == (2, 1)


def test_a_model_field_naming_a_generate_stage_pins_the_request_there(tmp_path):
    path = write(tmp_path, ROUTER + chain("short_gen", "batch_s", "enc_s", "kv_s")
                 + chain("long_gen", "batch_l", "enc_l", "kv_l") + "short_gen -> out\nlong_gen -> out\n")
    reqs = [{"id": "a", "prompt": "hi", "ignore_eos": True}, {"id": "b", "prompt": "hi", "ignore_eos": True}]
    results, _ = run(path, reqs, pins=[None, "long_gen"])
    assert [r.choices[0].data["generated_by"] for r in results] == ["short_gen", "long_gen"]


@pytest.mark.parametrize("edge, words", [
    ("route -> batch_s when prompt_tokns > 3", "unknown field 'prompt_tokns'"),
    ("route -> batch_s when prompt_tokens > \"many\"", "type mismatch: 'prompt_tokens' is a number"),
    ("route -> batch_s when model < \"x\"", "compares numbers"),
    ("route -> batch_s when completion_tokens > 3", "only known after generate"),
    ("route -> batch_s when prompt_tokens", "needs a comparison"),
    ("route -> batch_s when prompt_tokens > long", "bare word"),
])
def test_bad_conditions_are_positioned_check_errors(tmp_path, edge, words):
    body = ("stage request : requests {}\nstage route : route {}\nstage gen : generate {}\nstage out : respond {}\n"
            f"request -> route\n{edge}\nroute -> batch_s otherwise\n" + chain("gen", "batch_s") + "gen -> out\n")
    errs = check(write(tmp_path, body))
    assert len(errs) == 1 and words in errs[0].message
    assert errs[0].pos is not None and errs[0].pos.line > 1


def test_conditional_edges_without_otherwise_are_an_error(tmp_path):
    body = ("stage request : requests {}\nstage route : route {}\nstage gen : generate {}\nstage out : respond {}\n"
            "request -> route\nroute -> batch when prompt_tokens > 3\n" + chain() + "gen -> out\n")
    (err,) = check(write(tmp_path, body))
    assert "nowhere to go" in err.message and "otherwise" in err.hint


def test_a_batcher_without_a_timeout_edge_is_an_error(tmp_path):
    body = ("stage request : requests {}\nstage gen : generate {}\nstage out : respond {}\n"
            "request -> batch\n" + SEGMENT.format(b="batch", e="encode", k="kv") +
            "batch -> encode when full\nencode -> kv -> gen -> out\n")
    (err,) = check(write(tmp_path, body))
    assert err.message.startswith("timeout items of 'batch' have nowhere to go")


# ---------------------------------------------------------------- several models, fan-out, join

def test_two_models_in_one_pipeline_run_as_two_engines(tmp_path):
    body = ROUTER.replace("stage long_gen : generate { max_new_tokens = 5 }",
                          "stage long_gen : generate { max_new_tokens = 5  dtype = bf16 }")
    path = write(tmp_path, body + chain("short_gen", "batch_s", "enc_s", "kv_s")
                 + chain("long_gen", "batch_l", "enc_l", "kv_l") + "short_gen -> out\nlong_gen -> out\n")
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    dtypes = {es.name: es.engine.model_info["dtype"] for es in rt.segments}
    assert dtypes == {"short_gen": "float32", "long_gen": "bfloat16"}
    assert rt.segments[0].engine is not rt.segments[1].engine
    rt.shutdown()


def test_generate_stages_sharing_a_kv_stage_must_share_a_model(tmp_path):
    body = ("stage request : requests {}\nstage a : generate {}\nstage b : generate { dtype = bf16 }\n"
            "stage out : respond {}\nrequest -> batch\n" + chain("a") + "kv -> b\na -> out\nb -> out\n")
    (err,) = check(write(tmp_path, body))
    assert "share kv_lookup 'kv' (one engine) but differ in dtype" in err.message


def test_generate_stages_sharing_a_kv_stage_may_spell_out_the_engine_defaults(tmp_path):
    # one leaves model and device to the pipeline, one writes them: the same engine, so it checks and runs
    path = tmp_path / "p.agp"
    path.write_text(textwrap.dedent(f"""\
        pipeline p {{
            dtype = fp32
            stage request : requests {{}}
            stage a : generate {{ max_new_tokens = 3 }}
            stage b : generate {{ model = "{MODEL}"  device = auto  max_new_tokens = 3  temperature = 0.7  seed = 1 }}
            stage out : respond {{}}
            request -> batch
        """).replace("pipeline p {", f'pipeline p {{\n    model = "{MODEL}"') + chain("a")
        + "    kv -> b when temperature > 0\n    a -> out\n    b -> out\n}\n", encoding="utf-8")
    path.write_text(path.read_text().replace("encode -> kv -> a", "encode -> kv\n    kv -> a otherwise"))
    assert check(path) == []
    out, _ = run(path, [chat("g", "the cat"), chat("s", "the cat", temperature=0.5)])
    assert [(o.id, o.error, o.choices[0].data["generated_by"]) for o in out] == [("g", None, "a"), ("s", None, "b")]


FAN = ("stage request : requests {}\nstage cold : generate { max_new_tokens = 6  temperature = 0 }\n"
       "stage warm : generate { max_new_tokens = 6  temperature = 0.9  seed = 5 }\n"
       "stage hot : generate { max_new_tokens = 6  temperature = 1.5  seed = 9 }\n"
       "stage vote : join { policy = POLICY }\nstage out : respond {}\n"
       "request -> batch\n" + chain("cold") + "kv -> warm\nkv -> hot\ncold -> vote\nwarm -> vote\nhot -> vote\n"
       "vote -> out\n")


def test_fan_out_to_three_generators_samples_each_branch_coherently(tmp_path):
    path = write(tmp_path, FAN.replace("POLICY", "longest"))
    assert check(path) == []
    req = {"id": "q", "prompt": "the cat and the", "ignore_eos": True}
    (res,), rt = run(path, [req])
    branches = res.choices[0].data["branches"]
    assert len(branches) == 3
    # each branch is exactly what its generate stage gives alone: no crossed tokens
    for gen, branch in zip(("cold", "warm", "hot"), branches):
        (solo,), _ = run(path, [req], pins=[gen])
        assert solo.choices[0].text == branch["text"], gen
    assert res.choices[0].text == max((b["text"] for b in branches), key=len)
    assert res.usage["completion_tokens"] == 18


def test_majority_vote_returns_the_most_common_normalised_answer():
    from stages.impl import Join, StageContext

    join = Join("vote", {"policy": "majority"}, StageContext("p", "vote", "join", None))
    items = [{"text": "Paris"}, {"text": "Lyon."}, {"text": " paris!"}, {"text": "Lyon"}, {"text": "PARIS"}]
    assert join.merge(items) is items[0]
    assert Join("v", {"policy": "longest"}, StageContext("p", "v", "join", None)).merge(items) is items[2]
    assert Join("v", {"policy": "first"}, StageContext("p", "v", "join", None)).merge(items) is items[0]


def test_a_vote_drops_trailing_punctuation_and_ties_go_to_the_earliest_branch():
    """docs/language.md, `join`: answers are compared after lower-casing, collapsing spaces and
    dropping trailing punctuation; a tie (majority or longest) goes to the earliest branch."""
    from stages.impl import Join, StageContext

    def join(policy):
        return Join("v", {"policy": policy}, StageContext("p", "v", "join", None))
    items = [{"text": "Lyon"}, {"text": "Paris."}, {"text": "paris"}, {"text": "Paris!?"}]
    assert join("majority").merge(items) is items[1]           # three Paris against one Lyon
    tie = [{"text": "b"}, {"text": "a"}, {"text": "a!"}, {"text": "B"}]
    assert join("majority").merge(tie) is tie[0]
    same = [{"text": "ab"}, {"text": "abc"}, {"text": "xyz"}, {"text": "x"}]
    assert join("longest").merge(same) is same[1]


def test_a_join_fn_index_names_one_of_the_results_never_one_from_the_end(tmp_path):
    """docs/language.md, `join`: fn returns one of the results, its index, or a new dict; an index
    out of range fails the request and says so (-1 is not Python's last element)."""
    from stages.impl import Join, StageContext

    (tmp_path / "pick_from_end.py").write_text("def last(results):\n    return -1\n\n"
                                               "def second(results):\n    return 1\n", encoding="utf-8")
    items = [{"text": "a"}, {"text": "b"}]
    ctx = StageContext("p", "j", "join", str(tmp_path))
    assert Join("j", {"fn": "pick_from_end:second"}, ctx).merge(items) is items[1]
    with pytest.raises(IndexError, match=r"returned index -1, but there are 2 results \(0\.\.1\)"):
        Join("j", {"fn": "pick_from_end:last"}, ctx).merge(items)


def test_n_samples_go_on_as_branches_into_a_join(tmp_path):
    body = ("stage request : requests {}\nstage gen : generate { n = 3  temperature = 1.0  seed = 4  max_new_tokens = 5 }\n"
            "stage vote : join { fn = \"hooks:pick_last\" }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> vote -> out\n")
    path = write(tmp_path, body)
    assert check(path) == []
    (res,), rt = run(path, [{"id": "a", "prompt": "hello world", "ignore_eos": True}])
    assert res.ok and len(res.choices) == 1 and len(res.choices[0].data["branches"]) == 3
    assert res.usage["completion_tokens"] == 15
    assert rt.stats()["stages"]["gen"]["items_in"] == 3 and rt.stats()["stages"]["vote"]["items_out"] == 1


def test_n_without_a_join_gives_n_choices_with_their_own_seeds(tmp_path):
    body = ("stage request : requests {}\nstage gen : generate { temperature = 1.0  seed = 4  max_new_tokens = 6 }\n"
            "stage out : respond {}\nrequest -> batch\n" + chain() + "gen -> out\n")
    (res,), _ = run(write(tmp_path, body), [{"id": "a", "prompt": "hello world", "ignore_eos": True, "n": 3}])
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert len({c.text for c in res.choices}) > 1            # seed, seed+1, seed+2: different samples


# ---------------------------------------------------------------- loops

LOOP = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n"
        "stage tool : python { fn = \"hooks:loop\"  returns = request TURNS }\nstage out : respond {}\n"
        "request -> batch\n" + chain() + "gen -> tool\ntool -> batch\ntool -> out\n")


def test_a_bounded_loop_runs_max_turns_then_leaves(tmp_path):
    path = write(tmp_path, LOOP.replace("TURNS", " max_turns = 2"))
    assert check(path) == []
    (res,), rt = run(path, [chat("a", "hello", max_tokens=None)])
    assert res.ok
    stages = rt.stats()["stages"]
    assert stages["gen"]["items_in"] == 3                     # the first pass and two loops
    assert stages["tool"]["items_in"] == 3 and stages["out"]["items_in"] == 1
    messages = res.choices[0].data["request"]["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "again", "again"]


def test_a_loop_keeps_its_step_in_the_requests_metadata(tmp_path):
    """A self-check loop (answer -> critique -> revise) is not told its turn: it keeps its step in
    the metadata of the request it sends back, which comes round to it again with the answer, and it
    lets the answer go after its last step, before `max_turns` bounds it (docs/language.md, Loops)."""
    body = LOOP.replace('"hooks:loop"  returns = request TURNS', '"hooks:steps"  returns = any  max_turns = 5')
    path = write(tmp_path, body)
    assert check(path) == []
    (res,), rt = run(path, [chat("a", "hello", metadata={"user_key": 1})])
    assert res.ok
    assert rt.stats()["stages"]["gen"]["items_in"] == 3 and rt.stats()["stages"]["tool"]["items_in"] == 3
    request = res.choices[0].data["request"]
    assert [m["content"] for m in request["messages"] if m["role"] == "user"] == ["hello", "critique", "revise"]
    assert request["metadata"] == {"user_key": 1, "step": "revise"}


@pytest.mark.parametrize("where", ["stage", "request"])
def test_a_request_looping_back_continues_its_branch_and_is_not_sampled_n_times_again(tmp_path, where):
    """n = 2 at the generate stage (or in the request): two answers, each taking its own way
    round the loop. Sampled n times on every pass, max_turns = 2 would make 2 * 2 * 2 = 8
    sequences of one request (n ** (max_turns + 1): 64 ** 3 with n = 64), past every bound."""
    body = LOOP.replace("TURNS", " max_turns = 2")
    if where == "stage":
        body = body.replace("max_new_tokens = 3 }", "max_new_tokens = 3  n = 2  temperature = 1.0  seed = 3 }")
    path = write(tmp_path, body)
    assert check(path) == []
    extra = {"n": 2, "temperature": 1.0, "seed": 3} if where == "request" else {}
    (res,), rt = run(path, [chat("a", "hello", max_tokens=None, ignore_eos=True, **extra)])
    assert res.ok and [c.index for c in res.choices] == [0, 1]
    stages = rt.stats()["stages"]
    assert stages["gen"]["items_in"] == 6                     # two branches, three passes each
    assert stages["tool"]["items_in"] == 6 and stages["out"]["items_in"] == 2
    assert res.usage["completion_tokens"] == 18
    for c in res.choices:
        messages = c.data["request"]["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "again", "again"]


CASCADE = ("stage request : requests {}\nstage first : generate { max_new_tokens = 3 GEN1 }\n"
           "stage check : python { fn = \"hooks:fall_back\"  returns = any }\n"
           "stage second : generate { max_new_tokens = 4 GEN2 }\nstage out : respond {}\n"
           "request -> batch\n" + chain("first") + chain("second", "batch2", "enc2", "kv2")
           + "first -> check\ncheck -> batch2\ncheck -> out\nsecond -> out\n")


@pytest.mark.parametrize("where", ["stage", "request"])
def test_a_choice_that_falls_back_to_a_second_model_is_answered_once_there(tmp_path, where):
    """n = 2: each choice the first model's answer fails goes to the second model as one
    branch and comes back as one answer, not n again (a request asking for 2 choices got 4)."""
    n2 = "  n = 2  temperature = 1.0  seed = 3"
    body = CASCADE.replace("GEN1", n2 if where == "stage" else "").replace("GEN2", n2 if where == "stage" else "")
    path = write(tmp_path, body)
    assert check(path) == []
    extra = {"n": 2, "temperature": 1.0, "seed": 3} if where == "request" else {}
    (fell, kept), rt = run(path, [chat("fall", "hello", max_tokens=None, **extra),
                                  chat("keep", "hello", max_tokens=None, **extra)])
    assert fell.ok and [c.index for c in fell.choices] == [0, 1]
    assert {c.data["generated_by"] for c in fell.choices} == {"second"}
    assert fell.usage["completion_tokens"] == 2 * 3 + 2 * 4
    assert kept.ok and [c.index for c in kept.choices] == [0, 1]
    assert rt.stats()["stages"]["second"]["items_in"] == 2


def test_the_choices_that_fall_back_together_are_still_n_samples_of_the_second_model(tmp_path):
    """A seeded request with n = 2 whose two drafts both fall back: copy i is sampled there with
    seed + i, as the second model samples its own n copies, so the two answers are two samples
    (copy 0 and copy 1 with the one seed were the same answer twice), and the answer, sent
    whole, numbers them in branch order: choice i is copy i's, whatever order they reached the
    second model in."""
    n2 = {"n": 2, "temperature": 1.0, "seed": 3}
    path = write(tmp_path, CASCADE.replace("GEN1", "").replace("GEN2", ""))
    (fell,), _ = run(path, [chat("fall", "hello", max_tokens=None, **n2)])
    alone = tmp_path / "alone"
    alone.mkdir()
    direct_path = write(alone, "stage request : requests {}\nstage second : generate { max_new_tokens = 4 }\n"
                        "stage out : respond {}\nrequest -> batch2\n" + chain("second", "batch2", "enc2", "kv2")
                        + "second -> out\n")
    (direct,), _ = run(direct_path, [chat("direct", "hello", max_tokens=None, **n2)])
    assert fell.ok and direct.ok
    texts = [c.text for c in fell.choices]
    assert [c.index for c in fell.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [c.text for c in direct.choices]


def test_a_second_model_after_a_single_answer_still_makes_its_own_n_copies(tmp_path):
    """A draft answered once, then a second stage with n = 3 into a vote: the three copies are
    the second stage's own, as without the first (only a branch already split is not split again)."""
    body = (CASCADE.replace("GEN1", "").replace("GEN2", "  n = 3  temperature = 1.0  seed = 3")
            .replace("second -> out", "second -> vote -> out")
            + "stage vote : join { fn = \"hooks:pick_last\" }\n")
    path = write(tmp_path, body)
    assert check(path) == []
    (res,), rt = run(path, [chat("fall", "hello", max_tokens=None)])
    assert res.ok and len(res.choices) == 1 and len(res.choices[0].data["branches"]) == 3
    assert rt.stats()["stages"]["second"]["items_in"] == 3


def test_a_loop_without_a_bound_is_a_cycle_error(tmp_path):
    errs = check(write(tmp_path, LOOP.replace("returns = request TURNS", "returns = any")))
    assert len(errs) == 1 and errs[0].message.startswith("cycle: ")
    assert "max_turns" in errs[0].hint


def test_a_self_loop_is_a_cycle(tmp_path):
    body = ("stage request : requests {}\nstage system : system_prompt { text = \"x\" }\nstage gen : generate {}\n"
            "stage out : respond {}\nrequest -> system -> batch\nsystem -> system\n" + chain() + "gen -> out\n")
    errs = check(write(tmp_path, body))
    assert [e.message for e in errs] == ["cycle: system -> system"]


def test_a_join_inside_a_loop_and_a_bound_without_exit_are_errors(tmp_path):
    body = LOOP.replace("TURNS", " max_turns = 2").replace("tool -> out\n", "")
    body = body.replace("gen -> tool\n", "stage j : join {}\ngen -> j -> tool\nj -> out\n")
    msgs = [e.message for e in check(write(tmp_path, body))]
    assert "join 'j' is inside a loop" in msgs
    assert any("bounds a loop (max_turns = 2) but has no edge out of it" in m for m in msgs)


# ---------------------------------------------------------------- what check rejects, the runtime could not run

def test_a_type_that_reaches_a_loop_bound_with_no_way_out_is_a_check_error(tmp_path):
    """tool's Requests also loop back into tool itself; once max_turns is reached they must
    leave the loop as they are, but its only way out (out) takes Generated results."""
    errs = check(write(tmp_path, LOOP.replace("TURNS", " max_turns = 2") + "tool -> tool\n"))
    assert [e.message for e in errs] == ["Request items that reach 'tool' after max_turns = 2 have no way out of "
                                         "the loop: no edge out of it (out) takes Request items"]


def test_two_batchers_feeding_one_encode_stage_is_a_check_error(tmp_path):
    body = ("stage request : requests {}\nstage gen : generate {}\nstage out : respond {}\n"
            "stage batch2 : dynamic_batch {}\nrequest -> batch\nrequest -> batch2\n"
            "batch2 -> encode\n" + chain() + "gen -> out\n")
    msgs = [e.message for e in check(write(tmp_path, body))]
    assert "2 batchers feed one encode stage 'encode' ('batch2', 'batch')" in msgs


def test_an_encode_stage_feeding_two_kv_stages_is_a_check_error(tmp_path):
    body = ("stage request : requests {}\nstage gen : generate {}\nstage out : respond {}\n"
            "stage kv2 : kv_lookup {}\nstage gen2 : generate {}\nrequest -> batch\n" + chain()
            + "encode -> kv2 -> gen2 -> out\ngen -> out\n")
    msgs = [e.message for e in check(write(tmp_path, body))]
    assert "encode 'encode' feeds 2 kv_lookup stages ('kv2', 'kv')" in msgs


# ---------------------------------------------------------------- visible

def test_every_planned_piece_of_work_runs_and_is_traced(tmp_path):
    body = ("stage request : requests {}\nstage system : system_prompt { text = \"Be brief.\" }\n"
            "stage up : python { fn = \"hooks:upper\" }\nstage gen : generate { max_new_tokens = 4 }\n"
            "stage out : respond {}\nrequest -> system -> batch\n" + chain() + "gen -> up -> out\n")
    path = write(tmp_path, body)
    from pipeline_dsl.engine.trace import Trace

    trace = Trace()
    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1}, trace=trace)
    results = rt.run_all([chat(f"r{i}", "hello there") for i in range(4)])
    rt.shutdown()
    assert all(r.ok for r in results)
    traced = {s.name for s in trace.spans}
    assert set(rt.plan.executed()) <= traced, set(rt.plan.executed()) - traced
    assert {"request.admit", "encode.tokenise", "up.call", "out.respond", "gen.forward"} <= traced
    data = trace.to_chrome()
    item_spans = [e for e in data["traceEvents"] if e.get("name") == "up.call"]
    assert item_spans and all("request" in e["args"] for e in item_spans)


def test_the_runtime_walks_its_trace_for_the_overlap_only_when_asked(tmp_path):
    """The trace keeps up to 100,000 spans across runs: the engine's run does not walk them all
    at its end (the run summary measures the overlap once, from the runtime's trace)."""
    from pipeline_dsl.engine.trace import Trace

    class Counted(Trace):
        walks = 0

        def measured_overlap(self) -> float:
            Counted.walks += 1
            return super().measured_overlap()

    body = "stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n" \
           "request -> batch\n" + chain() + "gen -> out\n"
    trace = Counted()
    rt = PipelineRuntime(load_graph(write(tmp_path, body)), overrides={"threads": 1}, trace=trace)
    for n in range(3):
        assert all(r.ok for r in rt.run_all([chat(f"r{n}", "hello")], keep_open=True))
    rt.shutdown()
    assert trace.spans and Counted.walks == 0
    assert 0.0 <= trace.measured_overlap() <= 1.0 and Counted.walks == 1


def test_run_all_waits_when_the_queue_fills_between_its_check_and_the_submit(tmp_path):
    """A batch never answers a line 'queue full': the queue can fill after the feeder saw room
    (a sequence leaves its engine, still in flight), and then the feeder waits and submits again."""
    from pipeline_dsl.flow.items import PipelineError

    body = "stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n" \
           "request -> batch\n" + chain() + "gen -> out\n"
    rt = PipelineRuntime(load_graph(write(tmp_path, body)), overrides={"threads": 1})
    submit, refused = rt.submit, []

    def racing(data, listener, **kw):
        if len(refused) < 3:                   # as if the queue filled just after the check
            refused.append(data["id"])
            raise PipelineError("the queue is full", "queue_full")
        return submit(data, listener, **kw)

    rt.submit = racing
    results = rt.run_all([chat(f"r{i}", "hello there") for i in range(4)])
    rt.shutdown()
    assert refused == ["r0", "r0", "r0"]
    assert [r.error for r in results] == [None] * 4


def _forty_runs(tmp_path):
    """A two-token pipeline's runtime and 40 `agp run` request lines for it."""
    from pipeline_dsl.commands.runner import RunRequest
    from pipeline_dsl.requests_io import parse_line_object

    body = "stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n" \
           "request -> batch\n" + chain() + "gen -> out\n"
    rt = PipelineRuntime(load_graph(write(tmp_path, body)), overrides={"threads": 1})
    return rt, [RunRequest(slot=i, line=i + 1, parsed=parse_line_object(chat(f"r{i}", "hello"), i + 1))
                for i in range(40)]


def test_the_progress_ends_at_the_total_known_only_after_the_last_answer(tmp_path, monkeypatch):
    """A stream's length is known at its end, which may come after the last answer (a line
    refused there): the bar's last line shows the total then."""
    import io
    import sys

    from pipeline_dsl.commands.runner import run_pipeline

    rt, lines = _forty_runs(tmp_path)
    asked = []

    def total():                  # unknown when the bar starts and at each of the 3 answers
        asked.append(1)
        return 3 if len(asked) > 4 else None

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    run_pipeline(rt, iter(lines[:3]), on_done=lambda slot, record: None, progress=True, total=total)
    rt.shutdown()
    assert "3/3" in sys.stderr.getvalue().splitlines()[-1]


def test_a_batch_keeps_no_answer_once_it_is_handed_on(tmp_path):
    """A long batch's memory does not grow with its answers: run_all(keep_results=False) hands each
    result to on_result and keeps none, and agp run's runner keeps of each only what its summary
    needs, so while the last line is answered the earlier lines' results are gone."""
    import gc

    from pipeline_dsl.commands.runner import run_pipeline
    from pipeline_dsl.flow.items import Result

    rt, lines = _forty_runs(tmp_path)
    alive, records = [], []

    def on_done(slot, record):
        records.append(record)
        if len(records) == len(lines):
            gc.collect()
            alive.append(sum(type(o) is Result for o in gc.get_objects()))

    summary = run_pipeline(rt, lines, on_done=on_done, progress=False)
    rt.shutdown()
    assert summary["requests"] == 40 and summary["errors"] == 0 and len(records) == 40
    assert alive[0] <= 8, alive                 # the last few in flight, not the 40 answered


def test_agp_runs_progress_off_a_terminal_is_a_line_now_and_then_not_one_per_answer(tmp_path, monkeypatch):
    """An `agp run` job's log (standard error, no terminal) got a progress line per answer: the
    runner refreshed the bar with each answer's tok/s, past the bar's interval. Now the first
    line, one at most every LOG_INTERVAL seconds, and the last."""
    import io
    import sys

    from pipeline_dsl.commands.runner import run_pipeline

    rt, lines = _forty_runs(tmp_path)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    summary = run_pipeline(rt, lines, on_done=lambda slot, record: None, progress=True)
    rt.shutdown()
    shown = sys.stderr.getvalue().splitlines()
    assert summary["requests"] == 40 and 2 <= len(shown) <= 3, shown
    assert "0/40" in shown[0] and "40/40" in shown[-1] and "tok/s" in shown[-1]


def test_agp_run_summary_and_stats_report_every_stage(tmp_path):
    from clikit import agp_in

    body = ("stage request : requests {}\nstage up : python { fn = \"hooks:upper\" }\n"
            "stage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> up -> out\n")
    path = write(tmp_path, body)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(chat(f"r{i}", "hi")) for i in range(3)) + "\n")
    stats = tmp_path / "stats.json"
    proc = agp_in("run", path, "-i", inp, "-o", tmp_path / "out.jsonl", "--stats", stats, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "up " in proc.stderr and "rejected" in proc.stderr
    s = json.loads(stats.read_text())
    assert s["stages"]["up"]["items_in"] == 3 and s["stages"]["up"]["items_out"] == 3
    assert set(s["stages"]) == {"request", "batch", "encode", "kv", "gen", "up", "out"}
    assert all(r["text"] == r["text"].upper() for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()))
