"""agp serve --reasoning-parser (qwen3, deepseek_r1: vLLM's names): a reasoning model's thinking,
the text before `</think>`, is split out of its chat answer into `reasoning` / `reasoning_content`,
streamed or whole, and into a `reasoning` item of the Responses API; /v1/completions keeps it.
"""

import json

import pytest

from pipeline_dsl.reasoning import PARSERS, Splitter, count_token_ids, count_tokens, split, thinks
from pipeline_dsl.serve.protocol import chat_message
from test_qwen3_chat import WEATHER, qwen3_folder  # noqa: F401 - the tiny Qwen3 folder
from test_serve import LiveServer

# ---------------------------------------------------------------- the split, as vLLM's parsers make it

CASES = [   # (answer text, reasoning, content) of an answer that starts in its thinking
    ("<think>\nadd them\n</think>\n\n4", "\nadd them\n", "\n\n4"),       # Qwen3: both tags, text kept as written
    ("add them</think>4", "add them", "4"),                              # the template opened <think> in the prompt
    ("add them", "add them", None),                                      # cut inside its thinking (max_tokens, stop)
    ("<think>add", "add", None),
    ("add</think>", "add", None),                                        # nothing after </think>: content null
    ("</think>4", "", "4"),
    ("a</think>b</think>c", "a", "b</think>c"),                          # the first </think> ends it
    ("a</thin", "a</thin", None),                                        # half a tag at the end is reasoning
    ("", "", None),
]


@pytest.mark.parametrize("text,reasoning,content", CASES)
def test_an_answer_that_thinks_is_split_at_its_first_end_tag(text, reasoning, content):
    assert split(text, True) == (reasoning, content)


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_an_answer_without_thinking_is_all_content(text):
    assert split(text, False) == (None, text)


@pytest.mark.parametrize("text", [c[0] for c in CASES] + ["<think>x</think>y<think>z", "<<think>>a<</think>>b"])
def test_the_pieces_of_a_stream_join_to_the_whole_split_wherever_a_tag_is_cut(text):
    """Every way of cutting the answer in two (a tag split across two chunks), and one character a
    piece: reasoning and content joined are what the whole answer splits into."""
    whole = split(text, True)
    cuts = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    for pieces in cuts:
        s, reasoning, content = Splitter(True), "", ""
        for p in pieces:
            r, c = s.feed(p)
            reasoning, content = reasoning + r, content + c
        reasoning += s.finish()
        assert (reasoning, content or None) == whole, pieces
    s = Splitter(True)
    assert s.feed("a</th") == ("a", "") and s.feed("ink>b") == ("", "b")    # held back until it is whole


def _counted_one_by_one(pieces: list[bytes]) -> int:
    """reasoning_tokens as the definition reads: each token that begins before the first `</think>`
    (every token where none came), less those that begin inside a `<think>` before it."""
    text = b"".join(pieces)
    end = text.find(b"</think>")
    start = text.find(b"<think>", 0, end if end >= 0 else len(text))
    count, at = 0, 0
    for piece in pieces:
        if end >= 0 and at >= end:
            break
        count += not (start >= 0 and start <= at < start + len("<think>"))
        at += len(piece)
    return count


def test_the_thinking_tokens_are_counted_alike_by_bytes_and_by_the_end_tags_id_wherever_tags_are_cut():
    """count_tokens, and count_token_ids reading the tokens only up to the first `</think>` (by the
    tag's id where it is one token, else a chunk of bytes at a time, the chunk a tag may straddle):
    the same count as each token taken in turn, tags cut across tokens or spelt in several
    before the tag's own token, a `<think>` after `</think>`, none at all."""
    import random

    rng = random.Random(7)
    vocab = [b"a", b"bc", b"<", b"think", b">", b"</", b"/", b"<think>", b"x\n", b"", b"</think>", b"k>", b"thi"]
    end_id = vocab.index(b"</think>")
    for _ in range(3000):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randrange(0, 40))]
        pieces = [vocab[i] for i in ids]
        want = _counted_one_by_one(pieces)
        assert count_tokens(pieces) == want, pieces
        assert count_token_ids(ids, vocab.__getitem__, end_id) == want, pieces
        for chunk in (1, 3, 512):
            assert count_token_ids(ids, vocab.__getitem__, None, chunk) == want, (pieces, chunk)


