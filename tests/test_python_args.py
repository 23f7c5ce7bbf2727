"""A python stage's (and a join's) `args = {name = value, …}`: one function, several settings.
`agp check` holds the keywords to the function's signature, at each key; the run calls
fn(item, **args) (a stream's fn(item, chunks, **args), a join's fn(results, **args)); a
stage's result cache never hands one stage's results to another with other args."""
from __future__ import annotations

import pytest

import pipeline_dsl
from flowkit import chain, chat, errors, run, write
from pipeline_dsl.diagnostics import CheckFailed
from pipeline_dsl.flow import PipelineRuntime, load_graph
from pipeline_dsl.fmt import format_text
from pipeline_dsl.render import dot_source

HOOKS = '''
import flowkit

def tag(item, label, top_k: int = 1, tags: list = ()):
    flowkit.bump(label)
    item["metadata"]["seen"] = item["metadata"].get("seen", []) + [[label, top_k, list(tags)]]
    return item

def strict(item, *, top_k):
    return item

def anything(item, **kw):
    return item

def strict_kw(item, *, top_k, **kw):
    return item

def scaled(item, factor: float = 1.0, flag: bool = False):
    return item

def answer(item):
    return {"text": repr(item["metadata"]["seen"])}

def posonly_kw(item, x=0, /, **kw):
    return item

def item_in_kw(item, /, **kw):
    return item

def grow(item, into=[]):
    into.append(item["id"])
    return {"text": str(len(into))}

def suffixed(item, chunks, suffix):
    for text in chunks:
        yield text
    yield suffix

def picked(results, note="", upper=False):
    text = note + ":" + str(len(results))
    return {"text": text.upper() if upper else text}

def make():
    def made(item):
        return item
    return made

factory_made = make()
'''


def check(tmp_path, body: str):
    (tmp_path / "hooks.py").write_text(HOOKS, encoding="utf-8")
    path = tmp_path / "p.agp"
    path.write_text(body, encoding="utf-8")
    _, diags = pipeline_dsl.load(str(path))
    return diags


def one_stage(stage: str) -> str:
    """A pipeline whose one python stage is `stage` (line 3), answered by `answer`."""
    return ("pipeline p {\n    stage request : requests {}\n    " + stage + "\n"
            '    stage ans : python { fn = "hooks:answer"  returns = generated }\n'
            "    stage out : respond {}\n    request -> r -> ans -> out\n}\n")


def col(line: str, word: str) -> int:
    """The column of `word` in a stage line one_stage writes (indented four spaces)."""
    return 4 + line.index(word) + 1


def at(diags, severity="error"):
    return [(d.message, d.pos.line, d.pos.col) for d in diags if d.severity == severity]


# ---------------------------------------------------------------- agp check


def test_a_keyword_the_function_has_no_parameter_for_is_an_error_at_the_key(tmp_path):
    stage = 'stage r : python { fn = "hooks:tag"  args = {label = "a", top_kk = 3} }'
    diags = check(tmp_path, one_stage(stage))
    [(message, line, column)] = at(diags)
    assert "hooks:tag has no parameter 'top_kk'" in message
    assert (line, column) == (3, col(stage, "top_kk"))          # the key in the map
    assert "did you mean 'top_k'?" in next(d.hint for d in diags if d.is_error)


def test_keywords_that_fill_the_parameters_past_the_item_check_clean(tmp_path):
    """A parameter without a default, or keyword-only, is the call's when args gives it; one that
    takes **kwargs takes any name. Without args the same function is refused."""
    for stage in ('stage r : python { fn = "hooks:tag"  args = {label = "a"} }',
                  'stage r : python { fn = "hooks:strict"  args = {top_k = 2} }',
                  'stage r : python { fn = "hooks:anything"  args = {x = 1, y = [true, "b", 2.5]} }'):
        assert at(check(tmp_path, one_stage(stage))) == [], stage
    [(message, line, _)] = at(check(tmp_path, one_stage('stage r : python { fn = "hooks:tag"  args = {top_k = 2} }')))
    assert "hooks:tag needs 'label', which neither the call fn(item) nor args gives" in message and line == 3


