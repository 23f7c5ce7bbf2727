"""A user's own Python module as a pipeline meets it: mistakes in the module are reported where
they are (the file, line and column of a syntax error), what a function hands back is
completed or refused with a message that names what it got, and what it prints never mixes
into `agp run`'s answers on stdout."""
from __future__ import annotations

import json
import sys

import pytest

import flowkit
from clikit import agp
from flowkit import chain, chat, errors, run, write
from pipeline_dsl.userfn import FunctionNotFound, function_info


HOOKS = '''
CANNED = {"text": "I cannot help with that."}

def replace(item):
    if item["request"].get("metadata", {}).get("canned"):
        return CANNED                    # a new dict, one for every request
    return item

def after(item):
    item["text"] += " [" + item["request"]["messages"][0]["content"] + "]"
    return item

def answer_early(item):
    return {"text": "answered without the model"}

def text_of_type(item):
    item["text"] = {"answer": 1} if item["request"].get("metadata", {}).get("dict") else b"bytes"
    return item

def finish_int(item):
    item["finish_reason"] = 7
    return item

class Unspeakable(Exception):
    def __str__(self):
        raise RuntimeError("no words")

def unspeakable(item):
    if item["request"].get("metadata", {}).get("bad"):
        raise Unspeakable()
    return item

class NoStatusYet(Exception):
    @property
    def status_code(self):               # as a client's error whose response never came
        raise ValueError("no response")

def statusless(item):
    if item["request"].get("metadata", {}).get("bad"):
        raise NoStatusYet("the call failed")
    return item

def unwritable(item):                    # fields an answer carries as they are
    if item["request"].get("metadata", {}).get("nan"):
        item["stop_reason"] = float("nan")
    else:
        item["branches"] = [object()]
    return item
'''


@pytest.fixture(autouse=True)
def _fresh():
    flowkit.reset()
    yield


def test_a_syntax_error_in_a_module_is_reported_at_its_line_and_column(tmp_path):
    (tmp_path / "hooks.py").write_text("def ok(item):\n    return item\n\ndef broken(x):\n    return x +\n")
    with pytest.raises(FunctionNotFound) as e:
        function_info("hooks:ok", str(tmp_path))
    assert str(e.value) == f"{tmp_path / 'hooks.py'}:5:15: the module has a syntax error: invalid syntax"


def test_a_new_result_dict_gets_what_it_left_out_from_the_result_it_replaced(tmp_path, soft_gguf):
    """`return {"text": ...}` from a guard is a whole answer: it finished as the model's did, and a
    stage after it still finds the request; the function's own dict is never changed."""
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
                 'stage g : python { fn = "hooks:replace" }\nstage a : python { fn = "hooks:after" }\n'
                 "stage out : respond {}\nrequest -> batch\ngen -> g -> a -> out\n" + chain(), hooks=HOOKS)
    assert errors(path) == []
    results, _ = run(path, [chat("x", "hi", metadata={"canned": True}), chat("y", "yo", metadata={"canned": True}),
                            chat("z", "hey")])
    by = {r.id: r for r in results}
    for rid, said in (("x", "hi"), ("y", "yo")):
        assert by[rid].ok, by[rid].error.message
        (c,) = by[rid].choices
        assert c.text == f"I cannot help with that. [{said}]"
        assert c.finish_reason == by["z"].choices[0].finish_reason == "length"
        assert c.data["generated_by"] == "gen" and c.data["id"] == rid
    (hooks,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(tmp_path / "hooks.py")]
    assert hooks.CANNED == {"text": "I cannot help with that."}


def test_a_request_a_stage_answers_itself_finishes_with_stop_and_keeps_its_request(tmp_path, soft_gguf):
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\n'
                 'stage early : python { fn = "hooks:answer_early"  returns = any }\n'
                 'stage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n'
                 "request -> early\nearly -> batch\nearly -> out\ngen -> out\n" + chain(), hooks=HOOKS)
    assert errors(path) == []
    (r,), _ = run(path, [chat("q", "hi")])
    assert r.ok, r.error.message
    (c,) = r.choices
    assert (c.text, c.finish_reason) == ("answered without the model", "stop")
    assert c.data["id"] == "q" and c.data["request"]["messages"][0]["content"] == "hi"


@pytest.mark.parametrize("fn, meta, words", [
    ("text_of_type", {"dict": True}, "stage 'g' returned a result whose text is a dict, not a string"),
    ("text_of_type", {}, "stage 'g' returned a result whose text is bytes, not a string"),
    ("finish_int", {}, "stage 'g' returned a result whose finish_reason is an int; expected a string or null"),
    ("unwritable", {}, "stage 'g' returned a result whose branches is not plain JSON (TypeError: Object of type "
                       "object is not JSON serializable), and an answer carries it as it is"),
    ("unwritable", {"nan": True}, "stage 'g' returned a result whose stop_reason is not plain JSON (ValueError: "
                                  "Out of range float values are not JSON compliant), and an answer carries it "
                                  "as it is"),
])
def test_a_result_of_the_wrong_type_names_the_type_it_got(tmp_path, soft_gguf, fn, meta, words):
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
                 f'stage g : python {{ fn = "hooks:{fn}" }}\nstage out : respond {{}}\n'
                 "request -> batch\ngen -> g -> out\n" + chain(), hooks=HOOKS)
    (bad,), _ = run(path, [chat("bad", "hi", metadata=meta)])
    assert bad.error.message == words and bad.error.stage == "g"


