"""Stream stages: a python generator after generate filters the text while it is generated,
and the client hears the filtered chunks as they come instead of the whole answer at once."""
from __future__ import annotations

import threading
import time

import pytest

import flowkit
from flowkit import chain, chat, errors, runtime, write

HOOKS = '''
import functools
import time
import flowkit
import pipeline_dsl

def upper(item, chunks):
    for text in chunks:
        yield text.upper()

def stars(item, chunks):
    for text in chunks:
        yield text.replace("A", "*")

def guard(item, chunks):
    seen = 0
    for text in chunks:
        seen += 1
        if seen == 2 and item["request"].get("metadata", {}).get("refuse"):
            raise pipeline_dsl.Reject("the guard stopped this answer")
        yield text

def first_chunk_then_wait(item, chunks):
    for i, text in enumerate(chunks):
        yield text
        if i == 0:                     # go on only once the client has this first chunk
            flowkit.bump("seen" if flowkit.gate("client has it").wait(30) else "not seen")

async def aupper(item, chunks):
    async for text in chunks:
        yield text.upper()

def logged(fn):                        # a decorator as a team writes one: functools.wraps, no yield
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        flowkit.bump("logged")
        return fn(*args, **kwargs)
    return wrapper

def held_live(item, chunks):
    with flowkit.running("live"):
        for text in chunks:
            yield text
        flowkit.gate("all live").wait(20)

@logged
def dupper(item, chunks):
    for text in chunks:
        yield text.upper()

@logged
async def adupper(item, chunks):
    async for text in chunks:
        yield text.upper()

def tagged(item, chunks):
    for text in chunks:
        yield "<" + text + ">"

def slow_tagged(item, chunks):         # still at work well after the stage before it ended
    for text in chunks:
        time.sleep(0.05)
        yield "<" + text + ">"

def seen(item):                        # a plain (whole-answer) stage
    item["text"] += " (seen)"

def labelled(item, chunks):
    for text in chunks:
        yield text
    return "long" if item["request"]["id"] == "l" else "short"
'''


@pytest.fixture(autouse=True)
def _fresh():
    flowkit.reset()
    yield


class Listener:
    def __init__(self):
        self.deltas, self.result, self.done = [], None, threading.Event()
        self.finished = 0
        self.writers = set()                 # the generate stages the deltas said wrote them
        self.heard = []                # (delta_text, finished) in the order heard

    def on_delta(self, key, index, out):
        self.deltas.append(out.delta_text)
        self.writers.add(out.generated_by)
        self.finished += out.finished
        self.heard.append((out.delta_text, out.finished))

    def on_done(self, result):
        self.result = result
        self.done.set()


def served(path, requests):
    """Each request submitted as a stream (agp serve's way); its Listener once answered."""
    rt = runtime(path)
    rt.start()
    heard = []
    try:
        for r in requests:
            one = Listener()
            rt.submit(dict(r), one, stream=True)
            heard.append(one)
        for one in heard:
            assert one.done.wait(120), "no answer"
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    return heard, rt


def said(rid, max_tokens=8, **kw) -> dict:
    """A request whose answer is printable text, one character a token ('a', biased to win):
    the random tiny model's own bytes are often not UTF-8 and would stream as nothing."""
    return chat(rid, "hello there", max_tokens=max_tokens, logit_bias={str(3 + ord("a")): 100}, **kw)


def pipeline(tmp_path, model, stages: str, edges: str, n: int = 1):
    body = (f"stage request : requests {{}}\nstage gen : generate {{ max_new_tokens = 8  n = {n} }}\n"
            f"stage out : respond {{}}\n{stages}\nrequest -> batch\n" + chain() + edges)
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def test_a_stream_stage_filters_each_chunk_and_the_client_hears_them_as_they_come(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage up : python { fn = "hooks:upper"  stream = true }',
                    "gen -> up -> out\n")
    (one,), rt = served(path, [said("a")])
    text = one.result.choices[0].text
    assert one.result.ok and text == text.upper() and text
    assert "".join(one.deltas) == text                       # what streamed is the answer
    assert len([d for d in one.deltas if d]) > 1             # chunk by chunk, not once at the end
    assert one.writers == {"gen"}                            # the stage whose answer the filter streams
    assert one.finished == 1 and one.result.choices[0].finish_reason == "length"
    assert rt.stats()["stages"]["up"]["items_in"] == 1 and rt.stats()["stages"]["up"]["items_out"] == 1


