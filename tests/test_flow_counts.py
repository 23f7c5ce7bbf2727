"""Counts you can trust, and the smaller fixes around results: per-stage and per-edge counts
add up; a join counts what reached it; the engine's encode counts only what entered it;
`check` closes the type gap of conditional edges; a cut answer never ends in half a
character; a join fn's new dict keeps its finish reason; a bad index says so; a rejected
branch is the join's choice (on_reject)."""
from __future__ import annotations

import pytest

import flowkit
from flowkit import chain, chat, errors, run, write

HOOKS = '''
import pipeline_dsl

def judge(item):
    return "accept" if "a" in item["text"] else None

def merge_new(items):
    return {"text": " | ".join(i["text"] for i in items)}

def merge_index(items):
    return 5

def refuse_second(item):
    if item["generated_by"] == "warm":
        raise pipeline_dsl.Reject("the warm branch is refused")
    return item

def refuse_all(item):
    raise pipeline_dsl.Reject("every branch is refused")
'''


VOTE = ("stage request : requests {}\nstage gen : generate { n = 3  temperature = 1.0  seed = 4  max_new_tokens = 4 }\n"
        "stage vote : join { policy = majority }\nstage out : respond {}\n"
        "request -> batch\n" + chain() + "gen -> vote -> out\n")


def test_a_join_counts_each_result_that_reached_it_once(tmp_path, soft_gguf):
    path = write(tmp_path, soft_gguf, VOTE)
    results, rt = run(path, [chat(f"r{i}", "hello") for i in range(5)])
    assert all(r.ok for r in results)
    stats = rt.stats()
    assert stats["stages"]["vote"]["items_in"] == 15 and stats["stages"]["vote"]["items_out"] == 5
    assert stats["stages"]["gen"]["items_in"] == 15 and stats["stages"]["out"]["items_in"] == 5
    flowkit.edges_add_up(stats)


def test_the_first_engines_encode_counts_only_what_entered_its_engine(tmp_path, soft_gguf):
    """Routing by prompt_tokens tokenises every request; only the batcher's own are encode's."""
    body = ("stage request : requests {}\nstage route : route {}\n"
            "stage short_gen : generate { max_new_tokens = 2 }\nstage long_gen : generate { max_new_tokens = 2 }\n"
            "stage out : respond {}\nrequest -> route\nroute -> batch_l when prompt_tokens > 80\n"
            "route -> batch_s otherwise\n" + chain("short_gen", "batch_s", "enc_s", "kv_s")
            + chain("long_gen", "batch_l", "enc_l", "kv_l") + "short_gen -> out\nlong_gen -> out\n")
    path = write(tmp_path, soft_gguf, body)
    reqs = [chat("s1", "hi"), chat("s2", "hey"), chat("s3", "yo"), chat("l1", "the cat and the world " * 20),
            chat("l2", "the cat sat on the mat " * 20)]
    _, rt = run(path, reqs)
    stages = rt.stats()["stages"]
    assert stages["batch_s"]["items_in"] == 3 and stages["enc_s"]["items_in"] == 3
    assert stages["batch_l"]["items_in"] == 2 and stages["enc_l"]["items_in"] == 2
    flowkit.edges_add_up(rt.stats())


def test_the_run_summary_reports_weights_and_dtype_per_engine(tmp_path, soft_gguf):
    from pipeline_dsl.commands.runner import Tally, summarize

    body = ("stage request : requests {}\nstage route : route {}\n"
            "stage a : generate { max_new_tokens = 2  dtype = int8 }\nstage b : generate { max_new_tokens = 2 }\n"
            "stage out : respond {}\nrequest -> route\nroute -> batch_b when prompt_tokens > 20\n"
            "route -> batch_a otherwise\n" + chain("a", "batch_a", "enc_a", "kv_a")
            + chain("b", "batch_b", "enc_b", "kv_b") + "a -> out\nb -> out\n")
    results, rt = run(write(tmp_path, soft_gguf, body), [chat("x", "hi")])
    summary = summarize(rt, Tally.of(results), 1.0)
    assert summary["weights"] == {"a": "int8", "b": "dense"}
    assert summary["dtype"]["b"] == "float32"


