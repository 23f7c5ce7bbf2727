"""Diagnostics for slips a new pipeline author makes: each names the place and the fix, and one
slip gives one error (no echo of it from a later check)."""

from __future__ import annotations

import pytest

import pipeline_dsl
from pipeline_dsl.diagnostics import did_you_mean

SEED = """\
pipeline p {
    model = "smollm2-135m-instruct"
    stage request : requests {}
    stage batch : dynamic_batch { timeout = 2ms }
    stage encode : encode {}
    stage kv : kv_lookup {}
    stage gen : generate {}
    stage out : respond {}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}
"""


def errors(text: str):
    return [d for d in pipeline_dsl.loads(text, "t.agp")[1] if d.is_error]


def one(text: str):
    [err] = errors(text)
    return err


def at(err) -> tuple[int, int]:
    return err.pos.line, err.pos.col


def test_a_non_ascii_letter_in_a_name_says_what_names_are():
    err, again = errors(SEED.replace("stage out : respond {}", "stage sortie_é : respond {}")
                        .replace("-> out", "-> sortie_é"))
    assert (err.message, at(err)) == ("unexpected character 'é'", (8, 18))
    assert again.message == err.message and again.hint == err.hint and again.pos.line > 8
    assert err.hint == "names are ASCII letters, digits and '_'; other text belongs in a string (\"…\")"


def test_typographic_quotes_say_to_use_straight_ones():
    err = one(SEED.replace('"smollm2-135m-instruct"', "“smollm2-135m-instruct”"))
    assert (err.message, at(err)) == ("unexpected character '“'", (2, 13))
    assert err.hint == 'strings use straight double quotes: "…", not typographic ones'


def test_a_when_without_its_condition_is_reported_at_the_when():
    err = one(SEED.replace("batch -> encode when full", "batch -> encode when"))
    assert (err.message, at(err)) == ("missing condition after 'when'", (10, 21))
    assert err.hint == "'batch' on the next line starts another edge, not the condition"
    text = SEED.replace("encode -> kv -> gen -> out\n", "encode -> kv -> gen -> out when\n")
    err = one(text)
    assert (err.message, at(err)) == ("missing condition after 'when'", (12, 32))
    assert err.hint == "found '}' instead"
    assert (err.pos.end_line, err.pos.end_col) == (12, 36)           # the span is the word 'when'
    assert err.render({"t.agp": text}).splitlines()[1:3] == ["   12 |     encode -> kv -> gen -> out when",
                                                             "      | " + " " * 31 + "^^^^"]
    err = one(SEED.replace("batch -> encode when full", "batch -> encode when full or"))
    assert (err.message, at(err)) == ("missing condition after 'or'", (10, 31))


@pytest.mark.parametrize("cond, word, col", [('text contains "no"', "contains", 26),
                                             ('finish_reason is "length"', "is", 35),
                                             ('full and text in ["a"]', "in", 35),
                                             ("text matches refusal", "matches", 26)])
def test_a_word_where_a_comparison_goes_is_named_not_the_value_after_it(cond, word, col):
    """`when text contains "no"` read `when text` as a label and `contains` as the next statement,
    and the error stood at the value ("unexpected string; expected '=' or '->'"): it is at the word,
    which is not a comparison, with what to write instead."""
    err = one(SEED.replace("encode -> kv -> gen -> out\n", f"encode -> kv -> gen\n    gen -> out when {cond}\n"
                           "    gen -> out otherwise\n"))
    assert (err.message, at(err)) == (f"'{word}' is not a comparison", (13, col))
    assert err.expected == "a comparison FIELD OP VALUE with == != < <= > >=, joined with and, or, not"
    assert "python stage return a label" in err.hint


@pytest.mark.parametrize("written, fix", [("10 ms", "10ms"), ("1.5 s", "1.5s")])
def test_a_space_before_a_unit_is_named_with_the_quantity_to_write(written, fix):
    err = one(SEED.replace("timeout = 2ms", f"timeout = {written}"))
    assert (err.message, at(err)) == (f"a space between '{written.split()[0]}' and its unit '{written.split()[1]}'",
                                      (4, 45))
    assert err.hint == f"write {fix}"


@pytest.mark.parametrize("written, fix", [("2min", "120s"), ("1h", "3600s"), ("5sec", "5s"), ("3m", "180s"),
                                         ("500ns", "0.5us"), ("2000ns", "2us")])
def test_a_duration_in_other_units_is_respelled_in_seconds(written, fix):
    err = one(SEED.replace("timeout = 2ms", f"timeout = {written}"))
    assert err.message == f"unknown unit '{written.lstrip('0123456789')}' in '{written}'"
    assert err.hint == f"write {fix}"


@pytest.mark.parametrize("written, fix", [("512MB", "512MiB"), ("64kb", "64KiB"), ("512m", "512MiB"),
                                         ("2tb", "2048GiB"), ("1TiB", "1024GiB")])
def test_a_size_in_other_units_is_respelled_in_binary_units(written, fix):
    err = one(SEED.replace("stage kv : kv_lookup {}", f"stage kv : kv_lookup {{ budget = {written} }}"))
    assert err.hint == f"write {fix}"


def test_a_dtype_by_torch_name_suggests_agp_name():
    err = one(SEED.replace("stage gen : generate {}", "stage gen : generate { dtype = float16 }"))
    assert (err.message, err.hint) == ("'float16' is not a valid value for 'dtype'", "did you mean 'fp16'?")


def test_a_loop_through_an_unbounded_python_stage_names_it_for_max_turns():
    err = one(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage t : python { fn = "json:loads" '
                           ' returns = any }').replace("gen -> out", "gen -> t\n    t -> batch\n    t -> out"))
    assert err.message == "cycle: batch -> encode -> kv -> gen -> t -> batch"
    assert err.hint == "remove the edge t -> batch, or give 't' (python) max_turns = N to bound the loop"


@pytest.mark.parametrize("back, cycle", [
    ("gen -> batch", "batch -> encode -> kv -> gen -> batch"),
    ("out -> gen", "gen -> out -> gen"),
    ("kv -> encode", "encode -> kv -> encode"),
])
def test_a_cycle_blames_the_edge_that_goes_back_not_one_of_the_chain(back, cycle):
    # the stage declared first is not where the loop starts: `out` before `gen` blamed gen -> out
    text = SEED.replace("    stage gen : generate {}\n", "").replace(
        "stage out : respond {}", "stage out : respond {}\n    stage gen : generate {}")
    errs = [e for e in errors(text.replace("encode -> kv -> gen -> out", f"encode -> kv -> gen -> out\n    {back}"))
            if e.message.startswith("cycle:")]
    assert [e.message for e in errs] == [f"cycle: {cycle}"]
    assert errs[0].hint.startswith(f"remove the edge {back},") and errs[0].pos.line == 13