def test_two_stream_stages_chain_and_the_text_equals_the_unfiltered_answer_filtered(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage up : python { fn = "hooks:upper"  stream = true }\n'
                    'stage st : python { fn = "hooks:stars"  stream = true }', "gen -> up -> st -> out\n")
    (one,), _ = served(path, [said("a")])
    text = one.result.choices[0].text
    assert "A" not in text and text == text.upper() and "".join(one.deltas) == text


def test_the_client_hears_exactly_the_chunks_of_the_last_stream_stage_of_a_chain(tmp_path, soft_gguf):
    """gen -> up -> tag -> out: every chunk the client hears went through both stages (upper,
    then tagged), none of up's own chunks reach it directly, and they add up to the answer."""
    path = pipeline(tmp_path, soft_gguf, 'stage up : python { fn = "hooks:upper"  stream = true }\n'
                    'stage tag : python { fn = "hooks:tagged"  stream = true }', "gen -> up -> tag -> out\n")
    (one,), rt = served(path, [said("a")])
    text = one.result.choices[0].text
    chunks = [d for d in one.deltas if d]
    assert one.result.ok and len(chunks) > 1 and "".join(chunks) == text
    assert all(c.startswith("<") and c.endswith(">") and c == c.upper() for c in chunks), chunks
    assert one.finished == 1
    assert rt.stats()["stages"]["tag"]["items_out"] == 1


def test_the_client_hears_the_end_of_a_chain_s_answer_after_its_last_stage_s_last_chunk(tmp_path, soft_gguf):
    """gen -> up -> tag -> out, tag slower than up: the finished delta (finish reason, last
    tokens) comes once the chain's last stage ended, after every chunk it let through."""
    path = pipeline(tmp_path, soft_gguf, 'stage up : python { fn = "hooks:upper"  stream = true }\n'
                    'stage tag : python { fn = "hooks:slow_tagged"  stream = true }', "gen -> up -> tag -> out\n")
    (one,), _ = served(path, [said("a")])
    assert one.result.ok, one.result.error
    assert one.finished == 1 and one.heard[-1][1], one.heard
    assert "".join(text for text, _ in one.heard) == one.result.choices[0].text


@pytest.mark.parametrize("stages, edges", [
    # the chain's last stage goes on to a plain stage that needs the whole answer
    ('stage up : python { fn = "hooks:upper"  stream = true }\nstage p : python { fn = "hooks:seen" }',
     "gen -> up -> p -> out\n"),
    # its edges are conditional (its label picks one at the end), the first one to respond
    ('stage f : python { fn = "hooks:labelled"  stream = true }\n'
     'stage up : python { fn = "hooks:upper"  stream = true }',
     "gen -> f\nf -> out when short\nf -> up otherwise\nup -> out\n"),
])
def test_a_stream_chain_that_does_not_go_straight_to_respond_streams_nothing_to_the_client(tmp_path, soft_gguf,
                                                                                          stages, edges):
    """Stream stages stream to the client only when they lead straight (single unconditional
    edges) to respond; otherwise their chunks stay inside and the answer comes whole at the end
    (agp serve sends it as one chunk), as it is after the stages that follow."""
    path = pipeline(tmp_path, soft_gguf, stages, edges)
    heard, _ = served(path, [said("s"), said("l")])
    for one in heard:
        assert one.result.ok, one.result.error
        assert [d for d in one.deltas if d] == [], one.deltas
    texts = [one.result.choices[0].text for one in heard]
    if "hooks:seen" in stages:
        assert all(t.endswith(" (seen)") and t[:-len(" (seen)")] == t[:-len(" (seen)")].upper() for t in texts)
    else:
        assert texts[1] == texts[1].upper()                   # "l" went on through up