def test_check_rejects_an_otherwise_edge_that_cannot_take_the_type_left_over(tmp_path, soft_gguf):
    """The issue's graph: Generated results of `judge` that are not accepted would go to b2,
    a batcher, which takes no Generated results: every such result would fail at run time."""
    body = ("stage request : requests {}\nstage gen : generate {}\nstage g2 : generate {}\nstage out : respond {}\n"
            'stage judge : python { fn = "hooks:judge"  returns = any }\n'
            "request -> batch\n" + chain() + chain("g2", "b2", "e2", "k2") +
            "gen -> judge\njudge -> out when accept\njudge -> b2 otherwise\ng2 -> out\n")
    errs = errors(write(tmp_path, soft_gguf, body, hooks=HOOKS))
    assert len(errs) == 1
    assert errs[0].message == ("Generated items of 'judge' that match none of its conditions have nowhere to go: "
                               "its `otherwise` edge leads to 'b2', which cannot take Generated items")
    assert (tmp_path / "p.agp").read_text().splitlines()[errs[0].pos.line - 1].strip() == "judge -> b2 otherwise"


def test_the_fixed_graph_runs_every_result_to_an_end(tmp_path, soft_gguf):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 4 }\n"
            "stage g2 : generate { max_new_tokens = 2 }\nstage out : respond {}\nstage r : route {}\n"
            'stage judge : python { fn = "hooks:judge"  returns = any }\n'
            "request -> batch\n" + chain() + chain("g2", "b2", "e2", "k2") +
            "gen -> judge\njudge -> out when accept\njudge -> r otherwise\nr -> b2\nr -> out\ng2 -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    results, rt = run(path, [chat(f"q{i}", "hello " * i) for i in range(6)])
    assert all(r.ok for r in results)
    flowkit.edges_add_up(rt.stats())


def test_an_answer_cut_by_max_tokens_never_ends_in_half_a_character(tmp_path, soft_gguf):
    """Token 3 + 0xC3 is the first byte of 'é' in the tiny model's byte-level vocabulary."""
    body = ("stage request : requests {}\nstage gen : generate {}\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> out\n")
    req = {"id": "a", "prompt": "hi", "max_tokens": 1, "logit_bias": {str(3 + 0xC3): 100}}
    (res,), _ = run(write(tmp_path, soft_gguf, body), [req])
    assert res.ok and res.usage["completion_tokens"] == 1
    assert res.choices[0].finish_reason == "length" and "\ufffd" not in res.choices[0].text


FAN = ("stage request : requests {}\nstage cold : generate { max_new_tokens = 3 }\n"
       "stage warm : generate { max_new_tokens = 3  temperature = 0.9  seed = 5 }\n"
       "stage j : join { JOIN }\nstage out : respond {}\nrequest -> batch\n" + chain("cold") +
       "kv -> warm\nPOST")


def fan(tmp_path, model, join: str, post: str = "cold -> j\nwarm -> j\nj -> out\n"):
    path = write(tmp_path, model, FAN.replace("JOIN", join).replace("POST", post), hooks=HOOKS)
    assert errors(path) == []
    return path


def test_a_join_functions_new_dict_keeps_the_finish_reason_and_usage(tmp_path, soft_gguf):
    (res,), _ = run(fan(tmp_path, soft_gguf, 'fn = "hooks:merge_new"'), [chat("a", "hi")])
    c = res.choices[0]
    assert res.ok and " | " in c.text
    assert c.finish_reason == "length" and c.data["usage"]["completion_tokens"] == 4
    assert c.data["generated_by"] == "cold" and len(c.data["branches"]) == 2


def test_a_join_index_out_of_range_says_so(tmp_path, soft_gguf):
    (res,), rt = run(fan(tmp_path, soft_gguf, 'fn = "hooks:merge_index"'), [chat("a", "hi")])
    assert res.error.kind == "failed" and res.error.stage == "j"
    assert res.error.message == ("join 'j' failed: IndexError: the join function returned index 5, "
                                 "but there are 2 results (0..1)")
    flowkit.edges_add_up(rt.stats())
    assert rt.stats()["stages"]["j"]["failed"] == 1 and rt.stats()["stages"]["j"]["dropped"] == 1


