"""What user code hands back is held to what the answer needs: text that is valid Unicode (a
lone UTF-16 surrogate cannot be written as UTF-8: agp serve's answer would break off
mid-body), a finish_reason that is a string, a returned request checked as a request line is.
Each bad output fails its own request at the stage that made it, with a message that says
what; every other request is answered."""
from __future__ import annotations

import json
import logging

import pytest

import flowkit
from flowkit import chain, chat, errors, run, write

HOOKS = '''
def answer(item):
    bad = item["request"].get("metadata", {}).get("bad")
    if bad == "text":
        item["text"] = "half a pair \\ud800 here"
    elif bad == "finish":
        item["finish_reason"] = {"why": "no"}
    elif bad == "usage":
        item["usage"] = "lots"
    elif bad == "count":
        item["usage"] = {**item["usage"], "completion_tokens": "3"}
    elif bad == "negative":
        item["usage"] = {**item["usage"], "prompt_tokens": -2}
    elif bad == "bool":
        item["usage"] = {**item["usage"], "cached_tokens": True}
    elif bad == "reasoning":
        item["usage"] = {**item["usage"], "reasoning_tokens": "many"}    # summed over an answer's choices
    elif bad == "huge":
        item["usage"] = {**item["usage"], "completion_tokens": 10 ** 400}   # no float holds it: TPOT, metrics
    elif bad == "logprobs":
        item["logprobs"] = "nope"
    elif bad == "logprobs_entry":
        item["logprobs"] = [{"token_id": 5, "logprob": -0.5, "top": []}, 7]
    elif bad == "logprobs_id":
        item["logprobs"] = [{"token_id": "5", "logprob": -0.5, "top": []}]
    elif bad == "logprobs_top":
        item["logprobs"] = [{"token_id": 5, "logprob": -0.5, "top": [(5, -0.5), (6,)]}]
    elif bad == "logprobs_value":
        item["logprobs"] = [{"token_id": 5, "logprob": None, "top": []}]
    elif bad == "prompt_logprobs":
        item["prompt_logprobs"] = {"5": -0.5}
    elif bad == "prompt_logprobs_none":
        item["prompt_token_ids"] = [1, 5, 6]
        item["prompt_logprobs"] = [None, None, {"token_id": 6, "logprob": -1.0, "rank": 1, "top": []}]
    elif bad == "prompt_logprobs_rank":
        item["prompt_token_ids"] = [1, 5]
        item["prompt_logprobs"] = [None, {"token_id": 5, "logprob": -1.0, "rank": "first", "top": []}]
    elif bad == "prompt_logprobs_alone":
        item.pop("prompt_token_ids", None)
        item["prompt_logprobs"] = [None, {"token_id": 5, "logprob": -1.0, "rank": 1, "top": []}]
    elif bad == "token_ids":
        item["token_ids"] = [5, -1]
    elif bad == "ids_array":
        import numpy
        item["token_ids"] = numpy.array([5, 6])
    elif bad == "prompt_token_ids":
        item["prompt_token_ids"] = "1 5 6"
    elif bad == "vocab_ids":
        item["token_ids"] = [5, 10 ** 6]
    elif bad == "vocab_prompt_ids":
        item["prompt_token_ids"] = [1, 5, 10 ** 6]
    elif bad == "vocab_logprobs":
        item["logprobs"] = [{"token_id": 5, "logprob": -0.5, "top": []}, {"token_id": 10 ** 6, "logprob": -0.5,
                                                                          "top": []}]
    elif bad == "vocab_top":
        item["logprobs"] = [{"token_id": 5, "logprob": -0.5, "top": [(5, -0.5), (10 ** 6, -1.0)]}]
    elif bad == "vocab_prompt_logprobs":
        item["prompt_token_ids"] = [1, 5]
        item["prompt_logprobs"] = [None, {"token_id": 10 ** 6, "logprob": -1.0, "rank": 1, "top": []}]
    elif bad == "edge":                            # metadata's id in metadata's field
        n, field = item["request"]["metadata"]["id"], item["request"]["metadata"]["field"]
        if field == "token_ids":
            item["token_ids"] = [5, n]
        elif field == "logprobs":
            item["logprobs"] = [{"token_id": n, "logprob": -0.5, "top": [(n, -0.5)]}]
        else:
            item["logprobs"] = [{"token_id": 5, "logprob": -0.5, "top": [(5, -0.5), (n, -1.0)]}]
    elif bad == "filtered":
        item["finish_reason"] = "content_filter"   # a guard may say why it ended the answer
    return item

# an answer made where check cannot read it (it refuses a literal `return {"text": …}` in a stage
# that says it gives requests): the runtime holds such a function to its returns on its own
ANSWER = {"text": "an answer, not a request"}

def ask(item):
    if item.get("metadata", {}).get("bad") == "request":
        item["messages"][0]["content"] = "half a pair \\ud800 here"
    if item.get("metadata", {}).get("bad") == "answer":
        return dict(ANSWER)
    if item.get("metadata", {}).get("bad") == "ids":           # a prompt of its own, one id past the vocabulary
        return {"prompt_token_ids": [1, 5, 10 ** 6], "metadata": item["metadata"]}
    if item.get("metadata", {}).get("bad") == "own_ids":       # a prompt of the ids metadata lists
        return {"prompt_token_ids": item["metadata"]["ids"], "metadata": item["metadata"]}
    if item.get("metadata", {}).get("bad") == "pass_ids":      # the client's own ids, in a new dict
        return {"prompt_token_ids": list(item["prompt_token_ids"]), "metadata": item["metadata"]}
    if item.get("metadata", {}).get("long") == "ids":      # identifiers and metadata past agp serve's bounds
        item.update(user="u" * 600, safety_identifier="s" * 100, prompt_cache_key="p" * 600)
        item["metadata"] = {**item["metadata"], **{f"k{i}": "v" * 600 for i in range(20)}}
    if item.get("metadata", {}).get("bad") == "both":      # made a chat of a text request, kept its prompt
        item["messages"] = [{"role": "user", "content": item["prompt"]}]
    if item.get("metadata", {}).get("constrain"):          # every answer a number, over the request's own
        item["guided_regex"] = "[0-9]+"
        if item["metadata"]["constrain"] == "replace":
            item.pop("response_format", None)
    return item

def canned(item):
    how = item.get("metadata", {}).get("canned")
    if how == "plain":
        return {"text": "a canned answer"}
    if how == "counted":
        return {"text": "an answer from elsewhere", "usage": {"completion_tokens": 7}}
    if how == "in_place":                          # the request dict, its text set: an answer
        item["text"] = "answered in place"
    return item

def stream(item, chunks):
    for text in chunks:
        yield text
    if item["request"].get("metadata", {}).get("bad") == "chunk":
        yield "\\udfff"

def merge(results):
    bad = results[0]["request"].get("metadata", {}).get("bad")
    if bad == "merge":
        return {"text": "\\ud800"}
    if bad == "merge_usage":
        return {"text": "merged", "usage": ["lots"]}
    if bad == "merge_reason":
        return {"text": "merged", "finish_reason": 7}
    if bad == "merge_ids":
        return {"text": "merged", "token_ids": [3, 10 ** 6]}
    return 0
'''


