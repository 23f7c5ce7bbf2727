"""`agp run` output lines carry `logprobs` and `prompt_logprobs` when their request line asks,
in the shapes of `agp serve`'s completions choices (one formatter: serve/protocol.py,
serve/token_fields.py): the same request through both gives the same lists; `echo` puts the
prompt before the text, and its tokens' logprobs first; a `messages` line with `echo` is an
error record naming the field; a line a stop string ended names it (`stop_reason`)."""
from __future__ import annotations

from pathlib import Path

import flowkit
import httpx
import pytest

from pipeline_dsl.requests_io import RequestError, parse_request
from test_serve import LiveServer

EPS = 1e-5                 # float32 logprobs through JSON


@pytest.fixture(scope="module")
def server(soft_gguf):
    s = LiveServer(soft_gguf)
    yield s
    s.close()


@pytest.fixture(scope="module")
def run_lines(server):
    """Request lines through `agp run`'s driver on the server's pipeline (a runtime of its own,
    one per run: a run ends its runtime)."""
    def run(*bodies: dict) -> list[dict]:
        return flowkit.run_lines(Path(server.dir) / "tiny.agp", bodies)

    return run


def served(server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def same(a, b) -> None:
    """Equal JSON values, floats within EPS."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=EPS)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


BODIES = [
    {"prompt": "the cat and the world", "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": True},
    {"prompt": "the cat and the world", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True,
     "prompt_logprobs": 2, "ignore_eos": True},
    {"prompt": [5, 60, 70, 80], "max_tokens": 3, "temperature": 0, "logprobs": 0, "echo": True, "ignore_eos": True},
    {"prompt": "hello world", "max_tokens": 3, "temperature": 0, "prompt_logprobs": 0, "ignore_eos": True},
    {"prompt": "the cat and the world", "max_tokens": 0, "echo": True, "logprobs": 2},      # scoring (lm-eval)
]


def line_of(body: dict) -> dict:
    out = dict(body)
    if isinstance(out["prompt"], list):
        out["prompt_token_ids"] = out.pop("prompt")
    return out


def test_run_lines_carry_the_servers_completions_logprobs_and_prompt_logprobs(server, run_lines):
    rows = run_lines(*[line_of(b) for b in BODIES])
    for body, row in zip(BODIES, rows):
        choice = served(server, body)
        assert "error" not in row, row
        assert row["text"] == choice["text"]                       # echo: the prompt, then the answer
        for name in ("logprobs", "prompt_logprobs"):
            if body.get(name) is None:
                assert name not in row
            else:
                same(row[name], choice[name])
    assert rows[1]["text"].startswith("the cat and the world") and rows[1]["logprobs"]["token_logprobs"][0] is None
    assert len(rows[0]["logprobs"]["top_logprobs"][0]) >= 3       # the sampled token and 3 alternatives


def test_each_choice_of_a_run_line_carries_its_own_logprobs(run_lines):
    row = run_lines({"prompt": "the cat", "max_tokens": 3, "temperature": 1.0, "seed": 7, "n": 2,
                     "logprobs": 1, "ignore_eos": True})[0]
    assert len(row.get("choices", ())) == 2, row
    for choice in row["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert row["logprobs"] == row["choices"][0]["logprobs"]


def test_a_messages_line_takes_chats_spelling_of_logprobs(run_lines):
    """A chat line asks for logprobs as a chat body does, `"logprobs": true` with `top_logprobs`:
    the same lists as the line's own `"logprobs": N` (`top_logprobs` was an unknown field, and
    `true` not an integer)."""
    chat = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    plain, spelled, alone = run_lines({**chat, "logprobs": 2}, {**chat, "logprobs": True, "top_logprobs": 2},
                                      {**chat, "logprobs": True})
    assert "error" not in spelled, spelled
    same(spelled["logprobs"], plain["logprobs"])
    assert len(alone["logprobs"]["tokens"]) == 3 and alone["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert "logprobs" not in run_lines({**chat, "logprobs": False})[0]


@pytest.mark.parametrize("extra, param", [({"top_logprobs": 2}, "top_logprobs"),
                                          ({"logprobs": False, "top_logprobs": 2}, "top_logprobs")])
def test_top_logprobs_without_logprobs_true_names_the_field(extra, param):
    with pytest.raises(RequestError) as e:
        parse_request({"messages": [{"role": "user", "content": "hi"}], **extra})
    assert e.value.param == param and str(e.value) == "'top_logprobs' needs \"logprobs\": true"


def test_a_messages_line_with_echo_names_the_field():
    with pytest.raises(RequestError) as e:
        parse_request({"messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert e.value.param == "echo"


def test_a_run_line_stopped_by_a_stop_string_names_it(run_lines):
    plain = run_lines({"prompt": "the cat and the world", "max_tokens": 8, "temperature": 0, "ignore_eos": True})[0]
    assert "stop_reason" not in plain
    stop = plain["text"][2:5]
    row = run_lines({"prompt": "the cat and the world", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                     "stop": [stop]})[0]
    assert row["finish_reason"] == "stop" and row["stop_reason"] == stop
    several = run_lines({"prompt": "the cat and the world", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                         "stop": [stop], "n": 2})[0]
    assert [c["stop_reason"] for c in several["choices"]] == [stop, stop] and several["stop_reason"] == stop


def test_a_run_line_scores_only_with_a_max_tokens_of_zero_and_false_is_not_zero():
    """As agp serve takes them: max_tokens false with echo is no scoring request (a bool is not an
    integer), and 0.0 is 0 (a whole float is its integer, as for every integer field)."""
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "the cat", "max_tokens": False, "echo": True, "logprobs": 1})
    assert e.value.param == "max_tokens"
    for zero in (0, 0.0):
        parsed = parse_request({"prompt": "the cat", "max_tokens": zero, "echo": True})
        assert parsed.sampling["max_tokens"] == 0 and type(parsed.sampling["max_tokens"]) is int