@pytest.mark.parametrize("policy, hook, ok", [
    ("on_reject = drop", "refuse_second", True),     # the other branch is the answer
    ("on_reject = fail", "refuse_second", False),    # the default: one Reject fails the request
    ("on_reject = drop", "refuse_all", False),       # nothing left to merge
])
def test_on_reject_decides_what_a_rejected_branch_does(tmp_path, soft_gguf, policy, hook, ok):
    post = (f'stage guard : python {{ fn = "hooks:{hook}" }}\n'
            "cold -> guard\nwarm -> guard\nguard -> j\nj -> out\n")
    (res,), rt = run(fan(tmp_path, soft_gguf, f"policy = first  {policy}", post), [chat("a", "hi")])
    assert res.ok is ok
    if ok:
        assert [b["text"] for b in res.choices[0].data["branches"]] == [res.choices[0].text]
        assert res.choices[0].data["generated_by"] == "cold"
    else:
        assert res.error.kind == "rejected" and res.error.stage == "guard"
    flowkit.edges_add_up(rt.stats())
    row = rt.stats()["stages"]["guard"]                 # a Reject counts as rejected, dropped branch or not
    assert row["rejected"] == {"refuse_second": 1, "refuse_all": 2}[hook] and row["failed"] == 0


def test_stage_latencies_reach_metrics(tmp_path, soft_gguf):
    from pipeline_dsl.serve.metrics import ServerMetrics

    _, rt = run(write(tmp_path, soft_gguf, VOTE), [chat("a", "hello")])
    text = ServerMetrics("p", process=False).render(rt.stats())[0].decode()
    assert 'agp_stage_latency_seconds_count{kind="join",model_name="p",stage="vote"} 1.0' in text
    assert 'agp_stage_latency_seconds_bucket{kind="join",le="+Inf",model_name="p",stage="vote"} 1.0' in text


def test_a_request_that_ends_while_its_prompt_is_tokenised_is_counted_where_it_was(tmp_path, soft_gguf):
    """The client goes while the engine tokenises its prompt (outside the runtime's lock): the
    item is dropped at encode, and encode must not also send it on to kv_lookup (encode's in = out
    + dropped; a property test saw 8 in, 8 out, 1 dropped on a busy machine)."""
    import threading

    from flowkit import runtime

    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> out\n")
    rt = runtime(write(tmp_path, soft_gguf, body))
    es = rt.segments[0]
    entered, ended, done = threading.Event(), threading.Event(), threading.Event()
    tokenise = es.tokenise

    def held(data):
        entered.set()
        assert ended.wait(60)                 # the request ends while its prompt is tokenised
        return tokenise(data)

    class Listener:
        result = None

        def on_done(self, result):
            Listener.result = result
            done.set()

    es.tokenise = held
    try:
        key = rt.submit(chat("gone", "hello"), Listener())
        assert entered.wait(60)
        rt.abort(key)
        ended.set()
        assert done.wait(60)
        es.tokenise = tokenise
        (after,) = rt.run_all([chat("next", "hello")])      # the engine serves the next request
        assert not Listener.result.ok and Listener.result.error.kind == "aborted" and after.ok
        stats = rt.stats()
        enc = stats["stages"]["encode"]
        assert enc["items_in"] == enc["items_out"] + enc["dropped"] == 2 and enc["dropped"] == 1, enc
        assert stats["stages"]["kv"]["items_in"] == 1
        flowkit.edges_add_up(stats)
    finally:
        ended.set()
        rt.shutdown()


def test_a_request_its_engine_cannot_serve_counts_as_rejected_where_it_was_refused(tmp_path, soft_gguf):
    """A prompt longer than the context is the request's fault (HTTP 400, kind invalid): the stage
    that refused it counts it as rejected, not failed, and the other requests are answered. (A
    python stage before the batcher, which could shorten the prompt, keeps the refusal in the
    pipeline: without one it comes before admission, next test.)"""
    hooks = HOOKS + "\ndef same(item):\n    return item\n"
    path = write(tmp_path, soft_gguf, "stage request : requests {}\nstage pass : python { fn = \"hooks:same\" }\n"
                 "stage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\nrequest -> pass\n"
                 "pass -> batch\n" + chain() + "gen -> out\n", hooks=hooks)
    ok, long_ = chat("ok", "hi"), chat("long", "word " * 5000)
    (a, b), rt = run(path, [ok, long_])
    assert a.ok and not b.ok and b.error.kind == "invalid"
    rows = rt.stats()["stages"]
    assert rows[b.error.stage]["rejected"] == 1
    assert sum(r["failed"] for r in rows.values()) == 0
    flowkit.edges_add_up(rt.stats())


