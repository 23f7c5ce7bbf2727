"""Checks of the language: names, types, units, modes, includes, encodings, the graph, the registry."""

from __future__ import annotations

import importlib.metadata

import pytest

import pipeline_dsl
from pipeline_dsl import ast, units
from pipeline_dsl.diagnostics import CheckFailed, SourcePos, did_you_mean, has_errors, render_all
from pipeline_dsl.graph import build_graph
from pipeline_dsl.parser import parse
from stages import registry as reg_mod
from stages.registry import INT, Param, Port, StageKind

SEED = """
pipeline p {{
    model = "{model}"
    {settings}
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ {batch} }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ {kv} }}
    stage gen     : generate      {{ {gen} }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def pipeline(settings="", batch="", kv="", gen="", model="smollm2-135m-instruct"):
    return SEED.format(settings=settings, batch=batch, kv=kv, gen=gen, model=model)


def errors(text: str) -> list:
    _, diags = pipeline_dsl.loads(text, "t.agp")
    return [d for d in diags if d.is_error]


def test_seed_pipeline_is_clean():
    assert pipeline_dsl.loads(pipeline(), "t.agp")[1] == []


def test_unknown_stage_suggests_closest_kind():
    (d,) = errors(pipeline().replace(": generate", ": genrate"))
    assert d.message == "unknown stage kind 'genrate'"
    assert d.hint == "did you mean 'generate'?"
    assert (d.pos.line, d.pos.col, d.pos.end_col - d.pos.col) == (9, 21, 7)


def test_unknown_parameter_suggests_closest_parameter():
    (d,) = errors(pipeline(batch="max_batchsize = 8"))
    assert "unknown parameter 'max_batchsize'" in d.message
    assert d.hint == "did you mean 'max_batch_size'?"


def test_did_you_mean_ignores_far_names_and_fixes_case():
    assert did_you_mean("xyz", ["generate", "respond"]) is None
    assert did_you_mean("Generate", ["generate"]) == "did you mean 'generate'?"


@pytest.mark.parametrize("value, seconds", [("1ms", 0.001), ("250us", 0.00025), ("2s", 2.0), ("0", 0.0),
                                            ("1.5ms", 0.0015)])
def test_durations_normalise_to_seconds(value, seconds):
    prog, diags = pipeline_dsl.loads(pipeline(batch=f"timeout = {value}"), "t.agp")
    assert diags == []
    assert build_graph(prog.pipelines[0]).nodes["batch"]["params"]["timeout"] == pytest.approx(seconds)


@pytest.mark.parametrize("value, nbytes", [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("64KiB", 64 << 10),
                                           ("1048576B", 1 << 20)])
def test_sizes_normalise_to_bytes(value, nbytes):
    prog, diags = pipeline_dsl.loads(pipeline(kv=f"budget = {value}  block_size = 1"), "t.agp")
    assert diags == []
    got = build_graph(prog.pipelines[0]).nodes["kv"]["params"]["budget"]
    assert got == nbytes and isinstance(got, int)


@pytest.mark.parametrize("value, words", [
    ("5MiB", "wrong unit"), ("5", "missing unit"), ("5xs", "unknown unit 'xs'"), ("true", "is a duration"),
    ("61s", "out of range")])
def test_bad_durations_are_reported(value, words):
    (d,) = errors(pipeline(batch=f"timeout = {value}"))
    assert words in d.message


@pytest.mark.parametrize("gen, words", [
    ('max_new_tokens = "8"', "is an integer"), ("temperature = hot", "is a number"),
    ("stop = [1]", "list of strings"), ("dtype = int4", "not a valid value"),
    ("seed = 1.5", "is an integer"), ("ignore_eos = 1", "true or false")])
def test_ill_typed_parameters_are_reported(gen, words):
    (d,) = errors(pipeline(gen=gen))
    assert words in d.message


def test_every_error_is_collected_sorted_by_position():
    text = pipeline(batch="timeout = 5MiB", gen="top_p = 2").replace(": requests", ": reqests")
    diags = errors(text)
    assert [d.pos.line for d in diags] == sorted(d.pos.line for d in diags)
    assert len(diags) == 3


@pytest.mark.parametrize("mode, batch, budget, precision, compile_", [
    ("efficient", 8, 64 << 20, "int8", False), ("balanced", 32, 256 << 20, "auto", False),
    ("performance", 64, 1 << 30, "auto", True)])
def test_mode_presets_fill_stage_settings(mode, batch, budget, precision, compile_):
    prog, diags = pipeline_dsl.loads(pipeline(settings=f"mode = {mode}"), "t.agp")
    assert diags == []
    g = build_graph(prog.pipelines[0])
    assert g.graph["settings"]["mode"] == mode
    assert g.nodes["batch"]["params"]["max_batch_size"] == batch
    assert g.nodes["kv"]["params"]["budget"] == budget
    assert g.nodes["gen"]["params"]["dtype"] == precision
    assert g.nodes["gen"]["params"]["compile"] is compile_


def test_stage_setting_overrides_the_mode():
    prog, _ = pipeline_dsl.loads(pipeline(settings="mode = efficient", batch="max_batch_size = 16",
                                          gen="dtype = bf16"), "t.agp")
    g = build_graph(prog.pipelines[0])
    assert g.nodes["batch"]["params"]["max_batch_size"] == 16
    assert g.nodes["gen"]["params"]["dtype"] == "bf16"
    assert g.nodes["kv"]["params"]["budget"] == 64 << 20


def test_graph_carries_kind_resource_placement_and_conditions(tmp_path):
    f = tmp_path / "p.agp"
    f.write_text(pipeline(settings='device = "cuda:1"').replace("kv_lookup ", "kv_lookup on compute"))
    g = pipeline_dsl.load_pipeline_graph(str(f))
    assert g.graph["name"] == "p"
    assert g.graph["settings"]["device"] == "cuda:1"
    assert g.nodes["kv"]["kind"] == "kv_lookup"
    assert g.nodes["kv"]["resource"] == "copy" and g.nodes["kv"]["placement"] == "compute"
    assert g.nodes["gen"]["placement"] is None
    assert g.edges["batch", "encode"]["conditions"] == [("label", "full"), ("label", "timeout")]
    assert g.nodes["batch"]["routes"] == [("encode", ("label", "full")), ("encode", ("label", "timeout"))]
    assert g.edges["request", "batch"]["condition"] is None
    assert g.nodes["gen"]["pos"].line == 9
    assert list(g.edges) == [("request", "batch"), ("batch", "encode"), ("encode", "kv"), ("kv", "gen"),
                             ("gen", "out")]


def test_load_pipeline_graph_raises_check_failed_with_diagnostics(tmp_path):
    f = tmp_path / "bad.agp"
    f.write_text(pipeline(gen="top_k = -3"))
    with pytest.raises(CheckFailed) as info:
        pipeline_dsl.load_pipeline_graph(str(f))
    assert "out of range" in info.value.render()
    assert info.value.diagnostics[0].pos.line == 9
    with pytest.raises(CheckFailed, match="no pipeline named 'q'"):
        f.write_text(pipeline())
        pipeline_dsl.load_pipeline_graph(str(f), "q")
    with pytest.raises(CheckFailed, match="no pipeline named '' in"):     # not "defines no pipeline"
        pipeline_dsl.load_pipeline_graph(str(f), "")


def test_every_pipeline_of_a_file_and_its_includes_becomes_a_graph():
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "examples", "compare.agp")
    graphs = pipeline_dsl.load_pipeline_graphs(root)
    assert list(graphs) == ["chat", "chat_no_reuse", "chat_greedy_window"]
    assert graphs["chat_no_reuse"].nodes["kv"]["params"]["reuse"] == "none"


def test_edges_into_a_source_or_out_of_respond_are_port_errors():
    text = pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> out -> request")
    msgs = [d.message for d in errors(text)]
    assert "stage 'out' (respond) has no output: no edge can leave it" in msgs


def test_condition_on_a_stage_without_conditions_is_an_error():
    (d,) = errors(pipeline().replace("encode -> kv -> gen", "encode -> kv when full\n kv -> gen"))
    assert "gives its items no label 'full'" in d.message


def test_cycle_is_printed():
    text = pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> out\n gen -> encode")
    msgs = [d.message for d in errors(text)]
    assert "cycle: encode -> kv -> gen -> encode" in msgs


def test_include_brings_pipelines_and_reports_missing_files(tmp_path):
    (tmp_path / "lib.agp").write_text(pipeline().replace("pipeline p", "pipeline lib"))
    (tmp_path / "main.agp").write_text('use "lib.agp"\nuse "nope.agp"\n' + pipeline())
    prog, diags = pipeline_dsl.load(str(tmp_path / "main.agp"))
    assert prog.pipeline_names() == ["lib", "p"]
    assert prog.pipeline().name.text == "p"
    (d,) = diags
    assert d.message.startswith("include not found") and d.pos.line == 2


def test_a_file_of_uses_alone_runs_what_its_include_runs(tmp_path):
    # docs/language.md: `use "common.agp"` and nothing else runs common's first pipeline. It ran
    # the first pipeline loaded instead, one that common.agp itself includes ahead of its own
    (tmp_path / "base.agp").write_text(pipeline().replace("pipeline p", "pipeline base"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.agp").write_text('use "../base.agp"\n'
                                                 + pipeline().replace("pipeline p", "pipeline common"))
    (tmp_path / "sub" / "empty.agp").write_text("# nothing here\n")
    (tmp_path / "main.agp").write_text('use "sub/empty.agp"\nuse "sub/common.agp"\n')
    for root in ("sub/common.agp", "main.agp"):
        prog, diags = pipeline_dsl.load(str(tmp_path / root), allow_paths=[str(tmp_path)])
        assert not has_errors(diags) and prog.pipeline_names() == ["base", "common"]
        assert prog.pipeline().name.text == "common", root
        assert pipeline_dsl.load_pipeline_graph(str(tmp_path / root), allow_paths=[str(tmp_path)]).graph["name"] \
            == "common"


def test_a_file_of_uses_alone_in_a_subfolder_follows_its_uses_from_its_own_folder(tmp_path):
    # main.agp -> sub/relay.agp (uses alone) -> sub/own.agp, whose own pipeline is what runs; the
    # pipeline own.agp includes ahead of its own (sub/extra.agp) is loaded first, so a relay's
    # use resolved against the root's folder (nothing there) would fall back to it
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.agp").write_text(pipeline().replace("pipeline p", "pipeline extra"))
    (tmp_path / "sub" / "own.agp").write_text('use "extra.agp"\n' + pipeline().replace("pipeline p", "pipeline own"))
    (tmp_path / "sub" / "relay.agp").write_text('use "own.agp"\n')
    (tmp_path / "main.agp").write_text('use "sub/relay.agp"\n')
    prog, diags = pipeline_dsl.load(str(tmp_path / "main.agp"))
    assert not has_errors(diags) and prog.pipeline_names() == ["extra", "own"]
    assert prog.pipeline().name.text == "own"


@pytest.mark.parametrize("written", ["sub/lbi.agp", "sub/Lib.agp", "sub/libs.agp"])
def test_an_include_not_found_suggests_a_close_file_of_its_folder(tmp_path, written):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lib.agp").write_text(pipeline().replace("pipeline p", "pipeline lib"))
    (tmp_path / "sub" / "notes.txt").write_text("lib")
    (tmp_path / "main.agp").write_text(f'use "{written}"\n' + pipeline())
    _, (d,) = pipeline_dsl.load(str(tmp_path / "main.agp"))
    assert d.message == f"include not found: '{tmp_path / written}'"
    assert d.hint == f"did you mean '{tmp_path / 'sub' / 'lib.agp'}'?"


def test_a_root_file_not_found_suggests_a_close_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.agp").write_text(pipeline())
    (tmp_path / "one_line.agp").write_text(pipeline())
    _, (d,) = pipeline_dsl.load("caht.agp")
    assert (d.message, d.hint) == ("file not found: 'caht.agp'", "did you mean 'chat.agp'?")
    _, (d,) = pipeline_dsl.load("nonexist.agp")    # names compared without the '.agp' they share
    assert d.hint is None


def test_include_cycle_is_reported_once_with_the_chain(tmp_path):
    (tmp_path / "a.agp").write_text('use "b.agp"\n')
    (tmp_path / "b.agp").write_text('use "c.agp"\n')
    (tmp_path / "c.agp").write_text('use "a.agp"\n')
    _, diags = pipeline_dsl.load(str(tmp_path / "a.agp"))
    (d,) = diags
    assert d.message.startswith("include cycle:") and d.message.count("->") == 3
    assert d.pos.file.endswith("c.agp")


def test_a_pipeline_name_defined_twice_is_an_error_at_the_second_with_a_note_at_the_first(tmp_path):
    (tmp_path / "lib.agp").write_text(pipeline())
    (tmp_path / "main.agp").write_text('use "lib.agp"\n' + pipeline())
    _, diags = pipeline_dsl.load(str(tmp_path / "main.agp"))
    (d,) = diags
    assert d.message == "duplicate pipeline 'p'"
    assert (d.pos.file, d.pos.line, d.pos.col) == (str(tmp_path / "main.agp"), 3, 10)
    ((note, first),) = d.notes
    assert note == "first defined here" and (first.file, first.line, first.col) == (str(tmp_path / "lib.agp"), 2, 10)


def test_a_file_that_uses_itself_is_an_include_cycle_at_its_use(tmp_path):
    (tmp_path / "a.agp").write_text(pipeline() + 'use "a.agp"\n')
    _, diags = pipeline_dsl.load(str(tmp_path / "a.agp"))
    (d,) = diags
    assert d.message == f"include cycle: {tmp_path / 'a.agp'} -> {tmp_path / 'a.agp'}"
    assert (d.pos.file, d.pos.line) == (str(tmp_path / "a.agp"), pipeline().count("\n") + 1)


@pytest.mark.parametrize("included, message", [
    (b"\x00\xff\xfe binary", "file is not valid UTF-8"),
    (b"pipeline x {\n  stage a : requests {\n", "unexpected end of file"),
])
def test_an_included_files_own_error_notes_the_use_that_read_it(tmp_path, included, message):
    """The error stands in the included file, and a note names the `use` of the file given to
    agp, so that `agp check main.agp` says how main.agp came to read the file at fault."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lib.agp").write_bytes(included)
    (tmp_path / "main.agp").write_text(pipeline() + '\nuse "sub/lib.agp"\n')
    prog, diags = pipeline_dsl.load(str(tmp_path / "main.agp"))
    (d,) = diags
    assert d.message.startswith(message) and d.pos.file == str(tmp_path / "sub" / "lib.agp")
    ((note, at),) = d.notes
    assert note == "included here" and (at.file, at.col) == (str(tmp_path / "main.agp"), 5)
    assert prog.sources[at.file].splitlines()[at.line - 1] == 'use "sub/lib.agp"'
    assert f"= note: included here ({tmp_path / 'main.agp'}:{at.line}:5)" in render_all(diags, prog.sources)