PRINTS = '''
import os, subprocess, sys
print("loading hooks")                                   # at import, before any answer

def chatty(item):
    print(f"DEBUG {item['id']}")                        # one write: the two requests' calls run at once
    print('{"id": "fake", "text": "not an answer"}')
    sys.stdout.write("no end of line")
    os.write(1, b"from fd 1\\n")
    subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
    return item
'''


def test_what_a_function_prints_goes_to_stderr_not_among_the_answers_on_stdout(tmp_path, tiny_gguf):
    (tmp_path / "hooks.py").write_text(PRINTS)
    path = tmp_path / "p.agp"
    path.write_text(f'pipeline p {{\n    model = "{tiny_gguf}"\n    device = cpu\n    dtype = fp32\n'
                    '    stage request : requests {}\n    stage say : python { fn = "hooks:chatty" }\n'
                    '    stage batch : dynamic_batch { max_batch_size = 4  timeout = 1ms }\n'
                    '    stage encode : encode {}\n    stage kv : kv_lookup { block_size = 8  budget = 1MiB }\n'
                    '    stage gen : generate { max_new_tokens = 2 }\n    stage out : respond {}\n'
                    '    request -> say -> batch -> encode -> kv -> gen -> out\n}\n')
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "yo"}\n')
    r = agp("run", path, "-i", inp, "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in records] == ["a", "b"] and all("text" in rec for rec in records)
    for said in ("loading hooks", "DEBUG a", "DEBUG b", "not an answer", "no end of line", "from fd 1",
                 "from a child"):
        assert said in r.stderr


def test_a_function_importing_its_neighbour_when_called_finds_it_wherever_agp_runs(tmp_path, soft_gguf):
    """`import helper` inside a def runs at the first call, after the module loaded: the pipeline's
    folder is still where it looks, as for the module's own top-level imports."""
    (tmp_path / "agp_lazy_neighbour.py").write_text("def tag(item):\n    item['messages'][0]['content'] += '!'\n"
                                                   "    return item\n")
    hooks = "def late(item):\n    import agp_lazy_neighbour\n    return agp_lazy_neighbour.tag(item)\n"
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage p : python { fn = "hooks:late" }\n'
                 'stage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n'
                 "request -> p -> batch\ngen -> out\n" + chain(), hooks=hooks)
    assert str(tmp_path) not in sys.path
    (r,), _ = run(path, [chat("a", "hi")])
    assert r.ok, r.error.message
    assert r.choices[0].data["request"]["messages"][0]["content"] == "hi!"


def test_check_finds_a_function_a_module_star_imports(tmp_path):
    """`from .impl import *` in a package's __init__ (or `from posix import *` in os) binds the
    names of the module it names: check follows it, reading source, instead of saying the package
    has no such function; a name no module has is still an error."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .impl import *\n")
    (tmp_path / "pkg" / "impl.py").write_text("from os import *\n\ndef handler(item):\n    return item\n")
    info = function_info("pkg:handler", str(tmp_path))
    assert info.path == str(tmp_path / "pkg" / "impl.py") and info.node.name == "handler"
    assert function_info("pkg:getcwd", str(tmp_path)).node is None        # os's, from the C module posix
    assert function_info("os:getcwd", None).module == "posix"
    with pytest.raises(FunctionNotFound, match="module 'pkg' .* has no function 'nothere'"):
        function_info("pkg:nothere", str(tmp_path))


def test_a_file_name_where_the_module_name_goes_gets_a_hint(tmp_path, tiny_gguf):
    path = write(tmp_path, tiny_gguf, chain() + '''
    stage request : requests {}
    stage gen : generate {}
    stage x : python { fn = "hooks.py:after" }
    stage out : respond {}
    request -> batch
    gen -> x -> out
''', hooks=HOOKS)
    (d,) = errors(path)
    assert d.message.startswith("module 'hooks' ")
    assert d.hint == 'write the module\'s name, without .py: "hooks:after"'


def test_an_exception_whose_message_cannot_be_read_still_fails_only_its_request(tmp_path, soft_gguf):
    """str() of the exception raised too: the request hung for good (its error could not be made),
    and with it every answer agp run writes after it. It fails, saying its message is unreadable."""
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
                 'stage g : python { fn = "hooks:unspeakable" }\nstage out : respond {}\n'
                 "request -> batch\ngen -> g -> out\n" + chain(), hooks=HOOKS)
    results, _ = run(path, [chat("bad", "hi", metadata={"bad": True}), chat("ok", "yo")], hang_s=30)
    by = {r.id: r for r in results}
    assert by["ok"].ok
    assert by["bad"].error.message == ("stage 'g' failed: Unspeakable: (its message cannot be read: str() raised "
                                       "RuntimeError)")


def test_an_exception_whose_status_property_raises_is_not_retried_and_fails_only_its_request(tmp_path, soft_gguf):
    """With `retries`, a failed call's exception is asked for its HTTP status; a property that raised
    there killed the stage's worker thread and the request hung. It is simply not transient."""
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
                 'stage g : python { fn = "hooks:statusless"  retries = 2  backoff = 0 }\nstage out : respond {}\n'
                 "request -> batch\ngen -> g -> out\n" + chain(), hooks=HOOKS)
    results, rt = run(path, [chat("bad", "hi", metadata={"bad": True}), chat("ok", "yo")], hang_s=30)
    by = {r.id: r for r in results}
    assert by["ok"].ok and by["bad"].error.message == "stage 'g' failed: NoStatusYet: the call failed"
    assert rt.stats()["stages"]["g"]["retries"] == 0