def test_a_prompt_refused_before_admission_is_counted_by_no_stage(tmp_path, soft_gguf):
    """Where the prompt reaches the engine as sent, one certainly too long is refused before it is
    admitted (a 400, never a full queue's 429): it entered no stage, so no stage counts it, and the
    counts still add up."""
    path = write(tmp_path, soft_gguf, "stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\n"
                 "stage out : respond {}\nrequest -> batch\n" + chain() + "gen -> out\n")
    (a, b), rt = run(path, [chat("ok", "hi"), chat("long", "word " * 5000)])
    assert a.ok and not b.ok and b.error.kind == "invalid"
    rows = rt.stats()["stages"]
    assert sum(r["rejected"] + r["failed"] for r in rows.values()) == 0
    assert rows["request"]["items_in"] == 1
    flowkit.edges_add_up(rt.stats())


def test_an_answer_whose_request_then_fails_counts_as_dropped_at_respond(tmp_path, soft_gguf):
    """gen -> out and gen -> late -> out, late failing after the first copy was answered: the
    request fails, and respond counts the answer it had taken in as dropped (in = choices +
    rejected + failed + dropped, as everywhere)."""
    hooks = HOOKS + '''
import flowkit

def late(item):
    flowkit.gate("late").wait(60)          # set once the other copy has reached respond
    raise ValueError("too late")
'''
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2 }\n"
            "stage late : python { fn = \"hooks:late\" }\nstage out : respond {}\n"
            "request -> batch\n" + chain() + "gen -> out\ngen -> late\nlate -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=hooks)
    assert errors(path) == []
    (res,), rt = run(path, [chat("a", "hello")], open_when=("out", "late"))   # the other branch goes on after
    assert res.error.kind == "failed" and res.error.stage == "late"
    stages = rt.stats()["stages"]
    assert stages["late"]["failed"] == 1
    assert stages["out"]["items_in"] == 1 and stages["out"]["dropped"] == 1
    flowkit.edges_add_up(rt.stats())


