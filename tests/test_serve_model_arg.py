"""`agp serve MODEL`, as vLLM's `vllm serve MODEL`: FILE may name a model (a .gguf file, a Hugging
Face folder, an embedded model) instead of a pipeline file; agp serves it with a pipeline of its
own, under the name FILE was given as (vLLM's default --served-model-name), which clients send as
`model`. A FILE that is neither (a Hub id: agp downloads nothing) stops the start naming what
FILE may be."""
from __future__ import annotations

import argparse

import pytest
from starlette.testclient import TestClient

from pipeline_dsl import cli
from pipeline_dsl.commands import serve
from pipeline_dsl.serve.build import build
from tiny_model import write_tiny_hf_folder


def parse(argv):
    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    return p.parse_args(argv)


def served(argv):
    """(the ids /v1/models lists, the answer of a chat request naming the first) of `agp serve argv`."""
    serving = build(parse([*argv, "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:   # a Host it answers
            return asked(client)
    finally:
        serving.runtime.close()


def asked(client):
    """(the ids /v1/models lists, the answer of a chat request naming the first) of a served app."""
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    r = client.post("/v1/chat/completions", json={"model": ids[0], "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return ids, r.json()


def test_a_pipeline_file_is_still_served_as_one(tiny_gguf, tmp_path):
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    ids, _ = served([str(path)])
    assert ids[0] == "tiny"


@pytest.mark.parametrize("file, said", [
    ("Org/Some-Model-7B", "'Org/Some-Model-7B' is neither a pipeline (.agp) file nor a model: give a .agp file, "
                          "or a model to serve as vLLM's `vllm serve MODEL` does: a .gguf file, a Hugging Face "
                          "model folder (with its config.json) or an embedded model (smollm2-135m-instruct); agp "
                          "downloads nothing"),
    ("missing.agp", "file not found: 'missing.agp'"),             # a pipeline file, as ever
    # Ollama's name:tag: where its file is
    ("llama3.2:1b", "An Ollama model's file is in Ollama's store: `ollama show --modelfile llama3.2:1b` prints its "
                    "path (FROM .../blobs/sha256-...); link it as a .gguf file (ln -s PATH model.gguf), serve the "
                    "link, and --served-model-name llama3.2:1b keeps the name clients send"),
    ("{tmp}/folder", "'{tmp}/folder' is a folder without a config.json, so neither a pipeline file nor a model"),
    ("{tmp}/model.safetensors", "'{tmp}/model.safetensors' is a file of weights alone"),
])
def test_a_file_that_is_neither_a_pipeline_nor_a_model_stops_the_start(capsys, tmp_path, file, said):
    file, said = file.format(tmp=tmp_path), said.format(tmp=tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    assert cli.main(["serve", file, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    if not file.endswith(".agp"):
        assert "listening" not in err                             # refused before the port is taken
        assert "a .gguf file, a Hugging Face model folder" in err


def test_a_gguf_link_to_a_file_of_another_name_is_served(tiny_gguf, tmp_path):
    """A Hugging Face cache holds snapshots/REV/m.gguf as a link to blobs/SHA256, and llama.cpp
    serves the link: agp followed it to the blob, then refused the blob as 'not a .gguf file'."""
    blob = tmp_path / "blobs" / "6a1a2eb6d156"
    blob.parent.mkdir()
    blob.write_bytes(tiny_gguf.read_bytes())
    link = tmp_path / "snapshots" / "rev" / "tiny.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    ids, answer = served([str(link)])
    assert ids[0] == str(link) and answer["usage"]["completion_tokens"] == 2


def test_a_gguf_path_through_a_linked_folder_is_read_as_the_system_reads_it(tiny_gguf, tmp_path):
    """b/link/../m.gguf, with b/link a link to a/real, is a/m.gguf: agp wrote '..' out textually to
    b/m.gguf and stopped with 'model not found' (or served another b/m.gguf)."""
    (tmp_path / "a" / "real").mkdir(parents=True)
    (tmp_path / "a" / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link").symlink_to(tmp_path / "a" / "real")
    model = str(tmp_path / "b" / "link" / ".." / "m.gguf")
    ids, answer = served([model])
    assert ids[0] == model and answer["usage"]["completion_tokens"] == 2


def test_a_dangling_link_is_told_what_it_points_to(tmp_path, capsys):
    """It was 'neither a pipeline (.agp) file nor a model ... a Hub id must be a local folder'."""
    (tmp_path / "d.gguf").symlink_to("/nowhere/blob")
    (tmp_path / "r.gguf").symlink_to("blobs/gone")
    for name, said in (("d.gguf", "is a link to '/nowhere/blob', which does not exist"),
                       ("r.gguf", f"is a link to 'blobs/gone' (from '{tmp_path}'), which does not exist")):
        assert cli.main(["serve", str(tmp_path / name), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert f"'{tmp_path / name}' {said}" in err and "Hub id" not in err, err
        assert "listening" not in err


def test_a_gguf_file_without_its_extension_is_told_to_be_linked_as_one(tiny_gguf, tmp_path, capsys):
    """Ollama keeps a model as blobs/sha256-...: it was read as a pipeline file and refused as 'a model
    (a GGUF file), not a pipeline' with the hint '`agp serve MODEL` serves a model as it is', which is
    what the user had typed."""
    blob = tmp_path / "sha256-6a1a2eb6d156"
    blob.write_bytes(tiny_gguf.read_bytes())
    assert cli.main(["serve", str(blob), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert (f"'{blob}' is a GGUF model without the .gguf extension (as Ollama stores its models' files): agp takes "
            "a model file by its .gguf name; link it as one (ln -s FILE model.gguf)") in err, err
    assert "listening" not in err                                 # refused before the port is taken


def test_a_model_has_no_pipeline_to_pick(tiny_gguf, capsys):
    assert cli.main(["serve", str(tiny_gguf), "--port", "0", "--pipeline", "chat"]) == 2
    err = capsys.readouterr().err
    assert "--pipeline chat picks a pipeline of a .agp file" in err, err
    assert "listening" not in err                                 # refused before the port is taken


def answers(argv, *bodies):
    """The JSON answers of `agp serve argv` to (path, body) each."""
    serving = build(parse([*argv, "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            out = []
            for path, body in bodies:
                r = client.post(path, json=body)
                assert r.status_code == 200, r.text
                out.append(r.json())
            return out
    finally:
        serving.runtime.close()


HI = [{"role": "user", "content": "hi"}]


def test_a_model_samples_by_vllms_defaults_where_its_generation_config_sets_none(tiny_gguf):
    """vLLM answers a chat request that sets no max_tokens with all the context leaves, at temperature 1
    (its SamplingParams' defaults), unless the model's generation config says otherwise; agp's
    generate stage defaults (128 tokens, greedy) cut such answers short. A completions request without
    max_tokens gets 16 tokens, as vLLM's CompletionRequest and OpenAI's completions API default it (it
    got all the context leaves, as chat does)."""
    chat, resp, text = answers([str(tiny_gguf), "--max-model-len", "96"],    # the context: 96 of the tiny model's 512
                               ("/v1/chat/completions", {"messages": HI, "ignore_eos": True}),
                               ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                               ("/v1/completions", {"prompt": "hi", "ignore_eos": True}))
    use = chat["usage"]
    assert use["prompt_tokens"] + use["completion_tokens"] == 96            # all the context leaves
    assert chat["choices"][0]["finish_reason"] == "length"
    assert resp["temperature"] == 1.0
    assert text["usage"]["completion_tokens"] == 16 and text["choices"][0]["finish_reason"] == "length"
    # what the generation config sets is the default, as in vLLM (here set by the override flag), and
    # where it is fewer than 16 it holds for completions too
    chat, resp, text = answers([str(tiny_gguf), "--override-generation-config",
                                '{"max_new_tokens": 3, "temperature": 0.5}'],
                               ("/v1/chat/completions", {"messages": HI, "ignore_eos": True}),
                               ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                               ("/v1/completions", {"prompt": "hi", "ignore_eos": True}))
    assert chat["usage"]["completion_tokens"] == 3 and resp["temperature"] == 0.5
    assert text["usage"]["completion_tokens"] == 3


def test_a_min_tokens_above_the_completions_default_of_16_is_refused_as_when_16_is_sent(tiny_served):
    """A completions request with min_tokens 20 and no max_tokens got 16 tokens in silence (the
    default was set after min_tokens was checked), though with max_tokens 16 sent it is a 400:
    refused alike, as vLLM does. Chat has no such default: its min_tokens is checked as sent."""
    client = tiny_served
    sent = client.post("/v1/completions", json={"prompt": "hi", "min_tokens": 20, "max_tokens": 16})
    default = client.post("/v1/completions", json={"prompt": "hi", "min_tokens": 20})
    within = client.post("/v1/completions", json={"prompt": "hi", "min_tokens": 16, "ignore_eos": True})
    invoked = client.post("/invocations", json={"prompt": "hi", "min_tokens": 20})
    chat = client.post("/v1/chat/completions", json={"messages": HI, "min_tokens": 20, "max_tokens": 24,
                                                     "ignore_eos": True})
    assert sent.status_code == default.status_code == 400, default.text
    assert default.json()["error"]["param"] == sent.json()["error"]["param"] == "min_tokens"
    assert "'min_tokens' = 20 is above 'max_tokens' = 16" in default.json()["error"]["message"]
    assert "16, the completions default where a request sets none" in default.json()["error"]["message"]
    assert "(give max_tokens >= min_tokens)" in default.json()["error"]["message"]
    assert "completions default" not in sent.json()["error"]["message"]      # sent: no default to name
    assert invoked.status_code == 400 and invoked.json()["error"] == default.json()["error"]
    assert within.status_code == 200 and within.json()["usage"]["completion_tokens"] == 16
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 24


@pytest.fixture(scope="module")
def tiny_served(tiny_gguf):
    """A client of `agp serve TINY.gguf --threads 1`, for the tests that ask that server alone (last
    in the module: it stays up until the module's end, and an idle engine still wakes every few
    milliseconds)."""
    serving = build(parse([str(tiny_gguf), "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:   # a Host it answers
            yield client
    finally:
        serving.runtime.close()


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_a_model_is_served_under_the_name_it_was_given_as(kind, tiny_gguf, tmp_path, request):
    model = str(tiny_gguf if kind == "gguf" else write_tiny_hf_folder(tmp_path / "tiny-hf", tiny_gguf))
    ids, answer = asked(request.getfixturevalue("tiny_served")) if kind == "gguf" else served([model])
    assert ids[0] == model                       # vLLM: the served name is the model as given
    assert answer["model"] == model and answer["usage"]["completion_tokens"] == 2
    ids, answer = served([model, "--served-model-name", "mine"])
    assert ids[0] == "mine" and model not in ids and answer["model"] == "mine"