def test_the_client_gets_a_chunk_while_the_filter_still_runs(tmp_path, soft_gguf):
    """The filter's first chunk reaches the client before the filter has seen the rest: a
    guard costs a chunk's latency, not the whole answer's."""
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:first_chunk_then_wait"  stream = true }',
                    "gen -> f -> out\n")
    rt = runtime(path)
    rt.start()
    one = Listener()

    def on_delta(key, index, out):
        if out.delta_text:
            flowkit.gate("client has it").set()
        Listener.on_delta(one, key, index, out)
    one.on_delta = on_delta
    try:
        rt.submit(said("a", 16), one, stream=True)
        assert one.done.wait(120)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert one.result.ok and one.result.usage["completion_tokens"] == 16
    assert flowkit.COUNTS["seen"] == 1 and flowkit.COUNTS["not seen"] == 0


def test_a_stream_stage_that_rejects_mid_answer_fails_only_its_request(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage g : python { fn = "hooks:guard"  stream = true }',
                    "gen -> g -> out\n")
    (bad, good), rt = served(path, [said("bad", 16, metadata={"refuse": True}), said("good", 16)])
    assert bad.result.error.kind == "rejected" and bad.result.error.stage == "g"
    assert bad.result.error.message == "the guard stopped this answer"
    assert len(bad.deltas) >= 1                               # what was let through before stays sent
    assert good.result.ok and good.result.usage["completion_tokens"] == 16
    row = rt.stats()["stages"]["g"]
    assert row["rejected"] == 1 and row["items_in"] == 2 and row["items_out"] == 1


def test_an_async_generator_filters_too(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage up : python { fn = "hooks:aupper"  stream = true }',
                    "gen -> up -> out\n")
    (one,), _ = served(path, [said("a")])
    text = one.result.choices[0].text
    assert one.result.ok and text == text.upper() and "".join(one.deltas) == text


def test_a_stream_stage_filters_every_sequence_its_engine_runs_at_once(tmp_path, soft_gguf):
    """Each live call lasts its answer's generation: with the default 16 workers and a batch of
    24, eight streams heard nothing until others ended (64 clients: TTFT 0.5 s -> 4 s). The
    default is at least the sequences its engines run at once; a given `workers` is kept."""
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 8 }\nstage out : respond {}\n"
            'stage up : python { fn = "hooks:held_live"  stream = true }\n'
            "stage batch : dynamic_batch { max_batch_size = 24  timeout = 50ms }\nstage encode : encode {}\n"
            "stage kv : kv_lookup { block_size = 8  budget = 2MiB }\nrequest -> batch\n"
            "batch -> encode when full\nbatch -> encode when timeout\nencode -> kv -> gen -> up -> out\n")
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    rt = runtime(path)
    rt.start()
    heard = []
    try:
        for i in range(20):
            heard.append(Listener())
            rt.submit(said(f"r{i}", 8), heard[-1], stream=True)
        deadline = time.monotonic() + 20
        while flowkit.PEAKS["live"] < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        peak = flowkit.PEAKS["live"]
        flowkit.gate("all live").set()
        assert all(one.done.wait(60) and one.result.ok for one in heard)
        assert peak == 20
    finally:
        flowkit.gate("all live").set()
        rt.close(drain=True, timeout=30)
        rt.shutdown()


@pytest.mark.parametrize("fn", ["dupper", "adupper"])
def test_a_decorated_stream_generator_filters_as_check_accepted_it(tmp_path, soft_gguf, fn):
    """check reads the `def` (a generator) and accepts it; the runtime runs the function the
    decorator returns (functools.wraps, not itself a generator function) as that generator."""
    path = pipeline(tmp_path, soft_gguf, f'stage up : python {{ fn = "hooks:{fn}"  stream = true }}',
                    "gen -> up -> out\n")
    (one, two), _ = served(path, [said("a"), said("b")])
    for r in (one, two):
        text = r.result.choices[0].text
        assert r.result.ok and text and text == text.upper() and "".join(r.deltas) == text
    assert flowkit.COUNTS["logged"] == 2


def test_a_stream_stage_after_a_join_filters_the_merged_text_whole(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage j : join { policy = first }\n'
                    'stage up : python { fn = "hooks:upper"  stream = true }', "gen -> j -> up -> out\n", n=2)
    (one,), _ = served(path, [said("a")])
    text = one.result.choices[0].text
    assert one.result.ok and text == text.upper() and len(one.result.choices[0].data["branches"]) == 2