def test_generate_stages_sharing_an_engine_compare_what_their_settings_come_to():
    shared = SEED.replace("stage out : respond {}", "stage out : respond {}\n    stage gen2 : generate GEN2").replace(
        "gen -> out", "gen -> out\n    kv -> gen2 when temperature > 0\n    gen2 -> out").replace(
        "kv -> gen -> out", "kv\n    kv -> gen otherwise\n    gen -> out")
    # the embedded model and device auto, written out, are what `gen` runs without them
    assert errors(shared.replace("GEN2", '{ model = "smollm2-135m-instruct"  device = auto }')) == []
    err = one(shared.replace("GEN2", "{ device = cpu }"))
    assert err.message.endswith("differ in device") and err.expected == "device = auto as in 'gen'"


def test_a_batcher_missing_an_edge_names_the_edge():
    err = one(SEED.replace("    batch -> encode when timeout\n", ""))
    assert err.message.startswith("timeout items of 'batch' have nowhere to go")
    assert err.hint == "add `batch -> encode when timeout`"


def test_a_refused_batcher_condition_is_not_echoed_as_items_with_nowhere_to_go():
    err = one(SEED.replace("batch -> encode when full", "batch -> encode when prompt_tokens > 3"))
    assert err.message == "the batcher 'batch' cannot route by request fields"
    err = one(SEED.replace("batch -> encode when full", "batch -> encode when fulll"))
    assert (err.message, err.hint) == ("unknown condition 'fulll' on an edge from 'batch'", "did you mean 'full'?")


def test_a_request_edge_straight_into_generate_names_the_whole_chain_to_route_through():
    lost, err = errors(SEED.replace("request -> batch", "request -> gen"))
    assert lost.message == "stage 'batch' is unreachable: no path from 'request' leads to it"
    assert lost.notes == (("the 2 stages after it are unreachable too: 'encode', 'kv'", None),)
    assert err.message.startswith("port type mismatch on edge request -> gen")
    assert err.hint == ("route the edge through the stages the pipeline already has: "
                        "request -> batch -> encode -> kv -> gen")
    alone, err = errors(SEED.replace("encode -> kv -> gen -> out", "encode -> gen -> out"))
    assert alone.message == "stage 'kv' is not connected: no edge enters or leaves it"
    assert err.hint == "route the edge through 'kv' (kv_lookup), which the pipeline already has: encode -> kv -> gen"


def test_a_batcher_edge_straight_into_generate_names_the_engine_chain_between_them():
    """`request -> batch -> gen`, the engine chain's middle left out, is told the stages to route
    through (or to insert), as an edge from the request source is (it had no help)."""
    text = SEED.replace("batch -> encode when full\n    batch -> encode when timeout\n    encode -> kv -> gen",
                        "batch -> gen")
    errs = [e for e in errors(text) if e.message.startswith("port type mismatch")]
    assert [(e.message, e.hint) for e in errs] == [(
        "port type mismatch on edge batch -> gen: 'batch' (dynamic_batch) gives Batch, 'gen' (generate) takes "
        "CachedTokens", "route the edge through the stages the pipeline already has: batch -> encode -> kv -> gen")]
    text = SEED.replace("    stage encode : encode {}\n    stage kv : kv_lookup {}\n", "").replace(
        "batch -> encode when full\n    batch -> encode when timeout\n    encode -> kv -> gen", "batch -> gen")
    [err] = errors(text)
    assert err.hint == "insert encode -> kv_lookup stages between them"


def test_a_port_mismatch_says_to_insert_a_stage_only_when_the_pipeline_has_none_of_its_kind():
    """The stage the edge lacks is named when the pipeline has it (not connected); with two of
    its kind both are offered; with none, one is to be inserted."""
    [err] = errors(SEED.replace("    stage kv : kv_lookup {}\n", "").replace("encode -> kv -> gen", "encode -> gen"))
    assert err.message.startswith("port type mismatch on edge encode -> gen") and \
        err.hint == "insert a kv_lookup stage between them"
    text = SEED.replace("encode -> kv -> gen -> out", "encode -> gen -> out\n    stage kv2 : kv_lookup {}")
    [err] = [e for e in errors(text) if e.message.startswith("port type mismatch")]
    assert err.hint == "route the edge through one of the kv_lookup stages the pipeline already has: 'kv', 'kv2'"
    text = SEED.replace("    stage kv : kv_lookup {}\n", "").replace("request -> batch", "request -> gen")
    [err] = [e for e in errors(text) if e.message.startswith("port type mismatch")]
    assert err.hint == ("insert dynamic_batch -> encode -> kv_lookup stages between them "
                        "(the pipeline already has dynamic_batch 'batch'; encode 'encode')")


def test_min_tokens_above_max_new_tokens_is_a_warning_at_min_tokens():
    _, diags = pipeline_dsl.loads(SEED.replace("generate {}", "generate { max_new_tokens = 4  min_tokens = 10 }"),
                                  "t.agp")
    [warn] = diags
    assert not warn.is_error and at(warn) == (7, 61)
    assert warn.message == ("min_tokens = 10 is more than max_new_tokens = 4: an answer that keeps these defaults "
                            "stops at 4 tokens")


def test_agp_draw_is_render(tmp_path):
    from pipeline_dsl import cli

    path = tmp_path / "p.agp"
    path.write_text(SEED, encoding="utf-8")
    assert cli.main(["draw", str(path), "-o", str(tmp_path / "p.dot")]) == 0
    assert (tmp_path / "p.dot").read_text(encoding="utf-8").startswith("digraph agp {")


def test_a_stage_outside_any_pipeline_says_where_stages_go():
    err = one("stage x : route {}\n" + SEED)
    assert (err.message, at(err)) == ("unexpected 'stage'", (1, 1))
    assert err.hint == ("stages, settings and edges go inside `pipeline NAME { … }` (`use` includes whole "
                        "pipelines, not loose stages)")


LABELS = '''
def classify(item):
    if "?" in item.get("prompt", ""):
        return "question"
    return "chat" if item.get("metadata") else None

def opaque(item):
    label = item["metadata"]["route"]
    return label

def passthrough(item):
    item["prompt"] = item["prompt"].strip()
    return dict(item)
'''