DECORATED_ASYNC = '''
import asyncio
import functools

def logged(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):        # a sync wrapper: it hands back f's coroutine
        return f(*args, **kwargs)
    return wrapper

@logged
async def slow(item):
    if item["request"].get("metadata", {}).get("slow"):
        await asyncio.sleep(60)
    return item
'''


def test_a_decorated_async_fn_is_cancelled_at_its_timeout(tmp_path, soft_gguf):
    """A sync wrapper around an `async def` returns a coroutine, awaited for it: past the stage's
    timeout the coroutine is cancelled, as a plain `async def` is, so it is not left stuck for good
    (a stage with `workers` stuck calls refuses every request)."""
    import time

    path = write(tmp_path, soft_gguf, 'stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
                 'stage g : python { fn = "hooks:slow"  timeout = 200ms  workers = 2 }\nstage out : respond {}\n'
                 "request -> batch\ngen -> g -> out\n" + chain(), hooks=DECORATED_ASYNC)
    results, rt = run(path, [chat("bad", "hi", metadata={"slow": True}), chat("ok", "yo")], hang_s=30)
    by = {r.id: r for r in results}
    assert by["bad"].error.kind == "timeout" and by["ok"].ok
    for _ in range(50):
        if rt.stats()["stages"]["g"]["stuck"] == 0:
            break
        time.sleep(0.1)
    assert rt.stats()["stages"]["g"]["stuck"] == 0


DECORATED_ASYNC_JOIN = DECORATED_ASYNC + '''
@logged
async def pick(results):
    if results[0]["request"].get("metadata", {}).get("slow"):
        await asyncio.sleep(60)
    return len(results) - 1
'''


def test_a_decorated_async_join_fn_is_awaited_as_a_python_stages_is(tmp_path, soft_gguf):
    """A join's fn wrapped by a sync decorator hands back a coroutine: it is awaited on the join's
    own loop (not taken for the result) and cancelled at the join's timeout, as a python stage's."""
    path = write(tmp_path, soft_gguf, 'stage request : requests {}\n'
                 'stage gen : generate { max_new_tokens = 3  n = 2 }\n'
                 'stage pick : join { fn = "hooks:pick"  timeout = 200ms }\nstage out : respond {}\n'
                 "request -> batch\ngen -> pick -> out\n" + chain(), hooks=DECORATED_ASYNC_JOIN)
    results, _ = run(path, [chat("ok", "yo"), chat("slow", "hi", metadata={"slow": True})], hang_s=30)
    by = {r.id: r for r in results}
    assert by["ok"].ok, by["ok"].error
    assert by["slow"].error.kind == "timeout" and by["slow"].error.stage == "pick"


def test_settled_is_judged_per_function_of_one_module(tmp_path):
    """Each function of a module is settled or not by its own name: one rebound, defined twice,
    bound by a walrus, a `global` or an import, or followed by a star import, leaves its
    neighbours settled, whichever is asked about first."""
    (tmp_path / "many.py").write_text(
        "import os as imported\n"
        "def plain(item): return item\n"
        "def twice(item): return item\n"
        "def twice(item): return None\n"
        "def reassigned(item): return item\n"
        "reassigned = plain\n"
        "def walrused(item): return item\n"
        "def imported(item): return item\n"
        "def globaled(item): return item\n"
        "def g():\n"
        "    global globaled\n"
        "    globaled = 1\n"
        "    return (walrused := 2)\n")
    (tmp_path / "starred.py").write_text(
        "def early(item): return item\n"
        "from os.path import *\n"
        "def late(item): return item\n")
    expected = {"many:plain": True, "many:twice": False, "many:reassigned": False, "many:walrused": False,
                "many:imported": False, "many:globaled": False, "starred:late": True, "starred:early": False}
    for order in (list(expected), list(reversed(expected))):
        got = {ref: function_info(ref, str(tmp_path)).settled for ref in order}
        assert got == expected
