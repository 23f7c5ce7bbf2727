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
from test_dsl_checker import pipeline as seed_pipeline

EMBEDDED = "smollm2-135m-instruct"
AT = SourcePos("t.agp", 1, 1, 1, 2)


def pipeline(settings="", batch="", kv="", gen="", model=EMBEDDED):
    """test_dsl_checker's seed pipeline starting on line 1 (the positions below count from it)."""
    return seed_pipeline(settings, batch, kv, gen, model).removeprefix("\n")


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


def test_a_misspelt_json_schema_file_gets_a_did_you_mean_from_its_folder_only(tmp_path, monkeypatch):
    """A close name beside the pipeline is suggested; a folder outside the pipeline's is never
    listed (a suggestion would tell its file names)."""
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "shema.json", "{}", name="schema.json")
    assert render_file(f) == _schema_error(f, "shema.json", "json_schema file not found: 'shema.json'",
                                           "did you mean 'schema.json'?")
    (tmp_path / "secret.json").write_text("{}")
    f = _schema_pipeline(tmp_path, "../secrt.json")
    assert "did you mean" not in render_file(f)


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


@pytest.mark.parametrize("written, meant", [("strin", "string"), ("Integer", "integer"), ("float", "number"),
                                             ("bool", "boolean")])
def test_a_json_schema_type_json_schema_lacks_is_named_a_typo_with_the_types_and_the_one_meant(
        tmp_path, monkeypatch, written, meant):
    """`"type": "strin"` (or a Python habit, `"float"`) is a typo, not a keyword constrained
    decoding lacks: the help lists JSON Schema's types and the one meant, where it said
    'supports most of JSON Schema; not, e.g., uniqueItems or not'."""
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", '{"type": "object", "properties": {"a": {"type": "%s"}}}' % written)
    assert render_file(f) == _schema_error(
        f, "s.json", f"json_schema file 's.json' cannot be enforced: at #/properties/a: Invalid type: {written}",
        "a JSON Schema type is one of array, boolean, integer, null, number, object, string: "
        f"did you mean '{meant}'?")


def test_a_json_schema_that_fails_because_its_objects_are_closed_says_so_without_the_general_hint(
        tmp_path, monkeypatch):
    """A required key missing from `properties` fails only because agp closes objects: the error
    says so and what to write, and the hint about unsupported keywords, which misled, is left out."""
    pytest.importorskip("llguidance")
    from pipeline_dsl.constraints import CLOSED

    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", '{"type": "object", "properties": {"a": {}}, "required": ["b"]}')
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' cannot be enforced: Unsatisfiable schema: required property 'b' "
                     "is unsatisfiable" + CLOSED)


def test_a_boolean_json_schema_true_allows_any_value_and_false_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", "true")
    program, diags = pipeline_dsl.load(str(f))
    assert diags == []
    f = _schema_pipeline(tmp_path, "s.json", "false")
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' cannot be enforced: the schema is false, which no value matches",
        "constrained decoding supports most of JSON Schema; not, e.g., uniqueItems or not")


