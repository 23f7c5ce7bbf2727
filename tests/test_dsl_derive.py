"""Derived pipelines: `pipeline short : chat { mode = efficient  gen.max_new_tokens = 16 }` copies
chat's stages and edges and overrides settings and stage parameters (docs/language.md,
"Derived pipelines")."""

from __future__ import annotations

import json
import textwrap

import pytest

import clikit
import pipeline_dsl
from pipeline_dsl import ast
from pipeline_dsl.diagnostics import CheckFailed
from pipeline_dsl.fmt import format_text
from pipeline_dsl.parser import keywords, parse

BASE = """\
pipeline chat {
    model = "smollm2-135m-instruct"
    mode  = balanced
    stage request : requests      {}
    stage batch   : dynamic_batch { max_batch_size = 32  timeout = 1ms }
    stage encode  : encode        {}
    stage kv      : kv_lookup     { reuse = prefix }
    stage gen     : generate      { max_new_tokens = 128  temperature = 0 }
    stage out     : respond       {}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}
"""


def load(text: str, name: str | None = None):
    """The checked graph of pipeline `name` of `text`."""
    return pipeline_dsl.load_pipeline_graph("t.agp", name, text=text)


def errors(text: str, file: str = "t.agp") -> list:
    _, diags = pipeline_dsl.loads(text, file)
    return [d for d in diags if d.is_error]


def at(d) -> tuple:
    return d.pos.line, d.pos.col


# ---------------------------------------------------------------- syntax

def test_a_derived_pipeline_parses_to_its_base_settings_and_overrides():
    module, diags = parse("pipeline short : chat {\n    mode = efficient\n    gen.max_new_tokens = 16\n}\n")
    assert diags == []
    (p,) = module.pipelines
    assert (p.name.text, p.base.text, (p.base.pos.line, p.base.pos.col)) == ("short", "chat", (1, 18))
    assert [s.name.text for s in p.settings] == ["mode"]
    (o,) = p.overrides
    assert (o.stage.text, o.name.text, o.value.value) == ("gen", "max_new_tokens", 16)
    assert (o.pos.line, o.pos.col, o.stage.pos.col, o.name.pos.col) == (3, 5, 5, 9)


def test_the_construct_reserves_no_new_word():
    # ':' spells it, as `stage NAME : KIND`: a stage or pipeline may still be called `from`, `base`, …
    assert not keywords() & {"from", "extends", "base", "derive", "like", "with"}
    text = BASE.replace("stage out     : respond", "stage from    : respond").replace("-> out", "-> from")
    text += "pipeline base : chat { mode = efficient }\n"
    assert errors(text) == []


def test_fmt_round_trips_a_derived_pipeline():
    messy = "pipeline short:chat{mode=efficient # cheaper\ngen.max_new_tokens=16\n  batch.timeout = 2ms}\n" \
            "pipeline tiny : short {}\n"
    text, diags = format_text(messy)
    assert diags == []
    assert text == textwrap.dedent("""\
        pipeline short : chat {
            mode = efficient  # cheaper
            gen.max_new_tokens = 16
            batch.timeout      = 2ms
        }

        pipeline tiny : short {}
        """)
    assert format_text(text)[0] == text                       # idempotent
    assert parse(text)[0] == parse(messy)[0]                  # the same tree
    assert parse(text)[0].pipelines[0].base.text == "chat"


def test_an_unclosed_derived_pipeline_is_named_in_the_hint():
    _, (d,) = parse("pipeline short : chat {\n    mode = efficient\n")
    assert d.hint == "the '{' of pipeline 'short' (line 1) is not closed"


# ---------------------------------------------------------------- meaning

