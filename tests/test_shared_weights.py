"""Engine segments whose generate stages name the same weights (file, dtype, device, compile)
load them once: a cascade, a vote of several generate stages, a draft and a refine on one model
cost one model's memory and load, each stage still answering with its own settings; weights
that differ (another dtype) are loaded apart. `agp plan` says which segments share a copy."""
from __future__ import annotations

import flowkit
import pytest

from pipeline_dsl.commands.runner import Tally, format_summary, summarize
from pipeline_dsl.engine import Engine, EngineConfig
from pipeline_dsl.engine.model import LlamaModel
from pipeline_dsl.engine.models import LoadedModels, load_model, resolve_model
from pipeline_dsl.flow import load_graph
from pipeline_dsl.model_files import context_length, embedded_file, kv_shape, model_file, weights_key
from pipeline_dsl.plan import format_plan, make_plan

# three generate stages with settings of their own: sampling defaults, lengths, batch sizes
STAGES = {"g1": ("max_new_tokens = 3", 8),
          "g2": ("max_new_tokens = 6  temperature = 0.9  seed = 5", 4),
          "g3": ("max_new_tokens = 5  temperature = 0.7  top_k = 4  seed = 9", 2)}


def _pipeline(tmp_path, model, stages: dict, name: str = "p"):
    """A request sent to each of `stages` (name -> (generate parameters, max_batch_size)), each
    on an engine segment of its own, every answer a choice of the result."""
    body = "    stage request : requests {}\n    stage out : respond {}\n"
    for i, (gen, (params, batch)) in enumerate(stages.items()):
        body += (f"    stage b{i} : dynamic_batch {{ max_batch_size = {batch}  timeout = 1ms }}\n"
                 f"    stage e{i} : encode {{}}\n    stage k{i} : kv_lookup {{ block_size = 8  budget = 2MiB }}\n"
                 f"    stage {gen} : generate {{ {params} }}\n"
                 f"    request -> b{i} -> e{i} -> k{i} -> {gen} -> out\n")
    folder = tmp_path / name
    folder.mkdir()
    path = flowkit.write(folder, model, body)
    assert flowkit.errors(path) == []
    return path


def _answers(path) -> tuple[dict, object]:
    results, rt = flowkit.run(path, [{"id": "a", "prompt": "the weights are shared"}])
    assert results[0].error is None
    return {c.data["generated_by"]: c.text for c in results[0].choices}, rt


def test_segments_on_one_model_load_it_once_and_each_answers_as_it_does_alone(tmp_path, soft_gguf):
    together, rt = _answers(_pipeline(tmp_path, soft_gguf, STAGES))
    info = rt.models.cache_info()
    assert (info["loads"], info["hits"], info["models"]) == (1, 2, 1)
    assert [es.model_info["weights_shared"] for es in rt.segments] == [False, True, True]
    # each segment keeps its own batcher settings and KV pool
    assert [es.config.max_batch_size for es in rt.segments] == [8, 4, 2]
    for gen, settings in STAGES.items():
        alone, rt_alone = _answers(_pipeline(tmp_path, soft_gguf, {gen: settings}, name=gen))
        assert rt_alone.models.cache_info()["loads"] == 1
        assert together[gen] == alone[gen], gen
    assert len(set(together.values())) == 3          # the stages' own settings made three answers


def test_three_segments_on_one_model_hold_one_models_weights(tmp_path, tiny_gguf):
    three = flowkit.runtime(_pipeline(tmp_path, tiny_gguf, STAGES))
    one = flowkit.runtime(_pipeline(tmp_path, tiny_gguf, {"g1": STAGES["g1"]}, name="one"))
    try:
        single = one.stats()["models"]["weight_bytes"]
        assert single > 0
        assert three.stats()["models"]["weight_bytes"] == single
        assert [es.model_info["weight_bytes"] for es in three.segments] == [single] * 3
        assert len({id(es.engine.runner.model) for es in three.segments}) == 1     # one model's tensors
    finally:
        three.shutdown()
        one.shutdown()


