"""A result that passes the runtime but that no answer can be built of (a python stage that
put in the `logprobs` a request asked for a token id no tokenizer can look up: an int of its own
whose hash fails, which the runtime's check of the field's shape lets by) fails its own request loudly
and alone: agp serve answers it 500 `answer_failed` (a stream: an error event, then [DONE]), agp
run writes an error line for it with its status; the traceback is logged once at ERROR with the
request's id, and every other request is answered. Before, agp serve's client waited for its
own timeout and agp run left the line out of its output."""
from __future__ import annotations

import json
import logging
import threading

import pytest

import flowkit
from clikit import agp_in
from flowkit import chain, chat, errors, write

HOOKS = '''
class Unnamed(int):
    """A token id (an int) that no tokenizer's cache can look up."""
    def __hash__(self):
        raise TypeError("this token id cannot be looked up")


def answer(item):
    if item["request"].get("metadata", {}).get("bad") == "logprobs":
        item["logprobs"] = [{**e, "token_id": Unnamed(e["token_id"])} for e in item["logprobs"]]
    return item
'''

BODY = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
        'stage a : python { fn = "hooks:answer" }\nstage out : respond {}\n'
        "request -> batch\ngen -> a -> out\n" + chain())
STREAMED = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n'
            "request -> batch\ngen -> out\n" + chain())


@pytest.fixture(autouse=True)
def _fresh():
    flowkit.reset()
    yield


