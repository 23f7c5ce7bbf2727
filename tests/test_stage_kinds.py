"""A third-party stage kind as its author meets it: installed as a package with an `agp.stages`
entry point (a dist-info with entry_points.txt on sys.path), checked before the model loads
(its `impl` found without importing it), started once per stage (a failure there is the
pipeline's error at the stage, exit 2), and run as a python stage's function is (its own
workers, and the same call policy: a `timeout` bounds a process that hangs)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pipeline_dsl
from clikit import agp
from flowkit import errors, run, runtime, write
from stages import registry

ROOT = Path(__file__).resolve().parents[1]

KINDS = '''
from stages.registry import BOOL, DURATION, ENUM, FLOAT, INT, LIST_STR, SIZE, STR, Param, Port, StageKind

G = (Port("generated", "Generated"),)

R = (Port("requests", "Request"),)

def kind(name, impl, params=(), inputs=G, outputs=G):
    return StageKind(name=name, doc=name, params=params, inputs=inputs, outputs=outputs, impl=impl)

KINDS = [
    kind("tag", "myplug.impls:Tag", (Param("n", INT, 1, "a number", min=0),)),
    kind("nowhere", "myplug.missing:Tag"),
    kind("misnamed", "myplug.impls:Tagg"),
    kind("grumpy", "myplug.impls:Grumpy"),
    kind("grumpyfn", "myplug.impls:Grumpy", (Param("fn", STR, "x:y", "a function of its own"),)),
    kind("stall", "myplug.impls:Stall"),
    kind("idle", "myplug.impls:Idle"),
    kind("yielder", "myplug.impls:Yielder"),
    kind("greedy", "myplug.impls:Greedy"),
    kind("drowsy", "myplug.impls:Drowsy"),
    kind("answerer", "myplug.impls:Answerer", inputs=R),
    kind("knobs", "myplug.impls:Tag", (           # a parameter of every type, bounds left to the types
        Param("n", INT, 1, "an int", min=0, max=10), Param("f", FLOAT, 0.5, "a number"),
        Param("b", BOOL, False, "a switch"), Param("s", STR, None, "a name", optional=True, max_length=5),
        Param("e", ENUM, "a", "a choice", choices=("a", "b")), Param("d", DURATION, 1.0, "a wait"),
        Param("z", SIZE, 1024, "a size"), Param("l", LIST_STR, (), "words", max_items=2))),
]
'''

IMPLS = '''
import asyncio
import threading

RELEASE = threading.Event()

class Tag:
    def __init__(self, name, params, context):
        self.n = params["n"]

    def process(self, item):
        item["text"] = f"tag{self.n}"
        return item

class Grumpy:
    def __init__(self, name, params, context):
        raise RuntimeError("grumpy refuses to start")

class Idle:                      # forgot process
    def __init__(self, name, params, context):
        pass

class Yielder(Idle):
    def process(self, item):
        yield item

class Greedy(Idle):
    def process(self, item, extra):
        return item

class Drowsy(Idle):
    async def process(self, item):
        if item["request"]["id"] == "stuck":
            await asyncio.sleep(60)
        item["text"] = "awake"
        return item

class Answerer(Idle):             # Request -> Generated: answers without the model
    def process(self, item):
        if (item.get("metadata") or {}).get("ask"):
            return {"prompt": "a request, where its outputs give results"}
        return {"text": "answered by " + item["prompt"]}

class Stall:
    def __init__(self, name, params, context):
        pass

    def process(self, item):
        if item["request"]["id"] == "stuck":
            RELEASE.wait(60)
        return item
'''


def plugin(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """An installed package: its modules and a dist-info whose entry_points.txt names them."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[agp.stages]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for rel, text in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """myplug's kinds, installed on sys.path (for this process, and for a CLI run through PYTHONPATH)."""
    root = plugin(tmp_path / "site", "myplug", {"kinds": "myplug.kinds:KINDS"},
                  {"myplug/__init__.py": "", "myplug/kinds.py": KINDS, "myplug/impls.py": IMPLS})
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "myplug" or m.startswith("myplug.")]:
        monkeypatch.delitem(sys.modules, name)
    registry.reset_default_registry()
    yield root
    registry.reset_default_registry()


def body(kind: str) -> str:
    return f"""
    stage request : requests {{}}
    stage batch : dynamic_batch {{}}
    stage encode : encode {{}}
    stage kv : kv_lookup {{ block_size = 8  budget = 2MiB }}
    stage gen : generate {{ max_new_tokens = 2 }}
    stage x : {kind}
    stage out : respond {{}}
    request -> batch -> encode -> kv -> gen -> x -> out
"""