def test_a_keyword_only_parameter_without_args_names_what_args_must_give(tmp_path):
    """`def strict(item, *, top_k)` on a stage without args, or with `args = {}` (a derived
    pipeline's override that empties the map, say): the error names top_k and says to give it in
    args, at the map where there is one, not that the def should take (item) alone."""
    stage = 'stage r : python { fn = "hooks:strict" }'
    [(message, line, column)] = at(check(tmp_path, one_stage(stage)))
    assert message.startswith("stage 'r': hooks:strict needs 'top_k', which neither the call fn(item) nor args gives")
    assert (line, column) == (3, col(stage, '"hooks'))
    diags = check(tmp_path, one_stage(stage))
    assert "args = {top_k = …}" in next(d.hint for d in diags if d.is_error)
    stage = 'stage r : python { fn = "hooks:strict"  args = {} }'
    [(message, line, column)] = at(check(tmp_path, one_stage(stage)))
    assert "hooks:strict needs 'top_k'" in message and (line, column) == (3, col(stage, "{}"))
    derived = one_stage('stage r : python { fn = "hooks:strict"  args = {top_k = 2} }') + "pipeline q : p { r.args = {} }\n"
    [(message, line, column)] = at(check(tmp_path, derived))
    assert "hooks:strict needs 'top_k'" in message and (line, column) == (8, 27)    # the override's map


def test_a_keyword_only_parameter_without_a_default_that_args_leaves_out_is_an_error(tmp_path):
    """`def f(item, *, top_k, **kw)`: args giving other names still leaves top_k unfilled."""
    [(message, line, _)] = at(check(tmp_path, one_stage('stage r : python { fn = "hooks:strict_kw"  '
                                                        'args = {label = "a"} }')))
    assert "hooks:strict_kw needs 'top_k', which neither the call fn(item) nor args gives" in message and line == 3
    assert at(check(tmp_path, one_stage('stage r : python { fn = "hooks:strict_kw"  args = {top_k = 1} }'))) == []


def test_an_int_for_a_float_parameter_is_no_warning_but_a_number_for_a_bool_is(tmp_path):
    """An int is a float as Python's type checkers take it; a bool takes true/false alone."""
    diags = check(tmp_path, one_stage('stage r : python { fn = "hooks:scaled"  args = {factor = 2} }'))
    assert at(diags) == [] and at(diags, "warning") == []
    [(message, _, _)] = at(check(tmp_path, one_stage('stage r : python { fn = "hooks:scaled"  args = {flag = 1} }')),
                           "warning")
    assert "'flag' is annotated bool in hooks:scaled" in message


def test_a_keyword_the_call_already_fills_is_an_error_at_the_key(tmp_path):
    stage = 'stage r : python { fn = "hooks:anything"  args = {item = 1} }'
    [(message, line, column)] = at(check(tmp_path, one_stage(stage)))
    assert "'item' is filled by the call fn(item) itself" in message and (line, column) == (3, col(stage, "item ="))


def test_a_positional_only_parameter_named_in_args_is_an_error_even_beside_kwargs(tmp_path):
    """`def f(item, x=0, /, **kw)` with args = {x = 5}: the call puts x in **kw, never in the
    parameter x, which is what check says (the load refuses the same keyword)."""
    stage = 'stage r : python { fn = "hooks:posonly_kw"  args = {x = 5} }'
    [(message, line, column)] = at(check(tmp_path, one_stage(stage)))
    assert "'x'" in message and "positional" in message and (line, column) == (3, col(stage, "x ="))


def test_a_keyword_named_as_a_filled_positional_only_parameter_goes_to_kwargs(tmp_path):
    """`def f(item, /, **kw)` with args = {item = "x"}: the call fills item by position, so the
    keyword goes to **kw, as the load takes it: no error."""
    assert at(check(tmp_path, one_stage('stage r : python { fn = "hooks:item_in_kw"  args = {item = "x"} }'))) == []


def test_a_capitalised_true_or_false_is_told_to_be_written_lower_case(tmp_path):
    """Quoting it ('"False"') would pass a string, which is true."""
    diags = check(tmp_path, one_stage('stage r : python { fn = "hooks:anything"  args = {flag = False} }'))
    assert [d.hint for d in diags if d.is_error] == ["write false (lower case)"]