def test_a_json_schema_error_says_where_in_the_schema(tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", '{"type": "object", "properties": {"a": {"type": "object", '
                                             '"properties": {"b": {"type": "array", "uniqueItems": true}}}}}')
    assert render_file(f) == _schema_error(
        f, "s.json", "json_schema file 's.json' cannot be enforced: at #/properties/a/properties/b: "
                     "Unimplemented keys: [\"uniqueItems\"]",
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
    """Outside the pipeline's folder only when allowed (--allow-path), like every file it names."""
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.json").write_text('{"type": "object"}')          # in the working directory only
    f = _schema_pipeline(tmp_path, "s.json")
    program, diags = pipeline_dsl.load(str(f))
    assert [d.message for d in diags] == ["json_schema file 's.json' is outside the pipeline's folder"]
    program, diags = pipeline_dsl.load(str(f), allow_paths=[str(tmp_path)])
    assert diags == []
    assert check_pipeline(program.pipelines[0], allowed=program.allowed)[0].stages["gen"].params["json_schema"] == \
        str(tmp_path / "s.json")
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


# ---------------------------------------------------------------- settings and parameters, whole output

def test_settings_device_threads_duplicates_and_unknown_names_at_their_bounds():
    assert render(pipeline(settings='device = "cuda:x"\n    threads = 0\n    threads = 4\n    max_batch_size = 3\n    modle = 1\n    frobnicate = 2')) == """\
t.agp:3:14: error: 'cuda:x' is not a device
    3 |     device = "cuda:x"
      |              ^^^^^^^^
  = expected: auto | cpu | cuda | cuda:N
  = help: did you mean 'cuda'?

t.agp:4:15: error: value out of range: setting 'threads' = 0
    4 |     threads = 0
      |               ^
  = expected: an integer from 1 to 1024
  = help: the smallest allowed value is 1

t.agp:5:5: error: duplicate setting 'threads'
    5 |     threads = 4
      |     ^^^^^^^
  = note: first set here (t.agp:4:5)

t.agp:6:5: error: unknown setting 'max_batch_size'
    6 |     max_batch_size = 3
      |     ^^^^^^^^^^^^^^
  = expected: a pipeline setting: device, dtype, kv_budget, mode, model, threads
  = help: 'max_batch_size' is a stage parameter: set it inside the stage's { … }

t.agp:7:5: error: unknown setting 'modle'
    7 |     modle = 1
      |     ^^^^^
  = expected: a pipeline setting: device, dtype, kv_budget, mode, model, threads
  = help: did you mean 'mode'?

t.agp:8:5: error: unknown setting 'frobnicate'
    8 |     frobnicate = 2
      |     ^^^^^^^^^^
  = expected: a pipeline setting: device, dtype, kv_budget, mode, model, threads

6 errors
"""


def test_threads_at_the_top_bound_on_cuda_is_only_an_unused_warning():
    assert render(pipeline(settings='device = cuda\n    threads = 1024')) == """\
t.agp:4:5: warning: setting 'threads' is unused: the device is cuda
    4 |     threads = 1024
      |     ^^^^^^^
  = help: threads only apply when the pipeline runs on the CPU

1 warning
"""


def test_settings_past_the_top_bound_and_outside_their_choices():
    assert render(pipeline(settings='device = 3\n    threads = 1025\n    dtype = fp8\n    mode = latency\n    kv_budget = 64KiB', kv='block_size = 1')) == """\
t.agp:3:14: error: '3' is not a device
    3 |     device = 3
      |              ^
  = expected: auto | cpu | cuda | cuda:N
  = help: did you mean 'cuda:3'?

t.agp:4:15: error: value out of range: setting 'threads' = 1025
    4 |     threads = 1025
      |               ^^^^
  = expected: an integer from 1 to 1024
  = help: the largest allowed value is 1024

t.agp:5:13: error: 'fp8' is not a valid value for setting 'dtype'
    5 |     dtype = fp8
      |             ^^^
  = expected: one of auto | fp32 | bf16 | fp16 | int8

t.agp:6:12: error: 'latency' is not a valid value for setting 'mode'
    6 |     mode = latency
      |            ^^^^^^^
  = expected: one of efficient | balanced | performance

4 errors
"""


def test_kv_budget_one_byte_under_its_floor_and_threads_on_a_numbered_cuda_device():
    assert render(pipeline(settings='device = "cuda:1"\n    threads = 2\n    kv_budget = 65535B')) == """\
t.agp:4:5: warning: setting 'threads' is unused: the device is cuda:1
    4 |     threads = 2
      |     ^^^^^^^
  = help: threads only apply when the pipeline runs on the CPU

t.agp:5:17: error: value out of range: setting 'kv_budget' = 65535B
    5 |     kv_budget = 65535B
      |                 ^^^^^^
  = expected: a size with a unit (B, KiB, MiB, GiB) from 64KiB to 1024GiB, e.g. 256MiB
  = help: the smallest allowed value is 64KiB

1 error, 1 warning
"""


def test_stage_parameters_duplicate_unknown_retired_and_setting_names():
    assert render(pipeline(batch="max_batch_size = 8  max_batch_size = 9  threads = 2", gen="precision = fp32  frobnicate = 1  temperatur = 1.0")) == """\
t.agp:5:57: error: duplicate parameter 'max_batch_size' in stage 'batch'
    5 |     stage batch   : dynamic_batch { max_batch_size = 8  max_batch_size = 9  threads = 2 }
      |                                                         ^^^^^^^^^^^^^^
  = note: first set here (t.agp:5:37)

t.agp:5:77: error: unknown parameter 'threads' for stage kind 'dynamic_batch'
    5 |     stage batch   : dynamic_batch { max_batch_size = 8  max_batch_size = 9  threads = 2 }
      |                                                                             ^^^^^^^
  = expected: a parameter of dynamic_batch: itl_target, long_prefill_threshold, max_batch_size, max_tokens_per_step, padding, policy, scheduling_policy, timeout
  = help: 'threads' is a pipeline setting: set it outside the stages

t.agp:8:37: error: unknown parameter 'precision' for stage kind 'generate'
    8 |     stage gen     : generate      { precision = fp32  frobnicate = 1  temperatur = 1.0 }
      |                                     ^^^^^^^^^
  = expected: a parameter of generate: bad_words, compile, device, dtype, frequency_penalty, ignore_eos, json_schema, lora, max_new_tokens, min_p, min_tokens, model, n, prefill_chunk, presence_penalty, prompt_lookup_max, prompt_lookup_min, repetition_penalty, seed, speculate, speculative_tokens, stop, temperature, top_k, top_p
  = help: it is called dtype now: dtype = …

t.agp:8:55: error: unknown parameter 'frobnicate' for stage kind 'generate'
    8 |     stage gen     : generate      { precision = fp32  frobnicate = 1  temperatur = 1.0 }
      |                                                       ^^^^^^^^^^
  = expected: a parameter of generate: bad_words, compile, device, dtype, frequency_penalty, ignore_eos, json_schema, lora, max_new_tokens, min_p, min_tokens, model, n, prefill_chunk, presence_penalty, prompt_lookup_max, prompt_lookup_min, repetition_penalty, seed, speculate, speculative_tokens, stop, temperature, top_k, top_p

t.agp:8:71: error: unknown parameter 'temperatur' for stage kind 'generate'
    8 |     stage gen     : generate      { precision = fp32  frobnicate = 1  temperatur = 1.0 }
      |                                                                       ^^^^^^^^^^
  = expected: a parameter of generate: bad_words, compile, device, dtype, frequency_penalty, ignore_eos, json_schema, lora, max_new_tokens, min_p, min_tokens, model, n, prefill_chunk, presence_penalty, prompt_lookup_max, prompt_lookup_min, repetition_penalty, seed, speculate, speculative_tokens, stop, temperature, top_k, top_p
  = help: did you mean 'temperature'?

5 errors
"""


@pytest.mark.parametrize("written, hint", [
    ('regex = "[0-9]+"', "a generate stage constrains its answers by a json_schema file; a regular expression is a "
     'request\'s guided_regex, which a python stage before the batcher may set (item["guided_regex"] = …)'),
    ('choices = ["A", "B"]', "a generate stage constrains its answers by a json_schema file; a list of choices is a "
     'request\'s guided_choice, which a python stage before the batcher may set (item["guided_choice"] = …)'),
    ('choice = ["A", "B"]', "a generate stage constrains its answers by a json_schema file; a list of choices is a "
     'request\'s guided_choice, which a python stage before the batcher may set (item["guided_choice"] = …)'),
    ('grammar = "root ::= x"', "a generate stage constrains its answers by a json_schema file; a grammar is a "
     'request\'s guided_grammar, which a python stage before the batcher may set (item["guided_grammar"] = …)'),
])
def test_a_constraint_written_on_a_generate_stage_says_where_it_goes(written, hint):
    """SGLang's gen(regex=...) and select(choices=...) written as a stage's parameters: the error
    says how agp takes them, not only the parameters the stage has."""
    (d,) = [d for d in pipeline_dsl.loads(pipeline(gen=written), "t.agp")[1] if d.is_error]
    assert (d.message, d.hint) == (f"unknown parameter '{written.split()[0]}' for stage kind 'generate'", hint)


@pytest.mark.parametrize("written, hint", [
    ("n_predict = 64", "llama.cpp's name: the answer's length is max_new_tokens = …"),
    ("num_predict = 64", "Ollama's name: the answer's length is max_new_tokens = …"),
    ("temp = 0.7", "llama.cpp's name: temperature = …"),
    ("repeat_penalty = 1.1", "llama.cpp's and Ollama's name: repetition_penalty = … (over the whole prompt and "
                             "answer)"),
])
def test_llama_cpps_names_on_a_generate_stage_say_agps(written, hint):
    """n_predict and temp had no hint (no parameter's name is close to them); repeat_penalty's
    did-you-mean said nothing of what it covers."""
    (d,) = [d for d in pipeline_dsl.loads(pipeline(gen=written), "t.agp")[1] if d.is_error]
    assert (d.message, d.hint) == (f"unknown parameter '{written.split()[0]}' for stage kind 'generate'", hint)


@pytest.mark.parametrize("written", ["n_ctx = 4096", "ctx_size = 4096", "num_ctx = 4096"])
def test_a_context_length_setting_is_told_where_agp_sets_it(written):
    """llama.cpp's n_ctx and Ollama's num_ctx as pipeline settings: there is none, and nothing said where
    the context is set."""
    (d,) = [d for d in pipeline_dsl.loads(pipeline(settings=written), "t.agp")[1] if d.is_error]
    assert (d.message, d.hint) == (f"unknown setting '{written.split()[0]}'", "the context is the model's, or agp "
                                   "serve --max-model-len N; the KV cache's size is kv_budget = …")


def test_tritons_queue_delay_on_a_batcher_is_told_it_is_timeout():
    for name in ("max_queue_delay = 100us", "max_queue_delay_microseconds = 100"):
        (d,) = [d for d in pipeline_dsl.loads(pipeline(batch=name), "t.agp")[1] if d.is_error]
        assert d.hint == "how long a batch waits for more requests is timeout: timeout = 100us", name


ROUTED = """pipeline p {
    stage request : requests {}
    stage batch   : dynamic_batch {}
    stage encode  : encode {}
    stage kv      : kv_lookup {}
    stage gen     : generate {}
    stage r       : route {}
    stage r2      : route {}
    stage out     : respond {}
    request -> batch -> encode -> kv -> gen -> r
    r -> out
    r -> out when finish_reason == "length"
    r2 -> out
}
"""


def test_a_condition_beside_an_edge_without_one_between_the_same_stages_is_a_warning():
    """`r -> out` takes every item, so `r -> out when …` decides nothing (the two are one graph
    edge): check said nothing. Where the stage has another conditional edge, a condition that
    holds keeps the item from it, so the condition does decide, and no warning is given."""
    (d,) = pipeline_dsl.loads(ROUTED.replace("    r2 -> out\n", "").replace("    stage r2      : route {}\n", ""),
                              "t.agp")[1]
    assert (d.severity, d.message, d.pos.line, d.notes[0][1].line) == (
        "warning", "edge r -> out when finish_reason == \"length\" decides nothing: r -> out without a condition "
        "takes every item there", 11, 10)
    other = ROUTED.replace("    r2 -> out\n", '    r -> r2 when finish_reason == "stop"\n    r2 -> out\n')
    (d,) = pipeline_dsl.loads(other, "t.agp")[1]       # not that one; r -> out is a fan-out beside r -> r2
    assert "decides nothing" not in d.message and d.message.startswith("edge r -> out has no condition beside the "
                                                                       "conditional edge r -> r2"), d.message


def test_a_condition_beside_an_otherwise_edge_into_the_same_stage_is_a_warning():
    """`r -> out when C` beside `r -> out otherwise`: an item goes to out whether C holds or not, so C
    decides nothing (check said nothing). A conditional edge to another stage after it keeps C
    deciding (the first condition that holds wins); one before it does not."""
    text = ROUTED.replace("    r -> out\n", "    r -> out otherwise\n").replace("    r2 -> out\n", "")
    text = text.replace("    stage r2      : route {}\n", "")
    (d,) = pipeline_dsl.loads(text, "t.agp")[1]
    assert (d.severity, d.message, d.pos.line, d.notes) == (
        "warning", "edge r -> out when finish_reason == \"length\" decides nothing: the `otherwise` edge of 'r' "
        "leads to 'out' too, so an item goes there whether the condition holds or not", 11,
        (("the `otherwise` edge is here", SourcePos("t.agp", 10, 5, 10, 13)),))
    assert d.hint == "send one of them to another stage, or write `r -> out` once without a condition"
    before = ROUTED.replace("    r -> out\n", '    r -> r2 when finish_reason == "stop"\n    r -> out otherwise\n')
    (d,) = pipeline_dsl.loads(before, "t.agp")[1]
    assert d.message.startswith('edge r -> out when finish_reason == "length" decides nothing')
    after = ROUTED.replace("    r -> out\n", "    r -> out otherwise\n") + ""
    after = after.replace("    r2 -> out\n", '    r -> r2 when finish_reason == "stop"\n    r2 -> out\n')
    assert pipeline_dsl.loads(after, "t.agp")[1] == []


def test_a_condition_beside_an_otherwise_edge_is_told_to_go_where_another_condition_leads_elsewhere():
    """Where the stage has a conditional edge to another stage too (`r -> r2 when D` first), the hint
    said to write `r -> out` once without a condition: beside `r -> r2 when D` that edge takes a copy
    of every item, a D one too (a fan-out, two answers). The hint says to remove the conditional edge
    there, which leaves the routing as it runs; the unconditional form only where no condition leads
    elsewhere (above)."""
    before = ROUTED.replace("    r -> out\n", '    r -> r2 when finish_reason == "stop"\n    r -> out otherwise\n')
    (d,) = pipeline_dsl.loads(before, "t.agp")[1]
    assert d.message.startswith('edge r -> out when finish_reason == "length" decides nothing')
    assert d.hint == ("remove `r -> out when finish_reason == \"length\"` (the `otherwise` edge takes those items to "
                      "'out'), or send it to another stage; not `r -> out` without a condition: beside the "
                      "conditional edge to 'r2' it would take a copy of every item (a fan-out)")
    assert pipeline_dsl.loads(before.replace('    r -> out when finish_reason == "length"\n', ""), "t.agp")[1] == []


def test_a_retired_respond_parameter_and_a_missing_required_one():
    assert render(pipeline().replace("stage out     : respond       {}", "stage out     : respond       { stream = true }").replace("request -> batch", "request -> sys -> batch").replace("stage batch", 'stage sys : system_prompt {}\n    stage batch')) == """\
t.agp:5:11: error: missing parameter 'text' in stage 'sys' (system_prompt)
    5 |     stage sys : system_prompt {}
      |           ^^^
  = expected: text = a string in double quotes ("…")
  = help: the system message put first in each chat request

t.agp:10:37: error: unknown parameter 'stream' for stage kind 'respond'
   10 |     stage out     : respond       { stream = true }
      |                                     ^^^^^^
  = expected: a parameter of respond: (none)
  = help: remove it: each request chooses streaming itself ("stream": true in agp serve)

2 errors
"""


def test_durations_wrong_unit_missing_unit_and_words():
    assert render(pipeline(batch="timeout = 5MiB  max_tokens_per_step = 8.0", gen="temperature = hot  top_k = 2.5")) == """\
t.agp:5:47: error: wrong unit: 'timeout' is a duration, but '5MiB' is a size
    5 |     stage batch   : dynamic_batch { timeout = 5MiB  max_tokens_per_step = 8.0 }
      |                                               ^^^^
  = expected: a duration with a unit (us, ms, s) from 0s to 60s, e.g. 1ms

t.agp:5:75: error: 'max_tokens_per_step' is an integer, not the decimal '8.0'
    5 |     stage batch   : dynamic_batch { timeout = 5MiB  max_tokens_per_step = 8.0 }
      |                                                                           ^^^
  = expected: an integer from 1 to 1048576
  = help: write 8

t.agp:8:51: error: 'temperature' is a number, not the word 'hot'
    8 |     stage gen     : generate      { temperature = hot  top_k = 2.5 }
      |                                                   ^^^
  = expected: a number from 0 to 2

t.agp:8:64: error: 'top_k' is an integer, not the number '2.5'
    8 |     stage gen     : generate      { temperature = hot  top_k = 2.5 }
      |                                                                ^^^
  = expected: an integer from -1 to 1048576

4 errors
"""


def test_duration_bounds_and_an_unknown_unit():
    assert render(pipeline(batch="timeout = 61s", kv="budget = 3mz")) == """\
t.agp:5:47: error: value out of range: 'timeout' = 61s
    5 |     stage batch   : dynamic_batch { timeout = 61s }
      |                                               ^^^
  = expected: a duration with a unit (us, ms, s) from 0s to 60s, e.g. 1ms
  = help: the largest allowed value is 60s

t.agp:7:46: error: unknown unit 'mz' in '3mz'
    7 |     stage kv      : kv_lookup     { budget = 3mz }
      |                                              ^^^
  = expected: a size with a unit (B, KiB, MiB, GiB) from 64KiB to 1024GiB, e.g. 256MiB

2 errors
"""


def test_a_duration_without_a_unit():
    assert render(pipeline(batch="timeout = 5")) == """\
t.agp:5:47: error: missing unit: 'timeout' is a duration; '5' has no unit
    5 |     stage batch   : dynamic_batch { timeout = 5 }
      |                                               ^
  = expected: a duration with a unit (us, ms, s) from 0s to 60s, e.g. 1ms
  = help: write it with its unit: 5s or 5ms (agp does not assume one)

1 error
"""


def test_a_bare_number_for_a_duration_names_the_units_it_could_mean_within_range():
    # a python stage's timeout written in seconds as a bare number is not steered to ms (which
    # would time every call out): both readings are offered; a unit whose reading is out of the
    # parameter's range is not
    out = render(pipeline(batch="timeout = 0.5"))
    assert "help: write it with its unit: 0.5s or 0.5ms (agp does not assume one)" in out
    out = render(pipeline(batch="timeout = 100000"))     # dynamic_batch's timeout is at most 60s
    assert "help: write it with its unit: 100000us\n" in out


def test_a_size_without_a_unit_and_max_new_tokens_of_zero():
    assert render(pipeline(kv="budget = 64", gen="max_new_tokens = 0")) == """\
t.agp:7:46: error: missing unit: 'budget' is a size; '64' has no unit
    7 |     stage kv      : kv_lookup     { budget = 64 }
      |                                              ^^
  = expected: a size with a unit (B, KiB, MiB, GiB) from 64KiB to 1024GiB, e.g. 256MiB
  = help: write it with its unit: 64MiB or 64GiB (agp does not assume one)

t.agp:8:54: error: value out of range: 'max_new_tokens' = 0
    8 |     stage gen     : generate      { max_new_tokens = 0 }
      |                                                      ^
  = expected: an integer from 1 to 1048576
  = help: the smallest allowed value is 1

2 errors
"""


def test_a_size_given_a_word_and_block_size_past_its_top():
    assert render(pipeline(kv="budget = big  block_size = 1025")) == """\
t.agp:7:46: error: 'budget' is a size, not the word 'big'
    7 |     stage kv      : kv_lookup     { budget = big  block_size = 1025 }
      |                                              ^^^
  = expected: a size with a unit (B, KiB, MiB, GiB) from 64KiB to 1024GiB, e.g. 256MiB

t.agp:7:64: error: value out of range: 'block_size' = 1025
    7 |     stage kv      : kv_lookup     { budget = big  block_size = 1025 }
      |                                                                ^^^^
  = expected: an integer from 1 to 1024
  = help: the largest allowed value is 1024

2 errors
"""


def test_booleans_written_as_words_or_numbers_get_a_hint():
    assert render(pipeline(batch="padding = yes", gen="ignore_eos = 0")) == """\
t.agp:5:47: error: 'padding' is true or false, not the word 'yes'
    5 |     stage batch   : dynamic_batch { padding = yes }
      |                                               ^^^
  = expected: true or false
  = help: write true

t.agp:8:50: error: 'ignore_eos' is true or false, not the integer '0'
    8 |     stage gen     : generate      { ignore_eos = 0 }
      |                                                  ^
  = expected: true or false
  = help: write false

2 errors
"""


def test_boolean_off_as_a_string_and_two_as_a_number_without_a_hint():
    assert render(pipeline(batch='padding = "Off"', gen="ignore_eos = 2")) == """\
t.agp:5:47: error: 'padding' is true or false, not the string "Off"
    5 |     stage batch   : dynamic_batch { padding = "Off" }
      |                                               ^^^^^
  = expected: true or false
  = help: write false

t.agp:8:50: error: 'ignore_eos' is true or false, not the integer '2'
    8 |     stage gen     : generate      { ignore_eos = 2 }
      |                                                  ^
  = expected: true or false

2 errors
"""


def test_boolean_true_as_a_string_and_one_as_a_number():
    assert render(pipeline(batch='padding = "TRUE"', gen="ignore_eos = 1")) == """\
t.agp:5:47: error: 'padding' is true or false, not the string "TRUE"
    5 |     stage batch   : dynamic_batch { padding = "TRUE" }
      |                                               ^^^^^^
  = expected: true or false
  = help: write true

t.agp:8:50: error: 'ignore_eos' is true or false, not the integer '1'
    8 |     stage gen     : generate      { ignore_eos = 1 }
      |                                                  ^
  = expected: true or false
  = help: write true

2 errors
"""


def test_boolean_no_is_an_error_and_false_is_accepted():
    assert render(pipeline(batch='padding = no', gen="ignore_eos = false")) == """\
t.agp:5:47: error: 'padding' is true or false, not the word 'no'
    5 |     stage batch   : dynamic_batch { padding = no }
      |                                               ^^
  = expected: true or false
  = help: write false

1 error
"""


def test_strings_given_a_word_or_a_number():
    assert render(pipeline(gen="model = tiny  json_schema = 3")) == """\
t.agp:8:45: error: 'model' is a string, not the word 'tiny'
    8 |     stage gen     : generate      { model = tiny  json_schema = 3 }
      |                                             ^^^^
  = expected: a string in double quotes ("…")
  = help: quote it: "tiny"

t.agp:8:65: error: 'json_schema' is a string, not the integer '3'
    8 |     stage gen     : generate      { model = tiny  json_schema = 3 }
      |                                                                 ^
  = expected: a string in double quotes ("…")

2 errors
"""


def test_enums_given_a_number_or_a_close_word():
    assert render(pipeline(batch="policy = 3", kv="reuse = prefx")) == """\
t.agp:5:46: error: 'policy' is one of continuous | static, not the integer '3'
    5 |     stage batch   : dynamic_batch { policy = 3 }
      |                                              ^
  = expected: one of continuous | static

t.agp:7:45: error: 'prefx' is not a valid value for 'reuse'
    7 |     stage kv      : kv_lookup     { reuse = prefx }
      |                                             ^^^^^
  = expected: one of prefix | none
  = help: did you mean 'prefix'?

2 errors
"""


def test_a_string_list_holding_a_number():
    assert render(pipeline(gen='stop = ["a", 3]')) == """\
t.agp:8:50: error: 'stop' is a list of strings, but it holds the integer '3'
    8 |     stage gen     : generate      { stop = ["a", 3] }
      |                                                  ^
  = expected: a list of strings, e.g. ["\\n\\n", "END"]

1 error
"""


def test_a_string_list_with_an_empty_string():
    assert render(pipeline(gen='stop = ["a", ""]')) == """\
t.agp:8:50: error: an empty string in 'stop'
    8 |     stage gen     : generate      { stop = ["a", ""] }
      |                                                  ^^
  = expected: a list of strings, e.g. ["\\n\\n", "END"]
  = help: remove it

1 error
"""


def test_bad_words_of_whitespace_alone_are_a_check_error():
    # vLLM's bad_words strips a word's leading whitespace: one of whitespace alone bans nothing
    assert render(pipeline(gen='bad_words = ["red", "  "]')) == """\
t.agp:8:57: error: a string of whitespace alone in 'bad_words'
    8 |     stage gen     : generate      { bad_words = ["red", "  "] }
      |                                                         ^^^^
  = expected: a list of strings, e.g. ["END", "Observation:"]
  = help: remove it

1 error
"""
    assert render(pipeline(gen='stop = ["  "]')) == ""     # a stop string of spaces is a stop string


def test_a_string_list_given_a_word():
    assert render(pipeline(gen='stop = end')) == """\
t.agp:8:44: error: 'stop' is a list of strings, not the word 'end'
    8 |     stage gen     : generate      { stop = end }
      |                                            ^^^
  = expected: a list of strings, e.g. ["\\n\\n", "END"]

1 error
"""


def test_a_string_list_is_bounded_by_items_and_by_characters_in_all():
    def first_line(items: list[str]) -> str:
        return render(pipeline(gen="stop = [" + ", ".join(f'"{x}"' for x in items) + "]")).splitlines()[0]

    assert first_line([f"s{i}" for i in range(1025)]) == \
        "t.agp:8:44: error: 'stop' holds 1025 strings; at most 1024 are allowed"
    assert first_line(["x" * 256] * 17) == "t.agp:8:44: error: 'stop' holds 4352 characters in all; at most 4096 are allowed"
    assert "error" not in render(pipeline(gen="stop = [" + ", ".join(f'"s{i}"' for i in range(64)) + "]"))


def test_a_string_of_257_characters_in_a_string_list():
    assert render(pipeline(gen='stop = ["' + "x" * 257 + '"]')) == """\
t.agp:8:45: error: a string of 257 characters in 'stop'; each may have at most 256
    8 | …stage gen     : generate      { stop = ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…
      |                                          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = expected: a list of strings, e.g. ["\\n\\n", "END"]

1 error
"""


def test_exclusive_lower_bounds_and_top_bounds_of_floats():
    assert render(pipeline(gen="top_p = 0.0  repetition_penalty = 0  temperature = 2.5  min_p = -0.5")) == """\
t.agp:8:45: error: value out of range: 'top_p' = 0.0
    8 |     stage gen     : generate      { top_p = 0.0  repetition_penalty = 0  temperature = 2.5  min_p = -0.5 }
      |                                             ^^^
  = expected: a number above 0 up to 1
  = help: the value must be above 0

t.agp:8:71: error: value out of range: 'repetition_penalty' = 0
    8 |     stage gen     : generate      { top_p = 0.0  repetition_penalty = 0  temperature = 2.5  min_p = -0.5 }
      |                                                                       ^
  = expected: a number above 0 up to 2
  = help: the value must be above 0

t.agp:8:88: error: value out of range: 'temperature' = 2.5
    8 |     stage gen     : generate      { top_p = 0.0  repetition_penalty = 0  temperature = 2.5  min_p = -0.5 }
      |                                                                                        ^^^
  = expected: a number from 0 to 2
  = help: the largest allowed value is 2

t.agp:8:101: error: value out of range: 'min_p' = -0.5
    8 |     stage gen     : generate      { top_p = 0.0  repetition_penalty = 0  temperature = 2.5  min_p = -0.5 }
      |                                                                                                     ^^^^
  = expected: a number from 0 to 1
  = help: the smallest allowed value is 0

4 errors
"""


def test_integers_one_past_each_bound():
    assert render(pipeline(gen="top_k = -2  n = 65  max_new_tokens = 1048577")) == """\
t.agp:8:45: error: value out of range: 'top_k' = -2
    8 |     stage gen     : generate      { top_k = -2  n = 65  max_new_tokens = 1048577 }
      |                                             ^^
  = expected: an integer from -1 to 1048576
  = help: the smallest allowed value is -1

t.agp:8:53: error: value out of range: 'n' = 65
    8 |     stage gen     : generate      { top_k = -2  n = 65  max_new_tokens = 1048577 }
      |                                                     ^^
  = expected: an integer from 1 to 64
  = help: the largest allowed value is 64

t.agp:8:74: error: value out of range: 'max_new_tokens' = 1048577
    8 |     stage gen     : generate      { top_k = -2  n = 65  max_new_tokens = 1048577 }
      |                                                                          ^^^^^^^
  = expected: an integer from 1 to 1048576
  = help: the largest allowed value is 1048576

3 errors
"""


def test_values_at_each_bound_are_accepted_and_normalised():
    low = resolved(pipeline(settings="threads = 1\n    kv_budget = 64KiB", batch="timeout = 0  max_batch_size = 1",
                            kv="block_size = 1  budget = 64KiB",
                            gen='top_p = 0.001  repetition_penalty = 0.001  temperature = 0  min_p = 0  top_k = -1  '
                                'n = 1  max_new_tokens = 1  stop = "x"  ignore_eos = false'))
    assert (low.settings["threads"], low.settings["kv_budget"]) == (1, 1 << 16)
    assert low.stages["batch"].params["timeout"] == 0.0 and isinstance(low.stages["batch"].params["timeout"], float)
    assert low.stages["kv"].params["budget"] == 1 << 16 and low.stages["kv"].params["block_size"] == 1
    g = low.stages["gen"].params
    assert (g["top_p"], g["repetition_penalty"], g["temperature"], g["min_p"], g["top_k"], g["n"],
            g["max_new_tokens"], g["stop"], g["ignore_eos"]) == (0.001, 0.001, 0.0, 0.0, -1, 1, 1, ["x"], False)
    assert isinstance(g["temperature"], float)
    high = resolved(pipeline(settings="threads = 1024\n    kv_budget = 1024GiB", batch="timeout = 60s  padding = true",
                             kv="block_size = 1024  budget = 1GiB",
                             gen='top_p = 1  repetition_penalty = 2  temperature = 2  min_p = 1  top_k = 1048576  '
                                 'n = 64  max_new_tokens = 1048576  stop = [' + ", ".join(f'"{i}"' for i in range(15))
                                 + ', "' + "y" * 256 + '"]'))
    assert (high.settings["threads"], high.settings["kv_budget"]) == (1024, 1 << 40)
    assert high.stages["batch"].params["timeout"] == 60.0 and high.stages["batch"].params["padding"] is True
    g = high.stages["gen"].params
    assert (g["top_p"], g["repetition_penalty"], g["temperature"], g["min_p"], g["top_k"], g["n"],
            g["max_new_tokens"]) == (1.0, 2.0, 2.0, 1.0, 1 << 20, 64, 1 << 20)
    assert g["stop"] == [str(i) for i in range(15)] + ["y" * 256]
    zero = resolved(pipeline(batch="timeout = 0.0", kv="budget = 1GiB"))
    assert zero.stages["batch"].params["timeout"] == 0.0


def test_a_size_of_zero_without_a_unit_is_zero_bytes_then_out_of_range():
    out = render(pipeline(kv="budget = 0"))
    assert out.startswith("t.agp:7:46: error: value out of range: 'budget' = 0\n")
    assert "  = help: the smallest allowed value is 64KiB\n" in out


def test_settings_are_resolved_and_inherited_by_generate():
    r = resolved(pipeline(settings='device = "cpu"\n    dtype = bf16\n    mode = performance'))
    assert (r.settings["device"], r.settings["dtype"], r.settings["mode"]) == ("cpu", "bf16", "performance")
    assert r.given_settings == frozenset({"model", "device", "dtype", "mode"})
    g = r.stages["gen"].params
    assert (g["device"], g["dtype"], g["model"]) == ("cpu", "bf16", EMBEDDED)
    assert r.stages["gen"].given == frozenset()
    r = resolved(pipeline(settings="device = cuda:0", gen='dtype = fp16  device = "cpu"'))
    assert r.settings["device"] == "cuda:0" and r.settings["threads"] is None
    assert (r.stages["gen"].params["dtype"], r.stages["gen"].params["device"]) == ("fp16", "cpu")
    assert r.stages["gen"].given == frozenset({"dtype", "device"})


def test_an_embedded_model_name_in_any_case_with_spaces_is_kept_as_written():
    r = resolved(pipeline(model=" SmolLM2-135M-Instruct "))
    assert r.settings["model"] == " SmolLM2-135M-Instruct "


def test_only_numbers_are_range_checked_not_booleans_or_third_party_values():
    flag = Param("flag", reg_mod.BOOL, min=2, max=3)         # bounds on a non-number are never applied
    assert convert(ast.Bool(True, AT), flag, "'flag'") == (True, None)
    colour = Param("colour", "colour", min=1, max=2)
    assert convert(ast.Word("red", AT), colour, "'colour'") == ("red", None)
    assert convert(ast.List((ast.Str("a", AT),), AT), colour, "'colour'") == (["a"], None)


# ---------------------------------------------------------------- where a model is looked for

def test_a_model_that_is_a_file_but_not_a_gguf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.bin").write_text("x")
    assert render(pipeline(model="m.bin")) == _model_line("t.agp", "m.bin", "model not found: 'm.bin' is not a .gguf file",
                                                          MODEL_EXPECTED)


def test_a_model_folder_without_config_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nocfg").mkdir()
    assert render(pipeline(model="nocfg")) == _model_line(
        "t.agp", "nocfg", "model not found: the folder 'nocfg' has no config.json", MODEL_EXPECTED)


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_or_blank_model_is_not_found_not_the_folder_itself(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    assert render(pipeline(model=model)) == _model_line("t.agp", model, f"model not found: '{model}'", MODEL_EXPECTED)


def test_a_model_name_close_to_the_embedded_one_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert render(pipeline(model="smollm2-135m-instruc")) == _model_line(
        "t.agp", "smollm2-135m-instruc", "model not found: 'smollm2-135m-instruc'", MODEL_EXPECTED,
        "did you mean 'smollm2-135m-instruct'?")


@pytest.mark.parametrize("model, hint", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct",
     'a Hugging Face hub id; this model is the embedded one: model = "smollm2-135m-instruct"'),
    ("Qwen/Qwen2.5-0.5B-Instruct", "a Hugging Face hub id? agp downloads nothing: download it (huggingface-cli "
                                   "download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR) and name that folder, or a "
                                   ".gguf file"),
    ("models/x.gguf", None), ("./x", None),
])
def test_a_hugging_face_hub_id_says_agp_downloads_nothing_and_what_to_write(tmp_path, monkeypatch, model, hint):
    """A vLLM user names a model by its hub id; agp reads only local files: the error says so, and
    the embedded model's own id gets its name (it was a bare 'model not found')."""
    monkeypatch.chdir(tmp_path)
    assert render(pipeline(model=model)) == _model_line("t.agp", model, f"model not found: '{model}'",
                                                        MODEL_EXPECTED, hint)