def test_overrides_replace_settings_and_stage_parameters_and_keep_the_rest():
    text = BASE + "pipeline short : chat {\n    mode = efficient\n    gen.max_new_tokens = 16\n" \
                  "    kv.block_size = 8\n}\n"
    short, chat = load(text, "short"), load(text, "chat")
    assert short.graph["settings"]["mode"] == "efficient" and chat.graph["settings"]["mode"] == "balanced"
    assert short.graph["settings"]["model"] == chat.graph["settings"]["model"]
    assert short.nodes["gen"]["params"]["max_new_tokens"] == 16
    assert chat.nodes["gen"]["params"]["max_new_tokens"] == 128
    assert short.nodes["gen"]["params"]["temperature"] == 0          # the base's other parameters stay
    assert short.nodes["kv"]["params"]["block_size"] == 8            # a parameter the base left unset
    assert short.nodes["batch"]["params"]["timeout"] == chat.nodes["batch"]["params"]["timeout"] == 0.001
    assert list(short.nodes) == list(chat.nodes) and list(short.edges) == list(chat.edges)
    assert short.graph["name"] == "short"


def test_a_stage_left_to_the_mode_follows_the_derived_mode():
    # the base sets no max_batch_size: the derived pipeline's mode gives it, not the base's
    text = BASE.replace("max_batch_size = 32  ", "") + "pipeline lean : chat { mode = efficient }\n"
    lean, chat = load(text, "lean"), load(text, "chat")
    assert lean.nodes["batch"]["params"]["max_batch_size"] != chat.nodes["batch"]["params"]["max_batch_size"]


def test_a_derived_pipeline_may_be_a_base_and_may_come_before_its_base():
    text = "pipeline tiny : short { gen.max_new_tokens = 4 }\n" + BASE + \
           "pipeline short : chat { gen.max_new_tokens = 16  mode = efficient }\n"
    tiny = load(text, "tiny")
    assert tiny.nodes["gen"]["params"]["max_new_tokens"] == 4
    assert tiny.graph["settings"]["mode"] == "efficient"             # from short
    assert load(text, "short").nodes["gen"]["params"]["max_new_tokens"] == 16


def test_the_base_may_come_from_an_included_file(tmp_path):
    (tmp_path / "chat.agp").write_text(BASE, encoding="utf-8")
    main = tmp_path / "main.agp"
    main.write_text('use "chat.agp"\npipeline short : chat { gen.max_new_tokens = 16 }\n', encoding="utf-8")
    g = pipeline_dsl.load_pipeline_graph(str(main))                  # the root file's own pipeline first
    assert g.graph["name"] == "short" and g.nodes["gen"]["params"]["max_new_tokens"] == 16


# ---------------------------------------------------------------- errors

def test_an_unknown_base_is_an_error_at_its_name_with_did_you_mean():
    (d,) = errors(BASE + "pipeline short : caht { mode = efficient }\n")
    assert d.message == "unknown base pipeline 'caht'" and at(d) == (15, 18)
    assert d.hint == "did you mean 'chat'?"


def test_a_base_in_a_file_that_cannot_be_read_is_not_said_unknown_as_well(tmp_path):
    # the include's error is the one to fix; the base may well be in that file
    (tmp_path / "main.agp").write_text('use "chat.agp"\npipeline short : chat { gen.max_new_tokens = 16 }\n',
                                       encoding="utf-8")
    (tmp_path / "broken.agp").write_text(BASE.replace("stage out     : respond       {}", "stage out : {"),
                                         encoding="utf-8")
    for use in ('"chat.agp"', '"broken.agp"'):
        main = tmp_path / "main.agp"
        main.write_text(f"use {use}\npipeline short : chat {{ gen.max_new_tokens = 16 }}\n", encoding="utf-8")
        ds = [d for d in pipeline_dsl.load(str(main))[1] if d.is_error]
        assert ds and not any("unknown base" in d.message for d in ds), [d.message for d in ds]
    main.write_text(BASE + "pipeline short : caht {}\n", encoding="utf-8")     # all read: said
    assert [d.message for d in pipeline_dsl.load(str(main))[1]] == ["unknown base pipeline 'caht'"]