def test_a_model_file_given_as_the_pipeline_says_it_is_a_model(tmp_path, tiny_gguf):
    """`agp run model.gguf` (as `agp serve MODEL` takes it): the error says the file is a model and
    how a pipeline names one, not that it is not UTF-8 (it said "re-save the file as UTF-8")."""
    _, diags = pipeline_dsl.load(str(tiny_gguf))
    (d,) = diags
    assert d.message == "file is a model (a GGUF file), not a pipeline" and (d.pos.line, d.pos.col) == (1, 1)
    assert "agp serve MODEL" in d.hint and "model = " in d.hint
    big = tmp_path / "big.gguf"                 # a real model is over the 1 MiB a pipeline may be
    big.write_bytes(b"GGUF" + bytes(2 << 20))
    _, diags = pipeline_dsl.load(str(big))
    assert [d.message for d in diags] == ["file is a model (a GGUF file), not a pipeline"]


def test_file_that_is_not_utf8_is_an_error_at_the_bad_byte(tmp_path):
    f = tmp_path / "x.agp"
    f.write_bytes(b'pipeline p {\n  model = "caf\xe9"\n}\n')
    _, diags = pipeline_dsl.load(str(f))
    (d,) = diags
    assert "not valid UTF-8" in d.message and (d.pos.line, d.pos.col) == (2, 15)