@pytest.mark.parametrize("fn, edge, warned", [
    ("classify", "when questions", "hooks:classify never returns the label 'questions' (it returns 'chat', "
                                   "'question'), so this edge is never taken"),
    ("passthrough", "when question", "hooks:passthrough never returns the label 'question' (it returns no "
                                     "label), so this edge is never taken"),
    ("classify", "when question", None),           # a label the function returns
    ("opaque", "when anything", None),              # a return the source cannot settle: no word
    ("classify", "when question and prompt_tokens > 10", None),
])
def test_a_label_the_python_stage_never_returns_is_a_warning_at_the_label(tmp_path, fn, edge, warned):
    (tmp_path / "hooks.py").write_text(LABELS)
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", f'stage out : respond {{}}\n    stage cls : python '
                                 f'{{ fn = "hooks:{fn}" }}\n    stage r : route {{}}').replace(
        "request -> batch", f"request -> cls\n    cls -> r {edge}\n    cls -> batch otherwise\n    r -> batch"))
    diags = pipeline_dsl.load(str(path))[1]
    assert [d.message for d in diags if d.is_error] == []
    got = [d for d in diags if not d.is_error]
    assert [d.message.split(": ", 1)[1] for d in got] == ([warned] if warned else [])
    if warned and "questions" in edge:
        assert got[0].hint == "did you mean 'question'?" and (got[0].pos.line, got[0].pos.col) == (12, 19)


def test_a_label_that_is_no_name_is_fixed_in_the_function_not_in_the_edge(tmp_path):
    """The function returns "needs-repair", which no `when` can match (a label is a name). The
    warning at `when needs_repair` said "did you mean 'needs-repair'?" and offered `when fine |
    needs-repair`, both a syntax error when written; it now says the returned label is no name and
    that the function should return the one the edge writes."""
    (tmp_path / "hooks.py").write_text('def lab(item):\n    return "needs-repair" if item.get("user") else "fine"\n')
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage cls : python '
                                 '{ fn = "hooks:lab" }\n    stage r : route {}').replace(
        "request -> batch", "request -> cls\n    cls -> r when needs_repair\n    cls -> batch otherwise\n"
                            "    r -> batch"))
    diags = pipeline_dsl.load(str(path))[1]
    assert [d.message for d in diags if d.is_error] == []
    [warn] = diags
    assert warn.message.split(": ", 1)[1] == (
        "hooks:lab never returns the label 'needs_repair' (it returns 'fine', 'needs-repair'; 'needs-repair' is "
        "no name, which no `when` can match), so this edge is never taken")
    assert warn.expected == "when fine"
    assert warn.hint == ("it returns 'needs-repair', but a label is a name (letters, digits and '_', no keyword): "
                         "have hooks:lab return 'needs_repair' instead")


RETURNS = '''
import functools

def both(item):
    if item.get("user"):
        return item, "vip"
    return item

def number(item):
    return 42

def fine(item):
    def inner():
        return 1, 2                 # the nested function's, not the stage's
    label = (1, 2)
    return "vip" if inner() else None

def wrap(f):
    @functools.wraps(f)
    def call(item):
        return dict(zip(("item", "label"), f(item)))
    return call

@wrap
def wrapped(item):
    return item, "vip"              # its decorator makes the dict the stage gets
'''


@pytest.mark.parametrize("fn, said", [
    ("both", "hooks:both returns a tuple at line 6; a python stage's function returns the item's dict, "
             "a label string or None"),
    ("number", "hooks:number returns an int at line 10; a python stage's function returns the item's dict, "
               "a label string or None"),
    ("fine", None),
    ("wrapped", None),
])
def test_a_return_no_python_stage_may_give_is_an_error_at_fn(tmp_path, fn, said):
    """`return item, "vip"` (the item and a label at once) or `return 42`: the run failed the
    request each time that return was reached (`returned tuple; expected the item's dict, a label
    string or None`) after check accepted it. Check now reads the return's literal and says which
    line; what the source does not settle (a variable, a decorator's wrapper) is left to the run."""
    (tmp_path / "hooks.py").write_text(RETURNS)
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", f'stage out : respond {{}}\n    stage p : python '
                                 f'{{ fn = "hooks:{fn}" }}').replace("request -> batch", "request -> p -> batch"))
    got = [d for d in pipeline_dsl.load(str(path))[1] if d.is_error]
    if said is None:
        assert got == []
        return
    [err] = got
    assert err.message == f"stage 'p': {said}" and (err.pos.line, err.pos.col) == (9, 29)
    assert (err.hint is not None) == (fn == "both")


KINDS = '''
import copy

def again(item):
    return item["request"]

def revise(item):
    req = copy.deepcopy(item["request"])
    req["messages"].append({"role": "user", "content": "Shorter, please."})
    return req if item["finish_reason"] == "length" else item

def canned(item):
    if item.get("prompt") == "hi":
        return {"text": "Hello!"}
    return item

def same(item):
    return dict(item)

def maybe_retry(item, retry=False):
    if retry and item["finish_reason"] == "length":
        return item["request"]
    return item

def checked(item):
    if not item["text"]:
        raise ValueError("no answer")
    return item["request"]

def copied(item):
    req = dict(item["request"])
    return req
'''


def _kinds_pipeline(tmp_path, fn: str, where: str, returns: str = "") -> list:
    (tmp_path / "hooks.py").write_text(KINDS)
    path = tmp_path / "p.agp"
    text = SEED.replace("stage out : respond {}", f'stage out : respond {{}}\n    stage p : python '
                        f'{{ fn = "hooks:{fn}"{returns} }}')
    text = text.replace("gen -> out", "gen -> p -> out") if where == "after" else \
        text.replace("request -> batch", "request -> p -> batch")
    path.write_text(text)
    return pipeline_dsl.load(str(path))[1]


def test_a_function_that_returns_the_request_after_generate_is_an_error_at_fn(tmp_path):
    """`gen -> p -> out` with `return item["request"]` in p (returns = same, the default): check
    accepted it and every request failed at run (`stage 'p' returned a Request but declares returns =
    same`, a 500). Check reads the return and says the fix: a Request cannot reach respond."""
    [err] = [d for d in _kinds_pipeline(tmp_path, "again", "after") if d.is_error]
    assert err.message == ("stage 'p': hooks:again returns a Request at line 5 (return item['request']), but the "
                           "stage gets Generated items and gives the type it gets (returns = same, the default): "
                           "each request that reaches that return fails there")
    assert (err.pos.line, err.pos.col) == (9, 29)
    assert err.hint == ("a Request cannot go on from 'p' (its edges lead only to stages that take Generated): to "
                        "answer, return a result (the item, or {\"text\": …}); to ask the model again, say returns "
                        "= any and add an edge from 'p' back to a batcher (with max_turns to bound the loop)")
    [err] = [d for d in _kinds_pipeline(tmp_path, "copied", "after", "  returns = generated") if d.is_error]
    assert err.message.startswith("stage 'p': hooks:copied returns a Request at line 32 (return req), but the stage "
                                  "gets Generated items and says returns = generated: each request that reaches")


