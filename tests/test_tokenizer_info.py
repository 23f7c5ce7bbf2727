"""GET /tokenizer_info of a Hugging Face folder, as vLLM answers it: the tokenizer's config with each
token as its text (vLLM serves transformers' init_kwargs so): bos, eos, pad and unk tokens, the
other named ones, a model's own (model_specific_special_tokens, as transformers 5 keeps them) and
the added tokens by id, beside the chat template (lm-eval's remote tokenizer reads eos_token,
bos_token and pad_token there)."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from pipeline_dsl.engine.models import load_model
from pipeline_dsl.serve.build import build
from test_model_families import gguf_as_hf_folder
from test_serve_model_arg import parse

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]       # the tiny vocabulary's ids 0, 1 and 2


def info_of(folder) -> dict:
    serving = build(parse([str(folder), "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            r = client.get("/tokenizer_info")
            assert r.status_code == 200, r.text
            return r.json()
    finally:
        serving.runtime.close()


def vllms(folder) -> dict:
    """What vLLM's /tokenizer_info answers for `folder`: transformers' init_kwargs, tokens as text."""
    transformers = pytest.importorskip("transformers")

    def text(v):
        return v.content if hasattr(v, "content") else {k: text(x) for k, x in v.items()} if isinstance(v, dict) \
            else [text(x) for x in v] if isinstance(v, list) else v

    init = text(dict(transformers.AutoTokenizer.from_pretrained(str(folder)).init_kwargs))
    return json.loads(json.dumps(init, default=str))                    # as its JSON answer has it


def test_tokenizer_info_names_the_folder_s_special_and_added_tokens_as_vllm_does(tmp_path, tiny_gguf):
    _, tok = load_model(str(tiny_gguf), dtype="fp32")
    folder = gguf_as_hf_folder(tiny_gguf, tmp_path, tok)
    added = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, t in enumerate(ADDED)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>", "unk_token": None, "sep_token": "<|im_end|>", "image_token": "<|endoftext|>",
        "added_tokens_decoder": added, "chat_template": tok.chat_template}))
    info, theirs = info_of(folder), vllms(folder)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "model_specific_special_tokens"):
        assert info.get(key) == theirs.get(key), key
    assert (info["pad_token"], info["unk_token"], info["model_specific_special_tokens"]) == \
        ("<|endoftext|>", None, {"image_token": "<|endoftext|>"})
    assert info["added_tokens_decoder"] == {str(i): t for i, t in enumerate(ADDED)} == theirs["added_tokens_decoder"]
    assert info["chat_template"] == tok.chat_template
