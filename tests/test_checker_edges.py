"""checker.py at its edges: each rule's diagnostic rendered whole (message, position, expected,
hint, notes), the accepted value at the other side of the bound, and the resolved values.
Written against the survivors of `make mutate` over pipeline_dsl/checker.py."""

from __future__ import annotations

import json
import os

import pytest

import pipeline_dsl
from pipeline_dsl import ast
from pipeline_dsl.checker import check_pipeline, convert
from pipeline_dsl.diagnostics import SourcePos, render_all
from stages import registry as reg_mod
from stages.registry import Param

SEED = """pipeline p {{
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
EMBEDDED = "smollm2-135m-instruct"
AT = SourcePos("t.agp", 1, 1, 1, 2)


def pipeline(settings="", batch="", kv="", gen="", model=EMBEDDED):
    return SEED.format(settings=settings, batch=batch, kv=kv, gen=gen, model=model)


def render(text: str, file: str = "t.agp") -> str:
    program, diags = pipeline_dsl.loads(text, file)
    return render_all(diags, program.sources)


def render_file(path) -> str:
    program, diags = pipeline_dsl.load(str(path))
    return render_all(diags, program.sources)


def resolved(text: str, file: str = "t.agp"):
    program, diags = pipeline_dsl.loads(text, file)
    assert [d for d in diags if d.is_error] == []
    return check_pipeline(program.pipelines[0])[0]


# ---------------------------------------------------------------- generate's json_schema

SCHEMA_EXPECTED = ("  = expected: a JSON Schema file (relative to this .agp file) that constrained decoding "
                   "can enforce\n")


def _schema_pipeline(tmp_path, schema_path: str, content=None, name="s.json"):
    sub = tmp_path / "sub"
    sub.mkdir(exist_ok=True)
    if content is not None:
        (sub / name).write_text(content, encoding="utf-8")
    f = sub / "p.agp"
    f.write_text(pipeline(gen=f'json_schema = "{schema_path}"'), encoding="utf-8")
    return f


def _schema_error(f, path: str, message: str, hint: str | None = None) -> str:
    return (f"{f}:8:51: error: {message}\n"
            f'    8 |     stage gen     : generate      {{ json_schema = "{path}" }}\n'
            f"      | {' ' * 50}{'^' * (len(path) + 2)}\n"
            + SCHEMA_EXPECTED + (f"  = help: {hint}\n" if hint else "") + "\n1 error\n")


def test_json_schema_file_not_found_is_an_error_at_the_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "nope.json")
    assert render_file(f) == _schema_error(f, "nope.json", "json_schema file not found: 'nope.json'")


def test_json_schema_file_that_is_not_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", "{not json")
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' is not JSON: Expecting property name enclosed in double quotes: "
                     "line 1 column 2 (char 1)")


def test_json_schema_file_that_is_not_utf8_is_not_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json")
    (tmp_path / "sub" / "s.json").write_bytes(b'{"description": "caf\xe9"}')
    out = render_file(f)
    assert "json_schema file 's.json' is not JSON: 'utf-8' codec can't decode byte 0xe9" in out


def test_json_schema_file_holding_a_list_or_a_number_is_not_a_schema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", "[1, 2]")
    assert render_file(f) == _schema_error(f, "s.json", "json_schema file 's.json' holds a list, not a schema object")
    f = _schema_pipeline(tmp_path, "s.json", "3")
    assert render_file(f) == _schema_error(f, "s.json", "json_schema file 's.json' holds a int, not a schema object")


def test_json_schema_that_cannot_be_enforced_gets_a_hint(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", '{"type": "array", "uniqueItems": true}')
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' cannot be enforced: Unimplemented keys: [\"uniqueItems\"]",
        "constrained decoding supports most of JSON Schema; not, e.g., uniqueItems or not")


def test_a_boolean_json_schema_passes_the_type_check_and_is_left_to_the_compiler(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", "true")
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' cannot be enforced: cannot compile the json_schema: Expecting "
                     "object schema to apply options",
        "constrained decoding supports most of JSON Schema; not, e.g., uniqueItems or not")


@pytest.mark.parametrize("schema", ['{"type": "object"}', '{"type": "string", "description": "café"}'])
def test_a_json_schema_beside_the_file_is_accepted_and_made_absolute(tmp_path, monkeypatch, schema):
    pytest.importorskip("llguidance")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)             # not the .agp file's folder
    f = _schema_pipeline(tmp_path, "s.json", schema)
    program, diags = pipeline_dsl.load(str(f))
    assert diags == []
    r = check_pipeline(program.pipelines[0])[0]
    assert r.stages["gen"].params["json_schema"] == str(tmp_path / "sub" / "s.json")


def test_a_json_schema_is_looked_up_in_the_working_directory_after_the_files_folder(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.json").write_text('{"type": "object"}')          # in the working directory only
    f = _schema_pipeline(tmp_path, "s.json")
    program, diags = pipeline_dsl.load(str(f))
    assert diags == []
    assert check_pipeline(program.pipelines[0])[0].stages["gen"].params["json_schema"] == str(tmp_path / "s.json")
    # a file beside the .agp file wins over the one in the working directory
    (tmp_path / "sub" / "s.json").write_text('{"type": "string"}')
    program, diags = pipeline_dsl.load(str(f))
    assert check_pipeline(program.pipelines[0])[0].stages["gen"].params["json_schema"] == \
        str(tmp_path / "sub" / "s.json")


def test_a_json_schema_of_a_program_without_a_file_is_looked_up_in_the_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.json").write_text('{"type": "object"}')
    r = resolved(pipeline(gen='json_schema = "s.json"'), "<stdin>")
    assert r.stages["gen"].params["json_schema"] == str(tmp_path / "s.json")


# ---------------------------------------------------------------- the model setting

MODEL_EXPECTED = ('  = expected: "smollm2-135m-instruct" (the embedded model), a .gguf file or a Hugging Face '
                  "folder (a relative path is looked up beside this file, then in the working directory)\n")
BAD_MODEL_EXPECTED = ("  = expected: a llama-family .gguf file (GGUF version 2 or 3), or a Hugging Face folder "
                      "with config.json, *.safetensors and tokenizer.json\n")

LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2}


def _model_line(file, model: str, message: str, expected: str, hint: str | None = None) -> str:
    return (f"{file}:2:13: error: {message}\n"
            f'    2 |     model = "{model}"\n'
            f"      |             {'^' * (len(model) + 2)}\n"
            + expected + (f"  = help: {hint}\n" if hint else "") + "\n1 error\n")


def test_a_hf_folder_without_weights_is_a_bad_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    assert render(pipeline(model="hf")) == _model_line(
        "t.agp", "hf", "bad model folder 'hf': no *.safetensors weights in the folder", BAD_MODEL_EXPECTED)


def test_a_broken_gguf_is_a_bad_model_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"")
    assert render(pipeline(model="m.gguf")) == _model_line(
        "t.agp", "m.gguf", "bad model file 'm.gguf': the file is empty", BAD_MODEL_EXPECTED)


def test_a_program_named_like_stdin_looks_for_its_model_in_the_working_directory_only(tmp_path, monkeypatch):
    # '<…>' names no file: nothing is looked up beside it, even where such a folder exists
    monkeypatch.chdir(tmp_path)
    (tmp_path / "<sub").mkdir()
    (tmp_path / "<sub" / "m.gguf").write_bytes(b"")
    assert render(pipeline(model="m.gguf"), "<sub/p.agp") == _model_line(
        "<sub/p.agp", "m.gguf", "model not found: 'm.gguf'", MODEL_EXPECTED)
    assert render(pipeline(model="m.gguf"), "<stdin>") == _model_line(
        "<stdin>", "m.gguf", "model not found: 'm.gguf'", MODEL_EXPECTED)
    (tmp_path / "m.gguf").write_bytes(b"")
    assert render(pipeline(model="m.gguf"), "<stdin>") == _model_line(
        "<stdin>", "m.gguf", "bad model file 'm.gguf': the file is empty", BAD_MODEL_EXPECTED)


def test_a_model_folder_with_an_unreadable_entry_is_still_checked_again_when_config_json_changes(tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[]")
    for i in range(24):                      # dangling links: os.stat fails on them, in any listing order
        os.symlink(tmp_path / f"gone{i}", folder / f"link{i}")
    first = render(pipeline(model="hf"))
    assert "bad model file 'hf/config.json': a JSON list, not an object" in first
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    second = render(pipeline(model="hf"))
    assert "bad model file 'hf/config.json': model_type 'gpt2' is not a llama-family decoder" in second


# ---------------------------------------------------------------- values as words

def test_a_quantity_with_an_unknown_unit_inside_a_string_list_is_called_a_quantity():
    out = render(pipeline(gen="stop = [3zz]"))
    assert "error: 'stop' is a list of strings, but it holds the quantity '3zz'\n" in out


def test_a_third_party_type_keeps_an_unknown_unit_inside_a_list_as_written():
    p = Param("colour", "colour")
    value = ast.List((ast.Quantity(3, "zz", AT), ast.Quantity(2, "ms", AT)), AT)
    assert convert(value, p, "'colour'") == (["3zz", 0.002], None)