@pytest.mark.parametrize("encoding, bom, name", [
    ("utf-16-le", b"\xff\xfe", "UTF-16"), ("utf-16-be", b"\xfe\xff", "UTF-16"), ("utf-16-le", b"", "UTF-16"),
    ("utf-32-le", b"\xff\xfe\x00\x00", "UTF-32"),
])
def test_a_file_saved_as_utf16_or_utf32_is_named_so(tmp_path, encoding, bom, name):
    """Windows editors save "Unicode" as UTF-16: the error says which encoding it is and how to
    convert it (not latin1), and shows the line as the editor does, without its zero bytes."""
    f = tmp_path / "x.agp"
    f.write_bytes(bom + pipeline().encode(encoding))
    program, diags = pipeline_dsl.load(str(f))
    (d,) = diags
    assert (d.message, d.pos.line, d.pos.col) == (f"file is {name}, not UTF-8", 1, 1)
    assert f"iconv -f {name.lower()} -t utf-8" in d.hint
    assert "\x00" not in render_all(diags, program.sources)


def test_one_utf8_bom_is_skipped_and_a_second_is_an_unexpected_character(tmp_path):
    """An editor's BOM starts the file unseen and is skipped, as Python's utf-8-sig skips it; a
    second (files joined with cat) is a character of the text, named where it is, as one
    anywhere else in the file is."""
    f = tmp_path / "x.agp"
    f.write_bytes(b"\xef\xbb\xbf" + pipeline().encode())
    assert not [d for d in pipeline_dsl.load(str(f))[1] if d.severity == "error"]
    f.write_bytes(b"\xef\xbb\xbf" * 2 + pipeline().encode())
    (d,) = [d for d in pipeline_dsl.load(str(f))[1] if d.severity == "error"]
    assert (d.message, d.pos.line, d.pos.col) == ("unexpected character '\\ufeff'", 1, 1)


