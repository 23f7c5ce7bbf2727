"""A Hugging Face folder's generation_config.json as the requests' sampling defaults, as vLLM's
default `--generation-config auto` takes them: temperature, top_p, top_k, min_p,
repetition_penalty and max_new_tokens (max_tokens) where the request and its generate stage set
none; a field the request sets, or the .agp file sets on the stage, wins; `--generation-config
vllm` leaves the file out, a folder takes that folder's file. A value outside the field's schema
stops the load with the file and key named."""
from __future__ import annotations

import json

import pytest

from pipeline_dsl.engine.errors import ModelFileError
from pipeline_dsl.engine.models import generation_defaults, resolve_model
from pipeline_dsl.flow import build_runtime
import clikit
from test_model_families import gguf_as_hf_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECOMMENDED = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3,
               "max_new_tokens": 7}
AS_FIELDS = {**{k: v for k, v in RECOMMENDED.items() if k != "max_new_tokens"}, "max_tokens": 7}
STAGE = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": 128}

PIPELINE = """
pipeline hf {{
    model = "{model}"
    device = cpu
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4 }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ {gen} }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory, soft_gguf):
    from pipeline_dsl.engine.models import load_model

    path = tmp_path_factory.mktemp("hf")
    _, tok = load_model(str(soft_gguf), dtype="fp32")
    gguf_as_hf_folder(soft_gguf, path, tok)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                             "do_sample": True, **RECOMMENDED}))
    return path


def pipeline(tmp_path, folder, gen: str = "") -> str:
    path = tmp_path / "hf.agp"
    path.write_text(PIPELINE.format(model=folder, gen=gen))
    return str(path)


def params_of(runtime, data: dict):
    seg = runtime.segments[0]
    return seg.sampling("gen", {"prompt": "hi", **data}, 3)


def fields(params, names) -> dict:
    return {k: getattr(params, k) for k in names}


def test_a_request_without_sampling_fields_takes_the_models_recommended_ones(tmp_path, folder):
    rt = build_runtime(pipeline(tmp_path, folder), overrides={"threads": 1})
    try:
        assert rt.segments[0].engine.generation_defaults == AS_FIELDS
        assert fields(params_of(rt, {}), AS_FIELDS) == AS_FIELDS
        assert rt.sampling_defaults() == {"temperature": 0.7, "top_p": 0.9}      # what a response repeats
        own = params_of(rt, {"temperature": 0.0, "top_k": 2, "max_tokens": 3})      # the request's own win
        assert fields(own, AS_FIELDS) == {**AS_FIELDS, "temperature": 0.0, "top_k": 2, "max_tokens": 3}
    finally:
        rt.close()


def test_what_the_pipeline_file_sets_on_the_stage_wins_over_the_model(tmp_path, folder):
    rt = build_runtime(pipeline(tmp_path, folder, "temperature = 0  max_new_tokens = 4"), overrides={"threads": 1})
    try:
        assert fields(params_of(rt, {}), AS_FIELDS) == {**AS_FIELDS, "temperature": 0.0, "max_tokens": 4}
    finally:
        rt.close()


def test_generation_config_vllm_leaves_the_models_file_out_and_a_folder_brings_its_own(tmp_path, folder):
    rt = build_runtime(pipeline(tmp_path, folder), overrides={"threads": 1, "generation_config": "vllm"})
    try:
        assert rt.segments[0].engine.generation_defaults == {}
        assert fields(params_of(rt, {}), STAGE) == STAGE
    finally:
        rt.close()
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    assert generation_defaults(resolve_model(str(folder)), str(other)) == {"temperature": 0.3}
    assert generation_defaults(resolve_model(str(folder)), "vllm") == {}


@pytest.mark.parametrize("config, said", [({"temperature": 5}, "'temperature' must be a number from 0 to 2"),
                                          ({"top_p": 0}, "'top_p' must be a number above 0 up to 1")])
def test_a_recommended_value_outside_its_field_names_the_file_and_the_key(tmp_path, folder, config, said):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "generation_config.json").unlink()
    (bad / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="generation_config.json") as e:
        generation_defaults(resolve_model(str(bad)))
    assert said in str(e.value)
    assert "--generation-config vllm" in str(e.value)


def test_agp_run_lines_take_the_defaults_and_the_flag(tmp_path, folder):
    agp = pipeline(tmp_path, folder)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in (
        {"id": "model", "prompt": "the cat", "ignore_eos": True},
        {"id": "own", "prompt": "the cat", "ignore_eos": True, "max_tokens": 2})) + "\n")

    def run(*flags):
        proc = clikit.agp_in("run", agp, "-i", inp, "-o", out, "--overwrite", "--threads", "1", "--no-progress", *flags)
        return proc, {r["id"]: r for r in map(json.loads, out.read_text().splitlines())} if proc.returncode == 0 \
            else None

    proc, rows = run()
    assert proc.returncode == 0, proc.stderr
    assert rows["model"]["usage"]["completion_tokens"] == 7 and rows["own"]["usage"]["completion_tokens"] == 2
    proc, rows = run("--generation-config", "vllm")
    assert rows["model"]["usage"]["completion_tokens"] == 128
    proc, _ = run("--generation-config", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "neither auto, vllm nor a folder" in proc.stderr


def test_the_models_generation_config_is_read_once_for_the_defaults_and_the_tokenizer(tmp_path, folder, monkeypatch):
    """It was read twice at start: once for the sampling defaults, once more by the tokenizer (its
    eos_token_id); one read serves both."""
    from pathlib import Path

    reads = []
    read_bytes = Path.read_bytes

    def spy(self):
        if self.name == "generation_config.json":
            reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    rt = build_runtime(pipeline(tmp_path, folder), overrides={"threads": 1})
    try:
        assert rt.segments[0].engine.generation_defaults == AS_FIELDS
        assert 2 in rt.segments[0].tokenizer.eos_token_ids                  # the file's eos_token_id
    finally:
        rt.close()
    assert len(reads) == 1, reads


def test_override_generation_config_sets_keys_over_the_defaults_and_null_unsets_one(tmp_path, folder):
    model = resolve_model(str(folder))
    assert generation_defaults(model, "auto", override={"temperature": 0.5, "top_k": None}) == \
        {**{k: v for k, v in AS_FIELDS.items() if k != "top_k"}, "temperature": 0.5}
    assert generation_defaults(model, "vllm", override={"max_new_tokens": 3}) == {"max_tokens": 3}  # the override alone
    rt = build_runtime(pipeline(tmp_path, folder), overrides={"threads": 1, "generation_config": "vllm",
                                                             "override_generation_config": {"top_p": 0.5}})
    try:
        assert rt.segments[0].engine.generation_defaults == {"top_p": 0.5}
        assert params_of(rt, {}).top_p == 0.5 and params_of(rt, {"top_p": 0.25}).top_p == 0.25   # the request's wins
    finally:
        rt.close()


@pytest.mark.parametrize("value, said", [
    ('{"temperature": 0.5', "not JSON (Expecting ',' delimiter"),
    ("[0.5]", "must be a JSON object of generation_config.json keys"),
    ('{"temprature": 0.5}', "unknown key 'temprature' (did you mean 'temperature'?): it takes temperature, top_p"),
    ('{"top_p": 0}', "'top_p' must be a number above 0 up to 1"),
])
def test_a_bad_override_generation_config_exits_2_naming_the_flag(tmp_path, value, said):
    for command in ("run", "serve"):
        proc = clikit.agp_in(command, "examples/chat.agp", "--override-generation-config", value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"agp {command}: error: argument --override-generation-config: {said}" in proc.stderr, proc.stderr


def test_resume_fingerprints_what_the_generation_config_folder_holds_not_its_path(tmp_path, folder):
    """--generation-config FOLDER was fingerprinted by its path: a changed file under the same path
    was not noticed, and the same file at another path was refused."""
    agp = pipeline(tmp_path, folder)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "the cat", "max_tokens": 2}) + "\n")
    mine, moved = tmp_path / "mine", tmp_path / "moved"
    for d in (mine, moved):
        d.mkdir()
        (d / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))

    def run(*flags):
        return clikit.agp_in("run", agp, "-i", inp, "-o", out, "--threads", "1", "--no-progress", *flags)

    assert run("--overwrite", "--generation-config", mine).returncode == 0
    same = run("--resume", "--generation-config", moved)               # the same defaults elsewhere
    assert same.returncode == 0, same.stderr
    (mine / "generation_config.json").write_text(json.dumps({"temperature": 0.9}))
    changed = run("--resume", "--generation-config", mine)
    assert changed.returncode == 2 and "was made from another pipeline than this run's" in changed.stderr
    overridden = run("--resume", "--generation-config", moved, "--override-generation-config", '{"top_k": 3}')
    assert overridden.returncode == 2 and "another pipeline" in overridden.stderr


def test_agp_serve_runs_with_the_override_and_its_banner_says_so(tmp_path, folder):
    import argparse

    from pipeline_dsl.commands.serve import banner
    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([pipeline(tmp_path, folder), "--threads", "1",
                         "--override-generation-config", '{"temperature": 0.5, "max_new_tokens": null}'])
    serving = build(args)
    try:
        engine = serving.runtime.segments[0].engine
        assert engine.generation_defaults == {**{k: v for k, v in AS_FIELDS.items() if k != "max_tokens"},
                                              "temperature": 0.5}
        assert "; sampling defaults of generation_config.json and --override-generation-config: temperature=0.5" \
            in banner(serving, "http://x/v1", args)[1]
    finally:
        serving.runtime.close()


def test_an_end_token_generation_config_lists_beside_the_tokenizer_s_eos_names_itself_as_stop_reason(tmp_path,
                                                                                                     tiny_gguf):
    """vLLM adds generation_config.json's eos_token_id to a request's stop_token_ids, less the
    tokenizer's own eos: an answer one of them ends says so in stop_reason (Phi-3's <|end|>, Gemma 3's
    <end_of_turn>), one the tokenizer's eos ends has none, and ignore_eos leaves them all out."""
    from pipeline_dsl.engine import SamplingParams
    from tiny_model import tiny_engine, write_tiny_hf_folder
    from test_engine import run_all

    folder = write_tiny_hf_folder(tmp_path / "hf", tiny_gguf)                 # its eos: <|im_end|>, id 2
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    engine = tiny_engine(folder)
    for name, token, ignore in (("listed", 0, False), ("eos", 2, False), ("ignored", 0, True)):
        engine.add_request(name, prompt="the cat", params=SamplingParams(
            temperature=0.0, max_tokens=3, logit_bias={token: 100.0}, ignore_eos=ignore))
    finals, _ = run_all(engine)
    got = {k: (out.finish_reason, out.stop_reason, out.completion_tokens) for k, out in finals.items()}
    assert got == {"listed": ("stop", 0, 1), "eos": ("stop", None, 1), "ignored": ("length", None, 3)}