@pytest.fixture(autouse=True)
def _fresh():
    flowkit.reset()
    yield


def pipeline(tmp_path, model, stages: str, edges: str):
    body = ("stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\nstage out : respond {}\n"
            f"{stages}\n" + edges + chain())
    path = write(tmp_path, model, body, hooks=HOOKS)
    assert errors(path) == []
    return path


def answered_except(results, bad_id):
    for r in results:
        if r.id != bad_id:
            assert r.ok, r.error.message
    return next(r for r in results if r.id == bad_id)


@pytest.mark.parametrize("bad, words", [
    ("text", "stage 'a' returned a result whose text is not valid Unicode (a lone UTF-16 surrogate at 12)"),
    ("finish", "stage 'a' returned a result whose finish_reason is a dict; expected a string or null"),
    ("usage", "stage 'a' returned a result whose usage is a str; expected an object of token counts "
              "(prompt_tokens, completion_tokens, cached_tokens) or null"),
    ("count", "stage 'a' returned a result whose usage.completion_tokens is '3'; expected a non-negative integer"),
    ("negative", "stage 'a' returned a result whose usage.prompt_tokens is -2; expected a non-negative integer"),
    ("bool", "stage 'a' returned a result whose usage.cached_tokens is True; expected a non-negative integer"),
    ("reasoning", "stage 'a' returned a result whose usage.reasoning_tokens is 'many'; expected a non-negative "
                  "integer"),
    ("huge", "stage 'a' returned a result whose usage.completion_tokens is an integer of 401 digits; expected a "
             "non-negative integer of at most 9007199254740991 (2**53 - 1)"),
    ("logprobs", "stage 'a' returned a result whose logprobs is a str; expected a list of an object {token_id, "
                 "logprob, top: [[token id, logprob], ...]} per token, or null"),
    ("logprobs_entry", "stage 'a' returned a result whose logprobs[1] is 7; expected an object {token_id, logprob, "
                       "top: [[token id, logprob], ...]}"),
    ("logprobs_id", "stage 'a' returned a result whose logprobs[0].token_id is '5'; expected a token id (a "
                    "non-negative integer)"),
    ("logprobs_top", "stage 'a' returned a result whose logprobs[0].top[1] is (6,); expected a [token id, logprob] "
                     "pair"),
    ("logprobs_value", "stage 'a' returned a result whose logprobs[0].logprob is None; expected a number"),
    ("prompt_logprobs", "stage 'a' returned a result whose prompt_logprobs is a dict; expected a list of an object "
                        "{token_id, logprob, top: [[token id, logprob], ...]} per token, or null"),
    ("prompt_logprobs_none", "stage 'a' returned a result whose prompt_logprobs[1] is None; expected an object "
                             "{token_id, logprob, top: [[token id, logprob], ...]} (or null for the first)"),
    ("prompt_logprobs_rank", "stage 'a' returned a result whose prompt_logprobs[1].rank is 'first'; expected an "
                             "integer or null"),
    ("prompt_logprobs_alone", "stage 'a' returned a result with prompt_logprobs but no prompt_token_ids (the "
                              "engine gives both; an echoed prompt's first token is read there)"),
    ("token_ids", "stage 'a' returned a result whose token_ids[1] is -1; expected a token id (a non-negative "
                  "integer)"),
    ("ids_array", "stage 'a' returned a result whose token_ids is a ndarray; expected a list of token ids "
                  "(non-negative integers) or null"),
    ("prompt_token_ids", "stage 'a' returned a result whose prompt_token_ids is a str; expected a list of token ids "
                         "(non-negative integers) or null"),
])
def test_a_result_hook_returning_text_that_cannot_be_sent_fails_its_request_there(tmp_path, soft_gguf, bad, words):
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:answer" }',
                    "request -> batch\ngen -> a -> out\n")
    results, rt = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": bad}), chat("ok2", "hello")])
    r = answered_except(results, "bad")
    assert r.error.kind == "failed" and r.error.stage == "a" and r.error.message == words
    assert rt.stats()["stages"]["a"]["failed"] == 1