@pytest.mark.parametrize("separator", ["\x0c", "\u2028", "\x85", "\x1e"])
def test_a_form_feed_or_unicode_separator_in_a_comment_starts_no_line(separator):
    """Lines are counted at "\\n" by the parser: the excerpt under an error is the line it
    names, not the one before it."""
    text = f"# part one{separator} of two\n" + pipeline(gen="max_new_tokns = 4")
    program, diags = pipeline_dsl.loads(text, "t.agp")
    (d,) = diags
    shown = render_all(diags, program.sources)
    assert "max_new_tokns" in shown.splitlines()[1] and shown.splitlines()[1].startswith(f"{d.pos.line:5} |")


def test_a_file_with_old_mac_line_breaks_is_read_line_by_line():
    """A lone CR breaks a line, as editors show it: the error stands at its line and column."""
    program, diags = pipeline_dsl.loads(pipeline(gen="max_new_tokns = 4").replace("\n", "\r"), "t.agp")
    (d,) = diags
    assert (d.pos.line, d.pos.col) == (9, 37)
    assert render_all(diags, program.sources).splitlines()[1] == \
        "    9 |     stage gen     : generate      { max_new_tokns = 4 }"


def test_missing_root_file_is_an_error_not_an_exception(tmp_path):
    _, diags = pipeline_dsl.load(str(tmp_path / "none.agp"))
    assert has_errors(diags) and "not found" in diags[0].message


def test_syntax_errors_speak_words_not_lark_tokens():
    _, diags = pipeline_dsl.loads("pipeline p {\n stage a b\n}\n", "t.agp")
    (d,) = diags
    assert d.message == "unexpected name 'b'"
    assert "':'" in d.expected and "COLON" not in d.expected


def test_units_helpers_round_trip():
    assert units.normalise(1, "ms") == 0.001 and units.normalise(2, "GiB") == 2 << 30
    assert units.format_duration(0.00025) == "250us" and units.format_size(64 << 20) == "64MiB"
    assert units.unit_kind("MiB") == "size" and units.unit_kind("min") is None


def test_ast_equality_ignores_positions():
    a, _ = parse("pipeline p { x = 1 }", "a")
    b, _ = parse("pipeline   p {\n\n  x = 1\n}", "b")
    assert a == b and a.items[0].pos != b.items[0].pos
    assert isinstance(a.items[0].body[0].value, ast.Int)


# ---------------------------------------------------------------- registry and entry points

SPEC = StageKind("speculate", "Draft tokens with a small model.", params=(
    Param("draft_tokens", INT, reg_mod.REQUIRED, "tokens drafted per step", min=1, max=16),),
    inputs=(Port("cached", "CachedTokens"),), outputs=(Port("cached", "CachedTokens"),), resource="compute",
    impl="my_pkg:Speculate")
SHORTEN = StageKind("shorten", "Keep the first words of each answer.", params=(
    Param("words", INT, 3, "words kept", min=1),),
    inputs=(Port("generated", "Generated"),), outputs=(Port("generated", "Generated"),),
    impl="stage_plugin:Shorten")
NO_IMPL = StageKind("dreamer", "A kind with a schema and nothing behind it.",
                    inputs=(Port("requests", "Request"),), outputs=(Port("requests", "Request"),))


class _FakeEP:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"fake:{name}", obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


SHORTEN_MODULE = ("class Shorten:\n"
                  "    def __init__(self, name, params, context):\n"
                  "        self.words = params['words']\n"
                  "    def process(self, item):\n"
                  "        item['text'] = ' '.join(item['text'].split()[:self.words])\n"
                  "        return item\n")


@pytest.fixture
def fake_entry_points(monkeypatch, tmp_path):
    (tmp_path / "stage_plugin.py").write_text(SHORTEN_MODULE)      # SHORTEN's impl
    monkeypatch.syspath_prepend(str(tmp_path))

    class EPs(list):
        def select(self, group):
            return EPs(e for e in self if group == reg_mod.ENTRY_POINT_GROUP)
    eps = EPs([_FakeEP("speculate", SPEC), _FakeEP("broken", ImportError("no module named 'x'")),
               _FakeEP("shorten", SHORTEN), _FakeEP("dreamer", NO_IMPL)])
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: eps if group is None else eps.select(group=group))
    reg_mod.reset_default_registry()
    yield
    reg_mod.reset_default_registry()


def test_third_party_kind_registers_through_an_entry_point(fake_entry_points):
    reg = reg_mod.default_registry()
    assert "speculate" in reg.names() and reg.get("speculate").source == "entry point speculate"
    assert any("broken" in p for p in reg.problems)
    (d,) = errors(pipeline().replace(": generate", ": broken"))
    assert d.message == "unknown stage kind 'broken'" and "failed to load" in d.notes[0][0]
    text = pipeline().replace("gen -> out", "gen -> short -> out").replace(
        "stage out", "stage short : shorten { words = 2 }\n    stage out")
    assert pipeline_dsl.loads(text, "t.agp")[1] == []