@pytest.mark.parametrize("fn, line, text", [
    ("maybe_retry", 22, "item['request']"),   # behind `if retry and …` (False unless args say so)
    ("checked", 28, "item['request']"),       # after a raise: not every call gets there
    ("revise", 10, "req"),                    # one side of `req if … else item`
])
def test_a_function_that_may_return_the_request_after_generate_is_a_warning_at_fn(tmp_path, fn, line, text):
    """A hook shared between a looping pipeline (`args = { retry = true }`, returns = any) and a plain
    one returns `item["request"]` only behind a condition: check refused it in the plain one (an
    error), which runs fine. A return behind a condition is a warning that the function may return
    a Request, and a request that reaches it fails; one every call reaches stays an error (above)."""
    diags = [d for d in _kinds_pipeline(tmp_path, fn, "after") if "returns" in d.message]
    assert [d.message for d in diags if d.is_error] == []
    [warn] = diags
    assert warn.message == (f"stage 'p': hooks:{fn} may return a Request at line {line} (return {text}), but the "
                            "stage gets Generated items and gives the type it gets (returns = same, the default): "
                            "a request that reaches that return fails there")
    assert (warn.pos.line, warn.pos.col) == (9, 29)


def test_a_function_that_returns_the_request_into_a_loop_is_told_to_say_returns_request(tmp_path):
    """Where the stage's edges do lead back to a batcher, the fix is only to say what it returns."""
    (tmp_path / "hooks.py").write_text(KINDS)
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage p : python '
                                 '{ fn = "hooks:again"  max_turns = 2 }\n    stage r : route {}')
                    .replace("gen -> out", "gen -> p -> r\n    r -> batch\n    r -> out\n    p -> out"))
    [err] = [d for d in pipeline_dsl.load(str(path))[1] if d.is_error and d.message.startswith("stage 'p'")]
    assert err.message.startswith("stage 'p': hooks:again returns a Request at line 5")
    assert err.hint == "say so: returns = request (or any, where it also gives Generated items back)"


def test_a_function_that_may_answer_a_request_before_the_batcher_is_a_warning_at_fn(tmp_path):
    [err] = [d for d in _kinds_pipeline(tmp_path, "canned", "before") if "returns" in d.message]
    assert not err.is_error
    assert err.message.startswith("stage 'p': hooks:canned may return a Generated at line 14 (return {'text': "
                                  "'Hello!'}), but the stage gets Request items")
    assert err.hint == ("to answer the request here, say returns = any (it also passes the requests it gets on) and "
                        "add an edge from 'p' to a respond stage")
    # with the edge to respond, the hint is to say returns = any, which checks clean; returns =
    # generated (what it said too) types p -> batch Generated
    path = tmp_path / "p.agp"
    path.write_text(path.read_text().replace("request -> p -> batch", "request -> p -> batch\n    p -> out"))
    [err] = [d for d in pipeline_dsl.load(str(path))[1] if d.message.startswith("stage 'p'")]
    assert err.hint == "say so: returns = any (it also passes the Request items it gets on)"
    path.write_text(path.read_text().replace('"hooks:canned"', '"hooks:canned"  returns = any'))
    assert [d.message for d in pipeline_dsl.load(str(path))[1] if d.is_error] == []
    path.write_text(path.read_text().replace("returns = any", "returns = generated"))
    assert [d.message for d in pipeline_dsl.load(str(path))[1] if d.is_error] == [
        "port type mismatch on edge p -> batch: 'p' (python) gives Generated, 'batch' (dynamic_batch) takes Request"]


@pytest.mark.parametrize("fn, where, returns", [
    ("revise", "after", "  returns = any  max_turns = 2"),   # says it may do both
    ("same", "after", ""),                                     # dict(item): the same type
    ("canned", "before", "  returns = any"),
])
def test_a_function_whose_returns_fit_what_the_stage_says_is_no_error(tmp_path, fn, where, returns):
    diags = _kinds_pipeline(tmp_path, fn, where, returns)
    assert [d.message for d in diags if "returns a" in d.message] == []


def test_a_stream_filters_return_of_another_value_is_no_error(tmp_path):
    """A `stream = true` generator's `return` is its label (a string) or nothing: the run keeps a
    string and ignores any other value, so `return n, "counted"` after its yields fails no
    request, and check (which reads a plain python stage's returns) takes it."""
    (tmp_path / "hooks.py").write_text('def guard(item, chunks):\n    n = 0\n    for text in chunks:\n'
                                       '        n += 1\n        yield text\n    return n, "counted"\n')
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage g : python '
                                 '{ fn = "hooks:guard"  stream = true }').replace("gen -> out", "gen -> g -> out"))
    assert [d.message for d in pipeline_dsl.load(str(path))[1] if d.is_error] == []


def test_check_reads_a_python_stages_module_once_and_again_once_it_changes(tmp_path, monkeypatch):
    """One check asks several things of a stage's function (that it exists, its shape, its
    signature, its labels): the module is parsed once for them all, and once more after an edit
    (one of the same size, within the same clock tick, too)."""
    import ast

    parsed = []
    parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda source, filename="<unknown>", *a, **kw: (
        parsed.append(filename), parse(source, filename, *a, **kw))[1])
    hooks = tmp_path / "hooks.py"
    hooks.write_text('def pick(item):\n    return "aa"\n')
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage cls : python '
                                 '{ fn = "hooks:pick" }\n    stage r : route {}').replace(
        "request -> batch", "request -> cls\n    cls -> r when ab\n    cls -> batch otherwise\n    r -> batch"))

    def warned():
        diags = pipeline_dsl.load(str(path))[1]
        assert [d.message for d in diags if d.is_error] == []
        return [d.message.split(": ", 1)[1] for d in diags]

    never = "hooks:pick never returns the label 'ab' (it returns 'aa'), so this edge is never taken"
    assert warned() == [never] and warned() == [never]
    assert parsed.count(str(hooks)) == 1
    hooks.write_text('def pick(item):\n    return "ab"\n')
    assert warned() == []
    assert parsed.count(str(hooks)) == 2