def test_the_tokens_after_the_first_end_tag_are_not_read():
    """A 32k-token answer whose thinking ends early is counted from its first tokens alone: the
    count was taken under the runtime's lock and decoded every token of the answer (~156 ms),
    which every other request waited for. By the end tag's id and by bytes alike."""
    vocab = [b"<think>", b"hm ", b"</think>", b"ok ", b"</", b"think>"]
    read: list[int] = []

    def bytes_of(i: int) -> bytes:
        read.append(i)
        return vocab[i]

    answer = [0, 1, 1, 2] + [3] * 32_000
    assert count_token_ids(answer, bytes_of, 2) == 2 and len(read) == 4
    read.clear()
    assert count_token_ids(answer, bytes_of, None, chunk=64) == 2 and len(read) == 64
    read.clear()
    spelt = [1, 4, 5] + [3] * 32_000 + [2]          # the tag in two tokens before its own id
    assert count_token_ids(spelt, bytes_of, 2) == 1 and len(read) == len(spelt)       # read to the id ...
    read.clear()
    assert count_token_ids(spelt, bytes_of, None, chunk=64) == 1 and len(read) == 64  # ... by bytes, the first chunk


def test_qwen3s_enable_thinking_false_means_no_thinking_and_deepseek_r1_always_thinks():
    assert PARSERS == ("qwen3", "deepseek_r1")
    assert thinks("qwen3", None) and thinks("qwen3", {"enable_thinking": True})
    assert not thinks("qwen3", {"enable_thinking": False})
    assert thinks("deepseek_r1", {"enable_thinking": False})
    assert not thinks(None, None)


def test_tool_calls_are_read_from_the_content_after_the_thinking_only():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    thought, reason = chat_message(f"maybe {call}?</think>no call", "stop", True, thinking=True)
    assert (thought["reasoning"], thought["content"], reason) == (f"maybe {call}?", "no call", "stop")
    assert "tool_calls" not in thought
    called, reason = chat_message(f"weather</think>{call}", "stop", True, thinking=True)
    assert called["reasoning"] == called["reasoning_content"] == "weather" and reason == "tool_calls"
    assert called["tool_calls"][0]["function"]["name"] == "get_weather"
    plain, _ = chat_message(f"a</think>{call}", "stop", True)       # no parser: as before
    assert plain["content"] == "a</think>" and plain["tool_calls"][0]["function"]["name"] == "get_weather"


def test_serve_takes_vllms_reasoning_parser_names_and_refuses_another(capsys):
    from pipeline_dsl import cli

    for name in PARSERS:
        args = cli.build_parser(["serve"]).parse_args(["serve", "examples/chat.agp", "--reasoning-parser", name])
        assert args.reasoning_parser == name
    assert cli.build_parser(["serve"]).parse_args(["serve", "examples/chat.agp"]).reasoning_parser is None
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "examples/chat.agp", "--reasoning-parser", "granite"])
    assert e.value.code == 2
    assert "agp has no reasoning parser 'granite'; it reads qwen3, deepseek_r1" in capsys.readouterr().err


# ---------------------------------------------------------------- through a served Qwen3

USER = [{"role": "user", "content": "hey"}]


@pytest.fixture(scope="module")
def ids(qwen3_folder):  # noqa: F811
    vocab = json.loads((qwen3_folder / "tokenizer.json").read_text())
    think, end = (next(t["id"] for t in vocab["added_tokens"] if t["content"] == s) for s in ("<think>", "</think>"))
    return {"think": think, "end": end, "C": 70, "D": 71, "<": vocab["model"]["vocab"]["<"]}


@pytest.fixture(scope="module")
def server(qwen3_folder):  # noqa: F811
    s = LiveServer(qwen3_folder, overrides={"reasoning_parser": "qwen3"}, batch_timeout_s=0.001)
    yield s
    s.close()


def _sampled(ids, seed: int, **extra) -> dict:
    """Sampling that writes the answer from <think>, </think>, C and D (seeded: the same tokens each time)."""
    return {"temperature": 1.0, "seed": seed, "max_tokens": 12,
            "extra_body": {"allowed_token_ids": [ids["think"], ids["end"], ids["C"], ids["D"]], **extra}}