def test_a_third_party_kind_inside_an_engine_segment_or_without_impl_is_an_error(fake_entry_points):
    text = pipeline().replace("kv -> gen", "kv -> spec -> gen").replace(
        "stage out", "stage spec : speculate { draft_tokens = 4 }\n    stage out")
    msgs = [d.message for d in errors(text)]
    assert any("works on CachedTokens, inside an engine segment" in m for m in msgs)
    text = pipeline().replace("request -> batch", "request -> d -> batch").replace(
        "stage out", "stage d : dreamer {}\n    stage out")
    (d,) = errors(text)
    assert d.message == "stage kind 'dreamer' (entry point dreamer) has no runtime implementation"


def test_a_third_party_kind_runs_its_process_on_each_item(fake_entry_points, tmp_path, tiny_gguf):
    text = pipeline().replace("gen -> out", "gen -> short -> out").replace(
        "stage out", "stage short : shorten { words = 2 }\n    stage out")
    text = text.replace('model = "smollm2-135m-instruct"', f'model = "{tiny_gguf}"\n    dtype = fp32')
    path = tmp_path / "p.agp"
    path.write_text(text)
    from pipeline_dsl.flow import PipelineRuntime
    from pipeline_dsl.flow import load_graph

    rt = PipelineRuntime(load_graph(path), overrides={"threads": 1})
    (res,) = rt.run_all([{"id": "a", "prompt": "hello world", "max_tokens": 6, "ignore_eos": True}])
    rt.shutdown()
    assert res.ok and len(res.choices[0].text.split()) <= 2
    assert rt.stats()["stages"]["short"]["items_in"] == 1


def test_required_parameter_of_a_kind_must_be_given(fake_entry_points):
    text = pipeline().replace("request -> batch", "request -> spec -> batch").replace(
        "stage out", "stage spec : speculate {}\n    stage out")
    assert "missing parameter 'draft_tokens' in stage 'spec' (speculate)" in [d.message for d in errors(text)]


def test_builtin_kinds_match_the_contract():
    reg = reg_mod.Registry(__import__("stages.builtin", fromlist=["x"]).BUILTIN_KINDS, load_entry_points=False)
    assert reg.names() == ["dynamic_batch", "encode", "generate", "join", "kv_lookup", "python", "requests",
                           "respond", "route", "system_prompt"]
    b = reg.get("dynamic_batch")
    assert [(p.name, p.type, p.default) for p in b.params] == [
        ("max_batch_size", "int", 32), ("timeout", "duration", 0.001), ("padding", "bool", True),
        ("policy", "enum", "continuous"), ("scheduling_policy", "enum", "fcfs"), ("max_tokens_per_step", "int", 512),
        ("itl_target", "duration", 0.5), ("long_prefill_threshold", "int", 1024)]
    assert {k.name: k.resource for k in reg.kinds()} == {
        "requests": "host", "dynamic_batch": "host", "encode": "host", "kv_lookup": "copy",
        "generate": "compute", "respond": "host", "system_prompt": "host", "python": "host", "route": "host",
        "join": "host"}
    assert all(k.impl is None or ":" in k.impl for k in reg.kinds())


# ---------------------------------------------------------------- found by `make mutate` (docs/testing.md)

AT = SourcePos("t.agp", 1, 1, 1, 2)

def test_a_parameter_of_a_type_the_checker_does_not_know_gets_the_value_as_written():
    from pipeline_dsl.checker import convert

    p = Param("colour", "colour")                      # a third-party kind's own type
    items = (ast.Int(3, AT), ast.Quantity(2, "ms", AT), ast.Word("red", AT), ast.List((ast.Str("a", AT),), AT))
    assert convert(ast.List(items, AT), p, "'colour'") == ([3, 0.002, "red", ["a"]], None)
    assert convert(ast.Quantity(1, "KiB", AT), p, "'colour'") == (1024, None)
    assert convert(ast.Word("blue", AT), p, "'colour'") == ("blue", None)


@pytest.mark.parametrize("param, text", [
    (Param("n", INT, min=3), "an integer of at least 3"),
    (Param("n", INT, max=7), "an integer of at most 7"),
    (Param("n", INT), "an integer"),
    (Param("x", reg_mod.FLOAT, min=0.0, min_exclusive=True), "a number above 0"),
    (Param("x", reg_mod.FLOAT, min=0.25, max=2.5), "a number from 0.25 to 2.5"),
    (Param("d", reg_mod.DURATION, max=0.5), "a duration with a unit (us, ms, s) of at most 500ms, e.g. 1ms"),
])
def test_every_kind_of_range_is_put_in_words(param, text):
    from pipeline_dsl.checker import _type_expected

    assert _type_expected(param) == text


def test_a_bound_only_on_one_side_is_checked_on_that_side():
    from pipeline_dsl.checker import convert

    low, high = Param("n", INT, min=3), Param("n", INT, max=7)
    assert convert(ast.Int(3, AT), low, "'n'") == (3, None) and convert(ast.Int(10 ** 9, AT), low, "'n'")[1] is None
    assert convert(ast.Int(2, AT), low, "'n'")[1].hint == "the smallest allowed value is 3"
    assert convert(ast.Int(7, AT), high, "'n'") == (7, None) and convert(ast.Int(-10 ** 9, AT), high, "'n'")[1] is None
    assert convert(ast.Int(8, AT), high, "'n'")[1].hint == "the largest allowed value is 7"
    above = Param("x", reg_mod.FLOAT, min=0.5, min_exclusive=True)
    assert convert(ast.Float(0.5, AT), above, "'x'")[1].hint == "the value must be above 0.5"
    assert convert(ast.Float(0.5000001, AT), above, "'x'") == (0.5000001, None)