def test_a_gguf_suffix_in_capitals_is_a_gguf_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "M.GGUF").write_bytes(b"")
    assert render(pipeline(model="M.GGUF")) == _model_line(
        "t.agp", "M.GGUF", "bad model file 'M.GGUF': the file is empty", BAD_MODEL_EXPECTED)


def test_the_first_reason_a_model_is_not_found_is_the_one_beside_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m").mkdir()                 # beside the .agp file: a folder without config.json
    (tmp_path / "m").write_text("x")                 # in the working directory: a file that is not a .gguf
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "sub" / "p.agp"
    f.write_text(pipeline(model="m"))
    assert render_file(f) == _model_line(f, "m", "model not found: the folder 'm' has no config.json", MODEL_EXPECTED)
    os.rmdir(tmp_path / "sub" / "m")
    assert render_file(f) == _model_line(f, "m", "model not found: 'm' is not a .gguf file", MODEL_EXPECTED)


def test_a_model_found_beside_the_file_or_from_home_is_made_absolute(tmp_path, monkeypatch, tiny_gguf):
    import shutil

    (tmp_path / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tiny_gguf, tmp_path / "sub" / "m.gguf")
    monkeypatch.chdir(tmp_path / "elsewhere")
    f = tmp_path / "sub" / "p.agp"
    f.write_text(pipeline(model="m.gguf", gen='model = "m.gguf"'))
    program, diags = pipeline_dsl.load(str(f))
    assert diags == []
    r = check_pipeline(program.pipelines[0])[0]
    assert r.settings["model"] == r.stages["gen"].params["model"] == str(tmp_path / "sub" / "m.gguf")
    monkeypatch.setenv("HOME", str(tmp_path / "sub"))
    r = resolved(pipeline(model="~/m.gguf"), "<stdin>")
    assert r.settings["model"] == str(tmp_path / "sub" / "m.gguf")