@pytest.mark.parametrize("bad, where", [
    ("vocab_ids", "token_ids[1]"), ("vocab_prompt_ids", "prompt_token_ids[2]"),
    ("vocab_logprobs", "logprobs[1].token_id"), ("vocab_top", "logprobs[0].top[1][0]"),
    ("vocab_prompt_logprobs", "prompt_logprobs[1].token_id")])
def test_a_result_hook_writing_token_ids_outside_the_vocabulary_fails_its_request_there(
        tmp_path, soft_gguf, bad, where):
    """An id past the end of the model's vocabulary has no text: the answer's logprobs named it
    "" (and an echoed prompt lost it) with nothing said. It fails at the stage that wrote it,
    naming the element and the vocabulary's range, as an id that is no integer does."""
    from tiny_model import tiny_vocab

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:answer" }',
                    "request -> batch\ngen -> a -> out\n")
    results, rt = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": bad}), chat("ok2", "hello")])
    r = answered_except(results, "bad")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == (f"stage 'a' returned a result whose {where} is 1000000; expected a token id of the "
                               f"vocabulary (0..{len(tiny_vocab()[0]) - 1})")
    assert rt.stats()["stages"]["a"]["failed"] == 1


@pytest.mark.parametrize("field, where", [("token_ids", "token_ids[1]"), ("logprobs", "logprobs[0].token_id"),
                                          ("top", "logprobs[0].top[1][0]")])
def test_the_vocabularys_first_and_last_ids_are_taken_and_the_next_one_is_not(tmp_path, soft_gguf, field, where):
    """The vocabulary's ids are 0..V-1: a result whose token ids are 0 or end at V-1 is answered,
    and one naming V, the first id past its end, fails at the stage that wrote it."""
    from tiny_model import tiny_vocab

    vocab = len(tiny_vocab()[0])
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:answer" }', "request -> batch\ngen -> a -> out\n")
    results, _ = run(path, [chat("first", "hi", metadata={"bad": "edge", "id": 0, "field": field}),
                            chat("last", "hi", metadata={"bad": "edge", "id": vocab - 1, "field": field}),
                            chat("past", "hi", metadata={"bad": "edge", "id": vocab, "field": field})])
    r = answered_except(results, "past")
    assert r.error.stage == "a" and r.error.message == (
        f"stage 'a' returned a result whose {where} is {vocab}; expected a token id of the vocabulary (0..{vocab - 1})")