def _raw(server, seed: int, ids) -> str:
    """The text the model writes for USER with this seed, as /v1/completions gives it (never split)."""
    prompt = server.http.post(server.url + "/tokenize", json={"messages": USER}, timeout=30).json()["tokens"]
    kw = _sampled(ids, seed)
    r = server.client.completions.create(model="tiny", prompt=prompt, temperature=kw["temperature"], seed=seed,
                                         max_tokens=kw["max_tokens"], extra_body=kw["extra_body"])
    return r.choices[0].text


def _chat_is_integer_content(s) -> tuple[dict, object]:
    """A greedy chat answer held to an integer: all content, no reasoning, and the stream says the
    same. (The request's keywords, the whole answer's message.)"""
    kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=0)
    m = s.client.chat.completions.create(**kw).choices[0].message
    assert m.reasoning_content is None and int(m.content) >= 0
    assert _streamed(s.client.chat.completions.create(stream=True, **kw))[:2] == ("", m.content)
    return kw, m


def _streamed(chunks) -> tuple[str, str, set, dict | None]:
    reasoning, content, reasons, use = "", "", set(), None
    for chunk in chunks:
        use = chunk.usage or use
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            reasoning += extra.get("reasoning") or ""
            content += c.delta.content or ""
            reasons.add(c.finish_reason)
    return reasoning, content, reasons - {None}, use


def test_a_qwen3_answer_is_split_at_its_end_tag_whole_and_streamed_alike(server, ids):
    """Seeded answers of <think>, </think>, C and D: the chat message's reasoning and content are the
    completions text split at its first </think> (its leading <think> left out), usage as it was,
    and the stream's reasoning and content deltas join to the same."""
    tried = []
    for seed in range(40):
        raw = _raw(server, seed, ids)
        tried.append(raw)
        whole = server.client.chat.completions.create(model="tiny", messages=USER, **_sampled(ids, seed))
        m = whole.choices[0].message
        assert (m.reasoning_content, m.content) == split(raw, True)
        assert m.model_extra["reasoning"] == m.reasoning_content
        assert whole.usage.completion_tokens == 12
        stream = server.client.chat.completions.create(model="tiny", messages=USER, stream=True,
                                                       stream_options={"include_usage": True}, **_sampled(ids, seed))
        reasoning, content, reasons, use = _streamed(stream)
        assert (reasoning, content or None) == (m.reasoning_content, m.content)
        assert reasons == {whole.choices[0].finish_reason} and use.completion_tokens == 12
        if "</think>" in raw[:-len("</think>")] and raw.index("</think>") > 0:
            break                              # /v1/completions kept the tags; chat split at them
    else:
        pytest.fail(f"no seed wrote an answer with thinking and content: {tried}")
    assert m.reasoning_content and m.content and "</think>" not in m.reasoning_content


def test_a_streamed_delta_that_ends_the_thinking_carries_the_content_after_it(server, ids):
    """Stop strings that are never written (no X can be sampled) hold text back, so one delta holds
    the end of the thinking, </think> and the content after it: that delta gives both, and the
    stream joins to the whole answer."""
    tried = []
    for seed in range(40):
        kw = {**_sampled(ids, seed), "stop": ["C</think>X", "D</think>X"]}
        m = server.client.chat.completions.create(model="tiny", messages=USER, **kw).choices[0].message
        reasoning, content, _, _ = _streamed(server.client.chat.completions.create(model="tiny", messages=USER,
                                                                                   stream=True, **kw))
        assert (reasoning, content or None) == (m.reasoning_content, m.content), seed
        tried.append((m.reasoning_content, m.content))
        if len(m.reasoning_content or "") > 1 and m.reasoning_content[-1] in "CD" and m.content:
            break                          # C or D, </think> and the next token came as one delta
    else:
        pytest.fail(f"no seed wrote an answer with thinking and content: {tried}")


def _thinking_tokens(tokens: list[int], ids) -> int:
    """vLLM's reasoning_tokens of an answer that starts in its thinking: its tokens before the first
    </think>, less a <think> before it."""
    end = tokens.index(ids["end"]) if ids["end"] in tokens else len(tokens)
    return end - (ids["think"] in tokens[:end])


