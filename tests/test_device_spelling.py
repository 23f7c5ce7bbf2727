"""A device is spelled the same way as a pipeline setting and as a generate stage's
parameter: the words auto, cpu, cuda, cuda:N or the same in quotes. A wrong one is an
error at the value with the likely device; `agp fmt` keeps each spelling as written."""

from __future__ import annotations

import pytest

import pipeline_dsl
from pipeline_dsl.fmt import format_text
from pipeline_dsl.graph import build_graph

PIPELINE = """\
pipeline p {{
    model = "{model}"
    {setting}
    stage request : requests {{}}
    stage batch : dynamic_batch {{}}
    stage encode : encode {{}}
    stage kv : kv_lookup {{}}
    stage gen : generate {{ {param} max_new_tokens = 3 }}
    stage out : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def load(param: str = "", setting: str = "", model: str = "smollm2-135m-instruct"):
    return pipeline_dsl.loads(PIPELINE.format(model=model, param=param, setting=setting), "t.agp")


def errors(param: str = "", setting: str = ""):
    return [d for d in load(param, setting)[1] if d.is_error]


@pytest.mark.parametrize("written, device", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                                             ('"cuda:1"', "cuda:1"), ('"cpu"', "cpu"), ("auto", "auto")])
def test_generate_device_takes_the_words_the_setting_takes(written, device):
    prog, diags = load(f"device = {written}")
    assert [d for d in diags if d.is_error] == []
    assert build_graph(prog.pipelines[0]).nodes["gen"]["params"]["device"] == device
    prog, diags = load(setting=f"device = {written}")
    assert [d for d in diags if d.is_error] == []
    assert build_graph(prog.pipelines[0]).nodes["gen"]["params"]["device"] == device


@pytest.mark.parametrize("written, hint", [
    ("gpu", "did you mean 'cuda'?"),
    ("GPU:1", "did you mean 'cuda:1'?"),
    ("cuda0", "did you mean 'cuda:0'?"),
    ('"cuda: 1"', "did you mean 'cuda:1'?"),
    ("CPU", "did you mean 'cpu'?"),
    ("cpux", "did you mean 'cpu'?"),
    ("mps", "agp runs models on the CPU or on CUDA GPUs (ROCm builds of torch call theirs cuda too)"),
    ("0", "did you mean 'cuda:0'?"),
])
def test_a_wrong_device_is_an_error_at_its_value_with_the_likely_one(written, hint):
    for where in ({"param": f"device = {written}"}, {"setting": f"device = {written}"}):
        [err] = errors(**where)
        at = (8, 37) if "param" in where else (3, 14)
        assert (err.pos.line, err.pos.col) == at, where
        assert err.hint == hint
        assert err.expected == "auto | cpu | cuda | cuda:N"


def test_a_colon_instead_of_equals_says_how_a_parameter_is_written():
    _, diags = pipeline_dsl.loads("pipeline p {\n    stage g : generate { device: cuda:0 }\n}\n", "t.agp")
    [err] = diags
    assert err.message == "unexpected ':'" and (err.pos.line, err.pos.col) == (2, 32)
    assert err.hint == "a parameter is written 'device = value', not 'device: value'"


def test_fmt_keeps_every_device_spelling():
    text = PIPELINE.format(model="m.gguf", setting="device=cuda:0",
                           param='device=cuda:1').replace("stage out", 'stage g2 : generate { device = "cuda:1" }\n'
                                                          "    stage g3 : generate { device = cpu }\n    stage out")
    once, diags = format_text(text, "t.agp")
    assert diags == []
    assert "device = cuda:0" in once and "{ device = cuda:1  max_new_tokens = 3 }" in once
    assert '{ device = "cuda:1" }' in once and "{ device = cpu }" in once
    assert format_text(once, "t.agp")[0] == once


def test_a_stage_device_cpu_runs(tmp_path, tiny_gguf):
    from pipeline_dsl.flow import build_runtime

    path = tmp_path / "p.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf, setting="", param="device = cpu"), encoding="utf-8")
    rt = build_runtime(pipeline_dsl.load_pipeline_graph(str(path)), overrides={"threads": 1})
    try:
        assert rt.segments[0].config.device == "cpu"
    finally:
        rt.shutdown()