def test_an_override_of_an_unknown_stage_is_an_error_at_it_with_did_you_mean():
    (d,) = errors(BASE + "pipeline short : chat {\n    gne.max_new_tokens = 16\n}\n")
    assert d.message == "unknown stage 'gne' in base pipeline 'chat'" and at(d) == (16, 5)
    assert d.hint == "did you mean 'gen'?"


def test_an_unknown_parameter_or_setting_is_an_error_at_the_override():
    ds = errors(BASE + "pipeline short : chat {\n    mdoe = efficient\n    gen.max_new_token = 16\n}\n")
    assert [(d.message, at(d), d.hint) for d in ds] == [
        ("unknown setting 'mdoe'", (16, 5), "did you mean 'mode'?"),
        ("unknown parameter 'max_new_token' for stage kind 'generate'", (17, 9), "did you mean 'max_new_tokens'?"),
    ]


def test_a_bad_override_value_is_an_error_at_the_override_and_the_base_stays_clean():
    (d,) = errors(BASE + "pipeline short : chat { gen.temperature = 9 }\n")
    assert "out of range" in d.message and at(d) == (15, 43)


def test_stages_and_edges_in_a_derived_pipeline_are_errors():
    ds = errors(BASE + "pipeline short : chat {\n    stage x : respond {}\n    gen -> x\n}\n")
    assert [(d.message, at(d)) for d in ds] == [("stage 'x' in derived pipeline 'short'", (16, 5)),
                                                ("an edge in derived pipeline 'short'", (17, 5))]


def test_an_override_in_a_pipeline_without_a_base_is_an_error():
    (d,) = errors(BASE.replace("    mode  = balanced\n", "    gen.temperature = 1\n"))
    assert d.message == "'gen.temperature' overrides a stage of a base pipeline, but 'chat' has no base"
    assert at(d) == (3, 5) and "inside stage gen's" in d.hint


def test_a_cycle_of_derivations_is_an_error_at_each_base_name():
    ds = errors(BASE + "pipeline a : b {}\npipeline b : a {}\npipeline c : c {}\n")
    assert [(d.message, at(d)) for d in ds] == [("pipelines derive from each other: a : b : a", (15, 14)),
                                                ("pipelines derive from each other: b : a : b", (16, 14)),
                                                ("pipeline 'c' derives from itself", (17, 14))]


def test_a_pipeline_derived_from_a_broken_derivation_says_nothing_more():
    ds = errors(BASE + "pipeline a : nope {}\npipeline b : a { gen.max_new_tokens = 3 }\n")
    assert [d.message for d in ds] == ["unknown base pipeline 'nope'"]


def test_an_error_in_the_copied_text_is_said_once_at_the_base():
    text = BASE.replace("temperature = 0", "temperature = 9") + "pipeline short : chat { mode = efficient }\n"
    (d,) = errors(text)
    assert "out of range" in d.message and at(d) == (8, 73) and d.notes == ()


def test_a_fault_only_the_derived_pipeline_has_in_copied_text_points_at_the_base_with_a_note():
    # threads is unused on cuda: the warning stands at the base's line, the note at the derivation
    text = BASE.replace("    mode  = balanced\n", "    threads = 2\n") + "pipeline gpu : chat { device = cuda }\n"
    _, diags = pipeline_dsl.loads(text, "t.agp")
    (d,) = diags
    assert d.message == "setting 'threads' is unused: the device is cuda" and at(d) == (3, 5)
    ((note, pos),) = d.notes
    assert note == "in pipeline 'gpu', which copies it from 'chat' here" and (pos.line, pos.col) == (15, 16)


def test_running_an_unknown_derived_name_fails_with_the_names():
    with pytest.raises(CheckFailed) as exc:
        load(BASE + "pipeline short : chat {}\n", "shrot")
    assert exc.value.diagnostics[0].hint == "did you mean 'short'?"


# ---------------------------------------------------------------- commands