def _model_errors(tmp_path, model: str) -> list[str]:
    (tmp_path / "p.agp").write_text(pipeline().replace('"smollm2-135m-instruct"', f'"{model}"'))
    program, diags = pipeline_dsl.load(str(tmp_path / "p.agp"))
    return [d.message for d in diags if d.is_error]


def test_a_model_file_replaced_after_a_check_is_checked_again(tmp_path, tiny_gguf):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4)
    (msg,) = _model_errors(tmp_path, "m.gguf")
    assert msg.startswith("bad model file 'm.gguf': ")
    bad.write_bytes(tiny_gguf.read_bytes())
    assert _model_errors(tmp_path, "m.gguf") == []


def test_a_model_folder_is_checked_again_when_a_file_in_it_changes(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[]")
    first = _model_errors(tmp_path, "hf")
    (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    second = _model_errors(tmp_path, "hf")
    assert len(first) == len(second) == 1 and first != second
    assert first[0].startswith("bad model file 'hf/config.json': ")


def test_kv_budgets_against_kv_budget_at_the_edge_and_with_a_bad_budget():
    # the kv_lookup budget may use all of the pipeline's kv_budget, not a byte more
    assert errors(pipeline(settings="kv_budget = 64MiB", kv="budget = 64MiB")) == []
    (d,) = errors(pipeline(settings="kv_budget = 64MiB", kv="budget = 65MiB"))
    assert "kv_lookup budgets (65MiB) leave nothing of kv_budget = 64MiB" in d.message
    # a budget that is itself wrong gets its own error, and only that one (no crash)
    (d,) = errors(pipeline(settings="kv_budget = 64MiB", kv="budget = fast"))
    assert "budget" in d.message and "kv_budget" not in d.message


@pytest.mark.parametrize("literal, value", [
    (r'"a\"b\\c"', 'a"b\\c'), (r'"\n\t\r\0"', "\n\t\r\0"), (r'"caf\u00e9"', "café"),
    (r'"\ud83d\ude00"', "\U0001F600"), (r'"C:\\Users"', "C:\\Users"),
    (r'"\udbff\udfff"', "\U0010FFFF"),                        # the last pair: both surrogates at their top
])
def test_string_escapes_are_the_documented_ones(literal, value):
    module, diags = parse(f"pipeline p {{ x = {literal} }}")
    assert diags == []
    assert module.items[0].body[0].value.value == value


@pytest.mark.parametrize("literal, message, col, width", [
    (r'"Use \d"', "unknown escape '\\d' in a string; the escapes are \\\" \\\\ \\n \\t \\r \\0 \\uXXXX", 23, 2),
    (r'"C:\Users"', "unknown escape '\\U' in a string", 21, 2),
    (r'"\x41"', "unknown escape '\\x' in a string", 19, 2),
    (r'"\u12g4"', "malformed escape '\\u12g4' in a string", 19, 6),
    (r'"\u12"', "malformed escape '\\u12' in a string", 19, 4),             # cut short by the quote
    (r'"ab\udc00"', "lone surrogate '\\udc00' in a string", 21, 6),
])
def test_an_unknown_escape_is_an_error_at_it_not_a_dropped_backslash(literal, message, col, width):
    text = f"pipeline p {{ x = {literal} }}"
    module, (d,) = parse(text, "t.agp")
    assert module is None and d.is_error
    assert d.message.startswith(message)
    assert (d.pos.line, d.pos.col, d.pos.end_col - d.pos.col) == (1, col, width)


def test_check_exits_2_on_an_unknown_escape(tmp_path, capsys):
    from pipeline_dsl.cli import main

    f = tmp_path / "p.agp"
    f.write_text(pipeline(gen='stop = ["\\x41"]'))
    assert main(["check", str(f)]) == 2
    assert "unknown escape '\\x'" in capsys.readouterr().err


def _kv_diags(text: str) -> list:
    return [d for d in pipeline_dsl.loads(text, "t.agp")[1] if "KV pool of 'kv'" in d.message]


def test_a_kv_budget_smaller_than_one_block_of_the_model_is_an_error_at_the_budget():
    """smollm2-135m: 30 layers x 3 KV heads x 64, K and V: a 16-token block is 360KiB in bf16."""
    (d,) = _kv_diags(pipeline(settings="kv_budget = 64KiB"))
    assert d.is_error and (d.pos.line, d.pos.col) == (4, 17)
    assert d.message == ("KV pool of 'kv': its share of kv_budget (64KiB) is less than one block of 16 tokens of "
                         "smollm2-135m-instruct (30 layers x 3 KV heads x head size 64, K and V): 360KiB at bf16")
    (d,) = _kv_diags(pipeline(kv="budget = 256KiB", gen="dtype = fp32"))
    assert d.is_error and "budget = 256KiB is less than one block" in d.message and "720KiB" in d.message
    # a smaller block fits; at fp32 a 1MiB pool holds a block; auto at 512KiB only where bf16 keeps it
    assert _kv_diags(pipeline(kv="budget = 64KiB  block_size = 1")) == []
    assert _kv_diags(pipeline(kv="budget = 1MiB", gen="dtype = fp32")) == []
    (d,) = _kv_diags(pipeline(kv="budget = 512KiB"))
    assert not d.is_error and "only where dtype = auto keeps the pool in bf16" in d.message


def test_the_block_check_reads_a_model_file_header(tiny_gguf):
    from pipeline_dsl.model_files import kv_shape

    layers, heads, head_dim = kv_shape(str(tiny_gguf))
    block = 2 * layers * 1024 * heads * head_dim * 4               # block_size 1024 at fp32
    kv = f"budget = {block - 1}B  block_size = 1024"
    (d,) = _kv_diags(pipeline(model=str(tiny_gguf), kv=kv, gen="dtype = fp32"))
    assert d.is_error and f"tiny.gguf ({layers} layers x {heads} KV heads x head size {head_dim}" in d.message
    assert _kv_diags(pipeline(model=str(tiny_gguf), kv=f"budget = {block}B  block_size = 1024",
                              gen="dtype = fp32")) == []


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_a_file_without_a_pipeline_is_refused_by_check_as_by_run(text, tmp_path, capsys):
    from pipeline_dsl.cli import main

    (d,) = errors(text)
    assert d.message == "t.agp defines no pipeline" and (d.pos.line, d.pos.col) == (1, 1)
    f = tmp_path / "empty.agp"
    f.write_text(text)
    assert main(["check", str(f)]) == 2
    assert f"{f}:1:1: error: {f} defines no pipeline" in capsys.readouterr().err


def test_a_file_whose_pipelines_come_from_use_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib.agp").write_text(pipeline())
    assert errors('use "lib.agp"\n') == []


@pytest.mark.parametrize("text, line, col, found, hint", [
    ("pipeline p {\n    stage gen : generate { max_new_tokens = 4\n    stage out : respond {}\n}\n", 3, 5,
     "unexpected 'stage'", "the '{' of stage 'gen' (line 2) is not closed"),
    ("pipeline p {\n    stage gen : generate on compute { n = 1\n    gen -> out\n}\n", 3, 9,
     "unexpected '->'", "the '{' of stage 'gen' (line 2) is not closed"),
    ("pipeline a {\n    stage x : requests {}\npipeline b {\n}\n", 3, 1,
     "unexpected 'pipeline'", "the '{' of pipeline 'a' (line 1) is not closed"),
])
def test_a_block_left_open_before_the_next_statement_is_named(text, line, col, found, hint):
    _, (d,) = parse(text, "t.agp")
    assert (d.message, d.hint, d.pos.line, d.pos.col) == (found, hint, line, col)
    assert d.expected.startswith("'}' to close ")


@pytest.mark.parametrize("line, hint", [
    ('use "common.agp"', "`use` goes at the top level of a file, outside pipelines: move it before pipeline 'p'"),
    ("pipeline q {}", "pipelines do not nest: close pipeline 'p' with '}' before this one starts"),
])
def test_use_or_pipeline_inside_a_closed_pipeline_is_misplaced_not_unclosed(line, hint):
    """The pipeline's '}' comes later: saying it is not closed sends the user after a brace
    that is there."""
    _, (d,) = parse("pipeline p {\n    stage out : respond {}\n    " + line + "\n}\n", "t.agp")
    assert (d.pos.line, d.pos.col, d.hint) == (3, 5, hint)
    assert d.expected == "a stage, setting or edge of pipeline 'p'"


@pytest.mark.parametrize("line, col, hint", [
    ("stage out : respond { gen -> out }", 31, "an edge goes in the pipeline, after the '}' of stage 'out'"),
    ("stage gen : generate { stage out : respond {} }", 28,
     "stages do not nest: declare this one after the '}' of stage 'gen'"),
])
def test_an_edge_or_stage_inside_a_closed_stage_block_is_misplaced_not_unclosed(line, col, hint):
    _, (d,) = parse("pipeline p {\n    " + line + "\n}\n", "t.agp")
    assert (d.pos.line, d.pos.col, d.hint) == (2, col, hint)
    assert d.expected.startswith("a parameter of stage ")


def test_a_parenthesis_left_open_in_a_condition_is_one_error_at_the_parenthesis():
    """Newlines are free inside a condition: the lines after the '(' were each reported as an
    unexpected name, none at the '(' that lacks its ')'."""
    _, diags = parse("pipeline p {\n    a -> b when (n > 1\n    a -> c otherwise\n    c -> d\n}\n", "t.agp")
    assert [(d.message, d.pos.line, d.pos.col, d.hint) for d in diags] == [
        ("'(' is not closed", 2, 17, "found name 'a' on line 3 instead")]


def test_a_list_left_open_before_the_stage_brace_is_one_error():
    """The '}' after the list closes the stage: recovery blanks that line alone, not the rest of
    the pipeline (which reported the pipeline as not closed)."""
    _, diags = parse('pipeline p {\n    stage g : generate { stop = ["a" }\n    stage out : respond {}\n}\n', "t.agp")
    assert [(d.message, d.pos.line) for d in diags] == [("unexpected '}'", 2)]


@pytest.mark.parametrize("line, message, col, hint", [
    ("src -> out when prompt_tokens = 5", "unexpected '='", 35, "did you mean '=='?"),
    ("src -> out when prompt_tokens =< 5", "unexpected '='", 35, "did you mean '<='?"),
    ("src -> out when full && timeout", "unexpected character '&'", 26,
     "conditions are joined with 'and' (when a and b)"),
    ("src -> out when full || timeout", "unexpected character '|'", 26, "conditions are joined with 'or' (when a or b)"),
    ("stage g : generate { max_new_tokens = 0x10 }", "hexadecimal number '0x10' is not taken", 43, "write 16"),
    ("src => batch", "unexpected '>'", 10, "an edge is written '->'"),
    ("src -> mid => batch", "unexpected '='", 16, "an edge is written '->'"),
    ("stage my-out : respond {}", "unexpected character '-'", 13,
     "names are letters, digits and '_', not '-': write my_out"),
    ("src -> out when !full", "unexpected character '!'", 21,
     "a condition is negated with 'not' (when not stream == true); '!=' compares"),
    ("stage kv : kv_lookup {} on copy", "unexpected 'on'", 29,
     "a placement goes before the stage's { … }: kv_lookup on copy { … }"),
    ("src -> out when 5 <= prompt_tokens", "unexpected number '5'", 21,
     "a comparison starts with its field: prompt_tokens >= 5"),
    ('src -> out when "x" == model', "unexpected string \"x\"", 21, 'a comparison starts with its field: model == "x"'),
    ("src -> mid when full -> out", "unexpected '->'", 26, "a condition ends its edge statement: write "
     "`src -> mid when full`, then `mid -> …` on a line of its own"),
    ('stage out : "respond" {}', 'unexpected string "respond"', 17, "a kind is written without quotes: respond"),
    ("stage g : generate { max_new_tokens = 1_000 }", "digits grouped with '_' in '1_000'", 43, "write 1000"),
    ('src -> out when metadata.1 == "x"', "unexpected number '.1'", 29,
     "a key after '.' is a name: letters, digits and '_', not starting with a digit"),
    # a fork written as one edge to several stages: the hint was about a stage's parameters
    ("kv -> a, b", "unexpected ','", 12, "an edge goes to one stage: write `kv -> a` and `kv -> b` (edges "
     "without a condition out of one stage each get a copy)"),
    ("src -> a,b, c when full  # fork", "unexpected ','", 13, "an edge goes to one stage: write `src -> a when "
     "full`, `src -> b when full` and `src -> c when full`"),
    # a '#' inside the condition's string is not a comment; the condition is kept whole
    ('src -> a, b when id == "x#1"  # fork', "unexpected ','", 13, 'an edge goes to one stage: write `src -> a when '
     'id == "x#1"` and `src -> b when id == "x#1"`'),
    # a chain that goes on past the stages: one edge per stage, not edges that drop `-> c`
    ("src -> a, b -> c", "unexpected ','", 13, "an edge goes to one stage: write one edge per stage it leads to "
     "(edges without a condition out of one stage each get a copy)"),
    ("src -> a, b when full -> c", "unexpected ','", 13, "an edge goes to one stage: write one edge per stage it "
     "leads to (edges without a condition out of one stage each get a copy)"),
])
def test_syntax_slips_from_other_languages_get_a_hint(line, message, col, hint):
    _, (d,) = parse("pipeline p {\n    " + line + "\n}\n", "t.agp")
    assert (d.message, d.pos.line, d.pos.col, d.hint) == (message, 2, col, hint)


def test_every_syntax_error_of_a_file_is_reported_in_one_pass():
    """Three independent slips, three errors in file order (only the first was reported: a
    user fixed one and ran check again for the next)."""
    text = ("pipeline p {\n    stage batch : dynamic_batch { max_batch_size = = 8 }\n"
            "    stage gen : generate {\n        temperature = 0.7;\n    }\n"
            "    request -> batch when\n    gen -> out\n    batch => gen\n}\n")
    module, diags = parse(text, "t.agp")
    assert module is None
    assert [(d.message, d.pos.line) for d in diags] == [
        ("unexpected '='", 2), ("unexpected character ';'", 4), ("missing condition after 'when'", 6),
        ("unexpected '>'", 8)]


@pytest.mark.parametrize("text, count", [
    # a '{' left open: what follows is inside it, so nothing after it is reported
    ("pipeline p {\n    stage gen : generate { n = 1\n    stage out : respond {}\n    a => b\n}\n", 1),
    # the file ends inside the pipeline: one error, not one per line after a blank
    ("pipeline p {\n    a -> -> b\n    stage out : respond {}\n", 2),
    # a mistake in the line that opens a block blanks the block through its '}'
    ("pipeline p {\n    stage gen generate {\n        n = 1\n    }\n    a -> b when\n}\n", 2),
])
def test_syntax_error_recovery_invents_no_errors(text, count):
    _, diags = parse(text, "t.agp")
    assert len(diags) == count
    assert len({(d.pos.line, d.pos.col) for d in diags}) == count


def test_the_caret_is_placed_by_display_width_after_wide_characters():
    from pipeline_dsl.diagnostics import ERROR, Diagnostic

    line = '    stage s : system_prompt { text = "你好世界" mode = x }'
    col = line.index("mode") + 1                                  # 1-based, in characters
    d = Diagnostic(ERROR, "unknown parameter 'mode'", SourcePos("t.agp", 1, col, 1, col + 4))
    marks = d.render({"t.agp": line}).splitlines()[2].split(" | ", 1)[1]
    # the four CJK characters take eight columns: the caret sits 4 columns right of its character count
    assert marks == " " * (col - 1 + 4) + "^^^^"
    d = Diagnostic(ERROR, "a wide span", SourcePos("t.agp", 1, line.index("你") + 1, 1, line.index("你") + 5))
    assert d.render({"t.agp": line}).splitlines()[2].split(" | ", 1)[1] == " " * line.index("你") + "^" * 8


def test_control_characters_of_a_file_are_printed_escaped_never_sent_to_the_terminal():
    """A comment holding an ESC sequence (clear the screen) or a string with \\u001b: the printed
    diagnostic shows them as \\x1b, and the caret stays under what it marks; --json keeps them."""
    text = 'pipeline p {\n    model = "\\u001b[2Jx"\n    stage x : respnd {}  # \x1b[2J\x07\n}\n'
    program, diags = pipeline_dsl.loads(text, "t.agp")
    shown = render_all(diags, program.sources)
    assert "\x1b" not in shown and "\x07" not in shown
    assert "    3 |     stage x : respnd {}  # \\x1b[2J\\x07\n      |               ^^^^^^\n" in shown
    assert "model not found: '\\x1b[2Jx'" in shown
    assert any(d.message == "model not found: '\x1b[2Jx'" for d in diags)      # the message itself is kept
    program, diags = pipeline_dsl.loads('pipeline p {\n    stage \x00x : respond {}\n}\n', "t.agp")
    assert render_all(diags, program.sources).splitlines()[1:3] == [
        "    2 |     stage \\x00x : respond {}", "      |           ^^^^"]