def test_a_value_its_annotation_refuses_is_a_warning_not_an_error(tmp_path):
    stage = 'stage r : python { fn = "hooks:tag"  args = {label = "a", top_k = "3"} }'
    diags = check(tmp_path, one_stage(stage))
    assert at(diags) == []
    [(message, line, column)] = at(diags, "warning")
    assert "'top_k' is annotated int in hooks:tag, but args gives it the string \"3\"" in message
    assert (line, column) == (3, col(stage, '"3"'))                 # the value
    assert at(check(tmp_path, one_stage('stage r : python { fn = "hooks:tag"  args = {label = "a", top_k = 3, '
                                        'tags = ["x"]} }')), "warning") == []


@pytest.mark.parametrize("value, word", [("cuda", "the bare word 'cuda'"), ("1ms", "the duration '1ms'")])
def test_a_map_holds_json_literals_only(tmp_path, value, word):
    stage = 'stage r : python { fn = "hooks:tag"  args = {label = ' + value + '} }'
    [(message, line, column)] = at(check(tmp_path, one_stage(stage)))
    assert f"'label' in 'args' is {word}" in message and (line, column) == (3, col(stage, value))


def test_a_null_in_a_map_says_to_leave_the_key_out_not_to_quote_it(tmp_path):
    """`args = {k = null}`: quoting it would give the function the string "null", not None."""
    for word in ("null", "None"):
        stage = 'stage r : python { fn = "hooks:tag"  args = {label = ' + word + '} }'
        diags = check(tmp_path, one_stage(stage))
        [(message, line, column)] = at(diags)
        assert f"'label' in 'args' is the bare word '{word}'" in message and (line, column) == (3, col(stage, word))
        assert next(d.hint for d in diags if d.is_error) == \
            "a map holds no null: leave label out and give its parameter a default of None"
    diags = check(tmp_path, one_stage('stage r : python { fn = "hooks:tag"  args = {label = cuda} }'))
    assert next(d.hint for d in diags if d.is_error) == 'quote it: "cuda"'


@pytest.mark.parametrize("value", ["{a = 1}", "[{a = 1}]"])
def test_a_map_inside_a_map_or_a_list_says_what_a_map_holds(tmp_path, value):
    stage = 'stage r : python { fn = "hooks:tag"  args = {label = "a", tags = ' + value + '} }'
    diags = check(tmp_path, one_stage(stage))
    [(message, line, column)] = at(diags)
    assert message == "unexpected '{'" and (line, column) == (3, col(stage, "{a = 1}"))
    assert next(d.hint for d in diags if d.is_error).startswith(
        "a map's values and a list's items hold no map: strings, numbers, true/false and lists of them")


def test_a_name_given_twice_and_a_map_where_none_goes_are_errors(tmp_path):
    stage = 'stage r : python { fn = "hooks:tag"  args = {label = "a", label = "b"} }'
    assert at(check(tmp_path, one_stage(stage))) == [("'label' is given twice in 'args'", 3,
                                                       col(stage, 'label = "b"'))]
    diags = check(tmp_path, one_stage('stage r : python { fn = "hooks:tag"  args = "label"  max_turns = {a = 1} }'))
    assert sorted(m for m, _, _ in at(diags)) == [
        "'args' is a map ({name = value, …}), not the string \"label\"",
        "'max_turns' is an integer, not the map '{a = 1}'"]


def test_a_stream_stages_keywords_come_after_its_chunks(tmp_path):
    body = ("pipeline p {\n    stage request : requests {}\n    stage gen : generate {}\n"
            '    stage s : python { fn = "hooks:suffixed"  stream = true  args = {sufix = "!"} }\n'
            "    stage out : respond {}\n    request -> batch\n    gen -> s -> out\n" + chain() + "}\n")
    [(message, line, column)] = at(check(tmp_path, body))
    assert "hooks:suffixed has no parameter 'sufix'" in message
    assert (line, column) == (4, body.splitlines()[3].index("sufix") + 1)


def test_a_joins_fn_takes_args_and_a_join_without_fn_warns_that_they_do_nothing(tmp_path):
    body = ("pipeline p {\n    stage request : requests {}\n    stage gen : generate { n = 2 }\n"
            '    stage j : join { fn = "hooks:picked"  args = {nte = "n"} }\n'
            "    stage out : respond {}\n    request -> batch\n    gen -> j -> out\n" + chain() + "}\n")
    [(message, line, column)] = at(check(tmp_path, body))
    assert "join 'j': hooks:picked has no parameter 'nte'" in message
    assert (line, column) == (4, body.splitlines()[3].index("nte") + 1)
    diags = check(tmp_path, body.replace('fn = "hooks:picked"  ', ""))
    assert at(diags) == []
    assert any("join 'j' sets args but has no fn" in m for m, _, _ in at(diags, "warning"))