def join_failure(tmp_path, soft_gguf, bad: str):
    """The result of a request whose join fn `j` (of gen's and g2's answers) misbehaves as `bad`
    says (hooks:merge), once a request beside it was answered."""
    path = pipeline(tmp_path, soft_gguf, 'stage g2 : generate { max_new_tokens = 2 }\n'
                    'stage j : join { fn = "hooks:merge" }',
                    "request -> batch\nkv -> g2\ngen -> j\ng2 -> j\nj -> out\n")
    results, _ = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": bad})])
    return answered_except(results, "bad")


def test_a_join_fn_writing_token_ids_outside_the_vocabulary_fails_its_request(tmp_path, soft_gguf):
    r = join_failure(tmp_path, soft_gguf, "merge_ids")
    assert r.error.stage == "j" and r.error.message.startswith(
        "join 'j' produced a result whose token_ids[1] is 1000000; expected a token id of the vocabulary (0..")


def test_a_finish_reason_a_guard_sets_goes_through(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:answer" }',
                    "request -> batch\ngen -> a -> out\n")
    (r,), _ = run(path, [chat("f", "hi", metadata={"bad": "filtered"})])
    assert r.ok and r.choices[0].finish_reason == "content_filter"


def test_a_request_hook_returning_prompt_token_ids_outside_the_vocabulary_fails_at_the_hook_not_at_encode(
        tmp_path, soft_gguf):
    """Ids a request stage wrote are its own: an id past the vocabulary fails the request at that
    stage, naming the element and the range, as a result's token ids do; not the client's 400
    at encode. The client's own bad ids handed on unchanged are still the client's."""
    from tiny_model import tiny_vocab

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    results, rt = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": "ids"}),
                             {"id": "client", "prompt_token_ids": [1, 10 ** 6], "metadata": {"bad": "pass_ids"}}])
    r = answered_except([x for x in results if x.id != "client"], "bad")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == ("stage 'a' returned a request whose prompt_token_ids[2] is 1000000; expected a token "
                               f"id of the vocabulary (0..{len(tiny_vocab()[0]) - 1})")
    assert rt.stats()["stages"]["a"]["failed"] == 1
    client = next(x for x in results if x.id == "client")
    assert client.error.kind == "invalid" and "token id 1000000 is outside the vocabulary" in client.error.message


def test_a_request_hooks_ids_are_held_to_the_pinned_models_vocabulary_else_the_largest(
        tmp_path, soft_gguf):
    """Which model tokenises a request that names none is told after the hook (a route picks it):
    its ids are bounded by the largest of the pipeline's vocabularies there, so an id only the
    larger one has reaches that model's stage and is answered; one past every vocabulary fails
    at the hook. A request pinned to a stage is held to that stage's model's vocabulary."""
    from tiny_model import spm_vocab, tiny_vocab, write_tiny_gguf

    small, large = len(tiny_vocab()[0]), len(spm_vocab()[0])
    assert small < large
    spm = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="spm")
    body = ("stage request : requests {}\nstage a : python { fn = \"hooks:ask\" }\nstage route : route {}\n"
            "stage gen : generate { max_new_tokens = 2 }\n"
            f"stage spm_gen : generate {{ max_new_tokens = 2 model = \"{spm}\" }}\nstage out : respond {{}}\n"
            "request -> a -> route\nroute -> batch_s otherwise\nroute -> batch when max_tokens > 100000\n"
            "gen -> out\nspm_gen -> out\n" + chain() + chain("spm_gen", "batch_s", "enc_s", "kv_s"))
    path = write(tmp_path, soft_gguf, body, hooks=HOOKS)
    assert errors(path) == []
    results, _ = run(path, [{"id": "ok", "prompt": "hi", "max_tokens": 2, "metadata": {"bad": "own_ids",
                                                                                      "ids": [1, 5, large - 1]}},
                            {"id": "past", "prompt": "hi", "max_tokens": 2, "metadata": {"bad": "own_ids",
                                                                                        "ids": [1, 5, large]}}])
    r = answered_except(results, "past")
    assert r.error.stage == "a" and r.error.message == (
        f"stage 'a' returned a request whose prompt_token_ids[2] is {large}; expected a token id of the vocabulary "
        f"(0..{large - 1})")
    # a request that names its stage's model is held to that model's vocabulary at the hook
    results, _ = run(path, [({"id": "pinned", "prompt": "hi", "max_tokens": 2,
                              "metadata": {"bad": "own_ids", "ids": [1, 5, small]}}, "gen")])
    assert results[0].error.stage == "a" and results[0].error.message == (
        f"stage 'a' returned a request whose prompt_token_ids[2] is {small}; expected a token id of the vocabulary "
        f"(0..{small - 1})")