def test_check_plan_render_and_fmt_take_a_derived_pipeline(tmp_path):
    path = tmp_path / "p.agp"
    path.write_text(BASE + "\npipeline short : chat {\n    mode = efficient\n    gen.max_new_tokens = 16\n}\n",
                    encoding="utf-8")
    proc = clikit.agp_in("check", path)
    assert proc.returncode == 0 and "ok (2 pipelines)" in proc.stdout, proc.stderr
    proc = clikit.agp_in("plan", path, "--pipeline", "short")
    assert proc.returncode == 0 and "pipeline short" in proc.stdout, proc.stderr
    proc = clikit.agp_in("render", path, "--pipeline", "short", "-o", tmp_path / "g.dot")
    assert proc.returncode == 0, proc.stderr
    dot = (tmp_path / "g.dot").read_text()
    assert "pipeline short" in dot and "max_new_tokens" in dot and "16" in dot
    proc = clikit.agp_in("fmt", "--check", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plan_and_render_say_what_a_derived_pipeline_derives_from(tmp_path):
    path = tmp_path / "p.agp"
    path.write_text(BASE + "\npipeline short : chat { gen.max_new_tokens = 16 }\n"
                    "pipeline tiny : short { gen.max_new_tokens = 4 }\n", encoding="utf-8")
    heads = {}
    for name in ("chat", "short", "tiny"):
        proc = clikit.agp_in("plan", path, "--pipeline", name)
        assert proc.returncode == 0, proc.stderr
        heads[name] = proc.stdout.splitlines()[0].split(":")[0]
        proc = clikit.agp_in("plan", path, "--pipeline", name, "--json")
        assert json.loads(proc.stdout).get("base") == {"chat": None, "short": "chat", "tiny": "short"}[name]
        out = tmp_path / f"{name}.dot"
        assert clikit.agp_in("render", path, "--pipeline", name, "-o", out).returncode == 0
        heads[name] += " | " + out.read_text().split('label="', 1)[1].split("  (")[0]
    assert heads == {"chat": "pipeline chat | pipeline chat",
                     "short": "pipeline short (derived from chat) | pipeline short : chat",
                     "tiny": "pipeline tiny (derived from short) | pipeline tiny : short"}


def test_agp_run_of_a_derived_pipeline_uses_its_overrides(tmp_path, tiny_gguf):
    base = (BASE.replace('"smollm2-135m-instruct"', json.dumps(str(tiny_gguf)))
            .replace("mode  = balanced", "device = cpu").replace("max_new_tokens = 128", "max_new_tokens = 7"))
    path = tmp_path / "p.agp"
    path.write_text(base + "pipeline short : chat { gen.max_new_tokens = 3  kv.budget = 1MiB }\n",
                    encoding="utf-8")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "ignore_eos": True}) + "\n", encoding="utf-8")
    for name, tokens in (("short", 3), ("chat", 7)):
        out = tmp_path / f"{name}.jsonl"
        proc = clikit.agp_in("run", path, "--pipeline", name, "-i", inp, "-o", out, "--threads", "1",
                             "--no-progress")
        assert proc.returncode == 0, proc.stderr
        (row,) = [json.loads(x) for x in out.read_text().splitlines()]
        assert row["usage"]["completion_tokens"] == tokens and row["finish_reason"] == "length"


