"""Timeouts where user code waits on others: a join's fn is bounded as a python stage's
call is (timeout, retries; `check` reads the unit, `agp stages` shows it), and a stream
stage's timeout bounds the function's own time per chunk, not the generation it waits on."""
from __future__ import annotations

import pytest

import pipeline_dsl
import flowkit
from clikit import agp_in
from flowkit import chain, chat, errors, run, runtime, write

HOOKS = '''
import time
import flowkit

def slow_merge(results):
    flowkit.bump("merge")
    flowkit.gate("merge").wait(30)
    return 0

def flaky_merge(results):
    if flowkit.bump("flaky") == 1:
        raise ConnectionError("reset by peer")
    return 0

def broken_merge(results):
    flowkit.bump("broken")
    raise ConnectionError("reset by peer")

def scribbling_merge(results):
    usage = results[0]["usage"]
    usage["scribbled"] = usage.get("scribbled", 0) + 1    # a nested write, then the connection breaks
    if flowkit.bump("scribbling") == 1:
        raise ConnectionError("reset by peer")
    return {"text": f"scribbled {usage['scribbled']}"}

def slow_chunks(item, chunks):        # upstream of a fast guard: the answer arrives slowly
    for i, text in enumerate(chunks):
        time.sleep(1.2 if i == 0 else 0.01)
        yield text

def fast_guard(item, chunks):
    for text in chunks:
        yield text

def slow_guard(item, chunks):
    for text in chunks:
        flowkit.gate("guard").wait(30)
        yield text
'''


pytestmark = pytest.mark.usefixtures("fresh_flowkit")


def joined(tmp_path, model, join: str):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2  n = 2 }\n"
            f"stage out : respond {{}}\nstage j : join {{ {join} }}\nrequest -> batch\n"
            + chain() + "gen -> j -> out\n")
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def test_a_join_fn_past_its_timeout_fails_its_request_with_the_join_named(tmp_path, soft_gguf):
    path = joined(tmp_path, soft_gguf, 'fn = "hooks:slow_merge"  timeout = 100ms')
    (r,), rt = run(path, [chat("a", "hi")])
    assert r.error.kind == "timeout" and r.error.stage == "j"
    assert r.error.message == "join 'j' timed out: it took longer than its timeout (0.1s)"
    assert rt.stats()["stages"]["j"]["timeouts"] == 1


def test_a_join_fn_is_retried_after_a_transient_error(tmp_path, soft_gguf):
    path = joined(tmp_path, soft_gguf, 'fn = "hooks:flaky_merge"  retries = 1  backoff = 1ms')
    (r,), rt = run(path, [chat("a", "hi")])
    assert r.ok and flowkit.COUNTS["flaky"] == 2
    assert rt.stats()["stages"]["j"]["retries"] == 1


@pytest.mark.parametrize("fn, timeout, said", [
    ("broken_merge", "", "join 'j' failed: ConnectionError: reset by peer"),
    ("slow_merge", "timeout = 100ms", "join 'j' timed out: it took longer than its timeout (0.1s)"),
])
def test_a_join_fn_that_fails_every_try_says_how_many_tries_it_had(tmp_path, soft_gguf, fn, timeout, said):
    """As a python stage's error does: a join that failed once reads apart from one that failed
    every retry."""
    path = joined(tmp_path, soft_gguf, f'fn = "hooks:{fn}"  {timeout}  retries = 2  backoff = 1ms')
    (r,), rt = run(path, [chat("a", "hi")])
    # a ConnectionError is transient: its request is unavailable (agp serve: 503), not a bug's 500
    assert r.error.stage == "j" and r.error.kind == ("unavailable" if fn == "broken_merge" else "timeout")
    assert r.error.message == f"{said}; 3 tries"
    assert rt.stats()["stages"]["j"]["retries"] == 2


def test_a_join_fn_retry_gets_the_results_as_they_came_not_as_the_failed_try_left_them(tmp_path, soft_gguf):
    path = joined(tmp_path, soft_gguf, 'fn = "hooks:scribbling_merge"  retries = 1  backoff = 1ms')
    (r,), rt = run(path, [chat("a", "hi")])
    assert r.ok, r.error
    assert flowkit.COUNTS["scribbling"] == 2 and rt.stats()["stages"]["j"]["retries"] == 1
    assert r.choices[0].text == "scribbled 1"


def test_check_reads_a_join_timeouts_unit_and_warns_without_fn(tmp_path, soft_gguf):
    body = ("stage request : requests {}\nstage gen : generate { n = 2 }\nstage out : respond {}\n"
            "stage j : join { fn = \"hooks:slow_merge\"  timeout = 2 }\nstage k : join { policy = first  timeout = 1s }\n"
            "request -> batch\n" + chain() + "gen -> j -> k -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    _, diags = pipeline_dsl.load(str(path))
    errs = [d for d in diags if d.is_error]
    assert len(errs) == 1 and "unit" in errs[0].message
    warns = [d.message for d in diags if not d.is_error]
    assert any("join 'k' sets timeout but has no fn" in w for w in warns)


def test_agp_stages_shows_a_joins_timeout(tmp_path):
    out = agp_in("stages", "join")
    assert out.returncode == 0 and "timeout" in out.stdout and "retries" in out.stdout


def streamed(tmp_path, model, stages: str, edges: str):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 12 }\nstage out : respond {}\n"
            f"{stages}\nrequest -> batch\n" + chain() + edges)
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def said(rid) -> dict:
    """An answer of one printable character a token ('a', biased to win), so every token is a chunk."""
    return chat(rid, "hello there", max_tokens=12, logit_bias={str(3 + ord("a")): 100})


def test_a_stream_stage_timeout_does_not_count_the_wait_for_its_chunks(tmp_path, soft_gguf):
    """12 chunks, the first held 1.2 s upstream and the rest 10 ms each: the guard waits longer
    than its 1 s timeout for one chunk and for the whole answer, but its own work per chunk is
    instant, so the timeout is never reached (1 s: a busy machine's scheduling hiccups, 0.36 s
    seen, stay well inside it)."""
    path = streamed(tmp_path, soft_gguf, 'stage slow : python { fn = "hooks:slow_chunks"  stream = true }\n'
                    'stage g : python { fn = "hooks:fast_guard"  stream = true  timeout = 1s }',
                    "gen -> slow -> g -> out\n")
    rt = runtime(path)
    try:
        (r,) = rt.run_all([said("a")])
    finally:
        rt.shutdown()
    assert r.ok and r.usage["completion_tokens"] == 12 and len(r.choices[0].text) == 12
    assert rt.stats()["stages"]["g"]["timeouts"] == 0


def test_a_stream_stage_slow_on_one_chunk_is_timed_out(tmp_path, soft_gguf):
    path = streamed(tmp_path, soft_gguf, 'stage g : python { fn = "hooks:slow_guard"  stream = true  timeout = 100ms }',
                    "gen -> g -> out\n")
    (r,), rt = run(path, [said("a")])
    assert r.error.kind == "timeout" and r.error.stage == "g"
    assert r.error.message == "stage 'g' timed out: it took longer than its timeout (0.1s)"