def test_a_request_hook_returning_invalid_unicode_fails_at_the_hook_not_at_encode(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    results, _ = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": "request"})])
    r = answered_except(results, "bad")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == ("stage 'a' returned an invalid request: the request holds a lone UTF-16 "
                               "surrogate (invalid Unicode) in 'messages[0].content'")


def test_a_request_hook_may_give_identifiers_and_metadata_past_agp_serves_bounds(tmp_path, soft_gguf):
    """agp serve bounds a client's metadata, user, safety_identifier and prompt_cache_key (a
    stored Responses answer keeps them); a python stage's own request is stored nowhere and is
    checked as a request line is: their types, not their sizes. A user of 600 characters failed
    the request at the stage ("returned an invalid request": agp serve's 500)."""
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    results, _ = run(path, [chat("ok", "hi"), chat("long", "hi", metadata={"long": "ids"})])
    (long,) = [r for r in results if r.id == "long"]
    assert all(r.ok for r in results), [r.error.message for r in results if not r.ok]
    request = long.choices[0].data["request"]
    assert (len(request["user"]), len(request["safety_identifier"]), len(request["metadata"])) == (600, 100, 21)


def test_a_request_hook_that_gives_both_prompt_and_messages_is_told_which_it_gave(tmp_path, soft_gguf):
    """A stage that turns a text request into a chat one and keeps its `prompt` fails at that
    stage, the message naming both fields it handed back, not only the rule."""
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    results, _ = run(path, [chat("ok", "hi"), {"id": "bad", "prompt": "hi", "metadata": {"bad": "both"}}])
    r = answered_except(results, "bad")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == ("stage 'a' returned an invalid request: give exactly one of 'prompt' (text), "
                               "'messages' (chat) or 'prompt_token_ids': it gives 'prompt' and 'messages'")


def test_a_request_hook_setting_a_constraint_beside_the_requests_own_is_told_not_ignored(tmp_path, soft_gguf):
    """The item carries a request's guided_choice as its response_format ({"type": "choice", ...}).
    A stage that sets guided_regex beside it had its regex dropped without a word (the answer
    followed the client's choices); it fails at the stage as a request with both fields is refused,
    and one that removes the response_format first gets its regex."""
    from pipeline_dsl.requests_io import parse_request

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    own = {"guided_choice": ["yes", "no"], "max_tokens": 3}
    results, _ = run(path, [parse_request(r).item() for r in (
        chat("beside", "hi", metadata={"constrain": "beside"}, **own),
        chat("replace", "hi", metadata={"constrain": "replace"}, **own),
        chat("alone", "hi", metadata={"constrain": "alone"}, max_tokens=3))])
    r = answered_except(results, "beside")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == ("stage 'a' returned an invalid request: give at most one of 'response_format', "
                               "'guided_regex': each sets the answer's format")
    for rid in ("replace", "alone"):
        (answer,) = [x for x in results if x.id == rid]
        assert answer.choices[0].text.isdigit(), (rid, answer.choices[0].text)


def test_a_request_hook_handing_back_the_request_it_got_keeps_its_schema_and_an_embeddings_request(
        tmp_path, soft_gguf):
    """A request stage that returns what it got (every guard and redactor does) has it checked as
    a request line, and the forms agp itself puts on items pass: a json_schema response_format
    (the item carries {"type", "schema", "name"}, not OpenAI's {"json_schema": {...}}) and an
    embeddings request (max_tokens 0 with pooling, /v1/embeddings' item). Both failed with
    "stage 'a' returned an invalid request"."""
    from pipeline_dsl.requests_io import parse_request, request_item

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }', "request -> a -> batch\ngen -> out\n")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    shaped = parse_request(chat("json", "hi", max_tokens=12, ignore_eos=False, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})).item()
    pooled = request_item("emb", messages=None, prompt="hello world", prompt_token_ids=None,
                          fields={"max_tokens": 0, "pooling": "mean"})
    results, _ = run(path, [shaped, pooled, chat("ok", "hi")])
    for r in results:
        assert r.ok, (r.id, r.error and r.error.message)
    (answer,) = [r for r in results if r.id == "json"]
    assert answer.choices[0].text.startswith("{")                      # the schema held


def test_a_request_of_token_ids_goes_through_a_request_hook(tmp_path, soft_gguf):
    """A request line may give its prompt as `prompt_token_ids`; a python stage that hands it back
    (or returns None) kept it a request, but the runtime knew a request only by `messages` or
    `prompt` and failed it: "stage 'a' returned a dict that is neither a request ... nor a result"."""
    from pipeline_dsl.requests_io import parse_request

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:ask" }\n'
                    'stage b : python { fn = "hooks:answer" }', "request -> a -> batch\ngen -> b -> out\n")
    ids = parse_request({"id": "ids", "prompt_token_ids": [5, 6, 7], "max_tokens": 2, "ignore_eos": True,
                         "return_token_ids": True}).item()        # its answer carries prompt_token_ids too
    results, rt = run(path, [ids, chat("ok", "hi")])
    for r in results:
        assert r.ok, (r.id, r.error and r.error.message)
    assert results[0].usage["prompt_tokens"] == 3 and results[0].usage["completion_tokens"] == 2
    assert results[0].choices[0].data["prompt_token_ids"] == [5, 6, 7]
    assert rt.stats()["stages"]["a"]["failed"] == rt.stats()["stages"]["b"]["failed"] == 0


