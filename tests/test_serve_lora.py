"""agp serve --lora-modules: PEFT adapters served beside the model (serve/lora.py), named by a
request's `model` in chat, completions and responses, whole and streamed; listed by /v1/models
as vLLM lists them; applied by the generate stages whose model they fit; refused at start (exit 2)
naming the flag, the file and the key."""
from __future__ import annotations

import argparse
import json

import pytest
from starlette.testclient import TestClient

from pipeline_dsl import cli
from pipeline_dsl.commands import serve
from pipeline_dsl.serve.build import build
from tiny_lora import write_tiny_lora
from tiny_model import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HI = [{"role": "user", "content": "the quick brown fox"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


def parse(argv):
    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("loras") / "strong-adapter", seed=3, strength=30.0)


@pytest.fixture(scope="module")
def client(tiny_gguf, strong):
    """One server for the tests that only send it requests (none changes what it serves)."""
    spec = json.dumps({"name": "sql", "path": str(strong), "base_model_name": "tiny-base"})
    serving = build(parse([str(tiny_gguf), "--threads", "1", "--served-model-name", "tiny",
                           "--enable-lora", "--lora-modules", f"strong={strong}", spec]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as c:
            yield c
    finally:
        serving.runtime.close()


def chat(client, model, **kw):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": HI, **GREEDY, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(client, path, body) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_adapters_are_listed_as_vllm_lists_them(client):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["strong"]["parent"] == "tiny" and cards["strong"]["root"] == "strong-adapter"
    assert cards["sql"]["parent"] == "tiny-base" and cards["tiny"]["parent"] is None
    assert client.get("/v1/models/sql").json()["root"] == "strong-adapter"


def test_metrics_carry_vllms_lora_requests_info(client):
    chat(client, "strong")
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1 and 'max_lora="2"' in lines[0], lines
    assert 'running_lora_adapters=""' in lines[0] and 'waiting_lora_adapters=""' in lines[0]   # none now


def test_a_request_naming_an_adapter_is_answered_with_it(client):
    base = chat(client, "tiny")
    adapted = chat(client, "strong")
    assert adapted["model"] == "strong"
    assert adapted["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert chat(client, "sql")["choices"][0]["message"]["content"] == adapted["choices"][0]["message"]["content"]
    assert chat(client, "tiny")["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
    chunks = streamed(client, "/v1/chat/completions", {"model": "strong", "messages": HI, **GREEDY})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
        == adapted["choices"][0]["message"]["content"]
    assert {c["model"] for c in chunks} == {"strong"}

    def completion(model):
        r = client.post("/v1/completions", json={"model": model, "prompt": "the quick brown fox", **GREEDY})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert completion("strong") != completion("tiny")
    chunks = streamed(client, "/v1/completions", {"model": "strong", "prompt": "the quick brown fox", **GREEDY})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == completion("strong")

    def response(model):
        r = client.post("/v1/responses", json={"model": model, "input": "the quick brown fox", "temperature": 0,
                                               "max_output_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["output"][0]["content"][0]["text"]

    assert response("strong") != response("tiny")

    def embedding(model):
        r = client.post("/v1/embeddings", json={"model": model, "input": "the quick brown fox"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["data"][0]["embedding"]

    assert embedding("strong") != embedding("tiny")


def test_an_unknown_model_is_still_a_404(client):
    r = client.post("/v1/chat/completions", json={"model": "strongg", "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


TWO = """pipeline two {{
    model  = "{small}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage route   : route    {{}}
    stage b1 : dynamic_batch {{ timeout = 1ms }}
    stage e1 : encode        {{}}
    stage k1 : kv_lookup     {{ budget = 1MiB }}
    stage small_gen : generate {{ max_new_tokens = 8 }}
    stage b2 : dynamic_batch {{ timeout = 1ms }}
    stage e2 : encode        {{}}
    stage k2 : kv_lookup     {{ budget = 1MiB }}
    stage wide_gen : generate {{ model = "{wide}"  max_new_tokens = 8 }}
    stage out : respond {{}}
    request -> route
    route -> b2 when metadata.engine == "wide"
    route -> b1 otherwise
    b1 -> e1 -> k1 -> small_gen -> out
    b2 -> e2 -> k2 -> wide_gen -> out
}}
"""


def test_in_a_pipeline_of_two_models_an_adapter_applies_to_the_stages_of_the_model_it_fits(tiny_gguf, strong,
                                                                                           tmp_path):
    wide = write_tiny_gguf(tmp_path / "wide.gguf", hidden=96, heads=6, kv_heads=2)
    path = tmp_path / "two.agp"
    path.write_text(TWO.format(small=tiny_gguf, wide=wide))
    serving = build(parse([str(path), "--threads", "1", "--lora-modules", f"strong={strong}"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as c:
            def text(model, engine):
                r = c.post("/v1/completions", json={"model": model, "prompt": "the quick brown fox",
                                                    "metadata": {"engine": engine}, **GREEDY})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            assert text("strong", "small") != text("two", "small")
            assert text("strong", "wide") == text("two", "wide")        # the wide model's own weights
            assert c.get("/v1/models/strong").json()["parent"] == "two"
    finally:
        serving.runtime.close()


@pytest.mark.parametrize("spec, said", [
    (["strong"], "--lora-modules 'strong': expected NAME=PATH"),
    (['{"name": "a"}'], "'path' must be a non-empty string"),
    (['{"name": "a", "path": "x", "rank": 2}'], "unknown key 'rank'"),
    (["a={tmp}/missing"], "--lora-modules a: {tmp}/missing: not a folder"),
    (["a={tmp}/embed"], "--lora-modules a: {tmp}/embed/adapter_config.json: target_modules: 'lm_head'"),
    (["a={tmp}/wide"], "--lora-modules a: {tmp}/wide/adapter_model.safetensors: "
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: has shape [4, 96]"),
    (["a={tmp}/ok", "a={tmp}/ok"], "the name 'a' is given twice"),
    (["tiny={tmp}/ok"], "--lora-modules tiny: the name is already the server's"),
])
def test_an_adapter_agp_cannot_serve_stops_the_start(capsys, tiny_gguf, tmp_path, spec, said):
    import torch

    write_tiny_lora(tmp_path / "ok")
    write_tiny_lora(tmp_path / "embed", config={"target_modules": ["q_proj", "lm_head"]})
    write_tiny_lora(tmp_path / "wide", targets=("q_proj",),
                    extra={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 96)})
    spec, said = [s.replace("{tmp}", str(tmp_path)) for s in spec], said.replace("{tmp}", str(tmp_path))
    args = ["serve", str(tiny_gguf), "--port", "0", "--served-model-name", "tiny", "--threads", "1",
            "--lora-modules", *spec]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_an_adapter_named_as_a_generate_stage_stops_the_start(tiny_gguf, strong):
    """A request's `model` may name a generate stage (it pins that stage) or an adapter: an adapter
    named as one of the pipeline's generate stages (`gen`, agp serve MODEL's) would make such a
    request mean two things, and stops the start naming it, as one named as a served model does."""
    from pipeline_dsl.serve.options import SetupError

    serving = None
    try:
        with pytest.raises(SetupError, match="--lora-modules gen: the name is already the server's"):
            serving = build(parse([str(tiny_gguf), "--threads", "1", "--served-model-name", "tiny",
                                   "--lora-modules", f"gen={strong}"]))
    finally:
        if serving is not None:
            serving.runtime.close()


ONE = """pipeline one {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage batch : dynamic_batch {{ timeout = 1ms }}
    stage encode : encode {{}}
    stage kv : kv_lookup {{ budget = 1MiB }}
    stage gen : generate {{ max_new_tokens = 8{lora} }}
    stage out : respond {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
"""


def pipeline_file(tmp_path, model, lora=None, name="one.agp"):
    path = tmp_path / name
    path.write_text(ONE.format(model=model, lora=f'  lora = "{lora}"' if lora else ""))
    return path


def test_a_generate_stage_answers_with_its_own_adapter(tiny_gguf, strong, tmp_path):
    import shutil

    shutil.copytree(strong, tmp_path / "mine")
    other = write_tiny_lora(tmp_path / "other", seed=9, strength=30.0)

    def texts(path, *models, lora_modules=()):
        serving = build(parse([str(path), "--threads", "1", *(["--lora-modules", *lora_modules] if lora_modules
                                                              else [])]))
        try:
            with TestClient(serving.app, base_url="http://localhost") as c:
                out = []
                for model in models:
                    r = c.post("/v1/completions", json={"model": model, "prompt": "the quick brown fox", **GREEDY})
                    assert r.status_code == 200, r.text
                    out.append(r.json()["choices"][0]["text"])
                return out
        finally:
            serving.runtime.close()

    own, named = texts(pipeline_file(tmp_path, tiny_gguf, "mine"), "one", "other", lora_modules=[f"other={other}"])
    # the pipeline without a stage adapter, both adapters served by name beside it (one server:
    # a request naming one adapter, or none, is answered with that one alone)
    base, served, other_alone = texts(pipeline_file(tmp_path, tiny_gguf, name="base.agp"), "one", "mine", "other",
                                      lora_modules=[f"mine={strong}", f"other={other}"])
    assert own != base and own == served           # the stage's adapter, as the same adapter served by name
    assert named == other_alone != own             # a request naming another adapter takes that one


def test_agp_check_refuses_a_generate_stages_adapter_at_its_setting(tiny_gguf, tmp_path, capsys):
    write_tiny_lora(tmp_path / "dora", config={"use_dora": True})
    (write_tiny_lora(tmp_path / "unsaved") / "adapter_model.safetensors").unlink()
    for lora, said in (("missing", "lora folder not found: 'missing'"),
                       ("dora", "lora adapter dora/adapter_config.json: use_dora: DoRA adapters are not supported"),
                       ("unsaved", "lora adapter unsaved/adapter_model.safetensors: missing")):
        path = pipeline_file(tmp_path, tiny_gguf, lora)
        assert cli.main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        col = ONE.format(model=tiny_gguf, lora=f'  lora = "{lora}"').splitlines()[8].index(f'"{lora}"') + 1
        assert f"one.agp:9:{col}: error: {said}" in err, err


def test_a_generate_stages_adapter_that_does_not_fit_stops_the_start(tiny_gguf, tmp_path, capsys):
    import torch

    write_tiny_lora(tmp_path / "wide", targets=("q_proj",),
                    extra={"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(96, 4)})
    path = pipeline_file(tmp_path, tiny_gguf, "wide")
    assert cli.main(["serve", str(path), "--port", "0", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert ("generate stage 'gen': lora: " f"{tmp_path}/wide/adapter_model.safetensors: "
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight: has shape [96, 4]") in err, err
    assert "Traceback" not in err


def test_a_derived_pipeline_in_another_folder_answers_with_the_adapter_its_base_names(tiny_gguf, strong, tmp_path):
    """`lora` and `json_schema` are looked up beside the file that wrote them: a derived pipeline
    that copies a stage from a base in another folder (use "../A/base.agp") runs with the files
    agp check found there, not with paths read from the working directory."""
    import shutil

    import pipeline_dsl

    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    shutil.copytree(strong, tmp_path / "A" / "mine")
    (tmp_path / "A" / "person.json").write_text('{"type": "object"}')
    pipeline_file(tmp_path / "A", tiny_gguf, "mine", name="base.agp")
    derived = tmp_path / "B" / "derived.agp"
    derived.write_text('use "../A/base.agp"\npipeline two : one { gen.max_new_tokens = 6 }\n')
    allow = ["--allow-path", str(tmp_path)]
    assert cli.main(["check", str(derived), *allow]) == 0

    def text(path, model, *flags):
        serving = build(parse([str(path), "--threads", "1", *flags]))
        try:
            with TestClient(serving.app, base_url="http://localhost") as c:
                r = c.post("/v1/completions", json={"model": model, "prompt": "the quick brown fox", **GREEDY,
                                                    "max_tokens": 6})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
        finally:
            serving.runtime.close()

    assert text(derived, "two", *allow) == text(tmp_path / "A" / "base.agp", "one")
    # json_schema too: the graph agp run and agp serve run holds the file beside the base
    schema = tmp_path / "B" / "schema.agp"
    schema.write_text(ONE.format(model=tiny_gguf, lora="").replace("max_new_tokens = 8",
                                                                   'json_schema = "person.json"')
                      .replace("pipeline one", "pipeline base"), encoding="utf-8")
    shutil.move(str(schema), tmp_path / "A" / "schema.agp")
    derived.write_text('use "../A/schema.agp"\npipeline two : base { gen.max_new_tokens = 6 }\n')
    graph = pipeline_dsl.load_pipeline_graph(str(derived), "two", allow_paths=[str(tmp_path)])
    assert graph.nodes["gen"]["params"]["json_schema"] == str(tmp_path / "A" / "person.json")


@pytest.mark.parametrize("value, specs", [
    ('{"name": "sql", "path": "/a/sql"}', [("sql", "/a/sql", None)]),        # vLLM's JSON form: commas inside
    ('[{"name": "sql", "path": "/a/sql", "base_model_name": "b"}, "chat=/a/chat"]',
     [("sql", "/a/sql", "b"), ("chat", "/a/chat", None)]),
    ('sql=/a/sql, {"name": "chat", "path": "/a/x,y"}', [("sql", "/a/sql", None), ("chat", "/a/x,y", None)]),
    ("sql=/a/s,q,l,chat=/a/chat", [("sql", "/a/s,q,l", None), ("chat", "/a/chat", None)]),
])
def test_agp_lora_modules_takes_what_the_flag_takes(value, specs):
    from pipeline_dsl.serve.options import parse_specs
    from pipeline_dsl.serve.options import env_defaults

    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    env_defaults(p, {"AGP_LORA_MODULES": value})
    assert parse_specs(p.parse_args(["model.gguf"]).lora_modules) == specs


def test_a_bad_agp_lora_modules_list_is_refused_naming_the_variable(capsys):
    from pipeline_dsl.serve.options import env_defaults

    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    with pytest.raises(SystemExit) as e:
        env_defaults(p, {"AGP_LORA_MODULES": "[1]"})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "environment variable AGP_LORA_MODULES='[1]': a JSON list of adapters holds NAME=PATH" in err, err


def test_a_generate_stages_own_adapter_is_shown_by_its_card_and_adapters_are_listed_last(tiny_gguf, strong, tmp_path):
    """/v1/models: the served names, the generate stages, then the adapters (docs/serve.md); the card
    of a stage that answers with its own adapter shows it (root its folder, parent the stage's
    model), and the engine holds it under the stage's name, which its metrics' labels show."""
    import shutil

    shutil.copytree(strong, tmp_path / "mine")
    other = write_tiny_lora(tmp_path / "other-adapter", seed=9, strength=30.0)
    serving = build(parse([str(pipeline_file(tmp_path, tiny_gguf, "mine")), "--threads", "1",
                           "--lora-modules", f"other={other}"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as c:
            cards = c.get("/v1/models").json()["data"]
            assert [m["id"] for m in cards] == ["one", tiny_gguf.name, tiny_gguf.stem, "gen", "other"]
            gen = c.get("/v1/models/gen").json()
            assert (gen["root"], gen["parent"]) == ("mine", tiny_gguf.name)
            assert (cards[-1]["root"], cards[-1]["parent"]) == ("other-adapter", "one")
            engines = c.get("/stats").json()["engines"]
            assert [e["lora_adapters"] for e in engines.values()] == [["gen", "other"]]
    finally:
        serving.runtime.close()
