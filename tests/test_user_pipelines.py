"""Pipelines a new user writes from the docs, run as they would run them (`agp run`): what the
docs promise holds, and a request the pipeline cannot answer is the client's error, not a failure."""
from __future__ import annotations

import json

from clikit import agp_in

CANNED = '''\
def canned(item):
    return {"text": "canned answer"}
'''

NO_MODEL = '''\
# no model at all: a python stage answers every request
pipeline echo {
    stage request : requests {}
    stage ans     : python   { fn = "nomodel_hooks:canned"  returns = generated }
    stage out     : respond  {}
    request -> ans -> out
}
'''


def test_a_pipeline_without_a_model_refuses_logprobs_as_the_clients_error(tmp_path):
    """Asking a model-less pipeline for logprobs, the prompt's logprobs or an echo of token ids
    failed once answered, with a traceback (`agp serve`: a 500, `answer_failed`): there is no
    tokenizer to build them with. They are a 400 naming the field; the other lines are answered."""
    (tmp_path / "nomodel_hooks.py").write_text(CANNED)
    (tmp_path / "p.agp").write_text(NO_MODEL)
    lines = [{"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2},
             {"id": "text", "prompt": "Hi", "logprobs": 2},
             {"id": "prompt", "prompt": "Hi", "prompt_logprobs": 1},
             {"id": "ids", "prompt_token_ids": [1, 2, 3], "echo": True},
             {"id": "plain", "prompt": "Hi", "echo": True},
             {"id": "no_lp", "messages": [{"role": "user", "content": "Hi"}], "logprobs": False}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = agp_in("run", "p.agp", "-i", "in.jsonl", cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    got = {d["id"]: d for d in map(json.loads, r.stdout.splitlines())}
    for rid, param in (("chat", "logprobs"), ("text", "logprobs"), ("prompt", "prompt_logprobs"), ("ids", "echo")):
        error = got[rid]["error"]
        assert (error["status"], error["type"], error["param"]) == (400, "invalid", param), error
        assert "this pipeline has no model" in error["message"]
    assert got["plain"]["text"] == "Hicanned answer" and got["no_lp"]["text"] == "canned answer"


def test_a_key_a_stage_sets_on_a_result_that_no_answer_carries_is_warned_of_once(tmp_path, caplog):
    """A python stage that sets `metadata` (or any key an answer has no place for) on a result saw it
    dropped without a word. The answer still leaves it out (a chat answer has no such field), and
    the run warns once per key, naming the respond stage and where such a value goes instead."""
    (tmp_path / "nomodel_hooks.py").write_text('def canned(item):\n'
                                               '    return {"text": "canned answer", "metadata": {"tag": "x"}}\n')
    (tmp_path / "p.agp").write_text(NO_MODEL)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "Hi"}) + "\n" for i in range(3)))
    r = agp_in("run", "p.agp", "-i", "in.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["canned answer"] * 3
    assert "metadata" not in r.stdout
    warned = [rec.getMessage() for rec in caplog.records if "no answer has a place for" in rec.getMessage()]
    assert len(warned) == 1, warned
    assert "respond 'out': a result carries 'metadata'" in warned[0]
    assert "in the request's metadata" in warned[0]


def test_a_result_key_that_is_no_string_is_warned_of_and_the_request_answered(tmp_path, caplog):
    """A result with a key that is no string (`item[2] = …`) beside an unknown string key failed at
    the respond stage (a 500, a TypeError from ordering the keys to warn of): only a warning, it must
    never fail the request. Each key is warned of by its repr and the answers come back."""
    (tmp_path / "intkey_hooks.py").write_text(
        'def canned(item):\n    return {"text": "canned answer", 1: "one", ("a", 2): 3, "score": 2}\n')
    (tmp_path / "p.agp").write_text(NO_MODEL.replace("nomodel_hooks", "intkey_hooks"))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "Hi"}) + "\n" for i in range(3)))
    r = agp_in("run", "p.agp", "-i", "in.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["canned answer"] * 3
    warned = [rec.getMessage() for rec in caplog.records if "no answer has a place for" in rec.getMessage()]
    assert sorted(w.split(", which")[0] for w in warned) == [
        "respond 'out': a result carries \'score\'", "respond 'out': a result carries ('a', 2)",
        "respond 'out': a result carries 1"], warned


def test_keys_named_per_request_are_warned_of_a_bounded_number_of_times(tmp_path, caplog):
    """A stage that sets a key named per request (`item[f"score_{id}"]`) got one warning per request,
    for as long as `agp serve` ran, each name remembered. A bounded number are named, then one last
    warning says more are not; the requests after it are answered without a word."""
    (tmp_path / "perkey_hooks.py").write_text('def canned(item):\n'
                                              '    return {"text": "ok", f"score_{item[\'id\']}": 1}\n')
    (tmp_path / "p.agp").write_text(NO_MODEL.replace("nomodel_hooks", "perkey_hooks"))
    n = 200
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "Hi"}) + "\n" for i in range(n)))
    r = agp_in("run", "p.agp", "-i", "in.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == ["ok"] * n
    warned = [rec.getMessage() for rec in caplog.records if "no answer has a place for" in rec.getMessage()]
    named = [w for w in warned if "a result carries 'score_" in w]
    assert 0 < len(named) < n // 2, len(named)
    rest = [w for w in warned if w not in named]
    assert len(rest) == 1, rest
    assert "the others are not named" in rest[0] and "keep such values under one key" in rest[0]