SPLITS = {
    "ternary": 'def split(item):\n    return "b" if len(item.get("prompt", "")) < 50 else "a"\n',
    "branches": ('def split(item):\n    if item.get("user"):\n        return "a"\n    elif item.get("metadata"):\n'
                 '        return "b"\n    else:\n        raise ValueError("no user")\n'),
    "fall_through": 'def split(item):\n    if item.get("user"):\n        return "a"\n    return "b"\n',
    "async": 'async def split(item):\n    return "a" if item.get("user") else "b"\n',
    "try": ('def split(item):\n    try:\n        return "a" if item["user"] else "b"\n'
            '    except KeyError:\n        return "b"\n'),
    # anything not provably a label keeps the rule
    "variable": 'def split(item):\n    label = "a" if item.get("user") else "b"\n    return label\n',
    "may_end": 'def split(item):\n    if item.get("user"):\n        return "a"\n',
    "item_too": 'def split(item):\n    if item.get("user"):\n        return "a"\n    return item\n',
    "none_too": 'def split(item):\n    return "a" if item.get("user") else None\n',
    "unedged": 'def split(item):\n    return "a" if item.get("user") else "c"\n',
    "decorated": ('import functools\n\n@functools.lru_cache\ndef split(item):\n'
                  '    return "a" if item.get("user") else "b"\n'),
    "loop": 'def split(item):\n    while True:\n        return "a"\n',
    # a context manager may swallow the exception that skipped the return: the function returns None
    "suppressed": ('import contextlib\n\ndef split(item):\n    with contextlib.suppress(KeyError):\n'
                   '        return "a" if item["user"] else "b"\n'),
    "suppressed_then_raise": ('import contextlib\n\ndef split(item):\n    with contextlib.suppress(KeyError):\n'
                              '        return "a" if item["user"] else "b"\n    raise ValueError("no user")\n'),
    # the def that runs is not the one read: a conditional def, a name bound again by a loop
    "conditional_def": ('import os\n\nif os.environ.get("SPLIT_BY_LABEL"):\n    def split(item):\n'
                        '        return item.get("label")\nelse:\n    def split(item):\n'
                        '        return "a" if item.get("user") else "b"\n'),
    "rebound": ('def by_label(item):\n    return item.get("label")\n\n\ndef split(item):\n'
                '    return "a" if item.get("user") else "b"\n\n\nfor split in [by_label]:\n    pass\n'),
    "global": ('def split(item):\n    return "a" if item.get("user") else "b"\n\n\ndef by_label(fn):\n'
               '    global split\n    split = fn\n'),
    "rebound_import": ('def split(item):\n    return "a" if item.get("user") else "b"\n\n\ntry:\n'
                       '    from fast_split import split\nexcept ImportError:\n    pass\n'),
    "rebound_if": ('def split(item):\n    return "a" if item.get("user") else "b"\n\n\nif True:\n'
                   '    split = print\n'),
}


@pytest.mark.parametrize("fn, edge_a, nowhere", [
    ("ternary", "when a", False), ("branches", "when a", False), ("fall_through", "when a", False),
    ("async", "when a", False), ("try", "when a", False), ("ternary", "when a or prompt_tokens > 9", False),
    ("variable", "when a", True), ("may_end", "when a", True), ("item_too", "when a", True),
    ("none_too", "when a", True), ("unedged", "when a", True), ("decorated", "when a", True),
    ("loop", "when a", True), ("ternary", "when a and prompt_tokens > 9", True),
    ("suppressed", "when a", True), ("suppressed_then_raise", "when a", False),
    ("conditional_def", "when a", True), ("rebound", "when a", True), ("global", "when a", True),
    ("rebound_import", "when a", True), ("rebound_if", "when a", True),
])
def test_a_python_stage_whose_every_return_is_an_edged_label_needs_no_otherwise(tmp_path, fn, edge_a, nowhere):
    # `return "b" if h < 50 else "a"` with `when a` and `when b` edges leaves no item without an edge;
    # a return the source does not prove a label (or a label without an edge) keeps the rule
    (tmp_path / "hooks.py").write_text(SPLITS[fn])
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage split : python '
                                 '{ fn = "hooks:split" }\n    stage ra : route {}\n    stage rb : route {}').replace(
        "request -> batch", f"request -> split\n    split -> ra {edge_a}\n    split -> rb when b\n"
                            "    ra -> batch\n    rb -> batch"))
    errs = [d.message for d in pipeline_dsl.load(str(path))[1] if d.is_error]
    assert errs == (["an item of 'split' that matches none of its conditions has nowhere to go (no unconditional "
                     "edge and no `otherwise`)"] if nowhere else [])


STREAM_SPLITS = {
    "labelled": ('def split(item, chunks):\n    n = 0\n    for c in chunks:\n        n += len(c)\n'
                 '        yield c\n    return "a" if n > 3 else "b"\n'),
    # keeps the rule: a bare return (no label), a body that may end without one, an async generator
    "bare": ('def split(item, chunks):\n    for c in chunks:\n        if not c:\n            return\n'
             '        yield c\n    return "a"\n'),
    "may_end": 'def split(item, chunks):\n    for c in chunks:\n        yield c\n',
    "async": 'async def split(item, chunks):\n    async for c in chunks:\n        yield c\n',
}


@pytest.mark.parametrize("fn, nowhere", [("labelled", False), ("bare", True), ("may_end", True), ("async", True)])
def test_a_stream_stage_whose_generator_ends_in_an_edged_label_needs_no_otherwise(tmp_path, fn, nowhere):
    """docs/language.md: a `stream = true` stage's plain generator may `return "LABEL"` for `when
    LABEL` edges, and the runtime drives it to that return (flow/streams.run_filter): one whose every
    return is an edged label needs no `otherwise`, as a plain function's does (test above). It was
    told its items had nowhere to go."""
    (tmp_path / "hooks.py").write_text(STREAM_SPLITS[fn])
    path = tmp_path / "p.agp"
    path.write_text(SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage split : python '
                                 '{ fn = "hooks:split"  stream = true }\n    stage ra : route {}\n    stage rb : route {}')
                    .replace("gen -> out", "gen -> split\n    split -> ra when a\n    split -> rb when b\n"
                                           "    ra -> out\n    rb -> out"))
    errs = [d.message for d in pipeline_dsl.load(str(path))[1] if d.is_error]
    assert errs == (["an item of 'split' that matches none of its conditions has nowhere to go (no unconditional "
                     "edge and no `otherwise`)"] if nowhere else [])


def _routed(cond: str) -> str:
    return SEED.replace("request -> batch\n", f"request -> route\n    route -> batch when {cond}\n"
                        "    route -> batch otherwise\n").replace("stage batch", "stage route : route {}\n    stage batch")


@pytest.mark.parametrize("cond, hint", [
    ("max_tokens > prompt_tokens", "'prompt_tokens' is a field: two fields cannot be compared; compare each "
                                   "with a literal"),
    ("stream == True", "write true"),
    ("metadata.vip == False", "write false"),
    ("model == null", "there is no null: a field the item does not carry makes ==, <, <=, >, >= false and != true"),
    ("prompt_tokens > many", "'prompt_tokens' is a number: compare it with a number"),
    ("stream == yes", "'stream' is a boolean: compare it with true or false"),
    ("model == smollm", 'quote a string: "smollm"'),
])
def test_a_bare_word_in_a_comparison_gets_the_fix_its_field_takes(cond, hint):
    """Quoting is the fix for a string field only: "True" for a boolean, or a quoted field name,
    would be the next error."""
    err = one(_routed(cond))
    assert err.message.endswith("is a bare word; a condition compares a field with a literal")
    assert err.hint == hint and at(err) == (11, 25 + cond.rindex(" ") + 1)


def test_min_tokens_equal_to_max_new_tokens_is_no_warning():
    _, diags = pipeline_dsl.loads(SEED.replace("generate {}", "generate { max_new_tokens = 4  min_tokens = 4 }"),
                                  "t.agp")
    assert diags == []