def test_the_run_summary_counts_shared_weights_once(tmp_path, tiny_gguf):
    results, rt = flowkit.run(_pipeline(tmp_path, tiny_gguf, STAGES), [flowkit.chat("a", "hi")])
    summary = summarize(rt, Tally.of(results), 1.0)
    assert summary["weight_copies"] == 1
    assert summary["weight_bytes"] == rt.segments[0].model_info["weight_bytes"]
    line = next(x for x in format_summary(summary).splitlines() if x.startswith("weights "))
    assert line.endswith("1 loaded copy for 3 engines")


def test_segments_with_different_dtypes_load_the_model_apart(tmp_path, tiny_gguf):
    stages = {"g1": ("max_new_tokens = 3  dtype = fp32", 8), "g2": ("max_new_tokens = 3  dtype = bf16", 8)}
    path = _pipeline(tmp_path, tiny_gguf, stages)
    answers, rt = _answers(path)
    info = rt.models.cache_info()
    assert (info["loads"], info["hits"], info["models"]) == (2, 0, 2)
    assert [es.model_info["weights_shared"] for es in rt.segments] == [False, False]
    assert [es.model_info["dtype"] for es in rt.segments] == ["float32", "bfloat16"]
    assert set(answers) == {"g1", "g2"}


def test_plan_says_which_segments_share_one_copy_of_the_weights(tmp_path, tiny_gguf):
    stages = {**STAGES, "g4": ("max_new_tokens = 3  dtype = bf16", 8)}
    plan = make_plan(load_graph(_pipeline(tmp_path, tiny_gguf, stages)))
    assert ("weights: engine segments g1, g2, g3 share one loaded copy of tiny.gguf (dtype fp32); "
            "each keeps its own KV pool and batcher") in format_plan(plan).splitlines()
    assert plan.to_dict()["shared_weights"] == [{"model": str(tiny_gguf.resolve()), "dtype": "fp32",
                                                "segments": ["g1", "g2", "g3"]}]