@pytest.mark.parametrize("returns", ["same", "request"])
def test_a_request_hook_answering_against_its_returns_fails_its_request(tmp_path, soft_gguf, returns):
    """docs/language.md, `returns`: check types the graph by it, and the runtime holds the
    function to it (only `returns = any` may turn a Request into an answer)."""
    path = pipeline(tmp_path, soft_gguf, f'stage a : python {{ fn = "hooks:ask"  returns = {returns} }}',
                    "request -> a -> batch\ngen -> out\n")
    results, rt = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": "answer"})])
    r = answered_except(results, "bad")
    assert r.error.kind == "failed" and r.error.stage == "a"
    assert r.error.message == (f"stage 'a' returned a Generated but declares returns = {returns} (it got a "
                               "Request); set returns = any if it may do both")
    assert rt.stats()["stages"]["a"]["failed"] == 1


def test_a_stream_stage_yielding_invalid_unicode_fails_its_request(tmp_path, soft_gguf):
    path = pipeline(tmp_path, soft_gguf, 'stage s : python { fn = "hooks:stream"  stream = true }',
                    "request -> batch\ngen -> s -> out\n")
    results, _ = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": "chunk"})])
    r = answered_except(results, "bad")
    assert r.error.stage == "s" and "a lone UTF-16 surrogate" in r.error.message


def test_a_join_fn_making_invalid_unicode_fails_its_request(tmp_path, soft_gguf):
    r = join_failure(tmp_path, soft_gguf, "merge")
    assert r.error.stage == "j" and "not valid Unicode" in r.error.message


@pytest.mark.parametrize("bad, words", [
    ("merge_usage", "join 'j' produced a result whose usage is a list; expected an object of token counts"),
    ("merge_reason", "join 'j' produced a result whose finish_reason is an int; expected a string or null"),
])
def test_a_join_fn_making_a_result_that_cannot_be_answered_fails_its_request(tmp_path, soft_gguf, bad, words):
    path = pipeline(tmp_path, soft_gguf, 'stage g2 : generate { max_new_tokens = 2 }\n'
                    'stage j : join { fn = "hooks:merge" }',
                    "request -> batch\nkv -> g2\ngen -> j\ng2 -> j\nj -> out\n")
    results, _ = run(path, [chat("ok", "hi"), chat("bad", "hi", metadata={"bad": bad})])
    r = answered_except(results, "bad")
    assert r.error.stage == "j" and r.error.message.startswith(words)


def test_a_listener_that_fails_on_a_result_is_logged_and_told_its_answer_failed_and_the_others_are_heard(
        tmp_path, soft_gguf, caplog):
    """A listener that cannot take its result (its answer cannot be built of it) is logged once
    with its traceback and told the error instead (answer_failed: its client is answered, not
    left waiting); one that cannot take that error either is logged again, its answer lost."""
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:answer" }',
                    "request -> batch\ngen -> a -> out\n")
    heard = []

    def on_result(i, result):
        if result.id == "lost" or (result.id == "boom" and result.ok):
            raise RuntimeError("the listener broke")
        heard.append((result.id, result.error.code if result.error else None))

    caplog.set_level(logging.ERROR, logger="agp.flow")
    run(path, [chat("ok", "hi"), chat("boom", "hi"), chat("ok2", "hello")], on_result=on_result)
    assert sorted(heard) == [("boom", "answer_failed"), ("ok", None), ("ok2", None)]
    told = [r for r in caplog.records if r.name == "agp.flow" and r.levelno == logging.ERROR]
    assert len(told) == 1 and "'boom'" in told[0].getMessage() and "could not be built" in told[0].getMessage()
    assert "the listener broke" in caplog.text
    caplog.clear()
    run(path, [chat("lost", "hi"), chat("ok", "hi")], on_result=on_result)
    lost = [r for r in caplog.records if r.name == "agp.flow" and r.levelno == logging.ERROR]
    assert len(lost) == 2 and "answer is lost" in lost[1].getMessage() and "'lost'" in lost[1].getMessage()


