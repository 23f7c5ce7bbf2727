"""No catch-all hides a bug: a compile fallback is said once and shows in the stats; only the
engine's own InputError counts as bad input."""
import logging

import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine.tokenizer import TokenizerError
from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.flow import PipelineError
from pipeline_dsl.flow import build_runtime

PIPELINE = """pipeline p {{
    model = "{model}"
    dtype = fp32
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 4 }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
"""


def _run(engine, prompt="a b c"):
    engine.add_request("r", prompt=prompt, params=SamplingParams(max_tokens=4, ignore_eos=True))
    out = []
    while engine.has_unfinished():
        out += engine.step()
    return out


def test_a_failed_compile_is_logged_once_with_its_reason_and_counted_in_the_stats(tiny_gguf, monkeypatch, caplog):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler on this machine")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8))
    engine.runner.model.enable_compile(force=True)
    caplog.set_level(logging.WARNING, logger="agp.model")
    eager = Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8))
    assert [o.new_token_ids for o in _run(engine)] == [o.new_token_ids for o in _run(eager)]   # still right
    _run(engine, "again")
    warnings = [r for r in caplog.records if r.name == "agp.model"]
    assert len(warnings) == 3                         # one per compiled piece, not one per call
    assert all(r.levelno == logging.WARNING and "no C++ compiler" in r.getMessage() for r in warnings)
    stats = engine.stats(latencies=False)
    assert stats["compile_fallbacks"] == 3 and "no C++ compiler" in stats["compile_fallback"]
    assert eager.stats(latencies=False)["compile_fallbacks"] == 0


def test_only_the_engines_input_errors_are_bad_input(tmp_path, tiny_gguf, monkeypatch):
    assert issubclass(TokenizerError, InputError)
    path = tmp_path / "p.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf))
    runtime = build_runtime(path, overrides={"threads": 1})
    es = runtime.segments[0]
    real = es.tokenise

    def tokenise(data):
        if data.get("prompt") == "template says no":
            raise TokenizerError("chat template failed: bad role")
        if data.get("prompt") == "a bug":
            raise ValueError("a bug in the tokeniser's caller")
        return real(data)

    monkeypatch.setattr(es, "tokenise", tokenise)
    results = runtime.run_all([{"id": 1, "prompt": "template says no"}, {"id": 2, "prompt": "a bug"},
                               {"id": 3, "prompt": "fine"}])
    assert results[0].error.kind == "invalid" and "bad role" in results[0].error.message
    assert results[1].error.kind == "failed"          # a bug is a failure (HTTP 500), not a 400
    assert results[2].error is None and results[2].usage["completion_tokens"] == 4
    with pytest.raises(PipelineError):
        raise results[1].error