def test_a_derived_pipeline_in_another_folder_runs_its_bases_python_stage(tmp_path, tiny_gguf):
    # the python stage's module lies beside the base's file, in a folder below the derived
    # one's: check finds it there, so run must too
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "derive_tagger_lib.py").write_text(
        "def tag(item):\n    item['prompt'] = 'tagged ' + item['prompt']\n    return item\n", encoding="utf-8")
    (lib / "chat.agp").write_text(
        BASE.replace('"smollm2-135m-instruct"', json.dumps(str(tiny_gguf))).replace("mode  = balanced", "device = cpu")
        .replace("stage request : requests      {}",
                 'stage request : requests      {}\n    stage tag : python { fn = "derive_tagger_lib:tag" }')
        .replace("request -> batch", "request -> tag -> batch"), encoding="utf-8")
    main = tmp_path / "main.agp"
    # and one whose override names a module beside main.agp, which check finds there
    (tmp_path / "derive_tagger_top.py").write_text(
        "def tag(item):\n    item['prompt'] = 'top ' + item['prompt']\n    return item\n", encoding="utf-8")
    main.write_text('use "lib/chat.agp"\npipeline short : chat { gen.max_new_tokens = 2 }\n'
                    'pipeline mine : short { tag.fn = "derive_tagger_top:tag" }\n', encoding="utf-8")
    assert clikit.agp_in("check", main).returncode == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "ignore_eos": True}) + "\n", encoding="utf-8")
    for name in ("short", "mine"):
        out = tmp_path / f"{name}.jsonl"
        proc = clikit.agp_in("run", main, "--pipeline", name, "-i", inp, "-o", out, "--threads", "1", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        (row,) = [json.loads(x) for x in out.read_text().splitlines()]
        assert row["usage"]["completion_tokens"] == 2 and row["usage"]["prompt_tokens"] > 2


def test_an_override_naming_a_file_finds_it_beside_the_derived_pipelines_file(tmp_path):
    # the base's stages read their files beside lib/chat.agp; an override written in main.agp
    # names files beside main.agp
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "chat.agp").write_text(
        BASE.replace("stage request : requests      {}",
                     'stage request : requests      {}\n    stage tag : python { fn = "derive_lib_hook:tag" }')
        .replace("request -> batch", "request -> tag -> batch"), encoding="utf-8")
    (lib / "derive_lib_hook.py").write_text("def tag(item):\n    return item\n", encoding="utf-8")
    (tmp_path / "derive_top_hook.py").write_text("def tag(item):\n    return item\n", encoding="utf-8")
    (tmp_path / "answer.schema.json").write_text('{"type": "object"}', encoding="utf-8")
    main = tmp_path / "main.agp"
    main.write_text('use "lib/chat.agp"\n'
                    'pipeline mine : chat { tag.fn = "derive_top_hook:tag"  gen.json_schema = "answer.schema.json" }\n',
                    encoding="utf-8")
    proc = clikit.agp_in("check", main, cwd=lib)
    assert proc.returncode == 0, proc.stderr
    g = pipeline_dsl.load_pipeline_graph(str(main), "mine")
    assert g.nodes["gen"]["params"]["json_schema"] == str(tmp_path / "answer.schema.json")


def test_copies_past_the_limit_are_an_error_at_the_derivation_that_crosses_it(monkeypatch):
    from pipeline_dsl import loader

    monkeypatch.setattr(loader, "MAX_DERIVED_STATEMENTS", 30)    # BASE has 12 statements
    text = BASE + "".join(f"pipeline d{i} : chat {{}}\n" for i in range(4))
    (d,) = errors(text)
    assert d.message == "derived pipelines copy too much: with 'd2' they copy more than 30 statements"
    assert at(d) == (17, 15)
    program, _ = pipeline_dsl.loads(text, "t.agp")
    assert program.pipeline_names() == ["chat", "d0", "d1"]     # said once; the pipelines after it left out


@pytest.mark.parametrize("text, col, expected, hint", [
    ('pipeline short : "chat" {}', 18, "the name of the base pipeline (pipeline NAME : BASE { … })",
     "names are written without quotes"),
    ("pipeline short : {}", 18, "the name of the base pipeline (pipeline NAME : BASE { … })", None),
    ("pipeline short from chat {}", 16, "'{', or ':' and a base pipeline to derive from",
     "a pipeline derived from another is written `pipeline short : BASE { … }`"),
])
def test_a_malformed_derivation_head_says_how_it_is_written(text, col, expected, hint):
    _, (d,) = parse(text)
    assert (d.pos.line, d.pos.col, d.expected, d.hint) == (1, col, expected, hint)