def test_each_call_setting_of_a_join_without_fn_is_a_warning_at_it():
    """docs/language.md, `join`: on a join without `fn`, workers, timeout, retries and backoff do
    nothing (`check` warns)."""
    text = SEED.replace("stage gen : generate {}", "stage gen : generate { n = 2 }\n"
                        "    stage j : join { timeout = 2s  backoff = 1s  workers = 4  retries = 1 }") \
        .replace("gen -> out", "gen -> j -> out")
    diags = pipeline_dsl.loads(text, "t.agp")[1]
    assert not any(d.is_error for d in diags)
    assert [(at(d), d.message.split(" but ")[0]) for d in diags] == [
        ((8, 32), "join 'j' sets timeout"), ((8, 46), "join 'j' sets backoff"),
        ((8, 60), "join 'j' sets workers"), ((8, 73), "join 'j' sets retries")]
    assert diags[1].message.endswith("the built-in policy first runs no user code, so backoff does nothing")


@pytest.mark.parametrize("stage, param, needs", [
    ('python { fn = "hooks:same"  cache_ttl = 60s }', "cache_ttl", "cache"),
    ('python { fn = "hooks:same"  cache = 0  cache_ttl = 60s }', "cache_ttl", "cache"),
    ('python { fn = "hooks:same"  backoff = 100ms }', "backoff", "retries"),
    ('join { fn = "hooks:first"  backoff = 100ms }', "backoff", "retries"),
])
def test_a_setting_that_only_tunes_one_left_off_is_a_warning_at_it(tmp_path, stage, param, needs):
    """docs/language.md, "Python stages": `cache_ttl` ages out the entries of `cache` (0: off) and
    `backoff` spaces the tries of `retries` (0: none); written without them they do nothing, which
    `check` says, where `cache = 100  cache_ttl = 60s` or `retries = 2  backoff = 100ms` says nothing."""
    (tmp_path / "hooks.py").write_text("def same(item):\n    return item\n\n\n"
                                       "def first(results):\n    return 0\n")
    text = SEED.replace("stage gen : generate {}", f"stage gen : generate {{ n = 2 }}\n    stage x : {stage}")
    text = text.replace("gen -> out", "gen -> x -> out") if stage.startswith("join") else \
        text.replace("request -> batch", "request -> x -> batch")
    (tmp_path / "p.agp").write_text(text)
    diags = pipeline_dsl.load(str(tmp_path / "p.agp"))[1]
    assert [(d.is_error, d.message) for d in diags] == [
        (False, f"{'join' if stage.startswith('join') else 'stage'} 'x' sets {param} but {needs} = 0 (off): "
                f"{param} does nothing without {needs}")]
    line = text.splitlines()[7]                                    # stage x, the line after gen's
    assert at(diags[0]) == (8, line.index(f"{param} = ") + len(f"{param} = ") + 1)   # at the value
    fixed = text.replace(f"{param} =", f"{needs} = 2  {param} =").replace("cache = 0  cache = 2", "cache = 2")
    (tmp_path / "p.agp").write_text(fixed)
    assert pipeline_dsl.load(str(tmp_path / "p.agp"))[1] == []


def test_a_derived_pipeline_that_turns_its_bases_cache_and_retries_off_can_say_so_without_a_warning(tmp_path):
    """A derived pipeline that turns off its base's cache (`t.cache = 0`) is told at the base's
    `cache_ttl` that it does nothing now, and it cannot remove a line of its base: writing it back
    to its default (`t.cache_ttl = 0`, the kind's own value) is how it takes it back, and a value
    that changes nothing is no warning. The same for `backoff` without retries and speculation's
    tuning written as their defaults; any other value still warns."""
    (tmp_path / "hooks.py").write_text("def same(item):\n    return item\n")
    base = SEED.replace("stage gen : generate {}",
                        "stage gen : generate { speculate = ngram  speculative_tokens = 6 }\n"
                        '    stage t : python { fn = "hooks:same"  cache = 4  cache_ttl = 50ms  retries = 2  backoff = 1s }') \
        .replace("request -> batch", "request -> t -> batch")
    off = "t.cache = 0  t.retries = 0  gen.speculate = off"
    defaults = "t.cache_ttl = 0  t.backoff = 500ms  gen.speculative_tokens = 4"

    def warnings(derived: str) -> list[str]:
        (tmp_path / "p.agp").write_text(base + f"pipeline d : p {{ {derived} }}\n")
        diags = pipeline_dsl.load(str(tmp_path / "p.agp"))[1]
        assert not any(d.is_error for d in diags), [d.message for d in diags]
        return sorted(d.message.split(" but ")[0] for d in diags)

    assert warnings("") == []
    assert warnings(off) == ["generate 'gen' sets speculative_tokens", "stage 't' sets backoff",
                             "stage 't' sets cache_ttl"]
    assert warnings(f"{off}  {defaults}") == []
    assert warnings(f"{off}  {defaults}".replace("t.cache_ttl = 0", "t.cache_ttl = 1s")) == ["stage 't' sets cache_ttl"]
    (tmp_path / "p.agp").write_text(base + f"pipeline d : p {{ {off} }}\n")    # the hint says how
    hints = {d.message.split(" but ")[0]: d.hint for d in pipeline_dsl.load(str(tmp_path / "p.agp"))[1]}
    assert hints["stage 't' sets cache_ttl"].endswith("writes it as its default: cache_ttl = 0s)")
    assert hints["stage 't' sets backoff"].endswith("writes it as its default: backoff = 500ms)")


def test_a_join_without_fn_that_writes_its_call_settings_as_their_defaults_is_no_warning():
    """A join without fn warns at a call setting it writes (they run its fn: test above), but not
    at one written as the kind's own default, which changes nothing."""
    text = SEED.replace("stage gen : generate {}", "stage gen : generate { n = 2 }\n"
                        "    stage j : join { timeout = 0  backoff = 500ms  workers = 16  retries = 0 }") \
        .replace("gen -> out", "gen -> j -> out")
    assert pipeline_dsl.loads(text, "t.agp")[1] == []
    diags = pipeline_dsl.loads(text.replace("workers = 16", "workers = 8"), "t.agp")[1]
    assert [d.message.split(" but ")[0] for d in diags] == ["join 'j' sets workers"]


@pytest.mark.parametrize("old, new, at_, words", [
    ("timeout = 2ms", "timeout = -1ms", (4, 45), "'timeout' is a duration, never negative: '-1ms'"),
    ("timeout = 2ms", "timeout = -0.5s", (4, 45), "'timeout' is a duration, never negative: '-0.5s'"),
    ("kv_lookup {}", "kv_lookup { budget = -1B }", (6, 37), "'budget' is a size, never negative: '-1B'"),
])
def test_a_negative_duration_or_size_is_an_error_however_small(old, new, at_, words):
    err = one(SEED.replace(old, new))
    assert at(err) == at_ and err.message == words


