"""A Qwen3 model's chat as its users send it: the chat template Qwen3 ships (thinking on by
default, `enable_thinking: false` writing an empty <think></think> block after the assistant's
start; an earlier answer's reasoning left out of the history; tools and tool calls) renders in
agp's jinja sandbox as transformers renders it, vLLM's `chat_template_kwargs` reaches it over
HTTP, and what the model writes inside <think> stays in the answer's `content` where no reasoning
parser splits it (agp serve without --reasoning-parser: `reasoning_content` is null, as vLLM answers
without one; tests/test_reasoning.py has the parser).
"""

import json
from types import SimpleNamespace

import pytest

from pipeline_dsl.engine.models import load_model
from test_model_families import save_folder
from test_serve import LiveServer

transformers = pytest.importorskip("transformers")

# The structure of the template in Qwen3's tokenizer_config.json (Qwen3-0.6B … 32B): the same
# jinja features (a namespace, a reversed slice of messages, string methods, tojson) and output.
QWEN3_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments " }}
    {{- "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'
                    + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CHATS = {
    "one turn": [{"role": "user", "content": "Name three colours."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 東京"}],
    "reasoning in the history": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3 + 3?"}],
    "tool round trip": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A tiny Qwen3 folder: the byte-level BPE of a qwen3 GGUF (split by qwen2's regex, which
    transformers' Qwen2Tokenizer, Qwen3's, applies whatever tokenizer.json says) with Qwen3's
    <think> and </think> (added tokens, not special: an answer's text keeps them), and Qwen3's
    chat template."""
    from tokenizers import AddedToken

    from tiny_model import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "qwen3.gguf", arch="qwen3")
    _, tok = load_model(str(gguf), dtype="fp32")
    tk = tok.tk
    tk.add_tokens([AddedToken("<think>", special=False, normalized=False),
                   AddedToken("</think>", special=False, normalized=False)])
    src = SimpleNamespace(tk=tk, vocab_size=tk.get_vocab_size(with_added_tokens=True), chat_template=QWEN3_TEMPLATE)
    return save_folder(tmp_path_factory.mktemp("qwen3"), src, cls="Qwen3Config", head_dim=32, tie_word_embeddings=True,
                       eos_token_id=2)


@pytest.fixture(scope="module")
def tokenizers(qwen3_folder):
    """(agp's, transformers') tokenizer of the folder."""
    return load_model(str(qwen3_folder), dtype="fp32")[1], transformers.AutoTokenizer.from_pretrained(str(qwen3_folder))


@pytest.mark.parametrize("thinking", [None, True, False], ids=["default", "thinking", "no-thinking"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_qwen3s_template_renders_as_transformers_renders_it(tokenizers, chat, thinking):
    tok, ref = tokenizers
    extra = {} if thinking is None else {"enable_thinking": thinking}
    tools = [WEATHER] if chat == "tool round trip" else None
    got = tok.apply_chat_template(CHATS[chat], tools=tools, **extra)
    assert got == ref.apply_chat_template(CHATS[chat], tools=tools, tokenize=False, add_generation_prompt=True,
                                          **extra)
    assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" if thinking is False
                        else "<|im_start|>assistant\n")
    assert "add them" not in got                                  # an earlier answer's reasoning is left out
    assert tok.apply_chat_template(CHATS[chat], tools=tools, tokenize=True, **extra) == \
        ref.apply_chat_template(CHATS[chat], tools=tools, tokenize=True, add_generation_prompt=True,
                                return_dict=False, **extra)


@pytest.fixture(scope="module")
def server(qwen3_folder):
    s = LiveServer(qwen3_folder)
    yield s
    s.close()


def test_enable_thinking_false_reaches_qwen3s_template_and_think_text_stays_in_the_content(server, qwen3_folder):
    user = [{"role": "user", "content": "hey"}]

    def rendered(**extra):
        r = server.http.post(server.url + "/tokenize", json={"messages": user, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        return server.http.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=30).json()
    assert rendered()["prompt"].endswith("<|im_start|>assistant\n")
    assert rendered(chat_template_kwargs={"enable_thinking": False})["prompt"].endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")

    vocab = json.loads((qwen3_folder / "tokenizer.json").read_text())
    think, end = (next(t["id"] for t in vocab["added_tokens"] if t["content"] == s) for s in ("<think>", "</think>"))
    plain = server.client.chat.completions.create(model="tiny", messages=user, max_tokens=2)
    off = server.client.chat.completions.create(
        model="tiny", messages=user, max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "allowed_token_ids": [think, end, 70]})
    assert off.usage.prompt_tokens == plain.usage.prompt_tokens + len(
        server.engine.tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    message = off.choices[0].message
    text = message.content
    assert len(server.engine.tokenizer.encode(text, add_special_tokens=False)) == 4
    assert set(text.replace("<think>", "").replace("</think>", "")) <= {"C"}   # token 70 is the byte "C"
    assert "think>" in text and message.reasoning_content is None and message.model_extra["reasoning"] is None


def test_qwen3s_think_tokens_are_text_not_special_tokens(tokenizers):
    tok, _ = tokenizers
    ids = tok.encode("<think>\nhmm\n</think>\n\nok", add_special_tokens=False)
    assert tok.decode(ids) == "<think>\nhmm\n</think>\n\nok"
    assert ids[0] in tok.added and ids[0] not in tok.special_ids


def test_the_thinking_sent_back_in_the_history_reaches_qwen3s_template(server):
    """An assistant turn after the last user message (a tool round trip) is rendered with its
    <think> block from the message's reasoning_content (or vLLM's newer `reasoning`), as the
    template asks; an earlier turn's is left out by the template itself."""
    def rendered(messages, **extra):
        r = server.http.post(server.url + "/tokenize", json={"messages": messages, "tools": [WEATHER], **extra},
                             timeout=30)
        assert r.status_code == 200, r.text
        return server.engine.tokenizer.decode(r.json()["tokens"])    # its special tokens left out
    for key in ("reasoning_content", "reasoning"):
        chat = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", key: "look it up", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        assert "\nassistant\n<think>\nlook it up\n</think>\n\n<tool_call>" in rendered(chat)
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "reasoning_content": 3}]
    r = server.http.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": bad}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].reasoning_content"


def test_a_responses_reasoning_item_in_the_input_reaches_the_next_assistant_turn(server):
    rs = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]}
    count = {"model": "tiny", "tools": [{"type": "function", "name": "get_weather",
                                         "parameters": WEATHER["function"]["parameters"]}],
             "input": [{"role": "user", "content": "Weather in Paris?"}, rs,
                       {"type": "function_call", "call_id": "c1", "name": "get_weather",
                        "arguments": '{"city": "Paris"}'},
                       {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}
    with_it = server.http.post(server.url + "/v1/responses/input_tokens", json=count, timeout=30).json()
    without = server.http.post(server.url + "/v1/responses/input_tokens",
                               json={**count, "input": [i for i in count["input"] if i is not rs]}, timeout=30).json()
    think = server.engine.tokenizer.encode("<think>\nhm\n</think>\n\n", add_special_tokens=False)
    assert with_it["input_tokens"] == without["input_tokens"] + len(think)