def test_a_stream_stage_may_return_a_label(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage f : python { fn = "hooks:labelled"  stream = true }\n'
                    'stage up : python { fn = "hooks:upper"  stream = true }',
                    "gen -> f\nf -> up when long\nf -> out otherwise\nup -> out\n")
    (s, l), _ = served(path, [said("s"), said("l")])
    assert s.result.ok and l.result.ok
    assert l.result.choices[0].text == l.result.choices[0].text.upper()


@pytest.mark.parametrize("stage, words", [
    ('stage f : python { fn = "hooks:upper" }', "is a generator function"),
    ('stage f : python { fn = "hooks:aupper" }', "is a generator function"),
    ('stage f : python { fn = "hooks:labelled"  stream = true  retries = 1 }',
     "retries cannot be used with stream = true"),
    ('stage f : python { fn = "hooks:labelled"  stream = true  cache = 4 }',
     "cache cannot be used with stream = true"),
    ('stage f : python { fn = "hooks:labelled"  stream = true  max_turns = 2 }',
     "max_turns cannot be used with stream = true"),
])
def test_check_rejects_what_a_stream_stage_cannot_do(tmp_path, soft_gguf, stage, words):
    body = (f"stage request : requests {{}}\nstage gen : generate {{}}\nstage out : respond {{}}\n{stage}\n"
            "request -> batch\n" + chain() + "gen -> f -> out\n")
    errs = errors(write(tmp_path, soft_gguf, body, hooks=HOOKS + "\ndef plain(item):\n    return item\n"))
    assert len(errs) == 1 and words in errs[0].message and errs[0].pos.line > 1


def test_check_rejects_a_stream_stage_on_requests_and_a_stream_of_a_plain_function(tmp_path, soft_gguf):
    body = ("stage request : requests {}\nstage gen : generate {}\nstage out : respond {}\n"
            'stage f : python { fn = "hooks:upper"  stream = true }\n'
            'stage p : python { fn = "hooks:plain"  stream = true }\n'
            "request -> f -> batch\n" + chain() + "gen -> p -> out\n")
    errs = errors(write(tmp_path, soft_gguf, body, hooks=HOOKS + "\ndef plain(item):\n    return item\n"))
    msgs = sorted(e.message for e in errs)
    assert any("stage 'f' has stream = true, but Request items reach it" in m for m in msgs)
    assert any("stage 'p' has stream = true, but hooks:plain does not yield" in m for m in msgs)


class Deaf:
    """A listener without on_delta (agp run's): its result alone. It counts how often the
    runtime looks for an on_delta."""

    def __init__(self):
        self.result, self.done, self.asked = None, threading.Event(), 0

    def __getattr__(self, name):
        if name == "on_delta":
            self.asked += 1
        raise AttributeError(name)

    def on_done(self, result):
        self.result = result
        self.done.set()


@pytest.mark.parametrize("stages, edges", [("", "gen -> out\n"),
                                           ('stage up : python { fn = "hooks:upper"  stream = true }',
                                            "gen -> up -> out\n")])
def test_a_listener_without_on_delta_is_looked_up_once_and_no_delta_is_made_per_token(tmp_path, soft_gguf,
                                                                                       stages, edges):
    """A listener that hears no deltas costs the runtime nothing per token: it looks for an
    on_delta once, as the request is admitted, not for each of its tokens (where it made each
    token's Delta and usage so far for nobody). Beside it, a listener with one hears every token."""
    path = pipeline(tmp_path, soft_gguf, stages, edges)
    rt = runtime(path)
    rt.start()
    deaf, hearing = Deaf(), Listener()
    try:
        rt.submit(said("deaf", 8), deaf, stream=True)
        rt.submit(said("hearing", 8), hearing, stream=True)
        assert deaf.done.wait(120) and hearing.done.wait(120)
    finally:
        rt.close(drain=True, timeout=30)
        rt.shutdown()
    assert deaf.result.ok and deaf.result.usage["completion_tokens"] == 8
    assert deaf.result.choices[0].text == hearing.result.choices[0].text     # the same answer
    assert deaf.asked == 1
    assert hearing.finished == 1 and "".join(hearing.deltas) == hearing.result.choices[0].text
