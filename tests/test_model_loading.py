"""Finding and loading models: names, .gguf paths, HF folders, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.engine.gguf_loader import load_gguf
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
    g = load_gguf(tiny_gguf)
    c = g.config
    hf = {"model.embed_tokens.weight": g.weights["embed"], "model.norm.weight": g.weights["norm"]}
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(c.num_layers):
        for ours, theirs in parts.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = g.weights[f"layers.{i}.{ours}"].contiguous()
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "max_position_embeddings": 512,
        "tie_word_embeddings": True}))
    _, gguf_tok = load_model(str(tiny_gguf), dtype="fp32")
    gguf_tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": gguf_tok.chat_template}))

    hf_model, hf_tok = load_model(str(tmp_path), dtype="fp32")
    gguf_model, _ = load_model(str(tiny_gguf), dtype="fp32")
    msgs = [{"role": "user", "content": "the cat"}]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True)
    assert ids == gguf_tok.apply_chat_template(msgs, tokenize=True)
    assert hf_tok.eos_token_ids == frozenset({2})
    assert torch.allclose(hf_model.forward_full(ids), gguf_model.forward_full(ids), atol=1e-5)