def test_a_prompt_shared_by_n_copies_counts_its_cached_tokens_once(tmp_path, soft_gguf):
    """A prompt served from the prefix cache, asked for with n = 3: the three copies share one
    prompt, so the request's cached_tokens are the prompt's cached tokens once, as with n = 1."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 2  temperature = 1.0  seed = 1 }\n"
            "stage out : respond {}\nrequest -> batch\n" + chain() + "gen -> out\n")
    path = write(tmp_path, soft_gguf, body)
    rt = flowkit.runtime(path)
    try:
        text = "the same long prompt, served from the prefix cache the second time " * 2
        (warm,) = rt.run_all([chat("warm", text)], keep_open=True)
        (three,) = rt.run_all([chat("three", text, n=3)], keep_open=True)
        (one,) = rt.run_all([chat("one", text)], keep_open=True)
    finally:
        rt.shutdown()
    assert warm.ok and three.ok and one.ok and len(three.choices) == 3
    assert 0 < one.usage["cached_tokens"] <= one.usage["prompt_tokens"]
    assert three.usage["cached_tokens"] == one.usage["cached_tokens"]
    assert three.usage["prompt_tokens"] == one.usage["prompt_tokens"]


def test_a_prompt_over_max_prompt_tokens_counts_where_it_was_refused(tmp_path, soft_gguf):
    """The prompt limit is the source's (the error names it), but the prompt is counted at the
    engine's encode, which the request had reached: the refusal counts there, so every stage's
    items in are its items out plus what it refused (the source sent the request on)."""
    path = write(tmp_path, soft_gguf, "stage request : requests { max_prompt_tokens = 80 }\n"
                 "stage gen : generate { max_new_tokens = 2 }\nstage out : respond {}\nrequest -> batch\n"
                 + chain() + "gen -> out\n")
    (a, b), rt = run(path, [chat("ok", "hi"), chat("long", "word " * 60)])
    assert a.ok and not b.ok and b.error.kind == "invalid" and b.error.stage == "request"
    assert "max_prompt_tokens" in b.error.message
    rows = rt.stats()["stages"]
    assert rows["request"]["rejected"] == 0 and rows["encode"]["rejected"] == 1
    flowkit.check_counts(rt, 1)


def test_the_usage_a_stream_hears_never_goes_down_when_n_copies_hit_the_cache_differently(tmp_path, tiny_gguf):
    """n = 2 on a step budget of one prompt: the second copy is admitted after the first one's
    prefill and hits its blocks, so the copies' cached tokens differ. The shared prompt counts
    once, with the cached tokens of the copy heard of first: every delta's usage is at least the
    one before (the first copy's end used to put the second's cached tokens back to its own)."""
    body = ("stage request : requests {}\n"
            "stage batch : dynamic_batch { max_batch_size = 2  timeout = 1ms  max_tokens_per_step = 24 }\n"
            "stage encode : encode {}\nstage kv : kv_lookup { block_size = 8  budget = 2MiB }\n"
            "stage gen : generate { max_new_tokens = 4 }\nstage out : respond {}\n"
            "request -> batch\nbatch -> encode when full\nbatch -> encode when timeout\nencode -> kv -> gen -> out\n")
    path = write(tmp_path, tiny_gguf, body)
    assert errors(path) == []
    rt = flowkit.runtime(path)
    rt.start()
    try:
        heard = flowkit.Heard()
        deltas = []
        heard.on_delta = lambda key, index, out: deltas.append((index, out.cached_tokens, dict(out.usage)))
        rt.submit({"id": "a", "prompt_token_ids": list(range(5, 29)), "n": 2, "max_tokens": 4, "ignore_eos": True,
                   "temperature": 0}, heard, stream=True)
        assert heard.done.wait(120)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert heard.result.ok and len(heard.result.choices) == 2
    cached = {index: c for index, c, _ in deltas}
    assert cached[0] != cached[1], cached                       # the copies hit the cache differently
    usages = [u for _, _, u in deltas]
    for before, after in zip(usages, usages[1:]):
        assert all(after[k] >= before[k] for k in before), usages
    assert usages[-1] == heard.result.usage
    assert heard.result.usage["cached_tokens"] == cached[deltas[0][0]]   # the copy heard of first


def test_two_generate_stages_on_one_kv_lookup_prefill_their_shared_prompt_once(tmp_path, tiny_gguf):
    """`kv -> a` and `kv -> b` share one engine: the second sequence waits a step for the
    first one's prompt blocks and reads them from the prefix cache, so the engine prefills the
    prompt once (and the last, partly filled block and token again). The request's usage counts
    the shared prompt once, as n copies' is, with the cached tokens of the copy heard of first
    (the one that computed it: 0); the engine's counts show the hit."""
    body = ("stage request : requests {}\nstage a : generate { max_new_tokens = 3 }\n"
            "stage b : generate { max_new_tokens = 3 }\nstage j : join {}\nstage out : respond {}\n"
            "request -> batch\nkv -> b\na -> j\nb -> j\nj -> out\n" + chain("a"))
    path = write(tmp_path, tiny_gguf, body)
    assert errors(path) == []
    prompt = list(range(5, 50))                                  # 45 tokens: 5 full blocks of 8 before the last
    (r,), rt = run(path, [{"id": "x", "prompt_token_ids": prompt, "max_tokens": 3, "ignore_eos": True}])
    assert r.ok, r.error
    (engine,) = rt.stats()["engines"].values()
    hit = (len(prompt) - 1) // 8 * 8
    assert (engine["prefill_tokens"], engine["cached_tokens"]) == (len(prompt) + len(prompt) - hit, hit)
    assert (r.usage["prompt_tokens"], r.usage["cached_tokens"]) == (len(prompt), 0)


def test_generate_stages_sharing_an_engine_split_its_generate_time_between_them(tmp_path, tiny_gguf):
    """Two generate stages of one engine segment: the segment's generate work (input copy, forward,
    token copy, emit: one step serves both) is each stage's busy_s in equal shares, so the stages'
    busy seconds add up to the time the engine spent, not twice it."""
    from test_run_batch_api import FAN

    path = tmp_path / "fan.agp"
    path.write_text(FAN.format(model=tiny_gguf))
    results, rt = run(path, [{"id": "a", "prompt": "hello"}])
    assert all(r.ok for r in results)
    s = rt.stats()
    [(name, engine)] = s["engines"].items()
    work = sum(v for k, v in engine["work_s"].items() if k.startswith(name + "."))
    g1, g2 = s["stages"]["g1"]["busy_s"], s["stages"]["g2"]["busy_s"]
    assert work > 0 and g1 == g2 and g1 + g2 == pytest.approx(work, abs=2e-6)