def test_a_model_under_home_is_the_file_the_loader_reads(tmp_path, tiny_gguf, monkeypatch):
    """`~/models/x.gguf` names the file the engine loads: its header (KV shape, context) is read
    and `agp plan` counts it one copy with the same file written out, as the loader shares them."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    real = tmp_path / "home" / "models" / "x.gguf"
    shutil.copy(tiny_gguf, real)
    home = "~/models/x.gguf"
    assert model_file(home) == real
    assert kv_shape(home) == kv_shape(str(real)) is not None
    assert context_length(home) == context_length(str(real)) is not None
    assert weights_key(model_file(home)) == LoadedModels.key(resolve_model(home))
    stages = {"g1": ("max_new_tokens = 3", 8), "g2": (f'max_new_tokens = 3  model = "{real}"', 8)}
    plan = make_plan(load_graph(_pipeline(tmp_path, home, stages)))
    assert plan.to_dict()["shared_weights"] == [{"model": str(real), "dtype": "fp32", "segments": ["g1", "g2"]}]


def test_the_embedded_models_name_and_its_file_are_one_copy(tmp_path):
    path = embedded_file("smollm2-135m-instruct")
    if path is None:
        pytest.skip("the embedded model is not installed")
    stages = {"g1": ("max_new_tokens = 3", 8), "g2": (f'max_new_tokens = 3  model = "{path}"', 8)}
    plan = make_plan(load_graph(_pipeline(tmp_path, "smollm2-135m-instruct", stages)))
    assert [segs for _, _, segs in plan.shared_weights] == [("g1", "g2")]


def test_engines_sharing_weights_keep_their_own_tokenizer_and_kv_pool(tiny_gguf):
    models = LoadedModels()
    config = dict(model=str(tiny_gguf), dtype="fp32", kv_budget_bytes=1 << 20, block_size=8)
    own = Engine(EngineConfig(**config, chat_template="{{ messages[0]['content'] }}!"), models=models)
    plain = Engine(EngineConfig(**config), models=models)
    assert models.cache_info()["loads"] == 1 and plain.model_info["weights_shared"]
    assert plain.runner.model is own.runner.model
    assert plain.runner is not own.runner and plain.blocks is not own.blocks
    assert own.tokenizer.chat_template.endswith("!")
    assert plain.tokenizer.chat_template != own.tokenizer.chat_template


def test_weight_bytes_are_measured_once_and_again_after_a_later_load(tiny_gguf, monkeypatch):
    """A stats scrape (/metrics) reads the held models' bytes without walking their tensors each
    time; a model loaded later is counted in."""
    walks = []
    measure = LlamaModel.weight_bytes
    monkeypatch.setattr(LlamaModel, "weight_bytes", lambda self: walks.append(self) or measure(self))
    models = LoadedModels()
    fp32, _, _ = models.load(resolve_model(str(tiny_gguf)), dtype="fp32")
    first = models.cache_info()["weight_bytes"]
    assert [models.cache_info()["weight_bytes"] for _ in range(3)] == [first] * 3
    assert walks == [fp32]
    bf16, _, _ = models.load(resolve_model(str(tiny_gguf)), dtype="bf16")
    assert models.cache_info()["weight_bytes"] == first + measure(bf16)
    assert models.cache_info()["models"] == 2 and len(walks) == 3


def test_a_batch_invariant_engine_leaves_the_shared_weights_as_other_engines_run_them(tiny_gguf, monkeypatch):
    """The invariant mode (AGP_BATCH_INVARIANT) tiles its own view of the loaded weights: an
    engine on the same copy without it keeps the model's own layers, small head and native step,
    as an engine alone has them."""
    from pipeline_dsl.engine.invariant import TiledLinear

    def layers(model):
        return [type(getattr(ly, n)) for ly in model.layers for n in ("qkv", "o", "gate_up", "down")]

    config = dict(model=str(tiny_gguf), dtype="bf16", kv_budget_bytes=1 << 20, block_size=8)
    alone = Engine(EngineConfig(**config))
    models = LoadedModels()
    monkeypatch.setenv("AGP_BATCH_INVARIANT", "1")
    tiled = Engine(EngineConfig(**config), models=models)
    monkeypatch.delenv("AGP_BATCH_INVARIANT")
    plain = Engine(EngineConfig(**config), models=models)
    assert plain.model_info["weights_shared"] and tiled.runner.model is not plain.runner.model
    assert set(layers(tiled.runner.model)) == {TiledLinear} and tiled.runner.native is None
    assert layers(plain.runner.model) == layers(alone.runner.model) and TiledLinear not in layers(alone.runner.model)
    assert type(plain.runner.model.lm_head) is type(alone.runner.model.lm_head)
    assert type(plain.runner.model.lm_head_small) is type(alone.runner.model.lm_head_small)
    assert (plain.runner.native is None) == (alone.runner.native is None)
    assert tiled.runner.model.layers[0].qkv.inner is plain.runner.model.layers[0].qkv    # one copy of the weights


def test_a_second_engine_on_compiled_weights_keeps_their_compiled_pieces(tiny_gguf):
    model, _ = load_model(str(tiny_gguf), dtype="fp32")
    model.enable_compile(force=True)
    pieces = (model.rope, model.silu_mul, model.rms_fn)
    model.enable_compile(force=True)
    assert (model.rope, model.silu_mul, model.rms_fn) == pieces


def test_engine_totals_count_shared_weights_once():
    """/metrics and agp bench sum the engines' counters; three engines on one copy of the weights
    hold that copy's bytes, not three times them."""
    from pipeline_dsl.serve.metrics import engine_totals

    stats = {"engines": {g: {"weight_bytes": 100, "decode_steps": 1} for g in ("g1", "g2", "g3")},
             "models": {"loads": 1, "hits": 2, "models": 1, "weight_bytes": 100}}
    assert engine_totals(stats)["weight_bytes"] == 100
    assert engine_totals(stats)["decode_steps"] == 3


def test_serve_banner_says_which_engine_loaded_the_weights_another_shares(tmp_path, tiny_gguf):
    import argparse

    from pipeline_dsl.commands.serve import banner
    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    stages = {**STAGES, "g4": ("max_new_tokens = 3  dtype = bf16", 8)}
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(_pipeline(tmp_path, tiny_gguf, stages)), "--threads", "1"])
    serving = build(args)
    try:
        lines = banner(serving, "http://x/v1", args)[1:5]
    finally:
        serving.runtime.close()
    assert [line.split(":")[0].strip() for line in lines] == ["engine g1", "engine g2", "engine g3", "engine g4"]
    assert "shared" not in lines[0] and "shared" not in lines[3]           # g4: bf16, a copy of its own
    assert all("(the weights engine g1 loaded, shared)" in line for line in lines[1:3])