def test_a_name_in_other_capitals_suggests_its_spelling():
    """difflib compares case-sensitively: 'GENERATE' is near nothing, but it is generate."""
    err = one(SEED.replace("gen : generate", "gen : GENERATE"))
    assert err.message == "unknown stage kind 'GENERATE'" and err.hint == "did you mean 'generate'?"


@pytest.mark.parametrize("written, ref", [("hooks:redact", "hooks:redact"), ("hooks : redact", "hooks:redact"),
                                          ("my.hooks:redact", "my.hooks:redact")])
def test_a_function_reference_written_without_quotes_is_told_to_quote_it(written, ref):
    text = SEED.replace("stage out : respond {}", f"stage out : respond {{}}\n    stage py : python {{ fn = {written} }}")
    err = one(text.replace("gen -> out", "gen -> py -> out"))
    assert err.message in ("unexpected ':'", "unexpected '.'") and err.pos.line == 9
    assert err.hint == f'"module:function" is a string: write fn = "{ref}"'


def test_a_function_reference_with_a_dot_for_its_colon_is_told_the_spelling():
    text = SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage py : python { fn = "hooks.redact" }')
    err = one(text.replace("gen -> out", "gen -> py -> out"))
    assert err.message.startswith("""'hooks.redact' is not a function reference: write "hooks:redact" (module:function)""")
    err = one(text.replace("gen -> out", "gen -> py -> out").replace('"hooks.redact"', '"redact"'))
    assert err.message.startswith("""'redact' is not a function reference: write "module:function\"""")


def test_a_pipeline_header_without_its_body_is_reported_at_the_header():
    """`pipeline a : p` with no `{ … }` at the end of the file, or before the next statement, is
    an error at that header (not at the end of the file) saying the body it needs; an empty one
    is a derived pipeline's whole body."""
    assert errors(SEED + "pipeline a : p {}\n") == []
    for after, found in (("", "the end of the file"), ("\n# the end\n", "the end of the file"),
                         ("pipeline b : p {}\n", "'pipeline'")):
        err = one(SEED + "pipeline a : p\n" + after)
        assert at(err) == (14, 1) and err.pos.end_col == 15, after
        assert err.message == "pipeline 'a' has no body"
        assert err.expected == "'{' after the header: pipeline a : p { … }"
        assert err.hint == ("a derived pipeline needs a body, even an empty one: pipeline a : p {} (its "
                            f"settings and STAGE.PARAMETER overrides go inside); found {found} instead")
    err = one("pipeline q  # mine\n")
    assert at(err) == (1, 1) and err.message == "pipeline 'q' has no body"
    assert err.hint == "a pipeline's settings, stages and edges go inside { … }; found the end of the file instead"


@pytest.mark.parametrize("written, meant", [("tyni", "tiny"), ("Tyni", "tiny"), ("pq", "qp")])
def test_a_pipeline_name_with_two_letters_swapped_gets_a_did_you_mean(tmp_path, written, meant):
    """`agp serve --pipeline tyni` of a file defining `tiny`: a swap in a short name, which a
    plain similarity ratio scores too low to suggest."""
    f = tmp_path / "two.agp"
    f.write_text(SEED.replace("pipeline p {", "pipeline tiny {") + SEED.replace("pipeline p {", "pipeline qp {"))
    with pytest.raises(pipeline_dsl.CheckFailed) as info:
        pipeline_dsl.load_pipeline_graph(str(f), written)
    [err] = info.value.diagnostics
    assert err.message == f"no pipeline named '{written}' in {f}" and err.hint == f"did you mean '{meant}'?"
    assert did_you_mean("ytni", ["tiny"]) is None          # two swaps are not one slip


def test_a_stage_name_with_two_letters_swapped_gets_a_did_you_mean():
    """Every name suggested goes through the same matcher: an edge's stage, as a pipeline's name."""
    err = one(SEED.replace("encode -> kv -> gen", "encode -> vk -> gen"))
    assert "'vk'" in err.message and err.hint == "did you mean 'kv'?"


def test_when_otherwise_is_told_to_drop_the_when():
    err = one(SEED.replace("batch -> encode when timeout", "batch -> encode when otherwise"))
    assert (err.message, at(err)) == ("unexpected 'otherwise'", (11, 26))
    assert err.hint == "`otherwise` is written without `when`: `batch -> encode otherwise`"


@pytest.mark.parametrize("word", ["else", "default"])
def test_else_after_an_edge_is_reported_at_the_word_with_otherwise_to_write(word):
    """`a -> b else` read the word as the next statement's name, and the error stood at what
    followed it (the pipeline's `}`), saying an '=' or '->' was expected there."""
    err = one(SEED.replace("batch -> encode when timeout", f"batch -> encode {word}"))
    assert (err.message, at(err), err.pos.end_col - err.pos.col) == (f"'{word}' is not a condition", (11, 21),
                                                                      len(word))
    assert err.hint == "the edge taken when no condition holds is written `batch -> encode otherwise`"
    assert errors(SEED.replace("batch -> encode when timeout", "batch -> encode otherwise")) == []


