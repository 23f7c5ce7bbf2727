"""How many answers a request gets (`n`), as `agp run`'s lines show them: a `join` after the
generate stage merges the n samples into one answer (examples/vote.agp), a fan-out's branches too;
a python stage that answers a request itself, no generate stage taking it, answers each of the n
choices the model would have given: the request's n, or its generate stage's where it sets none."""
from __future__ import annotations

import json

from test_run_errors import PIPELINE, records, run

GUARD = 'stage guard   : python   { fn = "flowkit:refuse_blocked"  returns = any }\n    stage out'


def answers(line: dict) -> list[str]:
    """The texts of a plain output line's answers: its choices, or its one text."""
    assert line.get("error") is None, line
    return [c["text"] for c in line["choices"]] if "choices" in line else [line["text"]]


def lines(tmp_path, text: str, *requests: dict) -> list[dict]:
    path, inp, out = tmp_path / "p.agp", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text(text)
    inp.write_text("".join(json.dumps({"id": f"r{k}", **r}) + "\n" for k, r in enumerate(requests)))
    r = run(path, "-i", inp, "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    return records(out)


def test_a_join_after_generate_merges_the_n_samples_into_one_answer(tmp_path, tiny_gguf):
    """`n = 3` sent, or the stage's `n = 3`: the join's majority is one answer, not three copies of it."""
    text = (PIPELINE.format(model=tiny_gguf)
            .replace("stage out     : respond {}", "stage vote : join { policy = majority }\n    stage out : respond {}")
            .replace("gen -> out", "gen -> vote -> out"))
    sent, = lines(tmp_path, text, {"prompt": "once upon", "n": 3, "temperature": 1, "seed": 1})
    assert len(answers(sent)) == 1, sent
    staged, = lines(tmp_path, text.replace("max_new_tokens = 4", "max_new_tokens = 4  n = 3"),
                    {"prompt": "once upon", "temperature": 1, "seed": 1})
    assert len(answers(staged)) == 1, staged


def test_a_join_after_a_fan_out_answers_once_whatever_n(tmp_path, tiny_gguf):
    """Two generate stages joined with `policy = first`: one answer, with or without `n`."""
    from test_run_batch_api import FAN

    text = (FAN.format(model=tiny_gguf)
            .replace("stage out     : respond {}", "stage j : join { policy = first }\n    stage out : respond {}")
            .replace("kv -> g1 -> out\n    kv -> g2 -> out", "kv -> g1 -> j\n    kv -> g2 -> j\n    j -> out"))
    plain, two = lines(tmp_path, text, {"prompt": "hello"}, {"prompt": "hello", "n": 2})
    assert len(answers(plain)) == 1 and len(answers(two)) == 1, (plain, two)


def test_a_python_stages_own_answer_fills_the_generate_stages_n(tmp_path, tiny_gguf):
    """A guard before a generate stage of `n = 3` answers a blocked request itself: a request that
    sets no n gets 3 choices of the guard's answer, as one the guard lets through gets 3 of the
    model's; a request's own n replaces the stage's."""
    text = (PIPELINE.format(model=tiny_gguf).replace("stage out", GUARD, 1)
            .replace("request -> batch", "request -> guard -> batch\n    guard -> out")
            .replace("max_new_tokens = 4", "max_new_tokens = 2  n = 3"))
    blocked, passed, one = lines(tmp_path, text, {"prompt": "blocked"}, {"prompt": "fine"},
                                 {"prompt": "blocked", "n": 1})
    assert answers(blocked) == ["I can't help with that."] * 3, blocked
    assert len(answers(passed)) == 3, passed
    assert answers(one) == ["I can't help with that."], one


def test_a_requests_own_n_replaces_its_generate_stages(tmp_path, tiny_gguf):
    """A generate stage of `n = 3`: a request that sets no n gets 3 choices of the model's, one
    that sets its own gets that many, fewer or more."""
    text = PIPELINE.format(model=tiny_gguf).replace("max_new_tokens = 4", "max_new_tokens = 2  n = 3")
    staged, one, five = lines(tmp_path, text, {"prompt": "hello"}, {"prompt": "hello", "n": 1},
                              {"prompt": "hello", "n": 5})
    assert [len(answers(x)) for x in (staged, one, five)] == [3, 1, 5], (staged, one, five)