def test_a_stage_model_and_device_are_checked_at_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert render(pipeline(gen='model = "nope.gguf"  device = "gpu"')) == """\
t.agp:8:45: error: model not found: 'nope.gguf'
    8 |     stage gen     : generate      { model = "nope.gguf"  device = "gpu" }
      |                                             ^^^^^^^^^^^
  = expected: "smollm2-135m-instruct" (the embedded model), a .gguf file or a Hugging Face folder (a relative path is looked up beside this file, then in the working directory)

t.agp:8:67: error: 'gpu' is not a device
    8 |     stage gen     : generate      { model = "nope.gguf"  device = "gpu" }
      |                                                                   ^^^^^
  = expected: auto | cpu | cuda | cuda:N
  = help: did you mean 'cuda'?

2 errors
"""
def test_edges_to_undefined_stages_named_like_a_stage_or_a_kind():
    assert render(pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> generate -> out\n    kv -> gne -> respond\n    kv -> zzz")) == """\
t.agp:13:21: error: edge to undefined stage 'generate'
   13 |     encode -> kv -> generate -> out
      |                     ^^^^^^^^
  = expected: a stage of pipeline 'p': batch, encode, gen, kv, out, request
  = help: did you mean 'gen' (the generate stage)?

t.agp:14:11: error: edge to undefined stage 'gne'
   14 |     kv -> gne -> respond
      |           ^^^
  = expected: a stage of pipeline 'p': batch, encode, gen, kv, out, request
  = help: did you mean 'gen'?

t.agp:14:18: error: edge to undefined stage 'respond'
   14 |     kv -> gne -> respond
      |                  ^^^^^^^
  = expected: a stage of pipeline 'p': batch, encode, gen, kv, out, request
  = help: did you mean 'out' (the respond stage)?

t.agp:15:11: error: edge to undefined stage 'zzz'
   15 |     kv -> zzz
      |           ^^^
  = expected: a stage of pipeline 'p': batch, encode, gen, kv, out, request

4 errors
"""


def test_duplicate_unconditional_edge_and_duplicate_stage():
    assert render(pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> out\n    gen -> out").replace("stage out", "stage kv : kv_lookup {}\n    stage out")) == """\
t.agp:9:11: error: duplicate stage 'kv'
    9 |     stage kv : kv_lookup {}
      |           ^^
  = note: first defined here (t.agp:7:11)
  = help: give each stage its own name

t.agp:15:5: warning: duplicate edge gen -> out
   15 |     gen -> out
      |     ^^^^^^^^^^
  = note: first declared here (t.agp:14:21)

1 error, 1 warning
"""


def test_the_encode_stage_can_neither_route_by_request_fields_nor_by_labels():
    assert render(pipeline().replace("encode -> kv -> gen -> out", "encode -> kv when prompt_tokens > 3\n    encode -> kv when done\n    kv -> gen -> out")) == """\
t.agp:13:23: error: the encode stage 'encode' cannot route by request fields
   13 |     encode -> kv when prompt_tokens > 3
      |                       ^^^^^^^^^^^^^^^^^
  = expected: an edge without a condition
  = help: route requests before the batcher: add a route stage in front of it

t.agp:14:23: error: stage 'encode' (encode) gives its items no label 'done'
   14 |     encode -> kv when done
      |                       ^^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage

2 errors
"""


def test_generated_fields_need_a_comparison_with_a_hint_by_their_type():
    assert render(pipeline().replace("gen -> out", "gen -> out when completion_tokens\n    gen -> out when finish_reason\n    gen -> out otherwise")) == """\
t.agp:13:37: error: field 'completion_tokens' needs a comparison
   13 |     encode -> kv -> gen -> out when completion_tokens
      |                                     ^^^^^^^^^^^^^^^^^
  = expected: completion_tokens == VALUE, completion_tokens > N, ...
  = help: e.g. when completion_tokens > 512

t.agp:14:21: error: field 'finish_reason' needs a comparison
   14 |     gen -> out when finish_reason
      |                     ^^^^^^^^^^^^^
  = expected: finish_reason == VALUE, finish_reason > N, ...
  = help: e.g. when finish_reason == "…"

2 errors
"""


def test_unknown_placements_with_and_without_a_close_one():
    assert render(pipeline().replace("stage gen     : generate", "stage gen     : generate on gpu").replace("stage kv      : kv_lookup", "stage kv      : kv_lookup on hots")) == """\
t.agp:7:34: error: unknown placement 'hots'
    7 |     stage kv      : kv_lookup on hots     {  }
      |                                  ^^^^
  = expected: on host | copy | compute
  = help: did you mean 'host'?

t.agp:8:33: error: unknown placement 'gpu'
    8 |     stage gen     : generate on gpu      {  }
      |                                 ^^^
  = expected: on host | copy | compute

2 errors
"""


MYMOD = '''def merge(results):
    return results[0]


def label(item):
    return "x"
'''


def test_join_policy_and_fn_that_do_not_go_together_and_a_misspelt_function(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymod.py").write_text(MYMOD)
    text = pipeline().replace("gen -> out", "gen -> j1 -> out\n    gen -> j2 -> out\n    gen -> j3 -> out").replace(
        "stage out", 'stage j1 : join { policy = majority  fn = "mymod:merge" }\n    stage j2 : join { policy = fn }\n'
                     '    stage j3 : join { fn = "mymod:merj" }\n    stage out')
    assert render(text) == f"""\
t.agp:9:47: error: join 'j1' sets fn but policy = majority
    9 |     stage j1 : join {{ policy = majority  fn = "mymod:merge" }}
      |                                               ^^^^^^^^^^^^^
  = help: write policy = fn, or remove fn

t.agp:10:32: error: join 'j2' has policy = fn but no fn
   10 |     stage j2 : join {{ policy = fn }}
      |                                ^^
  = expected: fn = "module:function"

t.agp:11:28: error: module 'mymod' ({tmp_path}/mymod.py) has no function 'merj' (stage 'j3')
   11 |     stage j3 : join {{ fn = "mymod:merj" }}
      |                            ^^^^^^^^^^^^
  = expected: "module:function": a module beside this file or on sys.path and a function in it
  = help: did you mean 'merge'?

3 errors
"""


def test_a_python_stage_with_a_misspelt_function_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymod.py").write_text(MYMOD)
    text = pipeline().replace("gen -> out", "gen -> py -> out").replace(
        "stage out", 'stage py : python { fn = "mymod:lable" }\n    stage out')
    assert render(text) == f"""\
t.agp:9:30: error: module 'mymod' ({tmp_path}/mymod.py) has no function 'lable' (stage 'py')
    9 |     stage py : python {{ fn = "mymod:lable" }}
      |                              ^^^^^^^^^^^^^
  = expected: "module:function": a module beside this file or on sys.path and a function in it
  = help: did you mean 'label'?

1 error
"""


JOIN_POLICY = {"workers": 16, "timeout": 0.0, "retries": 0, "backoff": 0.5}   # how fn runs: its defaults


def test_a_join_with_fn_alone_gets_policy_fn_and_good_functions_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymod.py").write_text(MYMOD)
    text = pipeline().replace("gen -> out", "gen -> j1 -> j2 -> py -> out").replace(
        "stage out", 'stage j1 : join { fn = "mymod:merge" }\n    stage j2 : join { policy = fn  fn = "mymod:merge" }\n'
                     '    stage py : python { fn = "mymod:label" }\n    stage out')
    r = resolved(text)
    assert r.stages["j1"].params == {"fn": "mymod:merge", "policy": "fn", "on_reject": "fail", "args": None,
                                     **JOIN_POLICY}
    assert r.stages["j1"].given == frozenset({"fn"})
    assert r.stages["j2"].params == {"fn": "mymod:merge", "policy": "fn", "on_reject": "fail", "args": None,
                                     **JOIN_POLICY}
    assert r.stages["py"].params == {"fn": "mymod:label", "args": None, "max_turns": None, "returns": "same", "max_items": 64,
                                     "workers": 16, "timeout": 0.0, "retries": 0, "backoff": 0.5, "cache": 0,
                                     "cache_ttl": 0.0, "stream": False}
    assert r.stages["j1"].param_pos["fn"] == SourcePos("t.agp", 9, 28, 9, 41)


def test_a_stage_parameter_close_to_a_setting_as_a_setting_gets_the_close_setting_as_hint():
    assert render(pipeline(settings="budget = 64MiB")) == """\
t.agp:3:5: error: unknown setting 'budget'
    3 |     budget = 64MiB
      |     ^^^^^^
  = expected: a pipeline setting: device, dtype, kv_budget, mode, model, threads
  = help: did you mean 'kv_budget'?

1 error
"""


# ---------------------------------------------------------------- conditions on edges, whole output

def test_duplicate_conditional_and_otherwise_edges_name_their_condition():
    text = pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> out\n    batch -> encode when full\n"
                                                            "    gen -> out otherwise\n    gen -> out otherwise")
    assert render(text) == """\
t.agp:14:5: warning: duplicate edge batch -> encode when full
   14 |     batch -> encode when full
      |     ^^^^^^^^^^^^^^^
  = note: first declared here (t.agp:11:5)

t.agp:15:5: warning: `otherwise` on gen -> out: 'gen' has no conditional edge, so it always holds
   15 |     gen -> out otherwise
      |     ^^^^^^^^^^
  = help: write the edge without a condition

t.agp:16:5: warning: duplicate edge gen -> out otherwise
   16 |     gen -> out otherwise
      |     ^^^^^^^^^^
  = note: first declared here (t.agp:15:5)

3 warnings
"""


def test_labels_a_stage_does_not_give_fields_without_comparison_and_the_batcher_routing_by_fields():
    text = pipeline().replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> out when txt\n"
                                                            "    batch -> encode when prompt_tokens > 5\n"
                                                            "    kv -> gen when metadata").replace(
        "batch -> encode when full", "batch -> encode when full or fulll")
    assert render(text) == """\
t.agp:11:34: error: unknown condition 'fulll' on an edge from 'batch'
   11 |     batch -> encode when full or fulll
      |                                  ^^^^^
  = expected: when full | timeout (the labels of dynamic_batch), or a comparison of a request field
  = help: did you mean 'full'?

t.agp:13:37: error: stage 'encode' (encode) gives its items no label 'txt'
   13 |     encode -> kv -> gen -> out when txt
      |                                     ^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage
  = help: did you mean 'text'?

t.agp:13:37: error: stage 'gen' (generate) gives its items no label 'txt'
   13 |     encode -> kv -> gen -> out when txt
      |                                     ^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage
  = help: did you mean 'text'?

t.agp:13:37: error: stage 'kv' (kv_lookup) gives its items no label 'txt'
   13 |     encode -> kv -> gen -> out when txt
      |                                     ^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage
  = help: did you mean 'text'?

t.agp:14:26: error: the batcher 'batch' cannot route by request fields
   14 |     batch -> encode when prompt_tokens > 5
      |                          ^^^^^^^^^^^^^^^^^
  = expected: when full | timeout
  = help: route requests before the batcher: add a route stage in front of it

t.agp:15:20: error: field 'metadata' needs a key and a comparison
   15 |     kv -> gen when metadata
      |                    ^^^^^^^^
  = expected: metadata.KEY == VALUE, ...
  = help: e.g. when metadata.tier == "gold"

6 errors
"""


def test_a_conditional_edge_from_a_stage_of_unknown_kind_is_not_checked_for_labels():
    text = pipeline().replace(": generate", ": genrate").replace("gen -> out", "gen -> out when long")
    assert render(text) == """\
t.agp:8:21: error: unknown stage kind 'genrate'
    8 |     stage gen     : genrate      {  }
      |                     ^^^^^^^
  = expected: a stage kind: dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt
  = help: did you mean 'generate'?

t.agp:13:37: error: stage 'encode' (encode) gives its items no label 'long'
   13 |     encode -> kv -> gen -> out when long
      |                                     ^^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage

t.agp:13:37: error: stage 'kv' (kv_lookup) gives its items no label 'long'
   13 |     encode -> kv -> gen -> out when long
      |                                     ^^^^
  = expected: a comparison of a field (prompt_tokens > 512, metadata.KEY == "…") or `otherwise`; labels come from a batcher (full, timeout) or a python stage

3 errors
"""


def test_a_route_may_compare_request_fields_but_a_bare_request_field_needs_a_comparison():
    text = pipeline().replace("request -> batch", "request -> route\n    route -> batch when prompt_tokens\n"
                                                  "    route -> batch when metadata.user == \"a\"\n"
                                                  "    route -> batch otherwise").replace(
        "stage batch", "stage route : route {}\n    stage batch")
    assert render(text) == """\
t.agp:12:25: error: field 'prompt_tokens' needs a comparison
   12 |     route -> batch when prompt_tokens
      |                         ^^^^^^^^^^^^^
  = expected: prompt_tokens == VALUE, prompt_tokens > N, ...
  = help: e.g. when prompt_tokens > 512

1 error
"""


# ---------------------------------------------------------------- what check_pipeline resolves

def _checked(text: str, registry=None):
    program, diags = pipeline_dsl.loads(text, "t.agp")
    return check_pipeline(program.pipelines[0], registry)


def test_edges_past_an_undefined_stage_or_a_duplicate_edge_in_a_chain_are_kept():
    text = pipeline().replace("encode -> kv -> gen -> out", "encode -> kv\n    encode -> kv -> gen -> zzz -> gen -> out")
    r, diags = _checked(text)
    assert [(e.src, e.dst) for e in r.edges] == [("request", "batch"), ("batch", "encode"), ("batch", "encode"),
                                               ("encode", "kv"), ("kv", "gen"), ("gen", "out")]
    assert r.complete is False                       # an edge was dropped
    assert [d.message for d in diags] == ["edge to undefined stage 'zzz'", "duplicate edge encode -> kv"]
    assert r.edges[1].cond is not None and r.edges[1].cond.name.text == "full"
    assert r.edges[1].condition != r.edges[2].condition
    assert r.edges[0].cond is None and r.edges[0].condition is None


def test_the_resolved_pipeline_has_its_name_position_setting_positions_and_placements():
    text = pipeline(settings="mode = efficient").replace("stage gen     : generate", "stage gen     : generate on compute")
    r, diags = _checked(text)
    assert diags == [] and r.complete is True
    assert (r.name, r.pos) == ("p", SourcePos("t.agp", 1, 10, 1, 11))
    assert r.setting_pos == {"model": SourcePos("t.agp", 2, 13, 2, 36), "mode": SourcePos("t.agp", 3, 12, 3, 21)}
    assert r.stages["gen"].placement == "compute" and r.stages["kv"].placement is None
    # the mode's presets, where the file says nothing
    assert r.settings["mode"] == "efficient"
    assert r.stages["batch"].params["max_batch_size"] == 8 and r.stages["kv"].params["budget"] == 64 << 20
    assert r.stages["gen"].params["dtype"] == "int8" and r.stages["gen"].params["compile"] is False
    r, _ = _checked(pipeline(settings="mode = performance"))
    assert r.stages["batch"].params["max_batch_size"] == 64 and r.stages["gen"].params["compile"] is True


def test_one_string_where_a_list_of_strings_goes_is_a_list_of_one():
    """docs/language.md, Values: `stop = "."` is `stop = ["."]`, as a request's `stop` string is."""
    r, diags = _checked(pipeline(gen='stop = "."  bad_words = "never"'))
    assert [d for d in diags if d.is_error] == []
    g = r.stages["gen"].params
    assert g["stop"] == ["."] and g["bad_words"] == ["never"]


def test_defaults_of_generate_without_settings_tuple_defaults_become_lists():
    r, diags = _checked(pipeline())
    g = r.stages["gen"].params
    assert g["stop"] == [] and type(g["stop"]) is list
    assert g["device"] is None and g["json_schema"] is None and g["seed"] is None
    assert g["model"] == EMBEDDED                    # inherited: the file sets model
    assert r.settings["device"] == "auto" and r.settings["threads"] is None and r.settings["kv_budget"] is None


def test_resolve_params_without_settings_and_a_third_party_mode_parameter():
    from pipeline_dsl.checker import resolve_params
    from stages.registry import FROM_MODE, Port, StageKind

    kind = StageKind("tp", "third party", params=(Param("level", reg_mod.INT, FROM_MODE, "from the mode"),
                                                  Param("tags", reg_mod.LIST_STR, ("a",), "tags")),
                     inputs=(Port("requests", "Request"),), outputs=(Port("requests", "Request"),), impl="m:C")
    program, _ = pipeline_dsl.loads(pipeline().replace(": generate", ": tp"), "t.agp")
    st = [s for s in program.pipelines[0].stages if s.name.text == "gen"][0]
    assert resolve_params(kind, st, "balanced") == ({"level": None, "tags": ["a"]}, [])
    gen = reg_mod.default_registry().get("generate")
    params, diags = resolve_params(gen, st, "efficient")
    assert diags == [] and params["dtype"] == "int8" and params["device"] is None


def test_an_unknown_kind_lists_the_registry_problems_and_a_kind_without_impl_is_an_error():
    from stages.builtin import BUILTIN_KINDS
    from stages.registry import Port, Registry, StageKind

    dreamer = StageKind("dreamer", "no impl", inputs=(Port("requests", "Request"),),
                        outputs=(Port("requests", "Request"),))
    reg = Registry(BUILTIN_KINDS + (dreamer,), load_entry_points=False)
    reg.problems.append("entry point 'broken' failed to load: no module named 'x'")
    text = pipeline().replace(": generate", ": genrate").replace("request -> batch", "request -> d -> batch").replace(
        "stage out", "stage d : dreamer {}\n    stage out")
    program, _ = pipeline_dsl.loads(text, "t.agp")
    _, diags = check_pipeline(program.pipelines[0], reg)
    assert render_all(diags, program.sources) == """\
t.agp:8:21: error: unknown stage kind 'genrate'
    8 |     stage gen     : genrate      {  }
      |                     ^^^^^^^
  = expected: a stage kind: dreamer, dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt
  = note: entry point 'broken' failed to load: no module named 'x'
  = help: did you mean 'generate'?

t.agp:9:15: error: stage kind 'dreamer' (builtin) has no runtime implementation
    9 |     stage d : dreamer {}
      |               ^^^^^^^
  = expected: a kind whose registry entry names its impl ("module:Class" with a process(item) method)
  = help: see docs/architecture.md, 'Stage implementations'

2 errors
"""


# ---------------------------------------------------------------- devices, booleans, units, words

@pytest.mark.parametrize("device, close", [("autp", "auto"), ("cpux", "cpu"), ("aut", "auto"), ("cudz", "cuda")])
def test_a_device_setting_close_to_a_device_gets_it_as_hint(device, close):
    out = render(pipeline(settings=f'device = "{device}"'))
    assert f"error: '{device}' is not a device\n" in out and f"  = help: did you mean '{close}'?\n" in out
    out = render(pipeline(gen=f'device = "{device}"'))
    assert f"error: '{device}' is not a device\n" in out and f"  = help: did you mean '{close}'?\n" in out


def test_a_device_setting_given_a_quantity_or_a_list_is_shown_as_written():
    out = render(pipeline(settings="device = 2ms"))
    assert out.startswith("t.agp:3:14: error: '2ms' is not a device\n")
    assert render(pipeline(settings="device = [1]")).startswith("t.agp:3:14: error: '[1]' is not a device\n")


def test_boolean_hints_for_on_maybe_and_the_string_false():
    out = render(pipeline(batch='padding = "ON"', gen='ignore_eos = "false"', kv="reuse = prefix"))
    assert "error: 'padding' is true or false, not the string \"ON\"\n" in out
    assert out.count("  = help: write true\n") == 1 and out.count("  = help: write false\n") == 1
    out = render(pipeline(batch="padding = maybe"))
    assert "help" not in out
    (d,) = pipeline_dsl.loads(pipeline(batch="padding = 2.5"), "t.agp")[1]
    assert d.hint is None and d.message == "'padding' is true or false, not the number '2.5'"


def test_an_unknown_unit_close_to_a_known_one_gets_a_hint_and_values_are_named_by_kind():
    out = render(pipeline(kv="budget = 5mss", gen="stop = [true]  max_new_tokens = [1]"))
    assert "error: unknown unit 'mss' in '5mss'\n" in out and "  = help: did you mean 'ms'?\n" in out
    assert "error: 'stop' is a list of strings, but it holds the boolean 'true'\n" in out
    assert "error: 'max_new_tokens' is an integer, not the list '[1]'\n" in out
    assert "but it holds the duration '2ms'\n" in render(pipeline(gen="stop = [2ms]"))


def test_a_size_of_zero_without_a_unit_is_the_integer_zero():
    out, d = convert(ast.Int(0, AT), Param("s", reg_mod.SIZE), "'s'")
    assert (out, d) == (0, None) and type(out) is int
    out, d = convert(ast.Float(0.0, AT), Param("t", reg_mod.DURATION), "'t'")
    assert (out, d) == (0.0, None) and type(out) is float


@pytest.mark.parametrize("value, param, want", [
    (ast.Quantity(0, "ms", AT), Param("t", reg_mod.DURATION, min=0.0), 0.0),
    (ast.Quantity(0.0, "s", AT), Param("t", reg_mod.DURATION, min=0.0), 0.0),
    (ast.Quantity(0, "B", AT), Param("s", reg_mod.SIZE, min=0), 0),
])
def test_a_zero_quantity_with_its_unit_is_zero_not_negative(value, param, want):
    """Only a negative wait or size is refused whatever the bounds: `timeout = 0ms` is no wait."""
    assert convert(value, param, "'x'") == (want, None)


def test_a_list_may_hold_exactly_max_items_strings():
    p = Param("tags", reg_mod.LIST_STR, (), max_items=2)
    two = ast.List((ast.Str("a", AT), ast.Str("b", AT)), AT)
    assert convert(two, p, "'tags'") == (["a", "b"], None)
    out, d = convert(ast.List((*two.items, ast.Str("c", AT)), AT), p, "'tags'")
    assert out is None and d.message == "'tags' holds 3 strings; at most 2 are allowed"


def test_one_string_for_a_list_of_none_allowed_is_reported_at_the_string():
    p = Param("tags", reg_mod.LIST_STR, (), max_items=0)
    out, d = convert(ast.Str("a", AT), p, "'tags'")
    assert out is None and d.message == "'tags' holds 1 strings; at most 0 are allowed" and d.pos == AT


@pytest.mark.parametrize("param, text", [
    (Param("n", reg_mod.INT, min=3), "an integer of at least 3"),
    (Param("n", reg_mod.INT, max=7), "an integer of at most 7"),
    (Param("n", reg_mod.INT), "an integer"),
    (Param("x", reg_mod.FLOAT, min=0.0, min_exclusive=True), "a number above 0"),
    (Param("x", reg_mod.FLOAT, min=0.5, max=1.5, min_exclusive=True), "a number above 0.5 up to 1.5"),
    (Param("x", reg_mod.FLOAT, min=0.25, max=2.5), "a number from 0.25 to 2.5"),
    (Param("d", reg_mod.DURATION, min=0.001), "a duration with a unit (us, ms, s) of at least 1ms, e.g. 1ms"),
    (Param("d", reg_mod.SIZE, max=1024), "a size with a unit (B, KiB, MiB, GiB) of at most 1KiB, e.g. 256MiB"),
])
def test_every_kind_of_range_is_put_in_words(param, text):
    from pipeline_dsl.checker import _type_expected

    assert _type_expected(param) == text


# ---------------------------------------------------------------- function references

def test_a_missing_module_has_no_hint_and_a_program_without_a_file_looks_on_sys_path_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = pipeline().replace("gen -> out", "gen -> py -> out").replace(
        "stage out", 'stage py : python { fn = "nomod_xyz:f" }\n    stage out')
    (d,) = pipeline_dsl.loads(text, "<string>")[1]
    assert d.message == "module 'nomod_xyz' not found on sys.path (stage 'py')" and d.hint is None
    (d,) = pipeline_dsl.loads(text, "<stdin>")[1]        # standard input's: the current folder, as its includes
    assert d.message == f"module 'nomod_xyz' not found beside the pipeline ({tmp_path}) or on sys.path (stage 'py')"
    (d,) = pipeline_dsl.loads(text, "t.agp")[1]
    assert d.message == f"module 'nomod_xyz' not found beside the pipeline ({tmp_path}) or on sys.path (stage 'py')"


def test_base_dir_of_positions_without_a_file():
    from pipeline_dsl.checker import _base_dir

    assert _base_dir(None) is None
    assert _base_dir(SourcePos("", 1, 1, 1, 2)) is None
    assert _base_dir(SourcePos("<string>", 1, 1, 1, 2)) is None
    assert _base_dir(SourcePos("<stdin>", 1, 1, 1, 2)) == os.getcwd()    # its includes' folder too
    assert _base_dir(SourcePos("/a/b/p.agp", 1, 1, 1, 2)) == "/a/b"


def test_an_empty_function_reference_is_a_check_error():
    # was accepted while check_fn skipped a false reference (`if not ref`) instead of a missing one
    text = pipeline().replace("gen -> out", "gen -> py -> out").replace(
        "stage out", 'stage py : python { fn = "" }\n    stage out')
    assert render(text) == """\
t.agp:9:30: error: '' is not a function reference: write "module:function" (stage 'py')
    9 |     stage py : python { fn = "" }
      |                              ^^
  = expected: "module:function": a module beside this file or on sys.path and a function in it

1 error
"""


def test_a_stage_of_unknown_kind_resolves_with_no_parameters_and_no_positions():
    r, diags = _checked(pipeline(gen="temperature = 1.0").replace(": generate", ": genrate"))
    assert [d.message for d in diags] == ["unknown stage kind 'genrate'"]
    gen = r.stages["gen"]
    assert (gen.kind, gen.params, gen.given, gen.param_pos, gen.placement) == (None, {}, frozenset(), {}, None)


def test_a_function_reference_of_the_wrong_type_gets_one_error_only():
    text = pipeline().replace("gen -> out", "gen -> py -> out").replace(
        "stage out", 'stage py : python { fn = 5 }\n    stage out')
    prog, diags = pipeline_dsl.loads(text, "t.agp")
    assert render_all(diags, prog.sources) == (
        "t.agp:9:30: error: 'fn' is a string, not the integer '5'\n"
        "    9 |     stage py : python { fn = 5 }\n"
        "      |                              ^\n"
        "  = expected: a string in double quotes (\"…\")\n"
        "\n"
        "1 error\n")


SHAPES_MOD = '''NOT_FN = 42
NAMES: list = ["a"]


class Klass:
    pass


def noargs():
    return None


def two(item, extra):
    return item


def fine(item, extra=None, *, flag=False):
    return item


def chunked(item, chunks):
    yield from chunks


def merge(results, how):
    return results[0]


pair = lambda a, b: a
one = lambda item, *rest: item
'''


def _python_stage_diagnostics(tmp_path, monkeypatch, ref: str, params: str = "", kind: str = "python"):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes.py").write_text(SHAPES_MOD)
    text = pipeline().replace("gen -> out", "gen -> py -> out").replace(
        "stage out", f'stage py : {kind} {{ fn = "shapes:{ref}" {params} }}\n    stage out')
    _, diags = pipeline_dsl.loads(text, "t.agp")
    return [(d.severity, d.message, d.pos.line, d.pos.col) for d in diags]


@pytest.mark.parametrize("ref, params, kind, want", [
    ("NOT_FN", "", "python", ("error", "stage 'py': shapes:NOT_FN is not a function: the module binds it to a "
                                       "value of type int (line 1)")),
    ("NAMES", "", "python", ("error", "stage 'py': shapes:NAMES is not a function: the module binds it to a "
                                      "value of type list (line 2)")),
    ("noargs", "", "python", ("error", "stage 'py': shapes:noargs takes 0 positional arguments, but it is "
                                       "called with 1 (item)")),
    ("two", "", "python", ("error", "stage 'py': shapes:two takes 2 positional arguments, but it is called "
                                    "with 1 (item)")),
    ("chunked", "stream = true", "python", None),
    ("two", "stream = true", "python", ("error", "stage 'py' has stream = true, but shapes:two does not yield")),
    ("fine", "", "python", None),
    ("merge", "", "join", ("error", "join 'py': shapes:merge takes 2 positional arguments, but it is called "
                                    "with 1 (results)")),
    ("Klass", "", "python", ("warning", "stage 'py': shapes:Klass is a class; calling it makes an instance, "
                                        "not the dict or label the stage returns")),
    ("pair", "", "python", ("error", "stage 'py': shapes:pair is a lambda that takes 2 positional arguments, "
                                     "but it is called with 1 (item)")),
    ("one", "", "python", None),
    ("pair", "stream = true", "python", None),        # fn(item, chunks): a lambda may return a generator
])
def test_check_reads_whether_a_python_fn_can_be_called_with_the_item(tmp_path, monkeypatch, ref, params, kind,
                                                                     want):
    got = _python_stage_diagnostics(tmp_path, monkeypatch, ref, params, kind)
    if want is None:
        assert got == []
    else:
        assert [g[:2] for g in got] == [want] and got[0][2] == 9


@pytest.mark.parametrize("refused, error", [
    ("request -> batch when vip", "stage 'request' (requests) gives its items no label 'vip'"),
    ("request -> bacth when full", "edge to undefined stage 'bacth'"),
])
def test_no_otherwise_warning_for_a_stage_whose_conditional_edge_was_refused(refused, error):
    text = pipeline().replace("    request -> batch\n", f"    {refused}\n    request -> batch otherwise\n")
    _, diags = pipeline_dsl.loads(text, "t.agp")
    assert [d.message for d in diags] == [error]
    # without the refused edge the warning stands: the otherwise edge always holds
    _, diags = pipeline_dsl.loads(pipeline().replace("    request -> batch\n", "    request -> batch otherwise\n"))
    assert [d.message for d in diags] == ["`otherwise` on request -> batch: 'request' has no conditional edge, so "
                                          "it always holds"]


# ---------------------------------------------------------------- max_turns outside a loop

def test_max_turns_on_a_python_stage_in_no_loop_is_a_warning_at_the_setting():
    text = pipeline().replace("    stage out ", '    stage tool    : python        { fn = "json:loads"  max_turns = 2 }\n'
                                             "    stage out ").replace("gen -> out", "gen -> tool -> out")
    assert render(text) == """\
t.agp:9:68: warning: 'max_turns' only applies to a stage in a loop; stage 'tool' is in none
    9 |     stage tool    : python        { fn = "json:loads"  max_turns = 2 }
      |                                                                    ^
  = expected: an edge back from a later stage to one before it, through 'tool' (it would run at most max_turns times per request)
  = help: remove max_turns, or add the edge that closes the loop

1 warning
"""
    looped = text.replace("gen -> tool -> out", "gen -> tool -> out\n    tool -> batch")
    assert "max_turns' only applies" not in render(looped)


# ---------------------------------------------------------------- max_prompt_tokens past the context

def test_max_prompt_tokens_past_the_models_context_is_a_warning_at_the_setting():
    def limited(n):
        return pipeline().replace("stage request : requests      {}",
                                  f"stage request : requests      {{ max_prompt_tokens = {n} }}")
    assert render(limited(100000)) == """\
t.agp:4:57: warning: max_prompt_tokens = 100000 is more than the context of smollm2-135m-instruct (8192 tokens): the context caps it
    4 |     stage request : requests      { max_prompt_tokens = 100000 }
      |                                                         ^^^^^^
  = expected: max_prompt_tokens of at most 8192
  = help: lower max_prompt_tokens to 8192 or less, or leave it 0 (the model's context)

1 warning
"""
    assert render(limited(8192)) == ""


def test_max_prompt_tokens_in_a_pipeline_without_a_generate_stage_is_a_warning_that_it_bounds_nothing(tmp_path):
    """No engine takes the limit where no model reads the prompts: a prompt of any length went on."""
    (tmp_path / "canned.py").write_text("def answer(item):\n    return {'text': 'hi'}\n")
    (tmp_path / "t.agp").write_text("""\
pipeline p {
    stage request : requests { max_prompt_tokens = 5 }
    stage answer  : python   { fn = "canned:answer"  returns = generated }
    stage out     : respond  {}
    request -> answer -> out
}
""")
    assert render_file(tmp_path / "t.agp").replace(str(tmp_path) + "/", "") == """\
t.agp:2:52: warning: max_prompt_tokens = 5 bounds nothing: the pipeline has no generate stage, so no model reads its prompts
    2 |     stage request : requests { max_prompt_tokens = 5 }
      |                                                    ^
  = help: remove max_prompt_tokens, or refuse a long prompt in a python stage (raise pipeline_dsl.Reject)

1 warning
"""


def test_context_length_is_read_from_a_gguf_header_and_caps_a_file_models_prompt_limit(tmp_path):
    from pipeline_dsl.model_files import context_length
    from tiny_model import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "m.gguf", context=300)
    assert (context_length(str(model)), context_length(EMBEDDED)) == (300, 8192)
    assert context_length(str(tmp_path / "missing.gguf")) is None
    text = pipeline(model=str(model)).replace("stage request : requests      {}",
                                              "stage request : requests      { max_prompt_tokens = 301 }")
    assert "max_prompt_tokens = 301 is more than the context of m.gguf (300 tokens)" in render(text)