def test_a_request_a_stage_answers_itself_reports_its_prompt_tokens(tmp_path, soft_gguf):
    """No model read the prompt of a request a python stage answers (`returns = any`), yet its
    usage counts it as the pipeline's model tokenises it, the count the engine gives the same
    request: prompt_tokens, no completion or cached tokens; what the result gives of its usage
    (a function that asked another service knows its counts) is reported instead."""
    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:canned"  returns = any }',
                    "request -> a\na -> batch\na -> out\ngen -> out\n")
    results, _ = run(path, [chat("gen", "hello there"), chat("plain", "hello there", metadata={"canned": "plain"}),
                            chat("counted", "hello there", metadata={"canned": "counted"})])
    by_id = {r.id: r for r in results}
    assert all(r.ok for r in results), [r.error.message for r in results if not r.ok]
    prompt = by_id["gen"].usage["prompt_tokens"]
    assert prompt > 3 and by_id["gen"].usage["completion_tokens"] == 4
    assert by_id["plain"].choices[0].text == "a canned answer"
    assert by_id["plain"].usage == {"prompt_tokens": prompt, "completion_tokens": 0, "cached_tokens": 0}
    assert by_id["counted"].usage == {"prompt_tokens": prompt, "completion_tokens": 7, "cached_tokens": 0}



def test_a_request_a_stage_answers_in_place_keeps_its_own_logprobs_settings_out_of_the_answer(tmp_path, soft_gguf):
    """A request of token ids that asked logprobs (`logprobs: 2`, `prompt_logprobs: 1`: how many
    alternatives) which a python stage answers by setting its text: those settings are the
    request's, no answer's logprobs, and the answer is made without them; the runtime's check of
    a result's logprobs blamed the stage for a field it never wrote."""
    from pipeline_dsl.requests_io import parse_request

    path = pipeline(tmp_path, soft_gguf, 'stage a : python { fn = "hooks:canned"  returns = any }',
                    "request -> a\na -> batch\na -> out\ngen -> out\n")
    asked = parse_request({"id": "ids", "prompt_token_ids": [5, 6, 7], "max_tokens": 2, "logprobs": 2,
                           "prompt_logprobs": 1, "metadata": {"canned": "in_place"}}).item()
    results, _ = run(path, [asked, chat("gen", "hello there")])
    assert all(r.ok for r in results), [r.error.message for r in results if not r.ok]
    [choice] = results[0].choices
    assert choice.text == "answered in place"
    assert choice.data.get("logprobs") is None and choice.data.get("prompt_logprobs") is None


TOOL_LOOP_HOOKS = '''
import json

def tool(result):
    """A tool step: run the calls the model made, hand their results back to it, once."""
    calls, req = result.get("tool_calls"), result["request"]
    if calls:
        req["messages"] = req["messages"] + [{"role": "assistant", "content": None, "tool_calls": calls}] + [
            {"role": "tool", "tool_call_id": c["id"], "content": "7"} for c in calls]
        req["tool_choice"] = "none"
        req["metadata"] = {"ran": [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in calls]}
        return req
    return {"text": json.dumps({"ran": req.get("metadata", {}).get("ran"), "calls": "tool_calls" in result})}
'''


def test_a_python_tool_stage_reads_the_calls_the_model_made_parsed_as_agp_serve_answers_them(tmp_path, long_gguf):
    """A Generated result whose request gave tools carries `tool_calls` (id, name, JSON arguments)
    parsed out of its text, so a tool loop in the pipeline runs them without parsing the model's
    own call markup; an answer under tool_choice "none" carries none."""
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"]}}}
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 200 }\n'
            'stage tool : python { fn = "hooks:tool"  max_turns = 2  returns = any }\nstage out : respond {}\n'
            + chain().replace("budget = 2MiB", "budget = 8MiB")
            + "request -> batch\ngen -> tool\ntool -> batch\ntool -> out\n")
    path = write(tmp_path, long_gguf, body, hooks=TOOL_LOOP_HOOKS)
    assert errors(path) == []
    forced = chat("t", "add two numbers", max_tokens=200, tools=[add],
                  tool_choice={"type": "function", "function": {"name": "add"}})
    forced.pop("ignore_eos")
    (r,), _ = run(path, [forced])
    assert r.ok, r.error
    seen = json.loads(r.choices[0].text)
    assert seen["calls"] is False                          # the second answer, under tool_choice none
    [(name, args)] = seen["ran"]
    assert name == "add" and set(args) == {"a", "b"}