def test_a_derived_pipeline_overrides_args_and_is_checked_at_its_own_keys(tmp_path):
    body = one_stage('stage r : python { fn = "hooks:tag"  args = {label = "a"} }') + \
        'pipeline q : p {\n    r.args = {label = "b", nope = 1}\n}\n'
    [(message, line, column)] = at(check(tmp_path, body))
    assert "has no parameter 'nope'" in message                  # at the override's key, not the base's
    assert (line, column) == (9, body.splitlines()[8].index("nope") + 1)


# ---------------------------------------------------------------- layout


def test_fmt_writes_a_map_on_one_line_and_keeps_the_comments_inside_one():
    text = ('pipeline p {\n  stage r : python { fn = "h:f"  args = { b = [1, 2]  a = "x", } }\n'
            '  stage s : python {\n    args = {\n      k = 1  # the k\n      # before j\n      j = true\n    }\n  }\n}\n')
    out, diags = format_text(text)
    assert diags == []
    assert 'stage r : python { fn = "h:f"  args = {b = [1, 2], a = "x"} }' in out
    assert "        args = {\n            k = 1,  # the k\n            # before j\n            j = true,\n        }" in out
    assert format_text(out)[0] == out
    assert pipeline_dsl.parser.parse(out)[0] == pipeline_dsl.parser.parse(text)[0]


def test_a_map_left_open_is_named_at_the_statement_after_it():
    module, [diag] = pipeline_dsl.parser.parse(
        'pipeline p {\n    stage r : python { fn = "h:f"  args = {label = "a"\n    stage out : respond {}\n}\n')
    assert module is None and (diag.pos.line, diag.pos.col) == (3, 5)
    assert diag.expected == "'}' to close the map of 'args' first"
    assert diag.hint == "the '{' of the map of 'args' (line 2) is not closed"


def test_a_keyword_as_a_maps_key_is_said_as_such_not_as_a_map_left_open():
    module, [diag] = pipeline_dsl.parser.parse(
        'pipeline p {\n    stage r : python { fn = "h:f"  args = {stage = 1} }\n    stage out : respond {}\n}\n')
    assert module is None and diag.hint == "'stage' is a keyword and cannot be used as a name"


def test_an_edge_after_a_map_left_open_names_the_map():
    module, [diag] = pipeline_dsl.parser.parse(
        'pipeline p {\n    stage r : python { fn = "h:f"  args = {label = "a"\n    request -> r\n}\n')
    assert module is None and diag.expected == "'}' to close the map of 'args' first"


@pytest.mark.parametrize("entries", ['a = 1,, b = 2', ', a = 1'])
def test_a_stray_comma_in_a_map_is_told_how_a_maps_commas_go(entries):
    module, [diag] = pipeline_dsl.parser.parse(
        'pipeline p {\n    stage r : python { fn = "h:f"  args = {' + entries + '} }\n}\n')
    assert module is None and diag.hint == "one ',' between a map's entries, none before the first"


def test_a_drawing_shows_args_as_the_file_writes_them():
    graph = pipeline_dsl.load_pipeline_graph("<test>", text=(
        'pipeline p {\n    stage request : requests {}\n'
        '    stage r : python { fn = "math:floor"  returns = generated  args = {label = "a", k = [1, true]} }\n'
        "    stage out : respond {}\n    request -> r -> out\n}\n"))
    assert "args = {label = &quot;a&quot;, k = [1, true]}" in dot_source(graph)


# ---------------------------------------------------------------- the run