def test_a_python_stages_retries_are_bounded_at_ten():
    """`agp stages python` gives retries the range [0..10]: agp check refuses 11."""
    def checked(retries):
        return render(pipeline().replace("gen -> out", "gen -> py -> out").replace(
            "stage out", f'stage py : python {{ fn = "json:dumps"  retries = {retries} }}\n    stage out'))

    assert checked(10) == ""
    assert checked(11).startswith("t.agp:9:54: error: value out of range: 'retries' = 11\n")
    assert "  = expected: an integer from 0 to 10\n" in checked(11)


def test_a_json_schema_file_whose_const_nests_past_the_bound_is_refused_naming_where(tmp_path, monkeypatch):
    """A const nested 600 levels deep (JSON text json.loads reads) was a RecursionError in copying
    the schema, reported as 'nested too deeply' with no place: it is refused naming where."""
    pytest.importorskip("llguidance")
    monkeypatch.chdir(tmp_path)
    f = _schema_pipeline(tmp_path, "s.json", '{"type": "object", "properties": {"a": {"const": %s1%s}}}'
                         % ("[" * 600, "]" * 600))
    out = render_file(f)
    assert "json_schema file 's.json' cannot be enforced: the schema nests more than 124 levels of arrays and " \
           "objects (at most 124), at #/properties/a/const/0/0/" in out, out
