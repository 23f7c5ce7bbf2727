"""A model's named "tool_use" chat template renders a request that gives tools, as transformers'
and vLLM's get_chat_template pick it (Hermes' folders and GGUF files have one): the
tokenizer_config.json list of named templates, the additional_chat_templates/tool_use.jinja
transformers writes beside chat_template.jinja, a GGUF's `tokenizer.chat_template.tool_use`; a
request without tools gets the default one, and --chat-template replaces both."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from pipeline_dsl.serve.build import build
from test_serve_model_arg import parse
from tiny_model import write_tiny_gguf, write_tiny_hf_folder

DEFAULT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOL_USE = ("<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}"
            "Call them as <tool_call>{}</tool_call><|im_end|>\n" + DEFAULT)
NAMED = [{"name": "default", "template": DEFAULT}, {"name": "tool_use", "template": TOOL_USE}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


def rendered(model, *flags) -> tuple[str, str, str]:
    """The text of /tokenize's messages with tools, without, and of a chat request's prompt with tools."""
    serving = build(parse([str(model), "--threads", "1", *flags]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            texts = []
            for tools in (TOOLS, None):
                r = client.post("/tokenize", json={"model": str(model), "messages": MESSAGES, "tools": tools,
                                                   "return_token_strs": True})
                assert r.status_code == 200, r.text
                r = client.post("/detokenize", json={"model": str(model), "tokens": r.json()["tokens"]})
                texts.append(r.json()["prompt"])
            r = client.post("/v1/chat/completions", json={"model": str(model), "messages": MESSAGES, "tools": TOOLS,
                                                          "max_tokens": 1, "return_token_ids": True})
            assert r.status_code == 200, r.text
            r = client.post("/detokenize", json={"model": str(model), "tokens": r.json()["prompt_token_ids"]})
            return texts[0], texts[1], r.json()["prompt"]
    finally:
        serving.runtime.close()


def transformers_renders(folder, tools):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return tok.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def named_folder(tmp_path_factory, tiny_gguf):
    folder = write_tiny_hf_folder(tmp_path_factory.mktemp("named") / "hermes", tiny_gguf)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": NAMED}))
    return folder


def test_a_folder_s_named_tool_use_template_renders_a_request_with_tools_as_transformers_does(named_folder):
    with_tools, without, chat = rendered(named_folder)
    assert with_tools == transformers_renders(named_folder, TOOLS) == chat
    assert with_tools.startswith("<|im_start|>system\nTools: get_weather Call them as <tool_call>")
    assert without == transformers_renders(named_folder, None)
    assert without == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_tool_use_template_transformers_saves_beside_chat_template_jinja_is_read(tmp_path, named_folder):
    transformers = pytest.importorskip("transformers")
    transformers.AutoTokenizer.from_pretrained(str(named_folder)).save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").is_file()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((named_folder / name).read_bytes())
    with_tools, without, _ = rendered(tmp_path)
    assert with_tools == transformers_renders(tmp_path, TOOLS) and with_tools.startswith("<|im_start|>system\nTools:")
    assert without == transformers_renders(tmp_path, None)


def test_a_gguf_s_tool_use_template_renders_a_request_with_tools(tmp_path):
    path = write_tiny_gguf(tmp_path / "hermes.gguf", chat_template=NAMED)
    with_tools, without, chat = rendered(path)
    assert with_tools == chat and with_tools.startswith("<|im_start|>system\nTools: get_weather")
    assert without.startswith("<|im_start|>user\nhi")


def test_a_chat_template_given_replaces_the_tool_use_one_too(tmp_path, named_folder):
    given = tmp_path / "given.jinja"
    given.write_text("GIVEN{% for m in messages %}{{ m.content }}{% endfor %}{{ tools | length }}")
    with_tools, without, _ = rendered(named_folder, "--chat-template", str(given))
    assert with_tools.startswith("GIVENhi1") and without.startswith("GIVENhi0")