def test_usage_counts_the_thinkings_tokens_as_reasoning_tokens(server, ids):
    """usage.completion_tokens_details.reasoning_tokens (chat, whole and in the streamed usage chunk)
    and output_tokens_details.reasoning_tokens (the Responses API, whole and on its last event)
    count the tokens before </think>, less its <think>, as vLLM counts them: include_reasoning false
    too; 0 with thinking off; /v1/completions, never split, says nothing of reasoning."""
    counts = set()
    for seed in range(8):
        r = server.client.chat.completions.create(model="tiny", messages=USER,
                                                  **{**_sampled(ids, seed), "extra_body": {
                                                      **_sampled(ids, seed)["extra_body"], "return_token_ids": True}})
        want = _thinking_tokens(r.choices[0].model_extra["token_ids"], ids)
        counts.add(want)
        assert r.usage.completion_tokens_details.reasoning_tokens == want, seed
        *_, use = _streamed(server.client.chat.completions.create(model="tiny", messages=USER, stream=True,
                                                                  stream_options={"include_usage": True},
                                                                  **_sampled(ids, seed)))
        assert use.completion_tokens_details.reasoning_tokens == want
        hidden = server.client.chat.completions.create(model="tiny", messages=USER, **_sampled(ids, seed,
                                                                                                include_reasoning=False))
        assert hidden.usage.completion_tokens_details.reasoning_tokens == want
    assert len(counts) > 1 and 0 < max(counts) < 12                    # thinking of several lengths, ended
    kw = dict(model="tiny", messages=USER, max_tokens=3, extra_body={"allowed_token_ids": [ids["C"]]})
    assert server.client.chat.completions.create(**kw).usage.completion_tokens_details.reasoning_tokens == 3
    off = {**kw, "extra_body": {**kw["extra_body"], "chat_template_kwargs": {"enable_thinking": False}}}
    assert server.client.chat.completions.create(**off).usage.completion_tokens_details.reasoning_tokens == 0
    done = server.client.completions.create(model="tiny", prompt="hey", max_tokens=3,
                                            extra_body={"allowed_token_ids": [ids["C"]]})
    assert done.usage.completion_tokens_details is None
    chat = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0)
    thought = chat.usage.completion_tokens_details.reasoning_tokens
    assert chat.choices[0].message.reasoning_content and thought > 0      # the same answer on both routes
    rkw = dict(model="tiny", input="hey", max_output_tokens=16, temperature=0)
    assert server.client.responses.create(**rkw).usage.output_tokens_details.reasoning_tokens == thought
    final = list(server.client.responses.create(stream=True, **rkw))[-1]
    assert final.type in ("response.completed", "response.incomplete")     # the last event's usage
    assert final.response.usage.output_tokens_details.reasoning_tokens == thought


def test_the_reasoning_tokens_of_n_answers_are_summed_over_every_choice(server, ids):
    """usage.completion_tokens_details.reasoning_tokens of an `n` > 1 request counts the thinking
    of each of its choices, as its completion_tokens count each one's tokens (whole and streamed)."""
    body = _sampled(ids, 5, return_token_ids=True)
    r = server.client.chat.completions.create(model="tiny", messages=USER, n=3, **body)
    each = [_thinking_tokens(c.model_extra["token_ids"], ids) for c in r.choices]
    assert len(each) == 3 and sum(each) > each[0], each          # a choice after the first thought
    assert r.usage.completion_tokens_details.reasoning_tokens == sum(each)
    *_, use = _streamed(server.client.chat.completions.create(model="tiny", messages=USER, n=3, stream=True,
                                                              stream_options={"include_usage": True}, **body))
    assert use.completion_tokens_details.reasoning_tokens == sum(each)


def test_an_answer_cut_inside_its_thinking_is_all_reasoning(server, ids):
    kw = dict(model="tiny", messages=USER, max_tokens=3, extra_body={"allowed_token_ids": [ids["C"]]})
    whole = server.client.chat.completions.create(**kw).choices[0]
    assert (whole.message.reasoning_content, whole.message.content, whole.finish_reason) == ("CCC", None, "length")
    reasoning, content, reasons, _ = _streamed(server.client.chat.completions.create(stream=True, **kw))
    assert (reasoning, content, reasons) == ("CCC", "", {"length"})