def test_generation_config_folder_brings_its_end_tokens_too(tmp_path, tiny_gguf):
    """--generation-config FOLDER: vLLM takes the eos_token_id list from that folder's file as it
    takes the sampling defaults (a quantized copy served with the original's generation config ends
    where the original does); auto and vllm keep the model's own."""
    from pipeline_dsl.engine import SamplingParams
    from tiny_model import tiny_engine, write_tiny_hf_folder
    from test_engine import run_all

    folder = write_tiny_hf_folder(tmp_path / "hf", tiny_gguf)                 # no generation_config.json
    other = tmp_path / "original"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "temperature": 0.5}))
    got = {}
    for setting in ("auto", "vllm", str(other)):
        engine = tiny_engine(folder, generation_config=setting)
        engine.add_request("0", prompt="the cat", params=SamplingParams(temperature=0.0, max_tokens=3,
                                                                         logit_bias={0: 100.0}))
        out = run_all(engine)[0]["0"]
        got[setting] = (out.finish_reason, out.stop_reason, out.completion_tokens)
    assert got == {"auto": ("length", None, 3), "vllm": ("length", None, 3), str(other): ("stop", 0, 1)}


def test_engines_sharing_loaded_weights_keep_their_own_generation_config_folder_end_tokens(tmp_path, tiny_gguf,
                                                                                          monkeypatch):
    """Two engines on one LoadedModels (one model, one tokenizer as loaded), one given a
    --generation-config folder listing another end token: that engine ends on it, the other does not,
    whichever loads first; the folder's file is read once for its sampling defaults and its end tokens."""
    from pathlib import Path

    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
    from pipeline_dsl.engine.models import LoadedModels
    from tiny_model import write_tiny_hf_folder
    from test_engine import run_all

    folder = write_tiny_hf_folder(tmp_path / "hf", tiny_gguf)                 # its eos: <|im_end|>, id 2
    other = tmp_path / "original"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "temperature": 0.5}))
    reads = []
    read_bytes = Path.read_bytes

    def spy(self):
        if self == other / "generation_config.json":
            reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy)

    def ending(engine) -> tuple:
        engine.add_request("0", prompt="the cat", params=SamplingParams(temperature=0.0, max_tokens=3,
                                                                         logit_bias={0: 100.0}))
        out = run_all(engine)[0]["0"]
        return out.finish_reason, out.completion_tokens

    for order in (("folder", "auto"), ("auto", "folder")):
        models = LoadedModels()
        engines = {name: Engine(EngineConfig(model=str(folder), dtype="fp32", kv_budget_bytes=4 << 20,
                                             generation_config=str(other) if name == "folder" else "auto"),
                                models=models) for name in order}
        assert models.cache_info()["loads"] == 1
        assert {name: ending(e) for name, e in engines.items()} == {"folder": ("stop", 1), "auto": ("length", 3)}
        assert engines["folder"].generation_defaults == {"temperature": 0.5}
        assert engines["folder"].tokenizer.eos_token_ids == engines["auto"].tokenizer.eos_token_ids   # as loaded
    assert len(reads) == 2, reads                                              # once per engine given it