def test_agp_run_writes_an_error_line_for_an_answer_it_cannot_build_and_goes_on(tmp_path, soft_gguf, caplog):
    path = write(tmp_path, soft_gguf, BODY, hooks=HOOKS)
    assert errors(path) == []
    lines = [{"id": "ok", "prompt": "hi", "max_tokens": 2, "logprobs": 1},
             {"id": "bad", "prompt": "hi", "max_tokens": 2, "logprobs": 1, "metadata": {"bad": "logprobs"}},
             {"id": "ok2", "prompt": "hello", "max_tokens": 2}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    caplog.set_level(logging.ERROR)
    r = agp_in("run", path, "-i", inp, "-o", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr               # as for any failed line among answered ones
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["id"] for w in written] == ["ok", "bad", "ok2"]
    assert "error" not in written[0] and "error" not in written[2]
    err = written[1]["error"]
    assert err["line"] == 2 and err["status"] == 500 and err["code"] == "answer_failed" and err["type"] == "failed"
    assert err["message"].startswith("the answer to this request could not be built (TypeError: ")
    logged = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(logged) == 1 and "line 2" in logged[0].getMessage() and logged[0].exc_info is not None


def test_agp_run_counts_the_line_as_failed_every_line_failing_exits_1(tmp_path, soft_gguf):
    path = write(tmp_path, soft_gguf, BODY, hooks=HOOKS)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "bad", "prompt": "hi", "max_tokens": 2, "logprobs": 1,
                               "metadata": {"bad": "logprobs"}}) + "\n")
    r = agp_in("run", path, "-i", inp, "-o", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "every request failed (1 of 1" in r.stderr
    assert json.loads(out.read_text())["error"]["code"] == "answer_failed"


@pytest.fixture
def served(tmp_path, tiny_gguf, monkeypatch):
    from test_serve import TINY, LiveServer

    (tmp_path / "odd_hooks.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=20).replace(
        "kv -> gen -> out", 'kv -> gen -> odd -> out\n    stage odd : python { fn = "odd_hooks:answer" }')
    s = LiveServer(tiny_gguf, text=text)
    yield s
    s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_agp_serve_answers_500_answer_failed_for_an_answer_it_cannot_build(served, caplog, stream):
    s = served
    caplog.set_level(logging.ERROR)
    ask = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logprobs": 1, "stream": stream}
    r = s.http.post(s.url + "/v1/completions", timeout=60, headers={"X-Request-Id": "odd-7"},
                    json={**ask, "metadata": {"bad": "logprobs"}})
    if stream:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
    else:
        assert r.status_code == 500
        err = r.json()["error"]
    assert err["code"] == "answer_failed" and "could not be built" in err["message"]
    fine = s.http.post(s.url + "/v1/completions", timeout=60, json=ask)
    assert fine.status_code == 200
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert logged[0].request_id == "odd-7" and "answer_failed" == logged[0].code


class Failing:
    """A runtime listener that fails on the first delta (`on="delta"`) or on an answered result
    (`on="done"`), as a front end whose answer builder breaks on one request's values would."""

    def __init__(self, on: str | None):
        self.on, self.result, self.deltas = on, None, 0
        self.done = threading.Event()

    def on_delta(self, key, index, out):
        self.deltas += 1
        if self.on == "delta":
            raise ValueError("this delta cannot be sent")

    def on_done(self, result):
        if self.on == "done" and result.ok:
            raise ValueError("this answer cannot be sent")
        self.result = result
        self.done.set()


@pytest.mark.parametrize("on", ["delta", "done"])
def test_a_listener_failing_on_its_request_hears_answer_failed_and_the_others_are_answered(
        tmp_path, soft_gguf, caplog, on):
    path = write(tmp_path, soft_gguf, STREAMED)
    rt = flowkit.runtime(path)
    rt.start()
    caplog.set_level(logging.ERROR, logger="agp.flow")
    try:
        bad, fine = Failing(on), Failing(None)
        rt.submit(chat("bad", "hi", max_tokens=3), bad, stream=True)
        rt.submit(chat("fine", "hello", max_tokens=3), fine, stream=True)
        assert bad.done.wait(60) and fine.done.wait(60)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert fine.result.ok and fine.deltas >= 1
    err = bad.result.error
    assert err is not None and err.code == "answer_failed" and err.kind == "failed"
    assert err.message.startswith("the answer to this request could not be built (ValueError: this ")
    if on == "delta":
        assert bad.deltas == 1                   # none heard after its listener failed
    logged = [r for r in caplog.records if r.name == "agp.flow" and r.levelno == logging.ERROR]
    assert len(logged) == 1 and "'bad'" in logged[0].getMessage() and logged[0].exc_info is not None


PASS_CHUNKS = '''
def passed(item, chunks):
    for text in chunks:
        yield text
'''


@pytest.mark.parametrize("through", ["engine", "stream stage"])
def test_a_listener_failing_on_a_delta_aborts_its_request_generation_stops(tmp_path, long_gguf, through):
    """Its request hears nothing more, so it is not generated to its end unheard: its engine
    sequence is aborted (counted so), and it generates a small part of its max_tokens. The same
    whether the engine tells the deltas or a stream stage after it does."""
    many = 600
    body = STREAMED.replace("max_new_tokens = 3", f"max_new_tokens = {many}")
    if through == "stream stage":
        body = body.replace("gen -> out", "gen -> up -> out\nstage up : python { fn = \"hooks:passed\"  stream = true }")
    path = write(tmp_path, long_gguf, body, hooks=PASS_CHUNKS)
    assert errors(path) == []
    rt = flowkit.runtime(path)
    rt.start()
    try:
        bad, fine = Failing("delta"), Failing(None)
        rt.submit(chat("bad", "hi", max_tokens=many), bad, stream=True)
        assert bad.done.wait(60)
        rt.submit(chat("fine", "hello", max_tokens=3), fine, stream=True)
        assert fine.done.wait(60)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert bad.result.error.code == "answer_failed" and bad.deltas == 1 and fine.result.ok
    engine, = rt.stats()["engines"].values()
    assert engine["requests_aborted"] == 1 and engine["running"] == 0
    assert engine["generated_tokens"] < many // 2        # the failed one's few, and the fine one's 3


def test_agp_serve_answers_the_token_fields_an_engine_answer_carries_through_a_python_stage(served):
    """The logprobs, top alternatives, prompt logprobs and token ids the engine gives an answer
    pass the python stage that hands them back unchanged, and agp serve's chat and completions
    answers carry them (the runtime's check of those fields takes the engine's own shapes)."""
    s = served
    asked = {"model": "tiny", "max_tokens": 2, "prompt_logprobs": 2, "return_token_ids": True}
    text = s.http.post(s.url + "/v1/completions", timeout=60, json={**asked, "prompt": "hi there", "logprobs": 2})
    chat = s.http.post(s.url + "/v1/chat/completions", timeout=60, json={
        **asked, "messages": [{"role": "user", "content": "hi there"}], "logprobs": True, "top_logprobs": 2})
    assert text.status_code == 200 and chat.status_code == 200, (text.text, chat.text)
    t, c = text.json(), chat.json()
    choice = t["choices"][0]
    assert len(choice["token_ids"]) == 2 and len(choice["logprobs"]["tokens"]) == 2
    assert len(choice["prompt_logprobs"]) == len(choice["prompt_token_ids"]) == t["usage"]["prompt_tokens"]
    assert len(c["choices"][0]["token_ids"]) == 2
    assert [len(e["top_logprobs"]) for e in c["choices"][0]["logprobs"]["content"]] == [2, 2]
    assert len(c["prompt_logprobs"]) == len(c["prompt_token_ids"]) == c["usage"]["prompt_tokens"]