def test_a_python_tool_stage_reads_calls_in_the_form_the_model_s_own_template_asks_for(tmp_path):
    """A model whose GGUF chat template asks for Llama 3's bare JSON calls: its Generated result
    carries them as `tool_calls`, read in that form (told from the template)."""
    from tiny_model import write_tiny_gguf

    template = ("{% if tools %}Environment: ipython\nCall a function as "
                '{"name": function name, "parameters": dictionary of argument name and its value}\n{% endif %}'
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    model = write_tiny_gguf(tmp_path / "llama.gguf", context=4096, embed_scale=0.3, chat_template=template)
    add = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 200 }\n'
            'stage tool : python { fn = "hooks:tool"  max_turns = 2  returns = any }\nstage out : respond {}\n'
            + chain().replace("budget = 2MiB", "budget = 8MiB")
            + "request -> batch\ngen -> tool\ntool -> batch\ntool -> out\n")
    path = write(tmp_path, model, body, hooks=TOOL_LOOP_HOOKS)
    said = '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'
    req = chat("t", "add two numbers", max_tokens=200, tools=[add], tool_choice="auto",
               response_format={"type": "choice", "choices": [said]})
    req.pop("ignore_eos")
    (r,), _ = run(path, [req])
    assert r.ok, r.error
    assert json.loads(r.choices[0].text)["ran"] == [["add", {"a": 1, "b": 2}]]


PASSING_HOOKS = '''
import json

def scaled(entry):
    return None if entry is None else {**entry, "logprob": entry["logprob"] * 0.5,
                                       "top": [(t, lp * 0.5) for t, lp in entry["top"]]}

def touch(item):
    how = item["request"].get("metadata", {}).get("how")
    if how == "json":                   # a copy as JSON gives it: the engine's (id, logprob) pairs as lists
        return json.loads(json.dumps(item))
    if how == "rewritten":              # new values in the engine's own shapes (its tuples kept)
        item["logprobs"] = [scaled(e) for e in item["logprobs"]]
        item["prompt_logprobs"] = [scaled(e) for e in item["prompt_logprobs"]]
        item["token_ids"] = list(item["token_ids"])
        item["prompt_token_ids"] = list(item["prompt_token_ids"])
    return item                         # "as_is": what it got
'''


def test_an_engine_answer_a_stage_hands_back_keeps_its_token_fields_in_chat_and_completions(tmp_path, soft_gguf):
    """The token fields the engine gives a result (logprobs with their top alternatives, the
    prompt's logprobs, return_token_ids' ids) pass a python stage that hands them back as it got
    them, as a JSON copy, or rewritten in the same shapes, and reach the answer: agp run's line
    carries them, for a chat line and a completions line alike."""
    from clikit import agp_in

    body = ('stage request : requests {}\nstage gen : generate { max_new_tokens = 3 }\n'
            'stage a : python { fn = "hooks:touch" }\nstage out : respond {}\n'
            "request -> batch\ngen -> a -> out\n" + chain())
    path = write(tmp_path, soft_gguf, body, hooks=PASSING_HOOKS)
    assert errors(path) == []
    asked = {"max_tokens": 3, "ignore_eos": True, "temperature": 0, "prompt_logprobs": 2, "return_token_ids": True}
    lines = []
    for how in ("as_is", "json", "rewritten"):
        lines.append({"id": f"chat-{how}", "messages": [{"role": "user", "content": "hi there"}], "logprobs": True,
                      "top_logprobs": 2, "metadata": {"how": how}, **asked})
        lines.append({"id": f"text-{how}", "prompt": "hi there", "logprobs": 2, "metadata": {"how": how}, **asked})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = agp_in("run", path, "-i", inp, "-o", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = {w["id"]: w for w in map(json.loads, out.read_text().splitlines())}
    assert sorted(written) == sorted(x["id"] for x in lines)
    for rid, w in written.items():
        assert "error" not in w, (rid, w["error"])
        assert len(w["token_ids"]) == 3 and len(w["prompt_token_ids"]) == w["usage"]["prompt_tokens"]
        assert len(w["logprobs"]["tokens"]) == 3 and all(t for t in w["logprobs"]["top_logprobs"])
        assert len(w["prompt_logprobs"]) == len(w["prompt_token_ids"]) and w["prompt_logprobs"][0] is None
    for kind in ("chat", "text"):
        same, halved = written[f"{kind}-as_is"]["logprobs"], written[f"{kind}-rewritten"]["logprobs"]
        for other in (written[f"{kind}-json"]["logprobs"], halved):   # batched apart: float noise aside
            assert other["tokens"] == same["tokens"]
        assert written[f"{kind}-json"]["logprobs"]["token_logprobs"] == pytest.approx(same["token_logprobs"], abs=1e-4)
        assert halved["token_logprobs"] == pytest.approx([v * 0.5 for v in same["token_logprobs"]], abs=1e-4)