def test_two_stages_call_one_function_each_with_its_own_args(tmp_path, tiny_gguf, fresh_flowkit):
    path = write(tmp_path, tiny_gguf, 'stage request : requests {}\n'
                 'stage a : python { fn = "hooks:tag"  args = {label = "math", top_k = 3, tags = ["x", "y"]} }\n'
                 'stage b : python { fn = "hooks:tag"  args = {label = "chat"} }\n'
                 'stage ans : python { fn = "hooks:answer"  returns = generated }\nstage out : respond {}\n'
                 "request -> a -> b -> ans -> out\n", hooks=HOOKS)
    assert errors(path) == []
    [result], _ = run(path, [chat("1", "hi", metadata={})])
    assert result.ok, result.error
    assert result.choices[0].text == "[['math', 3, ['x', 'y']], ['chat', 1, []]]"


def test_each_call_gets_its_own_copy_of_the_args(tmp_path, tiny_gguf):
    """A function that changes a list it was given (a default it was given in place of) changes
    no later call's: the second request counts 1, not 2."""
    path = write(tmp_path, tiny_gguf, 'stage request : requests {}\n'
                 'stage g : python { fn = "hooks:grow"  returns = generated  args = {into = []}  workers = 1 }\n'
                 "stage out : respond {}\nrequest -> g -> out\n", hooks=HOOKS)
    results, _ = run(path, [chat("1", "a"), chat("2", "b")])
    assert [r.choices[0].text for r in results] == ["1", "1"]


def test_stages_with_one_fn_and_other_args_never_share_cached_results(tmp_path, tiny_gguf, fresh_flowkit):
    """Two cached stages call one function with other args on the same content: each computes its
    own result once (a second request of that content hits each stage's own cache)."""
    path = write(tmp_path, tiny_gguf, 'stage request : requests {}\n'
                 'stage a : python { fn = "hooks:tag"  args = {label = "first"}  cache = 8 }\n'
                 'stage b : python { fn = "hooks:tag"  args = {label = "second"}  cache = 8 }\n'
                 'stage ans : python { fn = "hooks:answer"  returns = generated }\nstage out : respond {}\n'
                 "request -> a\nrequest -> b\na -> ans\nb -> ans\nans -> out\n", hooks=HOOKS)
    assert errors(path) == []
    results, rt = run(path, [chat("1", "same", metadata={})])
    assert sorted(c.text for c in results[0].choices) == ["[['first', 1, []]]", "[['second', 1, []]]"]
    results, rt = run(path, [chat("1", "same", metadata={}), chat("2", "same", metadata={})])
    for r in results:
        assert sorted(c.text for c in r.choices) == ["[['first', 1, []]]", "[['second', 1, []]]"]
    assert rt.stats()["stages"]["a"]["cache_hits"] + rt.stats()["stages"]["b"]["cache_hits"] >= 1


def test_a_stream_stage_and_a_join_get_their_args(tmp_path, soft_gguf):
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\n'
                 'stage gen : generate { max_new_tokens = 3  n = 2 }\n'
                 'stage s : python { fn = "hooks:suffixed"  stream = true  args = {suffix = " [checked]"} }\n'
                 'stage j : join { fn = "hooks:picked"  args = {note = "votes", upper = true} }\n'
                 "stage out : respond {}\nrequest -> batch\ngen -> s -> j -> out\n" + chain(), hooks=HOOKS)
    assert errors(path) == []
    [result], _ = run(path, [chat("1", "hi")])
    assert result.ok, result.error
    assert result.choices[0].text == "VOTES:2"
    assert all(b["text"].endswith(" [checked]") for b in result.choices[0].data["branches"])


def test_args_a_function_made_at_run_time_refuses_fail_the_load_at_args(tmp_path, tiny_gguf):
    """check cannot read the signature of a function a factory made; the run refuses keywords
    it cannot take before any request, at the stage's args (exit 2 under agp run)."""
    path = write(tmp_path, tiny_gguf, 'stage request : requests {}\n'
                 'stage r : python { fn = "hooks:factory_made"  args = {top_k = 3} }\n'
                 'stage ans : python { fn = "hooks:answer"  returns = generated }\nstage out : respond {}\n'
                 "request -> r -> ans -> out\n", hooks=HOOKS)
    assert errors(path) == []
    with pytest.raises(CheckFailed) as e:
        PipelineRuntime(load_graph(path), overrides={"threads": 1})
    [diag] = e.value.diagnostics
    assert "with its args it is called as fn(item, top_k=…)" in diag.message and "top_k" in diag.message
    assert (diag.pos.line, diag.pos.col) == (6, path.read_text().splitlines()[5].index("{top_k") + 1)
