"""Finding and loading models: names, .gguf paths, HF folders, and clear errors."""

import pytest
import torch
from tiny_model import write_tiny_hf_folder

from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.engine.models import ModelNotFoundError, load_model, resolve_model


def test_unknown_model_name_is_a_clear_input_error():
    with pytest.raises(InputError, match="unknown model 'smollm3-tiny'.*smollm2-135m-instruct"):
        resolve_model("smollm3-tiny")


def test_non_gguf_file_and_folder_without_config_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_a_model_given_as_a_path_object_resolves_as_its_string(tiny_gguf):
    # EngineConfig(model=Path(...)) stopped with AttributeError: 'PosixPath' object has no attribute 'strip'
    from pathlib import Path

    assert resolve_model(Path(tiny_gguf)) == resolve_model(str(tiny_gguf))
    with pytest.raises(ModelNotFoundError, match="model must be a name or a path, not int 7"):
        resolve_model(7)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="bad.gguf"):
        load_model(str(bad), dtype="fp32")


def test_default_model_is_the_embedded_gguf():
    src = resolve_model(None)
    assert src.kind == "gguf" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.is_file()
    assert resolve_model("SmolLM2-135M-Instruct").path == src.path


def test_gguf_path_loads_model_and_tokenizer(tiny_gguf):
    model, tok = load_model(str(tiny_gguf), dtype="fp32")
    assert model.config.num_layers == 2 and tok.eos_token_ids == frozenset({2})
    assert model.forward_full(tok.encode(" the world")).shape == (2, model.config.vocab_size)


def test_hf_folder_gives_the_same_logits_as_the_gguf(tmp_path, tiny_gguf):
    write_tiny_hf_folder(tmp_path, tiny_gguf)
    _, gguf_tok = load_model(str(tiny_gguf), dtype="fp32")
    hf_model, hf_tok = load_model(str(tmp_path), dtype="fp32")
    gguf_model, _ = load_model(str(tiny_gguf), dtype="fp32")
    msgs = [{"role": "user", "content": "the cat"}]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True)
    assert ids == gguf_tok.apply_chat_template(msgs, tokenize=True)
    assert hf_tok.eos_token_ids == frozenset({2})
    assert torch.allclose(hf_model.forward_full(ids), gguf_model.forward_full(ids), atol=1e-5)