def test_include_reasoning_false_leaves_the_thinking_out_of_the_answer(server, ids):
    """vLLM's include_reasoning: false: the thinking is still split off, and sent in neither field."""
    kw = dict(model="tiny", messages=USER, max_tokens=3,
              extra_body={"allowed_token_ids": [ids["C"]], "include_reasoning": False})
    m = server.client.chat.completions.create(**kw).choices[0].message
    assert (m.reasoning_content, m.model_extra["reasoning"], m.content) == (None, None, None)
    assert _streamed(server.client.chat.completions.create(stream=True, **kw))[:2] == ("", "")


def test_logprobs_hold_the_thinkings_tokens_with_include_reasoning_false_too(server, ids):
    """The logprobs are of every token the model wrote (as vLLM's), the thinking's included even
    where include_reasoning: false leaves its text out: whole and streamed alike (docs/openai.md)."""
    kw = dict(model="tiny", messages=USER, max_tokens=3, logprobs=True,
              extra_body={"allowed_token_ids": [ids["C"]], "include_reasoning": False})
    whole = server.client.chat.completions.create(**kw).choices[0]
    assert whole.message.content is None and [t.token for t in whole.logprobs.content] == ["C", "C", "C"]
    streamed = [t.token for chunk in server.client.chat.completions.create(stream=True, **kw)
                for c in chunk.choices if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert streamed == ["C", "C", "C"]


def test_include_reasoning_false_leaves_out_a_tags_start_held_back_at_the_end(server, ids):
    """An answer ending in '<' (maybe the start of </think>, held back until the answer ends) is
    thinking too: with include_reasoning false no delta carries it."""
    kw = dict(model="tiny", messages=USER, max_tokens=2,
              extra_body={"allowed_token_ids": [ids["<"]], "include_reasoning": False})
    assert _streamed(server.client.chat.completions.create(stream=True, **kw))[:2] == ("", "")
    kw["extra_body"]["include_reasoning"] = True
    assert _streamed(server.client.chat.completions.create(stream=True, **kw))[:2] == ("<<", "")


def test_enable_thinking_false_leaves_the_whole_answer_content(server, ids):
    kw = dict(model="tiny", messages=USER, max_tokens=3,
              extra_body={"allowed_token_ids": [ids["C"]], "chat_template_kwargs": {"enable_thinking": False}})
    m = server.client.chat.completions.create(**kw).choices[0].message
    assert (m.reasoning_content, m.content) == (None, "CCC")
    assert _streamed(server.client.chat.completions.create(stream=True, **kw))[:2] == ("", "CCC")


def test_structured_output_or_a_forced_call_while_thinking_is_a_400_naming_the_field(server, ids):
    import openai

    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, response_format=schema)
    assert e.value.body["param"] == "response_format" and "while the model thinks" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                              extra_body={"guided_regex": "[0-9]+"})
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, tools=[WEATHER],
                                              tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:      # a call forced by the tool's name: the same
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, tools=[WEATHER],
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.responses.create(model="tiny", input="hey", max_output_tokens=16,
                                       text={"format": {"type": "json_schema", "name": "n",
                                                        "schema": {"type": "integer"}}})
    assert e.value.body["param"] == "text.format"           # the route's field: it has no response_format
    assert e.value.body["message"].startswith("'text.format' cannot be enforced while the model thinks")
    with pytest.raises(openai.BadRequestError) as e:
        server.client.responses.create(model="tiny", input="hey", max_output_tokens=16, tools=[
            {"type": "function", "name": "f", "parameters": {"type": "object"}}], tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    off = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, response_format=schema,
                                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    m = off.choices[0].message                  # thinking off: the format holds from the first token, as vLLM's
    assert m.reasoning_content is None and int(m.content) >= 0


def test_a_text_format_is_free_text_and_taken_while_thinking(server, ids):
    """response_format {"type": "text"} (chat) and text.format {"type": "text"} (Responses, sent by
    many clients by default) constrain nothing: taken while the model thinks, the answer split as
    without them."""
    kw = dict(model="tiny", messages=USER, max_tokens=3, extra_body={"allowed_token_ids": [ids["C"]]})
    m = server.client.chat.completions.create(response_format={"type": "text"}, **kw).choices[0].message
    assert (m.reasoning_content, m.content) == ("CCC", None)
    r = server.client.responses.create(model="tiny", input="hey", max_output_tokens=16, temperature=0,
                                       text={"format": {"type": "text"}})
    assert [i.type for i in r.output][0] == "reasoning"


def test_an_answer_its_generate_stage_holds_to_a_json_schema_is_content_not_thinking(qwen3_folder, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """A format the pipeline sets (a generate stage's json_schema) holds the answer from its first
    token: it has no thinking, so under --reasoning-parser it is the content (the JSON), whole and
    streamed, on chat and the Responses API; it was all reasoning, content null. A request's
    {"type": "text"} frees the answer of the stage's schema, and it thinks again."""
    import tempfile

    from test_serve import TINY

    (tmp_path / "n.json").write_text(json.dumps({"type": "integer"}))
    text = TINY.format(model=qwen3_folder, max_queue=64, max_batch_size=4, timeout=1).replace(
        "generate      {{ max_new_tokens = 16 }}".replace("{{", "{").replace("}}", "}"),
        'generate      { max_new_tokens = 6  json_schema = "n.json" }')
    assert "n.json" in text
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    s = LiveServer(qwen3_folder, text=text, overrides={"reasoning_parser": "qwen3"})
    try:
        kw, m = _chat_is_integer_content(s)
        r = s.client.responses.create(model="tiny", input="hey", max_output_tokens=6, temperature=0)
        assert [(i.type, i.content[0].text) for i in r.output] == [("message", m.content)]
        events = list(s.client.responses.create(model="tiny", input="hey", max_output_tokens=6, temperature=0,
                                                stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == m.content
        assert not any(e.type.startswith("response.reasoning") for e in events)
        free = s.client.chat.completions.create(response_format={"type": "text"}, **kw).choices[0].message
        assert free.reasoning_content is not None                     # no schema: the answer thinks
    finally:
        s.close()


def test_an_answer_a_python_stage_sets_a_format_for_is_content_not_thinking(qwen3_folder, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """A response_format a python stage puts on the request before the generate stage is the
    pipeline's choice, as a stage's json_schema is: the answer is its content, whole and streamed."""
    import tempfile

    from test_serve import TINY

    (tmp_path / "hooks.py").write_text(
        "def fmt(item):\n"
        "    item['response_format'] = {'type': 'json_schema', 'json_schema': {'name': 'n', 'schema': {'type': 'integer'}}}\n"
        "    return item\n")
    text = TINY.format(model=qwen3_folder, max_queue=64, max_batch_size=4, timeout=1).replace(
        "    request -> batch", '    stage a : python { fn = "hooks:fmt" }\n    request -> a -> batch')
    assert "hooks:fmt" in text
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = LiveServer(qwen3_folder, text=text, overrides={"reasoning_parser": "qwen3"})
    try:
        _chat_is_integer_content(s)
    finally:
        s.close()


def test_completions_are_never_split_so_their_structured_output_is_taken(server, ids):
    """/v1/completions reads no thinking (vLLM's parser reads chat alone): a format there holds from
    the first token, as without the parser."""
    r = server.client.completions.create(model="tiny", prompt="hey", max_tokens=3,
                                         extra_body={"guided_regex": "[0-9]+"})
    assert r.choices[0].text.isdigit(), r.choices[0].text


MANY = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{ max_queue = 64 }}
    stage split   : python        {{ fn = "hooks:parts"  returns = many }}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 6 }}
    stage j       : join          {{ {join} }}
    stage out     : respond       {{}}
    request -> split -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> j -> out
}}
"""


@pytest.mark.parametrize("join", ["policy = first", 'fn = "hooks:merge"'])
def test_answers_the_elements_of_a_many_stage_hold_to_a_format_are_content_after_the_join(
        qwen3_folder, tmp_path, monkeypatch, join):  # noqa: F811
    """Each element of a `returns = many` stage sets a json_schema response_format: the answers are
    held to it from their first token, so after the join (a policy's pick, or a fn's new dict,
    which gets what it leaves out from the first branch) the answer is content, whole and
    streamed, chat and Responses. The join's result answers the request the many stage got, which
    set no format: told from that, the answer was all reasoning, content null. Whether a stage
    held its answer is no field of the answer itself."""
    import tempfile

    (tmp_path / "hooks.py").write_text(
        "def parts(item):\n"
        "    fmt = {'type': 'json_schema', 'json_schema': {'name': 'n', 'schema': {'type': 'integer'}}}\n"
        "    return [dict(item, messages=[{'role': 'user', 'content': w}], response_format=fmt) for w in 'ab']\n"
        "def merge(results):\n"
        "    return {'text': results[0]['text']}\n")
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = LiveServer(qwen3_folder, text=MANY.format(model=qwen3_folder, join=join),
                   overrides={"reasoning_parser": "qwen3"})
    try:
        kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=0)
        raw = s.http.post(s.url + "/v1/chat/completions", json=kw, timeout=60).json()
        m = raw["choices"][0]["message"]
        assert m.get("reasoning_content") is None and int(m["content"]) >= 0
        assert "constrained" not in json.dumps(raw)
        thought, content = _streamed(s.client.chat.completions.create(stream=True, **kw))[:2]
        assert thought == "" and int(content) >= 0      # `first`: either element's answer
        r = s.client.responses.create(model="tiny", input="hey", max_output_tokens=6, temperature=0)
        assert [i.type for i in r.output] == ["message"] and int(r.output[0].content[0].text) >= 0
        events = list(s.client.responses.create(model="tiny", input="hey", max_output_tokens=6, temperature=0,
                                                stream=True))
        assert int("".join(e.delta for e in events if e.type == "response.output_text.delta")) >= 0
        assert not any(e.type.startswith("response.reasoning") for e in events)
    finally:
        s.close()


def test_an_answer_a_python_stage_writes_itself_is_content_not_thinking(qwen3_folder, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    """An answer no model wrote (a python stage's own, `returns = any`: a canned FAQ answer) has no
    thinking: under --reasoning-parser it is all content, whole and streamed, on chat and the
    Responses API; it was all reasoning, content null. The model's answers still think."""
    import tempfile

    from test_serve import TINY

    (tmp_path / "hooks.py").write_text(
        "def faq(item):\n"
        "    if 'hours' in item['messages'][-1]['content']:\n"
        "        return {'text': 'We are open 9 to 5.'}\n"
        "    return item\n")
    text = TINY.format(model=qwen3_folder, max_queue=64, max_batch_size=4, timeout=1).replace(
        "    request -> batch",
        '    stage faq : python { fn = "hooks:faq"  returns = any }\n    request -> faq\n    faq -> batch\n'
        "    faq -> out")
    assert "hooks:faq" in text
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = LiveServer(qwen3_folder, text=text, overrides={"reasoning_parser": "qwen3"})
    try:
        said = "We are open 9 to 5."
        kw = dict(model="tiny", messages=[{"role": "user", "content": "what are your hours?"}], max_tokens=6)
        m = s.client.chat.completions.create(**kw).choices[0].message
        assert (m.reasoning_content, m.content) == (None, said)
        assert _streamed(s.client.chat.completions.create(stream=True, **kw))[:2] == ("", said)
        r = s.client.responses.create(model="tiny", input="what are your hours?", max_output_tokens=6)
        assert [(i.type, i.content[0].text) for i in r.output] == [("message", said)]
        events = list(s.client.responses.create(model="tiny", input="what are your hours?", max_output_tokens=6,
                                                stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == said
        assert not any(e.type.startswith("response.reasoning") for e in events)
        model = s.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                                 temperature=0).choices[0].message
        assert model.reasoning_content is not None and model.content is None     # the model's answer thinks
    finally:
        s.close()


def test_the_responses_api_gives_the_thinking_as_a_reasoning_item_before_the_message(server):
    """The Responses API's answer to "hey" holds what chat's answer to the same prompt splits out:
    a reasoning item (its text a reasoning_text part), then the message; streamed, the reasoning
    item's events come first, and the final response holds the same items."""
    chat = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0)
    m = chat.choices[0].message
    assert m.reasoning_content is not None
    kw = dict(model="tiny", input="hey", max_output_tokens=16, temperature=0)
    r = server.client.responses.create(**kw)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].summary == []
    assert (r.output[0].content[0].text, r.output[1].content[0].text) == (m.reasoning_content, m.content or "")
    assert r.usage.output_tokens == chat.usage.completion_tokens
    events = list(server.client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == m.reasoning_content
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.done")
    final = events[-1].response
    assert [(i.type, i.content[0].text) for i in final.output] == [(i.type, i.content[0].text) for i in r.output]


def test_the_responses_api_takes_chat_template_kwargs_so_thinking_can_be_turned_off(server):
    """The 400 for a format while thinking says to send chat_template_kwargs {"enable_thinking":
    false}: /v1/responses takes it (as vLLM's Responses route does) and passes it on as chat does:
    no reasoning item, and the format holds from the first token."""
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = server.client.responses.create(model="tiny", input="hey", max_output_tokens=16, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "n",
                                                        "schema": {"type": "integer"}}}, extra_body=off)
    assert [i.type for i in r.output] == ["message"] and int(r.output[0].content[0].text) >= 0
    on = server.http.post(server.url + "/v1/responses/input_tokens", json={"model": "tiny", "input": "hey"},
                          timeout=30).json()["input_tokens"]
    counted = server.http.post(server.url + "/v1/responses/input_tokens",
                               json={"model": "tiny", "input": "hey", **off}, timeout=30).json()["input_tokens"]
    assert counted > on                         # Qwen3's template writes the empty <think></think> in the prompt