@pytest.mark.parametrize("file, eos", [("generation_config.json", "2"), ("generation_config.json", [2, 3.0]),
                                       ("generation_config.json", True), ("config.json", [-1])])
def test_an_eos_token_id_that_is_no_token_id_is_refused_naming_the_file_it_is_in(tmp_path, tiny_gguf, file, eos):
    """eos_token_id (generation_config.json's, config.json's where the folder has none) lists
    integers from 0: a string, a float, true or a negative one stops the load naming the file and
    the key, and `agp serve FOLDER` exits 2 saying so (a string was a TypeError, exit 1)."""
    from pipeline_dsl.engine.models import load_model
    from tiny_model import write_tiny_hf_folder

    folder = write_tiny_hf_folder(tmp_path / "hf", tiny_gguf)                 # no generation_config.json
    config = json.loads((folder / file).read_text()) if (folder / file).is_file() else {}
    (folder / file).write_text(json.dumps({**config, "eos_token_id": eos}))
    with pytest.raises(ModelFileError, match="'eos_token_id' must be a token id") as e:
        load_model(str(folder), dtype="fp32")
    assert str(folder / file) in str(e.value)
    if file == "generation_config.json" and eos == "2":
        proc = clikit.agp_in("serve", str(folder), "--port", "0")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{folder / file}: 'eos_token_id' must be a token id" in proc.stderr, proc.stderr


def test_a_generation_config_folder_whose_eos_token_id_is_no_token_id_exits_2_naming_its_file(tmp_path, folder):
    """--generation-config FOLDER brings that folder's end tokens: one that is no token id stops
    agp run as the model's own file does (exit 2 naming the file), not as an internal error."""
    other = tmp_path / "original"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, "3"]}))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "the cat"}) + "\n")
    proc = clikit.agp_in("run", pipeline(tmp_path, folder), "-i", inp, "-o", tmp_path / "out.jsonl", "--threads", "1",
                         "--no-progress", "--generation-config", str(other))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert f"{other / 'generation_config.json'}: 'eos_token_id' must be a token id" in proc.stderr, proc.stderr