@pytest.mark.parametrize("ref, hint", [
    ("sub/hooks.py:after", 'a module is named by its dotted name from this file\'s folder, not by a path: '
                           'write "sub.hooks:after"'),
    ("./sub/hooks:after", 'a module is named by its dotted name from this file\'s folder, not by a path: '
                          'write "sub.hooks:after"'),
    ("/opt/lib/hooks.py:after", 'a module is named, not given by a path: put hooks.py beside this file (or its '
                                'folder on PYTHONPATH) and write "hooks:after"'),
    ("../lib/hooks.py:after", 'a module is named, not given by a path: put hooks.py beside this file (or its '
                              'folder on PYTHONPATH) and write "hooks:after"'),
])
def test_a_path_where_the_module_name_goes_is_told_a_name_that_imports(tmp_path, ref, hint):
    """The hint was `write the module's name, without .py: "sub/hooks:after"`, itself refused."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hooks.py").write_text("def after(item):\n    return item\n")
    text = SEED.replace("gen -> out", "gen -> x -> out").replace(
        "stage out : respond {}", 'stage x : python { fn = "REF" }\n    stage out : respond {}')
    path = tmp_path / "p.agp"
    path.write_text(text.replace("REF", ref))
    [err] = [d for d in pipeline_dsl.load(str(path))[1] if d.is_error]
    assert err.message.startswith(f"'{ref}' is not a function reference") and err.hint == hint
    fixed = hint.rsplit('"', 2)[1]
    if fixed.startswith("sub."):          # the name the hint writes is found
        path.write_text(text.replace("REF", fixed))
        assert [d for d in pipeline_dsl.load(str(path))[1] if d.is_error] == []


@pytest.mark.parametrize("written, hint", [
    ('use common.agp', 'the path is a string: write use "common.agp"'),
    ('use ../lib/common.agp', 'the path is a string: write use "../lib/common.agp"'),
    ('include "common.agp"', 'a file is included with use: write use "common.agp"'),
    ('import "lib/common.agp"', 'a file is included with use: write use "lib/common.agp"'),
    ('include common', 'a file is included with use: write use "file.agp"'),
])
def test_an_include_written_another_way_is_told_the_use_to_write(written, hint):
    """`include "x.agp"` was told that stages, settings and edges go inside a pipeline; `use
    common.agp` got no hint at all."""
    err = errors(f"{written}\n" + SEED)[0]
    assert (err.pos.line, err.hint) == (1, hint)


def test_a_use_alone_on_its_line_is_no_unquoted_path():
    err = errors("use\n" + SEED)[0]
    assert err.pos.line == 2 and (err.hint or "").startswith("the path is a string") is False


@pytest.mark.parametrize("old, new, hint", [
    ('"smollm2-135m-instruct"', "smollm2-135m-instruct", 'write "smollm2-135m-instruct"'),   # '-135m' a number
    ('"smollm2-135m-instruct"', "my-model.gguf", 'write "my-model.gguf"'),                    # '-' a character
    ("stage gen : generate {}", "stage gen : generate { stop = [end-of-text] }", 'write "end-of-text"'),
])
def test_a_bare_value_with_a_dash_is_told_to_quote_it(old, new, hint):
    """`model = smollm2-135m-instruct` was told "one value per setting; write a list as [a, b]", and
    `model = my-model.gguf` to write the name my_model: a value is quoted, not renamed."""
    err = errors(SEED.replace(old, new))[0]
    assert err.hint == "a value with '-' in it is a string: " + hint


def test_a_stage_name_with_a_dash_is_still_told_the_name_to_write():
    err = errors(SEED.replace("stage out : respond {}", "stage my-out : respond {}"))[0]
    assert err.hint == "names are letters, digits and '_', not '-': write my_out"


@pytest.mark.parametrize("written", ["smollm2", "SmolLM", "smol"])
def test_the_embedded_models_name_cut_short_gets_a_did_you_mean(written):
    err = one(SEED.replace('"smollm2-135m-instruct"', f'"{written}"'))
    assert err.message == f"model not found: '{written}'"
    assert err.hint == "did you mean 'smollm2-135m-instruct' (the embedded model)?"


@pytest.mark.parametrize("stage, at_, meant", [
    ('stage sys : system_prompt { prompt = "Be brief." }', "prompt", "text"),
    ('stage sys : python { function = "hooks:redact" }', "function", "fn"),
    ('stage sys : system_prompt { txt = "Be brief." }', "txt", "text"),       # close to it
])
def test_a_required_parameter_under_another_name_is_one_error_that_names_it(stage, at_, meant):
    """`system_prompt { prompt = "…" }` was two errors, a missing 'text' at the stage and an unknown
    'prompt' with no hint: one slip, one error, at the name written, saying which one is meant."""
    text = SEED.replace("stage out : respond {}", f"stage out : respond {{}}\n    {stage}").replace(
        "request -> batch", "request -> sys -> batch")
    err = one(text)
    assert err.message.startswith(f"unknown parameter '{at_}'") and err.pos.line == 9
    kind = stage.split(":")[1].split()[0]
    assert err.hint == f"did you mean '{meant}'? {kind} needs it, and this stage does not set it"


@pytest.mark.parametrize("stage, at_, missing", [
    ('stage sys : python { concurrency = 4 }', "concurrency", "fn"),           # another thing, not fn
    ('stage sys : system_prompt { role = "system" }', "role", "text"),        # not the text
    ('stage sys : system_prompt { prompt = 3 }', "prompt", "text"),           # text's name, not its type
])
def test_an_unknown_parameter_that_is_not_the_missing_one_leaves_both_errors(stage, at_, missing):
    """One unknown parameter beside one missing required one was taken for it whatever the names:
    `python { concurrency = 4 }` was told "did you mean 'fn'?" and the missing fn went unsaid. They
    are one slip only where the name is close to the missing one's (or one it is known by, prompt
    for text) and the value is one it takes; else both errors stand, the unknown one without it."""
    text = SEED.replace("stage out : respond {}", f"stage out : respond {{}}\n    {stage}").replace(
        "request -> batch", "request -> sys -> batch")
    got = [e for e in errors(text) if e.pos.line == 9]
    assert [e.message.split(" for ")[0].split(" in ")[0] for e in got] == [
        f"missing parameter '{missing}'", f"unknown parameter '{at_}'"]
    assert "did you mean" not in (got[1].hint or "")


def test_a_missing_parameter_beside_several_unknown_ones_is_still_its_own_error():
    text = SEED.replace("stage out : respond {}", 'stage out : respond {}\n    stage sys : system_prompt '
                        '{ prompt = "x"  extra = 1 }').replace("request -> batch", "request -> sys -> batch")
    assert [e.message.split(" for ")[0].split(" in ")[0] for e in errors(text)] == [
        "missing parameter 'text'", "unknown parameter 'prompt'", "unknown parameter 'extra'"]


def test_a_join_policy_named_vote_is_told_majority():
    text = SEED.replace("stage out : respond {}", "stage out : respond {}\n    stage j : join { policy = vote }")
    err = one(text.replace("gen -> out", "gen -> j -> out"))
    assert (err.message, err.hint) == ("'vote' is not a valid value for 'policy'",
                                       "write policy = majority (the answer most branches agree on)")


def test_a_request_edge_straight_into_respond_names_the_engine_chain_it_skips():
    """`request -> out` (or a join, or a system prompt into respond) skips the whole engine: the hint
    names the four stages between them, or the stages the pipeline already has."""
    bare = "pipeline p {\n    stage request : requests {}\n    stage out : respond {}\n    request -> out\n}\n"
    err = one(bare)
    assert err.message.startswith("port type mismatch on edge request -> out")
    assert err.hint == ("insert dynamic_batch -> encode -> kv_lookup -> generate stages between them "
                        "(or answer each request with a python stage that says returns = generated)")
    text = SEED.replace("request -> batch", "stage s : system_prompt { text = \"Be brief.\" }\n    request -> s -> out")
    [err] = [e for e in errors(text) if e.message.startswith("port type mismatch")]
    assert err.hint == ("route the edge through the stages the pipeline already has: "
                        "s -> batch -> encode -> kv -> gen -> out")


def test_requests_that_pass_a_route_into_respond_are_told_the_engine_chain():
    err = one("pipeline p {\n    stage request : requests {}\n    stage r : route {}\n    stage out : respond {}\n"
              "    request -> r -> out\n}\n")
    assert err.message.startswith("the Request items of 'request' can reach no respond stage")
    assert err.hint == ("add a path from 'request' that takes Request items to a respond stage through "
                        "dynamic_batch -> encode -> kv_lookup -> generate stages (or a python stage that says "
                        "returns = generated)")