def test_a_streamed_response_with_logprobs_keeps_a_held_back_tag_start_in_its_reasoning_item():
    """Streamed with message.output_text.logprobs, a thinking delta held back as a possible tag's
    start ("<" of "x < y") has logprobs but no content: they wait for the message, which opens
    after the thinking only. It opened mid-thinking, and the output was reasoning, reasoning,
    message with clashing output_index."""
    from types import SimpleNamespace as NS

    from pipeline_dsl.serve.responses import parse_responses
    from pipeline_dsl.serve.responses_events import ResponseEvents

    call = parse_responses({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"]},
                           max_model_len=4096, served=("m",))
    vocab = NS(name_of=str, bytes_of=lambda t: b"x")
    owner = NS(g=NS(apipe=NS(runtime=NS(reasoning_parser="qwen3", seg_of_gen={"gen": None})),
                       config=NS(retry_after_s=1)),
               vocabs=lambda c: NS(want_lp=True, of=lambda g: vocab), keep=lambda c, f: None)
    ev = ResponseEvents(owner, call, None, None, "resp_1", None)
    out = []
    for i, piece in enumerate(["is x ", "<", " y?", "</think>", "yes"]):
        out += ev.content(piece, [{"token_id": i, "logprob": -0.1, "top": []}], "gen")
    ev.seen = True
    out += ev.finish(NS(choices=[NS(text="", finish_reason="stop", data={})],
                        usage={"prompt_tokens": 1, "completion_tokens": 5, "cached_tokens": 0}))
    events = [json.loads(b.decode().split("data: ", 1)[1]) for b in out]
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    assert {e["output_index"] for e in events if e["type"].startswith("response.reasoning_text")} == {0}
    assert {e["output_index"] for e in events if e["type"].startswith("response.output_text")} == {1}
    final = events[-1]["response"]["output"]
    assert [(i["type"], i["content"][0]["text"]) for i in final] == [("reasoning", "is x < y?"), ("message", "yes")]
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert streamed == "is x < y?" and "".join(e["delta"] for e in events
                                                if e["type"] == "response.output_text.delta") == "yes"
    deltas = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert deltas == final[1]["content"][0]["logprobs"] and len(deltas) == 5


def test_a_stored_answers_reasoning_item_is_its_turns_reasoning_content():
    """What previous_response_id continues: the answer's reasoning item becomes the assistant
    turn's reasoning_content, where Qwen3's template reads it."""
    from pipeline_dsl.serve.responses_output import message_item, output_messages, reasoning_item

    assert output_messages([reasoning_item("hm"), message_item("4", "completed", None)]) == [
        {"role": "assistant", "content": "4", "reasoning_content": "hm"}]
    assert output_messages([message_item("4", "completed", None)]) == [{"role": "assistant", "content": "4"}]