def cli(root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return agp(*args, env=env, cwd=cwd)


def test_check_finds_a_kinds_impl_that_its_package_does_not_have(installed, tmp_path, tiny_gguf):
    """A misspelt module or class in a kind's `impl` is a check error at the stage's kind, found
    by reading the package's source (nothing is imported), before any model loads."""
    path = write(tmp_path, tiny_gguf, body("nowhere"))
    (d,) = errors(path)
    assert d.message == ("stage kind 'nowhere' (entry point kinds) cannot load its implementation "
                         "'myplug.missing:Tag': module 'myplug.missing' not found on sys.path")
    assert (d.pos.line, d.pos.col) == (11, 11)
    path.write_text(path.read_text().replace(": nowhere", ": misnamed"))
    (d,) = errors(path)
    assert "cannot load its implementation 'myplug.impls:Tagg'" in d.message and "'Tagg'" in d.message
    path.write_text(path.read_text().replace(": misnamed", ": tag"))
    assert errors(path) == [] and "myplug.impls" not in sys.modules


def test_a_kind_that_cannot_start_fails_the_run_at_its_stage_with_exit_2(installed, tmp_path, tiny_gguf):
    """An `__init__` that raises (or an impl that cannot be imported) is the pipeline's error, at
    the stage, with the plug-in's file and line: exit 2, not an internal error."""
    path = write(tmp_path, tiny_gguf, body("grumpy"))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    r = cli(installed, "run", str(path), "-i", "in.jsonl", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    impls = installed / "myplug" / "impls.py"
    line = impls.read_text().splitlines().index('        raise RuntimeError("grumpy refuses to start")') + 1
    assert (f"p.agp:11:7: error: stage 'x': stage kind 'grumpy' failed to start at {impls}:{line}: "
            "RuntimeError: grumpy refuses to start") in r.stderr
    assert "internal error" not in r.stderr and r.stdout == ""
    # a kind with an `fn` parameter of its own is still a kind that failed to start, not a python stage's fn
    from pipeline_dsl.diagnostics import CheckFailed

    path.write_text(path.read_text().replace(": grumpy", ": grumpyfn"))
    with pytest.raises(CheckFailed) as e:
        runtime(path)
    (d,) = e.value.diagnostics
    assert d.message.startswith("stage 'x': stage kind 'grumpyfn' failed to start at ")


@pytest.mark.parametrize("kind, why", [
    ("idle", "its implementation Idle has no process(item) method"),
    ("yielder", "its implementation Yielder has a process that yields; it must return the item's dict, a "
                "label string or None"),
    ("greedy", "its implementation Greedy: it is called as process(item), but its signature (item, extra) "
               "cannot take that: missing a required argument: 'extra'"),
])
def test_a_kind_whose_process_could_only_fail_every_item_is_refused_as_it_starts(installed, tmp_path, tiny_gguf,
                                                                                kind, why):
    """No process, a generator process, or one that cannot be called with the item: every request
    would fail alike, so the stage is refused when the run starts (exit 2), as a fn that cannot
    take its call is."""
    from pipeline_dsl.diagnostics import CheckFailed

    path = write(tmp_path, tiny_gguf, body(kind))
    assert errors(path) == []
    with pytest.raises(CheckFailed) as e:
        runtime(path)
    (d,) = e.value.diagnostics
    assert d.message == f"stage 'x': stage kind '{kind}': {why}"


def test_a_kind_takes_the_call_policy_of_a_stage_that_runs_user_code(installed, tmp_path, tiny_gguf):
    """A kind's process runs on workers of its own, as a python stage's function does, so it takes
    `workers`, `timeout`, `retries` and `backoff` too: a hung call fails its own request on time,
    the others are answered."""
    assert [p.name for p in registry.get_kind("stall").params] == ["workers", "timeout", "retries", "backoff"]
    assert [p.name for p in registry.get_kind("tag").params] == ["n", "workers", "timeout", "retries", "backoff"]
    path = write(tmp_path, tiny_gguf, body("stall { timeout = 200ms  workers = 2 }"))
    assert errors(path) == []
    try:
        out, rt = run(path, [{"id": i, "prompt": "hi", "max_tokens": 2} for i in ("a", "stuck", "b")], hang_s=60)
    finally:
        sys.modules["myplug.impls"].RELEASE.set()
    by_id = {r.id: r for r in out}
    assert by_id["a"].ok and by_id["b"].ok
    assert by_id["stuck"].error.kind == "timeout" and by_id["stuck"].error.stage == "x"


def test_a_kinds_async_process_runs_on_its_stages_loop_and_is_cancelled_at_its_timeout(installed, tmp_path,
                                                                                       tiny_gguf):
    """An `async def process` is awaited on the stage's own event loop, as a python stage's
    coroutine is: past its timeout it is cancelled, so it does not stay stuck (a stage with
    `workers` stuck calls refuses every request)."""
    path = write(tmp_path, tiny_gguf, body("drowsy { timeout = 200ms  workers = 1 }"))
    out, rt = run(path, [{"id": i, "prompt": "hi", "max_tokens": 2} for i in ("a", "stuck", "b")], hang_s=60)
    by_id = {r.id: r for r in out}
    assert [c.text for c in by_id["a"].choices] == ["awake"] and by_id["b"].ok
    assert by_id["stuck"].error.kind == "timeout"
    stats = rt.stats()["stages"]["x"]
    for _ in range(50):
        if stats["stuck"] == 0:
            break
        time.sleep(0.1)
        stats = rt.stats()["stages"]["x"]
    assert stats["timeouts"] == 1 and stats["stuck"] == 0


def test_a_kind_returns_what_its_output_ports_give(installed, tmp_path, tiny_gguf):
    """A kind whose ports turn a Request into a Generated result (or the reverse) returns that: the
    runtime holds it to its outputs, not to a python stage's `returns = same`, which it cannot set."""
    path = write(tmp_path, tiny_gguf, """
    stage request : requests {}
    stage x : answerer
    stage out : respond {}
    request -> x -> out
""")
    assert errors(path) == []
    out, _ = run(path, [{"id": "a", "prompt": "the kind"}, {"id": "b", "prompt": "x", "metadata": {"ask": True}}])
    by_id = {r.id: r for r in out}
    assert [c.text for c in by_id["a"].choices] == ["answered by the kind"]
    assert by_id["b"].error.message == "stage 'x' returned a Request, but its kind 'answerer' gives Generated " \
                                       "items (its outputs)"


def test_a_kind_named_as_another_is_refused_alone_and_check_says_which_runs(tmp_path, monkeypatch):
    """A plug-in kind named `python` never replaces the built-in one, nor one named as another
    entry point's kind that one: only that kind is refused (the entry point's others register),
    and a stage of that name is warned that it gets the kind that was there first."""
    root = plugin(tmp_path / "site", "clash", {"clash": "clashing:KINDS"}, {"clashing.py": '''
        from stages.registry import Port, StageKind
        G = (Port("generated", "Generated"),)
        KINDS = [StageKind("python", "mine", inputs=G, outputs=G, impl="clashing:X"),
                 StageKind("fresh", "mine", inputs=G, outputs=G, impl="clashing:X"),
                 StageKind("fresh", "again", inputs=G, outputs=G, impl="clashing:Y")]
        class X:
            pass
        Y = X
    '''})
    monkeypatch.syspath_prepend(str(root))
    registry.reset_default_registry()
    try:
        reg = registry.default_registry()
        assert reg.get("python").source == "builtin"
        assert reg.get("fresh").source == "entry point clash" and reg.get("fresh").doc == "mine"
        assert reg.problems == [
            "stage entry point 'clash' (clashing:KINDS): its kind 'python' is not registered: 'python' is "
            "already a built-in kind",
            "stage entry point 'clash' (clashing:KINDS): its kind 'fresh' is not registered: 'fresh' is "
            "already the kind of entry point clash"]
        text = ('pipeline p {\n    stage request : requests {}\n    stage x : python { fn = "math:sqrt" }\n'
                "    stage out : respond {}\n    request -> x -> out\n}\n")
        _, diags = pipeline_dsl.loads(text, file=str(tmp_path / "p.agp"))
        warning = next(d for d in diags if not d.is_error)
        assert warning.message.startswith("'python' here is the built-in kind: stage entry point 'clash'")
        assert (warning.pos.line, warning.pos.col) == (3, 15)
    finally:
        registry.reset_default_registry()


@pytest.mark.parametrize("value, message", [
    ("n = 11", "value out of range: 'n' = 11"),
    ("n = 1.5", "'n' is an integer, not the number '1.5'"),
    ("f = \"x\"", "'f' is a number, not the string \"x\""),
    ("b = 1", "'b' is true or false, not the integer '1'"),
    ("s = \"toolong\"", "'s' has 7 characters; at most 5 are allowed"),
    ("e = c", "'c' is not a valid value for 'e'"),
    ("d = 5", "missing unit: 'd' is a duration; '5' has no unit"),
    ("d = -1s", "'d' is a duration, never negative: '-1s'"),
    ("z = -5B", "'z' is a size, never negative: '-5B'"),
    ("z = 1s", "wrong unit: 'z' is a size, but '1s' is a duration"),
    ("l = [\"a\", \"b\", \"c\"]", "'l' holds 3 strings; at most 2 are allowed"),
])
def test_a_kinds_parameters_are_held_to_their_types_and_bounds(installed, tmp_path, tiny_gguf, value, message):
    """What a kind declares is what check holds the file to: a string's max_length too, and no
    duration or size below zero even where the kind gives no lower bound."""
    path = write(tmp_path, tiny_gguf, body(f"knobs {{ {value} }}"))
    assert [d.message for d in errors(path)] == [message]
    path.write_text(path.read_text().replace(f"{{ {value} }}", '{ s = "ok"  d = 2ms  z = 0  l = "one" }'))
    assert errors(path) == []


def test_the_registry_knows_the_grammars_reserved_words():
    """The registry refuses a kind named as a reserved word without importing the parser (a layer
    above it): its copy of the words is the grammar's."""
    from pipeline_dsl.parser import keywords

    assert registry.RESERVED_WORDS == keywords()


def test_a_kind_whose_schema_no_pipeline_can_use_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A name no pipeline can write (a space, a keyword), a resource the planner does not know, a
    default its own parameter refuses: such a kind is not registered, and `agp stages` says why;
    the entry point's sound kinds are."""
    root = plugin(tmp_path / "site", "sloppy", {"sloppy": "sloppy:KINDS"}, {"sloppy.py": '''
        from stages.registry import ENUM, INT, Param, Port, StageKind
        G = (Port("generated", "Generated"),)
        def kind(name, resource="host", params=()):
            return StageKind(name, "doc", params=params, inputs=G, outputs=G, resource=resource, impl="sloppy:X")
        KINDS = [kind("two words"), kind("when"), kind("fast", resource="gpu"),
                 kind("pick", params=(Param("how", ENUM, "a"),)),
                 kind("many", params=(Param("n", INT, 50, "a count", min=0, max=10),)),
                 kind("sound", params=(Param("n", INT, 5, "a count", min=0, max=10),))]
        class X:
            def __init__(self, name, params, context):
                pass
            def process(self, item):
                return item
    '''})
    monkeypatch.syspath_prepend(str(root))
    registry.reset_default_registry()
    try:
        reg = registry.default_registry()
        assert "sound" in reg.names()
        assert not {"two words", "when", "fast", "pick", "many"} & set(reg.names())
        said = "stage entry point 'sloppy' (sloppy:KINDS): its kind"
        assert reg.problems == [
            f"{said} 'two words' is not registered: 'two words' is not a name a pipeline can write (a word of "
            "letters, digits and _, not a keyword)",
            f"{said} 'when' is not registered: 'when' is not a name a pipeline can write (a word of letters, "
            "digits and _, not a keyword)",
            f"{said} 'fast' is not registered: its resource 'gpu' is none of host, copy, compute",
            f"{said} 'pick' is not registered: its enum parameter 'how' has no choices",
            f"{said} 'many' is not registered: the default of its parameter 'n', 50, is outside its own range"]
    finally:
        registry.reset_default_registry()


def test_the_language_pages_table_of_kinds_gives_the_registrys_integer_and_boolean_defaults():
    """docs/language.md's table of the built-in kinds states each parameter's default: an int's or a
    bool's there is the one the registry gives a stage that leaves it out."""
    import re
    from pathlib import Path

    from stages.registry import default_registry

    page = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text(encoding="utf-8")
    checked = 0
    for row in re.findall(r"^\| `(\w+)` \| (.*)$", page, flags=re.M):
        kind = default_registry().get(row[0])
        if kind is None:
            continue
        for name, typ, value in re.findall(r"`(\w+)` (int|bool) (\d+|true|false)\b", row[1]):
            want = int(value) if typ == "int" else value == "true"
            assert kind.param(name).default == want, (row[0], name, value)
            checked += 1
    assert checked >= 15
