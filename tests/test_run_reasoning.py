"""agp run --reasoning-parser (qwen3, deepseek_r1: agp serve's flag, vLLM's names): a chat line's
answer is split at its first `</think>` as agp serve's chat message splits it: the record's `text`
is the content after it, `reasoning` and `reasoning_content` the thinking; completions lines keep
their text whole, and a record without the flag is as it was.
"""

import json

import pytest

from clikit import agp_in
from pipeline_dsl.reasoning import split
from test_qwen3_chat import qwen3_folder  # noqa: F401 - the tiny Qwen3 folder
from test_serve import TINY

USER = [{"role": "user", "content": "hey"}]


@pytest.fixture(scope="module")
def ids(qwen3_folder):  # noqa: F811
    vocab = json.loads((qwen3_folder / "tokenizer.json").read_text())
    think, end = (next(t["id"] for t in vocab["added_tokens"] if t["content"] == s) for s in ("<think>", "</think>"))
    return {"think": think, "end": end, "C": 70, "D": 71}


@pytest.fixture(scope="module")
def pipeline(qwen3_folder, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("run") / "tiny.agp"
    path.write_text(TINY.format(model=qwen3_folder, max_queue=64, max_batch_size=4, timeout=20))
    return path


def _line(ids, seed: int, **extra) -> dict:
    """A chat line sampled from <think>, </think>, C and D (seeded: the same tokens each time)."""
    return {"id": f"s{seed}", "messages": USER, "temperature": 1.0, "seed": seed, "max_tokens": 12,
            "allowed_token_ids": [ids["think"], ids["end"], ids["C"], ids["D"]], **extra}


def _run(pipeline, tmp_path, lines: list[dict], *flags) -> tuple[list[dict], object]:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    r = agp_in("run", pipeline, "-i", inp, "-o", out, "--overwrite", "--no-progress", *flags)
    records = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return records, r


SEEDS = range(6)


def test_a_chat_lines_thinking_is_split_out_of_its_text(pipeline, tmp_path, ids):
    """The record's text is what follows </think> (null where nothing does), reasoning and
    reasoning_content what comes before it, as agp serve's chat message gives them; without the
    flag the text keeps the tags and the record has no reasoning fields."""
    raw, r = _run(pipeline, tmp_path, [_line(ids, s, return_token_ids=True) for s in SEEDS])
    assert r.returncode == 0, r.stderr
    assert all("reasoning" not in rec and "reasoning_content" not in rec for rec in raw)
    assert all("reasoning_tokens" not in rec["usage"] for rec in raw)
    assert any("</think>" in rec["text"] for rec in raw)             # the seeds write the tag
    got, r = _run(pipeline, tmp_path, [_line(ids, s) for s in SEEDS], "--reasoning-parser", "qwen3")
    assert r.returncode == 0, r.stderr
    thoughts = set()
    for whole, rec in zip(raw, got):
        reasoning, content = split(whole["text"], True)
        assert (rec["reasoning"], rec["reasoning_content"], rec["text"]) == (reasoning, reasoning, content)
        assert rec["finish_reason"] == whole["finish_reason"]
        tokens = whole["token_ids"]          # usage as before, and the thinking's tokens: those before </think>
        end = tokens.index(ids["end"]) if ids["end"] in tokens else len(tokens)
        thought = end - (ids["think"] in tokens[:end])
        counted = ("prompt_tokens", "completion_tokens")          # cached_tokens: as the batches fell
        assert {k: rec["usage"][k] for k in counted} == {k: whole["usage"][k] for k in counted}
        assert rec["usage"]["reasoning_tokens"] == thought
        thoughts.add(thought)
    assert len(thoughts) > 1                     # thinking of several lengths


def test_include_reasoning_false_and_enable_thinking_false(pipeline, tmp_path, ids):
    """include_reasoning false leaves the thinking out (the text is still the content alone);
    qwen3's enable_thinking false means no thinking: the whole answer is the text."""
    raw, _ = _run(pipeline, tmp_path, [_line(ids, s) for s in SEEDS])
    lines = [_line(ids, s, include_reasoning=False) for s in SEEDS]
    lines += [_line(ids, s, chat_template_kwargs={"enable_thinking": False}, id=f"off{s}") for s in SEEDS]
    got, r = _run(pipeline, tmp_path, lines, "--reasoning-parser", "qwen3")
    assert r.returncode == 0, r.stderr
    for whole, rec in zip(raw, got[:len(SEEDS)]):
        assert rec["reasoning"] is rec["reasoning_content"] is None
        assert rec["text"] == split(whole["text"], True)[1]
    off, _ = _run(pipeline, tmp_path, [_line(ids, s, chat_template_kwargs={"enable_thinking": False})
                                       for s in SEEDS])
    for whole, rec in zip(off, got[len(SEEDS):]):
        assert rec["reasoning"] is rec["reasoning_content"] is None and rec["text"] == whole["text"]


def test_completions_lines_and_several_choices(pipeline, tmp_path, ids):
    """A completions line is never split (vLLM's parsers read chat only); each of n choices is
    split on its own."""
    prompt = {"id": "p", "prompt": "hey", "temperature": 1.0, "seed": 3, "max_tokens": 12,
              "allowed_token_ids": [ids["think"], ids["end"], ids["C"], ids["D"]]}
    raw, _ = _run(pipeline, tmp_path, [prompt, _line(ids, 4, n=3)])
    got, r = _run(pipeline, tmp_path, [prompt, _line(ids, 4, n=3)], "--reasoning-parser", "deepseek_r1")
    assert r.returncode == 0, r.stderr
    assert got[0] == raw[0]
    for whole, choice in zip(raw[1]["choices"], got[1]["choices"]):
        reasoning, content = split(whole["text"], True)
        assert (choice["reasoning"], choice["reasoning_content"], choice["text"]) == (reasoning, reasoning, content)


def test_a_format_or_a_forced_call_while_thinking_is_a_bad_line_and_another_parser_is_refused(pipeline, tmp_path,
                                                                                              ids):
    """As agp serve refuses them (a 400 naming the field), a line whose answer starts in its thinking
    may not ask for structured output: its record is that error, the other lines run; a parser agp
    does not read is refused at start (exit 2), naming those it reads."""
    bad = _line(ids, 1, response_format={"type": "json_object"}, id="bad")
    off = _line(ids, 1, response_format={"type": "json_object"}, chat_template_kwargs={"enable_thinking": False},
                id="off", allowed_token_ids=None)
    got, r = _run(pipeline, tmp_path, [bad, off, _line(ids, 2)], "--reasoning-parser", "qwen3")
    assert r.returncode == 0, r.stderr
    err = got[0]["error"]
    assert (err["status"], err["param"]) == (400, "response_format")
    assert err["message"].startswith("'response_format' cannot be enforced while the model thinks")
    assert "error" not in got[1] and "error" not in got[2]
    _, r = _run(pipeline, tmp_path, [_line(ids, 2)], "--reasoning-parser", "granite")
    assert r.returncode == 2
    assert "agp has no reasoning parser 'granite'; it reads qwen3, deepseek_r1" in r.stderr


def test_batch_api_lines_are_answered_as_agp_serve_answers_them(pipeline, tmp_path, ids):
    """An OpenAI batch-API chat line's body is agp serve's answer: its message's reasoning split
    out under the flag, and a format while thinking the 400 agp serve answers."""
    def batch(custom_id: str, **body) -> dict:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", **{k: v for k, v in _line(ids, 5).items() if k != "id"}, **body}}

    raw, _ = _run(pipeline, tmp_path, [batch("a")])
    whole = raw[0]["response"]["body"]["choices"][0]["message"]
    assert whole["reasoning_content"] is None
    got, r = _run(pipeline, tmp_path, [batch("a"), batch("b", response_format={"type": "json_object"})],
                  "--reasoning-parser", "qwen3")
    assert r.returncode == 0, r.stderr
    message = got[0]["response"]["body"]["choices"][0]["message"]
    reasoning, content = split(whole["content"], True)
    assert (message["reasoning"], message["reasoning_content"], message["content"]) == (reasoning, reasoning, content)
    assert got[1]["response"]["status_code"] == 400
    assert got[1]["error"]["message"].startswith("'response_format' cannot be enforced while the model thinks")


def test_a_python_stage_that_sets_reasoning_tokens_to_no_count_fails_there(qwen3_folder, tmp_path, ids):  # noqa: F811
    """usage.reasoning_tokens of a result a python stage returns is a token count, held to what
    the other counts are: "many" is that line's error naming the stage and the field, not a
    TypeError when the record's usage sums the choices' counts; an integer is taken as it is."""
    (tmp_path / "hooks.py").write_text(
        "def recount(item):\n"
        "    item['usage'] = {**item['usage'], 'reasoning_tokens': item['request']['metadata']['n']}\n"
        "    return item\n")
    stage = 'stage fix : python { fn = "hooks:recount" }\n    stage out'
    text = TINY.format(model=qwen3_folder, max_queue=64, max_batch_size=4, timeout=20).replace("stage out", stage, 1)
    path = tmp_path / "p.agp"
    path.write_text(text.replace("kv -> gen -> out", "kv -> gen -> fix -> out"))
    got, r = _run(path, tmp_path, [_line(ids, 0, id="words", metadata={"n": "many"}),
                                   _line(ids, 1, id="count", metadata={"n": 5})], "--reasoning-parser", "qwen3")
    assert r.returncode == 0, r.stderr
    words, count = got
    assert words["error"]["message"] == ("stage 'fix' returned a result whose usage.reasoning_tokens is 'many'; "
                                         "expected a non-negative integer"), words
    assert count.get("error") is None and count["usage"]["reasoning_tokens"] == 5, count
